//! The device end to end: chains placed on a mock split queue in real guest memory, served from a
//! temporary image file, with the used ring, status bytes, the image and the interrupt checked after.

// test data is small
#![allow(clippy::cast_possible_truncation)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;

const MEM_SIZE: u64 = 0x40_0000;
const HEADER_ADDR: u64 = 0x10_0000;
const STATUS_ADDR: u64 = 0x10_1000;
const DATA_ADDR: u64 = 0x20_0000;
const SECTORS: u64 = 8;
const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;
/// What the status byte holds before the device writes it.
const UNTOUCHED: u8 = 0xff;

/// A temporary disk image and the device serving it.
struct Image {
    temp: TempFile,
    content: Vec<u8>,
}

impl Image {
    fn new() -> Self {
        let temp = TempFile::new().unwrap();
        let content: Vec<u8> = (0..SECTORS as usize * 512)
            .map(|i| (i * 13 + i / 512) as u8)
            .collect();
        temp.as_file().write_all(&content).unwrap();
        Image { temp, content }
    }

    fn device(&self, read_only: bool) -> Block {
        let file = if read_only {
            File::open(self.temp.as_path()).unwrap()
        } else {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.temp.as_path())
                .unwrap()
        };
        Block::new(file, read_only).unwrap()
    }

    fn on_disk(&self) -> Vec<u8> {
        std::fs::read(self.temp.as_path()).unwrap()
    }
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Activates `block` on the queue `mock` describes, as the transport does at DRIVER_OK.
fn activate(
    block: &mut Block,
    mem: &GuestMemory,
    mock: &MockSplitQueue<GuestMemory>,
) -> Arc<Interrupt> {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    block
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![mock.create_queue().unwrap()],
            interrupt: interrupt.clone(),
            acked_features: block.features(),
        })
        .unwrap();
    interrupt
}

/// Writes a request header and resets the status byte.
fn prepare(mem: &GuestMemory, request_type: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER_ADDR)).unwrap();
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS_ADDR)).unwrap();
}

/// Makes a chain of `(addr, len, flags)` descriptors available, its head at descriptor `first`.
fn offer(mock: &MockSplitQueue<GuestMemory>, first: u16, descriptors: &[(u64, u32, u32)]) {
    let raw: Vec<RawDescriptor> = descriptors
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let index = first + i as u16;
            let next = if i + 1 < descriptors.len() {
                VRING_DESC_F_NEXT
            } else {
                0
            };
            RawDescriptor::from(Descriptor::new(addr, len, (flags | next) as u16, index + 1))
        })
        .collect();
    mock.add_desc_chains(&raw, first).unwrap();
}

/// The used ring's entry `i`: (head index, length).
fn used(mock: &MockSplitQueue<GuestMemory>, i: usize) -> (u32, u32) {
    let elem = mock.used().ring().ref_at(i).unwrap().load();
    (elem.id(), elem.len())
}

fn used_count(mock: &MockSplitQueue<GuestMemory>) -> u16 {
    mock.used().idx().load()
}

fn status(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS_ADDR)).unwrap()
}

fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// Serves one chain on a fresh device and queue: (status byte, used length).
fn serve_one(block: &mut Block, mem: &GuestMemory, descriptors: &[(u64, u32, u32)]) -> (u8, u32) {
    let mock = MockSplitQueue::new(mem, 16);
    offer(&mock, 0, descriptors);
    activate(block, mem, &mock);
    block.process_queue();
    assert_eq!(used_count(&mock), 1, "the chain must be returned");
    let (id, len) = used(&mock, 0);
    assert_eq!(id, 0);
    assert!(block.reset());
    (status(mem), len)
}

#[test]
fn read_returns_file_content() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    mem.write_slice(&[0xaa; 4096], GuestAddress(DATA_ADDR))
        .unwrap();
    prepare(&mem, VIRTIO_BLK_T_IN, 2);
    let mock = MockSplitQueue::new(&mem, 16);
    offer(
        &mock,
        0,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 512, W),
            (DATA_ADDR + 0x1000, 1024, W),
            (STATUS_ADDR, 1, W),
        ],
    );
    let interrupt = activate(&mut block, &mem, &mock);
    block.process_queue();

    assert_eq!(status(&mem), STATUS_OK);
    assert_eq!(used(&mock, 0), (0, 1536 + 1));
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 512), image.content[1024..1536]);
    assert_eq!(
        guest_bytes(&mem, DATA_ADDR + 0x1000, 1024),
        image.content[1536..2560]
    );
    // the byte after the first buffer is untouched
    assert_eq!(guest_bytes(&mem, DATA_ADDR + 512, 1), [0xaa]);
    assert_eq!(
        interrupt.status() & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    assert_eq!(
        block.stats(),
        BlockStats {
            bytes_read: 1536,
            bytes_written: 0,
            requests: 1,
            failed_requests: 0
        }
    );
}

#[test]
fn read_of_last_sector() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    prepare(&mem, VIRTIO_BLK_T_IN, SECTORS - 1);
    let result = serve_one(
        &mut block,
        &mem,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 512, W),
            (STATUS_ADDR, 1, W),
        ],
    );
    assert_eq!(result, (STATUS_OK, 513));
    assert_eq!(
        guest_bytes(&mem, DATA_ADDR, 512),
        image.content[(SECTORS as usize - 1) * 512..]
    );
}

#[test]
fn write_to_writable_device_lands_in_file() {
    let image = Image::new();
    let mut block = image.device(false);
    let mem = memory();
    mem.write_slice(&[0x5a; 1024], GuestAddress(DATA_ADDR))
        .unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 3);
    let result = serve_one(
        &mut block,
        &mem,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 1024, R),
            (STATUS_ADDR, 1, W),
        ],
    );
    // a write puts only the status byte into guest memory
    assert_eq!(result, (STATUS_OK, 1));
    let mut expected = image.content.clone();
    expected[3 * 512..5 * 512].fill(0x5a);
    assert_eq!(image.on_disk(), expected);
    assert_eq!(block.stats().bytes_written, 1024);
}

#[test]
fn write_to_read_only_device_fails_and_file_is_unchanged() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA_ADDR))
        .unwrap();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    let result = serve_one(
        &mut block,
        &mem,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 512, R),
            (STATUS_ADDR, 1, W),
        ],
    );
    assert_eq!(result, (STATUS_IOERR, 1));
    assert_eq!(image.on_disk(), image.content);
    assert_eq!(block.stats().bytes_written, 0);
    assert_eq!(block.stats().failed_requests, 1);
}

#[test]
fn read_only_device_refuses_writes_even_on_a_writable_descriptor() {
    // The builder opens the root image read-only; should it ever hand over a writable descriptor, the
    // device still must not write.
    let image = Image::new();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image.temp.as_path())
        .unwrap();
    let mut block = Block::new(file, true).unwrap();
    let mem = memory();
    prepare(&mem, VIRTIO_BLK_T_OUT, 0);
    let result = serve_one(
        &mut block,
        &mem,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 512, R),
            (STATUS_ADDR, 1, W),
        ],
    );
    assert_eq!(result, (STATUS_IOERR, 1));
    assert_eq!(image.on_disk(), image.content);
}

#[test]
fn flush_succeeds() {
    let image = Image::new();
    for read_only in [true, false] {
        let mut block = image.device(read_only);
        let mem = memory();
        prepare(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let result = serve_one(
            &mut block,
            &mem,
            &[(HEADER_ADDR, 16, R), (STATUS_ADDR, 1, W)],
        );
        assert_eq!(result, (STATUS_OK, 1), "read_only: {read_only}");
    }
}

#[test]
fn get_id_reports_the_serial() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    mem.write_slice(&[0xaa; 32], GuestAddress(DATA_ADDR))
        .unwrap();
    prepare(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let result = serve_one(
        &mut block,
        &mem,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 20, W),
            (STATUS_ADDR, 1, W),
        ],
    );
    assert_eq!(result, (STATUS_OK, 21));
    let mut expected = [0u8; 20];
    expected[..10].copy_from_slice(b"vmm-rootfs");
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 20), expected);
    assert_eq!(guest_bytes(&mem, DATA_ADDR + 20, 1), [0xaa]);

    // a custom serial into a buffer split in two, the second part too short for all of it
    let mut block = image.device(false).with_serial("scratch-0").unwrap();
    prepare(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let result = serve_one(
        &mut block,
        &mem,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 4, W),
            (DATA_ADDR + 0x100, 4, W),
            (STATUS_ADDR, 1, W),
        ],
    );
    assert_eq!(result, (STATUS_OK, 9));
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 4), b"scra");
    assert_eq!(guest_bytes(&mem, DATA_ADDR + 0x100, 4), b"tch-");
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    let image = Image::new();
    assert!(matches!(
        image.device(true).with_serial("a-serial-of-21-bytes!"),
        Err(BlockError::SerialTooLong(_))
    ));
    assert!(image
        .device(true)
        .with_serial("twenty-bytes-exactly")
        .is_ok());
}

#[test]
fn default_serial_names_the_disk_role() {
    let image = Image::new();
    assert_eq!(&image.device(true).serial[..11], b"vmm-rootfs\0");
    assert_eq!(&image.device(false).serial[..12], b"vmm-scratch\0");
}

#[test]
fn unsupported_request_type() {
    let image = Image::new();
    let mut block = image.device(false);
    let mem = memory();
    // VIRTIO_BLK_T_DISCARD (not offered), and a made-up type
    for request_type in [11, 0xdead_beef] {
        prepare(&mem, request_type, 0);
        let result = serve_one(
            &mut block,
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 16, R),
                (STATUS_ADDR, 1, W),
            ],
        );
        assert_eq!(result, (STATUS_UNSUPP, 1));
    }
    assert_eq!(image.on_disk(), image.content);
}

/// One malformed chain: the request type and sector, the chain, and the (status, used length) expected.
struct Malformed {
    name: &'static str,
    request_type: u32,
    sector: u64,
    chain: Vec<(u64, u32, u32)>,
    expected: (u8, u32),
}

#[test]
fn malformed_chains_are_refused_without_io() {
    let ioerr = (STATUS_IOERR, 1);
    let unanswered = (UNTOUCHED, 0);
    let header = (HEADER_ADDR, 16, R);
    let status = (STATUS_ADDR, 1, W);
    let cases = [
        Malformed {
            name: "header too short",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![(HEADER_ADDR, 8, R), (DATA_ADDR, 512, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "header write-only",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![(HEADER_ADDR, 16, W), (DATA_ADDR, 512, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "header outside guest memory",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![(MEM_SIZE + 0x1000, 16, R), (DATA_ADDR, 512, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "no status descriptor: header alone",
            request_type: VIRTIO_BLK_T_FLUSH,
            sector: 0,
            chain: vec![header],
            expected: unanswered,
        },
        Malformed {
            name: "no status descriptor: write ending in data",
            request_type: VIRTIO_BLK_T_OUT,
            sector: 0,
            chain: vec![header, (DATA_ADDR, 512, R)],
            expected: unanswered,
        },
        Malformed {
            name: "status read-only",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![header, (DATA_ADDR, 512, W), (STATUS_ADDR, 1, R)],
            expected: unanswered,
        },
        Malformed {
            name: "status outside guest memory",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![header, (DATA_ADDR, 512, W), (MEM_SIZE, 1, W)],
            expected: unanswered,
        },
        Malformed {
            name: "read into device-readable data",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![header, (DATA_ADDR, 512, R), status],
            expected: ioerr,
        },
        Malformed {
            name: "write from device-writable data",
            request_type: VIRTIO_BLK_T_OUT,
            sector: 0,
            chain: vec![header, (DATA_ADDR, 512, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "read with one good and one wrong-direction buffer",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![
                header,
                (DATA_ADDR, 512, W),
                (DATA_ADDR + 0x1000, 512, R),
                status,
            ],
            expected: ioerr,
        },
        Malformed {
            name: "sector beyond capacity",
            request_type: VIRTIO_BLK_T_IN,
            sector: SECTORS,
            chain: vec![header, (DATA_ADDR, 512, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "read running past the end",
            request_type: VIRTIO_BLK_T_IN,
            sector: SECTORS - 1,
            chain: vec![header, (DATA_ADDR, 1024, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "sector * 512 overflows",
            request_type: VIRTIO_BLK_T_OUT,
            sector: u64::MAX / 512 + 1,
            chain: vec![header, (DATA_ADDR, 512, R), status],
            expected: ioerr,
        },
        Malformed {
            name: "sector * 512 + len overflows",
            request_type: VIRTIO_BLK_T_IN,
            sector: u64::MAX / 512,
            chain: vec![header, (DATA_ADDR, 1024, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "length not a multiple of 512",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![header, (DATA_ADDR, 513, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "data outside guest memory",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            chain: vec![header, (0xffff_ffff_0000, 512, W), status],
            expected: ioerr,
        },
        Malformed {
            name: "data running off the end of guest memory",
            request_type: VIRTIO_BLK_T_OUT,
            sector: 0,
            chain: vec![header, (MEM_SIZE - 512, 1024, R), status],
            expected: ioerr,
        },
        Malformed {
            name: "flush with data",
            request_type: VIRTIO_BLK_T_FLUSH,
            sector: 0,
            chain: vec![header, (DATA_ADDR, 512, R), status],
            expected: ioerr,
        },
    ];

    let image = Image::new();
    for case in cases {
        let mut block = image.device(false);
        let mem = memory();
        mem.write_slice(&[0xaa; 2048], GuestAddress(DATA_ADDR))
            .unwrap();
        prepare(&mem, case.request_type, case.sector);
        let result = serve_one(&mut block, &mem, &case.chain);
        assert_eq!(result, case.expected, "{}", case.name);
        // no I/O happened: guest data and the image are as they were
        assert_eq!(
            guest_bytes(&mem, DATA_ADDR, 2048),
            [0xaa; 2048],
            "{}",
            case.name
        );
        assert_eq!(image.on_disk(), image.content, "{}", case.name);
        let stats = block.stats();
        assert_eq!(
            (stats.requests, stats.failed_requests),
            (1, 1),
            "{}",
            case.name
        );
        assert_eq!(
            (stats.bytes_read, stats.bytes_written),
            (0, 0),
            "{}",
            case.name
        );
    }
}

#[test]
fn head_index_outside_the_queue_is_consumed_without_panic() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 16);
    // avail ring entry naming descriptor 200 of a 16-entry table
    mock.avail().ring().ref_at(0).unwrap().store(200);
    mock.avail().idx().store(1);
    activate(&mut block, &mem, &mock);
    block.process_queue();
    assert_eq!(used_count(&mock), 0);
    // the queue moved on: a following good request is served
    prepare(&mem, VIRTIO_BLK_T_FLUSH, 0);
    offer(&mock, 0, &[(HEADER_ADDR, 16, R), (STATUS_ADDR, 1, W)]);
    block.process_queue();
    assert_eq!(used_count(&mock), 1);
    assert_eq!(status(&mem), STATUS_OK);
}

#[test]
fn avail_index_far_ahead_is_ignored() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 16);
    mock.avail().idx().store(1000);
    activate(&mut block, &mem, &mock);
    block.process_queue();
    assert_eq!(used_count(&mock), 0);
}

#[test]
fn a_batch_is_served_with_one_interrupt() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let mock = MockSplitQueue::new(&mem, 16);
    for (i, first) in [0u16, 3, 6].into_iter().enumerate() {
        let data = DATA_ADDR + 0x1000 * i as u64;
        offer(
            &mock,
            first,
            &[
                (HEADER_ADDR, 16, R),
                (data, 512, W),
                (STATUS_ADDR + i as u64, 1, W),
            ],
        );
    }
    let interrupt = activate(&mut block, &mem, &mock);
    block.process_queue();
    assert_eq!(used_count(&mock), 3);
    for (i, head) in [0u32, 3, 6].into_iter().enumerate() {
        assert_eq!(used(&mock, i), (head, 513));
    }
    // eventfd counters add up: one signal reads as 1
    assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    assert_eq!(block.stats().requests, 3);
}

#[test]
fn a_full_wake_rearms_the_queue_event() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    // QUEUE_SIZE one-descriptor chains (malformed: no status), each answered with used length 0
    let raw: Vec<RawDescriptor> = (0..QUEUE_SIZE)
        .map(|_| RawDescriptor::from(Descriptor::new(HEADER_ADDR, 16, 0, 0)))
        .collect();
    mock.add_desc_chains(&raw, 0).unwrap();
    activate(&mut block, &mem, &mock);
    block.process_queue();
    assert_eq!(used_count(&mock), QUEUE_SIZE);
    assert_eq!(block.queue_events[0].read().unwrap(), 1);
}

#[test]
fn config_space_describes_the_disk() {
    let image = Image::new();
    let block = image.device(true);
    let read = |offset: u64, len: usize| {
        let mut data = vec![0xffu8; len];
        block.read_config(offset, &mut data);
        data
    };
    assert_eq!(read(0, 8), SECTORS.to_le_bytes());
    assert_eq!(read(0, 4), (SECTORS as u32).to_le_bytes());
    assert_eq!(read(4, 4), [0; 4]);
    assert_eq!(read(8, 4), MAX_SEGMENT_SIZE.to_le_bytes());
    assert_eq!(read(12, 4), MAX_DATA_SEGMENTS.to_le_bytes());
    assert_eq!(read(16, 4), [0; 4]); // geometry: not offered
    assert_eq!(read(20, 4), 512u32.to_le_bytes());
    // the last field straddled by a read past the end
    assert_eq!(read(21, 4), [2, 0, 0, 0]);
    assert_eq!(read(24, 8), [0; 8]);
    assert_eq!(read(0x1000, 4), [0; 4]);
    assert_eq!(read(u64::MAX, 4), [0; 4]);
    assert_eq!(read(u64::MAX - 1, 4), [0; 4]);
}

#[test]
fn config_writes_are_ignored() {
    let image = Image::new();
    let mut block = image.device(false);
    block.write_config(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    block.write_config(u64::MAX, &[1]);
    assert_eq!(block.capacity(), SECTORS);
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
}

#[test]
fn features_and_identity() {
    let image = Image::new();
    let read_only = image.device(true);
    let writable = image.device(false);
    for block in [&read_only, &writable] {
        assert_eq!(block.device_type(), 2);
        assert_eq!(block.queue_max_sizes(), [256]);
        assert_eq!(block.queue_events().len(), 1);
        let features = block.features();
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        assert_ne!(features & 1 << VIRTIO_BLK_F_FLUSH, 0);
        assert_ne!(features & 1 << VIRTIO_BLK_F_SEG_MAX, 0);
        assert_ne!(features & 1 << VIRTIO_BLK_F_BLK_SIZE, 0);
        // indirect descriptors and event idx are not offered
        assert_eq!(features & (1 << 28 | 1 << 29), 0);
    }
    assert_ne!(read_only.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(writable.features() & 1 << VIRTIO_BLK_F_RO, 0);
}

#[test]
fn image_size_must_be_whole_sectors() {
    let temp = TempFile::new().unwrap();
    temp.as_file().write_all(&[0; 1000]).unwrap();
    let file = File::open(temp.as_path()).unwrap();
    assert!(matches!(
        Block::new(file, true),
        Err(BlockError::Disk(DiskError::UnalignedSize(1000)))
    ));
}

#[test]
fn writable_device_on_read_only_file_is_refused() {
    let image = Image::new();
    let file = File::open(image.temp.as_path()).unwrap();
    let error = Block::new(file, false).err().unwrap();
    assert!(matches!(error, BlockError::Disk(DiskError::NotWritable)));
    assert!(error.to_string().contains("read-only"));
}

#[test]
fn activation_rules_and_reset() {
    let image = Image::new();
    let mut block = image.device(true);
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 16);
    let context = |queues| ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        acked_features: 0,
    };
    assert!(matches!(
        block.activate(context(vec![])),
        Err(ActivateError::InvalidQueue(0))
    ));
    assert!(matches!(
        block.activate(context(vec![
            mock.create_queue().unwrap(),
            mock.create_queue().unwrap()
        ])),
        Err(ActivateError::InvalidQueue(0))
    ));
    block
        .activate(context(vec![mock.create_queue().unwrap()]))
        .unwrap();
    assert!(matches!(
        block.activate(context(vec![mock.create_queue().unwrap()])),
        Err(ActivateError::AlreadyActive)
    ));

    // after a reset nothing is served, and the device can be activated again
    assert!(block.reset());
    prepare(&mem, VIRTIO_BLK_T_FLUSH, 0);
    offer(&mock, 0, &[(HEADER_ADDR, 16, R), (STATUS_ADDR, 1, W)]);
    block.process_queue();
    assert_eq!(used_count(&mock), 0);
    block
        .activate(context(vec![mock.create_queue().unwrap()]))
        .unwrap();
    block.process_queue();
    assert_eq!(used_count(&mock), 1);
}

#[test]
fn event_loop_drains_before_activation_and_serves_after() {
    let image = Image::new();
    let block = Arc::new(Mutex::new(image.device(true)));
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    manager.add_subscriber(block.clone());
    let kick =
        |block: &Arc<Mutex<Block>>| block.lock().unwrap().queue_events()[0].write(1).unwrap();

    // before activation: the kick is drained and nothing else happens
    kick(&block);
    assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
    assert!(block.lock().unwrap().queue_events()[0].read().is_err());

    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 16);
    prepare(&mem, VIRTIO_BLK_T_IN, 1);
    offer(
        &mock,
        0,
        &[
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 512, W),
            (STATUS_ADDR, 1, W),
        ],
    );
    let interrupt = activate(&mut block.lock().unwrap(), &mem, &mock);
    kick(&block);
    assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
    assert_eq!(used(&mock, 0), (0, 513));
    assert_eq!(status(&mem), STATUS_OK);
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 512), image.content[512..1024]);
    assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    assert_eq!(block.lock().unwrap().stats().bytes_read, 512);
}

#[test]
fn indirect_chains_are_refused_unread_when_not_negotiated() {
    let image = Image::new();
    let mut block = image.device(true);
    assert_eq!(
        block.features() & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC),
        0,
        "INDIRECT is not offered"
    );
    let mem = memory();
    // an indirect table of 4 valid descriptors: a read of sector 0, which must not happen
    prepare(&mem, VIRTIO_BLK_T_IN, 0);
    let table = GuestAddress(0x30_0000);
    let entries: [(u64, u32, u32); 3] = [
        (HEADER_ADDR, 16, R),
        (DATA_ADDR, 512, W),
        (STATUS_ADDR, 1, W),
    ];
    for (i, &(addr, len, flags)) in entries.iter().enumerate() {
        let next = if i + 1 < entries.len() {
            VRING_DESC_F_NEXT
        } else {
            0
        };
        let d = RawDescriptor::from(Descriptor::new(
            addr,
            len,
            (flags | next) as u16,
            i as u16 + 1,
        ));
        mem.write_obj(d, GuestAddress(table.0 + i as u64 * 16))
            .unwrap();
    }
    mem.write_slice(&[0u8; 512], GuestAddress(DATA_ADDR))
        .unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    // the indirect descriptor second in its chain, after a plain one
    offer(
        &mock,
        0,
        &[
            (HEADER_ADDR, 16, R),
            (
                table.0,
                48,
                virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT,
            ),
        ],
    );
    activate(&mut block, &mem, &mock);
    block.process_queue();
    assert_eq!(used_count(&mock), 1);
    assert_eq!(used(&mock, 0), (0, 0));
    assert_eq!(status(&mem), UNTOUCHED);
    assert_eq!(guest_bytes(&mem, DATA_ADDR, 512), vec![0u8; 512]);
    assert_eq!(block.stats().failed_requests, 1);
}
