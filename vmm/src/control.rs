//! The host end of the control channel: speaks the protocol with guest-init over the vsock stream that
//! the vsock device hands us as a Unix socket. It sends the run request and stdin, and turns the guest's
//! frames into our stdout and stderr and the command's exit status. Every frame from the guest is
//! hostile: a malformed one ends the run with a protocol error.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_protocol::{
    ErrorKind, ExitStatus, Message, Milestone, ReadError, RunRequest, MAX_CHUNK, VERSION,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config::Transfers;
use crate::transfer::CopyOutError;

/// How the conversation with guest-init ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran and ended so.
    Exited(ExitStatus),
    /// guest-init could not run the command.
    Failed(ErrorKind, String),
    /// The guest broke the protocol or closed the channel early.
    Protocol(String),
    /// vmm's side failed: a copy-in could not be read, or the copies could not be confined.
    HostFailed(String),
}

/// What the control channel learnt, read by the main thread at teardown.
#[derive(Debug, Default, Clone)]
pub struct ControlState {
    pub connected_at: Option<Instant>,
    pub outcome: Option<Outcome>,
    /// Guest milestones as (milestone, guest CLOCK_BOOTTIME ns, host time of arrival).
    pub milestones: Vec<(Milestone, u64, Instant)>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdin_bytes: u64,
    /// Bytes of file data copied in and out, and when each direction began and ended.
    pub copy_in_bytes: u64,
    pub copy_out_bytes: u64,
    pub copy_in_span: Option<(Instant, Instant)>,
    pub copy_out_span: Option<(Instant, Instant)>,
    /// One line per copy-out that failed (the run goes on).
    pub copy_out_errors: Vec<String>,
    /// How far Landlock keeps this thread to the copy directories.
    pub confinement: Option<crate::copy_sandbox::Confinement>,
}

impl ControlState {
    /// Keeps the first arrival of each milestone: a guest repeating them (14-byte frames in a loop)
    /// must not grow this without bound.
    pub fn record_milestone(&mut self, milestone: Milestone, boottime_ns: u64, at: Instant) {
        if !self.milestones.iter().any(|(m, _, _)| *m == milestone) {
            self.milestones.push((milestone, boottime_ns, at));
        }
    }
}

/// What became of a signal to forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Sent,
    /// guest-init has not connected (yet): nobody to tell.
    NotConnected,
    /// The channel is busy or full right now; try again.
    NotNow,
    /// The channel can carry no more frames.
    Broken,
}

/// Sends frames to the guest from several threads (stdin pump, signal forwarding).
#[derive(Clone)]
pub struct ControlWriter(Arc<Mutex<Option<UnixStream>>>);

impl ControlWriter {
    fn send(&self, msg: &Message) -> std::io::Result<()> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(stream) => msg.write_to(stream),
            None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        }
    }

    /// Forwards a signal to the command without ever blocking: the event loop calls it, and only the
    /// event loop moves bytes from this socket to the guest, so a blocking write could wait forever.
    pub fn forward_signal(&self, signal: i32) -> Forward {
        let Ok(guard) = self.0.try_lock() else {
            // another thread is mid-frame (the stdin pump, perhaps blocked while the guest reads none
            // of its stdin)
            return Forward::NotNow;
        };
        let Some(stream) = guard.as_ref() else {
            return Forward::NotConnected;
        };
        let frame = Message::Signal(signal).encode();
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        match rustix::net::send(stream, &frame, flags) {
            Ok(n) if n == frame.len() => Forward::Sent,
            // Nothing went out: the socket is full, try again later.
            Err(rustix::io::Errno::AGAIN) => Forward::NotNow,
            // Part of a frame, or a dead socket: the stream cannot carry another frame.
            _ => Forward::Broken,
        }
    }
}

pub struct Control {
    pub state: Arc<Mutex<ControlState>>,
    pub writer: ControlWriter,
    /// Written when `state.outcome` is set.
    pub done: EventFd,
    _thread: JoinHandle<()>,
}

/// The guest's view of the command: argv, its whole environment, workdir, user, the copies' guest
/// paths.
pub fn run_request(spec: &crate::config::CommandSpec) -> RunRequest {
    let bytes = |s: &str| s.as_bytes().to_vec();
    RunRequest {
        argv: spec.argv.iter().map(|a| bytes(a)).collect(),
        env: spec
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}").into_bytes())
            .collect(),
        workdir: bytes(&spec.workdir),
        uid: spec.uid,
        gid: spec.gid,
        copy_in: spec
            .transfers
            .copy_in
            .iter()
            .map(|(_, guest)| bytes(guest))
            .collect(),
        copy_out: spec
            .transfers
            .copy_out
            .iter()
            .map(|(guest, _)| bytes(guest))
            .collect(),
    }
}

/// Starts the control thread: it waits for guest-init to connect, then runs the conversation.
pub fn start(
    connections: Receiver<UnixStream>,
    request: RunRequest,
    transfers: Transfers,
    stdin: Box<dyn Read + Send>,
) -> std::io::Result<Control> {
    let state = Arc::new(Mutex::new(ControlState::default()));
    let writer = ControlWriter(Arc::new(Mutex::new(None)));
    let done = EventFd::new(libc::EFD_NONBLOCK)?;
    let thread = {
        let state = state.clone();
        let writer = writer.clone();
        let done = done.try_clone()?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let outcome = converse(&connections, request, &transfers, stdin, &state, &writer);
                lock(&state).outcome = Some(outcome);
                // if the write fails the counter is saturated and the loop is awake anyway
                let _ = done.write(1);
            })?
    };
    Ok(Control {
        state,
        writer,
        done,
        _thread: thread,
    })
}

fn lock(state: &Mutex<ControlState>) -> std::sync::MutexGuard<'_, ControlState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn converse(
    connections: &Receiver<UnixStream>,
    request: RunRequest,
    transfers: &Transfers,
    stdin: Box<dyn Read + Send>,
    state: &Mutex<ControlState>,
    writer: &ControlWriter,
) -> Outcome {
    let Ok(mut stream) = connections.recv() else {
        return Outcome::Protocol("the vsock device went away before guest-init connected".into());
    };
    // Confined and filtered before the first byte from the guest is read; not earlier, because
    // installing a filter takes a few hundred microseconds on some hosts, which would compete with the
    // vCPU's way into the guest, and until now this thread has only waited.
    match confine_to_copies(transfers) {
        Ok(confinement) => lock(state).confinement = Some(confinement),
        Err(e) => return Outcome::HostFailed(e.to_string()),
    }
    crate::seccomp::apply_or_exit(crate::seccomp::Thread::Control);
    lock(state).connected_at = Some(Instant::now());
    match Message::read_from(&mut stream) {
        Ok(Message::Hello { version }) if version == VERSION => {}
        Ok(Message::Hello { version }) => {
            return Outcome::Protocol(format!(
                "guest-init speaks protocol version {version}, vmm speaks {VERSION}"
            ))
        }
        Ok(other) => return Outcome::Protocol(format!("expected Hello, got {}", other.name())),
        Err(e) => return Outcome::Protocol(format!("before Hello: {e}")),
    }
    match stream.try_clone() {
        Ok(w) => *writer.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(w),
        Err(e) => return Outcome::Protocol(format!("cannot clone the control socket: {e}")),
    }
    if let Err(e) = writer.send(&Message::Run(request)) {
        return Outcome::Protocol(format!("sending the run request: {e}"));
    }
    if let Err(outcome) = send_copies_in(transfers, state, writer) {
        return outcome;
    }
    start_stdin_pump(stdin, writer.clone());
    relay(&mut stream, transfers, state)
}

/// Sends every `--copy-in` stream, in order.
fn send_copies_in(
    transfers: &Transfers,
    state: &Mutex<ControlState>,
    writer: &ControlWriter,
) -> Result<(), Outcome> {
    if transfers.copy_in.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    for (host_dir, guest_dir) in &transfers.copy_in {
        match crate::transfer::send_copy_in(host_dir, &mut |m| writer.send(&m)) {
            Ok(bytes) => lock(state).copy_in_bytes += bytes,
            Err(e) => {
                return Err(Outcome::HostFailed(format!(
                    "copy-in of {} to {guest_dir}: {e}",
                    host_dir.display()
                )))
            }
        }
    }
    lock(state).copy_in_span = Some((started, Instant::now()));
    Ok(())
}

/// Relays the guest's frames (output, milestones, copy-out streams) until the command's outcome.
fn relay(stream: &mut UnixStream, transfers: &Transfers, state: &Mutex<ControlState>) -> Outcome {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut copied_out = 0;
    loop {
        match Message::read_from(stream) {
            Ok(Message::Stdout(data)) => {
                lock(state).stdout_bytes += data.len() as u64;
                // A closed stdout (e.g. `vmm ... | head`) must not end the run early: drop the bytes.
                let _ = stdout.write_all(&data).and_then(|_| stdout.flush());
            }
            Ok(Message::Stderr(data)) => {
                lock(state).stderr_bytes += data.len() as u64;
                let _ = stderr.write_all(&data).and_then(|_| stderr.flush());
            }
            Ok(Message::Milestone {
                milestone,
                boottime_ns,
            }) => {
                lock(state).record_milestone(milestone, boottime_ns, Instant::now());
            }
            Ok(first @ (Message::CopyOut(_) | Message::CopyOutEnd | Message::CopyOutFailed(_))) => {
                let Some((guest_path, host_dir)) = transfers.copy_out.get(copied_out) else {
                    return Outcome::Protocol(
                        "the guest sent a copy-out stream nobody asked for".into(),
                    );
                };
                copied_out += 1;
                let started = Instant::now();
                let received =
                    crate::transfer::receive_copy_out(first, stream, guest_path, host_dir);
                let mut st = lock(state);
                let first_start = st.copy_out_span.map_or(started, |(s, _)| s);
                st.copy_out_span = Some((first_start, Instant::now()));
                match received {
                    Ok(bytes) => st.copy_out_bytes += bytes,
                    Err(CopyOutError::Failed(why)) => st
                        .copy_out_errors
                        .push(format!("copy-out of {guest_path}: {why}")),
                    Err(CopyOutError::Protocol(why)) => return Outcome::Protocol(why),
                }
            }
            Ok(Message::Exit(status)) => {
                let mut st = lock(state);
                for (guest_path, _) in transfers.copy_out.iter().skip(copied_out) {
                    st.copy_out_errors
                        .push(format!("copy-out of {guest_path}: the guest sent nothing"));
                }
                return Outcome::Exited(status);
            }
            Ok(Message::Error { kind, message }) => return Outcome::Failed(kind, message),
            Ok(other) => {
                return Outcome::Protocol(format!(
                    "unexpected frame from the guest: {}",
                    other.name()
                ))
            }
            Err(ReadError::Closed) => {
                return Outcome::Protocol("guest-init closed the control channel".into())
            }
            Err(e) => return Outcome::Protocol(e.to_string()),
        }
    }
}

/// Confines this thread (and the stdin thread it starts) to the copy directories. A copy-out's
/// HOST_DIR is made first, as it would be when its stream arrives: Landlock rules name existing
/// directories.
fn confine_to_copies(
    transfers: &Transfers,
) -> Result<crate::copy_sandbox::Confinement, crate::copy_sandbox::SandboxError> {
    for (_, host_dir) in &transfers.copy_out {
        // a directory that cannot be made fails its copy-out later, with the reason
        let _ = std::fs::create_dir_all(host_dir);
    }
    let read: Vec<&std::path::Path> = transfers.copy_in.iter().map(|(h, _)| h.as_path()).collect();
    let write: Vec<&std::path::Path> = transfers
        .copy_out
        .iter()
        .map(|(_, h)| h.as_path())
        .collect();
    crate::copy_sandbox::confine(&read, &write)
}

/// Forwards our stdin to the command, then its end of file.
fn start_stdin_pump(mut stdin: Box<dyn Read + Send>, writer: ControlWriter) {
    let closer = writer.clone();
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::Stdin);
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if writer.send(&Message::Stdin(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = writer.send(&Message::StdinClosed);
        });
    if spawned.is_err() {
        // Without the pump the command gets no stdin: tell it so, rather than leave it waiting.
        let _ = closer.send(&Message::StdinClosed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer_and_peer() -> (ControlWriter, UnixStream) {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        (ControlWriter(Arc::new(Mutex::new(Some(ours)))), peer)
    }

    #[test]
    fn the_run_request_carries_the_spec() {
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
        assert_eq!(req.argv, [b"ls".to_vec()]);
        assert_eq!(req.copy_in, [b"/src".to_vec()]);
        assert_eq!(req.copy_out, [b"/src/out".to_vec()]);
        assert_eq!(req.env, [b"PATH=/opt/bin".to_vec(), b"A=1".to_vec()]);
        assert_eq!(req.workdir, b"/w");
        assert_eq!((req.uid, req.gid), (1000, 1000));
    }

    #[test]
    fn each_milestone_is_kept_once_however_often_the_guest_sends_it() {
        let mut state = ControlState::default();
        let now = Instant::now();
        for i in 0..100_000u64 {
            for m in [Milestone::InitStarted, Milestone::CommandStarted] {
                state.record_milestone(m, i, now);
            }
        }
        let kept: Vec<_> = state
            .milestones
            .iter()
            .map(|(m, ns, _)| (*m, *ns))
            .collect();
        assert_eq!(
            kept,
            [(Milestone::InitStarted, 0), (Milestone::CommandStarted, 0)]
        );
    }

    #[test]
    fn a_forwarded_signal_arrives_as_one_frame() {
        let (writer, mut peer) = writer_and_peer();
        assert_eq!(writer.forward_signal(libc::SIGTERM), Forward::Sent);
        match Message::read_from(&mut peer) {
            Ok(Message::Signal(sig)) => assert_eq!(sig, libc::SIGTERM),
            other => panic!("expected a Signal frame, got {other:?}"),
        }
    }

    #[test]
    fn forwarding_a_signal_never_waits_for_the_guest() {
        // not connected
        assert_eq!(
            ControlWriter(Arc::new(Mutex::new(None))).forward_signal(libc::SIGTERM),
            Forward::NotConnected
        );

        // another thread holds the writer, as the stdin pump does while it is blocked
        let (writer, _peer) = writer_and_peer();
        let held = writer.0.lock().expect("lock");
        assert_eq!(writer.forward_signal(libc::SIGTERM), Forward::NotNow);
        drop(held);

        // the socket is full: nobody drains it
        let (writer, peer) = writer_and_peer();
        {
            let guard = writer.0.lock().expect("lock");
            let stream = guard.as_ref().expect("connected");
            let chunk = [0u8; 4096];
            let flags = rustix::net::SendFlags::DONTWAIT;
            while rustix::net::send(stream, &chunk, flags).is_ok() {}
        }
        assert_eq!(writer.forward_signal(libc::SIGTERM), Forward::NotNow);

        // the guest's end is gone
        drop(peer);
        assert_eq!(writer.forward_signal(libc::SIGTERM), Forward::Broken);
    }
}
