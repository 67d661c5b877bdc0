//! The human summary `twin run` prints on stdout.

use std::fmt::Write;

use twin_core::Report;

use crate::run::RunOutcome;

fn si(value: f64) -> String {
    let (scaled, unit) = match value.abs() {
        v if v >= 1e9 => (value / 1e9, "G"),
        v if v >= 1e6 => (value / 1e6, "M"),
        v if v >= 1e3 => (value / 1e3, "k"),
        _ => (value, ""),
    };
    if unit.is_empty() && scaled.fract() == 0.0 {
        format!("{scaled}")
    } else {
        format!("{scaled:.2}{unit}")
    }
}

fn bytes(value: u64) -> String {
    format!("{}B", si(value as f64))
}

/// Formats the summary of a run.
pub fn render(outcome: &RunOutcome) -> String {
    let report = &outcome.report;
    let timing = &outcome.timing;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {} (seed {}): {} s simulated in {:.3} s wall, {}x real time",
        report.scenario,
        report.seed,
        report.run.simulated_seconds,
        timing.wall_seconds,
        si(timing.speedup)
    );
    let _ = writeln!(
        out,
        "  fleet: {} devices, {} sensors, {} gateways; {} samples ({} samples/s on {} threads)",
        report.run.devices,
        report.run.sensors,
        report.run.gateways,
        si(report.run.samples as f64),
        si(timing.samples_per_second),
        timing.threads
    );
    let edge = &report.edge;
    let _ = writeln!(
        out,
        "  edge: raw {} msgs / {}, summary {} msgs / {}; delivered {} msgs",
        si(edge.raw.messages as f64),
        bytes(edge.raw.bytes),
        si(edge.summary.messages as f64),
        bytes(edge.summary.bytes),
        si(edge.delivered.messages as f64)
    );
    let p = &report.partition;
    if p.buffered.messages + p.lost.messages > 0 {
        let _ = writeln!(
            out,
            "  partitions: buffered {} msgs, delivered on heal {}, still buffered {}, lost {} msgs / {}, peak backlog {}",
            si(p.buffered.messages as f64),
            si(p.backlog_delivered.messages as f64),
            si(p.backlog_remaining.messages as f64),
            si(p.lost.messages as f64),
            bytes(p.lost.bytes),
            bytes(p.peak_backlog_bytes)
        );
    }
    let _ = writeln!(
        out,
        "  cloud staleness: mean {:.2} s, max {:.2} s",
        report.staleness.mean_s, report.staleness.max_s
    );
    let faults: Vec<String> = report
        .faults
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !faults.is_empty() {
        let _ = writeln!(out, "  events applied: {}", faults.join(", "));
    }
    render_criteria(&mut out, report);
    let _ = writeln!(out, "report: {}", outcome.report_path.display());
    if let Some(path) = &outcome.recording_path {
        let _ = writeln!(out, "recording: {}", path.display());
    }
    out
}

fn render_criteria(out: &mut String, report: &Report) {
    if report.criteria.is_empty() {
        let _ = writeln!(out, "criteria: none");
        return;
    }
    let failed = report.criteria.iter().filter(|c| !c.passed).count();
    let _ = writeln!(
        out,
        "criteria: {} passed, {failed} failed",
        report.criteria.len() - failed
    );
    for verdict in &report.criteria {
        let measured = match (&verdict.measured_text, verdict.measured) {
            (Some(text), _) => format!("\"{text}\""),
            (None, Some(v)) => format!("{v}"),
            (None, None) => "undefined".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {} {}: {} = {measured} (expected {})",
            if verdict.passed { "PASS" } else { "FAIL" },
            verdict.name,
            verdict.expression,
            verdict.expect
        );
    }
}
