//! The fleet's readings: a `twin_core::Simulation` of the scenario, recording on, stepped in
//! virtual time on its own thread and paced to the wall clock, a little ahead of it so that a
//! step's readings are ready before they are due. Each step's readings go to the scheduler,
//! device by device.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use twin_core::{RunOptions, Simulation};

use crate::clock::Pace;
use crate::fleet::Fleet;
use crate::message::Reading;

/// How far ahead of the wall clock a step is computed.
pub const LOOKAHEAD: Duration = Duration::from_millis(250);

/// The readings of one step `[start, end)`, by device.
#[derive(Debug)]
pub struct StepReadings {
    /// Simulated start, nanoseconds.
    pub start: u64,
    /// Simulated end (exclusive), nanoseconds.
    pub end: u64,
    /// Readings per global device index, each device's in the core's order (sensor by
    /// sensor, in time order).
    pub by_device: Vec<(u32, Vec<Reading>)>,
}

/// Starts the simulation thread. It stops at `sim_end` (simulated nanoseconds), at the end of
/// the scenario, when `stop` is cancelled or when the receiver is gone.
///
/// # Errors
/// The thread cannot be spawned.
pub fn spawn(
    fleet: Arc<Fleet>,
    pace: Pace,
    sim_end: u64,
    steps: mpsc::Sender<StepReadings>,
    stop: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("device-sim-twin".into())
        .spawn(move || generate(&fleet, pace, sim_end, &steps, &stop))
}

fn generate(fleet: &Fleet, pace: Pace, sim_end: u64, steps: &mpsc::Sender<StepReadings>, stop: &CancellationToken) {
    let mut simulation = Simulation::new(fleet.scenario.clone(), RunOptions { record: true });
    // Each group's sensor names, to turn a recorded sensor name into its slot.
    let sensor_names: Vec<Vec<&str>> = fleet
        .scenario
        .groups
        .iter()
        .map(|g| {
            fleet.scenario.sensors[g.sensors.clone()]
                .iter()
                .map(|s| s.name.as_str())
                .collect()
        })
        .collect();
    loop {
        let start = simulation.now().0;
        if start >= sim_end || stop.is_cancelled() {
            return;
        }
        let due = pace.instant_of(start).checked_sub(LOOKAHEAD).unwrap_or(pace.start);
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            if stop.is_cancelled() {
                return;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
        }
        if !simulation.step() {
            return;
        }
        let end = simulation.now().0;
        let mut by_device: Vec<(u32, Vec<Reading>)> = Vec::new();
        simulation.drain_recording(&mut |sample| {
            let same = by_device
                .last()
                .is_some_and(|(index, _)| fleet.devices[*index as usize].id == sample.device);
            if !same {
                let Some(&index) = fleet.index_of.get(sample.device) else {
                    return;
                };
                by_device.push((index, Vec::new()));
            }
            let Some((index, readings)) = by_device.last_mut() else {
                return;
            };
            let group = fleet.devices[*index as usize].group;
            let Some(sensor) = sensor_names[group].iter().position(|n| *n == sample.sensor) else {
                return;
            };
            let mut values = [0.0; 3];
            let dims = sample.values.len().min(3);
            values[..dims].copy_from_slice(&sample.values[..dims]);
            readings.push(Reading {
                sensor: sensor as u16,
                dims: dims as u8,
                timestamp_nanos: (sample.timestamp * 1e9).round() as i64,
                values,
            });
        });
        if steps.blocking_send(StepReadings { start, end, by_device }).is_err() {
            return;
        }
    }
}
