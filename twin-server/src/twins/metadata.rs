//! Per-leaf metadata: when each value was last written by the server, and the device's own time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::time::Timestamp;

/// The time of one write: the server's time, and the device's source time when it gave one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    /// Server time of the write.
    pub server: Timestamp,
    /// The device's own time for the value (reported updates only), when supplied.
    pub source: Option<Timestamp>,
}

/// Metadata of one level of a section, mirroring the document's shape.
///
/// Every level carries `last_updated`, not only leaves (as Azure does), so that a deletion is
/// dated: deleting `a.b` sets `a`'s `last_updated`. Leaves (scalars and arrays) also carry the
/// device's `source_time` when the write gave one. An object's `children` hold one entry per key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataNode {
    /// Server time of the last write at or below this level.
    pub last_updated: Timestamp,
    /// The device's source time of the last write of this leaf, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_time: Option<Timestamp>,
    /// Metadata of each key of an object (empty for leaves).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub children: BTreeMap<String, MetadataNode>,
}

impl MetadataNode {
    /// A leaf written at `stamp`.
    pub fn leaf(stamp: Stamp) -> Self {
        MetadataNode {
            last_updated: stamp.server,
            source_time: stamp.source,
            children: BTreeMap::new(),
        }
    }

    /// The metadata at a path of keys below this node, if that path exists.
    pub fn get(&self, path: &[&str]) -> Option<&MetadataNode> {
        let mut node = self;
        for key in path {
            node = node.children.get(*key)?;
        }
        Some(node)
    }
}

/// Metadata of a twin's three sections.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwinMetadata {
    /// Metadata of `desired`.
    pub desired: MetadataNode,
    /// Metadata of `reported`.
    pub reported: MetadataNode,
    /// Metadata of `tags`.
    pub tags: MetadataNode,
}
