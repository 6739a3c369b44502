//! The host end of `--copy-in` and `--copy-out`: packing a host directory into the tar stream that
//! guest-init unpacks, and unpacking a guest's copy-out stream into a host directory.
//!
//! A copy-out stream comes from the guest and is hostile. It is unpacked by the image importer's
//! extractor (`vmm_rootfs::layer`), which never writes through a symbolic link or outside the target, bounds
//! sizes and metadata, and refuses absolute and `..` paths; here it runs without whiteouts and without
//! changing owners (files belong to the user running vmm). A refused stream is reported and the rest
//! of it is read and dropped, so the conversation goes on.

use std::io::{self, Read, Write};
use std::path::Path;

use vmm_protocol::chunks::{ChunkReader, ChunkSource, ChunkWriter};
use vmm_protocol::tree;
use vmm_protocol::{Message, ReadError};

use vmm_rootfs::layer::{Extractor, MAX_TOTAL_BYTES};
use vmm_rootfs::ImageError;

/// Why a copy-out could not be received.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyOutError {
    /// This copy-out failed (the guest could not send it, or its stream was refused); the run goes on.
    #[error("{0}")]
    Failed(String),
    /// The guest broke the protocol: the run ends.
    #[error("{0}")]
    Protocol(String),
}

/// Sends the contents of `dir` as one copy-in stream (`CopyIn` chunks, then `CopyInEnd`) through
/// `send`. Returns the bytes of file data sent. An error from `send` ends the stream where it is.
pub fn send_copy_in(
    dir: &Path,
    send: &mut dyn FnMut(Message) -> io::Result<()>,
) -> io::Result<u64> {
    let mut chunks = ChunkWriter::new(|data| send(Message::CopyIn(data)));
    let mut builder = tar::Builder::new(&mut chunks);
    let stats = tree::pack(&mut builder, dir, Path::new(""))?;
    builder.into_inner()?;
    chunks.flush()?;
    if stats.skipped > 0 {
        eprintln!(
            "vmm: copy-in of {}: left out {} sockets, FIFOs or device nodes",
            dir.display(),
            stats.skipped
        );
    }
    send(Message::CopyInEnd)?;
    Ok(stats.file_bytes)
}

/// Receives one copy-out stream, whose first frame is `first`, reading the rest from `input`, into
/// `host_dir` (created when missing). `guest_path` names the stream in messages. Returns the bytes of
/// file data written.
pub fn receive_copy_out(
    first: Message,
    input: &mut impl Read,
    guest_path: &str,
    host_dir: &Path,
) -> Result<u64, CopyOutError> {
    if let Message::CopyOutFailed(why) = first {
        return Err(CopyOutError::Failed(why));
    }
    let mut stream = ChunkReader::new(CopyOutChunks {
        input,
        first: Some(first),
        end: None,
        broken: None,
    });
    let unpacked = unpack(&mut stream, guest_path, host_dir);
    if let Some(why) = stream.source.broken.take() {
        return Err(CopyOutError::Protocol(why));
    }
    // what the tar left unread (padding, or everything after a refused entry)
    let drained = io::copy(&mut stream, &mut io::sink());
    if let Some(why) = stream.source.broken.take() {
        return Err(CopyOutError::Protocol(why));
    }
    if let Err(e) = drained {
        return Err(CopyOutError::Protocol(e.to_string()));
    }
    match (stream.source.end, unpacked) {
        (Some(Err(why)), _) => Err(CopyOutError::Failed(why)),
        (_, Err(why)) => Err(CopyOutError::Failed(format!(
            "{why}; nothing was written outside {}",
            host_dir.display()
        ))),
        (_, Ok(bytes)) => Ok(bytes),
    }
}

fn unpack(input: &mut impl Read, guest_path: &str, host_dir: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(host_dir).map_err(|e| format!("{}: {e}", host_dir.display()))?;
    let mut ex =
        Extractor::for_copy_out(host_dir, guest_path, MAX_TOTAL_BYTES).map_err(describe)?;
    ex.apply_layer(input, None, "the guest's stream")
        .map_err(describe)?;
    ex.finish(&mut |_| {}).map_err(describe)?;
    Ok(ex.bytes())
}

/// An extractor's error, in the words of a copy rather than of an image import.
fn describe(e: ImageError) -> String {
    match e {
        ImageError::UnsafePath { path, why, .. } => {
            format!("refusing the entry `{path}`, which {why}")
        }
        ImageError::TooLarge { why, .. } => format!("refusing the stream: {why}"),
        ImageError::BadImage { why, .. } => format!("a broken stream: {why}"),
        ImageError::NoSpace {
            dir,
            need_mib,
            avail_mib,
            ..
        } => format!(
            "not enough free space in {} (about {need_mib} MiB needed, {avail_mib} MiB free)",
            dir.display()
        ),
        other => other.to_string(),
    }
}

/// The chunks of one copy-out stream: `CopyOut` payloads up to `CopyOutEnd` or `CopyOutFailed`.
struct CopyOutChunks<'a, R> {
    input: &'a mut R,
    /// the stream's first frame, already read by the caller
    first: Option<Message>,
    /// how the stream ended, once it has
    end: Option<Result<(), String>>,
    /// the guest broke the protocol
    broken: Option<String>,
}

impl<R: Read> ChunkSource for CopyOutChunks<'_, R> {
    fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.broken.is_some() {
            return Err(io::Error::other("the control channel broke"));
        }
        let msg = match self.first.take() {
            Some(msg) => msg,
            None => match Message::read_from(self.input) {
                Ok(msg) => msg,
                Err(ReadError::Closed) => {
                    self.broken = Some("guest-init closed the control channel".into());
                    return Err(io::Error::other("the control channel broke"));
                }
                Err(e) => {
                    self.broken = Some(e.to_string());
                    return Err(io::Error::other("the control channel broke"));
                }
            },
        };
        match msg {
            Message::CopyOut(data) => Ok(Some(data)),
            Message::CopyOutEnd => {
                self.end = Some(Ok(()));
                Ok(None)
            }
            Message::CopyOutFailed(why) => {
                self.end = Some(Err(why));
                Ok(None)
            }
            other => {
                self.broken = Some(format!(
                    "unexpected frame in a copy-out stream: {}",
                    other.name()
                ));
                Err(io::Error::other("the control channel broke"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-transfer-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The frames a guest would send for `tar_bytes`, in chunks, then the end.
    fn frames(tar_bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in tar_bytes.chunks(700) {
            out.extend(Message::CopyOut(c.to_vec()).encode());
        }
        out.extend(Message::CopyOutEnd.encode());
        out
    }

    fn receive(stream: Vec<u8>, host_dir: &Path) -> (Result<u64, CopyOutError>, usize) {
        let mut input = &stream[..];
        let first = Message::read_from(&mut input).unwrap();
        let r = receive_copy_out(first, &mut input, "/guest/out", host_dir);
        (r, input.len())
    }

    /// A tar with raw names, which the tar crate's builder would refuse to write.
    fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn copy_in_stream_round_trips_through_copy_out() {
        let dir = scratch("round");
        let src = dir.join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/file"), vec![3u8; 200_000]).unwrap();
        std::os::unix::fs::symlink("b/file", src.join("a/link")).unwrap();
        // the copy-in frames unpack as they were sent
        let mut tar_bytes = Vec::new();
        let mut ends = 0;
        send_copy_in(&src, &mut |m| {
            match m {
                Message::CopyIn(d) => tar_bytes.extend(d),
                Message::CopyInEnd => ends += 1,
                other => panic!("{other:?}"),
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(ends, 1);
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let names: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().into_owned())
            .collect();
        assert!(names.contains(&PathBuf::from("a/b/file")), "{names:?}");
        // the guest sends /guest/out under its own name, as guest-init packs it
        let mut b = tar::Builder::new(Vec::new());
        tree::pack(&mut b, &src, Path::new("out")).unwrap();
        let host = dir.join("host");
        let (r, left) = receive(frames(&b.into_inner().unwrap()), &host);
        assert_eq!(r, Ok(200_000));
        assert_eq!(left, 0);
        let out = host.join("out");
        assert_eq!(fs::read(out.join("a/b/file")).unwrap(), vec![3u8; 200_000]);
        assert_eq!(
            fs::read_link(out.join("a/link")).unwrap(),
            PathBuf::from("b/file")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostile_streams_are_refused_and_nothing_lands_outside() {
        let dir = scratch("hostile");
        let out = dir.join("out");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                raw_tar(&[("out/../../escape", tar::EntryType::Regular, "", b"x")]),
                "`..` component",
            ),
            (
                raw_tar(&[("/abs", tar::EntryType::Regular, "", b"x")]),
                "absolute path",
            ),
            (
                raw_tar(&[
                    ("out/l", tar::EntryType::Symlink, "../..", b""),
                    ("out/l/escape", tar::EntryType::Regular, "", b"x"),
                ]),
                "symbolic link",
            ),
            (
                raw_tar(&[("out/h", tar::EntryType::Link, "../../etc/passwd", b"")]),
                "not under `out`",
            ),
            (
                raw_tar(&[("Makefile", tar::EntryType::Regular, "", b"x")]),
                "not under `out`",
            ),
        ];
        for (tar_bytes, want) in cases {
            let (r, left) = receive(frames(&tar_bytes), &out);
            match r {
                Err(CopyOutError::Failed(why)) => assert!(why.contains(want), "{why}"),
                other => panic!("{want}: {other:?}"),
            }
            assert_eq!(left, 0, "the rest of the stream is read");
        }
        assert!(!dir.join("escape").exists());
        assert!(!dir.join("abs").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn absurd_sizes_and_truncation_fail_cleanly() {
        let dir = scratch("absurd");
        let out = dir.join("out");
        // an entry that claims 1 TiB and then the stream ends
        let mut h = tar::Header::new_gnu();
        h.set_path("big").unwrap();
        h.set_size(1 << 40);
        h.set_mode(0o644);
        h.set_cksum();
        let (r, _) = receive(frames(h.as_bytes()), &out);
        assert!(matches!(r, Err(CopyOutError::Failed(_))), "{r:?}");
        // the guest's own failure, before or after some bytes
        let mut stream = Message::CopyOut(vec![0; 10]).encode();
        stream.extend(Message::CopyOutFailed("/guest/out: gone".into()).encode());
        let (r, _) = receive(stream, &out);
        assert_eq!(r, Err(CopyOutError::Failed("/guest/out: gone".into())));
        let (r, _) = receive(
            Message::CopyOutFailed("/x: No such file or directory".into()).encode(),
            &out,
        );
        assert_eq!(
            r,
            Err(CopyOutError::Failed("/x: No such file or directory".into()))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_frame_inside_a_stream_or_an_early_close_is_a_protocol_error() {
        let dir = scratch("protocol");
        let out = dir.join("out");
        let mut stream = Message::CopyOut(vec![0; 10]).encode();
        stream.extend(Message::Stdout(b"x".to_vec()).encode());
        let (r, _) = receive(stream, &out);
        assert!(matches!(r, Err(CopyOutError::Protocol(_))), "{r:?}");
        let (r, _) = receive(Message::CopyOut(vec![0; 10]).encode(), &out);
        assert!(matches!(r, Err(CopyOutError::Protocol(_))), "{r:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
