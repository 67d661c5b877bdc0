//! The receiving side's bookkeeping: every stamp a checker reads (from an MQTT subscription, a
//! JetStream consumer or the server's Watch) goes through a [`Ledger`], which records its
//! end-to-end latency from the intended send time and tracks each device's sequence numbers.

use std::time::{Duration, Instant};

use crate::measure::{Arrival, Counters, Latency, SequenceTracker};
use crate::message::StampRef;
use crate::shared::Shared;

/// What the checker saw.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    trackers: Vec<SequenceTracker>,
    /// Distinct messages received.
    pub distinct: u64,
    /// Messages received again.
    pub duplicates: u64,
    /// Messages received after a later one of the same device.
    pub reordered: u64,
    /// Messages whose stamp named no device of the fleet, or could not be read.
    pub foreign: u64,
    /// Arrivals and end-to-end latencies not yet added to the run's shared counter and
    /// histogram: they are added in bulk (see [`FLUSH_EVERY`]), not per message.
    unflushed: Unflushed,
}

#[derive(Debug, Clone, Default)]
struct Unflushed {
    received: u64,
    e2e: Latency,
    flushed_at: Option<Instant>,
}

/// How often the checker adds what it saw to the shared counter and histogram (which the
/// progress line reads): when asked whether it is done ([`Ledger::done`]) this long after the
/// last time.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

impl Ledger {
    /// An empty ledger for `devices` devices.
    pub fn new(devices: usize) -> Self {
        Self {
            trackers: vec![SequenceTracker::default(); devices],
            ..Self::default()
        }
    }

    /// Notes one received message, received at `received_unix_nanos`.
    pub fn observe(&mut self, shared: &Shared, stamp: Option<StampRef<'_>>, received_unix_nanos: i64) {
        self.unflushed.received += 1;
        let Some(stamp) = stamp else {
            self.foreign += 1;
            return;
        };
        let Some(&device) = shared.fleet.index_of.get(stamp.device_id.as_ref()) else {
            self.foreign += 1;
            return;
        };
        match self.trackers[device as usize].observe(stamp.sequence) {
            Arrival::Duplicate => {
                self.duplicates += 1;
                return;
            }
            Arrival::Reordered => self.reordered += 1,
            Arrival::InOrder => {}
        }
        self.distinct += 1;
        self.unflushed
            .e2e
            .record_nanos(received_unix_nanos - stamp.intended_send_unix_nanos);
    }

    /// Adds the arrivals and latencies seen since the last flush to the shared ones (done
    /// once more when the checker has ended, before the report reads them).
    pub fn flush(&mut self, shared: &Shared) {
        let unflushed = &mut self.unflushed;
        unflushed.flushed_at = Some(Instant::now());
        Counters::add(&shared.counters.received, std::mem::take(&mut unflushed.received));
        if unflushed.e2e.count() > 0 {
            shared.latencies.e2e.merge(&unflushed.e2e);
            unflushed.e2e.reset();
        }
    }

    /// Whether the checker can stop: everything that left the edge has arrived once the fleet
    /// has flushed (messages a partitioned gateway lost or still holds never leave it), or the
    /// drain time since then is over, or the run is stopped hard.
    /// Asked now and then, it also adds what was seen to the shared counter and histogram
    /// (at most every 100 ms).
    pub fn done(&mut self, shared: &Shared, flushed_at: &mut Option<Instant>) -> bool {
        if self.unflushed.flushed_at.is_none_or(|at| at.elapsed() >= FLUSH_EVERY) {
            self.flush(shared);
        }
        if shared.hard_stop.is_cancelled() {
            return true;
        }
        if !shared.flushed.is_cancelled() {
            return false;
        }
        let since = *flushed_at.get_or_insert_with(Instant::now);
        let counters = &shared.counters;
        let expected = Counters::get(&counters.sent)
            .saturating_sub(Counters::get(&counters.partition_lost))
            .saturating_sub(Counters::get(&counters.partition_remaining));
        self.distinct >= expected || since.elapsed() >= shared.settings.drain_timeout
    }
}

/// How often a checker looks at whether it is done while nothing arrives.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn stamp(device_id: &str, sequence: u64, intended_send_unix_nanos: i64) -> Option<StampRef<'_>> {
        Some(StampRef {
            device_id: Cow::Borrowed(device_id),
            sequence,
            sim_time_nanos: 0,
            intended_send_unix_nanos,
            sent_unix_nanos: intended_send_unix_nanos,
        })
    }

    #[test]
    fn what_the_checker_saw_reaches_the_shared_counters_when_asked() {
        let shared = Shared::for_test(Duration::from_secs(1));
        let id = shared.fleet.devices[1].id.clone();
        let mut ledger = Ledger::new(shared.fleet.devices.len());
        let mut flushed_at = None;
        // The first question flushes (nothing yet) and starts the 100 ms period.
        assert!(!ledger.done(&shared, &mut flushed_at));
        for sequence in [1, 2, 2, 4] {
            ledger.observe(&shared, stamp(&id, sequence, 0), 5_000_000 * sequence as i64);
        }
        ledger.observe(&shared, stamp("not-in-the-fleet", 1, 0), 1);
        ledger.observe(&shared, None, 1);
        assert_eq!((ledger.distinct, ledger.duplicates, ledger.foreign), (3, 1, 2));
        // Once the period is over, the next question adds everything.
        std::thread::sleep(FLUSH_EVERY);
        assert!(!ledger.done(&shared, &mut flushed_at));
        assert_eq!(Counters::get(&shared.counters.received), 6);
        let e2e = shared.latencies.e2e.snapshot();
        assert_eq!(e2e.count(), 3);
        assert_eq!(e2e.quantile_ms(1.0).map(f64::round), Some(20.0));
        // The final flush adds what came after, once.
        ledger.observe(&shared, stamp(&id, 3, 0), 1_000_000);
        ledger.flush(&shared);
        ledger.flush(&shared);
        assert_eq!(Counters::get(&shared.counters.received), 7);
        assert_eq!(shared.latencies.e2e.snapshot().count(), 4);
    }
}
