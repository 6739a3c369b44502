//! The host programs vmm runs (mkfs.ext4 to build image and scratch file systems, debugfs to read an
//! image's /etc/passwd). Each dies with vmm: a run that is killed, or that its --timeout watchdog ends,
//! leaves none of them behind, still writing into the image cache or blocked on a file.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A command for `program` that gets SIGKILL when vmm's main thread, which runs it, goes away.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe calls are
    // allowed; prctl(PR_SET_PDEATHSIG) is a plain system call that touches no memory.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}
