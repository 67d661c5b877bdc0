//! Wall-clock pacing: where a moment of simulated time falls on the wall clock, and Unix
//! nanoseconds for the timestamps messages carry.
//!
//! Unix times are derived from one reading of the system clock at the start plus the monotonic
//! clock since, so a wall-clock step during a run does not bend the latencies measured in this
//! process.

use std::time::{Duration, Instant};

/// The run's time base.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// The wall instant of simulated time 0.
    pub start: Instant,
    /// Unix nanoseconds at `start`.
    pub start_unix_nanos: i64,
    /// Simulated seconds per wall second (1 for real time).
    pub factor: f64,
}

impl Pace {
    /// A time base starting now.
    pub fn starting_now(factor: f64) -> Self {
        Self {
            start: Instant::now(),
            start_unix_nanos: system_unix_nanos(),
            factor,
        }
    }

    /// The wall instant at which simulated time `sim_nanos` is due.
    pub fn instant_of(&self, sim_nanos: u64) -> Instant {
        self.start + Duration::from_secs_f64(sim_nanos as f64 / 1e9 / self.factor)
    }

    /// Unix nanoseconds of a wall instant.
    pub fn unix_of(&self, instant: Instant) -> i64 {
        let since = instant.saturating_duration_since(self.start);
        self.start_unix_nanos
            .saturating_add(i64::try_from(since.as_nanos()).unwrap_or(i64::MAX))
    }

    /// Unix nanoseconds now.
    pub fn now_unix(&self) -> i64 {
        self.unix_of(Instant::now())
    }

    /// Simulated nanoseconds reached at a wall instant.
    pub fn sim_at(&self, instant: Instant) -> u64 {
        (instant.saturating_duration_since(self.start).as_secs_f64() * self.factor * 1e9) as u64
    }
}

/// Unix nanoseconds now, from the system clock (for comparing with another process's stamps).
pub fn system_unix_nanos() -> i64 {
    i64::try_from(twin_server::clock::unix_nanos_now()).unwrap_or(i64::MAX)
}
