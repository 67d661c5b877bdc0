//! Document limits and key rules: what a twin document may hold, checked before anything changes.
//!
//! Key rules (every object key at every level of `desired`, `reported` and `tags`, including
//! objects inside arrays), after Azure IoT Hub's:
//! - 1 to `max_key_bytes` bytes of UTF-8 (default 128);
//! - no control character (Unicode C0 and C1), no `.` (it separates field paths), no `$`
//!   (reserved for metadata), no space.
//!
//! Value rules: arrays may not hold `null` at any depth (a `null` means "delete this key" and only
//! in a patch object). Twin ids and groups: 1 to `max_id_bytes` bytes (default 128) of ASCII
//! letters, digits and `-_.:@`.

use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{LimitKind, TwinError};

/// Configurable document limits. Sizes are the bytes of the section serialized as compact JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest `desired` section, in bytes (default 32 KiB).
    pub max_desired_bytes: u64,
    /// Largest `reported` section, in bytes (default 32 KiB).
    pub max_reported_bytes: u64,
    /// Largest `tags` section, in bytes (default 8 KiB).
    pub max_tags_bytes: u64,
    /// Deepest nesting of a section: the section's own object is level 1, each object or array
    /// inside adds one (default 10).
    pub max_depth: u32,
    /// Longest object key, in bytes (default 128).
    pub max_key_bytes: u32,
    /// Longest twin id or group, in bytes (default 128).
    pub max_id_bytes: u32,
    /// Longest acknowledgement description, in bytes (default 512).
    pub max_description_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_desired_bytes: 32 * 1024,
            max_reported_bytes: 32 * 1024,
            max_tags_bytes: 8 * 1024,
            max_depth: 10,
            max_key_bytes: 128,
            max_id_bytes: 128,
            max_description_bytes: 512,
        }
    }
}

/// Which section of a twin a document or patch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    /// What the cloud wants the device to have.
    Desired,
    /// What the device says it has.
    Reported,
    /// Back-end-only metadata, never sent to devices.
    Tags,
}

impl Section {
    /// The section's field name (`desired`, `reported`, `tags`), the root of its field paths.
    pub const fn name(self) -> &'static str {
        match self {
            Section::Desired => "desired",
            Section::Reported => "reported",
            Section::Tags => "tags",
        }
    }
}

impl Limits {
    /// The byte limit of a section and its name.
    pub const fn section_bytes(&self, section: Section) -> (u64, LimitKind) {
        match section {
            Section::Desired => (self.max_desired_bytes, LimitKind::DesiredBytes),
            Section::Reported => (self.max_reported_bytes, LimitKind::ReportedBytes),
            Section::Tags => (self.max_tags_bytes, LimitKind::TagsBytes),
        }
    }

    /// Checks a twin id (or group) against the id rules.
    ///
    /// # Errors
    /// `InvalidArgument` naming `field` when the id is empty, too long or has a character
    /// outside ASCII letters, digits and `-_.:@`.
    pub fn check_id(&self, field: &str, id: &str) -> Result<(), TwinError> {
        if id.is_empty() {
            return Err(TwinError::invalid(field, "must not be empty"));
        }
        if id.len() > self.max_id_bytes as usize {
            return Err(TwinError::invalid(
                field,
                format!(
                    "is {} bytes, longer than max_id_bytes = {}",
                    id.len(),
                    self.max_id_bytes
                ),
            ));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@');
        if let Some(bad) = id.chars().find(|c| !allowed(*c)) {
            return Err(TwinError::invalid(
                field,
                format!("{id:?} has {bad:?}: only ascii letters, digits and -_.:@ are allowed"),
            ));
        }
        Ok(())
    }

    /// Checks an object key against the key rules; `parent` is the path of the object holding it.
    ///
    /// # Errors
    /// `InvalidArgument` with the key's path.
    pub fn check_key(&self, parent: &str, key: &str) -> Result<(), TwinError> {
        // A bad key is quoted in its path, since it may hold the very characters paths use.
        let field = || format!("{parent}[{key:?}]");
        if key.is_empty() {
            return Err(TwinError::invalid(field(), "keys must not be empty"));
        }
        if key.len() > self.max_key_bytes as usize {
            return Err(TwinError::invalid(
                field(),
                format!(
                    "key is {} bytes, longer than max_key_bytes = {}",
                    key.len(),
                    self.max_key_bytes
                ),
            ));
        }
        if let Some(bad) = key.chars().find(|c| c.is_control() || matches!(c, '.' | '$' | ' ')) {
            return Err(TwinError::invalid(
                field(),
                format!("key {key:?} has {bad:?}: keys may not hold control characters, '.', '$' or ' '"),
            ));
        }
        Ok(())
    }

    /// Checks every key and value of a patch object (where `null` means delete) rooted at `path`,
    /// and its nesting depth (the patch object is level 1), so that no later walk of it recurses
    /// deeper than `max_depth` whatever the input.
    ///
    /// # Errors
    /// `InvalidArgument` with the path of the first bad key or array element; `LimitExceeded`
    /// naming `max_depth` for a patch nested too deep.
    pub fn check_patch(&self, path: &str, patch: &Map<String, Value>) -> Result<(), TwinError> {
        self.check_object(path, patch, 1, true)
    }

    /// `in_patch`: whether `null` is a delete here (patch objects) or refused (objects in arrays).
    fn check_object(
        &self,
        path: &str,
        object: &Map<String, Value>,
        depth: u32,
        in_patch: bool,
    ) -> Result<(), TwinError> {
        self.check_depth(path, depth)?;
        for (key, value) in object {
            self.check_key(path, key)?;
            let value_path = child_path(path, key);
            match value {
                Value::Null if !in_patch => {
                    return Err(TwinError::invalid(value_path, "null is not allowed inside arrays"));
                }
                Value::Object(inner) => self.check_object(&value_path, inner, depth + 1, in_patch)?,
                Value::Array(items) => self.check_array(&value_path, items, depth + 1)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn check_array(&self, path: &str, items: &[Value], depth: u32) -> Result<(), TwinError> {
        self.check_depth(path, depth)?;
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            match item {
                Value::Null => return Err(TwinError::invalid(item_path, "arrays may not hold null")),
                Value::Array(inner) => self.check_array(&item_path, inner, depth + 1)?,
                Value::Object(object) => self.check_object(&item_path, object, depth + 1, false)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn check_depth(&self, path: &str, depth: u32) -> Result<(), TwinError> {
        if depth > self.max_depth {
            return Err(TwinError::LimitExceeded {
                field: path.to_owned(),
                limit: LimitKind::Depth,
                actual: u64::from(depth),
                max: u64::from(self.max_depth),
            });
        }
        Ok(())
    }

    /// Checks a whole section after a patch is merged: its nesting depth and its size.
    ///
    /// # Errors
    /// `LimitExceeded` naming `max_depth` (with the path of the first value too deep) or the
    /// section's byte limit.
    pub fn check_section(&self, section: Section, document: &Map<String, Value>) -> Result<(), TwinError> {
        if let Some((path, depth)) = first_too_deep(section.name(), document, 1, self.max_depth) {
            return Err(TwinError::LimitExceeded {
                field: path,
                limit: LimitKind::Depth,
                actual: u64::from(depth),
                max: u64::from(self.max_depth),
            });
        }
        let (max, limit) = self.section_bytes(section);
        let size = json_size(document);
        if size > max {
            return Err(TwinError::LimitExceeded {
                field: section.name().to_owned(),
                limit,
                actual: size,
                max,
            });
        }
        Ok(())
    }
}

/// The path of `key` inside the object at `parent`.
pub(crate) fn child_path(parent: &str, key: &str) -> String {
    let mut path = String::with_capacity(parent.len() + 1 + key.len());
    path.push_str(parent);
    path.push('.');
    path.push_str(key);
    path
}

/// The first container nested deeper than `max` levels, with its path and depth. `depth` is the
/// level of `object` itself.
fn first_too_deep(path: &str, object: &Map<String, Value>, depth: u32, max: u32) -> Option<(String, u32)> {
    if depth > max {
        return Some((path.to_owned(), depth));
    }
    for (key, value) in object {
        let found = match value {
            Value::Object(inner) => first_too_deep(&child_path(path, key), inner, depth + 1, max),
            Value::Array(items) => first_too_deep_array(&child_path(path, key), items, depth + 1, max),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

fn first_too_deep_array(path: &str, items: &[Value], depth: u32, max: u32) -> Option<(String, u32)> {
    if depth > max {
        return Some((path.to_owned(), depth));
    }
    for (index, item) in items.iter().enumerate() {
        let found = match item {
            Value::Object(inner) => first_too_deep(&format!("{path}[{index}]"), inner, depth + 1, max),
            Value::Array(inner) => first_too_deep_array(&format!("{path}[{index}]"), inner, depth + 1, max),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Bytes of `document` serialized as compact JSON, counted without building the text.
pub fn json_size(document: &Map<String, Value>) -> u64 {
    struct Counter(u64);
    impl io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0 += bytes.len() as u64;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Serializing a `Map` of `Value`s to a writer that never fails cannot fail.
    match serde_json::to_writer(&mut counter, document) {
        Ok(()) => counter.0,
        Err(_) => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(object) => object,
            _ => Map::new(),
        }
    }

    #[test]
    fn key_rules_name_the_path() {
        let limits = Limits::default();
        for bad in ["a.b", "$version", "has space", "tab\t", ""] {
            let patch = object(json!({ "outer": { bad: 1 } }));
            let error = limits.check_patch("desired", &patch).expect_err(bad);
            let expected = format!("desired.outer[{bad:?}]");
            assert_eq!(error.field(), Some(expected.as_str()), "{error}");
        }
        let long = "k".repeat(129);
        assert!(limits.check_key("desired", &long).is_err());
        assert!(limits.check_key("desired", &"k".repeat(128)).is_ok());
        assert!(limits.check_key("desired", "température").is_ok());
    }

    #[test]
    fn null_inside_arrays_is_refused_with_its_index() {
        let limits = Limits::default();
        let error = limits
            .check_patch("reported", &object(json!({ "modes": [1, null] })))
            .expect_err("null in array");
        assert_eq!(error.field(), Some("reported.modes[1]"));
        let error = limits
            .check_patch("reported", &object(json!({ "modes": [{ "a": null }] })))
            .expect_err("null in object in array");
        assert_eq!(error.field(), Some("reported.modes[0].a"));
    }

    #[test]
    fn depth_counts_the_section_as_level_one() {
        let limits = Limits {
            max_depth: 3,
            ..Limits::default()
        };
        let ok = object(json!({ "a": { "b": [1] } }));
        assert!(limits.check_section(Section::Desired, &ok).is_ok());
        let three_levels = object(json!({ "a": { "b": { "c": 1 } } }));
        assert!(limits.check_section(Section::Desired, &three_levels).is_ok());
        let deep = object(json!({ "a": { "b": { "c": {} } } }));
        let error = limits.check_section(Section::Desired, &deep).expect_err("too deep");
        assert_eq!(error.field(), Some("desired.a.b.c"));
        assert!(matches!(
            error,
            TwinError::LimitExceeded {
                limit: LimitKind::Depth,
                actual: 4,
                max: 3,
                ..
            }
        ));
    }

    #[test]
    fn a_patch_nested_far_too_deep_is_refused_at_the_limit() {
        let mut value = json!(1);
        for _ in 0..1_000 {
            value = json!({ "k": value });
        }
        let error = Limits::default()
            .check_patch("desired", &object(value))
            .expect_err("too deep");
        assert!(matches!(
            error,
            TwinError::LimitExceeded {
                limit: LimitKind::Depth,
                actual: 11,
                max: 10,
                ..
            }
        ));
        assert_eq!(error.field().map(|f| f.matches(".k").count()), Some(10));
    }

    #[test]
    fn size_is_the_compact_json_length() {
        let document = object(json!({ "a": [1, 2], "b": "x" }));
        assert_eq!(json_size(&document), r#"{"a":[1,2],"b":"x"}"#.len() as u64);
    }

    #[test]
    fn ids_allow_a_small_alphabet() {
        let limits = Limits::default();
        assert!(limits.check_id("twin_id", "dev-001:a@b.c_d").is_ok());
        assert!(limits.check_id("twin_id", "dev 1").is_err());
        assert!(limits.check_id("twin_id", "").is_err());
    }
}
