//! `twin run`: builds the world, steps it (paced when the scenario asks), writes the report,
//! the timing and (with `--record`) the recording.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use twin_core::time::ClockMode;
use twin_core::{Report, RunOptions, Scenario, Simulation};

use crate::recording::write_sample;
use crate::timing::{Timing, peak_rss_bytes};

/// What `twin run` was asked to do.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Output folder.
    pub out_dir: PathBuf,
    /// Write `recording.jsonl`.
    pub record: bool,
    /// Pacing override (`None`: the scenario's).
    pub pace: Option<ClockMode>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Worker threads used (for `timing.json`).
    pub threads: usize,
}

/// What a run produced.
pub struct RunOutcome {
    /// The report.
    pub report: Report,
    /// Wall-clock figures.
    pub timing: Timing,
    /// Where the report was written.
    pub report_path: PathBuf,
    /// Where the recording was written.
    pub recording_path: Option<PathBuf>,
}

/// The text of `report.json`: what `twin run` writes and `Simulation.GetReport` returns, byte
/// for byte the same for the same scenario and seed.
pub fn report_json(report: &Report) -> String {
    report.to_json()
}

/// The default output folder of a scenario: `out/<scenario name>/`.
pub fn default_out_dir(scenario: &Scenario) -> PathBuf {
    Path::new("out").join(&scenario.name)
}

/// Runs a validated scenario to its end and writes its outputs.
///
/// # Errors
/// Output files that cannot be written.
pub fn run_scenario(scenario: Scenario, request: &RunRequest) -> Result<RunOutcome> {
    std::fs::create_dir_all(&request.out_dir)
        .with_context(|| format!("cannot create the output folder {}", request.out_dir.display()))?;
    let recording_path = request.record.then(|| request.out_dir.join("recording.jsonl"));
    let mut recording = match &recording_path {
        Some(path) => Some(BufWriter::with_capacity(
            1 << 20,
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => None,
    };
    let pace = request.pace.unwrap_or(scenario.clock.mode).pace();
    let build_started = Instant::now();
    let scenario = Arc::new(scenario);
    let mut simulation = Simulation::new(scenario.clone(), RunOptions { record: request.record });
    let build_seconds = build_started.elapsed().as_secs_f64();

    let end = scenario.clock.duration.0;
    let bar = (request.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(end / 1_000_000);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {percent}% simulated, eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(scenario.name.clone());
        bar
    });
    let started = Instant::now();
    let mut write_error = None;
    while simulation.step() {
        if let Some(out) = recording.as_mut() {
            simulation.drain_recording(&mut |sample| {
                if write_error.is_none()
                    && let Err(err) = write_sample(out, &sample)
                {
                    write_error = Some(err);
                }
            });
        }
        if let Some(err) = write_error.take() {
            return Err(err).context("cannot write the recording");
        }
        if let Some(factor) = pace {
            let due = Duration::from_secs_f64(simulation.now().as_secs_f64() / factor);
            let elapsed = started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        if let Some(bar) = &bar {
            bar.set_position(simulation.now().0 / 1_000_000);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = simulation.finish();
    let wall_seconds = started.elapsed().as_secs_f64();
    if let Some(mut out) = recording {
        out.flush().context("cannot write the recording")?;
    }
    let peak = peak_rss_bytes();
    let simulated_seconds = report.run.simulated_seconds;
    let timing = Timing {
        wall_seconds,
        build_seconds,
        simulated_seconds,
        speedup: if wall_seconds > 0.0 {
            simulated_seconds / wall_seconds
        } else {
            f64::INFINITY
        },
        samples_per_second: if wall_seconds > 0.0 {
            report.run.samples as f64 / wall_seconds
        } else {
            0.0
        },
        threads: request.threads,
        peak_rss_bytes: peak,
        peak_rss_bytes_per_device: peak.map(|p| p as f64 / report.run.devices.max(1) as f64),
        models: scenario
            .models
            .iter()
            .filter_map(|m| Some((m.label(), crate::timing::measure_model(&m.compiled, 21)?)))
            .collect(),
    };
    let report_path = request.out_dir.join("report.json");
    std::fs::write(&report_path, report_json(&report))
        .with_context(|| format!("cannot write {}", report_path.display()))?;
    let timing_path = request.out_dir.join("timing.json");
    let mut timing_json = serde_json::to_string_pretty(&timing).unwrap_or_default();
    timing_json.push('\n');
    std::fs::write(&timing_path, timing_json).with_context(|| format!("cannot write {}", timing_path.display()))?;
    Ok(RunOutcome {
        report,
        timing,
        report_path,
        recording_path,
    })
}
