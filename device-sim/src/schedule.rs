//! The open-loop schedule: turns each step's readings into messages due at wall-clock
//! instants and hands each to its device's connection when it is due, whether or not earlier
//! messages have gone out (a connection that falls behind shows up as latency or loss, never as
//! a slower schedule).
//!
//! - **Cadence** (default): the scenario's own. A device in `raw` upload sends one message per
//!   reading, due at the reading's time; in `summary` upload one message per window, due at the
//!   window's end, carrying the window's readings. Upload settings follow the group, the
//!   storyboard's `upload` events and `upload` commands received from the backend; a crashed
//!   device sends nothing. A `sampling` command thins each sensor's scenario-rate readings
//!   to the commanded rate ([`DeviceCommand`]).
//! - **Rate** (`--rate R`): arrivals of a constant or Poisson process at `R` messages per second
//!   over the fleet; each arrival goes to the next device in turn (crashed devices skipped) and
//!   carries the readings it took since its previous message.
//!
//! **Partitions**: while the scenario partitions a gateway, its devices' messages wait in its
//! edge buffer and go out when it heals (`GatewayUplink`).
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
use twin_core::scenario::{Action, Target, UploadMode, UploadSpec};
use twin_core::time::SimDuration;

use crate::clock::Pace;
use crate::fleet::{Change, Fleet, Transition};
use crate::generator::StepReadings;
use crate::measure::Counters;
use crate::message::{Outgoing, Reading};

/// Settings a device received as commands from the backend (a desired `upload` or
/// `sampling`), which win over the scenario's. The device's connection task sets them; the
/// scheduler reads them when it takes the next step's readings.
#[derive(Debug, Default)]
pub struct DeviceCommand {
    /// 0: none, 1: raw, 2: summary.
    mode: AtomicU8,
    /// Summary window, nanoseconds.
    window_nanos: AtomicU64,
    /// Sampling period, nanoseconds (0: the scenario's rate).
    sampling_period_nanos: AtomicU64,
}

impl DeviceCommand {
    /// Sets the device's sampling period (`None`: back to the scenario's rate).
    pub fn set_sampling(&self, period: Option<SimDuration>) {
        self.sampling_period_nanos
            .store(period.map_or(0, |p| p.0), Ordering::Relaxed);
    }

    /// The commanded sampling period, nanoseconds (0: the scenario's rate).
    pub fn sampling_period_nanos(&self) -> u64 {
        self.sampling_period_nanos.load(Ordering::Relaxed)
    }

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
    /// The summary window `window_end` follows, nanoseconds.
    window: u64,
    window_end: u64,
    pending: Vec<Reading>,
    sequence: u64,
    sampling: Sampling,
}

/// A commanded sampling rate, applied to the scenario-rate stream: per sensor, a reading is
/// kept when it is at or after the sensor's next sampling instant, which then advances by one
/// period (from the reading's time when the stream fell more than a period behind, as after a
/// crash). A sensor thus keeps one reading per period, `rate_hz` on average, each the first
/// of the scenario's readings at or after its instant.
#[derive(Debug, Default)]
struct Sampling {
    /// The period the instants below follow, nanoseconds (0: none commanded).
    period: u64,
    /// Next sampling instant per sensor slot, device nanoseconds.
    next: Vec<i64>,
}

impl Sampling {
    fn apply(&mut self, period: u64, readings: &mut Vec<Reading>) {
        if period != self.period {
            self.period = period;
            self.next.clear();
        }
        if period == 0 {
            return;
        }
        let period = period as i64;
        let next = &mut self.next;
        readings.retain(|reading| {
            let slot = usize::from(reading.sensor);
            if next.len() <= slot {
                next.resize(slot + 1, i64::MIN);
            }
            let due = next[slot];
            if reading.timestamp_nanos < due {
                return false;
            }
            next[slot] = if due == i64::MIN || reading.timestamp_nanos >= due + period {
                reading.timestamp_nanos + period
            } else {
                due + period
            };
            true
        });
    }
}

struct Due {
    due: Instant,
    sim: u64,
    device: u32,
    readings: Vec<Reading>,
    /// A summary window's message (its size at the edge is the summary's).
    summary: bool,
}

/// A gateway's uplink on the wire: while the scenario partitions it, the messages of the
/// devices behind it go into its edge buffer (`buffer_bytes`, each message at its edge size:
/// twin-core's raw or summary message bytes); a message that does not fit is lost. When the
/// partition heals, the backlog is handed to the devices' connections at once, oldest first,
/// with the intended send times the messages had, so their end-to-end latency includes the
/// wait; messages of those devices due meanwhile queue behind it.
#[derive(Debug, Default)]
struct GatewayUplink {
    /// Partitions, `[start, end)` in simulated nanoseconds (`u64::MAX`: never heals).
    partitions: Vec<(u64, u64)>,
    capacity: u64,
    held_bytes: u64,
    /// Messages waiting for the uplink, each with the bytes it holds in the buffer (0 for a
    /// message queued behind the backlog after the heal, which was never buffered).
    backlog: VecDeque<(Outgoing, u64)>,
}

impl GatewayUplink {
    /// When the partition holding the uplink down at `sim` ends (`u64::MAX`: never), or `None`
    /// when the uplink is up then.
    fn heals_at(&self, sim: u64) -> Option<u64> {
        self.partitions
            .iter()
            .filter(|&&(start, end)| start <= sim && sim < end)
            .map(|&(_, end)| end)
            .max()
    }
}

/// The scheduler: owns each device's sequence numbers and pending readings.
pub struct Scheduler {
    fleet: Arc<Fleet>,
    pace: Pace,
    settings: ScheduleSettings,
    outboxes: Vec<mpsc::Sender<Outgoing>>,
    commands: Arc<Vec<DeviceCommand>>,
    counters: Arc<Counters>,
    devices: Vec<DeviceSchedule>,
    /// Per gateway, by the scenario's gateway index.
    uplinks: Vec<GatewayUplink>,
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
    /// Messages dropped at a full device queue since then (counted as overflows and errors).
    overflowed: u64,
}

impl Scheduler {
    /// A scheduler over `outboxes` (one per device, by global index).
    pub fn new(
        fleet: Arc<Fleet>,
        pace: Pace,
        settings: ScheduleSettings,
        outboxes: Vec<mpsc::Sender<Outgoing>>,
        commands: Arc<Vec<DeviceCommand>>,
        counters: Arc<Counters>,
    ) -> Self {
        let devices = (0..fleet.devices.len() as u32)
            .map(|index| {
                let upload = fleet.initial_upload(index);
                DeviceSchedule {
                    group_upload: upload,
                    storyboard_upload: None,
                    crashed: false,
                    window: upload.window.0,
                    window_end: upload.window.0,
                    pending: Vec::new(),
                    sequence: 0,
                    sampling: Sampling::default(),
                }
            })
            .collect();
        let transitions = fleet.transitions();
        let seed = fleet.scenario.seed;
        let mut uplinks: Vec<GatewayUplink> = fleet
            .scenario
            .gateways
            .iter()
            .map(|g| GatewayUplink {
                capacity: g.buffer_bytes,
                ..GatewayUplink::default()
            })
            .collect();
        for event in &fleet.scenario.events {
            if let (Action::Partition, Target::Gateway(gateway)) = (&event.action, &event.target)
                && let Some(uplink) = uplinks.get_mut(usize::from(*gateway))
            {
                uplink
                    .partitions
                    .push((event.at.0, event.until.map_or(u64::MAX, |u| u.0)));
            }
        }
        Self {
            fleet,
            pace,
            settings,
            outboxes,
            commands,
            counters,
            devices,
            uplinks,
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
            overflowed: 0,
        }
    }

    /// Runs until the end of the run, the end of the readings (cadence), or `stop`. Returns
    /// when nothing more will be handed over; the outboxes are dropped then.
    pub async fn run(mut self, mut steps: mpsc::Receiver<StepReadings>, stop: CancellationToken) {
        let mut readings_done = false;
        loop {
            let now = Instant::now();
            self.dispatch_due(now);
            let release = self.next_backlog_release(now);
            let backlog_waits = release.is_some_and(|at| at < self.settings.end);
            if now >= self.settings.end
                || (readings_done && self.settings.rate.is_none() && self.queue.is_empty() && !backlog_waits)
            {
                break;
            }
            let mut wake = self.settings.end;
            if let Some(front) = self.queue.front() {
                wake = wake.min(front.due.max(self.next_cap_slot));
            }
            if self.settings.rate.is_some() {
                wake = wake.min(self.next_arrival.max(self.next_cap_slot));
            }
            if let Some(release) = release {
                wake = wake.min(release);
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
        let remaining = self.uplinks.iter().map(|u| u.backlog.len() as u64).sum();
        Counters::add(&self.counters.partition_remaining, remaining);
    }

    /// When a held backlog can next go: at once when its partition has healed (a full
    /// connection queue is retried a millisecond later), else when it heals.
    fn next_backlog_release(&self, now: Instant) -> Option<Instant> {
        let sim_now = self.pace.sim_at(now);
        self.uplinks
            .iter()
            .filter(|u| !u.backlog.is_empty())
            .map(|u| match u.heals_at(sim_now) {
                None => now + Duration::from_millis(1),
                Some(u64::MAX) => self.settings.end,
                Some(heal) => self.pace.instant_of(heal),
            })
            .min()
    }

    /// Hands each healed gateway's backlog to the connections, oldest first, until a
    /// connection's queue is full (the rest waits for the next pass).
    fn release_backlogs(&mut self, now: Instant) {
        let sim_now = self.pace.sim_at(now);
        for uplink in &mut self.uplinks {
            if uplink.backlog.is_empty() || uplink.heals_at(sim_now).is_some() {
                continue;
            }
            while let Some((message, bytes)) = uplink.backlog.pop_front() {
                match self.outboxes[message.device as usize].try_send(message) {
                    Ok(()) => {
                        uplink.held_bytes -= bytes;
                        Counters::add(&self.counters.partition_delivered, u64::from(bytes > 0));
                    }
                    Err(TrySendError::Full(message)) => {
                        uplink.backlog.push_front((message, bytes));
                        break;
                    }
                    Err(TrySendError::Closed(_)) => {
                        uplink.held_bytes -= bytes;
                        Counters::add(&self.counters.errors, 1);
                    }
                }
            }
        }
    }

    /// A message's size at the edge, as twin-core counts it: a summary's, or one raw message
    /// per reading.
    fn edge_bytes(&self, device: u32, summary: bool, readings: &[Reading]) -> u64 {
        let info = &self.fleet.devices[device as usize];
        let sensors = &self.fleet.scenario.sensors[info.sensors.clone()];
        let overhead = self.effective_upload(device as usize).overhead_bytes;
        if summary {
            u64::from(overhead) + sensors.iter().map(|s| u64::from(s.summary_entry_bytes())).sum::<u64>()
        } else {
            readings
                .iter()
                .map(|r| u64::from(sensors[usize::from(r.sensor)].raw_message_bytes(overhead)))
                .sum::<u64>()
                .max(u64::from(overhead))
        }
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
            let period = self.commands.get(index).map_or(0, DeviceCommand::sampling_period_nanos);
            self.devices[index].sampling.apply(period, &mut readings);
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
                        summary: false,
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
                            summary: false,
                        });
                    }
                    continue;
                }
                let window = upload.window.0.max(1);
                // A new window (a command or the storyboard changed it) starts its boundaries
                // afresh, on multiples of itself.
                if schedule.window != window || schedule.window_end <= step.start {
                    schedule.window = window;
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
                        summary: true,
                    });
                }
            }
        }
        due.retain(|d| d.sim < self.settings.sim_end);
        due.sort_by_key(|d| (d.sim, d.device));
        self.queue.extend(due);
    }

    fn dispatch_due(&mut self, now: Instant) {
        self.release_backlogs(now);
        self.hand_over_due(now);
        if self.handed_messages > 0 {
            Counters::add(&self.counters.sent, std::mem::take(&mut self.handed_messages));
            Counters::add(&self.counters.samples_sent, std::mem::take(&mut self.handed_readings));
        }
        if self.overflowed > 0 {
            Counters::add(&self.counters.overflows, self.overflowed);
            Counters::add(&self.counters.errors, std::mem::take(&mut self.overflowed));
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
            self.hand_over(due.device, due.sim, slot, due.readings, due.summary);
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
            self.hand_over(device as u32, sim, slot, readings, false);
        }
    }

    fn take_cap_slot(&mut self, slot: Instant) {
        if let Some(interval) = self.cap_interval {
            self.next_cap_slot = slot + interval;
        }
    }

    fn hand_over(&mut self, device: u32, sim: u64, intended: Instant, readings: Vec<Reading>, summary: bool) {
        // Where the message goes if the device's gateway holds it: its buffer (with the
        // message's edge size) while partitioned, behind the backlog while that drains.
        let gateway = self.fleet.scenario.groups[self.fleet.devices[device as usize].group].gateway;
        let held = gateway.map(usize::from).and_then(|gateway| {
            let uplink = &self.uplinks[gateway];
            if uplink.heals_at(sim).is_some() {
                // At least one byte, so a buffered message is told from one queued behind.
                Some((gateway, self.edge_bytes(device, summary, &readings).max(1)))
            } else {
                (!uplink.backlog.is_empty()).then_some((gateway, 0))
            }
        });
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
        if let Some((gateway, bytes)) = held {
            let uplink = &mut self.uplinks[gateway];
            if bytes > 0 {
                if uplink.held_bytes + bytes > uplink.capacity {
                    // The edge buffer is full: the message is lost at the gateway.
                    Counters::add(&self.counters.partition_lost, 1);
                    return;
                }
                uplink.held_bytes += bytes;
                Counters::add(&self.counters.partition_buffered, 1);
            }
            uplink.backlog.push_back((message, bytes));
            return;
        }
        match self.outboxes[device as usize].try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.overflowed += 1,
            Err(TrySendError::Closed(_)) => Counters::add(&self.counters.errors, 1),
        }
    }

    /// The fleet scheduled.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }
}

#[cfg(test)]
mod tests {
    use super::Sampling;
    use crate::message::Reading;

    fn readings(sensor: u16, rate_hz: u64, seconds: u64) -> Vec<Reading> {
        (0..rate_hz * seconds)
            .map(|k| Reading {
                sensor,
                dims: 1,
                timestamp_nanos: (k * 1_000_000_000 / rate_hz) as i64,
                values: [k as f64, 0.0, 0.0],
            })
            .collect()
    }

    #[test]
    fn sampling_thins_each_sensor_to_the_commanded_rate() {
        let mut sampling = Sampling::default();
        // 1 kHz and 10 Hz sensors, sampled at 300 Hz (the 10 Hz one is below it: untouched).
        let mut step = readings(0, 1000, 2);
        step.extend(readings(1, 10, 2));
        sampling.apply(1_000_000_000 / 300, &mut step);
        let fast: Vec<i64> = step
            .iter()
            .filter(|r| r.sensor == 0)
            .map(|r| r.timestamp_nanos)
            .collect();
        assert_eq!(fast.len(), 600, "300 Hz for 2 s");
        // The first reading at or after each 3.33 ms instant: 3 or 4 ms apart.
        assert!(
            fast.windows(2)
                .all(|w| (3_000_000..=4_000_000).contains(&(w[1] - w[0])))
        );
        assert_eq!(step.iter().filter(|r| r.sensor == 1).count(), 20);
        // The next step continues the same instants; no command keeps everything again.
        let mut next: Vec<Reading> = readings(0, 1000, 3).split_off(2000);
        sampling.apply(1_000_000_000 / 300, &mut next);
        assert_eq!(next.len(), 300);
        let mut all = readings(0, 1000, 1);
        sampling.apply(0, &mut all);
        assert_eq!(all.len(), 1000);
    }
}
