//! A test driver's view of a split ring in guest memory, shared by the device tests that play the
//! guest driver (vsock, net): queues whose used ring is moved clear of the avail ring, reading used
//! entries by hand, and posting chains whose descriptors use their own buffer slots.
//!
//! MockSplitQueue::create puts the used ring `len` bytes after the start of the avail ring entries,
//! which are 2 bytes each: with more than len/2 entries posted the two overlap. The used ring is
//! therefore placed `used_offset` bytes after the queue's base.
#![allow(clippy::cast_possible_truncation)] // test data is small

use std::collections::HashMap;

use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;

/// Where a ring lives in guest memory and how big it is.
#[derive(Clone, Copy)]
pub struct Ring {
    /// the queue's base address (descriptor table, avail ring)
    pub base: u64,
    /// the used ring, this far after `base`
    pub used_offset: u64,
    pub size: u16,
}

impl Ring {
    /// The queue the device is given, its used ring at `base + used_offset`.
    pub fn queue(&self, mock: &MockSplitQueue<GuestMemory>) -> Queue {
        let mut q: Queue = mock.create_queue().unwrap();
        let used = self.base + self.used_offset;
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q
    }

    /// Entry `i` of the used ring: (descriptor id, length).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.base + self.used_offset + 4 + 8 * u64::from(i % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.base + self.used_offset + 2))
            .unwrap()
    }

    /// Posts a chain of (addr, len, flags) descriptors, taken from `free` and recorded in `chains`
    /// under its head; an addr of u64::MAX means the descriptor's own slot, `slots + slot *
    /// index`. Returns the buffers' addresses, or None if `free` has too few descriptors.
    pub fn push_chain(
        &self,
        q: &MockSplitQueue<GuestMemory>,
        free: &mut Vec<u16>,
        chains: &mut HashMap<u16, Vec<u16>>,
        (slots, slot): (u64, u64),
        descs: &[(u64, u32, u16)],
    ) -> Option<Vec<u64>> {
        if free.len() < descs.len() {
            return None;
        }
        let idx: Vec<u16> = (0..descs.len()).map(|_| free.pop().unwrap()).collect();
        let mut addrs = Vec::new();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let addr = if addr == u64::MAX {
                slots + slot * u64::from(idx[i])
            } else {
                addr
            };
            addrs.push(addr);
            let (flags, next) = match idx.get(i + 1) {
                Some(&n) => (flags | VRING_DESC_F_NEXT as u16, n),
                None => (flags, 0),
            };
            q.desc_table()
                .store(
                    idx[i],
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        let avail = q.avail().idx().load();
        q.avail()
            .ring()
            .ref_at(usize::from(avail % self.size))
            .unwrap()
            .store(idx[0]);
        q.avail().idx().store(avail.wrapping_add(1));
        chains.insert(idx[0], idx);
        Some(addrs)
    }
}
