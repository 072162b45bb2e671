//! The order in which a fold takes its inputs (`docs/formats.md#order`): by step when every
//! input has one, otherwise as given, or as asked.

use std::cmp::Ordering;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// How inputs are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// By step when every input has one, otherwise as given.
    Auto,
    /// As given on the command line.
    Given,
    /// Natural sort of the file names (`iter_200` before `iter_1000`).
    Name,
    /// By step; an input without a step is an error.
    Step,
}

/// What [`order_inputs`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputOrder {
    /// Permutation: position i of the fold takes input `perm[i]`.
    pub perm: Vec<usize>,
    /// What was used (`step`, `given` or `name`).
    pub used: Order,
    /// A warning for the user, when the order is doubtful.
    pub warning: Option<String>,
}

/// Orders inputs given their paths and steps.
pub fn order_inputs(order: Order, paths: &[&Path], steps: &[Option<u64>]) -> Result<InputOrder> {
    let n = paths.len();
    let given: Vec<usize> = (0..n).collect();
    let by_name = || {
        let mut p = given.clone();
        p.sort_by(|&a, &b| natural_cmp(&paths[a].to_string_lossy(), &paths[b].to_string_lossy()));
        p
    };
    let by_step = || {
        let mut p = given.clone();
        p.sort_by_key(|&i| steps[i]);
        p
    };
    let all_steps = steps.iter().all(Option::is_some);
    let (perm, used, mut warning) = match order {
        Order::Given => (given.clone(), Order::Given, None),
        Order::Name => (by_name(), Order::Name, None),
        Order::Step => {
            if let Some(i) = steps.iter().position(Option::is_none) {
                return Err(Error::format(
                    paths[i],
                    "has no step (no step metadata and no number in the file name); \
                     --order step needs one for every input",
                ));
            }
            (by_step(), Order::Step, None)
        }
        Order::Auto if all_steps => (by_step(), Order::Step, None),
        Order::Auto => {
            let name = by_name();
            let warning = (name != given).then(|| {
                "not every input has a step, so inputs are folded in the order given, which \
                 differs from file-name order; pass --order name or --order given to choose"
                    .to_string()
            });
            (given.clone(), Order::Given, warning)
        }
    };
    if used == Order::Step {
        let mut seen = std::collections::HashMap::new();
        for &i in &perm {
            if let Some(prev) = seen.insert(steps[i], i) {
                warning = Some(format!(
                    "{} and {} have the same step {}; they keep the order given",
                    paths[prev].display(),
                    paths[i].display(),
                    steps[i].unwrap_or(0)
                ));
                break;
            }
        }
    }
    Ok(InputOrder {
        perm,
        used,
        warning,
    })
}

/// Natural order: runs of digits compare as numbers (`iter_200` < `iter_1000`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let i = d.iter().position(|&c| c != b'0').unwrap_or(d.len());
    &d[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["iter_1000", "iter_200", "iter_30", "iter_0200b", "a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            vec!["a", "iter_30", "iter_200", "iter_0200b", "iter_1000"]
        );
    }

    #[test]
    fn auto_order_uses_steps_when_all_have_one() {
        let p = [Path::new("iter_1000"), Path::new("iter_200")];
        let o = order_inputs(Order::Auto, &p, &[Some(1000), Some(200)]).unwrap();
        assert_eq!(o.perm, vec![1, 0]);
        assert_eq!(o.used, Order::Step);
        let o = order_inputs(Order::Auto, &p, &[Some(1000), None]).unwrap();
        assert_eq!(o.perm, vec![0, 1]);
        assert!(o.warning.is_some());
        assert!(order_inputs(Order::Step, &p, &[Some(1), None]).is_err());
    }
}
