//! Counters the systems add to during a run; the report is built from them at the end.

use std::collections::BTreeMap;

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
}
