//! The virtio-mmio transport under any sequence of register accesses a guest can make: reads and
//! writes of every width at every offset of the window (registers and configuration space), the
//! status and feature negotiation in any order, queue set-up with addresses of the input's choosing,
//! activation, resets, and queue notifications that the device then serves from guest memory the input
//! also writes. The device behind it is a real virtio-blk (on a read-only disk, which must not change)
//! or virtio-vsock, as in vmm.
//!
//! Input: a byte choosing the device, then operations, each an opcode byte and its operands.

#![no_main]

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes as _, GuestAddress};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::mmio::{status, MmioTransport, REG_QUEUE_NOTIFY};
use vmm::devices::virtio::vsock::Vsock;
use vmm::devices::virtio::{Interrupt, VirtioDevice};
use vmm_fuzz::Bytes;
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x7472_6976;
const SECTORS: usize = 8;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

fn pattern() -> Vec<u8> {
    (0..SECTORS * 512).map(|i| (i * 5 + 3) as u8).collect()
}

thread_local! {
    /// The block device's disk (a memfd), read-only to the device.
    static DISK: File = {
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"vmm-fuzz-mmio-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a new descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&pattern()).unwrap();
        file
    };
}

fn read(t: &mut MmioTransport, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0xa5u8; len];
    t.mmio_read(MmioAddress(0x1000_0000), offset, &mut data);
    data
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.mmio_write(MmioAddress(0x1000_0000), offset, &value.to_le_bytes());
}

fn turns(manager: &mut Manager) {
    for _ in 0..4 {
        if manager.run_with_timeout(0).unwrap() == 0 {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let mem = vmm_fuzz::guest_memory(&[(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)]);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut manager = Manager::new().unwrap();
    let block_device = input.u8() & 1 == 0;
    let device: Arc<Mutex<dyn VirtioDevice>> = if block_device {
        let file = DISK.with(|d| {
            File::open(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(d)
            ))
            .unwrap()
        });
        let block = Arc::new(Mutex::new(Block::new(file, true).unwrap()));
        manager.add_subscriber(block.clone());
        block
    } else {
        let (tx, _rx) = std::sync::mpsc::channel();
        let vsock = Arc::new(Mutex::new(
            Vsock::new(3, HashMap::from([(1024, tx)])).unwrap(),
        ));
        manager.add_subscriber(vsock.clone());
        vsock
    };
    let mut t = MmioTransport::new(device, mem.clone(), interrupt.clone()).unwrap();

    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 8 {
            // a 32-bit register write, at a 4-byte aligned offset of the registers or config space
            0 => {
                let offset = u64::from(input.u8()) * 4;
                let value = input.u32();
                write(&mut t, offset, value);
            }
            // a read of 1, 2, 4 or 8 bytes at such an offset
            1 => {
                let offset = u64::from(input.u8()) * 4;
                let len = 1 << (input.u8() % 4);
                let got = read(&mut t, offset, len);
                if offset == 0 && len == 4 {
                    assert_eq!(got, MAGIC.to_le_bytes());
                }
            }
            // a write of any width at any offset of the window
            2 => {
                let offset = u64::from(input.u16() % 0x1000);
                let len = usize::from(input.u8() % 9);
                let bytes = input.take(len).to_vec();
                t.mmio_write(MmioAddress(0x1000_0000), offset, &bytes);
            }
            // a read of any width at any offset
            3 => {
                let offset = u64::from(input.u16() % 0x1000);
                let len = usize::from(input.u8() % 9);
                let _ = read(&mut t, offset, len);
            }
            // the driver writes guest memory (rings, requests, buffers)
            4 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.take(len).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            // a whole driver initialisation, as Linux does it, with queues at the input's addresses
            5 => {
                let features = input.u8();
                write(&mut t, 0x070, 0);
                write(&mut t, 0x070, status::ACKNOWLEDGE);
                write(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
                write(&mut t, 0x024, 0);
                write(&mut t, 0x020, u32::from(features) * 0x0101_0101);
                write(&mut t, 0x024, 1);
                write(&mut t, 0x020, 1);
                let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
                write(&mut t, 0x070, ok);
                for q in 0..3u32 {
                    write(&mut t, 0x030, q);
                    write(&mut t, 0x038, 1 << (input.u8() % 9));
                    for reg in [0x080, 0x090, 0x0a0] {
                        write(&mut t, reg, u32::from(input.u16()));
                    }
                    write(&mut t, 0x044, 1);
                }
                write(&mut t, 0x070, ok | status::DRIVER_OK);
            }
            // the event loop serves what the kicks (QueueNotify) asked for
            6 => turns(&mut manager),
            // a queue notification, then the event loop
            _ => {
                write(&mut t, REG_QUEUE_NOTIFY, u32::from(input.u8() % 4));
                turns(&mut manager);
            }
        }
        assert_eq!(interrupt.status() & !3, 0, "unknown interrupt status bits");
    }
    if block_device {
        let mut now = vec![0u8; SECTORS * 512];
        DISK.with(|d| d.read_exact_at(&mut now, 0).unwrap());
        assert!(now == pattern(), "a read-only disk changed");
    }
});
