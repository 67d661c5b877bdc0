//! Device id templates: `pump-{index:04}` gives `pump-0000`, `pump-0001`, ...

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Index { width: usize },
    Group,
}

/// A parsed id template with `{index}`, `{index:0N}` and `{group}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdTemplate {
    pieces: Vec<Piece>,
}

impl IdTemplate {
    /// Parses a template.
    ///
    /// # Errors
    /// Unknown placeholders and unbalanced braces, as a plain reason.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("unmatched `}}` in id template `{text}`"));
            }
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("unclosed `{{` in id template `{text}`"));
            };
            let inner = &rest[open + 1..open + close];
            let piece = match inner {
                "index" => Piece::Index { width: 0 },
                "group" => Piece::Group,
                _ => match inner.strip_prefix("index:0").and_then(|w| w.parse::<usize>().ok()) {
                    Some(width) if width <= 20 => Piece::Index { width },
                    _ => {
                        return Err(format!(
                            "unknown placeholder `{{{inner}}}` in id template `{text}` (use {{index}}, {{index:0N}} or {{group}})"
                        ));
                    }
                },
            };
            pieces.push(piece);
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        if pieces.is_empty() {
            return Err("id template is empty".into());
        }
        Ok(Self { pieces })
    }

    /// Whether the template varies with the index.
    pub fn has_index(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Index { .. }))
    }

    /// The id for `index` in `group`.
    pub fn render(&self, group: &str, index: u64) -> String {
        let mut id = String::with_capacity(24);
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => id.push_str(text),
                Piece::Index { width } => {
                    use std::fmt::Write;
                    let _ = write!(id, "{index:0width$}");
                }
                Piece::Group => id.push_str(group),
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_refuses() {
        let t = IdTemplate::parse("{group}-{index:04}").expect("valid");
        assert_eq!(t.render("pump", 7), "pump-0007");
        assert_eq!(t.render("pump", 12345), "pump-12345");
        assert!(IdTemplate::parse("x-{idx}").is_err());
        assert!(IdTemplate::parse("x-{index").is_err());
        assert!(!IdTemplate::parse("fixed").expect("valid").has_index());
    }
}
