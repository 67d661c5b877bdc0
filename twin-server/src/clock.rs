//! The server's one reading of the wall clock, for the places that stamp server time (the
//! engine's update times, telemetry storage times and notices, metrics, simulation runs); the
//! twin domain itself never reads a clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in nanoseconds since the Unix epoch (0 for a clock before 1970, saturating far ahead).
pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}
