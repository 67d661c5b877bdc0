//! JSON merge patch (RFC 7386) of a section, keeping the per-leaf metadata in step.
//!
//! Only the keys named in the patch change; `null` deletes a key; an object merges into an
//! object (and replaces anything else); every other value, arrays included, replaces whole.

use serde_json::{Map, Value};

use super::metadata::{MetadataNode, Stamp};

/// A patch for one section: either keys to merge or `null`, which clears the whole section.
#[derive(Debug, Clone, PartialEq)]
pub enum SectionPatch {
    /// Merge these keys (JSON merge patch).
    Merge(Map<String, Value>),
    /// Clear the whole section (`"desired": null`).
    Clear,
}

impl SectionPatch {
    /// Reads a patch from JSON: an object merges, `null` clears.
    ///
    /// # Errors
    /// `InvalidArgument` on `field` for any other JSON value.
    pub fn from_json(field: &str, value: Value) -> Result<Self, super::TwinError> {
        match value {
            Value::Object(object) => Ok(SectionPatch::Merge(object)),
            Value::Null => Ok(SectionPatch::Clear),
            other => Err(super::TwinError::invalid(
                field,
                format!("must be an object or null, got {}", kind_of(&other)),
            )),
        }
    }
}

/// The JSON kind of a value, for messages.
pub(crate) const fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Applies `patch` to a section and its metadata. The patch must have been checked
/// ([`super::Limits::check_patch`]); this never fails.
pub(crate) fn apply(section: &mut Map<String, Value>, metadata: &mut MetadataNode, patch: &SectionPatch, stamp: Stamp) {
    match patch {
        SectionPatch::Merge(keys) => merge_object(section, metadata, keys, stamp),
        SectionPatch::Clear => {
            section.clear();
            *metadata = MetadataNode {
                last_updated: stamp.server,
                ..MetadataNode::default()
            };
        }
    }
}

fn merge_object(
    target: &mut Map<String, Value>,
    metadata: &mut MetadataNode,
    patch: &Map<String, Value>,
    stamp: Stamp,
) {
    metadata.last_updated = stamp.server;
    metadata.source_time = None;
    for (key, patch_value) in patch {
        match patch_value {
            Value::Null => {
                target.remove(key);
                metadata.children.remove(key);
            }
            Value::Object(patch_object) => {
                let slot = target.entry(key.clone()).or_insert(Value::Null);
                let child_metadata = metadata.children.entry(key.clone()).or_default();
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                    *child_metadata = MetadataNode::default();
                }
                if let Value::Object(child) = slot {
                    merge_object(child, child_metadata, patch_object, stamp);
                }
            }
            value => {
                target.insert(key.clone(), value.clone());
                metadata.children.insert(key.clone(), MetadataNode::leaf(stamp));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::time::Timestamp;
    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(object) => object,
            _ => Map::new(),
        }
    }

    fn stamp(nanos: u64) -> Stamp {
        Stamp {
            server: Timestamp::from_unix_nanos(nanos),
            source: None,
        }
    }

    #[test]
    fn rfc7386_examples() {
        // The examples of RFC 7386 section 3 whose target and patch are objects without nulls in arrays.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (json!({"a":"b","b":"c"}), json!({"a":null}), json!({"b":"c"})),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!({}), json!({"a":{"bb":{"ccc":null}}}), json!({"a":{"bb":{}}})),
            (json!({"a":"foo"}), json!({"a":{"b":1}}), json!({"a":{"b":1}})),
        ];
        for (target, patch, expected) in cases {
            let mut section = object(target);
            let mut metadata = MetadataNode::default();
            apply(
                &mut section,
                &mut metadata,
                &SectionPatch::Merge(object(patch.clone())),
                stamp(1),
            );
            assert_eq!(Value::Object(section), expected, "patch {patch}");
        }
    }

    #[test]
    fn metadata_dates_every_level_and_deletions() {
        let mut section = Map::new();
        let mut metadata = MetadataNode::default();
        let first = SectionPatch::Merge(object(json!({"a":{"b":1,"c":2},"d":3})));
        apply(&mut section, &mut metadata, &first, stamp(10));
        let second = SectionPatch::Merge(object(json!({"a":{"b":null}})));
        apply(&mut section, &mut metadata, &second, stamp(20));
        assert_eq!(metadata.last_updated, Timestamp::from_unix_nanos(20));
        assert_eq!(
            metadata.get(&["a"]).map(|n| n.last_updated),
            Some(Timestamp::from_unix_nanos(20))
        );
        assert!(metadata.get(&["a", "b"]).is_none());
        assert_eq!(
            metadata.get(&["a", "c"]).map(|n| n.last_updated),
            Some(Timestamp::from_unix_nanos(10))
        );
        assert_eq!(
            metadata.get(&["d"]).map(|n| n.last_updated),
            Some(Timestamp::from_unix_nanos(10))
        );
    }

    #[test]
    fn clear_empties_the_section() {
        let mut section = object(json!({"a":1}));
        let mut metadata = MetadataNode::default();
        apply(&mut section, &mut metadata, &SectionPatch::Clear, stamp(5));
        assert!(section.is_empty());
        assert!(metadata.children.is_empty());
        assert_eq!(metadata.last_updated, Timestamp::from_unix_nanos(5));
    }
}
