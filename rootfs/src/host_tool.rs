//! The host programs vmm runs (mkfs.ext4 to build image and scratch file systems, debugfs to read an
//! image's /etc/passwd). Each dies with vmm: a run that is killed, or that its --timeout watchdog ends,
//! leaves none of them behind, still writing into the image cache or blocked on a file.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A command for `program` that gets SIGKILL when vmm's main thread, which runs it, goes away.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    let vmm = std::process::id() as libc::pid_t;
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe calls are
    // allowed: prctl and getppid are plain system calls that touch no memory of ours.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // vmm may have died between the fork and the prctl: then nothing would ever send the signal.
            // (An error from a raw errno: nothing here may allocate.)
            if libc::getppid() != vmm {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command
}
