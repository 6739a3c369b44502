//! Full-system tests: each boots our guest kernel in a real VM with `vmm` and asserts on what the guest
//! did. They need hardware-virt KVM: on a host without it cargo's runner runs this binary inside the
//! emulated KVM test host (tests/testhost/run).

// Test crates: a failed unwrap or expect is a failed test, and test data is small. clippy.toml's
// allow-*-in-tests covers #[test] functions only, not the helpers beside them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

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
    let status = wait_unless_hung(&mut r.child, HUNG_AFTER);
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
    let status = wait_unless_hung(&mut r.child, HUNG_AFTER);
    // sh forwards nothing: the process group gets SIGTERM and sh dies of it
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

/// A signal must end the run even when it cannot reach the command: here the command reads none of its
/// stdin, so the stdin pump is blocked on a full channel to the guest, and the signal's frame could only
/// queue behind it. vmm keeps offering it and ends the run after the signal's grace period (it used to
/// block its event loop forever, --timeout included).
#[test]
fn sigterm_ends_the_run_while_stdin_is_backed_up() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut r = spawn_script("echo started; sleep 100", Stdio::piped());
    assert_eq!(r.next_line(), "started");
    let mut stdin = r.child.stdin.take().expect("piped");
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    std::thread::spawn(move || {
        let chunk = vec![b'y'; 64 << 10];
        while stdin.write_all(&chunk).is_ok() {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    // until the writer has stalled: everything between it and the guest is full
    let mut last = u64::MAX;
    for _ in 0..60 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = written.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    let status = wait_unless_hung(&mut r.child, std::time::Duration::from_secs(60));
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
    assert_eq!(wait_unless_hung(&mut a.child, HUNG_AFTER).code(), Some(0));
    assert_eq!(wait_unless_hung(&mut b.child, HUNG_AFTER).code(), Some(0));
    assert_eq!(out_a, ["/marker-a"]);
    assert_eq!(out_b, ["/marker-b"]);
}

// --- vmm's own isolation ---------------------------------------------------------------------------

/// The threads of a running vmm: (name, Seccomp mode, Seccomp_filters) from /proc, sorted by name.
fn seccomp_of_threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("vmm's threads") {
        let dir = task.expect("a thread").path();
        // a thread that ended meanwhile has nothing left to read
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(u32::MAX)
        };
        threads.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    threads.sort();
    threads
}

/// Starts a command that prints a line and waits, with stdin kept open so every thread is alive, and
/// returns vmm's threads as [`seccomp_of_threads`] sees them while it runs.
fn threads_while_running(extra: &[&str]) -> Vec<(String, u32, u32)> {
    require_artifacts();
    let mut child = vmm()
        .args(["--timeout", "120", "--cmd", "echo started; sleep 100"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().expect("piped")));
    let first = lines.next().and_then(Result::ok);
    let threads = seccomp_of_threads(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(first.as_deref(), Some("started"));
    threads
}

#[test]
fn every_thread_of_vmm_runs_under_its_seccomp_filter() {
    let threads = threads_while_running(&[]);
    // mode 2 is SECCOMP_MODE_FILTER; the control thread adds the clone3 filter, the stdin thread
    // (started by it) inherits both and adds its own; --timeout's watchdog has its own
    let expected = [
        ("control", 2),
        ("stdin", 3),
        ("vcpu0", 1),
        ("vmm", 1),
        ("watchdog", 1),
    ];
    let got: Vec<(&str, u32, u32)> = threads
        .iter()
        .map(|(name, mode, filters)| (name.as_str(), *mode, *filters))
        .collect();
    assert_eq!(
        got,
        expected.map(|(name, filters)| (name, 2, filters)),
        "every thread filtered: {threads:?}"
    );
}

#[test]
fn seccomp_off_leaves_every_thread_unfiltered() {
    let threads = threads_while_running(&["--seccomp", "off"]);
    assert!(threads.len() >= 3, "{threads:?}");
    assert!(
        threads.iter().all(|(_, mode, _)| *mode == 0),
        "no thread filtered: {threads:?}"
    );
}

// --- container images: import, cache, docker run parity -----------------------------------------------

mod oci {
    //! Builds small container images for the tests: an OCI image layout and a `docker save` tarball.

    use sha2::{Digest, Sha256};
    use std::path::Path;

    pub enum Entry<'a> {
        Dir(&'a str),
        File(&'a str, u32, &'a [u8]),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        /// A file whose name is written as is, past the tar crate's own path checks (hostile input).
        RawFile(&'a str, &'a [u8]),
    }

    pub fn layer(entries: &[Entry]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            match e {
                Entry::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, &[][..]).expect("dir");
                }
                Entry::File(p, mode, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).expect("file");
                }
                Entry::Symlink(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).expect("symlink");
                }
                Entry::RawFile(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    let name = &mut h.as_old_mut().name;
                    name[..p.len()].copy_from_slice(p.as_bytes());
                    h.set_cksum();
                    b.append(&h, *data).expect("raw file");
                }
                Entry::HardLink(p, target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_mode(0o644);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).expect("hard link");
                }
            }
        }
        b.into_inner().expect("tar")
    }

    pub fn sha(data: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(data))
    }

    fn blob(dir: &Path, data: &[u8]) -> String {
        let digest = sha(data);
        let path = dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(path, data).expect("blob");
        digest
    }

    pub fn config(layers: &[Vec<u8>], env: &[&str], workdir: &str, cmd: &[&str]) -> Vec<u8> {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": env, "WorkingDir": workdir, "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("config")
    }

    /// An OCI image layout with uncompressed layers.
    pub fn layout(dir: &Path, layers: &[Vec<u8>], config: &[u8]) {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        let config_digest = blob(dir, config);
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|l| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(dir, l), "size": l.len()}))
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layer_descs,
        }))
        .expect("manifest");
        let manifest_digest = blob(dir, &manifest);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(),
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        });
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("index"),
        )
        .expect("index.json");
    }

    /// A `docker save` tarball (the older layout: <id>/layer.tar).
    pub fn docker_save(path: &Path, layers: &[Vec<u8>], config: &[u8]) {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).expect("entry");
        };
        let config_name = format!("{}.json", sha(config).trim_start_matches("sha256:"));
        add(&config_name, config);
        let mut layer_names = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let name = format!("layer{i}/layer.tar");
            add(&name, l);
            layer_names.push(name);
        }
        let manifest = serde_json::json!([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": layer_names}]);
        add(
            "manifest.json",
            &serde_json::to_vec(&manifest).expect("manifest"),
        );
        std::fs::write(path, b.into_inner().expect("tar")).expect("write");
    }
}

/// A two-layer image: busybox and a tree in the first layer; in the second a whiteout, an opaque
/// directory, a symlink, a hard link and a setuid file.
fn test_image_layers() -> (Vec<Vec<u8>>, Vec<u8>) {
    use oci::Entry::*;
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static on the host");
    let applets = [
        "sh", "ls", "cat", "echo", "pwd", "readlink", "stat", "id", "touch", "sync",
    ];
    let mut base = vec![Dir("bin/"), File("bin/busybox", 0o755, &busybox)];
    base.extend(
        applets
            .iter()
            .map(|a| Symlink(Box::leak(format!("bin/{a}").into_boxed_str()), "busybox")),
    );
    base.extend([
        Dir("etc/"),
        File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:100::/home:/bin/sh\n",
        ),
        File("etc/group", 0o644, b"root:x:0:\nusers:x:100:\n"),
        Dir("data/"),
        File("data/keep.txt", 0o644, b"kept\n"),
        File("data/gone.txt", 0o644, b"deleted by a whiteout\n"),
        Dir("opq/"),
        File("opq/old.txt", 0o644, b"hidden by an opaque whiteout\n"),
        Dir("proc/"),
        Dir("sys/"),
        Dir("dev/"),
        Dir("tmp/"),
    ]);
    let top = vec![
        File("data/.wh.gone.txt", 0o644, b""),
        File("opq/.wh..wh..opq", 0o644, b""),
        File("opq/new.txt", 0o644, b"new\n"),
        Symlink("link", "data/keep.txt"),
        HardLink("hard", "data/keep.txt"),
        File("bin/suid", 0o4755, b"#!/bin/sh\n"),
    ];
    let layers = vec![oci::layer(&base), oci::layer(&top)];
    let config = oci::config(
        &layers,
        &["GREETING=hello from the image", "PATH=/bin"],
        "/data",
        &["/bin/sh", "-c", "echo default-cmd; id -u"],
    );
    (layers, config)
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

#[test]
fn oci_image_runs_with_its_merged_tree_and_config_and_is_cached() {
    let dir = scratch_dir("oci");
    let (layers, config) = test_image_layers();
    let layout = dir.join("layout");
    oci::layout(&layout, &layers, &config);
    let cache = dir.join("cache");
    let image_args = [
        "--image",
        layout.to_str().expect("utf-8"),
        "--cache-dir",
        cache.to_str().expect("utf-8"),
    ];

    // no command: the image's Cmd runs
    let o = run(vmm().args(["--timeout", "120"]).args(image_args));
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "default-cmd\n0\n");
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .expect("cache")
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(entries.len(), 1, "one cache entry");
    let ext4 = entries[0].path().join("rootfs.ext4");
    let mtime = std::fs::metadata(&ext4)
        .expect("rootfs.ext4")
        .modified()
        .expect("mtime");

    let script = "pwd; echo $GREETING; ls /data; ls /opq; readlink /link; stat -c %h /data/keep.txt; stat -c %a /bin/suid";
    let o = run(vmm()
        .args(["--timeout", "120"])
        .args(image_args)
        .args(["--cmd", script]));
    assert_code(&o, 0);
    assert_eq!(
        stdout(&o),
        "/data\nhello from the image\nkeep.txt\nnew.txt\ndata/keep.txt\n2\n4755\n"
    );
    assert_eq!(
        std::fs::metadata(&ext4)
            .expect("rootfs.ext4")
            .modified()
            .expect("mtime"),
        mtime,
        "cache hit: not rebuilt"
    );

    // flags override the image's config
    let o = run(vmm().args(["--timeout", "120"]).args(image_args).args([
        "--workdir",
        "/opq",
        "--env",
        "GREETING=flag",
        "--user",
        "1000",
        "--cmd",
        "pwd; echo $GREETING; id -u; id -g",
    ]));
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "/opq\nflag\n1000\n100\n");

    let ls = run(vmm().args(["image", "ls", "--cache-dir", cache.to_str().expect("utf-8")]));
    assert_code(&ls, 0);
    assert_eq!(stdout(&ls).lines().count(), 1);
}

#[test]
fn docker_save_tarball_runs_too() {
    let dir = scratch_dir("docker-save");
    let (layers, config) = test_image_layers();
    let tarball = dir.join("image.tar");
    oci::docker_save(&tarball, &layers, &config);
    let o = run(vmm()
        .args([
            "--timeout",
            "120",
            "--image",
            tarball.to_str().expect("utf-8"),
            "--cache-dir",
        ])
        .arg(dir.join("cache"))
        .args(["--cmd", "ls /data /opq; cat /hard"]));
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "/data:\nkeep.txt\n\n/opq:\nnew.txt\nkept\n");
}

#[test]
fn hostile_image_is_refused_and_writes_nothing_outside() {
    use oci::Entry::*;
    let dir = scratch_dir("hostile");
    let evil = oci::layer(&[Dir("ok/"), RawFile("ok/../../escaped", b"pwned\n")]);
    let tarball = dir.join("evil.tar");
    std::fs::write(&tarball, evil).expect("write");
    let cache = dir.join("cache");
    let o = run(vmm().args([
        "image",
        "import",
        tarball.to_str().expect("utf-8"),
        "--cache-dir",
        cache.to_str().expect("utf-8"),
    ]));
    assert_code(&o, 125);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(!dir.join("escaped").exists() && !std::env::temp_dir().join("escaped").exists());
    let left: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "no cache entry from a refused import: {left:?}"
    );
}

/// What a tree holds, entry by entry: (relative path, description of the entry). Files are described by
/// mode and full content, links by their target, so equal snapshots mean equal trees.
fn snapshot(root: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let rel = p
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let mode = m.permissions().mode() & 0o7777;
            let what = if m.file_type().is_symlink() {
                format!(
                    "link -> {}",
                    std::fs::read_link(&p).expect("readlink").display()
                )
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else {
                let data = std::fs::read(&p).expect("read");
                // a cheap content digest (FNV-1a) keeps failure messages short
                let digest = data.iter().fold(0xcbf29ce484222325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
                });
                format!("file {mode:o} {} bytes {digest:016x}", data.len())
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn copy_in_and_copy_out_round_trip_a_workspace() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("copy");
    let src = dir.join("src");
    let long = "d".repeat(60) + "/" + &"e".repeat(60);
    std::fs::create_dir_all(src.join("sub/empty")).expect("mkdir");
    std::fs::create_dir_all(src.join(&long)).expect("mkdir");
    std::fs::write(src.join("sub/a"), noise(3 << 20, 1)).expect("write");
    std::fs::write(src.join("sub/b"), noise(12345, 2)).expect("write");
    std::fs::write(src.join(&long).join("f"), b"deep\n").expect("write");
    std::fs::write(src.join(".wh.not-a-whiteout"), b"kept\n").expect("write");
    std::fs::write(
        src.join("build.sh"),
        "#!/bin/sh\nset -e\ncat sub/a sub/b > out.bin\nmkdir gen\necho made > gen/x\n",
    )
    .expect("write");
    std::fs::set_permissions(src.join("build.sh"), PermissionsExt::from_mode(0o750))
        .expect("chmod");
    std::fs::set_permissions(src.join("sub/b"), PermissionsExt::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::symlink("sub/a", src.join("link")).expect("symlink");
    let before = snapshot(&src);

    let out = dir.join("out");
    let result = dir.join("result.json");
    let o = run(vmm().args([
        "--timeout",
        "300",
        "--user",
        "1000:1000",
        "--workdir",
        "/work",
        "--copy-in",
        &format!("{}:/work", src.display()),
        "--copy-out",
        &format!("/work:{}", out.display()),
        "--copy-out",
        &format!("/work/gen/x:{}", out.display()),
        "--result",
        result.to_str().expect("utf-8"),
        "--cmd",
        "./build.sh && stat -c '%u:%g' sub/a && sha256sum < link",
    ]));
    assert_code(&o, 0);
    let lines: Vec<&str> = o
        .stdout
        .split(|b| *b == b'\n')
        .filter_map(|l| std::str::from_utf8(l).ok())
        .collect();
    assert_eq!(
        lines[0], "1000:1000",
        "copied-in files belong to the command's user"
    );

    let mut after = snapshot(&out.join("work"));
    // what the build made, checked, then set aside: the rest is exactly what went in
    let made = after.remove("out.bin").expect("out.bin came back");
    let mut joined = noise(3 << 20, 1);
    joined.extend(noise(12345, 2));
    let expect_dir = dir.join("expect");
    std::fs::create_dir_all(&expect_dir).expect("mkdir");
    std::fs::write(expect_dir.join("out.bin"), &joined).expect("write");
    let made_mode = made.split(' ').nth(1).expect("mode").to_string();
    std::fs::set_permissions(
        expect_dir.join("out.bin"),
        PermissionsExt::from_mode(u32::from_str_radix(&made_mode, 8).expect("octal")),
    )
    .expect("chmod");
    assert_eq!(snapshot(&expect_dir)["out.bin"], made);
    assert_eq!(
        after.remove("gen/x").expect("gen/x").split(' ').nth(2),
        Some("5")
    );
    assert!(after.remove("gen").is_some());
    assert_eq!(after, before, "the tree that went in came back unchanged");
    assert_eq!(
        std::fs::read(out.join("x")).expect("single file"),
        b"made\n"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result).expect("result")).expect("JSON");
    assert!(json["copy_in_bytes"].as_u64().expect("copy_in_bytes") >= 3 << 20);
    assert!(json["copy_out_bytes"].as_u64().expect("copy_out_bytes") >= 6 << 20);
    // the copies ran under Landlock where the kernel has it (the test host's does)
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only returns the ABI
    // version (or an error); it reads no memory.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    let landlock = abi > 0;
    if landlock {
        // "partial" on a kernel whose Landlock is older than the rights vmm asks for (6.1: ABI 2)
        let confined = json["copies_confined"].as_str().unwrap_or("absent");
        assert!(matches!(confined, "full" | "partial"), "{json}");
    }
    assert!(json["timings_ms"]["copy_in"].as_f64().is_some());
    assert_eq!(json["copy_out_errors"].as_array().map(Vec::len), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn copy_out_of_what_the_guest_made_never_writes_outside_the_target() {
    let dir = scratch_dir("copy-hostile");
    let out = dir.join("out");
    let host_passwd = std::fs::read("/etc/passwd").unwrap_or_default();
    // the command plants links to the outside and odd files; a second stream then names a directory
    // where the first put a link
    let o = run_script(
        "mkdir -p /out /d/out/esc && cd /out && ln -s /etc esc && ln -s /etc/passwd abs \
         && ln -s ../../.. up && mkfifo fifo && echo x > .wh.abs && echo pwned > /d/out/esc/passwd \
         && echo '#!/bin/sh' > suid && chmod 6755 suid && mkdir sticky && chmod 3777 sticky",
        &[
            "--copy-out",
            &format!("/out:{}", out.display()),
            "--copy-out",
            &format!("/d/out:{}", out.display()),
        ],
    );
    assert_code(&o, 0);
    let got = snapshot(&out.join("out"));
    assert_eq!(got["abs"], "link -> /etc/passwd");
    assert_eq!(got["up"], "link -> ../../..");
    assert!(got[".wh.abs"].starts_with("file "), "{got:?}");
    assert!(!got.contains_key("fifo"), "FIFOs are left out: {got:?}");
    // no setuid or setgid bit reaches the host (the sticky bit of a directory may)
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::symlink_metadata(out.join("out").join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("sticky"), 0o1777);
    // the second stream replaced the link with a real directory, and wrote nothing through it
    assert!(got["esc"].starts_with("dir "), "{got:?}");
    assert_eq!(
        std::fs::read(out.join("out/esc/passwd")).expect("passwd"),
        b"pwned\n"
    );
    assert_eq!(
        std::fs::read("/etc/passwd").unwrap_or_default(),
        host_passwd
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_copy_out_fails_a_successful_command_and_keeps_a_failed_ones_status() {
    let dir = scratch_dir("copy-missing");
    let out = format!("/no/such/file:{}", dir.join("out").display());
    let o = run_script("true", &["--copy-out", &out]);
    assert_code(&o, 125);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("copy-out of /no/such/file"),
        "{}",
        stderr(&o)
    );
    let o = run_script("exit 3", &["--copy-out", &out]);
    assert_code(&o, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that triple-faults at once (tests/bench/null-guest/mkelf.py --triple-fault: `ud2` under an
/// empty IDT) ends vmm with 125, and --result holds the guest's state for diagnosis. Where KVM keeps the
/// registers at a shutdown exit (Intel), they show the faulting instruction and the value the guest left
/// in RAX; AMD's KVM resets the vCPU first, and the dump says so.
#[test]
fn a_triple_fault_is_reported_with_the_guest_state_in_the_result() {
    let dir = scratch_dir("triple-fault");
    let guest = dir.join("triple-fault.elf");
    let made = std::process::Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/bench/null-guest/mkelf.py"
        ))
        .arg("--triple-fault")
        .arg(&guest)
        .status()
        .expect("run mkelf.py");
    assert!(made.success(), "mkelf.py --triple-fault failed");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let result = dir.join("result.json");
    let o = output_unless_hung(vmm().args([
        "--allow-slow-host",
        "--timeout",
        "60",
        "--mem",
        "128",
        "--kernel",
        guest.to_str().expect("utf-8"),
        "--rootfs",
        disk.to_str().expect("utf-8"),
        "--result",
        result.to_str().expect("utf-8"),
    ]));
    assert_code(&o, 125);
    assert!(stderr(&o).contains("triple-fault"), "{}", stderr(&o));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result).expect("result")).expect("JSON");
    let fault = &json["triple_fault"];
    assert_eq!(fault["vcpu"], "vcpu0", "{json}");
    assert!(
        fault["errors"].as_array().expect("errors").is_empty(),
        "{fault}"
    );
    if fault["registers_reset_by_kvm"] == false {
        assert_eq!(fault["regs"]["rip"], "0x10000a", "{fault}");
        assert_eq!(fault["regs"]["rax"], "0x7f1e5eed", "{fault}");
        assert_eq!(fault["sregs"]["idt"]["limit"], "0x7", "{fault}");
    } else {
        assert_eq!(fault["regs"]["rip"], "0xfff0", "{fault}");
    }
    // the null guest never activates a virtio device
    assert!(
        fault["queues"].as_array().expect("queues").is_empty(),
        "{fault}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
