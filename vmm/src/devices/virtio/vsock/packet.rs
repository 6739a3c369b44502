//! The vsock wire format: a 44-byte little-endian header (virtio 1.2, 5.10.6) and, for RW packets, the
//! payload that follows it.
//!
//! Packets are read and written through virtio-queue's [`Reader`] and [`Writer`], which see a descriptor
//! chain as one byte stream. The spec lets the driver lay a message out over descriptors as it likes
//! (2.7.4, "Message Framing"), and Linux does use several layouts: header and data in separate
//! descriptors (up to 6.1), both in one (rx since 6.2), data spread over page fragments (zero-copy tx).
//! `virtio_vsock::packet::VsockPacket` accepts only the first two, so it is not used to parse; the
//! header layout is the same and is checked against it below.
//!
//! This module checks structure (is there a whole header, is the payload as long as the header says and
//! within bounds) and, in [`validate_guest_header`], addresses and type. It knows nothing of
//! connections.

use std::io::{Read, Write};

use virtio_queue::{Reader, Writer};
use vm_memory::ByteValued;

use super::{HOST_CID, MAX_PKT_DATA, TYPE_STREAM};

/// Size of the packet header on the wire.
pub const HEADER_SIZE: usize = 44;

// Our header layout must be the one the virtio-vsock crate (and the spec) uses.
const _: () = assert!(HEADER_SIZE == virtio_vsock::packet::PKT_HEADER_SIZE);

/// Why a packet from the guest could not be used, or one for the guest could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("the descriptor chain holds {0} bytes, less than a {HEADER_SIZE}-byte header")]
    HeaderTooShort(usize),
    #[error("the header announces {0} bytes of payload, more than the {MAX_PKT_DATA} allowed")]
    PayloadTooLong(u32),
    #[error(
        "the header announces {announced} bytes of payload but the chain holds only {available}"
    )]
    PayloadTruncated { announced: u32, available: usize },
    #[error("cannot copy the packet to or from guest memory: {0}")]
    GuestMemory(#[source] std::io::Error),
    #[error("the rx buffer holds {available} bytes, the packet needs {needed}")]
    RxBufferTooSmall { needed: usize, available: usize },
    #[error("source CID {0} is not the guest's CID")]
    WrongSourceCid(u64),
    #[error("destination CID {0} is not the host (CID 2)")]
    UnknownDestinationCid(u64),
    #[error("socket type {0} is not a stream")]
    UnsupportedType(u16),
}

/// A packet header, fields in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer for this connection (credit it grants).
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever, wrapping.
    pub fwd_cnt: u32,
}

/// The header as it lies on the wire: little-endian fields, packed to its 44 bytes.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct WireHeader {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

// SAFETY: plain integers, packed (no padding): every bit pattern is a valid value, and the guest may
// write any.
unsafe impl ByteValued for WireHeader {}

const _: () = assert!(std::mem::size_of::<WireHeader>() == HEADER_SIZE);

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let mut w = WireHeader::default();
        w.as_mut_slice().copy_from_slice(b);
        // (fields of a packed struct are read by value)
        Header {
            src_cid: u64::from_le(w.src_cid),
            dst_cid: u64::from_le(w.dst_cid),
            src_port: u32::from_le(w.src_port),
            dst_port: u32::from_le(w.dst_port),
            len: u32::from_le(w.len),
            type_: u16::from_le(w.type_),
            op: u16::from_le(w.op),
            flags: u32::from_le(w.flags),
            buf_alloc: u32::from_le(w.buf_alloc),
            fwd_cnt: u32::from_le(w.fwd_cnt),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let w = WireHeader {
            src_cid: self.src_cid.to_le(),
            dst_cid: self.dst_cid.to_le(),
            src_port: self.src_port.to_le(),
            dst_port: self.dst_port.to_le(),
            len: self.len.to_le(),
            type_: self.type_.to_le(),
            op: self.op.to_le(),
            flags: self.flags.to_le(),
            buf_alloc: self.buf_alloc.to_le(),
            fwd_cnt: self.fwd_cnt.to_le(),
        };
        let mut b = [0u8; HEADER_SIZE];
        b.copy_from_slice(w.as_slice());
        b
    }

    /// A reset answering `self` (a packet from the guest): addresses swapped, sent back to the guest.
    /// The destination is always `guest_cid`, whatever the offending packet claimed as its source: the
    /// guest is the only peer there is.
    pub fn reset_reply(&self, guest_cid: u64) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: guest_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: super::op::RST,
            ..Header::default()
        }
    }
}

/// Reads the header at the start of a tx chain. An error here means the device cannot even tell who
/// sent the packet, so it can only drop it.
pub fn read_header(reader: &mut Reader<'_>) -> Result<Header, PacketError> {
    let available = reader.available_bytes();
    if available < HEADER_SIZE {
        return Err(PacketError::HeaderTooShort(available));
    }
    let mut bytes = [0u8; HEADER_SIZE];
    reader
        .read_exact(&mut bytes)
        .map_err(PacketError::GuestMemory)?;
    Ok(Header::from_bytes(&bytes))
}

/// Reads the `header.len` bytes of payload that follow the header into `data` (replacing its contents).
/// The length is checked against [`MAX_PKT_DATA`] before anything is allocated, so `data` never grows
/// past that whatever the guest claims.
pub fn read_payload(
    reader: &mut Reader<'_>,
    header: &Header,
    data: &mut Vec<u8>,
) -> Result<(), PacketError> {
    data.clear();
    if header.len > MAX_PKT_DATA {
        return Err(PacketError::PayloadTooLong(header.len));
    }
    let len = header.len as usize;
    let available = reader.available_bytes();
    if available < len {
        return Err(PacketError::PayloadTruncated {
            announced: header.len,
            available,
        });
    }
    data.resize(len, 0);
    reader.read_exact(data).map_err(|e| {
        data.clear();
        PacketError::GuestMemory(e)
    })
}

/// Checks what the device cannot accept whatever the connection state: a packet must come from the
/// guest's own CID, go to the host, and be a stream packet.
pub fn validate_guest_header(header: &Header, guest_cid: u64) -> Result<(), PacketError> {
    if header.src_cid != guest_cid {
        return Err(PacketError::WrongSourceCid(header.src_cid));
    }
    if header.dst_cid != HOST_CID {
        return Err(PacketError::UnknownDestinationCid(header.dst_cid));
    }
    if header.type_ != TYPE_STREAM {
        return Err(PacketError::UnsupportedType(header.type_));
    }
    Ok(())
}

/// Payload bytes an rx chain can take after the header, or `None` if it cannot even hold a header.
pub fn payload_capacity(writer: &Writer<'_>) -> Option<usize> {
    writer.available_bytes().checked_sub(HEADER_SIZE)
}

/// Writes a packet into an rx chain and returns the number of bytes written (the used length).
/// `header.len` must already be `payload.len()`.
pub fn write_packet(
    writer: &mut Writer<'_>,
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let needed = HEADER_SIZE + payload.len();
    let available = writer.available_bytes();
    if available < needed {
        return Err(PacketError::RxBufferTooSmall { needed, available });
    }
    writer
        .write_all(&header.to_bytes())
        .map_err(PacketError::GuestMemory)?;
    writer
        .write_all(payload)
        .map_err(PacketError::GuestMemory)?;
    // `needed` is at most HEADER_SIZE + the chain's length, which the queue bounds far below u32::MAX
    // (at most 256 descriptors of u32 length each would overflow, so saturate rather than wrap).
    Ok(u32::try_from(needed).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use crate::devices::virtio::GuestMemory;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: super::super::op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips_and_is_little_endian() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn payload_split_over_several_descriptors_is_reassembled() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut h = sample();
        h.len = 10;
        // header in one descriptor, payload in three fragments
        m.write_slice(&h.to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        m.write_slice(&[1, 2, 3], GuestAddress(0x2_0000)).unwrap();
        m.write_slice(&[4, 5, 6, 7], GuestAddress(0x3_0000))
            .unwrap();
        m.write_slice(&[8, 9, 10, 11], GuestAddress(0x4_0000))
            .unwrap();
        let chain = vq
            .build_desc_chain(&[
                desc(0x1_0000, 44, false),
                desc(0x2_0000, 3, false),
                desc(0x3_0000, 4, false),
                desc(0x4_0000, 4, false),
            ])
            .unwrap();
        let mut reader = chain.reader(&m).unwrap();
        let got = read_header(&mut reader).unwrap();
        assert_eq!(got, h);
        let mut data = Vec::new();
        read_payload(&mut reader, &got, &mut data).unwrap();
        assert_eq!(data, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn header_and_payload_in_one_descriptor() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let h = sample();
        m.write_slice(&h.to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        m.write_slice(b"hello", GuestAddress(0x1_0000 + 44))
            .unwrap();
        let chain = vq.build_desc_chain(&[desc(0x1_0000, 49, false)]).unwrap();
        let mut reader = chain.reader(&m).unwrap();
        let got = read_header(&mut reader).unwrap();
        let mut data = Vec::new();
        read_payload(&mut reader, &got, &mut data).unwrap();
        assert_eq!(data, b"hello");
    }

    #[test]
    fn short_header_truncated_and_oversized_payloads_are_errors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq.build_desc_chain(&[desc(0x1_0000, 43, false)]).unwrap();
        let mut reader = chain.reader(&m).unwrap();
        assert!(matches!(
            read_header(&mut reader),
            Err(PacketError::HeaderTooShort(43))
        ));

        let mut h = sample();
        h.len = 100;
        m.write_slice(&h.to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let chain = vq
            .build_desc_chain(&[desc(0x1_0000, 44, false), desc(0x2_0000, 50, false)])
            .unwrap();
        let mut reader = chain.reader(&m).unwrap();
        let got = read_header(&mut reader).unwrap();
        let mut data = vec![9u8; 3];
        assert!(matches!(
            read_payload(&mut reader, &got, &mut data),
            Err(PacketError::PayloadTruncated {
                announced: 100,
                available: 50
            })
        ));
        assert!(data.is_empty());

        h.len = u32::MAX;
        m.write_slice(&h.to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let chain = vq
            .build_desc_chain(&[desc(0x1_0000, 44, false), desc(0x2_0000, 50, false)])
            .unwrap();
        let mut reader = chain.reader(&m).unwrap();
        let got = read_header(&mut reader).unwrap();
        assert!(matches!(
            read_payload(&mut reader, &got, &mut data),
            Err(PacketError::PayloadTooLong(u32::MAX))
        ));
    }

    #[test]
    fn chain_outside_guest_memory_is_rejected_by_the_reader() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[desc(0xffff_0000, 44, false)])
            .unwrap();
        assert!(chain.reader(&m).is_err());
    }

    #[test]
    fn validation_checks_cids_and_type() {
        let h = sample();
        assert!(validate_guest_header(&h, 3).is_ok());
        assert!(matches!(
            validate_guest_header(&h, 4),
            Err(PacketError::WrongSourceCid(3))
        ));
        let mut bad = h;
        bad.dst_cid = 7;
        assert!(matches!(
            validate_guest_header(&bad, 3),
            Err(PacketError::UnknownDestinationCid(7))
        ));
        let mut bad = h;
        bad.type_ = 2;
        assert!(matches!(
            validate_guest_header(&bad, 3),
            Err(PacketError::UnsupportedType(2))
        ));
    }

    #[test]
    fn write_packet_fills_header_then_payload_across_descriptors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[desc(0x1_0000, 44, true), desc(0x2_0000, 8, true)])
            .unwrap();
        let mut writer = chain.writer(&m).unwrap();
        assert_eq!(payload_capacity(&writer), Some(8));
        let h = sample();
        assert_eq!(write_packet(&mut writer, &h, b"hello").unwrap(), 49);
        let mut hb = [0u8; HEADER_SIZE];
        m.read_slice(&mut hb, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(Header::from_bytes(&hb), h);
        let mut data = [0u8; 5];
        m.read_slice(&mut data, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(&data, b"hello");

        let chain = vq.build_desc_chain(&[desc(0x1_0000, 40, true)]).unwrap();
        let mut writer = chain.writer(&m).unwrap();
        assert_eq!(payload_capacity(&writer), None);
        assert!(matches!(
            write_packet(&mut writer, &h, &[]),
            Err(PacketError::RxBufferTooSmall {
                needed: 44,
                available: 40
            })
        ));
    }

    #[test]
    fn reset_reply_swaps_ports_and_targets_the_guest() {
        let mut h = sample();
        h.src_cid = 99;
        let r = h.reset_reply(3);
        assert_eq!(r.src_cid, 2);
        assert_eq!(r.dst_cid, 3);
        assert_eq!(r.src_port, 1024);
        assert_eq!(r.dst_port, 0x1234_5678);
        assert_eq!(r.op, super::super::op::RST);
        assert_eq!(r.len, 0);
    }
}
