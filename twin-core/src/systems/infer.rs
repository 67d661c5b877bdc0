//! `run_inference`: every device running a model scores each window it completed.
//!
//! Rows are gathered in device index order and every model version runs once per step on all
//! of its rows (batched tract calls of at most the largest of [`crate::inference::BLOCK_ROWS`]
//! rows, whatever the fleet size, each on a plan optimized for its row count; the gathering
//! buffers are kept from step to step). A device with a shadow also sends its rows to the
//! shadow's batch; the shadow's decisions are compared with the acting version's, never acted
//! on. Each row's score is compared with the device's threshold (or its class read); where the
//! ground truth is known (a faulty group, or a fault active on the model's sensor) the outcome
//! counts towards accuracy.
//!
//! Latency is projected, not timed: the placement decides which hardware runs the call (the
//! device, its gateway, or the cloud, where one call serves every row of the step) and what
//! must travel first (the window's raw readings to the gateway; the upload to the cloud).
//! Rows placed in the cloud wait while the device's gateway is partitioned, and their latency
//! includes the wait.

use bevy_ecs::resource::Resource;
use bevy_ecs::world::World;

use crate::components::{
    DeployedModel, DeviceState, EdgeBuffer, NONE, PendingRows, ScenarioSpec, SensorFaults, Topology,
};
use crate::hardware::{self, PROFILES, Projection};
use crate::inference::{Output, OutputValues};
use crate::metrics::Metrics;
use crate::scenario::{Placement, Scenario, UploadMode};
use crate::time::{SimClock, secs};

/// Round trip to a gateway on the site network, in ms (assumption: wired or Wi-Fi LAN).
pub const LAN_RTT_MS: f64 = 1.0;
/// Site network throughput, in Mbit/s (assumption).
pub const LAN_MBIT_S: f64 = 100.0;
/// Round trip from the site to the cloud region, in ms (assumption: a cellular or DSL uplink).
pub const WAN_RTT_MS: f64 = 40.0;
/// Uplink throughput to the cloud, in Mbit/s (assumption).
pub const WAN_MBIT_S: f64 = 10.0;
/// Bytes of one decision sent to the cloud (header plus device, time, score, decision).
pub const DECISION_BYTES: u64 = 48;

fn transfer_ms(rtt_ms: f64, mbit_s: f64, bytes: u64) -> f64 {
    rtt_ms / 2.0 + bytes as f64 * 8.0 / (mbit_s * 1e3)
}

/// Each model version's rows of the step, gathered; kept between steps so that a fleet's
/// worth of rows (tens of megabytes) is not allocated and faulted in again at every step.
#[derive(Resource, Default)]
struct Batches(Vec<Vec<f32>>);

/// The rows one device handed to one model version this step.
struct Owner {
    device: u32,
    group: usize,
    model: usize,
    /// First row in the model's batch.
    offset: usize,
    rows: usize,
    threshold: f32,
    truth: Option<bool>,
    placement: Placement,
    /// Window length: the deadline of each inference, in ms.
    deadline_ms: f64,
    /// Bytes one row needs moved (inputs to where the model runs, decision to the cloud).
    bytes_per_row: u64,
    /// How long each row waited for a partition to heal, in ms.
    waits_ms: Vec<f64>,
    /// True class of each row (camera frames), else empty.
    labels: Vec<i64>,
    /// `(model, first row in its batch)` of the shadow.
    shadow: Option<(usize, usize)>,
    comparison: Option<usize>,
}

/// What a version decided on each row of its batch.
struct Decisions {
    /// Score (alarm models) or top class probability (classifiers).
    scores: Vec<f32>,
    /// Predicted classes (classifiers).
    classes: Option<Vec<i64>>,
}

impl Decisions {
    /// Reads a run's outputs: a classifier has a per-row int64 class output (and a
    /// probability matrix); otherwise the first per-row output is the score.
    fn read(outputs: Vec<Output>, rows: usize) -> Option<Self> {
        let classes = outputs.iter().find_map(|o| match &o.values {
            OutputValues::I64(values) if o.width == 1 && values.len() == rows => Some(values.clone()),
            _ => None,
        });
        let scores = if classes.is_some() {
            let probabilities = outputs.iter().find_map(|o| match &o.values {
                OutputValues::F32(values) if o.width > 1 && values.len() == rows * o.width => Some(
                    values
                        .chunks(o.width)
                        .map(|row| row.iter().copied().fold(0.0, f32::max))
                        .collect(),
                ),
                _ => None,
            });
            probabilities.unwrap_or_else(|| vec![1.0; rows])
        } else {
            outputs.into_iter().find(|o| o.width == 1).map(|o| match o.values {
                OutputValues::F32(values) => values,
                OutputValues::I64(values) => values.into_iter().map(|v| v as f32).collect(),
            })?
        };
        // A model whose per-row output does not have one value per row (it reduces over the
        // batch, say) scores nothing.
        (scores.len() == rows).then_some(Self { scores, classes })
    }

    /// `(score, decision, alarm)` of a row: the decision is the class, or the alarm as 0/1.
    fn row(&self, row: usize, threshold: f32) -> (f32, i64, bool) {
        let score = self.scores[row];
        match &self.classes {
            Some(classes) => (score, classes[row], false),
            None => {
                let alarm = score >= threshold;
                (score, i64::from(alarm), alarm)
            }
        }
    }
}

/// Runs every deployed model version (and shadow) on the rows its devices completed.
pub fn run_inference(world: &mut World) {
    let scenario = world.resource::<ScenarioSpec>().0.clone();
    if scenario.models.is_empty() {
        return;
    }
    let now = world.resource::<SimClock>().now;
    let Some(topology) = world.remove_resource::<Topology>() else {
        return;
    };
    let partitioned: Vec<bool> = topology
        .gateways
        .iter()
        .map(|&g| world.get::<EdgeBuffer>(g).is_some_and(|b| b.partitioned))
        .collect();
    let mut kept = world.remove_resource::<Batches>().unwrap_or_default();
    let batches = &mut kept.0;
    batches.resize_with(scenario.models.len(), Vec::new);
    batches.iter_mut().for_each(Vec::clear);
    let mut owners: Vec<Owner> = Vec::new();
    for (gi, group) in scenario.groups.iter().enumerate().filter(|(_, g)| g.model.is_some()) {
        for device in group.first_device..group.first_device + group.count {
            let entity = topology.devices[device as usize];
            let Some(deployed) = world.get::<DeployedModel>(entity).copied() else {
                continue;
            };
            if deployed.placement == Placement::Cloud && group.gateway.is_some_and(|g| partitioned[usize::from(g)]) {
                continue;
            }
            let fault_on_sensor = world
                .get::<SensorFaults>(entity)
                .is_some_and(|f| f.0.get(usize::from(deployed.slot)).is_some_and(|list| !list.is_empty()));
            let Some(uplink) = world.get::<DeviceState>(entity).map(|s| s.uplink) else {
                continue;
            };
            let Some(mut pending) = world.get_mut::<PendingRows>(entity) else {
                continue;
            };
            if pending.closed_at.is_empty() {
                continue;
            }
            let model = usize::from(deployed.model);
            let width = scenario.models[model].compiled.width();
            let rows = pending.closed_at.len();
            let waits_ms = pending
                .closed_at
                .iter()
                .map(|&at| if at < now { secs(now - at) * 1e3 } else { 0.0 })
                .collect();
            pending.closed_at.clear();
            let labels = std::mem::take(&mut pending.labels);
            let offset = batches[model].len() / width;
            let shadow = (deployed.shadow != NONE).then(|| {
                let shadow = usize::from(deployed.shadow);
                let at = batches[shadow].len() / width;
                batches[shadow].extend_from_slice(&pending.values);
                (shadow, at)
            });
            batches[model].append(&mut pending.values);
            let sensor = &scenario.sensors[group.sensors.start + usize::from(deployed.slot)];
            // A frame is due before the next frame; window features before the next window.
            let (deadline_s, readings) = match sensor.camera() {
                Some(_) => (1.0 / sensor.rate_hz, 1),
                None => {
                    let window_s = uplink.window.as_secs_f64();
                    (window_s, (sensor.rate_hz * window_s).round() as u64)
                }
            };
            let raw_window_bytes = readings * u64::from(sensor.raw_message_bytes(uplink.overhead_bytes));
            let bytes_per_row = match deployed.placement {
                Placement::Edge => DECISION_BYTES,
                Placement::Gateway => raw_window_bytes + DECISION_BYTES,
                Placement::Cloud => match uplink.mode {
                    UploadMode::Raw => raw_window_bytes,
                    UploadMode::Summary => u64::from(uplink.overhead_bytes + sensor.summary_entry_bytes()),
                },
            };
            owners.push(Owner {
                device,
                group: gi,
                model,
                offset,
                rows,
                threshold: deployed.threshold,
                truth: if fault_on_sensor { Some(true) } else { group.faulty },
                placement: deployed.placement,
                deadline_ms: deadline_s * 1e3,
                bytes_per_row,
                waits_ms,
                labels,
                shadow,
                comparison: (deployed.comparison != NONE).then_some(usize::from(deployed.comparison)),
            });
        }
    }
    world.insert_resource(topology);
    let decisions: Vec<Option<Decisions>> = batches
        .iter()
        .zip(&scenario.models)
        .map(|(batch, model)| {
            if batch.is_empty() {
                return None;
            }
            let rows = batch.len() / model.compiled.width();
            model.compiled.run(batch).ok().and_then(|o| Decisions::read(o, rows))
        })
        .collect();
    world.insert_resource(kept);
    let calls = CallSizes::count(&scenario, &owners);
    let mut metrics = world.resource_mut::<Metrics>();
    for owner in &owners {
        let Some(primary) = &decisions[owner.model] else {
            metrics.models[owner.model].errors += owner.rows as u64;
            continue;
        };
        let (projection, transfer_ms) = calls.project(&scenario, owner);
        let metrics = &mut *metrics;
        let mut alarms = 0;
        let mut missed = false;
        // Rows that did not wait share one latency: recorded once, with their count.
        let waited = owner.waits_ms.iter().any(|w| *w > 0.0);
        if !waited {
            let p50 = projection.p50_ms + transfer_ms;
            let p90 = projection.p90_ms + transfer_ms;
            metrics.models[owner.model].latency.record(p50, p90, owner.rows as u64);
            metrics.placements[owner.placement as usize]
                .latency
                .record(p50, p90, owner.rows as u64);
        }
        for (row, wait_ms) in owner.waits_ms.iter().enumerate() {
            let (score, class, alarm) = primary.row(owner.offset + row, owner.threshold);
            let p50 = projection.p50_ms + transfer_ms + wait_ms;
            let p90 = projection.p90_ms + transfer_ms + wait_ms;
            let miss = p90 > owner.deadline_ms;
            missed |= miss;
            alarms += u64::from(alarm);
            let counters = &mut metrics.models[owner.model];
            counters.inferences += 1;
            counters.alarms += u64::from(alarm);
            counters.score_sum += f64::from(score);
            if waited {
                counters.latency.record(p50, p90, 1);
            }
            counters.deadline_misses += u64::from(miss);
            let label = owner.labels.get(row).copied();
            if primary.classes.is_some() {
                *counters.classes.entry(class).or_default() += 1;
                if let Some(label) = label {
                    counters.class_labelled += 1;
                    counters.class_correct += u64::from(class == label);
                }
            }
            match (owner.truth, alarm) {
                (Some(true), true) => counters.true_positives += 1,
                (Some(true), false) => counters.false_negatives += 1,
                (Some(false), true) => counters.false_positives += 1,
                (Some(false), false) => counters.true_negatives += 1,
                (None, _) => {}
            }
            let placement = &mut metrics.placements[owner.placement as usize];
            if waited {
                placement.latency.record(p50, p90, 1);
            }
            placement.deadline_misses += u64::from(miss);
            placement.delayed_rows += u64::from(*wait_ms > 0.0);
            match (label, owner.truth) {
                (Some(label), _) => {
                    placement.labelled += 1;
                    placement.correct += u64::from(class == label);
                }
                (None, Some(truth)) => {
                    placement.labelled += 1;
                    placement.correct += u64::from(truth == alarm);
                }
                (None, None) => {}
            }
        }
        if missed {
            metrics.models[owner.model]
                .devices_missing_deadline
                .insert(owner.device);
        }
        let placement = &mut metrics.placements[owner.placement as usize];
        placement.inferences += owner.rows as u64;
        placement.alarms += alarms;
        placement.bytes_moved += owner.bytes_per_row * owner.rows as u64;
        if let Some(comparison) = owner.comparison {
            let c = &mut metrics.comparisons[comparison];
            c.primary_rows += owner.rows as u64;
            c.primary_alarms += alarms;
            c.devices.insert(owner.device);
            if missed {
                c.deadline_miss_devices.insert(owner.device);
            }
        }
        let Some((shadow_model, shadow_offset)) = owner.shadow else {
            continue;
        };
        let Some(shadow) = &decisions[shadow_model] else {
            metrics.models[shadow_model].errors += owner.rows as u64;
            continue;
        };
        metrics.models[shadow_model].shadow_inferences += owner.rows as u64;
        let comparison = owner.comparison.or_else(|| {
            scenario.groups[owner.group]
                .model
                .and_then(|b| b.shadow)
                .map(|s| s.comparison)
        });
        let Some(comparison) = comparison else { continue };
        let c = &mut metrics.comparisons[comparison];
        for row in 0..owner.rows {
            let (score, decision, _) = primary.row(owner.offset + row, owner.threshold);
            let (shadow_score, shadow_decision, shadow_alarm) = shadow.row(shadow_offset + row, owner.threshold);
            let diff = f64::from((score - shadow_score).abs());
            c.rows += 1;
            c.agreements += u64::from(decision == shadow_decision);
            c.abs_diff_sum += diff;
            c.abs_diff_max = c.abs_diff_max.max(diff);
            c.shadow_alarms += u64::from(shadow_alarm);
        }
        if owner.comparison.is_none() {
            // A group shadow: the acting side's counts, for the report's alarm rates.
            c.primary_rows += owner.rows as u64;
            c.primary_alarms += alarms;
            c.devices.insert(owner.device);
        }
    }
}

/// Rows per call where one call serves many devices: per (model, gateway) for gateway
/// placement, per model in the cloud.
struct CallSizes {
    gateway: std::collections::HashMap<(usize, u16), u64>,
    cloud: Vec<u64>,
}

impl CallSizes {
    fn count(scenario: &Scenario, owners: &[Owner]) -> Self {
        let mut sizes = Self {
            gateway: std::collections::HashMap::new(),
            cloud: vec![0; scenario.models.len()],
        };
        for owner in owners {
            match owner.placement {
                Placement::Edge => {}
                Placement::Gateway => {
                    if let Some(g) = scenario.groups[owner.group].gateway {
                        *sizes.gateway.entry((owner.model, g)).or_default() += owner.rows as u64;
                    }
                }
                Placement::Cloud => sizes.cloud[owner.model] += owner.rows as u64,
            }
        }
        sizes
    }

    /// The projected call and the transfer time before it, for one owner's rows.
    fn project(&self, scenario: &Scenario, owner: &Owner) -> (Projection, f64) {
        let group = &scenario.groups[owner.group];
        let cost = scenario.models[owner.model].compiled.cost();
        let input_bytes = owner.bytes_per_row.saturating_sub(DECISION_BYTES);
        match owner.placement {
            Placement::Edge => (PROFILES[group.hardware].project(&cost, 1), 0.0),
            Placement::Gateway => {
                let gateway = group.gateway.unwrap_or(0);
                let hardware = scenario.gateways.get(usize::from(gateway)).map_or(0, |g| g.hardware);
                let rows = self.gateway.get(&(owner.model, gateway)).copied().unwrap_or(1);
                (
                    PROFILES[hardware].project(&cost, rows),
                    transfer_ms(LAN_RTT_MS, LAN_MBIT_S, input_bytes),
                )
            }
            Placement::Cloud => {
                let cloud = hardware::profile(hardware::CLOUD).unwrap_or(&PROFILES[0]);
                let lan = if group.gateway.is_some() {
                    transfer_ms(LAN_RTT_MS, LAN_MBIT_S, owner.bytes_per_row)
                } else {
                    0.0
                };
                (
                    cloud.project(&cost, self.cloud[owner.model]),
                    lan + transfer_ms(WAN_RTT_MS, WAN_MBIT_S, owner.bytes_per_row),
                )
            }
        }
    }
}
