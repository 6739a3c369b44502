//! Making the ext4 image of a tree with `mkfs.ext4 -d` (no root, no mount), sized as
//! rootfs/mkimage.sh sizes it: the tree's disk usage plus 25%, a 256-byte inode per entry, and 16 MiB for
//! the journal, group descriptors and bitmaps; inodes for every entry plus a quarter plus 1024.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::error::{ImageError, IoContext};

/// The image size in MiB for a tree of `kib` KiB disk usage and `entries` entries.
pub(crate) fn size_mib(kib: u64, entries: u64) -> u64 {
    (kib.saturating_mul(5) / 4 + entries / 4 + 16 * 1024).div_ceil(1024)
}

/// The inode count for a tree of `entries` entries.
pub(crate) fn inodes(entries: u64) -> u64 {
    entries + entries / 4 + 1024
}

fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

/// Writes `out` (which must not exist) as an ext4 image of `tree` of `size_mib` MiB with room for
/// `entries` entries; `src` names the image in errors.
pub(crate) fn make_image(
    tree: &Path,
    out: &Path,
    size_mib: u64,
    entries: u64,
    src: &str,
) -> Result<(), ImageError> {
    let mkfs = find_mkfs().ok_or(ImageError::MkfsMissing)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .ctx(|| format!("creating {}", out.display()))?;
    file.set_len(size_mib << 20)
        .ctx(|| format!("sizing {}", out.display()))?;
    drop(file);
    let output = crate::host_tool::command(&mkfs)
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-N",
            &inodes(entries).to_string(),
            "-d",
        ])
        .arg(tree)
        .args(["-E", "root_owner=0:0"])
        .arg(out)
        .env("LC_ALL", "C")
        .output()
        .ctx(|| format!("running {}", mkfs.display()))?;
    if !output.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // its last own complaint says most; otherwise all it said, on one line
        let detail = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("mkfs.ext4: ")
                    .or_else(|| l.strip_prefix("mke2fs: "))
            })
            .next_back()
            .map(str::to_string)
            .unwrap_or_else(|| {
                let all = text.split_whitespace().collect::<Vec<_>>().join(" ");
                if all.is_empty() {
                    format!("it exited with {}", output.status)
                } else {
                    all
                }
            });
        return Err(ImageError::Mkfs {
            src: src.to_string(),
            size_mib,
            detail,
        });
    }
    File::open(out)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing {}", out.display()))?;
    Ok(())
}
