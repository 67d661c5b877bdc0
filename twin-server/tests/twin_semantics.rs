//! Twin document semantics, black-box over the public `twins` and `store` APIs: the AWS delta
//! rules, merge patches, versions, optimistic concurrency, limits and key rules, acknowledgements
//! and reconciliation, durability across restarts, group commit and a SIGKILL crash.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use twin_server::store::{Store, StoreOptions, WriteBatch};
use twin_server::twins::{
    DesiredAck, ErrorCode, LimitKind, Limits, NewTwin, ReconciliationState, SectionPatch, Timestamp, Twin, TwinError,
    Twins, delta,
};

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(object) => object,
        other => panic!("not an object: {other}"),
    }
}

fn merge(value: Value) -> SectionPatch {
    SectionPatch::Merge(object(value))
}

fn at(millis: u64) -> Timestamp {
    Timestamp::from_unix_millis(millis)
}

fn new_twin(id: &str, desired: Value) -> NewTwin {
    NewTwin {
        id: id.to_owned(),
        group: Some("line-1".to_owned()),
        tags: Map::new(),
        desired: object(desired),
    }
}

fn fleet_with(id: &str, desired: Value) -> Twins {
    let mut twins = Twins::new(Limits::default());
    twins.create(new_twin(id, desired), at(1)).expect("create");
    twins
}

// ---------------------------------------------------------------------------------------------
// Delta conformance: (rule, desired, reported, expected delta), from the documented AWS rules.
// ---------------------------------------------------------------------------------------------

fn delta_cases() -> Vec<(&'static str, Value, Value, Value)> {
    vec![
        ("1: both empty", json!({}), json!({}), json!({})),
        (
            "2: key missing from reported",
            json!({"a": 1}),
            json!({}),
            json!({"a": 1}),
        ),
        ("2: equal value", json!({"a": 1}), json!({"a": 1}), json!({})),
        ("2: different value", json!({"a": 1}), json!({"a": 2}), json!({"a": 1})),
        (
            "2: string vs number",
            json!({"a": "1"}),
            json!({"a": 1}),
            json!({"a": "1"}),
        ),
        (
            "2: boolean differs",
            json!({"on": true}),
            json!({"on": false}),
            json!({"on": true}),
        ),
        ("2: empty string equal", json!({"a": ""}), json!({"a": ""}), json!({})),
        ("2: numbers by value", json!({"a": 1}), json!({"a": 1.0}), json!({})),
        (
            "2: large integers differ",
            json!({"a": u64::MAX}),
            json!({"a": u64::MAX - 1}),
            json!({"a": u64::MAX}),
        ),
        (
            "2: only differing keys",
            json!({"a": 1, "b": 2, "c": 3}),
            json!({"a": 1, "b": 0}),
            json!({"b": 2, "c": 3}),
        ),
        ("3: key only in reported", json!({}), json!({"a": 1}), json!({})),
        (
            "3: extra reported keys ignored",
            json!({"a": 1}),
            json!({"a": 1, "b": 2}),
            json!({}),
        ),
        (
            "4: nested differing leaf",
            json!({"s": {"x": 1, "y": 2}}),
            json!({"s": {"x": 1, "y": 3}}),
            json!({"s": {"y": 2}}),
        ),
        (
            "4: nested object missing",
            json!({"s": {"x": 1}}),
            json!({}),
            json!({"s": {"x": 1}}),
        ),
        (
            "4: nested extra reported leaf",
            json!({"s": {"x": 1}}),
            json!({"s": {"x": 1, "z": 0}}),
            json!({}),
        ),
        (
            "4: three levels",
            json!({"a": {"b": {"c": 1, "d": 2}}}),
            json!({"a": {"b": {"c": 1, "d": 3}}}),
            json!({"a": {"b": {"d": 2}}}),
        ),
        (
            "4: nested numbers by value",
            json!({"a": {"b": 1}}),
            json!({"a": {"b": 1.0}}),
            json!({}),
        ),
        (
            "4: empty desired object missing",
            json!({"a": {}}),
            json!({}),
            json!({"a": {}}),
        ),
        (
            "4: empty desired object present",
            json!({"a": {}}),
            json!({"a": {"b": 1}}),
            json!({}),
        ),
        (
            "4: object vs scalar",
            json!({"a": {"b": 1}}),
            json!({"a": 5}),
            json!({"a": {"b": 1}}),
        ),
        (
            "4: scalar vs object",
            json!({"a": 5}),
            json!({"a": {"b": 1}}),
            json!({"a": 5}),
        ),
        (
            "4: object vs array",
            json!({"a": {"b": 1}}),
            json!({"a": [1]}),
            json!({"a": {"b": 1}}),
        ),
        (
            "4: mixed keys",
            json!({"a": 1, "b": {"c": 2, "d": [1]}, "e": "x"}),
            json!({"a": 1, "b": {"c": 3, "d": [1]}, "f": 0}),
            json!({"b": {"c": 2}, "e": "x"}),
        ),
        (
            "5: equal arrays",
            json!({"a": [1, 2, 3]}),
            json!({"a": [1, 2, 3]}),
            json!({}),
        ),
        (
            "5: one element differs",
            json!({"a": [1, 2, 3]}),
            json!({"a": [1, 9, 3]}),
            json!({"a": [1, 2, 3]}),
        ),
        (
            "5: order differs",
            json!({"a": [1, 2]}),
            json!({"a": [2, 1]}),
            json!({"a": [1, 2]}),
        ),
        (
            "5: reported longer",
            json!({"a": [1]}),
            json!({"a": [1, 2]}),
            json!({"a": [1]}),
        ),
        ("5: array missing", json!({"a": ["x"]}), json!({}), json!({"a": ["x"]})),
        (
            "5: arrays of objects differ",
            json!({"a": [{"x": 1, "y": 2}]}),
            json!({"a": [{"x": 1, "y": 3}]}),
            json!({"a": [{"x": 1, "y": 2}]}),
        ),
        (
            "5: arrays of objects equal",
            json!({"a": [{"x": 1, "y": 2}]}),
            json!({"a": [{"y": 2, "x": 1}]}),
            json!({}),
        ),
        (
            "5: array inside nested object",
            json!({"s": {"l": [1]}}),
            json!({"s": {"l": []}}),
            json!({"s": {"l": [1]}}),
        ),
    ]
}

#[test]
fn delta_rules_conformance() {
    let cases = delta_cases();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    for (rule, desired, reported, expected) in cases {
        let computed = delta(&object(desired.clone()), &object(reported.clone()));
        assert_eq!(
            Value::Object(computed),
            expected,
            "rule {rule}: desired {desired} reported {reported}"
        );
    }
}

#[test]
fn delta_cases_hold_through_twin_updates() {
    for (rule, desired, reported, expected) in delta_cases() {
        let mut twins = fleet_with("dev-1", json!({}));
        twins.update_desired("dev-1", &merge(desired), None, at(2)).expect(rule);
        let outcome = twins
            .update_reported("dev-1", &merge(reported), None, at(3), None)
            .expect(rule);
        let twin = twins.get("dev-1").expect("twin");
        assert_eq!(Value::Object(twin.delta()), expected, "rule {rule}");
        // Rule 6: a notification only when desired != reported, carrying the whole delta.
        let expected_notification = Some(object(expected)).filter(|delta| !delta.is_empty());
        assert_eq!(outcome.delta, expected_notification, "rule {rule}");
        assert_eq!(outcome.version, twin.version());
    }
}

#[test]
fn delta_notification_carries_the_whole_delta_and_the_version() {
    let mut twins = fleet_with("dev-1", json!({"a": 1, "b": 2}));
    let outcome = twins
        .update_desired("dev-1", &merge(json!({"c": 3})), None, at(2))
        .expect("update");
    assert_eq!(outcome.delta.map(Value::Object), Some(json!({"a": 1, "b": 2, "c": 3})));
    assert_eq!(outcome.version, 2);
    let outcome = twins
        .update_reported("dev-1", &merge(json!({"a": 1, "b": 2, "c": 3})), None, at(3), None)
        .expect("report");
    assert_eq!(outcome.delta, None, "no notification once desired == reported");
    assert_eq!(outcome.version, 3);
}

// ---------------------------------------------------------------------------------------------
// Merge patches.
// ---------------------------------------------------------------------------------------------

#[test]
fn merge_patch_null_deletes_objects_merge_arrays_replace() {
    let mut twins = fleet_with("dev-1", json!({"a": 1, "s": {"x": 1, "y": 2}, "l": [1, 2, 3]}));
    twins
        .update_desired(
            "dev-1",
            &merge(json!({"a": null, "s": {"y": 5, "z": 6}, "l": [9]})),
            None,
            at(2),
        )
        .expect("patch");
    let twin = twins.get("dev-1").expect("twin");
    assert_eq!(
        Value::Object(twin.desired().clone()),
        json!({"s": {"x": 1, "y": 5, "z": 6}, "l": [9]})
    );
}

#[test]
fn null_section_clears_it_and_its_reconciliation() {
    let mut twins = fleet_with("dev-1", json!({"a": 1, "b": 2}));
    twins
        .update_desired("dev-1", &SectionPatch::Clear, None, at(2))
        .expect("clear");
    let twin = twins.get("dev-1").expect("twin");
    assert!(twin.desired().is_empty());
    assert!(twin.reconciliation().is_empty());
    assert_eq!(
        SectionPatch::from_json("desired", Value::Null).expect("null"),
        SectionPatch::Clear
    );
    let error = SectionPatch::from_json("desired", json!([1])).expect_err("array");
    assert_eq!(error.field(), Some("desired"));
    assert_eq!(error.code(), ErrorCode::InvalidArgument);
}

#[test]
fn metadata_keeps_server_time_per_leaf_and_device_source_time() {
    let mut twins = fleet_with("dev-1", json!({}));
    twins
        .update_reported(
            "dev-1",
            &merge(json!({"temp": 21, "fw": {"v": "1.0"}})),
            None,
            at(10),
            Some(at(7)),
        )
        .expect("report");
    twins
        .update_reported("dev-1", &merge(json!({"temp": 22})), None, at(20), Some(at(18)))
        .expect("report");
    let metadata = &twins.get("dev-1").expect("twin").metadata().reported;
    let temp = metadata.get(&["temp"]).expect("temp");
    assert_eq!((temp.last_updated, temp.source_time), (at(20), Some(at(18))));
    let fw = metadata.get(&["fw", "v"]).expect("fw.v");
    assert_eq!((fw.last_updated, fw.source_time), (at(10), Some(at(7))));
    assert_eq!(metadata.last_updated, at(20));
}

// ---------------------------------------------------------------------------------------------
// Versions and optimistic concurrency.
// ---------------------------------------------------------------------------------------------

#[test]
fn every_accepted_change_increments_the_version() {
    let mut twins = fleet_with("dev-1", json!({"a": 1}));
    assert_eq!(twins.get("dev-1").map(Twin::version), Some(1));
    let v = twins
        .update_desired("dev-1", &merge(json!({"a": 2})), None, at(2))
        .expect("d")
        .version;
    assert_eq!(v, 2);
    let v = twins
        .update_reported("dev-1", &merge(json!({"a": 2})), None, at(3), None)
        .expect("r")
        .version;
    assert_eq!(v, 3);
    let v = twins
        .update_tags("dev-1", &merge(json!({"site": "x"})), None, at(4))
        .expect("t")
        .version;
    assert_eq!(v, 4);
    let twin = twins.get("dev-1").expect("twin");
    assert_eq!((twin.desired_version(), twin.reported_version()), (2, 3));
}

#[test]
fn wrong_expected_version_is_aborted_with_the_current_version_and_changes_nothing() {
    let mut twins = fleet_with("dev-1", json!({"a": 1}));
    twins
        .update_desired("dev-1", &merge(json!({"a": 2})), Some(1), at(2))
        .expect("expected 1 is current");
    let before = twins.clone();
    let attempts: Vec<Result<u64, TwinError>> = vec![
        twins
            .update_desired("dev-1", &merge(json!({"a": 3})), Some(1), at(3))
            .map(|o| o.version),
        twins
            .update_reported("dev-1", &merge(json!({"a": 3})), Some(7), at(3), None)
            .map(|o| o.version),
        twins
            .update_tags("dev-1", &merge(json!({"t": 1})), Some(0), at(3))
            .map(|o| o.version),
        twins.acknowledge("dev-1", &[ack("a", 200, 2)], Some(1), at(3)),
        twins.delete("dev-1", Some(3)),
    ];
    for attempt in attempts {
        let error = attempt.expect_err("conflict");
        assert_eq!(error.code(), ErrorCode::Aborted);
        assert!(
            matches!(error, TwinError::VersionConflict { current: 2, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("current version is 2"), "{error}");
    }
    assert_eq!(twins, before, "a refused update changes nothing");
}

#[test]
fn version_is_never_reused_after_delete_and_recreate() {
    let mut twins = fleet_with("dev-1", json!({"a": 1}));
    twins
        .update_desired("dev-1", &merge(json!({"a": 2})), None, at(2))
        .expect("update");
    let deleted_at = twins.delete("dev-1", Some(2)).expect("delete");
    assert_eq!(deleted_at, 3);
    assert_eq!(twins.high_water("dev-1"), Some(3));
    let error = twins
        .update_desired("dev-1", &merge(json!({"a": 3})), None, at(4))
        .expect_err("deleted");
    assert_eq!(error.code(), ErrorCode::NotFound);
    let recreated = twins
        .create(new_twin("dev-1", json!({})), at(5))
        .expect("recreate")
        .version();
    assert_eq!(recreated, 4);
    let deleted_again = twins.delete("dev-1", None).expect("delete");
    let recreated_again = twins
        .create(new_twin("dev-1", json!({})), at(6))
        .expect("recreate")
        .version();
    assert_eq!((deleted_again, recreated_again), (5, 6));
}

#[test]
fn create_refuses_existing_ids_and_bad_ids() {
    let mut twins = fleet_with("dev-1", json!({}));
    let error = twins.create(new_twin("dev-1", json!({})), at(2)).expect_err("exists");
    assert_eq!(error.code(), ErrorCode::AlreadyExists);
    let error = twins.create(new_twin("dev 2", json!({})), at(2)).expect_err("space");
    assert_eq!(
        (error.code(), error.field()),
        (ErrorCode::InvalidArgument, Some("twin_id"))
    );
    let mut bad_group = new_twin("dev-2", json!({}));
    bad_group.group = Some(String::new());
    let error = twins.create(bad_group, at(2)).expect_err("empty group");
    assert_eq!(error.field(), Some("group"));
    let error = twins.delete("nobody", None).expect_err("missing");
    assert_eq!(error.code(), ErrorCode::NotFound);
}

// ---------------------------------------------------------------------------------------------
// Limits and key rules.
// ---------------------------------------------------------------------------------------------

fn ack(key: &str, status: u16, version: u64) -> DesiredAck {
    DesiredAck {
        key: key.to_owned(),
        status,
        version,
        description: String::new(),
    }
}

#[test]
fn size_limits_name_the_limit_and_the_excess() {
    let mut twins = fleet_with("dev-1", json!({}));
    let before = twins.clone();
    let big = "x".repeat(33 * 1024);
    let cases = [
        (
            twins
                .update_desired("dev-1", &merge(json!({"blob": big})), None, at(2))
                .map(|o| o.version),
            "desired",
            LimitKind::DesiredBytes,
        ),
        (
            twins
                .update_reported("dev-1", &merge(json!({"blob": big})), None, at(2), None)
                .map(|o| o.version),
            "reported",
            LimitKind::ReportedBytes,
        ),
        (
            twins
                .update_tags("dev-1", &merge(json!({"blob": "x".repeat(8 * 1024)})), None, at(2))
                .map(|o| o.version),
            "tags",
            LimitKind::TagsBytes,
        ),
    ];
    for (result, field, limit) in cases {
        let error = result.expect_err(field);
        assert_eq!(error.code(), ErrorCode::ResourceExhausted);
        assert_eq!(error.field(), Some(field));
        let TwinError::LimitExceeded {
            limit: found,
            actual,
            max,
            ..
        } = &error
        else {
            panic!("{error}");
        };
        assert_eq!(*found, limit);
        assert!(actual > max);
        let message = error.to_string();
        assert!(
            message.contains(limit.name()) && message.contains(&format!("by {}", actual - max)),
            "{message}"
        );
    }
    assert_eq!(twins, before);
}

#[test]
fn the_limit_applies_to_the_merged_document() {
    let limits = Limits {
        max_desired_bytes: 64,
        ..Limits::default()
    };
    let mut twins = Twins::new(limits);
    twins.create(new_twin("dev-1", json!({})), at(1)).expect("create");
    twins
        .update_desired("dev-1", &merge(json!({"a": "x".repeat(40)})), None, at(2))
        .expect("fits");
    let error = twins
        .update_desired("dev-1", &merge(json!({"b": "x".repeat(40)})), None, at(3))
        .expect_err("merged too big");
    assert!(matches!(
        error,
        TwinError::LimitExceeded {
            limit: LimitKind::DesiredBytes,
            max: 64,
            ..
        }
    ));
    twins
        .update_desired("dev-1", &merge(json!({"a": null, "b": "x".repeat(40)})), None, at(4))
        .expect("fits again");
}

#[test]
fn depth_limit_names_the_path() {
    let mut twins = fleet_with("dev-1", json!({}));
    let mut deep = json!({"leaf": 1});
    for level in (1..=10).rev() {
        deep = json!({ format!("l{level}"): deep });
    }
    // The section is level 1, the object under l1 level 2 ... the object under l10 level 11.
    let error = twins.update_desired("dev-1", &SectionPatch::Merge(object(deep.clone())), None, at(2));
    let error = error.expect_err("too deep");
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
    assert_eq!(error.field(), Some("desired.l1.l2.l3.l4.l5.l6.l7.l8.l9.l10"));
    assert!(matches!(
        error,
        TwinError::LimitExceeded {
            limit: LimitKind::Depth,
            actual: 11,
            max: 10,
            ..
        }
    ));
    let Value::Object(mut shallower) = deep else { panic!() };
    shallower = object(shallower.remove("l1").expect("l1"));
    twins
        .update_desired("dev-1", &SectionPatch::Merge(shallower), None, at(3))
        .expect("10 levels fit");
}

#[test]
fn key_rules_give_the_field_path() {
    let mut twins = fleet_with("dev-1", json!({}));
    let long_key = "k".repeat(129);
    let cases = [
        (json!({"a.b": 1}), r#"desired["a.b"]"#),
        (json!({"cfg": {"$version": 1}}), r#"desired.cfg["$version"]"#),
        (json!({"cfg": {"with space": 1}}), r#"desired.cfg["with space"]"#),
        (json!({"cfg": {"": 1}}), r#"desired.cfg[""]"#),
        (json!({"cfg": {"nl\n": 1}}), r#"desired.cfg["nl\n"]"#),
        (json!({ long_key.clone(): 1 }), "desired[\"kkk"),
        (json!({"modes": [1, null]}), "desired.modes[1]"),
        (json!({"modes": [[1], [2, null]]}), "desired.modes[1][1]"),
        (json!({"list": [{"a.b": 1}]}), r#"desired.list[0]["a.b"]"#),
    ];
    for (patch, path) in cases {
        let error = twins
            .update_desired("dev-1", &merge(patch.clone()), None, at(2))
            .expect_err(path);
        assert_eq!(error.code(), ErrorCode::InvalidArgument, "{patch}");
        let field = error.field().expect("field");
        assert!(field.starts_with(path), "{patch}: {field} (expected {path})");
    }
    assert_eq!(twins.get("dev-1").map(Twin::version), Some(1), "nothing accepted");
    twins
        .update_desired(
            "dev-1",
            &merge(json!({"température": 1, "key_with-dash:ok": [1, "a", {"x": 2}]})),
            None,
            at(3),
        )
        .expect("allowed keys");
}

// ---------------------------------------------------------------------------------------------
// Device view, acknowledgements, reconciliation.
// ---------------------------------------------------------------------------------------------

#[test]
fn device_reconnecting_gets_the_full_current_delta_and_never_tags() {
    let mut twins = fleet_with("dev-1", json!({"rate": 10}));
    twins
        .update_tags("dev-1", &merge(json!({"owner": "ops"})), None, at(2))
        .expect("tags");
    let seen = twins.get("dev-1").expect("twin").desired_version();
    // While the device is offline, two desired changes.
    twins
        .update_desired("dev-1", &merge(json!({"mode": "eco"})), None, at(3))
        .expect("d");
    twins
        .update_desired("dev-1", &merge(json!({"rate": 20})), None, at(4))
        .expect("d");
    let view = twins.get("dev-1").expect("twin").device_view(Some(seen));
    assert!(view.missed_desired_change);
    assert_eq!(Value::Object(view.delta.clone()), json!({"mode": "eco", "rate": 20}));
    // Created at 1, tags at 2, desired at 3 and 4.
    assert_eq!(view.version, 4);
    assert_eq!(view.desired_version, 4);
    let text = format!("{view:?}");
    assert!(!text.contains("owner"), "tags leaked into the device view: {text}");
    let up_to_date = twins.get("dev-1").expect("twin").device_view(Some(4));
    assert!(!up_to_date.missed_desired_change);
    assert_eq!(up_to_date.delta, view.delta, "still the full current delta");
}

#[test]
fn reconciliation_follows_acknowledgements_and_reported_values() {
    let mut twins = fleet_with("dev-1", json!({"rate": 10, "mode": "eco", "fw": "2.0"}));
    let state = |twins: &Twins, key: &str| {
        twins
            .get("dev-1")
            .and_then(|t| t.reconciliation().get(key).map(|r| r.state))
    };
    assert_eq!(state(&twins, "rate"), Some(ReconciliationState::Pending));

    // Reported matching the desired value: succeeded.
    twins
        .update_reported("dev-1", &merge(json!({"rate": 10})), None, at(1_500), None)
        .expect("r");
    assert_eq!(state(&twins, "rate"), Some(ReconciliationState::Succeeded));
    let rate = twins
        .get("dev-1")
        .and_then(|t| t.reconciliation().get("rate").cloned())
        .expect("rate");
    assert_eq!(rate.convergence_time(), Some(Duration::from_millis(1_499)));

    // 202 in progress keeps pending, then 200 done succeeds.
    twins
        .acknowledge("dev-1", &[ack("mode", 202, 1)], None, at(2_000))
        .expect("ack");
    assert_eq!(state(&twins, "mode"), Some(ReconciliationState::Pending));
    twins
        .acknowledge("dev-1", &[ack("mode", 200, 1)], None, at(2_500))
        .expect("ack");
    assert_eq!(state(&twins, "mode"), Some(ReconciliationState::Succeeded));
    let stored = twins
        .get("dev-1")
        .and_then(|t| t.acknowledgements().get("mode").cloned())
        .expect("ack");
    assert_eq!((stored.status, stored.version, stored.received_at), (200, 1, at(2_500)));

    // 4xx fails.
    let mut rejected = ack("fw", 400, 1);
    rejected.description = "unsupported firmware".to_owned();
    twins.acknowledge("dev-1", &[rejected], None, at(3_000)).expect("ack");
    assert_eq!(state(&twins, "fw"), Some(ReconciliationState::Failed));
    assert_eq!(
        twins.get("dev-1").map(Twin::reconciliation_state),
        Some(ReconciliationState::Failed)
    );

    // A new desired value starts pending again; an ack of the old version does not resolve it.
    let version = twins
        .update_desired("dev-1", &merge(json!({"fw": "2.1"})), None, at(4_000))
        .expect("d")
        .version;
    assert_eq!(state(&twins, "fw"), Some(ReconciliationState::Pending));
    twins
        .acknowledge("dev-1", &[ack("fw", 200, 1)], None, at(4_100))
        .expect("stale ack");
    assert_eq!(state(&twins, "fw"), Some(ReconciliationState::Pending));
    twins
        .acknowledge("dev-1", &[ack("fw", 200, version)], None, at(4_200))
        .expect("ack");
    assert_eq!(state(&twins, "fw"), Some(ReconciliationState::Succeeded));

    // Drift: a succeeded key whose reported value moves away is pending again.
    twins
        .update_reported("dev-1", &merge(json!({"rate": 11})), None, at(5_000), None)
        .expect("r");
    assert_eq!(state(&twins, "rate"), Some(ReconciliationState::Pending));

    // Bad acknowledgements change nothing.
    let before = twins.clone();
    let current = twins.get("dev-1").map(Twin::version).expect("version");
    for (bad, field) in [
        (ack("nope", 200, 1), "acknowledgements.nope"),
        (ack("rate", 302, 1), "acknowledgements.rate.status"),
        (ack("rate", 200, current + 1), "acknowledgements.rate.version"),
    ] {
        let error = twins.acknowledge("dev-1", &[bad], None, at(6_000)).expect_err(field);
        assert_eq!((error.code(), error.field()), (ErrorCode::InvalidArgument, Some(field)));
    }
    let error = twins
        .acknowledge("dev-1", &[ack("rate", 200, 1), ack("rate", 200, 1)], None, at(6_000))
        .expect_err("twice");
    assert_eq!(error.code(), ErrorCode::InvalidArgument);
    let mut long = ack("rate", 200, 1);
    long.description = "d".repeat(513);
    let error = twins.acknowledge("dev-1", &[long], None, at(6_000)).expect_err("long");
    assert_eq!(error.code(), ErrorCode::ResourceExhausted);
    assert_eq!(error.field(), Some("acknowledgements.rate.description"));
    assert_eq!(twins, before);
}

#[test]
fn fleet_convergence_time_is_first_pending_to_last_success() {
    let mut twins = Twins::new(Limits::default());
    for (index, id) in ["a", "b", "c"].into_iter().enumerate() {
        twins.create(new_twin(id, json!({})), at(0)).expect("create");
        let start = 1_000 + 100 * index as u64;
        twins
            .update_desired(id, &merge(json!({"fw": "3"})), None, at(start))
            .expect("rollout");
    }
    let fleet = twins.convergence(Some("fw"), |_| true);
    assert_eq!((fleet.keys, fleet.pending, fleet.converged()), (3, 3, false));
    twins
        .update_reported("a", &merge(json!({"fw": "3"})), None, at(1_500), None)
        .expect("a");
    twins
        .update_reported("b", &merge(json!({"fw": "3"})), None, at(4_000), None)
        .expect("b");
    let fleet = twins.convergence(Some("fw"), |_| true);
    assert_eq!((fleet.succeeded, fleet.pending, fleet.convergence_time), (2, 1, None));
    twins
        .update_reported("c", &merge(json!({"fw": "3"})), None, at(2_200), None)
        .expect("c");
    let fleet = twins.convergence(Some("fw"), |_| true);
    assert!(fleet.converged());
    assert_eq!(fleet.convergence_time, Some(Duration::from_millis(3_000)));
    assert_eq!(fleet.slowest_key, Some(Duration::from_millis(2_900)));
    let only_a = twins.convergence(None, |twin| twin.id() == "a");
    assert_eq!(only_a.convergence_time, Some(Duration::from_millis(500)));
}

// ---------------------------------------------------------------------------------------------
// Durability.
// ---------------------------------------------------------------------------------------------

fn persist(store: &Store, twins: &Twins, id: &str) {
    let batch = WriteBatch::put(twins.get(id).expect("live twin")).expect("encode");
    store.write_blocking(batch).expect("commit");
}

#[test]
fn restart_restores_every_twin_version_tag_metadata_ack_reconciliation_and_tombstone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data/twin.redb");
    let (store, mut twins) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("open");
    assert!(twins.is_empty());
    for id in ["dev-1", "dev-2", "gone"] {
        twins
            .create(new_twin(id, json!({"rate": 10, "cfg": {"a": [1, 2]}})), at(1))
            .expect("create");
        persist(&store, &twins, id);
    }
    twins
        .update_tags("dev-1", &merge(json!({"site": "plant-7"})), None, at(2))
        .expect("tags");
    twins
        .update_reported(
            "dev-1",
            &merge(json!({"rate": 10, "temp": 21.5})),
            None,
            at(3),
            Some(at(2)),
        )
        .expect("reported");
    twins
        .acknowledge("dev-1", &[ack("cfg", 400, 1)], None, at(4))
        .expect("ack");
    persist(&store, &twins, "dev-1");
    let deleted = twins.delete("gone", None).expect("delete");
    let mut batch = WriteBatch::new();
    batch.delete_twin("gone", deleted);
    store.write_blocking(batch).expect("commit");
    store.close();
    drop(store);

    let (store, restored) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("reopen");
    assert_eq!(restored, twins, "everything restored");
    assert_eq!(restored.high_water("gone"), Some(deleted));
    let dev1 = restored.get("dev-1").expect("dev-1");
    assert_eq!(
        dev1.metadata().reported.get(&["temp"]).and_then(|m| m.source_time),
        Some(at(2))
    );
    assert_eq!(
        dev1.reconciliation().get("cfg").map(|r| r.state),
        Some(ReconciliationState::Failed)
    );
    assert_eq!(
        dev1.reconciliation().get("rate").map(|r| r.state),
        Some(ReconciliationState::Succeeded)
    );

    // The version high-water survives the restart: a re-created id continues after it.
    let mut restored = restored;
    let recreated = restored
        .create(new_twin("gone", json!({})), at(9))
        .expect("recreate")
        .version();
    assert_eq!(recreated, deleted + 1);
    persist(&store, &restored, "gone");
    store.close();
    let (_store, again) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("reopen");
    assert_eq!(again.get("gone").map(Twin::version), Some(deleted + 1));
    assert_eq!(again.tombstones().count(), 0);
}

#[test]
fn group_commit_batches_concurrent_writers_into_fewer_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twin.redb");
    let (store, mut twins) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("open");
    let writers = 16;
    let writes_per_writer = 40;
    for writer in 0..writers {
        twins
            .create(new_twin(&format!("dev-{writer}"), json!({})), at(1))
            .expect("create");
    }
    let twins = Arc::new(Mutex::new(twins));
    let threads: Vec<_> = (0..writers)
        .map(|writer| {
            let store = store.clone();
            let twins = Arc::clone(&twins);
            std::thread::spawn(move || {
                let id = format!("dev-{writer}");
                for counter in 0..writes_per_writer {
                    let batch = {
                        let mut twins = twins.lock().expect("lock");
                        let patch = merge(json!({ "counter": counter }));
                        twins
                            .update_reported(&id, &patch, None, at(2 + counter), None)
                            .expect("update");
                        WriteBatch::put(twins.get(&id).expect("twin")).expect("encode")
                    };
                    store.write_blocking(batch).expect("commit");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer");
    }
    let stats = store.stats();
    let total = writers * writes_per_writer;
    assert_eq!(stats.writes, total);
    assert!(stats.commits < total, "{stats:?}: no write shared a commit");
    assert!(stats.largest_commit > 1, "{stats:?}");

    // Submitted without waiting, many writes share a commit deterministically... (the committer
    // takes whatever is queued when it starts a commit).
    let before = store.stats().commits;
    let twins = twins.lock().expect("lock");
    let pending: Vec<_> = (0..200)
        .map(|_| store.try_submit(WriteBatch::put(twins.get("dev-0").expect("twin")).expect("encode")))
        .collect::<Result<_, _>>()
        .expect("submit");
    for write in pending {
        write.wait_blocking().expect("commit");
    }
    let commits = store.stats().commits - before;
    assert!(commits < 200, "200 queued writes took {commits} commits");
    store.close();
    let (_store, restored) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("reopen");
    assert_eq!(&restored, &*twins);
}

#[test]
fn one_by_one_mode_commits_every_write_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        max_batch: 1,
        ..StoreOptions::default()
    };
    let (store, mut twins) = Store::open(&dir.path().join("twin.redb"), options, Limits::default()).expect("open");
    twins.create(new_twin("dev-0", json!({})), at(1)).expect("create");
    let pending: Vec<_> = (0..20)
        .map(|_| store.try_submit(WriteBatch::put(twins.get("dev-0").expect("twin")).expect("encode")))
        .collect::<Result<_, _>>()
        .expect("submit");
    for write in pending {
        assert_eq!(write.wait_blocking().expect("commit").writes_in_commit, 1);
    }
    assert_eq!(store.stats().commits, 20);
    store.close();
    let error = store.write_blocking(WriteBatch::new()).expect_err("closed");
    assert!(matches!(error, twin_server::store::StoreError::Closed), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Crash: SIGKILL a writer mid-stream; every acknowledged write must be there after reopening.
// ---------------------------------------------------------------------------------------------

const CRASH_CHILD_ENV: &str = "TWIN_STORE_CRASH_CHILD_DB";

/// The child half of `sigkill_keeps_every_acknowledged_write`: does nothing unless the parent
/// set the environment variable. Writes forever (bounded: 60 s) from four threads, printing each
/// acknowledged write: a twin update and, in the same write, a telemetry batch whose bytes are
/// the counter.
#[test]
fn crash_child_writer() {
    let Ok(path) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let (store, mut twins) = Store::open(Path::new(&path), StoreOptions::default(), Limits::default()).expect("open");
    for writer in 0..4 {
        twins
            .create(new_twin(&format!("crash-{writer}"), json!({})), at(1))
            .expect("create");
    }
    let twins = Arc::new(Mutex::new(twins));
    let deadline = Instant::now() + Duration::from_secs(60);
    let threads: Vec<_> = (0..4)
        .map(|writer| {
            let store = store.clone();
            let twins = Arc::clone(&twins);
            std::thread::spawn(move || {
                let id = format!("crash-{writer}");
                let mut counter = 0_u64;
                while Instant::now() < deadline {
                    counter += 1;
                    let (mut batch, version) = {
                        let mut twins = twins.lock().expect("lock");
                        let patch = merge(json!({ "counter": counter }));
                        let outcome = twins
                            .update_reported(&id, &patch, None, at(counter), None)
                            .expect("update");
                        (
                            WriteBatch::put(twins.get(&id).expect("twin")).expect("encode"),
                            outcome.version,
                        )
                    };
                    batch.put_telemetry(&id, counter.to_le_bytes().to_vec(), 0);
                    store.write_blocking(batch).expect("commit");
                    println!("ack {id} {version} {counter}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer");
    }
}

#[test]
fn sigkill_keeps_every_acknowledged_write() {
    if std::env::var(CRASH_CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.redb");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child_writer", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    // Acknowledged (version, counter) per twin: the latest of each, since each writer is sequential.
    let mut acknowledged: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut acks = 0;
    let record = |line: &str, acknowledged: &mut BTreeMap<String, (u64, u64)>| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let ["ack", id, version, counter] = fields[..] {
            let version: u64 = version.parse().expect("version");
            let counter: u64 = counter.parse().expect("counter");
            let entry = acknowledged.entry(id.to_owned()).or_default();
            *entry = (entry.0.max(version), entry.1.max(counter));
            return true;
        }
        false
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks < 400 && Instant::now() < deadline {
        match received.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => acks += usize::from(record(&line, &mut acknowledged)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    assert!(acks >= 400, "the child acknowledged only {acks} writes");
    child.kill().expect("SIGKILL"); // `Child::kill` sends SIGKILL on Unix.
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child was killed: {status}");
    // Lines printed before the kill were acknowledged too.
    reader.join().expect("reader");
    for line in received.try_iter() {
        acks += usize::from(record(&line, &mut acknowledged));
    }

    let (store, twins) = Store::open(&path, StoreOptions::default(), Limits::default()).expect("reopen");
    assert_eq!(acknowledged.len(), 4);
    for (id, (version, counter)) in &acknowledged {
        let twin = twins.get(id).unwrap_or_else(|| panic!("{id} lost"));
        assert!(
            twin.version() >= *version,
            "{id}: acknowledged version {version}, found {}",
            twin.version()
        );
        let stored = twin.reported().get("counter").and_then(Value::as_u64).unwrap_or(0);
        assert!(
            stored >= *counter,
            "{id}: acknowledged counter {counter}, found {stored}"
        );
        // Each writer waits for every acknowledgement, so telemetry 1..=counter was acknowledged
        // (and a later one may have been committed without its acknowledgement being printed).
        let telemetry = store
            .read_telemetry(id, 0, u64::MAX, usize::MAX)
            .expect("read telemetry");
        let stored: Vec<Vec<u8>> = telemetry.iter().map(|entry| entry.batch.clone()).collect();
        let acknowledged: Vec<Vec<u8>> = (1..=*counter).map(|n: u64| n.to_le_bytes().to_vec()).collect();
        assert!(
            stored.len() >= acknowledged.len() && stored[..acknowledged.len()] == acknowledged[..],
            "{id}: acknowledged telemetry 1..={counter} lost or changed ({} stored)",
            stored.len()
        );
        assert!(
            telemetry.windows(2).all(|pair| pair[0].stored_at < pair[1].stored_at),
            "{id}: storage times do not increase"
        );
    }
    store.close();
    eprintln!("{acks} acknowledged writes all present after SIGKILL");
}

// ---------------------------------------------------------------------------------------------
// Seeded random operations: no panic, refused changes change nothing, accepted ones take exactly
// the next version, the state survives a JSON round trip (what the store writes).
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const KEYS: [&str; 10] = ["a", "b", "c", "rate", "mode", "cfg", "x.y", "$v", "", "s p"];

fn random_value(rng: &mut Rng, depth: u32, in_array: bool) -> Value {
    let choice = if depth >= 13 { rng.below(5) } else { rng.below(9) };
    match choice {
        0 if !in_array || rng.below(20) == 0 => Value::Null,
        0 | 1 => json!(rng.below(5)),
        2 => json!(rng.below(5) as f64 / 2.0),
        3 => json!(["on", "off"][rng.below(2) as usize]),
        4 => json!(rng.below(2) == 0),
        5 | 6 => {
            let mut object = Map::new();
            for _ in 0..rng.below(4) {
                let key = KEYS[rng.below(KEYS.len() as u64) as usize];
                object.insert(key.to_owned(), random_value(rng, depth + 1, in_array));
            }
            Value::Object(object)
        }
        _ => Value::Array((0..rng.below(3)).map(|_| random_value(rng, depth + 1, true)).collect()),
    }
}

fn random_patch(rng: &mut Rng) -> SectionPatch {
    if rng.below(30) == 0 {
        return SectionPatch::Clear;
    }
    match random_value(rng, 1, false) {
        Value::Object(object) => SectionPatch::Merge(object),
        other => SectionPatch::Merge(object(json!({ "v": other }))),
    }
}

#[test]
fn seeded_random_operations_keep_the_invariants() {
    let seed = std::env::var("TWIN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0004_u64);
    eprintln!("seed {seed} (set TWIN_SEED to replay)");
    let mut rng = Rng(seed | 1);
    let limits = Limits {
        max_desired_bytes: 600,
        max_reported_bytes: 600,
        max_tags_bytes: 200,
        ..Limits::default()
    };
    let mut twins = Twins::new(limits);
    let ids = ["d0", "d1", "d2"];
    let (mut accepted, mut refused) = (0, 0);
    for step in 0..5_000_u64 {
        let id = ids[rng.below(3) as usize];
        let now = at(step + 10);
        let current = twins.get(id).map(Twin::version);
        let expected = match rng.below(4) {
            0 => current.map(|v| v.saturating_sub(1)),
            1 => current,
            _ => None,
        };
        let before = twins.clone();
        let result: Result<u64, TwinError> = match rng.below(8) {
            0 => twins.create(new_twin(id, json!({"rate": 1})), now).map(Twin::version),
            1 if rng.below(4) == 0 => twins.delete(id, expected),
            2 => twins
                .update_tags(id, &random_patch(&mut rng), expected, now)
                .map(|o| o.version),
            3 => {
                let keys: Vec<String> = twins
                    .get(id)
                    .map(|t| t.desired().keys().cloned().collect())
                    .unwrap_or_default();
                let key = keys
                    .get(rng.below(keys.len() as u64 + 1) as usize)
                    .cloned()
                    .unwrap_or("nope".to_owned());
                let status = [200, 202, 203, 400, 500, 302][rng.below(6) as usize];
                let version = current.unwrap_or(0).saturating_sub(rng.below(3));
                twins.acknowledge(id, &[ack(&key, status, version)], expected, now)
            }
            4 | 5 => twins
                .update_desired(id, &random_patch(&mut rng), expected, now)
                .map(|o| o.version),
            _ => twins
                .update_reported(id, &random_patch(&mut rng), expected, now, Some(at(step)))
                .map(|o| o.version),
        };
        match result {
            Ok(version) => {
                accepted += 1;
                let high_water = before.high_water(id).unwrap_or(0);
                assert_eq!(
                    version,
                    high_water + 1,
                    "step {step}: versions go up by one, never reused"
                );
            }
            Err(error) => {
                refused += 1;
                assert_eq!(twins, before, "step {step}: refused ({error}) but changed");
            }
        }
        for twin in twins.iter() {
            assert!(json_size_ok(twin, &limits), "step {step}: limits hold");
            let (reconciliation, desired) = (twin.reconciliation(), twin.desired());
            let reconciled: Vec<&String> = reconciliation.keys().collect();
            let desired: Vec<&String> = desired.keys().collect();
            assert_eq!(reconciled, desired, "step {step}: one reconciliation per desired key");
            let stored = twin.encode().expect("encode");
            let back = Twin::decode(&stored).expect("decode");
            assert_eq!(&back, twin, "step {step}: stored form round trip");
        }
    }
    assert!(
        accepted > 500 && refused > 500,
        "accepted {accepted}, refused {refused}"
    );
}

fn json_size_ok(twin: &Twin, limits: &Limits) -> bool {
    let size = |map: &Map<String, Value>| serde_json::to_vec(map).map(|v| v.len() as u64).unwrap_or(u64::MAX);
    size(&twin.desired()) <= limits.max_desired_bytes
        && size(&twin.reported()) <= limits.max_reported_bytes
        && size(&twin.tags()) <= limits.max_tags_bytes
}
