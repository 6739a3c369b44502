//! How a run ended, as an exit status (docker run's conventions) and as the JSON of `--result`.

use std::time::Duration;

use serde::Serialize;

use crate::device_manager::{DeviceRegistry, DeviceReport};
use crate::vcpu::{ExitCounts, ExitKind};

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
    /// How far Landlock kept the thread that copies to the copy directories: "full", "partial" (an
    /// older Landlock) or "none" (no Landlock in this kernel); absent without a command.
    pub copies_confined: Option<crate::copy_sandbox::Confinement>,
    pub block_bytes_read: u64,
    pub vsock_bytes_to_host: u64,
    pub vsock_bytes_to_guest: u64,
    /// Packets from the guest that the vsock device refused as malformed.
    pub vsock_malformed_packets: u64,
    /// Exits to user space by kind, summed over vCPUs.
    pub exits: Vec<ExitCount>,
    /// Each virtio device: where the guest saw it and what it counted.
    pub devices: Vec<DeviceReport>,
    /// vmm's peak resident memory, guest pages it touched included.
    pub peak_rss_kib: u64,
    /// Guest memory that is resident at the end: what the guest touched.
    pub guest_resident_kib: u64,
    /// Only when the guest triple-faulted: its state and the virtio queues' (see fault_dump.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triple_fault: Option<crate::fault_dump::FaultDump>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// Names an exit kind for people: the device whose port or window it was, from the registry.
pub fn describe_exit(kind: &ExitKind, registry: &DeviceRegistry) -> String {
    let window = |addr: u64| {
        registry
            .mmio_name(addr)
            .map_or_else(|| format!("{addr:#x}"), str::to_string)
    };
    let port = |p: u16| match registry.port_name(p) {
        Some(name) => format!("{name} {p:#x}"),
        None => format!("{p:#x}"),
    };
    match kind {
        ExitKind::PioRead(p) => format!("pio-read {}", port(*p)),
        ExitKind::PioWrite(p) => format!("pio-write {}", port(*p)),
        ExitKind::MmioRead(a) => format!("mmio-read {}", window(*a)),
        ExitKind::MmioWrite(a) => format!("mmio-write {}", window(*a)),
        ExitKind::Other(what) => (*what).to_string(),
    }
}

/// Sums per-vCPU exit counts into the result's list, most frequent first.
pub fn summarize_exits(per_vcpu: &[ExitCounts], registry: &DeviceRegistry) -> Vec<ExitCount> {
    let mut total = std::collections::BTreeMap::<String, u64>::new();
    for counts in per_vcpu {
        for (kind, n) in &counts.counts {
            *total.entry(describe_exit(kind, registry)).or_insert(0) += n;
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
    fn exits_are_summed_and_named() {
        let mut a = ExitCounts::default();
        a.counts.insert(ExitKind::MmioWrite(0xd000_0000), 3);
        a.counts.insert(ExitKind::PioWrite(0x3f8), 1);
        let mut b = ExitCounts::default();
        b.counts.insert(ExitKind::MmioWrite(0xd000_0000), 2);
        b.counts.insert(ExitKind::MmioRead(0xd000_5000), 1);
        let registry =
            DeviceRegistry::of_names(&[("virtio-blk", 0xd000_0000)], &[(0x3f8, 8, "serial")]);
        let s = summarize_exits(&[a, b], &registry);
        assert_eq!(s[0].kind, "mmio-write virtio-blk");
        assert_eq!(s[0].count, 5);
        assert_eq!(s[1].kind, "mmio-read 0xd0005000");
        assert_eq!(s[2].kind, "pio-write serial 0x3f8");
    }
}
