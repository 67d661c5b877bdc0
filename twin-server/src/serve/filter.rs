//! TwinFilter, checked once when a request arrives and then matched against published twins.

use serde_json::{Map, Value};
use tonic::Status;
use twin_proto::v1 as pb;

use super::convert::{invalid_argument, reconciliation_state};
use super::snapshot::PublishedTwin;
use crate::twins::json_equal;

/// A validated TwinFilter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    device_ids: Vec<String>,
    groups: Vec<String>,
    tags: Vec<(Vec<String>, Option<Value>)>,
    model_name: String,
    model_version: Option<u32>,
    reconciliation_state: Option<pb::ReconciliationState>,
    inference_divergence: Option<bool>,
    connected: Option<bool>,
}

/// The most criteria of each kind a filter may hold.
const MAX_CRITERIA: usize = 1000;

impl Filter {
    /// Checks a filter; `field` is its place in the request (`filter`).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a tag path that is not a JSON Pointer, a tag value that is not JSON,
    /// an unknown reconciliation state, or more than 1000 criteria of one kind.
    pub fn new(field: &str, filter: Option<pb::TwinFilter>) -> Result<Self, Status> {
        let Some(filter) = filter else {
            return Ok(Filter::default());
        };
        for (name, count) in [
            ("device_ids", filter.device_ids.len()),
            ("groups", filter.groups.len()),
            ("tags", filter.tags.len()),
        ] {
            if count > MAX_CRITERIA {
                return Err(invalid_argument(
                    &format!("{field}.{name}"),
                    format!("{count} entries, at most {MAX_CRITERIA}"),
                ));
            }
        }
        let mut tags = Vec::with_capacity(filter.tags.len());
        for (index, tag) in filter.tags.iter().enumerate() {
            let Some(rest) = tag.path.strip_prefix('/') else {
                return Err(invalid_argument(
                    &format!("{field}.tags[{index}].path"),
                    format!("{:?} is not a JSON Pointer: it must start with '/'", tag.path),
                ));
            };
            let path = rest
                .split('/')
                .map(|part| part.replace("~1", "/").replace("~0", "~"))
                .collect();
            let value = match &tag.value_json {
                None => None,
                Some(text) => Some(serde_json::from_str::<Value>(text).map_err(|error| {
                    invalid_argument(
                        &format!("{field}.tags[{index}].value_json"),
                        format!("not valid JSON: {error}"),
                    )
                })?),
            };
            tags.push((path, value));
        }
        let reconciliation_state = match pb::ReconciliationState::try_from(filter.reconciliation_state) {
            Ok(pb::ReconciliationState::Unspecified) => None,
            Ok(state) => Some(state),
            Err(_) => {
                return Err(invalid_argument(
                    &format!("{field}.reconciliation_state"),
                    format!("unknown value {}", filter.reconciliation_state),
                ));
            }
        };
        Ok(Filter {
            device_ids: filter.device_ids,
            groups: filter.groups,
            tags,
            model_name: filter.model_name,
            model_version: filter.model_version,
            reconciliation_state,
            inference_divergence: filter.inference_divergence,
            connected: filter.connected,
        })
    }

    /// Whether every criterion holds for this twin.
    pub fn matches(&self, published: &PublishedTwin) -> bool {
        let twin = &published.twin;
        if !self.device_ids.is_empty() && !self.device_ids.iter().any(|id| id == twin.id()) {
            return false;
        }
        let group = twin.group().unwrap_or_default();
        if !self.groups.is_empty() && !self.groups.iter().any(|wanted| wanted == group) {
            return false;
        }
        let tags = if self.tags.is_empty() { Map::new() } else { twin.tags() };
        for (path, value) in &self.tags {
            match (pointer(&tags, path), value) {
                (None, _) => return false,
                (Some(found), Some(wanted)) if !json_equal(found, wanted) => return false,
                _ => {}
            }
        }
        if !self.model_name.is_empty() || self.model_version.is_some() {
            let reported = twin.reported();
            let model = reported.get("model").and_then(Value::as_object);
            let name = model.and_then(|model| model.get("name")).and_then(Value::as_str);
            let version = model.and_then(|model| model.get("version")).and_then(Value::as_u64);
            if !self.model_name.is_empty() && name != Some(self.model_name.as_str()) {
                return false;
            }
            if let Some(wanted) = self.model_version
                && version != Some(u64::from(wanted))
            {
                return false;
            }
        }
        if let Some(state) = self.reconciliation_state
            && reconciliation_state(twin.reconciliation_state()) != state
        {
            return false;
        }
        if let Some(divergent) = self.inference_divergence
            && twin.inference().inference_divergence() != divergent
        {
            return false;
        }
        if let Some(connected) = self.connected
            && published.connection.connected != connected
        {
            return false;
        }
        true
    }
}

/// The value at a JSON Pointer's tokens inside a document.
fn pointer<'a>(document: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = document.get(first)?;
    for token in rest {
        value = match value {
            Value::Object(object) => object.get(token)?,
            Value::Array(items) => items.get(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}
