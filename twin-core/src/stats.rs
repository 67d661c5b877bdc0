//! Streaming statistics: per-window accumulators filled by the hot loop, and run totals merged
//! from closed windows.
//!
//! The hot loop accumulates `x - shift` into four fixed lanes (lane = position in the block
//! mod 4), so the compiler can vectorize it while the summation order stays a pure function
//! of the block boundaries: results do not depend on threads. `shift` is the signal's nominal
//! centre, which keeps `sum_sq - sum^2/n` free of cancellation.

use serde::Serialize;

const LANES: usize = 4;

/// Accumulates one channel's samples within the current window.
#[derive(Clone, Copy, Debug)]
pub struct WindowAcc {
    /// Samples in the window.
    pub count: u32,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Sum of `x - shift`.
    pub sum: f64,
    /// Sum of `(x - shift)^2`.
    pub sum_sq: f64,
    /// Last sample of the window.
    pub last: f64,
}

impl Default for WindowAcc {
    fn default() -> Self {
        Self {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            sum_sq: 0.0,
            last: f64::NAN,
        }
    }
}

impl WindowAcc {
    /// Adds a block of samples.
    #[inline]
    pub fn add_block(&mut self, values: &[f64], shift: f64) {
        self.add_each(values.len(), shift, |i| values[i]);
    }

    /// Adds the block of samples `base[i] + scale * noise[i]` (a signal plus scaled noise)
    /// without writing them anywhere: bit for bit what adding them with [`Self::add_block`]
    /// gives, one pass over the block instead of two.
    ///
    /// # Panics
    /// When `noise` is shorter than `base`.
    #[inline]
    pub fn add_block_with_noise(&mut self, base: &[f64], noise: &[f64], scale: f64, shift: f64) {
        let noise = &noise[..base.len()];
        self.add_each(base.len(), shift, |i| base[i] + scale * noise[i]);
    }

    /// Adds the samples `value(0..n)`, each computed once, in the hot loop's fixed lane order.
    #[inline(always)]
    fn add_each(&mut self, n: usize, shift: f64, value: impl Fn(usize) -> f64) {
        if n == 0 {
            return;
        }
        let mut sum = [0.0; LANES];
        let mut sum_sq = [0.0; LANES];
        let mut min = [f64::INFINITY; LANES];
        let mut max = [f64::NEG_INFINITY; LANES];
        let full = n - n % LANES;
        for start in (0..full).step_by(LANES) {
            for lane in 0..LANES {
                let x = value(start + lane);
                let d = x - shift;
                sum[lane] += d;
                sum_sq[lane] += d * d;
                min[lane] = if x < min[lane] { x } else { min[lane] };
                max[lane] = if x > max[lane] { x } else { max[lane] };
            }
        }
        for (lane, i) in (full..n).enumerate() {
            let x = value(i);
            let d = x - shift;
            sum[lane] += d;
            sum_sq[lane] += d * d;
            min[lane] = if x < min[lane] { x } else { min[lane] };
            max[lane] = if x > max[lane] { x } else { max[lane] };
        }
        self.sum += (sum[0] + sum[1]) + (sum[2] + sum[3]);
        self.sum_sq += (sum_sq[0] + sum_sq[1]) + (sum_sq[2] + sum_sq[3]);
        let block_min = min[0].min(min[1]).min(min[2].min(min[3]));
        let block_max = max[0].max(max[1]).max(max[2].max(max[3]));
        self.min = self.min.min(block_min);
        self.max = self.max.max(block_max);
        self.count += n as u32;
        self.last = value(n - 1);
    }

    /// Starts a new window; `last` (the last reading ever) is kept.
    pub fn reset(&mut self) {
        *self = Self {
            last: self.last,
            ..Self::default()
        };
    }

    /// The window's summary (what a device in summary mode uploads).
    pub fn summary(&self, shift: f64) -> WindowSummary {
        if self.count == 0 {
            return WindowSummary {
                count: 0,
                min: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
                std_dev: f64::NAN,
                last: f64::NAN,
            };
        }
        let n = f64::from(self.count);
        let mean_shifted = self.sum / n;
        let variance = (self.sum_sq / n - mean_shifted * mean_shifted).max(0.0);
        WindowSummary {
            count: self.count,
            min: self.min,
            max: self.max,
            mean: shift + mean_shifted,
            std_dev: variance.sqrt(),
            last: self.last,
        }
    }
}

/// What leaves the edge for one sensor channel and one window in summary mode.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct WindowSummary {
    /// Samples in the window.
    pub count: u32,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std_dev: f64,
    /// Last sample.
    pub last: f64,
}

/// Run totals for one channel (or one group of channels), merged window by window with Chan's
/// parallel formula.
#[derive(Clone, Copy, Debug)]
pub struct RunStats {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Default for RunStats {
    fn default() -> Self {
        Self {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl RunStats {
    /// Folds a closed window into the totals.
    pub fn merge_window(&mut self, window: &WindowAcc, shift: f64) {
        if window.count == 0 {
            return;
        }
        let n_b = f64::from(window.count);
        let mean_b_shifted = window.sum / n_b;
        let m2_b = (window.sum_sq - window.sum * mean_b_shifted).max(0.0);
        let other = RunStats {
            count: u64::from(window.count),
            mean: shift + mean_b_shifted,
            m2: m2_b,
            min: window.min,
            max: window.max,
        };
        self.merge(&other);
    }

    /// Merges another set of totals.
    pub fn merge(&mut self, other: &RunStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let n_a = self.count as f64;
        let n_b = other.count as f64;
        let n = n_a + n_b;
        let delta = other.mean - self.mean;
        self.mean += delta * (n_b / n);
        self.m2 += other.m2 + delta * delta * (n_a * n_b / n);
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Population standard deviation.
    pub fn std_dev(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            (self.m2 / self.count as f64).sqrt()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_matches_direct_computation() {
        let values: Vec<f64> = (0..103).map(|i| 20.0 + ((i * 37) % 11) as f64 * 0.1).collect();
        let mut acc = WindowAcc::default();
        acc.add_block(&values[..50], 20.0);
        acc.add_block(&values[50..], 20.0);
        let s = acc.summary(20.0);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        assert_eq!(s.count, 103);
        assert!((s.mean - mean).abs() < 1e-12);
        assert!((s.std_dev - var.sqrt()).abs() < 1e-12);
        assert_eq!(s.min, 20.0);
        assert_eq!(s.max, 21.0);
        assert_eq!(s.last, values[102]);
    }

    #[test]
    fn adding_noise_on_the_fly_equals_adding_the_noisy_block() {
        let base: Vec<f64> = (0..259).map(|i| 9.8 + (i as f64 * 0.61).sin()).collect();
        let noise: Vec<f64> = (0..259).map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0).collect();
        for n in [0, 1, 3, 4, 5, 255, 256, 259] {
            let noisy: Vec<f64> = base[..n].iter().zip(&noise).map(|(b, z)| b + 0.05 * z).collect();
            let (mut written, mut fused) = (WindowAcc::default(), WindowAcc::default());
            written.add_block(&noisy, 9.8);
            fused.add_block_with_noise(&base[..n], &noise, 0.05, 9.8);
            let bits = |w: &WindowAcc| [w.min, w.max, w.sum, w.sum_sq, w.last].map(f64::to_bits).to_vec();
            assert_eq!(bits(&written), bits(&fused), "{n} samples");
            assert_eq!(written.count, fused.count);
        }
    }

    #[test]
    fn chan_merge_matches_whole() {
        let values: Vec<f64> = (0..1000).map(|i| (i as f64 * 0.37).sin() * 3.0 + 5.0).collect();
        let mut run = RunStats::default();
        for chunk in values.chunks(77) {
            let mut w = WindowAcc::default();
            w.add_block(chunk, 5.0);
            run.merge_window(&w, 5.0);
        }
        let mean = values.iter().sum::<f64>() / 1000.0;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 1000.0;
        assert!((run.mean - mean).abs() < 1e-12);
        assert!((run.std_dev() - var.sqrt()).abs() < 1e-12);
    }
}
