//! Medians and their confidence intervals, distribution-free: no assumption that timings on a
//! shared two-core machine are normal (they are not: they have long right tails).

/// A median with an approximate 95% confidence interval (order statistics around the median:
/// ranks n/2 ± 0.98·√n), and the sample count.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub median: f64,
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
}

pub fn summarize(values: &[f64]) -> Summary {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Summary {
            median: f64::NAN,
            lo: f64::NAN,
            hi: f64::NAN,
            n: 0,
        };
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let half = 0.98 * (n as f64).sqrt();
    let lo = ((n as f64 / 2.0 - half).floor().max(0.0) as usize).min(n - 1);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    Summary {
        median,
        lo: v[lo],
        hi: v[hi],
        n,
    }
}

/// Per-round ratios `a[i] / b[i]`: pairing each sample with the baseline measured in the same
/// round cancels the machine's slow drift, which a ratio of two medians would keep.
pub fn paired_ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// A small deterministic generator for the order of batches within a round (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_interval() {
        let s = summarize(&[5.0, 1.0, 3.0]);
        assert_eq!(s.median, 3.0);
        assert_eq!((s.lo, s.hi), (1.0, 5.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!(s.median, 50.5);
        assert!(
            s.lo >= 40.0 && s.lo < 50.0 && s.hi > 50.0 && s.hi <= 61.0,
            "{s:?}"
        );
        assert_eq!(summarize(&[]).n, 0);
    }

    #[test]
    fn shuffle_keeps_every_element() {
        let mut v: Vec<u32> = (0..20).collect();
        Rng::new(7).shuffle(&mut v);
        let mut w = v.clone();
        w.sort();
        assert_eq!(w, (0..20).collect::<Vec<_>>());
    }
}
