//! The guest kernel file as linux-loader reads it, except that the kernel's big segments are mapped
//! into guest memory copy-on-write instead of being copied there.
//!
//! Copying a vmlinux's ~9 MB of text and data into fresh guest memory costs a page fault and a 4 KiB copy
//! per page before the guest runs at all, and most of those pages are then never touched by the boot.
//! Mapped `MAP_PRIVATE` from the file, a page costs nothing until the guest first touches it, and then
//! only a page-cache lookup (no copy unless the guest writes to it). The mapping is private: what the
//! guest writes never reaches the file. The file must not be rewritten in place while a VM runs from it
//! (a page the guest has not touched yet would show the new bytes); kernel-config/build.sh and package
//! managers replace a kernel by renaming, which is safe.
//!
//! Anything that cannot be mapped (a destination or file offset that is not page-aligned, the tail of a
//! segment shorter than a page, a file system without mmap) is read as before.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

const PAGE_BYTES: usize = 4096;
const PAGE: u64 = PAGE_BYTES as u64;

/// A kernel image file with a read position, for linux-loader's `Read + ReadVolatile + Seek` reader.
pub struct KernelFile {
    file: File,
    len: u64,
    pos: u64,
    /// Bytes mapped rather than read, for the tests and the curious.
    pub mapped_bytes: u64,
    /// The host ranges (address, length) mapped from the file: there, mincore reports the page cache,
    /// not what the guest touched.
    pub mapped: Vec<(usize, usize)>,
}

impl KernelFile {
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(KernelFile {
            file,
            len,
            pos: 0,
            mapped_bytes: 0,
            mapped: Vec::new(),
        })
    }

    /// Maps the whole pages of the file from the current position at `dst`, at most `max` bytes.
    /// Returns how many bytes were mapped: 0 when nothing could be (then the caller reads).
    fn map_at(&mut self, dst: *mut u8, max: usize) -> usize {
        // what is left of the file is only compared with `max`: saturating it to usize changes nothing
        let left_in_file = usize::try_from(self.len.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let whole = max.min(left_in_file) / PAGE_BYTES * PAGE_BYTES;
        if whole == 0 || self.pos % PAGE != 0 || dst as u64 % PAGE != 0 {
            return 0;
        }
        // SAFETY: `dst..dst + whole` lies inside one guest memory region (a VolatileSlice of it), which
        // is a private anonymous mapping that this process owns and that nothing has touched yet;
        // MAP_FIXED replaces exactly those pages with a private mapping of the file, readable and
        // writable as before. The region's own munmap on drop unmaps the replacement with it.
        let got = unsafe {
            libc::mmap(
                dst.cast::<libc::c_void>(),
                whole,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.file.as_raw_fd(),
                self.pos as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return 0;
        }
        self.mapped.push((dst as usize, whole));
        whole
    }
}

impl Read for KernelFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for KernelFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

impl ReadVolatile for KernelFile {
    /// Fills as much of `buf` as the file allows in one call (vm-memory's guest-memory reads take a
    /// short count for an error): whole pages mapped where possible, the rest read.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let dst = guard.as_ptr();
        let len = buf.len();
        let mut done = self.map_at(dst, len);
        self.pos += done as u64;
        self.mapped_bytes += done as u64;
        while done < len {
            // SAFETY: `dst + done .. dst + len` is valid for writes (the VolatileSlice's invariant).
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    dst.add(done).cast::<libc::c_void>(),
                    len - done,
                    self.pos as libc::off_t,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                buf.bitmap().mark_dirty(0, len);
                return Err(VolatileMemoryError::IOError(err));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.pos += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn temp_file(bytes: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(bytes).unwrap();
        f
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("vmm-kernel-file-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn aligned_segments_are_mapped_and_tails_read() {
        // three pages and a half of a recognisable pattern, after one page of header
        let body: Vec<u8> = (0..(3 * PAGE + 2048)).map(|i| (i % 251) as u8).collect();
        let mut bytes = vec![0xee; PAGE as usize];
        bytes.extend_from_slice(&body);
        let mut k = KernelFile::new(temp_file(&bytes)).unwrap();
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        k.seek(SeekFrom::Start(PAGE)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x2000), &mut k, body.len())
            .unwrap();
        assert_eq!(k.mapped_bytes, 3 * PAGE);
        let mut back = vec![0u8; body.len() + 16];
        mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert_eq!(&back[..body.len()], &body[..]);
        // what follows the segment in the last page is untouched guest memory, not file bytes
        assert!(back[body.len()..].iter().all(|&b| b == 0));
        // guest writes stay private
        mem.write_slice(&[1, 2, 3], GuestAddress(0x2000)).unwrap();
        let mut file_bytes = [0u8; 3];
        k.file.read_exact_at(&mut file_bytes, PAGE).unwrap();
        assert_eq!(file_bytes, [0, 1, 2]);
    }

    #[test]
    fn unaligned_reads_are_copied() {
        let bytes: Vec<u8> = (0..(2 * PAGE + 100)).map(|i| (i % 13) as u8).collect();
        let mut k = KernelFile::new(temp_file(&bytes)).unwrap();
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        k.seek(SeekFrom::Start(10)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x3000), &mut k, 2 * PAGE as usize)
            .unwrap();
        assert_eq!(k.mapped_bytes, 0);
        let mut back = vec![0u8; 2 * PAGE as usize];
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(&back[..], &bytes[10..10 + 2 * PAGE as usize]);
    }
}
