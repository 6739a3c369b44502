//! virtio-blk request parsing and serving, end to end: the input is the guest's memory (the request
//! queue's descriptor table, available ring and buffers), and the device serves whatever the driver
//! made available from a small disk image, through the event loop as in vmm.
//!
//! Input: one byte of settings, then the bytes of guest memory from address 0 (the rest is zero).
//! - bit 0: the disk is writable (else read-only, as the root image is: then it must not change);
//! - bit 1: after serving, the driver resets the device, activates it again and kicks it once more;
//! - bits 2-3: event-loop turns per kick, less one.
//!
//! Memory: [0, 32 KiB) and [32 KiB, 64 KiB) are two regions (a buffer may straddle them), then a hole,
//! then [128 KiB, 132 KiB). The queue has 16 entries: descriptors at 0x0, available ring at 0x100, used
//! ring at 0x128.

#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use vmm_fuzz::ring::Ring;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 16;
const MAX_QUEUE_SIZE: u16 = 256;
const SECTORS: usize = 16;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// The disk's content at the start of every run.
fn pattern() -> Vec<u8> {
    (0..SECTORS * 512)
        .map(|i| (i * 7 + i / 512) as u8)
        .collect()
}

thread_local! {
    /// One disk image (a memfd) for the whole process, put back to `pattern` before every run.
    static DISK: File = {
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"vmm-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a new descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&pattern()).unwrap();
        file
    };
}

fn turns(manager: &mut Manager, count: u8) {
    for _ in 0..count {
        // Timeout 0: whatever is ready now; the device re-arms its own eventfd past its per-wake budget.
        if manager.run_with_timeout(0).unwrap() == 0 {
            break;
        }
    }
}

fn activate(block: &Arc<Mutex<Block>>, mem: &vmm_fuzz::GuestMemory, ring: &Ring) -> bool {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut dev = block.lock().unwrap();
    let acked_features = dev.features();
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![ring.queue(MAX_QUEUE_SIZE)],
        interrupt,
        acked_features,
    })
    .is_ok()
}

fn kick(block: &Arc<Mutex<Block>>) {
    block.lock().unwrap().queue_events()[0].write(1).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&settings, image)) = data.split_first() else {
        return;
    };
    let writable = settings & 1 != 0;
    let again = settings & 2 != 0;
    let per_kick = ((settings >> 2) & 3) + 1;

    let mem = vmm_fuzz::guest_memory(&[(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)]);
    let ring = Ring::new(&mem, 0, QUEUE_SIZE);
    let image = &image[..image.len().min(0x1_0000)];
    mem.write_slice(image, GuestAddress(0)).unwrap();

    let file = DISK.with(|disk| {
        disk.write_all_at(&pattern(), 0).unwrap();
        disk.try_clone().unwrap()
    });
    let file = if writable {
        file
    } else {
        // A read-only descriptor, as vmm opens the root image.
        File::open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ))
        .unwrap()
    };
    let block = Arc::new(Mutex::new(Block::new(file, !writable).unwrap()));
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(block.clone());

    if activate(&block, &mem, &ring) {
        kick(&block);
        turns(&mut manager, per_kick);
    }
    if again {
        assert!(
            block.lock().unwrap().reset(),
            "virtio-blk can always be reset"
        );
        if activate(&block, &mem, &ring) {
            kick(&block);
            turns(&mut manager, per_kick);
        }
    }

    let stats = block.lock().unwrap().stats();
    assert!(stats.failed_requests <= stats.requests);
    if !writable {
        assert_eq!(stats.bytes_written, 0, "a read-only disk was written");
        let mut now = vec![0u8; SECTORS * 512];
        DISK.with(|disk| disk.read_exact_at(&mut now, 0).unwrap());
        assert!(now == pattern(), "a read-only disk changed");
    }
});
