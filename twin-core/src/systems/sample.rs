//! `sample_sensors`: every sensor of every device produces all the readings that fall inside
//! the step, in blocks, in parallel across devices.
//!
//! A device's work depends only on its own components and the scenario, so the pass is
//! parallel and its results do not depend on the number of threads. The step is cut at the
//! device's window boundaries (a window closes exactly on its boundary); inside a segment,
//! readings are generated [`BLOCK`] at a time: generate, noise, faults, clamp, quantize,
//! dropout, accumulate, each a tight loop over the block.

use std::cell::RefCell;

use bevy_ecs::batching::BatchingStrategy;
use bevy_ecs::system::{Query, Res};

use crate::components::{
    DeployedModel, DeviceState, PendingRows, Recorder, ReplayCursor, ReplayCursors, ScenarioSpec, SensorFaults,
    SensorSlot, Sensors, StepOutput,
};
use crate::fault::{self, ActiveFault};
use crate::features;
use crate::scenario::{SensorSpec, UploadMode};
use crate::signal::{BLOCK, Block, Signal};
use crate::stats::WindowSummary;
use crate::time::{NANOS_PER_SECOND, SimClock};
use smallvec::SmallVec;

/// The devices the sampling pass visits.
pub type DeviceQuery<'w, 's> = Query<
    'w,
    's,
    (
        &'static mut DeviceState,
        &'static mut Sensors,
        Option<&'static mut SensorFaults>,
        Option<&'static mut ReplayCursors>,
        Option<&'static mut Recorder>,
        Option<(&'static DeployedModel, &'static mut PendingRows)>,
    ),
>;

thread_local! {
    /// Each worker's block scratch, reused across devices and steps.
    static BLOCK_SCRATCH: RefCell<Box<Block>> = RefCell::new(Block::new());
}

/// Samples every sensor of every device over the current step.
pub fn sample_sensors(clock: Res<SimClock>, scenario: Res<ScenarioSpec>, mut devices: DeviceQuery) {
    let (now, end) = (clock.now, clock.step_end);
    let specs = &scenario.0.sensors;
    devices
        .par_iter_mut()
        .batching_strategy(BatchingStrategy::new().min_batch_size(256))
        .for_each(
            |(mut state, mut sensors, mut faults, mut cursors, mut recorder, mut model)| {
                BLOCK_SCRATCH.with_borrow_mut(|block| {
                    let state = &mut *state;
                    state.step = StepOutput {
                        newest: f64::NEG_INFINITY,
                        ..StepOutput::default()
                    };
                    for (slot_index, slot) in sensors.0.iter_mut().enumerate() {
                        let rows = match model.as_mut() {
                            Some((deployed, rows)) if usize::from(deployed.slot) == slot_index => Some(&mut **rows),
                            _ => None,
                        };
                        let mut work = SensorWork {
                            spec: &specs[slot.spec as usize],
                            device: state,
                            slot,
                            faults: faults
                                .as_deref_mut()
                                .and_then(|f| f.0.get_mut(slot_index))
                                .filter(|f| !f.is_empty()),
                            recorder: recorder.as_deref_mut().and_then(|r| r.0.get_mut(slot_index)),
                            feature_rows: rows,
                            block,
                        };
                        let cursor = cursors
                            .as_deref_mut()
                            .and_then(|c| c.0.get_mut(slot_index))
                            .and_then(Option::as_mut);
                        work.run_step(now, end, cursor);
                    }
                });
            },
        );
}

/// The smallest sample index `k` with `k / rate >= t`.
///
/// Exact in integers when the sample period is a whole number of nanoseconds (1 Hz, 100 Hz,
/// 1 kHz, 0.01 Hz...); otherwise in floating point with a relative tolerance of 1e-12, so
/// that boundaries that are exact in decimal (3 Hz at 1 s) stay exact.
#[inline]
pub fn first_index_at(t_ns: u64, rate_hz: f64) -> u64 {
    let period_ns = NANOS_PER_SECOND as f64 / rate_hz;
    if period_ns.fract() == 0.0 && period_ns < 9.0e15 {
        return t_ns.div_ceil(period_ns as u64);
    }
    let x = t_ns as f64 / NANOS_PER_SECOND as f64 * rate_hz;
    let k = (x - x * 1e-12).ceil();
    if k <= 0.0 { 0 } else { k as u64 }
}

struct SensorWork<'a> {
    spec: &'a SensorSpec,
    device: &'a mut DeviceState,
    slot: &'a mut SensorSlot,
    faults: Option<&'a mut Vec<ActiveFault>>,
    recorder: Option<&'a mut Vec<f64>>,
    /// Where the features of each completed window go, when a model reads this sensor.
    feature_rows: Option<&'a mut PendingRows>,
    block: &'a mut Block,
}

impl SensorWork<'_> {
    fn run_step(&mut self, now: u64, end: u64, mut cursor: Option<&mut ReplayCursor>) {
        let window = self.device.uplink.window.0.max(1);
        let mut segment_start = now;
        while segment_start < end {
            let boundary = (segment_start / window + 1) * window;
            let segment_end = boundary.min(end);
            match cursor.as_deref_mut() {
                Some(cursor) => self.replay_segment(cursor, segment_start, segment_end),
                None => self.periodic_segment(segment_end),
            }
            if segment_end == boundary {
                self.close_window(boundary);
            }
            segment_start = segment_end;
        }
    }

    fn periodic_segment(&mut self, segment_end: u64) {
        let rate = self.spec.rate_hz;
        let end_index = first_index_at(segment_end, rate);
        if !self.device.online {
            self.slot.next_index = self.slot.next_index.max(end_index);
            return;
        }
        while self.slot.next_index < end_index {
            let first = self.slot.next_index;
            let n = ((end_index - first) as usize).min(BLOCK);
            self.spec
                .signal
                .generate(&mut self.slot.level, &mut self.slot.stream, first, self.block, n);
            if let (Signal::Camera(images), Some(rows)) = (&self.spec.signal, self.feature_rows.as_deref_mut()) {
                // Every frame goes to the model as it is taken.
                let start = self.slot.level as u64;
                for k in first..first + n as u64 {
                    let (pixels, label) = images.image(start + k);
                    rows.values.extend_from_slice(pixels);
                    rows.labels.push(label);
                    rows.closed_at
                        .push((k as f64 / rate * NANOS_PER_SECOND as f64).round() as u64);
                }
            }
            let times = &mut self.block.times;
            if self.faults.is_some() || self.recorder.is_some() {
                for (i, t) in times[..n].iter_mut().enumerate() {
                    *t = (first + i as u64) as f64 / rate;
                }
            } else {
                times[n - 1] = (first + n as u64 - 1) as f64 / rate;
            }
            self.finish_block(n);
            self.slot.next_index = first + n as u64;
        }
    }

    fn replay_segment(&mut self, cursor: &mut ReplayCursor, segment_start: u64, segment_end: u64) {
        let start_s = segment_start as f64 / NANOS_PER_SECOND as f64;
        let end_s = segment_end as f64 / NANOS_PER_SECOND as f64;
        let dims = self.spec.dims;
        let series = cursor.series.clone();
        let looping = matches!(&self.spec.signal, Signal::Replay(r) if r.looping);
        loop {
            let mut n = 0;
            while n < BLOCK {
                if cursor.row >= series.times.len() {
                    if !looping || series.period <= 0.0 {
                        break;
                    }
                    cursor.row = 0;
                    cursor.pass += 1;
                }
                let t = series.times[cursor.row] + cursor.pass as f64 * series.period;
                if t >= end_s {
                    break;
                }
                if t >= start_s && self.device.online {
                    for channel in 0..dims {
                        self.block.values[channel][n] = series.values[cursor.row * dims + channel];
                    }
                    self.block.times[n] = t;
                    n += 1;
                }
                cursor.row += 1;
            }
            if n == 0 {
                return;
            }
            self.finish_block(n);
            if n < BLOCK {
                return;
            }
        }
    }

    /// Noise, faults, clamp, quantization, dropout, accumulation and recording of `n` readings.
    fn finish_block(&mut self, n: usize) {
        let spec = self.spec;
        let only_the_window_reads =
            self.faults.is_none() && spec.clamp.is_none() && spec.quantize.is_none() && self.recorder.is_none();
        let kept = if only_the_window_reads {
            self.accumulate_with_noise(n);
            n
        } else {
            self.apply_and_accumulate(n)
        };
        if kept == 0 {
            return;
        }
        let step = &mut self.device.step;
        step.samples += kept as u32;
        step.newest = step.newest.max(self.block.times[kept - 1]);
        if self.device.uplink.mode == UploadMode::Raw {
            step.raw_messages += kept as u32;
            step.raw_bytes += kept as u64 * u64::from(spec.raw_message_bytes(self.device.uplink.overhead_bytes));
        }
        if let Some(recorder) = self.recorder.as_deref_mut() {
            let dims = spec.dims;
            for i in 0..kept {
                recorder.push(self.device.skew.device_time(self.block.times[i]));
                for channel in 0..dims {
                    recorder.push(self.block.values[channel][i]);
                }
            }
        }
    }

    /// The common case, where nothing but the window reads a noisy reading (no faults, clamp,
    /// quantization or recording): the noise is added as the readings are accumulated, never
    /// written out. The same draws in the same order, and the same sums bit for bit, as
    /// [`Self::apply_and_accumulate`].
    fn accumulate_with_noise(&mut self, n: usize) {
        let spec = self.spec;
        let block = &mut *self.block;
        for (channel, stats) in self.slot.channels.as_mut_slice().iter_mut().enumerate() {
            let values = &block.values[channel][..n];
            if spec.noise > 0.0 {
                let noise = &mut block.scratch[..n];
                self.slot.stream.fill_normal(noise);
                stats.window.add_block_with_noise(values, noise, spec.noise, spec.shift);
            } else {
                stats.window.add_block(values, spec.shift);
            }
        }
    }

    /// Noise, faults, clamp, quantization and dropout written into the block, then accumulation;
    /// returns how many readings dropout kept (at the front of the block).
    fn apply_and_accumulate(&mut self, n: usize) -> usize {
        let spec = self.spec;
        let dims = spec.dims;
        if spec.noise > 0.0 {
            for channel in self.block.values.iter_mut().take(dims) {
                let noise = &mut self.block.scratch[..n];
                self.slot.stream.fill_normal(noise);
                for (v, z) in channel[..n].iter_mut().zip(noise.iter()) {
                    *v += spec.noise * z;
                }
            }
        }
        if let Some(faults) = self.faults.as_deref_mut() {
            fault::apply_values(faults, self.block, dims, n);
        }
        if let Some((low, high)) = spec.clamp {
            for channel in self.block.values.iter_mut().take(dims) {
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
        if let Some(step) = spec.quantize {
            // Divide by the inverse when it is a whole number (0.1 -> 10), so that quantized
            // values are the nearest doubles to their decimals (70.1, not 70.10000000000001).
            let inverse = 1.0 / step;
            let exact_inverse = inverse.fract() == 0.0;
            for channel in self.block.values.iter_mut().take(dims) {
                for v in channel[..n].iter_mut() {
                    *v = if exact_inverse {
                        (*v * inverse).round() / inverse
                    } else {
                        (*v / step).round() * step
                    };
                }
            }
        }
        let kept = match self.faults.as_deref_mut() {
            Some(faults) => fault::apply_dropout(faults, self.block, dims, n),
            None => n,
        };
        for (channel, stats) in self.slot.channels.as_mut_slice().iter_mut().enumerate() {
            stats.window.add_block(&self.block.values[channel][..kept], spec.shift);
        }
        kept
    }

    fn close_window(&mut self, at: u64) {
        let shift = self.spec.shift;
        if let Some(rows) = self.feature_rows.as_deref_mut()
            && !matches!(self.spec.signal, Signal::Camera(_))
        {
            let summaries: SmallVec<[WindowSummary; 3]> = self
                .slot
                .channels
                .as_slice()
                .iter()
                .map(|c| c.window.summary(shift))
                .collect();
            if features::push_window_features(&summaries, &mut rows.values) {
                rows.closed_at.push(at);
            }
        }
        for channel in self.slot.channels.as_mut_slice() {
            channel.total.merge_window(&channel.window, shift);
            channel.window.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_index_at;

    #[test]
    fn index_boundaries() {
        assert_eq!(first_index_at(0, 1.0), 0);
        assert_eq!(first_index_at(1_000_000_000, 1.0), 1);
        assert_eq!(first_index_at(1_000_000_001, 1.0), 2);
        assert_eq!(first_index_at(1_000_000_000, 3.0), 3);
        assert_eq!(first_index_at(100_000_000_000, 0.01), 1);
        assert_eq!(first_index_at(60_000_000_000, 1000.0), 60_000);
        assert_eq!(first_index_at(1_000_000_001, 3.0), 4);
        assert_eq!(first_index_at(3_600_000_000_000, 7.0), 25_200);
    }
}
