//! Pass/fail criteria: comparisons and ranges over report metrics (or their ratio).

use std::collections::BTreeMap;

use serde::Serialize;

/// The comparison a criterion makes.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// `<`
    Lt(f64),
    /// `<=`
    Le(f64),
    /// `>`
    Gt(f64),
    /// `>=`
    Ge(f64),
    /// `==`
    Eq(f64),
    /// Inside `[low, high]`.
    Between(f64, f64),
    /// A text metric (a rollout's state) equal to this.
    Is(String),
}

impl Check {
    /// Whether `value` passes.
    pub fn holds(&self, value: f64) -> bool {
        match *self {
            Self::Lt(t) => value < t,
            Self::Le(t) => value <= t,
            Self::Gt(t) => value > t,
            Self::Ge(t) => value >= t,
            Self::Eq(t) => value == t,
            Self::Between(low, high) => (low..=high).contains(&value),
            Self::Is(_) => false,
        }
    }

    /// The comparison as text, e.g. `< 0.05` or `in [19.5, 20.5]`.
    pub fn describe(&self) -> String {
        match self {
            Self::Lt(t) => format!("< {t}"),
            Self::Le(t) => format!("<= {t}"),
            Self::Gt(t) => format!("> {t}"),
            Self::Ge(t) => format!(">= {t}"),
            Self::Eq(t) => format!("== {t}"),
            Self::Between(low, high) => format!("in [{low}, {high}]"),
            Self::Is(text) => format!("== \"{text}\""),
        }
    }
}

/// One criterion of a scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Criterion {
    /// Label.
    pub name: String,
    /// Metric path.
    pub metric: String,
    /// Denominator metric path.
    pub divided_by: Option<String>,
    /// Comparison.
    pub check: Check,
}

/// A criterion's outcome, as written into the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    /// Label.
    pub name: String,
    /// `metric` or `metric / divided_by`.
    pub expression: String,
    /// The comparison, as text.
    pub expect: String,
    /// Measured value (`null` when a ratio's denominator is 0, or for a text metric).
    pub measured: Option<f64>,
    /// Measured text, for a text metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_text: Option<String>,
    /// Whether it passed.
    pub passed: bool,
}

impl Criterion {
    /// `metric` or `metric / divided_by`.
    pub fn expression(&self) -> String {
        match &self.divided_by {
            Some(d) => format!("{} / {d}", self.metric),
            None => self.metric.clone(),
        }
    }

    /// Evaluates against flattened report metrics and text metrics. Validation guarantees the
    /// names exist.
    pub fn evaluate(&self, metrics: &BTreeMap<String, f64>, texts: &BTreeMap<String, String>) -> Verdict {
        if let Check::Is(wanted) = &self.check {
            let measured = texts.get(&self.metric).cloned();
            return Verdict {
                name: self.name.clone(),
                expression: self.expression(),
                expect: self.check.describe(),
                measured: None,
                passed: measured.as_ref() == Some(wanted),
                measured_text: measured,
            };
        }
        let numerator = metrics.get(&self.metric).copied().unwrap_or(f64::NAN);
        let measured = match &self.divided_by {
            None => Some(numerator),
            Some(name) => {
                let denominator = metrics.get(name).copied().unwrap_or(f64::NAN);
                if denominator == 0.0 {
                    None
                } else {
                    Some(numerator / denominator)
                }
            }
        };
        let passed = measured.is_some_and(|v| self.check.holds(v));
        Verdict {
            name: self.name.clone(),
            expression: self.expression(),
            expect: self.check.describe(),
            measured: measured.filter(|v| v.is_finite()),
            measured_text: None,
            passed,
        }
    }
}

/// Edit distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_and_ratio() {
        let metrics = BTreeMap::from([("a".to_owned(), 5.0), ("b".to_owned(), 100.0), ("zero".to_owned(), 0.0)]);
        let c = Criterion {
            name: "r".into(),
            metric: "a".into(),
            divided_by: Some("b".into()),
            check: Check::Lt(0.1),
        };
        let texts = BTreeMap::from([("rollouts.r.state".to_owned(), "completed".to_owned())]);
        let v = c.evaluate(&metrics, &texts);
        assert!(v.passed);
        assert_eq!(v.measured, Some(0.05));
        let c = Criterion {
            name: "z".into(),
            metric: "a".into(),
            divided_by: Some("zero".into()),
            check: Check::Lt(0.1),
        };
        assert!(!c.evaluate(&metrics, &texts).passed);
        let state = |wanted: &str| Criterion {
            name: "s".into(),
            metric: "rollouts.r.state".into(),
            divided_by: None,
            check: Check::Is(wanted.into()),
        };
        assert!(state("completed").evaluate(&metrics, &texts).passed);
        let failed = state("rolled_back").evaluate(&metrics, &texts);
        assert!(!failed.passed);
        assert_eq!(failed.measured_text.as_deref(), Some("completed"));
        assert!(Check::Between(1.0, 2.0).holds(2.0));
        assert!(!Check::Eq(0.0).holds(1.0));
        assert_eq!(edit_distance("edge.rwa.bytes", "edge.raw.bytes"), 2);
    }
}
