//! The run report: what the simulation determined, and nothing that depends on the machine, so
//! the same scenario and seed give byte-identical JSON. Wall-clock figures live elsewhere (the
//! binary's `timing.json`).
//!
//! Every number in the report is also a metric that criteria can name: its dotted path, e.g.
//! `edge.summary.bytes` or `groups.pumps.sensors.temperature.mean`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::components::EdgeBuffer;
use crate::criteria::Verdict;
use crate::hardware::{self, PROFILES};
use crate::inference::ModelCost;
use crate::metrics::{ComparisonMetrics, GatewayMetrics, GroupMetrics, LatencyHistogram, Metrics, Volume};
use crate::scenario::{Action, Placement, Scenario, Target};
use crate::stats::RunStats;
use crate::systems::rollout::RolloutRun;
use crate::time::SimDuration;

/// Report format version.
pub const REPORT_SCHEMA: u32 = 1;

/// Every state a rollout can end in, as criteria name them.
pub const ROLLOUT_STATES: [&str; 4] = ["completed", "rolled_back", "aborted", "in_progress"];

/// Which version each device runs at the end of the run, counted per model version.
#[derive(Clone, Debug, Default)]
pub struct Deployments {
    /// Devices per model version.
    pub devices: Vec<u64>,
    /// Devices per model version whose hardware cannot hold the model.
    pub over_memory: Vec<u64>,
    /// Devices per placement.
    pub placements: [u64; 3],
}

impl Deployments {
    /// No devices yet.
    pub fn new(scenario: &Scenario) -> Self {
        Self {
            devices: vec![0; scenario.models.len()],
            over_memory: vec![0; scenario.models.len()],
            placements: [0; 3],
        }
    }

    /// The deployments the scenario starts with.
    pub fn initial(scenario: &Scenario) -> Self {
        let mut deployments = Self::new(scenario);
        for (gi, group) in scenario.groups.iter().enumerate() {
            if let Some(binding) = group.model {
                for ordinal in 0..group.count {
                    let model = group.initial_model(ordinal).unwrap_or(binding.model);
                    deployments.count(scenario, gi, model, binding.placement);
                }
            }
        }
        deployments
    }

    /// Counts one device of `group` running `model` at `placement`.
    pub fn count(&mut self, scenario: &Scenario, group: usize, model: usize, placement: Placement) {
        let Some(spec) = scenario.models.get(model) else { return };
        self.devices[model] += 1;
        self.placements[placement as usize] += 1;
        let profile = placement_profile(scenario, group, placement);
        if !profile.project(&spec.compiled.cost(), 1).fits_memory {
            self.over_memory[model] += 1;
        }
    }
}

/// The hardware that runs a group's model at a placement.
fn placement_profile(scenario: &Scenario, group: usize, placement: Placement) -> &'static hardware::Profile {
    let group = &scenario.groups[group];
    let index = match placement {
        Placement::Edge => group.hardware,
        Placement::Gateway => group
            .gateway
            .and_then(|g| scenario.gateways.get(usize::from(g)))
            .map_or(group.hardware, |g| g.hardware),
        Placement::Cloud => PROFILES.iter().position(|p| p.name == hardware::CLOUD).unwrap_or(0),
    };
    &PROFILES[index]
}

/// What the engine hands the report besides its counters.
pub struct RunOutcome<'a> {
    /// Per (sensor spec, channel) totals.
    pub sensor_totals: &'a [Vec<RunStats>],
    /// Gateway buffers at the end.
    pub buffers: &'a [EdgeBuffer],
    /// Model versions per device at the end.
    pub deployments: &'a Deployments,
    /// Rollouts started.
    pub rollouts: &'a [RolloutRun],
}

/// Projected latency, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct LatencyReport {
    /// Median.
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
}

impl From<&LatencyHistogram> for LatencyReport {
    fn from(h: &LatencyHistogram) -> Self {
        let q = h.quantiles_ms();
        Self {
            p50_ms: q.map(|q| q.0),
            p90_ms: q.map(|q| q.1),
        }
    }
}

/// A model version on one device class: the projection behind the latency figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HardwareReport {
    /// One call on one row, median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// Whether the model fits the device's memory.
    pub fits_memory: bool,
    /// Where the factor comes from.
    pub source: String,
}

/// A challenger beside a group's champion.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ShadowReport {
    /// The acting version.
    pub champion: String,
    /// The version run beside it.
    pub challenger: String,
    /// Devices that ran both.
    pub devices: u64,
    /// Rows both scored.
    pub rows: u64,
    /// Share of rows with the same decision.
    pub agreement: Option<f64>,
    /// Mean absolute score difference.
    pub mean_abs_score_diff: Option<f64>,
    /// Largest absolute score difference.
    pub max_abs_score_diff: f64,
    /// Champion's alarms per row on these rows.
    pub champion_alarm_rate: Option<f64>,
    /// Challenger's alarms per row on the same rows.
    pub challenger_alarm_rate: Option<f64>,
    /// Challenger's projected latency on the group's hardware.
    pub challenger_latency: HardwareReport,
}

/// One rollout's metrics since it started.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RolloutMetrics {
    /// Updated devices that ran the new version.
    pub devices_observed: u64,
    /// Rows the new version scored on updated devices.
    pub inferences: u64,
    /// Alarms per row of the new version.
    pub alarm_rate: Option<f64>,
    /// Share of rows where the new version decided as the previous one.
    pub agreement: Option<f64>,
    /// Updated devices whose projected p90 missed the window deadline.
    pub deadline_misses: u64,
}

/// One timeline entry.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TimelineReport {
    /// Simulated seconds.
    pub at_s: f64,
    /// Stage.
    pub stage: String,
    /// What happened.
    pub action: String,
    /// Devices on the new version afterwards.
    pub devices: u64,
    /// Why.
    pub detail: String,
}

/// One rollout as it ran.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RolloutReport {
    /// Name.
    pub name: String,
    /// `name@version` rolled out.
    pub model: String,
    /// `completed`, `rolled_back`, `aborted` or `in_progress`.
    pub state: String,
    /// Start, simulated seconds.
    pub started_at_s: f64,
    /// Devices targeted.
    pub devices_targeted: u64,
    /// Devices on the new version at the end.
    pub devices_updated: u64,
    /// Stages passed.
    pub stages_passed: u64,
    /// Stages in all.
    pub stages: u64,
    /// Why it stopped, when aborted.
    pub reason: Option<String>,
    /// Gate metrics.
    pub metrics: RolloutMetrics,
    /// What happened, in order.
    pub timeline: Vec<TimelineReport>,
}

/// One placement over every model.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PlacementReport {
    /// Devices whose model runs here (at the end).
    pub devices: u64,
    /// Rows scored.
    pub inferences: u64,
    /// Alarms.
    pub alarms: u64,
    /// Alarms per inference.
    pub alarm_rate: Option<f64>,
    /// Correct decisions over decisions with a known ground truth.
    pub accuracy: Option<f64>,
    /// Bytes moved for inference (inputs to the model, decisions to the cloud).
    pub bytes_moved: u64,
    /// Bytes per inference.
    pub bytes_per_inference: Option<f64>,
    /// End-to-end latency from window close to decision.
    pub latency: LatencyReport,
    /// Inferences over their window deadline.
    pub deadline_misses: u64,
    /// Rows that waited for a partition to heal.
    pub delayed_rows: u64,
}

/// Messages and bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct VolumeReport {
    /// Messages.
    pub messages: u64,
    /// Bytes.
    pub bytes: u64,
}

impl From<Volume> for VolumeReport {
    fn from(v: Volume) -> Self {
        Self {
            messages: v.messages,
            bytes: v.bytes,
        }
    }
}

/// Traffic leaving the edge by upload mode.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct EdgeReport {
    /// Raw-mode messages.
    pub raw: VolumeReport,
    /// Summary-mode messages.
    pub summary: VolumeReport,
    /// Both modes.
    pub total: VolumeReport,
    /// What reached the cloud (directly or from a backlog).
    pub delivered: VolumeReport,
}

/// Partition effects.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PartitionReport {
    /// Admitted into gateway buffers.
    pub buffered: VolumeReport,
    /// Delivered from buffers when partitions healed.
    pub backlog_delivered: VolumeReport,
    /// Still buffered at the end of the run.
    pub backlog_remaining: VolumeReport,
    /// Lost to full buffers.
    pub lost: VolumeReport,
    /// Largest backlog of any gateway.
    pub peak_backlog_bytes: u64,
}

/// Age of the newest data the cloud holds per device.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct StalenessReport {
    /// Time-weighted mean over devices, in seconds.
    pub mean_s: f64,
    /// Largest seen, in seconds.
    pub max_s: f64,
}

/// Statistics of one channel over the whole group.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ChannelReport {
    /// Mean (null without samples).
    pub mean: Option<f64>,
    /// Population standard deviation.
    pub std_dev: Option<f64>,
    /// Smallest reading.
    pub min: Option<f64>,
    /// Largest reading.
    pub max: Option<f64>,
}

impl ChannelReport {
    fn from_stats(stats: &RunStats) -> Self {
        if stats.count == 0 {
            return Self::default();
        }
        Self {
            mean: Some(stats.mean),
            std_dev: Some(stats.std_dev()),
            min: Some(stats.min),
            max: Some(stats.max),
        }
    }
}

/// One sensor of a group, over all its devices.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SensorReport {
    /// Unit label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Readings taken.
    pub samples: u64,
    /// Statistics of a scalar sensor.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub scalar: Option<ChannelReport>,
    /// Statistics per axis of a vector sensor.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub axes: BTreeMap<String, ChannelReport>,
}

/// One device group.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GroupReport {
    /// Devices.
    pub devices: u64,
    /// Readings taken.
    pub samples: u64,
    /// Traffic leaving the edge.
    pub edge: EdgeReport,
    /// Partition effects on this group's traffic.
    pub partition: GroupPartitionReport,
    /// Cloud-side staleness.
    pub staleness: StalenessReport,
    /// Fault activations on the group's devices.
    pub fault_activations: u64,
    /// Device-seconds spent crashed.
    pub offline_device_seconds: f64,
    /// Per sensor.
    pub sensors: BTreeMap<String, SensorReport>,
}

/// Partition effects on one group.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GroupPartitionReport {
    /// Admitted into a gateway buffer.
    pub buffered: VolumeReport,
    /// Lost to a full buffer.
    pub lost: VolumeReport,
}

/// One gateway.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GatewayReport {
    /// Devices behind it.
    pub devices: u64,
    /// Buffer capacity.
    pub buffer_bytes: u64,
    /// Partitions started.
    pub partitions: u64,
    /// Simulated seconds partitioned.
    pub partitioned_seconds: f64,
    /// Largest backlog.
    pub peak_backlog_bytes: u64,
    /// Admitted into the buffer.
    pub buffered: VolumeReport,
    /// Delivered on heal.
    pub backlog_delivered: VolumeReport,
    /// Still buffered at the end.
    pub backlog_remaining: VolumeReport,
    /// Lost.
    pub lost: VolumeReport,
}

/// One deployed model version over the run.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ModelReport {
    /// sha256 of the model file.
    pub sha256: String,
    /// Devices running it.
    pub devices: u64,
    /// Windows scored.
    pub inferences: u64,
    /// Scores at or above the threshold.
    pub alarms: u64,
    /// Alarms per inference.
    pub alarm_rate: Option<f64>,
    /// Mean score.
    pub mean_score: Option<f64>,
    /// Alarms on machines known to be faulty.
    pub true_positives: u64,
    /// Alarms on machines known to be healthy.
    pub false_positives: u64,
    /// No alarm on healthy machines.
    pub true_negatives: u64,
    /// No alarm on faulty machines.
    pub false_negatives: u64,
    /// Correct decisions over decisions with known ground truth.
    pub accuracy: Option<f64>,
    /// True positives over alarms with known ground truth.
    pub precision: Option<f64>,
    /// True positives over faulty windows.
    pub recall: Option<f64>,
    /// Rows a run failed on.
    pub errors: u64,
    /// Rows scored as a shadow, without acting.
    pub shadow_inferences: u64,
    /// Inferences by predicted class (classifiers).
    pub classes: BTreeMap<String, u64>,
    /// What one row costs (counted on the plan).
    pub cost: ModelCost,
    /// Memory the model needs, bytes.
    pub memory_bytes: u64,
    /// Observed projected latency of its inferences (placement, batching and waits included).
    pub latency: LatencyReport,
    /// Projection on every device class running it, by profile name.
    pub hardware: BTreeMap<String, HardwareReport>,
    /// Inferences whose projected p90 missed the window deadline.
    pub deadline_misses: u64,
    /// Devices with at least one miss.
    pub devices_missing_deadline: u64,
    /// Devices whose hardware cannot hold the model.
    pub devices_over_memory: u64,
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

impl ModelReport {
    fn new(sha256: &str, devices: u64, cost: ModelCost, m: &crate::metrics::ModelMetrics) -> Self {
        let labelled = m.true_positives + m.false_positives + m.true_negatives + m.false_negatives;
        Self {
            sha256: sha256.to_owned(),
            devices,
            inferences: m.inferences,
            alarms: m.alarms,
            alarm_rate: ratio(m.alarms, m.inferences),
            mean_score: (m.inferences > 0).then(|| m.score_sum / m.inferences as f64),
            true_positives: m.true_positives,
            false_positives: m.false_positives,
            true_negatives: m.true_negatives,
            false_negatives: m.false_negatives,
            accuracy: if m.class_labelled > 0 {
                ratio(m.class_correct, m.class_labelled)
            } else {
                ratio(m.true_positives + m.true_negatives, labelled)
            },
            precision: ratio(m.true_positives, m.true_positives + m.false_positives),
            recall: ratio(m.true_positives, m.true_positives + m.false_negatives),
            errors: m.errors,
            shadow_inferences: m.shadow_inferences,
            classes: m.classes.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            cost,
            memory_bytes: cost.memory_bytes(),
            latency: (&m.latency).into(),
            hardware: BTreeMap::new(),
            deadline_misses: m.deadline_misses,
            devices_missing_deadline: m.devices_missing_deadline.len() as u64,
            devices_over_memory: 0,
        }
    }
}

fn hardware_report(profile: &hardware::Profile, cost: &ModelCost) -> HardwareReport {
    let projection = profile.project(cost, 1);
    HardwareReport {
        p50_ms: projection.p50_ms,
        p90_ms: projection.p90_ms,
        fits_memory: projection.fits_memory,
        source: profile.factor(cost.family).source.to_owned(),
    }
}

fn rollout_report(run: &RolloutRun, scenario: &Scenario, c: &ComparisonMetrics) -> RolloutReport {
    let spec = &run.spec;
    let passed = run.timeline.iter().filter(|t| t.action == "passed").count() as u64;
    RolloutReport {
        name: spec.name.clone(),
        model: scenario.models.get(spec.model).map(|m| m.label()).unwrap_or_default(),
        state: run.state.name().to_owned(),
        started_at_s: SimDuration(run.started_at).as_secs_f64(),
        devices_targeted: spec.order.len() as u64,
        devices_updated: run.updated(),
        stages_passed: passed,
        stages: spec.stages.len() as u64,
        reason: run.reason.clone(),
        metrics: RolloutMetrics {
            devices_observed: c.devices.len() as u64,
            inferences: c.primary_rows,
            alarm_rate: c.alarm_rate(),
            agreement: c.agreement(),
            deadline_misses: c.deadline_miss_devices.len() as u64,
        },
        timeline: run
            .timeline
            .iter()
            .map(|t| TimelineReport {
                at_s: SimDuration(t.at).as_secs_f64(),
                stage: t.stage.clone(),
                action: t.action.to_owned(),
                devices: t.devices,
                detail: t.detail.clone(),
            })
            .collect(),
    }
}

/// One storyboard event as it ran.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EventReport {
    /// Storyboard index.
    pub index: u32,
    /// Start, simulated seconds.
    pub at_s: f64,
    /// End, if any.
    pub until_s: Option<f64>,
    /// Action kind.
    pub action: String,
    /// Devices (or gateways) targeted.
    pub targets: u64,
    /// Sensors, devices or gateways affected (null if it never started).
    pub affected: Option<u64>,
}

/// Run totals.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunReport {
    /// Simulated seconds.
    pub simulated_seconds: f64,
    /// Devices.
    pub devices: u64,
    /// Sensors.
    pub sensors: u64,
    /// Gateways.
    pub gateways: u64,
    /// Readings taken.
    pub samples: u64,
}

/// The report of one run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Format version.
    pub schema: u32,
    /// Scenario name.
    pub scenario: String,
    /// Master seed.
    pub seed: u64,
    /// The date the run represents, as the scenario wrote it.
    pub clock_start: Option<String>,
    /// Totals.
    pub run: RunReport,
    /// Traffic leaving the edge.
    pub edge: EdgeReport,
    /// Partition effects.
    pub partition: PartitionReport,
    /// Cloud-side staleness over all devices.
    pub staleness: StalenessReport,
    /// Fault activations by kind (sensors for sensor faults, devices or gateways otherwise).
    pub faults: BTreeMap<String, u64>,
    /// Per group.
    pub groups: BTreeMap<String, GroupReport>,
    /// Per gateway.
    pub gateways: BTreeMap<String, GatewayReport>,
    /// Per deployed model version (`name@version`).
    pub models: BTreeMap<String, ModelReport>,
    /// Per group with a shadow.
    pub shadows: BTreeMap<String, ShadowReport>,
    /// Per placement in use (`edge`, `gateway`, `cloud`).
    pub placements: BTreeMap<String, PlacementReport>,
    /// Rollouts, in start order.
    pub rollouts: Vec<RolloutReport>,
    /// Storyboard events.
    pub events: Vec<EventReport>,
    /// Criteria verdicts.
    pub criteria: Vec<Verdict>,
    /// All criteria passed.
    pub passed: bool,
}

/// Fault kinds that always appear under `faults` (so criteria can name them before they fire).
const FAULT_KINDS: [&str; 10] = [
    "drift",
    "stuck",
    "spikes",
    "dropout",
    "saturation",
    "noise",
    "crash",
    "clock_skew",
    "partition",
    "upload",
];

impl Report {
    /// Builds the report from the run's counters and per-sensor totals, then evaluates criteria.
    pub fn build(scenario: &Scenario, simulated: SimDuration, metrics: &Metrics, run: &RunOutcome<'_>) -> Self {
        let (sensor_totals, buffers) = (run.sensor_totals, run.buffers);
        let seconds = simulated.as_secs_f64();
        let mut groups = BTreeMap::new();
        let mut edge = EdgeReport::default();
        let mut partition = PartitionReport::default();
        let mut staleness_integral = 0.0;
        let mut staleness_max: f64 = 0.0;
        let mut samples = 0;
        for (gi, group) in scenario.groups.iter().enumerate() {
            let m = metrics.groups.get(gi).cloned().unwrap_or_default();
            let group_edge = edge_report(&m);
            add_edge(&mut edge, &group_edge);
            samples += m.samples;
            staleness_integral += m.staleness_integral;
            staleness_max = staleness_max.max(m.staleness_max);
            let device_seconds = f64::from(group.count) * seconds;
            let mut sensors = BTreeMap::new();
            for spec_index in group.sensors.clone() {
                let spec = &scenario.sensors[spec_index];
                let totals = sensor_totals
                    .get(spec_index)
                    .cloned()
                    .unwrap_or_else(|| vec![RunStats::default(); spec.dims]);
                let count = totals.first().map_or(0, |t| t.count);
                let mut report = SensorReport {
                    unit: spec.unit.clone(),
                    samples: count,
                    ..Default::default()
                };
                if spec.dims == 1 {
                    report.scalar = Some(ChannelReport::from_stats(&totals[0]));
                } else {
                    for (name, stats) in spec.channel_names().iter().zip(&totals) {
                        report.axes.insert((*name).to_owned(), ChannelReport::from_stats(stats));
                    }
                }
                sensors.insert(spec.name.clone(), report);
            }
            groups.insert(
                group.name.clone(),
                GroupReport {
                    devices: u64::from(group.count),
                    samples: m.samples,
                    edge: group_edge,
                    partition: GroupPartitionReport {
                        buffered: m.buffered.into(),
                        lost: m.lost.into(),
                    },
                    staleness: StalenessReport {
                        mean_s: if device_seconds > 0.0 {
                            m.staleness_integral / device_seconds
                        } else {
                            0.0
                        },
                        max_s: m.staleness_max,
                    },
                    fault_activations: m.fault_activations,
                    offline_device_seconds: m.offline_device_seconds,
                    sensors,
                },
            );
        }
        let mut gateways = BTreeMap::new();
        for (g, spec) in scenario.gateways.iter().enumerate() {
            let m = metrics.gateways.get(g).cloned().unwrap_or_default();
            let buffer = buffers.get(g).copied().unwrap_or_default();
            let remaining = VolumeReport {
                messages: buffer.backlog_messages,
                bytes: buffer.backlog_bytes,
            };
            partition.buffered = add_volume(partition.buffered, m.buffered.into());
            partition.backlog_delivered = add_volume(partition.backlog_delivered, m.backlog_delivered.into());
            partition.backlog_remaining = add_volume(partition.backlog_remaining, remaining);
            partition.lost = add_volume(partition.lost, m.lost.into());
            partition.peak_backlog_bytes = partition.peak_backlog_bytes.max(m.peak_backlog_bytes);
            edge.delivered = add_volume(edge.delivered, m.backlog_delivered.into());
            let devices = scenario
                .groups
                .iter()
                .filter(|group| group.gateway == Some(g as u16))
                .map(|group| u64::from(group.count))
                .sum();
            gateways.insert(
                spec.name.clone(),
                gateway_report(&m, devices, spec.buffer_bytes, remaining),
            );
        }
        let mut models = BTreeMap::new();
        for (index, model) in scenario.models.iter().enumerate() {
            let devices = run.deployments.devices.get(index).copied().unwrap_or(0);
            let counters = metrics.models.get(index).cloned().unwrap_or_default();
            let cost = model.compiled.cost();
            let mut report = ModelReport::new(&model.sha256, devices, cost, &counters);
            report.devices_over_memory = run.deployments.over_memory.get(index).copied().unwrap_or(0);
            for (gi, group) in scenario.groups.iter().enumerate() {
                let Some(binding) = group.model else { continue };
                let runs_it = group.starts_with_model(index)
                    || binding.shadow.is_some_and(|s| s.model == index)
                    || scenario.events.iter().any(
                        |e| matches!(&e.action, Action::Rollout(r) if r.model == index && r.model_name == model.name),
                    ) && scenario.models[binding.model].name == model.name;
                if runs_it {
                    let profile = placement_profile(scenario, gi, binding.placement);
                    report
                        .hardware
                        .entry(profile.name.to_owned())
                        .or_insert_with(|| hardware_report(profile, &cost));
                }
            }
            models.insert(model.label(), report);
        }
        let mut shadows = BTreeMap::new();
        for (gi, group) in scenario.groups.iter().enumerate() {
            let Some(binding) = group.model else { continue };
            let Some(shadow) = binding.shadow else { continue };
            let c = metrics.comparisons.get(shadow.comparison).cloned().unwrap_or_default();
            let profile = placement_profile(scenario, gi, binding.placement);
            shadows.insert(
                group.name.clone(),
                ShadowReport {
                    champion: scenario.models[binding.model].label(),
                    challenger: scenario.models[shadow.model].label(),
                    devices: c.devices.len() as u64,
                    rows: c.rows,
                    agreement: c.agreement(),
                    mean_abs_score_diff: (c.rows > 0).then(|| c.abs_diff_sum / c.rows as f64),
                    max_abs_score_diff: c.abs_diff_max,
                    champion_alarm_rate: ratio(c.primary_alarms, c.primary_rows),
                    challenger_alarm_rate: ratio(c.shadow_alarms, c.rows),
                    challenger_latency: hardware_report(profile, &scenario.models[shadow.model].compiled.cost()),
                },
            );
        }
        let mut placements = BTreeMap::new();
        for placement in Placement::ALL {
            let used = scenario
                .groups
                .iter()
                .any(|g| g.model.is_some_and(|b| b.placement == placement));
            if !used {
                continue;
            }
            let p = &metrics.placements[placement as usize];
            placements.insert(
                placement.name().to_owned(),
                PlacementReport {
                    devices: run.deployments.placements[placement as usize],
                    inferences: p.inferences,
                    alarms: p.alarms,
                    alarm_rate: ratio(p.alarms, p.inferences),
                    accuracy: ratio(p.correct, p.labelled),
                    bytes_moved: p.bytes_moved,
                    bytes_per_inference: (p.inferences > 0).then(|| p.bytes_moved as f64 / p.inferences as f64),
                    latency: (&p.latency).into(),
                    deadline_misses: p.deadline_misses,
                    delayed_rows: p.delayed_rows,
                },
            );
        }
        let rollouts = run
            .rollouts
            .iter()
            .map(|r| {
                let c = metrics.comparisons.get(r.spec.comparison).cloned().unwrap_or_default();
                rollout_report(r, scenario, &c)
            })
            .collect();
        let total_device_seconds = f64::from(scenario.device_count()) * seconds;
        let mut faults: BTreeMap<String, u64> = FAULT_KINDS.iter().map(|k| ((*k).to_owned(), 0)).collect();
        for (kind, count) in &metrics.fault_activations {
            *faults.entry((*kind).to_owned()).or_default() += count;
        }
        let events = scenario
            .events
            .iter()
            .map(|event| EventReport {
                index: event.index,
                at_s: event.at.as_secs_f64(),
                until_s: event.until.map(SimDuration::as_secs_f64),
                action: event.action.kind().to_owned(),
                targets: match &event.target {
                    Target::Devices(d) => d.len() as u64,
                    Target::Gateway(_) => 1,
                },
                affected: metrics
                    .events
                    .iter()
                    .find(|log| log.index == event.index)
                    .map(|log| log.affected),
            })
            .collect();
        let mut report = Report {
            schema: REPORT_SCHEMA,
            scenario: scenario.name.clone(),
            seed: scenario.seed,
            clock_start: scenario.clock.start.clone(),
            run: RunReport {
                simulated_seconds: seconds,
                devices: u64::from(scenario.device_count()),
                sensors: scenario.sensor_count(),
                gateways: scenario.gateways.len() as u64,
                samples,
            },
            edge,
            partition,
            staleness: StalenessReport {
                mean_s: if total_device_seconds > 0.0 {
                    staleness_integral / total_device_seconds
                } else {
                    0.0
                },
                max_s: staleness_max,
            },
            faults,
            groups,
            gateways,
            models,
            shadows,
            placements,
            rollouts,
            events,
            criteria: Vec::new(),
            passed: true,
        };
        let values = report.metrics();
        let texts = report.texts();
        report.criteria = scenario.criteria.iter().map(|c| c.evaluate(&values, &texts)).collect();
        report.passed = report.criteria.iter().all(|v| v.passed);
        report
    }

    /// Every number of the report by dotted path (`events` and `criteria` excluded).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let value = serde_json::to_value(self).unwrap_or_default();
        if let serde_json::Value::Object(map) = value {
            for (key, value) in map {
                if key == "events" || key == "criteria" {
                    continue;
                }
                if key == "rollouts" {
                    for rollout in value.as_array().into_iter().flatten() {
                        let name = rollout["name"].as_str().unwrap_or_default();
                        flatten(&format!("rollouts.{name}"), rollout, &mut out);
                    }
                    continue;
                }
                flatten(&key, &value, &mut out);
            }
        }
        out
    }

    /// Every text metric criteria can compare with `equals`: each rollout's state
    /// (`rollouts.NAME.state`).
    pub fn texts(&self) -> BTreeMap<String, String> {
        self.rollouts
            .iter()
            .map(|r| (format!("rollouts.{}.state", r.name), r.state.clone()))
            .collect()
    }

    /// The report as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match value {
        serde_json::Value::Number(n) => {
            out.insert(prefix.to_owned(), n.as_f64().unwrap_or(f64::NAN));
        }
        serde_json::Value::Null => {
            out.insert(prefix.to_owned(), f64::NAN);
        }
        serde_json::Value::Bool(b) => {
            out.insert(prefix.to_owned(), if *b { 1.0 } else { 0.0 });
        }
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                flatten(&format!("{prefix}.{key}"), value, out);
            }
        }
        serde_json::Value::String(_) | serde_json::Value::Array(_) => {}
    }
}

/// The metric names a scenario's report will have (for validating criteria before a run):
/// numbers, then texts.
pub fn metric_names(scenario: &Scenario) -> (std::collections::BTreeSet<String>, std::collections::BTreeSet<String>) {
    let totals: Vec<Vec<RunStats>> = scenario
        .sensors
        .iter()
        .map(|s| vec![RunStats::default(); s.dims])
        .collect();
    let metrics = Metrics {
        groups: vec![GroupMetrics::default(); scenario.groups.len()],
        gateways: vec![GatewayMetrics::default(); scenario.gateways.len()],
        models: vec![Default::default(); scenario.models.len()],
        comparisons: vec![Default::default(); scenario.comparisons.len()],
        ..Default::default()
    };
    let buffers = vec![EdgeBuffer::default(); scenario.gateways.len()];
    let mut skeleton_scenario = scenario.clone();
    skeleton_scenario.criteria.clear();
    let rollouts: Vec<RolloutRun> = scenario
        .events
        .iter()
        .filter_map(|e| match &e.action {
            Action::Rollout(spec) => Some(RolloutRun::pending(spec.clone(), e.at.0)),
            _ => None,
        })
        .collect();
    let deployments = Deployments::initial(scenario);
    let run = RunOutcome {
        sensor_totals: &totals,
        buffers: &buffers,
        deployments: &deployments,
        rollouts: &rollouts,
    };
    let report = Report::build(&skeleton_scenario, scenario.clock.duration, &metrics, &run);
    // Statistics without readings are null in the skeleton; null values keep their names.
    (
        report.metrics().into_keys().collect(),
        report.texts().into_keys().collect(),
    )
}

fn edge_report(m: &GroupMetrics) -> EdgeReport {
    let total = Volume {
        messages: m.raw.messages + m.summary.messages,
        bytes: m.raw.bytes + m.summary.bytes,
    };
    EdgeReport {
        raw: m.raw.into(),
        summary: m.summary.into(),
        total: total.into(),
        delivered: m.delivered.into(),
    }
}

fn add_volume(a: VolumeReport, b: VolumeReport) -> VolumeReport {
    VolumeReport {
        messages: a.messages + b.messages,
        bytes: a.bytes + b.bytes,
    }
}

fn add_edge(total: &mut EdgeReport, group: &EdgeReport) {
    total.raw = add_volume(total.raw, group.raw);
    total.summary = add_volume(total.summary, group.summary);
    total.total = add_volume(total.total, group.total);
    total.delivered = add_volume(total.delivered, group.delivered);
}

fn gateway_report(m: &GatewayMetrics, devices: u64, buffer_bytes: u64, remaining: VolumeReport) -> GatewayReport {
    GatewayReport {
        devices,
        buffer_bytes,
        partitions: m.partitions,
        partitioned_seconds: m.partitioned_seconds,
        peak_backlog_bytes: m.peak_backlog_bytes,
        buffered: m.buffered.into(),
        backlog_delivered: m.backlog_delivered.into(),
        backlog_remaining: remaining,
        lost: m.lost.into(),
    }
}
