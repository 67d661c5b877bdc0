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
    match (exact_integer(left), exact_integer(right)) {
        (Some(left), Some(right)) => left == right,
        // An integer never equals a float with a fractional part (or beyond i128).
        (Some(_), None) | (None, Some(_)) => false,
        (None, None) => left.as_f64() == right.as_f64(),
    }
}

/// The number's value as an integer, if it is one: integers, and floats with no fractional part
/// (`1.0`, `-0.0`, `1e20`). Compared exactly, never through `f64`, whose rounding would make
/// 9007199254740993 equal 9007199254740992.0 (and equality intransitive).
fn exact_integer(number: &Number) -> Option<i128> {
    if let Some(integer) = number.as_i64() {
        return Some(i128::from(integer));
    }
    if let Some(integer) = number.as_u64() {
        return Some(i128::from(integer));
    }
    let float = number.as_f64()?;
    // Below 2^127 in magnitude, a float with no fractional part is an integer i128 holds exactly.
    const LIMIT: f64 = 1.7e38;
    if float.fract() == 0.0 && float.abs() < LIMIT {
        return Some(float as i128);
    }
    None
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
        assert!(json_equal(&json!(0), &json!(-0.0)));
        assert!(json_equal(&json!(100_000_000_000_000_000_000.0), &json!(1e20)));
        assert!(!json_equal(&json!(0.5), &json!(0)));
    }

    /// Found by the `document` fuzz target's exact-equality check: through `f64`, an integer
    /// beyond 2^53 equalled the nearest float, so equality was not transitive
    /// (9007199254740993 == 9007199254740992.0 == 9007199254740992 != 9007199254740993) and
    /// a device reporting the rounded float was taken to have the exact integer.
    #[test]
    fn integers_compare_exactly_with_floats() {
        let exact: Value = serde_json::from_str("9007199254740993").expect("json");
        let rounded: Value = serde_json::from_str("9007199254740992.0").expect("json");
        assert!(!json_equal(&exact, &rounded));
        assert!(json_equal(&json!(9_007_199_254_740_992_u64), &rounded));
        let max: Value = serde_json::from_str("18446744073709551615").expect("json");
        let two_to_64: Value = serde_json::from_str("1.8446744073709552e19").expect("json");
        assert!(!json_equal(&max, &two_to_64));
        let desired = object(json!({"big": exact}));
        let reported = object(json!({"big": rounded}));
        assert_eq!(
            Value::Object(delta(&desired, &reported)),
            json!({"big": 9_007_199_254_740_993_u64})
        );
    }
}
