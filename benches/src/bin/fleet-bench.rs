//! `fleet-bench`: the fleet throughput benchmark of BENCHMARKS.md, side by side in one run.
//!
//! Runs the workload of `benches/scenarios/fleet-bench.toml` (N devices x 2 sensors at 1 Hz,
//! 60 s summary windows, one simulated hour) with the release `twin` binary on 1 and 2 worker
//! threads, and the numpy baseline (`benches/numpy_fleet.py`) on the same fleet, interleaved,
//! `--repeat` times; then the engine alone at 10k and 1M devices for the scaling figures.
//! Prints medians and ratios (each ratio is the median of per-round ratios) and writes every
//! measurement to `target/fleet-bench.json`.
//!
//! ```text
//! cargo build --release -p twin-server -p twin-benches
//! target/release/fleet-bench --repeat 5
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};

/// Fleet throughput, side by side with the numpy baseline.
#[derive(Parser, Debug)]
struct Args {
    /// The `twin` binary to measure.
    #[arg(long, default_value = "target/release/twin")]
    twin: PathBuf,
    /// Python with numpy (see benches/requirements.txt).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Rounds of the side-by-side comparison.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Rounds of each scaling point.
    #[arg(long, default_value_t = 3)]
    scale_repeat: usize,
    /// Skip the 1M-device point.
    #[arg(long)]
    quick: bool,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Writes the workload scenario with `devices` devices into `dir`.
fn scenario_for(dir: &Path, devices: u64) -> Result<PathBuf> {
    let template = std::fs::read_to_string(workspace().join("benches/scenarios/fleet-bench.toml"))
        .context("reading the workload")?;
    if !template.contains("count = 100000") {
        bail!("benches/scenarios/fleet-bench.toml no longer has `count = 100000`");
    }
    let path = dir.join(format!("fleet-bench-{devices}.toml"));
    std::fs::write(&path, template.replace("count = 100000", &format!("count = {devices}")))?;
    Ok(path)
}

struct TwinRun {
    samples_per_second: f64,
    wall_seconds: f64,
    peak_rss_bytes: f64,
    report: Vec<u8>,
}

fn run_twin(args: &Args, scenario: &Path, threads: usize, out: &Path) -> Result<TwinRun> {
    let status = Command::new(&args.twin)
        .arg("run")
        .arg(scenario)
        .args(["--threads", &threads.to_string(), "--out"])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", args.twin.display()))?;
    if !status.success() {
        bail!("{} exited with {status}", args.twin.display());
    }
    let timing: Value = serde_json::from_str(&std::fs::read_to_string(out.join("timing.json"))?)?;
    Ok(TwinRun {
        samples_per_second: timing["samples_per_second"].as_f64().unwrap_or(0.0),
        wall_seconds: timing["wall_seconds"].as_f64().unwrap_or(0.0),
        peak_rss_bytes: timing["peak_rss_bytes"].as_f64().unwrap_or(0.0),
        report: std::fs::read(out.join("report.json"))?,
    })
}

fn run_numpy(args: &Args, devices: u64) -> Result<Value> {
    let output = Command::new(&args.python)
        .arg(workspace().join("benches/numpy_fleet.py"))
        .args(["--devices", &devices.to_string()])
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .with_context(|| format!("running {} benches/numpy_fleet.py", args.python))?;
    if !output.status.success() {
        bail!("numpy baseline failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let workload = scenario_for(&dir, 100_000)?;

    let mut rounds = Vec::new();
    let (mut numpy_rates, mut one_rates, mut two_rates, mut speedup_vs_numpy, mut scaling) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..args.repeat {
        let numpy = run_numpy(&args, 100_000)?;
        let one = run_twin(&args, &workload, 1, &dir.join("one"))?;
        let two = run_twin(&args, &workload, 2, &dir.join("two"))?;
        if one.report != two.report {
            bail!("round {round}: report.json differs between 1 and 2 threads");
        }
        let numpy_rate = numpy["samples_per_second"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "round {round}: numpy {:.1} M/s, twin 1 thread {:.1} M/s ({:.2} s), 2 threads {:.1} M/s ({:.2} s), reports identical",
            numpy_rate / 1e6,
            one.samples_per_second / 1e6,
            one.wall_seconds,
            two.samples_per_second / 1e6,
            two.wall_seconds
        );
        numpy_rates.push(numpy_rate);
        one_rates.push(one.samples_per_second);
        two_rates.push(two.samples_per_second);
        speedup_vs_numpy.push(one.samples_per_second / numpy_rate);
        scaling.push(two.samples_per_second / one.samples_per_second);
        rounds.push(json!({ "numpy": numpy, "twin_1_thread_wall_s": one.wall_seconds, "twin_2_threads_wall_s": two.wall_seconds,
            "twin_1_thread_samples_per_s": one.samples_per_second, "twin_2_threads_samples_per_s": two.samples_per_second }));
    }

    let mut sizes = vec![10_000u64, 100_000];
    if !args.quick {
        sizes.push(1_000_000);
    }
    let mut size_results = Vec::new();
    for &devices in &sizes {
        let scenario = scenario_for(&dir, devices)?;
        let (mut rates, mut rss) = (vec![], vec![]);
        for _ in 0..args.scale_repeat {
            let run = run_twin(&args, &scenario, 1, &dir.join(format!("size-{devices}")))?;
            rates.push(run.samples_per_second);
            rss.push(run.peak_rss_bytes);
        }
        let rate = median(&mut rates);
        let peak = median(&mut rss);
        eprintln!(
            "{devices} devices, 1 thread: {:.1} M samples/s ({:.2} ns/sample), peak RSS {:.0} MiB",
            rate / 1e6,
            1e9 / rate,
            peak / 1048576.0
        );
        size_results.push(
            json!({ "devices": devices, "samples_per_second_1_thread": rate, "ns_per_sample": 1e9 / rate,
            "peak_rss_bytes": peak, "peak_rss_bytes_per_device": peak / devices as f64 }),
        );
    }

    let summary = json!({
        "workload": "benches/scenarios/fleet-bench.toml: 2 sensors/device at 1 Hz, 60 s summary windows, 1 simulated hour",
        "rounds": args.repeat,
        "median_numpy_samples_per_s": median(&mut numpy_rates),
        "median_twin_1_thread_samples_per_s": median(&mut one_rates),
        "median_twin_2_threads_samples_per_s": median(&mut two_rates),
        "median_ratio_twin_1_thread_over_numpy": median(&mut speedup_vs_numpy),
        "median_ratio_2_threads_over_1_thread": median(&mut scaling),
        "sizes": size_results,
        "per_round": rounds,
    });
    let out = workspace().join("target/fleet-bench.json");
    std::fs::write(&out, serde_json::to_string_pretty(&summary)?)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "median_numpy_samples_per_s": summary["median_numpy_samples_per_s"],
            "median_twin_1_thread_samples_per_s": summary["median_twin_1_thread_samples_per_s"],
            "median_twin_2_threads_samples_per_s": summary["median_twin_2_threads_samples_per_s"],
            "median_ratio_twin_1_thread_over_numpy": summary["median_ratio_twin_1_thread_over_numpy"],
            "median_ratio_2_threads_over_1_thread": summary["median_ratio_2_threads_over_1_thread"],
            "sizes": summary["sizes"],
        }))?
    );
    eprintln!("all measurements: {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
