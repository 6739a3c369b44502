//! The running VM: vCPU threads, the event loop on the main thread, and the one teardown path that
//! every ending goes through (command exited, guest reset, timeout, signal, fatal error): stop the
//! vCPUs, collect what happened, produce the result.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_protocol::{ExitStatus, Milestone, RunRequest};
use vmm_sys_util::timerfd::TimerFd;

use crate::builder::{self, BuildError, Vm};
use crate::config::VmConfig;
use crate::control::{self, Control, Forward, Outcome};
use crate::result::*;
use crate::timeline::Timeline;
use crate::vcpu::{self, ExitCounts, GuestEnd, VcpuHandle};

/// How long the command gets to end after a forwarded SIGTERM/SIGINT before the VM is torn down.
const SIGNAL_GRACE: Duration = Duration::from_secs(5);
/// How often a signal that the control channel could not take is offered again.
const SIGNAL_RETRY: Duration = Duration::from_millis(10);
/// After the guest has ended, how long to wait for its last frames to reach us.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long guest-init gets to connect before the guest is declared dead (a kernel that hangs at boot).
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the vCPU threads get to leave KVM_RUN at teardown; exiting the process stops them anyway.
const VCPU_STOP_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot write the trace to {0}: {1}")]
    Trace(String, std::io::Error),
    #[error("cannot set up a timer: {0}")]
    Timer(vmm_sys_util::errno::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

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
enum Decision {
    Command,
    Guest(GuestEnd),
    Timeout,
    /// guest-init never connected.
    BootTimeout,
    Signal(i32),
}

/// The event-loop subscriber that watches for the end of the run.
struct Lifecycle {
    vm_end: Arc<vcpu::VmEnd>,
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

/// The guest's view of the command: argv, the whole environment, workdir, user.
fn run_request(spec: &crate::config::CommandSpec) -> RunRequest {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        (
            "HOME".into(),
            if spec.uid == 0 {
                "/root".into()
            } else {
                "/".into()
            },
        ),
    ];
    for (k, v) in &spec.env {
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    RunRequest {
        argv: spec.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: env
            .into_iter()
            .map(|(k, v)| format!("{k}={v}").into_bytes())
            .collect(),
        workdir: spec.workdir.as_bytes().to_vec(),
        uid: spec.uid,
        gid: spec.gid,
        copy_in: spec
            .transfers
            .copy_in
            .iter()
            .map(|(_, guest)| guest.as_bytes().to_vec())
            .collect(),
        copy_out: spec
            .transfers
            .copy_out
            .iter()
            .map(|(guest, _)| guest.as_bytes().to_vec())
            .collect(),
    }
}

/// Boots the VM described by `config`, runs it to its end and returns the result.
pub fn run(
    config: &VmConfig,
    signals: OwnedFd,
    mut timeline: Timeline,
) -> Result<RunResult, RunError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (running_tx, running) = std::sync::mpsc::channel();
    let pending = (0..config.vcpus)
        .map(|index| vcpu::prestart(index, stop.clone(), running_tx.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::Thread)?;
    drop(running_tx);
    let vm: Vm = builder::build(config, crate::initramfs::GUEST_INIT, &mut timeline)?;
    let control: Option<Control> = match &config.command {
        Some(spec) => Some(
            control::start(
                vm.control,
                run_request(spec),
                spec.transfers.clone(),
                Box::new(std::io::stdin()),
            )
            .map_err(RunError::Thread)?,
        ),
        None => {
            drop(vm.control);
            None
        }
    };

    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| RunError::EventLoop(e.to_string()))?;
    for s in &vm.subscribers {
        em.add_subscriber(s.clone());
    }
    let timeout = match config.timeout {
        Some(t) => {
            // What is left of it: --timeout counts from vmm's start (a zero would disarm the timer)
            let left = t
                .saturating_sub(timeline.start().elapsed())
                .max(Duration::from_micros(1));
            let mut fd = TimerFd::new().map_err(RunError::Timer)?;
            fd.reset(left, None).map_err(RunError::Timer)?;
            Some(fd)
        }
        None => None,
    };
    let lifecycle = Arc::new(Mutex::new(Lifecycle {
        vm_end: vm.end.clone(),
        control: control
            .as_ref()
            .map(|c| (c.done.as_raw_fd(), c.writer.clone())),
        control_state: control.as_ref().map(|c| c.state.clone()),
        boot_deadline: match control {
            Some(_) => {
                let mut t = TimerFd::new().map_err(RunError::Timer)?;
                t.reset(BOOT_DEADLINE, None).map_err(RunError::Timer)?;
                Some(t)
            }
            None => None,
        },
        signals,
        timeout,
        grace: TimerFd::new().map_err(RunError::Timer)?,
        retry: TimerFd::new().map_err(RunError::Timer)?,
        guest_ended: None,
        pending_signal: None,
        decision: None,
    }));
    em.add_subscriber(lifecycle.clone());

    vcpu::register_kick_signal().map_err(|e| RunError::Signals(e.into()))?;
    let handles: Vec<VcpuHandle> = pending
        .into_iter()
        .zip(vm.vcpus)
        .map(|(thread, fd)| thread.start(fd, vm.io.clone(), vm.end.clone()))
        .collect();
    // Our own filter goes on once the boot vCPU is in the guest: installing one (the kernel compiles it)
    // takes a few hundred microseconds on some hosts, which would otherwise hold up the first KVM_RUN.
    // Nothing here has handled guest data yet; the event loop starts after this.
    // Bounded: whatever the vCPU thread does, the event loop (and with it --timeout) must start.
    let _ = running.recv_timeout(Duration::from_millis(100));
    crate::seccomp::apply(crate::seccomp::Thread::Vmm)?;
    timeline.mark("vcpus started");

    let decision = loop {
        if let Some(d) = lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decision
            .clone()
        {
            break d;
        }
        em.run().map_err(|e| RunError::EventLoop(e.to_string()))?;
    };
    let ended_at = Instant::now();
    timeline.mark("guest ran");

    // Teardown: one path for every ending.
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + VCPU_STOP_WAIT;
    // A vCPU thread usually ends within microseconds of the kick: poll soon, then back off.
    let mut pause = Duration::from_micros(20);
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        handles.iter().for_each(VcpuHandle::kick);
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
    let exit_counts: Vec<ExitCounts> = handles.iter().map(VcpuHandle::counts).collect();
    let control_state = control
        .as_ref()
        .map(|c| c.state.lock().unwrap_or_else(|p| p.into_inner()).clone());

    let (exit_code, status, end, error) = conclude(config, &decision, control_state.as_ref());
    let first_run = exit_counts.iter().filter_map(|c| c.first_run).min();
    if let Some(t) = first_run {
        timeline.mark_at("first KVM_RUN", t);
    }
    let state = control_state.unwrap_or_default();
    let stamps = vm
        .guest_stamps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let milestones = guest_milestone_times(&stamps, &state.milestones, first_run);
    let milestone_at = |m: Milestone| milestones.iter().find(|(k, _)| *k == m).map(|(_, t)| *t);
    let started = milestone_at(Milestone::CommandStarted);
    let exited = milestone_at(Milestone::CommandExited);
    let start = timeline.start();
    let block = vm.block.lock().unwrap_or_else(|p| p.into_inner()).stats();
    let (to_host, to_guest, malformed) = {
        let vsock = vm.vsock.lock().unwrap_or_else(|p| p.into_inner());
        let (to_host, to_guest) = vsock.bytes_counters();
        (to_host, to_guest, vsock.malformed_packets())
    };
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
        exit_code,
        status,
        end,
        error,
        timings_ms: timings,
        stdout_bytes: state.stdout_bytes,
        stderr_bytes: state.stderr_bytes,
        copy_in_bytes: state.copy_in_bytes,
        copy_out_bytes: state.copy_out_bytes,
        copy_out_errors: state.copy_out_errors.clone(),
        block_bytes_read: block.bytes_read,
        vsock_bytes_to_host: to_host,
        vsock_bytes_to_guest: to_guest,
        vsock_malformed_packets: malformed,
        exits: summarize_exits(&exit_counts),
        peak_rss_kib: peak_rss_kib(),
        guest_resident_kib: resident_kib(&vm.mem, &vm.file_backed),
        triple_fault: fault_dump(&vm.end, &vm.block, &vm.vsock),
    };
    if let Some(path) = &config.trace_file {
        let printk = vm.printk.lock().unwrap_or_else(|p| p.into_inner());
        let guest_stamps = milestones
            .iter()
            .map(|(m, t)| (m.name().to_string(), *t))
            .collect();
        let trace = crate::trace::build(&crate::trace::TraceInput {
            start,
            host_marks: timeline.marks(),
            first_run,
            vm_ended: ended_at,
            guest_stamps,
            host_spans: [
                ("copy-in", state.copy_in_span),
                ("copy-out", state.copy_out_span),
            ]
            .into_iter()
            .filter_map(|(name, span)| span.map(|(s, e)| (name.to_string(), s, e)))
            .collect(),
            printk: printk.lines(),
            result: &result,
        });
        std::fs::write(path, trace.to_string())
            .map_err(|e| RunError::Trace(path.display().to_string(), e))?;
    }
    Ok(result)
}

/// The guest's state and the virtio queues', if a vCPU triple-faulted.
fn fault_dump(
    end: &vcpu::VmEnd,
    block: &Mutex<crate::devices::virtio::block::Block>,
    vsock: &Mutex<crate::devices::virtio::vsock::Vsock>,
) -> Option<crate::fault_dump::FaultDump> {
    let vcpu = end.fault.take()?;
    let mut queues = block
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .queue_dumps("virtio-blk");
    queues.extend(
        vsock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_dumps(),
    );
    Some(crate::fault_dump::FaultDump { vcpu, queues })
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

/// Pages per mincore call in [`resident_kib`].
const MINCORE_CHUNK_PAGES: usize = 4096;

/// How much guest memory is resident: the pages the guest (or we, loading it) touched.
fn resident_kib(mem: &crate::devices::virtio::GuestMemory, file_backed: &[(usize, usize)]) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let mut resident_pages = 0u64;
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) {
            resident_pages += mincore_pages(host as usize, region.len() as usize, page);
        }
    }
    // Where guest memory is mapped from the kernel file, mincore counts the pages in the page cache;
    // count the ones this process has mapped (touched) instead.
    if let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") {
        for &(addr, len) in file_backed {
            let cached = mincore_pages(addr, len, page);
            let touched = mapped_pages(&pagemap, addr, len, page).unwrap_or(cached);
            resident_pages = (resident_pages + touched).saturating_sub(cached);
        }
    }
    resident_pages * page as u64 / 1024
}

/// Pages of `[addr, addr + len)` (page-aligned, mapped by us) that mincore reports resident.
fn mincore_pages(addr: usize, len: usize, page: usize) -> u64 {
    // One byte per page, a chunk at a time: a vector for all of a 1 GiB guest would add 256 KiB to the
    // peak RSS that is being reported.
    let mut vec = vec![0u8; MINCORE_CHUNK_PAGES];
    let mut pages = 0u64;
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(MINCORE_CHUNK_PAGES * page);
        // SAFETY: [addr + offset, addr + offset + chunk) lies in a page-aligned mapping of ours (a guest
        // memory region), alive for the call, and `vec` has one byte for each of its at most
        // MINCORE_CHUNK_PAGES pages.
        let rc = unsafe {
            libc::mincore(
                (addr + offset) as *mut libc::c_void,
                chunk,
                vec.as_mut_ptr(),
            )
        };
        if rc == 0 {
            pages += vec[..chunk.div_ceil(page)]
                .iter()
                .filter(|b| **b & 1 != 0)
                .count() as u64;
        }
        offset += chunk;
    }
    pages
}

/// Pages of `[addr, addr + len)` present in this process's page tables (/proc/self/pagemap bit 63).
fn mapped_pages(
    pagemap: &std::fs::File,
    addr: usize,
    len: usize,
    page: usize,
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut entries = vec![0u8; 8 * MINCORE_CHUNK_PAGES];
    let (first, count) = (addr / page, len.div_ceil(page));
    let mut pages = 0u64;
    let mut done = 0;
    while done < count {
        let n = (count - done).min(MINCORE_CHUNK_PAGES);
        let buf = &mut entries[..8 * n];
        pagemap.read_exact_at(buf, ((first + done) * 8) as u64)?;
        pages += buf.chunks_exact(8).filter(|e| e[7] & 0x80 != 0).count() as u64;
        done += n;
    }
    Ok(pages)
}

/// Turns what happened into vmm's exit status, the end reason and, for vmm's own failures, one line.
fn conclude(
    config: &VmConfig,
    decision: &Decision,
    control: Option<&control::ControlState>,
) -> (i32, Option<CommandStatus>, EndReason, Option<String>) {
    let outcome = control.and_then(|c| c.outcome.clone());
    match (decision, outcome) {
        (Decision::Timeout, _) => {
            let secs = config.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0);
            (
                EXIT_TIMEOUT,
                None,
                EndReason::Timeout,
                Some(format!(
                    "the command timed out after {secs} s; the VM was torn down"
                )),
            )
        }
        (_, Some(Outcome::Exited(status))) => {
            let s = match status {
                ExitStatus::Code(c) => CommandStatus::Code(c),
                ExitStatus::Signal(n) => CommandStatus::Signal(n),
            };
            let copy_errors = control.map(|c| c.copy_out_errors.join("; "));
            match (exit_code_of(status), copy_errors) {
                // the command succeeded but its artifacts did not all arrive: not a success
                (0, Some(errors)) if !errors.is_empty() => (
                    EXIT_VMM_FAILED,
                    Some(s),
                    EndReason::CommandExited,
                    Some(errors),
                ),
                (code, _) => (code, Some(s), EndReason::CommandExited, None),
            }
        }
        (_, Some(Outcome::CopyIn(message))) => (
            EXIT_VMM_FAILED,
            None,
            EndReason::VmmFailed(message.clone()),
            Some(message),
        ),
        (_, Some(Outcome::Failed(kind, message))) => (
            exit_code_of_error(kind),
            None,
            EndReason::CommandNotRun,
            Some(message),
        ),
        (Decision::BootTimeout, _) => {
            let why = format!(
                "the guest never came up: guest-init did not connect within {} s (run with --console to see its kernel log)",
                BOOT_DEADLINE.as_secs()
            );
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
        (Decision::Signal(sig), _) => (
            128 + sig,
            None,
            EndReason::Signal(*sig),
            Some(format!("stopped by signal {sig}; the VM was torn down")),
        ),
        (_, Some(Outcome::Protocol(message))) => (
            EXIT_VMM_FAILED,
            None,
            EndReason::GuestFailed(message.clone()),
            Some(format!("the guest broke the control protocol: {message}")),
        ),
        (Decision::Guest(GuestEnd::Error(e)), None) => (
            EXIT_VMM_FAILED,
            None,
            EndReason::GuestFailed(e.clone()),
            Some(format!("the VM failed: {e}")),
        ),
        // Boot-only: the guest's own reset (reboot=k, or halt/power-off through our kernel patch) is its
        // normal end; a triple fault (KVM shutdown exit) is a crash.
        (Decision::Guest(GuestEnd::Reset), None) if config.command.is_none() => {
            (0, None, EndReason::GuestEnded, None)
        }
        (Decision::Guest(GuestEnd::Shutdown), None) if config.command.is_none() => {
            let why = "the guest crashed: it triple-faulted or halted unexpectedly (run with --console to see its kernel log)".to_string();
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
        (Decision::Guest(end), None) => {
            let connected = control.is_some_and(|c| c.connected_at.is_some());
            let how = match end {
                GuestEnd::Reset => "reset",
                GuestEnd::Shutdown => "triple-faulted (or halted)",
                GuestEnd::Error(_) => "failed",
            };
            let why = if connected {
                format!("the guest {how} before reporting the command's exit status")
            } else {
                format!("the guest never came up: it {how} before guest-init connected (run with --console to see its kernel log)")
            };
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
        (Decision::Command, None) => {
            let why = "the control channel ended without an outcome".to_string();
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
    }
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

    #[test]
    fn touched_pages_are_counted_by_page_table_not_page_cache() {
        let page = 4096;
        let mut mem = vec![0u8; 64 * page];
        let start = (mem.as_mut_ptr() as usize).next_multiple_of(page);
        let pages = 16;
        // SAFETY: [start, start + 16 pages) lies inside `mem`; MADV_DONTNEED on anonymous memory of
        // ours only drops its contents, which are zero anyway.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                pages * page,
                libc::MADV_DONTNEED,
            )
        };
        for i in [0, 3, 7] {
            // SAFETY: inside `mem`, as above.
            unsafe { ((start + i * page) as *mut u8).write_volatile(1) };
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        assert_eq!(
            mapped_pages(&pagemap, start, pages * page, page).unwrap(),
            3
        );
        assert_eq!(mincore_pages(start, pages * page, page), 3);
    }

    #[test]
    fn run_request_defaults_path_and_home_and_lets_flags_override() {
        let spec = crate::config::CommandSpec {
            argv: vec!["ls".into()],
            env: vec![("PATH".into(), "/opt/bin".into()), ("A".into(), "1".into())],
            workdir: "/w".into(),
            uid: 1000,
            gid: 1000,
            transfers: crate::config::Transfers {
                copy_in: vec![("/host/src".into(), "/src".into())],
                copy_out: vec![("/src/out".into(), "/host/out".into())],
            },
        };
        let req = run_request(&spec);
        assert_eq!(req.copy_in, [b"/src".to_vec()]);
        assert_eq!(req.copy_out, [b"/src/out".to_vec()]);
        let env: Vec<String> = req
            .env
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect();
        assert_eq!(env, ["PATH=/opt/bin", "HOME=/", "A=1"]);
        assert_eq!(req.workdir, b"/w");
    }
}
