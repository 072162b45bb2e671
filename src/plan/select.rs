//! Which tensors a plan keeps: `--include`/`--exclude` globs and `--buffer-pattern`.

/// `*` matches any run of characters (dots included), `?` one character; everything else
/// matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `name` is selected by `--include`/`--exclude`: included (or no `--include` given)
/// and not excluded.
pub fn selected(name: &str, include: &[String], exclude: &[String]) -> bool {
    (include.is_empty() || include.iter().any(|g| glob_match(g, name)))
        && !exclude.iter().any(|g| glob_match(g, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.running_mean", "backbone.bn1.running_mean"));
        assert!(!glob_match("*.running_mean", "backbone.bn1.running_var"));
        assert!(glob_match("conv*", "conv1.weight"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
    }

    #[test]
    fn selection() {
        let inc = vec!["state_dict.*".to_string()];
        let exc = vec!["*.num_batches_tracked".to_string()];
        assert!(selected("state_dict.w", &inc, &exc));
        assert!(!selected("ema_state_dict.w", &inc, &exc));
        assert!(!selected("state_dict.bn.num_batches_tracked", &inc, &exc));
        assert!(selected("anything", &[], &[]));
    }
}
