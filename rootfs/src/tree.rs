//! Walking a directory tree: its disk usage (to size the ext4 image), a fast key over its metadata (to
//! find it in the memo), and a digest over its contents (a plain directory's identity in the cache).
//! Symbolic links are never followed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{ImageError, IoContext};
use super::layer::open_nofollow;
use super::util::hex;

/// Visits `root` and everything below it, in a fixed order (each directory's entries sorted by name),
/// with the path relative to `root` ("" for the root itself).
pub(crate) fn walk(
    root: &Path,
    visit: &mut dyn FnMut(&Path, &Path, &Metadata) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let md = fs::symlink_metadata(root).ctx(|| format!("reading {}", root.display()))?;
    visit(root, Path::new(""), &md)?;
    if !md.is_dir() {
        return Ok(());
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&abs)
            .ctx(|| format!("reading {}", abs.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .ctx(|| format!("reading {}", abs.display()))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut subdirs = Vec::new();
        for name in names {
            let (child_abs, child_rel) = (abs.join(&name), rel.join(&name));
            let md = fs::symlink_metadata(&child_abs)
                .ctx(|| format!("reading {}", child_abs.display()))?;
            visit(&child_abs, &child_rel, &md)?;
            if md.is_dir() {
                subdirs.push(child_rel);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// Disk usage in KiB (as `du -s`: hard links once) and the number of entries (as `find | wc -l`).
pub(crate) fn usage(root: &Path) -> Result<(u64, u64), ImageError> {
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut seen = HashSet::new();
    walk(root, &mut |_, _, md| {
        entries += 1;
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            return Ok(());
        }
        bytes = bytes.saturating_add(md.blocks().saturating_mul(512));
        Ok(())
    })?;
    Ok((bytes / 1024, entries))
}

/// What a scan of a plain directory found.
pub(crate) struct Scan {
    /// sha256 over every path and its metadata, change time and inode included: any change to the
    /// tree changes it (ctime cannot be set back), so it can key the memo of content digests
    pub(crate) fast_key: String,
    pub(crate) kib: u64,
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
}

/// Scans `root`'s metadata (no file contents).
pub(crate) fn scan(root: &Path) -> Result<Scan, ImageError> {
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    walk(root, &mut |_, rel, md| {
        h.update(rel.as_os_str().as_bytes());
        h.update([0]);
        for v in [
            md.dev(),
            md.ino(),
            u64::from(md.mode()),
            u64::from(md.uid()),
            u64::from(md.gid()),
            md.size(),
            md.mtime() as u64,
            md.mtime_nsec() as u64,
            md.ctime() as u64,
            md.ctime_nsec() as u64,
        ] {
            h.update(v.to_le_bytes());
        }
        if md.is_file() {
            bytes = bytes.saturating_add(md.size());
        }
        Ok(())
    })?;
    let (kib, entries) = usage(root)?;
    Ok(Scan {
        fast_key: hex(&h.finalize()),
        kib,
        entries,
        bytes,
    })
}

/// sha256 over every path, its type, mode, owner, time, size, link target, hard-link structure and
/// file contents: the identity of a plain directory.
pub(crate) fn content_digest(root: &Path) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    let mut links: HashMap<(u64, u64), u64> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    walk(root, &mut |abs, rel, md| {
        h.update(rel.as_os_str().as_bytes());
        h.update([0]);
        let ft = md.file_type();
        let kind: u8 = if ft.is_dir() {
            b'd'
        } else if ft.is_symlink() {
            b'l'
        } else if ft.is_file() {
            b'f'
        } else if ft.is_char_device() || ft.is_block_device() {
            b'c'
        } else {
            b'p'
        };
        h.update([kind]);
        for v in [
            u64::from(md.mode()),
            u64::from(md.uid()),
            u64::from(md.gid()),
            md.mtime() as u64,
            md.mtime_nsec() as u64,
            md.size(),
            md.rdev(),
        ] {
            h.update(v.to_le_bytes());
        }
        if !ft.is_dir() && md.nlink() > 1 {
            let next = links.len() as u64;
            let ordinal = *links.entry((md.dev(), md.ino())).or_insert(next);
            h.update(ordinal.to_le_bytes());
            if ordinal != next {
                return Ok(());
            }
        }
        if ft.is_symlink() {
            let target =
                fs::read_link(abs).ctx(|| format!("reading the link {}", abs.display()))?;
            h.update((target.as_os_str().len() as u64).to_le_bytes());
            h.update(target.as_os_str().as_bytes());
        } else if ft.is_file() {
            let mut f = open_nofollow(abs).ctx(|| format!("reading {}", abs.display()))?;
            let mut total = 0u64;
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ImageError::io(format!("reading {}", abs.display()), e)),
                };
                h.update(&buf[..n]);
                total += n as u64;
            }
            if total != md.size() {
                return Err(ImageError::io(
                    format!("reading {}", abs.display()),
                    io::Error::other("the file changed while it was being read; try again"),
                ));
            }
        }
        Ok(())
    })?;
    Ok(hex(&h.finalize()))
}
