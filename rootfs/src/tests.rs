//! Tests: images built here with the tar crate (OCI layouts, docker save tarballs, plain tarballs and
//! directories, hostile tars), unpacked into directories and made into ext4 images checked with
//! debugfs.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::write::GzEncoder;
use serde_json::json;
use tar::{EntryType, Header};

use super::util::sha256_hex;
use super::*;

// ---------------------------------------------------------------------------------------------------
// helpers

static N: AtomicU64 = AtomicU64::new(0);

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "vmm-image-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = remove_tree(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = remove_tree(&self.0);
    }
}

const MTIME: u64 = 1_700_000_000;

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Builds a tar in memory.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn dir(&mut self, p: &str) -> &mut Self {
        self.0
            .append_data(
                &mut header(EntryType::Directory, 0o755, 0),
                p,
                std::io::empty(),
            )
            .unwrap();
        self
    }
    fn file(&mut self, p: &str, data: &[u8], mode: u32) -> &mut Self {
        self.file_owned(p, data, mode, 0, 0)
    }
    fn file_owned(&mut self, p: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.0.append_data(&mut h, p, data).unwrap();
        self
    }
    fn symlink(&mut self, p: &str, target: &str) -> &mut Self {
        self.0
            .append_link(&mut header(EntryType::Symlink, 0o777, 0), p, target)
            .unwrap();
        self
    }
    fn hardlink(&mut self, p: &str, target: &str) -> &mut Self {
        self.0
            .append_link(&mut header(EntryType::Link, 0o644, 0), p, target)
            .unwrap();
        self
    }
    fn fifo(&mut self, p: &str) -> &mut Self {
        self.0
            .append_data(&mut header(EntryType::Fifo, 0o644, 0), p, std::io::empty())
            .unwrap();
        self
    }
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }
    /// An entry written without the tar crate's path checks; `size` is what the header claims.
    fn raw(
        &mut self,
        name: &[u8],
        kind: EntryType,
        link: &[u8],
        size: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = header(kind, 0o644, size);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname = [0; 100];
        gnu.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        // append writes the header, then copies `data` and pads it (without checking it against size)
        self.0.append(&h, data).unwrap();
        self
    }
    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&hex), data).unwrap();
    hex
}

fn config_json(diff_ids: &[String], arch: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "FOO=bar"],
            "WorkingDir": "/work",
            "User": "1000:1000",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| format!("sha256:{d}")).collect::<Vec<_>>()},
    }))
    .unwrap()
}

fn expected_config() -> ImageConfig {
    ImageConfig {
        env: vec!["PATH=/usr/bin:/bin".into(), "FOO=bar".into()],
        working_dir: Some("/work".into()),
        user: Some("1000:1000".into()),
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        cmd: vec!["echo hi".into()],
    }
}

/// The two layers of the test image (uncompressed tars).
fn test_layers() -> (Vec<u8>, Vec<u8>) {
    let mut l1 = Tar::new();
    l1.dir("etc")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        .file("etc/old.conf", b"old", 0o644)
        .dir("opt")
        .dir("opt/app")
        .file("opt/app/lower.txt", b"lower", 0o644)
        .dir("opt/app/sub")
        .file("opt/app/sub/deep", b"deep", 0o644)
        .dir("bin")
        .file("bin/busybox", b"BUSYBOX", 0o755)
        .symlink("bin/sh", "busybox")
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/su", b"SU", 0o4755)
        .dir("home")
        .dir("home/user")
        .file_owned("home/user/file", b"mine", 0o600, 1000, 1000)
        .dir("dev")
        .fifo("dev/fifo")
        .pax(&[("SCHILY.xattr.user.test", b"hello")])
        .file("etc/xattr-file", b"x", 0o644)
        .dir("var")
        .file("var/lower", b"lower", 0o644);
    let mut l2 = Tar::new();
    l2.file("etc/.wh.old.conf", b"", 0o644)
        .file("opt/app/.wh..wh..opq", b"", 0o644)
        .file("opt/app/upper.txt", b"upper", 0o644)
        .hardlink("bin/busybox-link", "bin/busybox")
        .file("etc/passwd", PASSWD2, 0o644)
        // an opaque marker after this layer's own entry in the directory: the entry stays
        .file("var/new", b"new", 0o644)
        .file("var/.wh..wh..opq", b"", 0o644)
        .dir("work");
    (l1.finish(), l2.finish())
}

const PASSWD2: &[u8] = b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n";

/// An OCI layout of the test image: layer 1 uncompressed, layer 2 gzip; with `nested`, index.json
/// points at an index of an arm64 and an amd64 image. Returns the amd64 manifest's digest.
fn write_oci(layout: &Path, nested: bool) -> String {
    let (l1, l2) = test_layers();
    let diff_ids = [sha256_hex(&l1), sha256_hex(&l2)];
    let l2gz = gzip(&l2);
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let manifest_for = |arch: &str| {
        let config = config_json(&diff_ids, arch);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{}", write_blob(layout, &config)), "size": config.len()},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                 "digest": format!("sha256:{}", write_blob(layout, &l1)), "size": l1.len()},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                 "digest": format!("sha256:{}", write_blob(layout, &l2gz)), "size": l2gz.len()},
            ],
        }))
        .unwrap();
        (write_blob(layout, &manifest), manifest.len())
    };
    let (amd64, amd64_len) = manifest_for("amd64");
    let desc = |hex: &str, len: usize, arch: &str| {
        json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{hex}"),
               "size": len, "platform": {"os": "linux", "architecture": arch}})
    };
    let index = if nested {
        let (arm64, arm64_len) = manifest_for("arm64");
        let inner = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [desc(&arm64, arm64_len, "arm64"), desc(&amd64, amd64_len, "amd64")],
        }))
        .unwrap();
        let inner_hex = write_blob(layout, &inner);
        json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": format!("sha256:{inner_hex}"),
             "size": inner.len()}]})
    } else {
        json!({"schemaVersion": 2, "manifests": [desc(&amd64, amd64_len, "amd64")]})
    };
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    amd64
}

/// A `docker save` tarball of the test image: the old format (`<id>/layer.tar`, one of them reached
/// through a symbolic link, as docker does for duplicate layers) or the newer one (`blobs/sha256`).
/// Returns the config's sha256.
fn docker_save(new_format: bool) -> (Vec<u8>, String) {
    let (l1, l2) = test_layers();
    let diff_ids = [sha256_hex(&l1), sha256_hex(&l2)];
    let config = config_json(&diff_ids, "amd64");
    let config_hex = sha256_hex(&config);
    let mut t = Tar::new();
    let (config_name, layers) = if new_format {
        t.dir("blobs").dir("blobs/sha256");
        t.file(&format!("blobs/sha256/{}", diff_ids[0]), &l1, 0o644);
        t.file(&format!("blobs/sha256/{}", diff_ids[1]), &l2, 0o644);
        t.file(&format!("blobs/sha256/{config_hex}"), &config, 0o644);
        (
            format!("blobs/sha256/{config_hex}"),
            vec![
                format!("blobs/sha256/{}", diff_ids[0]),
                format!("blobs/sha256/{}", diff_ids[1]),
            ],
        )
    } else {
        let (id1, id1b, id2) = ("1".repeat(64), "3".repeat(64), "2".repeat(64));
        t.dir(&id1).file(&format!("{id1}/layer.tar"), &l1, 0o644);
        t.dir(&id1b)
            .symlink(&format!("{id1b}/layer.tar"), &format!("../{id1}/layer.tar"));
        t.dir(&id2).file(&format!("{id2}/layer.tar"), &l2, 0o644);
        t.file(&format!("{config_hex}.json"), &config, 0o644);
        (
            format!("{config_hex}.json"),
            vec![format!("{id1b}/layer.tar"), format!("{id2}/layer.tar")],
        )
    };
    let manifest = json!([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": layers}]);
    t.file(
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
        0o644,
    );
    t.file("repositories", b"{}", 0o644);
    (t.finish(), config_hex)
}

fn am_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn xattrs_supported() -> bool {
    let p = std::env::temp_dir().join(format!("vmm-image-test-xattr-{}", std::process::id()));
    let _ = fs::write(&p, b"");
    let ok = rustix::fs::lsetxattr(&p, "user.probe", b"1", rustix::fs::XattrFlags::empty()).is_ok();
    let _ = fs::remove_file(&p);
    ok
}

/// Checks the merged tree of the test image.
fn check_tree(root: &Path) {
    assert!(
        !root.join("etc/old.conf").exists(),
        "whiteout did not delete etc/old.conf"
    );
    assert!(!root.join("etc/.wh.old.conf").exists());
    assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), PASSWD2);
    let mut app: Vec<String> = fs::read_dir(root.join("opt/app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    app.sort();
    assert_eq!(app, ["upper.txt"], "opaque directory kept lower entries");
    let sh = fs::symlink_metadata(root.join("bin/sh")).unwrap();
    assert!(sh.file_type().is_symlink());
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let (a, b) = (
        fs::metadata(root.join("bin/busybox")).unwrap(),
        fs::metadata(root.join("bin/busybox-link")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard link");
    assert_eq!(a.mode() & 0o7777, 0o755);
    assert_eq!(
        fs::metadata(root.join("usr/bin/su")).unwrap().mode() & 0o7777,
        0o4755,
        "setuid"
    );
    let owned = fs::metadata(root.join("home/user/file")).unwrap();
    assert_eq!(owned.mode() & 0o7777, 0o600);
    if am_root() {
        assert_eq!((owned.uid(), owned.gid()), (1000, 1000));
    }
    assert_eq!(owned.mtime() as u64, MTIME);
    assert_eq!(
        fs::metadata(root.join("etc")).unwrap().mtime() as u64,
        MTIME,
        "directory mtime"
    );
    assert!(!root.join("dev/fifo").exists(), "FIFO was not skipped");
    let var: Vec<_> = fs::read_dir(root.join("var"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        var,
        ["new"],
        "opaque directory: this layer's entries stay, lower ones go"
    );
    assert!(root.join("work").is_dir());
    // extended attributes: where the file system takes user.* ones
    if xattrs_supported() {
        let mut buf = [0u8; 16];
        let n = rustix::fs::lgetxattr(root.join("etc/xattr-file"), "user.test", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
    }
}

fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(img)
        .output()
        .expect("debugfs (e2fsprogs) is needed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks the ext4 image of the test image.
fn check_ext4(img: &Path) {
    let etc = debugfs(img, "ls /etc");
    assert!(etc.contains("passwd") && !etc.contains("old.conf"), "{etc}");
    assert_eq!(debugfs(img, "cat /etc/passwd").as_bytes(), PASSWD2);
    let app = debugfs(img, "ls /opt/app");
    assert!(
        app.contains("upper.txt") && !app.contains("lower.txt") && !app.contains("sub"),
        "{app}"
    );
    let su = debugfs(img, "stat /usr/bin/su");
    assert!(su.contains("Mode:  04755"), "{su}");
    let sh = debugfs(img, "stat /bin/sh");
    assert!(
        sh.contains("Type: symlink") && sh.contains("\"busybox\""),
        "{sh}"
    );
    let bb = debugfs(img, "stat /bin/busybox");
    assert!(bb.contains("Links: 2"), "{bb}");
    let file = debugfs(img, "stat /home/user/file");
    if am_root() {
        assert!(
            file.contains("User:  1000") && file.contains("Group:  1000"),
            "{file}"
        );
    }
    // extended attributes: where the host file system took them in the staging tree
    if xattrs_supported() {
        let ea = debugfs(img, "ea_list /etc/xattr-file");
        assert!(ea.contains("user.test") && ea.contains("hello"), "{ea}");
    }
    let root = debugfs(img, "stat /");
    assert!(
        root.contains("User:     0") || root.contains("User:  0"),
        "{root}"
    );
}

/// A progress sink that keeps the messages.
fn collect(msgs: &mut Vec<String>) -> impl FnMut(&str) + '_ {
    |m: &str| msgs.push(m.to_string())
}

/// What is in the cache directory besides entries and the memo (nothing, after any import).
fn leftovers(store: &ImageStore) -> Vec<String> {
    fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Unpacks `src` into a new directory under `t` without making an ext4 image.
fn unpack_only(
    t: &TempDir,
    src: &Path,
    msgs: &mut Vec<String>,
) -> Result<(PathBuf, source::Plan), ImageError> {
    let scratch = t.join(&format!("scratch-{}", N.fetch_add(1, Ordering::Relaxed)));
    fs::create_dir_all(&scratch).unwrap();
    let md = fs::metadata(src).unwrap();
    let plan = source::prepare(src, &md, &scratch, None, &mut collect(msgs))?;
    let root = scratch.join("root");
    fs::create_dir(&root).unwrap();
    source::unpack(
        &plan,
        &root,
        &src.display().to_string(),
        layer::MAX_TOTAL_BYTES,
        &mut collect(msgs),
    )?;
    Ok((root, plan))
}

// ---------------------------------------------------------------------------------------------------
// well-formed images

#[test]
fn oci_layout_unpacks_to_the_merged_tree() {
    let t = TempDir::new("oci-tree");
    let layout = t.join("layout");
    let manifest = write_oci(&layout, true);
    let mut msgs = Vec::new();
    let (root, plan) = unpack_only(&t, &layout, &mut msgs).unwrap();
    assert_eq!(plan.kind, Kind::Oci);
    assert_eq!(
        plan.digest_hex, manifest,
        "the amd64 manifest of the nested index"
    );
    assert_eq!(plan.config, expected_config());
    check_tree(&root);
    assert!(msgs.iter().any(|m| m.contains("layer 2/2")), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("skipped 1 device nodes and FIFOs")),
        "{msgs:?}"
    );
    let chown_notes = msgs
        .iter()
        .filter(|m| m.contains("not running as root"))
        .count();
    assert_eq!(chown_notes, usize::from(!am_root()), "{msgs:?}");
}

#[test]
fn oci_layout_imports_to_ext4_and_is_cached() {
    let t = TempDir::new("oci-import");
    let layout = t.join("layout");
    let manifest = write_oci(&layout, false);
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let mut msgs = Vec::new();
    let image = store.import(&layout, &mut collect(&mut msgs)).unwrap();
    assert_eq!(image.digest, format!("sha256:{manifest}"));
    assert_eq!(image.config, expected_config());
    assert_eq!(
        image.source,
        fs::canonicalize(&layout).unwrap().to_string_lossy()
    );
    assert_eq!(
        image.rootfs,
        store
            .dir()
            .join(format!("oci-{manifest}"))
            .join("rootfs.ext4")
    );
    assert_eq!(image.size_bytes, fs::metadata(&image.rootfs).unwrap().len());
    assert!(
        msgs.iter()
            .any(|m| m.contains("importing layout: layer 1/2")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.contains("making ext4 image")),
        "{msgs:?}"
    );
    check_ext4(&image.rootfs);
    let on_disk: ImageConfig = serde_json::from_slice(
        &fs::read(
            store
                .dir()
                .join(format!("oci-{manifest}"))
                .join("config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(on_disk, expected_config());

    // the second time: no unpacking, the same file
    let mtime = fs::metadata(&image.rootfs).unwrap().modified().unwrap();
    let mut again_msgs = Vec::new();
    let again = store
        .import(&layout, &mut collect(&mut again_msgs))
        .unwrap();
    assert_eq!(again, image);
    assert!(again_msgs.is_empty(), "{again_msgs:?}");
    assert_eq!(
        fs::metadata(&image.rootfs).unwrap().modified().unwrap(),
        mtime
    );
    // through another path to it: the same image, that source recorded too
    std::os::unix::fs::symlink(&layout, t.join("alias")).unwrap();
    let copy = t.join("copy");
    fs::create_dir(&copy).unwrap();
    for e in walkdir(&layout) {
        let rel = e.strip_prefix(&layout).unwrap();
        if e.is_dir() {
            fs::create_dir_all(copy.join(rel)).unwrap();
        } else {
            fs::copy(&e, copy.join(rel)).unwrap();
        }
    }
    let copied = store.import(&copy, &mut |_| {}).unwrap();
    assert_eq!(copied.digest, image.digest);
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));

    // remove by source (the second one), then it is gone
    let removed = store.remove(copy.to_str().unwrap()).unwrap();
    assert_eq!(removed.digest, image.digest);
    assert!(store.list().unwrap().is_empty());
    assert!(!image.rootfs.exists());
    assert!(matches!(
        store.remove(&manifest[..12]),
        Err(ImageError::NotInCache { .. })
    ));
}

fn walkdir(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    tree::walk(root, &mut |abs, _, _| {
        out.push(abs.to_path_buf());
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn docker_save_tarballs_unpack_to_the_merged_tree() {
    let t = TempDir::new("docker-save");
    for new_format in [false, true] {
        let (tarball, config_hex) = docker_save(new_format);
        let path = t.join(&format!("save-{new_format}.tar"));
        fs::write(&path, &tarball).unwrap();
        let mut msgs = Vec::new();
        let (root, plan) = unpack_only(&t, &path, &mut msgs).unwrap();
        assert_eq!(plan.kind, Kind::DockerSave);
        assert_eq!(plan.digest_hex, config_hex);
        assert_eq!(plan.config, expected_config());
        check_tree(&root);
    }
}

#[test]
fn docker_save_imports_and_gzip_of_it_is_the_same_image() {
    let t = TempDir::new("docker-save-import");
    let (tarball, config_hex) = docker_save(false);
    let path = t.join("save.tar");
    fs::write(&path, &tarball).unwrap();
    let gz = t.join("save.tar.gz");
    fs::write(&gz, gzip(&tarball)).unwrap();
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let image = store.import(&path, &mut |_| {}).unwrap();
    assert_eq!(image.digest, format!("sha256:{config_hex}"));
    assert_eq!(image.config, expected_config());
    check_ext4(&image.rootfs);
    // gzip-compressed: decompressed to find the config, then a cache hit
    let mut msgs = Vec::new();
    let from_gz = store.import(&gz, &mut collect(&mut msgs)).unwrap();
    assert_eq!(from_gz.digest, image.digest);
    assert!(!msgs.iter().any(|m| m.contains("layer")), "{msgs:?}");
    // and the memo makes the next one instant: not even decompressed
    let mut msgs = Vec::new();
    store.import(&gz, &mut collect(&mut msgs)).unwrap();
    assert!(msgs.is_empty(), "{msgs:?}");
    assert!(leftovers(&store).is_empty());
    // remove by digest prefix with sha256:
    store
        .remove(&format!("sha256:{}", &config_hex[..10]))
        .unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn plain_tarball_and_directory_import() {
    let t = TempDir::new("plain");
    let mut tb = Tar::new();
    // GNU tar names PAX global headers with an absolute path: not an entry, nothing to refuse
    let global = b"17 comment=hello\n";
    tb.raw(
        b"/tmp/GlobalHead.1.1",
        EntryType::XGlobalHeader,
        b"",
        global.len() as u64,
        global,
    );
    tb.dir("bin")
        .file("bin/tool", b"TOOL", 0o755)
        .symlink("bin/t", "tool")
        .dir("etc")
        .file("etc/x", b"x", 0o644);
    let tarball = t.join("root.tar.gz");
    fs::write(&tarball, gzip(&tb.finish())).unwrap();
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let mut msgs = Vec::new();
    let image = store.import(&tarball, &mut collect(&mut msgs)).unwrap();
    assert_eq!(
        image.digest,
        format!("sha256:{}", sha256_hex(&fs::read(&tarball).unwrap()))
    );
    assert_eq!(image.config, ImageConfig::default());
    assert!(
        msgs.iter()
            .any(|m| m.contains("importing root.tar.gz: unpacking")),
        "{msgs:?}"
    );
    assert!(debugfs(&image.rootfs, "cat /bin/tool").contains("TOOL"));
    let mut msgs = Vec::new();
    assert_eq!(
        store.import(&tarball, &mut collect(&mut msgs)).unwrap(),
        image
    );
    assert!(msgs.is_empty(), "{msgs:?}");

    // a directory: imported as the root; changed, it is another image
    let dir = t.join("tree");
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::write(dir.join("usr/bin/prog"), b"PROG").unwrap();
    fs::set_permissions(dir.join("usr/bin/prog"), fs::Permissions::from_mode(0o4711)).unwrap();
    std::os::unix::fs::symlink("usr/bin", dir.join("bin")).unwrap();
    let d1 = store.import(&dir, &mut |_| {}).unwrap();
    assert!(debugfs(&d1.rootfs, "stat /usr/bin/prog").contains("Mode:  04711"));
    assert!(debugfs(&d1.rootfs, "stat /bin").contains("Type: symlink"));
    let mut msgs = Vec::new();
    assert_eq!(
        store.import(&dir, &mut collect(&mut msgs)).unwrap().digest,
        d1.digest
    );
    assert!(msgs.is_empty(), "{msgs:?}");
    fs::write(dir.join("usr/bin/prog"), b"PROG2").unwrap();
    let d2 = store.import(&dir, &mut |_| {}).unwrap();
    assert_ne!(d1.digest, d2.digest);
    assert!(debugfs(&d2.rootfs, "cat /usr/bin/prog").contains("PROG2"));
    assert_eq!(store.list().unwrap().len(), 3);
    // two images from one source: the source alone is ambiguous
    assert!(matches!(
        store.remove(dir.to_str().unwrap()),
        Err(ImageError::Ambiguous { count: 2, .. })
    ));
    store.remove(&d1.digest).unwrap();
    assert_eq!(
        store.remove(dir.to_str().unwrap()).unwrap().digest,
        d2.digest
    );
    assert_eq!(store.list().unwrap(), vec![image]);
}

#[test]
fn concurrent_imports_of_one_image_agree() {
    let t = TempDir::new("concurrent");
    let layout = t.join("layout");
    write_oci(&layout, false);
    let cache = t.join("cache");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| ImageStore::open(&cache).and_then(|st| st.import(&layout, &mut |_| {})))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = results[0].as_ref().unwrap();
    for r in &results {
        assert_eq!(r.as_ref().unwrap().digest, first.digest);
    }
    let store = ImageStore::open(&cache).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    check_ext4(&first.rootfs);
}

#[test]
fn interrupted_imports_are_cleaned_on_open_but_live_ones_are_not() {
    let t = TempDir::new("stale");
    let cache = t.join("cache");
    let store = ImageStore::open(&cache).unwrap();
    // an interrupted import: its directory, a half-built entry, and its lock file, unlocked
    fs::create_dir_all(cache.join(".tmp-1-dead-0/entry")).unwrap();
    fs::write(cache.join(".tmp-1-dead-0/entry/rootfs.ext4"), b"half").unwrap();
    fs::write(cache.join(".tmp-1-dead-0.lock"), b"").unwrap();
    // an interrupted removal
    fs::create_dir_all(cache.join(".tmp-rm-1-dead-0/x")).unwrap();
    // an import in progress
    let live = TmpDir::create(store.dir()).unwrap();
    ImageStore::open(&cache).unwrap();
    assert!(!cache.join(".tmp-1-dead-0").exists());
    assert!(!cache.join(".tmp-1-dead-0.lock").exists());
    assert!(!cache.join(".tmp-rm-1-dead-0").exists());
    assert!(live.path.exists() && live.lock_path.exists());
    assert!(store.list().unwrap().is_empty());
    drop(live);
    assert!(leftovers(&store).is_empty());
}

#[test]
fn zstd_layers_are_refused_clearly() {
    let t = TempDir::new("zstd");
    let path = t.join("root.tar.zst");
    fs::write(&path, [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]).unwrap();
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let err = store.import(&path, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");
    assert!(
        err.to_string().contains("zstd") && err.to_string().contains("gzip"),
        "{err}"
    );
    let err = store.import(&t.join("missing"), &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let text = t.join("text");
    fs::write(&text, b"hello").unwrap();
    let err = store.import(&text, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::BadImage { .. }), "{err}");
    let binary = t.join("binary");
    fs::write(&binary, vec![0x5au8; 4096]).unwrap();
    let err = store.import(&binary, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("not an OCI image layout"), "{err}");
    fs::write(&binary, gzip(&[0x5au8; 4096])).unwrap();
    let err = store.import(&binary, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("not an OCI image layout"), "{err}");
    assert!(leftovers(&store).is_empty() && store.list().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------------
// hostile images

/// Imports `layer` as a plain tarball (and, with `oci`, as a one-layer OCI layout), expecting the
/// refusal `check` accepts; then nothing is in the cache and nothing under `t/outside`.
fn refused(name: &str, layer: Vec<u8>, check: fn(&ImageError) -> bool) {
    let t = TempDir::new(name);
    let outside = t.join("outside");
    fs::create_dir(&outside).unwrap();
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let plain = t.join("layer.tar");
    fs::write(&plain, &layer).unwrap();
    let gz = t.join("layer.tar.gz");
    fs::write(&gz, gzip(&layer)).unwrap();
    // one-layer OCI layouts, the layer gzip-compressed and not
    let oci = |dir: &str, blob: &[u8]| {
        let layout = t.join(dir);
        fs::create_dir(&layout).unwrap();
        fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let config = config_json(&[sha256_hex(&layer)], "amd64");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "config": {"digest": format!("sha256:{}", write_blob(&layout, &config)), "size": config.len()},
            "layers": [{"digest": format!("sha256:{}", write_blob(&layout, blob)), "size": blob.len()}],
        }))
        .unwrap();
        let index = json!({"schemaVersion": 2, "manifests": [
            {"digest": format!("sha256:{}", write_blob(&layout, &manifest)), "size": manifest.len()}]});
        fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        layout
    };
    let layout_gz = oci("layout-gz", &gzip(&layer));
    let layout = oci("layout", &layer);
    for src in [&plain, &gz, &layout_gz, &layout] {
        let err = store.import(src, &mut |_| {}).unwrap_err();
        eprintln!("{name}: {err}");
        assert!(
            check(&err),
            "{name} from {}: unexpected error: {err}",
            src.display()
        );
        assert!(store.list().unwrap().is_empty());
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
        let written: Vec<_> = fs::read_dir(&outside).unwrap().collect();
        assert!(written.is_empty(), "{name}: written outside: {written:?}");
    }
}

fn unsafe_path(e: &ImageError) -> bool {
    matches!(e, ImageError::UnsafePath { .. })
}

fn too_large(e: &ImageError) -> bool {
    matches!(e, ImageError::TooLarge { .. })
}

#[test]
fn dotdot_paths_are_refused() {
    let mut t = Tar::new();
    t.dir("ok").raw(
        b"ok/../../outside/escape",
        EntryType::Regular,
        b"",
        4,
        b"evil",
    );
    refused("dotdot", t.finish(), unsafe_path);
}

#[test]
fn absolute_paths_are_refused() {
    let mut t = Tar::new();
    t.raw(
        b"/tmp/vmm-image-test-absolute-escape",
        EntryType::Regular,
        b"",
        4,
        b"evil",
    );
    refused("absolute", t.finish(), unsafe_path);
    assert!(!Path::new("/tmp/vmm-image-test-absolute-escape").exists());
}

#[test]
fn writes_through_symlinks_are_refused() {
    // the link's target is the test's `outside` directory, found from the test's temp dir name
    for (name, target) in [
        ("symlink-abs", None),
        ("symlink-rel", Some("../../../../../../../../../../")),
    ] {
        let t = TempDir::new(name);
        let outside = t.join("outside");
        fs::create_dir(&outside).unwrap();
        let target = target
            .map(str::to_string)
            .unwrap_or_else(|| outside.display().to_string());
        let mut tar = Tar::new();
        tar.symlink("evil", &target);
        let through = if target.starts_with('/') {
            "evil/pwned".to_string()
        } else {
            format!(
                "evil/{}/pwned",
                outside.strip_prefix("/").unwrap().display()
            )
        };
        tar.raw(through.as_bytes(), EntryType::Regular, b"", 4, b"evil");
        let layer = tar.finish();
        let store = ImageStore::open(&t.join("cache")).unwrap();
        let plain = t.join("layer.tar");
        fs::write(&plain, &layer).unwrap();
        let err = store.import(&plain, &mut |_| {}).unwrap_err();
        assert!(unsafe_path(&err), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!outside.join("pwned").exists());
        assert!(store.list().unwrap().is_empty() && leftovers(&store).is_empty());
    }
}

#[test]
fn a_file_replaces_a_symlink_without_following_it() {
    let t = TempDir::new("replace-link");
    let outside = t.join("outside");
    fs::create_dir(&outside).unwrap();
    let mut tar = Tar::new();
    tar.symlink("victim", &outside.join("target").display().to_string())
        .file("victim", b"inside", 0o644);
    tar.symlink("victim-dir", &outside.display().to_string())
        .dir("victim-dir")
        .file("victim-dir/f", b"in", 0o644);
    let path = t.join("layer.tar");
    fs::write(&path, tar.finish()).unwrap();
    let mut msgs = Vec::new();
    let (root, _) = unpack_only(&t, &path, &mut msgs).unwrap();
    assert_eq!(fs::read(root.join("victim")).unwrap(), b"inside");
    assert!(fs::symlink_metadata(root.join("victim-dir"))
        .unwrap()
        .is_dir());
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "written outside"
    );
}

#[test]
fn hard_links_to_outside_are_refused() {
    let mut t = Tar::new();
    t.raw(b"hl", EntryType::Link, b"../../../../etc/passwd", 0, b"");
    refused("hardlink-dotdot", t.finish(), unsafe_path);
    let mut t = Tar::new();
    t.raw(b"hl", EntryType::Link, b"/etc/passwd", 0, b"");
    refused("hardlink-abs", t.finish(), unsafe_path);
    // to something that is not (yet) in the image: refused, not looked up on the host
    let mut t = Tar::new();
    t.raw(b"hl", EntryType::Link, b"etc/passwd", 0, b"");
    refused("hardlink-missing", t.finish(), |e| {
        matches!(e, ImageError::BadImage { .. })
    });
}

#[test]
fn absurd_sizes_are_refused() {
    // a header claiming 1 TiB with no data behind it
    let mut t = Tar::new();
    t.file("ok", b"ok", 0o644)
        .raw(b"huge", EntryType::Regular, b"", 1 << 40, b"");
    refused("absurd-size", t.finish(), too_large);
    // 8 MiB of PAX records before an entry (the tar crate would hold them in memory)
    let mut t = Tar::new();
    let big = vec![b'a'; 8 << 20];
    t.pax(&[("SCHILY.xattr.user.big", &big)])
        .file("f", b"f", 0o644);
    refused("pax-bomb", t.finish(), too_large);
}

#[test]
fn the_size_limit_holds() {
    let t = TempDir::new("limit");
    let mut tar = Tar::new();
    tar.file("a", &vec![1u8; 3 << 20], 0o644);
    let path = t.join("layer.tar.gz");
    fs::write(&path, gzip(&tar.finish())).unwrap();
    let mut store = ImageStore::open(&t.join("cache")).unwrap();
    store.max_total_bytes = 2 << 20;
    let err = store.import(&path, &mut |_| {}).unwrap_err();
    assert!(too_large(&err), "{err}");
    assert!(store.list().unwrap().is_empty() && leftovers(&store).is_empty());
}

#[test]
fn invalid_whiteouts_and_damaged_blobs_are_refused() {
    let mut t = Tar::new();
    t.raw(b"dir/.wh...", EntryType::Regular, b"", 0, b"");
    refused("whiteout-dotdot", t.finish(), unsafe_path);

    // an OCI blob whose content does not match its digest
    let t = TempDir::new("corrupt");
    let layout = t.join("layout");
    write_oci(&layout, false);
    let blobs = layout.join("blobs/sha256");
    let (l1, _) = test_layers();
    let victim = blobs.join(sha256_hex(&l1));
    let mut data = fs::read(&victim).unwrap();
    let i = data.len() / 2;
    data[i] ^= 1;
    fs::write(&victim, &data).unwrap();
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let err = store.import(&layout, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::DigestMismatch { .. } | ImageError::BadImage { .. }
        ),
        "{err}"
    );
    assert!(store.list().unwrap().is_empty() && leftovers(&store).is_empty());
}

#[test]
fn entry_paths_and_pax_times_parse() {
    use super::layer::{parse_pax_time, sanitize};
    assert_eq!(
        parse_pax_time(b"1700000000.5"),
        Some((1_700_000_000, 500_000_000))
    );
    assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
    assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
    assert_eq!(parse_pax_time(b"x"), None);
    assert_eq!(parse_pax_time(b"-9223372036854775808.5"), None);
    assert_eq!(sanitize(b"./a//b/").unwrap(), Path::new("a/b"));
    assert_eq!(sanitize(b"./").unwrap(), Path::new(""));
    assert!(sanitize(b"a/../b").is_err());
    assert!(sanitize(b"/a").is_err());
}

// ---------------------------------------------------------------------------------------------------
// measurement (not run by default):
//   VMM_IMAGE_BENCH_TREE=/usr/lib/x86_64-linux-gnu cargo test --release -p vmm image::tests::bench \
//     -- --ignored --nocapture

#[test]
#[ignore]
fn bench_import_100mb() {
    let tree = std::env::var("VMM_IMAGE_BENCH_TREE")
        .unwrap_or_else(|_| "/usr/lib/x86_64-linux-gnu".into());
    let want: u64 = std::env::var("VMM_IMAGE_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        << 20;
    let t = TempDir::new("bench");
    // ~100 MB of the tree's regular files, in two layers
    let mut layers = [Tar::new(), Tar::new()];
    let mut total = 0u64;
    let mut files = 0usize;
    for path in walkdir(Path::new(&tree)) {
        if total >= want {
            break;
        }
        let md = fs::symlink_metadata(&path).unwrap();
        // a realistic mix: many files, none of them huge
        if !md.file_type().is_file() || md.len() > 4 << 20 {
            continue;
        }
        let Ok(data) = fs::read(&path) else { continue };
        let rel = path.strip_prefix("/").unwrap().display().to_string();
        layers[files % 2].file(&rel, &data, md.mode() & 0o7777);
        total += data.len() as u64;
        files += 1;
    }
    let [a, b] = layers;
    let (l1, l2) = (a.finish(), b.finish());
    // plain tarball: both layers' files in one tar
    let mut all = tar::Builder::new(Vec::new());
    for l in [&l1, &l2] {
        let mut ar = tar::Archive::new(&l[..]);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            all.append(&h, &data[..]).unwrap();
        }
    }
    let tarball = t.join("tree.tar");
    fs::write(&tarball, all.into_inner().unwrap()).unwrap();
    // 2-layer OCI layout, gzip layers
    let layout = t.join("layout");
    fs::create_dir(&layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let config = config_json(&[sha256_hex(&l1), sha256_hex(&l2)], "amd64");
    let (g1, g2) = (gzip(&l1), gzip(&l2));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": {"digest": format!("sha256:{}", write_blob(&layout, &config)), "size": config.len()},
        "layers": [
            {"digest": format!("sha256:{}", write_blob(&layout, &g1)), "size": g1.len()},
            {"digest": format!("sha256:{}", write_blob(&layout, &g2)), "size": g2.len()},
        ],
    }))
    .unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{"digest": format!("sha256:{}", write_blob(&layout, &manifest)), "size": manifest.len()}]});
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    println!(
        "bench: {files} files, {} MiB of data; tarball {} MiB; OCI layers {} + {} MiB gzip",
        mib(total),
        mib(fs::metadata(&tarball).unwrap().len()),
        mib(g1.len() as u64),
        mib(g2.len() as u64)
    );
    let store = ImageStore::open(&t.join("cache")).unwrap();
    for src in [&tarball, &layout] {
        let start = std::time::Instant::now();
        let image = store
            .import(src, &mut |m| {
                println!("  {:.2} s: {m}", start.elapsed().as_secs_f64())
            })
            .unwrap();
        let first = start.elapsed();
        let start = std::time::Instant::now();
        store.import(src, &mut |m| println!("  {m}")).unwrap();
        let hit = start.elapsed();
        println!(
            "bench: {}: import {:.2} s, cache hit {:.1} ms, ext4 {} MiB",
            src.display(),
            first.as_secs_f64(),
            hit.as_secs_f64() * 1000.0,
            mib(image.size_bytes)
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// entries without data, and copy-out mode (the guest's stream into a host directory)

/// Applies `tar` with an extractor limited to `max_entries` and `space` bytes of budget.
fn apply_limited(
    root: &Path,
    copy_out: Option<&str>,
    tar: &[u8],
    max_entries: u64,
    space: u64,
) -> Result<(), ImageError> {
    let mut ex = match copy_out {
        Some(guest_path) => layer::Extractor::for_copy_out(root, guest_path, 1 << 40)?,
        None => layer::Extractor::new(root, "test", 1 << 40)?,
    };
    ex.limit(max_entries, space);
    ex.apply_layer(tar, None, "layer")?;
    ex.finish(&mut |_| {})
}

#[test]
fn entries_without_data_are_counted_and_charged() {
    let many = |prefix: &str, n: usize| {
        let mut t = Tar::new();
        t.dir(prefix);
        for i in 0..n {
            t.file(&format!("{prefix}/e{i}"), b"", 0o644);
        }
        t.finish()
    };
    for copy_out in [None, Some("/guest/out")] {
        let t = TempDir::new("entries");
        // within both limits
        apply_limited(&t.join(""), copy_out, &many("out", 99), 100, 1 << 20).unwrap();
        // one entry too many
        let t = TempDir::new("entries");
        let err =
            apply_limited(&t.join(""), copy_out, &many("out", 100), 100, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("more than 100 entries"), "{err}");
        // empty files still cost space: 200 of them do not fit in 100 KiB
        let t = TempDir::new("entries");
        let err =
            apply_limited(&t.join(""), copy_out, &many("out", 200), 1000, 100 << 10).unwrap_err();
        assert!(matches!(err, ImageError::NoSpace { .. }), "{err}");
    }
}

#[test]
fn copy_out_takes_only_entries_under_the_name_asked_for() {
    let t = TempDir::new("confined");
    let host = t.join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("Makefile"), b"all: safe\n").unwrap();
    fs::create_dir_all(host.join(".git/hooks")).unwrap();
    let outside_names: [&[u8]; 4] = [
        b"Makefile",
        b".git/hooks/pre-commit",
        b"./Makefile",
        b"outer/x",
    ];
    for name in outside_names {
        let mut tar = Tar::new();
        tar.dir("out")
            .raw(name, EntryType::Regular, b"", 5, b"evil\n");
        let err =
            apply_limited(&host, Some("/guest/out"), &tar.finish(), 100, 1 << 30).unwrap_err();
        assert!(
            unsafe_path(&err),
            "{}: {err}",
            String::from_utf8_lossy(name)
        );
    }
    // a hard link under the name to a host file beside it
    let mut tar = Tar::new();
    tar.dir("out").hardlink("out/mk", "Makefile");
    let err = apply_limited(&host, Some("/guest/out"), &tar.finish(), 100, 1 << 30).unwrap_err();
    assert!(unsafe_path(&err), "{err}");
    assert_eq!(fs::read(host.join("Makefile")).unwrap(), b"all: safe\n");
    assert!(!host.join(".git/hooks/pre-commit").exists());
    assert!(!host.join("out/mk").exists());
    // what is under the name lands, links inside it included
    let mut tar = Tar::new();
    tar.dir("out")
        .file("out/a", b"a", 0o644)
        .hardlink("out/b", "out/a");
    apply_limited(&host, Some("/guest/out"), &tar.finish(), 100, 1 << 30).unwrap();
    assert_eq!(fs::read(host.join("out/b")).unwrap(), b"a");
    // a single file asked for by name
    let mut tar = Tar::new();
    tar.file("log.txt", b"log", 0o644);
    apply_limited(&host, Some("/var/log.txt"), &tar.finish(), 100, 1 << 30).unwrap();
    assert_eq!(fs::read(host.join("log.txt")).unwrap(), b"log");
}

#[test]
fn copy_out_drops_setuid_setgid_and_all_but_user_xattrs() {
    let t = TempDir::new("suid");
    let host = t.join("host");
    fs::create_dir(&host).unwrap();
    let mut tar = Tar::new();
    tar.dir("out")
        .pax(&[
            ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
            ("SCHILY.xattr.trusted.evil", b"1"),
            ("SCHILY.xattr.user.note", b"kept"),
        ])
        .file("out/suid", b"#!/bin/sh\n", 0o6755);
    tar.0
        .append_data(
            &mut header(EntryType::Directory, 0o7777, 0),
            "out/sticky",
            std::io::empty(),
        )
        .unwrap();
    apply_limited(&host, Some("/guest/out"), &tar.finish(), 100, 1 << 30).unwrap();
    let mode = |p: &str| fs::symlink_metadata(host.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("out/suid"), 0o755);
    assert_eq!(mode("out/sticky"), 0o1777);
    let file = host.join("out/suid");
    for name in ["security.capability", "trusted.evil"] {
        assert!(
            rustix::fs::lgetxattr(&file, name, &mut [0u8; 64]).is_err(),
            "{name} reached the host"
        );
    }
    if xattrs_supported() {
        let mut buf = [0u8; 16];
        let n = rustix::fs::lgetxattr(&file, "user.note", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"kept");
    }
    // an image keeps its setuid bits (they are the guest's, in an ext4 for the guest)
    let img = t.join("img");
    fs::create_dir(&img).unwrap();
    let mut tar = Tar::new();
    tar.file("suid", b"x", 0o4755);
    apply_limited(&img, None, &tar.finish(), 100, 1 << 30).unwrap();
    assert_eq!(
        fs::symlink_metadata(img.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );
}

// ---------------------------------------------------------------------------------------------------
// cache poisoning

/// A `docker save` tarball whose manifest names `config` and `layers` (name, content).
fn docker_save_of(config: &[u8], layers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut t = Tar::new();
    t.file("config.json", config, 0o644);
    for (name, data) in layers {
        t.file(name, data, 0o644);
    }
    let names: Vec<&str> = layers.iter().map(|(n, _)| *n).collect();
    let manifest = json!([{"Config": "config.json", "Layers": names}]);
    t.file(
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
        0o644,
    );
    t.finish()
}

#[test]
fn a_layer_without_its_diff_id_is_refused() {
    let t = TempDir::new("diff-ids");
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let (l1, l2) = test_layers();
    let mut evil = Tar::new();
    evil.file("bin/sh", b"#!evil", 0o755);
    let evil = evil.finish();
    // a genuine config (two diff_ids) with one layer of the attacker's, two with one unchecked, and
    // one diff_id too many
    let genuine = config_json(&[sha256_hex(&l1), sha256_hex(&l2)], "amd64");
    let one = config_json(&[sha256_hex(&l1)], "amd64");
    type Layers<'a> = Vec<(&'a str, &'a [u8])>;
    let cases: [(&[u8], Layers); 3] = [
        (&genuine, vec![("evil.tar", &evil)]),
        (&one, vec![("l1.tar", &l1), ("evil.tar", &evil)]),
        (&genuine, vec![("l1.tar", &l1)]),
    ];
    for (i, (config, layers)) in cases.into_iter().enumerate() {
        let path = t.join(&format!("save-{i}.tar"));
        fs::write(&path, docker_save_of(config, &layers)).unwrap();
        let err = store.import(&path, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("diff_ids for"), "case {i}: {err}");
    }
    assert!(store.list().unwrap().is_empty() && leftovers(&store).is_empty());
}

#[test]
fn a_file_of_one_kind_cannot_take_the_cache_entry_of_another() {
    let t = TempDir::new("poison");
    let store = ImageStore::open(&t.join("cache")).unwrap();
    let layout = t.join("layout");
    let manifest_hex = write_oci(&layout, false);
    let manifest = fs::read(layout.join("blobs/sha256").join(&manifest_hex)).unwrap();
    // a docker-save whose "config" is the genuine image's manifest: same sha256, no layers
    let hostile = t.join("hostile.tar");
    fs::write(&hostile, docker_save_of(&manifest, &[])).unwrap();
    let poisoned = store.import(&hostile, &mut |_| {}).unwrap();
    assert_eq!(poisoned.digest, format!("sha256:{manifest_hex}"));
    // the genuine image is imported on its own, not served from the hostile entry
    let image = store.import(&layout, &mut |_| {}).unwrap();
    assert_eq!(image.digest, poisoned.digest);
    assert_ne!(image.rootfs, poisoned.rootfs);
    assert_eq!(image.config, expected_config());
    check_ext4(&image.rootfs);
    assert_eq!(store.list().unwrap().len(), 2);
}
