//! One twin: its sections, version, metadata, acknowledgements and reconciliation, and the
//! changes it accepts. Every change is checked whole before anything is modified, so a refused
//! change leaves the twin exactly as it was.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::delta::{delta, json_equal, value_delta};
use super::error::{LimitKind, TwinError};
use super::inference::{CheckOutcome, InferenceCheck, ModelKey};
use super::limits::{Limits, Section, child_path};
use super::metadata::{MetadataNode, Stamp, TwinMetadata};
use super::packed::{PARTS, PackError, Packed, Part, decode, decode_metadata, encode, encode_metadata};
use super::patch::{SectionPatch, apply};
use super::reconcile::{AckMeaning, Acknowledgement, DesiredAck, Reconciliation, ReconciliationState};
use super::time::Timestamp;

/// A device twin. Created, changed and deleted through [`super::Twins`], which keeps versions
/// unique per id; read through the accessors.
///
/// The identity, versions and times are plain fields; the documents (tags, desired, reported,
/// their metadata, acknowledgements and reconciliation) are kept packed (`twins/packed.rs`) and
/// decoded by the accessors that return them, so an idle twin costs its packed size, not a tree
/// of maps. The reconciliation summary is kept decoded, for filters and metrics. The live
/// inference check is kept beside, boxed: most twins never have one.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    id: String,
    group: Option<String>,
    version: u64,
    desired_version: u64,
    reported_version: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
    summary: ReconciliationSummary,
    body: Packed,
    inference: Option<Box<InferenceCheck>>,
}

/// A twin's documents, decoded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Documents {
    /// Back-end-only tags.
    pub tags: Map<String, Value>,
    /// What the cloud wants the device to have.
    pub desired: Map<String, Value>,
    /// What the device says it has.
    pub reported: Map<String, Value>,
    /// Per-leaf metadata of the three sections.
    pub metadata: TwinMetadata,
    /// The last acknowledgement per top-level desired key.
    pub acknowledgements: BTreeMap<String, Acknowledgement>,
    /// The reconciliation per top-level desired key.
    pub reconciliation: BTreeMap<String, Reconciliation>,
}

/// Counts of a twin's desired keys by reconciliation state, and the oldest pending one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReconciliationSummary {
    /// Keys pending.
    pub pending: u32,
    /// Keys failed.
    pub failed: u32,
    /// The earliest `pending_since` of the pending keys.
    pub oldest_pending: Option<Timestamp>,
}

impl ReconciliationSummary {
    fn of(reconciliation: &BTreeMap<String, Reconciliation>) -> Self {
        let mut summary = ReconciliationSummary::default();
        for entry in reconciliation.values() {
            match entry.state {
                ReconciliationState::Pending => {
                    summary.pending += 1;
                    let since = entry.pending_since;
                    summary.oldest_pending = Some(summary.oldest_pending.map_or(since, |oldest| oldest.min(since)));
                }
                ReconciliationState::Failed => summary.failed += 1,
                ReconciliationState::Succeeded => {}
            }
        }
        summary
    }
}

/// The stored header of a twin: everything but the packed parts, then the parts' end offsets.
#[derive(Serialize, Deserialize)]
struct StoredHeader {
    id: String,
    group: Option<String>,
    version: u64,
    desired_version: u64,
    reported_version: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
    ends: [u32; PARTS],
}

/// The first byte of the stored form (a MessagePack array of the header's 8 fields); JSON, the
/// form of earlier versions, starts with `{`.
const STORED_TAG: u8 = 0x98;

/// The result of an accepted desired, reported or tags update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateOutcome {
    /// The twin's version after the update.
    pub version: u64,
    /// The whole current delta, when a desired or reported update leaves desired != reported
    /// (AWS rule 6: a delta notification is due). Always `None` for tags.
    pub delta: Option<Map<String, Value>>,
    /// The reconciliation entries the update created or changed, in key order (an entry whose
    /// key left desired is not listed).
    pub reconciliation: Vec<(String, Reconciliation)>,
}

/// The entries of `after` that are new or differ from `before`.
fn changed_entries(
    before: &BTreeMap<String, Reconciliation>,
    after: &BTreeMap<String, Reconciliation>,
) -> Vec<(String, Reconciliation)> {
    after
        .iter()
        .filter(|(key, entry)| before.get(*key) != Some(*entry))
        .map(|(key, entry)| (key.clone(), entry.clone()))
        .collect()
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

/// The inference check of a twin that has none.
static NO_CHECKS: InferenceCheck = InferenceCheck::NONE;

/// Why a packed part did not decode: only bytes this module did not write (checked by
/// [`Twin::decode`] before a twin exists), so never for a twin in memory.
const PACKED: &str = "a twin's packed parts decode: written by Twin::pack, checked by Twin::decode";

impl Twin {
    /// A twin holding `documents`, with its reconciliation summary computed.
    fn pack(header: Header, documents: &Documents) -> Result<Self, PackError> {
        let parts = [
            encode(Part::Tags, &documents.tags)?,
            encode(Part::Desired, &documents.desired)?,
            encode(Part::Reported, &documents.reported)?,
            encode_metadata(Part::TagsMetadata, &documents.metadata.tags)?,
            encode_metadata(Part::DesiredMetadata, &documents.metadata.desired)?,
            encode_metadata(Part::ReportedMetadata, &documents.metadata.reported)?,
            encode(Part::Acknowledgements, &documents.acknowledgements)?,
            encode(Part::Reconciliation, &documents.reconciliation)?,
        ];
        let body = Packed::from_parts(std::array::from_fn(|index| parts[index].as_slice()))?;
        Ok(header.with(ReconciliationSummary::of(&documents.reconciliation), body))
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
        let empty = MetadataNode {
            last_updated: now,
            ..MetadataNode::default()
        };
        let mut documents = Documents {
            metadata: TwinMetadata {
                desired: empty.clone(),
                reported: empty.clone(),
                tags: empty,
            },
            ..Documents::default()
        };
        let stamp = Stamp {
            server: now,
            source: None,
        };
        for (section, document) in [(Section::Tags, tags), (Section::Desired, desired)] {
            limits.check_patch(section.name(), &document)?;
            let (target, metadata) = match section {
                Section::Tags => (&mut documents.tags, &mut documents.metadata.tags),
                _ => (&mut documents.desired, &mut documents.metadata.desired),
            };
            apply(target, metadata, &SectionPatch::Merge(document), stamp);
            limits.check_section(section, target)?;
        }
        for key in documents.desired.keys() {
            documents
                .reconciliation
                .insert(key.clone(), Reconciliation::pending(version, now));
        }
        let header = Header {
            id,
            group,
            version,
            desired_version: version,
            reported_version: version,
            created_at: now,
            updated_at: now,
        };
        let twin_id = header.id.clone();
        Twin::pack(header, &documents).map_err(|error| pack_failed(&twin_id, &error))
    }

    /// The stored form: a MessagePack header (identity, versions, times, part offsets), then
    /// the packed parts as they are.
    ///
    /// # Errors
    /// Never for a twin built by this module; the encoder's message otherwise.
    pub fn encode(&self) -> Result<Vec<u8>, PackError> {
        let header = StoredHeader {
            id: self.id.clone(),
            group: self.group.clone(),
            version: self.version,
            desired_version: self.desired_version,
            reported_version: self.reported_version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            ends: self.body.ends(),
        };
        let mut bytes = rmp_serde::to_vec(&header).map_err(|error| PackError::Encode {
            part: "header",
            reason: error.to_string(),
        })?;
        bytes.extend_from_slice(self.body.bytes());
        if let Some(check) = &self.inference {
            // A trailer after the parts, with field names (it skips empty fields), absent in
            // rows written before the check existed.
            let trailer = rmp_serde::to_vec_named(check).map_err(|error| PackError::Encode {
                part: "inference",
                reason: error.to_string(),
            })?;
            bytes.extend_from_slice(&trailer);
        }
        Ok(bytes)
    }

    /// A twin from its stored form ([`Twin::encode`]), or from the JSON of earlier versions.
    /// Every part is decoded once, so a twin in memory always decodes.
    ///
    /// # Errors
    /// Truncated or malformed bytes.
    pub fn decode(bytes: &[u8]) -> Result<Twin, PackError> {
        if bytes.first() != Some(&STORED_TAG) {
            let legacy: LegacyTwin = serde_json::from_slice(bytes)
                .map_err(|error| PackError::Decode(format!("not a stored twin: {error}")))?;
            return legacy.into_twin();
        }
        let mut cursor = std::io::Cursor::new(bytes);
        let header: StoredHeader =
            rmp_serde::from_read(&mut cursor).map_err(|error| PackError::Decode(format!("twin header: {error}")))?;
        let start = usize::try_from(cursor.position())
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let body_end = usize::try_from(header.ends[PARTS - 1])
            .ok()
            .and_then(|length| start.checked_add(length))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| PackError::Decode(format!("part offsets {:?} run past the stored bytes", header.ends)))?;
        let body = Packed::from_stored(&bytes[start..body_end], header.ends)?;
        let inference = match &bytes[body_end..] {
            [] => None,
            trailer => Some(Box::new(
                rmp_serde::from_slice::<InferenceCheck>(trailer)
                    .map_err(|error| PackError::Decode(format!("inference check: {error}")))?,
            )),
        };
        for part in [Part::Tags, Part::Desired, Part::Reported] {
            decode::<Map<String, Value>>(part, body.part(part))?;
        }
        for part in [Part::TagsMetadata, Part::DesiredMetadata, Part::ReportedMetadata] {
            decode_metadata(part, body.part(part))?;
        }
        decode::<BTreeMap<String, Acknowledgement>>(Part::Acknowledgements, body.part(Part::Acknowledgements))?;
        let reconciliation: BTreeMap<String, Reconciliation> =
            decode(Part::Reconciliation, body.part(Part::Reconciliation))?;
        let header_fields = Header {
            id: header.id,
            group: header.group,
            version: header.version,
            desired_version: header.desired_version,
            reported_version: header.reported_version,
            created_at: header.created_at,
            updated_at: header.updated_at,
        };
        let mut twin = header_fields.with(ReconciliationSummary::of(&reconciliation), body);
        twin.inference = inference;
        Ok(twin)
    }

    /// Bytes of the packed documents (what an idle twin costs beyond its identity).
    pub fn packed_len(&self) -> usize {
        self.body.bytes().len()
    }

    fn part<T: DeserializeOwned>(&self, part: Part) -> T {
        decode(part, self.body.part(part)).expect(PACKED)
    }

    fn metadata_part(&self, part: Part) -> MetadataNode {
        decode_metadata(part, self.body.part(part)).expect(PACKED)
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

    /// Back-end-only tags; never part of what a device receives (decoded).
    pub fn tags(&self) -> Map<String, Value> {
        self.part(Part::Tags)
    }

    /// What the cloud wants the device to have (decoded).
    pub fn desired(&self) -> Map<String, Value> {
        self.part(Part::Desired)
    }

    /// What the device says it has (decoded).
    pub fn reported(&self) -> Map<String, Value> {
        self.part(Part::Reported)
    }

    /// A section by name (decoded).
    pub fn section(&self, section: Section) -> Map<String, Value> {
        self.part(section_part(section))
    }

    /// Per-leaf metadata of the three sections (decoded).
    pub fn metadata(&self) -> TwinMetadata {
        TwinMetadata {
            desired: self.metadata_part(Part::DesiredMetadata),
            reported: self.metadata_part(Part::ReportedMetadata),
            tags: self.metadata_part(Part::TagsMetadata),
        }
    }

    /// The last acknowledgement per top-level desired key (decoded).
    pub fn acknowledgements(&self) -> BTreeMap<String, Acknowledgement> {
        self.part(Part::Acknowledgements)
    }

    /// The reconciliation per top-level desired key (decoded).
    pub fn reconciliation(&self) -> BTreeMap<String, Reconciliation> {
        self.part(Part::Reconciliation)
    }

    /// Every document, decoded at once.
    pub fn documents(&self) -> Documents {
        Documents {
            tags: self.tags(),
            desired: self.desired(),
            reported: self.reported(),
            metadata: self.metadata(),
            acknowledgements: self.acknowledgements(),
            reconciliation: self.reconciliation(),
        }
    }

    /// The live inference check: device outputs compared with the twin's re-runs (all zero
    /// when nothing was checked).
    pub fn inference(&self) -> &InferenceCheck {
        self.inference.as_deref().unwrap_or(&NO_CHECKS)
    }

    /// Records inference checks. Not a document change: the version and `updated_at` stay.
    pub(crate) fn record_inference(&mut self, checks: &[CheckOutcome], now: Timestamp) {
        let check = self.inference.get_or_insert_with(Box::default);
        for outcome in checks {
            check.record(outcome, now);
        }
    }

    /// Keys by reconciliation state and the oldest pending one, without decoding.
    pub fn reconciliation_summary(&self) -> ReconciliationSummary {
        self.summary
    }

    /// The twin's overall reconciliation: `Failed` if any key failed, else `Pending` if any key is
    /// pending, else `Succeeded` (also with no desired keys).
    pub fn reconciliation_state(&self) -> ReconciliationState {
        if self.summary.failed > 0 {
            ReconciliationState::Failed
        } else if self.summary.pending > 0 {
            ReconciliationState::Pending
        } else {
            ReconciliationState::Succeeded
        }
    }

    /// The current delta of desired against reported (AWS rules).
    pub fn delta(&self) -> Map<String, Value> {
        delta(&self.desired(), &self.reported())
    }

    /// What the device receives on (re)connect, given the last desired version it saw: the full
    /// current delta, so nothing changed while it was offline is missed.
    pub fn device_view(&self, last_seen_desired_version: Option<u64>) -> DeviceView {
        let (desired, reported) = (self.desired(), self.reported());
        DeviceView {
            twin_id: self.id.clone(),
            version: self.version,
            desired_version: self.desired_version,
            delta: delta(&desired, &reported),
            desired,
            reported,
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

    /// Replaces some parts; the reconciliation summary follows a new reconciliation part.
    fn repack(
        &mut self,
        changes: &[(Part, Vec<u8>)],
        reconciliation: Option<&BTreeMap<String, Reconciliation>>,
    ) -> Result<(), TwinError> {
        self.body = self
            .body
            .replace(changes)
            .map_err(|error| pack_failed(&self.id, &error))?;
        if let Some(reconciliation) = reconciliation {
            self.summary = ReconciliationSummary::of(reconciliation);
        }
        Ok(())
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
        let previous = self.section(section);
        let metadata_part = section_metadata_part(section);
        let mut merged = previous.clone();
        let mut merged_metadata = self.metadata_part(metadata_part);
        apply(&mut merged, &mut merged_metadata, patch, stamp);
        limits.check_section(section, &merged)?;

        // Everything that can be refused was checked; what follows only encodes our own values.
        let touched = touched_keys(patch, &previous);
        let mut changes = vec![
            change(&self.id, section_part(section), &merged)?,
            metadata_change(&self.id, metadata_part, &merged_metadata)?,
        ];
        let mut reconciliation_changes = Vec::new();
        let notify = match section {
            Section::Desired => {
                let reported = self.reported();
                let mut reconciliation = self.reconciliation();
                let mut acknowledgements = self.acknowledgements();
                let before = (reconciliation.clone(), acknowledgements.len());
                reconcile_desired_change(
                    &mut reconciliation,
                    &mut acknowledgements,
                    &previous,
                    &merged,
                    &reported,
                    &touched,
                    version,
                    stamp.server,
                );
                if acknowledgements.len() != before.1 {
                    changes.push(change(&self.id, Part::Acknowledgements, &acknowledgements)?);
                }
                reconciliation_changes = changed_entries(&before.0, &reconciliation);
                let reconciliation_changed = reconciliation != before.0;
                if reconciliation_changed {
                    changes.push(change(&self.id, Part::Reconciliation, &reconciliation)?);
                }
                let delta = delta(&merged, &reported);
                self.repack(&changes, reconciliation_changed.then_some(&reconciliation))?;
                self.desired_version = version;
                Some(delta)
            }
            Section::Reported => {
                let desired = self.desired();
                let mut reconciliation = self.reconciliation();
                let before = reconciliation.clone();
                reconcile_reported_change(
                    &mut reconciliation,
                    &desired,
                    &previous,
                    &merged,
                    &touched,
                    stamp.server,
                );
                reconciliation_changes = changed_entries(&before, &reconciliation);
                let reconciliation_changed = reconciliation != before;
                if reconciliation_changed {
                    changes.push(change(&self.id, Part::Reconciliation, &reconciliation)?);
                }
                let delta = delta(&desired, &merged);
                self.repack(&changes, reconciliation_changed.then_some(&reconciliation))?;
                self.reported_version = version;
                if let Some(check) = &mut self.inference {
                    let before = ModelKey::from_reported(&previous);
                    let after = ModelKey::from_reported(&merged);
                    check.reported_model_changed(before.as_ref(), after.as_ref());
                }
                Some(delta)
            }
            Section::Tags => {
                self.repack(&changes, None)?;
                None
            }
        };
        self.version = version;
        self.updated_at = stamp.server;
        Ok(UpdateOutcome {
            version,
            delta: notify.filter(|delta| !delta.is_empty()),
            reconciliation: reconciliation_changes,
        })
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
        let desired = self.desired();
        let mut seen = BTreeSet::new();
        let mut meanings = Vec::with_capacity(acks.len());
        for ack in acks {
            let field = child_path("acknowledgements", &ack.key);
            if !seen.insert(ack.key.as_str()) {
                return Err(TwinError::invalid(field, "acknowledged twice in one request"));
            }
            if !desired.contains_key(&ack.key) {
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
        let mut acknowledgements = self.acknowledgements();
        let mut reconciliation = self.reconciliation();
        for (ack, meaning) in acks.iter().zip(meanings) {
            let newer_than_stored = acknowledgements
                .get(&ack.key)
                .is_none_or(|stored| stored.version <= ack.version);
            if newer_than_stored {
                acknowledgements.insert(
                    ack.key.clone(),
                    Acknowledgement {
                        status: ack.status,
                        version: ack.version,
                        description: ack.description.clone(),
                        received_at: now,
                    },
                );
            }
            let Some(entry) = reconciliation.get_mut(&ack.key) else {
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
        let changes = [
            change(&self.id, Part::Acknowledgements, &acknowledgements)?,
            change(&self.id, Part::Reconciliation, &reconciliation)?,
        ];
        self.repack(&changes, Some(&reconciliation))?;
        self.version = version;
        self.updated_at = now;
        Ok(version)
    }
}

/// A twin's identity, versions and times, before its documents are packed.
struct Header {
    id: String,
    group: Option<String>,
    version: u64,
    desired_version: u64,
    reported_version: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl Header {
    fn with(self, summary: ReconciliationSummary, body: Packed) -> Twin {
        Twin {
            id: self.id,
            group: self.group,
            version: self.version,
            desired_version: self.desired_version,
            reported_version: self.reported_version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            summary,
            body,
            inference: None,
        }
    }
}

/// The JSON form twins were stored in before they were packed (store schema 1).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyTwin {
    id: String,
    #[serde(default)]
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
}

impl LegacyTwin {
    fn into_twin(self) -> Result<Twin, PackError> {
        let header = Header {
            id: self.id,
            group: self.group,
            version: self.version,
            desired_version: self.desired_version,
            reported_version: self.reported_version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        };
        let documents = Documents {
            tags: self.tags,
            desired: self.desired,
            reported: self.reported,
            metadata: self.metadata,
            acknowledgements: self.acknowledgements,
            reconciliation: self.reconciliation,
        };
        Twin::pack(header, &documents)
    }
}

fn section_part(section: Section) -> Part {
    match section {
        Section::Desired => Part::Desired,
        Section::Reported => Part::Reported,
        Section::Tags => Part::Tags,
    }
}

fn section_metadata_part(section: Section) -> Part {
    match section {
        Section::Desired => Part::DesiredMetadata,
        Section::Reported => Part::ReportedMetadata,
        Section::Tags => Part::TagsMetadata,
    }
}

/// A part's new encoding, for [`Packed::replace`].
fn change<T: Serialize + ?Sized>(twin_id: &str, part: Part, value: &T) -> Result<(Part, Vec<u8>), TwinError> {
    encode(part, value)
        .map(|bytes| (part, bytes))
        .map_err(|error| pack_failed(twin_id, &error))
}

/// A metadata part's new encoding, for [`Packed::replace`].
fn metadata_change(twin_id: &str, part: Part, node: &MetadataNode) -> Result<(Part, Vec<u8>), TwinError> {
    encode_metadata(part, node)
        .map(|bytes| (part, bytes))
        .map_err(|error| pack_failed(twin_id, &error))
}

/// Encoding our own values failed (a value MessagePack cannot hold): refused, nothing changed.
fn pack_failed(twin_id: &str, error: &PackError) -> TwinError {
    TwinError::invalid("document".to_owned(), format!("cannot store twin {twin_id}: {error}"))
}

/// Desired keys that changed value start pending (or succeed at once if reported already
/// matches); deleted keys drop their reconciliation and acknowledgement.
#[allow(clippy::too_many_arguments)]
fn reconcile_desired_change(
    reconciliation: &mut BTreeMap<String, Reconciliation>,
    acknowledgements: &mut BTreeMap<String, Acknowledgement>,
    previous: &Map<String, Value>,
    desired: &Map<String, Value>,
    reported: &Map<String, Value>,
    touched: &BTreeSet<String>,
    version: u64,
    now: Timestamp,
) {
    for key in touched {
        let Some(new_value) = desired.get(key) else {
            reconciliation.remove(key);
            acknowledgements.remove(key);
            continue;
        };
        let unchanged = previous.get(key).is_some_and(|old| json_equal(old, new_value));
        if unchanged && reconciliation.contains_key(key) {
            continue;
        }
        let mut entry = Reconciliation::pending(version, now);
        if value_delta(new_value, reported.get(key)).is_none() {
            entry.resolve(ReconciliationState::Succeeded, now);
        }
        reconciliation.insert(key.clone(), entry);
    }
}

/// A reported change can complete a pending or failed key, or reopen a succeeded one that
/// drifted away.
fn reconcile_reported_change(
    reconciliation: &mut BTreeMap<String, Reconciliation>,
    desired: &Map<String, Value>,
    previous: &Map<String, Value>,
    reported: &Map<String, Value>,
    touched: &BTreeSet<String>,
    now: Timestamp,
) {
    for key in touched {
        let (Some(desired_value), Some(entry)) = (desired.get(key), reconciliation.get_mut(key)) else {
            continue;
        };
        let in_sync_after = value_delta(desired_value, reported.get(key)).is_none();
        let in_sync_before = value_delta(desired_value, previous.get(key)).is_none();
        if in_sync_after {
            entry.resolve(ReconciliationState::Succeeded, now);
        } else if in_sync_before && entry.state == ReconciliationState::Succeeded {
            entry.reopen(now);
        }
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
