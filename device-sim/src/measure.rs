//! What a run measures: latency histograms (HDR, microsecond resolution), per-device sequence
//! tracking (loss, duplicates, reordering) and the counters the transports share.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded exactly: one hour, in microseconds (larger values are clamped).
const HIGHEST_MICROS: u64 = 3_600_000_000;

/// A latency histogram in microseconds (3 significant digits).
#[derive(Clone, Debug)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        // 1 us to 1 h at 3 significant digits is within the library's limits.
        let histogram = Histogram::new_with_bounds(1, HIGHEST_MICROS, 3).expect("valid histogram bounds");
        Self { histogram }
    }

    /// Records a latency in nanoseconds; negative values (clocks of two processes) count as 0.
    pub fn record_nanos(&mut self, nanos: i64) {
        let micros = (nanos.max(0) as u64 / 1_000).clamp(1, HIGHEST_MICROS);
        self.histogram.saturating_record(micros);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds: adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Forgets every sample.
    pub fn reset(&mut self) {
        self.histogram.reset();
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at a quantile, in milliseconds (`None` without samples).
    pub fn quantile_ms(&self, quantile: f64) -> Option<f64> {
        (self.count() > 0).then(|| self.histogram.value_at_quantile(quantile) as f64 / 1_000.0)
    }

    /// p50, p90, p99, p99.9, max and mean.
    pub fn summary(&self) -> LatencySummary {
        let empty = self.count() == 0;
        LatencySummary {
            count: self.count(),
            p50_ms: self.quantile_ms(0.5),
            p90_ms: self.quantile_ms(0.9),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: (!empty).then(|| self.histogram.max() as f64 / 1_000.0),
            mean_ms: (!empty).then(|| self.histogram.mean() / 1_000.0),
        }
    }
}

/// A latency distribution as reported (milliseconds; `null` without samples).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile.
    pub p999_ms: Option<f64>,
    /// Maximum.
    pub max_ms: Option<f64>,
    /// Mean.
    pub mean_ms: Option<f64>,
}

/// A latency histogram several tasks record into.
#[derive(Debug, Default)]
pub struct SharedLatency {
    inner: Mutex<Latency>,
}

impl SharedLatency {
    /// Records nanoseconds.
    pub fn record_nanos(&self, nanos: i64) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record_nanos(nanos);
    }

    /// Adds another histogram's samples.
    pub fn merge(&self, other: &Latency) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .merge(other);
    }

    /// A copy of the histogram so far.
    pub fn snapshot(&self) -> Latency {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What one message's arrival was, for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// First time, in order.
    InOrder,
    /// First time, after a later sequence of the same device.
    Reordered,
    /// Seen before.
    Duplicate,
}

/// The sequences received from one device: everything up to `contiguous`, plus the runs
/// received above it. Runs, not single sequences: after a gap that never fills (a message lost
/// for good) every later arrival extends the last run instead of adding an entry, so the cost
/// per message stays flat and memory grows with the gaps, not with the messages.
#[derive(Clone, Debug, Default)]
pub struct SequenceTracker {
    contiguous: u64,
    /// Disjoint, non-adjacent inclusive runs `(first, last)` above `contiguous + 1`, in order.
    above: VecDeque<(u64, u64)>,
    highest: u64,
    distinct: u64,
}

impl SequenceTracker {
    /// Notes sequence `sequence` (from 1).
    pub fn observe(&mut self, sequence: u64) -> Arrival {
        if sequence <= self.contiguous {
            return Arrival::Duplicate;
        }
        // The first run starting above `sequence` (in order: past the last run).
        let next = if sequence > self.highest {
            self.above.len()
        } else {
            self.above.partition_point(|&(first, _)| first <= sequence)
        };
        if next > 0 && self.above[next - 1].1 >= sequence {
            return Arrival::Duplicate;
        }
        self.distinct += 1;
        let arrival = if sequence < self.highest {
            Arrival::Reordered
        } else {
            Arrival::InOrder
        };
        self.highest = self.highest.max(sequence);
        if sequence == self.contiguous + 1 {
            self.contiguous = sequence;
            if self.above.front().is_some_and(|&(first, _)| first == sequence + 1)
                && let Some((_, last)) = self.above.pop_front()
            {
                self.contiguous = last;
            }
            return arrival;
        }
        let joins_previous = next > 0 && self.above[next - 1].1 + 1 == sequence;
        let joins_next = self.above.get(next).is_some_and(|&(first, _)| first == sequence + 1);
        match (joins_previous, joins_next) {
            (true, true) => {
                if let Some((_, last)) = self.above.remove(next) {
                    self.above[next - 1].1 = last;
                }
            }
            (true, false) => self.above[next - 1].1 = sequence,
            (false, true) => self.above[next].0 = sequence,
            (false, false) => self.above.insert(next, (sequence, sequence)),
        }
        arrival
    }

    /// Distinct sequences received.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }
}

/// Counters shared by the scheduler, the transports and the checker.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages the fleet sent (each took its device's next sequence number).
    pub sent: AtomicU64,
    /// Readings carried by them.
    pub samples_sent: AtomicU64,
    /// Messages handed to the transport without error.
    pub published: AtomicU64,
    /// Publish failures, refused messages, messages dropped because a connection's queue was
    /// full.
    pub errors: AtomicU64,
    /// Messages dropped because a device's queue towards its connection was full.
    pub overflows: AtomicU64,
    /// Messages due but not sent when the run ended.
    pub unsent: AtomicU64,
    /// Messages the `--max-rate` cap delayed.
    pub capped: AtomicU64,
    /// Publish acknowledgements.
    pub acks: AtomicU64,
    /// Connections established.
    pub connects: AtomicU64,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// Connections re-established.
    pub reconnects: AtomicU64,
    /// Devices (or clients) connected at least once.
    pub first_connects: AtomicU64,
    /// When the last first connection was made, nanoseconds after the run's start.
    pub last_first_connect_nanos: AtomicU64,
    /// Inference outputs sent.
    pub inferences: AtomicU64,
    /// Desired changes applied and acknowledged.
    pub converged: AtomicU64,
    /// Messages the checker received (including duplicates).
    pub received: AtomicU64,
    /// Messages held in a partitioned gateway's edge buffer.
    pub partition_buffered: AtomicU64,
    /// Messages lost at a partitioned gateway (its edge buffer was full).
    pub partition_lost: AtomicU64,
    /// Buffered messages sent after their gateway's partition healed.
    pub partition_delivered: AtomicU64,
    /// Messages still held by a gateway when the run ended.
    pub partition_remaining: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The latencies shared by the transports and the checker.
#[derive(Debug, Default)]
pub struct Latencies {
    /// End to end, from the intended send time to the checker's receipt.
    pub e2e: SharedLatency,
    /// Publish to acknowledgement.
    pub ack: SharedLatency,
    /// Connection attempt to established.
    pub connect: SharedLatency,
    /// Desired change to the device's acknowledgement.
    pub convergence: SharedLatency,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_give_duplicates_and_reordering() {
        let mut tracker = SequenceTracker::default();
        assert_eq!(tracker.observe(1), Arrival::InOrder);
        assert_eq!(tracker.observe(3), Arrival::InOrder);
        assert_eq!(tracker.observe(2), Arrival::Reordered);
        assert_eq!(tracker.observe(2), Arrival::Duplicate);
        assert_eq!(tracker.observe(3), Arrival::Duplicate);
        assert_eq!(tracker.observe(4), Arrival::InOrder);
        assert_eq!(tracker.distinct(), 4);
        assert!(tracker.above.is_empty());
    }

    #[test]
    fn runs_agree_with_a_set_of_every_sequence() {
        // Gaps that never fill, late arrivals that fill or split runs, duplicates of old and
        // new sequences: each arrival is classified as a plain set of sequences would.
        let mut tracker = SequenceTracker::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut highest = 0;
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = 1u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let sequence = match state % 10 {
                // A gap: the next one is skipped (lost for good unless a late copy comes).
                0 => {
                    next += 2;
                    next - 1
                }
                // A late or duplicate arrival within the last 50.
                1 | 2 => next.saturating_sub(state / 10 % 50).max(1),
                _ => {
                    next += 1;
                    next - 1
                }
            };
            let expected = if !seen.insert(sequence) {
                Arrival::Duplicate
            } else if sequence < highest {
                Arrival::Reordered
            } else {
                Arrival::InOrder
            };
            highest = highest.max(sequence);
            assert_eq!(tracker.observe(sequence), expected, "sequence {sequence}");
        }
        assert_eq!(tracker.distinct(), seen.len() as u64);
        // Stored as runs: far fewer entries than sequences.
        assert!(tracker.above.len() < seen.len() / 4, "{} runs", tracker.above.len());
        assert!(
            tracker
                .above
                .iter()
                .all(|&(first, last)| first <= last && first > tracker.contiguous + 1)
        );
        assert!(
            tracker
                .above
                .iter()
                .zip(tracker.above.iter().skip(1))
                .all(|(a, b)| a.1 + 1 < b.0)
        );
    }

    #[test]
    fn latency_quantiles_in_milliseconds() {
        let mut latency = Latency::new();
        assert_eq!(latency.summary().p99_ms, None);
        for ms in 1..=100 {
            latency.record_nanos(ms * 1_000_000);
        }
        latency.record_nanos(-5);
        let summary = latency.summary();
        assert_eq!(summary.count, 101);
        assert!((summary.p50_ms.unwrap_or_default() - 50.0).abs() < 0.1);
        assert!((summary.max_ms.unwrap_or_default() - 100.0).abs() < 0.1);
    }
}
