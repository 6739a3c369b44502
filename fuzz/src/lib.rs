//! What the fuzz targets share: a split virtqueue as a guest driver lays it out, and a scratch
//! directory for the targets that write files, inside a mount namespace where the rest of the machine
//! is read-only.

pub mod confine;
pub mod ring;

use vm_memory::GuestAddress;

/// The guest memory vmm's devices work on.
pub type GuestMemory = vmm::devices::virtio::GuestMemory;

/// Guest memory made of `ranges` (start, length): several regions, so that buffers can straddle a
/// region boundary or fall into a hole.
pub fn guest_memory(ranges: &[(u64, usize)]) -> GuestMemory {
    let ranges: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len))
        .collect();
    GuestMemory::from_ranges(&ranges).expect("the harness's memory layout is valid")
}

/// Reads bytes off the front of a fuzz input; past its end every read gives zeros.
pub struct Bytes<'a>(pub &'a [u8]);

impl<'a> Bytes<'a> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
}

/// Where an extractor target unpacks, and what it checks after: `root` is the target directory and
/// `outside` a sentinel directory beside it that must stay empty, whatever the input.
pub struct Arena {
    pub run: std::path::PathBuf,
    pub root: std::path::PathBuf,
    pub outside: std::path::PathBuf,
    owner: (u32, u32),
}

/// The sentinel's modification time, which no entry may change.
const SENTINEL_MTIME: i64 = 1_000_000_000;

impl Arena {
    /// A fresh arena in the scratch directory.
    pub fn new() -> Arena {
        let run = confine::fresh("run");
        let root = run.join("root");
        let outside = run.join("outside");
        std::fs::create_dir(&root).expect("create the arena's root");
        std::fs::create_dir(&outside).expect("create the arena's sentinel");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755))
            .expect("set the sentinel's mode");
        let time = std::fs::FileTimes::new().set_modified(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(SENTINEL_MTIME as u64),
        );
        std::fs::File::open(&outside)
            .and_then(|f| f.set_times(time))
            .expect("set the sentinel's time");
        let md = std::fs::metadata(&outside).expect("the sentinel is there");
        Arena {
            run,
            root,
            outside,
            owner: (md.uid(), md.gid()),
        }
    }

    /// Panics if anything was written beside the root, or if `error` shows that a write was tried on a
    /// read-only mount (everything but the scratch directory, when fenced in).
    pub fn check(&self, error: Option<&str>) {
        if let Some(message) = error {
            assert!(
                !confine::is_erofs(message),
                "a write outside the target directory was attempted: {message}"
            );
        }
        let beside: Vec<_> = std::fs::read_dir(&self.run)
            .expect("read the arena")
            .map(|e| e.expect("read the arena").file_name())
            .filter(|n| n != "root" && n != "outside")
            .collect();
        assert!(beside.is_empty(), "written beside the target: {beside:?}");
        let inside: Vec<_> = std::fs::read_dir(&self.outside)
            .expect("read the sentinel")
            .map(|e| e.expect("read the sentinel").file_name())
            .collect();
        assert!(inside.is_empty(), "written outside the target: {inside:?}");
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::symlink_metadata(&self.outside).expect("the sentinel is there");
        assert!(md.is_dir(), "the sentinel was replaced");
        assert_eq!(md.mode() & 0o7777, 0o755, "the sentinel's mode changed");
        assert_eq!(md.mtime(), SENTINEL_MTIME, "the sentinel's time changed");
        assert_eq!(
            (md.uid(), md.gid()),
            self.owner,
            "the sentinel's owner changed"
        );
    }
}

impl Default for Arena {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `VMM_FUZZ_VERBOSE` is set: the targets then print what each input came to (to check that
/// seeds reach as deep as meant: `VMM_FUZZ_VERBOSE=1 cargo fuzz run TARGET corpus/TARGET/seed-*`).
pub fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("VMM_FUZZ_VERBOSE").is_some())
}
