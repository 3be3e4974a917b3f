//! The tenant file: what `Export` writes and `Import` reads. One safetensors file, so that
//! its tensors load with any safetensors reader (Python's included), with JSON in the
//! `__metadata__` strings:
//!
//! - `format` (`taxon-heads`) and `format_version` (1): a reader refuses what it cannot read;
//! - `model` (the model identity every embedding and head belongs to), `dim`, `tenant` (the
//!   source, for people);
//! - `classes`: JSON list of `{name, parent, examples}`, parents before their children, with
//!   `parent` the index of the parent in this list;
//! - `heads`: JSON list of each head's metadata (`HeadMeta`), its `classes` and `groups` as
//!   indices into `classes` rather than the source's ids, which mean nothing elsewhere.
//!
//! Tensors: `examples.embedding` (F32, N x dim), `examples.class` (U32, N: index into
//! `classes`), `examples.hash` (U8, N x 32: each photo's sha256, so that the importing tenant
//! recognises a photo it is sent again), and `head.<kind>.<tensor>` for each head's tensors;
//! `head.prototype.proto.means` are the class means. No photo is in the file.
//!
//! Decoding trusts nothing: every index, length, name and shape is checked, and a head is
//! refused unless it answers with one probability per class.

use std::collections::{HashMap, HashSet};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::heads::{Head, HeadKind, HeadMeta};
use crate::store::Hash;
use crate::taxonomy::class_name;
use crate::{Error, Result};

/// The `format` string of a tenant file.
pub const FORMAT: &str = "taxon-heads";
/// The `format_version` this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The longest embedding a file may hold (the backbones' are 512 and 1280).
const MAX_DIM: usize = 1 << 16;

/// One class of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileClass {
    pub name: String,
    /// Index of the parent in the file's classes (always lower than the class's own).
    pub parent: Option<usize>,
    /// Examples of the class itself (informational: the tensors are what is imported).
    #[serde(default)]
    pub examples: u32,
}

/// One example: its class (index), photo hash and embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct FileExample {
    pub class: usize,
    pub hash: Hash,
    pub embedding: Vec<f32>,
}

/// A decoded tenant file. Heads' `meta.classes` and `meta.groups` are indices into `classes`.
#[derive(Clone, Debug)]
pub struct TenantFile {
    pub model: String,
    pub dim: usize,
    /// The tenant it was exported from.
    pub tenant: String,
    pub classes: Vec<FileClass>,
    pub examples: Vec<FileExample>,
    pub heads: Vec<Head>,
}

/// Anything wrong with a file is the caller's: INVALID_ARGUMENT, naming what.
fn bad(why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("tenant file: {why}"))
}

impl TenantFile {
    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let n = self.examples.len();
        let mut x = Vec::with_capacity(n * self.dim);
        let mut class = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n * 32);
        for e in &self.examples {
            x.extend_from_slice(&e.embedding);
            class.push(u32::try_from(e.class).map_err(|_| bad("class index over u32"))?);
            hash.extend_from_slice(&e.hash);
        }
        let cpu = &Device::Cpu;
        let mut tensors: Vec<(String, Tensor)> = vec![
            (
                "examples.embedding".into(),
                Tensor::from_vec(x, (n, self.dim), cpu)?,
            ),
            ("examples.class".into(), Tensor::from_vec(class, n, cpu)?),
            (
                "examples.hash".into(),
                Tensor::from_vec(hash, (n, 32), cpu)?,
            ),
        ];
        let mut metas = Vec::with_capacity(self.heads.len());
        for h in &self.heads {
            for (name, t) in h.tensors()? {
                tensors.push((format!("head.{}.{name}", h.meta.kind), t));
            }
            metas.push(h.meta.clone());
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("model".to_string(), self.model.clone()),
            ("dim".to_string(), self.dim.to_string()),
            ("tenant".to_string(), self.tenant.clone()),
            ("classes".to_string(), serde_json::to_string(&self.classes)?),
            ("heads".to_string(), serde_json::to_string(&metas)?),
        ]);
        Ok(safetensors::serialize(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
        )?)
    }

    /// Reads and checks a file: the format, every class name and parent, every example's
    /// class and length, and every head against the classes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("no __metadata__: not a file from Export"))?;
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("no `{k}` in its metadata")))
        };
        if field("format")? != FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{FORMAT}`",
                field("format")?
            )));
        }
        let version = field("format_version")?;
        if version != &FORMAT_VERSION.to_string() {
            return Err(bad(format!(
                "format version {version}; this server reads version {FORMAT_VERSION}"
            )));
        }
        let model = field("model")?.clone();
        let dim: usize = field("dim")?
            .parse()
            .map_err(|e| bad(format!("dim: {e}")))?;
        if dim == 0 || dim > MAX_DIM {
            return Err(bad(format!("dim {dim}, expected 1 to {MAX_DIM}")));
        }
        let tenant = field("tenant")?.clone();
        let classes: Vec<FileClass> =
            serde_json::from_str(field("classes")?).map_err(|e| bad(format!("classes: {e}")))?;
        let classes = check_classes(classes)?;
        let metas: Vec<HeadMeta> =
            serde_json::from_str(field("heads")?).map_err(|e| bad(format!("heads: {e}")))?;

        let st = SafeTensors::deserialize(bytes).map_err(bad)?;
        let examples = read_examples(&st, dim, &classes)?;
        let leaves: HashSet<usize> = examples.iter().map(|e| e.class).collect();
        let mut heads = Vec::with_capacity(metas.len());
        let mut kinds = HashSet::new();
        for m in metas {
            let kind = m.kind().map_err(bad)?;
            if !kinds.insert(kind) {
                return Err(bad(format!("two `{kind}` heads")));
            }
            if m.model != model || m.dim != dim {
                return Err(bad(format!(
                    "`{kind}` head is for model `{}` (dim {}), the file for `{model}` (dim {dim})",
                    m.model, m.dim
                )));
            }
            check_head_classes(&m, &classes, &leaves)?;
            heads.push(read_head(&st, m)?);
        }
        Ok(Self {
            model,
            dim,
            tenant,
            classes,
            examples,
            heads,
        })
    }
}

/// Names normalised and unique, parents earlier in the list, top-level and without photos.
fn check_classes(mut classes: Vec<FileClass>) -> Result<Vec<FileClass>> {
    let mut names = HashSet::with_capacity(classes.len());
    for i in 0..classes.len() {
        let name = class_name(&classes[i].name).map_err(bad)?;
        if !names.insert(name.clone()) {
            return Err(bad(format!("class `{name}` twice")));
        }
        if let Some(p) = classes[i].parent {
            if p >= i {
                return Err(bad(format!(
                    "class `{name}` (index {i}) names parent index {p}: parents come first"
                )));
            }
            if classes[p].parent.is_some() {
                return Err(bad(format!(
                    "class `{name}` has parent `{}`, which has a parent itself",
                    classes[p].name
                )));
            }
        }
        classes[i].name = name;
    }
    Ok(classes)
}

/// A tensor that must exist with this dtype and shape.
fn tensor<'a>(
    st: &'a SafeTensors<'a>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<safetensors::tensor::TensorView<'a>> {
    let v = st
        .tensor(name)
        .map_err(|_| bad(format!("no tensor `{name}`")))?;
    if v.dtype() != dtype || v.shape() != shape {
        return Err(bad(format!(
            "tensor `{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
            v.dtype(),
            v.shape()
        )));
    }
    Ok(v)
}

fn read_examples(
    st: &SafeTensors<'_>,
    dim: usize,
    classes: &[FileClass],
) -> Result<Vec<FileExample>> {
    let n = st
        .tensor("examples.class")
        .map_err(|_| bad("no tensor `examples.class`"))?
        .shape()
        .first()
        .copied()
        .unwrap_or(0);
    // Without examples nothing would bound `dim` by the file's size, and the heads are
    // checked by running them on a `dim`-long input; Export never writes an empty tenant.
    if n == 0 {
        return Err(bad("no examples"));
    }
    let x = tensor(st, "examples.embedding", Dtype::F32, &[n, dim])?;
    let class = tensor(st, "examples.class", Dtype::U32, &[n])?;
    let hash = tensor(st, "examples.hash", Dtype::U8, &[n, 32])?;
    let parents: HashSet<usize> = classes.iter().filter_map(|c| c.parent).collect();
    let mut out = Vec::with_capacity(n);
    let rows = x.data().chunks_exact(dim * 4);
    let ids = class.data().chunks_exact(4);
    for ((row, id), h) in rows.zip(ids).zip(hash.data().chunks_exact(32)) {
        let c = u32::from_le_bytes([id[0], id[1], id[2], id[3]]) as usize;
        if c >= classes.len() {
            return Err(bad(format!(
                "an example of class index {c}, of {} classes",
                classes.len()
            )));
        }
        if parents.contains(&c) {
            return Err(bad(format!(
                "an example of `{}`, which is a parent",
                classes[c].name
            )));
        }
        let embedding = crate::store::decode_embedding(row);
        if embedding.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!(
                "an example of `{}` is not finite",
                classes[c].name
            )));
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(h);
        out.push(FileExample {
            class: c,
            hash,
            embedding,
        });
    }
    Ok(out)
}

/// A head's classes are leaves of the file, its groups their groups, in the order a head
/// trained on the file's examples would have them.
fn check_head_classes(m: &HeadMeta, classes: &[FileClass], leaves: &HashSet<usize>) -> Result<()> {
    let kind = &m.kind;
    for &c in &m.classes {
        let ok = usize::try_from(c).is_ok_and(|c| leaves.contains(&c));
        if !ok {
            return Err(bad(format!(
                "`{kind}` head names class {c}, which has no examples"
            )));
        }
    }
    for &g in &m.groups {
        if usize::try_from(g).map_or(true, |g| g >= classes.len()) {
            return Err(bad(format!(
                "`{kind}` head names group {g}, of {} classes",
                classes.len()
            )));
        }
    }
    Ok(())
}

/// The head whose tensors are `head.<kind>.*`, checked against its metadata.
fn read_head(st: &SafeTensors<'_>, meta: HeadMeta) -> Result<Head> {
    let prefix = format!("head.{}.", meta.kind);
    let mut t = HashMap::new();
    for name in st.names() {
        if let Some(short) = name.strip_prefix(&prefix) {
            let v = st.tensor(name).map_err(bad)?;
            if v.dtype() != Dtype::F32 {
                return Err(bad(format!(
                    "tensor `{name}` is {:?}, heads are F32",
                    v.dtype()
                )));
            }
            t.insert(short.to_string(), v.load(&Device::Cpu)?);
        }
    }
    let head = Head::from_parts(meta, &t).map_err(bad)?;
    head.check().map_err(bad)?;
    Ok(head)
}

impl TenantFile {
    /// Kinds of the trained heads in the file (the prototype is rebuilt from the examples).
    pub fn trained_kinds(&self) -> Vec<HeadKind> {
        self.heads
            .iter()
            .map(Head::kind)
            .filter(|k| k.is_trained())
            .collect()
    }
}

#[cfg(test)]
mod tests;
