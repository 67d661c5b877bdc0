//! Rollouts, shadows, placements and cameras, run in-process on the shipped models.

mod common;

use common::{metric, run, shipped, workspace};
use twin_core::{LoadOptions, Report, Scenario};
use twin_server::files::ScenarioFiles;

/// A scenario written here, reading models from `scenarios/models/`.
fn with_models(text: &str) -> Scenario {
    let files = ScenarioFiles::beside(&workspace().join("scenarios/inline.toml"));
    Scenario::from_toml("inline.toml", text, &files, LoadOptions::default()).unwrap_or_else(|err| panic!("{err}"))
}

const PUMPS: &str = r#"
seed = 5

[meta]
name = "rollout-test"

[clock]
duration = "40m"
tick = "10s"

[models]
registry = "models/manifest.json"

[[fleet]]
name = "pumps"
count = 40
id = "pump-{index:02}"
label = "healthy"
upload = { mode = "summary", window = "10s" }
model = { name = "vibration-anomaly", version = 2, sensor = "accel" SHADOW }

[[fleet.sensors]]
name = "accel"
rate_hz = 50.0
vibration = { shaft_hz = 5.0, harmonics = [0.5, 0.12, 0.05] }
noise = 0.05
"#;

fn pumps(shadow: &str, storyboard: &str) -> Scenario {
    with_models(&(PUMPS.replace("SHADOW", shadow) + storyboard))
}

fn rollout<'a>(report: &'a Report, name: &str) -> &'a twin_core::report::RolloutReport {
    report
        .rollouts
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no rollout {name}"))
}

fn actions(report: &Report, name: &str) -> Vec<String> {
    rollout(report, name)
        .timeline
        .iter()
        .map(|t| t.action.clone())
        .collect()
}

#[test]
fn a_bad_version_rolls_back_by_itself_and_every_device_returns() {
    let (report, _) = run(shipped("model-rollback.toml"), false);
    let r = rollout(&report, "v3-canary");
    assert_eq!(r.state, "rolled_back");
    assert_eq!(actions(&report, "v3-canary"), ["deployed", "aborted", "rolled_back"]);
    assert_eq!(r.devices_updated, 0);
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|t| t.starts_with("abort criteria: alarm_rate")),
        "{r:?}"
    );
    // The canary ran v3 before the abort: its rows are counted, then every pump is on v2.
    assert!(metric(&report, "models.vibration-anomaly@3.inferences") > 0.0);
    assert_eq!(metric(&report, "models.vibration-anomaly@3.devices"), 0.0);
    assert_eq!(metric(&report, "models.vibration-anomaly@2.devices"), 200.0);
    // After the rollback every pump scores every window with v2 again: 200 pumps x 360
    // windows, less the canary's windows on v3 (and the shadow rows are not acting rows).
    let v2 = metric(&report, "models.vibration-anomaly@2.inferences");
    let v3 = metric(&report, "models.vibration-anomaly@3.inferences");
    assert_eq!(v2 + v3, 200.0 * 360.0);
}

#[test]
fn a_good_version_passes_every_stage() {
    let (report, _) = run(shipped("model-rollout-canary.toml"), false);
    assert_eq!(rollout(&report, "v2-promotion").state, "completed");
    assert_eq!(
        actions(&report, "v2-promotion"),
        [
            "deployed",
            "passed",
            "deployed",
            "passed",
            "deployed",
            "passed",
            "completed"
        ]
    );
    let devices: Vec<u64> = rollout(&report, "v2-promotion")
        .timeline
        .iter()
        .map(|t| t.devices)
        .collect();
    assert_eq!(
        devices,
        [20, 20, 100, 100, 200, 200, 200],
        "cumulative 10%, 50%, 100% of 200"
    );
    // Stage boundaries fall exactly at start + soaks (5m, 15m, 25m, 35m).
    let times: Vec<f64> = rollout(&report, "v2-promotion")
        .timeline
        .iter()
        .map(|t| t.at_s)
        .collect();
    assert_eq!(times, [300.0, 900.0, 900.0, 1500.0, 1500.0, 2100.0, 2100.0]);
}

#[test]
fn halt_keeps_the_canary_on_the_new_version() {
    let storyboard = r#"
[[storyboard]]
at = "5m"
rollout = { name = "v3", model = "vibration-anomaly", version = 3, canary = { fraction = 0.25, soak = "10m" }, waves = [{ fraction = 1.0, soak = "10m" }], min_devices = 5, abort = { alarm_rate_above = 0.2 }, on_abort = "halt" }
"#;
    let (report, _) = run(pumps("", storyboard), false);
    let r = rollout(&report, "v3");
    assert_eq!(r.state, "aborted");
    assert_eq!(actions(&report, "v3"), ["deployed", "aborted", "halted"]);
    assert_eq!(r.devices_updated, 10);
    assert_eq!(metric(&report, "models.vibration-anomaly@3.devices"), 10.0);
    assert_eq!(metric(&report, "models.vibration-anomaly@2.devices"), 30.0);
}

#[test]
fn a_canary_that_never_runs_stays_in_progress() {
    // Every pump is down from the start: nothing runs v3, so min_devices is never reached,
    // no gate is evaluated, and the run ends with the rollout waiting.
    let storyboard = r#"
[[storyboard]]
at = "0s"
for = "40m"
crash = {}

[[storyboard]]
at = "5m"
rollout = { name = "v3", model = "vibration-anomaly", version = 3, canary = { fraction = 0.25, soak = "10m" }, min_devices = 5, abort = { alarm_rate_above = 0.2 } }
"#;
    let (report, _) = run(pumps("", storyboard), false);
    assert_eq!(rollout(&report, "v3").state, "in_progress");
    assert_eq!(actions(&report, "v3"), ["deployed", "waiting"]);
    assert_eq!(rollout(&report, "v3").metrics.devices_observed, 0);
}

#[test]
fn a_shadow_is_compared_but_never_acts() {
    let (alone, _) = run(pumps("", ""), false);
    let (shadowed, _) = run(pumps(r#", shadow = { version = 3, fraction = 0.5 }"#, ""), false);
    // The champion's decisions are exactly those of the run without a shadow.
    for name in ["inferences", "alarms", "true_negatives", "false_positives"] {
        let path = format!("models.vibration-anomaly@2.{name}");
        assert_eq!(metric(&alone, &path), metric(&shadowed, &path), "{path}");
    }
    assert_eq!(metric(&shadowed, "models.vibration-anomaly@3.inferences"), 0.0);
    let shadow = &shadowed.shadows["pumps"];
    assert_eq!(
        metric(&shadowed, "models.vibration-anomaly@3.shadow_inferences"),
        shadow.rows as f64
    );
    assert!((10..=30).contains(&shadow.devices), "{} of 40 devices", shadow.devices);
    assert_eq!(shadow.rows, shadow.devices * 240, "every window of a shadowed device");
    // v3 alarms on healthy plant-A pumps where v2 does not: agreement is low.
    assert!(shadow.agreement.is_some_and(|a| a < 0.5), "{shadow:?}");
    assert!(shadow.challenger_alarm_rate > shadow.champion_alarm_rate);
}

#[test]
fn rollout_reports_are_identical_for_the_same_seed() {
    let scenario = shipped("model-rollback.toml");
    let (a, _) = run(scenario.clone(), false);
    let (b, _) = run(scenario, false);
    assert_eq!(a.to_json(), b.to_json());
}

#[test]
fn cameras_classify_real_images_with_their_labels() {
    let (report, _) = run(shipped("camera-digits.toml"), false);
    let accuracy = metric(&report, "models.digits@1.accuracy");
    assert!((0.9..0.94).contains(&accuracy), "{accuracy}");
    let classes: f64 = (0..10)
        .map(|c| metric(&report, &format!("models.digits@1.classes.{c}")))
        .sum();
    assert_eq!(classes, metric(&report, "models.digits@1.inferences"));
}
