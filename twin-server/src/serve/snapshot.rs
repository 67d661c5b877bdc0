//! What readers see: the committed twins, published by the engine after each durable round.
//! Readers take a read lock for as long as it takes to clone a few `Arc`s; nothing in here is
//! ever ahead of the disk.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::twins::{Timestamp, Twin};

/// A device's connection as the twin shows it. Live state: not versioned, not persisted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionState {
    /// Whether the device has an open DeviceSync stream.
    pub connected: bool,
    /// When the stream opened (connected) or closed (not connected); `None` if the device never
    /// connected since the server started.
    pub since: Option<Timestamp>,
    /// The last desired version the device named in its Hello.
    pub last_desired_version: u64,
}

/// One twin as published: its committed state, the revision of its last change and its
/// connection.
#[derive(Debug, Clone)]
pub struct PublishedTwin {
    /// The twin, as committed (shared with the engine's registry until the twin changes).
    pub twin: Arc<Twin>,
    /// The fleet-wide revision of the twin's last change.
    pub revision: u64,
    /// The device's connection.
    pub connection: ConnectionState,
}

/// The committed twins by id and the revision they were committed at.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The revision of the last committed change.
    pub revision: u64,
    /// Live twins in id order.
    pub twins: BTreeMap<String, Arc<PublishedTwin>>,
}

/// The shared, published snapshot: written only by the engine.
#[derive(Debug, Default)]
pub struct SharedSnapshot {
    inner: RwLock<Snapshot>,
}

impl SharedSnapshot {
    /// A snapshot holding `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        SharedSnapshot {
            inner: RwLock::new(snapshot),
        }
    }

    /// Read access. A poisoned lock (a panic while writing, which the engine does not do) still
    /// gives the data: every write replaces whole entries.
    pub fn read(&self) -> RwLockReadGuard<'_, Snapshot> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Write access, for the engine.
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Snapshot> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One twin, if live.
    pub fn get(&self, id: &str) -> Option<Arc<PublishedTwin>> {
        self.read().twins.get(id).cloned()
    }
}
