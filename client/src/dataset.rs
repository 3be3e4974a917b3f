//! The `<parent>/<child>/*.jpg` tree that `enroll --dataset` and `eval` read.
//!
//! Class names come from folder names, so they must be unique across the tree: the server's
//! namespace is flat per tenant (a child named like a parent, or twice, would merge classes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{self, Skipped};

/// One leaf class and its photos (sorted by path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildClass {
    /// Empty for a top-level class (`<class>/*.jpg` directly under the root).
    pub parent: String,
    pub name: String,
    pub images: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    /// The root folder's name (`pets`), which keys the PyTorch anchors and the tenant names.
    pub name: String,
    /// Sorted by (parent, name).
    pub children: Vec<ChildClass>,
    pub skipped: Vec<Skipped>,
}

impl Dataset {
    pub fn images(&self) -> usize {
        self.children.iter().map(|c| c.images.len()).sum()
    }

    pub fn parents(&self) -> Vec<&str> {
        let mut p: Vec<&str> = self.children.iter().map(|c| c.parent.as_str()).collect();
        p.dedup();
        p.retain(|p| !p.is_empty());
        p
    }

    /// Parent of each child, for scoring "parent via predicted child".
    pub fn parent_of(&self) -> BTreeMap<String, String> {
        self.children
            .iter()
            .map(|c| (c.name.clone(), c.parent.clone()))
            .collect()
    }
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Reads the tree. Loose files at the root (`labels.csv`, `SOURCE.txt`) are metadata and
/// ignored; loose files inside a parent folder are listed as skipped.
pub fn read(root: &Path, max_bytes: u64) -> Result<Dataset> {
    let bad = |reason: String| Error::Dataset {
        root: root.to_path_buf(),
        reason,
    };
    let top = files::sorted_entries(root).map_err(|e| bad(format!("cannot list: {e}")))?;
    let mut children = Vec::new();
    let mut skipped = Vec::new();
    for dir in top.iter().filter(|p| p.is_dir() && !is_hidden(p)) {
        let entries = files::sorted_entries(dir).map_err(|e| bad(format!("cannot list: {e}")))?;
        let subdirs: Vec<&PathBuf> = entries
            .iter()
            .filter(|p| p.is_dir() && !is_hidden(p))
            .collect();
        let class_dirs: Vec<(String, &PathBuf)> = if subdirs.is_empty() {
            vec![(String::new(), dir)]
        } else {
            for loose in entries.iter().filter(|p| !p.is_dir()) {
                skipped.push(Skipped {
                    path: loose.clone(),
                    reason: "a file directly in a parent folder; put photos in <parent>/<child>/"
                        .into(),
                });
            }
            subdirs.into_iter().map(|d| (name_of(dir), d)).collect()
        };
        for (parent, class_dir) in class_dirs {
            let found = files::collect(&[class_dir.to_string_lossy().to_string()], max_bytes)?;
            skipped.extend(found.skipped);
            if found.images.is_empty() {
                skipped.push(Skipped {
                    path: class_dir.clone(),
                    reason: "no photos in this class folder".into(),
                });
                continue;
            }
            children.push(ChildClass {
                parent,
                name: name_of(class_dir),
                images: found.images,
            });
        }
    }
    if children.is_empty() {
        return Err(bad(
            "no class folders with photos; expected <parent>/<child>/*.jpg".into(),
        ));
    }
    let mut seen = BTreeMap::new();
    for c in &children {
        if let Some(other) = seen.insert(c.name.clone(), c.parent.clone()) {
            return Err(bad(format!(
                "class {:?} appears under both {other:?} and {:?}; class names must be unique",
                c.name, c.parent
            )));
        }
    }
    for c in &children {
        if !c.parent.is_empty() && seen.contains_key(&c.parent) {
            return Err(bad(format!(
                "{:?} is both a parent and a child; class names must be unique",
                c.parent
            )));
        }
    }
    let canonical = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    Ok(Dataset {
        root: root.to_path_buf(),
        name: name_of(&canonical),
        children,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::tests::jpeg_bytes;
    use std::fs;

    #[test]
    fn parses_parent_child_tree_and_ignores_root_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pets");
        for (p, c, n) in [
            ("dog", "pug", 2),
            ("cat", "sphynx", 3),
            ("dog", "beagle", 1),
        ] {
            fs::create_dir_all(root.join(p).join(c)).unwrap();
            for i in 0..n {
                fs::write(root.join(p).join(c).join(format!("{i}.jpg")), jpeg_bytes()).unwrap();
            }
        }
        fs::write(root.join("labels.csv"), "path,parent,child\n").unwrap();
        fs::write(root.join("dog/readme.txt"), "x").unwrap();
        fs::create_dir_all(root.join("cat/empty")).unwrap();

        let ds = read(&root, files::DEFAULT_MAX_FILE_BYTES).unwrap();
        assert_eq!(ds.name, "pets");
        let names: Vec<(&str, &str, usize)> = ds
            .children
            .iter()
            .map(|c| (c.parent.as_str(), c.name.as_str(), c.images.len()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("cat", "sphynx", 3),
                ("dog", "beagle", 1),
                ("dog", "pug", 2)
            ]
        );
        assert_eq!(ds.parents(), vec!["cat", "dog"]);
        assert_eq!(ds.images(), 6);
        assert_eq!(ds.skipped.len(), 2, "{:?}", ds.skipped);
        assert_eq!(ds.parent_of()["pug"], "dog");
    }

    #[test]
    fn flat_class_folders_have_no_parent_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("mug")).unwrap();
        fs::write(root.join("mug/1.jpg"), jpeg_bytes()).unwrap();
        let ds = read(root, files::DEFAULT_MAX_FILE_BYTES).unwrap();
        assert_eq!(ds.children[0].parent, "");
        assert_eq!(ds.children[0].name, "mug");

        for p in ["a", "b"] {
            fs::create_dir_all(root.join(p).join("same")).unwrap();
            fs::write(root.join(p).join("same/1.jpg"), jpeg_bytes()).unwrap();
        }
        let err = read(root, files::DEFAULT_MAX_FILE_BYTES).unwrap_err();
        assert!(err.to_string().contains("must be unique"), "{err}");
    }

    #[test]
    fn missing_or_empty_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("absent"), 1).is_err());
        assert!(read(dir.path(), 1).is_err());
    }
}
