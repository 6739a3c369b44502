//! What the full-system tests share: running `vmm` and looking at what it did.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one vmm run may take before a test calls it hung. Every run of these tests has a --timeout
/// of at most 120 s, so a vmm still running well past it is stuck where its own timeout cannot reach.
/// A hang then fails its test with a description of where vmm's threads were, instead of stopping CI.
pub const HUNG_AFTER: Duration = Duration::from_secs(300);

/// The vmm binary cargo built for these tests.
pub fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmm"))
}

/// A `vmm` command with stdin closed; the tests give each run its --timeout.
pub fn vmm() -> Command {
    let mut c = Command::new(vmm_bin());
    c.stdin(Stdio::null());
    c
}

/// The default artifacts must exist: tests/run (and .ci/run) build them.
pub fn require_artifacts() {
    let cache = std::env::var_os("VMM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/vmm")
        });
    for artifact in ["guest-vmlinux", "rootfs/busybox.ext4"] {
        assert!(
            cache.join(artifact).exists(),
            "{} is missing: run tests/run (it builds the kernel and the test image)",
            cache.join(artifact).display()
        );
    }
}

/// Runs vmm to its end. One retry when the guest crashed with a triple fault: a workaround for the
/// emulated KVM test host (nested SVM under QEMU TCG), where guests have triple-faulted under load and the
/// test host's own kernel has crashed. No such failure was ever traced to vmm: see
/// tests/testhost/TRIPLE-FAULT.md. A deterministic failure still fails.
pub fn run(cmd: &mut Command) -> Output {
    require_artifacts();
    let first = output_unless_hung(cmd);
    if code(&first) == 125 && stderr(&first).contains("triple-fault") {
        eprintln!(
            "warning: the guest triple-faulted; retrying once (the test host's known problem, see tests/testhost/TRIPLE-FAULT.md): {}",
            stderr(&first).trim()
        );
        return output_unless_hung(cmd);
    }
    first
}

/// `cmd.output()`, except that a vmm still running after [`HUNG_AFTER`] is described (see
/// [`describe_process`]), killed, and fails the test.
#[track_caller]
pub fn output_unless_hung(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let status = wait_unless_hung(&mut child, HUNG_AFTER);
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn read_in_background(
    pipe: Option<impl Read + Send + 'static>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Waits for `child` to end; past `limit` describes it, kills it and panics.
#[track_caller]
pub fn wait_unless_hung(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for vmm") {
            return status;
        }
        if Instant::now() >= deadline {
            let description = describe_process(child.id());
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vmm (pid {}) still ran after {limit:?} although its run has a --timeout: it hung\n{description}",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where each thread of process `pid` (and of its children) is: name, state, wait channel, the system
/// call it is in (number and arguments), and the kernel stack where the kernel shows it.
pub fn describe_process(pid: u32) -> String {
    let mut out = String::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.path())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut children = Vec::new();
    for task in tasks {
        let read = |name: &str| {
            std::fs::read_to_string(task.join(name))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|e| format!("({e})"))
        };
        let state = state_of(&read("stat")).unwrap_or_default().to_string();
        out += &format!(
            "  task {} {:?}: state {state}, wchan {}, syscall {}\n",
            task.file_name().unwrap_or_default().to_string_lossy(),
            read("comm"),
            read("wchan"),
            read("syscall"),
        );
        let stack = read("stack");
        if !stack.starts_with('(') && !stack.is_empty() {
            for frame in stack.lines() {
                out += &format!("      {frame}\n");
            }
        }
        children.extend(
            read("children")
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    for child in children {
        out += &format!("child {child}:\n{}", describe_process(child));
    }
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `script` in a VM with `extra` flags, and returns the output.
pub fn run_script(script: &str, extra: &[&str]) -> Output {
    run(vmm()
        .args(["--timeout", "120"])
        .args(extra)
        .args(["--cmd", script]))
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Asserts on an exit status, showing everything vmm said when it is wrong.
#[track_caller]
pub fn assert_code(o: &Output, expected: i32) {
    assert_eq!(
        code(o),
        expected,
        "exit status\n--- stdout:\n{}\n--- stderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// SHA-256 of `data`, by the host's sha256sum.
pub fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("piped");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    writer.join().expect("writer").expect("write to sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

pub fn sha256_file(path: &std::path::Path) -> String {
    sha256(&std::fs::read(path).expect("read file"))
}

/// A running vmm whose stdout we read line by line.
pub struct Running {
    pub child: Child,
    pub lines: std::io::Lines<BufReader<ChildStdout>>,
}

pub fn spawn_script(script: &str, stdin: Stdio) -> Running {
    require_artifacts();
    let mut child = vmm()
        .args(["--timeout", "120", "--cmd", script])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    Running { child, lines }
}

impl Running {
    /// The next line of the command's stdout.
    #[track_caller]
    pub fn next_line(&mut self) -> String {
        match self.lines.next() {
            Some(Ok(l)) => l,
            other => {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("expected a line of output, got {other:?}; stderr: {err}")
            }
        }
    }
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => state_of(&stat) == Some("Z"),
    }
}

/// The state field (R, S, D, Z, ...) of a /proc/.../stat line; it follows the name, which may itself
/// hold spaces and parentheses, hence the last ')'.
fn state_of(stat: &str) -> Option<&str> {
    stat.rsplit(')').next()?.split_whitespace().next()
}
