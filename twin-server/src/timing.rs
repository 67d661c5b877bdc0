//! Wall-clock figures of a run: everything that depends on the machine, kept out of the report.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use twin_core::inference::CompiledModel;

/// `timing.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Wall seconds spent stepping the world (building it excluded).
    pub wall_seconds: f64,
    /// Wall seconds spent building the world.
    pub build_seconds: f64,
    /// Simulated seconds.
    pub simulated_seconds: f64,
    /// Simulated seconds per wall second.
    pub speedup: f64,
    /// Readings per wall second.
    pub samples_per_second: f64,
    /// Worker threads of the sensor pass.
    pub threads: usize,
    /// Peak resident memory of the process, if known.
    pub peak_rss_bytes: Option<u64>,
    /// Peak resident memory divided by devices.
    pub peak_rss_bytes_per_device: Option<f64>,
    /// tract on this host, per model version the scenario loaded (`name@version`).
    pub models: BTreeMap<String, HostModelTiming>,
}

/// One model version measured with tract on this host, next to its projection on the
/// `cloud-x86` profile (the report's projections never use these figures).
#[derive(Clone, Debug, Serialize)]
pub struct HostModelTiming {
    /// Median microseconds of one call on one row.
    pub batch_1_us: f64,
    /// Median microseconds per row of one call on 256 rows.
    pub batch_256_us_per_row: f64,
    /// The `cloud-x86` profile's projection of one call on one row, in microseconds.
    pub projected_cloud_x86_us: f64,
}

/// Measures a compiled model on this host: median of `repeats` calls at batch 1 and 256, on
/// rows of 0.5 (the values do not change the work of the dense models shipped).
pub fn measure_model(model: &CompiledModel, repeats: usize) -> Option<HostModelTiming> {
    let median_us = |rows: usize| -> Option<f64> {
        let input = vec![0.5f32; rows * model.width()];
        model.run(&input).ok()?;
        let mut samples: Vec<f64> = (0..repeats.max(1))
            .map(|_| {
                let started = Instant::now();
                let ok = model.run(&input).is_ok();
                (ok, started.elapsed().as_secs_f64() * 1e6)
            })
            .filter_map(|(ok, us)| ok.then_some(us))
            .collect();
        samples.sort_by(f64::total_cmp);
        samples.get(samples.len() / 2).copied()
    };
    let cloud = twin_core::hardware::profile(twin_core::hardware::CLOUD)?;
    Some(HostModelTiming {
        batch_1_us: median_us(1)?,
        batch_256_us_per_row: median_us(256)? / 256.0,
        projected_cloud_x86_us: cloud.project(&model.cost(), 1).p50_ms * 1e3,
    })
}

/// Peak resident set size of this process (Linux `VmHWM`), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
