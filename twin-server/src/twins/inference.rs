//! The live inference check of a twin: how the outputs a device reports for its own model
//! compare with the twin's re-run of the same model version on the same input. Pure
//! bookkeeping: the comparison itself happens elsewhere (off the engine, with tract), and the
//! result is recorded here. Recording a check is not a document change: it takes no version.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::time::Timestamp;

/// A model version as an inference report names it: name, version and (if the device knows it)
/// sha256.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelKey {
    /// Model name.
    pub name: String,
    /// Integer version.
    pub version: u64,
    /// Lowercase hex sha256; empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

impl ModelKey {
    /// The model a reported document names under `"model"`, if it names one.
    pub fn from_reported(reported: &Map<String, Value>) -> Option<ModelKey> {
        let model = reported.get("model")?.as_object()?;
        Some(ModelKey {
            name: model.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
            version: model.get("version").and_then(Value::as_u64).unwrap_or(0),
            sha256: model
                .get("sha256")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// Whether two keys name the same model: name and version equal, and sha256 equal when
    /// both know it.
    pub fn same_model(&self, other: &ModelKey) -> bool {
        self.name == other.name
            && self.version == other.version
            && (self.sha256.is_empty() || other.sha256.is_empty() || self.sha256 == other.sha256)
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOutcome {
    /// The model the device said it ran.
    pub model: ModelKey,
    /// Largest absolute difference between the device's outputs and the re-run's, or `None`
    /// when the twin could not run the model (an unknown model or version).
    pub max_abs_error: Option<f64>,
    /// Whether the outputs agreed within the tolerance (false when `max_abs_error` is `None`).
    pub agreed: bool,
}

/// A twin's inference check so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceCheck {
    /// Device outputs checked so far.
    pub checked: u64,
    /// Checks whose outputs agreed within the tolerance.
    pub agreed: u64,
    /// Checks whose outputs differed beyond the tolerance, or named a model version the twin
    /// cannot run.
    pub diverged: u64,
    /// The model of the last divergence while the twin is marked `inference_divergence`;
    /// `None` when it is not marked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergent_model: Option<ModelKey>,
    /// Largest absolute output difference seen (finite: an infinite or NaN difference is kept
    /// as `f64::MAX`).
    pub max_abs_error: f64,
    /// Server time of the last divergence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_divergence_at: Option<Timestamp>,
}

impl InferenceCheck {
    /// Nothing checked yet.
    pub const NONE: InferenceCheck = InferenceCheck {
        checked: 0,
        agreed: 0,
        diverged: 0,
        divergent_model: None,
        max_abs_error: 0.0,
        last_divergence_at: None,
    };

    /// Whether nothing was ever checked (the twin's stored form then leaves the check out).
    pub fn is_empty(&self) -> bool {
        *self == InferenceCheck::default()
    }

    /// Whether the twin is marked: a divergence not yet cleared by a different reported model.
    pub fn inference_divergence(&self) -> bool {
        self.divergent_model.is_some()
    }

    /// Counts one check; a divergence marks the twin with its model.
    pub fn record(&mut self, outcome: &CheckOutcome, now: Timestamp) {
        self.checked = self.checked.saturating_add(1);
        if let Some(error) = outcome.max_abs_error {
            let error = if error.is_finite() { error } else { f64::MAX };
            self.max_abs_error = self.max_abs_error.max(error);
        }
        if outcome.agreed {
            self.agreed = self.agreed.saturating_add(1);
        } else {
            self.diverged = self.diverged.saturating_add(1);
            self.divergent_model = Some(outcome.model.clone());
            self.last_divergence_at = Some(now);
        }
    }

    /// A reported change of `"model"` from `before` to `after`: the mark is cleared when the
    /// device now reports a model other than the one that diverged (a redeployment).
    pub fn reported_model_changed(&mut self, before: Option<&ModelKey>, after: Option<&ModelKey>) {
        if before == after {
            return;
        }
        let still_divergent = match (&self.divergent_model, after) {
            (Some(divergent), Some(after)) => divergent.same_model(after),
            (Some(_), None) => false,
            (None, _) => return,
        };
        if !still_divergent {
            self.divergent_model = None;
        }
    }
}

/// Compares a device's outputs with the twin's: the largest absolute difference (two NaNs are
/// equal; a NaN or infinity against anything else is infinitely far). `None` when the lengths
/// differ.
pub fn max_abs_difference(device: &[f32], twin: &[f32]) -> Option<f64> {
    if device.len() != twin.len() {
        return None;
    }
    let mut largest: f64 = 0.0;
    for (left, right) in device.iter().zip(twin) {
        let (left, right) = (f64::from(*left), f64::from(*right));
        let difference = if left.is_nan() && right.is_nan() || left == right {
            0.0
        } else {
            let difference = (left - right).abs();
            if difference.is_finite() {
                difference
            } else {
                f64::INFINITY
            }
        };
        largest = largest.max(difference);
    }
    Some(largest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: u64) -> ModelKey {
        ModelKey {
            name: "m".to_owned(),
            version,
            sha256: String::new(),
        }
    }

    #[test]
    fn a_divergence_marks_and_a_different_reported_model_clears() {
        let mut check = InferenceCheck::default();
        let agreed = CheckOutcome {
            model: key(1),
            max_abs_error: Some(1e-6),
            agreed: true,
        };
        check.record(&agreed, Timestamp::from_unix_nanos(5));
        assert!(!check.inference_divergence());
        let diverged = CheckOutcome {
            model: key(1),
            max_abs_error: Some(0.5),
            agreed: false,
        };
        check.record(&diverged, Timestamp::from_unix_nanos(7));
        assert!(check.inference_divergence());
        assert_eq!((check.checked, check.agreed, check.diverged), (2, 1, 1));
        assert_eq!(check.max_abs_error, 0.5);
        assert_eq!(check.last_divergence_at, Some(Timestamp::from_unix_nanos(7)));
        // Reporting the same model again keeps the mark; another one clears it.
        check.reported_model_changed(None, Some(&key(1)));
        assert!(check.inference_divergence());
        check.reported_model_changed(Some(&key(1)), Some(&key(2)));
        assert!(!check.inference_divergence());
        assert_eq!(check.diverged, 1, "the counts stay");
    }

    #[test]
    fn a_check_is_stored_with_the_twin_and_takes_no_version() {
        use crate::twins::{Limits, NewTwin, Twin, Twins};
        let mut twins = Twins::new(Limits::default());
        let new = NewTwin {
            id: "d".to_owned(),
            ..NewTwin::default()
        };
        twins.create(new, Timestamp::from_unix_nanos(1)).expect("create");
        let plain = twins.get("d").expect("twin").encode().expect("encode");
        let outcome = CheckOutcome {
            model: key(3),
            max_abs_error: Some(0.75),
            agreed: false,
        };
        let check = twins
            .record_inference("d", &[outcome], Timestamp::from_unix_nanos(9))
            .expect("record")
            .clone();
        let twin = twins.get("d").expect("twin");
        assert_eq!(twin.version(), 1, "a check is not a change of the documents");
        let stored = twin.encode().expect("encode");
        assert!(
            stored.len() > plain.len() && stored.starts_with(&plain),
            "a trailer after the parts"
        );
        let decoded = Twin::decode(&stored).expect("decode");
        assert_eq!(decoded.inference(), &check);
        assert_eq!(&decoded, twin);
        assert_eq!(Twin::decode(&plain).expect("decode").inference(), &InferenceCheck::NONE);
    }

    #[test]
    fn differences_handle_nan_infinity_and_lengths() {
        assert_eq!(max_abs_difference(&[1.0, 2.0], &[1.0, 2.5]), Some(0.5));
        assert_eq!(max_abs_difference(&[f32::NAN], &[f32::NAN]), Some(0.0));
        assert_eq!(max_abs_difference(&[f32::NAN], &[0.0]), Some(f64::INFINITY));
        assert_eq!(max_abs_difference(&[f32::INFINITY], &[0.0]), Some(f64::INFINITY));
        assert_eq!(max_abs_difference(&[1.0], &[1.0, 2.0]), None);
        let mut check = InferenceCheck::default();
        let infinite = CheckOutcome {
            model: key(1),
            max_abs_error: Some(f64::INFINITY),
            agreed: false,
        };
        check.record(&infinite, Timestamp::default());
        assert_eq!(check.max_abs_error, f64::MAX);
        let stored = serde_json::to_string(&check).expect("encode");
        assert_eq!(serde_json::from_str::<InferenceCheck>(&stored).expect("decode"), check);
    }
}
