//! The open-loop schedule: turns each step's readings into messages due at wall-clock
//! instants and hands each to its device's connection when it is due, whether or not earlier
//! messages have gone out (a connection that falls behind shows up as latency or loss, never as
//! a slower schedule).
//!
//! - **Cadence** (default): the scenario's own. A device in `raw` upload sends one message per
//!   reading, due at the reading's time; in `summary` upload one message per window, due at the
//!   window's end, carrying the window's readings. Upload settings follow the group, the
//!   storyboard's `upload` events and `upload` commands received from the backend; a crashed
//!   device sends nothing.
//! - **Rate** (`--rate R`): arrivals of a constant or Poisson process at `R` messages per second
//!   over the fleet; each arrival goes to the next device in turn (crashed devices skipped) and
//!   carries the readings it took since its previous message.
//!
//! `--max-rate` caps either: a message due before the cap allows is moved to the cap's next
//! slot, which becomes its intended send time (counted as `capped`). Every message takes its
//! device's next sequence number when it is handed over; if the device's queue is full it is
//! dropped (counted as an error, and lost).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;
use twin_core::load::Arrivals;
use twin_core::rng::Stream;
use twin_core::scenario::{UploadMode, UploadSpec};
use twin_core::time::SimDuration;

use crate::clock::Pace;
use crate::fleet::{Change, Fleet, Transition};
use crate::generator::StepReadings;
use crate::measure::Counters;
use crate::message::{Outgoing, Reading};

/// Upload settings a device received as a command from the backend (a desired `upload`),
/// which win over the scenario's.
#[derive(Debug, Default)]
pub struct UploadCommand {
    /// 0: none, 1: raw, 2: summary.
    mode: AtomicU8,
    /// Summary window, nanoseconds.
    window_nanos: AtomicU64,
}

impl UploadCommand {
    /// Sets the device's upload mode (and summary window).
    pub fn set(&self, mode: UploadMode, window: Option<SimDuration>) {
        if let Some(window) = window {
            self.window_nanos.store(window.0, Ordering::Relaxed);
        }
        let code = match mode {
            UploadMode::Raw => 1,
            UploadMode::Summary => 2,
        };
        self.mode.store(code, Ordering::Relaxed);
    }

    /// The commanded mode, if a command set one.
    pub fn current(&self) -> Option<UploadMode> {
        match self.mode.load(Ordering::Relaxed) {
            1 => Some(UploadMode::Raw),
            2 => Some(UploadMode::Summary),
            _ => None,
        }
    }

    fn get(&self, base: UploadSpec) -> Option<UploadSpec> {
        let mode = match self.mode.load(Ordering::Relaxed) {
            1 => UploadMode::Raw,
            2 => UploadMode::Summary,
            _ => return None,
        };
        let window = self.window_nanos.load(Ordering::Relaxed);
        Some(UploadSpec {
            mode,
            window: if window > 0 { SimDuration(window) } else { base.window },
            overhead_bytes: base.overhead_bytes,
        })
    }
}

/// How messages are scheduled.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleSettings {
    /// Overall messages per second, or `None` for the scenario's cadence.
    pub rate: Option<f64>,
    /// Arrival process of `rate`.
    pub arrivals: Arrivals,
    /// Cap on messages per second.
    pub max_rate: Option<f64>,
    /// Wall instant at which the run stops sending.
    pub end: Instant,
    /// Simulated time at which the run stops sending, nanoseconds.
    pub sim_end: u64,
}

struct DeviceSchedule {
    group_upload: UploadSpec,
    storyboard_upload: Option<UploadSpec>,
    crashed: bool,
    window_end: u64,
    pending: Vec<Reading>,
    sequence: u64,
}

struct Due {
    due: Instant,
    sim: u64,
    device: u32,
    readings: Vec<Reading>,
}

/// The scheduler: owns each device's sequence numbers and pending readings.
pub struct Scheduler {
    fleet: Arc<Fleet>,
    pace: Pace,
    settings: ScheduleSettings,
    outboxes: Vec<mpsc::Sender<Outgoing>>,
    commands: Arc<Vec<UploadCommand>>,
    counters: Arc<Counters>,
    devices: Vec<DeviceSchedule>,
    transitions: Vec<Transition>,
    next_transition: usize,
    queue: VecDeque<Due>,
    cap_interval: Option<Duration>,
    next_cap_slot: Instant,
    next_arrival: Instant,
    next_device: usize,
    arrivals_stream: Stream,
    /// Messages handed over since the shared counters were last updated (they are updated once
    /// per dispatch, not per message).
    handed_messages: u64,
    /// The readings those messages carry.
    handed_readings: u64,
}

impl Scheduler {
    /// A scheduler over `outboxes` (one per device, by global index).
    pub fn new(
        fleet: Arc<Fleet>,
        pace: Pace,
        settings: ScheduleSettings,
        outboxes: Vec<mpsc::Sender<Outgoing>>,
        commands: Arc<Vec<UploadCommand>>,
        counters: Arc<Counters>,
    ) -> Self {
        let devices = (0..fleet.devices.len() as u32)
            .map(|index| {
                let upload = fleet.initial_upload(index);
                DeviceSchedule {
                    group_upload: upload,
                    storyboard_upload: None,
                    crashed: false,
                    window_end: upload.window.0,
                    pending: Vec::new(),
                    sequence: 0,
                }
            })
            .collect();
        let transitions = fleet.transitions();
        let seed = fleet.scenario.seed;
        Self {
            fleet,
            pace,
            settings,
            outboxes,
            commands,
            counters,
            devices,
            transitions,
            next_transition: 0,
            queue: VecDeque::new(),
            cap_interval: settings.max_rate.map(|r| Duration::from_secs_f64(1.0 / r)),
            next_cap_slot: pace.start,
            next_arrival: pace.start,
            next_device: 0,
            arrivals_stream: Stream::derive(seed, &["device-sim", "arrivals"]),
            handed_messages: 0,
            handed_readings: 0,
        }
    }

    /// Runs until the end of the run, the end of the readings (cadence), or `stop`. Returns
    /// when nothing more will be handed over; the outboxes are dropped then.
    pub async fn run(mut self, mut steps: mpsc::Receiver<StepReadings>, stop: CancellationToken) {
        let mut readings_done = false;
        loop {
            let now = Instant::now();
            self.dispatch_due(now);
            if now >= self.settings.end || (readings_done && self.settings.rate.is_none() && self.queue.is_empty()) {
                break;
            }
            let mut wake = self.settings.end;
            if let Some(front) = self.queue.front() {
                wake = wake.min(front.due.max(self.next_cap_slot));
            }
            if self.settings.rate.is_some() {
                wake = wake.min(self.next_arrival.max(self.next_cap_slot));
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                step = steps.recv(), if !readings_done => match step {
                    Some(step) => self.take_step(step),
                    None => readings_done = true,
                },
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // At the end of the run (not on Ctrl-C), readings still on their way from a lagging
        // simulation are taken: what was due before the end is sent, late (and measured so).
        if !stop.is_cancelled() && !readings_done {
            while let Ok(Some(step)) = tokio::time::timeout(Duration::from_secs(5), steps.recv()).await {
                self.take_step(step);
            }
            self.dispatch_due(Instant::now());
        }
        let stopped = Instant::now();
        let unsent = self.queue.iter().filter(|d| d.due <= stopped).count() as u64;
        Counters::add(&self.counters.unsent, unsent);
    }

    fn effective_upload(&self, device: usize) -> UploadSpec {
        let schedule = &self.devices[device];
        let base = schedule.storyboard_upload.unwrap_or(schedule.group_upload);
        self.commands.get(device).and_then(|c| c.get(base)).unwrap_or(base)
    }

    fn take_step(&mut self, step: StepReadings) {
        while let Some(transition) = self.transitions.get(self.next_transition)
            && transition.at <= step.start
        {
            for &device in &transition.devices {
                let schedule = &mut self.devices[device as usize];
                match transition.change {
                    Change::Upload(spec) => schedule.storyboard_upload = spec,
                    Change::Crashed(crashed) => schedule.crashed = crashed,
                }
            }
            self.next_transition += 1;
        }
        let rate_mode = self.settings.rate.is_some();
        let mut due: Vec<Due> = Vec::new();
        for (device, mut readings) in step.by_device {
            let index = device as usize;
            if rate_mode {
                readings.sort_by_key(|r| r.timestamp_nanos);
                self.devices[index].pending.extend(readings);
                continue;
            }
            let upload = self.effective_upload(index);
            if upload.mode == UploadMode::Raw {
                for reading in readings {
                    let sim = (reading.timestamp_nanos.max(0) as u64).clamp(step.start, step.end.saturating_sub(1));
                    due.push(Due {
                        due: self.pace.instant_of(sim),
                        sim,
                        device,
                        readings: vec![reading],
                    });
                }
            } else {
                readings.sort_by_key(|r| r.timestamp_nanos);
                self.devices[index].pending.extend(readings);
            }
        }
        if !rate_mode {
            for index in 0..self.devices.len() {
                let upload = self.effective_upload(index);
                let schedule = &mut self.devices[index];
                if upload.mode == UploadMode::Raw {
                    // Switched to raw: what a summary window held goes now.
                    if !schedule.pending.is_empty() {
                        due.push(Due {
                            due: self.pace.instant_of(step.start),
                            sim: step.start,
                            device: index as u32,
                            readings: std::mem::take(&mut schedule.pending),
                        });
                    }
                    continue;
                }
                let window = upload.window.0.max(1);
                if schedule.window_end <= step.start {
                    schedule.window_end = (step.start / window + 1) * window;
                }
                while schedule.window_end <= step.end {
                    let boundary = schedule.window_end;
                    schedule.window_end += window;
                    if schedule.crashed {
                        schedule.pending.clear();
                        continue;
                    }
                    let split = schedule
                        .pending
                        .partition_point(|r| r.timestamp_nanos < boundary as i64);
                    let readings: Vec<Reading> = schedule.pending.drain(..split).collect();
                    due.push(Due {
                        due: self.pace.instant_of(boundary),
                        sim: boundary,
                        device: index as u32,
                        readings,
                    });
                }
            }
        }
        due.retain(|d| d.sim < self.settings.sim_end);
        due.sort_by_key(|d| (d.sim, d.device));
        self.queue.extend(due);
    }

    fn dispatch_due(&mut self, now: Instant) {
        self.hand_over_due(now);
        if self.handed_messages > 0 {
            Counters::add(&self.counters.sent, std::mem::take(&mut self.handed_messages));
            Counters::add(&self.counters.samples_sent, std::mem::take(&mut self.handed_readings));
        }
    }

    /// Hands over every message due by `now` (cadence queue, then rate arrivals).
    fn hand_over_due(&mut self, now: Instant) {
        while let Some(front) = self.queue.front() {
            let slot = front.due.max(self.next_cap_slot);
            if slot > now || slot >= self.settings.end {
                break;
            }
            let Some(due) = self.queue.pop_front() else { break };
            if slot > due.due {
                Counters::add(&self.counters.capped, 1);
            }
            self.take_cap_slot(slot);
            self.hand_over(due.device, due.sim, slot, due.readings);
        }
        let Some(rate) = self.settings.rate else { return };
        let devices = self.devices.len();
        while self.next_arrival.max(self.next_cap_slot) <= now && self.next_arrival < self.settings.end {
            let arrival = self.next_arrival;
            let slot = arrival.max(self.next_cap_slot);
            if slot > arrival {
                Counters::add(&self.counters.capped, 1);
            }
            self.take_cap_slot(slot);
            let gap = match self.settings.arrivals {
                Arrivals::Constant => 1.0 / rate,
                Arrivals::Poisson => -self.arrivals_stream.open01().ln() / rate,
            };
            self.next_arrival = arrival + Duration::from_secs_f64(gap);
            let sim = self.pace.sim_at(slot);
            // The next device in turn that is not crashed.
            let Some(device) = (0..devices)
                .map(|k| (self.next_device + k) % devices)
                .find(|&d| !self.devices[d].crashed)
            else {
                continue;
            };
            self.next_device = (device + 1) % devices;
            let pending = &mut self.devices[device].pending;
            let split = pending.partition_point(|r| r.timestamp_nanos <= sim as i64);
            let readings: Vec<Reading> = pending.drain(..split).collect();
            self.hand_over(device as u32, sim, slot, readings);
        }
    }

    fn take_cap_slot(&mut self, slot: Instant) {
        if let Some(interval) = self.cap_interval {
            self.next_cap_slot = slot + interval;
        }
    }

    fn hand_over(&mut self, device: u32, sim: u64, intended: Instant, readings: Vec<Reading>) {
        let schedule = &mut self.devices[device as usize];
        schedule.sequence += 1;
        self.handed_messages += 1;
        self.handed_readings += readings.len() as u64;
        let message = Outgoing {
            device,
            sequence: schedule.sequence,
            sim_time_nanos: sim as i64,
            intended_unix_nanos: self.pace.unix_of(intended),
            readings,
        };
        match self.outboxes[device as usize].try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                Counters::add(&self.counters.overflows, 1);
                Counters::add(&self.counters.errors, 1);
            }
            Err(TrySendError::Closed(_)) => Counters::add(&self.counters.errors, 1),
        }
    }

    /// The fleet scheduled.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }
}
