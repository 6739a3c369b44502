//! The guest driver's side of a split virtqueue (virtio 1.2, 2.7): a descriptor table, an available
//! ring and a used ring in guest memory, written and read the way a driver does.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// One split queue of `size` entries at fixed guest addresses.
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    /// The driver's copy of avail.idx.
    avail_idx: u16,
    /// How far the driver has read the used ring.
    pub used_seen: u16,
}

/// Bytes a ring of `size` entries takes: (descriptor table, available ring, used ring).
pub fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

impl Ring {
    /// A ring whose parts start at `base` (descriptor table, then the available ring, then the used
    /// ring, each aligned as the spec requires); zeroes the rings' headers.
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Ring {
        let (desc_len, avail_len, _) = ring_sizes(size);
        let avail = base + desc_len;
        let used = (avail + avail_len + 3) & !3;
        let ring = Ring {
            desc: base,
            avail,
            used,
            size,
            avail_idx: 0,
            used_seen: 0,
        };
        ring.clear(mem);
        ring
    }

    /// Where the ring ends (first byte after the used ring).
    pub fn end(&self) -> u64 {
        self.used + ring_sizes(self.size).2
    }

    /// Zeroes the flags and indexes of both rings, as after a device reset.
    pub fn clear(&self, mem: &GuestMemory) {
        mem.write_obj(0u32, GuestAddress(self.avail))
            .expect("ring in memory");
        mem.write_obj(0u32, GuestAddress(self.used))
            .expect("ring in memory");
    }

    /// The device's view of the ring, configured as a driver does through the transport.
    pub fn queue(&self, max_size: u16) -> Queue {
        let mut q = Queue::new(max_size).expect("valid maximum size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` (taken modulo the ring size).
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(index % self.size);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at))
            .expect("ring in memory");
    }

    /// Makes the chain whose head is `head` available and publishes the new avail.idx.
    pub fn push_avail(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot))
            .expect("ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("ring in memory");
    }

    /// Sets avail.idx to anything (a driver that lies).
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail + 2))
            .expect("ring in memory");
    }

    /// The device's used.idx.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2))
            .expect("ring in memory")
    }

    /// The used ring's entries the driver has not seen yet: (descriptor id, length).
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("ring in memory");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("ring in memory");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
