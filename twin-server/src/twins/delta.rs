//! The delta between desired and reported, by the AWS Device Shadow rules.
//!
//! 1. Computed by walking `desired`, comparing with `reported`.
//! 2. A key of desired missing from reported, or with a different value, is in the delta.
//! 3. A key only in reported is never in the delta.
//! 4. Nested objects: the delta holds only the differing leaves, with their path from the root.
//! 5. Arrays are values: if they differ, the whole desired array is in the delta.
//!
//! Values are compared as JSON values: numbers by value (`1` equals `1.0`), objects regardless
//! of key order, arrays element by element.

use serde_json::{Map, Number, Value};

/// The delta of `desired` against `reported`: every desired leaf whose reported value is missing
/// or different, at its path. Empty when the device has everything it was asked for.
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, desired_value) in desired {
        if let Some(difference) = value_delta(desired_value, reported.get(key)) {
            out.insert(key.clone(), difference);
        }
    }
    out
}

/// The delta of one desired value against the reported value at the same path, if they differ.
pub fn value_delta(desired: &Value, reported: Option<&Value>) -> Option<Value> {
    match (desired, reported) {
        (_, None) => Some(desired.clone()),
        (Value::Object(desired_object), Some(Value::Object(reported_object))) => {
            let nested = delta(desired_object, reported_object);
            if nested.is_empty() {
                return None;
            }
            Some(Value::Object(nested))
        }
        (_, Some(reported_value)) => {
            if json_equal(desired, reported_value) {
                None
            } else {
                Some(desired.clone())
            }
        }
    }
}

/// JSON equality: numbers compare by value (`1 == 1.0`), objects by their keys and values.
pub fn json_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => numbers_equal(left, right),
        (Value::Array(left), Value::Array(right)) => {
            left.len() == right.len() && left.iter().zip(right).all(|(l, r)| json_equal(l, r))
        }
        (Value::Object(left), Value::Object(right)) => {
            left.len() == right.len()
                && left
                    .iter()
                    .all(|(key, l)| right.get(key).is_some_and(|r| json_equal(l, r)))
        }
        _ => left == right,
    }
}

fn numbers_equal(left: &Number, right: &Number) -> bool {
    let as_integer = |number: &Number| {
        number
            .as_i64()
            .map(i128::from)
            .or_else(|| number.as_u64().map(i128::from))
    };
    if let (Some(left), Some(right)) = (as_integer(left), as_integer(right)) {
        return left == right;
    }
    match (left.as_f64(), right.as_f64()) {
        (Some(left), Some(right)) => left == right,
        _ => false,
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
    fn aws_documentation_example() {
        let desired = object(json!({"color":"RED","state":"ON","sub":{"a":1,"b":[1,2]}}));
        let reported = object(json!({"color":"GREEN","state":"ON","sub":{"a":1,"b":[1]},"extra":true}));
        assert_eq!(
            Value::Object(delta(&desired, &reported)),
            json!({"color":"RED","sub":{"b":[1,2]}})
        );
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(json_equal(&json!(1), &json!(1.0)));
        assert!(json_equal(&json!(-3), &json!(-3.0)));
        assert!(!json_equal(&json!(1), &json!(1.5)));
        assert!(!json_equal(&json!(u64::MAX), &json!(-1)));
        assert!(!json_equal(&json!("1"), &json!(1)));
    }
}
