//! Workspace in, artifacts out. Before the command runs, the host's copy-in tar streams are unpacked
//! into the directories the run request names (owned by the command's user, so that it can write its
//! workspace); after the command has ended, each copy-out path is packed into a tar stream for the host
//! (whose name is the path's last component), or reported as failed.
//!
//! Copy-in streams come from the host, which we trust; still, the tar crate's `unpack_in` refuses
//! entries that would land outside the target. The host treats our copy-out streams as hostile.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_protocol::tree::{self, PackStats};
use vmm_protocol::{Message, MAX_CHUNK};

use crate::channel::{message_name, Channel, ChannelError};
use crate::sys::describe;

/// How long the host may pause in the middle of a copy-in stream.
const STREAM_STALL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The connection to the host failed: the session cannot go on.
    #[error("the copy-in stream broke off: {0}")]
    Channel(#[source] ChannelError),
    #[error("sending a copy-out stream: {}", describe(.0))]
    Send(#[source] io::Error),
}

/// Why one copy-in could not be unpacked (reported to the host; the command does not run).
#[derive(Debug, thiserror::Error)]
#[error("copy-in to {}: {why}", .dest.display())]
pub struct CopyInFailed {
    pub dest: PathBuf,
    pub why: String,
}

/// Messages other than stream data that arrived during a copy-in (signals, stdin), kept for the relay.
pub type Held = Vec<Message>;

/// Unpacks one stream per entry of `dests`, in order, each into its directory (created when missing).
/// After the first failure the remaining streams are still read to their end, so the host is never
/// left blocked, and the failure is returned.
pub fn receive_all(
    chan: &mut Channel,
    dests: &[Vec<u8>],
    owner: (u32, u32),
    held: &mut Held,
) -> Result<Result<u64, CopyInFailed>, TransferError> {
    let mut failed = None;
    let mut bytes = 0u64;
    for dest in dests {
        let dest = PathBuf::from(std::ffi::OsStr::from_bytes(dest));
        let mut stream = CopyInStream::new(chan, held);
        if failed.is_none() {
            match unpack(&mut stream, &dest, owner) {
                Ok(()) => {}
                Err(why) => {
                    if let Some(e) = stream.broken.take() {
                        return Err(TransferError::Channel(e));
                    }
                    failed = Some(CopyInFailed { dest, why });
                }
            }
        }
        stream.drain()?;
        bytes += stream.bytes;
    }
    Ok(match failed {
        Some(f) => Err(f),
        None => Ok(bytes),
    })
}

/// Unpacks a tar from `input` into `dest`, giving every entry (and every directory created for `dest`)
/// to `owner`.
fn unpack(input: &mut impl Read, dest: &Path, owner: (u32, u32)) -> Result<(), String> {
    if !dest.is_absolute() {
        return Err("the target must be an absolute path".into());
    }
    create_owned_dirs(dest, owner).map_err(|e| describe(&e))?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let entries = archive.entries().map_err(|e| describe(&e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| describe(&e))?;
        let rel = entry.path().map_err(|e| describe(&e))?.into_owned();
        let shown = rel.display().to_string();
        match entry.unpack_in(dest) {
            Ok(true) => {}
            Ok(false) => return Err(format!("`{shown}` would land outside the target")),
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                return Err(format!(
                    "`{shown}`: the VM's writable layer is full (give it room with --scratch SIZE)"
                ))
            }
            Err(e) => return Err(format!("`{shown}`: {}", describe_tar(&e))),
        }
        let at = dest.join(&rel);
        if at != dest {
            std::os::unix::fs::lchown(&at, Some(owner.0), Some(owner.1))
                .map_err(|e| format!("`{shown}`: changing its owner: {}", describe(&e)))?;
        }
    }
    Ok(())
}

/// The tar crate's error and its cause (it wraps the OS error in a message of its own).
fn describe_tar(e: &io::Error) -> String {
    let outer = describe(e);
    match std::error::Error::source(e) {
        Some(cause) => format!("{outer}: {cause}"),
        None => outer,
    }
}

/// `mkdir -p dest`, the directories it creates owned by `owner`.
fn create_owned_dirs(dest: &Path, owner: (u32, u32)) -> io::Result<()> {
    match fs::metadata(dest) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ))
        }
        Err(_) => {}
    }
    let missing: Vec<&Path> = dest.ancestors().take_while(|p| !p.exists()).collect();
    fs::create_dir_all(dest)?;
    for dir in missing {
        std::os::unix::fs::lchown(dir, Some(owner.0), Some(owner.1))?;
    }
    Ok(())
}

/// One copy-in stream as a reader: `CopyIn` payloads up to `CopyInEnd`.
struct CopyInStream<'a> {
    chan: &'a mut Channel,
    held: &'a mut Held,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
    bytes: u64,
    /// the channel failed (not the tar): the session cannot go on
    broken: Option<ChannelError>,
}

impl<'a> CopyInStream<'a> {
    fn new(chan: &'a mut Channel, held: &'a mut Held) -> Self {
        CopyInStream {
            chan,
            held,
            chunk: Vec::new(),
            pos: 0,
            ended: false,
            bytes: 0,
            broken: None,
        }
    }

    /// Reads and drops the rest of the stream.
    fn drain(&mut self) -> Result<(), TransferError> {
        let mut sink = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    return Err(TransferError::Channel(self.broken.take().unwrap_or(
                        ChannelError::Io(io::Error::new(e.kind(), e.to_string())),
                    )))
                }
            }
        }
    }
}

impl Read for CopyInStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.chunk.len() {
                let n = buf.len().min(self.chunk.len() - self.pos);
                buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.ended || buf.is_empty() {
                return Ok(0);
            }
            if self.broken.is_some() {
                return Err(io::Error::other("the connection to the host failed"));
            }
            match self.chan.recv_timeout(STREAM_STALL) {
                Ok(Message::CopyIn(data)) => {
                    self.bytes += data.len() as u64;
                    self.chunk = data;
                    self.pos = 0;
                }
                Ok(Message::CopyInEnd) => self.ended = true,
                Ok(m @ (Message::Signal(_) | Message::Stdin(_) | Message::StdinClosed)) => {
                    self.held.push(m)
                }
                Ok(other) => {
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the host sent {} in the middle of a copy-in stream",
                            message_name(&other)
                        ),
                    );
                    self.broken = Some(ChannelError::Io(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
                Err(e) => {
                    let shown = e.to_string();
                    self.broken = Some(e);
                    return Err(io::Error::other(shown));
                }
            }
        }
    }
}

/// Sends one stream per copy-out path, in order: its tar then `CopyOutEnd`, or `CopyOutFailed`.
/// Returns the bytes of file data sent.
pub fn send_all(chan: &mut Channel, paths: &[Vec<u8>]) -> Result<u64, TransferError> {
    let mut bytes = 0;
    for path in paths {
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
        let mut sender = ChunkSender::new(chan);
        match pack_one(&mut sender, &path) {
            Ok(stats) => {
                sender.flush().map_err(TransferError::Send)?;
                bytes += stats.file_bytes;
                if stats.skipped > 0 {
                    crate::log::warn(&format!(
                        "copy-out of {}: left out {} sockets, FIFOs or device nodes",
                        path.display(),
                        stats.skipped
                    ));
                }
                chan.send(&Message::CopyOutEnd)
                    .map_err(TransferError::Send)?;
            }
            Err(e) => {
                if let Some(e) = sender.broken.take() {
                    return Err(TransferError::Send(e));
                }
                let message = format!("{}: {}", path.display(), describe(&e));
                chan.send(&Message::CopyOutFailed(message))
                    .map_err(TransferError::Send)?;
            }
        }
    }
    Ok(bytes)
}

fn pack_one(sender: &mut ChunkSender, path: &Path) -> io::Result<PackStats> {
    let name = match (path.is_absolute(), path.file_name()) {
        (true, Some(name)) => PathBuf::from(name),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path that names a file or directory",
            ))
        }
    };
    // fail early, before any stream bytes, on the common case of a missing path
    fs::symlink_metadata(path)?;
    let mut builder = tar::Builder::new(sender);
    let stats = tree::pack(&mut builder, path, &name)?;
    builder.finish()?;
    Ok(stats)
}

/// A writer that sends what it is given as `CopyOut` frames of up to `MAX_CHUNK` bytes.
struct ChunkSender<'a> {
    chan: &'a mut Channel,
    buf: Vec<u8>,
    /// the channel failed (not the file system): the session cannot go on
    broken: Option<io::Error>,
}

impl<'a> ChunkSender<'a> {
    fn new(chan: &'a mut Channel) -> Self {
        ChunkSender {
            chan,
            buf: Vec::with_capacity(MAX_CHUNK),
            broken: None,
        }
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_CHUNK));
        if let Err(e) = self.chan.send(&Message::CopyOut(data)) {
            let shown = io::Error::new(e.kind(), e.to_string());
            self.broken = Some(e);
            return Err(shown);
        }
        Ok(())
    }
}

impl Write for ChunkSender<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}
