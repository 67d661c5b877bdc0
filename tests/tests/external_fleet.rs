//! Devices from outside a scenario (`ExternalFleet`, what a server fork builds from live
//! twins): listed groups are made of exactly those devices, selectors resolve against them,
//! the other groups keep theirs, and an empty external fleet changes nothing.

mod common;

use common::{MemoryFiles, metric, run};
use twin_core::scenario::{ExternalDevice, ExternalFleet};
use twin_core::{LoadOptions, Scenario, ScenarioError};

const TEXT: &str = r#"
seed = 11
[meta]
name = "external"
[clock]
duration = "5m"
tick = "10s"
[[fleet]]
name = "a"
count = 3
id = "a-{index}"
[[fleet.sensors]]
name = "t"
rate_hz = 2.0
gaussian = { mean = 20.0, std_dev = 1.0 }
[[fleet]]
name = "b"
count = 2
id = "b-{index}"
[[fleet.sensors]]
name = "t"
rate_hz = 1.0
constant = { value = 5.0 }
[[storyboard]]
at = "1m"
target = { group = "a", count = 1 }
crash = {}
"#;

fn load(text: &str, fleet: &ExternalFleet) -> Result<Scenario, ScenarioError> {
    Scenario::from_toml_with_fleet(
        "external.toml",
        text,
        &MemoryFiles::default(),
        LoadOptions::default(),
        fleet,
    )
}

fn fleet(group: &str, ids: &[&str]) -> ExternalFleet {
    let mut fleet = ExternalFleet::default();
    fleet.groups.insert(
        group.to_owned(),
        ids.iter()
            .map(|id| ExternalDevice {
                id: (*id).to_owned(),
                model: None,
            })
            .collect(),
    );
    fleet
}

#[test]
fn an_empty_external_fleet_gives_the_scenario_itself() {
    let plain =
        Scenario::from_toml("external.toml", TEXT, &MemoryFiles::default(), LoadOptions::default()).expect("valid");
    let with_nothing = load(TEXT, &ExternalFleet::default()).expect("valid");
    assert_eq!(run(plain, false).0.to_json(), run(with_nothing, false).0.to_json());
}

#[test]
fn external_devices_replace_their_group_and_selectors_see_them() {
    let targeted = TEXT.replace(r#"{ group = "a", count = 1 }"#, r#"{ ids = ["twin-2"] }"#);
    let scenario = load(&targeted, &fleet("a", &["twin-1", "twin-2"])).expect("valid");
    assert_eq!(scenario.device_count(), 4);
    let ids: Vec<String> = (0..scenario.device_count()).map(|d| scenario.device_id(d)).collect();
    assert_eq!(ids, ["twin-1", "twin-2", "b-0", "b-1"]);
    let (report, _) = run(scenario, false);
    assert_eq!(metric(&report, "run.devices"), 4.0);

    // The templated ids of a replaced group are gone.
    let stale = TEXT.replace(r#"{ group = "a", count = 1 }"#, r#"{ ids = ["a-0"] }"#);
    let error = load(&stale, &fleet("a", &["twin-1"])).expect_err("a-0 is not a device any more");
    assert!(error.to_string().contains("no device has id `a-0`"), "{error}");
}

#[test]
fn unknown_groups_and_duplicate_ids_are_problems() {
    let error = load(TEXT, &fleet("c", &["twin-1"])).expect_err("no group c");
    assert!(
        error
            .to_string()
            .contains("belong to group `c`, which the scenario does not define (groups: a, b)"),
        "{error}"
    );
    let error = load(TEXT, &fleet("a", &["b-1"])).expect_err("b-1 twice");
    assert!(error.to_string().contains("duplicate device id `b-1`"), "{error}");
}
