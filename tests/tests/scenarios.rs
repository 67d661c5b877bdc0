//! Every scenario shipped in `scenarios/` validates, runs, and passes its own criteria.

mod common;

use common::{run, shipped, workspace};

#[test]
fn every_shipped_scenario_runs_and_passes() {
    let mut names: Vec<String> = std::fs::read_dir(workspace().join("scenarios"))
        .expect("scenarios/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    for required in [
        "quickstart.toml",
        "fleet-10k-hour.toml",
        "uplink-partition.toml",
        "sensor-faults.toml",
    ] {
        assert!(names.iter().any(|n| n == required), "{required} is missing");
    }
    for name in names {
        let scenario = shipped(&name);
        let criteria = scenario.criteria.len();
        let (report, _) = run(scenario, false);
        assert!(criteria > 0, "{name} has no criteria");
        let failed: Vec<String> = report
            .criteria
            .iter()
            .filter(|v| !v.passed)
            .map(|v| {
                format!(
                    "{}: {} = {:?} (expected {})",
                    v.name, v.expression, v.measured, v.expect
                )
            })
            .collect();
        assert!(failed.is_empty(), "{name}: failing criteria:\n{}", failed.join("\n"));
        assert!(report.run.samples > 0, "{name} produced no samples");
    }
}

#[test]
fn fleet_10k_hour_has_ten_thousand_devices_for_an_hour() {
    let (report, _) = run(shipped("fleet-10k-hour.toml"), false);
    assert_eq!(report.run.devices, 10_000);
    assert_eq!(report.run.simulated_seconds, 3600.0);
}
