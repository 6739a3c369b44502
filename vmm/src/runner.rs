//! The running VM, in four steps with their own types, and the one path that every ending (command
//! exited, guest reset, timeout, signal, fatal error) goes through: [`start`] builds the VM and starts
//! its vCPUs, control thread and event loop ([`Running`]); [`wait`] runs the loop until the lifecycle
//! decides ([`Decision`]); [`teardown`] stops the vCPUs and collects what happened ([`Collected`]);
//! `report::report` turns that into the result and the trace.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::builder::{self, BuildError, Vm};
use crate::config::VmConfig;
use crate::control::{self, Control};
use crate::lifecycle::{Decision, Lifecycle};
use crate::output_file::OutputFile;
use crate::report::Collected;
use crate::result::RunResult;
use crate::timeline::Timeline;
use crate::vcpu::{self, VcpuHandle};

/// How long the vCPU threads get to leave KVM_RUN at teardown; exiting the process stops them anyway.
const VCPU_STOP_WAIT: Duration = Duration::from_millis(100);
/// How long the main thread waits for the boot vCPU to enter the guest before filtering itself.
const BOOT_VCPU_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    #[error("cannot set up a timer: {0}")]
    Timer(vmm_sys_util::errno::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Boots the VM described by `config`, runs it to its end and returns the result.
pub fn run(
    config: &VmConfig,
    signals: OwnedFd,
    mut timeline: Timeline,
    trace_out: Option<OutputFile>,
) -> Result<RunResult, RunError> {
    let mut running = start(config, signals, &mut timeline)?;
    let decision = wait(&mut running)?;
    let ended_at = Instant::now();
    timeline.mark("guest ran");
    let collected = teardown(running, decision, ended_at);
    Ok(crate::report::report(
        config, collected, timeline, trace_out,
    )?)
}

/// A VM whose vCPUs run, with its control thread and its event loop.
pub struct Running {
    vm: Vm,
    control: Option<Control>,
    vcpus: Vec<VcpuHandle>,
    stop: Arc<AtomicBool>,
    event_loop: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    lifecycle: Arc<Mutex<Lifecycle>>,
}

/// Builds the VM, starts the control thread and the vCPUs, and sets up the event loop; the main
/// thread is under its seccomp filter when this returns.
pub fn start(
    config: &VmConfig,
    signals: OwnedFd,
    timeline: &mut Timeline,
) -> Result<Running, RunError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (running_tx, boot_vcpu_running) = std::sync::mpsc::channel();
    let pending = (0..config.vcpus)
        .map(|index| vcpu::prestart(index, stop.clone(), running_tx.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::Thread)?;
    drop(running_tx);
    let mut vm: Vm = builder::build(config, crate::initramfs::GUEST_INIT, timeline)?;
    let control_connections = vm.control.take();
    let control: Option<Control> = match (&config.command, control_connections) {
        (Some(spec), Some(control_connections)) => Some(
            control::start(
                control_connections,
                control::run_request(spec),
                spec.transfers.clone(),
                Box::new(std::io::stdin()),
            )
            .map_err(RunError::Thread)?,
        ),
        _ => None,
    };

    let mut event_loop: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| RunError::EventLoop(e.to_string()))?;
    for s in &vm.devices.subscribers {
        event_loop.add_subscriber(s.clone());
    }
    // What is left of --timeout, which counts from vmm's start.
    let timeout_left = config
        .timeout
        .map(|t| t.saturating_sub(timeline.start().elapsed()));
    let lifecycle = Arc::new(Mutex::new(
        Lifecycle::new(vm.end.clone(), control.as_ref(), signals, timeout_left)
            .map_err(RunError::Timer)?,
    ));
    event_loop.add_subscriber(lifecycle.clone());

    vcpu::register_kick_signal().map_err(|e| RunError::Signals(e.into()))?;
    let vcpus: Vec<VcpuHandle> = pending
        .into_iter()
        .zip(std::mem::take(&mut vm.vcpus))
        .map(|(thread, fd)| thread.start(fd, vm.devices.io.clone(), vm.end.clone()))
        .collect();
    // Our own filter goes on once the boot vCPU is in the guest: installing one (the kernel compiles it)
    // takes a few hundred microseconds on some hosts, which would otherwise hold up the first KVM_RUN.
    // Nothing here has handled guest data yet; the event loop starts after this.
    // Bounded: whatever the vCPU thread does, the event loop (and with it --timeout) must start.
    let _ = boot_vcpu_running.recv_timeout(BOOT_VCPU_WAIT);
    crate::seccomp::apply(crate::seccomp::Thread::Vmm)?;
    timeline.mark("vcpus started");
    Ok(Running {
        vm,
        control,
        vcpus,
        stop,
        event_loop,
        lifecycle,
    })
}

/// Runs the event loop until the lifecycle decides how the run ends.
pub fn wait(running: &mut Running) -> Result<Decision, RunError> {
    loop {
        let decided = running
            .lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decision();
        if let Some(decision) = decided {
            return Ok(decision);
        }
        running
            .event_loop
            .run()
            .map_err(|e| RunError::EventLoop(e.to_string()))?;
    }
}

/// Stops the vCPUs (one kick each; see `vcpu::register_kick_signal`) and collects what happened.
pub fn teardown(running: Running, decision: Decision, ended_at: Instant) -> Collected {
    running.stop.store(true, Ordering::Release);
    running.vcpus.iter().for_each(VcpuHandle::kick);
    // A thread usually ends within microseconds of its kick: poll soon, then back off.
    let deadline = Instant::now() + VCPU_STOP_WAIT;
    let mut pause = Duration::from_micros(20);
    while running.vcpus.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
    Collected {
        exit_counts: running.vcpus.iter().map(VcpuHandle::counts).collect(),
        control_state: running
            .control
            .as_ref()
            .map(|c| c.state.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        vm: running.vm,
        decision,
        ended_at,
    }
}
