//! Applying layers (tar streams) into a staging directory, the way a container runtime stacks them.
//!
//! The input is untrusted. Every entry's path is made of plain components (no `..`, not absolute);
//! every directory above an entry is checked with lstat to be a real directory inside the staging root,
//! so nothing is ever written through a symbolic link (an entry below a symbolic link is refused, where
//! Docker would resolve the link inside the root: real layers never do this). The staging directory is
//! private to this process (it sits in a 0700 directory), so nothing can swap a checked directory for a
//! link between the check and the write. Sizes are bounded: an entry may not claim more data than an
//! uncompressed layer has left, the layers together may not unpack to more than 64 GiB or to more than
//! the disk has room for, and the tar metadata between two entries (headers, PAX records, long names,
//! which the tar crate reads into memory) may not exceed 4 MiB.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{Timespec, Timestamps};

use super::error::{ImageError, IoContext};
use super::util::mib;

/// What the layers of one image may unpack to, at most.
pub const MAX_TOTAL_BYTES: u64 = 64 << 30;
/// Tar metadata (padding, headers, PAX records, GNU long names) allowed between two entries.
const MAX_METADATA_BYTES: u64 = 4 << 20;
/// Room kept free on the cache's file system.
pub(crate) const SPACE_RESERVE: u64 = 256 << 20;
/// Entries one extractor takes at most, whatever their size: an entry without data still costs an
/// inode, a directory entry and memory for its bookkeeping. Real images have a few hundred thousand.
pub(crate) const MAX_ENTRIES: u64 = 1_000_000;
/// What each entry is charged against the space budget beyond its data (an inode, a directory entry,
/// a share of a directory's blocks), so that a million empty files cannot hide from the budget.
pub(crate) const ENTRY_COST: u64 = 1024;

/// A compression this importer does not unpack, by name, from a stream's first bytes.
pub(crate) fn unsupported_compression(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else if head.starts_with(b"BZh") {
        Some("bzip2")
    } else {
        None
    }
}

/// Whether a stream's first bytes are gzip's.
pub(crate) fn is_gzip(head: &[u8]) -> bool {
    head.starts_with(&[0x1f, 0x8b])
}

/// Why a stream could not be opened for reading as a tar.
pub(crate) enum OpenError {
    Io(io::Error),
    /// compressed with this, which is not supported
    Unsupported(&'static str),
}

/// `r` decompressed when it is gzip (detected by magic), as is otherwise; and whether it was gzip.
pub(crate) fn open_stream<'a, R: Read + 'a>(r: R) -> Result<(Box<dyn Read + 'a>, bool), OpenError> {
    let mut br = BufReader::with_capacity(256 << 10, r);
    let head = br.fill_buf().map_err(OpenError::Io)?;
    if is_gzip(head) {
        return Ok((Box::new(flate2::bufread::MultiGzDecoder::new(br)), true));
    }
    if let Some(name) = unsupported_compression(head) {
        return Err(OpenError::Unsupported(name));
    }
    Ok((Box::new(br), false))
}

/// How many more bytes the tar crate may read before we get control back, and whether it tried to
/// read past that.
#[derive(Default)]
pub(crate) struct Budget {
    left: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    pub(crate) fn allow(&self, bytes: u64) {
        self.left.set(bytes);
    }
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.get()
    }
}

/// A reader that fails once its [`Budget`] is spent. Seeks pass through and cost nothing.
pub(crate) struct Metered<R> {
    pub(crate) inner: R,
    budget: Rc<Budget>,
}

impl<R> Metered<R> {
    pub(crate) fn new(inner: R, budget: Rc<Budget>) -> Self {
        Metered { inner, budget }
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let left = self.budget.left.get();
        if left == 0 {
            self.budget.exceeded.set(true);
            return Err(io::Error::other("tar metadata over the size limit"));
        }
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.left.set(left - n as u64);
        Ok(n)
    }
}

impl<R: Seek> Seek for Metered<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// The error for the tar crate's `err` while reading a layer or tarball named `what`.
pub(crate) fn tar_error(src: &str, what: &str, err: io::Error, budget: &Budget) -> ImageError {
    if budget.exceeded() {
        ImageError::TooLarge {
            src: src.to_string(),
            layer: what.to_string(),
            why: format!(
                "more than {} MiB of tar metadata (headers, PAX records, long names) before one entry",
                mib(MAX_METADATA_BYTES)
            ),
        }
    } else {
        ImageError::BadImage {
            src: src.to_string(),
            why: format!("{what}: damaged tar: {err}"),
        }
    }
}

/// An entry path as plain components relative to the root (empty: the root itself), or why not.
pub(crate) fn sanitize(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.is_empty() {
        return Err("has an empty name");
    }
    if raw[0] == b'/' {
        return Err("is an absolute path");
    }
    let mut p = PathBuf::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("has a `..` component"),
            c => p.push(OsStr::from_bytes(c)),
        }
    }
    Ok(p)
}

/// Ownership, mode, time and extended attributes of one entry.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: Vec<(String, Vec<u8>)>,
}

/// A directory's mode and time, applied once every layer is in (writing into a directory changes its
/// time; a read-only mode would stop a non-root importer from writing into it).
struct DirMeta {
    mode: u32,
    mtime: (i64, u32),
}

/// Per layer: the paths this layer wrote and their ancestors (whiteouts only hide lower layers' files).
struct LayerState<'l> {
    label: &'l str,
    touched: HashSet<PathBuf>,
    /// without whiteouts nothing reads `touched`: a copy-out stream does not grow it
    track: bool,
}

impl LayerState<'_> {
    fn touch(&mut self, rel: &Path) {
        if !self.track {
            return;
        }
        let mut p = Some(rel);
        while let Some(cur) = p {
            if cur.as_os_str().is_empty() || !self.touched.insert(cur.to_path_buf()) {
                break;
            }
            p = cur.parent();
        }
    }
}

/// Unpacks layers, in order, into a staging root.
pub struct Extractor {
    root: PathBuf,
    src: String,
    max_total: u64,
    /// what may be unpacked before the disk runs out (the ext4 image needs as much again)
    space_budget: u64,
    space_avail: u64,
    /// bytes of file data unpacked so far
    pub(crate) bytes: u64,
    /// entries taken so far (each one charged [`ENTRY_COST`] against the space budget)
    entries: u64,
    max_entries: u64,
    /// copy-out: the only first path component an entry may have (GUEST_PATH's own name), and the
    /// host is protected from what the guest sends: no setuid, setgid or xattr other than `user.*`
    copy_out_name: Option<std::ffi::OsString>,
    chown: bool,
    chown_noted: bool,
    /// apply OCI whiteouts (image layers); otherwise `.wh.*` are ordinary names
    whiteouts: bool,
    /// apply the root directory's own entry (mode, owner, time) to the root
    root_meta: bool,
    specials: u64,
    unknown: u64,
    xattr_failures: u64,
    xattr_first_failure: Option<String>,
    dirs: HashMap<PathBuf, DirMeta>,
    /// the parent directory most recently checked (relative), valid until something is removed
    checked_parent: Option<PathBuf>,
    buf: Vec<u8>,
}

impl Extractor {
    /// An extractor into `root` (an existing, empty, private directory); `src` names the image in
    /// errors.
    pub fn new(root: &Path, src: &str, max_total: u64) -> Result<Self, ImageError> {
        let vfs = rustix::fs::statvfs(root)
            .map_err(io::Error::from)
            .ctx(|| format!("checking the free space in {}", root.display()))?;
        let avail = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        Ok(Extractor {
            root: root.to_path_buf(),
            src: src.to_string(),
            max_total,
            space_budget: avail.saturating_sub(SPACE_RESERVE) / 2,
            space_avail: avail,
            bytes: 0,
            entries: 0,
            max_entries: MAX_ENTRIES,
            copy_out_name: None,
            chown: true,
            chown_noted: false,
            whiteouts: true,
            root_meta: true,
            specials: 0,
            unknown: 0,
            xattr_failures: 0,
            xattr_first_failure: None,
            dirs: HashMap::new(),
            checked_parent: None,
            buf: vec![0u8; 256 << 10],
        })
    }

    /// An extractor for a guest's copy-out stream of `guest_path` into `root` (an existing directory
    /// that may hold files already, which entries replace): every entry must lie under the guest
    /// path's own name, no whiteouts, files belong to the user running vmm and lose their setuid and
    /// setgid bits and every extended attribute but `user.*`, the root directory's own entry is
    /// ignored, and the whole free space (less a reserve) may be used.
    pub fn for_copy_out(root: &Path, guest_path: &str, max_total: u64) -> Result<Self, ImageError> {
        let name = Path::new(guest_path)
            .file_name()
            .ok_or_else(|| ImageError::BadImage {
                src: guest_path.to_string(),
                why: "a copy-out path must name a file or directory".into(),
            })?
            .to_os_string();
        let mut ex = Extractor::new(root, guest_path, max_total)?;
        ex.copy_out_name = Some(name);
        ex.space_budget = ex.space_avail.saturating_sub(SPACE_RESERVE);
        ex.chown = false;
        ex.chown_noted = true;
        ex.whiteouts = false;
        ex.root_meta = false;
        Ok(ex)
    }

    /// Lowers the entry limit and the space budget, so that tests reach them with small inputs.
    #[cfg(test)]
    pub(crate) fn limit(&mut self, max_entries: u64, space_budget: u64) {
        self.max_entries = max_entries;
        self.space_budget = space_budget;
    }

    /// Bytes of file data unpacked so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Applies one layer read from `input` (an uncompressed tar stream; `known_len` its length when
    /// known, to refuse entries that claim more than is left). Gives `input` back, positioned after the
    /// tar's end, so that the caller can read the rest for hashing.
    pub fn apply_layer<R: Read>(
        &mut self,
        input: R,
        known_len: Option<u64>,
        label: &str,
    ) -> Result<R, ImageError> {
        let budget = Rc::new(Budget::default());
        let mut archive = tar::Archive::new(Metered::new(input, budget.clone()));
        let mut layer = LayerState {
            label,
            touched: HashSet::new(),
            track: self.whiteouts,
        };
        self.checked_parent = None;
        let result = self.apply_entries(&mut archive, &budget, known_len, &mut layer);
        let metered = archive.into_inner();
        result?;
        Ok(metered.inner)
    }

    fn apply_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<Metered<R>>,
        budget: &Budget,
        known_len: Option<u64>,
        layer: &mut LayerState,
    ) -> Result<(), ImageError> {
        budget.allow(MAX_METADATA_BYTES);
        let mut entries = archive
            .entries()
            .map_err(|e| tar_error(&self.src, layer.label, e, budget))?;
        loop {
            budget.allow(MAX_METADATA_BYTES);
            let entry = match entries.next() {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(tar_error(&self.src, layer.label, e, budget)),
            };
            self.apply_entry(entry, budget, known_len, layer)?;
        }
        Ok(())
    }

    fn bad(&self, why: String) -> ImageError {
        ImageError::BadImage {
            src: self.src.clone(),
            why,
        }
    }

    fn unsafe_path(&self, layer: &LayerState, path: &[u8], why: impl Into<String>) -> ImageError {
        ImageError::UnsafePath {
            src: self.src.clone(),
            layer: layer.label.to_string(),
            path: String::from_utf8_lossy(path).into_owned(),
            why: why.into(),
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, Metered<R>>,
        budget: &Budget,
        known_len: Option<u64>,
        layer: &mut LayerState,
    ) -> Result<(), ImageError> {
        let label = layer.label;
        let bad_header = |e: io::Error| ImageError::BadImage {
            src: self.src.clone(),
            why: format!("{label}: damaged tar header: {e}"),
        };
        let raw_path = entry.path_bytes().into_owned();
        let header = entry.header();
        let mut kind = header.entry_type();
        let size = entry.size();
        let on_archive = if kind.is_gnu_sparse() {
            header.entry_size().map_err(bad_header)?
        } else {
            size
        };
        let link = entry.link_name_bytes().map(|l| l.into_owned());

        if let Some(len) = known_len {
            let left = len.saturating_sub(entry.raw_file_position());
            if on_archive > left {
                return Err(ImageError::TooLarge {
                    src: self.src.clone(),
                    layer: label.to_string(),
                    why: format!(
                        "entry `{}` claims {on_archive} bytes but only {left} are left in the layer",
                        String::from_utf8_lossy(&raw_path)
                    ),
                });
            }
        }
        // the entry's data, and nothing more, may be read now
        budget.allow(on_archive);

        let mut meta = self.entry_meta(&mut entry, label, &raw_path)?;

        if kind == tar::EntryType::XGlobalHeader {
            // PAX global records: nothing to apply (GNU tar names them /tmp/GlobalHead.*)
            return drain(&mut entry, &mut self.buf)
                .map_err(|e| self.read_error(label, &raw_path, e, budget));
        }
        let rel = sanitize(&raw_path).map_err(|why| self.unsafe_path(layer, &raw_path, why))?;
        // old tars mark directories by a trailing slash on a regular entry
        if kind == tar::EntryType::Regular && raw_path.ends_with(b"/") {
            kind = tar::EntryType::Directory;
        }

        self.count_entry(label)?;
        self.restrict_copy_out(&rel, kind, &mut meta, &raw_path, layer)?;

        if let Some(name) = rel.file_name().filter(|_| self.whiteouts) {
            if name.as_bytes().starts_with(b".wh.") {
                drain(&mut entry, &mut self.buf)
                    .map_err(|e| self.read_error(label, &raw_path, e, budget))?;
                return self.whiteout(&rel, &raw_path, layer);
            }
        }

        use tar::EntryType as T;
        match kind {
            T::Directory => self.make_dir(&rel, &raw_path, &meta, layer)?,
            T::Regular | T::Continuous | T::GNUSparse => {
                self.write_file(&rel, &raw_path, &meta, &mut entry, size, budget, layer)?
            }
            T::Symlink => {
                let target = link.unwrap_or_default();
                self.make_symlink(&rel, &raw_path, &target, &meta, layer)?
            }
            T::Link => {
                let target = link.unwrap_or_default();
                self.check_link_target(&target, &raw_path, layer)?;
                self.make_hardlink(&rel, &raw_path, &target, layer)?
            }
            T::Char | T::Block | T::Fifo => self.specials += 1,
            _ => self.unknown += 1,
        }
        drain(&mut entry, &mut self.buf)
            .map_err(|e| self.read_error(label, &raw_path, e, budget))?;
        Ok(())
    }

    /// Mode, owner, time and extended attributes of `entry` (PAX records included).
    fn entry_meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, Metered<R>>,
        label: &str,
        raw_path: &[u8],
    ) -> Result<EntryMeta, ImageError> {
        let bad_header = |e: io::Error| ImageError::BadImage {
            src: self.src.clone(),
            why: format!("{label}: damaged tar header: {e}"),
        };
        let header = entry.header();
        let mode = header.mode().map_err(bad_header)? & 0o7777;
        let uid = header.uid().map_err(bad_header)?;
        let gid = header.gid().map_err(bad_header)?;
        let mtime = header.mtime().map_err(bad_header)?;
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(self.bad(format!(
                "{label}: entry `{}` has an owner out of range ({uid}:{gid})",
                String::from_utf8_lossy(raw_path)
            )));
        };
        let mut meta = EntryMeta {
            mode,
            uid,
            gid,
            mtime: (i64::try_from(mtime).unwrap_or(i64::MAX), 0),
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions().map_err(bad_header)? {
            for ext in exts {
                let ext = ext.map_err(bad_header)?;
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    meta.xattrs
                        .push((name.to_string(), ext.value_bytes().to_vec()));
                } else if key == "mtime" {
                    if let Some(t) = parse_pax_time(ext.value_bytes()) {
                        meta.mtime = t;
                    }
                }
            }
        }
        Ok(meta)
    }

    /// Copy-out: the entry must lie under the name asked for, and keeps no setuid or setgid bit and
    /// no extended attribute but `user.*`.
    fn restrict_copy_out(
        &self,
        rel: &Path,
        kind: tar::EntryType,
        meta: &mut EntryMeta,
        raw_path: &[u8],
        layer: &LayerState,
    ) -> Result<(), ImageError> {
        let Some(allowed) = &self.copy_out_name else {
            return Ok(());
        };
        let first = rel.components().next().map(|c| c.as_os_str());
        // the root entry itself (`./`) carries nothing and is ignored
        if first.is_some_and(|f| f != allowed.as_os_str()) {
            let why = format!(
                "is not under `{}`, the name of the path asked for",
                allowed.to_string_lossy()
            );
            return Err(self.unsafe_path(layer, raw_path, why));
        }
        meta.mode &= if kind == tar::EntryType::Directory {
            0o1777
        } else {
            0o777
        };
        meta.xattrs.retain(|(name, _)| name.starts_with("user."));
        Ok(())
    }

    fn read_error(&self, label: &str, path: &[u8], err: io::Error, budget: &Budget) -> ImageError {
        if budget.exceeded() {
            tar_error(&self.src, label, err, budget)
        } else {
            self.bad(format!(
                "{label}: could not read the data of `{}`: {err}",
                String::from_utf8_lossy(path)
            ))
        }
    }

    /// Counts one more entry against the entry limit and the space budget.
    fn count_entry(&mut self, label: &str) -> Result<(), ImageError> {
        self.entries += 1;
        if self.entries > self.max_entries {
            return Err(ImageError::TooLarge {
                src: self.src.clone(),
                layer: label.to_string(),
                why: format!("more than {} entries", self.max_entries),
            });
        }
        self.account(0, label)
    }

    /// Copy-out: a hard link's target must lie under the path asked for, as every entry must.
    fn check_link_target(
        &self,
        target: &[u8],
        raw: &[u8],
        layer: &LayerState,
    ) -> Result<(), ImageError> {
        let Some(allowed) = &self.copy_out_name else {
            return Ok(());
        };
        let first = target
            .split(|&b| b == b'/')
            .find(|c| !c.is_empty() && *c != b".");
        if first != Some(allowed.as_bytes()) {
            let why = format!(
                "is a hard link to `{}`, which is not under `{}`",
                String::from_utf8_lossy(target),
                allowed.to_string_lossy()
            );
            return Err(self.unsafe_path(layer, raw, why));
        }
        Ok(())
    }

    /// Counts `size` more bytes of file data against the limits (each entry taken so far is
    /// charged [`ENTRY_COST`] on top against the disk's space).
    fn account(&mut self, size: u64, label: &str) -> Result<(), ImageError> {
        self.bytes = self.bytes.saturating_add(size);
        let charged = self
            .bytes
            .saturating_add(self.entries.saturating_mul(ENTRY_COST));
        if self.bytes > self.max_total {
            return Err(ImageError::TooLarge {
                src: self.src.clone(),
                layer: label.to_string(),
                why: format!(
                    "the layers unpack to more than {} GiB",
                    self.max_total >> 30
                ),
            });
        }
        if charged > self.space_budget {
            return Err(ImageError::NoSpace {
                // the cache directory (staging is <cache>/.tmp-*/root)
                dir: self
                    .root
                    .ancestors()
                    .nth(2)
                    .unwrap_or(&self.root)
                    .to_path_buf(),
                src: self.src.clone(),
                need_mib: mib(charged.saturating_mul(2).saturating_add(SPACE_RESERVE)),
                avail_mib: mib(self.space_avail),
            });
        }
        Ok(())
    }

    /// The absolute path of `rel` after checking that every directory above it is a real directory
    /// inside the root (never a symbolic link), creating missing ones when `create`; None when one is
    /// missing and not `create`.
    fn checked_path(
        &mut self,
        rel: &Path,
        entry: &[u8],
        create: bool,
        layer: &mut LayerState,
    ) -> Result<Option<PathBuf>, ImageError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if self.checked_parent.as_deref() != Some(parent) {
            let mut abs = self.root.clone();
            let mut so_far = PathBuf::new();
            for comp in parent.components() {
                abs.push(comp);
                so_far.push(comp);
                match fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(self.unsafe_path(
                            layer,
                            entry,
                            format!(
                                "goes through the symbolic link `{}` (links are never followed while unpacking)",
                                so_far.display()
                            ),
                        ))
                    }
                    Ok(_) => {
                        return Err(self.bad(format!(
                            "{}: entry `{}`: `{}` is not a directory",
                            layer.label,
                            String::from_utf8_lossy(entry),
                            so_far.display()
                        )))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        if !create {
                            return Ok(None);
                        }
                        DirBuilder::new()
                            .mode(0o755)
                            .create(&abs)
                            .ctx(|| format!("creating {}", abs.display()))?;
                        layer.touch(&so_far);
                    }
                    Err(e) => return Err(ImageError::io(format!("checking {}", abs.display()), e)),
                }
            }
            self.checked_parent = Some(parent.to_path_buf());
        }
        Ok(Some(self.root.join(rel)))
    }

    /// Removes whatever is at `abs` (never following a link); keeps a directory when `keep_dir`.
    /// Returns whether a directory was kept.
    fn remove_existing(
        &mut self,
        abs: &Path,
        rel: &Path,
        keep_dir: bool,
    ) -> Result<bool, ImageError> {
        match fs::symlink_metadata(abs) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::io(format!("checking {}", abs.display()), e)),
            Ok(m) if m.is_dir() && keep_dir => Ok(true),
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(abs).ctx(|| format!("removing {}", abs.display()))?;
                self.forget_dirs(rel);
                Ok(false)
            }
            Ok(_) => {
                fs::remove_file(abs).ctx(|| format!("removing {}", abs.display()))?;
                Ok(false)
            }
        }
    }

    /// Forgets the recorded directory metadata at and below `rel` (it was removed).
    fn forget_dirs(&mut self, rel: &Path) {
        self.dirs.retain(|k, _| !k.starts_with(rel));
        self.checked_parent = None;
    }

    fn whiteout(
        &mut self,
        rel: &Path,
        raw: &[u8],
        layer: &mut LayerState,
    ) -> Result<(), ImageError> {
        let name = rel.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
        let dir = rel.parent().unwrap_or(Path::new(""));
        if name == b".wh..wh..opq" {
            return self.opaque(dir, raw, layer);
        }
        if name.starts_with(b".wh..wh.") {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): nothing to apply
            return Ok(());
        }
        let target = &name[4..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(self.unsafe_path(layer, raw, "is a whiteout for an invalid name"));
        }
        let target_rel = dir.join(OsStr::from_bytes(target));
        if layer.touched.contains(&target_rel) {
            // a whiteout hides lower layers only
            return Ok(());
        }
        let Some(abs) = self.checked_path(&target_rel, raw, false, layer)? else {
            return Ok(());
        };
        self.remove_existing(&abs, &target_rel, false)?;
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: everything lower layers put in `dir` goes; this layer's entries stay.
    fn opaque(&mut self, dir: &Path, raw: &[u8], layer: &mut LayerState) -> Result<(), ImageError> {
        let abs = if dir.as_os_str().is_empty() {
            self.root.clone()
        } else {
            let Some(abs) = self.checked_path(dir, raw, false, layer)? else {
                return Ok(());
            };
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => abs,
                _ => return Ok(()),
            }
        };
        let mut stack = vec![(abs, dir.to_path_buf())];
        while let Some((abs, rel)) = stack.pop() {
            let rd = fs::read_dir(&abs).ctx(|| format!("reading {}", abs.display()))?;
            for child in rd {
                let child = child.ctx(|| format!("reading {}", abs.display()))?;
                let name = child.file_name();
                let (child_abs, child_rel) = (abs.join(&name), rel.join(&name));
                let is_dir = child
                    .file_type()
                    .ctx(|| format!("checking {}", child_abs.display()))?
                    .is_dir();
                if layer.touched.contains(&child_rel) {
                    if is_dir {
                        stack.push((child_abs, child_rel));
                    }
                } else if is_dir {
                    fs::remove_dir_all(&child_abs)
                        .ctx(|| format!("removing {}", child_abs.display()))?;
                    self.forget_dirs(&child_rel);
                } else {
                    fs::remove_file(&child_abs)
                        .ctx(|| format!("removing {}", child_abs.display()))?;
                }
            }
        }
        self.checked_parent = None;
        Ok(())
    }

    fn make_dir(
        &mut self,
        rel: &Path,
        raw: &[u8],
        meta: &EntryMeta,
        layer: &mut LayerState,
    ) -> Result<(), ImageError> {
        let abs = if rel.as_os_str().is_empty() {
            if !self.root_meta {
                return Ok(());
            }
            self.root.clone()
        } else {
            let Some(abs) = self.checked_path(rel, raw, true, layer)? else {
                return Ok(());
            };
            if !self.remove_existing(&abs, rel, true)? {
                DirBuilder::new()
                    .mode(0o755)
                    .create(&abs)
                    .ctx(|| format!("creating {}", abs.display()))?;
            }
            abs
        };
        self.set_owner(&abs, meta)?;
        self.set_xattrs(&abs, meta);
        self.dirs.insert(
            rel.to_path_buf(),
            DirMeta {
                mode: meta.mode,
                mtime: meta.mtime,
            },
        );
        layer.touch(rel);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file<R: Read>(
        &mut self,
        rel: &Path,
        raw: &[u8],
        meta: &EntryMeta,
        entry: &mut tar::Entry<'_, Metered<R>>,
        size: u64,
        budget: &Budget,
        layer: &mut LayerState,
    ) -> Result<(), ImageError> {
        if rel.as_os_str().is_empty() {
            return Err(self.unsafe_path(
                layer,
                raw,
                "would replace the root directory with a file",
            ));
        }
        self.account(size, layer.label)?;
        let Some(abs) = self.checked_path(rel, raw, true, layer)? else {
            return Ok(());
        };
        self.remove_existing(&abs, rel, false)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&abs)
            .ctx(|| format!("creating {}", abs.display()))?;
        let mut copied = 0u64;
        while copied < size {
            let want = usize::try_from(size - copied)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = match entry.read(&mut self.buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(layer.label, raw, e, budget)),
            };
            file.write_all(&self.buf[..n])
                .ctx(|| format!("writing {}", abs.display()))?;
            copied += n as u64;
        }
        if copied != size {
            return Err(self.bad(format!(
                "{}: the layer ends inside `{}` ({copied} of {size} bytes)",
                layer.label,
                String::from_utf8_lossy(raw)
            )));
        }
        if self.chown {
            match std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => self.chown = false,
                Err(e) => {
                    return Err(ImageError::io(
                        format!("changing the owner of {}", abs.display()),
                        e,
                    ))
                }
            }
        }
        // after chown, which clears setuid and setgid
        file.set_permissions(Permissions::from_mode(meta.mode))
            .ctx(|| format!("setting the mode of {}", abs.display()))?;
        self.set_xattrs(&abs, meta);
        rustix::fs::futimens(&file, &timestamps(meta.mtime))
            .map_err(io::Error::from)
            .ctx(|| format!("setting the time of {}", abs.display()))?;
        layer.touch(rel);
        Ok(())
    }

    fn make_symlink(
        &mut self,
        rel: &Path,
        raw: &[u8],
        target: &[u8],
        meta: &EntryMeta,
        layer: &mut LayerState,
    ) -> Result<(), ImageError> {
        if rel.as_os_str().is_empty() {
            return Err(self.unsafe_path(
                layer,
                raw,
                "would replace the root directory with a symbolic link",
            ));
        }
        if target.is_empty() {
            return Err(self.bad(format!(
                "{}: symbolic link `{}` has an empty target",
                layer.label,
                String::from_utf8_lossy(raw)
            )));
        }
        let Some(abs) = self.checked_path(rel, raw, true, layer)? else {
            return Ok(());
        };
        self.remove_existing(&abs, rel, false)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &abs)
            .ctx(|| format!("creating the symbolic link {}", abs.display()))?;
        self.set_owner(&abs, meta)?;
        self.set_xattrs(&abs, meta);
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &abs,
            &timestamps(meta.mtime),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)
        .ctx(|| format!("setting the time of {}", abs.display()))?;
        layer.touch(rel);
        Ok(())
    }

    fn make_hardlink(
        &mut self,
        rel: &Path,
        raw: &[u8],
        target: &[u8],
        layer: &mut LayerState,
    ) -> Result<(), ImageError> {
        let shown = String::from_utf8_lossy(target).into_owned();
        let target_rel = sanitize(target).map_err(|why| {
            self.unsafe_path(
                layer,
                raw,
                format!("is a hard link to `{shown}`, which {why}"),
            )
        })?;
        if target_rel.as_os_str().is_empty() || rel.as_os_str().is_empty() {
            return Err(self.unsafe_path(
                layer,
                raw,
                "is a hard link to or from the root directory",
            ));
        }
        let missing = self.bad(format!(
            "{}: `{}` is a hard link to `{shown}`, which is not in the image",
            layer.label,
            String::from_utf8_lossy(raw)
        ));
        let Some(target_abs) = self.checked_path(&target_rel, raw, false, layer)? else {
            return Err(missing);
        };
        match fs::symlink_metadata(&target_abs) {
            Ok(m) if m.is_dir() => {
                return Err(self.bad(format!(
                    "{}: `{}` is a hard link to the directory `{shown}`",
                    layer.label,
                    String::from_utf8_lossy(raw)
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing),
            Err(e) => {
                return Err(ImageError::io(
                    format!("checking {}", target_abs.display()),
                    e,
                ))
            }
        }
        let Some(abs) = self.checked_path(rel, raw, true, layer)? else {
            return Ok(());
        };
        if abs == target_abs {
            return Ok(());
        }
        self.remove_existing(&abs, rel, false)?;
        // linkat without AT_SYMLINK_FOLLOW: a link to a symbolic link links the link itself
        fs::hard_link(&target_abs, &abs)
            .ctx(|| format!("linking {} to {}", abs.display(), target_abs.display()))?;
        layer.touch(rel);
        Ok(())
    }

    fn set_owner(&mut self, abs: &Path, meta: &EntryMeta) -> Result<(), ImageError> {
        if !self.chown {
            return Ok(());
        }
        match std::os::unix::fs::lchown(abs, Some(meta.uid), Some(meta.gid)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                self.chown = false;
                Ok(())
            }
            Err(e) => Err(ImageError::io(
                format!("changing the owner of {}", abs.display()),
                e,
            )),
        }
    }

    /// Best effort: extended attributes the file system or our privileges refuse are counted.
    fn set_xattrs(&mut self, abs: &Path, meta: &EntryMeta) {
        for (name, value) in &meta.xattrs {
            if let Err(e) =
                rustix::fs::lsetxattr(abs, name.as_str(), value, rustix::fs::XattrFlags::empty())
            {
                self.xattr_failures += 1;
                if self.xattr_first_failure.is_none() {
                    self.xattr_first_failure = Some(format!(
                        "{name} on {}: {}",
                        abs.display(),
                        io::Error::from(e)
                    ));
                }
            }
        }
    }

    /// Applies the directories' modes and times, and tells what was left out.
    pub fn finish(&mut self, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
        let mut dirs: Vec<(PathBuf, DirMeta)> = self.dirs.drain().collect();
        // deepest first: a parent's restrictive mode must not stop us from reaching its children
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, meta) in dirs {
            let abs = self.root.join(&rel);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            fs::set_permissions(&abs, Permissions::from_mode(meta.mode))
                .ctx(|| format!("setting the mode of {}", abs.display()))?;
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &abs,
                &timestamps(meta.mtime),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io::Error::from)
            .ctx(|| format!("setting the time of {}", abs.display()))?;
        }
        if self.specials > 0 {
            progress(&format!(
                "note: skipped {} device nodes and FIFOs (the guest gets its own /dev)",
                self.specials
            ));
        }
        if self.unknown > 0 {
            progress(&format!(
                "note: skipped {} tar entries of types that are not files",
                self.unknown
            ));
        }
        if !self.chown && !self.chown_noted {
            self.chown_noted = true;
            progress("note: not running as root, so the image's file owners are not kept (files belong to the importing user)");
        }
        if self.xattr_failures > 0 {
            progress(&format!(
                "note: could not keep {} extended attributes (first: {})",
                self.xattr_failures,
                self.xattr_first_failure.as_deref().unwrap_or("?")
            ));
        }
        Ok(())
    }
}

fn timestamps((sec, nsec): (i64, u32)) -> Timestamps {
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// A PAX time ("1700000000.123456789", possibly negative) as seconds and nanoseconds.
pub(crate) fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    let sec: i64 = int.parse().ok()?;
    let mut nsec: u32 = 0;
    // the first digit counts 10^8 ns, the ninth 1 ns; later digits are below a nanosecond
    let mut scale: u32 = 100_000_000;
    for c in frac.chars().take(9) {
        let d = c.to_digit(10)?;
        nsec += d * scale;
        scale /= 10;
    }
    if sec < 0 && nsec > 0 {
        // -1.5 is 2 s before the epoch plus 0.5 s
        return Some((sec.checked_sub(1)?, 1_000_000_000 - nsec));
    }
    Some((sec, nsec))
}

/// Reads what is left of `r` into nothing.
fn drain(r: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    loop {
        match r.read(buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Opens `path` for reading without following a final symbolic link.
pub(crate) fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}
