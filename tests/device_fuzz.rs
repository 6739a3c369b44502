//! The device-fuzzing guest (tests/fuzz-guest) against vmm, for a fixed set of seeds.
//!
//! The guest is a kernel-less PVH ELF that drives vmm's virtio-mmio devices, ports and MMIO gap for a
//! seeded budget of operations and then resets the VM. It needs no guest kernel, so it runs directly on
//! this machine's /dev/kvm (a PVM host runs it at full speed: see tests/fuzz-guest/start.S). For every
//! seed, vmm must end by itself within its --timeout, with status 0, 124 or 125 and at most one line on
//! stderr; never die of a signal, a panic or a seccomp violation; and keep its peak RSS bounded.
//!
//!     cargo test -p vmm --test device_fuzz                         # the CI seeds
//!     VMM_FUZZ_SEEDS=1000..2000 cargo test -p vmm --test device_fuzz -- --nocapture   # a campaign
//!
//! VMM_FUZZ_SEEDS takes `A..B` (B excluded), `A..=B` or a comma-separated list; VMM_FUZZ_OPS the budget
//! of operations per seed. Every seed with `seed % 4 == 3` runs with `--cmd true`, so that the guest's
//! connection to the control port is taken by vmm's control thread and carries guest-init frames. A
//! failing seed is printed with the command that reruns it.

// Test crates: a failed unwrap or expect is a failed test, and test data is small. clippy.toml's
// allow-*-in-tests covers #[test] functions only, not the helpers beside them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use support::*;

/// Seeds CI runs: about 6 s each in a debug build on the project's busy 2-CPU PVM machines, so about
/// 1.5 minutes; four of them (3, 7, 11, 15) with --cmd.
const CI_SEEDS: std::ops::RangeInclusive<u64> = 1..=16;
/// Operations per seed (the guest's fuzz.ops).
const DEFAULT_OPS: u64 = 1000;
/// vmm's --timeout for one seed; a seed takes a few seconds.
const TIMEOUT_SECS: u64 = 60;
/// Guest memory: the guest touches at most its 16 MiB arena, its image and the boot structures.
const MEM_MIB: u64 = 128;
/// The bound on vmm's peak RSS: the guest pages it touches (under 20 MiB) plus vmm's own few MiB, with
/// room to spare.
const MAX_RSS_KIB: u64 = 64 * 1024;
/// The bound on vmm's own memory: peak RSS less the guest memory resident at the end (guest memory only
/// grows). It is 2-4 MiB in these runs; what grows with what the guest does (exit counters, vsock
/// queues, connections) must stay far below this.
const MAX_OWN_RSS_KIB: u64 = 16 * 1024;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn work_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("device-fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Builds the guest with tests/fuzz-guest/build.sh (gcc and ld; it renames the finished file into
/// place) and returns its path.
fn build_guest() -> PathBuf {
    let out = work_dir().join("fuzz-guest.elf");
    let script = repo().join("tests/fuzz-guest/build.sh");
    let o = Command::new("sh")
        .arg(&script)
        .arg(&out)
        .output()
        .expect("run tests/fuzz-guest/build.sh");
    assert!(
        o.status.success(),
        "building the fuzzing guest failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A 1 MiB disk image with a recognisable pattern (the block device serves it read-only). Written
/// beside its path and renamed: a campaign running from the same directory never sees it half written.
fn disk_image() -> PathBuf {
    let path = work_dir().join("fuzz-disk.img");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    if std::fs::read(&path).ok().as_ref() != Some(&data) {
        // tests run in parallel threads of one process: each writer needs a name of its own
        static WRITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = work_dir().join(format!("fuzz-disk.img.{}-{n}", std::process::id()));
        std::fs::write(&tmp, &data).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// `A..B`, `A..=B` or `a,b,c`.
fn parse_seeds(spec: &str) -> Vec<u64> {
    let num = |s: &str| -> u64 {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("VMM_FUZZ_SEEDS: {s:?} is not a number"))
    };
    if let Some((a, b)) = spec.split_once("..=") {
        (num(a)..=num(b)).collect()
    } else if let Some((a, b)) = spec.split_once("..") {
        (num(a)..num(b)).collect()
    } else {
        spec.split(',').map(num).collect()
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("VMM_FUZZ_SEEDS") {
        Ok(spec) if !spec.trim().is_empty() => parse_seeds(&spec),
        _ => CI_SEEDS.collect(),
    }
}

fn ops() -> u64 {
    std::env::var("VMM_FUZZ_OPS")
        .ok()
        .map(|s| s.trim().parse().expect("VMM_FUZZ_OPS is a number"))
        .unwrap_or(DEFAULT_OPS)
}

/// The arguments of vmm for one seed.
fn vmm_args(
    guest: &Path,
    disk: &Path,
    result: &Path,
    seed: u64,
    ops: u64,
    extra: &[&str],
) -> Vec<String> {
    let with_command = seed % 4 == 3;
    let mut append = format!("fuzz.seed={seed} fuzz.ops={ops}");
    for e in extra {
        append += " ";
        append += e;
    }
    if with_command {
        append += " fuzz.cmd=1";
    }
    let mut args: Vec<String> = [
        "--allow-slow-host",
        "--kernel",
        &guest.display().to_string(),
        "--rootfs",
        &disk.display().to_string(),
        "--mem",
        &MEM_MIB.to_string(),
        "--timeout",
        &TIMEOUT_SECS.to_string(),
        "--result",
        &result.display().to_string(),
        "--append",
        &append,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if with_command {
        args.extend(["--cmd".to_string(), "true".to_string()]);
    }
    args
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What one seed's run came to.
struct Outcome {
    seed: u64,
    /// Why it fails the test, if it does.
    failure: Option<String>,
    status: Option<i32>,
    secs: f64,
    exits: u64,
    peak_rss_kib: Option<u64>,
    end: String,
}

fn run_seed(guest: &Path, disk: &Path, seed: u64, ops: u64) -> Outcome {
    run_seed_with(guest, disk, seed, ops, &[])
}

/// One seed, with `extra` added to the guest's command line.
fn run_seed_with(guest: &Path, disk: &Path, seed: u64, ops: u64, extra: &[&str]) -> Outcome {
    let result = work_dir().join(format!("result-{seed}.json"));
    let _ = std::fs::remove_file(&result);
    let args = vmm_args(guest, disk, &result, seed, ops, extra);
    let rerun = std::iter::once(vmm_bin().display().to_string())
        .chain(args.iter().cloned())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let o = output_unless_hung(vmm().args(&args));
    let secs = started.elapsed().as_secs_f64();
    let err = stderr(&o);
    let json: Option<serde_json::Value> = std::fs::read_to_string(&result)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let peak_rss_kib = json.as_ref().and_then(|j| j["peak_rss_kib"].as_u64());
    let guest_kib = json
        .as_ref()
        .and_then(|j| j["guest_resident_kib"].as_u64())
        .unwrap_or(0);
    let exits = json
        .as_ref()
        .and_then(|j| j["exits"].as_array())
        .map_or(0, |list| {
            list.iter().filter_map(|e| e["count"].as_u64()).sum()
        });
    let end = json
        .as_ref()
        .map(|j| j["end"].to_string())
        .unwrap_or_else(|| "(no --result)".into());

    let mut problems = Vec::new();
    match o.status.code() {
        Some(0 | 124 | 125) => {}
        Some(code) => problems.push(format!("exit status {code} (wanted 0, 124 or 125)")),
        None => {
            use std::os::unix::process::ExitStatusExt;
            problems.push(format!(
                "killed by signal {:?}{}",
                o.status.signal(),
                if o.status.core_dumped() {
                    " (core dumped)"
                } else {
                    ""
                }
            ));
        }
    }
    if err.lines().count() > 1 {
        problems.push(format!(
            "{} lines on stderr, wanted at most one",
            err.lines().count()
        ));
    }
    for sign in [
        "panicked",
        "seccomp filter does not allow",
        "SIGSYS",
        "RUST_BACKTRACE",
    ] {
        if err.contains(sign) {
            problems.push(format!("stderr says {sign:?}"));
        }
    }
    if err.contains("triple-fault") || err.contains("guest crashed") {
        // The guest never faults on its own (it touches only memory it owns): a bug in it, or vmm
        // wrote guest memory it was not given.
        problems.push("the fuzzing guest crashed".into());
    }
    match peak_rss_kib {
        Some(kib) if kib > MAX_RSS_KIB => problems.push(format!(
            "peak RSS {kib} KiB, over the bound of {MAX_RSS_KIB} KiB"
        )),
        Some(kib) if kib.saturating_sub(guest_kib) > MAX_OWN_RSS_KIB => problems.push(format!(
            "peak RSS {kib} KiB, of which {} KiB is not guest memory: over the bound of {MAX_OWN_RSS_KIB} KiB",
            kib.saturating_sub(guest_kib)
        )),
        Some(_) => {}
        // vmm writes --result on every ending it controls (not when its watchdog ends it)
        None if o.status.code() == Some(124) => {}
        None => problems.push("no --result written".into()),
    }
    let failure = (!problems.is_empty()).then(|| {
        format!(
            "seed {seed}: {}\n  stderr: {}\n  rerun: {rerun}",
            problems.join("; "),
            err.trim()
        )
    });
    Outcome {
        seed,
        failure,
        status: o.status.code(),
        secs,
        exits,
        peak_rss_kib,
        end,
    }
}

#[test]
fn every_seed_ends_cleanly_with_bounded_memory() {
    let guest = build_guest();
    let disk = disk_image();
    let ops = ops();
    let seeds = seeds();
    let started = Instant::now();
    let mut failures = Vec::new();
    let (mut total_exits, mut max_rss) = (0u64, 0u64);
    for &seed in &seeds {
        let outcome = run_seed(&guest, &disk, seed, ops);
        total_exits += outcome.exits;
        max_rss = max_rss.max(outcome.peak_rss_kib.unwrap_or(0));
        eprintln!(
            "fuzz seed {:>6}: status {:>4} in {:>6.2} s, {:>7} exits to vmm, peak RSS {:>6} KiB, end {}{}",
            outcome.seed,
            outcome
                .status
                .map_or_else(|| "sig".to_string(), |c| c.to_string()),
            outcome.secs,
            outcome.exits,
            outcome
                .peak_rss_kib
                .map_or_else(|| "?".to_string(), |k| k.to_string()),
            outcome.end,
            if outcome.failure.is_some() { "  FAILED" } else { "" }
        );
        if let Some(f) = outcome.failure {
            eprintln!("{f}");
            failures.push(f);
        }
    }
    eprintln!(
        "fuzz: {} seeds x {ops} operations in {:.1} s, {total_exits} exits to vmm, highest peak RSS {max_rss} KiB, {} failed",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
}

/// A guest that touches ~110,000 distinct unbacked MMIO pages (only the MMIO-gap operation, fuzz.mask=256)
/// must not make vmm's own memory grow with them (finding 6: when vmm's exit counters kept one entry per
/// 4 KiB MMIO page, 3000 operations (170,000 pages) peaked at 48 MiB, 47 MiB of it vmm's own, and wrote
/// an 11 MiB --result).
#[test]
fn many_unbacked_mmio_pages_do_not_grow_vmm() {
    let guest = build_guest();
    let disk = disk_image();
    let args = ["fuzz.mask=256"];
    let outcome = run_seed_with(&guest, &disk, 5, 2000, &args);
    if let Some(f) = outcome.failure {
        panic!("{f}");
    }
}

#[test]
fn seed_lists_parse() {
    assert_eq!(parse_seeds("3..6"), vec![3, 4, 5]);
    assert_eq!(parse_seeds("3..=5"), vec![3, 4, 5]);
    assert_eq!(parse_seeds("7, 9,11"), vec![7, 9, 11]);
}
