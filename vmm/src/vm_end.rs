//! The one place where vCPU threads and devices report that the VM is over, and why: the first report
//! wins, and an eventfd wakes the event loop. A leaf, so that devices need not know the vCPU code.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

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
