//! `--trace FILE`: the whole run as one timeline in Chrome's trace-event JSON format (opens in Perfetto
//! and chrome://tracing). Host phases are complete events on the vmm process; guest milestones are instant
//! events on the guest process, stamped by the host clock at the moment the guest reached them (timestamp
//! device), and with `--console` the kernel's own printk lines, placed by their printk time from the first
//! KVM_RUN. VM exits by kind and bytes through each device are counter events and `otherData`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::result::RunResult;

const HOST_PID: u32 = 1;
const GUEST_PID: u32 = 2;

/// What the trace is made of.
pub struct TraceInput<'a> {
    pub start: Instant,
    /// Host phases: each ends at its mark and starts at the previous one.
    pub host_marks: &'a [(String, Duration)],
    pub first_run: Option<Instant>,
    pub vm_ended: Instant,
    /// Host work beside the phases (copy-in, copy-out), as (name, start, end), on the control thread.
    pub host_spans: Vec<(String, Instant, Instant)>,
    /// Guest milestones as (name, host time).
    pub guest_stamps: Vec<(String, Instant)>,
    /// Kernel log lines with their printk time (seconds since the kernel started).
    pub printk: &'a [(f64, String)],
    pub result: &'a RunResult,
}

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e9).round() / 1e3
}

/// `t` on CLOCK_MONOTONIC (which Instant reads on Linux), in nanoseconds: where the trace's zero lies on
/// the clock that perf, ftrace and a launcher's own stamps use, so the trace can be lined up with them
/// (the benchmarks take exec to vmm's start from it).
fn clock_monotonic_ns_at(t: Instant) -> u64 {
    // 2^64 ns is 584 years: an elapsed time past it saturates, and so does the subtraction
    let elapsed = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    clock_monotonic_ns().saturating_sub(elapsed)
}

/// Now on CLOCK_MONOTONIC, in nanoseconds.
fn clock_monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, ours, and CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn meta(pid: u32, name: &str) -> Value {
    json!({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
}

/// The trace as a JSON value.
pub fn build(input: &TraceInput) -> Value {
    let at = |t: Instant| us(t.saturating_duration_since(input.start));
    let mut events = vec![meta(HOST_PID, "vmm (host)"), meta(GUEST_PID, "guest")];

    let mut marks = input.host_marks.to_vec();
    marks.sort_by_key(|(_, end)| *end);
    let mut phase_start = Duration::ZERO;
    for (name, end) in &marks {
        events.push(json!({
            "name": name, "cat": "host", "ph": "X", "pid": HOST_PID, "tid": 1,
            "ts": us(phase_start), "dur": us(end.saturating_sub(phase_start)),
        }));
        phase_start = phase_start.max(*end);
    }
    let total = us(input.start.elapsed());
    events.push(json!({
        "name": "teardown", "cat": "host", "ph": "X", "pid": HOST_PID, "tid": 1,
        "ts": at(input.vm_ended), "dur": (total - at(input.vm_ended)).max(0.0),
    }));

    for (name, s, e) in &input.host_spans {
        events.push(json!({
            "name": name, "cat": "host", "ph": "X", "pid": HOST_PID, "tid": 2,
            "ts": at(*s), "dur": us(e.saturating_duration_since(*s)),
        }));
    }

    if let Some(first_run) = input.first_run {
        events.push(json!({
            "name": "guest running", "cat": "guest", "ph": "X", "pid": GUEST_PID, "tid": 1,
            "ts": at(first_run), "dur": us(input.vm_ended.saturating_duration_since(first_run)),
        }));
        events.push(json!({
            "name": "kernel entry", "cat": "guest", "ph": "i", "s": "p", "pid": GUEST_PID, "tid": 1,
            "ts": at(first_run),
        }));
        for (secs, line) in input.printk {
            events.push(json!({
                "name": line, "cat": "printk", "ph": "i", "s": "t", "pid": GUEST_PID, "tid": 2,
                "ts": at(first_run) + secs * 1e6,
            }));
        }
    }
    for (name, t) in &input.guest_stamps {
        events.push(json!({
            "name": name, "cat": "guest", "ph": "i", "s": "p", "pid": GUEST_PID, "tid": 1, "ts": at(*t),
        }));
    }

    let r = input.result;
    let exits: serde_json::Map<String, Value> = r
        .exits
        .iter()
        .map(|e| (e.kind.clone(), json!(e.count)))
        .collect();
    let bytes = json!({
        "virtio-blk read": r.block_bytes_read,
        "virtio-vsock to host": r.vsock_bytes_to_host,
        "virtio-vsock to guest": r.vsock_bytes_to_guest,
        "stdout": r.stdout_bytes,
        "stderr": r.stderr_bytes,
        "copy-in": r.copy_in_bytes,
        "copy-out": r.copy_out_bytes,
    });
    let end_ts = at(input.vm_ended);
    events.push(json!({"name": "vm exits", "ph": "C", "pid": HOST_PID, "tid": 1, "ts": end_ts, "args": exits}));
    events.push(
        json!({"name": "bytes", "ph": "C", "pid": HOST_PID, "tid": 1, "ts": end_ts, "args": bytes}),
    );
    // With --net: frames and bytes each way, and the frames the policy dropped, by reason.
    let network: Option<serde_json::Map<String, Value>> =
        r.devices.iter().find(|d| d.name == "virtio-net").map(|d| {
            d.counters
                .iter()
                .map(|(n, v)| ((*n).to_string(), json!(v)))
                .collect()
        });
    if let Some(network) = &network {
        events.push(
            json!({"name": "network", "ph": "C", "pid": HOST_PID, "tid": 1, "ts": end_ts, "args": network}),
        );
    }

    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "start_clock_monotonic_ns": clock_monotonic_ns_at(input.start),
            "exit_code": r.exit_code,
            "exits": exits,
            "bytes": bytes,
            "timings_ms": r.timings_ms,
            "network": network,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::{EndReason, Timings};

    fn result() -> RunResult {
        RunResult {
            exit_code: 0,
            status: None,
            end: EndReason::CommandExited,
            error: None,
            timings_ms: Timings::default(),
            stdout_bytes: 1,
            stderr_bytes: 2,
            copy_in_bytes: 0,
            copy_out_bytes: 0,
            copy_out_errors: Vec::new(),
            copies_confined: None,
            block_bytes_read: 3,
            vsock_bytes_to_host: 4,
            vsock_bytes_to_guest: 5,
            vsock_malformed_packets: 0,
            exits: vec![crate::result::ExitCount {
                kind: "pio-write 0x440".into(),
                count: 5,
            }],
            devices: Vec::new(),
            peak_rss_kib: 0,
            guest_resident_kib: 0,
            triple_fault: None,
        }
    }

    #[test]
    fn trace_has_the_trace_event_shape() {
        let start = Instant::now();
        let marks = vec![("arguments parsed".to_string(), Duration::from_micros(100))];
        let r = result();
        let trace = build(&TraceInput {
            start,
            host_marks: &marks,
            first_run: Some(start + Duration::from_millis(1)),
            vm_ended: start + Duration::from_millis(50),
            guest_stamps: vec![("init started".into(), start + Duration::from_millis(20))],
            host_spans: vec![("copy-in".into(), start, start + Duration::from_millis(1))],
            printk: &[(0.01, "Run /init".into())],
            result: &r,
        });
        let events = trace["traceEvents"].as_array().unwrap();
        for e in events {
            assert!(
                e["name"].is_string() && e["ph"].is_string() && e["pid"].is_u64(),
                "{e}"
            );
            if e["ph"] != "M" {
                assert!(e["ts"].as_f64().unwrap() >= 0.0, "{e}");
            }
            if e["ph"] == "X" {
                assert!(e["dur"].as_f64().unwrap() >= 0.0, "{e}");
            }
        }
        let printk = events.iter().find(|e| e["cat"] == "printk").unwrap();
        assert_eq!(printk["ts"].as_f64().unwrap(), 1000.0 + 10_000.0);
        assert_eq!(trace["otherData"]["exits"]["pio-write 0x440"], 5);
        // the start on CLOCK_MONOTONIC: at most now, and not long before
        let now_ns = clock_monotonic_ns();
        let start_ns = trace["otherData"]["start_clock_monotonic_ns"]
            .as_u64()
            .expect("a number");
        assert!(
            start_ns <= now_ns && now_ns - start_ns < 60_000_000_000,
            "{start_ns} vs {now_ns}"
        );
    }
}
