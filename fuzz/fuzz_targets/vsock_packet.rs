//! virtio-vsock packet parsing: tx chains read as the device reads them (header, payload, the address
//! and type checks), and rx chains written as the device writes them, on descriptor chains that the
//! input lays out in guest memory however it likes (split headers, page fragments, indirect tables,
//! loops, buffers outside memory).
//!
//! Input: the bytes of guest memory from address 0. The queue has 16 entries: descriptors at 0x0,
//! available ring at 0x100, used ring at 0x128. Chains popped at even positions are read as tx
//! packets; at odd positions they are rx buffers, into which the last tx header read (with its payload)
//! is written back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::vsock::packet::{self, Header, HEADER_SIZE};
use vmm::devices::virtio::vsock::MAX_PKT_DATA;
use vmm_fuzz::ring::Ring;

const GUEST_CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let mem = vmm_fuzz::guest_memory(&[(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)]);
    let ring = Ring::new(&mem, 0, 16);
    mem.write_slice(&data[..data.len().min(0x1_0000)], GuestAddress(0))
        .unwrap();
    let mut queue = ring.queue(256);
    if !queue.is_valid(&mem) {
        return;
    }

    let mut payload = Vec::new();
    let mut last: Option<Header> = None;
    // A queue's available index can claim up to 65535 chains: a handful is enough.
    for position in 0..32 {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        if position % 2 == 0 {
            let Ok(mut reader) = chain.reader(&mem) else {
                continue;
            };
            let Ok(header) = packet::read_header(&mut reader) else {
                continue;
            };
            assert_eq!(Header::from_bytes(&header.to_bytes()), header);
            let valid = packet::validate_guest_header(&header, GUEST_CID).is_ok();
            if valid {
                assert_eq!(header.src_cid, GUEST_CID);
            }
            match packet::read_payload(&mut reader, &header, &mut payload) {
                Ok(()) => {
                    assert_eq!(payload.len(), header.len as usize);
                    assert!(payload.len() <= MAX_PKT_DATA as usize);
                }
                Err(_) => assert!(payload.is_empty()),
            }
            let reply = header.reset_reply(GUEST_CID);
            assert_eq!(reply.dst_cid, GUEST_CID);
            last = Some(header);
        } else {
            let Ok(mut writer) = chain.writer(&mem) else {
                continue;
            };
            let Some(capacity) = packet::payload_capacity(&writer) else {
                continue;
            };
            let Some(mut header) = last else {
                continue;
            };
            let n = payload.len().min(capacity);
            header.len = n as u32;
            if let Ok(used) = packet::write_packet(&mut writer, &header, &payload[..n]) {
                assert_eq!(used as usize, HEADER_SIZE + n);
            }
        }
    }
});
