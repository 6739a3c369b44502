//! `--copy-out` as the host receives it: the guest's frames (`CopyOut` chunks of a tar stream, then an
//! end) unpacked by the extractor in copy-out mode into a host directory that already holds files,
//! a directory and symbolic links pointing outside it. Whatever the guest sends, nothing may be written
//! outside that directory: a sentinel directory beside it must stay as it was, and (fenced in, see
//! `confine`) no write may reach a read-only mount.
//!
//! Input: the chunk size (a byte, times 64, plus 1), how the stream ends (a byte: `CopyOutEnd`,
//! `CopyOutFailed`, the connection closing, or a frame that does not belong in a copy-out), then the
//! tar stream.

#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;
use vmm::transfer::{receive_copy_out, CopyOutError};
use vmm_fuzz::{Arena, Bytes};
use vmm_protocol::Message;

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let chunk = usize::from(input.u8()) * 64 + 1;
    let ending = input.u8();
    let tar = input.0;

    let arena = Arena::new();
    // What the host directory holds before the copy: entries replace it, never follow its links.
    fs::write(arena.root.join("existing"), b"old").unwrap();
    fs::create_dir(arena.root.join("dir")).unwrap();
    fs::write(arena.root.join("dir/file"), b"old").unwrap();
    std::os::unix::fs::symlink("../outside", arena.root.join("link")).unwrap();
    std::os::unix::fs::symlink(&arena.outside, arena.root.join("abs")).unwrap();

    let mut frames = Vec::new();
    for c in tar.chunks(chunk) {
        frames.extend(Message::CopyOut(c.to_vec()).encode());
    }
    match ending % 4 {
        0 => frames.extend(Message::CopyOutEnd.encode()),
        1 => frames.extend(Message::CopyOutFailed("gone".into()).encode()),
        2 => {}
        _ => frames.extend(Message::Stdout(b"x".to_vec()).encode()),
    }
    let mut stream = &frames[..];
    let Ok(first) = Message::read_from(&mut stream) else {
        return;
    };
    let result = receive_copy_out(first, &mut stream, "/guest/out", &arena.root);
    if vmm_fuzz::verbose() {
        eprintln!("tar_copy_out: {result:?}");
    }
    let error = match &result {
        Ok(_) => None,
        Err(CopyOutError::Failed(why) | CopyOutError::Protocol(why)) => Some(why.as_str()),
    };
    arena.check(error);
});
