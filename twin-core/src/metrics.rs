//! Counters the systems add to during a run; the report is built from them at the end.

use std::collections::{BTreeMap, HashSet};

use bevy_ecs::resource::Resource;

/// Messages and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Volume {
    /// Messages.
    pub messages: u64,
    /// Bytes.
    pub bytes: u64,
}

impl Volume {
    /// Adds messages and bytes.
    pub fn add(&mut self, messages: u64, bytes: u64) {
        self.messages += messages;
        self.bytes += bytes;
    }
}

/// Counters of one device group.
#[derive(Clone, Debug, Default)]
pub struct GroupMetrics {
    /// Readings taken (after dropout, while online).
    pub samples: u64,
    /// Raw-mode traffic produced at the edge.
    pub raw: Volume,
    /// Summary-mode traffic produced at the edge.
    pub summary: Volume,
    /// Traffic that reached the cloud (directly or from a backlog).
    pub delivered: Volume,
    /// Traffic admitted into a partitioned gateway's buffer.
    pub buffered: Volume,
    /// Traffic lost to full buffers.
    pub lost: Volume,
    /// Integral of cloud-side staleness over time, in device-seconds x seconds.
    pub staleness_integral: f64,
    /// Largest staleness seen.
    pub staleness_max: f64,
    /// Sensors or devices a fault was applied to.
    pub fault_activations: u64,
    /// Device-seconds spent crashed.
    pub offline_device_seconds: f64,
    /// Devices crashed right now.
    pub offline_devices: u64,
}

/// Counters of one gateway.
#[derive(Clone, Debug, Default)]
pub struct GatewayMetrics {
    /// Partitions started.
    pub partitions: u64,
    /// Simulated seconds partitioned.
    pub partitioned_seconds: f64,
    /// Largest backlog.
    pub peak_backlog_bytes: u64,
    /// Traffic admitted into the buffer.
    pub buffered: Volume,
    /// Traffic delivered from the buffer on heal.
    pub backlog_delivered: Volume,
    /// Traffic lost to a full buffer.
    pub lost: Volume,
}

/// One storyboard event as it happened.
#[derive(Clone, Debug)]
pub struct EventLog {
    /// Storyboard index.
    pub index: u32,
    /// Sensors, devices or gateways affected.
    pub affected: u64,
}

/// Counters of one deployed model version.
#[derive(Clone, Debug, Default)]
pub struct ModelMetrics {
    /// Rows scored.
    pub inferences: u64,
    /// Rows at or above their device's threshold.
    pub alarms: u64,
    /// Sum of scores.
    pub score_sum: f64,
    /// Alarms on faulty machines.
    pub true_positives: u64,
    /// Alarms on healthy machines.
    pub false_positives: u64,
    /// No alarm on healthy machines.
    pub true_negatives: u64,
    /// No alarm on faulty machines.
    pub false_negatives: u64,
    /// Rows a run failed on.
    pub errors: u64,
    /// Rows scored as a shadow (beside another version, not acting).
    pub shadow_inferences: u64,
    /// Inferences by predicted class (classifiers).
    pub classes: BTreeMap<i64, u64>,
    /// Classifier rows whose predicted class equals the true one.
    pub class_correct: u64,
    /// Classifier rows with a known true class.
    pub class_labelled: u64,
    /// Projected latency of every acting inference.
    pub latency: LatencyHistogram,
    /// Acting inferences whose projected p90 latency exceeded the window deadline.
    pub deadline_misses: u64,
    /// Devices with at least one deadline miss.
    pub devices_missing_deadline: HashSet<u32>,
}

/// Projected latencies, counted by whole microsecond: p50 and p90 of each call, so the
/// report can give the fleet's median and 90th percentile exactly and deterministically.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    /// Count of inferences by projected median latency (us).
    pub p50: BTreeMap<u64, u64>,
    /// Count of inferences by projected 90th-percentile latency (us).
    pub p90: BTreeMap<u64, u64>,
}

impl LatencyHistogram {
    /// Records `count` inferences with the given projected latencies (ms).
    pub fn record(&mut self, p50_ms: f64, p90_ms: f64, count: u64) {
        *self.p50.entry((p50_ms * 1e3).round() as u64).or_default() += count;
        *self.p90.entry((p90_ms * 1e3).round() as u64).or_default() += count;
    }

    /// `(median of p50s, 90th percentile of p90s)` in milliseconds, `None` when empty.
    pub fn quantiles_ms(&self) -> Option<(f64, f64)> {
        Some((quantile(&self.p50, 0.5)?, quantile(&self.p90, 0.9)?))
    }
}

fn quantile(counts: &BTreeMap<u64, u64>, q: f64) -> Option<f64> {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (value, count) in counts {
        seen += count;
        if seen >= rank {
            return Some(*value as f64 / 1e3);
        }
    }
    counts.keys().next_back().map(|v| *v as f64 / 1e3)
}

/// Two versions side by side on the same rows (a shadow, or a rollout against each device's
/// previous version).
#[derive(Clone, Debug, Default)]
pub struct ComparisonMetrics {
    /// Rows both versions scored.
    pub rows: u64,
    /// Rows where both reached the same decision (alarm or class).
    pub agreements: u64,
    /// Sum of absolute score differences.
    pub abs_diff_sum: f64,
    /// Largest absolute score difference.
    pub abs_diff_max: f64,
    /// Alarms of the acting version on these rows.
    pub primary_alarms: u64,
    /// Alarms the shadow version would have raised.
    pub shadow_alarms: u64,
    /// Devices that contributed rows.
    pub devices: HashSet<u32>,
    /// Devices of the acting version whose projected p90 missed the deadline.
    pub deadline_miss_devices: HashSet<u32>,
    /// Rows the acting version scored (also without a shadow).
    pub primary_rows: u64,
}

impl ComparisonMetrics {
    /// Share of rows with the same decision.
    pub fn agreement(&self) -> Option<f64> {
        (self.rows > 0).then(|| self.agreements as f64 / self.rows as f64)
    }

    /// Alarms per row of the acting version.
    pub fn alarm_rate(&self) -> Option<f64> {
        (self.primary_rows > 0).then(|| self.primary_alarms as f64 / self.primary_rows as f64)
    }
}

/// Counters of one placement (edge, gateway, cloud) over every model.
#[derive(Clone, Debug, Default)]
pub struct PlacementMetrics {
    /// Devices whose model runs here.
    pub devices: u64,
    /// Rows scored.
    pub inferences: u64,
    /// Alarms raised.
    pub alarms: u64,
    /// Correct decisions where the ground truth is known.
    pub correct: u64,
    /// Decisions with a known ground truth.
    pub labelled: u64,
    /// Bytes that had to move for these inferences to happen.
    pub bytes_moved: u64,
    /// Projected end-to-end latency from window close to decision.
    pub latency: LatencyHistogram,
    /// Inferences over their deadline.
    pub deadline_misses: u64,
    /// Rows that waited for a partitioned gateway to heal.
    pub delayed_rows: u64,
}

/// All counters.
#[derive(Resource, Clone, Debug, Default)]
pub struct Metrics {
    /// By group index.
    pub groups: Vec<GroupMetrics>,
    /// By gateway index.
    pub gateways: Vec<GatewayMetrics>,
    /// Activations by fault kind.
    pub fault_activations: BTreeMap<&'static str, u64>,
    /// Storyboard events applied.
    pub events: Vec<EventLog>,
    /// By deployed model version (index into the scenario's models).
    pub models: Vec<ModelMetrics>,
    /// By comparison (index into the scenario's comparisons).
    pub comparisons: Vec<ComparisonMetrics>,
    /// By placement, in [`crate::scenario::Placement::ALL`] order.
    pub placements: [PlacementMetrics; 3],
}
