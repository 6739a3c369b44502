//! Virtio devices and the virtio-mmio transport that exposes them to the guest.
//!
//! A device is registered twice (the shape of rust-vmm's vmm-reference): its [`MmioTransport`] sits on the
//! MMIO bus and handles the guest's register accesses from the vCPU threads, and the device itself is an
//! event-manager subscriber on the main thread, woken by the ioeventfds of its queues (and by any host
//! file descriptors of its own). Both hold the same `Arc<Mutex<_>>`.

pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_ring;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::MutEventSubscriber;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

pub use crate::guest_ram::GuestMemory;

/// Feature bit: the device conforms to virtio 1.x (required by virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt status bits: a used ring was updated; the configuration space changed.
pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// The device's line to the guest: the interrupt status register of the transport plus an irqfd that
/// KVM's in-kernel irqchip turns into an edge on the device's GSI without a trip through user space.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The eventfd to register with KVM as an irqfd.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the guest that used rings changed.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the guest that the configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The value of the InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver clears the bits it has handled.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Copies the bytes of a device's configuration space at `offset` into `data`; bytes past its end (or
/// at an offset that overflows) read as zero, as the spec wants for a read-only space.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// A chain popped off a queue: usable, or refused (its head index, to be returned unused).
pub type PoppedChain<'m> = Result<DescriptorChain<&'m GuestMemory>, u16>;

/// Pops the next chain the driver made available. Unless `indirect_negotiated`
/// (VIRTIO_RING_F_INDIRECT_DESC, which no device of ours offers), a chain that refers to an indirect
/// table is refused without being followed: virtio-queue would follow it, and a table of up to 64 Ki
/// descriptors behind each of the queue's chains would cost millions of guest reads per pass.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    indirect_negotiated: bool,
) -> Option<PoppedChain<'m>> {
    let chain = queue.pop_descriptor_chain(mem)?;
    if !indirect_negotiated
        && refers_to_indirect(mem, queue.desc_table(), queue.size(), chain.head_index())
    {
        return Some(Err(chain.head_index()));
    }
    Some(Ok(chain))
}

/// Whether the chain at `head` of the descriptor table at `table` (of `size` entries) has a descriptor
/// with VRING_DESC_F_INDIRECT. Walks at most `size` descriptors, as the chain's own iterator does.
fn refers_to_indirect(mem: &GuestMemory, table: u64, size: u16, head: u16) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let at = table.checked_add(u64::from(index) * 16);
        let Some(descriptor) = at.and_then(|at| {
            mem.read_obj::<virtio_queue::desc::RawDescriptor>(GuestAddress(at))
                .ok()
        }) else {
            return false;
        };
        let descriptor = virtio_queue::desc::split::Descriptor::from(descriptor);
        if descriptor.refers_to_indirect_table() {
            return true;
        }
        if !descriptor.has_next() {
            return false;
        }
        index = descriptor.next();
    }
    false
}

/// Whether the driver acknowledged VIRTIO_RING_F_INDIRECT_DESC.
pub fn indirect_negotiated(acked_features: u64) -> bool {
    acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC) != 0
}

/// What a device receives when the driver sets DRIVER_OK: everything it needs to serve its queues.
pub struct ActivateContext {
    pub mem: GuestMemory,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], configured and validated by the driver.
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
    /// The features the driver acknowledged (a subset of [`VirtioDevice::features`]).
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up queue {0} with an invalid layout or size")]
    InvalidQueue(usize),
    #[error("the device was activated twice without a reset")]
    AlreadyActive,
    #[error("cannot register the device's event sources: {0}")]
    Events(String),
}

/// A virtio device as the virtio-mmio transport sees it. Implementors are also event-manager subscribers:
/// they watch [`VirtioDevice::queue_events`] and process their queues when the guest kicks them.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// Virtio device ID (2 for block, 19 for vsock).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;

    /// Eventfds that the builder registers as ioeventfds on the transport's QueueNotify register, one per
    /// queue, with the queue index as datamatch.
    fn queue_events(&self) -> &[EventFd];

    /// Reads from the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes to the device-specific configuration space; writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// What the device has counted so far, by name (bytes, requests, refused packets), for the
    /// result.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// The device's queues as they are now (indices and the last used entries written), named
    /// `name`, for the dump at a triple fault; none before activation.
    fn queue_dumps(&self, _name: &str) -> Vec<crate::fault_dump::QueueDump> {
        Vec::new()
    }

    /// Stops serving the queues, after the driver wrote 0 to Status. Returns false if the device cannot be
    /// reset, in which case the transport sets DEVICE_NEEDS_RESET and the device stays as it is.
    fn reset(&mut self) -> bool {
        false
    }
}
