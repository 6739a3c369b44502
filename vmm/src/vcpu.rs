//! One thread per vCPU running KVM_RUN. Port and MMIO exits go to the device bus; everything that ends
//! the VM is reported once through [`VmEnd`] and the vCPU thread stops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Why the guest side of the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest asked for a reset (i8042 0xFE, KVM reset event): how our kernel ends with `reboot=k`.
    Reset,
    /// The guest powered off, or a vCPU triple-faulted (KVM shutdown exit).
    Shutdown,
    /// KVM could not run a vCPU: a host problem or a guest in a state KVM refuses.
    Error(String),
}

/// The one place vCPU threads and devices report that the VM is over. The first report wins.
#[derive(Debug)]
pub struct VmEnd {
    reason: Mutex<Option<GuestEnd>>,
    event: EventFd,
    /// The guest's state at a triple fault, for `--result`.
    pub fault: crate::fault_dump::FaultSlot,
}

impl VmEnd {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmEnd {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            fault: Default::default(),
        })
    }

    /// The eventfd the event loop watches.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    pub fn report(&self, end: GuestEnd) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(end);
        }
        // If the write fails the counter is saturated: the loop is already woken.
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<GuestEnd> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What kind of exit to user space, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitKind {
    PioRead(u16),
    PioWrite(u16),
    MmioRead(u64),
    MmioWrite(u64),
    Other(&'static str),
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

/// Installs the (empty) handler of the kick signal: its only effect is that KVM_RUN returns EINTR.
pub fn register_kick_signal() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop)
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
    counts.lock().unwrap_or_else(|p| p.into_inner()).first_run = Some(Instant::now());
    let count = |kind: ExitKind| counts.lock().unwrap_or_else(|p| p.into_inner()).count(kind);
    while !stop.load(Ordering::Acquire) {
        let exit = vcpu.run();
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                count(ExitKind::PioRead(port));
                if io.pio_read(PioAddress(port), data).is_err() {
                    // nothing there: the floating ISA bus reads as all ones
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count(ExitKind::PioWrite(port));
                let _ = io.pio_write(PioAddress(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(ExitKind::MmioRead(addr & !0xfff));
                if io.mmio_read(MmioAddress(addr), data).is_err() {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(ExitKind::MmioWrite(addr & !0xfff));
                let _ = io.mmio_write(MmioAddress(addr), data);
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
                count(ExitKind::Other("interrupted"));
            }
            Err(e) => {
                end.report(GuestEnd::Error(format!("KVM_RUN failed: {e}")));
                break;
            }
        }
    }
}
