//! Server and device time as plain values: the twin domain never reads a clock, callers pass time in.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time, in nanoseconds since the Unix epoch (UTC).
///
/// Used both for the server's time of an update and for the device's own source time. The twin
/// domain only compares and subtracts timestamps; where they come from is the caller's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The timestamp `nanos` nanoseconds after the Unix epoch.
    pub const fn from_unix_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// The timestamp `millis` milliseconds after the Unix epoch (saturating at the largest value).
    pub const fn from_unix_millis(millis: u64) -> Self {
        Self(millis.saturating_mul(1_000_000))
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn unix_nanos(self) -> u64 {
        self.0
    }

    /// The time from `earlier` to `self`, or zero when `earlier` is later.
    pub const fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}
