//! Noticing that children exited, and reaping them.
//!
//! As PID 1 every orphan in the guest becomes our child: [`Reaper::all_children`] reaps them all
//! (`waitpid(-1)`) on every SIGCHLD, read from a signalfd, and picks out the command's status. That
//! needs SIGCHLD blocked in the whole process ([`block_sigchld`], done first thing by init), which a
//! multi-threaded test process cannot do, and `waitpid(-1)` would steal other tests' children: tests
//! use [`Reaper::only`], which waits for the command alone through a pidfd. Where neither fd can be
//! had the reaper falls back to checking every few milliseconds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use vmm_protocol::ExitStatus;

use crate::sys;

/// How often the fallback checks for exited children.
const TICK: Duration = Duration::from_millis(10);

#[derive(Debug)]
enum Watch {
    /// Readable when SIGCHLD is pending (PID 1).
    Signal(OwnedFd),
    /// Readable once the command has exited.
    Pid(OwnedFd),
    /// Nothing to poll: check every [`TICK`].
    Tick,
}

#[derive(Debug)]
pub struct Reaper {
    watch: Watch,
    /// Reap every child (PID 1), not only the command.
    all: bool,
}

/// Blocks SIGCHLD for the calling thread (in PID 1: the process), so that it is only seen through a
/// signalfd. Children unblock everything before exec.
pub fn block_sigchld() -> io::Result<()> {
    let set = sigchld_set();
    // SAFETY: `set` is a valid initialized sigset_t; the old mask is not asked for.
    let r = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    sys::cvt(r).map(drop)
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the zeroed set; sigaddset adds a valid signal number.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

impl Reaper {
    /// PID 1: reap every child, woken by SIGCHLD through a signalfd. [`block_sigchld`] must have been
    /// called before the first child was started.
    pub fn all_children() -> Reaper {
        let set = sigchld_set();
        // SAFETY: `set` is a valid sigset_t; -1 asks for a new signalfd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        let watch = match sys::cvt(fd) {
            // SAFETY: a fresh descriptor owned by nothing else.
            Ok(fd) => Watch::Signal(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) => {
                crate::log::warn(&format!(
                    "signalfd: {e}; checking for exited children every 10 ms"
                ));
                Watch::Tick
            }
        };
        Reaper { watch, all: true }
    }

    /// Wait for the child `pid` only, through a pidfd.
    pub fn only(pid: libc::pid_t) -> Reaper {
        // SAFETY: pidfd_open takes plain integers and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // The kernel returns an int descriptor in the long: one that does not fit is no descriptor.
        let watch = match RawFd::try_from(fd) {
            // SAFETY: a fresh descriptor owned by nothing else.
            Ok(fd) if fd >= 0 => Watch::Pid(unsafe { OwnedFd::from_raw_fd(fd) }),
            _ => Watch::Tick,
        };
        Reaper { watch, all: false }
    }

    /// The descriptor to poll for readability, if any. `command_reaped`: a pidfd stays readable for
    /// ever once the command has exited, so it is no longer polled then.
    pub fn poll_fd(&self, command_reaped: bool) -> Option<RawFd> {
        match &self.watch {
            Watch::Signal(fd) => Some(fd.as_raw_fd()),
            Watch::Pid(fd) if !command_reaped => Some(fd.as_raw_fd()),
            Watch::Pid(_) | Watch::Tick => None,
        }
    }

    /// How long a poll may wait at most before [`Reaper::reap`] must be called anyway.
    pub fn tick(&self, command_reaped: bool) -> Option<Duration> {
        match self.watch {
            Watch::Tick if self.all || !command_reaped => Some(TICK),
            _ => None,
        }
    }

    /// Consumes pending notifications and reaps what has exited; returns the command's status if
    /// it was reaped now.
    pub fn reap(&mut self, command: libc::pid_t) -> Option<ExitStatus> {
        if let Watch::Signal(fd) = &self.watch {
            drain_signalfd(fd.as_raw_fd());
        }
        let target = if self.all { -1 } else { command };
        let mut found = None;
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid int for waitpid to fill in.
            let pid = unsafe { libc::waitpid(target, &mut status, libc::WNOHANG) };
            if pid == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if pid <= 0 {
                // 0: children remain, none exited; -1: ECHILD, none at all
                return found;
            }
            if pid == command {
                found = exit_status(status);
            }
            if !self.all {
                return found;
            }
        }
    }
}

fn drain_signalfd(fd: RawFd) {
    let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>() * 8];
    while matches!(sys::read(fd, &mut buf), Ok(n) if n > 0) {}
}

/// The status of a child that exited or was killed; `None` for a stop/continue report.
pub fn exit_status(status: libc::c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(status) {
        Some(ExitStatus::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitStatus::Signal(libc::WTERMSIG(status)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        // exit(3): status 3 << 8; killed by SIGKILL: status 9
        assert_eq!(exit_status(3 << 8), Some(ExitStatus::Code(3)));
        assert_eq!(exit_status(libc::SIGKILL), Some(ExitStatus::Signal(9)));
        // stopped by SIGSTOP: 0x7f | sig << 8
        assert_eq!(exit_status(0x7f | (libc::SIGSTOP << 8)), None);
    }
}
