//! Field paths (`fleet[1].count`) and where they sit in the source text (line and column).

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// The path of a field in a scenario file, e.g. `fleet[1].sensors[0].sine.period`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    /// The root (empty) path.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path extended by a key.
    pub fn key(&self, key: &str) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_owned()));
        Self(segments)
    }

    /// This path extended by an index.
    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        Self(segments)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for segment in &self.0 {
            match segment {
                Segment::Key(key) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(key)?;
                }
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// The span of the deepest node of `path` present in the parsed document.
pub fn locate(root: &Spanned<DeTable<'_>>, path: &FieldPath) -> Option<Range<usize>> {
    let mut segments = path.0.iter();
    let first = match segments.next() {
        Some(Segment::Key(key)) => key,
        _ => return Some(root.span()),
    };
    let Some((first_key, mut node)) = root.get_ref().get_key_value(first.as_str()) else {
        return Some(root.span());
    };
    let mut best = node.span();
    let mut key_span = Some(first_key.span());
    for segment in segments {
        let next: Option<&Spanned<DeValue<'_>>> = match segment {
            Segment::Key(key) => match node.get_ref() {
                DeValue::Table(table) => match table.get_key_value(key.as_str()) {
                    Some((k, v)) => {
                        key_span = Some(k.span());
                        Some(v)
                    }
                    None => None,
                },
                _ => None,
            },
            Segment::Index(index) => {
                key_span = None;
                node.get_ref().get(*index)
            }
        };
        match next {
            Some(next) => {
                node = next;
                best = node.span();
            }
            None => return Some(best),
        }
    }
    // Point at the key of a `key = value` pair when the value is a scalar: that is where a
    // reader looks first.
    match (node.get_ref(), key_span) {
        (DeValue::Table(_) | DeValue::Array(_), _) | (_, None) => Some(best),
        (_, Some(span)) => Some(span.start..best.end),
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_display_and_locate() {
        let text = "[meta]\nname = \"x\"\n\n[[fleet]]\nname = \"a\"\ncount = 1\n\n[[fleet]]\nname = \"b\"\ncount = 0\n";
        let root = DeTable::parse(text).expect("parses");
        let path = FieldPath::root().key("fleet").index(1).key("count");
        assert_eq!(path.to_string(), "fleet[1].count");
        let span = locate(&root, &path).expect("located");
        assert_eq!(line_column(text, span.start), (10, 1));
        // A missing leaf falls back to its parent.
        let missing = FieldPath::root().key("fleet").index(0).key("sensors");
        let span = locate(&root, &missing).expect("located");
        assert_eq!(line_column(text, span.start).0, 4);
    }
}
