//! The guest's file systems: /proc, /sys and /dev in the initramfs, then the root image read-only
//! under a private overlay, the switch into it, and the fresh /tmp, /run, /dev/pts and /dev/shm.
//!
//! The layout while setting up (all in the initramfs, which only has to carry `/init`: every
//! directory is created here when missing):
//!
//! ```text
//! /mnt/lower      /dev/vda, ext4, read-only          (the image; never written)
//! /mnt/rw         tmpfs, size-capped, or the scratch disk (this VM's private writes)
//!   upper/ work/
//! /mnt/root       overlay lower + upper              (becomes /)
//! ```
//!
//! The initramfs cannot be pivot_root'ed, so the switch is the classic switch_root: move /proc, /sys
//! and /dev into the new root, move the new root onto `/`, chroot into it. /mnt/lower and /mnt/rw stay
//! mounted underneath, out of the command's sight.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cmdline::Options;
use crate::sys::{self, describe};

/// The root image: the first virtio-blk disk.
pub const ROOT_DISK: &str = "/dev/vda";
/// How long to wait for the root disk's device node before giving up. The virtio-blk probe normally
/// finishes before init starts; this only covers a late probe.
const ROOT_DISK_WAIT: Duration = Duration::from_millis(200);

const LOWER: &str = "/mnt/lower";
const RW: &str = "/mnt/rw";
const UPPER: &str = "/mnt/rw/upper";
const WORK: &str = "/mnt/rw/work";
const NEW_ROOT: &str = "/mnt/root";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("the disk {0} does not exist: no image attached, or the kernel lacks virtio-blk")]
    NoDisk(String),
    #[error("mounting {what} ({fstype}) on {target}: {}", describe(.err))]
    Mount {
        what: String,
        fstype: &'static str,
        target: String,
        #[source]
        err: io::Error,
    },
    #[error("creating {path}: {}", describe(.err))]
    Mkdir {
        path: String,
        #[source]
        err: io::Error,
    },
    #[error("moving the mount {from} to {to}: {}", describe(.err))]
    Move {
        from: String,
        to: String,
        #[source]
        err: io::Error,
    },
    #[error("switching root to {NEW_ROOT}: {step}: {}", describe(.err))]
    SwitchRoot {
        step: &'static str,
        #[source]
        err: io::Error,
    },
}

/// Mounts /proc, /sys and /dev (devtmpfs) in the initramfs.
pub fn mount_early() -> Result<(), MountError> {
    let nse = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nse, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nse, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Mounts the overlay root and switches into it; afterwards `/` is the overlay and the current
/// directory is `/`. Needs [`mount_early`] first.
pub fn setup_root(opts: &Options) -> Result<(), MountError> {
    wait_for_root_disk()?;

    mkdir_p(LOWER)?;
    mount_root_image()?;

    match &opts.scratch {
        Some(disk) => {
            wait_for_disk(disk)?;
            mount_fs(disk, RW, "ext4", libc::MS_NOATIME, None)?;
        }
        None => mount_fs(
            "tmpfs",
            RW,
            "tmpfs",
            0,
            Some(&format!("mode=0755,size={}", opts.tmpfs_size)),
        )?,
    }
    mkdir_p(UPPER)?;
    mkdir_p(WORK)?;
    copy_root_attributes(LOWER, UPPER);

    let overlay = format!("lowerdir={LOWER},upperdir={UPPER},workdir={WORK}");
    mount_fs("overlay", NEW_ROOT, "overlay", 0, Some(&overlay))?;

    switch_root(NEW_ROOT)?;

    // With a scratch disk /tmp stays in the overlay, on the disk: builds put big files there.
    if opts.scratch.is_none() {
        let tmp = format!("mode=1777,size={}", opts.tmpfs_size);
        mount_fs(
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&tmp),
        )?;
    }
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    dev_extras();
    Ok(())
}

fn wait_for_root_disk() -> Result<(), MountError> {
    wait_for_disk(ROOT_DISK)
}

fn wait_for_disk(disk: &str) -> Result<(), MountError> {
    let start = Instant::now();
    loop {
        if Path::new(disk).exists() {
            return Ok(());
        }
        if start.elapsed() >= ROOT_DISK_WAIT {
            return Err(MountError::NoDisk(disk.to_string()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The image, read-only. A read-only disk whose ext4 journal needs recovery cannot be mounted
/// plainly (recovery would write): then mount it without loading the journal.
fn mount_root_image() -> Result<(), MountError> {
    match mount_fs(ROOT_DISK, LOWER, "ext4", libc::MS_RDONLY, None) {
        Err(MountError::Mount { err, .. }) if err.raw_os_error() == Some(libc::EROFS) => {
            crate::log::warn(&format!(
                "{ROOT_DISK}: the ext4 journal needs recovery; mounting without it (noload)"
            ));
            mount_fs(ROOT_DISK, LOWER, "ext4", libc::MS_RDONLY, Some("noload"))
        }
        other => other,
    }
}

/// The overlay's root directory takes its owner and mode from the upper layer's root: give that the
/// image's, so that `/` looks as it does in the image.
fn copy_root_attributes(lower: &str, upper: &str) {
    let Ok(meta) = std::fs::metadata(lower) else {
        return;
    };
    let Ok(path) = sys::cstring(upper.as_bytes()) else {
        return;
    };
    let mode = meta.mode() & 0o7777;
    // SAFETY: `path` is a valid NUL-terminated string; chown/chmod take plain integers otherwise.
    unsafe {
        libc::chown(path.as_ptr(), meta.uid(), meta.gid());
        libc::chmod(path.as_ptr(), mode);
    }
}

fn switch_root(new_root: &str) -> Result<(), MountError> {
    for dir in ["/proc", "/sys", "/dev"] {
        let to = format!("{new_root}{dir}");
        mkdir_p(&to)?;
        move_mount(dir, &to)?;
    }
    let step = |step, r: io::Result<()>| r.map_err(|err| MountError::SwitchRoot { step, err });
    step("chdir", std::env::set_current_dir(new_root))?;
    step(
        "move onto /",
        raw_mount(".", "/", None, libc::MS_MOVE, None),
    )?;
    // SAFETY: the path is a NUL-terminated literal.
    let chroot = unsafe { libc::chroot(c".".as_ptr()) };
    step("chroot", sys::cvt(chroot).map(drop))?;
    step("chdir /", std::env::set_current_dir("/"))?;
    Ok(())
}

/// Nice to have: /dev/pts, /dev/shm and the /dev/fd, /dev/std* links that devtmpfs lacks (bash's
/// process substitution uses /dev/fd). Failures are logged, not fatal. devtmpfs's /dev/ptmx needs no
/// link: since Linux 4.7 it opens the devpts instance mounted at the `pts` beside it.
fn dev_extras() {
    let attempts = [
        mount_fs(
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        mount_fs(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=1777"),
        ),
    ];
    for err in attempts.into_iter().filter_map(Result::err) {
        crate::log::warn(&err.to_string());
    }
    let links = [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ];
    for (target, link) in links {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => crate::log::warn(&format!("linking {link} -> {target}: {}", describe(&e))),
        }
    }
}

/// Creates `target` (and its parents) and mounts a file system there. EBUSY on an already mounted
/// pseudo file system counts as success.
fn mount_fs(
    what: &str,
    target: &str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), MountError> {
    mkdir_p(target)?;
    match raw_mount(what, target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && what == fstype => Ok(()),
        Err(err) => Err(MountError::Mount {
            what: what.to_string(),
            fstype,
            target: target.to_string(),
            err,
        }),
    }
}

fn move_mount(from: &str, to: &str) -> Result<(), MountError> {
    raw_mount(from, to, None, libc::MS_MOVE, None).map_err(|err| MountError::Move {
        from: from.to_string(),
        to: to.to_string(),
        err,
    })
}

fn raw_mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = sys::cstring(source.as_bytes())?;
    let target = sys::cstring(target.as_bytes())?;
    let fstype: Option<CString> = fstype.map(|f| sys::cstring(f.as_bytes())).transpose()?;
    let data: Option<CString> = data.map(|d| sys::cstring(d.as_bytes())).transpose()?;
    let fstype_ptr = fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr());
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: every pointer is either null (allowed for fstype and data) or a NUL-terminated string
    // that outlives the call.
    sys::cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype_ptr,
            flags,
            data_ptr,
        )
    })
    .map(drop)
}

fn mkdir_p(path: &str) -> Result<(), MountError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|err| MountError::Mkdir {
            path: path.to_string(),
            err,
        })
}
