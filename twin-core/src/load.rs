//! The `[load]` section of a scenario: what `device-sim` does by default when it puts the
//! scenario's fleet on a real backend, and the pass/fail criteria on its load report.
//!
//! The core only holds the validated settings and the names of the load metrics; measuring
//! them (sockets, wall clock) is `device-sim`'s business.

use crate::criteria::Criterion;
use crate::time::SimDuration;

/// How messages are spaced when a run has an overall rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arrivals {
    /// Evenly spaced, `1 / rate` apart.
    #[default]
    Constant,
    /// A Poisson process: exponentially distributed gaps with mean `1 / rate`.
    Poisson,
}

impl Arrivals {
    /// The name in scenarios and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Poisson => "poisson",
        }
    }
}

/// A validated `[load]` section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSpec {
    /// Wall-clock length of a run (the run also ends with the scenario).
    pub duration: Option<SimDuration>,
    /// Messages per second over the whole fleet; `None`: the scenario's own cadence.
    pub rate: Option<f64>,
    /// Cap on messages per second.
    pub max_rate: Option<f64>,
    /// Arrival process of `rate`.
    pub arrivals: Arrivals,
    /// Connections opened per second (the connection ramp); `None`: all at once.
    pub connect_rate: Option<f64>,
    /// Criteria on the load report's metrics ([`LOAD_METRICS`]).
    pub criteria: Vec<Criterion>,
}

/// Every metric of a load report, with its meaning. Load criteria may name only these.
/// Latencies are in milliseconds; a percentile of no samples is `null` and fails every
/// comparison.
pub const LOAD_METRICS: &[(&str, &str)] = &[
    ("sent", "messages handed to the transport"),
    ("received", "distinct messages the checker received"),
    ("lost", "messages sent and never received (sent - received)"),
    ("loss", "lost / sent (0 when nothing was sent)"),
    ("duplicates", "messages received again"),
    (
        "reordered",
        "messages received after a later message of the same device",
    ),
    ("unsent", "messages due but not sent when the run ended (a backlog)"),
    ("errors", "publish failures, refused messages and generator overflows"),
    ("samples_sent", "sensor readings carried by the messages sent"),
    ("msgs_per_s", "messages sent per wall second"),
    ("e2e_p50_ms", "end-to-end latency from the intended send time, median"),
    ("e2e_p90_ms", "end-to-end latency, 90th percentile"),
    ("e2e_p99_ms", "end-to-end latency, 99th percentile"),
    ("e2e_p999_ms", "end-to-end latency, 99.9th percentile"),
    ("e2e_max_ms", "end-to-end latency, maximum"),
    ("e2e_mean_ms", "end-to-end latency, mean"),
    ("acks", "publish acknowledgements received (MQTT QoS 1, JetStream)"),
    (
        "ack_p50_ms",
        "publish-acknowledgement latency from the intended send time, median",
    ),
    ("ack_p99_ms", "publish-acknowledgement latency, 99th percentile"),
    ("ack_max_ms", "publish-acknowledgement latency, maximum"),
    ("connects", "connections established (including reconnects)"),
    ("connect_failures", "connection attempts that failed"),
    ("reconnects", "connections re-established after a loss"),
    ("connect_p50_ms", "connect latency, median"),
    ("connect_p99_ms", "connect latency, 99th percentile"),
    ("connect_max_ms", "connect latency, maximum"),
    (
        "connect_rate_per_s",
        "first connections per second over the connection ramp",
    ),
    ("converged", "desired changes applied and acknowledged by devices"),
    (
        "convergence_p50_ms",
        "desired change to the device's acknowledgement, median",
    ),
    (
        "convergence_p99_ms",
        "desired change to acknowledgement, 99th percentile",
    ),
    ("convergence_max_ms", "desired change to acknowledgement, maximum"),
    ("inferences", "model outputs the devices computed and sent"),
    (
        "partition_buffered",
        "messages held in a partitioned gateway's edge buffer",
    ),
    (
        "partition_lost",
        "messages lost at a partitioned gateway whose edge buffer was full",
    ),
    (
        "partition_delivered",
        "buffered messages sent when their gateway's partition healed",
    ),
    (
        "partition_remaining",
        "messages still held by a gateway when the run ended",
    ),
    ("cpu_seconds", "the generator's own CPU time (user + system)"),
    ("msgs_per_core_s", "messages sent per CPU second of the generator"),
];
