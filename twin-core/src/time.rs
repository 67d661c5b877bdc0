//! Simulated time: durations as integer nanoseconds, and the clock resource the engine advances.
//!
//! The world owns its clock. Nothing in `twin-core` reads the wall clock: `virtual`, `scaled` and
//! `realtime` only tell the driver (the `twin` binary) how to pace the steps it asks for.

use std::fmt;

use bevy_ecs::resource::Resource;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};

/// Nanoseconds in one second.
pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A span of simulated time, in whole nanoseconds.
///
/// In scenario files a duration is either a number of seconds (`90`, `0.25`) or a string in
/// humantime form (`"90s"`, `"1h 30m"`, `"250ms"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SimDuration(pub u64);

impl SimDuration {
    /// A duration of `seconds` whole seconds.
    pub const fn from_secs(seconds: u64) -> Self {
        Self(seconds * NANOS_PER_SECOND)
    }

    /// The duration in seconds, as a float.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SECOND as f64
    }

    /// Parses `"90s"`, `"1h 30m"`, `"250ms"` or a plain number of seconds.
    ///
    /// # Errors
    /// A message naming the text and the accepted forms.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if let Ok(seconds) = trimmed.parse::<f64>() {
            return Self::from_secs_f64(seconds);
        }
        humantime::parse_duration(trimmed)
            .map(|d| Self(d.as_nanos().min(u128::from(u64::MAX)) as u64))
            .map_err(|err| format!("invalid duration `{text}`: {err} (expected e.g. \"90s\", \"1h 30m\", \"250ms\" or a number of seconds)"))
    }

    /// A duration from seconds.
    ///
    /// # Errors
    /// Negative, NaN, infinite or out-of-range values.
    pub fn from_secs_f64(seconds: f64) -> Result<Self, String> {
        if !seconds.is_finite() {
            return Err(format!(
                "invalid duration {seconds}: must be a finite number of seconds"
            ));
        }
        if seconds < 0.0 {
            return Err(format!("invalid duration {seconds}: must not be negative"));
        }
        let nanos = seconds * NANOS_PER_SECOND as f64;
        if nanos > u64::MAX as f64 / 2.0 {
            return Err(format!("invalid duration {seconds}s: too long"));
        }
        Ok(Self(nanos.round() as u64))
    }
}

impl fmt::Display for SimDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = std::time::Duration::from_nanos(self.0);
        if self.0 == 0 {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(d))
    }
}

impl<'de> Deserialize<'de> for SimDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = SimDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: a number of seconds or a string like \"90s\" or \"1h 30m\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SimDuration, E> {
                SimDuration::from_secs_f64(v as f64).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SimDuration, E> {
                SimDuration::from_secs_f64(v as f64).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SimDuration, E> {
                SimDuration::from_secs_f64(v).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SimDuration, E> {
                SimDuration::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// How the driver paces simulated time against the wall clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClockMode {
    /// As fast as possible.
    Virtual,
    /// `factor` simulated seconds per wall second.
    Scaled {
        /// Simulated seconds per wall-clock second.
        factor: f64,
    },
    /// One simulated second per wall second.
    Realtime,
}

impl ClockMode {
    /// Simulated seconds per wall second, or `None` for as fast as possible.
    pub fn pace(self) -> Option<f64> {
        match self {
            Self::Virtual => None,
            Self::Scaled { factor } => Some(factor),
            Self::Realtime => Some(1.0),
        }
    }
}

/// The simulation clock, owned by the world. The current step covers `[now, step_end)`.
#[derive(Resource, Clone, Debug)]
pub struct SimClock {
    /// Start of the current step (ns since the scenario start).
    pub now: u64,
    /// End of the current step (exclusive).
    pub step_end: u64,
    /// End of the run.
    pub end: u64,
    /// Longest step.
    pub tick: u64,
}

impl SimClock {
    /// End of the current step in seconds.
    pub fn step_end_secs(&self) -> f64 {
        self.step_end as f64 / NANOS_PER_SECOND as f64
    }
    /// Length of the current step in seconds.
    pub fn step_secs(&self) -> f64 {
        (self.step_end - self.now) as f64 / NANOS_PER_SECOND as f64
    }
}

/// Converts nanoseconds to seconds.
pub fn secs(nanos: u64) -> f64 {
    nanos as f64 / NANOS_PER_SECOND as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(SimDuration::parse("90s"), Ok(SimDuration::from_secs(90)));
        assert_eq!(SimDuration::parse("1h 30m"), Ok(SimDuration::from_secs(5400)));
        assert_eq!(SimDuration::parse("250ms"), Ok(SimDuration(250_000_000)));
        assert_eq!(SimDuration::parse("2.5"), Ok(SimDuration(2_500_000_000)));
        assert!(SimDuration::parse("5 parsecs").is_err());
        assert!(SimDuration::parse("-3").is_err());
        assert!(SimDuration::from_secs_f64(f64::NAN).is_err());
    }
}
