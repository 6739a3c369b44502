//! Reading an image as `vmm image import` / `--image` does: what SRC is (an OCI layout, as a directory
//! or a tar, gzip-compressed or not; a `docker save` tarball; a plain tarball), its index, nested
//! indexes, manifest and config (JSON, every blob checked against its digest), then unpacking its layers
//! with their blob and diff_id digests checked. Nothing may be written outside the staging directory.
//!
//! Input: a mode byte, then documents separated by `SEP`. Digests cannot be guessed, so in document i
//! `@j` stands for the sha256 (hex) of document j and `#j` for its length, for every j > i (one digit).
//! Document 0 is `index.json` (OCI) or `manifest.json` (docker save); every other document is stored as
//! the blob `blobs/sha256/<its sha256>`.
//! - mode % 4: 0 an OCI layout directory, 1 an OCI layout in a tar, 2 a `docker save` tar, 3 the input
//!   after the mode byte is the file itself;
//! - bit 2: the tar is gzip-compressed;
//! - bit 3: read the image only, do not unpack its layers.

#![no_main]

use std::fs;
use std::io::Write;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vmm_fuzz::{confine, Arena};

const SEP: &[u8] = b"\n--8<--\n";
const MAX_TOTAL: u64 = 64 << 20;

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn split(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut docs = Vec::new();
    while let Some(at) = data.windows(SEP.len()).position(|w| w == SEP) {
        docs.push(data[..at].to_vec());
        data = &data[at + SEP.len()..];
    }
    docs.push(data.to_vec());
    docs.truncate(10);
    docs
}

/// Replaces `@j` and `#j` (j > i) in every document i, last document first.
fn resolve(docs: &mut [Vec<u8>]) -> Vec<String> {
    let mut hexes = vec![String::new(); docs.len()];
    for i in (0..docs.len()).rev() {
        let mut out = Vec::with_capacity(docs[i].len());
        let doc = &docs[i];
        let mut k = 0;
        while k < doc.len() {
            let j = doc
                .get(k + 1)
                .and_then(|d| d.checked_sub(b'0'))
                .map(usize::from);
            match (doc[k], j) {
                (b'@', Some(j)) if j > i && j < docs.len() => {
                    out.extend_from_slice(hexes[j].as_bytes());
                    k += 2;
                }
                (b'#', Some(j)) if j > i && j < docs.len() => {
                    out.extend_from_slice(docs[j].len().to_string().as_bytes());
                    k += 2;
                }
                (b, _) => {
                    out.push(b);
                    k += 1;
                }
            }
        }
        hexes[i] = hex(&out);
        docs[i] = out;
    }
    hexes
}

/// The files of the image: (path, content).
fn files(docs: &[Vec<u8>], hexes: &[String], oci: bool) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    if oci {
        files.push((
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ));
        files.push(("index.json".to_string(), docs[0].clone()));
    } else {
        files.push(("manifest.json".to_string(), docs[0].clone()));
    }
    for (doc, hex) in docs.iter().zip(hexes).skip(1) {
        files.push((format!("blobs/sha256/{hex}"), doc.clone()));
    }
    files
}

fn write_tar(path: &Path, files: &[(String, Vec<u8>)], gzip: bool) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let bytes = if gzip {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    } else {
        tar
    };
    fs::write(path, bytes).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let src_dir = confine::fresh("src");
    let scratch = confine::fresh("decompress");
    let arena = Arena::new();

    let src = if mode % 4 == 3 {
        let src = src_dir.join("image");
        fs::write(&src, rest).unwrap();
        src
    } else {
        let mut docs = split(rest);
        let hexes = resolve(&mut docs);
        let oci = mode % 4 != 2;
        let files = files(&docs, &hexes, oci);
        if mode % 4 == 0 {
            let dir = src_dir.join("layout");
            for (name, data) in &files {
                let path = dir.join(name);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(path, data).unwrap();
            }
            dir
        } else {
            let src = src_dir.join("image.tar");
            write_tar(&src, &files, mode & 4 != 0);
            src
        }
    };

    let staging = (mode & 8 == 0).then_some(arena.root.as_path());
    let result = vmm_rootfs::fuzzing::plan_and_unpack(&src, &scratch, staging, MAX_TOTAL);
    if vmm_fuzz::verbose() {
        eprintln!("oci_image: {result:?}");
    }
    match result {
        Ok((_kind, digest, _layers)) => {
            assert!(
                digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
                "digest {digest:?}"
            );
            arena.check(None);
        }
        Err(e) => arena.check(Some(&e.to_string())),
    }
});
