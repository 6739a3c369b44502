//! The image importer's layer extractor (image-layer mode: whiteouts, opaque directories, owners,
//! modes, xattrs, hard and symbolic links, the root's own entry), on hostile tar streams, gzip-compressed
//! or not. Whatever the input, nothing may be written outside the target directory: a sentinel
//! directory beside it must stay as it was, and (fenced in, see `confine`) no write may reach a
//! read-only mount.
//!
//! Input: a settings byte, a 16-bit split point, then the layer bytes.
//! - bit 0: a fixed lower layer goes first (directories, files, a hard link, and symbolic links that
//!   point outside the root, relatively and absolutely), for whiteouts to remove and links to abuse;
//! - bit 1: the bytes are two layers, split at the split point.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{Arena, Bytes};

/// Caps the data one input may unpack (an entry's claimed size counts against it before anything is
/// written), so that a few bytes claiming a huge sparse file cost milliseconds, not seconds.
const MAX_TOTAL: u64 = 64 << 20;

fn base_layer(outside: &std::path::Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, link: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        b.append_data(&mut h, path, data).unwrap();
    };
    use tar::EntryType as T;
    add("etc/", T::Directory, 0o755, "", b"");
    add(
        "etc/passwd",
        T::Regular,
        0o644,
        "",
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    add("usr/bin/", T::Directory, 0o755, "", b"");
    add("usr/bin/sh", T::Regular, 0o4755, "", b"#!/bin/true\n");
    add("usr/bin/ash", T::Link, 0o755, "usr/bin/sh", b"");
    add("bin", T::Symlink, 0o777, "usr/bin", b"");
    add("escape", T::Symlink, 0o777, "../outside", b"");
    add("abs", T::Symlink, 0o777, &outside.to_string_lossy(), b"");
    add("tmp/", T::Directory, 0o1777, "", b"");
    add("tmp/keep", T::Regular, 0o600, "", b"x");
    b.into_inner().unwrap()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let settings = input.u8();
    let split = usize::from(input.u16());
    let rest = input.0;

    let arena = Arena::new();
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    let base = BASE.get_or_init(|| base_layer(&arena.outside));
    let mut layers: Vec<&[u8]> = Vec::new();
    if settings & 1 != 0 {
        layers.push(base);
    }
    if settings & 2 != 0 {
        let (a, b) = rest.split_at(split.min(rest.len()));
        layers.push(a);
        layers.push(b);
    } else {
        layers.push(rest);
    }

    let result = vmm_rootfs::fuzzing::apply_layers(&arena.root, &layers, MAX_TOTAL);
    if vmm_fuzz::verbose() {
        eprintln!("tar_layer: {result:?}");
    }
    let error = result.err().map(|e| e.to_string());
    arena.check(error.as_deref());
});
