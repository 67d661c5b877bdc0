//! The one place where twin.v1 protobuf types meet the domain: JSON text in and out, times,
//! twins, reconciliation, and the mapping of domain errors onto gRPC status codes.

use std::collections::HashMap;

use serde_json::{Map, Value};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use twin_proto::v1 as pb;

use super::snapshot::PublishedTwin;
use crate::twins::{self, MetadataNode, Reconciliation, Section, SectionPatch, Timestamp, Twin, TwinError};

/// Domain of the google.rpc.ErrorInfo details the server attaches.
pub const ERROR_DOMAIN: &str = "twin.v1";

/// The gRPC status of a refused twin operation: the domain's code, its message (with the field
/// path), and google.rpc details (BadRequest for a field, ErrorInfo with the versions or limit).
pub fn twin_status(error: &TwinError) -> Status {
    let message = error.to_string();
    match error {
        TwinError::InvalidArgument { field, reason } => Status::with_error_details(
            Code::InvalidArgument,
            message,
            ErrorDetails::with_bad_request_violation(field.clone(), reason.clone()),
        ),
        TwinError::NotFound { twin_id } => Status::with_error_details(
            Code::NotFound,
            message,
            ErrorDetails::with_error_info("TWIN_NOT_FOUND", ERROR_DOMAIN, info([("device_id", twin_id.clone())])),
        ),
        TwinError::AlreadyExists { twin_id, version } => Status::with_error_details(
            Code::AlreadyExists,
            message,
            ErrorDetails::with_error_info(
                "TWIN_ALREADY_EXISTS",
                ERROR_DOMAIN,
                info([("device_id", twin_id.clone()), ("current_version", version.to_string())]),
            ),
        ),
        TwinError::VersionConflict {
            twin_id,
            expected,
            current,
        } => Status::with_error_details(
            Code::Aborted,
            message,
            ErrorDetails::with_error_info(
                "VERSION_CONFLICT",
                ERROR_DOMAIN,
                info([
                    ("device_id", twin_id.clone()),
                    ("expected_version", expected.to_string()),
                    ("current_version", current.to_string()),
                ]),
            ),
        ),
        TwinError::LimitExceeded {
            field,
            limit,
            actual,
            max,
        } => Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_error_info(
                "LIMIT_EXCEEDED",
                ERROR_DOMAIN,
                info([
                    ("field", field.clone()),
                    ("limit", limit.name().to_owned()),
                    ("actual", actual.to_string()),
                    ("max", max.to_string()),
                ]),
            ),
        ),
    }
}

/// INVALID_ARGUMENT for a request field, with a BadRequest violation.
pub fn invalid_argument(field: &str, reason: impl Into<String>) -> Status {
    let reason = reason.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

fn info<const N: usize>(pairs: [(&str, String); N]) -> HashMap<String, String> {
    pairs.into_iter().map(|(key, value)| (key.to_owned(), value)).collect()
}

/// Parses a section patch sent as JSON text: an object merges, `null` clears. The text is
/// measured before it is parsed: longer than the section's limit is RESOURCE_EXHAUSTED.
///
/// # Errors
/// `InvalidArgument` (empty, not JSON, not an object or null) or `LimitExceeded`, on `field`.
pub fn parse_patch(
    field: &str,
    text: &str,
    section: Section,
    limits: &twins::Limits,
) -> Result<SectionPatch, TwinError> {
    let value = parse_document_text(field, text, section, limits)?;
    SectionPatch::from_json(field, value)
}

/// Parses an initial document (CreateTwin): empty text is `{}`, otherwise a JSON object.
///
/// # Errors
/// As [`parse_patch`]; `null` is refused too.
pub fn parse_document(
    field: &str,
    text: &str,
    section: Section,
    limits: &twins::Limits,
) -> Result<Map<String, Value>, TwinError> {
    if text.is_empty() {
        return Ok(Map::new());
    }
    match parse_document_text(field, text, section, limits)? {
        Value::Object(object) => Ok(object),
        _ => Err(invalid(field, "must be a JSON object")),
    }
}

fn parse_document_text(field: &str, text: &str, section: Section, limits: &twins::Limits) -> Result<Value, TwinError> {
    if text.is_empty() {
        return Err(invalid(field, "empty: send a JSON object, or null to clear"));
    }
    let (max, limit) = limits.section_bytes(section);
    let size = text.len() as u64;
    if size > max {
        return Err(TwinError::LimitExceeded {
            field: field.to_owned(),
            limit,
            actual: size,
            max,
        });
    }
    // serde_json refuses nesting deeper than 128 levels, so parsing is bounded on any input; the
    // configured depth limit is checked on the parsed patch by the domain.
    serde_json::from_str(text).map_err(|error| invalid(field, format!("not valid JSON: {error}")))
}

fn invalid(field: &str, reason: impl Into<String>) -> TwinError {
    TwinError::InvalidArgument {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// A domain time as a protobuf Timestamp.
pub fn timestamp(time: Timestamp) -> prost_types::Timestamp {
    let nanos = time.unix_nanos();
    prost_types::Timestamp {
        seconds: i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(nanos % 1_000_000_000).unwrap_or(0),
    }
}

/// A protobuf Timestamp as a domain time.
///
/// # Errors
/// `InvalidArgument` on `field` for a time before 1970 or nanos outside `0..1e9`.
pub fn from_timestamp(field: &str, time: &prost_types::Timestamp) -> Result<Timestamp, TwinError> {
    let seconds = u64::try_from(time.seconds).map_err(|_| invalid(field, "must not be before 1970"))?;
    let nanos = u64::try_from(time.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .ok_or_else(|| invalid(field, format!("nanos {} is outside 0..1000000000", time.nanos)))?;
    seconds
        .checked_mul(1_000_000_000)
        .and_then(|whole| whole.checked_add(nanos))
        .map(Timestamp::from_unix_nanos)
        .ok_or_else(|| invalid(field, "is too far in the future"))
}

/// Wall-clock nanoseconds as the signed value DesiredDelta carries.
pub fn unix_nanos_i64(time: Timestamp) -> i64 {
    i64::try_from(time.unix_nanos()).unwrap_or(i64::MAX)
}

/// A JSON object as compact text.
pub fn json_text(object: &Map<String, Value>) -> String {
    // Serializing a Map of Values cannot fail (string keys, no custom Serialize).
    serde_json::to_string(object).unwrap_or_else(|_| "{}".to_owned())
}

/// The domain's reconciliation state as the protobuf enum.
pub fn reconciliation_state(state: twins::ReconciliationState) -> pb::ReconciliationState {
    match state {
        twins::ReconciliationState::Pending => pb::ReconciliationState::Pending,
        twins::ReconciliationState::Succeeded => pb::ReconciliationState::Succeeded,
        twins::ReconciliationState::Failed => pb::ReconciliationState::Failed,
    }
}

/// Reconciliation entries of `twin` as messages, each with its key's last acknowledgement (the
/// acknowledgements are decoded once, and only when there is an entry).
pub fn key_reconciliations<'a>(
    twin: &Twin,
    entries: impl IntoIterator<Item = (&'a String, &'a Reconciliation)>,
) -> Vec<pb::KeyReconciliation> {
    let mut entries = entries.into_iter().peekable();
    if entries.peek().is_none() {
        return Vec::new();
    }
    let acknowledgements = twin.acknowledgements();
    entries
        .map(|(key, entry)| {
            let last_ack = acknowledgements.get(key).map(|ack| pb::DesiredAck {
                key: key.clone(),
                status_code: i32::from(ack.status),
                acknowledged_version: ack.version,
                description: ack.description.clone(),
            });
            pb::KeyReconciliation {
                key: key.clone(),
                state: reconciliation_state(entry.state) as i32,
                desired_version: entry.desired_version,
                last_ack,
                pending_since: Some(timestamp(entry.pending_since)),
                resolved_at: entry.resolved_at.map(timestamp),
            }
        })
        .collect()
}

/// The model a twin reports it runs: reported `"model"` as `{name, version, sha256}`.
pub fn reported_model(reported: &Map<String, Value>) -> Option<pb::ModelRef> {
    let model = reported.get("model")?.as_object()?;
    Some(pb::ModelRef {
        name: model.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
        version: model
            .get("version")
            .and_then(Value::as_u64)
            .and_then(|version| u32::try_from(version).ok())
            .unwrap_or(0),
        sha256: model
            .get("sha256")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    })
}

/// A model reference as the JSON object kept under reported `"model"`.
pub fn model_json(model: &pb::ModelRef) -> Value {
    let mut object = Map::new();
    object.insert("name".to_owned(), Value::from(model.name.clone()));
    object.insert("version".to_owned(), Value::from(model.version));
    if !model.sha256.is_empty() {
        object.insert("sha256".to_owned(), Value::from(model.sha256.clone()));
    }
    Value::Object(object)
}

/// A twin's live inference check as the protobuf InferenceCheck.
pub fn inference_check(check: &twins::InferenceCheck) -> pb::InferenceCheck {
    pb::InferenceCheck {
        checked: check.checked,
        agreed: check.agreed,
        diverged: check.diverged,
        inference_divergence: check.inference_divergence(),
        max_abs_error: check.max_abs_error,
        last_divergence_at: check.last_divergence_at.map(timestamp),
    }
}

/// A published twin as the protobuf Twin, in the BASIC or FULL view.
pub fn twin_message(published: &PublishedTwin, full: bool) -> pb::Twin {
    let twin = &published.twin;
    let connection = &published.connection;
    let mut message = pb::Twin {
        device_id: twin.id().to_owned(),
        group: twin.group().unwrap_or_default().to_owned(),
        version: twin.version(),
        revision: published.revision,
        reconciliation_state: reconciliation_state(twin.reconciliation_state()) as i32,
        reported_model: reported_model(&twin.reported()),
        inference: Some(inference_check(twin.inference())),
        connection: Some(pb::Connection {
            connected: connection.connected,
            since: connection.since.map(timestamp),
            last_desired_version: connection.last_desired_version,
        }),
        created_at: Some(timestamp(twin.created_at())),
        updated_at: Some(timestamp(twin.updated_at())),
        ..pb::Twin::default()
    };
    if full {
        let documents = twin.documents();
        message.desired_json = json_text(&documents.desired);
        message.reported_json = json_text(&documents.reported);
        message.delta_json = json_text(&twins::delta(&documents.desired, &documents.reported));
        message.tags_json = json_text(&documents.tags);
        let mut desired_metadata = Vec::new();
        leaf_metadata(
            &documents.desired,
            &documents.metadata.desired,
            &mut String::new(),
            &mut desired_metadata,
        );
        message.desired_metadata = desired_metadata;
        let mut reported_metadata = Vec::new();
        leaf_metadata(
            &documents.reported,
            &documents.metadata.reported,
            &mut String::new(),
            &mut reported_metadata,
        );
        message.reported_metadata = reported_metadata;
        message.reconciliation = key_reconciliations(twin, &documents.reconciliation);
    }
    message
}

/// Every leaf of a document (a scalar, an array or an empty object) with its metadata, as JSON
/// Pointers. The version of each leaf's change is not tracked by the domain and is sent as 0.
fn leaf_metadata(
    document: &Map<String, Value>,
    metadata: &MetadataNode,
    pointer: &mut String,
    out: &mut Vec<pb::LeafMetadata>,
) {
    for (key, value) in document {
        let length = pointer.len();
        pointer.push('/');
        pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
        let node = metadata.children.get(key);
        match value {
            Value::Object(object) if !object.is_empty() => {
                let empty = MetadataNode::default();
                leaf_metadata(object, node.unwrap_or(&empty), pointer, out);
            }
            _ => out.push(pb::LeafMetadata {
                path: pointer.clone(),
                updated_at: node.map(|node| timestamp(node.last_updated)),
                source_time: node.and_then(|node| node.source_time).map(timestamp),
                version: 0,
            }),
        }
        pointer.truncate(length);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_text_is_measured_before_parsing_and_must_be_an_object_or_null() {
        let limits = twins::Limits {
            max_desired_bytes: 8,
            ..twins::Limits::default()
        };
        let long = parse_patch("patch_json", r#"{"abcdefgh": 1}"#, Section::Desired, &limits);
        assert!(matches!(long, Err(TwinError::LimitExceeded { .. })), "{long:?}");
        let clear = parse_patch("patch_json", "null", Section::Desired, &limits);
        assert_eq!(clear, Ok(SectionPatch::Clear));
        let array = parse_patch("patch_json", "[1]", Section::Desired, &limits).expect_err("array");
        assert_eq!(array.field(), Some("patch_json"));
        let broken = parse_patch("patch_json", "{", Section::Desired, &limits).expect_err("broken");
        assert!(broken.to_string().starts_with("patch_json: not valid JSON"), "{broken}");
    }

    #[test]
    fn timestamps_round_trip_and_bad_ones_are_refused() {
        let time = Timestamp::from_unix_nanos(1_700_000_000_123_456_789);
        assert_eq!(from_timestamp("t", &timestamp(time)), Ok(time));
        let negative = prost_types::Timestamp { seconds: -1, nanos: 0 };
        assert!(from_timestamp("t", &negative).is_err());
        let bad_nanos = prost_types::Timestamp {
            seconds: 1,
            nanos: 1_000_000_000,
        };
        assert!(from_timestamp("t", &bad_nanos).is_err());
        let huge = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert!(from_timestamp("t", &huge).is_err());
    }

    #[test]
    fn a_version_conflict_carries_the_current_version_in_its_details() {
        let status = twin_status(&TwinError::VersionConflict {
            twin_id: "d".to_owned(),
            expected: 1,
            current: 4,
        });
        assert_eq!(status.code(), Code::Aborted);
        let details = status.get_details_error_info().expect("error info");
        assert_eq!(details.metadata.get("current_version").map(String::as_str), Some("4"));
    }
}
