//! Full-system tests: each boots our guest kernel in a real VM with `vmm` and asserts on what the guest
//! did. They need hardware-virt KVM: on a host without it cargo's runner runs this binary inside the
//! emulated KVM test host (tests/testhost/run).

mod support;

use std::io::Write;
use std::process::Stdio;
use support::*;

// --- the boot path: our kernel to PID 1 on the virtio-blk root, without guest-init -----------------------

/// Boots the image's own PID 1 (a shell script given on the kernel command line).
fn boot_with_init(script: &str, extra: &[&str]) -> std::process::Output {
    let append = format!("init=/bin/sh -- -c \"{script}\"");
    run(vmm()
        .args(["--timeout", "120", "--console", "--append", &append])
        .args(extra))
}

#[test]
fn pid1_prints_a_line_and_a_reset_ends_the_vm() {
    let o = boot_with_init("echo vmm-boot-ok; reboot -f", &[]);
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("vmm-boot-ok"),
        "the console shows PID 1's line: {}",
        stderr(&o)
    );
}

#[test]
fn pid1_powering_off_ends_the_vm() {
    let o = boot_with_init("echo powering-off; poweroff -f", &[]);
    assert_code(&o, 0);
    assert!(stderr(&o).contains("powering-off"));
}

#[test]
fn root_is_the_virtio_blk_image_read_only() {
    let o = boot_with_init(
        "mount -t proc proc /proc; grep ' / ' /proc/mounts; touch /x || echo write-refused; reboot -f",
        &[],
    );
    assert_code(&o, 0);
    let err = stderr(&o);
    assert!(
        err.contains("/dev/root / ext4 ro") || err.contains("/dev/vda / ext4 ro"),
        "{err}"
    );
    assert!(err.contains("write-refused"), "{err}");
}

#[test]
fn two_vcpus_boot_and_are_online() {
    let o = run_script(
        "grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online",
        &["--vcpus", "2"],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "2\n0-1\n");
}

#[test]
fn without_console_the_kernel_prints_nothing() {
    let o = run_script("echo quiet", &[]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "quiet\n");
    assert_eq!(stderr(&o), "", "no kernel log without --console");
}

// --- the main job: guest-init runs the command and behaves like it ------------------------------------

#[test]
fn stdout_and_stderr_arrive_on_their_own_streams_in_order() {
    let o = run_script(
        "echo out1; echo err1 >&2; echo out2; echo err2 >&2; printf 'no newline'",
        &[],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "out1\nout2\nno newline");
    assert_eq!(stderr(&o), "err1\nerr2\n");
}

#[test]
fn output_is_streamed_while_the_command_runs() {
    // The command blocks on stdin until the test has seen its first line: buffered output would deadlock
    // (and the run would end at its timeout with the wrong status).
    let mut r = spawn_script("echo before; read reply; echo after:$reply", Stdio::piped());
    assert_eq!(r.next_line(), "before");
    let mut stdin = r.child.stdin.take().expect("piped");
    stdin.write_all(b"go\n").expect("write stdin");
    drop(stdin);
    assert_eq!(r.next_line(), "after:go");
    let status = r.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn exit_codes_are_the_commands() {
    for (script, expected) in [
        ("true", 0),
        ("exit 1", 1),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -9 $$", 137),
    ] {
        let o = run_script(script, &[]);
        assert_code(&o, expected);
    }
}

#[test]
fn program_not_found_is_127_and_not_executable_is_126() {
    let o = run(vmm().args(["--timeout", "120", "--", "/no/such/program"]));
    assert_code(&o, 127);
    assert!(stderr(&o).contains("/no/such/program"), "{}", stderr(&o));
    let o = run(vmm().args(["--timeout", "120", "--", "/etc/passwd"]));
    assert_code(&o, 126);
    let o = run(vmm().args(["--timeout", "120", "--", "no-such-command-in-path"]));
    assert_code(&o, 127);
}

#[test]
fn argv_runs_without_a_shell() {
    let o = run(vmm().args(["--timeout", "120", "--", "/bin/echo", "a  b", "$HOME", "*"]));
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "a  b $HOME *\n");
}

#[test]
fn stdin_is_forwarded_and_ends() {
    require_artifacts();
    let mut child = vmm()
        .args(["--timeout", "120", "--cmd", "wc -l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start vmm");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"a\nb\n")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    assert_code(&o, 0);
    assert_eq!(stdout(&o).trim(), "2");
}

#[test]
fn env_workdir_and_user_apply() {
    let o = run_script(
        "echo $GREETING; pwd; id -u; id -g; echo $PATH",
        &[
            "--env",
            "GREETING=hello world",
            "--workdir",
            "/tmp",
            "--user",
            "1000:100",
        ],
    );
    assert_code(&o, 0);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..4], ["hello world", "/tmp", "1000", "100"], "{out}");
    assert!(lines[4].contains("/bin"), "a default PATH: {out}");
}

#[test]
fn timeout_tears_the_vm_down_with_124() {
    // The limit covers the whole run, boot included: long enough for a slow (emulated) host to boot.
    let o = run(vmm().args(["--timeout", "15", "--cmd", "echo started; sleep 100"]));
    assert_code(&o, 124);
    assert_eq!(stdout(&o), "started\n");
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
}

#[test]
fn many_mib_of_output_lose_nothing() {
    let o = run_script(
        "head -c 24000000 /dev/urandom > /tmp/blob; sha256sum < /tmp/blob >&2; cat /tmp/blob",
        &["--mem", "512"],
    );
    assert_code(&o, 0);
    assert_eq!(o.stdout.len(), 24_000_000);
    let guest_sum = stderr(&o)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    assert_eq!(sha256(&o.stdout), guest_sum);
}

#[test]
fn sigterm_reaches_the_command_and_ends_the_vm() {
    let mut r = spawn_script("echo started; sleep 100", Stdio::null());
    assert_eq!(r.next_line(), "started");
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    let status = r.child.wait().expect("wait");
    // sh forwards nothing: the process group gets SIGTERM and sh dies of it
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn killing_the_parent_of_vmm_ends_vmm() {
    require_artifacts();
    // A parent shell starts vmm in the background, tells us its pid, and waits.
    let script = format!(
        "{} --timeout 120 --cmd 'echo started; sleep 100' & echo $!; wait",
        vmm_bin().display()
    );
    let mut parent = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start the parent shell");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        parent.stdout.take().expect("piped"),
    ));
    let vmm_pid: i32 = lines
        .next()
        .expect("pid line")
        .expect("read")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(lines.next().expect("line").expect("read"), "started");
    parent.kill().expect("kill the parent");
    parent.wait().expect("reap the parent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !process_gone(vmm_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "vmm {vmm_pid} outlived its parent"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn writes_in_the_guest_never_reach_the_image() {
    require_artifacts();
    let image =
        PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/vmm/rootfs/busybox.ext4");
    let before = sha256_file(&image);
    let o = run_script(
        "echo changed > /etc/hostname; rm -rf /bin/ls; mkdir /new; sync; cat /etc/hostname",
        &[],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "changed\n");
    assert_eq!(
        sha256_file(&image),
        before,
        "the base image must never be written"
    );
}

#[test]
fn result_file_says_how_the_run_ended() {
    let dir = std::env::temp_dir().join(format!("vmm-result-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("result.json");
    let o = run(vmm().args([
        "--timeout",
        "120",
        "--result",
        path.to_str().expect("utf-8"),
        "--cmd",
        "echo hi; exit 3",
    ]));
    assert_code(&o, 3);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("result")).expect("JSON");
    assert_eq!(json["exit_code"], 3);
    assert_eq!(json["status"]["code"], 3);
    assert_eq!(json["end"]["kind"], "command-exited");
    assert_eq!(json["stdout_bytes"], 3);
    assert!(json["timings_ms"]["boot"].as_f64().expect("boot time") > 0.0);
    assert!(json["exits"]
        .as_array()
        .expect("exits")
        .iter()
        .any(|e| e["kind"].as_str().is_some_and(|k| k.contains("virtio"))));
}

use std::path::PathBuf;

#[test]
fn trace_is_trace_event_json_with_host_and_guest_phases() {
    let dir = std::env::temp_dir().join(format!("vmm-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("trace.json");
    let o = run(vmm().args([
        "--timeout",
        "120",
        "--console",
        "--trace",
        path.to_str().expect("utf-8"),
        "--cmd",
        "true",
    ]));
    assert_code(&o, 0);
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("trace")).expect("JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents array");
    // The trace-event format: every event has a name, a phase, a pid; timed ones a ts in µs; complete
    // events ("X") a duration.
    for e in events {
        assert!(e["name"].is_string(), "{e}");
        let ph = e["ph"].as_str().expect("ph");
        assert!(["X", "i", "C", "M"].contains(&ph), "{e}");
        assert!(e["pid"].is_u64(), "{e}");
        if ph != "M" {
            assert!(e["ts"].as_f64().is_some_and(|t| t >= 0.0), "{e}");
        }
        if ph == "X" {
            assert!(e["dur"].as_f64().is_some_and(|d| d >= 0.0), "{e}");
        }
    }
    let names: Vec<&str> = events.iter().filter_map(|e| e["name"].as_str()).collect();
    for expected in [
        "kvm and memory set up",
        "kernel loaded",
        "first KVM_RUN",
        "kernel entry",
        "init started",
        "root mounted",
        "vsock connected",
        "command started",
        "command exited",
        "teardown",
        "vm exits",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    // guest milestones, stamped by the host clock, come in order
    let ts = |n: &str| {
        events
            .iter()
            .find(|e| e["name"] == n)
            .and_then(|e| e["ts"].as_f64())
            .expect(n)
    };
    assert!(ts("kernel entry") < ts("init started"));
    assert!(ts("init started") < ts("command started"));
    assert!(ts("command started") <= ts("command exited"));
    // with --console the kernel's printk lines are there too
    assert!(events.iter().any(|e| e["cat"] == "printk"), "printk events");
    assert!(trace["otherData"]["exits"]
        .as_object()
        .is_some_and(|m| !m.is_empty()));
}

#[test]
fn scratch_disk_holds_more_than_memory_and_is_deleted() {
    // 100 MB does not fit the default tmpfs of a 128 MiB guest (50% of RAM); on the scratch disk it does.
    let script = "head -c 100000000 /dev/zero > /tmp/big && wc -c < /tmp/big && echo x > /etc/new && cat /etc/new";
    let o = run_script(script, &["--mem", "128", "--scratch", "512M"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "100000000\nx\n");
    let without = run_script(script, &["--mem", "128"]);
    assert_ne!(
        code(&without),
        0,
        "the same write must not fit in guest memory"
    );
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vmm-scratch-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "scratch files left behind: {leftovers:?}"
    );
}

#[test]
fn two_vms_from_one_image_see_nothing_of_each_other() {
    let script = |me: &str| format!("echo {me} > /marker-{me}; echo ready; read go; ls /marker-*");
    let mut a = spawn_script(&script("a"), Stdio::piped());
    let mut b = spawn_script(&script("b"), Stdio::piped());
    // both VMs are up and have written their marker before either looks
    assert_eq!(a.next_line(), "ready");
    assert_eq!(b.next_line(), "ready");
    for r in [&mut a, &mut b] {
        r.child
            .stdin
            .take()
            .expect("piped")
            .write_all(b"go\n")
            .expect("write");
    }
    let out_a: Vec<String> = a.lines.by_ref().map_while(Result::ok).collect();
    let out_b: Vec<String> = b.lines.by_ref().map_while(Result::ok).collect();
    assert_eq!(a.child.wait().expect("wait").code(), Some(0));
    assert_eq!(b.child.wait().expect("wait").code(), Some(0));
    assert_eq!(out_a, ["/marker-a"]);
    assert_eq!(out_b, ["/marker-b"]);
}
