//! What the unit tests share (compiled for tests only).

/// Says that a test cannot check what it is for because `what` is missing on this machine:
/// a note, or, with `EMA_TOOL_TEST_STRICT=1` (as CI runs), a failure.
pub(crate) fn missing_prerequisite(what: &str) {
    if std::env::var_os("EMA_TOOL_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("EMA_TOOL_TEST_STRICT=1 and this test needs {what}");
    }
    eprintln!("note: skipped, this machine lacks {what} (EMA_TOOL_TEST_STRICT=1 fails instead)");
}

/// Deterministic pseudo-random numbers (xorshift64*): the one generator of the unit tests.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-scale, scale).
    pub(crate) fn float(&mut self, scale: f64) -> f64 {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
    }
}
