//! virtio-vsock (virtio 1.2, section 5.10), terminated inside the VMM.
//!
//! There is no vhost-vsock on the host: every stream the guest opens to the host (CID 2) ends here. When
//! the guest connects to a port the VMM listens on, the device creates a `UnixStream` pair, keeps one end
//! (non-blocking, watched by the event loop) and hands the other to the VMM's control logic, which then
//! reads and writes plain bytes on it.
//!
//! The code is split the way Firecracker splits its vsock device, so that each part can be tested alone:
//!
//! - [`packet`]: the wire format. Reads a packet out of a tx descriptor chain and writes one into an rx
//!   chain, and checks a guest header against the device's addresses. Knows nothing about connections.
//! - [`connection`]: one stream's state machine: handshake, credit-based flow control both ways,
//!   half-closes and resets, and the host-side socket.
//! - [`muxer`]: which connection a packet belongs to; accepting new connections; the order in which
//!   connections get rx buffers; keeping the event loop's view of the host sockets in step.
//! - [`device`]: the virtio plumbing: queues, eventfds, interrupts, the event-manager subscriber.
//!
//! The guest is not trusted. Whatever it puts in the queues ends in a reset or a dropped packet, never in
//! a panic, a busy loop or memory that grows with what the guest sends: every buffer the device holds is
//! bounded (per connection by the credit the device advertises, and the number of connections and queued
//! control packets by constants below).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

pub use device::Vsock;

/// Virtio device ID of a socket device.
pub use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

/// The host's well-known context ID: the only destination the guest can reach.
pub const HOST_CID: u64 = 2;

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Socket type of a stream connection, the only type this device supports (no VIRTIO_VSOCK_F_SEQPACKET).
pub const TYPE_STREAM: u16 = 1;

/// Flags of a SHUTDOWN packet: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Flags of a SHUTDOWN packet: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags: the sender is done with the connection.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Queue indices, in the order the spec defines them.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// Receive buffer the device advertises per connection: the most guest data it holds for a host socket
/// that is not reading. A guest that sends more than this unconsumed gets a reset.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Largest payload the device accepts in one tx packet. Linux never sends more than 64 KiB per packet
/// (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); anything larger is malformed.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Connections open at once. Each holds up to [`BUF_ALLOC`] of guest data and two file descriptors; the
/// bound keeps a guest that opens connections in a loop from exhausting the VMM's memory or fds.
pub const MAX_CONNECTIONS: usize = 64;

/// Replies (resets) queued for packets that match no connection while the guest supplies no rx buffers.
/// Past this they are dropped: only a misbehaving guest produces them faster than it reads them.
pub const MAX_PENDING_CONTROL: usize = 256;

/// Errors of the vsock device that are not about a single packet (those are [`packet::PacketError`], and
/// end in a reset or a dropped packet rather than an error anyone sees).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest CID {0} is reserved: guest CIDs start at 3")]
    InvalidGuestCid(u64),
    #[error("cannot create a queue eventfd: {0}")]
    QueueEventFd(#[source] std::io::Error),
    #[error("cannot register the eventfd of queue {queue} with the event loop: {source}")]
    RegisterQueueEvent {
        queue: usize,
        source: event_manager::Error,
    },
}
