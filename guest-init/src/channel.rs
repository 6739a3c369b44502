//! Framed messages over the connection to the host (any blocking stream socket: vsock in the guest,
//! a Unix socket pair in tests).
//!
//! Sending blocks until the host has taken the frame. Receiving never blocks: [`Channel::fill`] takes
//! what has arrived and [`Channel::next_message`] hands out whole frames, so the relay can poll the
//! socket alongside the command's pipes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use vmm_protocol::{DecodeError, FrameBuffer, Message};

use crate::sys::{self, describe};

/// The most bytes taken from the socket in one read.
const READ_SIZE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the host closed the connection")]
    Closed,
    #[error("talking to the host: {}", describe(.0))]
    Io(#[source] io::Error),
    #[error("malformed frame from the host: {0}")]
    Decode(#[from] DecodeError),
    #[error("no message from the host within {0:?}")]
    TimedOut(Duration),
}

/// What one [`Channel::fill`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Bytes arrived (perhaps not a whole frame yet).
    Data,
    /// Nothing to read now.
    Empty,
    /// The host closed its end.
    Eof,
}

pub struct Channel {
    fd: OwnedFd,
    frames: FrameBuffer,
    buf: Vec<u8>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> Self {
        Channel {
            fd,
            frames: FrameBuffer::new(),
            buf: vec![0; READ_SIZE],
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends one frame, blocking while the host does not take it.
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        sys::send_all(self.fd.as_raw_fd(), &msg.encode())
    }

    /// Takes what has arrived on the socket without blocking.
    pub fn fill(&mut self) -> io::Result<Fill> {
        match sys::recv_nonblocking(self.fd.as_raw_fd(), &mut self.buf) {
            Ok(0) => Ok(Fill::Eof),
            Ok(n) => {
                self.frames.push(&self.buf[..n]);
                Ok(Fill::Data)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::Empty),
            Err(e) => Err(e),
        }
    }

    /// The next whole message received so far, if any.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        self.frames.next_message()
    }

    /// Waits up to `timeout` for the next message.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Message, ChannelError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.next_message()? {
                return Ok(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::TimedOut(timeout));
            }
            let mut fds = [sys::pollfd(self.raw_fd(), libc::POLLIN)];
            sys::poll(&mut fds, Some(left)).map_err(ChannelError::Io)?;
            if fds[0].revents != 0 {
                match self.fill().map_err(ChannelError::Io)? {
                    Fill::Eof => return Err(ChannelError::Closed),
                    Fill::Data | Fill::Empty => {}
                }
            }
        }
    }

    /// Ends the conversation: half-closes our side (after everything sent so far) and waits up to
    /// `linger` for the host to close its side, so that the last frames leave the guest before the
    /// VM is reset. Whatever the host still sends is discarded.
    pub fn close(mut self, linger: Duration) {
        // SAFETY: shutdown on a socket we own; takes plain integers.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return;
        }
        let deadline = Instant::now() + linger;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut fds = [sys::pollfd(self.raw_fd(), libc::POLLIN)];
            if sys::poll(&mut fds, Some(left)).is_err() {
                return;
            }
            if fds[0].revents != 0 {
                match self.fill() {
                    Ok(Fill::Data) => self.frames = FrameBuffer::new(),
                    Ok(Fill::Empty) => {}
                    Ok(Fill::Eof) | Err(_) => return,
                }
            }
        }
    }
}
