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
use crate::metrics::{GatewayMetrics, GroupMetrics, Metrics, Volume};
use crate::scenario::{Scenario, Target};
use crate::stats::RunStats;
use crate::time::SimDuration;

/// Report format version.
pub const REPORT_SCHEMA: u32 = 1;

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
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

impl ModelReport {
    fn new(sha256: &str, devices: u64, m: &crate::metrics::ModelMetrics) -> Self {
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
            accuracy: ratio(m.true_positives + m.true_negatives, labelled),
            precision: ratio(m.true_positives, m.true_positives + m.false_positives),
            recall: ratio(m.true_positives, m.true_positives + m.false_negatives),
            errors: m.errors,
        }
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
    pub fn build(
        scenario: &Scenario,
        simulated: SimDuration,
        metrics: &Metrics,
        sensor_totals: &[Vec<RunStats>],
        buffers: &[EdgeBuffer],
    ) -> Self {
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
            let devices = scenario
                .groups
                .iter()
                .filter(|g| g.model.is_some_and(|b| b.model == index))
                .map(|g| u64::from(g.count))
                .sum();
            let counters = metrics.models.get(index).cloned().unwrap_or_default();
            models.insert(model.label(), ModelReport::new(&model.sha256, devices, &counters));
        }
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
            events,
            criteria: Vec::new(),
            passed: true,
        };
        let values = report.metrics();
        report.criteria = scenario.criteria.iter().map(|c| c.evaluate(&values)).collect();
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
                flatten(&key, &value, &mut out);
            }
        }
        out
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

/// The metric names a scenario's report will have (for validating criteria before a run).
pub fn metric_names(scenario: &Scenario) -> std::collections::BTreeSet<String> {
    let totals: Vec<Vec<RunStats>> = scenario
        .sensors
        .iter()
        .map(|s| vec![RunStats::default(); s.dims])
        .collect();
    let metrics = Metrics {
        groups: vec![GroupMetrics::default(); scenario.groups.len()],
        gateways: vec![GatewayMetrics::default(); scenario.gateways.len()],
        models: vec![Default::default(); scenario.models.len()],
        ..Default::default()
    };
    let buffers = vec![EdgeBuffer::default(); scenario.gateways.len()];
    let mut skeleton_scenario = scenario.clone();
    skeleton_scenario.criteria.clear();
    let report = Report::build(&skeleton_scenario, scenario.clock.duration, &metrics, &totals, &buffers);
    // Statistics without readings are null in the skeleton; null values keep their names.
    report.metrics().into_keys().collect()
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
