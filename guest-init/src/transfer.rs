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

use vmm_protocol::chunks::{ChunkReader, ChunkSource, ChunkWriter};
use vmm_protocol::tree::{self, PackStats};
use vmm_protocol::Message;

use crate::channel::{Channel, ChannelError};
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
        let mut stream = ChunkReader::new(CopyInChunks {
            chan: &mut *chan,
            held: &mut *held,
            bytes: 0,
            broken: None,
        });
        if failed.is_none() {
            match unpack(&mut stream, &dest, owner) {
                Ok(()) => {}
                Err(why) => {
                    if let Some(e) = stream.source.broken.take() {
                        return Err(TransferError::Channel(e));
                    }
                    failed = Some(CopyInFailed { dest, why });
                }
            }
        }
        // the rest of the stream (tar padding, or all of it after a failure) is read and dropped
        if let Err(e) = io::copy(&mut stream, &mut io::sink()) {
            return Err(TransferError::Channel(
                stream
                    .source
                    .broken
                    .take()
                    .unwrap_or(ChannelError::Io(io::Error::new(e.kind(), e.to_string()))),
            ));
        }
        bytes += stream.source.bytes;
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

/// The chunks of one copy-in stream: `CopyIn` payloads up to `CopyInEnd`.
struct CopyInChunks<'a> {
    chan: &'a mut Channel,
    held: &'a mut Held,
    bytes: u64,
    /// the channel failed (not the tar): the session cannot go on
    broken: Option<ChannelError>,
}

impl ChunkSource for CopyInChunks<'_> {
    fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.broken.is_some() {
            return Err(io::Error::other("the connection to the host failed"));
        }
        loop {
            match self.chan.recv_timeout(STREAM_STALL) {
                Ok(Message::CopyIn(data)) => {
                    self.bytes += data.len() as u64;
                    return Ok(Some(data));
                }
                Ok(Message::CopyInEnd) => return Ok(None),
                Ok(m @ (Message::Signal(_) | Message::Stdin(_) | Message::StdinClosed)) => {
                    self.held.push(m)
                }
                Ok(other) => {
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the host sent {} in the middle of a copy-in stream",
                            other.name()
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
        // the channel's own failure (not the file system's), which ends the session
        let mut broken = None;
        let packed = {
            let mut sender = ChunkWriter::new(|data| {
                chan.send(&Message::CopyOut(data)).map_err(|e| {
                    let shown = io::Error::new(e.kind(), e.to_string());
                    broken = Some(e);
                    shown
                })
            });
            pack_one(&mut sender, &path).and_then(|stats| sender.flush().map(|()| stats))
        };
        if let Some(e) = broken {
            return Err(TransferError::Send(e));
        }
        match packed {
            Ok(stats) => {
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
                let message = format!("{}: {}", path.display(), describe(&e));
                chan.send(&Message::CopyOutFailed(message))
                    .map_err(TransferError::Send)?;
            }
        }
    }
    Ok(bytes)
}

fn pack_one(sender: &mut impl Write, path: &Path) -> io::Result<PackStats> {
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
