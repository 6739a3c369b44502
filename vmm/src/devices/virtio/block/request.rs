//! Parsing and validating one virtio-blk request (virtio 1.2, section 5.2.6) from a guest descriptor
//! chain.
//!
//! Nothing here touches the backing file. A request is checked in full (layout, descriptor directions,
//! sector range, guest addresses) before the device does any I/O for it, so a malformed chain from a
//! buggy or hostile driver is refused as a whole instead of causing a partial read or write.
//!
//! The layout accepted is the one every virtio-blk driver uses: a device-readable header descriptor,
//! zero or more data descriptors, and a device-writable status descriptor last.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// virtio-blk addresses the disk in 512-byte sectors, whatever the block size it advertises.
pub const SECTOR_SIZE: u64 = 512;

/// Size of `struct virtio_blk_outhdr`: type (le32), reserved (le32), sector (le64).
pub const HEADER_SIZE: u32 = 16;

/// Most data descriptors one request may carry; advertised to the driver as `seg_max`. Header and
/// status take the other two slots of a 256-entry queue.
pub const MAX_DATA_SEGMENTS: u32 = 254;

/// Largest data descriptor a driver should send; advertised as `size_max`.
pub const MAX_SEGMENT_SIZE: u32 = 1 << 20;

/// Most data bytes one request may carry: what a driver that honours `seg_max` and `size_max` can send.
/// It bounds how long one request can hold up the event loop and keeps the used length within a u32.
pub const MAX_DATA_LEN: u32 = MAX_DATA_SEGMENTS * MAX_SEGMENT_SIZE;

/// Header + data + status.
const MAX_DESCRIPTORS: usize = MAX_DATA_SEGMENTS as usize + 2;

/// What the driver asks the device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN: read sectors into the data buffers.
    Read,
    /// VIRTIO_BLK_T_OUT: write the data buffers to sectors.
    Write,
    /// VIRTIO_BLK_T_FLUSH: make completed writes durable.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: write the device's serial number into the data buffers.
    GetId,
    /// Any other type; answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl RequestKind {
    fn from_type(request_type: u32) -> Self {
        match request_type {
            VIRTIO_BLK_T_IN => RequestKind::Read,
            VIRTIO_BLK_T_OUT => RequestKind::Write,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            other => RequestKind::Unsupported(other),
        }
    }

    /// Whether the device writes into the data buffers of this kind of request (else it reads them).
    fn device_writes_data(self) -> bool {
        matches!(self, RequestKind::Read | RequestKind::GetId)
    }
}

/// A guest buffer that lies entirely inside guest memory (checked when the request was parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request whose chain passed every check: the device can serve it without further validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Byte offset on the disk where a read or write starts; zero for the other kinds.
    pub offset: u64,
    /// The data buffers, in chain order. Empty for flush and unsupported requests.
    pub buffers: Vec<GuestBuffer>,
    /// Sum of the lengths of `buffers`, at most [`MAX_DATA_LEN`].
    pub data_len: u32,
    /// Where the device writes the one-byte status.
    pub status: GuestAddress,
}

/// Why a descriptor chain is not a valid virtio-blk request. These describe driver bugs or a hostile
/// guest; the device answers them with VIRTIO_BLK_S_IOERR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain is empty or its head index is out of range")]
    EmptyChain,
    #[error(
        "the descriptor chain has {0} descriptors; a request has at most {MAX_DESCRIPTORS} \
         (header, seg_max data descriptors, status)"
    )]
    TooManyDescriptors(usize),
    #[error("the request header descriptor is device-writable; it must be device-readable")]
    HeaderWriteOnly,
    #[error("the request header descriptor holds {0} bytes; the header is {HEADER_SIZE} bytes")]
    HeaderTooShort(u32),
    #[error("the request header at guest address {0:#x} is outside guest memory")]
    HeaderOutOfMemory(u64),
    #[error("the chain has no status descriptor after the header")]
    MissingStatus,
    #[error("the last descriptor of the chain (the status) is device-readable; it must be device-writable")]
    StatusReadOnly,
    #[error("the status descriptor has length 0; it needs room for the status byte")]
    StatusEmpty,
    #[error("the status byte at guest address {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
    #[error(
        "a data descriptor of a {kind:?} request is device-{found}; it must be device-{expected}"
    )]
    DataWrongDirection {
        kind: RequestKind,
        found: &'static str,
        expected: &'static str,
    },
    #[error("a flush request carries data descriptors; flush takes no data")]
    FlushWithData,
    #[error("the data buffer at guest address {addr:#x} ({len} bytes) is not inside guest memory")]
    DataOutOfMemory { addr: u64, len: u32 },
    #[error("the request carries more than {MAX_DATA_LEN} data bytes (seg_max x size_max)")]
    DataTooLong,
    #[error("the data length {0} is not a multiple of the {SECTOR_SIZE}-byte sector")]
    UnalignedLength(u32),
    #[error(
        "sector {sector} plus {len} bytes reaches past the end of the disk ({capacity} sectors)"
    )]
    OutOfRange {
        sector: u64,
        len: u32,
        capacity: u64,
    },
}

/// A chain that is not a valid request, and where to report that, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedRequest {
    pub error: RequestError,
    /// The chain's status byte, when its last descriptor is a usable one: the device writes
    /// VIRTIO_BLK_S_IOERR there. `None` means the chain can only be returned with used length 0.
    pub status: Option<GuestAddress>,
}

impl Request {
    /// Reads and validates the request in `chain`, whose buffers live in `mem`; `capacity` is the disk
    /// size in sectors. Reads guest memory (the header and descriptors) but never writes it.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &M::Target,
        capacity: u64,
    ) -> Result<Request, MalformedRequest>
    where
        M: Deref,
        M::Target: GuestMemoryBackend,
    {
        // Keep at most MAX_DESCRIPTORS, but walk to the end to find the status descriptor even in an
        // over-long chain. virtio-queue follows indirect tables and cuts the walk off after as many
        // steps as the table has entries, so a chain that loops still ends.
        let mut descriptors = Vec::new();
        let mut count = 0usize;
        let mut last = None;
        for descriptor in chain {
            count += 1;
            if descriptors.len() < MAX_DESCRIPTORS {
                descriptors.push(descriptor);
            }
            last = Some(descriptor);
        }

        let status = match last {
            Some(descriptor) if count >= 2 => status_byte(&descriptor, mem),
            _ => Err(RequestError::MissingStatus),
        };
        let malformed = |error| MalformedRequest {
            error,
            status: status.clone().ok(),
        };

        let Some(header) = descriptors.first() else {
            return Err(malformed(RequestError::EmptyChain));
        };
        if count > MAX_DESCRIPTORS {
            return Err(malformed(RequestError::TooManyDescriptors(count)));
        }
        let (request_type, sector) = read_header(header, mem).map_err(malformed)?;
        let status = status.clone().map_err(|error| MalformedRequest {
            error,
            status: None,
        })?;

        let kind = RequestKind::from_type(request_type);
        let data_descriptors = descriptors
            .get(1..descriptors.len() - 1)
            .unwrap_or_default();

        let mut request = Request {
            kind,
            offset: 0,
            buffers: Vec::new(),
            data_len: 0,
            status,
        };
        match kind {
            // The device never touches the data of a request it does not understand.
            RequestKind::Unsupported(_) => return Ok(request),
            RequestKind::Flush if !data_descriptors.is_empty() => {
                return Err(malformed(RequestError::FlushWithData));
            }
            _ => {}
        }

        request.buffers.reserve_exact(data_descriptors.len());
        for descriptor in data_descriptors {
            if descriptor.is_write_only() != kind.device_writes_data() {
                return Err(malformed(wrong_direction(kind)));
            }
            request.data_len = request
                .data_len
                .checked_add(descriptor.len())
                .filter(|&total| total <= MAX_DATA_LEN)
                .ok_or_else(|| malformed(RequestError::DataTooLong))?;
            let in_memory = usize::try_from(descriptor.len())
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, descriptor.addr(), len));
            if !in_memory {
                return Err(malformed(RequestError::DataOutOfMemory {
                    addr: descriptor.addr().0,
                    len: descriptor.len(),
                }));
            }
            request.buffers.push(GuestBuffer {
                addr: descriptor.addr(),
                len: descriptor.len(),
            });
        }

        if matches!(kind, RequestKind::Read | RequestKind::Write) {
            request.offset = disk_offset(sector, request.data_len, capacity).map_err(malformed)?;
        }
        Ok(request)
    }
}

/// The status byte of a chain whose last descriptor is `descriptor`.
fn status_byte<M: GuestMemoryBackend + ?Sized>(
    descriptor: &Descriptor,
    mem: &M,
) -> Result<GuestAddress, RequestError> {
    if !descriptor.is_write_only() {
        return Err(RequestError::StatusReadOnly);
    }
    if descriptor.len() == 0 {
        return Err(RequestError::StatusEmpty);
    }
    if !mem.check_range(descriptor.addr(), 1) {
        return Err(RequestError::StatusOutOfMemory(descriptor.addr().0));
    }
    // Drivers send a one-byte status descriptor; in a longer one the status goes to its first byte,
    // as other device implementations do.
    Ok(descriptor.addr())
}

/// `struct virtio_blk_outhdr` as it lies in guest memory (little-endian).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct OutHeader {
    request_type: u32,
    ioprio: u32,
    sector: u64,
}

// SAFETY: three plain integers without padding (4 + 4 + 8 bytes, 8-aligned): every bit pattern is a
// valid value, and the guest may write any.
unsafe impl vm_memory::ByteValued for OutHeader {}

const _: () = assert!(std::mem::size_of::<OutHeader>() as u64 == HEADER_SIZE as u64);

/// Reads `struct virtio_blk_outhdr`, returning the request type and the sector.
fn read_header<M: GuestMemoryBackend + ?Sized>(
    descriptor: &Descriptor,
    mem: &M,
) -> Result<(u32, u64), RequestError> {
    if descriptor.is_write_only() {
        return Err(RequestError::HeaderWriteOnly);
    }
    if descriptor.len() < HEADER_SIZE {
        return Err(RequestError::HeaderTooShort(descriptor.len()));
    }
    let header: OutHeader = mem
        .read_obj(descriptor.addr())
        .map_err(|_| RequestError::HeaderOutOfMemory(descriptor.addr().0))?;
    Ok((
        u32::from_le(header.request_type),
        u64::from_le(header.sector),
    ))
}

fn wrong_direction(kind: RequestKind) -> RequestError {
    let (found, expected) = if kind.device_writes_data() {
        ("readable", "writable")
    } else {
        ("writable", "readable")
    };
    RequestError::DataWrongDirection {
        kind,
        found,
        expected,
    }
}

/// The byte offset of `sector`, if `len` bytes from there are whole sectors within a disk of
/// `capacity` sectors. The sector comes from the guest: every step is checked for overflow.
fn disk_offset(sector: u64, len: u32, capacity: u64) -> Result<u64, RequestError> {
    if u64::from(len) % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength(len));
    }
    let out_of_range = RequestError::OutOfRange {
        sector,
        len,
        capacity,
    };
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| out_of_range.clone())?;
    let end = offset
        .checked_add(u64::from(len))
        .ok_or_else(|| out_of_range.clone())?;
    // capacity * SECTOR_SIZE is the file length, so it cannot overflow; saturate rather than trust it.
    if end > capacity.saturating_mul(SECTOR_SIZE) {
        return Err(out_of_range);
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Address, GuestMemoryMmap};

    const MEM_SIZE: u64 = 0x40_0000;
    const HEADER_ADDR: u64 = 0x10_0000;
    const STATUS_ADDR: u64 = 0x10_1000;
    const DATA_ADDR: u64 = 0x20_0000;
    const CAPACITY: u64 = 16;
    const R: u32 = 0;
    const W: u32 = VRING_DESC_F_WRITE;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn write_header(mem: &GuestMemoryMmap<()>, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER_ADDR)).unwrap();
    }

    /// Puts one chain of `(addr, len, flags)` descriptors on a fresh queue and parses it.
    fn parse(
        mem: &GuestMemoryMmap<()>,
        descriptors: &[(u64, u32, u32)],
    ) -> Result<Request, MalformedRequest> {
        let mock = MockSplitQueue::new(mem, 256);
        let raw: Vec<RawDescriptor> = descriptors
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descriptors.len() {
                    VRING_DESC_F_NEXT
                } else {
                    0
                };
                RawDescriptor::from(Descriptor::new(
                    addr,
                    len,
                    (flags | next) as u16,
                    i as u16 + 1,
                ))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(mem).unwrap();
        Request::parse(chain, mem, CAPACITY)
    }

    fn error(result: Result<Request, MalformedRequest>) -> MalformedRequest {
        result.expect_err("the chain should have been refused")
    }

    #[test]
    fn read_request_is_parsed() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 3);
        let request = parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 512, W),
                (DATA_ADDR + 0x1000, 1024, W),
                (STATUS_ADDR, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(request.kind, RequestKind::Read);
        assert_eq!(request.offset, 3 * 512);
        assert_eq!(request.data_len, 1536);
        assert_eq!(request.buffers.len(), 2);
        assert_eq!(request.buffers[1].addr, GuestAddress(DATA_ADDR + 0x1000));
        assert_eq!(request.status, GuestAddress(STATUS_ADDR));
    }

    #[test]
    fn request_ending_exactly_at_capacity_is_accepted() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, CAPACITY - 2);
        let request = parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 1024, R),
                (STATUS_ADDR, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(request.kind, RequestKind::Write);
    }

    #[test]
    fn unsupported_type_skips_data_validation() {
        let mem = memory();
        write_header(&mem, 0x1234, u64::MAX);
        // data descriptor outside memory and of either direction: never touched, so not checked
        let request = parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (u64::MAX - 10, 7, R),
                (STATUS_ADDR, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(request.kind, RequestKind::Unsupported(0x1234));
        assert!(request.buffers.is_empty());
    }

    #[test]
    fn header_errors_keep_a_usable_status() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let short = error(parse(&mem, &[(HEADER_ADDR, 15, R), (STATUS_ADDR, 1, W)]));
        assert_eq!(short.error, RequestError::HeaderTooShort(15));
        assert_eq!(short.status, Some(GuestAddress(STATUS_ADDR)));

        let writable = error(parse(&mem, &[(HEADER_ADDR, 16, W), (STATUS_ADDR, 1, W)]));
        assert_eq!(writable.error, RequestError::HeaderWriteOnly);
        assert_eq!(writable.status, Some(GuestAddress(STATUS_ADDR)));

        let outside = error(parse(&mem, &[(MEM_SIZE - 8, 16, R), (STATUS_ADDR, 1, W)]));
        assert_eq!(outside.error, RequestError::HeaderOutOfMemory(MEM_SIZE - 8));
        assert_eq!(outside.status, Some(GuestAddress(STATUS_ADDR)));
    }

    #[test]
    fn status_errors_leave_nowhere_to_report() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let alone = error(parse(&mem, &[(HEADER_ADDR, 16, R)]));
        assert_eq!(alone.error, RequestError::MissingStatus);
        assert_eq!(alone.status, None);

        let read_only = error(parse(&mem, &[(HEADER_ADDR, 16, R), (STATUS_ADDR, 1, R)]));
        assert_eq!(read_only.error, RequestError::StatusReadOnly);
        assert_eq!(read_only.status, None);

        let empty = error(parse(&mem, &[(HEADER_ADDR, 16, R), (STATUS_ADDR, 0, W)]));
        assert_eq!(empty.error, RequestError::StatusEmpty);

        let outside = error(parse(&mem, &[(HEADER_ADDR, 16, R), (MEM_SIZE, 1, W)]));
        assert_eq!(outside.error, RequestError::StatusOutOfMemory(MEM_SIZE));
        assert_eq!(outside.status, None);
    }

    #[test]
    fn data_direction_is_checked() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let read_into_readable = error(parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 512, R),
                (STATUS_ADDR, 1, W),
            ],
        ));
        assert!(matches!(
            read_into_readable.error,
            RequestError::DataWrongDirection { .. }
        ));
        assert_eq!(read_into_readable.status, Some(GuestAddress(STATUS_ADDR)));

        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let write_from_writable = error(parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 512, W),
                (STATUS_ADDR, 1, W),
            ],
        ));
        assert!(matches!(
            write_from_writable.error,
            RequestError::DataWrongDirection { .. }
        ));

        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let id_into_readable = error(parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 20, R),
                (STATUS_ADDR, 1, W),
            ],
        ));
        assert!(matches!(
            id_into_readable.error,
            RequestError::DataWrongDirection { .. }
        ));
    }

    #[test]
    fn flush_with_data_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let refused = error(parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 512, R),
                (STATUS_ADDR, 1, W),
            ],
        ));
        assert_eq!(refused.error, RequestError::FlushWithData);
    }

    #[test]
    fn sector_range_is_checked_without_overflow() {
        let mem = memory();
        let chain = [
            (HEADER_ADDR, 16, R),
            (DATA_ADDR, 512, W),
            (STATUS_ADDR, 1, W),
        ];
        for sector in [CAPACITY, CAPACITY - 1 + 1, u64::MAX / 512 + 1, u64::MAX] {
            write_header(&mem, VIRTIO_BLK_T_IN, sector);
            let refused = error(parse(&mem, &chain));
            assert!(
                matches!(refused.error, RequestError::OutOfRange { .. }),
                "sector {sector}: {:?}",
                refused.error
            );
            assert_eq!(refused.status, Some(GuestAddress(STATUS_ADDR)));
        }
        // offset fits, offset + len overflows
        assert!(matches!(
            disk_offset(u64::MAX / 512, 1024, u64::MAX),
            Err(RequestError::OutOfRange { .. })
        ));
        // the last sector is fine, one past it is not
        write_header(&mem, VIRTIO_BLK_T_IN, CAPACITY - 1);
        assert!(parse(&mem, &chain).is_ok());
    }

    #[test]
    fn unaligned_length_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let refused = error(parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 511, W),
                (STATUS_ADDR, 1, W),
            ],
        ));
        assert_eq!(refused.error, RequestError::UnalignedLength(511));
    }

    #[test]
    fn data_outside_memory_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        for (addr, len) in [
            (0xffff_0000_0000, 512),
            (MEM_SIZE - 512, 1024),
            (u64::MAX - 511, 512),
        ] {
            let refused = error(parse(
                &mem,
                &[(HEADER_ADDR, 16, R), (addr, len, W), (STATUS_ADDR, 1, W)],
            ));
            assert_eq!(refused.error, RequestError::DataOutOfMemory { addr, len });
            assert_eq!(refused.status, Some(GuestAddress(STATUS_ADDR)));
        }
    }

    #[test]
    fn total_data_length_is_bounded() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let refused = error(parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, 512, W),
                (DATA_ADDR, MAX_DATA_LEN, W),
                (STATUS_ADDR, 1, W),
            ],
        ));
        assert_eq!(refused.error, RequestError::DataTooLong);
        // Lengths summing past 2^32: virtio-queue ends the walk at the header (a chain may not be
        // longer than 2^32 bytes), so the request has no status and is refused as such.
        let refused = error(parse(
            &mem,
            &[
                (HEADER_ADDR, 16, R),
                (DATA_ADDR, u32::MAX, W),
                (DATA_ADDR, u32::MAX, W),
                (STATUS_ADDR, 1, W),
            ],
        ));
        assert_eq!(refused.error, RequestError::MissingStatus);
    }

    #[test]
    fn looping_chain_ends() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let mock = MockSplitQueue::new(&mem, 16);
        // descriptor 0 -> 1 -> 0 -> ...
        let raw = [
            RawDescriptor::from(Descriptor::new(
                HEADER_ADDR,
                16,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(Descriptor::new(
                STATUS_ADDR,
                1,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                0,
            )),
        ];
        mock.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        // the walk stops after queue-size descriptors; the result is some error, not a hang
        assert!(Request::parse(chain, &mem, CAPACITY).is_err());
    }

    #[test]
    fn over_long_indirect_chain_is_refused_with_status() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let table = GuestAddress(0x30_0000);
        let entries = MAX_DESCRIPTORS as u16 + 1;
        for i in 0..entries {
            let (addr, len) = match i {
                0 => (HEADER_ADDR, 16),
                i if i == entries - 1 => (STATUS_ADDR, 1),
                _ => (DATA_ADDR, 512),
            };
            let flags = if i == 0 { 0 } else { VRING_DESC_F_WRITE }
                | if i + 1 < entries {
                    VRING_DESC_F_NEXT
                } else {
                    0
                };
            let descriptor = RawDescriptor::from(Descriptor::new(addr, len, flags as u16, i + 1));
            mem.write_obj(descriptor, table.unchecked_add(u64::from(i) * 16))
                .unwrap();
        }
        let mock = MockSplitQueue::new(&mem, 16);
        let head = RawDescriptor::from(Descriptor::new(
            table.0,
            u32::from(entries) * 16,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        mock.add_desc_chains(&[head], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        let refused = Request::parse(chain, &mem, CAPACITY).unwrap_err();
        assert_eq!(
            refused.error,
            RequestError::TooManyDescriptors(MAX_DESCRIPTORS + 1)
        );
        assert_eq!(refused.status, Some(GuestAddress(STATUS_ADDR)));
    }
}
