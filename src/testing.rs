//! What the unit tests share (compiled for tests only).

/// Says that a test cannot check what it is for because `what` is missing on this machine:
/// a note, or, with `EMA_TOOL_TEST_STRICT=1` (as CI runs), a failure.
pub(crate) fn missing_prerequisite(what: &str) {
    if std::env::var_os("EMA_TOOL_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("EMA_TOOL_TEST_STRICT=1 and this test needs {what}");
    }
    eprintln!("note: skipped, this machine lacks {what} (EMA_TOOL_TEST_STRICT=1 fails instead)");
}
