//! How a run ended, as an exit status (docker run's conventions) and as the JSON of `--result`.

use std::time::Duration;

use serde::Serialize;
use vmm_protocol::{ErrorKind, ExitStatus};

use crate::vcpu::{ExitCounts, ExitKind};

/// `vmm` itself failed: bad arguments, no usable /dev/kvm, bad image or kernel, guest never came up.
pub const EXIT_VMM_FAILED: i32 = 125;
pub const EXIT_TIMEOUT: i32 = 124;
pub const EXIT_CANNOT_RUN: i32 = 126;
pub const EXIT_NOT_FOUND: i32 = 127;

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "detail")]
pub enum EndReason {
    /// The command exited (or was killed) and reported its status.
    CommandExited,
    /// guest-init could not run the command.
    CommandNotRun,
    /// Boot-only run: the guest reset or powered off.
    GuestEnded,
    /// The guest ended, broke the protocol or failed before reporting a status.
    GuestFailed(String),
    /// `--timeout` fired.
    Timeout,
    /// `vmm` was told to stop.
    Signal(i32),
    /// `vmm` itself failed during the run (a copy-in could not be read).
    VmmFailed(String),
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub exit_code: i32,
    /// The command's own status, if it reported one.
    pub status: Option<CommandStatus>,
    pub end: EndReason,
    /// One line for the user when `vmm` (not the command) decided the exit status.
    pub error: Option<String>,
    pub timings_ms: Timings,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Bytes of file data copied in (`--copy-in`) and out (`--copy-out`).
    pub copy_in_bytes: u64,
    pub copy_out_bytes: u64,
    /// One line per `--copy-out` that did not arrive.
    pub copy_out_errors: Vec<String>,
    pub block_bytes_read: u64,
    pub vsock_bytes_to_host: u64,
    pub vsock_bytes_to_guest: u64,
    /// Packets from the guest that the vsock device refused as malformed.
    pub vsock_malformed_packets: u64,
    /// Exits to user space by kind, summed over vCPUs.
    pub exits: Vec<ExitCount>,
    /// vmm's peak resident memory, guest pages it touched included.
    pub peak_rss_kib: u64,
    /// Guest memory that is resident at the end: what the guest touched.
    pub guest_resident_kib: u64,
    /// Only when the guest triple-faulted: its state and the virtio queues' (see fault_dump.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triple_fault: Option<crate::fault_dump::FaultDump>,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// vmm start to the first KVM_RUN.
    pub setup: f64,
    /// vmm start to the command running in the guest (or to the guest's end, boot-only).
    pub boot: Option<f64>,
    /// The command's own run time.
    pub command: Option<f64>,
    /// The end of the VM to vmm's exit.
    pub teardown: f64,
    pub total: f64,
    /// Sending every `--copy-in` (part of `boot`: the command starts after it).
    pub copy_in: Option<f64>,
    /// Receiving every `--copy-out` (after the command, before the VM ends).
    pub copy_out: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExitCount {
    pub kind: String,
    pub count: u64,
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// vmm's exit status for a command's status: its code, or 128+N for signal N.
pub fn exit_code_of(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(c) => c & 0xff,
        ExitStatus::Signal(s) => 128 + (s & 0x7f),
    }
}

pub fn exit_code_of_error(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::NotFound => EXIT_NOT_FOUND,
        ErrorKind::NotExecutable => EXIT_CANNOT_RUN,
        ErrorKind::Setup => EXIT_VMM_FAILED,
    }
}

/// Names an exit kind for people: the port or the device window.
pub fn describe_exit(kind: &ExitKind) -> String {
    use crate::arch::layout::VIRTIO_MMIO_START;
    let device = |addr: u64| match addr.checked_sub(VIRTIO_MMIO_START).map(|o| o / 0x1000) {
        Some(0) => "virtio-blk".to_string(),
        Some(1) => "virtio-vsock".to_string(),
        Some(2) => "virtio-blk scratch".to_string(),
        _ => format!("{addr:#x}"),
    };
    let port = |p: u16| match p {
        0x3f8..=0x3ff => format!("serial {p:#x}"),
        0x60..=0x64 => format!("i8042 {p:#x}"),
        0x70..=0x71 => format!("rtc {p:#x}"),
        _ => format!("{p:#x}"),
    };
    match kind {
        ExitKind::PioRead(p) => format!("pio-read {}", port(*p)),
        ExitKind::PioWrite(p) => format!("pio-write {}", port(*p)),
        ExitKind::MmioRead(a) => format!("mmio-read {}", device(*a)),
        ExitKind::MmioWrite(a) => format!("mmio-write {}", device(*a)),
        ExitKind::Other(what) => (*what).to_string(),
    }
}

/// Sums per-vCPU exit counts into the result's list, most frequent first.
pub fn summarize_exits(per_vcpu: &[ExitCounts]) -> Vec<ExitCount> {
    let mut total = std::collections::BTreeMap::<String, u64>::new();
    for counts in per_vcpu {
        for (kind, n) in &counts.counts {
            *total.entry(describe_exit(kind)).or_insert(0) += n;
        }
    }
    let mut list: Vec<ExitCount> = total
        .into_iter()
        .map(|(kind, count)| ExitCount { kind, count })
        .collect();
    list.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker_run() {
        assert_eq!(exit_code_of(ExitStatus::Code(0)), 0);
        assert_eq!(exit_code_of(ExitStatus::Code(255)), 255);
        assert_eq!(exit_code_of(ExitStatus::Code(256 + 7)), 7);
        assert_eq!(exit_code_of(ExitStatus::Signal(9)), 137);
        assert_eq!(exit_code_of(ExitStatus::Signal(15)), 143);
        assert_eq!(exit_code_of_error(ErrorKind::NotFound), 127);
        assert_eq!(exit_code_of_error(ErrorKind::NotExecutable), 126);
        assert_eq!(exit_code_of_error(ErrorKind::Setup), 125);
    }

    #[test]
    fn exits_are_summed_and_named() {
        let mut a = ExitCounts::default();
        a.counts.insert(ExitKind::MmioWrite(0xd000_0000), 3);
        a.counts.insert(ExitKind::PioWrite(0x3f8), 1);
        let mut b = ExitCounts::default();
        b.counts.insert(ExitKind::MmioWrite(0xd000_0000), 2);
        let s = summarize_exits(&[a, b]);
        assert_eq!(s[0].kind, "mmio-write virtio-blk");
        assert_eq!(s[0].count, 5);
        assert_eq!(s[1].kind, "pio-write serial 0x3f8");
    }
}
