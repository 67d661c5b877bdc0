//! The load report: what was asked, what was sent and received, latencies, the generator's own
//! cost, the flat metrics the `[load]` criteria read, and the verdicts. Written as JSON with
//! `--json FILE` and printed as a human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use twin_core::criteria::{Criterion, Verdict};

use crate::measure::LatencySummary;

/// What was asked of the run.
#[derive(Clone, Debug, Serialize)]
pub struct RunDescription {
    /// Scenario name.
    pub scenario: String,
    /// Target URL.
    pub target: String,
    /// Master seed.
    pub seed: u64,
    /// Virtual devices.
    pub devices: u32,
    /// Simulated seconds per wall second.
    pub clock_factor: f64,
    /// `cadence`, or `constant`/`poisson` with a rate.
    pub schedule: String,
    /// Overall rate asked for, messages per second.
    pub rate: Option<f64>,
    /// Cap, messages per second.
    pub max_rate: Option<f64>,
    /// MQTT QoS.
    pub qos: u8,
    /// Payload encoding.
    pub payload: String,
    /// Topic or subject template.
    pub topic: String,
    /// JetStream stream, if any.
    pub stream: Option<String>,
    /// What checked the receiving side.
    pub checker: String,
    /// Wall seconds the run was to last.
    pub planned_seconds: f64,
}

/// Message counts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MessageCounts {
    /// Messages the fleet sent (each took its device's next sequence number).
    pub sent: u64,
    /// Readings they carried.
    pub samples_sent: u64,
    /// Handed to the transport without error.
    pub published: u64,
    /// Distinct messages the checker received (`null` without a checker).
    pub received: Option<u64>,
    /// Sent and never received.
    pub lost: Option<u64>,
    /// lost / sent.
    pub loss: Option<f64>,
    /// Received again.
    pub duplicates: Option<u64>,
    /// Received after a later message of the same device.
    pub reordered: Option<u64>,
    /// Received messages that were not the fleet's.
    pub foreign: Option<u64>,
    /// Due but not sent when the run ended.
    pub unsent: u64,
    /// Delayed by `--max-rate`.
    pub capped: u64,
    /// Publish failures, refusals, overflows.
    pub errors: u64,
    /// Dropped because a device's queue was full (part of `errors`).
    pub overflows: u64,
    /// Publish acknowledgements.
    pub acks: u64,
    /// Inference outputs sent.
    pub inferences: u64,
    /// Desired changes applied and acknowledged.
    pub converged: u64,
    /// Held in a partitioned gateway's edge buffer.
    pub partition_buffered: u64,
    /// Lost at a partitioned gateway whose buffer was full (part of `lost`).
    pub partition_lost: u64,
    /// Buffered, then sent when the partition healed.
    pub partition_delivered: u64,
    /// Still held by a gateway when the run ended (part of `lost`).
    pub partition_remaining: u64,
}

/// Connection figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Connections {
    /// Established (including reconnects).
    pub connects: u64,
    /// Attempts that failed.
    pub failures: u64,
    /// Re-established after a loss.
    pub reconnects: u64,
    /// First connections per second over the ramp.
    pub rate_per_s: Option<f64>,
    /// Connect latency.
    pub latency: LatencySummary,
}

/// The generator's own cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cost {
    /// CPU seconds (user + system) of the whole process, checker included.
    pub cpu_seconds: Option<f64>,
    /// Messages sent per CPU second.
    pub msgs_per_core_s: Option<f64>,
}

/// A whole load report.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// What was asked.
    pub run: RunDescription,
    /// Wall seconds from the start of sending to the end of the drain.
    pub wall_seconds: f64,
    /// Wall seconds during which messages were sent.
    pub send_seconds: f64,
    /// Whether the run was interrupted (Ctrl-C).
    pub interrupted: bool,
    /// Messages sent per wall second of sending.
    pub msgs_per_s: f64,
    /// Counts.
    pub messages: MessageCounts,
    /// End-to-end latency from the intended send time.
    pub e2e: LatencySummary,
    /// Publish-acknowledgement latency (MQTT QoS 1: from the PUBLISH written to its PUBACK;
    /// JetStream: from the publish call to its acknowledgement).
    pub ack: LatencySummary,
    /// Connections.
    pub connections: Connections,
    /// Desired change (server time) to the device's acknowledgement.
    pub convergence: LatencySummary,
    /// Cost.
    pub cost: Cost,
    /// Every load metric by name (`null`: not measured).
    pub metrics: BTreeMap<String, Option<f64>>,
    /// Criteria verdicts.
    pub criteria: Vec<Verdict>,
    /// Whether every criterion passed.
    pub passed: bool,
}

fn put(metrics: &mut BTreeMap<String, Option<f64>>, name: &str, value: Option<f64>) {
    metrics.insert(name.to_owned(), value);
}

impl LoadReport {
    /// Fills `metrics` from the figures (every name of `twin_core::load::LOAD_METRICS`) and
    /// evaluates `criteria`.
    pub fn finish(&mut self, criteria: &[Criterion]) {
        let m = &self.messages;
        let mut metrics = BTreeMap::new();
        let count = |v: u64| Some(v as f64);
        put(&mut metrics, "sent", count(m.sent));
        put(&mut metrics, "received", m.received.map(|v| v as f64));
        put(&mut metrics, "lost", m.lost.map(|v| v as f64));
        put(&mut metrics, "loss", m.loss);
        put(&mut metrics, "duplicates", m.duplicates.map(|v| v as f64));
        put(&mut metrics, "reordered", m.reordered.map(|v| v as f64));
        put(&mut metrics, "unsent", count(m.unsent));
        put(&mut metrics, "errors", count(m.errors));
        put(&mut metrics, "samples_sent", count(m.samples_sent));
        put(&mut metrics, "msgs_per_s", Some(self.msgs_per_s));
        let e2e = &self.e2e;
        put(&mut metrics, "e2e_p50_ms", e2e.p50_ms);
        put(&mut metrics, "e2e_p90_ms", e2e.p90_ms);
        put(&mut metrics, "e2e_p99_ms", e2e.p99_ms);
        put(&mut metrics, "e2e_p999_ms", e2e.p999_ms);
        put(&mut metrics, "e2e_max_ms", e2e.max_ms);
        put(&mut metrics, "e2e_mean_ms", e2e.mean_ms);
        put(&mut metrics, "acks", count(m.acks));
        put(&mut metrics, "ack_p50_ms", self.ack.p50_ms);
        put(&mut metrics, "ack_p99_ms", self.ack.p99_ms);
        put(&mut metrics, "ack_max_ms", self.ack.max_ms);
        let c = &self.connections;
        put(&mut metrics, "connects", count(c.connects));
        put(&mut metrics, "connect_failures", count(c.failures));
        put(&mut metrics, "reconnects", count(c.reconnects));
        put(&mut metrics, "connect_p50_ms", c.latency.p50_ms);
        put(&mut metrics, "connect_p99_ms", c.latency.p99_ms);
        put(&mut metrics, "connect_max_ms", c.latency.max_ms);
        put(&mut metrics, "connect_rate_per_s", c.rate_per_s);
        put(&mut metrics, "converged", count(m.converged));
        put(&mut metrics, "convergence_p50_ms", self.convergence.p50_ms);
        put(&mut metrics, "convergence_p99_ms", self.convergence.p99_ms);
        put(&mut metrics, "convergence_max_ms", self.convergence.max_ms);
        put(&mut metrics, "inferences", count(m.inferences));
        put(&mut metrics, "partition_buffered", count(m.partition_buffered));
        put(&mut metrics, "partition_lost", count(m.partition_lost));
        put(&mut metrics, "partition_delivered", count(m.partition_delivered));
        put(&mut metrics, "partition_remaining", count(m.partition_remaining));
        put(&mut metrics, "cpu_seconds", self.cost.cpu_seconds);
        put(&mut metrics, "msgs_per_core_s", self.cost.msgs_per_core_s);
        let numbers: BTreeMap<String, f64> = metrics.iter().filter_map(|(k, v)| v.map(|v| (k.clone(), v))).collect();
        self.criteria = criteria
            .iter()
            .map(|c| c.evaluate(&numbers, &BTreeMap::new()))
            .collect();
        self.passed = self.criteria.iter().all(|v| v.passed);
        self.metrics = metrics;
    }

    /// The report as pretty JSON, with a final newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let r = &self.run;
        let m = &self.messages;
        let opt = |v: Option<u64>| v.map_or_else(|| "n/a".to_owned(), |v| v.to_string());
        let ms = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "{}: {} devices -> {} ({}, {}), {:.1} s{}",
            r.scenario,
            r.devices,
            r.target,
            r.schedule,
            r.checker,
            self.wall_seconds,
            if self.interrupted { ", interrupted" } else { "" }
        );
        let _ = writeln!(
            out,
            "  messages  sent {} ({:.0}/s, {} readings), received {}, lost {}, duplicates {}, reordered {}, unsent {}, errors {}",
            m.sent,
            self.msgs_per_s,
            m.samples_sent,
            opt(m.received),
            opt(m.lost),
            opt(m.duplicates),
            opt(m.reordered),
            m.unsent,
            m.errors
        );
        let line = |name: &str, l: &LatencySummary| {
            format!(
                "  {name:<11} p50 {} p90 {} p99 {} p99.9 {} max {} ms (n={})",
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.p99_ms),
                ms(l.p999_ms),
                ms(l.max_ms),
                l.count
            )
        };
        let _ = writeln!(out, "{}", line("e2e", &self.e2e));
        if self.ack.count > 0 {
            let _ = writeln!(out, "{}", line("ack", &self.ack));
        }
        let c = &self.connections;
        let _ = writeln!(
            out,
            "{}, {} connects, {} failures, {} reconnects, {} connections/s",
            line("connect", &c.latency).trim_end(),
            c.connects,
            c.failures,
            c.reconnects,
            c.rate_per_s.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"))
        );
        if self.convergence.count > 0 || m.converged > 0 {
            let _ = writeln!(
                out,
                "{} ({} acknowledged)",
                line("convergence", &self.convergence),
                m.converged
            );
        }
        if m.partition_buffered + m.partition_lost > 0 {
            let _ = writeln!(
                out,
                "  partition  {} buffered at gateways, {} lost (buffer full), {} delivered on heal, {} still held",
                m.partition_buffered, m.partition_lost, m.partition_delivered, m.partition_remaining
            );
        }
        if m.inferences > 0 {
            let _ = writeln!(out, "  inference  {} outputs sent", m.inferences);
        }
        let _ = writeln!(
            out,
            "  cost       {} CPU s, {} msgs per CPU second",
            self.cost
                .cpu_seconds
                .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
            self.cost
                .msgs_per_core_s
                .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"))
        );
        for verdict in &self.criteria {
            let measured = verdict.measured.map_or_else(|| "null".to_owned(), |v| format!("{v}"));
            let _ = writeln!(
                out,
                "  {} {}: {} {} (measured {measured})",
                if verdict.passed { "pass" } else { "FAIL" },
                verdict.name,
                verdict.expression,
                verdict.expect
            );
        }
        out
    }
}
