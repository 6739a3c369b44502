//! One run request, from receiving it to reporting how the command ended, over a connection on which
//! Hello has been sent. It works over any stream socket, which is how it is tested.
//!
//! The host sends `Run`, then one copy-in stream per `copy_in` entry of the request. It sees, in
//! order: `Milestone(CommandStarted)`, the command's `Stdout`/`Stderr`, `Milestone(CommandExited)`, one
//! copy-out stream per `copy_out` entry, `Exit`. Or, when the command could not be started (a copy-in
//! failed included), one `Error` (NotFound, NotExecutable or Setup) and nothing else.

use std::io;
use std::time::{Duration, Instant};

use vmm_protocol::{ErrorKind, ExitStatus, Message, Milestone, RunRequest};

use crate::channel::{Channel, ChannelError};
use crate::reaper::Reaper;
use crate::relay::{self, RelayConfig, RelayError};
use crate::spawn;
use crate::sys::{self, describe};
use crate::timeline::Timeline;
use crate::transfer::{self, TransferError};

/// Stdin bytes the host may send before the run request (they are held for the command).
const EARLY_STDIN_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// PID 1: reap every child (see [`Reaper::all_children`]).
    AllChildren,
    /// Reap the command only (tests).
    OnlyCommand,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How long to wait for the run request.
    pub run_timeout: Duration,
    pub reap: ReapMode,
    pub relay: RelayConfig,
}

impl SessionConfig {
    /// The configuration of PID 1.
    pub fn pid1() -> Self {
        SessionConfig {
            run_timeout: Duration::from_secs(60),
            reap: ReapMode::AllChildren,
            relay: RelayConfig::default(),
        }
    }
}

/// How a session that followed the protocol to its end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran and ended so; `Exit` was sent.
    Exited(ExitStatus),
    /// The command could not be started; `Error` was sent.
    NotStarted(ErrorKind),
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("waiting for the run request: {0}")]
    WaitingForRun(#[source] ChannelError),
    #[error("the host sent more than {EARLY_STDIN_LIMIT} bytes of stdin before the run request")]
    TooMuchBeforeRun,
    #[error("sending to the host: {}", describe(.0))]
    Send(#[source] io::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// Receives the run request, runs the command, relays its I/O, reports its end. On an error after
/// the command started, the command's process group is killed before returning.
pub fn serve(
    chan: &mut Channel,
    timeline: &mut Timeline,
    cfg: &SessionConfig,
) -> Result<Outcome, SessionError> {
    let (req, mut early) = wait_for_run(chan, cfg.run_timeout)?;
    if let Err(failed) = transfer::receive_all(chan, &req.copy_in, (req.uid, req.gid), &mut early)?
    {
        let message = failed.to_string();
        crate::log::error(&message);
        chan.send(&Message::Error {
            kind: ErrorKind::Setup,
            message,
        })
        .map_err(SessionError::Send)?;
        return Ok(Outcome::NotStarted(ErrorKind::Setup));
    }
    let child = match spawn::spawn(&req) {
        Ok(child) => child,
        Err(e) => {
            let kind = e.kind();
            let message = e.to_string();
            crate::log::error(&message);
            chan.send(&Message::Error { kind, message })
                .map_err(SessionError::Send)?;
            return Ok(Outcome::NotStarted(kind));
        }
    };
    let pid = child.pid;
    let mut reaper = match cfg.reap {
        ReapMode::AllChildren => Reaper::all_children(),
        ReapMode::OnlyCommand => Reaper::only(pid),
    };
    timeline.mark(Milestone::CommandStarted);
    let finished = timeline
        .flush(chan)
        .map_err(SessionError::Send)
        .and_then(|()| Ok(relay::relay(chan, child, &mut reaper, early, &cfg.relay)?));
    let finished = match finished {
        Ok(f) => f,
        Err(e) => {
            kill_command(pid, cfg.reap);
            return Err(e);
        }
    };
    timeline.mark_at(Milestone::CommandExited, finished.exited_ns);
    timeline.flush(chan).map_err(SessionError::Send)?;
    transfer::send_all(chan, &req.copy_out)?;
    chan.send(&Message::Exit(finished.status))
        .map_err(SessionError::Send)?;
    Ok(Outcome::Exited(finished.status))
}

/// Waits for `Run`. Stdin, StdinClosed and Signal that come before it are kept for the relay;
/// anything else is ignored.
fn wait_for_run(
    chan: &mut Channel,
    timeout: Duration,
) -> Result<(RunRequest, Vec<Message>), SessionError> {
    let deadline = Instant::now() + timeout;
    let mut early = Vec::new();
    let mut early_bytes = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = chan.recv_timeout(left).map_err(|e| match e {
            ChannelError::TimedOut(_) => {
                SessionError::WaitingForRun(ChannelError::TimedOut(timeout))
            }
            e => SessionError::WaitingForRun(e),
        })?;
        match msg {
            Message::Run(req) => return Ok((req, early)),
            m @ (Message::Stdin(_) | Message::StdinClosed | Message::Signal(_)) => {
                if let Message::Stdin(data) = &m {
                    early_bytes += data.len();
                    if early_bytes > EARLY_STDIN_LIMIT {
                        return Err(SessionError::TooMuchBeforeRun);
                    }
                }
                early.push(m);
            }
            other => crate::log::warn(&format!(
                "ignoring an unexpected {} message from the host before the run request",
                other.name()
            )),
        }
    }
}

/// Kills the command's process group (and the command, should it have left it).
fn kill_command(pid: libc::pid_t, reap: ReapMode) {
    let _ = sys::kill(-pid, libc::SIGKILL);
    let _ = sys::kill(pid, libc::SIGKILL);
    // PID 1 resets the VM next and must not wait on a process stuck in the kernel; elsewhere the
    // zombie is collected
    if reap == ReapMode::OnlyCommand {
        let _ = sys::wait_blocking(pid);
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
