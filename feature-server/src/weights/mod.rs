//! Weights: loading any of the three file layouts a torchvision-named backbone comes in, and the
//! file's identity.
//!
//! Why three readers: users bring `.safetensors` (timm's `*.tv_in1k`, our converted files),
//! torchvision's release `.pth` (a zip archive since PyTorch 1.6, read by candle's pickle
//! module), and the pre-1.6 "legacy" `.pt` that the only real MobileNetV2 weights reachable here
//! ship as. The identity is the sha256 of the file bytes: it travels with every embedding, so
//! embeddings from different weights are never mixed in a cache.

pub mod fetch;
pub mod formula;
pub mod legacy_pt;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The sha256 of a file, lowercase hex; streamed so a 100 MB file is not held in memory twice.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| weights_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| weights_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Which of the three layouts a file is, told from its first bytes rather than its extension
/// (people rename `.pth` to `.pt` and back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Safetensors,
    /// PyTorch >= 1.6 `torch.save`: a zip archive holding `data.pkl` and `data/<key>` storages.
    TorchZip,
    /// PyTorch < 1.6 `torch.save`: consecutive pickles followed by raw storages.
    TorchLegacy,
}

/// Sniffs the layout from a file's first bytes.
pub fn sniff_layout(head: &[u8]) -> Option<Layout> {
    if head.starts_with(b"PK\x03\x04") {
        return Some(Layout::TorchZip);
    }
    // Legacy files open with the pickled magic number: PROTO 2, LONG1 (0x80 0x02 0x8a).
    if head.starts_with(&[0x80, 0x02, 0x8a]) {
        return Some(Layout::TorchLegacy);
    }
    // safetensors: an 8-byte little-endian header length, then a JSON object.
    if head.len() >= 9 && head[8] == b'{' {
        return Some(Layout::Safetensors);
    }
    None
}

/// Loads every tensor of a weights file, keyed by its name in the file.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut head = [0u8; 16];
    let n = {
        let mut file = std::fs::File::open(path).map_err(|e| weights_err(path, e))?;
        read_up_to(&mut file, &mut head).map_err(|e| weights_err(path, e))?
    };
    match sniff_layout(&head[..n]) {
        Some(Layout::Safetensors) => {
            candle_core::safetensors::load(path, device).map_err(|e| weights_err(path, e))
        }
        Some(Layout::TorchZip) => {
            let pairs = candle_core::pickle::read_all(path).map_err(|e| weights_err(path, e))?;
            pairs
                .into_iter()
                .map(|(name, t)| Ok((name, t.to_device(device)?)))
                .collect::<candle_core::Result<HashMap<_, _>>>()
                .map_err(|e| weights_err(path, e))
        }
        Some(Layout::TorchLegacy) => {
            let bytes = std::fs::read(path).map_err(|e| weights_err(path, e))?;
            legacy_pt::read_state_dict(&bytes, device).map_err(|e| weights_err(path, e))
        }
        None => Err(weights_err(
            path,
            "not a .safetensors, zip .pth or legacy .pt file (unrecognised first bytes)",
        )),
    }
}

/// Writes tensors as `.safetensors` atomically (a temporary file, then a rename), so a reader
/// never sees a half-written file and an interrupted conversion leaves nothing behind.
pub fn save_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    if let Err(e) = candle_core::safetensors::save(tensors, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(weights_err(path, e));
    }
    // Public weights, read by other users: the serving user of a container among them (the
    // file would otherwise keep the 0600 of its temporary).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let readable = std::fs::Permissions::from_mode(0o644);
        if let Err(e) = std::fs::set_permissions(&tmp, readable) {
            let _ = std::fs::remove_file(&tmp);
            return Err(weights_err(path, e));
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        weights_err(path, e)
    })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

pub(crate) fn weights_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn saved_weights_are_readable_by_other_users() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        save_safetensors_atomic(&HashMap::from([("w".to_string(), t)]), &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "{mode:o}");
    }
}
