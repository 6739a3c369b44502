//! The file behind a virtio-blk device, and I/O between it and guest memory.
//!
//! Data moves with positional reads and writes straight into and out of guest memory: no bounce buffer,
//! no shared file offset, and nothing copied through the host's heap however large the request.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::bitmap::MS;
use vm_memory::{
    GuestMemoryBackend, GuestMemoryError, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use super::request::{GuestBuffer, SECTOR_SIZE};

/// Why a disk file cannot back a device.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot determine the size of the disk image: {0}")]
    Size(#[source] io::Error),
    #[error(
        "the disk image is {0} bytes, not a whole number of 512-byte sectors; pad or resize it \
         (e.g. `truncate -s %512 IMAGE`)"
    )]
    UnalignedSize(u64),
    #[error("cannot query how the disk image was opened: {0}")]
    AccessMode(#[source] io::Error),
    #[error(
        "the disk image was opened read-only but the device is writable; open it read-write or \
         make the device read-only"
    )]
    NotWritable,
}

/// Why one request's I/O failed. The guest sees VIRTIO_BLK_S_IOERR; these say why on the host side.
#[derive(Debug, thiserror::Error)]
pub enum DiskIoError {
    #[error("guest buffer at {addr:#x} is not in guest memory: {source}")]
    GuestMemory {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("reading the disk image at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: VolatileMemoryError,
    },
    #[error("writing the disk image at byte {offset}: {source}")]
    Write {
        offset: u64,
        #[source]
        source: VolatileMemoryError,
    },
    #[error("flushing the disk image to stable storage: {0}")]
    Flush(#[source] io::Error),
}

/// A disk image: a regular file or a block device whose size is a whole number of sectors.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
    read_only: bool,
}

impl Disk {
    pub fn new(file: File, read_only: bool) -> Result<Self, DiskError> {
        // Seeking to the end works for block devices too, whose metadata length is 0. The file position
        // itself is never used: all I/O is positional.
        let size = (&file).seek(SeekFrom::End(0)).map_err(DiskError::Size)?;
        if size % SECTOR_SIZE != 0 {
            return Err(DiskError::UnalignedSize(size));
        }
        if !read_only && !opened_for_writing(&file)? {
            return Err(DiskError::NotWritable);
        }
        Ok(Disk {
            file,
            capacity: size / SECTOR_SIZE,
            read_only,
        })
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fills `buffers`, in order, with the disk's bytes from `offset` on. Returns the bytes read.
    pub fn read_into<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buffers: &[GuestBuffer],
    ) -> Result<u64, DiskIoError> {
        let mut file = FileAt {
            file: &self.file,
            offset,
        };
        for buffer in buffers {
            for_each_slice(mem, buffer, |slice| {
                // On failure the offset is where the transfer stopped.
                file.read_exact_volatile(slice)
                    .map_err(|source| DiskIoError::Read {
                        offset: file.offset,
                        source,
                    })
            })?;
        }
        Ok(file.offset - offset)
    }

    /// Writes `buffers`, in order, to the disk from `offset` on. Returns the bytes written. The caller
    /// checks that the device is writable; a read-only image's file descriptor refuses writes anyway.
    pub fn write_from<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buffers: &[GuestBuffer],
    ) -> Result<u64, DiskIoError> {
        let mut file = FileAt {
            file: &self.file,
            offset,
        };
        for buffer in buffers {
            for_each_slice(mem, buffer, |slice| {
                // On failure the offset is where the transfer stopped.
                file.write_all_volatile(slice)
                    .map_err(|source| DiskIoError::Write {
                        offset: file.offset,
                        source,
                    })
            })?;
        }
        Ok(file.offset - offset)
    }

    /// Makes completed writes durable. A read-only disk has nothing to flush.
    pub fn flush(&self) -> Result<(), DiskIoError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(DiskIoError::Flush)
    }
}

/// Calls `f` on each host mapping that makes up `buffer` (a buffer may span guest memory regions).
fn for_each_slice<'m, M, F>(mem: &'m M, buffer: &GuestBuffer, mut f: F) -> Result<(), DiskIoError>
where
    M: GuestMemoryBackend + ?Sized,
    F: FnMut(&mut VolatileSlice<'m, MS<'m, M>>) -> Result<(), DiskIoError>,
{
    let len = usize::try_from(buffer.len).map_err(|_| DiskIoError::GuestMemory {
        addr: buffer.addr.0,
        source: GuestMemoryError::InvalidGuestAddress(buffer.addr),
    })?;
    for slice in mem.get_slices(buffer.addr, len) {
        let mut slice = slice.map_err(|source| DiskIoError::GuestMemory {
            addr: buffer.addr.0,
            source,
        })?;
        f(&mut slice)?;
    }
    Ok(())
}

/// Whether `file`'s descriptor allows writing.
fn opened_for_writing(file: &File) -> Result<bool, DiskError> {
    // SAFETY: F_GETFL only reads the flags of a descriptor that `file` owns and keeps open for the call;
    // it touches no memory of ours.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(DiskError::AccessMode(io::Error::last_os_error()));
    }
    Ok(flags & libc::O_ACCMODE != libc::O_RDONLY)
}

/// A file seen through pread/pwrite from a moving offset, as a source and sink for guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn file_offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput)))
    }

    /// Moves past `done` bytes just transferred (the syscall's non-negative return value).
    fn advance(&mut self, done: isize) -> usize {
        let done = done.unsigned_abs();
        // `done` is at most the slice length, and offset + length stays within the disk's size.
        self.offset = self.offset.saturating_add(done as u64);
        done
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.file_offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the VolatileSlice guarantees that `buf.len()` bytes from its pointer are mapped and
        // writable for as long as the guard lives. The kernel writes into them; no Rust reference to
        // that memory exists, so nothing aliases it, and pread keeps no pointer after it returns.
        let read = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        if read < 0 {
            // A failed read may still have written part of the buffer.
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let read = self.advance(read);
        buf.bitmap().mark_dirty(0, read);
        Ok(read)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.file_offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the VolatileSlice guarantees that `buf.len()` bytes from its pointer are mapped and
        // readable for as long as the guard lives; pwrite only reads them and keeps no pointer after it
        // returns.
        let written = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        if written < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        Ok(self.advance(written))
    }
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    fn image(bytes: &[u8]) -> File {
        let file = TempFile::new().unwrap().into_file();
        (&file).write_all(bytes).unwrap();
        file
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    #[test]
    fn size_must_be_whole_sectors() {
        assert!(matches!(
            Disk::new(image(&[0; 513]), true),
            Err(DiskError::UnalignedSize(513))
        ));
        assert_eq!(Disk::new(image(&[0; 1024]), true).unwrap().capacity(), 2);
        assert_eq!(Disk::new(image(&[]), true).unwrap().capacity(), 0);
    }

    #[test]
    fn writable_device_needs_a_writable_file() {
        let temp = TempFile::new().unwrap();
        let read_only = File::open(temp.as_path()).unwrap();
        assert!(matches!(
            Disk::new(read_only, false),
            Err(DiskError::NotWritable)
        ));
        let read_only = File::open(temp.as_path()).unwrap();
        assert!(Disk::new(read_only, true).is_ok());
    }

    #[test]
    fn io_crosses_guest_memory_regions() {
        // two regions with a hole between them; one buffer straddles the boundary of the first two
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        let content = pattern(4096);
        let disk = Disk::new(image(&content), false).unwrap();
        let buffers = [
            GuestBuffer {
                addr: GuestAddress(0xe00),
                len: 1024,
            },
            GuestBuffer {
                addr: GuestAddress(0x4000),
                len: 512,
            },
        ];
        assert_eq!(disk.read_into(&mem, 512, &buffers).unwrap(), 1536);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0xe00)).unwrap();
        assert_eq!(got, content[512..1536]);
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(got, content[1536..2048]);

        // and back out, elsewhere on the disk
        assert_eq!(disk.write_from(&mem, 2048, &buffers).unwrap(), 1536);
        let mut on_disk = vec![0u8; 1536];
        disk.file.read_exact_at(&mut on_disk, 2048).unwrap();
        assert_eq!(on_disk, content[512..2048]);
    }

    #[test]
    fn read_past_end_of_shrunk_file_fails_instead_of_spinning() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let disk = Disk::new(image(&pattern(1024)), false).unwrap();
        disk.file.set_len(512).unwrap();
        let buffers = [GuestBuffer {
            addr: GuestAddress(0),
            len: 1024,
        }];
        assert!(matches!(
            disk.read_into(&mem, 0, &buffers),
            Err(DiskIoError::Read { offset: 512, .. })
        ));
    }

    #[test]
    fn buffer_outside_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let disk = Disk::new(image(&pattern(1024)), false).unwrap();
        let buffers = [GuestBuffer {
            addr: GuestAddress(0x1000),
            len: 512,
        }];
        assert!(matches!(
            disk.read_into(&mem, 0, &buffers),
            Err(DiskIoError::GuestMemory { .. })
        ));
    }
}
