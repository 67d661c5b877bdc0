//! Edge accounting to the byte, partition buffers, staleness, sampling times independent of
//! the tick, exact sines, and clock skew in recorded timestamps.

mod common;

use common::{metric, run, scenario};
use twin_core::NoFiles;

#[test]
fn raw_and_summary_traffic_are_counted_to_the_byte() {
    let text = r#"
[meta]
name = "accounting"
[clock]
duration = "10m"
tick = "7s"
[[fleet]]
name = "raw"
count = 3
id = "r-{index}"
upload = { mode = "raw", overhead_bytes = 20 }
[[fleet.sensors]]
name = "t"
rate_hz = 2.0
constant = { value = 1.0 }
[[fleet.sensors]]
name = "acc"
rate_hz = 10.0
vibration = { shaft_hz = 1.0, harmonics = [1.0] }
[[fleet]]
name = "summary"
count = 5
id = "s-{index}"
upload = { mode = "summary", window = "90s", overhead_bytes = 20 }
[[fleet.sensors]]
name = "t"
rate_hz = 2.0
constant = { value = 1.0 }
[[fleet.sensors]]
name = "acc"
rate_hz = 10.0
vibration = { shaft_hz = 1.0, harmonics = [1.0] }
"#;
    let (report, _) = run(scenario(text, &NoFiles), false);
    // raw: every reading is a message: 3 devices x 600 s x (2 + 10) Hz; bytes: overhead + 8 per channel.
    assert_eq!(metric(&report, "groups.raw.edge.raw.messages"), (3 * 600 * 12) as f64);
    assert_eq!(
        metric(&report, "groups.raw.edge.raw.bytes"),
        (3 * 600 * (2 * (20 + 8) + 10 * (20 + 24))) as f64
    );
    // summary: one message per device and closed window (600 / 90 = 6 full windows), each
    // overhead + per sensor 8 + 40 per channel: 20 + (8 + 40) + (8 + 120) = 196 bytes.
    assert_eq!(metric(&report, "groups.summary.edge.summary.messages"), (5 * 6) as f64);
    assert_eq!(
        metric(&report, "groups.summary.edge.summary.bytes"),
        (5 * 6 * 196) as f64
    );
    assert_eq!(metric(&report, "groups.summary.edge.raw.messages"), 0.0);
    assert_eq!(
        metric(&report, "edge.delivered.bytes"),
        metric(&report, "edge.total.bytes")
    );
    assert_eq!(metric(&report, "groups.summary.samples"), (5 * 600 * 12) as f64);
}

#[test]
fn a_partition_buffers_until_full_then_loses_and_delivers_on_heal() {
    // 4 devices x 1 reading/s x 32 bytes = 128 B/s behind a 10 000-byte buffer, partitioned
    // for 100 s: 12 800 bytes offered, 10 000 buffered (312 whole messages = 9 984 bytes),
    // the rest lost, the backlog delivered at heal.
    let text = r#"
[meta]
name = "partition"
[clock]
duration = "300s"
tick = "1s"
[[gateways]]
name = "gw"
buffer_bytes = 10000
[[fleet]]
name = "g"
count = 4
id = "d-{index}"
gateway = "gw"
[[fleet.sensors]]
name = "t"
rate_hz = 1.0
constant = { value = 3.0 }
[[storyboard]]
at = "100s"
for = "100s"
target = { gateway = "gw" }
partition = {}
"#;
    let (report, _) = run(scenario(text, &NoFiles), false);
    assert_eq!(metric(&report, "partition.buffered.bytes"), 9984.0);
    assert_eq!(metric(&report, "partition.buffered.messages"), 312.0);
    assert_eq!(metric(&report, "partition.lost.messages"), 400.0 - 312.0);
    assert_eq!(metric(&report, "partition.lost.bytes"), 12_800.0 - 9984.0);
    assert_eq!(metric(&report, "partition.backlog_delivered.messages"), 312.0);
    assert_eq!(metric(&report, "partition.backlog_remaining.messages"), 0.0);
    assert_eq!(metric(&report, "partition.peak_backlog_bytes"), 9984.0);
    assert_eq!(metric(&report, "gateways.gw.partitioned_seconds"), 100.0);
    assert_eq!(metric(&report, "edge.delivered.messages"), 1200.0 - 88.0);
    // The cloud's newest reading ages through the partition: at its end the cloud holds
    // what was buffered, up to 177 s; the maximum staleness is reached just before heal
    // (t = 200 s, newest held 99 s): 101 s.
    assert_eq!(metric(&report, "staleness.max_s"), 101.0);
}

#[test]
fn crashed_devices_read_nothing_and_come_back() {
    let text = r#"
[meta]
name = "crash"
[clock]
duration = "100s"
tick = "30s"
[[fleet]]
name = "g"
count = 2
id = "d-{index}"
[[fleet.sensors]]
name = "t"
rate_hz = 10.0
constant = { value = 3.0 }
[[storyboard]]
at = "25s"
for = "40s"
target = { ids = ["d-1"] }
crash = {}
"#;
    let (report, recording) = run(scenario(text, &NoFiles), true);
    assert_eq!(report.run.samples, 1000 + 600);
    assert_eq!(metric(&report, "groups.g.offline_device_seconds"), 40.0);
    let d1_times: Vec<f64> = recording
        .lines()
        .filter(|l| l.contains("\"d-1\""))
        .map(|l| common::reading(l)["timestamp"].as_f64().expect("t"))
        .collect();
    assert!(d1_times.iter().all(|t| *t < 25.0 || *t >= 65.0));
    assert_eq!(d1_times.first(), Some(&0.0));
    assert_eq!(d1_times.iter().find(|t| **t >= 25.0), Some(&65.0));
}

fn sample_times(rate: &str, tick: &str) -> (twin_core::Report, Vec<f64>) {
    let text = format!(
        r#"
[meta]
name = "timing"
[clock]
duration = "1000s"
tick = "{tick}"
[[fleet]]
name = "g"
count = 1
id = "d"
upload = {{ mode = "summary", window = "60s" }}
[[fleet.sensors]]
name = "s"
rate_hz = {rate}
sine = {{ amplitude = 2.0, period = "37s", phase_deg = 30.0, offset = 5.0 }}
"#
    );
    let (report, recording) = run(scenario(&text, &NoFiles), true);
    let times = recording
        .lines()
        .map(|l| common::reading(l)["timestamp"].as_f64().expect("t"))
        .collect();
    (report, times)
}

#[test]
fn sensors_sample_at_their_own_rate_whatever_the_tick() {
    for (rate, expected) in [("0.01", 10), ("0.3", 300), ("3.0", 3000), ("1000.0", 1_000_000)] {
        let (fine, fine_times) = sample_times(rate, "1s");
        let (coarse, coarse_times) = sample_times(rate, "7m");
        assert_eq!(fine.run.samples, expected, "rate {rate}");
        assert_eq!(coarse.run.samples, expected, "rate {rate}");
        assert_eq!(fine_times, coarse_times, "rate {rate}: sample times depend on the tick");
        let rate: f64 = rate.parse().expect("rate");
        for (k, t) in fine_times.iter().enumerate().step_by(97) {
            assert_eq!(*t, k as f64 / rate, "sample {k} at rate {rate}");
        }
    }
}

#[test]
fn recorded_sine_values_are_exact() {
    let text = r#"
[meta]
name = "sine"
[clock]
duration = "600s"
tick = "13s"
[[fleet]]
name = "g"
count = 1
id = "d"
[[fleet.sensors]]
name = "s"
rate_hz = 20.0
sine = { amplitude = 2.5, period = "7.3s", phase_deg = 45.0, offset = -1.0 }
"#;
    let (_, recording) = run(scenario(text, &NoFiles), true);
    let mut checked = 0;
    for line in recording.lines() {
        let value = common::reading(line);
        let t = value["timestamp"].as_f64().expect("t");
        let v = value["value"].as_f64().expect("v");
        let exact = -1.0 + 2.5 * (std::f64::consts::TAU * t / 7.3 + std::f64::consts::FRAC_PI_4).sin();
        assert!((v - exact).abs() < 1e-12, "t = {t}: {v} vs {exact}");
        checked += 1;
    }
    assert_eq!(checked, 12_000);
}

#[test]
fn clock_skew_shifts_recorded_timestamps_by_offset_and_drift() {
    let text = r#"
[meta]
name = "skew"
[clock]
duration = "200s"
tick = "10s"
[[fleet]]
name = "g"
count = 2
id = "d-{index}"
[[fleet.sensors]]
name = "s"
rate_hz = 1.0
constant = { value = 1.0 }
[[storyboard]]
at = "100s"
target = { ids = ["d-0"] }
clock_skew = { offset_s = 2.0, ppm = 1000.0 }
"#;
    let (report, recording) = run(scenario(text, &NoFiles), true);
    assert_eq!(metric(&report, "faults.clock_skew"), 1.0);
    for line in recording.lines() {
        let value = common::reading(line);
        let t = value["timestamp"].as_f64().expect("t");
        if value["device"] == "d-0" && t >= 100.0 {
            // Reading k (true time k s) for k >= 100 is stamped k + 2 + 0.001 (k - 100).
            let k = ((t - 2.0) / 1.001 + 100.0 * 0.001 / 1.001).round();
            assert!((t - (k + 2.0 + 0.001 * (k - 100.0))).abs() < 1e-9, "{line}");
        } else {
            assert_eq!(t.fract(), 0.0, "{line}");
        }
    }
}
