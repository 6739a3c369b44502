//! `vmm`'s own failures before any VM exists: each gives exit status 125 and one line saying what went
//! wrong and what to do. These need no KVM and run directly on any host.

// Test crates: a failed unwrap or expect is a failed test, and test data is small. clippy.toml's
// allow-*-in-tests covers #[test] functions only, not the helpers beside them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod support;

use std::process::Command;
use support::*;

fn vmm_cmd(args: &[&str]) -> std::process::Output {
    Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("start vmm")
}

/// A file of its own for each call: tests run in parallel, and one writing `disk.img` while another
/// reads it would see it empty.
fn temp(name: &str, content: &[u8]) -> std::path::PathBuf {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("vmm-cli-test-{}-{call}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[track_caller]
fn assert_one_line_failure(o: &std::process::Output, mentions: &str) {
    assert_code(o, 125);
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one line expected, got: {err}");
    assert!(err.starts_with("vmm: "), "{err}");
    assert!(err.contains(mentions), "expected {mentions:?} in: {err}");
}

#[test]
fn missing_kernel_is_one_line_and_125() {
    let disk = temp("disk.img", &[0; 4096]);
    let o = vmm_cmd(&[
        "--kernel",
        "/nonexistent/vmlinux",
        "--rootfs",
        disk.to_str().unwrap(),
        "--cmd",
        "true",
    ]);
    assert_one_line_failure(&o, "/nonexistent/vmlinux");
}

#[test]
fn file_that_is_not_a_kernel_is_one_line_and_125() {
    let disk = temp("disk.img", &[0; 4096]);
    let not_kernel = temp(
        "notes.txt",
        b"these are not the kernel you are looking for\n",
    );
    let o = vmm_cmd(&[
        "--kernel",
        not_kernel.to_str().unwrap(),
        "--rootfs",
        disk.to_str().unwrap(),
    ]);
    assert_one_line_failure(&o, "neither an ELF vmlinux nor a bzImage");
}

#[test]
fn missing_rootfs_is_one_line_and_125() {
    let kernel = temp("vmlinux", b"\x7fELF\x02\x01\x01");
    let o = vmm_cmd(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--rootfs",
        "/nonexistent/root.ext4",
    ]);
    assert_one_line_failure(&o, "/nonexistent/root.ext4");
}

#[test]
fn bad_flags_are_one_line_and_125() {
    let kernel = temp("vmlinux", b"\x7fELF\x02\x01\x01");
    let disk = temp("disk.img", &[0; 4096]);
    let (k, d) = (kernel.to_str().unwrap(), disk.to_str().unwrap());
    let o = vmm_cmd(&["--kernel", k, "--rootfs", d, "--mem", "1", "--cmd", "true"]);
    assert_one_line_failure(&o, "--mem 1");
    let o = vmm_cmd(&[
        "--kernel",
        k,
        "--rootfs",
        d,
        "--timeout",
        "soon",
        "--cmd",
        "true",
    ]);
    assert_one_line_failure(&o, "--timeout");
    let o = vmm_cmd(&["--kernel", k, "--rootfs", d, "--cmd", "true", "--", "ls"]);
    assert_one_line_failure(&o, "not both");
    let o = vmm_cmd(&["--no-such-flag"]);
    assert_code(&o, 125);
    let o = vmm_cmd(&[
        "--kernel",
        k,
        "--rootfs",
        d,
        "--net-allow",
        "10.0.0.1/8",
        "--cmd",
        "true",
    ]);
    assert_one_line_failure(&o, "--net-allow \"10.0.0.1/8\"");
    let o = vmm_cmd(&[
        "--kernel",
        k,
        "--rootfs",
        d,
        "--net-allow",
        "[::1:443",
        "--cmd",
        "true",
    ]);
    assert_one_line_failure(&o, "missing ']'");
}

#[test]
fn help_exits_zero() {
    let o = vmm_cmd(&["--help"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("--rootfs"));
}

/// The full-system tests' guard against a vmm that hangs past its own --timeout: it must describe the
/// process's threads, kill it and fail the test, not wait forever.
#[test]
fn a_hung_process_is_described_killed_and_fails_its_test() {
    let mut child = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("start sleep");
    let pid = child.id();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_unless_hung(&mut child, std::time::Duration::from_millis(200))
    }));
    let message = match outcome {
        Ok(status) => panic!("sleep 30 ended within 200 ms: {status}"),
        Err(payload) => payload.downcast::<String>().map(|m| *m).unwrap_or_default(),
    };
    assert!(message.contains("it hung"), "{message}");
    assert!(
        message.contains("\"sleep\""),
        "the thread's name: {message}"
    );
    assert!(message.contains("wchan"), "{message}");
    assert!(process_gone(pid as i32), "killed and reaped");
}

/// `--timeout` bounds the whole run, the steps before the VM included: a host tool that never returns
/// (here a `debugfs` that sleeps, standing for any stuck step the event loop cannot interrupt) is ended
/// by the watchdog, 5 s after the deadline, with 124 and one line; and the tool dies with vmm.
#[test]
fn timeout_ends_vmm_even_when_a_step_before_the_vm_is_stuck() {
    let disk = temp("disk.img", &[0; 4096]);
    let bin = disk.parent().expect("dir").join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let pid_file = bin.join("debugfs.pid");
    let fake = bin.join("debugfs");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
            pid_file.display()
        ),
    )
    .expect("write the fake debugfs");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(vmm_bin());
    cmd.env("PATH", path).args([
        "--timeout",
        "0.5",
        "--user",
        "builder",
        "--rootfs",
        disk.to_str().expect("utf-8"),
        "--kernel",
        disk.to_str().expect("utf-8"),
        "--cmd",
        "true",
    ]);
    let o = output_unless_hung(&mut cmd);
    assert_code(&o, 124);
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("--timeout"), "{err}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("the fake debugfs ran")
        .trim()
        .parse()
        .expect("a pid");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !process_gone(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(process_gone(pid), "the stuck tool outlived vmm");
}

/// vmm ships as one static-pie binary (.cargo/config.toml): no program interpreter to load, still
/// position independent. A RUSTFLAGS in the environment replaces the config's flags and would quietly
/// build a dynamic binary; this catches that.
#[test]
fn vmm_is_a_static_pie() {
    let elf = std::fs::read(vmm_bin()).expect("read the vmm binary");
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().expect("8 bytes"));
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16_at(16), 3, "ET_DYN: position independent");
    let (phoff, phentsize, phnum) = (
        u64_at(32) as usize,
        u16_at(54) as usize,
        u16_at(56) as usize,
    );
    const PT_INTERP: u32 = 3;
    let interp = (0..phnum).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP);
    assert!(
        !interp,
        "vmm has a program interpreter: it was linked dynamically"
    );
}
