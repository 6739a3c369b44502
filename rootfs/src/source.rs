//! What SRC is, detected by its content, and what importing it means: its digest (the cache key), its
//! config, and its layers in order.
//!
//! - OCI image layout (a directory, or a tar of one): `oci-layout`, `index.json`, `blobs/sha256/..`;
//!   index -> (nested index: the linux/amd64 entry) -> manifest -> config + layers. Digest: the
//!   manifest's. Every blob read is checked against its digest.
//! - `docker save` tarball (or such a directory, or either gzip-compressed): `manifest.json` with one
//!   image's Config and Layers. Digest: sha256 of the config file. Layers are checked against the
//!   config's diff_ids (sha256 of the uncompressed layer).
//! - A plain root file system tarball (any other tar, optionally gzip-compressed): one layer. Digest:
//!   sha256 of the file.
//! - A plain directory: the root itself, given to mkfs.ext4 as it is. Digest: sha256 over its paths,
//!   metadata and contents.

use std::collections::HashMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Deserialize;

use super::error::{ImageError, IoContext};
use super::layer::{self, Budget, Metered};
use super::tree;
use super::util::{is_sha256_hex, mib, sha256_file, sha256_hex, HashReader, RangeReader};
use super::ImageConfig;

/// JSON files (index, manifest, config) larger than this are refused.
const MAX_JSON_BYTES: u64 = 16 << 20;
/// Nested indexes followed, at most.
const MAX_INDEX_DEPTH: usize = 4;

/// The kinds of SRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Oci,
    DockerSave,
    Tarball,
    Directory,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::Oci, Kind::DockerSave, Kind::Tarball, Kind::Directory];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Oci => "oci",
            Kind::DockerSave => "docker-save",
            Kind::Tarball => "tarball",
            Kind::Directory => "directory",
        }
    }
}

/// One layer to apply.
pub(crate) struct LayerRef {
    /// its path in the bundle
    pub(crate) name: String,
    /// the sha256 the stored blob must have (OCI descriptors)
    pub(crate) blob_hex: Option<String>,
    /// the sha256 the uncompressed tar must have (the config's diff_ids)
    pub(crate) diff_hex: Option<String>,
}

/// Where an image's files are read from.
pub(crate) enum Bundle {
    Dir(PathBuf),
    Tar(TarBundle),
    /// a plain tarball: the one layer is the file itself
    File(PathBuf),
    /// a plain directory: no layers
    Tree,
}

/// A reader for a file of a bundle, and the file's size.
pub(crate) type SizedReader<'a> = (Box<dyn Read + 'a>, u64);

/// What importing SRC means.
pub(crate) struct Plan {
    pub(crate) kind: Kind,
    pub(crate) digest_hex: String,
    pub(crate) config: ImageConfig,
    pub(crate) layers: Vec<LayerRef>,
    pub(crate) bundle: Bundle,
    /// for a plain directory: its disk usage in KiB, entries and bytes of file data
    pub(crate) tree: Option<tree::Scan>,
}

/// A member of a tar archive, indexed without reading data.
struct Member {
    offset: u64,
    size: u64,
    /// (hard link?, target) for links
    link: Option<(bool, String)>,
}

/// A tar archive (docker save, or an OCI layout as a tar) indexed for random access.
pub(crate) struct TarBundle {
    file: File,
    members: HashMap<String, Member>,
}

/// An archive member's name, normalized: no `.` or empty components; `..` taken lexically (None when
/// it climbs above the top).
fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

impl TarBundle {
    /// Indexes `file` (an uncompressed tar). Only members with at most 3 path components are kept:
    /// every file of an image archive is (`manifest.json`, `<id>/layer.tar`, `blobs/sha256/<hex>`).
    fn index(file: File, src: &str) -> Result<(Self, usize), ImageError> {
        let budget = Rc::new(Budget::default());
        let mut members = HashMap::new();
        let mut count = 0usize;
        {
            let mut archive = tar::Archive::new(Metered::new(&file, budget.clone()));
            budget.allow(1 << 22);
            let entries = archive
                .entries_with_seek()
                .map_err(|e| layer::tar_error(src, "the tarball", e, &budget))?;
            for entry in entries {
                let entry = entry.map_err(|e| layer::tar_error(src, "the tarball", e, &budget))?;
                count += 1;
                let raw = entry.path_bytes();
                let Some(name) = std::str::from_utf8(&raw).ok().and_then(normalize) else {
                    budget.allow(1 << 22);
                    continue;
                };
                if name.split('/').count() <= 3 {
                    let kind = entry.header().entry_type();
                    let link = if kind.is_symlink() || kind.is_hard_link() {
                        entry
                            .link_name_bytes()
                            .and_then(|l| String::from_utf8(l.into_owned()).ok())
                            .map(|l| (kind.is_hard_link(), l))
                    } else {
                        None
                    };
                    members.insert(
                        name,
                        Member {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                            link,
                        },
                    );
                }
                budget.allow(1 << 22);
            }
        }
        let len = file.metadata().ctx(|| format!("reading {src}"))?.len();
        for (name, m) in &members {
            if m.link.is_none() && m.offset.saturating_add(m.size) > len {
                return Err(ImageError::TooLarge {
                    src: src.to_string(),
                    layer: "the tarball".to_string(),
                    why: format!(
                        "member `{name}` claims {} bytes, beyond the end of the file",
                        m.size
                    ),
                });
            }
        }
        Ok((TarBundle { file, members }, count))
    }

    fn has(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// The member for `name`, following links (docker save links duplicate layers) up to 8 times.
    fn find(&self, name: &str) -> Option<&Member> {
        let mut name = normalize(name)?;
        for _ in 0..8 {
            let m = self.members.get(&name)?;
            match &m.link {
                None => return Some(m),
                Some((true, target)) => name = normalize(target)?,
                Some((false, target)) => {
                    let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    name = if target.starts_with('/') {
                        normalize(target)?
                    } else {
                        normalize(&format!("{dir}/{target}"))?
                    };
                }
            }
        }
        None
    }
}

impl Bundle {
    /// A reader for the file `name` in the bundle and its size; None when there is no such file.
    pub(crate) fn open(&self, name: &str) -> Result<Option<SizedReader<'_>>, ImageError> {
        match self {
            Bundle::Dir(root) => {
                let Some(norm) = normalize(name) else {
                    return Ok(None);
                };
                if norm.is_empty() {
                    return Ok(None);
                }
                let path = root.join(&norm);
                // only regular files: opening a FIFO would block
                if !fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                    return Ok(None);
                }
                match OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&path)
                {
                    Ok(f) => {
                        let md = f.metadata().ctx(|| format!("reading {}", path.display()))?;
                        if !md.is_file() {
                            return Ok(None);
                        }
                        Ok(Some((Box::new(f), md.len())))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(ImageError::io(format!("reading {}", path.display()), e)),
                }
            }
            Bundle::Tar(t) => Ok(t.find(name).map(|m| {
                (
                    Box::new(RangeReader::new(&t.file, m.offset, m.size)) as Box<dyn Read>,
                    m.size,
                )
            })),
            Bundle::File(path) => {
                let f = File::open(path).ctx(|| format!("reading {}", path.display()))?;
                let len = f
                    .metadata()
                    .ctx(|| format!("reading {}", path.display()))?
                    .len();
                Ok(Some((Box::new(f), len)))
            }
            Bundle::Tree => Ok(None),
        }
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Bundle::Dir(root) => root.join(name).is_file(),
            Bundle::Tar(t) => t.has(name),
            _ => false,
        }
    }
}

fn bad(src: &str, why: impl Into<String>) -> ImageError {
    ImageError::BadImage {
        src: src.to_string(),
        why: why.into(),
    }
}

/// Reads a JSON file of the bundle (size-limited), checking its sha256 when `want_hex` is given.
fn read_small(
    bundle: &Bundle,
    name: &str,
    want_hex: Option<&str>,
    src: &str,
) -> Result<Vec<u8>, ImageError> {
    let Some((r, size)) = bundle.open(name)? else {
        return Err(bad(src, format!("`{name}` is missing")));
    };
    if size > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            src: src.to_string(),
            layer: format!("`{name}`"),
            why: format!(
                "{} MiB of JSON, over the {} MiB limit",
                mib(size),
                mib(MAX_JSON_BYTES)
            ),
        });
    }
    let mut data = Vec::new();
    r.take(MAX_JSON_BYTES)
        .read_to_end(&mut data)
        .ctx(|| format!("reading `{name}` of {src}"))?;
    if let Some(want) = want_hex {
        let got = sha256_hex(&data);
        if got != want {
            return Err(ImageError::DigestMismatch {
                src: src.to_string(),
                what: format!("`{name}`"),
                expected: format!("sha256:{want}"),
                actual: format!("sha256:{got}"),
            });
        }
    }
    Ok(data)
}

/// The hex of a "sha256:<hex>" digest.
fn digest_hex(digest: &str, src: &str) -> Result<String, ImageError> {
    match digest.split_once(':') {
        Some(("sha256", h)) if is_sha256_hex(h) => Ok(h.to_string()),
        Some(("sha256", _)) => Err(bad(src, format!("malformed digest `{digest}`"))),
        Some((alg, _)) => Err(ImageError::Unsupported {
            src: src.to_string(),
            what: format!("the digest algorithm `{alg}`"),
            hint: "vmm reads sha256-addressed images (what docker, podman and skopeo write)"
                .to_string(),
        }),
        None => Err(bad(src, format!("malformed digest `{digest}`"))),
    }
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct IndexOrManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize, Default)]
struct ContainerConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

/// The image config's run settings, and its diff_ids (hex), from the config file's bytes.
fn parse_config(data: &[u8], src: &str) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let cf: ConfigFile = serde_json::from_slice(data)
        .map_err(|e| bad(src, format!("its image config is not valid: {e}")))?;
    let os = cf.os.unwrap_or_default();
    let arch = cf.architecture.unwrap_or_default();
    if (!os.is_empty() && os != "linux")
        || (!arch.is_empty() && arch != "amd64" && arch != "x86_64")
    {
        return Err(ImageError::Unsupported {
            src: src.to_string(),
            what: format!("an image for {}/{}", if os.is_empty() { "?" } else { &os }, if arch.is_empty() { "?" } else { &arch }),
            hint: "vmm runs x86_64 Linux guests: use the linux/amd64 image (e.g. `docker pull --platform linux/amd64`)"
                .to_string(),
        });
    }
    let c = cf.config.unwrap_or_default();
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let config = ImageConfig {
        env: c.env.unwrap_or_default(),
        working_dir: nonempty(c.working_dir),
        user: nonempty(c.user),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
    };
    let mut diff_ids = Vec::new();
    for d in cf.rootfs.unwrap_or_default().diff_ids {
        diff_ids.push(digest_hex(&d, src)?);
    }
    Ok((config, diff_ids))
}

/// Picks the manifest for linux/amd64 among an index's entries.
fn choose<'d>(list: &'d [Descriptor], src: &str) -> Result<&'d Descriptor, ImageError> {
    if list.len() == 1 {
        return Ok(&list[0]);
    }
    if let Some(d) = list.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    }) {
        return Ok(d);
    }
    let unplatformed: Vec<_> = list.iter().filter(|d| d.platform.is_none()).collect();
    if unplatformed.len() == 1 {
        return Ok(unplatformed[0]);
    }
    let platforms: Vec<String> = list
        .iter()
        .map(|d| {
            d.platform
                .as_ref()
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .unwrap_or_else(|| "?".into())
        })
        .collect();
    Err(ImageError::Unsupported {
        src: src.to_string(),
        what: format!(
            "an index of {} images none of which is linux/amd64 ({})",
            list.len(),
            platforms.join(", ")
        ),
        hint: "export the linux/amd64 image".to_string(),
    })
}

fn plan_oci(bundle: Bundle, src: &str) -> Result<Plan, ImageError> {
    let index = read_small(&bundle, "index.json", None, src)?;
    let mut doc: IndexOrManifest = serde_json::from_slice(&index)
        .map_err(|e| bad(src, format!("index.json is not valid: {e}")))?;
    let mut manifest_hex = None;
    for _ in 0..=MAX_INDEX_DEPTH {
        let Some(list) = &doc.manifests else { break };
        if list.is_empty() {
            return Err(bad(src, "its index lists no image"));
        }
        let d = choose(list, src)?;
        let hex = digest_hex(&d.digest, src)?;
        let data = read_small(&bundle, &format!("blobs/sha256/{hex}"), Some(&hex), src)?;
        doc = serde_json::from_slice(&data)
            .map_err(|e| bad(src, format!("manifest {} is not valid: {e}", d.digest)))?;
        manifest_hex = Some(hex);
    }
    let (Some(manifest_hex), Some(config_desc), None) = (manifest_hex, &doc.config, &doc.manifests)
    else {
        return Err(bad(src, "its index does not lead to an image manifest"));
    };
    let config_hex = digest_hex(&config_desc.digest, src)?;
    let config_data = read_small(
        &bundle,
        &format!("blobs/sha256/{config_hex}"),
        Some(&config_hex),
        src,
    )?;
    let (config, diff_ids) = parse_config(&config_data, src)?;
    let descs = doc.layers.as_deref().unwrap_or_default();
    check_diff_ids(&diff_ids, descs.len(), src)?;
    let mut layers = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        if d.media_type.contains("zstd") {
            return Err(zstd(src, &format!("layer {}/{}", i + 1, descs.len())));
        }
        let hex = digest_hex(&d.digest, src)?;
        let name = format!("blobs/sha256/{hex}");
        let Some((_, len)) = bundle.open(&name)? else {
            return Err(bad(
                src,
                format!("layer {} (`{name}`) is missing", d.digest),
            ));
        };
        if d.size.is_some_and(|s| s != len) {
            return Err(bad(
                src,
                format!(
                    "layer {} is {len} bytes, the manifest says {}",
                    d.digest,
                    d.size.unwrap_or(0)
                ),
            ));
        }
        layers.push(LayerRef {
            name,
            blob_hex: Some(hex),
            diff_hex: diff_ids.get(i).cloned(),
        });
    }
    Ok(Plan {
        kind: Kind::Oci,
        digest_hex: manifest_hex,
        config,
        layers,
        bundle,
        tree: None,
    })
}

#[derive(Deserialize)]
struct SaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn plan_docker_save(bundle: Bundle, src: &str) -> Result<Plan, ImageError> {
    let data = read_small(&bundle, "manifest.json", None, src)?;
    let mut entries: Vec<SaveEntry> = serde_json::from_slice(&data)
        .map_err(|e| bad(src, format!("manifest.json is not valid: {e}")))?;
    if entries.len() != 1 {
        let tags: Vec<String> = entries
            .iter()
            .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
            .collect();
        return Err(bad(
            src,
            format!(
                "it holds {} images ({}); save one image per tarball",
                entries.len(),
                if tags.is_empty() {
                    "untagged".to_string()
                } else {
                    tags.join(", ")
                }
            ),
        ));
    }
    let entry = entries.remove(0);
    let config_data = read_small(&bundle, &entry.config, None, src)?;
    let digest_hex = sha256_hex(&config_data);
    let (config, diff_ids) = parse_config(&config_data, src)?;
    check_diff_ids(&diff_ids, entry.layers.len(), src)?;
    let mut layers = Vec::new();
    for (i, name) in entry.layers.iter().enumerate() {
        if bundle.open(name)?.is_none() {
            return Err(bad(src, format!("layer `{name}` is missing")));
        }
        layers.push(LayerRef {
            name: name.clone(),
            blob_hex: None,
            diff_hex: diff_ids.get(i).cloned(),
        });
    }
    Ok(Plan {
        kind: Kind::DockerSave,
        digest_hex,
        config,
        layers,
        bundle,
        tree: None,
    })
}

/// Every layer must have its diff_id in the config, and no more: the cache key (a digest of the
/// manifest or the config) stands for the layers' content only when each one is checked against it.
fn check_diff_ids(diff_ids: &[String], layers: usize, src: &str) -> Result<(), ImageError> {
    if diff_ids.len() != layers {
        return Err(bad(
            src,
            format!(
                "its config lists {} diff_ids for {layers} layers (each layer must have one)",
                diff_ids.len()
            ),
        ));
    }
    Ok(())
}

fn zstd(src: &str, what: &str) -> ImageError {
    ImageError::Unsupported {
        src: src.to_string(),
        what: format!("{what} compressed with zstd"),
        hint: "recompress it with gzip (e.g. `skopeo copy --dest-compress-format gzip`) or export the image with \
               `docker save`"
            .to_string(),
    }
}

/// The error for a stream compressed with `name`.
pub(crate) fn unsupported(src: &str, what: &str, name: &str) -> ImageError {
    if name == "zstd" {
        return zstd(src, what);
    }
    ImageError::Unsupported {
        src: src.to_string(),
        what: format!("{what} compressed with {name}"),
        hint: "decompress it first, or recompress it with gzip".to_string(),
    }
}

/// Whether a tar member name, the first of a gzip-compressed tarball, says the tarball is an image
/// archive (docker save or OCI layout) rather than a root file system.
fn looks_like_image_archive(first: &str) -> bool {
    let top = first
        .trim_start_matches("./")
        .split('/')
        .next()
        .unwrap_or("");
    matches!(
        top,
        "manifest.json" | "oci-layout" | "index.json" | "repositories" | "blobs"
    ) || is_sha256_hex(top)
        || top.strip_suffix(".json").is_some_and(is_sha256_hex)
        || top.strip_suffix(".tar").is_some_and(is_sha256_hex)
}

/// A directory with a root-level manifest.json is an unpacked `docker save` when that file is
/// docker's manifest (a root file system has no reason for one of that shape).
fn is_docker_save_dir(bundle: &Bundle) -> bool {
    bundle.has("manifest.json")
        && read_small(bundle, "manifest.json", None, "")
            .is_ok_and(|data| serde_json::from_slice::<Vec<SaveEntry>>(&data).is_ok())
}

/// Whether the directory `src` is imported as a plain root directory (not an image layout).
pub(crate) fn is_plain_dir(src: &Path) -> bool {
    let bundle = Bundle::Dir(src.to_path_buf());
    !bundle.has("oci-layout") && !is_docker_save_dir(&bundle)
}

/// Works out what `src` (canonical) is and what importing it means. `scratch` is a private directory
/// for a decompressed copy of a gzip-compressed image archive.
pub(crate) fn prepare(
    src: &Path,
    md: &Metadata,
    scratch: &Path,
    scan: Option<tree::Scan>,
    progress: &mut dyn FnMut(&str),
) -> Result<Plan, ImageError> {
    let name = src.display().to_string();
    if md.is_dir() {
        let bundle = Bundle::Dir(src.to_path_buf());
        if bundle.has("oci-layout") {
            return plan_oci(bundle, &name);
        }
        if is_docker_save_dir(&bundle) {
            return plan_docker_save(bundle, &name);
        }
        let scan = match scan {
            Some(s) => s,
            None => tree::scan(src)?,
        };
        if scan.bytes > 64 << 20 {
            progress(&format!("hashing {} ({} MiB)", short(src), mib(scan.bytes)));
        }
        let digest_hex = tree::content_digest(src)?;
        return Ok(Plan {
            kind: Kind::Directory,
            digest_hex,
            config: ImageConfig::default(),
            layers: Vec::new(),
            bundle: Bundle::Tree,
            tree: Some(scan),
        });
    }
    if !md.is_file() {
        return Err(bad(&name, "it is neither a regular file nor a directory"));
    }
    let file = File::open(src).ctx(|| format!("reading {name}"))?;
    let mut head = [0u8; 8];
    let n = read_up_to(&mut RangeReader::new(&file, 0, 8), &mut head)
        .ctx(|| format!("reading {name}"))?;
    let head = &head[..n];
    if let Some(c) = layer::unsupported_compression(head) {
        return Err(unsupported(&name, "the tarball is", c));
    }
    let tar_file = if layer::is_gzip(head) {
        let first = first_member(src, &name)?;
        if !looks_like_image_archive(&first) {
            return plan_tarball(src, md, &name, progress);
        }
        progress(&format!(
            "decompressing {} ({} MiB)",
            short(src),
            mib(md.len())
        ));
        let copy = scratch.join("archive.tar");
        decompress_to(src, &copy, &name)?;
        File::open(&copy).ctx(|| format!("reading {}", copy.display()))?
    } else {
        file
    };
    let mut block = [0u8; 512];
    let n = read_up_to(&mut RangeReader::new(&tar_file, 0, 512), &mut block)
        .ctx(|| format!("reading {name}"))?;
    if !is_tar_header(&block[..n]) {
        return Err(not_an_image(&name));
    }
    let (bundle, count) = TarBundle::index(tar_file, &name)?;
    if bundle.has("manifest.json") {
        return plan_docker_save(Bundle::Tar(bundle), &name);
    }
    if bundle.has("oci-layout") && bundle.has("index.json") {
        return plan_oci(Bundle::Tar(bundle), &name);
    }
    if count == 0 {
        return Err(bad(&name, "it is an empty tar archive"));
    }
    plan_tarball(src, md, &name, progress)
}

fn plan_tarball(
    src: &Path,
    md: &Metadata,
    name: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Plan, ImageError> {
    if md.len() > 64 << 20 {
        progress(&format!("hashing {} ({} MiB)", short(src), mib(md.len())));
    }
    let file = File::open(src).ctx(|| format!("reading {name}"))?;
    let digest_hex = sha256_file(&file).ctx(|| format!("reading {name}"))?;
    Ok(Plan {
        kind: Kind::Tarball,
        digest_hex,
        config: ImageConfig::default(),
        layers: vec![LayerRef {
            name: String::new(),
            blob_hex: None,
            diff_hex: None,
        }],
        bundle: Bundle::File(src.to_path_buf()),
        tree: None,
    })
}

fn not_an_image(name: &str) -> ImageError {
    bad(
        name,
        "it is not an OCI image layout, a `docker save` tarball, or a (gzip-compressed) tar archive \
         of a root file system",
    )
}

/// Whether `block`, the first 512 bytes of a file, starts a tar archive: a header with a valid
/// checksum, or the end-of-archive zeros of an empty one.
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    if block.iter().all(|&b| b == 0) {
        return true;
    }
    let sum: u32 = block[..148]
        .iter()
        .chain(&block[156..512])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * 32;
    let field = std::str::from_utf8(&block[148..156]).unwrap_or("");
    let field = field.trim_matches(|c: char| c == ' ' || c == '\0');
    u32::from_str_radix(field, 8).is_ok_and(|c| c == sum)
}

/// Decompresses the gzip file `src` into `out`, within the size limit and the free space.
fn decompress_to(src: &Path, out: &Path, name: &str) -> Result<(), ImageError> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let avail = rustix::fs::statvfs(dir)
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
        .unwrap_or(u64::MAX);
    let limit = layer::MAX_TOTAL_BYTES.min(avail.saturating_sub(layer::SPACE_RESERVE));
    let mut file = File::create(out).ctx(|| format!("creating {}", out.display()))?;
    let input = File::open(src).ctx(|| format!("reading {name}"))?;
    let mut dec = flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(256 << 10, input));
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(bad(name, format!("damaged gzip data: {e}"))),
        };
        total += n as u64;
        if total > limit {
            if limit == layer::MAX_TOTAL_BYTES {
                return Err(ImageError::TooLarge {
                    src: name.to_string(),
                    layer: "the tarball".into(),
                    why: format!("it decompresses to more than {} GiB", limit >> 30),
                });
            }
            return Err(ImageError::NoSpace {
                dir: dir.parent().unwrap_or(dir).to_path_buf(),
                src: name.to_string(),
                need_mib: mib(total.saturating_mul(2)),
                avail_mib: mib(avail),
            });
        }
        io::Write::write_all(&mut file, &buf[..n]).ctx(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// The name of the first member of a gzip-compressed tar (empty when it has none).
fn first_member(src: &Path, name: &str) -> Result<String, ImageError> {
    let input = File::open(src).ctx(|| format!("reading {name}"))?;
    let mut dec = flate2::read::MultiGzDecoder::new(io::BufReader::new(input));
    let mut block = [0u8; 512];
    let n = read_up_to(&mut dec, &mut block)
        .map_err(|e| bad(name, format!("damaged gzip data: {e}")))?;
    if !is_tar_header(&block[..n]) {
        return Err(not_an_image(name));
    }
    let dec = io::Read::chain(&block[..n], dec);
    let budget = Rc::new(Budget::default());
    budget.allow(1 << 22);
    let mut archive = tar::Archive::new(Metered::new(dec, budget.clone()));
    let mut entries = archive
        .entries()
        .map_err(|e| layer::tar_error(name, "the tarball", e, &budget))?;
    match entries.next() {
        None => Ok(String::new()),
        Some(Ok(e)) => Ok(String::from_utf8_lossy(&e.path_bytes()).into_owned()),
        Some(Err(e)) => Err(layer::tar_error(name, "the tarball", e, &budget)),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The last component of `p`, for messages.
pub(crate) fn short(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Applies the plan's layers, in order, into `staging`, checking every blob and diff_id the image
/// names.
pub(crate) fn unpack(
    plan: &Plan,
    staging: &Path,
    src: &str,
    max_total: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<layer::Extractor, ImageError> {
    let mut ex = layer::Extractor::new(staging, src, max_total)?;
    let n = plan.layers.len();
    let label_of = |i: usize, l: &LayerRef| {
        if plan.kind == Kind::Tarball {
            "the tarball".to_string()
        } else {
            let id = l
                .blob_hex
                .as_deref()
                .or(l.diff_hex.as_deref())
                .map(|h| format!(" ({})", &h[..12]))
                .unwrap_or_default();
            format!("layer {}/{n}{id}", i + 1)
        }
    };
    for (i, l) in plan.layers.iter().enumerate() {
        let label = label_of(i, l);
        let (raw, len) = plan
            .bundle
            .open(&l.name)?
            .ok_or_else(|| bad(src, format!("{label} is missing")))?;
        if plan.kind == Kind::Tarball {
            progress(&format!(
                "importing {}: unpacking ({} MiB)",
                short(Path::new(src)),
                mib(len)
            ));
        } else {
            progress(&format!(
                "importing {}: layer {}/{n} ({} MiB)",
                short(Path::new(src)),
                i + 1,
                mib(len)
            ));
        }
        let mut blob = HashReader::new(raw);
        let (stream, compressed) = match layer::open_stream(&mut blob) {
            Ok(s) => s,
            Err(layer::OpenError::Io(e)) => {
                return Err(ImageError::io(format!("reading {label} of {src}"), e))
            }
            Err(layer::OpenError::Unsupported(c)) => return Err(unsupported(src, &label, c)),
        };
        let tar = HashReader::new(stream);
        let mut tar = ex.apply_layer(tar, if compressed { None } else { Some(len) }, &label)?;
        // the rest of the stream (tar padding) counts in the diff_id
        let drained = tar
            .drain(1 << 30)
            .map_err(|e| bad(src, format!("{label}: damaged data after the tar: {e}")))?;
        if !drained {
            return Err(ImageError::TooLarge {
                src: src.to_string(),
                layer: label,
                why: "more than 1 GiB of data after the end of the tar".to_string(),
            });
        }
        let diff = tar.finish();
        if !blob
            .drain(len)
            .map_err(|e| ImageError::io(format!("reading {label} of {src}"), e))?
        {
            return Err(bad(src, format!("{label} is longer than it says")));
        }
        let blob_hex = blob.finish();
        for (want, got, what) in [
            (&l.blob_hex, &blob_hex, "blob"),
            (&l.diff_hex, &diff, "uncompressed tar (diff_id)"),
        ] {
            if let Some(want) = want {
                if want != got {
                    return Err(ImageError::DigestMismatch {
                        src: src.to_string(),
                        what: format!("{label}: its {what}"),
                        expected: format!("sha256:{want}"),
                        actual: format!("sha256:{got}"),
                    });
                }
            }
        }
    }
    ex.finish(progress)?;
    Ok(ex)
}
