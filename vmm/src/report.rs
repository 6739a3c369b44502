//! The last step of a run: what was collected at teardown turned into the result (`--result`, the
//! exit status) and the timeline (`--trace`).

use std::time::{Duration, Instant};

use vmm_protocol::Milestone;

use crate::builder::Vm;
use crate::config::VmConfig;
use crate::control::ControlState;
use crate::lifecycle::Decision;
use crate::output_file::OutputFile;
use crate::result::{ms, summarize_exits, RunResult, Timings};
use crate::timeline::Timeline;
use crate::vcpu::ExitCounts;
use crate::verdict::conclude;

/// What teardown collected for the report.
pub struct Collected {
    pub vm: Vm,
    pub decision: Decision,
    pub exit_counts: Vec<ExitCounts>,
    pub control_state: Option<ControlState>,
    /// when the event loop decided
    pub ended_at: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write the trace to {0}: {1}")]
    Trace(String, #[source] std::io::Error),
}

/// Builds the result of the run and publishes its trace to `trace_out`.
pub fn report(
    config: &VmConfig,
    collected: Collected,
    mut timeline: Timeline,
    trace_out: Option<OutputFile>,
) -> Result<RunResult, ReportError> {
    let Collected {
        vm,
        decision,
        exit_counts,
        control_state,
        ended_at,
    } = collected;
    let verdict = conclude(config, &decision, control_state.as_ref());
    let first_run = exit_counts.iter().filter_map(|c| c.first_run).min();
    if let Some(t) = first_run {
        timeline.mark_at("first KVM_RUN", t);
    }
    let state = control_state.unwrap_or_default();
    let stamps = vm
        .observed
        .guest_stamps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let milestones = guest_milestone_times(&stamps, &state.milestones, first_run);
    let milestone_at = |m: Milestone| milestones.iter().find(|(k, _)| *k == m).map(|(_, t)| *t);
    let started = milestone_at(Milestone::CommandStarted);
    let exited = milestone_at(Milestone::CommandExited);
    let start = timeline.start();
    let devices = vm.devices.registry.reports();
    let counter = |device: &str, name: &str| {
        devices
            .iter()
            .find(|d| d.name == device)
            .and_then(|d| d.counters.iter().find(|(n, _)| *n == name))
            .map_or(0, |(_, value)| *value)
    };
    warn_of_policy_drops(&devices);
    let timings = Timings {
        setup: first_run.map(|t| ms(t - start)).unwrap_or(0.0),
        boot: match (&config.command, started) {
            (Some(_), Some(t)) => Some(ms(t - start)),
            (Some(_), None) => None,
            (None, _) => Some(ms(ended_at - start)),
        },
        command: started
            .zip(exited.or(Some(ended_at)))
            .map(|(s, e)| ms(e.saturating_duration_since(s))),
        teardown: ms(ended_at.elapsed()),
        total: ms(start.elapsed()),
        copy_in: state.copy_in_span.map(|(s, e)| ms(e - s)),
        copy_out: state.copy_out_span.map(|(s, e)| ms(e - s)),
    };
    let result = RunResult {
        exit_code: verdict.exit_code,
        status: verdict.status,
        end: verdict.end,
        error: verdict.error,
        timings_ms: timings,
        stdout_bytes: state.stdout_bytes,
        stderr_bytes: state.stderr_bytes,
        copy_in_bytes: state.copy_in_bytes,
        copy_out_bytes: state.copy_out_bytes,
        copy_out_errors: state.copy_out_errors.clone(),
        copies_confined: state.confinement,
        block_bytes_read: counter("virtio-blk", "bytes_read"),
        vsock_bytes_to_host: counter("virtio-vsock", "bytes_to_host"),
        vsock_bytes_to_guest: counter("virtio-vsock", "bytes_to_guest"),
        vsock_malformed_packets: counter("virtio-vsock", "malformed_packets"),
        exits: summarize_exits(&exit_counts, &vm.devices.registry),
        devices,
        peak_rss_kib: peak_rss_kib(),
        guest_resident_kib: crate::guest_ram::resident_kib(&vm.mem, &vm.file_backed),
        triple_fault: vm
            .end
            .fault
            .take()
            .map(|vcpu| crate::fault_dump::FaultDump {
                vcpu,
                queues: vm.devices.registry.queue_dumps(),
            }),
    };
    if let (Some(out), Some(path)) = (trace_out, &config.trace_file) {
        let trace = TraceParts {
            timeline: &timeline,
            first_run,
            ended_at,
            milestones: &milestones,
            state: &state,
        };
        publish_trace(&trace, &vm, &result, out)
            .map_err(|e| ReportError::Trace(path.display().to_string(), e))?;
    }
    Ok(result)
}

/// What the trace is made of besides the result.
struct TraceParts<'a> {
    timeline: &'a Timeline,
    first_run: Option<Instant>,
    ended_at: Instant,
    milestones: &'a [(Milestone, Instant)],
    state: &'a ControlState,
}

/// Builds the run's timeline as trace-event JSON and publishes it.
fn publish_trace(
    parts: &TraceParts,
    vm: &Vm,
    result: &RunResult,
    out: OutputFile,
) -> std::io::Result<()> {
    let printk = vm.observed.printk.lock().unwrap_or_else(|p| p.into_inner());
    let guest_stamps = parts
        .milestones
        .iter()
        .map(|(m, t)| (m.name().to_string(), *t))
        .collect();
    let trace = crate::trace::build(&crate::trace::TraceInput {
        start: parts.timeline.start(),
        host_marks: parts.timeline.marks(),
        first_run: parts.first_run,
        vm_ended: parts.ended_at,
        guest_stamps,
        host_spans: [
            ("copy-in", parts.state.copy_in_span),
            ("copy-out", parts.state.copy_out_span),
        ]
        .into_iter()
        .filter_map(|(name, span)| span.map(|(s, e)| (name.to_string(), s, e)))
        .collect(),
        printk: printk.lines(),
        result,
    });
    out.publish(trace.to_string().as_bytes())
}

/// When the guest reached each milestone, on the host clock: the timestamp device's stamps where the
/// guest could write its port; else the guest's own CLOCK_BOOTTIME from the protocol, which starts at
/// about the first KVM_RUN; else when the frame arrived.
fn guest_milestone_times(
    stamps: &[(u8, Instant)],
    reported: &[(Milestone, u64, Instant)],
    first_run: Option<Instant>,
) -> Vec<(Milestone, Instant)> {
    if !stamps.is_empty() {
        return stamps
            .iter()
            .filter_map(|(id, t)| Some((Milestone::from_u8(*id)?, *t)))
            .collect();
    }
    reported
        .iter()
        .map(|(m, ns, arrived)| match first_run {
            Some(first_run) => (*m, first_run + Duration::from_nanos(*ns)),
            None => (*m, *arrived),
        })
        .collect()
}

/// vmm's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec, so it
/// would report the high-water mark of whatever process started vmm.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One line on stderr if the network policy dropped any frame the guest sent, with the reasons, so
/// that a build failing to download says why without --result.
fn warn_of_policy_drops(devices: &[crate::device_manager::DeviceReport]) {
    let Some(net) = devices.iter().find(|d| d.name == "virtio-net") else {
        return;
    };
    let total = net
        .counters
        .iter()
        .find(|(n, _)| *n == "tx_dropped")
        .map_or(0, |(_, v)| *v);
    if total == 0 {
        return;
    }
    let reasons: Vec<String> = net
        .counters
        .iter()
        .filter_map(|(n, v)| Some(format!("{} {v}", n.strip_prefix("dropped_")?)))
        .collect();
    eprintln!(
        "vmm: the network policy dropped {total} frames the guest sent ({})",
        reasons.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_prefer_host_stamps_then_guest_clock_then_arrival() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let reported = [
            (Milestone::InitStarted, 5_000_000, at(50)),
            (Milestone::CommandStarted, 9_000_000, at(60)),
        ];
        let stamped = guest_milestone_times(&[(1, at(7)), (99, at(8))], &reported, Some(t0));
        assert_eq!(
            stamped,
            [(Milestone::InitStarted, at(7))],
            "unknown ids are dropped"
        );
        let by_clock = guest_milestone_times(&[], &reported, Some(at(1)));
        assert_eq!(
            by_clock,
            [
                (Milestone::InitStarted, at(6)),
                (Milestone::CommandStarted, at(10))
            ]
        );
        let by_arrival = guest_milestone_times(&[], &reported, None);
        assert_eq!(by_arrival[1], (Milestone::CommandStarted, at(60)));
    }
}
