//! Same scenario and seed: byte-identical report and recording. Another seed: another run.
//! Injecting a fault never changes the readings of devices it does not touch.

mod common;

use common::{run, scenario, shipped};
use twin_core::NoFiles;

#[test]
fn same_seed_gives_identical_bytes() {
    let (first, first_recording) = run(shipped("sensor-faults.toml"), true);
    let (second, second_recording) = run(shipped("sensor-faults.toml"), true);
    assert_eq!(first.to_json(), second.to_json());
    assert_eq!(first_recording, second_recording);
    assert!(first_recording.lines().count() > 100_000);
}

#[test]
fn another_seed_gives_another_run() {
    let mut reseeded = shipped("sensor-faults.toml");
    reseeded.seed += 1;
    let (a, _) = run(shipped("sensor-faults.toml"), false);
    let (b, _) = run(reseeded, false);
    assert_ne!(a.to_json(), b.to_json());
    // ... with the same shape: the same counts where nothing is random, statistics within noise.
    let control = |r: &twin_core::Report| common::metric(r, "groups.control.samples");
    assert_eq!(control(&a), control(&b));
    assert_ne!(
        common::metric(&a, "groups.dropout.samples"),
        common::metric(&b, "groups.dropout.samples")
    );
    let mean = |r: &twin_core::Report| common::metric(r, "groups.control.sensors.temperature.mean");
    assert!((mean(&a) - mean(&b)).abs() < 0.01);
}

const BASE: &str = r#"
seed = 99
[meta]
name = "isolation"
[clock]
duration = "20m"
tick = "60s"
[[fleet]]
name = "a"
count = 20
id = "a-{index}"
[[fleet.sensors]]
name = "t"
rate_hz = 2.0
random_walk = { start = 0.0, step_std_dev = 1.0 }
noise = 0.3
"#;

#[test]
fn faults_do_not_perturb_other_streams() {
    // The faulty run's recording, minus the faulted device, equals the healthy run's.
    let healthy = scenario(BASE, &NoFiles);
    let faulty = scenario(
        &format!(
            "{BASE}\n[[storyboard]]\nat = \"5m\"\ntarget = {{ ids = [\"a-3\"] }}\nspikes = {{ probability = 0.5, magnitude = 9.0 }}\n"
        ),
        &NoFiles,
    );
    let (_, healthy_recording) = run(healthy, true);
    let (_, faulty_recording) = run(faulty, true);
    let without = |text: &str| {
        text.lines()
            .filter(|l| !l.contains("\"a-3\""))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(without(&healthy_recording), without(&faulty_recording));
    // The faulted device's readings before the fault are untouched too.
    let early = |text: &str| {
        text.lines()
            .filter(|l| l.contains("\"a-3\""))
            .filter(|l| common::reading(l)["timestamp"].as_f64().expect("t") < 300.0)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(early(&healthy_recording), early(&faulty_recording));
    assert_ne!(healthy_recording, faulty_recording);
}

#[test]
fn device_order_in_the_file_does_not_change_a_device_s_readings() {
    // Streams derive from the device id, not from spawn order: put another group first.
    let reordered = BASE.replace(
        "[[fleet]]\nname = \"a\"",
        "[[fleet]]\nname = \"first\"\ncount = 3\nid = \"x-{index}\"\n[[fleet.sensors]]\nname = \"t\"\nrate_hz = 1.0\nconstant = { value = 1.0 }\n\n[[fleet]]\nname = \"a\"",
    );
    let (_, original) = run(scenario(BASE, &NoFiles), true);
    let (_, shifted) = run(scenario(&reordered, &NoFiles), true);
    let only_a = |text: &str| {
        text.lines()
            .filter(|l| l.contains("\"a-"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(only_a(&original), only_a(&shifted));
}
