//! Signal generators: what a sensor would read with no faults, block by block.
//!
//! Every generator fills a whole block of samples in one tight loop: the dispatch on the
//! generator kind happens once per block, never per sample. Periodic signals avoid per-sample
//! libm calls: a block is anchored with one exact `sincos` of its first sample's phase and the
//! rest follow from the angle-addition formula with a per-spec table of `cos(i*step)` and
//! `sin(i*step)`, so each sample is exact to a few ulps and independent of the previous one.

use std::f64::consts::TAU;

use nalgebra::{Rotation3, Vector3};

use crate::replay::ReplaySpec;
use crate::rng::Stream;

/// Samples per block: the unit of generation, fault application and accumulation.
pub const BLOCK: usize = 256;
/// Most channels a sensor has (a 3-axis accelerometer).
pub const MAX_DIMS: usize = 3;

/// A block of samples, one row per channel.
pub struct Block {
    /// Channel values.
    pub values: [[f64; BLOCK]; MAX_DIMS],
    /// Scratch space for random variates.
    pub scratch: [f64; BLOCK],
    /// Simulated time of each reading (filled only where needed: faults, recording, replay).
    pub times: [f64; BLOCK],
}

impl Block {
    /// An empty block.
    pub fn new() -> Box<Self> {
        Box::new(Self {
            values: [[0.0; BLOCK]; MAX_DIMS],
            scratch: [0.0; BLOCK],
            times: [0.0; BLOCK],
        })
    }
}

/// `cos(i * step)` and `sin(i * step)` for `i` in `0..BLOCK`.
#[derive(Clone, Debug)]
pub struct RotationTable {
    cos: Box<[f64]>,
    sin: Box<[f64]>,
}

impl RotationTable {
    /// The table for a phase step of `step` radians per sample.
    pub fn new(step: f64) -> Self {
        let (sin, cos): (Vec<f64>, Vec<f64>) = (0..BLOCK).map(|i| libm::sincos(step * i as f64)).unzip();
        Self {
            cos: cos.into_boxed_slice(),
            sin: sin.into_boxed_slice(),
        }
    }

    /// Writes `scale * sin(theta0 + i*step)` for `i` in `0..out.len()`, adding to `out` when `add`.
    #[inline]
    fn sine_into(&self, theta0: f64, scale: f64, out: &mut [f64], add: bool) {
        let (s0, c0) = libm::sincos(theta0);
        let (a, b) = (scale * s0, scale * c0);
        let n = out.len();
        let cos = &self.cos[..n];
        let sin = &self.sin[..n];
        if add {
            for i in 0..n {
                out[i] += a * cos[i] + b * sin[i];
            }
        } else {
            for i in 0..n {
                out[i] = a * cos[i] + b * sin[i];
            }
        }
    }
}

/// The phase angle of sample `index` of a periodic signal with `samples_per_period` samples a
/// period, reduced to one turn before it meets `sincos`.
#[inline]
fn phase_at(index: u64, samples_per_period: f64, phase: f64) -> f64 {
    let cycles = index as f64 / samples_per_period;
    TAU * (cycles - cycles.floor()) + phase
}

/// A sine: `offset + amplitude * sin(2*pi*t/period + phase)`.
#[derive(Clone, Debug)]
pub struct Sine {
    /// Amplitude.
    pub amplitude: f64,
    /// Offset.
    pub offset: f64,
    /// Phase in radians.
    pub phase: f64,
    /// Period in seconds.
    pub period: f64,
    /// Samples per period at the sensor's rate.
    pub samples_per_period: f64,
    table: RotationTable,
}

impl Sine {
    /// A sine sampled at `rate_hz`.
    pub fn new(amplitude: f64, period: f64, phase: f64, offset: f64, rate_hz: f64) -> Self {
        let samples_per_period = period * rate_hz;
        Self {
            amplitude,
            offset,
            phase,
            period,
            samples_per_period,
            table: RotationTable::new(TAU / samples_per_period),
        }
    }
}

/// A Markov chain over named states, one transition per sample.
#[derive(Clone, Debug)]
pub struct Markov {
    /// State names.
    pub states: Vec<String>,
    /// Output value per state.
    pub values: Vec<f64>,
    /// Cumulative transition probabilities, row by row.
    pub cumulative: Vec<Vec<f64>>,
    /// Initial state index.
    pub initial: usize,
}

/// A 3-axis accelerometer on a machine: gravity plus vibration at harmonics of the shaft
/// frequency along one machine axis, rotated into the sensor's mounting frame.
#[derive(Clone, Debug)]
pub struct Vibration {
    /// Shaft frequency in Hz.
    pub shaft_hz: f64,
    /// (amplitude, phase in radians) of the 1x, 2x, ... harmonics.
    pub harmonics: Vec<(f64, f64)>,
    /// Gravity in the sensor frame.
    pub gravity_sensor: Vector3<f64>,
    /// Vibration direction in the sensor frame.
    pub axis_sensor: Vector3<f64>,
    /// Samples per shaft revolution at the sensor's rate.
    pub samples_per_revolution: f64,
    tables: Vec<RotationTable>,
}

impl Vibration {
    /// Builds the generator. `axis` is normalized; `orientation` is the sensor's mounting
    /// rotation (machine frame to sensor frame is its inverse).
    pub fn new(
        shaft_hz: f64,
        harmonics: Vec<(f64, f64)>,
        axis: Vector3<f64>,
        orientation: Rotation3<f64>,
        gravity: f64,
        rate_hz: f64,
    ) -> Self {
        let to_sensor = orientation.inverse();
        let gravity_sensor = to_sensor * Vector3::new(0.0, 0.0, -gravity);
        let axis_sensor = to_sensor * axis.normalize();
        let samples_per_revolution = rate_hz / shaft_hz;
        let tables = (1..=harmonics.len())
            .map(|h| RotationTable::new(TAU * h as f64 / samples_per_revolution))
            .collect();
        Self {
            shaft_hz,
            harmonics,
            gravity_sensor,
            axis_sensor,
            samples_per_revolution,
            tables,
        }
    }
}

/// What a sensor reads, before noise, faults, clamp and quantization.
#[derive(Clone, Debug)]
pub enum Signal {
    /// Always `value`.
    Constant {
        /// The value.
        value: f64,
    },
    /// Uniform in `[low, low + width)`.
    Uniform {
        /// Lower bound.
        low: f64,
        /// Width of the interval.
        width: f64,
    },
    /// Independent gaussian samples.
    Gaussian {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std_dev: f64,
    },
    /// A sine.
    Sine(Sine),
    /// `x += step_std_dev * N(0,1)`, held inside `[min, max]`.
    RandomWalk {
        /// Initial value.
        start: f64,
        /// Step standard deviation.
        step_std_dev: f64,
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// Mean-reverting noise, exactly discretized at the sensor's rate:
    /// `x' = mean + (x - mean) * decay + innovation * N(0,1)`.
    OrnsteinUhlenbeck {
        /// Long-run mean.
        mean: f64,
        /// Initial value.
        start: f64,
        /// `exp(-theta * dt)`.
        decay: f64,
        /// `sigma * sqrt((1 - exp(-2 theta dt)) / (2 theta))`.
        innovation: f64,
    },
    /// A Markov chain.
    Markov(Markov),
    /// A 3-axis vibration sensor.
    Vibration(Box<Vibration>),
    /// Recorded telemetry.
    Replay(Box<ReplaySpec>),
    /// A camera replaying recorded images, one per frame; the scalar reading is the frame's
    /// mean pixel, the frame itself goes to a model bound to the sensor. `level` holds the
    /// device's first image.
    Camera(std::sync::Arc<crate::camera::ImageSet>),
}

impl Signal {
    /// The initial value of the generator's state (`level`).
    pub fn initial_level(&self) -> f64 {
        match self {
            Self::RandomWalk { start, .. } | Self::OrnsteinUhlenbeck { start, .. } => *start,
            Self::Markov(markov) => markov.initial as f64,
            _ => 0.0,
        }
    }

    /// The signal's nominal centre, used as the shift of the streaming statistics.
    pub fn centre(&self) -> f64 {
        match self {
            Self::Constant { value } => *value,
            Self::Uniform { low, width } => low + width / 2.0,
            Self::Gaussian { mean, .. } | Self::OrnsteinUhlenbeck { mean, .. } => *mean,
            Self::Sine(sine) => sine.offset,
            Self::RandomWalk { start, .. } => *start,
            Self::Markov(markov) => markov.values[markov.initial],
            Self::Vibration(_) | Self::Replay(_) | Self::Camera(_) => 0.0,
        }
    }

    /// Fills `n` samples, the first of which has sample index `first`, into `block`.
    ///
    /// `level` is the generator's state (walk position, OU value, Markov state index).
    /// Replay signals are not generated here (their values come from their series).
    #[inline]
    pub fn generate(&self, level: &mut f64, stream: &mut Stream, first: u64, block: &mut Block, n: usize) {
        let out = &mut block.values[0][..n];
        match self {
            Self::Constant { value } => out.fill(*value),
            Self::Uniform { low, width } => {
                stream.fill_open01(out);
                for v in out.iter_mut() {
                    *v = low + width * *v;
                }
            }
            Self::Gaussian { mean, std_dev } => {
                stream.fill_normal(out);
                for v in out.iter_mut() {
                    *v = mean + std_dev * *v;
                }
            }
            Self::Sine(sine) => {
                let theta0 = phase_at(first, sine.samples_per_period, sine.phase);
                sine.table.sine_into(theta0, sine.amplitude, out, false);
                for v in out.iter_mut() {
                    *v += sine.offset;
                }
            }
            Self::RandomWalk {
                step_std_dev, min, max, ..
            } => {
                stream.fill_normal(out);
                *level = random_walk(out, *level, *step_std_dev, *min, *max);
            }
            Self::OrnsteinUhlenbeck {
                mean,
                decay,
                innovation,
                ..
            } => {
                stream.fill_normal(out);
                let mut deviation = *level - mean;
                for v in out.iter_mut() {
                    deviation = deviation * decay + innovation * *v;
                    *v = mean + deviation;
                }
                *level = mean + deviation;
            }
            Self::Markov(markov) => {
                stream.fill_open01(out);
                let mut state = *level as usize;
                for v in out.iter_mut() {
                    let row = &markov.cumulative[state];
                    let u = *v;
                    let mut next = row.len() - 1;
                    for (j, &c) in row.iter().enumerate() {
                        if u < c {
                            next = j;
                            break;
                        }
                    }
                    state = next;
                    *v = markov.values[state];
                }
                *level = state as f64;
            }
            Self::Vibration(vibration) => {
                let magnitude = &mut block.scratch[..n];
                magnitude.fill(0.0);
                for (h, ((amplitude, phase), table)) in vibration.harmonics.iter().zip(&vibration.tables).enumerate() {
                    let per_harmonic = vibration.samples_per_revolution / (h + 1) as f64;
                    let theta0 = phase_at(first, per_harmonic, *phase);
                    table.sine_into(theta0, *amplitude, magnitude, true);
                }
                for axis in 0..3 {
                    let g = vibration.gravity_sensor[axis];
                    let d = vibration.axis_sensor[axis];
                    let out = &mut block.values[axis][..n];
                    for (v, m) in out.iter_mut().zip(magnitude.iter()) {
                        *v = g + d * m;
                    }
                }
            }
            Self::Replay(_) => {}
            Self::Camera(images) => {
                let start = *level as u64 + first;
                let count = images.len() as u64;
                for (i, v) in out.iter_mut().enumerate() {
                    *v = images.means[((start + i as u64) % count) as usize];
                }
            }
        }
    }

    /// Channels per sample.
    pub fn dims(&self) -> usize {
        match self {
            Self::Vibration(_) => 3,
            Self::Replay(replay) => replay.dims,
            _ => 1,
        }
    }
}

/// Turns standard normal draws in `steps` into a walk from `start` held inside `[min, max]`,
/// in place; returns the last position.
///
/// The bounds rarely bind, so the block is first summed without them: a chain of one add per
/// sample instead of add, max and min. Where no partial sum leaves the bounds the result is
/// bit-identical to clamping at every step (no clamp changed anything); otherwise the block is
/// redone with the clamps, from the same draws.
#[inline]
fn random_walk(steps: &mut [f64], start: f64, step_std_dev: f64, min: f64, max: f64) -> f64 {
    let draws = steps;
    let mut x = start;
    let mut low = start;
    let mut high = start;
    let mut scaled = [0.0; BLOCK];
    let scaled = &mut scaled[..draws.len()];
    for (s, d) in scaled.iter_mut().zip(draws.iter()) {
        *s = step_std_dev * d;
    }
    for (v, s) in draws.iter_mut().zip(scaled.iter()) {
        x += s;
        *v = x;
    }
    for v in draws.iter() {
        low = if *v < low { *v } else { low };
        high = if *v > high { *v } else { high };
    }
    if low >= min && high <= max {
        return x;
    }
    let mut x = start;
    for (v, s) in draws.iter_mut().zip(scaled.iter()) {
        x += s;
        x = if x < min { min } else { x };
        x = if x > max { max } else { x };
        *v = x;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_fast_path_equals_clamping_every_step() {
        let mut stream = Stream::derive(9, &["walk"]);
        for (min, max) in [(f64::NEG_INFINITY, f64::INFINITY), (-3.0, 3.0), (-0.5, 0.5)] {
            let mut draws = [0.0; BLOCK];
            stream.fill_normal(&mut draws);
            let mut fast = draws;
            let end = random_walk(&mut fast, 0.2, 0.3, min, max);
            let mut x: f64 = 0.2;
            for (i, d) in draws.iter().enumerate() {
                x = (x + 0.3 * d).max(min).min(max);
                assert_eq!(fast[i].to_bits(), x.to_bits(), "bounds [{min}, {max}], step {i}");
            }
            assert_eq!(end.to_bits(), x.to_bits());
        }
    }

    fn run(signal: &Signal, n_blocks: usize, n: usize) -> Vec<f64> {
        let mut block = Block::new();
        let mut level = signal.initial_level();
        let mut stream = Stream::derive(11, &["test"]);
        let mut all = Vec::new();
        for b in 0..n_blocks {
            signal.generate(&mut level, &mut stream, (b * n) as u64, &mut block, n);
            all.extend_from_slice(&block.values[0][..n]);
        }
        all
    }

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        (m, xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64)
    }

    #[test]
    fn sine_values_are_exact() {
        let rate = 10.0;
        let sine = Sine::new(2.5, 3.7, 0.4, 20.0, rate);
        let signal = Signal::Sine(sine);
        let values = run(&signal, 40, 200);
        for (k, v) in values.iter().enumerate() {
            let t = k as f64 / rate;
            let exact = 20.0 + 2.5 * (TAU * t / 3.7 + 0.4).sin();
            assert!((v - exact).abs() < 1e-12, "sample {k}: {v} vs {exact}");
        }
        // amplitude, period, phase and offset as specified
        let one_period = (3.7 * rate) as usize;
        assert!((values[0] - (20.0 + 2.5 * 0.4f64.sin())).abs() < 1e-12);
        assert!(
            (values[one_period] - values[0]).abs() < 0.5,
            "one period later (37 samples of 37.0)"
        );
    }

    #[test]
    fn gaussian_moments() {
        let values = run(
            &Signal::Gaussian {
                mean: 5.0,
                std_dev: 2.0,
            },
            400,
            250,
        );
        let (m, v) = mean_var(&values);
        assert!((m - 5.0).abs() < 0.02, "{m}");
        assert!((v - 4.0).abs() < 0.05, "{v}");
    }

    #[test]
    fn uniform_range_and_moments() {
        let values = run(&Signal::Uniform { low: -1.0, width: 4.0 }, 400, 250);
        assert!(values.iter().all(|v| (-1.0..3.0).contains(v)));
        let (m, v) = mean_var(&values);
        assert!((m - 1.0).abs() < 0.02, "{m}");
        assert!((v - 16.0 / 12.0).abs() < 0.02, "{v}");
    }

    #[test]
    fn random_walk_variance_grows_linearly_and_respects_bounds() {
        // Increments of an unbounded walk have the step variance.
        let values = run(
            &Signal::RandomWalk {
                start: 0.0,
                step_std_dev: 0.5,
                min: f64::NEG_INFINITY,
                max: f64::INFINITY,
            },
            400,
            250,
        );
        let increments: Vec<f64> = values.windows(2).map(|w| w[1] - w[0]).collect();
        let (m, v) = mean_var(&increments);
        assert!(m.abs() < 0.01 && (v - 0.25).abs() < 0.01, "{m} {v}");
        let bounded = run(
            &Signal::RandomWalk {
                start: 0.0,
                step_std_dev: 1.0,
                min: -2.0,
                max: 2.0,
            },
            100,
            250,
        );
        assert!(bounded.iter().all(|v| (-2.0..=2.0).contains(v)));
    }

    #[test]
    fn ornstein_uhlenbeck_reverts_to_mean() {
        // theta = 0.5/s, sigma = 1, dt = 0.1 s: stationary variance sigma^2/(2 theta) = 1.
        let dt: f64 = 0.1;
        let theta: f64 = 0.5;
        let decay = (-theta * dt).exp();
        let innovation = ((1.0 - (-2.0 * theta * dt).exp()) / (2.0 * theta)).sqrt();
        let signal = Signal::OrnsteinUhlenbeck {
            mean: 10.0,
            start: 30.0,
            decay,
            innovation,
        };
        let values = run(&signal, 800, 250);
        // Starting 20 above the mean, after 5 time constants (10 s = 100 samples) the expected
        // deviation is 20 * e^-5 = 0.13.
        let early: f64 = values[95..105].iter().sum::<f64>() / 10.0;
        assert!((early - 10.0).abs() < 3.0, "not reverting: {early}");
        let (m, v) = mean_var(&values[2000..]);
        assert!((m - 10.0).abs() < 0.1, "mean {m}");
        assert!((v - 1.0).abs() < 0.1, "stationary variance {v}");
        // Lag-1 autocorrelation equals the decay factor.
        let tail = &values[2000..];
        let c: f64 = tail.windows(2).map(|w| (w[0] - m) * (w[1] - m)).sum::<f64>() / (tail.len() - 1) as f64;
        assert!((c / v - decay).abs() < 0.01, "autocorrelation {} vs {decay}", c / v);
    }

    #[test]
    fn markov_visits_states_in_stationary_proportion() {
        // Two states, p(0->1) = 0.1, p(1->0) = 0.3: stationary P(1) = 0.1 / 0.4 = 0.25.
        let markov = Markov {
            states: vec!["idle".into(), "busy".into()],
            values: vec![0.0, 1.0],
            cumulative: vec![vec![0.9, 1.0], vec![0.3, 1.0]],
            initial: 0,
        };
        let values = run(&Signal::Markov(markov), 400, 250);
        let busy = values.iter().sum::<f64>() / values.len() as f64;
        assert!((busy - 0.25).abs() < 0.01, "{busy}");
    }

    #[test]
    fn vibration_sees_gravity_and_harmonics_in_sensor_frame() {
        // Sensor rolled 90 degrees about x: machine -z gravity appears along sensor +y or -y.
        let rotation = Rotation3::from_euler_angles(std::f64::consts::FRAC_PI_2, 0.0, 0.0);
        let vibration = Vibration::new(
            25.0,
            vec![(1.0, 0.0), (0.5, 0.0)],
            Vector3::new(1.0, 0.0, 0.0),
            rotation,
            9.80665,
            1000.0,
        );
        let signal = Signal::Vibration(Box::new(vibration));
        let mut block = Block::new();
        let mut level = 0.0;
        let mut stream = Stream::derive(1, &["v"]);
        signal.generate(&mut level, &mut stream, 0, &mut block, 200);
        let mean_y = block.values[1][..200].iter().sum::<f64>() / 200.0;
        let mean_z = block.values[2][..200].iter().sum::<f64>() / 200.0;
        assert!((mean_y.abs() - 9.80665).abs() < 1e-9, "gravity on y: {mean_y}");
        assert!(mean_z.abs() < 1e-9, "z {mean_z}");
        // x carries the vibration: at t = 1/100 s (sample 10), 1x is at 90 degrees, 2x at 180.
        let x10 = block.values[0][10];
        let exact = (TAU * 25.0 * 0.01).sin() + 0.5 * (TAU * 50.0 * 0.01).sin();
        assert!((x10 - exact).abs() < 1e-12, "{x10} vs {exact}");
    }
}
