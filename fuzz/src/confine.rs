//! A scratch directory for the targets that unpack files, and a fence around it.
//!
//! The extractor targets run vmm's path-safe extractor on hostile tar streams, as root on a shared
//! machine: a bug that let an entry escape its target directory would write wherever the fuzzer
//! pointed it. So, when running as root, the first call moves the thread that runs the target into a
//! mount namespace of its own (nothing mounted there is seen outside) where every mount is read-only
//! except
//!
//! - the scratch directory, a private tmpfs mounted over `fuzz/target/scratch`,
//! - the `fuzz/` directory (libFuzzer writes new corpus entries and crash artifacts there),
//! - `/tmp` (libFuzzer's `-merge`, which `cargo fuzz cmin` uses, keeps its control file there).
//!
//! An escape that reaches a read-only mount fails with EROFS, which the targets report as a finding;
//! one beside the target directory is caught by the targets' sentinel check (`Arena`); one into
//! `fuzz/` or `/tmp` would go unnoticed, but could not harm the machine.
//! Without root (or where namespaces are not allowed) there is no fence, and none is needed as much: the
//! scratch directory is then a directory under the system's temporary directory.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// The fuzz crate's directory, where libFuzzer's corpora and artifacts live.
const FUZZ_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Size of the scratch tmpfs. The extractor keeps 256 MiB of a file system free and may use half of the
/// rest for an image: at 512 MiB an entry can still claim a hundred MiB or more (nothing is allocated until
/// written, and an input of a few KiB can only write so much).
const SCRATCH_SIZE: &str = "size=512m,mode=0700";

/// The process's scratch directory: empty at first, private to this process.
pub fn scratch_dir() -> &'static Path {
    SCRATCH.get_or_init(setup)
}

/// Whether an I/O error message says a read-only file system refused a write: outside the scratch
/// directory and the fuzz directory, that is what an escaping write meets.
pub fn is_erofs(message: &str) -> bool {
    message.contains("Read-only file system") || message.contains("os error 30")
}

fn setup() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let dir = Path::new(FUZZ_DIR).join("target").join("scratch");
        fs::create_dir_all(&dir).expect("create fuzz/target/scratch");
        match fence(&dir) {
            Ok(()) => return dir,
            Err(e) => eprintln!(
                "vmm-fuzz: WARNING: cannot fence the extractor in ({e}); running without a \
                 read-only view of the machine"
            ),
        }
    }
    let dir = std::env::temp_dir().join(format!("vmm-fuzz-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a path")
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let source = source.map(|s| CString::new(s).expect("no NUL"));
    let fstype = fstype.map(|s| CString::new(s).expect("no NUL"));
    let data = data.map(|s| CString::new(s).expect("no NUL"));
    let target = cstr(target);
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unescapes a mountinfo path (`\040` for a space, and so on).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn fence(scratch: &Path) -> std::io::Result<()> {
    // SAFETY: unshare has no memory-safety preconditions. The new namespace is this thread's alone (it
    // gets its own copy of the file system attributes it shared with the others), and this is the
    // thread that runs the target; libFuzzer's other thread only watches the process's memory use.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Nothing mounted or changed from here on reaches the machine's own mount namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let tmp = std::env::temp_dir();
    let writable: Vec<PathBuf> = vec![PathBuf::from(FUZZ_DIR), tmp.clone()];
    // Bind mounts of their own keep the writable directories writable when their file systems'
    // mounts become read-only below.
    for dir in &writable {
        mount(
            Some(&dir.to_string_lossy()),
            dir,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
    }
    mount(
        Some("vmm-fuzz"),
        scratch,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(SCRATCH_SIZE),
    )?;
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut root_done = false;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(point), Some(options)) = (fields.get(4), fields.get(5)) else {
            continue;
        };
        let point = unescape(point);
        if point.starts_with(scratch) || writable.iter().any(|w| point.starts_with(w)) {
            continue;
        }
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        for (name, flag) in [
            ("nosuid", libc::MS_NOSUID),
            ("nodev", libc::MS_NODEV),
            ("noexec", libc::MS_NOEXEC),
        ] {
            if options.split(',').any(|o| o == name) {
                flags |= flag;
            }
        }
        let result = mount(None, &point, None, flags, None);
        if point == Path::new("/") {
            result?;
            root_done = true;
        }
    }
    if !root_done {
        return Err(std::io::Error::other("/ is not in /proc/self/mountinfo"));
    }
    // The working directory still refers to the file system as it was before the bind mounts, now
    // read-only: look it up again, or libFuzzer's relative corpus and artifact paths (which `fuzz/run.sh`
    // uses) would fail to be written, silently for new corpus entries.
    std::env::set_current_dir(std::env::current_dir()?)?;
    Ok(())
}

/// Empties the scratch directory's `name` and returns its path (created).
pub fn fresh(name: &str) -> PathBuf {
    let dir = scratch_dir().join(name);
    if dir.symlink_metadata().is_ok() {
        remove(&dir);
    }
    fs::create_dir_all(&dir).expect("create a scratch subdirectory");
    dir
}

/// Removes a tree the extractor left, whatever modes it gave its directories.
pub fn remove(path: &Path) {
    if fs::remove_dir_all(path).is_ok() || path.symlink_metadata().is_err() {
        return;
    }
    // Not root: directories without write or search permission for us. Open them up and retry.
    fn open_up(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(md) = p.symlink_metadata() {
            if md.is_dir() {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
                if let Ok(rd) = fs::read_dir(p) {
                    for e in rd.flatten() {
                        open_up(&e.path());
                    }
                }
            }
        }
    }
    open_up(path);
    fs::remove_dir_all(path).expect("remove a scratch tree");
}
