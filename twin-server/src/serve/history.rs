//! The change history: a bounded ring of the last committed change events, for watchers that
//! resume, and a broadcast of new ones, for watchers that follow. The engine appends to both
//! under one lock and a watcher subscribes and copies under the same lock, so a watcher sees
//! every revision after its start exactly once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use twin_proto::v1 as pb;

use super::snapshot::PublishedTwin;

/// One committed change: the event as sent to watchers, and the twin it is filtered on (after
/// the change, or before it for a deletion).
#[derive(Debug)]
pub struct ChangeRecord {
    /// The event.
    pub event: pb::ChangeEvent,
    /// The twin the watch filter is evaluated on.
    pub twin: Arc<PublishedTwin>,
}

/// What a watcher gets when it starts.
#[derive(Debug)]
pub struct Subscription {
    /// The last committed revision when the watcher started.
    pub revision: u64,
    /// The oldest revision a watcher may resume after.
    pub oldest_revision: u64,
    /// The events after the requested revision, from the ring.
    pub replay: Vec<Arc<ChangeRecord>>,
    /// Events committed from now on.
    pub live: broadcast::Receiver<Arc<ChangeRecord>>,
}

/// Why a watcher cannot start where it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeError {
    /// The requested revision is older than the history kept.
    TooOld {
        /// The oldest revision a watcher may resume after.
        oldest_revision: u64,
    },
    /// The requested revision was never committed.
    Ahead {
        /// The last committed revision.
        revision: u64,
    },
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<ChangeRecord>>,
    capacity: usize,
    /// The last committed revision.
    revision: u64,
    live: broadcast::Sender<Arc<ChangeRecord>>,
}

/// The shared history.
#[derive(Debug)]
pub struct History {
    ring: Mutex<Ring>,
}

impl History {
    /// An empty history that starts after `revision` (the last revision restored from disk),
    /// keeping `capacity` events and letting live watchers fall `lag` events behind.
    pub fn new(revision: u64, capacity: usize, lag: usize) -> Self {
        let (live, _) = broadcast::channel(lag.max(1));
        History {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.clamp(1, 4096)),
                capacity: capacity.max(1),
                revision,
                live,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends committed changes, in revision order, and sends them to live watchers.
    pub fn append(&self, records: Vec<Arc<ChangeRecord>>) {
        let mut ring = self.lock();
        for record in records {
            ring.revision = record.event.revision;
            if ring.events.len() == ring.capacity {
                ring.events.pop_front();
            }
            ring.events.push_back(Arc::clone(&record));
            // No receiver is not an error: nobody is watching.
            let _receivers = ring.live.send(record);
        }
    }

    /// Starts a watcher after `after` (or now, with `None`).
    ///
    /// # Errors
    /// `TooOld` when events after `after` were dropped from the ring; `Ahead` when `after` is
    /// past the last committed revision.
    pub fn subscribe(&self, after: Option<u64>) -> Result<Subscription, ResumeError> {
        let ring = self.lock();
        let oldest_revision = ring
            .events
            .front()
            .map_or(ring.revision, |first| first.event.revision.saturating_sub(1));
        let after = after.unwrap_or(ring.revision);
        if after < oldest_revision {
            return Err(ResumeError::TooOld { oldest_revision });
        }
        if after > ring.revision {
            return Err(ResumeError::Ahead {
                revision: ring.revision,
            });
        }
        // Revisions in the ring are consecutive, so the position of `after + 1` is computed.
        let skip = usize::try_from(after - oldest_revision).unwrap_or(usize::MAX);
        let replay = ring.events.iter().skip(skip).cloned().collect();
        Ok(Subscription {
            revision: ring.revision,
            oldest_revision,
            replay,
            live: ring.live.subscribe(),
        })
    }
}
