//! PID 1, in order:
//!
//! 1. record InitStarted; ignore SIGPIPE; block SIGCHLD (children are seen through a signalfd);
//! 2. mount /proc, /sys, /dev; fill descriptors 0-2 (/dev/null) where closed; open /dev/kmsg;
//! 3. connect to the host over vsock (Connected); send Hello and the milestones so far (the host's
//!    run request then arrives while step 4 runs);
//! 4. read the `vmm.*` options, mount the root image under the overlay, switch root (RootMounted);
//! 5. if 4 failed, send `Error(Setup)` and stop here; else run the session (`session::serve`);
//! 6. half-close the connection and wait for the host to take the last frames and end the VM; `sync`, and reset
//!    the VM (`reboot(RB_AUTOBOOT)`; with `reboot=k` the VMM sees the reset and ends the VM).
//!
//! Every failure is logged to /dev/kmsg, reported to the host when connected, and ends in step 6:
//! init never hangs and never returns.

use std::time::Duration;

use vmm_protocol::{ErrorKind, Message, Milestone, CONTROL_PORT, VERSION};

use crate::channel::Channel;
use crate::cmdline::{self, CmdlineError};
use crate::mounts::{self, MountError};
use crate::session::{self, Outcome, SessionConfig};
use crate::sys;
use crate::timeline::Timeline;
use crate::{log, reaper, vsock};

/// How long connecting to the host may keep retrying.
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);
/// How long to wait for the host to close the connection after the last frame. The host ends the VM
/// as soon as it has read the exit status, and what the guest wrote last may still sit in its vsock
/// queue waiting for credit (a slow reader of the command's output on the host): resetting before the
/// host has it would lose the tail of the output and the status. So wait for the host; this bound only
/// matters for a host that never reads, and that host's own --timeout ends the VM.
const LINGER: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
}

/// The whole life of PID 1. Returns only when not PID 1 (someone ran `/init` by hand).
pub fn main() -> libc::c_int {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        let msg =
            b"guest-init: this is PID 1 of a vmm guest (it mounts, switches root and resets the \
                    machine); refusing to run as an ordinary process\n";
        let _ = sys::write(2, msg);
        return 2;
    }
    let mut timeline = Timeline::with_timestamp_port();
    timeline.mark(Milestone::InitStarted);

    // Failures here are logged once logging works: without SIGCHLD blocked the relay falls back to
    // polling, and PID 1 ignores SIGPIPE's default action anyway.
    let sigpipe = sys::ignore_signal(libc::SIGPIPE);
    let sigchld = reaper::block_sigchld();

    let early = mounts::mount_early();
    fill_std_fds();
    log::open_kmsg();
    for (what, r) in [("ignoring SIGPIPE", sigpipe), ("blocking SIGCHLD", sigchld)] {
        if let Err(e) = r {
            log::warn(&format!("{what}: {e}"));
        }
    }

    // Connect and say Hello before setting up the root file system: the host answers with the run
    // request while the image is being mounted, instead of after it, so its round trip costs nothing.
    let fd = match vsock::connect(CONTROL_PORT, CONNECT_DEADLINE) {
        Ok(fd) => fd,
        Err(e) => {
            log::error(&e.to_string());
            power_off(None);
        }
    };
    timeline.mark(Milestone::Connected);
    log::info("connected to the host");
    let mut chan = Channel::new(fd);
    let hello = chan
        .send(&Message::Hello { version: VERSION })
        .and_then(|()| timeline.flush(&mut chan));
    if let Err(e) = hello {
        log::error(&format!("sending Hello to the host: {}", sys::describe(&e)));
        power_off(Some(chan));
    }

    let root = early
        .map_err(SetupError::from)
        .and_then(|()| Ok(cmdline::read()?))
        .and_then(|opts| Ok(mounts::setup_root(&opts)?));
    match &root {
        Ok(()) => {
            timeline.mark(Milestone::RootMounted);
            log::info("root file system ready (image read-only under a private overlay)");
        }
        Err(e) => log::error(&format!("setting up the root file system: {e}")),
    }

    if let Err(e) = root {
        let message = format!("setting up the root file system: {e}");
        let _ = chan.send(&Message::Error {
            kind: ErrorKind::Setup,
            message,
        });
        power_off(Some(chan));
    }

    match session::serve(&mut chan, &mut timeline, &SessionConfig::pid1()) {
        Ok(Outcome::Exited(status)) => log::info(&format!("command ended: {status:?}")),
        Ok(Outcome::NotStarted(kind)) => log::info(&format!("command not started: {kind:?}")),
        Err(e) => log::error(&e.to_string()),
    }
    power_off(Some(chan));
}

/// Descriptors 0-2 are closed when the kernel found no console: give them /dev/null, so that no
/// socket or pipe of ours lands there (and nothing of init's ever writes to a console that could
/// block). Should even /dev/null be missing, `/` opened read-only holds the slot.
fn fill_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any number is safe; -1/EBADF means the slot is free.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        // SAFETY: NUL-terminated literal paths; open returns the lowest free descriptor, which is
        // `fd` since the lower ones are taken.
        unsafe {
            if libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) < 0 {
                libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            }
        }
    }
}

/// Ends the VM: lets the host take the last frames, syncs, resets. Never returns.
fn power_off(chan: Option<Channel>) -> ! {
    if let Some(chan) = chan {
        chan.close(LINGER);
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(RB_AUTOBOOT) takes a plain integer; as PID 1 it resets the machine.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    log::error(&format!(
        "reboot failed: {}; exiting PID 1 (the kernel panics and, with panic=-1, resets)",
        std::io::Error::last_os_error()
    ));
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(1) }
}
