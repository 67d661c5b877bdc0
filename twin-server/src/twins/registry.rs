//! All twins by id, and the version high-water mark of every deleted id, so that a version is
//! never reused for an id, not even after delete and re-create.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::doc::{Twin, UpdateOutcome, next_version};
use super::error::TwinError;
use super::inference::{CheckOutcome, InferenceCheck};
use super::limits::{Limits, Section};
use super::metadata::Stamp;
use super::patch::SectionPatch;
use super::reconcile::{DesiredAck, FleetConvergence};
use super::time::Timestamp;

/// A new twin's identity and initial documents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewTwin {
    /// The twin's id (id rules: see [`super::limits`]).
    pub id: String,
    /// Its group, if any (same rules as ids).
    pub group: Option<String>,
    /// Initial tags.
    pub tags: Map<String, Value>,
    /// Initial desired state.
    pub desired: Map<String, Value>,
}

/// Every twin, by id, and the tombstones of deleted ids. The one place twins are created, changed
/// and deleted.
///
/// Twins are held in `Arc`s and changed copy-on-write, so a reader can keep a twin as it was
/// ([`Twins::get_shared`]) while the registry moves on, without a copy at rest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Twins {
    limits: Limits,
    twins: BTreeMap<String, Arc<Twin>>,
    tombstones: BTreeMap<String, u64>,
}

impl Twins {
    /// No twins, with these limits.
    pub fn new(limits: Limits) -> Self {
        Twins {
            limits,
            twins: BTreeMap::new(),
            tombstones: BTreeMap::new(),
        }
    }

    /// Twins and tombstones as persisted. Should an id have both a live twin and a tombstone (the
    /// store never writes both), the larger version wins.
    pub fn restore(
        limits: Limits,
        twins: impl IntoIterator<Item = Twin>,
        tombstones: impl IntoIterator<Item = (String, u64)>,
    ) -> Self {
        let mut restored = Twins::new(limits);
        for twin in twins {
            restored.twins.insert(twin.id().to_owned(), Arc::new(twin));
        }
        for (id, version) in tombstones {
            let live_version = restored.twins.get(&id).map(|twin| twin.version());
            if live_version.is_some_and(|live| live >= version) {
                continue;
            }
            restored.twins.remove(&id);
            restored.tombstones.insert(id, version);
        }
        restored
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Number of live twins.
    pub fn len(&self) -> usize {
        self.twins.len()
    }

    /// Whether there is no live twin.
    pub fn is_empty(&self) -> bool {
        self.twins.is_empty()
    }

    /// The twin with this id, if live.
    pub fn get(&self, id: &str) -> Option<&Twin> {
        self.twins.get(id).map(|twin| &**twin)
    }

    /// The twin with this id, if live, shared: it stays as it is now whatever changes later.
    pub fn get_shared(&self, id: &str) -> Option<Arc<Twin>> {
        self.twins.get(id).cloned()
    }

    /// The twin with this id.
    ///
    /// # Errors
    /// `NotFound` when there is none.
    pub fn require(&self, id: &str) -> Result<&Twin, TwinError> {
        self.twins.get(id).map(|twin| &**twin).ok_or_else(|| not_found(id))
    }

    /// Live twins in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Twin> {
        self.twins.values().map(|twin| &**twin)
    }

    /// Live twins in id order, shared.
    pub fn iter_shared(&self) -> impl Iterator<Item = &Arc<Twin>> {
        self.twins.values()
    }

    /// Deleted ids and the version of their deletion, in id order.
    pub fn tombstones(&self) -> impl Iterator<Item = (&str, u64)> {
        self.tombstones.iter().map(|(id, version)| (id.as_str(), *version))
    }

    /// The highest version ever used for this id (live or deleted), if any.
    pub fn high_water(&self, id: &str) -> Option<u64> {
        self.twins
            .get(id)
            .map(|twin| twin.version())
            .or_else(|| self.tombstones.get(id).copied())
    }

    /// Creates a twin. Its first version is one past the id's high-water mark (1 for a new id).
    ///
    /// # Errors
    /// `InvalidArgument` for a bad id, group, key or value; `AlreadyExists`; `LimitExceeded`.
    pub fn create(&mut self, new: NewTwin, now: Timestamp) -> Result<&Twin, TwinError> {
        self.limits.check_id("twin_id", &new.id)?;
        if let Some(group) = &new.group {
            self.limits.check_id("group", group)?;
        }
        if let Some(existing) = self.twins.get(&new.id) {
            return Err(TwinError::AlreadyExists {
                twin_id: new.id,
                version: existing.version(),
            });
        }
        let version = next_version(self.tombstones.get(&new.id).copied().unwrap_or(0))?;
        let twin = Twin::create(
            new.id.clone(),
            new.group,
            version,
            new.tags,
            new.desired,
            now,
            &self.limits,
        )?;
        self.tombstones.remove(&new.id);
        let id = new.id;
        Ok(&**self.twins.entry(id).or_insert_with(|| Arc::new(twin)))
    }

    /// Deletes a twin. The deletion takes the next version, kept as the id's tombstone.
    ///
    /// # Errors
    /// `NotFound`; `VersionConflict` when `expected` is not the current version.
    pub fn delete(&mut self, id: &str, expected: Option<u64>) -> Result<u64, TwinError> {
        let twin = self.require(id)?;
        twin.check_expected(expected)?;
        let version = twin.next_version()?;
        self.twins.remove(id);
        self.tombstones.insert(id.to_owned(), version);
        Ok(version)
    }

    /// Merges a patch into `desired` (`SectionPatch::Clear` empties it).
    ///
    /// # Errors
    /// `NotFound`, `VersionConflict`, `InvalidArgument`, `LimitExceeded`; nothing changes then.
    pub fn update_desired(
        &mut self,
        id: &str,
        patch: &SectionPatch,
        expected: Option<u64>,
        now: Timestamp,
    ) -> Result<UpdateOutcome, TwinError> {
        let stamp = Stamp {
            server: now,
            source: None,
        };
        self.update(id, Section::Desired, patch, expected, stamp)
    }

    /// Merges a device's patch into `reported`, with the device's source time when it gave one.
    ///
    /// # Errors
    /// As [`Twins::update_desired`].
    pub fn update_reported(
        &mut self,
        id: &str,
        patch: &SectionPatch,
        expected: Option<u64>,
        now: Timestamp,
        source_time: Option<Timestamp>,
    ) -> Result<UpdateOutcome, TwinError> {
        let stamp = Stamp {
            server: now,
            source: source_time,
        };
        self.update(id, Section::Reported, patch, expected, stamp)
    }

    /// Merges a patch into `tags`.
    ///
    /// # Errors
    /// As [`Twins::update_desired`].
    pub fn update_tags(
        &mut self,
        id: &str,
        patch: &SectionPatch,
        expected: Option<u64>,
        now: Timestamp,
    ) -> Result<UpdateOutcome, TwinError> {
        let stamp = Stamp {
            server: now,
            source: None,
        };
        self.update(id, Section::Tags, patch, expected, stamp)
    }

    fn update(
        &mut self,
        id: &str,
        section: Section,
        patch: &SectionPatch,
        expected: Option<u64>,
        stamp: Stamp,
    ) -> Result<UpdateOutcome, TwinError> {
        let limits = self.limits;
        let twin = Arc::make_mut(self.twins.get_mut(id).ok_or_else(|| not_found(id))?);
        twin.update_section(section, patch, expected, stamp, &limits)
    }

    /// Records a device's acknowledgements of desired keys; returns the new version.
    ///
    /// # Errors
    /// `NotFound`, `VersionConflict`; `InvalidArgument` for a key not in desired, a key twice, a
    /// status outside 2xx/4xx/5xx or a version newer than the twin's; `LimitExceeded` for a long
    /// description.
    pub fn acknowledge(
        &mut self,
        id: &str,
        acks: &[DesiredAck],
        expected: Option<u64>,
        now: Timestamp,
    ) -> Result<u64, TwinError> {
        let limits = self.limits;
        let twin = Arc::make_mut(self.twins.get_mut(id).ok_or_else(|| not_found(id))?);
        twin.acknowledge(acks, expected, now, &limits)
    }

    /// Records live inference checks on a twin; returns its inference check after them. Not a
    /// document change: the version stays.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn record_inference(
        &mut self,
        id: &str,
        checks: &[CheckOutcome],
        now: Timestamp,
    ) -> Result<&InferenceCheck, TwinError> {
        let twin = Arc::make_mut(self.twins.get_mut(id).ok_or_else(|| not_found(id))?);
        twin.record_inference(checks, now);
        Ok(twin.inference())
    }

    /// Convergence of the twins `select` keeps, on one desired key or (with `None`) all keys.
    pub fn convergence(&self, key: Option<&str>, mut select: impl FnMut(&Twin) -> bool) -> FleetConvergence {
        let mut fleet = FleetConvergence::default();
        for twin in self.iter().filter(|twin| select(twin)) {
            match key {
                Some(key) => {
                    if let Some(entry) = twin.reconciliation().get(key) {
                        fleet.add(entry);
                    }
                }
                None => twin.reconciliation().values().for_each(|entry| fleet.add(entry)),
            }
        }
        fleet
    }
}

fn not_found(id: &str) -> TwinError {
    TwinError::NotFound { twin_id: id.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_keeps_the_larger_of_a_live_version_and_a_tombstone() {
        let mut twins = Twins::new(Limits::default());
        let now = Timestamp::from_unix_nanos(1);
        let new = |id: &str| NewTwin {
            id: id.to_owned(),
            ..NewTwin::default()
        };
        twins.create(new("live"), now).expect("create");
        twins.create(new("gone"), now).expect("create");
        let gone = twins.get("gone").cloned().expect("gone");
        let deleted = twins.delete("gone", Some(1)).expect("delete");
        let live = twins.get("live").cloned().expect("live");
        // A stale tombstone for a live id loses; a tombstone newer than a stale twin row wins.
        let restored = Twins::restore(
            Limits::default(),
            [live, gone],
            [("live".to_owned(), 0), ("gone".to_owned(), deleted)],
        );
        assert_eq!(restored.get("live").map(Twin::version), Some(1));
        assert!(restored.get("gone").is_none());
        assert_eq!(restored.high_water("gone"), Some(2));
    }
}
