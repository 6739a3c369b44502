//! The one error type of image import and the cache.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong importing, listing or removing an image. Each message says what went
/// wrong and, where there is something to do, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// SRC does not exist.
    #[error(
        "{}: no such file or directory (give an OCI image layout directory, a `docker save` tarball, \
         or a root file system tarball or directory)",
        path.display()
    )]
    NotFound { path: PathBuf },

    /// A file system operation failed; `context` says which and on what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// SRC is not an image this importer understands, or its metadata is broken.
    #[error("{src}: not a usable image: {why}")]
    BadImage { src: String, why: String },

    /// SRC uses something this importer deliberately does not handle.
    #[error("{src}: {what} is not supported; {hint}")]
    Unsupported {
        src: String,
        what: String,
        hint: String,
    },

    /// A layer entry would escape the root or go through a symbolic link: the whole import is refused.
    #[error(
        "refusing {src}: {layer}: entry `{path}` {why}; the image may be hostile, nothing was imported"
    )]
    UnsafePath {
        src: String,
        layer: String,
        path: String,
        why: String,
    },

    /// A size in the image is absurd (beyond the input, or beyond the limit of what an image may hold).
    #[error("refusing {src}: {layer}: {why}; nothing was imported")]
    TooLarge {
        src: String,
        layer: String,
        why: String,
    },

    /// A blob's content does not match the digest the image names it by.
    #[error("{src}: {what} is corrupt: its sha256 is {actual}, the image says {expected}; get a fresh copy of the image")]
    DigestMismatch {
        src: String,
        what: String,
        expected: String,
        actual: String,
    },

    /// The cache's file system has too little room for the image.
    #[error(
        "not enough free space in {}: importing {src} needs about {need_mib} MiB, {avail_mib} MiB are free; \
         free some space or put the image cache elsewhere (--cache-dir)",
        dir.display()
    )]
    NoSpace {
        dir: PathBuf,
        src: String,
        need_mib: u64,
        avail_mib: u64,
    },

    /// mkfs.ext4 is not installed.
    #[error("mkfs.ext4 not found (looked in PATH, /usr/sbin and /sbin): install e2fsprogs")]
    MkfsMissing,

    /// mkfs.ext4 failed.
    #[error("mkfs.ext4 could not make a {size_mib} MiB ext4 image of {src}: {detail}")]
    Mkfs {
        src: String,
        size_mib: u64,
        detail: String,
    },

    /// `remove` found nothing for the reference.
    #[error("no cached image matches `{reference}` (`vmm image ls` lists them)")]
    NotInCache { reference: String },

    /// `remove` found more than one image for the reference.
    #[error("`{reference}` matches {count} cached images ({matches}); give a longer digest")]
    Ambiguous {
        reference: String,
        count: usize,
        matches: String,
    },

    /// The cache directory itself is unusable.
    #[error("image cache {}: {why}", dir.display())]
    Cache { dir: PathBuf, why: String },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// `result.ctx(|| format!(...))` turns an `io::Error` into [`ImageError::Io`] with what was being done.
pub(crate) trait IoContext<T> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for Result<T, io::Error> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(what(), e))
    }
}
