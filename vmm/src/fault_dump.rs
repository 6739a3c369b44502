//! What vmm records when the guest triple-faults (a KVM shutdown exit), for `--result`: the vCPU's
//! registers, special registers and pending events as KVM reports them at the exit, and the state of every
//! virtio queue with the last used-ring entries vmm wrote into guest memory.
//!
//! Why: a triple fault means the guest took an exception while delivering one, which comes from corrupted
//! page tables, IDT, GDT or kernel stack. If a device wrote guest memory the guest no longer gave it (a
//! used entry or an rx buffer after the driver reclaimed it), the queue indices and the last buffers
//! written are what shows it; the registers show where the guest was. Neither costs anything until the
//! guest has crashed: the device side is a few integers per used entry.
//!
//! One caveat, said in the dump itself: on AMD (SVM) KVM resets the vCPU to its INIT state before it
//! reports a shutdown exit (the VMCB is undefined after a shutdown intercept), so there the registers are
//! those of a CPU after INIT, not of the guest that faulted. Intel (VMX) KVM leaves them as they were.

use std::sync::Mutex;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use serde::Serialize;
use virtio_queue::{Queue, QueueT};

use crate::guest_ram::GuestMemory;

/// Used-ring entries remembered per queue.
pub const RECENT_USED: usize = 8;

/// The guest's state at a triple fault, as the vCPU thread saw it.
#[derive(Debug, Clone, Serialize)]
pub struct VcpuFault {
    /// The vCPU thread that took the shutdown exit (`vcpu0`, ...).
    pub vcpu: String,
    /// True when the registers are the INIT state that KVM on AMD gives a vCPU at a shutdown exit,
    /// not the state the guest faulted in.
    pub registers_reset_by_kvm: bool,
    pub regs: Option<Regs>,
    pub sregs: Option<Sregs>,
    pub events: Option<Events>,
    /// What KVM refused to report, if anything.
    pub errors: Vec<String>,
}

/// General-purpose registers, as hex strings.
#[derive(Debug, Clone, Serialize)]
pub struct Regs {
    pub rip: String,
    pub rsp: String,
    pub rbp: String,
    pub rflags: String,
    pub rax: String,
    pub rbx: String,
    pub rcx: String,
    pub rdx: String,
    pub rsi: String,
    pub rdi: String,
    pub r8: String,
    pub r9: String,
    pub r10: String,
    pub r11: String,
    pub r12: String,
    pub r13: String,
    pub r14: String,
    pub r15: String,
}

/// Special registers: control registers, EFER, the segments and descriptor tables that a triple fault
/// goes through.
#[derive(Debug, Clone, Serialize)]
pub struct Sregs {
    pub cr0: String,
    pub cr2: String,
    pub cr3: String,
    pub cr4: String,
    pub cr8: String,
    pub efer: String,
    pub apic_base: String,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub tr: Segment,
    pub gdt: Table,
    pub idt: Table,
}

#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    pub selector: String,
    pub base: String,
    pub limit: String,
    /// type, present, dpl, long, default-size, granularity as KVM reports them
    pub flags: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub base: String,
    pub limit: String,
}

/// Pending and injected events (KVM_GET_VCPU_EVENTS).
#[derive(Debug, Clone, Serialize)]
pub struct Events {
    pub exception_injected: bool,
    pub exception_pending: bool,
    pub exception_nr: u8,
    pub exception_error_code: Option<String>,
    pub interrupt_injected: bool,
    pub interrupt_nr: u8,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
}

/// Where the vCPU thread leaves its [`VcpuFault`] for the teardown. The first one is kept.
#[derive(Debug, Default)]
pub struct FaultSlot(Mutex<Option<VcpuFault>>);

impl FaultSlot {
    pub fn record(&self, fault: VcpuFault) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(fault);
        }
    }

    pub fn take(&self) -> Option<VcpuFault> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Reads what KVM will tell about `vcpu` right after its shutdown exit. Runs on the vCPU thread, whose
/// seccomp filter allows these three read-only ioctls for this.
pub fn capture(vcpu: &VcpuFd) -> VcpuFault {
    let mut errors = Vec::new();
    let regs = vcpu
        .get_regs()
        .map_err(|e| errors.push(format!("KVM_GET_REGS: {e}")))
        .ok();
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| errors.push(format!("KVM_GET_SREGS: {e}")))
        .ok();
    let events = vcpu
        .get_vcpu_events()
        .map_err(|e| errors.push(format!("KVM_GET_VCPU_EVENTS: {e}")))
        .ok();
    describe(
        std::thread::current().name().unwrap_or("vcpu").to_string(),
        regs.as_ref(),
        sregs.as_ref(),
        events.as_ref(),
        errors,
    )
}

/// The reset vector's RIP and CS base: a vCPU after INIT (SDM vol. 3, 10.1.1; APM vol. 2, 14.1.3).
const INIT_RIP: u64 = 0xfff0;
const INIT_CS_BASE: u64 = 0xffff_0000;

fn describe(
    vcpu: String,
    regs: Option<&kvm_regs>,
    sregs: Option<&kvm_sregs>,
    events: Option<&kvm_vcpu_events>,
    errors: Vec<String>,
) -> VcpuFault {
    let registers_reset_by_kvm = matches!((regs, sregs), (Some(r), Some(s))
        if r.rip == INIT_RIP && s.cs.base == INIT_CS_BASE && s.cr0 & 1 == 0);
    VcpuFault {
        vcpu,
        registers_reset_by_kvm,
        regs: regs.map(|r| Regs {
            rip: hex(r.rip),
            rsp: hex(r.rsp),
            rbp: hex(r.rbp),
            rflags: hex(r.rflags),
            rax: hex(r.rax),
            rbx: hex(r.rbx),
            rcx: hex(r.rcx),
            rdx: hex(r.rdx),
            rsi: hex(r.rsi),
            rdi: hex(r.rdi),
            r8: hex(r.r8),
            r9: hex(r.r9),
            r10: hex(r.r10),
            r11: hex(r.r11),
            r12: hex(r.r12),
            r13: hex(r.r13),
            r14: hex(r.r14),
            r15: hex(r.r15),
        }),
        sregs: sregs.map(|s| Sregs {
            cr0: hex(s.cr0),
            cr2: hex(s.cr2),
            cr3: hex(s.cr3),
            cr4: hex(s.cr4),
            cr8: hex(s.cr8),
            efer: hex(s.efer),
            apic_base: hex(s.apic_base),
            cs: segment(&s.cs),
            ss: segment(&s.ss),
            ds: segment(&s.ds),
            tr: segment(&s.tr),
            gdt: Table {
                base: hex(s.gdt.base),
                limit: hex(u64::from(s.gdt.limit)),
            },
            idt: Table {
                base: hex(s.idt.base),
                limit: hex(u64::from(s.idt.limit)),
            },
        }),
        events: events.map(|e| Events {
            exception_injected: e.exception.injected != 0,
            exception_pending: e.exception.pending != 0,
            exception_nr: e.exception.nr,
            exception_error_code: (e.exception.has_error_code != 0)
                .then(|| hex(u64::from(e.exception.error_code))),
            interrupt_injected: e.interrupt.injected != 0,
            interrupt_nr: e.interrupt.nr,
            nmi_injected: e.nmi.injected != 0,
            nmi_pending: e.nmi.pending != 0,
        }),
        errors,
    }
}

fn segment(s: &kvm_segment) -> Segment {
    Segment {
        selector: hex(u64::from(s.selector)),
        base: hex(s.base),
        limit: hex(u64::from(s.limit)),
        flags: format!(
            "type={} p={} dpl={} l={} db={} g={}",
            s.type_, s.present, s.dpl, s.l, s.db, s.g
        ),
    }
}

/// One used-ring entry a device wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsedEntry {
    /// The used index this entry went out under (before the increment).
    pub used_idx: u16,
    /// The descriptor chain's head.
    pub head: u16,
    /// Bytes the device wrote into the chain's buffers (the used length).
    pub len: u32,
    /// Guest address of the chain's first buffer, as a hex string.
    pub first_buffer: String,
}

/// The last [`RECENT_USED`] used entries a queue's device wrote, oldest first. Recording is on the I/O
/// path (once per used entry), so it stores plain integers and formats nothing until a dump asks.
#[derive(Debug, Clone, Default)]
pub struct RecentUsed {
    /// (used_idx, head, len, first buffer's guest address)
    entries: [Option<(u16, u16, u32, u64)>; RECENT_USED],
    next: usize,
}

impl RecentUsed {
    /// Remembers an entry that is about to be added at `used_idx`.
    pub fn record(&mut self, used_idx: u16, head: u16, len: u32, first_buffer: u64) {
        self.entries[self.next % RECENT_USED] = Some((used_idx, head, len, first_buffer));
        self.next = self.next.wrapping_add(1);
    }

    pub fn entries(&self) -> Vec<UsedEntry> {
        (0..RECENT_USED)
            .filter_map(|i| self.entries[(self.next + i) % RECENT_USED])
            .map(|(used_idx, head, len, first)| UsedEntry {
                used_idx,
                head,
                len,
                first_buffer: hex(first),
            })
            .collect()
    }
}

/// A virtio queue as the device last left it, and as guest memory shows it now.
#[derive(Debug, Clone, Serialize)]
pub struct QueueDump {
    pub device: String,
    pub queue: String,
    pub size: u16,
    pub ready: bool,
    pub desc_table: String,
    pub avail_ring: String,
    pub used_ring: String,
    /// The device's own positions: the next avail entry it will take, the next used entry it will add.
    pub next_avail: u16,
    pub next_used: u16,
    /// The indices in guest memory now (None if they cannot be read): avail_idx is the driver's,
    /// used_idx should equal next_used.
    pub avail_idx: Option<u16>,
    pub used_idx: Option<u16>,
    pub recent_used: Vec<UsedEntry>,
}

/// Describes `queue` of `device` for the dump.
pub fn dump_queue(
    device: &str,
    name: &str,
    queue: &Queue,
    mem: &GuestMemory,
    recent: &RecentUsed,
) -> QueueDump {
    use std::sync::atomic::Ordering;
    let state = queue.state();
    QueueDump {
        device: device.to_string(),
        queue: name.to_string(),
        size: state.size,
        ready: state.ready,
        desc_table: hex(state.desc_table),
        avail_ring: hex(state.avail_ring),
        used_ring: hex(state.used_ring),
        next_avail: state.next_avail,
        next_used: state.next_used,
        avail_idx: queue.avail_idx(mem, Ordering::Acquire).ok().map(|w| w.0),
        used_idx: queue.used_idx(mem, Ordering::Acquire).ok().map(|w| w.0),
        recent_used: recent.entries(),
    }
}

/// The whole dump in `--result` (`triple_fault`).
#[derive(Debug, Clone, Serialize)]
pub struct FaultDump {
    #[serde(flatten)]
    pub vcpu: VcpuFault,
    pub queues: Vec<QueueDump>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // test data is small
    use super::*;

    #[test]
    fn recent_used_keeps_the_last_entries_oldest_first() {
        let mut r = RecentUsed::default();
        assert!(r.entries().is_empty());
        for i in 0..(RECENT_USED as u16 + 3) {
            r.record(i, i + 100, u32::from(i), 0x1000 * u64::from(i));
        }
        let e = r.entries();
        assert_eq!(e.len(), RECENT_USED);
        assert_eq!(e[0].used_idx, 3);
        assert_eq!(e[RECENT_USED - 1].used_idx, RECENT_USED as u16 + 2);
        assert_eq!(e[0].first_buffer, "0x3000");
    }

    #[test]
    fn init_state_is_recognised_as_reset_by_kvm() {
        let regs = kvm_regs {
            rip: INIT_RIP,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.base = INIT_CS_BASE;
        let f = describe("vcpu0".into(), Some(&regs), Some(&sregs), None, vec![]);
        assert!(f.registers_reset_by_kvm);
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        sregs.cr0 = 0x8005_0033;
        sregs.cs.base = 0;
        let f = describe("vcpu0".into(), Some(&regs), Some(&sregs), None, vec![]);
        assert!(!f.registers_reset_by_kvm);
        assert_eq!(f.regs.unwrap().rip, "0xffffffff81000000");
        assert_eq!(f.sregs.unwrap().cr0, "0x80050033");
    }

    #[test]
    fn a_slot_keeps_the_first_fault() {
        let slot = FaultSlot::default();
        slot.record(describe("vcpu0".into(), None, None, None, vec![]));
        slot.record(describe("vcpu1".into(), None, None, None, vec![]));
        assert_eq!(slot.take().unwrap().vcpu, "vcpu0");
        assert!(slot.take().is_none());
    }
}
