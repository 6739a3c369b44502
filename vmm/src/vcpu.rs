//! One thread per vCPU running KVM_RUN. Port and MMIO exits go to the device bus; everything that ends
//! the VM is reported once through [`VmEnd`] and the vCPU thread stops.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::vm_end::{GuestEnd, VmEnd};

/// What kind of exit to user space, and where. Only addresses where a device answers get a key of
/// their own (a port, or the page of a device's MMIO window); every other access of a kind shares one
/// key, so a guest touching millions of unbacked addresses cannot grow the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitKind {
    PioRead(u16),
    PioWrite(u16),
    MmioRead(u64),
    MmioWrite(u64),
    Other(&'static str),
}

impl ExitKind {
    fn pio(write: bool, port: u16, backed: bool) -> ExitKind {
        match (write, backed) {
            (false, true) => ExitKind::PioRead(port),
            (true, true) => ExitKind::PioWrite(port),
            (false, false) => ExitKind::Other("pio-read (no device)"),
            (true, false) => ExitKind::Other("pio-write (no device)"),
        }
    }

    fn mmio(write: bool, addr: u64, backed: bool) -> ExitKind {
        let page = addr & !0xfff;
        match (write, backed) {
            (false, true) => ExitKind::MmioRead(page),
            (true, true) => ExitKind::MmioWrite(page),
            (false, false) => ExitKind::Other("mmio-read (no device)"),
            (true, false) => ExitKind::Other("mmio-write (no device)"),
        }
    }
}

/// Exits to user space counted by kind and address, per vCPU.
#[derive(Debug, Default, Clone)]
pub struct ExitCounts {
    pub counts: BTreeMap<ExitKind, u64>,
    /// When the vCPU first entered the guest.
    pub first_run: Option<Instant>,
}

impl ExitCounts {
    fn count(&mut self, kind: ExitKind) {
        *self.counts.entry(kind).or_insert(0) += 1;
    }
}

/// A vCPU thread and what it shares with the rest of the VMM.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    /// Updated by the vCPU thread at every exit, so the counts survive a thread that never leaves
    /// KVM_RUN at teardown.
    counts: Arc<Mutex<ExitCounts>>,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// `immediate_exit` of this thread's `kvm_run`, while its vCPU runs here (null otherwise).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs the handler of the kick signal. A signal that arrives while the thread is in KVM_RUN makes
/// it return EINTR; one that arrives just before (after the thread checked the stop flag) would be
/// lost, so the handler also sets `immediate_exit`, which makes the next KVM_RUN return EINTR at once.
/// One kick is therefore always enough.
pub fn register_kick_signal() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // A const-initialised thread local without destructor is a plain TLS read: safe in a handler.
        let flag = IMMEDIATE_EXIT.with(Cell::get);
        if !flag.is_null() {
            // SAFETY: set by run_loop to its vCPU's kvm_run mapping, which outlives the pointer (it is
            // cleared before the vCPU is dropped), and written by this thread only.
            unsafe { flag.write_volatile(1) };
        }
    }
    register_signal_handler(kick_signal(), kick)
}

/// What a started vCPU thread waits for: its vCPU and the devices its exits go to.
struct VcpuWork {
    vcpu: VcpuFd,
    io: Arc<IoManager>,
    end: Arc<VmEnd>,
}

/// A vCPU thread started ahead of its vCPU: it starts and installs its seccomp filter while the VM is
/// being built (both take a few hundred microseconds on some hosts), then waits for [`Self::start`].
pub struct PendingVcpu {
    work: std::sync::mpsc::SyncSender<VcpuWork>,
    handle: VcpuHandle,
}

/// Starts the thread of vCPU `index`. Once given its vCPU it sends on `running`, right before it enters
/// the guest (and drops it, so a thread that ends first is noticed too). A thread whose
/// [`PendingVcpu`] is dropped ends.
pub fn prestart(
    index: u8,
    stop: Arc<AtomicBool>,
    running: std::sync::mpsc::Sender<()>,
) -> std::io::Result<PendingVcpu> {
    let counts = Arc::new(Mutex::new(ExitCounts::default()));
    let thread_counts = counts.clone();
    let (work, work_rx) = std::sync::mpsc::sync_channel::<VcpuWork>(1);
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::Vcpu);
            let Ok(VcpuWork { mut vcpu, io, end }) = work_rx.recv() else {
                return;
            };
            let _ = running.send(());
            drop(running);
            run_loop(&mut vcpu, &io, &end, &stop, &thread_counts)
        })?;
    Ok(PendingVcpu {
        work,
        handle: VcpuHandle { thread, counts },
    })
}

impl PendingVcpu {
    /// Hands the thread its vCPU: it enters the guest.
    pub fn start(self, vcpu: VcpuFd, io: Arc<IoManager>, end: Arc<VmEnd>) -> VcpuHandle {
        // Fails only if the thread has ended already (it could not install its filter, and has exited
        // the process): the handle says so.
        let _ = self.work.send(VcpuWork { vcpu, io, end });
        self.handle
    }
}

impl VcpuHandle {
    /// Interrupts KVM_RUN so the thread sees the stop flag.
    pub fn kick(&self) {
        // A thread that has already ended cannot be signalled; that is fine.
        let _ = self.thread.kill(kick_signal());
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// The exits counted so far (all of them once the thread has ended).
    pub fn counts(&self) -> ExitCounts {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn run_loop(
    vcpu: &mut VcpuFd,
    io: &IoManager,
    end: &VmEnd,
    stop: &AtomicBool,
    counts: &Mutex<ExitCounts>,
) {
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    counts.lock().unwrap_or_else(|p| p.into_inner()).first_run = Some(Instant::now());
    run_until_stopped(vcpu, io, end, stop, counts);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
}

fn run_until_stopped(
    vcpu: &mut VcpuFd,
    io: &IoManager,
    end: &VmEnd,
    stop: &AtomicBool,
    counts: &Mutex<ExitCounts>,
) {
    let count = |kind: ExitKind| counts.lock().unwrap_or_else(|p| p.into_inner()).count(kind);
    while !stop.load(Ordering::Acquire) {
        let exit = vcpu.run();
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                let backed = io.pio_read(PioAddress(port), data).is_ok();
                if !backed {
                    // nothing there: the floating ISA bus reads as all ones
                    data.fill(0xff);
                }
                count(ExitKind::pio(false, port, backed));
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let backed = io.pio_write(PioAddress(port), data).is_ok();
                count(ExitKind::pio(true, port, backed));
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let backed = io.mmio_read(MmioAddress(addr), data).is_ok();
                if !backed {
                    data.fill(0);
                }
                count(ExitKind::mmio(false, addr, backed));
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let backed = io.mmio_write(MmioAddress(addr), data).is_ok();
                count(ExitKind::mmio(true, addr, backed));
            }
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Hlt) => {
                count(ExitKind::Other("shutdown"));
                // a triple fault: keep what KVM can still tell about the guest (see fault_dump)
                end.fault.record(crate::fault_dump::capture(vcpu));
                end.report(GuestEnd::Shutdown);
                break;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                count(ExitKind::Other("system-event"));
                end.report(match kind {
                    KVM_SYSTEM_EVENT_RESET => GuestEnd::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => GuestEnd::Shutdown,
                    other => GuestEnd::Error(format!("guest system event {other}")),
                });
                break;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                end.report(GuestEnd::Error(format!(
                    "KVM could not enter the guest on CPU {cpu} (hardware reason {reason:#x})"
                )));
                break;
            }
            Ok(VcpuExit::InternalError) => {
                end.report(GuestEnd::Error(
                    "KVM internal error while running the guest".into(),
                ));
                break;
            }
            Ok(other) => {
                end.report(GuestEnd::Error(format!("unexpected vCPU exit: {other:?}")));
                break;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                count(ExitKind::Other("interrupted"));
            }
            Err(e) => {
                end.report(GuestEnd::Error(format!("KVM_RUN failed: {e}")));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbacked_addresses_share_one_key_per_kind() {
        let mut counts = ExitCounts::default();
        // a guest sweeping 2^20 distinct pages of the MMIO gap and every port
        for page in 0..(1u64 << 20) {
            counts.count(ExitKind::mmio(page % 2 == 0, page << 12, false));
        }
        for port in 0..=u16::MAX {
            counts.count(ExitKind::pio(port % 2 == 0, port, false));
        }
        assert_eq!(counts.counts.len(), 4);
        assert_eq!(
            counts.counts[&ExitKind::Other("mmio-write (no device)")],
            1 << 19
        );
        // where a device answers, its page or port is its own key
        counts.count(ExitKind::mmio(true, 0xd000_0070, true));
        counts.count(ExitKind::mmio(true, 0xd000_0050, true));
        counts.count(ExitKind::pio(false, 0x440, true));
        assert_eq!(counts.counts[&ExitKind::MmioWrite(0xd000_0000)], 2);
        assert_eq!(counts.counts[&ExitKind::PioRead(0x440)], 1);
        assert_eq!(counts.counts.len(), 6);
    }
}
