//! Each test forks a child that installs a thread's real filter and makes system calls; the parent
//! checks how the child ended. The test harness is multi-threaded, so after fork the child makes raw
//! system calls only, and ends with _exit. One exception: it compiles its filters itself, as they hold its
//! own pid (and so does the thread it starts in one test); that allocates, which glibc makes safe after
//! fork (its fork handlers reset malloc's locks).

use std::io::Read;
use std::os::fd::FromRawFd;

use super::*;

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signalled(i32),
}

/// The child's code when the body ran to its end.
const DONE: i32 = 0;

/// Forks; the child installs `thread`'s filters for `mode` and runs `body`, whose return value is its
/// exit status. Returns how the child ended and what it wrote to stderr.
fn in_child(thread: Thread, mode: Mode, body: impl FnOnce() -> i32) -> (End, String) {
    let action = mode.action().expect("a mode that filters");
    programs(thread, action.clone(), &Ids::of_this_process()).expect("the filters compile");
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child only makes async-signal-safe calls (sigaction, prctl, seccomp, the raw system
    // calls of `body`) and allocations (see the top of this file), and ends with _exit, never returning
    // into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: as above; fds[1] is our pipe's write end.
        unsafe {
            libc::dup2(fds[1], 2);
            if mode == Mode::Trap && install_sigsys_handler().is_err() {
                libc::_exit(98);
            }
            CURRENT.with(|c| c.set(Some(thread)));
            let Ok(programs) = programs(thread, action, &Ids::of_this_process()) else {
                libc::_exit(97);
            };
            for program in &programs {
                if seccompiler::apply_filter(program).is_err() {
                    libc::_exit(99);
                }
            }
            libc::_exit(body());
        }
    }
    // SAFETY: fds[1] is ours to close; fds[0] is ours and moves into the File.
    let mut read_end = unsafe {
        libc::close(fds[1]);
        std::fs::File::from_raw_fd(fds[0])
    };
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is writable.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let mut stderr = String::new();
    let _ = read_end.read_to_string(&mut stderr);
    let end = if libc::WIFEXITED(status) {
        End::Exited(libc::WEXITSTATUS(status))
    } else {
        End::Signalled(libc::WTERMSIG(status))
    };
    (end, stderr)
}

/// errno after a failed call.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A descriptor of an eventfd, for calls that need one (inherited by the child).
fn eventfd() -> i32 {
    // SAFETY: eventfd has no memory arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    fd
}

fn trapped(end: &(End, String), thread: &str, nr: i64) {
    assert_eq!(
        end.0,
        End::Exited(EXIT_VMM_FAILED),
        "trapped and exited 125: {end:?}"
    );
    let expected = format!("vmm: the {thread} thread made system call {nr}, which its seccomp");
    assert!(end.1.starts_with(&expected), "{:?}", end.1);
    assert_eq!(end.1.lines().count(), 1, "one line: {:?}", end.1);
}

#[test]
fn every_filter_compiles_in_every_mode() {
    let ids = Ids::of_this_process();
    for mode in [Mode::Trap, Mode::Kill, Mode::Log] {
        for thread in Thread::ALL {
            let action = mode.action().expect("filters");
            let programs = programs(thread, action, &ids).expect("compiles");
            let expected = if thread == Thread::Control { 2 } else { 1 };
            assert_eq!(programs.len(), expected, "{thread:?}");
            assert!(programs.iter().all(|p| !p.is_empty()));
        }
    }
    assert_eq!(Mode::Off.action(), None, "off installs nothing");
}

#[test]
fn kvm_run_is_the_request_number_of_linux_kvm_h() {
    assert_eq!(kvm::KVM_RUN(), 0xae80);
    // _IOR(KVMIO, nr, struct): the sizes of kvm_regs (144), kvm_sregs (312), kvm_vcpu_events (64)
    assert_eq!(kvm::KVM_GET_REGS(), 0x8090_ae81);
    assert_eq!(kvm::KVM_GET_SREGS(), 0x8138_ae83);
    assert_eq!(kvm::KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
}

#[test]
fn vcpu_may_read_the_guest_state_after_a_triple_fault() {
    let fd = eventfd();
    let end = in_child(Thread::Vcpu, Mode::Trap, || {
        let mut buf = [0u8; 512];
        for request in [
            kvm::KVM_GET_REGS(),
            kvm::KVM_GET_SREGS(),
            kvm::KVM_GET_VCPU_EVENTS(),
        ] {
            // SAFETY: the buffer is larger than any of the three structures; the kernel refuses the
            // request on an eventfd before it touches it.
            let rc = unsafe { libc::ioctl(fd, request, buf.as_mut_ptr()) };
            if rc != -1 || errno() != libc::ENOTTY {
                return 1;
            }
        }
        DONE
    });
    assert_eq!(end.0, End::Exited(DONE), "{}", end.1);
}

#[test]
fn vcpu_runs_kvm_run_and_writes_eventfds() {
    let fd = eventfd();
    let end = in_child(Thread::Vcpu, Mode::Trap, || {
        let one = 1u64;
        // SAFETY: raw system calls on our own descriptor and buffer.
        unsafe {
            // KVM_RUN passes the filter; the kernel refuses it on an eventfd.
            if libc::ioctl(fd, kvm::KVM_RUN(), 0) != -1 || errno() != libc::ENOTTY {
                return 1;
            }
            if libc::write(fd, (&one as *const u64).cast(), 8) != 8 {
                return 2;
            }
            let _ = libc::getpid();
            let _ = libc::sched_yield();
        }
        DONE
    });
    assert_eq!(end.0, End::Exited(DONE), "{}", end.1);
}

#[test]
fn vcpu_may_not_use_another_ioctl() {
    let fd = eventfd();
    let end = in_child(Thread::Vcpu, Mode::Trap, || {
        let mut on: libc::c_int = 1;
        // SAFETY: FIONBIO reads one int.
        unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) };
        1
    });
    trapped(&end, "vcpu", libc::SYS_ioctl);
}

#[test]
fn vcpu_may_not_open_a_file_or_a_socket() {
    let end = in_child(Thread::Vcpu, Mode::Trap, || {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
        1
    });
    trapped(&end, "vcpu", libc::SYS_openat);
    let end = in_child(Thread::Vcpu, Mode::Trap, || {
        // SAFETY: no memory arguments.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        1
    });
    trapped(&end, "vcpu", libc::SYS_socket);
}

#[test]
fn no_thread_may_map_executable_memory() {
    for thread in Thread::ALL {
        let end = in_child(thread, Mode::Trap, || {
            // SAFETY: a fresh anonymous mapping, unmapped again.
            unsafe {
                let len = 4096;
                let rw = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if rw == libc::MAP_FAILED {
                    return 1;
                }
                libc::mprotect(rw, len, libc::PROT_READ | libc::PROT_EXEC);
            }
            2
        });
        trapped(&end, thread.name(), libc::SYS_mprotect);
    }
}

#[test]
fn futex_requeue_is_not_allowed() {
    let end = in_child(Thread::Vmm, Mode::Trap, || {
        let word = 0u32;
        // SAFETY: FUTEX_CMP_REQUEUE on our own words; the filter stops it first.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                &word as *const u32,
                libc::FUTEX_CMP_REQUEUE | libc::FUTEX_PRIVATE_FLAG,
                1,
                1,
                &word as *const u32,
                0,
            )
        };
        1
    });
    trapped(&end, "vmm", libc::SYS_futex);
}

#[test]
fn vmm_makes_unix_socket_pairs_but_no_other_socket() {
    let end = in_child(Thread::Vmm, Mode::Trap, || {
        let mut pair = [0; 2];
        // SAFETY: socketpair writes two descriptors into `pair`.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) } != 0
        {
            return 1;
        }
        let mut on: libc::c_int = 1;
        // SAFETY: FIONBIO reads one int.
        if unsafe { libc::ioctl(pair[0], libc::FIONBIO, &mut on) } != 0 {
            return 2;
        }
        // SAFETY: no memory arguments.
        unsafe { libc::socketpair(libc::AF_INET, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) };
        3
    });
    trapped(&end, "vmm", libc::SYS_socketpair);
}

#[test]
fn vmm_signals_only_its_own_threads_with_the_kick() {
    let end = in_child(Thread::Vmm, Mode::Trap, || {
        // A thread id no thread has: had the filter let it through, nothing would be hit.
        // SAFETY: no memory arguments.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), i32::MAX, libc::SIGKILL) };
        1
    });
    trapped(&end, "vmm", libc::SYS_tgkill);
}

#[test]
fn vmm_may_not_use_kvm_after_set_up() {
    let fd = eventfd();
    let end = in_child(Thread::Vmm, Mode::Trap, || {
        // SAFETY: the filter stops it before the kernel sees it.
        unsafe { libc::ioctl(fd, kvm::KVM_RUN(), 0) };
        1
    });
    trapped(&end, "vmm", libc::SYS_ioctl);
}

extern "C" fn stdin_thread(_: *mut libc::c_void) -> *mut libc::c_void {
    // The stdin thread's own filter, on top of the control thread's it inherited; not null: it failed.
    let Ok(programs) = programs(Thread::Stdin, SeccompAction::Trap, &Ids::of_this_process()) else {
        return std::ptr::dangling_mut();
    };
    for program in &programs {
        if seccompiler::apply_filter(program).is_err() {
            return std::ptr::dangling_mut();
        }
    }
    std::ptr::null_mut()
}

#[test]
fn control_starts_threads_but_no_process() {
    let end = in_child(Thread::Control, Mode::Trap, || {
        let mut thread: libc::pthread_t = 0;
        let mut ret: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: a thread with default attributes running `stdin_thread`, joined before we go on.
        unsafe {
            // clone3 answers ENOSYS, and glibc falls back to clone with the thread flags
            if libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) != -1
                || errno() != libc::ENOSYS
            {
                return 1;
            }
            if libc::pthread_create(
                &mut thread,
                std::ptr::null(),
                stdin_thread,
                std::ptr::null_mut(),
            ) != 0
            {
                return 2;
            }
            if libc::pthread_join(thread, &mut ret) != 0 || !ret.is_null() {
                return 3;
            }
            // a process: clone with SIGCHLD, not the thread flags
            libc::fork();
        }
        4
    });
    trapped(&end, "control", libc::SYS_clone);
}

#[test]
fn control_reads_and_writes_files_but_opens_no_network_socket() {
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sub = std::ffi::CString::new(dir.join("sub").into_os_string().into_encoded_bytes())
        .expect("no NUL");
    let end = in_child(Thread::Control, Mode::Trap, || {
        // SAFETY: valid NUL-terminated paths.
        unsafe {
            if libc::mkdirat(libc::AT_FDCWD, sub.as_ptr(), 0o755) != 0 {
                return 1;
            }
            let fd = libc::openat(
                libc::AT_FDCWD,
                sub.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            );
            if fd < 0 || libc::fchmod(fd, 0o700) != 0 || libc::close(fd) != 0 {
                return 2;
            }
            if libc::unlinkat(libc::AT_FDCWD, sub.as_ptr(), libc::AT_REMOVEDIR) != 0 {
                return 3;
            }
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        }
        4
    });
    let _ = std::fs::remove_dir_all(&dir);
    trapped(&end, "control", libc::SYS_socket);
}

#[test]
fn stdin_may_not_open_files() {
    let end = in_child(Thread::Stdin, Mode::Trap, || {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
        1
    });
    trapped(&end, "stdin", libc::SYS_openat);
}

#[test]
fn kill_mode_kills_with_sigsys_and_log_mode_lets_the_call_run() {
    let end = in_child(Thread::Vcpu, Mode::Kill, || {
        // SAFETY: no memory arguments.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        1
    });
    assert_eq!(end.0, End::Signalled(libc::SIGSYS));
    let end = in_child(Thread::Vcpu, Mode::Log, || {
        // SAFETY: no memory arguments.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            1
        } else {
            DONE
        }
    });
    assert_eq!(end.0, End::Exited(DONE), "{}", end.1);
}

#[test]
fn the_report_writes_numbers() {
    let mut line = Line::default();
    line.push_number(0);
    line.push(b" ");
    line.push_number(435);
    line.push(b" ");
    line.push_number(-12);
    assert_eq!(&line.buf[..line.len], b"0 435 -12");
    let mut full = Line::default();
    full.push(&[b'x'; 400]);
    assert_eq!(full.len, full.buf.len(), "a long line is cut, not overrun");
}

#[test]
fn abort_still_aborts_in_every_thread() {
    // a panic in release builds is an abort(): it must end in SIGABRT, not in a seccomp report
    for thread in Thread::ALL {
        // SAFETY: abort has no preconditions.
        let end = in_child(thread, Mode::Trap, || unsafe { libc::abort() });
        assert_eq!(
            end.0,
            End::Signalled(libc::SIGABRT),
            "{thread:?}: {}",
            end.1
        );
    }
}

/// What copying files into and out of the VM does on the host, as the control thread will: a tar stream
/// made from a directory and unpacked into another, with modes, times, ownership and links.
fn tar_round_trip(src: &std::path::Path, dst: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder
        .append_dir_all("tree", src)
        .map_err(|e| format!("pack: {e}"))?;
    let stream = builder.into_inner().map_err(|e| format!("finish: {e}"))?;
    let mut archive = tar::Archive::new(stream.as_slice());
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(true);
    archive.unpack(dst).map_err(|e| format!("unpack: {e}"))?;
    let tree = dst.join("tree");
    let script = std::fs::metadata(tree.join("bin/run.sh")).map_err(|e| e.to_string())?;
    if script.permissions().mode() & 0o777 != 0o755 {
        return Err("mode lost".into());
    }
    let link = std::fs::read_link(tree.join("link")).map_err(|e| e.to_string())?;
    if link != std::path::Path::new("bin/run.sh") {
        return Err("symlink lost".into());
    }
    std::fs::rename(tree.join("data.txt"), tree.join("moved.txt")).map_err(|e| e.to_string())?;
    std::fs::copy(tree.join("moved.txt"), tree.join("copy.txt")).map_err(|e| e.to_string())?;
    std::fs::hard_link(tree.join("copy.txt"), tree.join("hard.txt")).map_err(|e| e.to_string())?;
    std::fs::set_permissions(
        tree.join("copy.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .map_err(|e| e.to_string())?;
    if std::fs::read(tree.join("hard.txt")).map_err(|e| e.to_string())? != b"payload" {
        return Err("content lost".into());
    }
    std::fs::remove_dir_all(&tree).map_err(|e| format!("remove: {e}"))?;
    Ok(())
}

#[test]
fn control_can_copy_a_tree_in_and_out_with_tar() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-tar-{}", std::process::id()));
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir_all(src.join("bin")).expect("src");
    std::fs::create_dir_all(&dst).expect("dst");
    std::fs::write(src.join("data.txt"), b"payload").expect("file");
    std::fs::write(src.join("bin/run.sh"), b"#!/bin/sh\n").expect("file");
    std::fs::set_permissions(
        src.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("bin/run.sh", src.join("link")).expect("symlink");
    // the child writes why it failed, if it did, to its stderr
    let end = in_child(Thread::Control, Mode::Trap, || {
        match tar_round_trip(&src, &dst) {
            Ok(()) => DONE,
            Err(e) => {
                // SAFETY: write to our stderr from a valid buffer.
                unsafe { libc::write(2, e.as_ptr().cast(), e.len()) };
                1
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(end.0, End::Exited(DONE), "{}", end.1);
}

#[test]
fn every_thread_may_drop_a_descriptor_in_a_debug_build() {
    let fd = eventfd();
    for thread in Thread::ALL {
        // SAFETY: `fd` is ours (a copy in the child); F_GETFD reads its flags.
        let end = in_child(thread, Mode::Trap, || unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 || libc::close(fd) != 0 {
                1
            } else {
                DONE
            }
        });
        assert_eq!(end.0, End::Exited(DONE), "{thread:?}: {}", end.1);
    }
}

#[test]
fn vmm_opens_files_for_reading_and_writes_none_but_its_outputs() {
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("result.json");
    let out = crate::output_file::OutputFile::create(&target).unwrap();
    allow_output_dirs(&[out.dir_fd()]);
    // the output is published under the filter
    let end = in_child(Thread::Vmm, Mode::Trap, || {
        // SAFETY: a valid NUL-terminated path; the descriptor is closed by _exit.
        if unsafe {
            libc::openat(
                libc::AT_FDCWD,
                c"/proc/self/status".as_ptr(),
                libc::O_RDONLY,
            )
        } < 0
        {
            return 2;
        }
        match out.publish(b"{}") {
            Ok(()) => DONE,
            Err(_) => 3,
        }
    });
    assert_eq!(end.0, End::Exited(DONE), "{end:?}");
    assert_eq!(std::fs::read(&target).unwrap(), b"{}");
    let path = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    let other = std::ffi::CString::new(dir.join("other").as_os_str().as_encoded_bytes()).unwrap();
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_CREAT,
        libc::O_RDONLY | libc::O_TRUNC,
    ] {
        let end = in_child(Thread::Vmm, Mode::Trap, || {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), flags, 0o644) };
            1
        });
        trapped(&end, "vmm", libc::SYS_openat);
    }
    let end = in_child(Thread::Vmm, Mode::Trap, || {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::unlinkat(libc::AT_FDCWD, path.as_ptr(), 0) };
        1
    });
    trapped(&end, "vmm", libc::SYS_unlinkat);
    let end = in_child(Thread::Vmm, Mode::Trap, || {
        // SAFETY: valid NUL-terminated paths.
        unsafe {
            libc::renameat(
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::AT_FDCWD,
                other.as_ptr(),
            )
        };
        1
    });
    trapped(&end, "vmm", libc::SYS_renameat);
    assert_eq!(std::fs::read(&target).unwrap(), b"{}");
    std::fs::remove_dir_all(&dir).unwrap();
}
