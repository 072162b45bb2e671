//! Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
//! Diffusion Models", Algorithm 3; `docs/posthoc.md`): the weights that combine snapshots of
//! power-function EMAs into the EMA of another profile, by least squares over the profiles.
//!
//! A snapshot is a time t and the exponent γ of its profile. A is the matrix of the inner
//! products of the snapshots' profiles, B their inner products with the target's; the weights
//! solve A w = B, in f64, normalised to sum 1 unless asked not to (ema-pytorch's
//! `synthesize_ema_model` leaves them as solved).

/// A power-function EMA: its time and the exponent of its profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    pub t: f64,
    pub gamma: f64,
}

/// The inner product of two power-function profiles (Equation 151).
pub fn correlation(a: Profile, b: Profile) -> f64 {
    let ratio = a.t / b.t;
    let exp = if a.t < b.t { b.gamma } else { -a.gamma };
    (a.gamma + 1.0) * (b.gamma + 1.0) * ratio.powf(exp) / ((a.gamma + b.gamma + 1.0) * a.t.max(b.t))
}

/// Largest condition number of A accepted: beyond it, the weights are noise.
pub const MAX_CONDITION: f64 = 1e10;

/// The system of a set of snapshots, factored once for any number of targets.
#[derive(Clone, Debug)]
pub struct System {
    snapshots: Vec<Profile>,
    /// LU factors of A (row-major, unit lower part below the diagonal) and the row order.
    lu: Vec<f64>,
    perm: Vec<usize>,
    /// The 1-norm condition number of A.
    pub condition: f64,
}

/// Why a system cannot be solved.
#[derive(Clone, Debug, PartialEq)]
pub enum Unsolvable {
    /// No snapshot.
    Empty,
    /// A snapshot with a time or exponent that is not positive and finite.
    Invalid(usize),
    /// A is singular or its condition number is above [`MAX_CONDITION`]; the two snapshots whose
    /// profiles are the most alike (the same for a duplicate).
    IllConditioned {
        condition: f64,
        pair: (usize, usize),
    },
}

impl System {
    /// Factors A for `snapshots`.
    pub fn new(snapshots: &[Profile]) -> Result<System, Unsolvable> {
        let m = snapshots.len();
        if m == 0 {
            return Err(Unsolvable::Empty);
        }
        if let Some(i) = snapshots
            .iter()
            .position(|p| !(p.t > 0.0 && p.t.is_finite() && p.gamma > 0.0 && p.gamma.is_finite()))
        {
            return Err(Unsolvable::Invalid(i));
        }
        let a: Vec<f64> = (0..m * m)
            .map(|k| correlation(snapshots[k / m], snapshots[k % m]))
            .collect();
        let norm1 = (0..m)
            .map(|j| (0..m).map(|i| a[i * m + j].abs()).sum::<f64>())
            .fold(0.0, f64::max);
        let ill = |condition: f64| Unsolvable::IllConditioned {
            condition,
            pair: most_alike(&a, m),
        };
        let (lu, perm) = lu(a.clone(), m).ok_or_else(|| ill(f64::INFINITY))?;
        let mut sys = System {
            snapshots: snapshots.to_vec(),
            lu,
            perm,
            condition: f64::INFINITY,
        };
        // ‖A⁻¹‖₁: the largest column sum of A⁻¹, column by column.
        let mut inv_norm1 = 0.0f64;
        for j in 0..m {
            let mut e = vec![0.0; m];
            e[j] = 1.0;
            let col = sys.back_substitute(e);
            inv_norm1 = inv_norm1.max(col.iter().map(|x| x.abs()).sum());
        }
        let condition = norm1 * inv_norm1;
        if condition.is_nan() || condition > MAX_CONDITION {
            return Err(ill(condition));
        }
        sys.condition = condition;
        Ok(sys)
    }

    /// The weights of the snapshots that synthesise the profile `target`, normalised to sum 1
    /// when `normalize`.
    pub fn weights(&self, target: Profile, normalize: bool) -> Vec<f64> {
        let b: Vec<f64> = self
            .snapshots
            .iter()
            .map(|&s| correlation(s, target))
            .collect();
        let w = self.back_substitute(b);
        if !normalize {
            return w;
        }
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|x| x / sum).collect()
    }

    /// x with A x = b, from the factors.
    fn back_substitute(&self, b: Vec<f64>) -> Vec<f64> {
        let m = self.perm.len();
        let (lu, p) = (&self.lu, &self.perm);
        let mut y: Vec<f64> = p.iter().map(|&i| b[i]).collect();
        for i in 0..m {
            for k in 0..i {
                y[i] -= lu[i * m + k] * y[k];
            }
        }
        for i in (0..m).rev() {
            for k in i + 1..m {
                y[i] -= lu[i * m + k] * y[k];
            }
            y[i] /= lu[i * m + i];
        }
        y
    }
}

/// LU factors with partial pivoting of the m × m row-major `a`, or `None` when a pivot is 0.
fn lu(mut a: Vec<f64>, m: usize) -> Option<(Vec<f64>, Vec<usize>)> {
    let mut perm: Vec<usize> = (0..m).collect();
    for c in 0..m {
        let pivot = (c..m).max_by(|&i, &j| a[i * m + c].abs().total_cmp(&a[j * m + c].abs()))?;
        if !(a[pivot * m + c] != 0.0 && a[pivot * m + c].is_finite()) {
            return None;
        }
        if pivot != c {
            for k in 0..m {
                a.swap(c * m + k, pivot * m + k);
            }
            perm.swap(c, pivot);
        }
        for i in c + 1..m {
            let f = a[i * m + c] / a[c * m + c];
            a[i * m + c] = f;
            for k in c + 1..m {
                a[i * m + k] -= f * a[c * m + k];
            }
        }
    }
    Some((a, perm))
}

/// The two snapshots whose profiles are the most alike: largest A_ij / √(A_ii A_jj), i < j.
fn most_alike(a: &[f64], m: usize) -> (usize, usize) {
    let mut best = (0, 0, f64::NEG_INFINITY);
    for i in 0..m {
        for j in i + 1..m {
            let c = a[i * m + j] / (a[i * m + i] * a[j * m + j]).sqrt();
            if c > best.2 {
                best = (i, j, c);
            }
        }
    }
    (best.0, best.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::sigma_rel_to_gamma;

    fn p(t: f64, sigma_rel: f64) -> Profile {
        Profile {
            t,
            gamma: sigma_rel_to_gamma(sigma_rel).unwrap(),
        }
    }

    #[test]
    fn a_snapshot_of_the_target_profile_gets_all_the_weight() {
        let snaps: Vec<Profile> = [20.0, 40.0, 60.0]
            .iter()
            .flat_map(|&t| [p(t, 0.05), p(t, 0.28)])
            .collect();
        let sys = System::new(&snaps).unwrap();
        let w = sys.weights(p(60.0, 0.05), true);
        for (i, x) in w.iter().enumerate() {
            let want = if i == 4 { 1.0 } else { 0.0 };
            assert!((x - want).abs() < 1e-9, "{w:?}");
        }
        assert!(sys.condition > 1.0 && sys.condition < MAX_CONDITION);
    }

    #[test]
    fn the_solve_reproduces_the_inner_products() {
        let snaps = [p(10.0, 0.05), p(20.0, 0.28), p(30.0, 0.05), p(30.0, 0.28)];
        let target = p(25.0, 0.15);
        let sys = System::new(&snaps).unwrap();
        let w = sys.weights(target, false);
        for (i, &s) in snaps.iter().enumerate() {
            let got: f64 = snaps
                .iter()
                .zip(&w)
                .map(|(&o, x)| correlation(s, o) * x)
                .sum();
            assert!((got - correlation(s, target)).abs() < 1e-12, "row {i}");
        }
        let n = sys.weights(target, true);
        let sum: f64 = w.iter().sum();
        for (a, b) in n.iter().zip(&w) {
            assert!((a - b / sum).abs() < 1e-15);
        }
    }

    #[test]
    fn duplicates_and_near_duplicates_are_refused_with_the_pair() {
        let snaps = [p(10.0, 0.05), p(20.0, 0.28), p(10.0, 0.05)];
        match System::new(&snaps).unwrap_err() {
            Unsolvable::IllConditioned { pair, .. } => assert_eq!(pair, (0, 2)),
            e => panic!("{e:?}"),
        }
        let snaps = [p(10.0, 0.05), p(10.0 + 1e-12, 0.05), p(20.0, 0.28)];
        assert!(matches!(
            System::new(&snaps),
            Err(Unsolvable::IllConditioned { pair: (0, 1), .. })
        ));
        assert_eq!(System::new(&[]).unwrap_err(), Unsolvable::Empty);
        let bad = [Profile { t: 0.0, gamma: 1.0 }];
        assert_eq!(System::new(&bad).unwrap_err(), Unsolvable::Invalid(0));
    }
}
