//! The poll loop while the command runs: its stdout and stderr go to the host as they are read, the
//! host's stdin, stdin-closed and signal messages go to the command, exited children are reaped.
//!
//! - Output is sent one read (at most [`MAX_CHUNK`] bytes) per frame, at once, with no buffering.
//!   Sending blocks while the host does not take it: that bounds the guest's memory, and the command
//!   blocks on a full pipe meanwhile.
//! - End of file from the host (a half-close) means no more stdin; the relay goes on. A host that is
//!   gone altogether makes the next send fail, which ends the relay with an error.
//! - Stdin waits in a bounded buffer until the command's (non-blocking) stdin pipe takes it. While the
//!   buffer is full the socket is not read, so the host's writes stall through vsock credit.
//! - The command has finished when it has been reaped and its stdout and stderr have reached end of
//!   file. Processes it left behind may hold the pipes open: after the command exits, output is
//!   drained until end of file, until [`RelayConfig::grace_idle`] passes without output, or for
//!   [`RelayConfig::grace_max`] at most.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vmm_protocol::{DecodeError, ExitStatus, Message, MAX_CHUNK};

use crate::channel::{Channel, Fill};
use crate::reaper::Reaper;
use crate::spawn::Child;
use crate::sys::{self, describe};

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Stdin bytes held for the command at most before the socket is no longer read.
    pub stdin_limit: usize,
    /// After the command exits: stop draining output after this long without any.
    pub grace_idle: Duration,
    /// After the command exits: stop draining output after this long in any case.
    pub grace_max: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            stdin_limit: 256 * 1024,
            grace_idle: Duration::from_millis(100),
            grace_max: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("talking to the host: {}", describe(.0))]
    Host(#[source] io::Error),
    #[error("malformed frame from the host: {0}")]
    Protocol(#[from] DecodeError),
    #[error("polling: {}", describe(.0))]
    Poll(#[source] io::Error),
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub status: ExitStatus,
    /// CLOCK_BOOTTIME when the command was reaped.
    pub exited_ns: u64,
}

struct Relay<'a> {
    chan: &'a mut Channel,
    cfg: &'a RelayConfig,
    pid: libc::pid_t,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    pending: VecDeque<u8>,
    /// The host sent StdinClosed: close stdin once `pending` is written.
    stdin_closed: bool,
    /// The host has closed its side (end of file): nothing more will come from it.
    host_done: bool,
    buf: Vec<u8>,
    /// When the command was reaped, and how.
    exited: Option<(Instant, Finished)>,
    last_output: Instant,
}

/// Relays until the command has finished (see the module doc). `early` are messages the host sent
/// before the command started; they are handled first. On an error the command is still running:
/// the caller kills it.
pub fn relay(
    chan: &mut Channel,
    child: Child,
    reaper: &mut Reaper,
    early: Vec<Message>,
    cfg: &RelayConfig,
) -> Result<Finished, RelayError> {
    let mut r = Relay {
        chan,
        cfg,
        pid: child.pid,
        stdin: Some(child.stdin),
        stdout: Some(child.stdout),
        stderr: Some(child.stderr),
        pending: VecDeque::new(),
        stdin_closed: false,
        host_done: false,
        buf: vec![0; MAX_CHUNK],
        exited: None,
        last_output: Instant::now(),
    };
    for m in early {
        r.handle(m);
    }
    // frames that arrived together with the run request wait in the channel's buffer
    while let Some(m) = r.chan.next_message()? {
        r.handle(m);
    }
    r.run(reaper)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Socket,
    Stdin,
    Stdout,
    Stderr,
    Reaper,
}

impl Relay<'_> {
    fn run(&mut self, reaper: &mut Reaper) -> Result<Finished, RelayError> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
        let mut slots: Vec<Slot> = Vec::with_capacity(5);
        loop {
            self.close_stdin_when_done();
            if let Some((at, fin)) = self.exited {
                let now = Instant::now();
                if (self.stdout.is_none() && self.stderr.is_none())
                    || now >= at + self.cfg.grace_max
                    || now >= self.last_output + self.cfg.grace_idle
                {
                    return Ok(fin);
                }
            }
            let reaped = self.exited.is_some();

            fds.clear();
            slots.clear();
            let mut add = |fd: i32, events: libc::c_short, slot: Slot| {
                fds.push(sys::pollfd(fd, events));
                slots.push(slot);
            };
            if !reaped && !self.host_done && self.pending.len() < self.cfg.stdin_limit {
                add(self.chan.raw_fd(), libc::POLLIN, Slot::Socket);
            }
            if let (Some(fd), false) = (&self.stdin, self.pending.is_empty()) {
                add(fd.as_raw_fd(), libc::POLLOUT, Slot::Stdin);
            }
            if let Some(fd) = &self.stdout {
                add(fd.as_raw_fd(), libc::POLLIN, Slot::Stdout);
            }
            if let Some(fd) = &self.stderr {
                add(fd.as_raw_fd(), libc::POLLIN, Slot::Stderr);
            }
            if let Some(fd) = reaper.poll_fd(reaped) {
                add(fd, libc::POLLIN, Slot::Reaper);
            }

            let timeout = self.timeout(reaper.tick(reaped));
            sys::poll(&mut fds, timeout).map_err(RelayError::Poll)?;

            let mut check_children = reaper.tick(reaped).is_some();
            for (p, slot) in fds.iter().zip(&slots) {
                if p.revents == 0 {
                    continue;
                }
                match slot {
                    Slot::Socket => self.read_socket()?,
                    Slot::Stdin => self.write_stdin(),
                    Slot::Stdout => self.forward_output(false)?,
                    Slot::Stderr => self.forward_output(true)?,
                    Slot::Reaper => check_children = true,
                }
            }
            if check_children {
                if let Some(status) = reaper.reap(self.pid) {
                    self.command_exited(status);
                }
            }
        }
    }

    /// The poll timeout: the end of the grace period once the command has exited, the reaper's tick
    /// when it has no descriptor, else none.
    fn timeout(&self, tick: Option<Duration>) -> Option<Duration> {
        let grace = self.exited.map(|(at, _)| {
            let end = (at + self.cfg.grace_max).min(self.last_output + self.cfg.grace_idle);
            end.saturating_duration_since(Instant::now())
        });
        match (grace, tick) {
            (Some(g), Some(t)) => Some(g.min(t)),
            (g, t) => g.or(t),
        }
    }

    fn command_exited(&mut self, status: ExitStatus) {
        let now = Instant::now();
        let fin = Finished {
            status,
            exited_ns: sys::boottime_ns(),
        };
        self.exited = Some((now, fin));
        self.last_output = now;
        // nobody is left to read stdin (orphans holding it do not count)
        self.stdin = None;
        self.pending.clear();
    }

    fn handle(&mut self, msg: Message) {
        match msg {
            Message::Stdin(data) => {
                if self.stdin.is_some() && !self.stdin_closed {
                    self.pending.extend(data);
                }
            }
            Message::StdinClosed => self.stdin_closed = true,
            Message::Signal(sig) => {
                // the command leads its own process group; a bad number is the host's mistake
                if let Err(e) = sys::kill(-self.pid, sig) {
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        crate::log::warn(&format!("signal {sig} to the command: {}", describe(&e)));
                    }
                }
            }
            other => crate::log::warn(&format!(
                "ignoring an unexpected {} message from the host while the command runs",
                other.name()
            )),
        }
    }

    fn close_stdin_when_done(&mut self) {
        if self.stdin_closed && self.pending.is_empty() {
            self.stdin = None;
        }
    }

    fn read_socket(&mut self) -> Result<(), RelayError> {
        match self.chan.fill().map_err(RelayError::Host)? {
            Fill::Eof => {
                // A half-close: nothing more to read, but the host may still be reading (should it
                // be gone altogether, the next send fails). No more stdin, then.
                self.host_done = true;
                self.stdin_closed = true;
            }
            Fill::Data | Fill::Empty => {}
        }
        while let Some(msg) = self.chan.next_message()? {
            self.handle(msg);
        }
        // try at once rather than after another poll round
        self.write_stdin();
        Ok(())
    }

    fn write_stdin(&mut self) {
        let Some(fd) = &self.stdin else {
            self.pending.clear();
            return;
        };
        while !self.pending.is_empty() {
            let (chunk, _) = self.pending.as_slices();
            match sys::write(fd.as_raw_fd(), chunk) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EPIPE: the command closed its stdin; the rest of the host's stdin is dropped
                    if e.raw_os_error() != Some(libc::EPIPE) {
                        crate::log::warn(&format!("writing the command's stdin: {}", describe(&e)));
                    }
                    self.stdin = None;
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    fn forward_output(&mut self, is_stderr: bool) -> Result<(), RelayError> {
        let pipe = if is_stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let Some(fd) = pipe else {
            return Ok(());
        };
        match sys::read(fd.as_raw_fd(), &mut self.buf) {
            Ok(0) => *pipe = None,
            Ok(n) => {
                let data = self.buf[..n].to_vec();
                let msg = if is_stderr {
                    Message::Stderr(data)
                } else {
                    Message::Stdout(data)
                };
                self.chan.send(&msg).map_err(RelayError::Host)?;
                // after the send, which may have blocked on a slow host
                self.last_output = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                crate::log::warn(&format!("reading the command's output: {}", describe(&e)));
                *pipe = None;
            }
        }
        Ok(())
    }
}
