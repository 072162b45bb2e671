//! The strategies of the mmengine family and the OpenMMLab 1.x hooks
//! (`docs/strategies.md#the-mmengine-family`): the momentum of each update, and the weights
//! per checkpoint or per training iteration, long gaps in closed form.

use super::{check_steps, Schedule, Strategy};
use crate::error::{Error, Result};

impl Schedule {
    /// The momentum of update index `k` (k ≥ 1), or `None` when no update happens there.
    ///
    /// For the mmengine family `k` is the averaged model's step count; for the hooks, the
    /// training iteration is `it = k − 1`.
    pub fn momentum_at(&self, k: u64) -> Option<f64> {
        let m = self.momentum;
        let iv = self.interval;
        match self.strategy {
            Strategy::Exponential => (k % iv == 0).then_some(m),
            Strategy::Annealing => {
                (k % iv == 0).then(|| m.max(self.gamma / (self.gamma + k as f64)))
            }
            Strategy::Swa => (k % iv == 0).then(|| 1.0 / ((k / iv) as f64 + 1.0)),
            Strategy::Mmcv => {
                let it = k - 1;
                (it % iv == 0).then(|| warm_momentum(m, iv, self.warm_up, it))
            }
            Strategy::LinearMomentum => {
                let it = k - 1;
                ((it + 1) % iv == 0).then(|| warm_momentum(m, iv, self.warm_up, it))
            }
            Strategy::ExpMomentum => {
                let it = k - 1;
                ((it + 1) % iv == 0)
                    .then(|| (1.0 - m) * (-((1 + it) as f64) / self.total_iter).exp() + m)
            }
            // Not of this family: their weights come from their own modules.
            Strategy::Power
            | Strategy::Timm
            | Strategy::Diffusers
            | Strategy::Ultralytics
            | Strategy::EmaPytorch
            | Strategy::Wma => None,
        }
    }

    /// Per-input weights of the fold over inputs at `steps` (one per input, in fold order).
    ///
    /// `steps = None` is one update per input (x_k at update k). With steps (`--per-iter`),
    /// x_k holds over the iterations (s_{k−1}, s_k] and the schedule is evaluated at each; the
    /// update index is `j − s_0` for the mmengine family (the averaged model starts at the
    /// first input) and the absolute iteration `j` for the hooks (`it = j − 1`).
    pub(super) fn mmengine_weights(&self, n: usize, steps: Option<&[u64]>) -> Result<Vec<f64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let owned: Vec<u64>;
        let steps = match steps {
            Some(s) => {
                check_steps(s)?;
                s
            }
            None => {
                owned = (0..n as u64).collect();
                &owned
            }
        };
        assert_eq!(steps.len(), n);
        let base = if self.strategy.is_hook() { 0 } else { steps[0] };
        let mut budget = MAX_TERMS;
        let mut tail = Tail::new(self.constant_tail());
        // keeps[k]: Π (1 − m_j) over the updates of input k's gap, the share of the average
        // that survives it. A plain product: exact for simple momenta (0.25 stays 0.25), and
        // its relative error (about one f64 ulp per update) is far below f32 rounding.
        let keeps = (1..n)
            .map(|k| {
                self.keep(
                    steps[k - 1] + 1 - base,
                    steps[k] - base,
                    &mut budget,
                    &mut tail,
                )
            })
            .collect::<Result<Vec<f64>>>()?;
        let mut w = vec![0.0f64; n];
        if n <= EXACT_INPUTS {
            // w_k = (1 − keep_k) · keep_{k+1} · keep_{k+2} · …, multiplied in that order, as
            // ema-tool always has (the same bits as before planning was O(N)).
            w[0] = 1.0;
            for k in 1..n {
                let keep = keeps[k - 1];
                for wi in &mut w[..k] {
                    *wi *= keep;
                }
                w[k] = 1.0 - keep;
            }
        } else {
            // The same products, shared from the last input back: O(N).
            let mut after = 1.0;
            for k in (1..n).rev() {
                let keep = keeps[k - 1];
                w[k] = (1.0 - keep) * after;
                after *= keep;
            }
            w[0] = after;
        }
        Ok(w)
    }
}

/// Up to this many inputs, each weight's products are multiplied from its own input on, as
/// before planning shared them (N²/2 multiplications: 8 million at most, milliseconds); more
/// inputs share them (10^5 inputs took 0.7 s the other way). The two agree to a few ulps.
const EXACT_INPUTS: usize = 4096;

/// Most momentum evaluations of `swa` term by term in gaps shorter than [`EXACT_GAP`], all
/// gaps together (tens of milliseconds); past it, its products telescope in closed form.
const SWA_TERMS: u64 = 1 << 24;

/// The constant tail of a schedule (`Schedule::constant_tail`) and the products of its
/// momentum: `powers[c]` is `(1 − m)` multiplied `c` times, as a loop over the updates
/// multiplies it, so that a gap inside the tail costs one lookup, not one multiplication per
/// update (10^5 inputs 1000 iterations apart were 10^8 multiplications).
struct Tail {
    tail: Option<(u64, f64)>,
    powers: Vec<f64>,
    /// `swa` momenta evaluated term by term so far.
    swa_terms: u64,
}

impl Tail {
    fn new(tail: Option<(u64, f64)>) -> Tail {
        Tail {
            tail,
            powers: vec![1.0],
            swa_terms: 0,
        }
    }

    /// `(1 − m)` multiplied `c` times (`c` < [`EXACT_GAP`]).
    fn power(&mut self, m: f64, c: u64) -> f64 {
        while self.powers.len() as u64 <= c {
            let last = *self.powers.last().expect("powers[0] = 1");
            self.powers.push(last * (1.0 - m));
        }
        self.powers[c as usize]
    }
}

/// Gaps of up to this many iterations are multiplied out term by term; longer ones (whose
/// length comes from step numbers in the input files) are computed in closed form where the
/// momentum is constant, so that no input can make planning take more than milliseconds.
pub const EXACT_GAP: u64 = 1 << 16;

/// Most momentum evaluations one plan may take (about a second).
pub const MAX_TERMS: u64 = 1 << 27;

impl Schedule {
    /// `Π (1 − m_k)` over the updates `k` in `lo..=hi` (update indices, `lo ≥ 1`).
    ///
    /// Momenta that vary are evaluated one by one, taken from `budget`; past it, an error.
    fn keep(&self, lo: u64, hi: u64, budget: &mut u64, tail: &mut Tail) -> Result<f64> {
        let short = hi - lo < EXACT_GAP;
        let swa_by_terms = self.strategy == Strategy::Swa && short && {
            tail.swa_terms += self.updates_in(lo, hi);
            tail.swa_terms <= SWA_TERMS
        };
        if self.strategy == Strategy::Swa && !swa_by_terms {
            // m = 1 / (q + 1) at k = q·interval: Π q / (q + 1) telescopes to q0 / (q1 + 1).
            let (q0, q1) = (lo.div_ceil(self.interval), hi / self.interval);
            if q0 > q1 {
                return Ok(1.0);
            }
            return Ok(q0 as f64 / (q1 as f64 + 1.0));
        }
        if let Some((from, m)) = tail.tail {
            if short && lo >= from {
                // Inside the constant tail: the same product as the loop below, looked up.
                return Ok(tail.power(m, self.updates_in(lo, hi)));
            }
        }
        let mut terms = |from: u64, to: u64| -> Result<f64> {
            // Short gaps cost at most EXACT_GAP evaluations per input file: not counted.
            let count = if short { 0 } else { self.updates_in(from, to) };
            *budget = budget.checked_sub(count).ok_or_else(|| {
                Error::usage(format!(
                    "--per-iter with these parameters evaluates the momentum at more than \
                     {MAX_TERMS} iterations; use fewer steps or a shorter warm-up"
                ))
            })?;
            // In increasing k, as a loop over every iteration of the gap multiplies them.
            let mut keep = 1.0;
            let mut k = self.first_update(from);
            while let Some(kk) = k.filter(|&kk| kk <= to) {
                if let Some(m) = self.momentum_at(kk) {
                    keep *= 1.0 - m;
                }
                k = kk.checked_add(self.interval);
            }
            Ok(keep)
        };
        if short {
            return terms(lo, hi);
        }
        let Some((tail, m)) = tail.tail else {
            return terms(lo, hi);
        };
        let mut keep = 1.0;
        let mut start = lo;
        if start < tail {
            let end = hi.min(tail - 1);
            keep *= terms(start, end)?;
            start = end + 1;
        }
        if start <= hi {
            keep *= (1.0 - m).powf(self.updates_in(start, hi) as f64);
        }
        Ok(keep)
    }

    /// Updates happen at update indices k ≡ r (mod interval): r = 1 for mmcv (it % interval
    /// == 0), 0 for the others.
    fn update_residue(&self) -> u64 {
        u64::from(self.strategy == Strategy::Mmcv) % self.interval
    }

    /// The first update index at or after `k`.
    fn first_update(&self, k: u64) -> Option<u64> {
        let (iv, r, km) = (self.interval, self.update_residue(), k % self.interval);
        // (r − km) mod iv, without overflow for any interval (r, km < iv).
        k.checked_add(if r >= km { r - km } else { iv - (km - r) })
    }

    /// Number of update indices in `lo..=hi` (`lo ≥ 1`) at which an update happens.
    fn updates_in(&self, lo: u64, hi: u64) -> u64 {
        let r = self.update_residue();
        let upto = |x: u64| {
            if x < r {
                0
            } else {
                (x - r) / self.interval + 1
            }
        };
        upto(hi) - upto(lo - 1)
    }

    /// The update index from which every update has one and the same momentum, and that
    /// momentum, exactly as [`Schedule::momentum_at`] computes it; `None` when that index is out
    /// of reach (extreme parameters) or the strategy has none (`swa`).
    fn constant_tail(&self) -> Option<(u64, f64)> {
        const FAR: f64 = (1u64 << 62) as f64;
        let m = self.momentum;
        let k0 = match self.strategy {
            Strategy::Exponential => 1.0,
            Strategy::Swa
            | Strategy::Power
            | Strategy::Timm
            | Strategy::Diffusers
            | Strategy::Ultralytics
            | Strategy::EmaPytorch
            | Strategy::Wma => return None,
            // max(m, g / (g + k)) is m once g / (g + k) ≤ m, and g / (g + k) only decreases.
            Strategy::Annealing => (self.gamma * (1.0 - m) / m).ceil() + 1.0,
            // min(m^interval, (1 + it) / (warm_up + it)): the warm-up ratio is at least 1 for
            // warm_up < 1, and otherwise grows towards 1; past it0 it exceeds m^interval by a
            // margin far above rounding.
            Strategy::Mmcv | Strategy::LinearMomentum => {
                let mi = m.powi(self.interval.min(i32::MAX as u64) as i32);
                if self.warm_up < 1.0 {
                    1.0
                } else {
                    let t = mi * (1.0 + 1e-9);
                    if t >= 1.0 {
                        return None;
                    }
                    ((t * self.warm_up - 1.0) / (1.0 - t)).max(0.0).ceil() + 2.0
                }
            }
            // (1 − m)·exp(−(1 + it)/total_iter) + m rounds to m once the first term is below
            // m·2^-56, a quarter of m's half ulp.
            Strategy::ExpMomentum => {
                let x = ((1.0 - m) / m).ln().max(0.0) + 56.0 * std::f64::consts::LN_2 + 1.0;
                (self.total_iter * x).ceil()
            }
        };
        if !(1.0..FAR).contains(&k0) {
            return None;
        }
        let k0 = k0 as u64;
        // The momentum at the first update from k0 on must be the constant already.
        let first = self.momentum_at(self.first_update(k0)?)?;
        let constant = match self.strategy {
            Strategy::Mmcv | Strategy::LinearMomentum => {
                m.powi(self.interval.min(i32::MAX as u64) as i32)
            }
            _ => m,
        };
        (first == constant).then_some((k0, constant))
    }
}

fn warm_momentum(m: f64, interval: u64, warm_up: f64, it: u64) -> f64 {
    let mi = m.powi(interval.min(i32::MAX as u64) as i32);
    let warm = (1.0 + it as f64) / (warm_up + it as f64);
    // min() as Python's: NaN (0/0 for warm_up = 0, it = 0) loses to the other operand.
    if warm.is_nan() {
        mi
    } else {
        mi.min(warm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::MAX_ITERATIONS;
    use clap::ValueEnum;

    fn sched(strategy: Strategy, momentum: f64, interval: u64) -> Schedule {
        Schedule {
            momentum,
            interval,
            ..Schedule::new(strategy)
        }
    }

    /// The strategies of this family.
    fn family() -> impl Iterator<Item = Strategy> {
        Strategy::value_variants()
            .iter()
            .copied()
            .filter(|s| s.is_mmengine_family())
    }

    /// The reference: sequential lerps on per-input indicator vectors.
    fn sequential(s: &Schedule, n: usize) -> Vec<f64> {
        let mut avg = vec![0.0; n];
        avg[0] = 1.0;
        for k in 1..n {
            if let Some(m) = s.momentum_at(k as u64) {
                for (i, a) in avg.iter_mut().enumerate() {
                    let x = if i == k { 1.0 } else { 0.0 };
                    *a += m * (x - *a);
                }
            }
        }
        avg
    }

    #[test]
    fn many_inputs_share_their_products_and_agree_with_the_closed_form() {
        // Past EXACT_INPUTS the products are shared; both ways, w_k = m (1 − m)^(n−1−k).
        for n in [EXACT_INPUTS, EXACT_INPUTS + 1, 3 * EXACT_INPUTS] {
            let m = 0.001;
            let w = sched(Strategy::Exponential, m, 1).weights(n, None).unwrap();
            for (k, x) in w.iter().enumerate() {
                let e = (n - 1 - k) as f64;
                let want = if k == 0 {
                    (1.0 - m).powf(e)
                } else {
                    m * (1.0 - m).powf(e)
                };
                assert!(
                    (x - want).abs() <= 1e-11 * want,
                    "n {n}, k {k}: {x:e} vs {want:e}"
                );
            }
        }
        // swa past its budget of terms: the telescoped products, equal weights.
        let steps: Vec<u64> = (0..20_000u64).map(|k| k * 1000).collect();
        let w = sched(Strategy::Swa, 0.0, 1)
            .weights(steps.len(), Some(&steps))
            .unwrap();
        let gap = 1.0 / (steps[steps.len() - 1] + 1) as f64;
        assert!((w[0] - gap).abs() < 1e-12 * gap, "{}", w[0]);
        assert!((w[1] - 1000.0 * gap).abs() < 1e-9 * gap, "{}", w[1]);
    }

    #[test]
    fn weights_equal_sequential_lerps() {
        for st in family() {
            for iv in [1, 2, 3] {
                let s = sched(st, 0.3, iv);
                let w = s.weights(9, None).unwrap();
                let r = sequential(&s, 9);
                for (a, b) in w.iter().zip(&r) {
                    assert!(
                        (a - b).abs() < 1e-12,
                        "{st:?} interval {iv}: {w:?} vs {r:?}"
                    );
                }
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn hand_computed_weights() {
        // exponential, momentum 0.5, 3 inputs: ((x0+x1)/2 + x2)/2.
        let w = sched(Strategy::Exponential, 0.5, 1)
            .weights(3, None)
            .unwrap();
        assert_eq!(w, vec![0.25, 0.25, 0.5]);
        // swa is the plain mean.
        let w = sched(Strategy::Swa, 0.5, 1).weights(4, None).unwrap();
        for x in w {
            assert!((x - 0.25).abs() < 1e-15);
        }
        // swa, interval 2: updates at k = 2 (m = 1/2) and k = 4 (m = 1/3); x1, x3 unused.
        let w = sched(Strategy::Swa, 0.5, 2).weights(5, None).unwrap();
        let want = [1.0 / 3.0, 0.0, 1.0 / 3.0, 0.0, 1.0 / 3.0];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{w:?}");
        }
        // mmcv with warm_up 100: first update at it = 0 has m = min(0.3, 1/100).
        let w = sched(Strategy::Mmcv, 0.3, 1).weights(2, None).unwrap();
        assert!((w[1] - 0.01).abs() < 1e-15);
    }

    #[test]
    fn per_iter_with_unit_gaps_is_the_plain_fold() {
        for st in [
            Strategy::Exponential,
            Strategy::Annealing,
            Strategy::Mmcv,
            Strategy::Swa,
        ] {
            let s = sched(st, 0.2, 2);
            let plain = s.weights(6, None).unwrap();
            let steps: Vec<u64> = (0..6).collect();
            let per = s.weights(6, Some(&steps)).unwrap();
            for (a, b) in plain.iter().zip(&per) {
                assert!((a - b).abs() < 1e-14);
            }
        }
    }

    #[test]
    fn per_iter_swa_is_proportional_to_gaps() {
        let s = sched(Strategy::Swa, 0.5, 1);
        let w = s.weights(3, Some(&[100, 200, 500])).unwrap();
        let want = [1.0 / 401.0, 100.0 / 401.0, 300.0 / 401.0];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{w:?}");
        }
    }

    #[test]
    fn per_iter_exponential_compounds() {
        let s = sched(Strategy::Exponential, 0.001, 1);
        let w = s.weights(2, Some(&[0, 1000])).unwrap();
        let keep = 0.999f64.powi(1000);
        assert!((w[0] - keep).abs() < 1e-12);
        assert!((w[1] - (1.0 - keep)).abs() < 1e-12);
    }

    /// The per-term product that [`Schedule::keep`] replaces for long gaps.
    fn keep_by_terms(s: &Schedule, lo: u64, hi: u64) -> f64 {
        let mut keep = 1.0;
        for k in lo..=hi {
            if let Some(m) = s.momentum_at(k) {
                keep *= 1.0 - m;
            }
        }
        keep
    }

    #[test]
    fn long_gaps_in_closed_form_equal_the_product_of_terms() {
        for st in family() {
            for (m, iv) in [(0.0002, 1), (0.01, 3), (0.3, 7), (0.9, 2)] {
                let mut s = sched(st, m, iv);
                s.total_iter = 300.0;
                s.gamma = 50.0;
                s.warm_up = 10.0;
                for (lo, hi) in [(1, 300_000), (5, 200_003), (150_000, 400_000)] {
                    let mut tail = Tail::new(s.constant_tail());
                    let fast = s.keep(lo, hi, &mut u64::MAX.clone(), &mut tail).unwrap();
                    let slow = keep_by_terms(&s, lo, hi);
                    assert!(
                        (fast - slow).abs() <= 1e-9 * slow.abs() || fast.max(slow) < 1e-300,
                        "{st:?} m {m} interval {iv} [{lo}, {hi}]: {fast} vs {slow}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_longest_supported_gap_is_planned_at_once() {
        let started = std::time::Instant::now();
        for st in family() {
            let w = sched(st, 0.0002, 1)
                .weights(3, Some(&[7, 8, 7 + MAX_ITERATIONS]))
                .unwrap();
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{st:?}: {w:?}");
        }
        // How fast is a figure of optimised code only.
        if cfg!(not(debug_assertions)) {
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
        }
    }

    #[test]
    fn extreme_parameters_over_a_long_gap_are_refused_not_computed_for_minutes() {
        let mut s = sched(Strategy::Annealing, 0.0002, 1);
        s.gamma = 1e12;
        let e = s.weights(2, Some(&[0, MAX_ITERATIONS])).unwrap_err();
        assert!(
            e.to_string()
                .contains("evaluates the momentum at more than"),
            "{e}"
        );
        // A huge interval is fine: only the updates are visited.
        let s = sched(Strategy::Exponential, 0.1, 1 << 61);
        assert!(s.weights(2, Some(&[5, 55_555_555])).is_ok());
    }

    /// Found by the `plan` fuzz target (a timeout): with a huge interval, finding the first
    /// update of the constant tail walked every index up to twice the interval.
    #[test]
    fn fuzz_regression_huge_interval_timeout() {
        let s = Schedule {
            momentum: 5.563079979647231e-307,
            interval: 2858379707068448816,
            gamma: 1.3980432851308293e-76,
            warm_up: 1.041200472978504e-42,
            total_iter: 1.7448420755005895e-76,
            ..Schedule::new(Strategy::Exponential)
        };
        s.validate().unwrap();
        let w = s.weights(2, Some(&[5, 55555555])).unwrap();
        assert_eq!(w, vec![1.0, 0.0]);
    }

    /// Found by the `plan` fuzz target (an overflow panic): `r + interval` overflowed for the
    /// largest interval.
    #[test]
    fn fuzz_regression_largest_interval_overflow() {
        for st in [
            Strategy::Mmcv,
            Strategy::Exponential,
            Strategy::LinearMomentum,
        ] {
            let s = sched(st, 1.979225483776471e-258, u64::MAX);
            s.validate().unwrap();
            let w = s.weights(6, None).unwrap();
            let r = sequential(&s, 6);
            assert_eq!(w, r, "{st:?}");
            assert!(s.weights(2, Some(&[0, 1 << 20])).is_ok());
        }
    }

    #[test]
    fn bad_steps_are_refused() {
        let s = sched(Strategy::Exponential, 0.1, 1);
        assert!(s.weights(2, Some(&[5, 5])).is_err());
        assert!(s.weights(2, Some(&[0, u64::MAX])).is_err());
    }
}
