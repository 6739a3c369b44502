//! virtio-net (virtio 1.2, section 5.1) whose other end is passt, over a connected Unix stream.
//!
//! The device offers VIRTIO_NET_F_MAC and nothing else: no checksum or segmentation offloads, no
//! mergeable rx buffers, no control queue. Each buffer starts with a `virtio_net_hdr_v1` (12 bytes with
//! VERSION_1); the device ignores the one the guest writes (no offload was negotiated, so it asks for
//! nothing) and writes a zeroed one with `num_buffers = 1` before each frame it delivers.
//!
//! On the socket, frames use qemu's "stream" framing, which `passt --fd` speaks: a 4-byte big-endian
//! length, then the Ethernet frame.
//!
//! - **tx** (guest -> passt): each chain is copied out (header, then the frame), handed back to the
//!   guest, and judged by the egress policy (`crate::net::policy`). An allowed frame is written to the
//!   socket without blocking; if the socket cannot take all of it, the rest is kept and the device
//!   takes no more tx chains until the socket is writable again, so the guest's queue fills and its
//!   driver stops sending: backpressure, never a silent drop and never a blocked event loop.
//! - **rx** (passt -> guest): the socket is read into a bounded buffer, one frame at a time is cut out
//!   of it, shown to the policy (which learns allowed host names' addresses from DNS answers) and
//!   written into the next rx buffer. While a frame waits for an rx buffer the device stops reading the
//!   socket, so passt's frames queue in the kernel, not in vmm. A length over [`MAX_FRAME_LEN`] is a
//!   protocol error that ends the connection; a frame too big for the guest's buffers is dropped and
//!   counted.
//!
//! The guest is not trusted: chains that refer to indirect tables are refused, chains of the wrong
//! direction or size are handed back unused, and each pass handles at most `CHAINS_PER_PASS` chains
//! per queue before letting the event loop go round.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vsock::muxer::FdRegistry;
use super::{
    indirect_negotiated, pop_chain, ActivateContext, ActivateError, GuestMemory, Interrupt,
    VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::net::{DropReason, Policy};

/// Queue indices (virtio 1.2, 5.1.2: receiveq1, transmitq1).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Event tokens: the queues' eventfds (their indices) and the socket to passt.
const RX_TOKEN: u32 = 0;
const TX_TOKEN: u32 = 1;
const SOCKET_TOKEN: u32 = 2;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

/// Chains handled per queue in one pass; past it the device re-kicks its own queue eventfd, so that a
/// guest refilling the queue as fast as the device empties it cannot hold the event loop.
const CHAINS_PER_PASS: usize = QUEUE_SIZE as usize;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame either way: an IP packet of 64 KiB and its Ethernet header. A length over this on
/// the socket ends the connection; a tx chain over it is dropped.
pub const MAX_FRAME_LEN: usize = 65535 + crate::net::policy::ETH_HEADER_LEN;
/// The 4-byte length in front of each frame on the socket.
const LEN_PREFIX: usize = 4;
/// Smallest frame delivered: an Ethernet header.
const MIN_FRAME_LEN: usize = crate::net::policy::ETH_HEADER_LEN;
/// Resets waiting for rx buffers, at most: a guest that sends refused SYNs faster than it reads gets
/// the rest dropped, which it then retries.
const MAX_REPLIES: usize = 64;
/// The rx read buffer: room for two largest frames, so one read usually brings whole frames.
const RX_BUF_LEN: usize = 2 * (LEN_PREFIX + MAX_FRAME_LEN);

/// Why the connection to passt ended. After it the guest's frames are consumed and counted, and
/// nothing more arrives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendEnd {
    #[error("passt closed the connection")]
    Closed,
    #[error("passt sent a frame of {0} bytes, more than the {MAX_FRAME_LEN} allowed")]
    FrameTooLong(usize),
    #[error("the connection to passt failed: {0}")]
    Io(String),
}

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create a queue eventfd of the network device: {0}")]
    EventFd(#[source] io::Error),
    #[error("cannot make the socket to passt non-blocking: {0}")]
    NonBlocking(#[source] io::Error),
}

/// What the device has moved and refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames (and their bytes, without headers) sent to passt.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames (and bytes) delivered to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Tx chains that were not a header and a frame of a sane size, or not readable.
    pub tx_malformed: u64,
    /// Tx frames consumed after the connection to passt ended.
    pub tx_no_backend: u64,
    /// Refused TCP segments answered with a reset.
    pub tx_refused: u64,
    /// Frames from passt that fit no rx buffer of the guest's, or were shorter than an Ethernet header.
    pub rx_dropped: u64,
}

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated (never: not offered).
    indirect: bool,
}

/// Frames coming from passt: bytes read off the socket, cut into frames.
struct RxFramer {
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl RxFramer {
    fn new() -> Self {
        RxFramer {
            buf: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next whole frame's range in `buf`, None if more bytes are needed, or the protocol error.
    fn next_frame(&self) -> Result<Option<(usize, usize)>, BackendEnd> {
        let pending = self.buf.get(self.start..self.end).unwrap_or(&[]);
        let Some(prefix) = pending.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; LEN_PREFIX];
        len_bytes.copy_from_slice(prefix);
        let len = usize::try_from(u32::from_be_bytes(len_bytes)).unwrap_or(usize::MAX);
        if len > MAX_FRAME_LEN {
            return Err(BackendEnd::FrameTooLong(len));
        }
        let frame_start = self.start + LEN_PREFIX;
        if self.end - frame_start < len {
            return Ok(None);
        }
        Ok(Some((frame_start, frame_start + len)))
    }

    fn consume_to(&mut self, end: usize) {
        self.start = end.min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what the socket has, into the room left (moving a partial frame to the front first).
    /// Ok(0) is the end of the stream.
    fn fill(&mut self, stream: &mut UnixStream) -> io::Result<usize> {
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = self.buf.get_mut(self.end..).unwrap_or(&mut []);
        // A partial frame fills at most LEN_PREFIX + MAX_FRAME_LEN < RX_BUF_LEN, so there is room
        // whenever a frame is incomplete; an empty slice here would read as end of stream.
        if room.is_empty() {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let n = stream.read(room)?;
        self.end += n;
        Ok(n)
    }
}

/// The virtio-net device. See the module documentation.
pub struct Net {
    mac: [u8; 6],
    queue_events: [EventFd; 2],
    stream: UnixStream,
    policy: Policy,
    active: Option<Active>,
    /// Set if `init` could not register the queue eventfds; activation then fails.
    registration_error: Option<String>,
    /// An allowed frame (with its length prefix) not yet all written to passt, and how much was.
    tx_pending: Vec<u8>,
    tx_written: usize,
    /// The frame being read off a tx chain.
    tx_frame: Vec<u8>,
    rx: RxFramer,
    /// Resets for refused TCP segments, waiting for rx buffers (at most [`MAX_REPLIES`]).
    replies: VecDeque<Vec<u8>>,
    /// What the event loop watches the socket for; None while it is not registered.
    registered: Option<EventSet>,
    ended: Option<BackendEnd>,
    stats: NetStats,
}

impl Net {
    /// A device with MAC `mac` whose frames go to and come from passt over `stream` (made
    /// non-blocking here), filtered by `policy`.
    pub fn new(mac: [u8; 6], stream: UnixStream, policy: Policy) -> Result<Self, NetError> {
        stream
            .set_nonblocking(true)
            .map_err(NetError::NonBlocking)?;
        let queue_event = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            mac,
            queue_events: [queue_event()?, queue_event()?],
            stream,
            policy,
            active: None,
            registration_error: None,
            tx_pending: Vec::with_capacity(LEN_PREFIX + MAX_FRAME_LEN),
            tx_written: 0,
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
            rx: RxFramer::new(),
            replies: VecDeque::new(),
            registered: None,
            ended: None,
            stats: NetStats::default(),
        })
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Why the connection to passt ended, if it has.
    pub fn backend_end(&self) -> Option<&BackendEnd> {
        self.ended.as_ref()
    }

    /// Handles one event: `data` is its token (a queue index or [`SOCKET_TOKEN`]).
    pub(crate) fn handle_event<R: FdRegistry + ?Sized>(
        &mut self,
        data: u32,
        _events: EventSet,
        registry: &mut R,
    ) {
        match data {
            RX_TOKEN => self.drain_queue_event(RX_QUEUE),
            TX_TOKEN => self.drain_queue_event(TX_QUEUE),
            // Readable, writable, hung up or failed: the reads and writes below find out which.
            SOCKET_TOKEN => {}
            _ => return,
        }
        // Whatever woke the device, both directions go as far as they can: a writable socket lets tx
        // go on, a kick on either queue may find frames waiting on the other side.
        self.process_tx();
        self.process_rx();
        self.sync_registration(registry);
    }

    fn drain_queue_event(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            // EAGAIN only means the counter was already zero (a spurious wake-up).
            let _ = evt.read();
        }
    }

    fn kick_self(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            // Fails only if the counter would overflow, in which case a wake-up is pending anyway.
            let _ = evt.write(1);
        }
    }

    fn end(&mut self, why: BackendEnd) {
        if self.ended.is_none() {
            eprintln!("vmm: virtio-net: {why}; the guest's network is down");
            self.ended = Some(why);
        }
        self.tx_pending.clear();
        self.tx_written = 0;
    }

    /// Writes what is left of the pending frame. True once nothing is pending.
    fn flush_tx(&mut self) -> bool {
        while self.tx_written < self.tx_pending.len() {
            let rest = self.tx_pending.get(self.tx_written..).unwrap_or(&[]);
            match self.stream.write(rest) {
                Ok(0) => {
                    self.end(BackendEnd::Closed);
                    return true;
                }
                Ok(n) => self.tx_written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = match e.kind() {
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                            BackendEnd::Closed
                        }
                        _ => BackendEnd::Io(e.to_string()),
                    };
                    self.end(why);
                    return true;
                }
            }
        }
        self.tx_pending.clear();
        self.tx_written = 0;
        true
    }

    /// Takes tx chains while the socket takes their frames.
    fn process_tx(&mut self) {
        if self.active.is_none() {
            return;
        }
        let mut used_any = false;
        let mut budget = CHAINS_PER_PASS;
        loop {
            if !self.flush_tx() {
                // The socket is full: the chains stay in the queue until it is writable.
                break;
            }
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let mem = &active.mem;
            let Some(popped) = pop_chain(&mut active.tx, mem, active.indirect) else {
                break;
            };
            if budget == 0 {
                active.tx.go_to_previous_position();
                self.kick_self(TX_QUEUE);
                break;
            }
            budget -= 1;
            let (head, read) = match popped {
                Ok(chain) => (
                    chain.head_index(),
                    read_tx_frame(mem, chain, &mut self.tx_frame),
                ),
                Err(head) => (head, false),
            };
            // The frame has been copied out: the buffer goes back to the guest first.
            if active.tx.add_used(mem, head, 0).is_err() {
                // The used ring is not writable: nothing can be served until the driver resets.
                break;
            }
            used_any = true;
            if !read {
                self.stats.tx_malformed += 1;
                continue;
            }
            if self.ended.is_some() {
                self.stats.tx_no_backend += 1;
                continue;
            }
            if let Err(reason) = self.policy.check_egress(&self.tx_frame) {
                if reason.is_destination() && self.replies.len() < MAX_REPLIES {
                    if let Some(reset) = crate::net::reply::tcp_reset(&self.tx_frame) {
                        self.replies.push_back(reset);
                        self.stats.tx_refused += 1;
                    }
                }
                continue;
            }
            let Ok(len) = u32::try_from(self.tx_frame.len()) else {
                continue;
            };
            self.tx_pending.extend_from_slice(&len.to_be_bytes());
            self.tx_pending.extend_from_slice(&self.tx_frame);
            self.stats.tx_frames += 1;
            self.stats.tx_bytes += u64::from(len);
        }
        if used_any {
            if let Some(active) = self.active.as_mut() {
                notify(&mut active.tx, &active.mem, &active.interrupt);
            }
        }
    }

    /// Delivers frames into rx buffers while there are both: first the resets the device made (they
    /// answer frames the guest already sent), then what passt sent.
    fn process_rx(&mut self) {
        if self.active.is_none() {
            return;
        }
        let mut used_any = false;
        let mut budget = CHAINS_PER_PASS;
        loop {
            if budget == 0 {
                self.kick_self(RX_QUEUE);
                break;
            }
            let source = if self.replies.is_empty() {
                match self.rx.next_frame() {
                    Err(why) => {
                        self.end(why);
                        break;
                    }
                    Ok(Some((start, end))) => Source::Passt(start, end),
                    Ok(None) => {
                        if self.ended.is_some() {
                            break;
                        }
                        match self.rx.fill(&mut self.stream) {
                            Ok(0) => {
                                self.end(BackendEnd::Closed);
                                break;
                            }
                            Ok(_) => continue,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                self.end(BackendEnd::Io(e.to_string()));
                                break;
                            }
                        }
                    }
                }
            } else {
                Source::Reply
            };
            let frame: &[u8] = match source {
                Source::Reply => self.replies.front().map_or(&[], Vec::as_slice),
                Source::Passt(start, end) => self.rx.buf.get(start..end).unwrap_or(&[]),
            };
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let outcome = if frame.len() < MIN_FRAME_LEN {
                Delivery::Dropped
            } else {
                deliver(active, frame)
            };
            match outcome {
                // The frame waits, and the socket is not read, until the guest adds buffers.
                Delivery::NoBuffer | Delivery::RingBroken => break,
                Delivery::Unusable => {
                    // The chain went back empty; the frame waits for the next one.
                    budget -= 1;
                    used_any = true;
                    continue;
                }
                Delivery::Dropped => self.stats.rx_dropped += 1,
                Delivery::Delivered => {
                    budget -= 1;
                    used_any = true;
                    if let Source::Passt(..) = source {
                        self.stats.rx_frames += 1;
                        self.stats.rx_bytes += frame.len() as u64;
                        self.policy.observe_ingress(frame);
                    }
                }
            }
            match source {
                Source::Reply => {
                    self.replies.pop_front();
                }
                Source::Passt(_, end) => self.rx.consume_to(end),
            }
        }
        if used_any {
            if let Some(active) = self.active.as_mut() {
                notify(&mut active.rx, &active.mem, &active.interrupt);
            }
        }
    }

    /// What the socket should be watched for now: input while the device is active and no frame (of
    /// passt's, or a reset of its own) waits for an rx buffer (else the readable socket would wake the
    /// loop for nothing, over and over), output while a frame is pending. Nothing once the connection
    /// has ended.
    fn wanted_interest(&self) -> EventSet {
        let mut wanted = EventSet::empty();
        if self.ended.is_some() {
            return wanted;
        }
        if self.active.is_some()
            && self.replies.is_empty()
            && matches!(self.rx.next_frame(), Ok(None))
        {
            wanted |= EventSet::IN;
        }
        if self.tx_written < self.tx_pending.len() {
            wanted |= EventSet::OUT;
        }
        wanted
    }

    /// Brings the event loop's watch on the socket in line with [`Self::wanted_interest`]. An
    /// unwanted socket is removed rather than registered with no events, since epoll reports a hang-up
    /// whatever the interest, and that would wake the loop for nothing.
    fn sync_registration<R: FdRegistry + ?Sized>(&mut self, registry: &mut R) {
        let wanted = self.wanted_interest();
        let fd = self.stream.as_raw_fd();
        let result = match self.registered {
            Some(current) if current == wanted => return,
            Some(current) if wanted.is_empty() => {
                // If epoll had already forgotten the fd there is nothing left to remove.
                let _ = registry.remove(fd, SOCKET_TOKEN, current);
                self.registered = None;
                return;
            }
            Some(_) => registry.modify(fd, SOCKET_TOKEN, wanted),
            None if wanted.is_empty() => return,
            None => registry.add(fd, SOCKET_TOKEN, wanted),
        };
        match result {
            Ok(()) => self.registered = Some(wanted),
            Err(e) => self.end(BackendEnd::Io(format!(
                "cannot watch the socket to passt: {e}"
            ))),
        }
    }
}

/// Where the frame being delivered comes from.
#[derive(Clone, Copy)]
enum Source {
    /// The front of the device's own replies.
    Reply,
    /// `buf[start..end]` of what passt sent.
    Passt(usize, usize),
}

/// What became of a frame offered to the rx queue.
enum Delivery {
    /// No rx buffer: the frame waits.
    NoBuffer,
    /// The used ring cannot be written: nothing can be delivered until the driver resets the device.
    RingBroken,
    /// The chain could never take a frame (not writable guest memory, too small, indirect) and went
    /// back empty; the frame waits for the next chain.
    Unusable,
    /// The frame fits no buffer (or is no frame): dropped, and the buffer kept for the next frame.
    Dropped,
    Delivered,
}

/// Writes `frame` behind a virtio-net header into the next rx chain.
fn deliver(active: &mut Active, frame: &[u8]) -> Delivery {
    let mem = &active.mem;
    let Some(popped) = pop_chain(&mut active.rx, mem, active.indirect) else {
        return Delivery::NoBuffer;
    };
    let (head, writer) = match popped {
        Ok(chain) => (chain.head_index(), chain.writer(mem).ok()),
        Err(head) => (head, None),
    };
    let writer = writer.filter(|w| w.available_bytes() >= NET_HDR_LEN + MIN_FRAME_LEN);
    let Some(mut writer) = writer else {
        return match active.rx.add_used(mem, head, 0) {
            Ok(()) => Delivery::Unusable,
            Err(_) => Delivery::RingBroken,
        };
    };
    if writer.available_bytes() < NET_HDR_LEN + frame.len() {
        // Linux without mergeable buffers posts buffers of one size: a frame that does not fit this
        // one fits none.
        active.rx.go_to_previous_position();
        return Delivery::Dropped;
    }
    let mut header = [0u8; NET_HDR_LEN];
    // num_buffers = 1, little-endian, the header's last field
    header[NET_HDR_LEN - 2] = 1;
    let written = writer
        .write_all(&header)
        .and_then(|()| writer.write_all(frame));
    // at most NET_HDR_LEN + MAX_FRAME_LEN; 0 if the copy failed (it cannot: the chain's memory was
    // checked when the writer was made)
    let used_len = match written {
        Ok(()) => u32::try_from(NET_HDR_LEN + frame.len()).unwrap_or(0),
        Err(_) => 0,
    };
    if active.rx.add_used(mem, head, used_len).is_err() {
        return Delivery::RingBroken;
    }
    if used_len == 0 {
        Delivery::Unusable
    } else {
        Delivery::Delivered
    }
}

/// Reads a tx chain: the virtio-net header, then the frame into `frame`. False if the chain is not
/// readable guest memory, or holds less than a header and an Ethernet header or more than a header and
/// [`MAX_FRAME_LEN`].
fn read_tx_frame(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    frame: &mut Vec<u8>,
) -> bool {
    frame.clear();
    let Ok(mut reader) = chain.reader(mem) else {
        return false;
    };
    let available = reader.available_bytes();
    let Some(len) = available.checked_sub(NET_HDR_LEN) else {
        return false;
    };
    if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
        return false;
    }
    let mut header = [0u8; NET_HDR_LEN];
    if reader.read_exact(&mut header).is_err() {
        return false;
    }
    frame.resize(len, 0);
    reader.read_exact(frame).is_ok()
}

/// Interrupts the guest after used entries were added, unless it asked not to be.
fn notify(queue: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) {
    // Without EVENT_IDX (not offered) this is always true; on error, notifying is the safe choice.
    if queue.needs_notification(mem).unwrap_or(true) {
        // Fails only if the eventfd counter would overflow, in which case the guest is interrupted anyway.
        let _ = interrupt.signal_used_queue();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        let p = self.policy.counters();
        let mut counters = vec![
            ("tx_frames", s.tx_frames),
            ("tx_bytes", s.tx_bytes),
            ("rx_frames", s.rx_frames),
            ("rx_bytes", s.rx_bytes),
            ("tx_dropped", p.dropped_total()),
            ("tx_malformed", s.tx_malformed),
            ("tx_no_backend", s.tx_no_backend),
            ("tx_refused_with_reset", s.tx_refused),
            ("rx_dropped", s.rx_dropped),
            ("dns_learned", p.dns_learned),
            ("dns_refused_answers", p.dns_refused_answers),
        ];
        // Only the reasons that happened: two dozen zeros would say nothing.
        counters.extend(
            DropReason::ALL
                .iter()
                .map(|&r| (r.counter_name(), p.dropped(r)))
                .filter(|&(_, n)| n > 0),
        );
        counters
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; ... }: only mac is offered
        // (no VIRTIO_NET_F_STATUS, MQ or MTU), the rest reads as zero.
        super::read_config_space(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only for a VERSION_1 device (the driver sets it with the control queue,
        // which is not offered).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if let Some(e) = &self.registration_error {
            return Err(ActivateError::Events(e.clone()));
        }
        let count = ctx.queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(ctx.queues) else {
            return Err(ActivateError::InvalidQueue(count.min(QUEUE_SIZES.len())));
        };
        for (index, queue) in [&rx, &tx].into_iter().enumerate() {
            if !queue.is_valid(&ctx.mem) {
                return Err(ActivateError::InvalidQueue(index));
            }
        }
        self.active = Some(Active {
            mem: ctx.mem,
            rx,
            tx,
            interrupt: ctx.interrupt,
            indirect: indirect_negotiated(ctx.acked_features),
        });
        // Activation runs on a vCPU thread, which cannot touch the event loop's watch list: the
        // wake-up makes the main thread start watching the socket.
        self.kick_self(RX_QUEUE);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Frames are copied in and out synchronously, so no chain is held. The socket's buffered
        // bytes and a pending tx frame stay: dropping part of the stream would break its framing.
        self.active = None;
        true
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for (evt, data) in self.queue_events.iter().zip(0u32..) {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                self.registration_error = Some(format!(
                    "cannot register the eventfd of queue {data} with the event loop: {e}"
                ));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.data(), events.event_set(), ops);
    }
}

#[cfg(test)]
mod tests;
