//! Sensor faults: transformations of a block of readings while a storyboard event is active.
//!
//! Each active fault has its own random stream (seed, device id, sensor, event index), so
//! injecting a fault never changes the underlying signal: a faulty run and a healthy run of
//! the same scenario read the same physics.

use crate::rng::Stream;
use crate::signal::{Block, MAX_DIMS};

/// A sensor fault, as a scenario describes it.
#[derive(Clone, Debug, PartialEq)]
pub enum SensorFault {
    /// Adds `per_second * (t - start)` to every reading.
    Drift {
        /// Units per second.
        per_second: f64,
    },
    /// Readings stuck at a value (`None`: the last reading before the fault).
    Stuck {
        /// The value.
        value: Option<f64>,
    },
    /// Each reading jumps by `+-magnitude` with `probability`.
    Spikes {
        /// Chance per reading.
        probability: f64,
        /// Height.
        magnitude: f64,
    },
    /// Each reading is lost with `probability`.
    Dropout {
        /// Chance per reading.
        probability: f64,
    },
    /// Readings pinned inside `[low, high]`.
    Saturation {
        /// Lower limit.
        low: f64,
        /// Upper limit.
        high: f64,
    },
    /// Extra gaussian noise.
    Noise {
        /// Standard deviation.
        std_dev: f64,
    },
}

impl SensorFault {
    /// The fault's name in scenarios and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Drift { .. } => "drift",
            Self::Stuck { .. } => "stuck",
            Self::Spikes { .. } => "spikes",
            Self::Dropout { .. } => "dropout",
            Self::Saturation { .. } => "saturation",
            Self::Noise { .. } => "noise",
        }
    }
}

/// A fault in effect on one sensor.
#[derive(Clone, Debug)]
pub struct ActiveFault {
    /// Index of the storyboard event that started it.
    pub event: u32,
    /// The fault.
    pub fault: SensorFault,
    /// Simulated second it started.
    pub since: f64,
    /// Per-channel stuck values.
    pub stuck: [f64; MAX_DIMS],
    /// The fault's own random stream.
    pub stream: Stream,
}

/// Applies the value-changing faults to `n` readings of `dims` channels whose simulated times
/// are `block.times[..n]`.
pub fn apply_values(faults: &mut [ActiveFault], block: &mut Block, dims: usize, n: usize) {
    let times = block.times;
    for active in faults.iter_mut() {
        match active.fault {
            SensorFault::Noise { std_dev } => {
                for channel in block.values.iter_mut().take(dims) {
                    let noise = &mut block.scratch[..n];
                    active.stream.fill_normal(noise);
                    for (v, z) in channel[..n].iter_mut().zip(noise.iter()) {
                        *v += std_dev * z;
                    }
                }
            }
            SensorFault::Drift { per_second } => {
                for channel in block.values.iter_mut().take(dims) {
                    for (v, t) in channel[..n].iter_mut().zip(&times[..n]) {
                        *v += per_second * (t - active.since);
                    }
                }
            }
            SensorFault::Spikes { probability, magnitude } => {
                for channel in block.values.iter_mut().take(dims) {
                    for v in channel[..n].iter_mut() {
                        let bits = active.stream.next_u64();
                        let u = (bits >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0);
                        if u < probability {
                            *v += if bits & 1 == 0 { magnitude } else { -magnitude };
                        }
                    }
                }
            }
            SensorFault::Stuck { .. } => {
                for (channel, stuck) in block.values.iter_mut().take(dims).zip(active.stuck) {
                    channel[..n].fill(stuck);
                }
            }
            SensorFault::Saturation { low, high } => {
                for channel in block.values.iter_mut().take(dims) {
                    for v in channel[..n].iter_mut() {
                        *v = if *v < low {
                            low
                        } else if *v > high {
                            high
                        } else {
                            *v
                        };
                    }
                }
            }
            SensorFault::Dropout { .. } => {}
        }
    }
}

/// Removes dropped readings, compacting the block's values and times; returns how many remain.
pub fn apply_dropout(faults: &mut [ActiveFault], block: &mut Block, dims: usize, n: usize) -> usize {
    let mut kept = n;
    for active in faults.iter_mut() {
        let SensorFault::Dropout { probability } = active.fault else {
            continue;
        };
        let mut write = 0;
        for read in 0..kept {
            let u = active.stream.open01();
            if u >= probability {
                for channel in block.values.iter_mut().take(dims) {
                    channel[write] = channel[read];
                }
                block.times[write] = block.times[read];
                write += 1;
            }
        }
        kept = write;
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(fault: SensorFault) -> ActiveFault {
        ActiveFault {
            event: 0,
            fault,
            since: 10.0,
            stuck: [3.0; MAX_DIMS],
            stream: Stream::derive(5, &["f"]),
        }
    }

    #[test]
    fn drift_is_linear_in_time_since_start() {
        let mut block = Block::new();
        block.values[0][..4].fill(1.0);
        block.times[..4].copy_from_slice(&[10.0, 11.0, 12.0, 20.0]);
        apply_values(&mut [active(SensorFault::Drift { per_second: 0.5 })], &mut block, 1, 4);
        assert_eq!(&block.values[0][..4], &[1.0, 1.5, 2.0, 6.0]);
    }

    #[test]
    fn stuck_saturation_and_spikes() {
        let mut block = Block::new();
        for (i, v) in block.values[0][..100].iter_mut().enumerate() {
            *v = i as f64;
        }
        apply_values(
            &mut [active(SensorFault::Saturation { low: 10.0, high: 20.0 })],
            &mut block,
            1,
            100,
        );
        assert!(block.values[0][..100].iter().all(|v| (10.0..=20.0).contains(v)));
        apply_values(&mut [active(SensorFault::Stuck { value: None })], &mut block, 1, 100);
        assert!(block.values[0][..100].iter().all(|v| *v == 3.0));
        block.values[0].fill(0.0);
        apply_values(
            &mut [active(SensorFault::Spikes {
                probability: 0.1,
                magnitude: 50.0,
            })],
            &mut block,
            1,
            256,
        );
        let spikes = block.values[0].iter().filter(|v| v.abs() == 50.0).count();
        assert!((10..=45).contains(&spikes), "{spikes} spikes in 256 readings at p=0.1");
    }

    #[test]
    fn dropout_removes_the_expected_share() {
        let mut block = Block::new();
        for i in 0..256 {
            block.values[0][i] = i as f64;
            block.times[i] = i as f64;
        }
        let kept = apply_dropout(
            &mut [active(SensorFault::Dropout { probability: 0.5 })],
            &mut block,
            1,
            256,
        );
        assert!((96..=160).contains(&kept), "{kept}");
        // Survivors keep their order and their timestamps.
        assert!(block.values[0][..kept].windows(2).all(|w| w[0] < w[1]));
        assert_eq!(&block.values[0][..kept], &block.times[..kept]);
        let all = apply_dropout(
            &mut [active(SensorFault::Dropout { probability: 1.0 })],
            &mut block,
            1,
            kept,
        );
        assert_eq!(all, 0);
    }
}
