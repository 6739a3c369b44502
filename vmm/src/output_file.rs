//! The files a run writes at its end (`--result`, `--trace`), opened before the main thread's seccomp
//! filter goes on, so that the filter can refuse every open for writing, every unlink and every rename
//! except the one that publishes such a file.
//!
//! Each is published whole: its bytes go into an unnamed file (O_TMPFILE) in the target's directory,
//! which is then linked under a partial name and renamed over the target, so a reader sees the whole
//! file or none, and a vmm killed before the end leaves nothing behind. Where the file system has no
//! O_TMPFILE, a named partial file is created up front instead (left behind if vmm is killed).
//! Every call after opening is relative to a descriptor of the directory, which the filter names.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, CWD};

/// A file to publish at the end of the run.
#[derive(Debug)]
pub struct OutputFile {
    /// the target's directory (O_PATH)
    dir: OwnedFd,
    /// the target's name in `dir`
    name: OsString,
    /// the partial name in `dir` that the contents get before the rename
    partial: OsString,
    contents: File,
    /// the contents are unnamed (O_TMPFILE) until published
    unnamed: bool,
    published: bool,
}

impl OutputFile {
    /// Prepares `path` for publishing: its directory must exist and be writable.
    pub fn create(path: &Path) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?
            .to_os_string();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = rustix::fs::open(
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut partial = OsString::from(".");
        partial.push(&name);
        partial.push(format!(".partial-{}", std::process::id()));
        let mode = Mode::from_raw_mode(0o644);
        let unnamed = rustix::fs::openat(
            &dir,
            ".",
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            mode,
        );
        let (contents, unnamed) = match unnamed {
            Ok(fd) => (fd, true),
            // no O_TMPFILE on this file system (or kernel)
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR) => {
                let fd = rustix::fs::openat(
                    &dir,
                    partial.as_os_str(),
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                    mode,
                )?;
                (fd, false)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(OutputFile {
            dir,
            name,
            partial,
            contents: File::from(contents),
            unnamed,
            published: false,
        })
    }

    /// The descriptor of the directory, which the publishing calls are relative to.
    pub fn dir_fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    /// Writes `bytes` and publishes them under the target's name, replacing what was there.
    pub fn publish(mut self, bytes: &[u8]) -> io::Result<()> {
        self.contents.write_all(bytes)?;
        if self.unnamed {
            // linkat through /proc/self/fd needs no privilege (AT_EMPTY_PATH would need
            // CAP_DAC_READ_SEARCH)
            let proc_path = format!("/proc/self/fd/{}", self.contents.as_raw_fd());
            rustix::fs::linkat(
                CWD,
                proc_path.as_str(),
                &self.dir,
                self.partial.as_os_str(),
                AtFlags::SYMLINK_FOLLOW,
            )?;
            // named now: Drop removes it if the rename fails
            self.unnamed = false;
        }
        rustix::fs::renameat(
            &self.dir,
            self.partial.as_os_str(),
            &self.dir,
            self.name.as_os_str(),
        )?;
        self.published = true;
        Ok(())
    }

    #[cfg(test)]
    fn partial_name(&self) -> &std::ffi::OsStr {
        &self.partial
    }
}

/// Not published (the run failed, or publishing did): a named partial file goes.
impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.unnamed && !self.published {
            let _ = rustix::fs::unlinkat(&self.dir, self.partial.as_os_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn published_whole_and_nothing_before() {
        let dir = scratch("publish");
        let target = dir.join("result.json");
        std::fs::write(&target, b"old").unwrap();
        let out = OutputFile::create(&target).unwrap();
        // nothing visible yet but the old file (and, without O_TMPFILE, the partial one)
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != out.partial_name())
            .collect();
        assert_eq!(names, [OsString::from("result.json")]);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        out.publish(b"{\"new\": true}").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"{\"new\": true}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // dropped unpublished: nothing changes, nothing is left
        drop(OutputFile::create(&target).unwrap());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error_up_front() {
        assert!(OutputFile::create(Path::new("/nonexistent-vmm-dir/result.json")).is_err());
    }
}
