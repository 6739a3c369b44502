//! Starting the command of a [`RunRequest`]: pipes for its stdin, stdout and stderr, a session of its
//! own, the requested user and working directory, reset signals, and an `execvpe`-like PATH search
//! with the PATH of the request's environment.
//!
//! Everything the child needs is prepared before `fork`, so that the child only makes
//! async-signal-safe calls (it may be forked from a multi-threaded test process). If the child fails
//! before `exec` succeeds it writes a small record (stage, errno, candidate index) into a close-on-exec
//! pipe: end of file on that pipe means `exec` worked.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use vmm_protocol::{ErrorKind, RunRequest};

use crate::sys::{self, describe};

/// PATH when the request's environment has none (Docker's default).
pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A started command: its pid (also its process group and session) and our ends of its pipes, all
/// non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Child {
    pub pid: libc::pid_t,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the run request has an empty argv")]
    EmptyArgv,
    #[error("the run request's {0} contains a NUL byte")]
    Nul(&'static str),
    #[error("working directory {dir}: {}", describe(.err))]
    Workdir {
        dir: String,
        #[source]
        err: io::Error,
    },
    #[error("switching to uid {uid}, gid {gid}: {}", describe(.err))]
    Credentials {
        uid: u32,
        gid: u32,
        #[source]
        err: io::Error,
    },
    #[error("{name}: executable file not found in $PATH")]
    NotInPath { name: String },
    #[error("exec {path}: {}{hint}", describe(.err))]
    Exec {
        path: String,
        #[source]
        err: io::Error,
        hint: &'static str,
    },
    #[error("starting the command: {}", describe(.0))]
    Sys(#[source] io::Error),
}

impl SpawnError {
    /// What the host reports: NotFound (127), NotExecutable (126) or Setup (125).
    pub fn kind(&self) -> ErrorKind {
        match self {
            SpawnError::NotInPath { .. } => ErrorKind::NotFound,
            SpawnError::Exec { err, .. } => exec_error_kind(sys::errno_of(err)),
            _ => ErrorKind::Setup,
        }
    }
}

/// How an `execve` errno is reported: a missing program is NotFound (exit 127); anything else that
/// stops an existing path from running (EACCES, ENOEXEC, ENOTDIR, ELOOP, E2BIG, ETXTBSY...) is
/// NotExecutable (exit 126).
pub fn exec_error_kind(errno: i32) -> ErrorKind {
    if errno == libc::ENOENT {
        ErrorKind::NotFound
    } else {
        ErrorKind::NotExecutable
    }
}

/// The PATH of an environment (the first `PATH=` entry, as getenv finds it), else [`DEFAULT_PATH`].
pub fn path_from_env(env: &[Vec<u8>]) -> &[u8] {
    env.iter()
        .find_map(|e| e.strip_prefix(b"PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// The paths `execvpe` would try for `name`, in order: `name` itself when it contains a slash, else
/// `DIR/name` for each PATH entry (an empty entry is the working directory). An empty name has none.
pub fn search_candidates(name: &[u8], path: &[u8]) -> Vec<Vec<u8>> {
    if name.is_empty() {
        return Vec::new();
    }
    if name.contains(&b'/') {
        return vec![name.to_vec()];
    }
    path.split(|&b| b == b':')
        .map(|dir| {
            if dir.is_empty() {
                return name.to_vec();
            }
            let mut p = dir.to_vec();
            if !p.ends_with(b"/") {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            p
        })
        .collect()
}

/// Errors after which `execvpe` goes on to the next PATH entry (like glibc). EACCES also goes on,
/// but is remembered and reported when nothing else is found.
fn try_next_candidate(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT
    )
}

const STAGE_STDIO: u32 = 1;
const STAGE_CREDENTIALS: u32 = 2;
const STAGE_WORKDIR: u32 = 3;
const STAGE_EXEC: u32 = 4;
/// The failure record: stage, errno, candidate index, each 4 bytes little-endian.
const REPORT_LEN: usize = 12;
/// Candidate index of "not found anywhere in PATH".
const NO_CANDIDATE: u32 = u32::MAX;

/// Everything the child needs, built before `fork`.
struct Prepared {
    /// Owns the strings `argv_ptrs` points into.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Owns the strings `env_ptrs` points into.
    _env: Vec<CString>,
    env_ptrs: Vec<*const libc::c_char>,
    candidates: Vec<CString>,
    /// PATH was searched (argv[0] had no slash).
    searched: bool,
    workdir: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn c_list(items: &[Vec<u8>], what: &'static str) -> Result<Vec<CString>, SpawnError> {
    items
        .iter()
        .map(|i| sys::cstring(i).map_err(|_| SpawnError::Nul(what)))
        .collect()
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn prepare(req: &RunRequest) -> Result<Prepared, SpawnError> {
    let name = req.argv.first().ok_or(SpawnError::EmptyArgv)?;
    let argv = c_list(&req.argv, "argv")?;
    let env = c_list(&req.env, "environment")?;
    let candidates = c_list(
        &search_candidates(name, path_from_env(&req.env)),
        "PATH or argv[0]",
    )?;
    let workdir = if req.workdir.is_empty() {
        b"/".as_slice()
    } else {
        &req.workdir
    };
    Ok(Prepared {
        argv_ptrs: null_terminated(&argv),
        _argv: argv,
        env_ptrs: null_terminated(&env),
        _env: env,
        candidates,
        searched: !name.contains(&b'/'),
        workdir: sys::cstring(workdir).map_err(|_| SpawnError::Nul("working directory"))?,
        uid: req.uid,
        gid: req.gid,
    })
}

/// Like Docker, a working directory that does not exist is created (as root, mode 0755) before the
/// command starts; one that cannot be entered is an error.
fn ensure_workdir(workdir: &CString) -> Result<(), SpawnError> {
    let path = Path::new(std::ffi::OsStr::from_bytes(workdir.as_bytes()));
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(|err| SpawnError::Workdir {
                dir: path.display().to_string(),
                err,
            }),
        // anything else (not a directory, no permission for the user) is reported by the child's chdir
        _ => Ok(()),
    }
}

/// Starts the command. On success `exec` has happened: the command runs.
pub fn spawn(req: &RunRequest) -> Result<Child, SpawnError> {
    let p = prepare(req)?;
    ensure_workdir(&p.workdir)?;

    let (stdin_r, stdin_w) = sys::pipe().map_err(SpawnError::Sys)?;
    let (stdout_r, stdout_w) = sys::pipe().map_err(SpawnError::Sys)?;
    let (stderr_r, stderr_w) = sys::pipe().map_err(SpawnError::Sys)?;
    let (report_r, report_w) = sys::pipe().map_err(SpawnError::Sys)?;

    // SAFETY: fork has no memory preconditions. The child only runs `run_child`, which makes
    // async-signal-safe calls on data prepared above and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Sys(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; every pointer in `p` is valid (the parent's
        // memory is copied) and the descriptors are open.
        unsafe {
            run_child(
                &p,
                stdin_r.as_raw_fd(),
                stdout_w.as_raw_fd(),
                stderr_w.as_raw_fd(),
                report_w.as_raw_fd(),
            )
        }
    }
    drop((stdin_r, stdout_w, stderr_w, report_w));

    let report = match read_report(&report_r) {
        Ok(r) => r,
        Err(e) => {
            let _ = sys::kill(pid, libc::SIGKILL);
            let _ = sys::wait_blocking(pid);
            return Err(SpawnError::Sys(e));
        }
    };
    if let Some((stage, errno, index)) = report {
        // the child has reported and exits at once: collect it
        let _ = sys::wait_blocking(pid);
        return Err(failure(&p, stage, errno, index));
    }
    for fd in [&stdin_w, &stdout_r, &stderr_r] {
        sys::set_nonblocking(fd.as_raw_fd()).map_err(SpawnError::Sys)?;
    }
    Ok(Child {
        pid,
        stdin: stdin_w,
        stdout: stdout_r,
        stderr: stderr_r,
    })
}

/// The child's failure record, or `None` at end of file (exec succeeded).
fn read_report(fd: &OwnedFd) -> io::Result<Option<(u32, i32, u32)>> {
    let mut rec = [0u8; REPORT_LEN];
    let mut got = 0;
    while got < REPORT_LEN {
        match sys::read(fd.as_raw_fd(), &mut rec[got..])? {
            0 => break,
            n => got += n,
        }
    }
    match got {
        0 => Ok(None),
        REPORT_LEN => {
            let word = |i: usize| [rec[i], rec[i + 1], rec[i + 2], rec[i + 3]];
            Ok(Some((
                u32::from_le_bytes(word(0)),
                i32::from_le_bytes(word(4)),
                u32::from_le_bytes(word(8)),
            )))
        }
        _ => Err(io::Error::other("truncated failure report from the child")),
    }
}

fn failure(p: &Prepared, stage: u32, errno: i32, index: u32) -> SpawnError {
    let err = io::Error::from_raw_os_error(errno);
    let lossy = |c: &CString| String::from_utf8_lossy(c.as_bytes()).into_owned();
    match stage {
        STAGE_WORKDIR => SpawnError::Workdir {
            dir: lossy(&p.workdir),
            err,
        },
        STAGE_CREDENTIALS => SpawnError::Credentials {
            uid: p.uid,
            gid: p.gid,
            err,
        },
        STAGE_EXEC => {
            let name = p._argv.first().map(lossy).unwrap_or_default();
            let tried = p.candidates.get(index as usize);
            if errno == libc::ENOENT {
                // ENOENT for a file that exists: the kernel could not find its interpreter
                let existing = match tried {
                    Some(c) => Some(c).filter(|c| is_file(&p.workdir, c)),
                    None => p.candidates.iter().find(|c| is_file(&p.workdir, c)),
                };
                if let Some(path) = existing {
                    return SpawnError::Exec {
                        path: lossy(path),
                        err,
                        hint: " (the file exists: its #! interpreter or ELF loader is missing)",
                    };
                }
                if p.searched {
                    return SpawnError::NotInPath { name };
                }
            }
            SpawnError::Exec {
                path: tried.map(lossy).unwrap_or(name),
                err,
                hint: "",
            }
        }
        _ => SpawnError::Sys(err),
    }
}

/// `candidate` (relative to `workdir` when relative) is an existing regular file.
fn is_file(workdir: &CString, candidate: &CString) -> bool {
    let cand = Path::new(std::ffi::OsStr::from_bytes(candidate.as_bytes()));
    let full: PathBuf = Path::new(std::ffi::OsStr::from_bytes(workdir.as_bytes())).join(cand);
    full.is_file()
}

/// The child between `fork` and `exec`. Never returns: it execs or reports and exits.
///
/// # Safety
///
/// Only in the child of a `fork`: it replaces the process's signal setup, session, descriptors 0-2
/// and credentials. It calls only async-signal-safe functions and allocates nothing.
unsafe fn run_child(p: &Prepared, stdin: RawFd, stdout: RawFd, stderr: RawFd, report: RawFd) -> ! {
    // Back to default dispositions, nothing blocked. The raw system call also reaches the two
    // real-time signals that glibc reserves (and refuses in sigaction), which an ignoring parent
    // would otherwise pass on. The kernel's sigaction is {handler, flags, restorer, mask}: all zero
    // is SIG_DFL, no flags, empty mask.
    let dfl = [0u64; 4];
    let none = 0u64;
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: `dfl` is a valid kernel sigaction (handler SIG_DFL) for the kernel to read;
            // no old action is asked for; the sigset size is the kernel's (8 bytes).
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                )
            };
        }
    }
    // SAFETY: `none` is a valid empty kernel sigset of 8 bytes; no old mask is asked for.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };

    // SAFETY: setsid takes no arguments; it cannot fail in a new child (not a group leader).
    unsafe { libc::setsid() };

    // SAFETY: dup2 on open descriptors; all sources are above 2 (sys::pipe), so none is clobbered.
    let ok = unsafe {
        libc::dup2(stdin, 0) >= 0 && libc::dup2(stdout, 1) >= 0 && libc::dup2(stderr, 2) >= 0
    };
    if !ok {
        // SAFETY: as for every `fail` below: `report` is the open write end of the report pipe.
        unsafe { fail(report, STAGE_STDIO, errno(), 0) }
    }

    // Supplementary groups can only be dropped with privilege; without it there are none to drop
    // that we could have given, and setgid/setuid to one's own ids still work (tests).
    // SAFETY: setgroups(0, NULL) clears the list; setgid/setuid take plain integers.
    let ok = unsafe {
        (libc::geteuid() != 0 || libc::setgroups(0, std::ptr::null()) == 0)
            && libc::setgid(p.gid) == 0
            && libc::setuid(p.uid) == 0
    };
    if !ok {
        // SAFETY: see above.
        unsafe { fail(report, STAGE_CREDENTIALS, errno(), 0) }
    }

    // After the switch of user, like Docker: the user must be allowed into the directory.
    // SAFETY: `workdir` is a valid NUL-terminated string.
    if unsafe { libc::chdir(p.workdir.as_ptr()) } != 0 {
        // SAFETY: see above.
        unsafe { fail(report, STAGE_WORKDIR, errno(), 0) }
    }

    let mut eacces: Option<u32> = None;
    for (i, path) in p.candidates.iter().enumerate() {
        // No PATH has 4G entries; an index that did not fit would read as "not found anywhere".
        let i = u32::try_from(i).unwrap_or(NO_CANDIDATE);
        // SAFETY: `path` is NUL-terminated; argv and envp are NULL-terminated arrays of pointers to
        // NUL-terminated strings that live in `p`. execve only returns on failure.
        unsafe { libc::execve(path.as_ptr(), p.argv_ptrs.as_ptr(), p.env_ptrs.as_ptr()) };
        let e = errno();
        if e == libc::EACCES {
            eacces.get_or_insert(i);
        } else if !(p.searched && try_next_candidate(e)) {
            // SAFETY: see above.
            unsafe { fail(report, STAGE_EXEC, e, i) }
        }
    }
    let (e, index) = match eacces {
        Some(i) => (libc::EACCES, i),
        None => (libc::ENOENT, NO_CANDIDATE),
    };
    // SAFETY: see above.
    unsafe { fail(report, STAGE_EXEC, e, index) }
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Writes the failure record and exits the child.
///
/// # Safety
///
/// Only in a forked child (it calls `_exit`); `report` is the write end of the report pipe.
unsafe fn fail(report: RawFd, stage: u32, errno: i32, index: u32) -> ! {
    let mut rec = [0u8; REPORT_LEN];
    rec[0..4].copy_from_slice(&stage.to_le_bytes());
    rec[4..8].copy_from_slice(&errno.to_le_bytes());
    rec[8..12].copy_from_slice(&index.to_le_bytes());
    // SAFETY: `rec` is valid for REPORT_LEN bytes; a pipe write this small is atomic. _exit skips
    // the parent's atexit handlers and stdio buffers, as a forked child must.
    unsafe {
        libc::write(report, rec.as_ptr().cast(), rec.len());
        libc::_exit(if stage == STAGE_EXEC && errno == libc::ENOENT {
            127
        } else {
            126
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search_candidates() {
        let path = b"/usr/local/bin:/usr/bin/::bin";
        assert_eq!(
            search_candidates(b"ls", path),
            vec![
                b"/usr/local/bin/ls".to_vec(),
                b"/usr/bin/ls".to_vec(),
                b"ls".to_vec(),
                b"bin/ls".to_vec(),
            ]
        );
        assert_eq!(
            search_candidates(b"./run.sh", path),
            vec![b"./run.sh".to_vec()]
        );
        assert_eq!(
            search_candidates(b"/bin/sh", path),
            vec![b"/bin/sh".to_vec()]
        );
        assert!(search_candidates(b"", path).is_empty());
        // an empty PATH is one empty entry: the working directory
        assert_eq!(search_candidates(b"x", b""), vec![b"x".to_vec()]);
    }

    #[test]
    fn path_comes_from_the_request_env_or_the_default() {
        let env = vec![b"HOME=/root".to_vec(), b"PATH=/opt/bin".to_vec()];
        assert_eq!(path_from_env(&env), b"/opt/bin");
        let first_wins = vec![b"PATH=/a".to_vec(), b"PATH=/b".to_vec()];
        assert_eq!(path_from_env(&first_wins), b"/a");
        assert_eq!(path_from_env(&[b"PATHX=/x".to_vec()]), DEFAULT_PATH);
        assert_eq!(path_from_env(&[]), DEFAULT_PATH);
    }

    #[test]
    fn exec_errnos_map_to_error_kinds() {
        assert_eq!(exec_error_kind(libc::ENOENT), ErrorKind::NotFound);
        for e in [
            libc::EACCES,
            libc::ENOEXEC,
            libc::EISDIR,
            libc::ENOTDIR,
            libc::ELOOP,
            libc::ETXTBSY,
            libc::E2BIG,
        ] {
            assert_eq!(exec_error_kind(e), ErrorKind::NotExecutable, "errno {e}");
        }
        let nf = SpawnError::NotInPath { name: "x".into() };
        assert_eq!(nf.kind(), ErrorKind::NotFound);
        assert_eq!(nf.to_string(), "x: executable file not found in $PATH");
        let wd = SpawnError::Workdir {
            dir: "/w".into(),
            err: io::Error::from_raw_os_error(libc::ENOTDIR),
        };
        assert_eq!(wd.kind(), ErrorKind::Setup);
        assert_eq!(wd.to_string(), "working directory /w: Not a directory");
        assert_eq!(SpawnError::EmptyArgv.kind(), ErrorKind::Setup);
    }

    #[test]
    fn only_missing_files_go_on_to_the_next_path_entry() {
        assert!(try_next_candidate(libc::ENOENT));
        assert!(try_next_candidate(libc::ENOTDIR));
        assert!(!try_next_candidate(libc::ENOEXEC));
        assert!(!try_next_candidate(libc::EACCES));
    }

    #[test]
    fn requests_with_nul_bytes_or_no_argv_are_refused_before_fork() {
        let mut req = RunRequest {
            argv: vec![b"true".to_vec()],
            env: vec![b"A=\0".to_vec()],
            workdir: b"/".to_vec(),
            uid: 0,
            gid: 0,
            ..RunRequest::default()
        };
        assert!(matches!(spawn(&req), Err(SpawnError::Nul("environment"))));
        req.env.clear();
        req.argv.clear();
        assert!(matches!(spawn(&req), Err(SpawnError::EmptyArgv)));
    }
}
