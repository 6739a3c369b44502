//! The wire protocol between `vmm` (host) and `guest-init` (PID 1 in the guest), spoken over one
//! virtio-vsock stream.
//!
//! Every message is a frame: a 5-byte header (payload length as u32 little-endian, then a type byte)
//! followed by the payload. Fields inside a payload are fixed-width little-endian integers and
//! length-prefixed (u32) byte strings. The host treats every frame from the guest as hostile: a length
//! over [`MAX_PAYLOAD`], an unknown type, a truncated or over-long payload each decode to an error, and
//! the caller ends the VM with a protocol error.

use std::io::{self, Read, Write};

pub mod chunks;
pub mod tree;

/// Protocol version sent in [`Message::Hello`]; a host refuses a guest with another version.
pub const VERSION: u32 = 2;

/// The vsock port on the host (CID 2) that guest-init connects to.
pub const CONTROL_PORT: u32 = 1024;

/// The I/O port of vmm's timestamp device: guest-init writes a [`Milestone`] number there as it reaches
/// it, and the VMM stamps it with the host clock (one exit each), so guest phases line up with host ones.
pub const TIMESTAMP_PORT: u16 = 0x440;

/// The largest payload of one frame. Output is sent in chunks of at most [`MAX_CHUNK`].
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The largest stdout/stderr/stdin chunk a sender puts in one frame.
pub const MAX_CHUNK: usize = 32 * 1024;

const HEADER_LEN: usize = 5;

/// Guest-side milestones reported to the host for the boot timeline (nanoseconds of the guest's
/// CLOCK_BOOTTIME, i.e. since the guest kernel started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Milestone {
    InitStarted = 1,
    RootMounted = 2,
    Connected = 3,
    CommandStarted = 4,
    CommandExited = 5,
}

impl Milestone {
    pub fn name(self) -> &'static str {
        match self {
            Milestone::InitStarted => "init started",
            Milestone::RootMounted => "root mounted",
            Milestone::Connected => "vsock connected",
            Milestone::CommandStarted => "command started",
            Milestone::CommandExited => "command exited",
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Milestone::InitStarted,
            2 => Milestone::RootMounted,
            3 => Milestone::Connected,
            4 => Milestone::CommandStarted,
            5 => Milestone::CommandExited,
            _ => return None,
        })
    }
}

/// Why guest-init could not run the command: mapped to `vmm`'s exit status by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorKind {
    /// The program does not exist (exit 127).
    NotFound = 1,
    /// The program exists but cannot be executed (exit 126).
    NotExecutable = 2,
    /// Guest set-up failed before the command could start: mounts, user, working directory (exit 125).
    Setup = 3,
}

impl ErrorKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ErrorKind::NotFound,
            2 => ErrorKind::NotExecutable,
            3 => ErrorKind::Setup,
            _ => return None,
        })
    }
}

/// What the command to run is and how to run it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunRequest {
    /// Program and arguments; argv[0] is looked up in PATH of `env` when it has no slash.
    pub argv: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries: the command's whole environment.
    pub env: Vec<Vec<u8>>,
    /// Working directory (absolute path in the guest).
    pub workdir: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    /// Guest directories to unpack the host's copy-in streams into, in order: after `Run`, the host
    /// sends one stream per entry (`CopyIn` chunks of a tar, then `CopyInEnd`), and the command starts
    /// once every stream is in.
    pub copy_in: Vec<Vec<u8>>,
    /// Guest paths to send back once the command has ended, in order: one stream each (`CopyOut`
    /// chunks of a tar whose single top-level entry is the path's last component, then `CopyOutEnd`,
    /// or `CopyOutFailed`), before `Exit`.
    pub copy_out: Vec<Vec<u8>>,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// guest -> host, first frame: protocol version and the guest's milestones so far.
    Hello { version: u32 },
    /// guest -> host: a milestone and when the guest reached it.
    Milestone {
        milestone: Milestone,
        boottime_ns: u64,
    },
    /// host -> guest: the command to run.
    Run(RunRequest),
    /// host -> guest: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// host -> guest: the command's stdin reached end of file.
    StdinClosed,
    /// host -> guest: deliver this signal to the command.
    Signal(i32),
    /// guest -> host: bytes the command wrote to stdout.
    Stdout(Vec<u8>),
    /// guest -> host: bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// guest -> host: the command ended.
    Exit(ExitStatus),
    /// guest -> host: the command could not be run.
    Error { kind: ErrorKind, message: String },
    /// host -> guest: the next bytes of the current copy-in tar stream.
    CopyIn(Vec<u8>),
    /// host -> guest: the current copy-in stream is complete.
    CopyInEnd,
    /// guest -> host: the next bytes of the current copy-out tar stream.
    CopyOut(Vec<u8>),
    /// guest -> host: the current copy-out stream is complete.
    CopyOutEnd,
    /// guest -> host: the current copy-out path could not be sent (the stream so far is void).
    CopyOutFailed(String),
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const MILESTONE: u8 = 2;
    pub const RUN: u8 = 3;
    pub const STDIN: u8 = 4;
    pub const STDIN_CLOSED: u8 = 5;
    pub const SIGNAL: u8 = 6;
    pub const STDOUT: u8 = 7;
    pub const STDERR: u8 = 8;
    pub const EXIT_CODE: u8 = 9;
    pub const EXIT_SIGNAL: u8 = 10;
    pub const ERROR: u8 = 11;
    pub const COPY_IN: u8 = 12;
    pub const COPY_IN_END: u8 = 13;
    pub const COPY_OUT: u8 = 14;
    pub const COPY_OUT_END: u8 = 15;
    pub const COPY_OUT_FAILED: u8 = 16;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("truncated payload in a frame of type {0}")]
    Truncated(u8),
    #[error("{0} trailing bytes in a frame of type {1}")]
    Trailing(usize, u8),
    #[error("invalid value in a frame of type {0}")]
    InvalidValue(u8),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the connection closed")]
    Closed,
    #[error("reading a frame: {0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
}

impl Message {
    /// The name of this message's type, for log lines and errors (a payload can be large, and is the
    /// peer's).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Milestone { .. } => "Milestone",
            Message::Run(_) => "Run",
            Message::Stdin(_) => "Stdin",
            Message::StdinClosed => "StdinClosed",
            Message::Signal(_) => "Signal",
            Message::Stdout(_) => "Stdout",
            Message::Stderr(_) => "Stderr",
            Message::Exit(_) => "Exit",
            Message::Error { .. } => "Error",
            Message::CopyIn(_) => "CopyIn",
            Message::CopyInEnd => "CopyInEnd",
            Message::CopyOut(_) => "CopyOut",
            Message::CopyOutEnd => "CopyOutEnd",
            Message::CopyOutFailed(_) => "CopyOutFailed",
        }
    }

    /// The frame of this message: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        let t = match self {
            Message::Hello { version } => {
                out.extend_from_slice(&version.to_le_bytes());
                tag::HELLO
            }
            Message::Milestone {
                milestone,
                boottime_ns,
            } => {
                out.push(*milestone as u8);
                out.extend_from_slice(&boottime_ns.to_le_bytes());
                tag::MILESTONE
            }
            Message::Run(req) => {
                put_list(&mut out, &req.argv);
                put_list(&mut out, &req.env);
                put_bytes(&mut out, &req.workdir);
                out.extend_from_slice(&req.uid.to_le_bytes());
                out.extend_from_slice(&req.gid.to_le_bytes());
                put_list(&mut out, &req.copy_in);
                put_list(&mut out, &req.copy_out);
                tag::RUN
            }
            Message::Stdin(data) => {
                out.extend_from_slice(data);
                tag::STDIN
            }
            Message::StdinClosed => tag::STDIN_CLOSED,
            Message::Signal(sig) => {
                out.extend_from_slice(&sig.to_le_bytes());
                tag::SIGNAL
            }
            Message::Stdout(data) => {
                out.extend_from_slice(data);
                tag::STDOUT
            }
            Message::Stderr(data) => {
                out.extend_from_slice(data);
                tag::STDERR
            }
            Message::Exit(ExitStatus::Code(c)) => {
                out.extend_from_slice(&c.to_le_bytes());
                tag::EXIT_CODE
            }
            Message::Exit(ExitStatus::Signal(s)) => {
                out.extend_from_slice(&s.to_le_bytes());
                tag::EXIT_SIGNAL
            }
            Message::Error { kind, message } => {
                out.push(*kind as u8);
                out.extend_from_slice(message.as_bytes());
                tag::ERROR
            }
            Message::CopyIn(data) => {
                out.extend_from_slice(data);
                tag::COPY_IN
            }
            Message::CopyInEnd => tag::COPY_IN_END,
            Message::CopyOut(data) => {
                out.extend_from_slice(data);
                tag::COPY_OUT
            }
            Message::CopyOutEnd => tag::COPY_OUT_END,
            Message::CopyOutFailed(message) => {
                out.extend_from_slice(message.as_bytes());
                tag::COPY_OUT_FAILED
            }
        };
        let len = len_u32(out.len() - HEADER_LEN);
        out[..4].copy_from_slice(&len.to_le_bytes());
        out[4] = t;
        out
    }

    /// Decodes one payload of type `t`.
    pub fn decode(t: u8, payload: &[u8]) -> Result<Message, DecodeError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        let mut r = Cursor {
            buf: payload,
            tag: t,
        };
        let msg = match t {
            tag::HELLO => Message::Hello { version: r.u32()? },
            tag::MILESTONE => {
                let m = r.u8()?;
                let milestone = Milestone::from_u8(m).ok_or(DecodeError::InvalidValue(t))?;
                Message::Milestone {
                    milestone,
                    boottime_ns: r.u64()?,
                }
            }
            tag::RUN => Message::Run(RunRequest {
                argv: r.list()?,
                env: r.list()?,
                workdir: r.bytes()?,
                uid: r.u32()?,
                gid: r.u32()?,
                copy_in: r.list()?,
                copy_out: r.list()?,
            }),
            tag::STDIN => Message::Stdin(r.rest()),
            tag::STDIN_CLOSED => Message::StdinClosed,
            tag::SIGNAL => Message::Signal(r.i32()?),
            tag::STDOUT => Message::Stdout(r.rest()),
            tag::STDERR => Message::Stderr(r.rest()),
            tag::EXIT_CODE => Message::Exit(ExitStatus::Code(r.i32()?)),
            tag::EXIT_SIGNAL => Message::Exit(ExitStatus::Signal(r.i32()?)),
            tag::ERROR => {
                let k = r.u8()?;
                let kind = ErrorKind::from_u8(k).ok_or(DecodeError::InvalidValue(t))?;
                Message::Error {
                    kind,
                    message: String::from_utf8_lossy(&r.rest()).into_owned(),
                }
            }
            tag::COPY_IN => Message::CopyIn(r.rest()),
            tag::COPY_IN_END => Message::CopyInEnd,
            tag::COPY_OUT => Message::CopyOut(r.rest()),
            tag::COPY_OUT_END => Message::CopyOutEnd,
            tag::COPY_OUT_FAILED => {
                Message::CopyOutFailed(String::from_utf8_lossy(&r.rest()).into_owned())
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::Trailing(r.buf.len(), t));
        }
        Ok(msg)
    }

    /// Writes this message as one frame.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())
    }

    /// Reads exactly one frame. End of file before the first header byte is [`ReadError::Closed`].
    pub fn read_from(r: &mut impl Read) -> Result<Message, ReadError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Err(ReadError::Closed),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(len).into());
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Message::decode(header[4], &payload)?)
    }
}

/// Splits a byte stream into frames without blocking: feed it what arrived, take whole messages out.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, `Ok(None)` when more bytes are needed. After an error the stream is
    /// unusable: the caller ends the connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = Message::decode(self.buf[4], &self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        msg.map(Some)
    }
}

/// A length as the wire's u32. Saturates: nothing sent is that large (payloads go in chunks of at
/// most [`MAX_CHUNK`]), and a saturated length is over the frame limit, which the reader refuses.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&len_u32(b.len()).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_list(out: &mut Vec<u8>, items: &[Vec<u8>]) {
    out.extend_from_slice(&len_u32(items.len()).to_le_bytes());
    for item in items {
        put_bytes(out, item);
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    tag: u8,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(self.tag));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let lo = u64::from(self.u32()?);
        let hi = u64::from(self.u32()?);
        Ok(lo | (hi << 32))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn list(&mut self) -> Result<Vec<Vec<u8>>, DecodeError> {
        let n = self.u32()? as usize;
        // Each entry needs at least its 4-byte length: bound the count by what is left, so a hostile
        // count cannot make us reserve gigabytes.
        if n > self.buf.len() / 4 {
            return Err(DecodeError::Truncated(self.tag));
        }
        (0..n).map(|_| self.bytes()).collect()
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello { version: VERSION },
            Message::Milestone {
                milestone: Milestone::Connected,
                boottime_ns: u64::MAX - 5,
            },
            Message::Run(RunRequest {
                argv: vec![b"/bin/sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
                env: vec![b"PATH=/bin".to_vec()],
                workdir: b"/work".to_vec(),
                uid: 1000,
                gid: 100,
                copy_in: vec![b"/src".to_vec()],
                copy_out: vec![b"/src/out".to_vec(), b"/log".to_vec()],
            }),
            Message::Stdin(b"abc".to_vec()),
            Message::StdinClosed,
            Message::Signal(15),
            Message::Stdout(vec![0, 1, 2, 255]),
            Message::Stderr(Vec::new()),
            Message::Exit(ExitStatus::Code(-1)),
            Message::Exit(ExitStatus::Signal(9)),
            Message::Error {
                kind: ErrorKind::NotFound,
                message: "no such file".into(),
            },
            Message::CopyIn(vec![7; 3]),
            Message::CopyInEnd,
            Message::CopyOut(vec![8; 2]),
            Message::CopyOutEnd,
            Message::CopyOutFailed("/out: no such file".into()),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            let frame = m.encode();
            let got = Message::read_from(&mut &frame[..]).unwrap();
            assert_eq!(got, m);
        }
    }

    #[test]
    fn frame_buffer_reassembles_byte_by_byte() {
        let stream: Vec<u8> = all_messages().iter().flat_map(|m| m.encode()).collect();
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        for b in stream {
            fb.push(&[b]);
            while let Some(m) = fb.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all_messages());
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut frame = vec![0xff, 0xff, 0xff, 0xff, tag::STDOUT];
        frame.extend_from_slice(b"x");
        assert!(matches!(
            Message::read_from(&mut &frame[..]),
            Err(ReadError::Decode(DecodeError::TooLarge(_)))
        ));
        let mut fb = FrameBuffer::new();
        fb.push(&frame);
        assert!(matches!(fb.next_message(), Err(DecodeError::TooLarge(_))));
    }

    #[test]
    fn unknown_type_truncation_and_trailing_bytes_are_errors() {
        assert_eq!(
            Message::decode(200, &[]),
            Err(DecodeError::UnknownType(200))
        );
        assert_eq!(
            Message::decode(tag::HELLO, &[1, 0]),
            Err(DecodeError::Truncated(tag::HELLO))
        );
        assert_eq!(
            Message::decode(tag::HELLO, &[1, 0, 0, 0, 9]),
            Err(DecodeError::Trailing(1, tag::HELLO))
        );
        assert_eq!(
            Message::decode(tag::MILESTONE, &[99; 9]),
            Err(DecodeError::InvalidValue(tag::MILESTONE))
        );
        assert_eq!(
            Message::decode(tag::ERROR, &[0]),
            Err(DecodeError::InvalidValue(tag::ERROR))
        );
    }

    #[test]
    fn hostile_list_count_does_not_allocate() {
        // argv count of 4 billion in a 12-byte payload
        let payload = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            Message::decode(tag::RUN, &payload),
            Err(DecodeError::Truncated(tag::RUN))
        );
        // entry length past the end
        let payload = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(
            Message::decode(tag::RUN, &payload),
            Err(DecodeError::Truncated(tag::RUN))
        );
    }

    #[test]
    fn eof_mid_frame_is_an_io_error_and_at_boundary_is_closed() {
        assert!(matches!(
            Message::read_from(&mut &[][..]),
            Err(ReadError::Closed)
        ));
        let frame = Message::Stdout(b"hello".to_vec()).encode();
        assert!(matches!(
            Message::read_from(&mut &frame[..7]),
            Err(ReadError::Io(_))
        ));
    }
}
