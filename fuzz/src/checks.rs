//! Invariants of the twin document rules (`twin_server::twins`) and of the protobuf-to-domain
//! conversion (`twin_server::serve::convert` and the request checks beside it), driven by
//! arbitrary bytes. Every check panics on a violation; nothing here may panic otherwise.
//!
//! Shared, as one file, by the cargo-fuzz targets (`fuzz/fuzz_targets/`, through the `twin-fuzz`
//! library) and by `twin-server/tests/fuzz_invariants.rs`, which includes it with `#[path]` and
//! runs it over `fuzz/corpus/` and over seeded random inputs, so CI checks the same invariants
//! without a fuzzer.
//!
//! Inputs:
//! - [`document_ops`]: text, one operation per line (see [`Op`]): the first line is the desired
//!   document of a new twin, then patches, deletes, acknowledgements and "converge" steps.
//! - [`convert_ops`]: a sequence of records `kind (1 byte) | length (2 bytes, little endian) |
//!   protobuf bytes`, each decoded as the request its kind names and handled the way the gRPC
//!   handlers and the engine do.

use std::sync::Arc;

use prost::Message;
use serde_json::{Map, Value};
use twin_proto::v1 as pb;
use twin_server::serve::convert::{from_timestamp, parse_document, parse_patch, timestamp, twin_message, twin_status};
use twin_server::serve::filter::Filter;
use twin_server::serve::snapshot::{ConnectionState, PublishedTwin};
use twin_server::serve::telemetry_service::{BatchPath, check_batch};
use twin_server::twins::{
    DesiredAck, ErrorCode, Limits, MetadataNode, NewTwin, ReconciliationState, Section, SectionPatch, Timestamp, Twin,
    TwinError, Twins, delta, json_equal, json_size, value_delta,
};

/// Small limits, so that inputs a fuzzer finds quickly reach every limit.
pub const LIMITS: Limits = Limits {
    max_desired_bytes: 2048,
    max_reported_bytes: 2048,
    max_tags_bytes: 512,
    max_depth: 6,
    max_key_bytes: 24,
    max_id_bytes: 24,
    max_description_bytes: 64,
};

/// Most operations run per input (the rest is ignored), so each input stays fast.
const MAX_OPS: usize = 48;

/// The twin the document operations act on.
const TWIN_ID: &str = "dev-1";

/// One line of a [`document_ops`] input: its first character says what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `d`: a desired merge patch (also any line starting with another character: the whole line).
    Desired,
    /// `r`: a reported merge patch.
    Reported,
    /// `t`: a tags merge patch.
    Tags,
    /// `D`, `R`, `T`: the same with a stale expected version: must be ABORTED, nothing changes.
    Stale(Section),
    /// `x`: delete the twin and create it again with this desired document.
    Recreate,
    /// `a`: acknowledgements, a JSON array of `[key, status, version, description]`.
    Acks,
    /// `c`: the device applies the whole current delta as its reported patch.
    Converge,
}

impl Op {
    fn parse(line: &str) -> (Op, &str) {
        let mut chars = line.chars();
        let op = match chars.next() {
            Some('d') => Op::Desired,
            Some('r') => Op::Reported,
            Some('t') => Op::Tags,
            Some('D') => Op::Stale(Section::Desired),
            Some('R') => Op::Stale(Section::Reported),
            Some('T') => Op::Stale(Section::Tags),
            Some('x') => Op::Recreate,
            Some('a') => Op::Acks,
            Some('c') => Op::Converge,
            _ => return (Op::Desired, line),
        };
        (op, chars.as_str())
    }
}

/// The registry under test and what the checks need to remember about it.
struct World {
    twins: Twins,
    clock: u64,
    /// Whether an acknowledgement was accepted since the twin was created: acknowledgements may
    /// resolve a key whose reported value does not match, so the reconciliation invariant holds
    /// only without them.
    acknowledged: bool,
}

impl World {
    fn new() -> World {
        World {
            twins: Twins::new(LIMITS),
            clock: 1_000_000_000,
            acknowledged: false,
        }
    }

    fn now(&mut self) -> Timestamp {
        self.clock += 1_000;
        Timestamp::from_unix_nanos(self.clock)
    }

    /// Creates the twin from desired JSON text, as CreateTwin does; an empty twin if the text is
    /// refused (the refusal changing nothing).
    fn create(&mut self, desired_text: &str) {
        let before = self.twins.clone();
        let high_water = self.twins.high_water(TWIN_ID);
        let now = self.now();
        let desired = match parse_document("desired_json", desired_text, Section::Desired, &LIMITS) {
            Ok(desired) => desired,
            Err(error) => {
                check_refusal(&error, &[ErrorCode::InvalidArgument, ErrorCode::ResourceExhausted]);
                Map::new()
            }
        };
        let new = NewTwin {
            id: TWIN_ID.to_owned(),
            group: Some("fuzz".to_owned()),
            tags: Map::new(),
            desired: desired.clone(),
        };
        let created = self.twins.create(new, now).map(|twin| twin.version());
        let version = match created {
            Ok(version) => version,
            Err(error) => {
                check_refusal(&error, &[ErrorCode::InvalidArgument, ErrorCode::ResourceExhausted]);
                assert_eq!(self.twins, before, "a refused create changed the registry: {error}");
                let empty = NewTwin {
                    id: TWIN_ID.to_owned(),
                    ..NewTwin::default()
                };
                match self.twins.create(empty, now) {
                    Ok(twin) => twin.version(),
                    Err(error) => panic!("an empty twin was refused: {error}"),
                }
            }
        };
        assert_eq!(
            version,
            high_water.unwrap_or(0) + 1,
            "a created twin's version must be one past the id's high-water mark"
        );
        self.acknowledged = false;
        let twin = self.twin();
        assert_eq!(twin.desired_version(), version);
        let reconciliation = twin.reconciliation();
        for key in twin.desired().keys() {
            assert!(
                reconciliation.contains_key(key),
                "created key {key:?} has no reconciliation"
            );
        }
    }

    fn twin(&self) -> &Twin {
        match self.twins.get(TWIN_ID) {
            Some(twin) => twin,
            None => panic!("the twin is gone"),
        }
    }

    fn step(&mut self, line: &str) {
        let (op, rest) = Op::parse(line);
        match op {
            Op::Desired => self.patch(Section::Desired, rest, None),
            Op::Reported => self.patch(Section::Reported, rest, None),
            Op::Tags => self.patch(Section::Tags, rest, None),
            Op::Stale(section) => {
                let current = self.twin().version();
                let stale = if rest.len() % 2 == 0 {
                    current.saturating_sub(1)
                } else {
                    current + 1
                };
                self.patch(section, rest, Some(stale));
            }
            Op::Recreate => {
                let before = self.twin().version();
                match self.twins.delete(TWIN_ID, None) {
                    Ok(version) => assert_eq!(version, before + 1, "a delete takes the next version"),
                    Err(error) => panic!("delete refused: {error}"),
                }
                assert!(self.twins.get(TWIN_ID).is_none());
                assert_eq!(self.twins.high_water(TWIN_ID), Some(before + 1));
                self.create(rest);
            }
            Op::Acks => self.acks(rest),
            Op::Converge => self.converge(),
        }
        check_twin(self.twin(), !self.acknowledged);
    }

    fn patch(&mut self, section: Section, text: &str, expected: Option<u64>) {
        let patch = match parse_patch("patch_json", text, section, &LIMITS) {
            Ok(patch) => patch,
            Err(error) => {
                check_refusal(&error, &[ErrorCode::InvalidArgument, ErrorCode::ResourceExhausted]);
                assert!(
                    matches!(&error, TwinError::InvalidArgument { .. })
                        || text.len() as u64 > LIMITS.section_bytes(section).0,
                    "parse_patch: a size refusal for text within the limit: {error}"
                );
                return;
            }
        };
        self.apply(section, &patch, expected);
    }

    /// Applies a parsed patch and checks the outcome against a reference merge.
    fn apply(&mut self, section: Section, patch: &SectionPatch, expected: Option<u64>) -> bool {
        let before = self.twins.clone();
        let old = self.twin().clone();
        let now = self.now();
        let outcome = match section {
            Section::Desired => self.twins.update_desired(TWIN_ID, patch, expected, now),
            Section::Reported => self.twins.update_reported(TWIN_ID, patch, expected, now, None),
            Section::Tags => self.twins.update_tags(TWIN_ID, patch, expected, now),
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                if expected.is_some_and(|expected| expected != old.version()) {
                    assert!(
                        matches!(error, TwinError::VersionConflict { .. }),
                        "a stale expected version must be ABORTED first, got {error}"
                    );
                } else {
                    check_refusal(&error, &[ErrorCode::InvalidArgument, ErrorCode::ResourceExhausted]);
                }
                assert_eq!(self.twins, before, "a refused update changed the registry: {error}");
                return false;
            }
        };
        assert!(
            expected.is_none_or(|expected| expected == old.version()),
            "an update with a stale expected version was accepted"
        );
        let twin = self.twin();
        assert_eq!(
            outcome.version,
            old.version() + 1,
            "an accepted change takes the next version"
        );
        assert_eq!(twin.version(), outcome.version);
        let expected_section = reference_merge(&old.section(section), patch);
        assert_eq!(
            twin.section(section),
            expected_section,
            "the merge differs from RFC 7386 for patch {patch:?} on {:?}",
            old.section(section)
        );
        for other in [Section::Desired, Section::Reported, Section::Tags] {
            if other != section {
                assert_eq!(
                    twin.section(other),
                    old.section(other),
                    "a patch of one section changed another"
                );
            }
        }
        match section {
            Section::Desired => {
                assert_eq!(twin.desired_version(), outcome.version);
                assert_eq!(twin.reported_version(), old.reported_version());
            }
            Section::Reported => {
                assert_eq!(twin.reported_version(), outcome.version);
                assert_eq!(twin.desired_version(), old.desired_version());
            }
            Section::Tags => {
                assert_eq!(twin.desired_version(), old.desired_version());
                assert_eq!(twin.reported_version(), old.reported_version());
                assert!(outcome.delta.is_none(), "a tags update produced a delta notification");
            }
        }
        if section != Section::Tags {
            let current = twin.delta();
            let due = (!current.is_empty()).then_some(current);
            assert_eq!(
                outcome.delta, due,
                "the delta notification must be the whole current delta, when not empty"
            );
        }
        true
    }

    fn acks(&mut self, text: &str) {
        let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let mut acks = Vec::new();
        for item in items.iter().take(8) {
            let fields = item.as_array().map(Vec::as_slice).unwrap_or_default();
            let key = fields.first().and_then(Value::as_str).unwrap_or_default();
            let status = fields.get(1).and_then(Value::as_u64).unwrap_or(200);
            let version = fields.get(2).and_then(Value::as_u64).unwrap_or(0);
            let description = fields.get(3).and_then(Value::as_str).unwrap_or_default();
            acks.push(DesiredAck {
                key: key.to_owned(),
                status: u16::try_from(status).unwrap_or(u16::MAX),
                version,
                description: description.to_owned(),
            });
        }
        let before = self.twins.clone();
        let old_version = self.twin().version();
        let now = self.now();
        match self.twins.acknowledge(TWIN_ID, &acks, None, now) {
            Ok(version) => {
                assert_eq!(version, old_version + 1, "an acknowledgement takes the next version");
                let twin = self.twin();
                for (key, ack) in twin.acknowledgements() {
                    assert!(
                        twin.desired().contains_key(&key),
                        "acknowledgement of {key:?}, not in desired"
                    );
                    assert!(
                        ack.version <= version,
                        "acknowledged version {} is from the future",
                        ack.version
                    );
                }
                self.acknowledged = true;
            }
            Err(error) => {
                check_refusal(&error, &[ErrorCode::InvalidArgument, ErrorCode::ResourceExhausted]);
                assert_eq!(
                    self.twins, before,
                    "refused acknowledgements changed the registry: {error}"
                );
            }
        }
    }

    /// The device applies the delta it was sent: afterwards desired and reported agree.
    fn converge(&mut self) {
        let current = self.twin().delta();
        if current.is_empty() {
            return;
        }
        let patch = SectionPatch::Merge(current.clone());
        if self.apply(Section::Reported, &patch, None) {
            let twin = self.twin();
            assert!(
                twin.delta().is_empty(),
                "reporting the delta {current:?} left a delta {:?}",
                twin.delta()
            );
            if !self.acknowledged {
                assert_eq!(twin.reconciliation_state(), ReconciliationState::Succeeded);
            }
        }
    }
}

/// Runs the document operations of `data` (text, one operation per line; see [`Op`]).
pub fn document_ops(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    for line in text.split('\n').take(MAX_OPS) {
        check_json_text(line);
        check_json_text(Op::parse(line).1);
    }
    let mut world = World::new();
    world.create(lines.next().unwrap_or_default());
    check_twin(world.twin(), true);
    for line in lines.take(MAX_OPS) {
        world.step(line);
    }
}

/// Pure checks of the delta and equality on any JSON text that parses.
fn check_json_text(text: &str) {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    assert!(json_equal(&value, &value), "json_equal is not reflexive on {value}");
    let reparsed: Value = match serde_json::to_string(&value).map(|text| serde_json::from_str(&text)) {
        Ok(Ok(reparsed)) => reparsed,
        other => panic!("{value} does not round-trip through its text: {other:?}"),
    };
    assert_eq!(value, reparsed, "serde_json round trip changed the value");
    assert_eq!(value_delta(&value, Some(&value)), None, "a value differs from itself");
    if let Value::Object(object) = &value {
        assert!(
            delta(object, object).is_empty(),
            "the delta of a document with itself is not empty"
        );
        assert_eq!(
            json_size(object),
            serde_json::to_string(object).map_or(0, |text| text.len() as u64)
        );
    }
    if let Value::Array(items) = &value {
        // Equality must agree with an exact reference on every pair of these values.
        for left in items.iter().take(8) {
            for right in items.iter().take(8) {
                assert_eq!(
                    json_equal(left, right),
                    reference_equal(left, right),
                    "json_equal({left}, {right}) disagrees with comparing the numbers' exact values"
                );
                assert_eq!(
                    json_equal(left, right),
                    json_equal(right, left),
                    "json_equal is not symmetric"
                );
            }
        }
    }
}

/// A refused operation: its code is one of `allowed`, it maps onto the matching gRPC status, and
/// its field path (if any) is not empty.
fn check_refusal(error: &TwinError, allowed: &[ErrorCode]) {
    assert!(allowed.contains(&error.code()), "unexpected refusal {error:?}");
    let status = twin_status(error);
    let expected = match error.code() {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorCode::Aborted => tonic::Code::Aborted,
        ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
    };
    assert_eq!(status.code(), expected, "{error} maps onto {:?}", status.code());
    if let Some(field) = error.field() {
        assert!(!field.is_empty(), "{error:?} has an empty field path");
    }
}

/// Every invariant of a twin at rest. `reconciliation_follows_delta`: no acknowledgement was
/// accepted, so each desired key has succeeded exactly when it is in sync.
pub fn check_twin(twin: &Twin, reconciliation_follows_delta: bool) {
    let metadata = twin.metadata();
    for section in [Section::Desired, Section::Reported, Section::Tags] {
        let document = twin.section(section);
        check_document(section.name(), &document);
        let (max, _) = LIMITS.section_bytes(section);
        assert!(
            json_size(&document) <= max,
            "{} is larger than its limit",
            section.name()
        );
        let node = match section {
            Section::Desired => &metadata.desired,
            Section::Reported => &metadata.reported,
            Section::Tags => &metadata.tags,
        };
        check_metadata(section.name(), &document, node);
    }
    assert!(twin.desired_version() <= twin.version() && twin.reported_version() <= twin.version());

    // The delta, by the AWS rules, against a reference walk.
    let desired = twin.desired();
    let reported = twin.reported();
    let current = twin.delta();
    assert_eq!(current, delta(&desired, &reported));
    assert_eq!(current, reference_delta(&desired, &reported), "delta rules");
    check_delta_leaves("delta", &current, &desired, Some(&reported));
    let view = twin.device_view(Some(twin.desired_version()));
    assert_eq!(view.delta, current, "the device view carries the whole current delta");
    assert!(!view.missed_desired_change);

    // Reconciliation: one entry per top-level desired key.
    let reconciliation = twin.reconciliation();
    let keys: Vec<&String> = desired.keys().collect();
    let reconciled: Vec<&String> = reconciliation.keys().collect();
    assert_eq!(keys, reconciled, "reconciliation must have exactly the desired keys");
    if reconciliation_follows_delta {
        for (key, entry) in &reconciliation {
            let in_sync = !current.contains_key(key);
            assert_eq!(
                entry.state == ReconciliationState::Succeeded,
                in_sync,
                "key {key:?} is {:?} but {} the delta",
                entry.state,
                if in_sync { "not in" } else { "in" }
            );
        }
    }

    // Persistence: the twin survives its stored form (the store's row) unchanged.
    let bytes = match twin.encode() {
        Ok(bytes) => bytes,
        Err(error) => panic!("a twin does not encode: {error}"),
    };
    match Twin::decode(&bytes) {
        Ok(restored) => assert_eq!(&restored, twin, "a twin changed through its stored form"),
        Err(error) => panic!("a stored twin does not decode: {error}"),
    }

    // The protobuf view: documents as JSON text that reads back, leaf metadata that resolves.
    let published = PublishedTwin {
        twin: Arc::new(twin.clone()),
        revision: 7,
        connection: ConnectionState::default(),
    };
    let message = twin_message(&published, true);
    let tags = twin.tags();
    for (name, text, document) in [
        ("desired_json", &message.desired_json, &desired),
        ("reported_json", &message.reported_json, &reported),
        ("delta_json", &message.delta_json, &current),
        ("tags_json", &message.tags_json, &tags),
    ] {
        match serde_json::from_str::<Map<String, Value>>(text) {
            Ok(parsed) => assert_eq!(&parsed, document, "{name} does not read back as the document"),
            Err(error) => panic!("{name} is not a JSON object: {error}: {text}"),
        }
    }
    let desired = Value::Object(desired);
    for leaf in &message.desired_metadata {
        assert!(
            desired.pointer(&leaf.path).is_some(),
            "desired_metadata path {:?} does not resolve",
            leaf.path
        );
    }
}

/// Keys, values and depth of a stored section: valid keys, no null anywhere, depth within the
/// limit.
fn check_document(path: &str, document: &Map<String, Value>) {
    assert!(
        depth_of_object(document) <= LIMITS.max_depth,
        "{path} is deeper than max_depth"
    );
    check_values(path, document);
}

fn check_values(path: &str, object: &Map<String, Value>) {
    for (key, value) in object {
        if let Err(error) = LIMITS.check_key(path, key) {
            panic!("a stored key breaks the key rules: {error}");
        }
        check_value(&format!("{path}.{key}"), value);
    }
}

fn check_value(path: &str, value: &Value) {
    match value {
        Value::Null => panic!("{path}: a stored section holds null"),
        Value::Object(object) => check_values(path, object),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                check_value(&format!("{path}[{index}]"), item);
            }
        }
        _ => {}
    }
}

/// The section's own object is level 1; each object or array inside adds one.
fn depth_of_object(object: &Map<String, Value>) -> u32 {
    1 + object.values().map(depth_of_value).max().unwrap_or(0)
}

fn depth_of_value(value: &Value) -> u32 {
    match value {
        Value::Object(object) => depth_of_object(object),
        Value::Array(items) => 1 + items.iter().map(depth_of_value).max().unwrap_or(0),
        _ => 0,
    }
}

/// The metadata tree mirrors the section: a node per key, children exactly for objects.
fn check_metadata(path: &str, object: &Map<String, Value>, node: &MetadataNode) {
    let keys: Vec<&String> = object.keys().collect();
    let children: Vec<&String> = node.children.keys().collect();
    assert_eq!(keys, children, "{path}: metadata children differ from the keys");
    for (key, value) in object {
        let Some(child) = node.children.get(key) else {
            continue;
        };
        assert!(
            child.last_updated <= node.last_updated,
            "{path}.{key} is newer than its parent"
        );
        match value {
            Value::Object(inner) => check_metadata(&format!("{path}.{key}"), inner, child),
            _ => assert!(child.children.is_empty(), "{path}.{key}: a leaf with metadata children"),
        }
    }
}

/// RFC 7386, written independently of the server's merge: the result of `patch` on `target`.
fn reference_merge(target: &Map<String, Value>, patch: &SectionPatch) -> Map<String, Value> {
    match patch {
        SectionPatch::Clear => Map::new(),
        SectionPatch::Merge(keys) => match merge_value(Value::Object(target.clone()), &Value::Object(keys.clone())) {
            Value::Object(merged) => merged,
            _ => Map::new(),
        },
    }
}

/// RFC 7386 section 2's MergePatch(Target, Patch), as pseudo-code there.
fn merge_value(target: Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut target = match target {
        Value::Object(object) => object,
        _ => Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            target.remove(name);
        } else {
            let current = target.remove(name).unwrap_or(Value::Null);
            target.insert(name.clone(), merge_value(current, value));
        }
    }
    Value::Object(target)
}

/// The AWS delta rules, written as the documentation states them, with exact number equality.
fn reference_delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, wanted) in desired {
        let difference = match (wanted, reported.get(key)) {
            (_, None) => Some(wanted.clone()),
            (Value::Object(inner), Some(Value::Object(has))) => Some(Value::Object(reference_delta(inner, has)))
                .filter(|nested| nested.as_object().is_some_and(|nested| !nested.is_empty())),
            (_, Some(has)) => (!reference_equal(wanted, has)).then(|| wanted.clone()),
        };
        if let Some(difference) = difference {
            out.insert(key.clone(), difference);
        }
    }
    out
}

/// Every delta leaf is the desired value at its path, and the reported value there is missing or
/// different.
fn check_delta_leaves(
    path: &str,
    delta: &Map<String, Value>,
    desired: &Map<String, Value>,
    reported: Option<&Map<String, Value>>,
) {
    for (key, value) in delta {
        let Some(wanted) = desired.get(key) else {
            panic!("{path}.{key} is in the delta but not in desired");
        };
        let has = reported.and_then(|reported| reported.get(key));
        match (value, wanted, has) {
            (Value::Object(nested), Value::Object(inner), Some(Value::Object(has))) => {
                assert!(
                    !nested.is_empty(),
                    "{path}.{key}: an empty object in the delta of two objects"
                );
                check_delta_leaves(&format!("{path}.{key}"), nested, inner, Some(has));
            }
            _ => {
                assert_eq!(value, wanted, "{path}.{key}: a delta leaf must be the desired value");
                assert!(
                    has.is_none_or(|has| !json_equal(wanted, has)),
                    "{path}.{key}: in the delta but reported has it"
                );
            }
        }
    }
}

/// JSON equality with numbers compared by their exact values (the documented rule), independent
/// of `json_equal`'s implementation.
fn reference_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => exact_number(left) == exact_number(right),
        (Value::Array(left), Value::Array(right)) => {
            left.len() == right.len() && left.iter().zip(right).all(|(left, right)| reference_equal(left, right))
        }
        (Value::Object(left), Value::Object(right)) => {
            left.len() == right.len()
                && left
                    .iter()
                    .all(|(key, value)| right.get(key).is_some_and(|other| reference_equal(value, other)))
        }
        _ => left == right,
    }
}

/// A number's exact value: an integer when it is one (floats included), else the float's bits.
#[derive(Debug, PartialEq)]
enum Exact {
    Integer(i128),
    Fraction(u64),
}

fn exact_number(number: &serde_json::Number) -> Exact {
    if let Some(integer) = number.as_i64() {
        return Exact::Integer(i128::from(integer));
    }
    if let Some(integer) = number.as_u64() {
        return Exact::Integer(i128::from(integer));
    }
    let float = number.as_f64().unwrap_or(f64::NAN);
    // Every float with no fractional part below 2^127 is an integer i128 holds exactly.
    if float.fract() == 0.0 && float.abs() < 1.7e38 {
        return Exact::Integer(float as i128);
    }
    // -0.0 == 0.0 is handled above (both integral); other floats compare by value.
    Exact::Fraction(float.to_bits())
}

/// Runs the protobuf records of `data` (see the module documentation) against a registry, as the
/// handlers and the engine would, and checks every twin after each.
pub fn convert_ops(data: &[u8]) {
    let mut twins = Twins::new(LIMITS);
    let mut acknowledged = false;
    let mut clock = 1_000_000_000u64;
    let mut rest = data;
    for _ in 0..MAX_OPS {
        let [kind, low, high, tail @ ..] = rest else {
            break;
        };
        let length = usize::from(u16::from_le_bytes([*low, *high])).min(tail.len());
        let (body, next) = tail.split_at(length);
        rest = next;
        clock += 1_000;
        let now = Timestamp::from_unix_nanos(clock);
        let before = twins.clone();
        let refused = match kind % 8 {
            0 => pb::CreateTwinRequest::decode(body)
                .ok()
                .and_then(|request| create(&mut twins, request, now).err()),
            1 => pb::UpdateDesiredRequest::decode(body).ok().and_then(|request| {
                let patch = parse_patch("patch_json", &request.patch_json, Section::Desired, &LIMITS);
                patch
                    .and_then(|patch| twins.update_desired(&request.device_id, &patch, request.expected_version, now))
                    .err()
            }),
            2 => pb::UpdateTagsRequest::decode(body).ok().and_then(|request| {
                let patch = parse_patch("patch_json", &request.patch_json, Section::Tags, &LIMITS);
                patch
                    .and_then(|patch| twins.update_tags(&request.device_id, &patch, request.expected_version, now))
                    .err()
            }),
            3 => pb::DeviceMessage::decode(body)
                .ok()
                .and_then(|message| device_message(&mut twins, message, now, &mut acknowledged).err()),
            4 => pb::DeleteTwinRequest::decode(body)
                .ok()
                .and_then(|request| twins.delete(&request.device_id, request.expected_version).err()),
            5 => {
                if let Ok(request) = pb::ListTwinsRequest::decode(body) {
                    filter(&twins, request.filter);
                }
                None
            }
            6 => {
                if let Ok(request) = pb::WatchRequest::decode(body) {
                    filter(&twins, request.filter);
                }
                None
            }
            _ => {
                if let Ok(batch) = pb::TelemetryBatch::decode(body) {
                    telemetry(&twins, &batch);
                }
                None
            }
        };
        if let Some(error) = refused {
            check_refusal(
                &error,
                &[
                    ErrorCode::InvalidArgument,
                    ErrorCode::ResourceExhausted,
                    ErrorCode::NotFound,
                    ErrorCode::AlreadyExists,
                    ErrorCode::Aborted,
                ],
            );
            assert_eq!(twins, before, "a refused request changed the registry: {error}");
        }
        for twin in twins.iter() {
            check_twin(twin, !acknowledged);
        }
    }
}

/// CreateTwin: the id, group and both documents checked, then created.
fn create(twins: &mut Twins, request: pb::CreateTwinRequest, now: Timestamp) -> Result<(), TwinError> {
    let desired = parse_document("desired_json", &request.desired_json, Section::Desired, &LIMITS)?;
    let tags = parse_document("tags_json", &request.tags_json, Section::Tags, &LIMITS)?;
    let new = NewTwin {
        id: request.device_id,
        group: Some(request.group).filter(|group| !group.is_empty()),
        tags,
        desired,
    };
    let id = new.id.clone();
    let version = twins.create(new, now)?.version();
    assert!(twins.get(&id).is_some_and(|twin| twin.version() == version));
    Ok(())
}

/// A DeviceSync message of the stream of device `dev-1` (Hello's device id for a Hello).
fn device_message(
    twins: &mut Twins,
    message: pb::DeviceMessage,
    now: Timestamp,
    acknowledged: &mut bool,
) -> Result<(), TwinError> {
    use pb::device_message::Body;
    match message.body {
        Some(Body::Reported(reported)) => {
            let patch = parse_patch("reported.patch_json", &reported.patch_json, Section::Reported, &LIMITS)?;
            let source = match &reported.source_time {
                Some(time) => {
                    check_timestamp(time.seconds, time.nanos);
                    Some(from_timestamp("reported.source_time", time)?)
                }
                None => None,
            };
            twins.update_reported(TWIN_ID, &patch, None, now, source)?;
        }
        Some(Body::Acks(acks)) => {
            let mut converted = Vec::new();
            for ack in acks.acks {
                let Ok(status) = u16::try_from(ack.status_code) else {
                    return Ok(());
                };
                converted.push(DesiredAck {
                    key: ack.key,
                    status,
                    version: ack.acknowledged_version,
                    description: ack.description,
                });
            }
            twins.acknowledge(TWIN_ID, &converted, None, now)?;
            *acknowledged = true;
        }
        Some(Body::Hello(hello)) => {
            LIMITS.check_id("device_id", &hello.device_id)?;
            if let Some(model) = &hello.model {
                let json = twin_server::serve::engine::hello_model(Some(model));
                assert_eq!(json.is_some(), !model.name.is_empty());
            }
        }
        Some(Body::Telemetry(batch)) => telemetry(twins, &batch),
        Some(Body::Inference(_)) | None => {}
    }
    Ok(())
}

/// A TwinFilter: checked, then matched against every twin (no panic, and an id filter matches
/// only its ids).
fn filter(twins: &Twins, filter: Option<pb::TwinFilter>) {
    let ids = filter
        .as_ref()
        .map(|filter| filter.device_ids.clone())
        .unwrap_or_default();
    let Ok(checked) = Filter::new("filter", filter) else {
        return;
    };
    for twin in twins.iter_shared() {
        let published = PublishedTwin {
            twin: Arc::clone(twin),
            revision: 1,
            connection: ConnectionState::default(),
        };
        if checked.matches(&published) && !ids.is_empty() {
            assert!(ids.iter().any(|id| id == twin.id()), "an id filter matched another id");
        }
    }
}

/// A telemetry batch: checked; an accepted one names a live twin and has finite values.
fn telemetry(twins: &Twins, batch: &pb::TelemetryBatch) {
    let result = check_batch(batch, BatchPath::Stream(3), &LIMITS, |id| twins.get(id).is_some());
    match result {
        Ok(samples) => {
            let id = batch
                .stamp
                .as_ref()
                .map(|stamp| stamp.device_id.as_str())
                .unwrap_or_default();
            assert!(twins.get(id).is_some(), "a batch of an unknown device was accepted");
            let mut expected: u64 = 0;
            for series in &batch.sensors {
                for channel in &series.channels {
                    assert!(channel.values.iter().all(|value| value.is_finite()));
                    assert_eq!(channel.values.len(), series.offsets_nanos.len());
                }
                expected = expected
                    .saturating_add((series.offsets_nanos.len() as u64).saturating_mul(series.channels.len() as u64));
            }
            assert_eq!(samples, expected);
        }
        Err(error) => {
            check_refusal(&error, &[ErrorCode::InvalidArgument, ErrorCode::NotFound]);
            if let Some(field) = error.field() {
                assert!(field.starts_with("batches[3]."), "field {field:?} not under the batch");
            }
        }
    }
}

/// Timestamps: any protobuf time either converts and converts back to itself, or is refused.
pub fn check_timestamp(seconds: i64, nanos: i32) {
    let time = prost_types::Timestamp { seconds, nanos };
    if let Ok(converted) = from_timestamp("t", &time) {
        assert_eq!(timestamp(converted), time, "a timestamp did not round-trip");
    }
}

/// One record of a [`convert_ops`] input.
pub fn record(kind: u8, message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let length = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut out = vec![kind];
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Seed inputs for [`convert_ops`]: one realistic session of each request kind, named.
pub fn convert_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let create = pb::CreateTwinRequest {
        device_id: TWIN_ID.to_owned(),
        group: "g".to_owned(),
        desired_json: r#"{"rate":10,"cfg":{"mode":"eco","l":[1,2]}}"#.to_owned(),
        tags_json: r#"{"site":"a"}"#.to_owned(),
    };
    let desired = pb::UpdateDesiredRequest {
        device_id: TWIN_ID.to_owned(),
        patch_json: r#"{"rate":20,"cfg":{"mode":null,"x":1.5}}"#.to_owned(),
        expected_version: Some(1),
    };
    let stale = pb::UpdateDesiredRequest {
        device_id: TWIN_ID.to_owned(),
        patch_json: r#"{"rate":30}"#.to_owned(),
        expected_version: Some(1),
    };
    let tags = pb::UpdateTagsRequest {
        device_id: TWIN_ID.to_owned(),
        patch_json: r#"{"site":null,"floor":2}"#.to_owned(),
        expected_version: None,
    };
    let reported = pb::DeviceMessage {
        sequence: 1,
        body: Some(pb::device_message::Body::Reported(pb::ReportedPatch {
            patch_json: r#"{"rate":20.0,"cfg":{"l":[1,2],"x":1.5}}"#.to_owned(),
            source_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
        })),
    };
    let acks = pb::DeviceMessage {
        sequence: 2,
        body: Some(pb::device_message::Body::Acks(pb::DesiredAcks {
            acks: vec![pb::DesiredAck {
                key: "rate".to_owned(),
                status_code: 200,
                acknowledged_version: 2,
                description: "done".to_owned(),
            }],
        })),
    };
    let hello = pb::DeviceMessage {
        sequence: 0,
        body: Some(pb::device_message::Body::Hello(pb::Hello {
            device_id: TWIN_ID.to_owned(),
            last_desired_version: 1,
            model: Some(pb::ModelRef {
                name: "m".to_owned(),
                version: 2,
                sha256: String::new(),
            }),
            group: "g".to_owned(),
            firmware: "1.0".to_owned(),
        })),
    };
    let list = pb::ListTwinsRequest {
        filter: Some(pb::TwinFilter {
            device_ids: vec![TWIN_ID.to_owned()],
            tags: vec![pb::TagMatch {
                path: "/floor".to_owned(),
                value_json: Some("2.0".to_owned()),
            }],
            reconciliation_state: 1,
            ..pb::TwinFilter::default()
        }),
        page_size: 10,
        ..pb::ListTwinsRequest::default()
    };
    let watch = pb::WatchRequest {
        filter: Some(pb::TwinFilter {
            groups: vec!["g".to_owned()],
            model_name: "m".to_owned(),
            model_version: Some(2),
            ..pb::TwinFilter::default()
        }),
        after_revision: Some(3),
        ..pb::WatchRequest::default()
    };
    let batch = pb::TelemetryBatch {
        stamp: Some(pb::BatchStamp {
            device_id: TWIN_ID.to_owned(),
            sequence: 1,
            ..pb::BatchStamp::default()
        }),
        sensors: vec![pb::SensorSeries {
            sensor: "t".to_owned(),
            offsets_nanos: vec![0, 10, 10],
            channels: vec![pb::ChannelValues {
                values: vec![1.0, 2.0, 3.0],
                ..pb::ChannelValues::default()
            }],
            ..pb::SensorSeries::default()
        }],
    };
    let delete = pb::DeleteTwinRequest {
        device_id: TWIN_ID.to_owned(),
        expected_version: None,
    };
    let session = [
        record(0, &create),
        record(3, &hello),
        record(1, &desired),
        record(1, &stale),
        record(2, &tags),
        record(3, &reported),
        record(3, &acks),
        record(5, &list),
        record(6, &watch),
        record(7, &batch),
        record(4, &delete),
        record(0, &create),
    ]
    .concat();
    vec![
        ("session", session),
        ("create", record(0, &create)),
        ("create-desired", [record(0, &create), record(1, &desired)].concat()),
        ("create-reported", [record(0, &create), record(3, &reported)].concat()),
        ("create-acks", [record(0, &create), record(3, &acks)].concat()),
        (
            "create-list",
            [record(0, &create), record(2, &tags), record(5, &list)].concat(),
        ),
        ("create-batch", [record(0, &create), record(7, &batch)].concat()),
        (
            "delete-create",
            [record(0, &create), record(4, &delete), record(0, &create)].concat(),
        ),
    ]
}

/// A random document-ops input from `seed` (a small JSON generator with keys and values chosen
/// to collide), for the seeded test that runs without a fuzzer.
pub fn random_document_input(seed: u64) -> String {
    let mut random = SplitMix(seed);
    let mut lines = vec![random_object(&mut random, 0).to_string()];
    let count = 1 + random.below(12);
    for _ in 0..count {
        let op = ["d", "r", "t", "D", "R", "x", "a", "c", "c", "d", "r"][random.below(11) as usize];
        let line = match op {
            "a" => format!(
                "a[[\"{}\",{},{}]]",
                KEYS[random.below(KEYS.len() as u64) as usize],
                [200, 202, 203, 400, 500, 302][random.below(6) as usize],
                random.below(6)
            ),
            "c" => "c".to_owned(),
            _ if random.below(10) == 0 => format!("{op}null"),
            _ => format!("{op}{}", random_patch(&mut random, 0)),
        };
        lines.push(line);
    }
    lines.join("\n")
}

const KEYS: [&str; 8] = ["a", "b", "cfg", "mode", "rate", "l", "x", "sub"];

fn random_object(random: &mut SplitMix, depth: u32) -> Value {
    let mut object = Map::new();
    for _ in 0..random.below(4) {
        let key = KEYS[random.below(KEYS.len() as u64) as usize];
        object.insert(key.to_owned(), random_value(random, depth + 1, false));
    }
    Value::Object(object)
}

fn random_patch(random: &mut SplitMix, depth: u32) -> Value {
    let mut object = Map::new();
    for _ in 0..random.below(4) {
        let key = KEYS[random.below(KEYS.len() as u64) as usize];
        object.insert(key.to_owned(), random_value(random, depth + 1, true));
    }
    Value::Object(object)
}

fn random_value(random: &mut SplitMix, depth: u32, in_patch: bool) -> Value {
    let choice = if depth > 7 { random.below(6) } else { random.below(10) };
    match choice {
        0 if in_patch => Value::Null,
        0 | 1 => Value::from(random.below(3)),
        2 => serde_json::Number::from_f64(random.below(3) as f64).map_or(Value::Null, Value::Number),
        3 => Value::from(["on", "off", "eco"][random.below(3) as usize]),
        4 => Value::Bool(random.below(2) == 0),
        5 => serde_json::Number::from_f64(0.5 + random.below(2) as f64).map_or(Value::Null, Value::Number),
        6 | 7 if in_patch => random_patch(random, depth),
        6 | 7 => random_object(random, depth),
        _ => Value::Array(
            (0..random.below(3))
                .map(|_| random_value(random, depth + 1, false))
                .collect(),
        ),
    }
}

/// SplitMix64: a tiny seeded generator, so the seeded test needs no dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}
