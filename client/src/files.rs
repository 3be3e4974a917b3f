//! Turning what the user typed (folders, files, globs) into the list of photos to send.
//!
//! Nothing here is fatal per file: a text file in the photo folder, an unreadable file or a
//! 200 MiB panorama is set aside with the reason, so one stray file never costs an upload.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Files above this many MiB are skipped before upload: far above any photo a phone takes, and
/// the head-trainer's default `--max-photo-bytes` (its gRPC message limit is 1 MiB above), so a
/// file we send never breaks the whole stream by exceeding the server's message limit.
pub const DEFAULT_MAX_FILE_MIB: u64 = 16;
pub const DEFAULT_MAX_FILE_BYTES: u64 = DEFAULT_MAX_FILE_MIB * 1024 * 1024;

/// Symlinked folders can loop; no photo library is this deep.
const MAX_DEPTH: usize = 32;

/// A path that will not be sent, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// The photos found, in a stable order (as given; folders sorted by name), and what was not.
#[derive(Debug, Default)]
pub struct Collected {
    pub images: Vec<PathBuf>,
    pub skipped: Vec<Skipped>,
}

impl Collected {
    fn skip(&mut self, path: impl Into<PathBuf>, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// Collects photos from folders (recursively), files and glob patterns.
pub fn collect(inputs: &[String], max_bytes: u64) -> Result<Collected> {
    let mut out = Collected::default();
    for input in inputs {
        let path = Path::new(input);
        if fs::symlink_metadata(path).is_ok() {
            visit(path, max_bytes, 0, &mut out);
        } else if input.contains(['*', '?', '[']) {
            let matches = glob::glob(input).map_err(|e| Error::Pattern {
                pattern: input.clone(),
                reason: e.to_string(),
            })?;
            let before = out.images.len() + out.skipped.len();
            for entry in matches {
                match entry {
                    Ok(p) => visit(&p, max_bytes, 0, &mut out),
                    Err(e) => out.skip(e.path(), format!("cannot read: {}", e.error())),
                }
            }
            if out.images.len() + out.skipped.len() == before {
                out.skip(path, "no file matches this pattern");
            }
        } else {
            out.skip(path, "no such file or directory");
        }
    }
    Ok(out)
}

fn visit(path: &Path, max_bytes: u64, depth: usize, out: &mut Collected) {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return out.skip(path, format!("cannot read: {e}")),
    };
    if meta.is_dir() {
        if depth >= MAX_DEPTH {
            return out.skip(
                path,
                format!("folder nested deeper than {MAX_DEPTH} levels"),
            );
        }
        match sorted_entries(path) {
            Ok(entries) => entries
                .iter()
                .for_each(|p| visit(p, max_bytes, depth + 1, out)),
            Err(e) => out.skip(path, format!("cannot list folder: {e}")),
        }
        return;
    }
    match check_image(path, meta.len(), max_bytes) {
        Ok(()) => out.images.push(path.to_path_buf()),
        Err(reason) => out.skip(path, reason),
    }
}

/// A folder's entries sorted by name, so runs and seeds see the same order on every machine.
pub fn sorted_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

/// Decides by content (magic bytes) whether a file is an image the service decodes; the
/// extension only sharpens the message, since `IMG_0001.JPG.txt` and extensionless camera
/// files both exist.
pub fn check_image(path: &Path, len: u64, max_bytes: u64) -> Result<(), String> {
    if len == 0 {
        return Err("empty file".to_string());
    }
    if len > max_bytes {
        return Err(format!(
            "{} is larger than the {} limit",
            human_bytes(len),
            human_bytes(max_bytes)
        ));
    }
    let mut head = [0u8; 32];
    let n = fs::File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| format!("cannot read: {e}"))?;
    match image::guess_format(&head[..n]) {
        Ok(format) if is_supported(format) => Ok(()),
        Ok(format) => Err(format!("{format:?} images are not supported")),
        Err(_) if has_image_extension(path) => {
            Err("not an image: the content does not match its extension".to_string())
        }
        Err(_) => Err("not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)".to_string()),
    }
}

fn read_up_to(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

/// The formats the feature-server decodes (features.proto, `EmbedRequest.image`).
fn is_supported(format: image::ImageFormat) -> bool {
    use image::ImageFormat::*;
    matches!(format, Jpeg | Png | WebP | Gif | Bmp | Tiff)
}

fn has_image_extension(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    matches!(
        ext.as_str(),
        "jpg" | "jpeg" | "png" | "webp" | "gif" | "bmp" | "tif" | "tiff" | "heic"
    )
}

pub fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / MIB)
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A real (tiny) JPEG, encoded by the `image` crate so the magic bytes are genuine.
    pub(crate) fn jpeg_bytes() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(4, 4, image::Rgb([200, 30, 30]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
        buf.into_inner()
    }

    fn reasons(c: &Collected) -> Vec<(String, String)> {
        c.skipped
            .iter()
            .map(|s| {
                let name = s.path.file_name().unwrap().to_string_lossy().to_string();
                (name, s.reason.clone())
            })
            .collect()
    }

    #[test]
    fn folder_walk_keeps_images_and_skips_the_rest_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/mug.jpg"), jpeg_bytes()).unwrap();
        fs::write(root.join("b_notes.txt"), "hello").unwrap();
        fs::write(root.join("c_fake.jpg"), "not a jpeg at all").unwrap();
        fs::write(root.join("d_empty.png"), b"").unwrap();
        let big = root.join("e_big.jpg");
        let mut bytes = jpeg_bytes();
        bytes.resize(4096, 0);
        fs::write(&big, bytes).unwrap();
        // A dangling symlink is the unreadable file that works even when tests run as root
        // (where permission bits do not stop reads).
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("gone.jpg"), root.join("a_dangling.jpg")).unwrap();

        let got = collect(&[root.to_string_lossy().to_string()], 1024).unwrap();
        assert_eq!(got.images, vec![root.join("sub/mug.jpg")]);
        let r = reasons(&got);
        let find = |name: &str| {
            r.iter()
                .find(|(n, _)| n == name)
                .map(|(_, why)| why.clone())
        };
        assert!(find("b_notes.txt").unwrap().contains("not an image"));
        assert!(
            find("c_fake.jpg")
                .unwrap()
                .contains("does not match its extension")
        );
        assert_eq!(find("d_empty.png").unwrap(), "empty file");
        assert!(find("e_big.jpg").unwrap().contains("larger than"));
        #[cfg(unix)]
        assert!(find("a_dangling.jpg").unwrap().starts_with("cannot read"));
    }

    #[test]
    fn globs_files_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["x1.jpg", "x2.jpg", "y.jpg"] {
            fs::write(root.join(name), jpeg_bytes()).unwrap();
        }
        let pattern = root.join("x*.jpg").to_string_lossy().to_string();
        let file = root.join("y.jpg").to_string_lossy().to_string();
        let missing = root.join("nope.jpg").to_string_lossy().to_string();
        let empty_glob = root.join("z*.png").to_string_lossy().to_string();
        let got = collect(
            &[pattern, file, missing, empty_glob],
            DEFAULT_MAX_FILE_BYTES,
        )
        .unwrap();
        assert_eq!(
            got.images,
            vec![root.join("x1.jpg"), root.join("x2.jpg"), root.join("y.jpg")]
        );
        let r = reasons(&got);
        assert_eq!(
            r[0],
            ("nope.jpg".into(), "no such file or directory".into())
        );
        assert_eq!(r[1].1, "no file matches this pattern");
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_file_is_skipped_not_fatal() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("locked.jpg");
        fs::write(&p, jpeg_bytes()).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
        let got = collect(&[p.to_string_lossy().to_string()], DEFAULT_MAX_FILE_BYTES).unwrap();
        // Root reads through permission bits; everyone else must see the skip.
        if fs::File::open(&p).is_err() {
            assert!(got.images.is_empty());
            assert!(got.skipped[0].reason.starts_with("cannot read"));
        } else {
            assert_eq!(got.images, vec![p]);
        }
    }
}
