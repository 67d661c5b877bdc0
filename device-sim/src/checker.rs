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

/// At most how often the checker adds what it saw to the shared counter and histogram (which
/// the progress line reads), looked at every [`FLUSH_CHECK`] messages.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_CHECK: u64 = 1024;

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
        if self.unflushed.received.is_multiple_of(FLUSH_CHECK)
            && self.unflushed.flushed_at.is_none_or(|at| at.elapsed() >= FLUSH_EVERY)
        {
            self.flush(shared);
        }
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
    pub fn done(&self, shared: &Shared, flushed_at: &mut Option<Instant>) -> bool {
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
