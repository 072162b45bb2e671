//! The EMA classes of the ecosystem (`docs/strategies.md#ecosystem`): timm `ModelEmaV3`,
//! diffusers `EMAModel`, ultralytics `ModelEMA`, ema-pytorch `EMA`, and `wma`.
//!
//! Under the time convention of `docs/strategies.md#time`, update u = 1 … T has the decay d_u
//! of its library (the weight of the old average). The model that stands over the updates
//! (a, b] enters the average after update T with the weight
//! `Π_{u=b+1}^{T} d_u · (1 − Π_{u=a+1}^{b} d_u)`, and the initial copy x_0 with
//! `Π_{u=s_0+1}^{T} d_u` (the updates that x_0 itself stands over included). So a plan needs
//! the log-products `Σ_{u=a+1}^{b} ln d_u` of its N gaps, never the T updates one by one
//! ([`LogSum`]): the decays are constant, zero, or one smooth function of u on at most a few
//! ranges of u; a constant range is a product, a smooth one a sum by Euler–Maclaurin with a
//! Gauss–Legendre integral, and a short one (or one near where the function is singular) is
//! summed term by term.

use super::{Schedule, Strategy};

/// The decay d_u of update `u` ≥ 1, as the library computes it (in f64).
pub(super) fn decay(s: &Schedule, u: u64) -> f64 {
    match s.strategy {
        Strategy::Timm => {
            // ModelEmaV3.get_decay(step=u)
            let step = u.saturating_sub(s.update_after_step + 1);
            if step == 0 {
                return 0.0;
            }
            if !s.warmup {
                return s.decay;
            }
            let d = 1.0 - (1.0 + step as f64 / s.inv_gamma).powf(-s.power);
            py_max(py_min(d, s.decay), s.min_decay)
        }
        Strategy::Diffusers => {
            // EMAModel.get_decay(optimization_step=u)
            let step = u.saturating_sub(s.update_after_step + 1);
            if step == 0 {
                return 0.0;
            }
            let step = step as f64;
            let d = if s.warmup {
                1.0 - (1.0 + step / s.inv_gamma).powf(-s.power)
            } else {
                (1.0 + step) / (10.0 + step)
            };
            py_max(py_min(d, s.decay), s.min_decay)
        }
        Strategy::Ultralytics => {
            // ModelEMA.update: updates += 1; d = decay * (1 - exp(-updates / tau))
            s.decay * (1.0 - (-(u as f64) / s.tau).exp())
        }
        Strategy::EmaPytorch => {
            // EMA.update(): `step` is its counter before the increment.
            let step = u - 1;
            if step == 0 {
                return 0.0; // not initted: copies the model
            }
            if step % s.update_every != 0 {
                return 1.0; // leaves the average
            }
            if step <= s.update_after_step {
                return 0.0; // copies the model
            }
            // get_current_decay(), with its counter after the increment
            let epoch = (u - s.update_after_step - 1) as f64;
            let value = 1.0 - (1.0 + epoch / s.inv_gamma).powf(-s.power);
            // torch.clamp(min=min_value, max=beta)
            value.max(s.min_decay).min(s.decay)
        }
        _ => unreachable!("{:?} is not an ecosystem EMA", s.strategy),
    }
}

/// Python's `min(a, b)`: `b` if `b < a`, else `a`.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// Python's `max(a, b)`: `b` if `b > a`, else `a`.
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// On which part of its formula the decay of update `u` is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    /// A value that does not change with u: a clamp, a copy (0), or no update (1).
    Constant(f64),
    /// The smooth function of u ([`smooth_ln`]).
    Smooth,
}

/// Where the decay of `u` is on its formula. Along u, the parts come in one order (copies,
/// then the ramp's lower clamp, the ramp, its upper clamp), so two updates on the same part
/// have only that part between them.
fn part(s: &Schedule, u: u64) -> Part {
    let d = decay(s, u);
    let on_ramp = |step: f64| {
        let r = ramp(s, step);
        match s.strategy {
            // max(min(r, decay), min_decay)
            Strategy::Timm | Strategy::Diffusers => r < s.decay && r > s.min_decay,
            // min(max(r, min_value), beta)
            _ => r > s.min_decay && r < s.decay,
        }
    };
    let smooth = match s.strategy {
        Strategy::Timm if s.warmup => u > s.update_after_step + 1 && on_ramp(step_of(s, u)),
        Strategy::Timm => false,
        Strategy::Diffusers => u > s.update_after_step + 1 && on_ramp(step_of(s, u)),
        Strategy::Ultralytics => true,
        Strategy::EmaPytorch => {
            let step = u - 1;
            step != 0
                && step % s.update_every == 0
                && step > s.update_after_step
                && on_ramp(step_of(s, u))
        }
        _ => false,
    };
    if smooth {
        Part::Smooth
    } else {
        Part::Constant(d)
    }
}

/// The library's `step` (or ema-pytorch's `epoch`) at update `u`: u − update_after_step − 1.
fn step_of(s: &Schedule, u: u64) -> f64 {
    (u - s.update_after_step - 1) as f64
}

/// The ramp of the decay at `step`, before any clamp.
fn ramp(s: &Schedule, step: f64) -> f64 {
    match s.strategy {
        Strategy::Diffusers if !s.warmup => (1.0 + step) / (10.0 + step),
        _ => 1.0 - (1.0 + step / s.inv_gamma).powf(-s.power),
    }
}

/// ln d at the real update `u`, on the smooth part of the formula.
fn smooth_ln(s: &Schedule, u: f64) -> f64 {
    match s.strategy {
        Strategy::Ultralytics => s.decay.ln() + (-(-u / s.tau).exp_m1()).ln(),
        Strategy::Diffusers if !s.warmup => {
            let step = u - s.update_after_step as f64 - 1.0;
            (1.0 + step).ln() - (10.0 + step).ln()
        }
        _ => {
            let step = u - s.update_after_step as f64 - 1.0;
            (-(1.0 + step / s.inv_gamma).powf(-s.power)).ln_1p()
        }
    }
}

/// The distance of the real update `u` from the nearest singularity of [`smooth_ln`], in
/// updates: the scale on which it varies there.
fn distance(s: &Schedule, u: f64) -> f64 {
    let step = u - s.update_after_step as f64 - 1.0;
    match s.strategy {
        Strategy::Ultralytics => u,
        Strategy::Diffusers if !s.warmup => step + 1.0,
        _ => step + s.inv_gamma,
    }
}

/// Ranges shorter than this are summed term by term.
const DIRECT: u64 = 48;
/// The smooth part is summed by Euler–Maclaurin only this many of its scales away from its
/// singularity (where its derivatives are small enough for the terms kept to be exact to
/// about 1e-10); nearer, term by term.
const NEAR: f64 = 64.0;

/// Sums of `ln d_u` over ranges of updates of one schedule.
pub(super) struct LogSum<'a> {
    s: &'a Schedule,
    /// Updates that change the average are `u ≡ 1 (mod stride)` (ema-pytorch's
    /// `update_every`); the others have d = 1.
    stride: u64,
}

impl LogSum<'_> {
    pub(super) fn new(s: &Schedule) -> LogSum<'_> {
        let stride = if s.strategy == Strategy::EmaPytorch {
            s.update_every
        } else {
            1
        };
        LogSum { s, stride }
    }

    /// `Σ_{u=a+1}^{b} ln d_u` (−∞ when some d_u is 0).
    pub(super) fn between(&self, a: u64, b: u64) -> f64 {
        if b <= a {
            return 0.0;
        }
        // The updates that change the average: u = 1 + m·stride, m in [lo, hi].
        let lo = a.div_ceil(self.stride); // smallest m with 1 + m·stride ≥ a + 1
        let hi = (b - 1) / self.stride;
        if hi < lo {
            return 0.0;
        }
        self.range(lo, hi)
    }

    fn u(&self, m: u64) -> u64 {
        1 + m * self.stride
    }

    /// The sum over the updates `u(m)`, m in `[lo, hi]`.
    fn range(&self, lo: u64, hi: u64) -> f64 {
        if hi - lo < DIRECT {
            return self.direct(lo, hi);
        }
        match (part(self.s, self.u(lo)), part(self.s, self.u(hi))) {
            (Part::Constant(x), Part::Constant(y)) if x == y => {
                if x == 0.0 {
                    f64::NEG_INFINITY
                } else {
                    (hi - lo + 1) as f64 * x.ln()
                }
            }
            (Part::Smooth, Part::Smooth) => self.smooth(lo, hi),
            _ => {
                // Parts change inside: halve (a few times for each change of part).
                let mid = lo + (hi - lo) / 2;
                self.range(lo, mid) + self.range(mid + 1, hi)
            }
        }
    }

    fn direct(&self, lo: u64, hi: u64) -> f64 {
        let mut sum = 0.0;
        for m in lo..=hi {
            let d = decay(self.s, self.u(m));
            if d == 0.0 {
                return f64::NEG_INFINITY;
            }
            sum += d.ln();
        }
        sum
    }

    /// The sum over a range on the smooth part: the terms near the singularity one by one, the
    /// others by Euler–Maclaurin.
    fn smooth(&self, lo: u64, hi: u64) -> f64 {
        let stride = self.stride as f64;
        // The function of m, and its distance from the singularity in units of m.
        let f = |m: f64| smooth_ln(self.s, 1.0 + m * stride);
        let dist = |m: f64| distance(self.s, 1.0 + m * stride) / stride;
        let mut start = lo;
        let mut sum = 0.0;
        while start <= hi && dist(start as f64) < NEAR {
            sum += f(start as f64);
            start += 1;
        }
        if start > hi {
            return sum;
        }
        if hi - start < DIRECT {
            return sum + (start..=hi).map(|m| f(m as f64)).sum::<f64>();
        }
        sum + euler_maclaurin(f, dist, start as f64, hi as f64)
    }
}

/// `Σ_{m=a}^{b} f(m)` for integers a < b, where f is smooth on the scale `dist(m)` (at least
/// [`NEAR`]): the integral, the trapezoid's ends and the first two derivative corrections.
fn euler_maclaurin(f: impl Fn(f64) -> f64, dist: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    // Derivatives by central differences on the local scale.
    let d1 = |x: f64| {
        let h = 1e-3 * dist(x);
        (f(x + h) - f(x - h)) / (2.0 * h)
    };
    let d3 = |x: f64| {
        let h = 0.05 * dist(x);
        (f(x + 2.0 * h) - 2.0 * f(x + h) + 2.0 * f(x - h) - f(x - 2.0 * h)) / (2.0 * h * h * h)
    };
    integral(&f, &dist, a, b) + 0.5 * (f(a) + f(b)) + (d1(b) - d1(a)) / 12.0
        - (d3(b) - d3(a)) / 720.0
}

/// `∫_a^b f`, by 8-point Gauss–Legendre on panels over which the distance to the
/// singularity at most doubles.
fn integral(f: &impl Fn(f64) -> f64, dist: &impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const NODES: [f64; 4] = [
        0.183_434_642_495_649_8,
        0.525_532_409_916_329,
        0.796_666_477_413_626_7,
        0.960_289_856_497_536_3,
    ];
    const WEIGHTS: [f64; 4] = [
        0.362_683_783_378_362,
        0.313_706_645_877_887_3,
        0.222_381_034_453_374_5,
        0.101_228_536_290_376_3,
    ];
    let mut total = 0.0;
    let mut x = a;
    while x < b {
        // The singularity is at x − dist(x); the panel ends where the distance has doubled.
        let end = (x + dist(x)).min(b);
        let (mid, half) = (0.5 * (x + end), 0.5 * (end - x));
        let panel: f64 = NODES
            .iter()
            .zip(WEIGHTS)
            .map(|(t, w)| w * (f(mid - half * t) + f(mid + half * t)))
            .sum();
        total += half * panel;
        x = end;
    }
    total
}

/// The weights of an ecosystem EMA over inputs standing until `steps` (the updates 1 … n
/// without `--per-iter`).
pub(super) fn weights(s: &Schedule, steps: &[u64]) -> Vec<f64> {
    let n = steps.len();
    if n == 0 {
        return Vec::new();
    }
    if s.strategy == Strategy::Wma {
        return wma(steps);
    }
    let sums = LogSum::new(s);
    // gap[k] = Σ ln d over the updates of input k (k ≥ 1); tail[k] = over those after it.
    let gap: Vec<f64> = (0..n)
        .map(|k| match k {
            0 => 0.0,
            _ => sums.between(steps[k - 1], steps[k]),
        })
        .collect();
    let mut w = vec![0.0; n];
    let mut tail = 0.0f64;
    for k in (0..n).rev() {
        w[k] = if k == 0 {
            tail.exp()
        } else {
            tail.exp() * (0.0 - gap[k].exp_m1())
        };
        tail += gap[k];
    }
    w
}

/// Weights proportional to the update's index (`k + 1` per input; with `--per-iter`, the sum
/// of the iterations an input stands over).
fn wma(steps: &[u64]) -> Vec<f64> {
    let mut prev = 0u64;
    let raw: Vec<f64> = steps
        .iter()
        .map(|&s| {
            // Σ_{i=prev+1}^{s} i
            let (a, b) = (prev as f64, s as f64);
            prev = s;
            (a + b + 1.0) * (b - a) / 2.0
        })
        .collect();
    let total: f64 = raw.iter().sum();
    if total > 0.0 {
        raw.iter().map(|r| r / total).collect()
    } else {
        // Every input at step 0: the last one.
        let mut w = vec![0.0; steps.len()];
        if let Some(l) = w.last_mut() {
            *l = 1.0;
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn sched(strategy: Strategy) -> Schedule {
        Schedule::new(strategy)
    }

    /// The weights by the recurrence, update by update.
    fn recurrence(s: &Schedule, steps: &[u64]) -> Vec<f64> {
        let n = steps.len();
        let mut w = vec![0.0; n];
        w[0] = 1.0;
        let mut k = 0;
        for u in 1..=steps[n - 1] {
            while u > steps[k] {
                k += 1;
            }
            let d = decay(s, u);
            for x in w.iter_mut() {
                *x *= d;
            }
            w[k] += 1.0 - d;
        }
        w
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64]) {
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-9 + 1e-7 * w.abs(),
                "{what}: weight {k}: {g:e}, the recurrence {w:e}"
            );
        }
    }

    #[test]
    fn decays_are_the_libraries() {
        // timm: 0 until update_after_step + 1, then the warm-up clamped.
        let mut t = sched(Strategy::Timm);
        t.update_after_step = 2;
        t.warmup = true;
        t.decay = 0.9;
        t.min_decay = 0.3;
        assert_eq!(decay(&t, 3), 0.0);
        let r = 1.0 - 2f64.powf(-2.0 / 3.0);
        assert_eq!(decay(&t, 4), r.max(0.3));
        assert_eq!(decay(&t, 10_000), 0.9);
        // diffusers without warm-up: (1 + s) / (10 + s), at most decay.
        let d = sched(Strategy::Diffusers);
        assert_eq!(decay(&d, 1), 0.0);
        assert_eq!(decay(&d, 2), 2.0 / 11.0);
        // ultralytics.
        let u = sched(Strategy::Ultralytics);
        assert_eq!(decay(&u, 2000), 0.9999 * (1.0 - (-1f64).exp()));
        // ema-pytorch: copies at 1, then every update_every-th from its counter.
        let e = sched(Strategy::EmaPytorch);
        assert_eq!(decay(&e, 1), 0.0);
        assert_eq!(decay(&e, 2), 1.0);
        assert_eq!(decay(&e, 11), 0.0); // counter 10 <= 100: copy
        assert_eq!(decay(&e, 111), 1.0 - (1.0f64 + 10.0).powf(-2.0 / 3.0));
        assert_eq!(decay(&e, 112), 1.0);
    }

    #[test]
    fn per_update_weights_are_the_recurrence() {
        let mut rng = Rng::new(3);
        for strategy in [
            Strategy::Timm,
            Strategy::Diffusers,
            Strategy::Ultralytics,
            Strategy::EmaPytorch,
        ] {
            for case in 0..20 {
                let mut s = sched(strategy);
                s.decay = 1.0 - 10f64.powf(-1.0 - 3.0 * rng.float(0.5).abs() * 2.0);
                s.warmup = case % 2 == 0;
                s.update_after_step = (rng.next() % 4) * (case % 3);
                s.update_every = 1 + rng.next() % 4;
                s.min_decay = if case % 4 == 1 { 0.5 } else { 0.0 };
                s.tau = 1.0 + (rng.next() % 50) as f64;
                let n = 1 + (rng.next() % 40) as usize;
                let steps: Vec<u64> = (1..=n as u64).collect();
                let what = format!("{strategy:?} {s:?} over {n}");
                assert_close(&what, &weights(&s, &steps), &recurrence(&s, &steps));
            }
        }
    }

    #[test]
    fn per_iteration_weights_are_the_recurrence_over_long_gaps() {
        // Gaps long enough for Euler–Maclaurin, clamps inside them, and long runs of copies.
        let mut rng = Rng::new(17);
        for strategy in [
            Strategy::Timm,
            Strategy::Diffusers,
            Strategy::Ultralytics,
            Strategy::EmaPytorch,
        ] {
            for case in 0..12 {
                let mut s = sched(strategy);
                s.decay = [0.999, 0.9999, 0.99][case % 3];
                s.warmup = case % 2 == 1;
                s.update_after_step = [0, 7, 150][case % 3];
                s.update_every = [1, 3, 10][(case / 3) % 3];
                s.min_decay = if case % 4 == 2 { 0.4 } else { 0.0 };
                s.inv_gamma = [1.0, 0.5, 30.0][(case / 2) % 3];
                s.power = [2.0 / 3.0, 0.75, 1.0][case % 3];
                s.tau = [2000.0, 50.0][case % 2];
                let mut steps = vec![rng.next() % 30];
                for _ in 0..12 {
                    let gap = 1 + rng.next() % [5, 300, 20_000][case % 3];
                    steps.push(steps.last().unwrap() + gap);
                }
                let what = format!("{strategy:?} {s:?} over steps {steps:?}");
                assert_close(&what, &weights(&s, &steps), &recurrence(&s, &steps));
            }
        }
    }

    #[test]
    fn wma_weighs_the_newer_inputs_more() {
        assert_eq!(wma(&[1, 2, 3]), vec![1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
        // Per iteration: Σ i over each input's iterations, (0, 2] and (2, 4].
        assert_eq!(wma(&[2, 4]), vec![3.0 / 10.0, 7.0 / 10.0]);
        assert_eq!(wma(&[0]), vec![1.0]);
    }
}
