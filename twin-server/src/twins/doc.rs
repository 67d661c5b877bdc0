//! One twin: its sections, version, metadata, acknowledgements and reconciliation, and the
//! changes it accepts. Every change is checked whole before anything is modified, so a refused
//! change leaves the twin exactly as it was.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::delta::{delta, json_equal, value_delta};
use super::error::{LimitKind, TwinError};
use super::inference::{CheckOutcome, InferenceCheck, ModelKey};
use super::limits::{Limits, Section, child_path};
use super::metadata::{MetadataNode, Stamp, TwinMetadata};
use super::patch::{SectionPatch, apply};
use super::reconcile::{AckMeaning, Acknowledgement, DesiredAck, Reconciliation, ReconciliationState};
use super::time::Timestamp;

/// A device twin. Created, changed and deleted through [`super::Twins`], which keeps versions
/// unique per id; read through the accessors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Twin {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    version: u64,
    desired_version: u64,
    reported_version: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
    tags: Map<String, Value>,
    desired: Map<String, Value>,
    reported: Map<String, Value>,
    metadata: TwinMetadata,
    acknowledgements: BTreeMap<String, Acknowledgement>,
    reconciliation: BTreeMap<String, Reconciliation>,
    #[serde(default, skip_serializing_if = "InferenceCheck::is_empty")]
    inference: InferenceCheck,
}

/// The result of an accepted desired, reported or tags update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateOutcome {
    /// The twin's version after the update.
    pub version: u64,
    /// The whole current delta, when a desired or reported update leaves desired != reported
    /// (AWS rule 6: a delta notification is due). Always `None` for tags.
    pub delta: Option<Map<String, Value>>,
}

/// What a device receives on (re)connect: never the tags.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceView {
    /// The twin's id.
    pub twin_id: String,
    /// The twin's current version.
    pub version: u64,
    /// The version at which desired last changed.
    pub desired_version: u64,
    /// The whole desired section.
    pub desired: Map<String, Value>,
    /// The whole reported section, as the server holds it.
    pub reported: Map<String, Value>,
    /// The whole current delta (desired against reported), whatever the device saw before.
    pub delta: Map<String, Value>,
    /// Whether desired changed after the last desired version the device saw (always true when
    /// it names none).
    pub missed_desired_change: bool,
}

impl Twin {
    pub(crate) fn new(id: String, group: Option<String>, version: u64, now: Timestamp) -> Self {
        let empty = MetadataNode {
            last_updated: now,
            ..MetadataNode::default()
        };
        Twin {
            id,
            group,
            version,
            desired_version: version,
            reported_version: version,
            created_at: now,
            updated_at: now,
            tags: Map::new(),
            desired: Map::new(),
            reported: Map::new(),
            metadata: TwinMetadata {
                desired: empty.clone(),
                reported: empty.clone(),
                tags: empty,
            },
            acknowledgements: BTreeMap::new(),
            reconciliation: BTreeMap::new(),
            inference: InferenceCheck::default(),
        }
    }

    /// A twin at `version` with initial tags and desired state; every desired key starts pending.
    pub(crate) fn create(
        id: String,
        group: Option<String>,
        version: u64,
        tags: Map<String, Value>,
        desired: Map<String, Value>,
        now: Timestamp,
        limits: &Limits,
    ) -> Result<Self, TwinError> {
        let mut twin = Twin::new(id, group, version, now);
        let stamp = Stamp {
            server: now,
            source: None,
        };
        for (section, document) in [(Section::Tags, tags), (Section::Desired, desired)] {
            limits.check_patch(section.name(), &document)?;
            let (target, metadata) = match section {
                Section::Tags => (&mut twin.tags, &mut twin.metadata.tags),
                _ => (&mut twin.desired, &mut twin.metadata.desired),
            };
            apply(target, metadata, &SectionPatch::Merge(document), stamp);
            limits.check_section(section, target)?;
        }
        for key in twin.desired.keys() {
            twin.reconciliation
                .insert(key.clone(), Reconciliation::pending(version, now));
        }
        Ok(twin)
    }

    /// The twin's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The twin's group, if any.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The twin's version: incremented by every accepted change, never reused for this id.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The version at which `desired` last changed (or the twin was created).
    pub fn desired_version(&self) -> u64 {
        self.desired_version
    }

    /// The version at which `reported` last changed (or the twin was created).
    pub fn reported_version(&self) -> u64 {
        self.reported_version
    }

    /// Server time of creation.
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// Server time of the last accepted change.
    pub fn updated_at(&self) -> Timestamp {
        self.updated_at
    }

    /// Back-end-only tags; never part of what a device receives.
    pub fn tags(&self) -> &Map<String, Value> {
        &self.tags
    }

    /// What the cloud wants the device to have.
    pub fn desired(&self) -> &Map<String, Value> {
        &self.desired
    }

    /// What the device says it has.
    pub fn reported(&self) -> &Map<String, Value> {
        &self.reported
    }

    /// A section by name.
    pub fn section(&self, section: Section) -> &Map<String, Value> {
        match section {
            Section::Desired => &self.desired,
            Section::Reported => &self.reported,
            Section::Tags => &self.tags,
        }
    }

    /// Per-leaf metadata of the three sections.
    pub fn metadata(&self) -> &TwinMetadata {
        &self.metadata
    }

    /// The last acknowledgement per top-level desired key.
    pub fn acknowledgements(&self) -> &BTreeMap<String, Acknowledgement> {
        &self.acknowledgements
    }

    /// The reconciliation per top-level desired key.
    pub fn reconciliation(&self) -> &BTreeMap<String, Reconciliation> {
        &self.reconciliation
    }

    /// The live inference check: device outputs compared with the twin's re-runs.
    pub fn inference(&self) -> &InferenceCheck {
        &self.inference
    }

    /// Records inference checks. Not a document change: the version and `updated_at` stay.
    pub(crate) fn record_inference(&mut self, checks: &[CheckOutcome], now: Timestamp) {
        for check in checks {
            self.inference.record(check, now);
        }
    }

    /// The twin's overall reconciliation: `Failed` if any key failed, else `Pending` if any key is
    /// pending, else `Succeeded` (also with no desired keys).
    pub fn reconciliation_state(&self) -> ReconciliationState {
        let mut overall = ReconciliationState::Succeeded;
        for entry in self.reconciliation.values() {
            match entry.state {
                ReconciliationState::Failed => return ReconciliationState::Failed,
                ReconciliationState::Pending => overall = ReconciliationState::Pending,
                ReconciliationState::Succeeded => {}
            }
        }
        overall
    }

    /// The current delta of desired against reported (AWS rules).
    pub fn delta(&self) -> Map<String, Value> {
        delta(&self.desired, &self.reported)
    }

    /// What the device receives on (re)connect, given the last desired version it saw: the full
    /// current delta, so nothing changed while it was offline is missed.
    pub fn device_view(&self, last_seen_desired_version: Option<u64>) -> DeviceView {
        DeviceView {
            twin_id: self.id.clone(),
            version: self.version,
            desired_version: self.desired_version,
            desired: self.desired.clone(),
            reported: self.reported.clone(),
            delta: self.delta(),
            missed_desired_change: last_seen_desired_version.is_none_or(|seen| seen < self.desired_version),
        }
    }

    /// Refuses a change naming a version other than the current one.
    pub(crate) fn check_expected(&self, expected: Option<u64>) -> Result<(), TwinError> {
        match expected {
            Some(expected) if expected != self.version => Err(TwinError::VersionConflict {
                twin_id: self.id.clone(),
                expected,
                current: self.version,
            }),
            _ => Ok(()),
        }
    }

    /// The version the next accepted change gets.
    pub(crate) fn next_version(&self) -> Result<u64, TwinError> {
        next_version(self.version)
    }

    /// Merges a patch into one section. Checks the expected version, the patch's keys and values,
    /// then the merged section's depth and size, before changing anything.
    pub(crate) fn update_section(
        &mut self,
        section: Section,
        patch: &SectionPatch,
        expected: Option<u64>,
        stamp: Stamp,
        limits: &Limits,
    ) -> Result<UpdateOutcome, TwinError> {
        self.check_expected(expected)?;
        if let SectionPatch::Merge(keys) = patch {
            limits.check_patch(section.name(), keys)?;
        }
        let version = self.next_version()?;
        let (current, current_metadata) = match section {
            Section::Desired => (&self.desired, &self.metadata.desired),
            Section::Reported => (&self.reported, &self.metadata.reported),
            Section::Tags => (&self.tags, &self.metadata.tags),
        };
        let mut merged = current.clone();
        let mut merged_metadata = current_metadata.clone();
        apply(&mut merged, &mut merged_metadata, patch, stamp);
        limits.check_section(section, &merged)?;

        // Accepted: nothing below can fail.
        let touched = touched_keys(patch, current);
        let previous = match section {
            Section::Desired => {
                self.metadata.desired = merged_metadata;
                self.desired_version = version;
                std::mem::replace(&mut self.desired, merged)
            }
            Section::Reported => {
                self.metadata.reported = merged_metadata;
                self.reported_version = version;
                std::mem::replace(&mut self.reported, merged)
            }
            Section::Tags => {
                self.metadata.tags = merged_metadata;
                std::mem::replace(&mut self.tags, merged)
            }
        };
        self.version = version;
        self.updated_at = stamp.server;
        match section {
            Section::Desired => self.reconcile_desired_change(&previous, &touched, version, stamp.server),
            Section::Reported => {
                self.reconcile_reported_change(&previous, &touched, stamp.server);
                let before = ModelKey::from_reported(&previous);
                let after = ModelKey::from_reported(&self.reported);
                self.inference.reported_model_changed(before.as_ref(), after.as_ref());
            }
            Section::Tags => {}
        }
        let notify = match section {
            Section::Desired | Section::Reported => Some(self.delta()).filter(|delta| !delta.is_empty()),
            Section::Tags => None,
        };
        Ok(UpdateOutcome { version, delta: notify })
    }

    /// Desired keys that changed value start pending (or succeed at once if reported already
    /// matches); deleted keys drop their reconciliation and acknowledgement.
    fn reconcile_desired_change(
        &mut self,
        previous: &Map<String, Value>,
        touched: &BTreeSet<String>,
        version: u64,
        now: Timestamp,
    ) {
        for key in touched {
            let Some(new_value) = self.desired.get(key) else {
                self.reconciliation.remove(key);
                self.acknowledgements.remove(key);
                continue;
            };
            let unchanged = previous.get(key).is_some_and(|old| json_equal(old, new_value));
            if unchanged && self.reconciliation.contains_key(key) {
                continue;
            }
            let mut entry = Reconciliation::pending(version, now);
            if value_delta(new_value, self.reported.get(key)).is_none() {
                entry.resolve(ReconciliationState::Succeeded, now);
            }
            self.reconciliation.insert(key.clone(), entry);
        }
    }

    /// A reported change can complete a pending or failed key, or reopen a succeeded one that
    /// drifted away.
    fn reconcile_reported_change(&mut self, previous: &Map<String, Value>, touched: &BTreeSet<String>, now: Timestamp) {
        for key in touched {
            let (Some(desired_value), Some(entry)) = (self.desired.get(key), self.reconciliation.get_mut(key)) else {
                continue;
            };
            let in_sync_after = value_delta(desired_value, self.reported.get(key)).is_none();
            let in_sync_before = value_delta(desired_value, previous.get(key)).is_none();
            if in_sync_after {
                entry.resolve(ReconciliationState::Succeeded, now);
            } else if in_sync_before && entry.state == ReconciliationState::Succeeded {
                entry.reopen(now);
            }
        }
    }

    /// Records acknowledgements of desired keys. All are checked before any is recorded.
    pub(crate) fn acknowledge(
        &mut self,
        acks: &[DesiredAck],
        expected: Option<u64>,
        now: Timestamp,
        limits: &Limits,
    ) -> Result<u64, TwinError> {
        self.check_expected(expected)?;
        let mut seen = BTreeSet::new();
        let mut meanings = Vec::with_capacity(acks.len());
        for ack in acks {
            let field = child_path("acknowledgements", &ack.key);
            if !seen.insert(ack.key.as_str()) {
                return Err(TwinError::invalid(field, "acknowledged twice in one request"));
            }
            if !self.desired.contains_key(&ack.key) {
                return Err(TwinError::invalid(field, "not a key of desired"));
            }
            let Some(meaning) = AckMeaning::of(ack.status) else {
                return Err(TwinError::invalid(
                    child_path(&field, "status"),
                    format!("status {} is not 2xx, 4xx or 5xx", ack.status),
                ));
            };
            if ack.version > self.version {
                return Err(TwinError::invalid(
                    child_path(&field, "version"),
                    format!(
                        "version {} is newer than the twin's version {}",
                        ack.version, self.version
                    ),
                ));
            }
            if ack.description.len() > limits.max_description_bytes as usize {
                return Err(TwinError::LimitExceeded {
                    field: child_path(&field, "description"),
                    limit: LimitKind::DescriptionBytes,
                    actual: ack.description.len() as u64,
                    max: u64::from(limits.max_description_bytes),
                });
            }
            meanings.push(meaning);
        }
        let version = self.next_version()?;
        for (ack, meaning) in acks.iter().zip(meanings) {
            let newer_than_stored = self
                .acknowledgements
                .get(&ack.key)
                .is_none_or(|stored| stored.version <= ack.version);
            if newer_than_stored {
                self.acknowledgements.insert(
                    ack.key.clone(),
                    Acknowledgement {
                        status: ack.status,
                        version: ack.version,
                        description: ack.description.clone(),
                        received_at: now,
                    },
                );
            }
            let Some(entry) = self.reconciliation.get_mut(&ack.key) else {
                continue;
            };
            if ack.version < entry.desired_version {
                continue; // answers an older desired value
            }
            match meaning {
                AckMeaning::Done => entry.resolve(ReconciliationState::Succeeded, now),
                AckMeaning::Failed => entry.resolve(ReconciliationState::Failed, now),
                AckMeaning::InProgress => entry.reopen(now),
                AckMeaning::DeviceInitiated => {}
            }
        }
        self.version = version;
        self.updated_at = now;
        Ok(version)
    }
}

/// `current + 1`, refused at `u64::MAX`.
pub(crate) fn next_version(current: u64) -> Result<u64, TwinError> {
    current.checked_add(1).ok_or(TwinError::LimitExceeded {
        field: "version".to_owned(),
        limit: LimitKind::Version,
        actual: u64::MAX,
        max: u64::MAX - 1,
    })
}

/// The top-level keys a patch may change: its own keys, or every key for a clear.
fn touched_keys(patch: &SectionPatch, current: &Map<String, Value>) -> BTreeSet<String> {
    match patch {
        SectionPatch::Merge(keys) => keys.keys().cloned().collect(),
        SectionPatch::Clear => current.keys().cloned().collect(),
    }
}
