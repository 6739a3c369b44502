//! One stream connection between the guest and a host-side `UnixStream`: its state machine and its
//! credit-based flow control (virtio 1.2, 5.10.6.3).
//!
//! Flow control, in the spec's terms, for each direction:
//!
//! - guest -> host: the device advertises `buf_alloc` = [`BUF_ALLOC`] and `fwd_cnt` = bytes written to the
//!   host socket. The guest may have at most `buf_alloc` bytes sent but not yet counted in a `fwd_cnt` it
//!   has been told about. Data the host socket does not take at once waits in `to_host`, which that rule
//!   bounds by [`BUF_ALLOC`]; a guest that sends more than its credit gets a reset instead of more memory.
//! - host -> guest: the guest advertises its `buf_alloc` and `fwd_cnt` in every packet; the device never
//!   has more than `buf_alloc` bytes unconsumed by the guest. It reads the host socket only when it has
//!   credit and an rx buffer to read into, straight into that buffer's packet, so nothing is held here.
//!
//! Closing: the host end reaching EOF sends SHUTDOWN(SEND) to the guest; the host end failing a write
//! sends SHUTDOWN(RCV). A SHUTDOWN from the guest is passed on as a half-close of the host socket (after
//! what is buffered for the host has been written), and once the guest has shut down both directions the
//! device closes the host end and sends RST, which ends the connection (the guest expects the reset).
//! Any protocol violation resets the connection at once.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::Header;
use super::{op, BUF_ALLOC, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The guest asked to connect; the RESPONSE has not been put in an rx buffer yet.
    AwaitingResponse,
    /// Data may flow (each direction may already be half-closed).
    Established,
    /// The host end is closed and the guest is owed an RST.
    ResetPending,
    /// Nothing more to say to the guest: the connection can be dropped.
    Closed,
}

/// Control packets owed to the guest, besides RESPONSE and RST which the state stands for.
#[derive(Debug, Default)]
struct Owed {
    shutdown: bool,
    credit_update: bool,
}

pub struct Connection {
    guest_cid: u64,
    /// The host port the guest connected to.
    local_port: u32,
    /// The guest's port.
    peer_port: u32,
    /// The device's end of the pair; non-blocking.
    stream: UnixStream,
    state: State,
    owed: Owed,

    // guest -> host
    /// Guest data accepted but not yet written to the host socket; at most [`BUF_ALLOC`] bytes.
    to_host: VecDeque<u8>,
    /// Payload bytes received from the guest, ever.
    rx_cnt: Wrapping<u32>,
    /// Bytes consumed from `to_host` (written to the host, or dropped once it cannot take any more).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last put in a packet for the guest: the guest's credit is counted from it.
    announced_fwd_cnt: Wrapping<u32>,
    /// SHUTDOWN flags received from the guest.
    peer_shutdown: u32,
    /// The host socket's write side is shut down, after the guest said it sends no more.
    host_write_shut: bool,
    /// A write to the host socket failed: the host takes no more data, guest data is dropped.
    host_write_failed: bool,

    // host -> guest
    /// Payload bytes sent to the guest, ever.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host socket had data (or EOF) when last polled and has not been read dry since.
    host_readable: bool,
    /// The host socket reached end of file.
    host_eof: bool,
    /// SHUTDOWN flags the device has decided to send (a SHUTDOWN packet carries all of them).
    shutdown_flags: u32,
    /// A CREDIT_REQUEST went out and the guest has not granted credit since.
    credit_request_sent: bool,

    bytes_to_host: u64,
    bytes_to_guest: u64,
}

impl Connection {
    /// A connection for a REQUEST from the guest; `stream` is the device's end of the pair. The RESPONSE
    /// is owed from the start.
    pub fn new(guest_cid: u64, request: &Header, stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Connection {
            guest_cid,
            local_port: request.dst_port,
            peer_port: request.src_port,
            stream,
            state: State::AwaitingResponse,
            owed: Owed::default(),
            to_host: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            announced_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_write_shut: false,
            host_write_failed: false,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: request.buf_alloc,
            peer_fwd_cnt: Wrapping(request.fwd_cnt),
            host_readable: false,
            host_eof: false,
            shutdown_flags: 0,
            credit_request_sent: false,
            bytes_to_host: 0,
            bytes_to_guest: 0,
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Bytes written to the host socket so far.
    pub fn bytes_to_host(&self) -> u64 {
        self.bytes_to_host
    }

    /// Bytes put in rx buffers for the guest so far.
    pub fn bytes_to_guest(&self) -> u64 {
        self.bytes_to_guest
    }

    /// Handles a packet from the guest addressed to this connection. `payload` is the packet's data
    /// (`header.len` bytes, already bounded by the parser).
    pub fn on_guest_packet(&mut self, header: &Header, payload: &[u8]) {
        match self.state {
            State::ResetPending | State::Closed => {
                // The device is ending the connection; an RST from the guest ends it on both sides, and
                // anything else is answered by the RST already owed.
                if header.op == op::RST {
                    self.state = State::Closed;
                }
                return;
            }
            State::AwaitingResponse | State::Established => {}
        }
        self.update_peer_credit(header);
        match header.op {
            op::RST => {
                self.close_host();
                self.state = State::Closed;
            }
            op::RW => self.on_guest_data(payload),
            // The credit fields were taken above.
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.owed.credit_update = true,
            op::SHUTDOWN => self.on_guest_shutdown(header.flags),
            // REQUEST on an open connection, RESPONSE (the device never connects to the guest) and unknown
            // operations: the guest and the device disagree about this connection, so end it.
            _ => self.reset(),
        }
    }

    /// Handles readiness of the host socket, as reported by the event loop.
    pub fn on_host_event(&mut self, events: EventSet) {
        if !self.is_open() {
            return;
        }
        // Hang-ups and errors are readable too: the read reports them (EOF or the error).
        let readable = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
        if events.intersects(readable) && self.reading_allowed() {
            self.host_readable = true;
        }
        let writable = EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR;
        if events.intersects(writable) && !self.to_host.is_empty() {
            self.flush_to_host();
        }
    }

    /// Whether the connection has a packet for the guest (or may have: the host socket may turn out dry).
    pub fn has_rx(&self) -> bool {
        match self.state {
            State::Closed => false,
            State::ResetPending | State::AwaitingResponse => true,
            State::Established => {
                self.owed.shutdown
                    || self.owed.credit_update
                    || (self.host_readable
                        && self.reading_allowed()
                        && (self.peer_credit() > 0 || !self.credit_request_sent))
            }
        }
    }

    /// Produces the next packet for the guest, for an rx buffer with room for `capacity` payload bytes.
    /// Payload, if any, is read from the host socket into `scratch` and its length returned with the
    /// header. `None` when there is nothing to send after all.
    pub fn fill_rx(&mut self, capacity: usize, scratch: &mut [u8]) -> Option<(Header, usize)> {
        match self.state {
            State::Closed => None,
            State::ResetPending => {
                self.state = State::Closed;
                Some((self.header(op::RST, 0, 0), 0))
            }
            State::AwaitingResponse => {
                self.state = State::Established;
                Some((self.header(op::RESPONSE, 0, 0), 0))
            }
            State::Established => self.next_established_packet(capacity, scratch),
        }
    }

    /// What to watch the host socket for. Empty when nothing can be done with it now, so that the event
    /// loop does not spin on a level-triggered readiness (or hang-up) the device is not acting on.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.is_open() {
            return set;
        }
        // Once known readable, the device reads until the socket is dry; polling again is pointless.
        // Without credit there is nothing to do with the data, so the socket is not polled either.
        if self.reading_allowed() && !self.host_readable && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Ends the connection abnormally: the host end is closed now and the guest is owed an RST.
    pub fn reset(&mut self) {
        if !self.is_open() {
            return;
        }
        self.close_host();
        self.to_host = VecDeque::new();
        self.host_readable = false;
        self.state = State::ResetPending;
    }

    /// Shuts the host end down both ways, so that the control logic on the other end sees EOF and its
    /// writes fail rather than block.
    pub fn close_host(&mut self) {
        // Fails only if already disconnected, which is what is wanted.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    #[cfg(test)]
    pub(crate) fn debug_state(&self) -> String {
        format!(
            "state {:?} owed {:?} to_host {} rx_cnt {} fwd {} announced {} peer_sd {} tx_cnt {} peer_buf {} peer_fwd {} readable {} eof {} credit_req {} interest {:?}",
            self.state, self.owed, self.to_host.len(), self.rx_cnt, self.fwd_cnt, self.announced_fwd_cnt,
            self.peer_shutdown, self.tx_cnt, self.peer_buf_alloc, self.peer_fwd_cnt, self.host_readable,
            self.host_eof, self.credit_request_sent, self.interest()
        )
    }

    fn is_open(&self) -> bool {
        matches!(self.state, State::AwaitingResponse | State::Established)
    }

    fn reading_allowed(&self) -> bool {
        !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        // Wrapping difference: both counters wrap at 2^32. A guest that reports a fwd_cnt ahead of what
        // it was sent gets a huge "in flight" and so no credit, which only stalls its own connection.
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_request_sent = false;
        }
    }

    fn on_guest_data(&mut self, payload: &[u8]) {
        if self.state == State::AwaitingResponse || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            // Data before the connection is established or after the guest said it sends no more.
            self.reset();
            return;
        }
        // The parser bounds payloads to MAX_PKT_DATA, far below u32::MAX.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let unconsumed = u64::from((self.rx_cnt - self.announced_fwd_cnt).0);
        if unconsumed + u64::from(len) > u64::from(BUF_ALLOC) {
            // More than the credit the device granted: it will not buffer it.
            self.reset();
            return;
        }
        self.rx_cnt += Wrapping(len);
        if self.host_write_failed {
            // The host takes no more: drop the data but count it consumed, so the guest is not left
            // waiting for credit while the SHUTDOWN(RCV) it is owed is on its way.
            self.fwd_cnt += Wrapping(len);
            self.maybe_owe_credit_update();
            return;
        }
        if self.to_host.is_empty() {
            let written = self.write_to_host(payload);
            if self.host_write_failed {
                return;
            }
            self.to_host.extend(&payload[written..]);
        } else {
            self.to_host.extend(payload);
        }
        self.flush_to_host();
    }

    fn on_guest_shutdown(&mut self, flags: u32) {
        let new = flags & SHUTDOWN_BOTH & !self.peer_shutdown;
        self.peer_shutdown |= new;
        if new & SHUTDOWN_RCV != 0 {
            // The guest reads no more: make the host's writes fail instead of filling the socket and
            // then blocking the control logic forever.
            let _ = self.stream.shutdown(Shutdown::Read);
            self.host_readable = false;
        }
        self.after_host_write_progress();
    }

    /// Writes `data` to the host socket as far as it takes it now; returns the bytes written.
    fn write_to_host(&mut self, data: &[u8]) -> usize {
        let mut written = 0;
        while written < data.len() {
            match self.stream.write(&data[written..]) {
                Ok(0) => {
                    self.on_host_write_failure();
                    return written;
                }
                Ok(n) => {
                    written += n;
                    self.forwarded(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.on_host_write_failure();
                    return written;
                }
            }
        }
        written
    }

    /// Writes as much of `to_host` as the host socket takes now.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (front, back) = self.to_host.as_slices();
            let result = if back.is_empty() {
                self.stream.write(front)
            } else {
                self.stream
                    .write_vectored(&[IoSlice::new(front), IoSlice::new(back)])
            };
            match result {
                // A socket that takes nothing from a non-empty buffer would be polled writable forever.
                Ok(0) => {
                    self.on_host_write_failure();
                    return;
                }
                Ok(n) => {
                    self.to_host.drain(..n.min(self.to_host.len()));
                    self.forwarded(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.on_host_write_failure();
                    return;
                }
            }
        }
        self.after_host_write_progress();
    }

    fn forwarded(&mut self, n: usize) {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        self.fwd_cnt += Wrapping(n32);
        self.bytes_to_host += n as u64;
    }

    /// The host end does not take data any more (peer closed, or an error): drop what is buffered and
    /// tell the guest, with SHUTDOWN(RCV), that its sends will fail. Reading from the host goes on, so
    /// what the host wrote before closing still reaches the guest.
    fn on_host_write_failure(&mut self) {
        self.host_write_failed = true;
        let dropped = u32::try_from(self.to_host.len()).unwrap_or(u32::MAX);
        self.fwd_cnt += Wrapping(dropped);
        self.to_host = VecDeque::new();
        self.shutdown_flags |= SHUTDOWN_RCV;
        self.owed.shutdown = true;
        self.after_host_write_progress();
    }

    /// After `to_host` shrank, or the guest shut something down: pass a guest half-close on to the host
    /// once everything before it is written, finish a full close, announce credit.
    fn after_host_write_progress(&mut self) {
        if self.to_host.is_empty() {
            if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                let _ = self.stream.shutdown(Shutdown::Write);
                self.host_write_shut = true;
            }
            if self.peer_shutdown == SHUTDOWN_BOTH {
                // The guest is done both ways and all its data reached the host (or could not): close
                // the host end, and the RST ends the connection in the guest.
                self.reset();
                return;
            }
        }
        self.maybe_owe_credit_update();
    }

    /// Tells the guest about freed buffer space once a good part of it has been freed since it was last
    /// told: a guest that used all its credit waits for this.
    fn maybe_owe_credit_update(&mut self) {
        if self.state == State::Established
            && (self.fwd_cnt - self.announced_fwd_cnt).0 >= BUF_ALLOC / 2
        {
            self.owed.credit_update = true;
        }
    }

    fn next_established_packet(
        &mut self,
        capacity: usize,
        scratch: &mut [u8],
    ) -> Option<(Header, usize)> {
        if self.host_readable && self.reading_allowed() {
            let credit = self.peer_credit();
            if credit == 0 {
                if !self.credit_request_sent {
                    self.credit_request_sent = true;
                    return Some((self.header(op::CREDIT_REQUEST, 0, 0), 0));
                }
            } else {
                let max = capacity.min(credit as usize).min(scratch.len());
                if max > 0 {
                    if let Some(packet) = self.read_host(&mut scratch[..max]) {
                        return Some(packet);
                    }
                }
            }
        }
        if self.state == State::ResetPending {
            // Reading failed: the RST goes now.
            return self.fill_rx(capacity, scratch);
        }
        if self.owed.shutdown {
            self.owed.shutdown = false;
            return Some((self.header(op::SHUTDOWN, 0, self.shutdown_flags), 0));
        }
        if self.owed.credit_update {
            return Some((self.header(op::CREDIT_UPDATE, 0, 0), 0));
        }
        None
    }

    /// Reads host data into `buf`; returns an RW packet if there was some.
    fn read_host(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    // Everything the host wrote has been read: the guest gets EOF after it.
                    self.host_eof = true;
                    self.host_readable = false;
                    self.shutdown_flags |= SHUTDOWN_SEND;
                    self.owed.shutdown = true;
                    return None;
                }
                Ok(n) => {
                    let n32 = u32::try_from(n).unwrap_or(u32::MAX);
                    self.tx_cnt += Wrapping(n32);
                    self.bytes_to_guest += n as u64;
                    return Some((self.header(op::RW, n32, 0), n));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return None;
                }
                Err(_) => {
                    // The host end is broken (e.g. closed with our data unread): the stream cannot go on.
                    self.reset();
                    return None;
                }
            }
        }
    }

    /// A header from the host end of this connection. Every packet carries the current credit, so it
    /// also counts as a credit update.
    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.announced_fwd_cnt = self.fwd_cnt;
        self.owed.credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use crate::devices::virtio::vsock::MAX_PKT_DATA;

    const GUEST_CID: u64 = 3;
    const HOST_PORT: u32 = 1024;
    const GUEST_PORT: u32 = 50_000;

    fn guest_header(op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: HOST_PORT,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// A connection past its handshake, and the host's end of the pair (non-blocking).
    fn established(guest_buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut req = guest_header(op::REQUEST, 0);
        req.buf_alloc = guest_buf_alloc;
        let mut c = Connection::new(GUEST_CID, &req, ours).unwrap();
        assert!(c.has_rx());
        let (h, n) = c.fill_rx(4096, &mut [0u8; 4096]).unwrap();
        assert_eq!((h.op, n), (op::RESPONSE, 0));
        assert_eq!(h.buf_alloc, BUF_ALLOC);
        assert_eq!(
            (h.src_port, h.dst_port, h.dst_cid),
            (HOST_PORT, GUEST_PORT, GUEST_CID)
        );
        assert_eq!(c.state(), State::Established);
        (c, theirs)
    }

    fn rw(c: &mut Connection, data: &[u8]) {
        c.on_guest_packet(&guest_header(op::RW, data.len() as u32), data);
    }

    fn read_all(s: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    /// Drains every packet the connection has for the guest, with 4 KiB rx buffers.
    fn drain(c: &mut Connection) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut scratch = vec![0u8; MAX_PKT_DATA as usize];
        while c.has_rx() {
            match c.fill_rx(4096, &mut scratch) {
                Some((h, n)) => out.push((h, scratch[..n].to_vec())),
                None => break,
            }
        }
        out
    }

    #[test]
    fn guest_data_reaches_host_in_order() {
        let (mut c, mut host) = established(65536);
        rw(&mut c, b"hello ");
        rw(&mut c, b"world");
        assert_eq!(read_all(&mut host), b"hello world");
        assert_eq!(c.bytes_to_host(), 11);
        assert!(c.interest().contains(EventSet::IN));
        assert!(!c.interest().contains(EventSet::OUT));
    }

    #[test]
    fn host_data_is_limited_by_guest_credit_then_credit_request() {
        let (mut c, mut host) = established(10_000);
        host.write_all(&[7u8; 30_000]).unwrap();
        c.on_host_event(EventSet::IN);
        let pkts = drain(&mut c);
        let data: usize = pkts
            .iter()
            .filter(|(h, _)| h.op == op::RW)
            .map(|(_, d)| d.len())
            .sum();
        assert_eq!(data, 10_000);
        assert!(pkts.iter().all(|(h, d)| h.len as usize == d.len()));
        assert_eq!(pkts.last().unwrap().0.op, op::CREDIT_REQUEST);
        // no more polling while there is no credit
        assert!(c.interest().is_empty());
        // the guest consumed 6000 bytes
        let mut upd = guest_header(op::CREDIT_UPDATE, 0);
        upd.buf_alloc = 10_000;
        upd.fwd_cnt = 6000;
        c.on_guest_packet(&upd, &[]);
        let pkts = drain(&mut c);
        let data: usize = pkts.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(data, 6000);
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (mut c, mut host) = established(65536);
        // The host does not read: fill the socket buffer, then the device's buffer.
        let chunk = vec![1u8; MAX_PKT_DATA as usize];
        let mut sent = 0u64;
        while c.state() == State::Established && sent <= u64::from(BUF_ALLOC) * 8 {
            rw(&mut c, &chunk);
            sent += chunk.len() as u64;
        }
        assert_eq!(c.state(), State::ResetPending);
        // Bounded by the credit granted: the socket's buffer plus at most BUF_ALLOC here.
        assert!(c.to_host.is_empty());
        let (h, _) = c.fill_rx(4096, &mut [0u8; 16]).unwrap();
        assert_eq!(h.op, op::RST);
        assert_eq!(c.state(), State::Closed);
        // the host sees the stream end
        let _ = read_all(&mut host);
        host.set_nonblocking(false).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(host.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn credit_overrun_is_judged_against_the_announced_fwd_cnt() {
        let (mut c, _host) = established(65536);
        // All of BUF_ALLOC is fine (the host reads nothing yet but the socket buffer takes some).
        let chunk = vec![1u8; 32 * 1024];
        for _ in 0..(BUF_ALLOC as usize / chunk.len()) {
            rw(&mut c, &chunk);
            assert_eq!(c.state(), State::Established);
        }
        // One byte more than granted, even though the host socket took some: nothing was announced.
        rw(&mut c, &[1]);
        assert_eq!(c.state(), State::ResetPending);
    }

    #[test]
    fn credit_update_is_sent_after_half_the_buffer_is_forwarded() {
        let (mut c, mut host) = established(65536);
        let chunk = vec![2u8; MAX_PKT_DATA as usize];
        rw(&mut c, &chunk);
        rw(&mut c, &chunk);
        let _ = read_all(&mut host);
        c.on_host_event(EventSet::OUT);
        let pkts = drain(&mut c);
        let upd = pkts
            .iter()
            .find(|(h, _)| h.op == op::CREDIT_UPDATE)
            .expect("credit update");
        assert_eq!(upd.0.fwd_cnt, 2 * MAX_PKT_DATA);
        // and on request
        c.on_guest_packet(&guest_header(op::CREDIT_REQUEST, 0), &[]);
        assert_eq!(drain(&mut c)[0].0.op, op::CREDIT_UPDATE);
    }

    #[test]
    fn host_eof_sends_shutdown_after_the_data() {
        let (mut c, mut host) = established(65536);
        host.write_all(b"bye").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        c.on_host_event(EventSet::IN);
        let pkts = drain(&mut c);
        assert_eq!(pkts.len(), 2);
        assert_eq!((pkts[0].0.op, pkts[0].1.as_slice()), (op::RW, &b"bye"[..]));
        assert_eq!(pkts[1].0.op, op::SHUTDOWN);
        assert_eq!(pkts[1].0.flags, SHUTDOWN_SEND);
        assert!(!c.interest().contains(EventSet::IN));
        // the guest may still send
        rw(&mut c, b"more");
        assert_eq!(read_all(&mut host), b"more");
    }

    #[test]
    fn guest_full_shutdown_flushes_then_closes_and_resets() {
        let (mut c, mut host) = established(65536);
        // Fill the host socket so that some data waits in the device, sending as an honest guest does:
        // within the credit announced to it.
        let mut sent = 0;
        while c.to_host.is_empty() {
            assert!(sent < 64 << 20, "the host socket never filled up");
            let _ = drain(&mut c); // picks up credit updates
            let credit = BUF_ALLOC - (c.rx_cnt - c.announced_fwd_cnt).0;
            let n = credit.min(32 * 1024) as usize;
            if n > 0 {
                rw(&mut c, &vec![3u8; n]);
                sent += n;
            }
            assert_eq!(c.state(), State::Established);
        }
        let mut sd = guest_header(op::SHUTDOWN, 0);
        sd.flags = SHUTDOWN_BOTH;
        c.on_guest_packet(&sd, &[]);
        // not closed while data waits for the host
        assert_eq!(c.state(), State::Established);
        assert!(c.interest().contains(EventSet::OUT));
        let mut got = 0;
        while c.state() == State::Established {
            got += read_all(&mut host).len();
            c.on_host_event(EventSet::OUT);
        }
        assert_eq!(c.state(), State::ResetPending);
        got += read_all(&mut host).len();
        assert_eq!(got, sent);
        assert_eq!(drain(&mut c)[0].0.op, op::RST);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn guest_half_close_reaches_host_as_eof() {
        let (mut c, mut host) = established(65536);
        rw(&mut c, b"last words");
        let mut sd = guest_header(op::SHUTDOWN, 0);
        sd.flags = SHUTDOWN_SEND;
        c.on_guest_packet(&sd, &[]);
        host.set_nonblocking(false).unwrap();
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last words");
        // the host can still write to the guest
        host.write_all(b"reply").unwrap();
        c.on_host_event(EventSet::IN);
        assert_eq!(drain(&mut c)[0].1, b"reply");
        // data after the guest's SEND shutdown is a violation
        rw(&mut c, b"x");
        assert_eq!(c.state(), State::ResetPending);
    }

    #[test]
    fn guest_rcv_shutdown_makes_host_writes_fail() {
        let (mut c, mut host) = established(65536);
        let mut sd = guest_header(op::SHUTDOWN, 0);
        sd.flags = SHUTDOWN_RCV;
        c.on_guest_packet(&sd, &[]);
        assert!(host.write_all(b"nobody listens").is_err());
        assert!(!c.interest().contains(EventSet::IN));
    }

    #[test]
    fn host_closing_its_end_turns_guest_writes_into_shutdown_rcv() {
        let (mut c, host) = established(65536);
        drop(host);
        rw(&mut c, b"into the void");
        let pkts = drain(&mut c);
        assert_eq!(pkts[0].0.op, op::SHUTDOWN);
        assert_eq!(pkts[0].0.flags & SHUTDOWN_RCV, SHUTDOWN_RCV);
        // later data is dropped but credit keeps flowing
        rw(&mut c, b"more");
        assert_eq!(c.state(), State::Established);
        // EOF is still reported
        c.on_host_event(EventSet::IN | EventSet::HANG_UP);
        let pkts = drain(&mut c);
        assert_eq!(pkts[0].0.op, op::SHUTDOWN);
        assert_eq!(pkts[0].0.flags, SHUTDOWN_BOTH);
        // guest closes: RST
        let mut sd = guest_header(op::SHUTDOWN, 0);
        sd.flags = SHUTDOWN_BOTH;
        c.on_guest_packet(&sd, &[]);
        assert_eq!(drain(&mut c)[0].0.op, op::RST);
    }

    #[test]
    fn protocol_violations_reset() {
        for bad in [op::REQUEST, op::RESPONSE, 0, 8, 0xffff] {
            let (mut c, _host) = established(65536);
            c.on_guest_packet(&guest_header(bad, 0), &[]);
            assert_eq!(c.state(), State::ResetPending, "op {bad}");
            // further packets get nothing but the RST already owed
            rw(&mut c, b"x");
            assert_eq!(drain(&mut c).len(), 1);
        }
        // data before the response went out
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut c = Connection::new(GUEST_CID, &guest_header(op::REQUEST, 0), ours).unwrap();
        rw(&mut c, b"early");
        assert_eq!(c.state(), State::ResetPending);
        assert_eq!(drain(&mut c)[0].0.op, op::RST);
    }

    #[test]
    fn guest_rst_closes_without_reply() {
        let (mut c, mut host) = established(65536);
        c.on_guest_packet(&guest_header(op::RST, 0), &[]);
        assert_eq!(c.state(), State::Closed);
        assert!(!c.has_rx());
        host.set_nonblocking(false).unwrap();
        assert_eq!(host.read(&mut [0u8; 4]).unwrap(), 0);
    }

    #[test]
    fn lying_fwd_cnt_only_stalls_its_own_connection() {
        let (mut c, mut host) = established(65536);
        let mut upd = guest_header(op::CREDIT_UPDATE, 0);
        upd.fwd_cnt = 1_000_000; // ahead of anything sent
        c.on_guest_packet(&upd, &[]);
        host.write_all(b"data").unwrap();
        c.on_host_event(EventSet::IN);
        let pkts = drain(&mut c);
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, op::CREDIT_REQUEST);
        assert!(c.interest().is_empty());
    }
}
