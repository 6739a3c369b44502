//! Seccomp filters for vmm's threads: one allowlist per kind of thread, installed by each thread itself
//! before it handles anything the guest controls (KVM file descriptors, guest memory and devices exist
//! before any filter). Installing one costs a few hundred microseconds on some hosts (the kernel compiles
//! it), so each goes on where it costs least: a vCPU thread's while the VM is being built, the main
//! thread's once the boot vCPU is in the guest, the control thread's when guest-init has connected.
//!
//! - `vmm`, the main thread: the event loop (virtio queues: block I/O, vsock), signals, timers, vCPU
//!   kicks, the teardown, the result and trace files. Adds epoll, timerfd, file and socket I/O,
//!   `socketpair(AF_UNIX)`, `tgkill(SIGRTMIN)` to our own threads, opening files. No KVM ioctl.
//! - `vcpu`: `ioctl(KVM_RUN)`, and after a triple fault the three read-only ioctls that report the
//!   guest's state (`KVM_GET_REGS`, `KVM_GET_SREGS`, `KVM_GET_VCPU_EVENTS`, see `fault_dump.rs`), nothing
//!   else of KVM; the devices' port and MMIO handlers write eventfds and the console, and shut vsock
//!   streams down when the driver resets the device.
//! - `control`: the guest-init protocol on its Unix socket, the command's stdout and stderr, copying
//!   files in and out of the VM (ordinary file-system calls), starting the stdin thread (threads, never a
//!   process: `clone` only with pthread's flags, `clone3` answers ENOSYS).
//! - `stdin`: reads our stdin and sends it on.
//! - `watchdog`: `--timeout`'s backstop (see `watchdog.rs`): sleeps, polls stderr, ends the process.
//!
//! Every thread also gets `common()`: memory (never executable), futex wait/wake, signal masks and
//! returns, clocks, randomness, writing to stderr, closing descriptors, ending, `abort()`.
//!
//! The lists come from reading the code and the crates it calls, and from `strace -f` of vmm on every path
//! (command with output, stdin, closed stdout, 20 MB of output, `--timeout`, forwarded and repeated
//! signals, `--console`, `--scratch`, `--vcpus 2`, `--trace`, `--result`, `--image`, boot-only, a command
//! that is not found). Arguments are checked where that closes a door without guessing: ioctl request
//! numbers, no executable mappings, futex operations, signals only to ourselves, `clone` only for threads.
//!
//! What happens on a call outside the list is the [`Mode`] (`--seccomp`). The default, `trap`, never
//! runs the call: the kernel raises SIGSYS, whose handler writes one line naming the thread and the call
//! and ends vmm with status 125 (vmm failed), as Firecracker does. `kill` is the kernel's
//! SECCOMP_RET_KILL_PROCESS: no handler, vmm dies of SIGSYS (status 159, which a caller cannot tell from
//! a command killed by signal 31). `log` lets the call run and has the kernel log it (for finding what a
//! new kernel or libc needs); `off` installs nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::exit_code::EXIT_VMM_FAILED;

/// What a filter does with a system call that its thread's list does not allow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The call does not run; vmm names it on stderr and exits 125 (SECCOMP_RET_TRAP and a SIGSYS handler)
    #[default]
    Trap,
    /// The call does not run; the kernel kills vmm with SIGSYS, without a word (SECCOMP_RET_KILL_PROCESS)
    Kill,
    /// The call runs and the kernel logs it (SECCOMP_RET_LOG): for finding what a host needs
    Log,
    /// No filters
    Off,
}

impl Mode {
    fn action(self) -> Option<SeccompAction> {
        match self {
            Mode::Trap => Some(SeccompAction::Trap),
            Mode::Kill => Some(SeccompAction::KillProcess),
            Mode::Log => Some(SeccompAction::Log),
            Mode::Off => None,
        }
    }
}

/// The kinds of thread vmm runs; each has its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// The main thread: the event loop that serves the devices, then the teardown.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The control channel to guest-init.
    Control,
    /// The pump from our stdin to the command.
    Stdin,
    /// `--timeout`'s backstop.
    Watchdog,
}

impl Thread {
    const ALL: [Thread; 5] = [
        Thread::Vmm,
        Thread::Vcpu,
        Thread::Control,
        Thread::Stdin,
        Thread::Watchdog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Thread::Vmm => "vmm",
            Thread::Vcpu => "vcpu",
            Thread::Control => "control",
            Thread::Stdin => "stdin",
            Thread::Watchdog => "watchdog",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {0} thread: {1}")]
    Build(&'static str, seccompiler::BackendError),
    #[error(
        "this kernel cannot filter system calls with seccomp ({0}); run vmm on a kernel with \
         CONFIG_SECCOMP_FILTER, or pass --seccomp off to go ahead without filters"
    )]
    Unsupported(std::io::Error),
    #[error("cannot install the SIGSYS handler that reports disallowed system calls: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the seccomp filter of the {0} thread: {1}")]
    Install(&'static str, seccompiler::Error),
}

/// What [`configure`] decided, for every thread.
struct Settings {
    mode: Mode,
    ids: Ids,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// The compiled programs of each [`Thread`] kind, built by the first thread of that kind: compiling all
/// of them up front would put a tenth of a millisecond on the way to the first KVM_RUN.
static PROGRAMS: [OnceLock<Vec<BpfProgram>>; Thread::ALL.len()] =
    [const { OnceLock::new() }; Thread::ALL.len()];

/// Checks that the kernel can enforce `mode`, installs the SIGSYS handler of `trap` and records the mode
/// for every thread. Call once, early in `main`, before any thread starts; the first call wins.
pub fn configure(mode: Mode) -> Result<(), SeccompError> {
    if SETTINGS.get().is_some() {
        return Ok(());
    }
    if let Some(action) = mode.action() {
        check_kernel_support(action)?;
    }
    if mode == Mode::Trap {
        install_sigsys_handler()?;
    }
    let _ = SETTINGS.set(Settings {
        mode,
        ids: Ids::of_this_process(),
    });
    Ok(())
}

/// The directories of the files the main thread publishes at the end (`--result`, `--trace`), as
/// descriptors: its filter allows linking and renaming within them and opens for reading only.
static OUTPUT_DIRS: OnceLock<Vec<u64>> = OnceLock::new();

/// Records the directory descriptors of [`crate::output_file::OutputFile`]s. Call before the main
/// thread's filter is built; the first call wins.
pub fn allow_output_dirs(fds: &[std::os::fd::RawFd]) {
    let _ = OUTPUT_DIRS.set(
        fds.iter()
            .filter_map(|&fd| u64::try_from(fd).ok())
            .collect(),
    );
}

/// Installs the filter of `thread` on the calling thread. Without a [`configure`] first, the default
/// mode applies: a caller that forgot is filtered, not silently left open.
pub fn apply(thread: Thread) -> Result<(), SeccompError> {
    if SETTINGS.get().is_none() {
        configure(Mode::default())?;
    }
    let Some(settings) = SETTINGS.get() else {
        return Ok(());
    };
    let Some(action) = settings.mode.action() else {
        return Ok(());
    };
    let slot = &PROGRAMS[thread.index()];
    let programs = match slot.get() {
        Some(programs) => programs,
        None => {
            let built = programs(thread, action, &settings.ids)
                .map_err(|e| SeccompError::Build(thread.name(), e))?;
            slot.get_or_init(|| built)
        }
    };
    CURRENT.with(|c| c.set(Some(thread)));
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(thread.name(), e))?;
    }
    Ok(())
}

/// [`apply`] for a thread that has no way to report an error: a thread that cannot be filtered ends vmm
/// (status 125, one line) rather than run unfiltered.
pub fn apply_or_exit(thread: Thread) {
    if let Err(e) = apply(thread) {
        eprintln!("vmm: {e}");
        std::process::exit(EXIT_VMM_FAILED);
    }
}

/// The programs to install for `thread`, in order, with `action` for calls outside its list.
fn programs(thread: Thread, action: SeccompAction, ids: &Ids) -> Built<Vec<BpfProgram>> {
    let filter = SeccompFilter::new(allowlist(thread, ids)?, action, SeccompAction::Allow, ARCH)?;
    let mut list = vec![BpfProgram::try_from(filter)?];
    if thread == Thread::Control {
        // Threads started here (the stdin pump) come from glibc's pthread_create, which tries clone3
        // first. clone3 takes its flags in memory that a filter cannot read, so it fails with ENOSYS and
        // glibc falls back to clone, whose flags the allowlist checks. A second filter, because a filter
        // has one action for all its matches; the kernel takes the stricter answer of the two.
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, vec![])]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            ARCH,
        )?;
        list.push(BpfProgram::try_from(clone3)?);
    }
    Ok(list)
}

const ARCH: TargetArch = TargetArch::x86_64;

/// Values the filters compare arguments with that are only known at run time.
struct Ids {
    pid: u64,
    /// The signal that kicks a vCPU out of KVM_RUN (glibc's SIGRTMIN, not the kernel's).
    kick: u64,
}

impl Ids {
    fn of_this_process() -> Self {
        Ids {
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() } as u64,
            kick: libc::SIGRTMIN() as u64,
        }
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type Built<T> = Result<T, seccompiler::BackendError>;

mod kvm {
    // KVM_RUN = _IO(KVMIO, 0x80), as linux/kvm.h defines it
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
    // read by a vCPU thread after a triple fault, for --result (fault_dump.rs)
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_REGS,
        kvm_bindings::KVMIO,
        0x81,
        kvm_bindings::kvm_regs
    );
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_SREGS,
        kvm_bindings::KVMIO,
        0x83,
        kvm_bindings::kvm_sregs
    );
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_VCPU_EVENTS,
        kvm_bindings::KVMIO,
        0x9f,
        kvm_bindings::kvm_vcpu_events
    );
}

/// The allowlist of `thread`.
fn allowlist(thread: Thread, ids: &Ids) -> Built<Rules> {
    let mut rules = common(ids)?;
    let extra = match thread {
        Thread::Vmm => vmm(ids)?,
        Thread::Vcpu => vcpu()?,
        Thread::Control => control()?,
        Thread::Stdin => stdin()?,
        Thread::Watchdog => watchdog(),
    };
    for (nr, list) in extra {
        add(&mut rules, nr, list);
    }
    Ok(rules)
}

/// Adds `list` to the rules of `nr`. An empty list allows any arguments, and wins over any other.
fn add(rules: &mut Rules, nr: i64, list: Vec<SeccompRule>) {
    match rules.get_mut(&nr) {
        None => {
            rules.insert(nr, list);
        }
        Some(existing) if existing.is_empty() => {}
        Some(_) if list.is_empty() => {
            rules.insert(nr, list);
        }
        Some(existing) => existing.extend(list),
    }
}

/// Every syscall in `nrs`, with any arguments.
fn any(nrs: &[i64]) -> Vec<(i64, Vec<SeccompRule>)> {
    nrs.iter().map(|nr| (*nr, vec![])).collect()
}

/// Argument `arg` (32 bits wide) equals one of `values`.
fn arg_in(nr: i64, arg: u8, values: &[u64]) -> Built<(i64, Vec<SeccompRule>)> {
    let rules = values
        .iter()
        .map(|v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                *v,
            )?])
        })
        .collect::<Built<Vec<_>>>()?;
    Ok((nr, rules))
}

/// `(argument arg & mask) == value`, on 32 bits.
fn arg_masked(nr: i64, arg: u8, mask: u64, value: u64) -> Built<(i64, Vec<SeccompRule>)> {
    let rule = SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )?])?;
    Ok((nr, vec![rule]))
}

/// `ioctl(fd, request)` for these requests only.
fn allow_ioctls(requests: &[u64]) -> Built<(i64, Vec<SeccompRule>)> {
    arg_in(libc::SYS_ioctl, 1, requests)
}

/// `tgkill(pid, tid, sig)` to a thread of this process, with one of `signals`.
fn allow_tgkill(ids: &Ids, signals: &[u64]) -> Built<(i64, Vec<SeccompRule>)> {
    let rules = signals
        .iter()
        .map(|sig| {
            SeccompRule::new(vec![
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, ids.pid)?,
                SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *sig)?,
            ])
        })
        .collect::<Built<Vec<_>>>()?;
    Ok((libc::SYS_tgkill, rules))
}

/// What every thread needs, whatever it does: memory (glibc's malloc arenas grow and shrink in any
/// thread; never an executable mapping), futexes (locks, channels, joins), signal returns and masks, the
/// clock, randomness (HashMap keys), writing to stderr (error lines, the SIGSYS report), closing file
/// descriptors, ending the thread or the process, and glibc's abort() (a panic is an abort).
fn common(ids: &Ids) -> Built<Rules> {
    use libc::*;
    let mut rules = Rules::new();
    let mut list = any(&[
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_clock_gettime,
        SYS_gettimeofday,
        SYS_sched_yield,
        SYS_getrandom,
        SYS_write,
        SYS_close,
        SYS_getpid,
        SYS_gettid,
        SYS_exit,
        SYS_exit_group,
        SYS_restart_syscall,
    ]);
    let prot_exec = PROT_EXEC as u64;
    list.push(arg_masked(SYS_mmap, 2, prot_exec, 0)?);
    list.push(arg_masked(SYS_mprotect, 2, prot_exec, 0)?);
    list.push(arg_in(
        SYS_madvise,
        2,
        &[MADV_DONTNEED as u64, MADV_FREE as u64],
    )?);
    // wait and wake (glibc, Rust's locks and parkers, joins), private or not, with either clock; not the
    // requeue and priority-inheritance operations
    let futex_cmd = !(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME) as u32 as u64;
    let futex_rules = [FUTEX_WAIT, FUTEX_WAKE, FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET]
        .iter()
        .map(|op| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(futex_cmd),
                *op as u64,
            )?])
        })
        .collect::<Built<Vec<_>>>()?;
    list.push((SYS_futex, futex_rules));
    // dropping a descriptor in a debug build first checks that it is open (Rust's UB checks)
    list.push(arg_in(SYS_fcntl, 1, &[F_GETFD as u64])?);
    // abort(): raise(SIGABRT), then the default action restored if a handler returned
    list.push(allow_tgkill(ids, &[SIGABRT as u64])?);
    list.push(arg_in(SYS_rt_sigaction, 0, &[SIGABRT as u64])?);
    for (nr, l) in list {
        add(&mut rules, nr, l);
    }
    Ok(rules)
}

/// The main thread: the event loop (epoll; eventfds, timerfds and the signalfd; the block devices' reads,
/// writes and flushes; vsock's Unix socket pairs, non-blocking, read and written), the vCPU kicks and
/// the short sleeps of the teardown, then the result: /proc/self/status, mincore on guest memory, the
/// --trace and --result files, opened before (see `output_file.rs`) and published by a link and a
/// rename within their directories. It opens files for reading only, and removes or renames nothing
/// else. No KVM ioctl: nothing after set-up needs one.
fn vmm(ids: &Ids) -> Built<Vec<(i64, Vec<SeccompRule>)>> {
    use libc::*;
    let mut list = any(&[
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_epoll_ctl,
        SYS_read,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_fsync,
        SYS_fdatasync,
        SYS_recvfrom,
        SYS_sendto,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_shutdown,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_mincore,
        SYS_statx,
        SYS_newfstatat,
        SYS_fstat,
        SYS_lseek,
    ]);
    list.push(arg_masked(
        SYS_openat,
        2,
        (O_ACCMODE | O_CREAT | O_TRUNC) as u64,
        O_RDONLY as u64,
    )?);
    list.extend(publish_in(OUTPUT_DIRS.get().map_or(&[], Vec::as_slice))?);
    list.push(arg_in(SYS_socketpair, 0, &[AF_UNIX as u64])?);
    list.push(allow_ioctls(&[FIONBIO])?);
    list.push(allow_fcntl()?);
    list.push(allow_tgkill(ids, &[ids.kick])?);
    Ok(list)
}

/// Publishing an output file in one of `dirs` (descriptors): `linkat(AT_FDCWD, /proc/self/fd/N, dir,
/// partial, AT_SYMLINK_FOLLOW)`, `renameat(dir, partial, dir, name)` and, for a named partial file
/// left by a failure, `unlinkat(dir, partial)`.
fn publish_in(dirs: &[u64]) -> Built<Vec<(i64, Vec<SeccompRule>)>> {
    use libc::*;
    let eq = |arg: u8, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
    };
    let mut link = Vec::new();
    let mut rename = Vec::new();
    let mut unlink = Vec::new();
    for &dir in dirs {
        link.push(SeccompRule::new(vec![
            eq(0, AT_FDCWD as u32 as u64)?,
            eq(2, dir)?,
            eq(4, AT_SYMLINK_FOLLOW as u64)?,
        ])?);
        rename.push(SeccompRule::new(vec![eq(0, dir)?, eq(2, dir)?])?);
        unlink.push(SeccompRule::new(vec![eq(0, dir)?])?);
    }
    if dirs.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![
        (SYS_linkat, link),
        (SYS_renameat, rename.clone()),
        (SYS_renameat2, rename),
        (SYS_unlinkat, unlink),
    ])
}

/// A vCPU thread: KVM_RUN, and what the devices do on a port or MMIO access: write an eventfd (an
/// interrupt, the end of the VM), write the console to stderr, shut down vsock streams when the driver
/// resets the device.
fn vcpu() -> Built<Vec<(i64, Vec<SeccompRule>)>> {
    let mut list = any(&[libc::SYS_shutdown]);
    // and, once the guest has triple-faulted, reading its state for the result (read-only)
    list.push(allow_ioctls(&[
        kvm::KVM_RUN(),
        kvm::KVM_GET_REGS(),
        kvm::KVM_GET_SREGS(),
        kvm::KVM_GET_VCPU_EVENTS(),
    ])?);
    Ok(list)
}

/// The watchdog: sleeping to its deadline, then asking whether stderr would take its line at once, with
/// an alarm as the backstop of that write.
fn watchdog() -> Vec<(i64, Vec<SeccompRule>)> {
    any(&[
        libc::SYS_alarm,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ])
}

/// The control thread: the protocol over its Unix socket, the command's stdout and stderr, starting
/// the stdin thread (whose first calls run under this filter), and copying files between the host and
/// the VM: ordinary file-system calls on paths, no network, no processes, no KVM.
fn control() -> Built<Vec<(i64, Vec<SeccompRule>)>> {
    use libc::*;
    let mut list = any(&[
        // the socket and our stdout/stderr
        SYS_read,
        SYS_readv,
        SYS_writev,
        SYS_recvfrom,
        SYS_sendto,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_shutdown,
        SYS_poll,
        SYS_ppoll,
        // files and directories, as copy-in and copy-out need them; glibc makes the old path calls
        // (mkdir, rename, readlink, chmod, ...) where x86_64 has them, so Rust's std::fs does too
        SYS_openat,
        SYS_pread64,
        SYS_pwrite64,
        SYS_lseek,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_statfs,
        SYS_fstatfs,
        SYS_getdents64,
        SYS_readlinkat,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_mkdirat,
        SYS_unlinkat,
        SYS_renameat,
        SYS_renameat2,
        SYS_linkat,
        SYS_symlinkat,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchown,
        SYS_fchownat,
        SYS_utimensat,
        SYS_fsetxattr,
        SYS_lsetxattr,
        SYS_fgetxattr,
        SYS_lgetxattr,
        SYS_flistxattr,
        SYS_llistxattr,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_fsync,
        SYS_fdatasync,
        SYS_copy_file_range,
        SYS_sendfile,
        SYS_splice,
        SYS_fadvise64,
        SYS_truncate,
        SYS_stat,
        SYS_lstat,
        SYS_access,
        SYS_mkdir,
        SYS_rmdir,
        SYS_unlink,
        SYS_rename,
        SYS_link,
        SYS_symlink,
        SYS_readlink,
        SYS_chmod,
        SYS_fchmodat2,
        SYS_chown,
        SYS_lchown,
        SYS_setxattr,
        SYS_getxattr,
        SYS_listxattr,
        SYS_removexattr,
        SYS_lremovexattr,
        SYS_fremovexattr,
        SYS_getcwd,
        SYS_umask,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        // what a thread started from here does before its own filter: glibc's start-up, Rust's
        // guard page and signal stack, the name, then installing that filter
        SYS_clone3,
        SYS_rseq,
        SYS_set_robust_list,
        SYS_sched_getaffinity,
    ]);
    list.push(allow_ioctls(&[FIONBIO, FIOCLEX, TCGETS])?);
    list.push(allow_fcntl()?);
    // threads, not processes: exactly the flags of glibc's pthread_create
    let thread_flags = CLONE_VM
        | CLONE_FS
        | CLONE_FILES
        | CLONE_SIGHAND
        | CLONE_THREAD
        | CLONE_SYSVSEM
        | CLONE_SETTLS
        | CLONE_PARENT_SETTID
        | CLONE_CHILD_CLEARTID;
    list.push(arg_in(SYS_clone, 0, &[thread_flags as u64])?);
    list.push(arg_in(
        SYS_prctl,
        0,
        &[
            PR_SET_NAME as u64,
            PR_GET_NAME as u64,
            PR_SET_NO_NEW_PRIVS as u64,
        ],
    )?);
    let rule = SeccompRule::new(vec![
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(SECCOMP_SET_MODE_FILTER),
        )?,
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0)?,
    ])?;
    list.push((SYS_seccomp, vec![rule]));
    Ok(list)
}

/// The stdin thread: read our stdin, send it to the guest.
fn stdin() -> Built<Vec<(i64, Vec<SeccompRule>)>> {
    use libc::*;
    Ok(any(&[
        SYS_read,
        SYS_readv,
        SYS_sendto,
        SYS_sendmsg,
        SYS_writev,
    ]))
}

/// fcntl for duplicating descriptors (`try_clone`) and their flags (`set_nonblocking`, close-on-exec).
fn allow_fcntl() -> Built<(i64, Vec<SeccompRule>)> {
    use libc::*;
    let cmds = [F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL];
    arg_in(
        SYS_fcntl,
        1,
        &cmds.iter().map(|c| *c as u64).collect::<Vec<_>>(),
    )
}

/// Asks the kernel whether it knows `action` (SECCOMP_GET_ACTION_AVAIL, Linux 4.14): a kernel without
/// seccomp filters, or too old for the action, fails here, before any VM exists.
fn check_kernel_support(action: SeccompAction) -> Result<(), SeccompError> {
    let value: u32 = action.into();
    // SAFETY: seccomp(SECCOMP_GET_ACTION_AVAIL) reads one u32 from the pointer, which points to `value`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &value as *const u32,
        )
    };
    if rc != 0 {
        return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
    }
    Ok(())
}

thread_local! {
    /// The kind of the calling thread's filter, for the SIGSYS report.
    static CURRENT: Cell<Option<Thread>> = const { Cell::new(None) };
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty mask and no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised and its handler only makes async-signal-safe calls; a null
    // old-action pointer is allowed.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The SIGSYS handler of `--seccomp trap`: one line on stderr, then the process ends with 125. It
/// allocates nothing and calls only write and _exit, which every filter allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // For SIGSYS the union holds { void *call_addr; int syscall; unsigned arch; } at offset 16, so the
    // system call number is the 7th int (as Firecracker reads it).
    // SAFETY: siginfo_t is 128 bytes; offset 24 is within it.
    let nr = unsafe { *(info as *const i32).add(6) };
    let thread = CURRENT.with(|c| c.get()).map(Thread::name).unwrap_or("?");
    let mut line = Line::default();
    if code == SYS_SECCOMP {
        line.push(b"vmm: the ");
        line.push(thread.as_bytes());
        line.push(b" thread made system call ");
        line.push_number(nr);
        line.push(
            b", which its seccomp filter does not allow: vmm stopped. This is a bug in vmm or an \
              attack from the guest; --seccomp log lets such calls run and logs them\n",
        );
    } else {
        line.push(b"vmm: unexpected SIGSYS: vmm stopped\n");
    }
    // SAFETY: write and _exit are async-signal-safe; `line` is valid for its length.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_VMM_FAILED);
    }
}

/// A fixed buffer for the SIGSYS report (no allocation in a signal handler).
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 320],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i32) {
        let mut digits = [0u8; 11];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests;
