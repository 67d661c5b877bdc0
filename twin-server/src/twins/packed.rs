//! A twin's documents at rest: eight MessagePack-encoded parts in one allocation.
//!
//! A million idle twins must fit in a couple of GiB: as decoded `serde_json` maps and metadata
//! trees a small twin takes about 7 KiB (a B-tree node per map), packed it takes about 500
//! bytes. Each part is encoded on its own, so a reader decodes only what it needs (a tag filter
//! decodes the tags, a delta the desired and reported sections) and a change re-encodes only the
//! parts it touched. MessagePack comes from `rmp-serde`, structs as arrays (no field names);
//! the metadata tree, whose JSON form skips empty fields, has a fixed-shape wire form here.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::ser::{SerializeMap, SerializeTuple};
use serde::{Deserialize, Serialize, Serializer};

use super::metadata::MetadataNode;
use super::time::Timestamp;

/// The parts of a packed twin, in storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Tags = 0,
    Desired = 1,
    Reported = 2,
    TagsMetadata = 3,
    DesiredMetadata = 4,
    ReportedMetadata = 5,
    Acknowledgements = 6,
    Reconciliation = 7,
}

/// Number of parts.
pub(crate) const PARTS: usize = 8;

/// Every part, in storage order.
pub(crate) const ALL_PARTS: [Part; PARTS] = [
    Part::Tags,
    Part::Desired,
    Part::Reported,
    Part::TagsMetadata,
    Part::DesiredMetadata,
    Part::ReportedMetadata,
    Part::Acknowledgements,
    Part::Reconciliation,
];

/// Eight encoded parts back to back; `ends[i]` is the end offset of part `i`.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct Packed {
    bytes: Box<[u8]>,
    ends: [u32; PARTS],
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Packed({} bytes)", self.bytes.len())
    }
}

/// Why stored bytes are not a packed twin.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A part could not be encoded (a value MessagePack cannot hold).
    #[error("cannot encode {part:?}: {reason}")]
    Encode {
        /// The part.
        part: &'static str,
        /// The encoder's message.
        reason: String,
    },
    /// The bytes are truncated or malformed.
    #[error("{0}")]
    Decode(String),
}

impl Packed {
    /// Packs the encoded parts, in [`ALL_PARTS`] order.
    pub(crate) fn from_parts(parts: [&[u8]; PARTS]) -> Result<Packed, PackError> {
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let mut bytes = Vec::with_capacity(total);
        let mut ends = [0u32; PARTS];
        for (end, part) in ends.iter_mut().zip(parts) {
            bytes.extend_from_slice(part);
            *end = u32::try_from(bytes.len()).map_err(|_| PackError::Encode {
                part: "twin",
                reason: format!("{total} bytes do not fit a packed twin"),
            })?;
        }
        Ok(Packed {
            bytes: bytes.into_boxed_slice(),
            ends,
        })
    }

    /// The packed parts from stored `bytes` and their end offsets, checked for shape.
    pub(crate) fn from_stored(bytes: &[u8], ends: [u32; PARTS]) -> Result<Packed, PackError> {
        let mut start = 0u32;
        for end in ends {
            if end < start {
                return Err(PackError::Decode(format!("part offsets {ends:?} are not ascending")));
            }
            start = end;
        }
        if usize::try_from(start).ok() != Some(bytes.len()) {
            return Err(PackError::Decode(format!(
                "part offsets end at {start}, the body has {} bytes",
                bytes.len()
            )));
        }
        Ok(Packed {
            bytes: bytes.into(),
            ends,
        })
    }

    /// The encoded bytes of one part.
    pub(crate) fn part(&self, part: Part) -> &[u8] {
        let index = part as usize;
        let start = if index == 0 { 0 } else { self.ends[index - 1] as usize };
        &self.bytes[start..self.ends[index] as usize]
    }

    /// These parts, with some replaced by new encodings.
    pub(crate) fn replace(&self, changes: &[(Part, Vec<u8>)]) -> Result<Packed, PackError> {
        let mut parts: [&[u8]; PARTS] = [&[]; PARTS];
        for part in ALL_PARTS {
            parts[part as usize] = changes
                .iter()
                .find(|(changed, _)| *changed == part)
                .map_or_else(|| self.part(part), |(_, bytes)| bytes.as_slice());
        }
        Packed::from_parts(parts)
    }

    /// All parts back to back.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The end offsets of the parts.
    pub(crate) fn ends(&self) -> [u32; PARTS] {
        self.ends
    }
}

/// Encodes a value as a part (structs as arrays).
pub(crate) fn encode<T: Serialize + ?Sized>(part: Part, value: &T) -> Result<Vec<u8>, PackError> {
    rmp_serde::to_vec(value).map_err(|error| PackError::Encode {
        part: part_name(part),
        reason: error.to_string(),
    })
}

/// Decodes a part.
pub(crate) fn decode<T: DeserializeOwned>(part: Part, bytes: &[u8]) -> Result<T, PackError> {
    rmp_serde::from_slice(bytes).map_err(|error| PackError::Decode(format!("{}: {error}", part_name(part))))
}

/// Encodes a metadata tree in its fixed-shape wire form.
pub(crate) fn encode_metadata(part: Part, node: &MetadataNode) -> Result<Vec<u8>, PackError> {
    encode(part, &NodeRef(node))
}

/// Decodes a metadata tree.
pub(crate) fn decode_metadata(part: Part, bytes: &[u8]) -> Result<MetadataNode, PackError> {
    decode::<WireNode>(part, bytes).map(WireNode::into_node)
}

fn part_name(part: Part) -> &'static str {
    match part {
        Part::Tags => "tags",
        Part::Desired => "desired",
        Part::Reported => "reported",
        Part::TagsMetadata => "metadata.tags",
        Part::DesiredMetadata => "metadata.desired",
        Part::ReportedMetadata => "metadata.reported",
        Part::Acknowledgements => "acknowledgements",
        Part::Reconciliation => "reconciliation",
    }
}

/// A metadata node as `[last_updated, source_time or nil, {key: node}]`.
struct NodeRef<'a>(&'a MetadataNode);

impl Serialize for NodeRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(3)?;
        tuple.serialize_element(&self.0.last_updated)?;
        tuple.serialize_element(&self.0.source_time)?;
        tuple.serialize_element(&Children(&self.0.children))?;
        tuple.end()
    }
}

struct Children<'a>(&'a BTreeMap<String, MetadataNode>);

impl Serialize for Children<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, node) in self.0 {
            map.serialize_entry(key, &NodeRef(node))?;
        }
        map.end()
    }
}

#[derive(Deserialize)]
struct WireNode(Timestamp, Option<Timestamp>, BTreeMap<String, WireNode>);

impl WireNode {
    fn into_node(self) -> MetadataNode {
        MetadataNode {
            last_updated: self.0,
            source_time: self.1,
            children: self.2.into_iter().map(|(key, node)| (key, node.into_node())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;

    #[test]
    fn parts_round_trip_and_replace_keeps_the_others() {
        let desired: Map<String, Value> = serde_json::from_value(json!({
            "a": 1, "b": -2, "c": 1.5, "d": [1, "x", null, true], "e": {"f": {"g": "h"}}, "u": u64::MAX
        }))
        .expect("object");
        let node = MetadataNode {
            last_updated: Timestamp::from_unix_nanos(7),
            source_time: Some(Timestamp::from_unix_nanos(5)),
            children: BTreeMap::from([("a".to_owned(), MetadataNode::default())]),
        };
        let mut parts: Vec<Vec<u8>> = vec![Vec::new(); PARTS];
        parts[Part::Desired as usize] = encode(Part::Desired, &desired).expect("encode");
        parts[Part::DesiredMetadata as usize] = encode_metadata(Part::DesiredMetadata, &node).expect("encode");
        let refs: [&[u8]; PARTS] = std::array::from_fn(|index| parts[index].as_slice());
        let packed = Packed::from_parts(refs).expect("pack");
        let back: Map<String, Value> = decode(Part::Desired, packed.part(Part::Desired)).expect("decode");
        assert_eq!(back, desired);
        assert_eq!(
            decode_metadata(Part::DesiredMetadata, packed.part(Part::DesiredMetadata)).expect("decode"),
            node
        );

        let tags: Map<String, Value> = serde_json::from_value(json!({"site": "x"})).expect("object");
        let replaced = packed
            .replace(&[(Part::Tags, encode(Part::Tags, &tags).expect("encode"))])
            .expect("replace");
        assert_eq!(
            decode::<Map<String, Value>>(Part::Tags, replaced.part(Part::Tags)).expect("tags"),
            tags
        );
        assert_eq!(replaced.part(Part::Desired), packed.part(Part::Desired));
        let stored = Packed::from_stored(replaced.bytes(), replaced.ends()).expect("stored");
        assert_eq!(stored, replaced);
    }

    #[test]
    fn malformed_stored_parts_are_errors() {
        let mut ends = [0u32; PARTS];
        ends[0] = 4;
        assert!(Packed::from_stored(&[1, 2, 3], ends).is_err(), "offsets past the end");
        ends[1] = 2;
        assert!(
            Packed::from_stored(&[1, 2, 3, 4], ends).is_err(),
            "offsets not ascending"
        );
        assert!(
            decode::<Map<String, Value>>(Part::Tags, &[0xc1]).is_err(),
            "0xc1 is never used"
        );
    }
}
