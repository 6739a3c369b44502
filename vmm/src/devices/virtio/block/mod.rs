//! virtio-blk (virtio 1.2, section 5.2): a disk image served to the guest over one request queue.
//!
//! The root image is served read-only (the guest writes to an overlay elsewhere); an optional scratch
//! disk may be writable. Requests are parsed and checked in `request` before any I/O, and the I/O in
//! `disk` goes straight between the image and guest memory.
//!
//! The device runs on the event loop: the queue's ioeventfd wakes it, it serves what the driver has made
//! available, and signals the used ring through the transport's irqfd once per batch.

mod disk;
mod request;

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, ActivateError, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::fault_dump::{dump_queue, QueueDump, RecentUsed};
pub use disk::DiskError;
use disk::{Disk, DiskIoError};
use request::{
    GuestBuffer, MalformedRequest, Request, RequestKind, MAX_DATA_SEGMENTS, MAX_SEGMENT_SIZE,
    SECTOR_SIZE,
};

/// The one request queue's maximum size.
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

/// Most chains served per wake-up. A guest that keeps refilling the queue could otherwise keep the event
/// loop here forever, starving the timeout, signals and the control channel; past this the device
/// re-arms its own queue event and yields.
const MAX_CHAINS_PER_WAKE: usize = QUEUE_SIZE as usize;

/// The device-specific configuration space: the start of `struct virtio_blk_config` up to and including
/// blk_size. Everything after it reads as zero, which is right for the features not offered.
const CONFIG_SIZE: usize = 24;
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SIZE_MAX: usize = 8;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;

/// The logical block size advertised: one sector, so the guest never needs read-modify-write.
#[allow(clippy::cast_possible_truncation)] // 512
const BLOCK_SIZE: u32 = SECTOR_SIZE as u32;

/// Serials of the two disks vmm serves, reported by GET_ID (the guest's /sys/block/vdX/serial).
const ROOTFS_SERIAL: &str = "vmm-rootfs";
const SCRATCH_SERIAL: &str = "vmm-scratch";
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

// Status values are single bytes by definition (0, 1, 2); the bindings declare them as u32.
#[allow(clippy::cast_possible_truncation)]
const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation)]
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("unusable disk image: {0}")]
    Disk(#[from] DiskError),
    #[error("cannot create the queue eventfd of the block device: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("the disk serial {0:?} is longer than the {ID_BYTES} bytes virtio-blk allows")]
    SerialTooLong(String),
}

/// What the device has done since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockStats {
    /// Bytes read from the image into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the image.
    pub bytes_written: u64,
    /// Descriptor chains completed, whatever their status.
    pub requests: u64,
    /// Of those, the ones that did not complete with VIRTIO_BLK_S_OK (malformed chains, I/O errors,
    /// writes to a read-only disk, unsupported request types).
    pub failed_requests: u64,
}

/// A virtio-blk device serving one disk image.
pub struct Block {
    disk: Disk,
    serial: [u8; ID_BYTES],
    config: [u8; CONFIG_SIZE],
    queue_events: [EventFd; 1],
    /// Present between activation and reset.
    active: Option<ActiveQueue>,
    stats: BlockStats,
    /// Host-side I/O failures are reported on stderr once, not once per request.
    reported_io_error: bool,
}

/// What the device needs to serve its queue, handed over by the transport at DRIVER_OK.
struct ActiveQueue {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated (never, as it is not offered)
    indirect: bool,
    /// The last used entries written, for the dump at a triple fault.
    recent: RecentUsed,
}

impl Block {
    /// Serves `file` to the guest. With `read_only` the device offers VIRTIO_BLK_F_RO, fails every write
    /// with VIRTIO_BLK_S_IOERR and never writes the file; otherwise `file` must be open for writing. The
    /// file's length must be a whole number of 512-byte sectors.
    ///
    /// GET_ID reports the serial "vmm-rootfs" for a read-only disk and "vmm-scratch" for a writable
    /// one; [`Block::with_serial`] sets another.
    pub fn new(file: std::fs::File, read_only: bool) -> Result<Self, BlockError> {
        let disk = Disk::new(file, read_only)?;
        let queue_event = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let serial = if read_only {
            ROOTFS_SERIAL
        } else {
            SCRATCH_SERIAL
        };
        let config = config_space(disk.capacity());
        Block {
            disk,
            serial: [0; ID_BYTES],
            config,
            queue_events: [queue_event],
            active: None,
            stats: BlockStats::default(),
            reported_io_error: false,
        }
        .with_serial(serial)
    }

    /// Sets the serial that GET_ID reports: at most 20 bytes, shorter ones padded with zeros.
    pub fn with_serial(mut self, serial: &str) -> Result<Self, BlockError> {
        let bytes = serial.as_bytes();
        let mut id = [0u8; ID_BYTES];
        let Some(slot) = id.get_mut(..bytes.len()) else {
            return Err(BlockError::SerialTooLong(serial.to_owned()));
        };
        slot.copy_from_slice(bytes);
        self.serial = id;
        Ok(self)
    }

    /// Bytes read and written, and requests served (for the run's statistics).
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Serves the chains the driver has made available, up to [`MAX_CHAINS_PER_WAKE`], and signals the
    /// guest if any completed.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = 0usize;
        while completed < MAX_CHAINS_PER_WAKE {
            let Some(popped) = super::pop_chain(&mut active.queue, &active.mem, active.indirect)
            else {
                break;
            };
            let (head, used_len, first) = match popped {
                Ok(chain) => {
                    let head = chain.head_index();
                    let first = chain.clone().next().map_or(0, |d| d.addr().0);
                    let used_len = serve(
                        &self.disk,
                        &self.serial,
                        &active.mem,
                        chain,
                        &mut self.stats,
                        &mut self.reported_io_error,
                    );
                    (head, used_len, first)
                }
                Err(head) => {
                    // not followed, so there is no status byte to write
                    self.stats.requests += 1;
                    self.stats.failed_requests += 1;
                    (head, 0, 0)
                }
            };
            completed += 1;
            // Fails only for a head index past the queue size, which the driver made up: the chain is
            // consumed either way, and there is no used slot to report it in.
            active
                .recent
                .record(active.queue.next_used(), head, used_len, first);
            let _ = active.queue.add_used(&active.mem, head, used_len);
        }
        if completed == MAX_CHAINS_PER_WAKE {
            // More may be waiting: come back after the event loop has served everything else. (If
            // there are none, the extra wake-up finds an empty queue.)
            if let Err(e) = self.queue_events[0].write(1) {
                eprintln!("vmm: virtio-blk: cannot re-arm the queue event: {e}");
            }
        }
        if completed == 0 {
            return;
        }
        // Without VIRTIO_RING_F_EVENT_IDX this is always true; asking keeps it right if that changes.
        if active.queue.needs_notification(&active.mem).unwrap_or(true) {
            if let Err(e) = active.interrupt.signal_used_queue() {
                eprintln!("vmm: virtio-blk: cannot interrupt the guest: {e}");
            }
        }
    }
}

/// Builds the configuration space for a disk of `capacity` sectors.
fn config_space(capacity: u64) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
    config[CONFIG_SIZE_MAX..CONFIG_SIZE_MAX + 4].copy_from_slice(&MAX_SEGMENT_SIZE.to_le_bytes());
    config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&MAX_DATA_SEGMENTS.to_le_bytes());
    config[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
    config
}

/// Serves one chain and returns its used length: the bytes the device wrote into it.
fn serve(
    disk: &Disk,
    serial: &[u8; ID_BYTES],
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    stats: &mut BlockStats,
    reported_io_error: &mut bool,
) -> u32 {
    stats.requests += 1;
    let request = match Request::parse(chain, mem, disk.capacity()) {
        Ok(request) => request,
        Err(MalformedRequest { status, .. }) => {
            stats.failed_requests += 1;
            return match status {
                Some(status) => write_status(mem, status, STATUS_IOERR, 0),
                None => 0,
            };
        }
    };

    let outcome = match request.kind {
        RequestKind::Read => disk
            .read_into(mem, request.offset, &request.buffers)
            .map(|read| {
                stats.bytes_read += read;
                request.data_len
            }),
        RequestKind::Write if disk.read_only() => {
            stats.failed_requests += 1;
            return write_status(mem, request.status, STATUS_IOERR, 0);
        }
        RequestKind::Write => {
            disk.write_from(mem, request.offset, &request.buffers)
                .map(|written| {
                    stats.bytes_written += written;
                    0
                })
        }
        RequestKind::Flush => disk.flush().map(|()| 0),
        RequestKind::GetId => Ok(write_id(mem, serial, &request.buffers)),
        RequestKind::Unsupported(_) => {
            stats.failed_requests += 1;
            return write_status(mem, request.status, STATUS_UNSUPP, 0);
        }
    };
    match outcome {
        Ok(data_written) => write_status(mem, request.status, STATUS_OK, data_written),
        Err(e) => {
            stats.failed_requests += 1;
            report_io_error(&e, reported_io_error);
            // Part of a read may have landed; claiming none of it is the safe undercount.
            write_status(mem, request.status, STATUS_IOERR, 0)
        }
    }
}

/// Writes the status byte and returns the used length: `data_written` plus the status byte, or 0 if
/// the status could not be written after all.
fn write_status(mem: &GuestMemory, status: GuestAddress, value: u8, data_written: u32) -> u32 {
    match mem.write_obj(value, status) {
        Ok(()) => data_written.saturating_add(1),
        Err(_) => 0,
    }
}

/// Copies the serial into the GET_ID buffers, as much as fits; returns the bytes written.
fn write_id(mem: &GuestMemory, serial: &[u8; ID_BYTES], buffers: &[GuestBuffer]) -> u32 {
    let mut remaining: &[u8] = serial;
    for buffer in buffers {
        if remaining.is_empty() {
            break;
        }
        let len = remaining.len().min(buffer.len as usize);
        let (chunk, rest) = remaining.split_at(len);
        // The buffer was checked to lie in guest memory when the request was parsed.
        if mem.write_slice(chunk, buffer.addr).is_err() {
            break;
        }
        remaining = rest;
    }
    // at most ID_BYTES (20)
    u32::try_from(serial.len() - remaining.len()).unwrap_or(VIRTIO_BLK_ID_BYTES)
}

fn report_io_error(error: &DiskIoError, reported: &mut bool) {
    if !*reported {
        *reported = true;
        eprintln!(
            "vmm: virtio-blk: {error}; the guest sees an I/O error (further errors not shown)"
        );
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_dumps(&self, name: &str) -> Vec<QueueDump> {
        self.active.as_ref().map_or_else(Vec::new, |a| {
            vec![dump_queue(name, "requests", &a.queue, &a.mem, &a.recent)]
        })
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            ("bytes_read", s.bytes_read),
            ("bytes_written", s.bytes_written),
            ("requests", s.requests),
            ("failed_requests", s.failed_requests),
        ]
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field offered is read-only (writeback mode would need VIRTIO_BLK_F_CONFIG_WCE).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let ActivateContext {
            mem,
            queues,
            interrupt,
            acked_features,
        } = ctx;
        let mut queues = queues.into_iter();
        let (Some(queue), None) = (queues.next(), queues.next()) else {
            return Err(ActivateError::InvalidQueue(0));
        };
        if !queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.active = Some(ActiveQueue {
            mem,
            queue,
            interrupt,
            indirect: super::indirect_negotiated(acked_features),
            recent: RecentUsed::default(),
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Requests are served synchronously, so none is in flight: dropping the queue is a full reset.
        self.active = None;
        true
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            eprintln!(
                "vmm: virtio-blk: cannot watch the queue eventfd ({e}); the guest's disk requests \
                 will go unanswered"
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.queue_events[0].as_raw_fd() {
            return;
        }
        // Drain the counter (one read resets it); an empty eventfd says WouldBlock, which is fine.
        if let Err(e) = self.queue_events[0].read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                eprintln!("vmm: virtio-blk: cannot read the queue eventfd: {e}");
            }
        }
        // Before activation the kick is only drained: there is no queue to serve yet.
        self.process_queue();
    }
}

#[cfg(test)]
mod tests;
