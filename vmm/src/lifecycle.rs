//! The event-loop subscriber that decides when the run is over: the guest ended (after its last
//! frames have drained), the command reported its status, the timeout fired, guest-init never
//! connected, or a signal came (forwarded to the command first, with a grace period). Also the
//! signals it takes: blocked in every thread and read through a signalfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use crate::control::{self, Control, Forward};
use crate::vm_end::{GuestEnd, VmEnd};

/// How long the command gets to end after a forwarded SIGTERM/SIGINT before the VM is torn down.
const SIGNAL_GRACE: Duration = Duration::from_secs(5);
/// How often a signal that the control channel could not take is offered again.
const SIGNAL_RETRY: Duration = Duration::from_millis(10);
/// After the guest has ended, how long to wait for its last frames to reach us.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long guest-init gets to connect before the guest is declared dead (a kernel that hangs at boot).
pub const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// Blocks the signals the event loop takes through a signalfd. Call before any thread starts, so every
/// thread inherits the mask and the signals queue for the signalfd.
pub fn block_lifecycle_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialised; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a signalfd.
fn read_signal(fd: RawFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is a writable buffer of `size` bytes.
    let n = unsafe { libc::read(fd, &mut info as *mut _ as *mut libc::c_void, size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// What the event loop decided.
#[derive(Debug, Clone)]
pub enum Decision {
    Command,
    Guest(GuestEnd),
    Timeout,
    /// guest-init never connected.
    BootTimeout,
    Signal(i32),
}

/// The event-loop subscriber that watches for the end of the run.
pub struct Lifecycle {
    vm_end: Arc<VmEnd>,
    control: Option<(RawFd, control::ControlWriter)>,
    control_state: Option<Arc<Mutex<control::ControlState>>>,
    /// Fires if guest-init has not connected in time.
    boot_deadline: Option<TimerFd>,
    signals: OwnedFd,
    timeout: Option<TimerFd>,
    grace: TimerFd,
    /// Armed while `pending_signal` waits for the control channel to take it: retries it.
    retry: TimerFd,
    /// Set when the guest ended but the control channel may still hold its last frames.
    guest_ended: Option<GuestEnd>,
    pending_signal: Option<i32>,
    decision: Option<Decision>,
}

const TOKEN_VM_END: u32 = 1;
const TOKEN_CONTROL: u32 = 2;
const TOKEN_SIGNAL: u32 = 3;
const TOKEN_TIMEOUT: u32 = 4;
const TOKEN_GRACE: u32 = 5;
const TOKEN_BOOT_DEADLINE: u32 = 6;
const TOKEN_SIGNAL_RETRY: u32 = 7;

impl Lifecycle {
    /// Watches `vm_end`, the control channel of `control` (a command run) and `signals`; ends the run
    /// after `timeout` if given.
    pub fn new(
        vm_end: Arc<VmEnd>,
        control: Option<&Control>,
        signals: OwnedFd,
        timeout: Option<Duration>,
    ) -> Result<Self, vmm_sys_util::errno::Error> {
        let armed = |after: Duration| -> Result<TimerFd, vmm_sys_util::errno::Error> {
            let mut t = TimerFd::new()?;
            t.reset(after, None)?;
            Ok(t)
        };
        Ok(Lifecycle {
            vm_end,
            control: control.map(|c| (c.done.as_raw_fd(), c.writer.clone())),
            control_state: control.map(|c| c.state.clone()),
            boot_deadline: control.map(|_| armed(BOOT_DEADLINE)).transpose()?,
            signals,
            // a zero would disarm the timer
            timeout: timeout
                .map(|t| armed(t.max(Duration::from_micros(1))))
                .transpose()?,
            grace: TimerFd::new()?,
            retry: TimerFd::new()?,
            guest_ended: None,
            pending_signal: None,
            decision: None,
        })
    }

    /// What the loop decided, once it has.
    pub fn decision(&self) -> Option<Decision> {
        self.decision.clone()
    }

    fn arm_grace(&mut self, after: Duration) {
        // If arming fails the run ends at the next event instead of after the grace period.
        if self.grace.reset(after, None).is_err() {
            self.decide_on_grace();
        }
    }

    fn decide_on_grace(&mut self) {
        self.decision = Some(match (self.pending_signal, &self.guest_ended) {
            (Some(sig), _) => Decision::Signal(sig),
            (None, Some(end)) => Decision::Guest(end.clone()),
            (None, None) => return,
        });
    }

    fn on_signal(&mut self, sig: i32) {
        if self.pending_signal.is_some() {
            // a second signal: stop waiting for the command
            self.decision = Some(Decision::Signal(sig));
            return;
        }
        self.pending_signal = Some(sig);
        let Some((_, writer)) = &self.control else {
            self.decision = Some(Decision::Signal(sig));
            return;
        };
        match writer.forward_signal(sig) {
            Forward::Sent => self.arm_grace(SIGNAL_GRACE),
            // Busy or full: keep trying while the grace period runs; if the signal never gets through
            // (the command reads none of the stdin it is sent), the grace period ends the run.
            Forward::NotNow => {
                if self.retry.reset(SIGNAL_RETRY, Some(SIGNAL_RETRY)).is_err() {
                    self.decision = Some(Decision::Signal(sig));
                    return;
                }
                self.arm_grace(SIGNAL_GRACE);
            }
            Forward::NotConnected | Forward::Broken => self.decision = Some(Decision::Signal(sig)),
        }
    }

    fn retry_signal(&mut self) {
        let Some(sig) = self.pending_signal else {
            return;
        };
        let Some((_, writer)) = &self.control else {
            return;
        };
        match writer.forward_signal(sig) {
            Forward::NotNow => return,
            Forward::Sent => {}
            Forward::NotConnected | Forward::Broken => self.decision = Some(Decision::Signal(sig)),
        }
        let _ = self.retry.clear();
    }
}

impl MutEventSubscriber for Lifecycle {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_VM_END => {
                let _ = self.vm_end.event().read();
                let end = self.vm_end.reason().unwrap_or(GuestEnd::Shutdown);
                if self.control.is_some() {
                    self.guest_ended = Some(end);
                    self.arm_grace(DRAIN_GRACE);
                } else {
                    self.decision = Some(Decision::Guest(end));
                }
            }
            TOKEN_CONTROL => self.decision = Some(Decision::Command),
            TOKEN_SIGNAL => {
                while let Some(sig) = read_signal(self.signals.as_raw_fd()) {
                    self.on_signal(sig);
                }
            }
            TOKEN_TIMEOUT => self.decision = Some(Decision::Timeout),
            TOKEN_BOOT_DEADLINE => {
                let connected = self.control_state.as_ref().is_some_and(|s| {
                    s.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .connected_at
                        .is_some()
                });
                if let Some(t) = &mut self.boot_deadline {
                    let _ = t.wait();
                }
                if !connected {
                    self.decision = Some(Decision::BootTimeout);
                }
            }
            // periodic while armed; a stale event after clear() would block the read
            TOKEN_SIGNAL_RETRY if self.retry.is_armed().unwrap_or(false) => {
                let _ = self.retry.wait();
                self.retry_signal();
            }
            TOKEN_GRACE => {
                // Re-armed by an earlier event of this same batch, which set its count back to zero:
                // not due yet, and reading the (blocking) timer would stall the loop until it is.
                if self.grace.is_armed().unwrap_or(false) {
                    return;
                }
                let _ = self.grace.wait();
                self.decide_on_grace();
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            (self.vm_end.event().as_raw_fd(), TOKEN_VM_END),
            (self.signals.as_raw_fd(), TOKEN_SIGNAL),
            (self.grace.as_raw_fd(), TOKEN_GRACE),
            (self.retry.as_raw_fd(), TOKEN_SIGNAL_RETRY),
        ];
        if let Some((fd, _)) = &self.control {
            fds.push((*fd, TOKEN_CONTROL));
        }
        if let Some(t) = &self.timeout {
            fds.push((t.as_raw_fd(), TOKEN_TIMEOUT));
        }
        if let Some(t) = &self.boot_deadline {
            fds.push((t.as_raw_fd(), TOKEN_BOOT_DEADLINE));
        }
        for (fd, token) in fds {
            // Without these the run could not end; build() already proved epoll works.
            let _ = ops.add(Events::with_data_raw(fd, token, EventSet::IN));
        }
    }
}
