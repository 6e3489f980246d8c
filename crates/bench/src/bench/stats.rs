//! Summary statistics of a sample: median, 90th percentile, min and max.

use serde::Serialize;

/// Median, p90, min and max of a non-empty sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// The 50th percentile.
    pub median: f64,
    /// The 90th percentile.
    pub p90: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

/// The `p`-th percentile (0..=100) of `sorted` (ascending, non-empty), interpolating
/// linearly between the closest ranks (NumPy's default, R's type 7).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of an empty sample");
    let p = p.clamp(0.0, 100.0);
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// `values` without NaNs, sorted; `None` when nothing is left.
pub fn sorted_finite(values: &[f64]) -> Option<Vec<f64>> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v)
}

impl Summary {
    /// Summarises `values`; `None` when there are none (NaNs are left out).
    pub fn of(values: &[f64]) -> Option<Self> {
        let v = sorted_finite(values)?;
        Some(Self {
            n: v.len(),
            median: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    /// Column-wise ratio `self / other` (median/median, p90/p90, ...).
    pub fn ratio(&self, other: &Self) -> Ratio {
        let r = |a: f64, b: f64| if b == 0.0 { f64::NAN } else { a / b };
        Ratio {
            median: r(self.median, other.median),
            p90: r(self.p90, other.p90),
            min: r(self.min, other.min),
            max: r(self.max, other.max),
        }
    }
}

/// Column-wise ratio of two summaries.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Ratio {
    /// median / median.
    pub median: f64,
    /// p90 / p90.
    pub p90: f64,
    /// min / min.
    pub min: f64,
    /// max / max.
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[7.0]).unwrap().median, 7.0);
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        // rank = 0.9 * 9 = 8.1 -> 9 + 0.1 * (10 - 9)
        assert!((percentile(&v, 90.0) - 9.1).abs() < 1e-9);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(percentile(&[5.0], 90.0), 5.0);
    }

    #[test]
    fn summary_min_max_and_unsorted_input() {
        let s = Summary::of(&[10.0, 2.0, 8.0, 4.0, 6.0]).unwrap();
        assert_eq!(s.n, 5);
        assert_eq!((s.min, s.max, s.median), (2.0, 10.0, 6.0));
        assert!((s.p90 - 9.2).abs() < 1e-9);
    }

    #[test]
    fn empty_and_nan_samples() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
        assert_eq!(Summary::of(&[f64::NAN, 1.0]).unwrap().n, 1);
    }

    #[test]
    fn ratios_are_column_wise() {
        let a = Summary::of(&[2.0, 4.0]).unwrap();
        let b = Summary::of(&[4.0, 8.0]).unwrap();
        let r = a.ratio(&b);
        assert_eq!((r.median, r.min, r.max), (0.5, 0.5, 0.5));
        let zero = Summary::of(&[0.0]).unwrap();
        assert!(a.ratio(&zero).median.is_nan());
    }
}
