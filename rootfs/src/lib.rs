//! Container images as build environments: import and cache. A crate of its own (no KVM in it):
//! `vmm --image` uses the importer, and vmm's `--copy-out` uses its path-safe extractor (`layer`).
//!
//! [`ImageStore::import`] turns an OCI image layout, a `docker save` tarball, a plain root file system
//! tarball or a plain directory into an ext4 image (made with `mkfs.ext4 -d`, no root or mount needed)
//! plus the image's run config (Env, WorkingDir, User, Entrypoint, Cmd), kept side by side in a
//! content-addressed cache:
//!
//! ```text
//! <dir>/<kind>-<sha256 hex>/rootfs.ext4    the root file system
//! <dir>/<kind>-<sha256 hex>/config.json    ImageConfig
//! <dir>/<kind>-<sha256 hex>/meta.json      digest, kind, the sources imported from, time, sizes
//! <dir>/.memo/<key>                 (path, inode, size, mtime, ctime) of a tarball or directory -> entry
//! <dir>/.tmp-*/, .tmp-*.lock        imports in progress (a locked lock file) or interrupted (unlocked)
//! ```
//!
//! The digest is the OCI manifest's digest, the sha256 of a `docker save` config, the sha256 of a plain
//! tarball, or a sha256 over a plain directory's paths, metadata and contents; an entry is keyed by its
//! kind as well, so that a file of one kind cannot pass for another's digest (a docker-save "config"
//! that is really an OCI manifest parses as an empty config and has the manifest's digest). An import is built in a
//! private `.tmp-*` directory and renamed into place last, so an entry either is complete or is not
//! there; of two concurrent imports of one image the second rename fails and its copy is discarded.
//! Interrupted imports are cleaned up by the next [`ImageStore::open`].
//!
//! Layers are untrusted input: see `layer.rs` for what is refused and why.

mod error;
mod ext4;
#[doc(hidden)]
pub mod fuzzing;
pub mod host_tool;
pub mod layer;
mod source;
mod tree;
mod user;
mod util;

#[cfg(test)]
mod tests;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::ImageError;
use error::IoContext;
use source::Kind;
pub use user::resolve_user;
use util::{hex, is_sha256_hex, mib, unix_now};

/// The run settings of an image: its config's `config` object, as `docker run` applies them.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct ImageConfig {
    /// `K=V` strings
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as the image says it
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A cached image.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// `sha256:<64 hex>`
    pub digest: String,
    /// the ext4 root file system (never written once cached: open it read-only)
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// the canonical path it was imported from (the latest one when several gave the same image)
    pub source: String,
    /// the size of `rootfs` (the file is sparse: it takes less on disk)
    pub size_bytes: u64,
}

/// `meta.json` of a cache entry.
#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    digest: String,
    kind: String,
    sources: Vec<String>,
    imported_unix: u64,
    size_bytes: u64,
    layers: usize,
    /// bytes of file data in the image
    content_bytes: u64,
}

/// 2: entries named `<kind>-<digest hex>` (1 named them by the digest alone: those are removed)
const META_FORMAT: u32 = 2;

/// The name of the cache entry for an image of `kind` with digest `hex`.
fn entry_name(kind: &str, hex: &str) -> String {
    format!("{kind}-{hex}")
}

/// Whether `name` is an entry's name: a kind, `-`, a sha256 in hex.
fn is_entry_name(name: &str) -> bool {
    Kind::ALL.iter().any(|kind| {
        name.strip_prefix(kind.name())
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(is_sha256_hex)
    })
}

/// The image cache.
pub struct ImageStore {
    dir: PathBuf,
    pub(crate) max_total_bytes: u64,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name no other process or thread picks.
fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{}-{nanos:x}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes a tree, making its directories writable first if that is what stood in the way (a
/// non-root importer cannot delete from an image's read-only directories).
fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let _ = tree::walk(path, &mut |abs, _, md| {
                if md.is_dir() {
                    let _ = fs::set_permissions(abs, fs::Permissions::from_mode(0o700));
                }
                Ok(())
            });
            match fs::remove_dir_all(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        }
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Writes `data` to `path` (new) and syncs it.
fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// A private directory for one import, with a lock file beside it that its owner holds for as long as
/// it lives; one whose lock file is not locked is left over from an interrupted import.
struct TmpDir {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl TmpDir {
    fn create(dir: &Path) -> Result<Self, ImageError> {
        for _ in 0..16 {
            let name = unique_name(".tmp-");
            let lock_path = dir.join(format!("{name}.lock"));
            let lock = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&lock_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(ImageError::io(
                        format!("creating {}", lock_path.display()),
                        e,
                    ))
                }
            };
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
                .map_err(io::Error::from)
                .ctx(|| format!("locking {}", lock_path.display()))?;
            // a concurrent `open` may have taken the still unlocked file for stale and removed it
            let ours = match (fs::metadata(&lock_path), lock.metadata()) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !ours {
                continue;
            }
            let path = dir.join(&name);
            DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .ctx(|| format!("creating {}", path.display()))?;
            return Ok(TmpDir {
                path,
                lock_path,
                _lock: lock,
            });
        }
        Err(ImageError::Cache {
            dir: dir.to_path_buf(),
            why: "could not create a temporary directory".into(),
        })
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        // the lock file goes only once the directory has: otherwise the next `open` retries
        if remove_tree(&self.path).is_ok() {
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

/// Removes interrupted imports and removals from `dir`.
fn clean_stale(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_sha256_hex(&name) {
            // an entry of format 1, keyed by the digest alone: imported again when next asked for
            let _ = remove_tree(&entry.path());
            continue;
        }
        if !name.starts_with(".tmp-") {
            continue;
        }
        let path = entry.path();
        if let Some(stem) = name.strip_suffix(".lock") {
            let Ok(lock) = File::open(&path) else {
                continue;
            };
            if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_err()
            {
                continue; // an import in progress
            }
            let same = match (fs::metadata(&path), lock.metadata()) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same && remove_tree(&dir.join(stem)).is_ok() {
                let _ = fs::remove_file(&path);
            }
        } else if entry.file_type().is_ok_and(|t| t.is_dir())
            && !dir.join(format!("{name}.lock")).exists()
        {
            // a removal's detached entry (an import's directory never outlives its lock file)
            let _ = remove_tree(&path);
        }
    }
    // memo files half-written by a crash
    if let Ok(rd) = fs::read_dir(dir.join(".memo")) {
        for entry in rd.flatten() {
            let old = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            if entry.file_name().to_string_lossy().starts_with(".tmp-") && old {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The memo key of a file: its path and everything that changes when it does (ctime cannot be set
/// back, so a rewritten file never matches).
fn file_key(path: &Path, md: &fs::Metadata) -> String {
    let mut h = Sha256::new();
    h.update(b"file\0");
    h.update(path.as_os_str().as_encoded_bytes());
    h.update([0]);
    for v in [
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime() as u64,
        md.mtime_nsec() as u64,
        md.ctime() as u64,
        md.ctime_nsec() as u64,
    ] {
        h.update(v.to_le_bytes());
    }
    hex(&h.finalize())
}

fn dir_key(path: &Path, fast_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"dir\0");
    h.update(path.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(fast_key.as_bytes());
    hex(&h.finalize())
}

impl ImageStore {
    /// Opens (creating) the cache at `dir`, and cleans up what interrupted imports left there.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        fs::create_dir_all(dir).ctx(|| format!("creating the image cache {}", dir.display()))?;
        let dir =
            fs::canonicalize(dir).ctx(|| format!("opening the image cache {}", dir.display()))?;
        if !dir.is_dir() {
            return Err(ImageError::Cache {
                dir,
                why: "not a directory".into(),
            });
        }
        clean_stale(&dir);
        Ok(ImageStore {
            dir,
            max_total_bytes: layer::MAX_TOTAL_BYTES,
        })
    }

    /// The cache directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Imports SRC unless already cached; returns the cached image. `progress` gets one-line messages
    /// (what is being done, and notes on what was left out).
    pub fn import(&self, src: &Path, progress: &mut dyn FnMut(&str)) -> Result<Image, ImageError> {
        let canon = fs::canonicalize(src).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ImageError::NotFound {
                    path: src.to_path_buf(),
                }
            } else {
                ImageError::io(format!("reading {}", src.display()), e)
            }
        })?;
        let source = canon.to_string_lossy().into_owned();
        let md = fs::metadata(&canon).ctx(|| format!("reading {source}"))?;

        // a tarball or a plain directory that was imported before, unchanged: no need to hash it again
        let mut scan = None;
        let memo_key = if md.is_file() {
            Some(file_key(&canon, &md))
        } else if md.is_dir() && source::is_plain_dir(&canon) {
            if self.dir.starts_with(&canon) {
                return Err(ImageError::BadImage {
                    src: source,
                    why: format!("it holds the image cache {}", self.dir.display()),
                });
            }
            let s = tree::scan(&canon)?;
            let key = dir_key(&canon, &s.fast_key);
            scan = Some(s);
            Some(key)
        } else {
            None
        };
        if let Some(key) = &memo_key {
            if let Some(hex) = self.memo_get(key) {
                if let Some(image) = self.hit(&hex, &source)? {
                    return Ok(image);
                }
            }
        }

        let tmp = TmpDir::create(&self.dir)?;
        let plan = source::prepare(&canon, &md, &tmp.path, scan, progress)?;
        if let Some(key) = &memo_key {
            self.memo_put(key, &entry_name(plan.kind.name(), &plan.digest_hex));
        }
        let name = entry_name(plan.kind.name(), &plan.digest_hex);
        if let Some(image) = self.hit(&name, &source)? {
            return Ok(image);
        }
        self.build(&plan, &canon, &source, &tmp, progress)?;
        drop(tmp);
        self.hit(&name, &source)?.ok_or_else(|| ImageError::Cache {
            dir: self.dir.clone(),
            why: format!(
                "the entry for sha256:{} vanished right after the import",
                plan.digest_hex
            ),
        })
    }

    /// Lists the cached images, the most recently imported first.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut all = self.entries()?;
        all.sort_by(|a, b| {
            b.0.imported_unix
                .cmp(&a.0.imported_unix)
                .then(a.1.digest.cmp(&b.1.digest))
        });
        Ok(all.into_iter().map(|(_, image)| image).collect())
    }

    /// Removes one image. REF: a digest (full or unique prefix, with or without "sha256:") or the source
    /// recorded at import (as given then or as a path to it now). Returns what was removed (its
    /// `rootfs` no longer exists; a VM that has it open keeps running).
    pub fn remove(&self, reference: &str) -> Result<Image, ImageError> {
        let r = reference.trim();
        let prefix = r.strip_prefix("sha256:").unwrap_or(r).to_ascii_lowercase();
        let all = self.entries()?;
        let mut found: Vec<&(Meta, Image)> = Vec::new();
        if !prefix.is_empty() && prefix.len() <= 64 && prefix.bytes().all(|b| b.is_ascii_hexdigit())
        {
            found = all
                .iter()
                .filter(|(m, _)| m.digest["sha256:".len()..].starts_with(&prefix))
                .collect();
        }
        if found.is_empty() && !r.is_empty() {
            let canon = fs::canonicalize(r)
                .ok()
                .map(|p| p.to_string_lossy().into_owned());
            found = all
                .iter()
                .filter(|(m, _)| {
                    m.sources
                        .iter()
                        .any(|s| s == r || Some(s) == canon.as_ref())
                })
                .collect();
        }
        match found.len() {
            0 => Err(ImageError::NotInCache {
                reference: reference.to_string(),
            }),
            1 => {
                let (meta, image) = found[0];
                let name = entry_name(&meta.kind, &meta.digest["sha256:".len()..]);
                self.delete_entry(&name)?;
                self.memo_forget(&name);
                Ok(image.clone())
            }
            n => Err(ImageError::Ambiguous {
                reference: reference.to_string(),
                count: n,
                matches: found
                    .iter()
                    .map(|(m, _)| m.digest[..19].to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Every readable entry.
    fn entries(&self) -> Result<Vec<(Meta, Image)>, ImageError> {
        let rd = fs::read_dir(&self.dir)
            .ctx(|| format!("reading the image cache {}", self.dir.display()))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.ctx(|| format!("reading the image cache {}", self.dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_entry_name(&name) {
                continue;
            }
            if let Ok(pair) = self.read_entry(&name) {
                out.push(pair);
            }
        }
        Ok(out)
    }

    /// Reads the entry `name`; Err says why it is not usable.
    fn read_entry(&self, name: &str) -> Result<(Meta, Image), String> {
        let dir = self.dir.join(name);
        let meta: Meta = serde_json::from_slice(
            &fs::read(dir.join("meta.json")).map_err(|e| format!("meta.json: {e}"))?,
        )
        .map_err(|e| format!("meta.json: {e}"))?;
        let config: ImageConfig = serde_json::from_slice(
            &fs::read(dir.join("config.json")).map_err(|e| format!("config.json: {e}"))?,
        )
        .map_err(|e| format!("config.json: {e}"))?;
        let rootfs = dir.join("rootfs.ext4");
        let size_bytes = fs::metadata(&rootfs)
            .map_err(|e| format!("rootfs.ext4: {e}"))?
            .len();
        let hex = meta.digest.strip_prefix("sha256:").unwrap_or_default();
        if meta.format != META_FORMAT || entry_name(&meta.kind, hex) != name {
            return Err("meta.json is not of this version or not for this entry".into());
        }
        let image = Image {
            digest: meta.digest.clone(),
            rootfs,
            config,
            source: meta.sources.last().cloned().unwrap_or_default(),
            size_bytes,
        };
        Ok((meta, image))
    }

    /// The cached image of entry `name`, with `source` recorded among its sources; None when not
    /// cached (a damaged entry is removed).
    fn hit(&self, name: &str, source: &str) -> Result<Option<Image>, ImageError> {
        let dir = self.dir.join(name);
        if !dir.exists() {
            return Ok(None);
        }
        match self.read_entry(name) {
            Ok((mut meta, mut image)) => {
                if !meta.sources.iter().any(|s| s == source) {
                    meta.sources.push(source.to_string());
                    // best effort: a lost update only loses a name `remove` would accept
                    if let Ok(data) = serde_json::to_vec_pretty(&meta) {
                        let tmp = dir.join(unique_name(".meta-"));
                        if write_synced(&tmp, &data).is_ok()
                            && fs::rename(&tmp, dir.join("meta.json")).is_err()
                        {
                            let _ = fs::remove_file(&tmp);
                        }
                    }
                }
                image.source = source.to_string();
                Ok(Some(image))
            }
            Err(_) => {
                self.delete_entry(name)?;
                Ok(None)
            }
        }
    }

    /// Detaches the entry `name` (one rename: `list` never sees half of it), then deletes it.
    fn delete_entry(&self, name: &str) -> Result<(), ImageError> {
        let from = self.dir.join(name);
        let to = self.dir.join(unique_name(".tmp-rm-"));
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ImageError::io(format!("removing {}", from.display()), e)),
        }
        // what is left (if anything) goes at the next open
        let _ = remove_tree(&to);
        Ok(())
    }

    fn memo_get(&self, key: &str) -> Option<String> {
        let data = fs::read(self.dir.join(".memo").join(key)).ok()?;
        let s = String::from_utf8(data).ok()?;
        let s = s.trim();
        is_entry_name(s).then(|| s.to_string())
    }

    /// Best effort: without the memo an import is only slower.
    fn memo_put(&self, key: &str, name: &str) {
        let dir = self.dir.join(".memo");
        let _ = fs::create_dir(&dir);
        let tmp = dir.join(unique_name(".tmp-"));
        if write_synced(&tmp, name.as_bytes()).is_err() || fs::rename(&tmp, dir.join(key)).is_err()
        {
            let _ = fs::remove_file(&tmp);
        }
    }

    fn memo_forget(&self, name: &str) {
        let Ok(rd) = fs::read_dir(self.dir.join(".memo")) else {
            return;
        };
        for entry in rd.flatten() {
            if fs::read(entry.path()).is_ok_and(|d| d == name.as_bytes()) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Builds the entry for `plan` in `tmp` and renames it into place.
    fn build(
        &self,
        plan: &source::Plan,
        canon: &Path,
        source: &str,
        tmp: &TmpDir,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let name = source::short(canon);
        let entry = tmp.path.join("entry");
        DirBuilder::new()
            .mode(0o755)
            .create(&entry)
            .ctx(|| format!("creating {}", entry.display()))?;
        let out = entry.join("rootfs.ext4");
        let content_bytes;
        if let (Kind::Directory, Some(scan)) = (plan.kind, &plan.tree) {
            let size = ext4::size_mib(scan.kib, scan.entries);
            self.check_space(source, scan.kib.saturating_mul(1024))?;
            progress(&format!("importing {name}: making ext4 image ({size} MiB)"));
            ext4::make_image(canon, &out, size, scan.entries, source)?;
            content_bytes = scan.bytes;
        } else {
            let staging = tmp.path.join("root");
            DirBuilder::new()
                .mode(0o755)
                .create(&staging)
                .ctx(|| format!("creating {}", staging.display()))?;
            let ex = source::unpack(plan, &staging, source, self.max_total_bytes, progress)?;
            content_bytes = ex.bytes;
            let (kib, entries) = tree::usage(&staging)?;
            let size = ext4::size_mib(kib, entries);
            progress(&format!("importing {name}: making ext4 image ({size} MiB)"));
            ext4::make_image(&staging, &out, size, entries, source)?;
            remove_tree(&staging).ctx(|| format!("removing {}", staging.display()))?;
        }
        let size_bytes = fs::metadata(&out)
            .ctx(|| format!("reading {}", out.display()))?
            .len();
        let meta = Meta {
            format: META_FORMAT,
            digest: format!("sha256:{}", plan.digest_hex),
            kind: plan.kind.name().to_string(),
            sources: vec![source.to_string()],
            imported_unix: unix_now(),
            size_bytes,
            layers: plan.layers.len(),
            content_bytes,
        };
        let config_json = to_json(&plan.config);
        let meta_json = to_json(&meta);
        write_synced(&entry.join("config.json"), &config_json)
            .ctx(|| format!("writing {}", entry.display()))?;
        write_synced(&entry.join("meta.json"), &meta_json)
            .ctx(|| format!("writing {}", entry.display()))?;
        sync_dir(&entry).ctx(|| format!("syncing {}", entry.display()))?;
        let dest = self
            .dir
            .join(entry_name(plan.kind.name(), &plan.digest_hex));
        match fs::rename(&entry, &dest) {
            Ok(()) => sync_dir(&self.dir).ctx(|| format!("syncing {}", self.dir.display())),
            // another import of the same image got there first: ours is discarded with `tmp`
            Err(_) if dest.join("meta.json").exists() => Ok(()),
            Err(e) => Err(ImageError::io(
                format!("moving the new image into {}", dest.display()),
                e,
            )),
        }
    }

    /// Refuses to start writing `bytes` of image when the cache's file system has not that much room.
    fn check_space(&self, src: &str, bytes: u64) -> Result<(), ImageError> {
        let Ok(vfs) = rustix::fs::statvfs(&self.dir) else {
            return Ok(());
        };
        let avail = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let need = bytes.saturating_add(256 << 20);
        if need > avail {
            return Err(ImageError::NoSpace {
                dir: self.dir.clone(),
                src: src.to_string(),
                need_mib: mib(need),
                avail_mib: mib(avail),
            });
        }
        Ok(())
    }
}

/// Pretty JSON of the cache's files (serializing these plain structs cannot fail).
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec_pretty(value).unwrap_or_default();
    v.push(b'\n');
    v
}
