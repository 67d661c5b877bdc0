//! The twin document domain, pure: documents, versions, merge patches, the delta, metadata,
//! acknowledgements, reconciliation and limits. No IO and no clock: callers pass server time and
//! device source time in. The rules are written up in `docs/twin-semantics.md`.
//!
//! [`Twins`] holds every twin and is the one place they change; each change is checked whole
//! (expected version, keys, values, limits) before anything is modified, so a refused change
//! leaves everything as it was. Errors are one [`TwinError`] enum whose [`ErrorCode`] is the gRPC
//! status code it maps onto.
//!
//! A twin keeps its documents packed (`packed.rs`): the accessors decode what they return, so
//! a million idle twins cost their packed bytes, not a tree of maps each.

mod delta;
mod doc;
mod error;
mod inference;
pub mod limits;
mod metadata;
mod packed;
mod patch;
mod reconcile;
mod registry;
mod time;

pub use delta::{delta, json_equal, value_delta};
pub use doc::{DeviceView, Documents, ReconciliationSummary, Twin, UpdateOutcome};
pub use error::{ErrorCode, LimitKind, TwinError};
pub use inference::{CheckOutcome, InferenceCheck, ModelKey, max_abs_difference};
pub use limits::{Limits, Section, json_size};
pub use metadata::{MetadataNode, Stamp, TwinMetadata};
pub use packed::PackError;
pub use patch::SectionPatch;
pub use reconcile::{AckMeaning, Acknowledgement, DesiredAck, FleetConvergence, Reconciliation, ReconciliationState};
pub use registry::{NewTwin, Twins};
pub use time::Timestamp;
