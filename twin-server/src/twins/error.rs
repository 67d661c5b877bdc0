//! The twin domain's one error type, each variant mapping onto one gRPC status code.

use std::fmt;

/// The gRPC status code a [`TwinError`] maps onto. The proto layer converts it; this module has no
/// gRPC dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `INVALID_ARGUMENT`: a malformed id, key, value or request, with its field path.
    InvalidArgument,
    /// `NOT_FOUND`: no twin with that id.
    NotFound,
    /// `ALREADY_EXISTS`: a twin with that id exists.
    AlreadyExists,
    /// `ABORTED`: the expected version is not the current one.
    Aborted,
    /// `RESOURCE_EXHAUSTED`: a configured limit would be exceeded.
    ResourceExhausted,
}

/// A configured limit, named as in [`crate::twins::Limits`] so that an error tells which setting to raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// `max_desired_bytes`: the serialized size of `desired`.
    DesiredBytes,
    /// `max_reported_bytes`: the serialized size of `reported`.
    ReportedBytes,
    /// `max_tags_bytes`: the serialized size of `tags`.
    TagsBytes,
    /// `max_depth`: the nesting depth of a section.
    Depth,
    /// `max_description_bytes`: the length of an acknowledgement's description.
    DescriptionBytes,
    /// The twin's version counter (`u64::MAX` updates).
    Version,
}

impl LimitKind {
    /// The limit's setting name (`max_desired_bytes`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            LimitKind::DesiredBytes => "max_desired_bytes",
            LimitKind::ReportedBytes => "max_reported_bytes",
            LimitKind::TagsBytes => "max_tags_bytes",
            LimitKind::Depth => "max_depth",
            LimitKind::DescriptionBytes => "max_description_bytes",
            LimitKind::Version => "max_version",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Why a twin operation was refused. A refused operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// A malformed id, key, value or request. `field` is the path of the offending value, as
    /// `desired.config.rate` or `desired.modes[2]`.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it, lowercase.
        reason: String,
    },
    /// No twin with this id (never created, or deleted).
    #[error("twin {twin_id:?} not found")]
    NotFound {
        /// The id asked for.
        twin_id: String,
    },
    /// A twin with this id already exists.
    #[error("twin {twin_id:?} already exists at version {version}")]
    AlreadyExists {
        /// The id asked for.
        twin_id: String,
        /// The existing twin's current version.
        version: u64,
    },
    /// The update named an expected version that is not the current one. Nothing was changed;
    /// the client should re-read the twin at `current` and retry.
    #[error("twin {twin_id:?}: expected version {expected}, current version is {current}")]
    VersionConflict {
        /// The twin's id.
        twin_id: String,
        /// The version the client expected.
        expected: u64,
        /// The twin's current version.
        current: u64,
    },
    /// The operation would exceed a configured limit.
    #[error("{field}: {actual} exceeds {limit} = {max} by {excess}", excess = actual.saturating_sub(*max))]
    LimitExceeded {
        /// Path of the offending field (`desired`, `desired.a.b`, ...).
        field: String,
        /// Which limit.
        limit: LimitKind,
        /// The value measured (bytes or levels).
        actual: u64,
        /// The configured maximum.
        max: u64,
    },
}

impl TwinError {
    /// The gRPC status code this error maps onto.
    pub const fn code(&self) -> ErrorCode {
        match self {
            TwinError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            TwinError::NotFound { .. } => ErrorCode::NotFound,
            TwinError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            TwinError::VersionConflict { .. } => ErrorCode::Aborted,
            TwinError::LimitExceeded { .. } => ErrorCode::ResourceExhausted,
        }
    }

    /// The offending field's path, for the errors that have one.
    pub fn field(&self) -> Option<&str> {
        match self {
            TwinError::InvalidArgument { field, .. } | TwinError::LimitExceeded { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        TwinError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
