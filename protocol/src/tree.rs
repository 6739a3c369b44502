//! The tar streams of `--copy-in` and `--copy-out`, as both ends write them: a walk of one file tree
//! that never follows a symbolic link, keeps modes, owners, times, symbolic links and hard links, and
//! leaves out what a tar cannot carry usefully (sockets, FIFOs, device nodes), counting them.
//!
//! The reading side is not here: each end unpacks with its own rules (the host treats the guest's
//! stream as hostile, see vmm's `transfer` module).

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What one [`pack`] put in the stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PackStats {
    /// Entries written (directories, files, links).
    pub entries: u64,
    /// Bytes of file data written.
    pub file_bytes: u64,
    /// Sockets, FIFOs and device nodes left out.
    pub skipped: u64,
}

/// Appends `src` to `builder`: a regular file, a symbolic link (as a link), or a directory with
/// everything below it. Entries are named below `name`; an empty `name` puts a directory's children
/// at the top of the archive and leaves the directory itself out (its contents are what is copied).
/// A file that changes size while it is read is cut or zero-padded to the size its header gave.
pub fn pack<W: Write>(
    builder: &mut tar::Builder<W>,
    src: &Path,
    name: &Path,
) -> io::Result<PackStats> {
    let mut stats = PackStats::default();
    // the first archive name of each multiply-linked file, by (device, inode)
    let mut linked: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![(src.to_path_buf(), name.to_path_buf())];
    while let Some((abs, rel)) = stack.pop() {
        let meta = fs::symlink_metadata(&abs).map_err(|e| with_path(&abs, e))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            if !rel.as_os_str().is_empty() {
                append_plain(builder, &meta, &rel, io::empty())?;
                stats.entries += 1;
            }
            let mut children = fs::read_dir(&abs)
                .and_then(|rd| {
                    rd.map(|e| e.map(|e| e.file_name()))
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(|e| with_path(&abs, e))?;
            // sorted, so that the same tree always makes the same stream; reversed for the stack
            children.sort_unstable_by(|a, b| b.cmp(a));
            stack.extend(
                children
                    .into_iter()
                    .map(|child| (abs.join(&child), rel.join(&child))),
            );
        } else if kind.is_symlink() {
            let target = fs::read_link(&abs).map_err(|e| with_path(&abs, e))?;
            let mut header = header_for(&meta);
            header.set_entry_type(tar::EntryType::Symlink);
            builder.append_link(&mut header, &rel, &target)?;
            stats.entries += 1;
        } else if kind.is_file() {
            if rel.as_os_str().is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: a file needs a name in the archive", abs.display()),
                ));
            }
            if meta.nlink() > 1 {
                match linked.get(&(meta.dev(), meta.ino())) {
                    Some(first) => {
                        let mut header = header_for(&meta);
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        builder.append_link(&mut header, &rel, first)?;
                        stats.entries += 1;
                        continue;
                    }
                    None => {
                        linked.insert((meta.dev(), meta.ino()), rel.clone());
                    }
                }
            }
            let file = File::open(&abs).map_err(|e| with_path(&abs, e))?;
            append_plain(builder, &meta, &rel, ExactSize::new(file, meta.len()))?;
            stats.entries += 1;
            stats.file_bytes += meta.len();
        } else {
            stats.skipped += 1;
        }
    }
    Ok(stats)
}

fn header_for(meta: &Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header
}

fn append_plain<W: Write>(
    builder: &mut tar::Builder<W>,
    meta: &Metadata,
    rel: &Path,
    data: impl Read,
) -> io::Result<()> {
    let mut header = header_for(meta);
    builder.append_data(&mut header, rel, data)
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Exactly `size` bytes of a file that may grow or shrink while it is read: cut, or padded with
/// zeros, so that the tar stays well-formed.
struct ExactSize<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> ExactSize<R> {
    fn new(inner: R, size: u64) -> Self {
        ExactSize {
            inner: inner.take(size),
            left: size,
        }
    }
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = match self.inner.read(buf)? {
            0 => {
                let n = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                buf[..n].fill(0);
                n
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-tree-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// (path, type, link target, size, mode) of every entry.
    fn listing(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, String, u64, u32)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.entry_type(),
                    e.link_name()
                        .unwrap()
                        .map(|l| l.display().to_string())
                        .unwrap_or_default(),
                    e.size(),
                    h.mode().unwrap() & 0o7777,
                )
            })
            .collect()
    }

    #[test]
    fn packs_a_tree_with_links_modes_and_without_sockets() {
        let dir = scratch("tree");
        let src = dir.join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(src.join("a"), b"hello").unwrap();
        fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::hard_link(src.join("a"), src.join("sub/hard")).unwrap();
        symlink("../a", src.join("sub/link")).unwrap();
        symlink("/etc/passwd", src.join("abs")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();

        let mut builder = tar::Builder::new(Vec::new());
        let stats = pack(&mut builder, &src, Path::new("")).unwrap();
        let bytes = builder.into_inner().unwrap();
        let got = listing(&bytes);
        use tar::EntryType as T;
        assert_eq!(
            got,
            [
                ("a".into(), T::Regular, "".into(), 5, 0o751),
                ("abs".into(), T::Symlink, "/etc/passwd".into(), 0, 0o777),
                ("sub".into(), T::Directory, "".into(), 0, 0o750),
                ("sub/hard".into(), T::Link, "a".into(), 0, 0o751),
                ("sub/link".into(), T::Symlink, "../a".into(), 0, 0o777),
            ]
        );
        assert_eq!(
            stats,
            PackStats {
                entries: 5,
                file_bytes: 5,
                skipped: 1
            }
        );

        // a named directory puts itself first; a single file is one entry
        let mut builder = tar::Builder::new(Vec::new());
        pack(&mut builder, &src.join("sub"), Path::new("out")).unwrap();
        pack(&mut builder, &src.join("a"), Path::new("a")).unwrap();
        let names: Vec<String> = listing(&builder.into_inner().unwrap())
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(names, ["out", "out/hard", "out/link", "a"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_source_names_its_path() {
        let mut builder = tar::Builder::new(Vec::new());
        let err = pack(&mut builder, Path::new("/no/such/dir"), Path::new("x")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("/no/such/dir"), "{err}");
    }

    #[test]
    fn exact_size_cuts_and_pads() {
        let mut out = Vec::new();
        ExactSize::new(&b"abcdef"[..], 3)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abc");
        out.clear();
        ExactSize::new(&b"ab"[..], 4).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab\0\0");
    }
}
