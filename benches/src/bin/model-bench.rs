//! `model-bench`: tract on every shipped model, per row at batch 1, 256 and 1000, side by side
//! with onnxruntime on the same rows (both single-threaded, in the same run), medians of many
//! runs, in rounds: each round times tract then onnxruntime, and the ratios are taken per round.
//! Batch 256 is one of the row counts `CompiledModel` has a plan for (`BLOCK_ROWS`); batch 1000
//! is not, and runs as one call on the 1024-row plan with 24 rows of padding.
//!
//! ```text
//! pip install -r scenarios/models/requirements.txt
//! cargo build --release -p twin-benches
//! target/release/model-bench --repeat 500 --rounds 7
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use twin_core::inference::CompiledModel;

/// tract vs onnxruntime on the shipped models.
#[derive(Parser, Debug)]
struct Args {
    /// Python with onnxruntime (scenarios/models/requirements.txt).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 300)]
    repeat: usize,
    /// Rounds per model, each measuring tract then onnxruntime: the machine's load moves
    /// between rounds, so ratios are taken within a round and their median reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Per-row microseconds of `model` on the first `batch` rows (median of `repeat` runs).
fn tract_us_per_row(model: &CompiledModel, rows: &[f32], batch: usize, repeat: usize) -> Result<f64> {
    let input = &rows[..batch * model.width()];
    for _ in 0..20 {
        model.run(input)?;
    }
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let start = Instant::now();
        std::hint::black_box(model.run(std::hint::black_box(input))?);
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times) * 1e6 / batch as f64)
}

/// Batch sizes measured: the first two give the batching gain (batch 1 over batch 256, the
/// issue's measure); the last is the most rows used.
const BATCHES: [usize; 3] = [1, 256, 1000];

/// Deterministic rows around the reference inputs: 1000 rows, each a reference row scaled a
/// little.
fn rows_for(reference: &Value, width: usize) -> Vec<f32> {
    let base: Vec<f32> = reference
        .as_array()
        .map(|rows| {
            rows.iter()
                .flat_map(|r| r.as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_f64())
                .map(|v| v as f32)
                .collect()
        })
        .unwrap_or_default();
    let base_rows = base.len() / width;
    let count = BATCHES[BATCHES.len() - 1];
    let mut rows = Vec::with_capacity(count * width);
    for r in 0..count {
        let scale = 1.0 + (r as f32) * 1e-3;
        rows.extend(
            base[(r % base_rows) * width..(r % base_rows + 1) * width]
                .iter()
                .map(|v| v * scale),
        );
    }
    rows
}

/// Per-row microseconds of onnxruntime at each of [`BATCHES`] on the same rows, and its version.
fn onnxruntime_us_per_row(args: &Args, model: &Path, rows_file: &Path) -> Result<(Vec<f64>, Value)> {
    let output = Command::new(&args.python)
        .arg(workspace().join("benches/onnxruntime_bench.py"))
        .arg(model)
        .arg(rows_file)
        .arg("--batches")
        .args(BATCHES.map(|b| b.to_string()))
        .args(["--repeat", &args.repeat.to_string()])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .context("running benches/onnxruntime_bench.py")?;
    if !output.status.success() {
        bail!("onnxruntime bench failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    if lines.len() != BATCHES.len() {
        bail!(
            "onnxruntime bench printed {} lines, expected {}",
            lines.len(),
            BATCHES.len()
        );
    }
    Ok((
        lines
            .iter()
            .map(|line| line["median_us_per_row"].as_f64().unwrap_or(f64::NAN))
            .collect(),
        lines[0]["onnxruntime"].clone(),
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let models_dir = workspace().join("scenarios/models");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(models_dir.join("reference.json"))?)?;
    let dir = std::env::temp_dir().join(format!("model-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut results = Vec::new();
    for case in reference["models"].as_array().context("reference models")? {
        let file = case["file"].as_str().context("file")?;
        let path = models_dir.join(file);
        let model = CompiledModel::load(&std::fs::read(&path)?)?;
        let (_, inputs) = case["inputs"]
            .as_object()
            .and_then(|o| o.iter().next())
            .context("inputs")?;
        let rows = rows_for(inputs, model.width());
        let rows_file = dir.join(format!("{file}.rows.json"));
        let as_rows: Vec<&[f32]> = rows.chunks(model.width()).collect();
        std::fs::write(&rows_file, serde_json::to_string(&as_rows)?)?;
        let mut rounds = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds.max(1) {
            let tract = BATCHES
                .iter()
                .map(|&batch| tract_us_per_row(&model, &rows, batch, args.repeat))
                .collect::<Result<Vec<_>>>()?;
            let (ort, ort_version) = onnxruntime_us_per_row(&args, &path, &rows_file)?;
            let mut round = json!({
                "tract_batching_gain": tract[0] / tract[1],
                "onnxruntime_version": ort_version,
            });
            for (i, batch) in BATCHES.iter().enumerate() {
                round[format!("tract_us_per_row_batch_{batch}")] = json!(tract[i]);
                round[format!("onnxruntime_us_per_row_batch_{batch}")] = json!(ort[i]);
                round[format!("tract_throughput_over_onnxruntime_batch_{batch}")] = json!(ort[i] / tract[i]);
            }
            rounds.push(round);
        }
        let median_of = |key: &str| median(rounds.iter().filter_map(|r| r[key].as_f64()).collect());
        let mut result = json!({
            "model": file,
            "rounds": rounds.len(),
            "median_tract_batching_gain": median_of("tract_batching_gain"),
        });
        for batch in BATCHES {
            for key in [
                format!("tract_us_per_row_batch_{batch}"),
                format!("onnxruntime_us_per_row_batch_{batch}"),
                format!("tract_throughput_over_onnxruntime_batch_{batch}"),
            ] {
                result[format!("median_{key}")] = json!(median_of(&key));
            }
        }
        result["per_round"] = json!(rounds);
        eprintln!("{result}");
        results.push(result);
    }
    println!("{}", serde_json::to_string_pretty(&results)?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
