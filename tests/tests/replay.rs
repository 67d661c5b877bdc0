//! Record -> replay: a run's recording, replayed, reproduces the stream exactly; CSV replay with
//! speed, offset and loop maps file time onto simulated time.

mod common;

use std::collections::BTreeMap;

use common::{MemoryFiles, run, scenario};

const SOURCE: &str = r#"
seed = 5
[meta]
name = "source"
[clock]
duration = "10m"
tick = "45s"
[[fleet]]
name = "machines"
count = 4
id = "m-{index}"
upload = { mode = "summary", window = "60s" }
[[fleet.sensors]]
name = "temp"
rate_hz = 2.0
ornstein_uhlenbeck = { mean = 50.0, reversion = 0.02, volatility = 0.5 }
noise = 0.1
[[fleet.sensors]]
name = "accel"
rate_hz = 50.0
vibration = { shaft_hz = 5.0, harmonics = [1.0, 0.25], orientation_deg = [10.0, 20.0, 30.0] }
noise = 0.01
[[storyboard]]
at = "3m"
for = "2m"
target = { ids = ["m-1"] }
dropout = { sensor = "temp", probability = 0.3 }
"#;

/// The replaying scenario: same devices, every sensor a replay, another tick.
fn replay_of(recording_name: &str) -> String {
    format!(
        r#"
seed = 77
[meta]
name = "replayed"
[clock]
duration = "10m"
tick = "60s"
[[fleet]]
name = "machines"
count = 4
id = "m-{{index}}"
upload = {{ mode = "summary", window = "60s" }}
[[fleet.sensors]]
name = "temp"
replay = {{ file = "{recording_name}", filter = {{ device = "{{id}}", sensor = "{{sensor}}" }}, origin = 0 }}
[[fleet.sensors]]
name = "accel"
replay = {{ file = "{recording_name}", filter = {{ device = "{{id}}", sensor = "{{sensor}}" }}, origin = 0 }}
"#
    )
}

/// Lines of a recording by (device, sensor), in file order.
fn streams(recording: &str) -> BTreeMap<(String, String), Vec<&str>> {
    let mut streams: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
    for line in recording.lines() {
        let value = common::reading(line);
        let key = (
            value["device"].as_str().expect("device").to_owned(),
            value["sensor"].as_str().expect("sensor").to_owned(),
        );
        streams.entry(key).or_default().push(line);
    }
    streams
}

#[test]
fn record_then_replay_reproduces_the_stream_exactly() {
    let (source_report, recording) = run(scenario(SOURCE, &MemoryFiles::default()), true);
    assert!(recording.lines().count() > 100_000);
    let files = MemoryFiles([("rec.jsonl".to_owned(), recording.clone())].into());
    let (replay_report, replayed) = run(scenario(&replay_of("rec.jsonl"), &files), true);
    // A recording lists each step's readings device by device, so steps (tick, event times)
    // decide how streams interleave; each stream, line for line, must be the same.
    let (original, again) = (streams(&recording), streams(&replayed));
    assert_eq!(original.len(), 8, "4 devices x 2 sensors");
    for (key, lines) in &original {
        assert_eq!(Some(lines), again.get(key), "stream {key:?} differs");
    }
    assert_eq!(original.len(), again.len());
    // What the readings determine is the same too: counts and extremes exactly, moments to
    // rounding (the statistics' block boundaries and shift differ between the two runs).
    let source = source_report.metrics();
    let replay = replay_report.metrics();
    for name in [
        "run.samples",
        "groups.machines.sensors.temp.min",
        "groups.machines.sensors.accel.axes.z.max",
    ] {
        assert_eq!(source[name], replay[name], "{name}");
    }
    for name in [
        "groups.machines.sensors.temp.mean",
        "groups.machines.sensors.temp.std_dev",
        "groups.machines.sensors.accel.axes.y.std_dev",
    ] {
        assert!(
            (source[name] - replay[name]).abs() <= 1e-9 * source[name].abs(),
            "{name}: {} vs {}",
            source[name],
            replay[name]
        );
    }
}

#[test]
fn csv_replay_applies_speed_offset_and_loop() {
    let csv = "time,unit,reading\n100,a,1.0\n101,a,2.0\n102,a,3.0\n103,a,4.0\n100,b,9.0\n";
    let files = MemoryFiles([("data.csv".to_owned(), csv.to_owned())].into());
    let text = r#"
[meta]
name = "csv"
[clock]
duration = "10s"
tick = "1s"
[[fleet]]
name = "g"
count = 1
id = "a"
[[fleet.sensors]]
name = "v"
replay = { file = "data.csv", timestamp = "time", columns = ["reading"], filter = { unit = "{id}" }, speed = 2.0, start_offset = 1, loop = true }
"#;
    let (report, recording) = run(scenario(text, &files), true);
    // Rows 101..103 (offset 1 s) at double speed: t = 0, 0.5, 1.0; the loop period is the
    // span (1 s) plus the last gap (0.5 s), so passes start every 1.5 s: 7 passes in 10 s
    // minus the readings past the end (pass 6 starts at 9.0: 9.0, 9.5; 10.0 is excluded).
    let times: Vec<f64> = recording
        .lines()
        .map(|l| common::reading(l)["timestamp"].as_f64().expect("t"))
        .collect();
    let values: Vec<f64> = recording
        .lines()
        .map(|l| common::reading(l)["value"].as_f64().expect("v"))
        .collect();
    assert_eq!(&times[..6], &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    assert_eq!(&values[..6], &[2.0, 3.0, 4.0, 2.0, 3.0, 4.0]);
    assert_eq!(times.len(), 20);
    assert_eq!(report.run.samples, 20);
}

#[test]
fn a_replay_filter_without_rows_is_refused() {
    let files = MemoryFiles([("data.csv".to_owned(), "timestamp,device,value\n0,a,1\n".to_owned())].into());
    let text = r#"
[meta]
name = "csv"
[clock]
duration = "10s"
[[fleet]]
name = "g"
count = 2
id = "{index}"
[[fleet.sensors]]
name = "v"
replay = { file = "data.csv", filter = { device = "{id}" } }
"#;
    let err = twin_core::Scenario::from_toml("t.toml", text, &files, twin_core::LoadOptions::default())
        .expect_err("no rows for device 0");
    assert!(
        err.to_string().contains(
            "fleet[0].sensors[0].replay.filter: no rows of `data.csv` for device `0` (filter device = \"0\")"
        ),
        "{err}"
    );
}
