//! Desired-state acknowledgements and reconciliation per desired key, and fleet convergence.
//!
//! Both are kept per top-level key of `desired` (an Azure Plug and Play writable property).
//! A key's reconciliation starts `Pending` when its desired value changes, and turns
//! `Succeeded` when the reported value matches it (the key leaves the delta) or the device
//! acknowledges its version with a success code, `Failed` when the device acknowledges it with
//! an error code. A succeeded key whose reported value drifts away goes back to `Pending`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::time::Timestamp;

/// An acknowledgement of a desired key, as a device sends it (Azure's `ac`, `av`, `ad`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredAck {
    /// The top-level desired key acknowledged.
    pub key: String,
    /// Status code: 200 done, 202 in progress, 203 device-initiated, 4xx rejected, 5xx error.
    pub status: u16,
    /// The twin version whose desired value this answers (the version of the delta received).
    pub version: u64,
    /// Free text from the device.
    pub description: String,
}

/// The last acknowledgement stored for a desired key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acknowledgement {
    /// Status code (`ac`).
    pub status: u16,
    /// Acknowledged twin version (`av`).
    pub version: u64,
    /// Description (`ad`).
    pub description: String,
    /// Server time the acknowledgement was received.
    pub received_at: Timestamp,
}

/// What an acknowledgement's status code means for reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMeaning {
    /// 2xx other than 202 and 203: the device applied the value.
    Done,
    /// 202: the device is applying it.
    InProgress,
    /// 203: the device changed the value on its own; reconciliation is unchanged.
    DeviceInitiated,
    /// 4xx and 5xx: the device rejected the value or failed to apply it.
    Failed,
}

impl AckMeaning {
    /// The meaning of a status code, or `None` outside 200..=299 and 400..=599.
    pub const fn of(status: u16) -> Option<Self> {
        match status {
            202 => Some(AckMeaning::InProgress),
            203 => Some(AckMeaning::DeviceInitiated),
            200..=299 => Some(AckMeaning::Done),
            400..=599 => Some(AckMeaning::Failed),
            _ => None,
        }
    }
}

/// The reconciliation state of one desired key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconciliationState {
    /// The device does not have the desired value yet.
    Pending,
    /// The device has it (reported matches, or it acknowledged success).
    Succeeded,
    /// The device rejected it or failed to apply it.
    Failed,
}

/// Reconciliation of one desired key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reconciliation {
    /// Current state.
    pub state: ReconciliationState,
    /// The twin version at which the key's current desired value was set.
    pub desired_version: u64,
    /// Server time at which the key's current desired value was set.
    pub desired_at: Timestamp,
    /// Server time at which the current pending period began: `desired_at`, or the time the
    /// reported value drifted away from a succeeded value.
    pub pending_since: Timestamp,
    /// Server time at which the key last became `Succeeded` or `Failed`; `None` while pending.
    pub resolved_at: Option<Timestamp>,
}

impl Reconciliation {
    /// A key whose desired value was just set at `version`, `now`.
    pub(crate) fn pending(version: u64, now: Timestamp) -> Self {
        Reconciliation {
            state: ReconciliationState::Pending,
            desired_version: version,
            desired_at: now,
            pending_since: now,
            resolved_at: None,
        }
    }

    /// Moves to `Succeeded` or `Failed` at `now` (keeping the first resolution time when unchanged).
    pub(crate) fn resolve(&mut self, state: ReconciliationState, now: Timestamp) {
        if self.state != state {
            self.state = state;
            self.resolved_at = Some(now);
        }
    }

    /// Back to `Pending` at `now` (a drift, or an in-progress acknowledgement of a failed key).
    pub(crate) fn reopen(&mut self, now: Timestamp) {
        if self.state != ReconciliationState::Pending {
            self.state = ReconciliationState::Pending;
            self.pending_since = now;
            self.resolved_at = None;
        }
    }

    /// How long the key took to succeed: `resolved_at - pending_since`, when it succeeded.
    pub fn convergence_time(&self) -> Option<Duration> {
        match (self.state, self.resolved_at) {
            (ReconciliationState::Succeeded, Some(resolved)) => {
                Some(resolved.saturating_duration_since(self.pending_since))
            }
            _ => None,
        }
    }
}

/// Convergence of a set of twins (a fleet, a group, a rollout) on one desired key or all keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetConvergence {
    /// Reconciliation entries considered (one per twin and key).
    pub keys: usize,
    /// Entries pending.
    pub pending: usize,
    /// Entries succeeded.
    pub succeeded: usize,
    /// Entries failed.
    pub failed: usize,
    /// Earliest `pending_since` among the entries.
    pub started_at: Option<Timestamp>,
    /// When every entry has succeeded: the latest `resolved_at`.
    pub converged_at: Option<Timestamp>,
    /// When every entry has succeeded: `converged_at - started_at`, the fleet convergence time.
    pub convergence_time: Option<Duration>,
    /// The longest convergence time of a single succeeded entry.
    pub slowest_key: Option<Duration>,
}

impl FleetConvergence {
    /// Adds one reconciliation entry.
    pub fn add(&mut self, reconciliation: &Reconciliation) {
        self.keys += 1;
        match reconciliation.state {
            ReconciliationState::Pending => self.pending += 1,
            ReconciliationState::Succeeded => self.succeeded += 1,
            ReconciliationState::Failed => self.failed += 1,
        }
        let since = reconciliation.pending_since;
        self.started_at = Some(self.started_at.map_or(since, |started| started.min(since)));
        if let Some(resolved) = reconciliation.resolved_at
            && reconciliation.state == ReconciliationState::Succeeded
        {
            self.converged_at = Some(self.converged_at.map_or(resolved, |latest| latest.max(resolved)));
        }
        if let Some(time) = reconciliation.convergence_time() {
            self.slowest_key = Some(self.slowest_key.map_or(time, |slowest| slowest.max(time)));
        }
        self.convergence_time = match (self.succeeded == self.keys, self.started_at, self.converged_at) {
            (true, Some(started), Some(converged)) => Some(converged.saturating_duration_since(started)),
            _ => None,
        };
    }

    /// Whether every entry considered has succeeded (vacuously true for none).
    pub fn converged(&self) -> bool {
        self.succeeded == self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        assert_eq!(AckMeaning::of(200), Some(AckMeaning::Done));
        assert_eq!(AckMeaning::of(202), Some(AckMeaning::InProgress));
        assert_eq!(AckMeaning::of(203), Some(AckMeaning::DeviceInitiated));
        assert_eq!(AckMeaning::of(404), Some(AckMeaning::Failed));
        assert_eq!(AckMeaning::of(500), Some(AckMeaning::Failed));
        assert_eq!(AckMeaning::of(302), None);
        assert_eq!(AckMeaning::of(0), None);
    }

    #[test]
    fn fleet_convergence_is_first_pending_to_last_success() {
        let t = Timestamp::from_unix_millis;
        let mut first = Reconciliation::pending(3, t(1_000));
        first.resolve(ReconciliationState::Succeeded, t(1_500));
        let mut second = Reconciliation::pending(7, t(1_200));
        let mut fleet = FleetConvergence::default();
        fleet.add(&first);
        fleet.add(&second);
        assert!(!fleet.converged());
        assert_eq!(fleet.convergence_time, None);
        second.resolve(ReconciliationState::Succeeded, t(3_000));
        let mut fleet = FleetConvergence::default();
        fleet.add(&first);
        fleet.add(&second);
        assert!(fleet.converged());
        assert_eq!(fleet.convergence_time, Some(Duration::from_millis(2_000)));
        assert_eq!(fleet.slowest_key, Some(Duration::from_millis(1_800)));
    }
}
