//! Text for people: byte counts, and content of files made safe to quote in one line.

/// Longest piece of file content (a tensor name, a dtype) quoted in a message.
pub const MAX_QUOTED: usize = 200;

/// `s` as it may be quoted in a one-line message: control characters escaped (a hostile name
/// cannot break the line or forge another), cut to [`MAX_QUOTED`] characters.
pub fn printable(s: &str) -> String {
    one_line(s, MAX_QUOTED)
}

/// A whole message made safe for one line of a terminal: control characters escaped, and cut
/// to `max` characters.
pub fn one_line(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Human-readable byte count in decimal units (`1.2 GB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_and_cuts() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }

    #[test]
    fn byte_counts() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_234_000), "1.2 MB");
    }
}
