//! Confines the control thread's file-system access to the copy directories with Landlock, before it
//! reads the first byte from the guest: it may read below each `--copy-in` HOST_DIR and read and write
//! below each `--copy-out` HOST_DIR, and open nothing else. Its seccomp filter cannot do this (a filter
//! sees a path only as a pointer); Landlock checks each path the kernel resolves.
//!
//! Where the kernel has no Landlock (before Linux 5.13, or not enabled at boot), nothing is confined
//! and the control thread is held by its seccomp filter alone: it may open any file the user running
//! vmm may, but starts no process and opens no network socket.

use std::path::Path;

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

/// The newest Landlock ABI whose file-system rights we ask for; older kernels give what they have.
const ABI_WANTED: ABI = ABI::V5;

#[derive(Debug, thiserror::Error)]
#[error("cannot confine the copies to their directories with Landlock: {0}")]
pub struct SandboxError(#[from] landlock::RulesetError);

/// How far the calling thread was confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confinement {
    /// every file-system right is checked
    Full,
    /// the kernel's Landlock is older than ours: the rights it knows are checked
    Partial,
    /// no Landlock in this kernel
    None,
}

/// Confines the calling thread (and threads it starts later) to reading below `read` and to reading
/// and writing below `write`. A directory that cannot be opened gets no rule, so any access below it is
/// refused later, with the copy's own error.
pub fn confine(read: &[&Path], write: &[&Path]) -> Result<Confinement, SandboxError> {
    let all = AccessFs::from_all(ABI_WANTED);
    let mut ruleset = Ruleset::default().handle_access(all)?.create()?;
    for (dirs, access) in [(read, AccessFs::from_read(ABI_WANTED)), (write, all)] {
        for dir in dirs {
            if let Ok(fd) = PathFd::new(dir) {
                ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
            }
        }
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Confinement::Full,
        RulesetStatus::PartiallyEnforced => Confinement::Partial,
        _ => Confinement::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_thread_reads_and_writes_only_its_directories() {
        let base = std::env::temp_dir().join(format!("vmm-sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (input, output, outside) = (base.join("in"), base.join("out"), base.join("outside"));
        for d in [&input, &output, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(input.join("src.c"), b"int main;").unwrap();
        std::fs::write(outside.join("secret"), b"host").unwrap();
        let (i, o, x) = (input.clone(), output.clone(), outside.clone());
        // a thread of its own: Landlock confines the calling thread only
        let outcome = std::thread::spawn(move || {
            let confinement = confine(&[&i], &[&o]).unwrap();
            let read_in = std::fs::read(i.join("src.c")).is_ok();
            let write_in = std::fs::write(i.join("new"), b"x").is_ok();
            let write_out = std::fs::write(o.join("artifact"), b"x").is_ok();
            let mkdir_out = std::fs::create_dir(o.join("d")).is_ok();
            let read_outside = std::fs::read(x.join("secret")).is_ok();
            let write_outside = std::fs::write(x.join("planted"), b"x").is_ok();
            let read_etc = std::fs::read("/etc/hostname").is_ok();
            (
                confinement,
                [
                    read_in,
                    write_in,
                    write_out,
                    mkdir_out,
                    read_outside,
                    write_outside,
                    read_etc,
                ],
            )
        })
        .join()
        .unwrap();
        match outcome.0 {
            Confinement::None => eprintln!("no Landlock in this kernel: nothing to check"),
            _ => assert_eq!(outcome.1, [true, false, true, true, false, false, false]),
        }
        // this thread was not confined
        assert!(std::fs::read(outside.join("secret")).is_ok());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
