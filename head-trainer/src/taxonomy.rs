//! A tenant's classes in memory: names, parents, example counts, and which classes are leaves
//! that heads predict.
//!
//! Read from the store in one transaction and then shared immutably (`Arc`) by every request,
//! so classification never touches the database for names.

use std::collections::BTreeMap;

use unicode_normalization::UnicodeNormalization;

/// One class of a tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassEntry {
    pub id: u64,
    pub name: String,
    pub parent: Option<u64>,
    /// Examples of this class itself (a parent has none).
    pub examples: u32,
}

/// A tenant's taxonomy at one point of the store's history.
#[derive(Clone, Debug, Default)]
pub struct Taxonomy {
    /// Store write sequence this snapshot reflects (orders snapshots).
    pub seq: u64,
    /// Example revision this snapshot reflects.
    pub revision: u64,
    /// Version given to the prototype head built from this revision.
    pub prototype_version: u64,
    pub classes: BTreeMap<u64, ClassEntry>,
}

impl Taxonomy {
    pub fn by_name(&self, name: &str) -> Option<&ClassEntry> {
        self.classes.values().find(|c| c.name == name)
    }

    pub fn children(&self, id: u64) -> impl Iterator<Item = &ClassEntry> {
        self.classes.values().filter(move |c| c.parent == Some(id))
    }

    pub fn is_parent(&self, id: u64) -> bool {
        self.children(id).next().is_some()
    }

    /// Classes that heads predict: those with examples of their own (parents have none).
    pub fn leaves(&self) -> Vec<u64> {
        self.classes
            .values()
            .filter(|c| c.examples > 0)
            .map(|c| c.id)
            .collect()
    }

    /// The group a leaf is scored under: its parent, or itself for a top-level class.
    pub fn group_of(&self, leaf: u64) -> u64 {
        self.classes
            .get(&leaf)
            .and_then(|c| c.parent)
            .unwrap_or(leaf)
    }

    pub fn name(&self, id: u64) -> &str {
        self.classes.get(&id).map(|c| c.name.as_str()).unwrap_or("")
    }

    /// Name of the leaf's parent, empty for a top-level class (as on the wire).
    pub fn parent_name(&self, id: u64) -> &str {
        self.classes
            .get(&id)
            .and_then(|c| c.parent)
            .map(|p| self.name(p))
            .unwrap_or("")
    }

    /// Name of the leaf's parent, `None` for a top-level class.
    pub fn parent_of(&self, id: u64) -> Option<&str> {
        Some(self.parent_name(id)).filter(|p| !p.is_empty())
    }

    /// Examples of a class, counting a parent's children.
    pub fn examples_under(&self, id: u64) -> u32 {
        let own = self.classes.get(&id).map(|c| c.examples).unwrap_or(0);
        own + self
            .children(id)
            .map(|c| self.examples_under(c.id))
            .sum::<u32>()
    }
}

/// A class name as the store keeps it: Unicode NFC, so that "é" typed as one code point and
/// as "e" + combining accent are one class, not two that look the same. Refused: empty, over
/// [`MAX_CLASS_NAME_BYTES`], control characters, invisible or bidirectional formatting
/// characters (U+200B zero width space, U+202E right-to-left override, U+FEFF, ...: they make
/// two different names look identical, or a name display as another), and surrounding
/// whitespace.
pub fn class_name(name: &str) -> crate::Result<String> {
    let bad = |why| {
        Err(crate::Error::InvalidClassName {
            name: truncate(name, 64),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_CLASS_NAME_BYTES {
        return bad("longer than 128 bytes");
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if name.chars().any(is_invisible_format) {
        return bad("contains invisible or bidirectional formatting characters");
    }
    if name.trim() != name {
        return bad("leading or trailing whitespace");
    }
    let nfc: String = name.nfc().collect();
    if nfc.len() > MAX_CLASS_NAME_BYTES {
        return bad("longer than 128 bytes");
    }
    Ok(nfc)
}

/// Format characters (Unicode category Cf) and other invisibles that can make two names look
/// the same: zero-width spaces and joiners, bidirectional marks, embeddings, overrides and
/// isolates, word joiners and invisible operators, the byte order mark, the soft hyphen,
/// interlinear annotations, tag characters and variation selectors.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// Longest class name accepted, in UTF-8 bytes.
pub const MAX_CLASS_NAME_BYTES: usize = 128;

fn truncate(s: &str, max_chars: usize) -> String {
    let t: String = s.chars().take(max_chars).collect();
    if t.len() < s.len() { t + "…" } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_nfc_so_lookalikes_are_one_class() {
        let composed = class_name("caf\u{e9}").unwrap();
        let decomposed = class_name("cafe\u{301}").unwrap();
        assert_eq!(composed, decomposed);
        assert_eq!(composed, "caf\u{e9}");
    }

    #[test]
    fn invisible_and_bidi_characters_are_refused() {
        for bad in [
            "my\u{200B}mug",
            "\u{FEFF}mug",
            "mug\u{202E}gum",
            "a\u{2066}b",
            "soft\u{AD}hyphen",
            "tab\there",
            " padded",
            "",
        ] {
            let err = class_name(bad).unwrap_err();
            assert!(
                matches!(err, crate::Error::InvalidClassName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(class_name("my mug").unwrap(), "my mug");
        assert_eq!(
            class_name("Kaffeebecher \u{2615}").unwrap(),
            "Kaffeebecher \u{2615}"
        );
    }

    #[test]
    fn errors_quote_a_long_name_shortened() {
        let long = "x".repeat(5000);
        let err = class_name(&long).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
    }
}
