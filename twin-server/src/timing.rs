//! Wall-clock figures of a run: everything that depends on the machine, kept out of the report.

use serde::Serialize;

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
}

/// Peak resident set size of this process (Linux `VmHWM`), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
