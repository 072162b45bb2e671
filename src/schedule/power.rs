//! EDM2's power-function EMA (`docs/strategies.md#power`): at update u the average keeps
//! β_u = (1 − 1/u)^(γ+1) of itself. The products telescope:
//! Π_{u=a+1}^{b} β_u = (a/b)^(γ+1), so the model that stands over the updates (a, b] enters the
//! average at update U with the weight (b^(γ+1) − a^(γ+1)) / U^(γ+1), whatever the number of
//! updates: planning is O(N) for any T.

/// γ of the relative standard deviation `sigma_rel` (Karras et al. 2024, Equation 126 and
/// Algorithm 2): the largest real root of γ³ + 7γ² + (16 − S⁻²)γ + (12 − S⁻²). `None` unless
/// 0 < S < 1/√12 (≈ 0.2887), where that root is positive.
pub fn sigma_rel_to_gamma(sigma_rel: f64) -> Option<f64> {
    if !(sigma_rel > 0.0 && sigma_rel < (1.0f64 / 12.0).sqrt()) {
        return None;
    }
    let t = sigma_rel.powi(-2);
    let p = |g: f64| ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t);
    let dp = |g: f64| (3.0 * g + 14.0) * g + (16.0 - t);
    // p(0) = 12 − t < 0 and p(√t) = 6t + 16√t + 12 > 0; p falls, then rises to its only
    // positive root: bisect, then polish with Newton's method.
    let (mut lo, mut hi) = (0.0f64, t.sqrt());
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if p(mid) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut g = 0.5 * (lo + hi);
    for _ in 0..4 {
        let d = dp(g);
        if d == 0.0 {
            break;
        }
        let next = g - p(g) / d;
        if !(next > 0.0 && next.is_finite()) {
            break;
        }
        g = next;
    }
    (g > 0.0).then_some(g)
}

/// The relative standard deviation of the power-function profile of exponent `gamma`
/// (Equation 123): √((γ+1) / ((γ+2)²(γ+3))).
pub fn gamma_to_sigma_rel(gamma: f64) -> f64 {
    ((gamma + 1.0) / ((gamma + 2.0).powi(2) * (gamma + 3.0))).sqrt()
}

/// `x^p − y^p` for 0 ≤ y < x, accurate also when the two are close.
fn pow_diff(x: f64, y: f64, p: f64) -> f64 {
    if y <= 0.0 {
        return x.powf(p);
    }
    y.powf(p) * (p * ((x - y) / y).ln_1p()).exp_m1()
}

/// The weights of a power-function EMA of exponent `gamma` over `n` inputs.
///
/// Without steps, input k is the model at update k + 1 (the first is the average's initial
/// copy, which update 1 replaces by itself): weight ((k+1)^(γ+1) − k^(γ+1)) / n^(γ+1). With
/// steps, the update counter is the training iteration 1 … T (T the last step) and input k
/// stands over the iterations (s_{k−1}, s_k] (the first over (0, s_0]).
pub(super) fn weights(gamma: f64, n: usize, steps: Option<&[u64]>) -> Vec<f64> {
    let p = gamma + 1.0;
    let ends: Vec<f64> = match steps {
        Some(s) => s.iter().map(|&x| x as f64).collect(),
        None => (1..=n).map(|k| k as f64).collect(),
    };
    let Some(&total) = ends.last() else {
        return Vec::new();
    };
    if total <= 0.0 {
        // Every input at step 0: no update has happened, the average is the first input.
        let mut w = vec![0.0; n];
        w[0] = 1.0;
        return w;
    }
    let mut prev = 0.0;
    ends.iter()
        .map(|&end| {
            let w = pow_diff(end / total, prev / total, p);
            prev = end;
            w
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The recurrence, one update at a time, on indicator vectors: the model at update u is
    /// input `model_at(u)`.
    fn recurrence(gamma: f64, n: usize, updates: u64, model_at: impl Fn(u64) -> usize) -> Vec<f64> {
        let mut avg = vec![0.0; n];
        avg[0] = 1.0;
        for u in 1..=updates {
            let beta = (1.0 - 1.0 / u as f64).powf(gamma + 1.0);
            let k = model_at(u);
            for (i, a) in avg.iter_mut().enumerate() {
                let x = if i == k { 1.0 } else { 0.0 };
                *a = beta * *a + (1.0 - beta) * x;
            }
        }
        avg
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-12 + 1e-9 * y.abs())
    }

    #[test]
    fn sigma_rel_and_gamma_are_inverse() {
        // EDM2's defaults, and the profiles of ema-pytorch's PostHocEMA examples.
        for s in [0.05, 0.1, 0.15, 0.28, 0.001, 0.2886] {
            let g = sigma_rel_to_gamma(s).unwrap();
            assert!(
                (gamma_to_sigma_rel(g) - s).abs() < 1e-12 * s.max(1e-3),
                "{s}: {g}"
            );
        }
        // np.roots([1, 7, 16 - t, 12 - t]).real.max() for sigma_rel 0.05 and 0.28.
        assert!((sigma_rel_to_gamma(0.05).unwrap() - 16.972198602303447).abs() < 1e-11);
        assert!((sigma_rel_to_gamma(0.28).unwrap() - 0.16934399376949866).abs() < 1e-13);
        assert_eq!(sigma_rel_to_gamma(0.2888), None);
        assert_eq!(sigma_rel_to_gamma(0.0), None);
        assert_eq!(sigma_rel_to_gamma(f64::NAN), None);
    }

    #[test]
    fn per_checkpoint_weights_are_the_recurrence() {
        for gamma in [0.1, 1.0, 6.94, 16.97] {
            for n in [1, 2, 3, 10] {
                let w = weights(gamma, n, None);
                let r = recurrence(gamma, n, n as u64, |u| (u - 1) as usize);
                assert!(close(&w, &r), "γ {gamma}, n {n}: {w:?} vs {r:?}");
            }
        }
    }

    proptest! {
        /// Per iteration, with any gaps: the closed form is the recurrence.
        #[test]
        fn per_iteration_weights_are_the_recurrence(
            gamma in 0.01f64..40.0,
            first in 0u64..50,
            gaps in proptest::collection::vec(1u64..60, 0..8),
        ) {
            let mut steps = vec![first];
            for g in gaps {
                steps.push(steps.last().unwrap() + g);
            }
            let n = steps.len();
            let total = *steps.last().unwrap();
            let w = weights(gamma, n, Some(&steps));
            let r = recurrence(gamma, n, total, |u| steps.iter().position(|&s| u <= s).unwrap());
            prop_assert!(close(&w, &r), "{w:?} vs {r:?}");
            prop_assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            prop_assert!(w.iter().all(|&x| x >= 0.0));
        }
    }

    #[test]
    fn long_runs_need_no_loop_and_keep_their_precision() {
        // 10^5 checkpoints over 10^8 iterations.
        let steps: Vec<u64> = (1..=100_000u64).map(|k| k * 1000).collect();
        let w = weights(6.94, steps.len(), Some(&steps));
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // The last gap's weight, by the binomial series: 1 − (1 − 1/N)^(γ+1).
        let n = steps.len() as f64;
        let want = -(7.94 * (-1.0 / n).ln_1p()).exp_m1();
        assert!(
            (w[steps.len() - 1] - want).abs() < 1e-15 * want.max(1.0),
            "{}",
            w[99_999]
        );
    }
}
