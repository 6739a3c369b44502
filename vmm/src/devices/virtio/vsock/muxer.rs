//! Routes packets between the queues and the connections: which connection a guest packet belongs to,
//! accepting new connections on the listening ports, which connection gets the next rx buffer, and
//! keeping the event loop's watch on each host socket in step with what its connection can do.
//!
//! Connections are keyed by (host port, guest port). Each one's host socket is registered with the
//! event loop under a token of its own (the `data` of its epoll events), only for the readiness the
//! connection can act on, and not at all when that is nothing.

use std::collections::{HashMap, VecDeque};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::Writer;

use super::connection::{Connection, State};
use super::packet::{self, Header};
use super::{op, MAX_CONNECTIONS, MAX_PENDING_CONTROL, MAX_PKT_DATA};

/// First event token used for host sockets; the ones below are the device's queue eventfds.
pub const FIRST_CONNECTION_TOKEN: u32 = 16;

/// The event loop's watch list, as far as the muxer needs it: event-manager's [`EventOps`] in the VMM,
/// a recording fake in tests.
pub trait FdRegistry {
    fn add(
        &mut self,
        fd: RawFd,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_manager::Error>;
    fn modify(
        &mut self,
        fd: RawFd,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_manager::Error>;
    fn remove(
        &mut self,
        fd: RawFd,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_manager::Error>;
}

impl FdRegistry for EventOps<'_> {
    fn add(
        &mut self,
        fd: RawFd,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_manager::Error> {
        EventOps::add(self, Events::with_data_raw(fd, token, interest))
    }

    fn modify(
        &mut self,
        fd: RawFd,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_manager::Error> {
        EventOps::modify(self, Events::with_data_raw(fd, token, interest))
    }

    fn remove(
        &mut self,
        fd: RawFd,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_manager::Error> {
        EventOps::remove(self, Events::with_data_raw(fd, token, interest))
    }
}

/// A connection's address: the host port the guest connected to and the guest's own port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub local_port: u32,
    pub peer_port: u32,
}

struct Slot {
    connection: Connection,
    token: u32,
    /// What the event loop watches the host socket for; empty when it is not registered.
    registered: EventSet,
    /// Whether the key is in `Muxer::rx_queue`.
    in_rx_queue: bool,
}

/// A host socket whose connection is gone, kept open until the event loop has forgotten it: closing it
/// first would leave event-manager with a stale entry that a reused fd number would then collide with.
struct Retired {
    stream: UnixStream,
    token: u32,
    registered: EventSet,
}

pub struct Muxer {
    guest_cid: u64,
    listeners: HashMap<u32, Sender<UnixStream>>,
    connections: HashMap<ConnectionKey, Slot>,
    tokens: HashMap<u32, ConnectionKey>,
    next_token: u32,
    /// Connections that have something for the guest, served round-robin.
    rx_queue: VecDeque<ConnectionKey>,
    /// Resets for packets that match no connection; bounded by [`MAX_PENDING_CONTROL`].
    control: VecDeque<Header>,
    retired: Vec<Retired>,
    /// Host data on its way into an rx buffer.
    scratch: Vec<u8>,
    /// Byte counts of connections already dropped: (guest to host, host to guest).
    closed_bytes: (u64, u64),
    /// Resets for unmatched packets dropped because `control` was full.
    dropped_control: u64,
}

impl Muxer {
    pub fn new(guest_cid: u64, listeners: HashMap<u32, Sender<UnixStream>>) -> Self {
        Muxer {
            guest_cid,
            listeners,
            connections: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_CONNECTION_TOKEN,
            rx_queue: VecDeque::new(),
            control: VecDeque::new(),
            retired: Vec::new(),
            scratch: vec![0u8; MAX_PKT_DATA as usize],
            closed_bytes: (0, 0),
            dropped_control: 0,
        }
    }

    /// Bytes moved (guest to host, host to guest) by all connections, open or closed.
    pub fn bytes_counters(&self) -> (u64, u64) {
        self.connections
            .values()
            .fold(self.closed_bytes, |(g2h, h2g), slot| {
                (
                    g2h + slot.connection.bytes_to_host(),
                    h2g + slot.connection.bytes_to_guest(),
                )
            })
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    #[cfg(test)]
    pub(crate) fn debug_state(&self) -> String {
        let mut out = format!(
            "rx_queue {:?} control {} ",
            self.rx_queue,
            self.control.len()
        );
        for (k, slot) in &self.connections {
            out += &format!(
                "[{k:?} token {} registered {:?} in_rx {} {}] ",
                slot.token,
                slot.registered,
                slot.in_rx_queue,
                slot.connection.debug_state()
            );
        }
        out
    }

    /// Handles a well-formed packet from the tx queue (`payload` holds its `len` bytes).
    pub fn handle_guest_packet(&mut self, header: &Header, payload: &[u8]) {
        if packet::validate_guest_header(header, self.guest_cid).is_err() {
            self.reply_reset(header);
            return;
        }
        let key = ConnectionKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if let Some(slot) = self.connections.get_mut(&key) {
            slot.connection.on_guest_packet(header, payload);
            self.after_connection_change(key);
            return;
        }
        match header.op {
            op::REQUEST => self.accept(header, key),
            // Nothing to reset, and an RST is never answered.
            op::RST => {}
            _ => self.reply_reset(header),
        }
    }

    /// Handles a packet whose payload could not be read (`header` is `None` when even the header could
    /// not). A connection it belongs to has lost data and is reset; otherwise the sender gets an RST.
    pub fn handle_malformed_packet(&mut self, header: Option<&Header>) {
        let Some(header) = header else {
            // No address to answer to.
            return;
        };
        let key = ConnectionKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if packet::validate_guest_header(header, self.guest_cid).is_ok() {
            if let Some(slot) = self.connections.get_mut(&key) {
                slot.connection.reset();
                self.after_connection_change(key);
                return;
            }
        }
        self.reply_reset(header);
    }

    /// Handles readiness of a host socket; `token` is the data of its epoll event.
    pub fn handle_host_event(&mut self, token: u32, events: EventSet) {
        // Events for retired sockets find no token and are dropped.
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        if let Some(slot) = self.connections.get_mut(&key) {
            slot.connection.on_host_event(events);
            self.after_connection_change(key);
        }
    }

    /// Whether there may be a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_queue.is_empty()
    }

    /// Writes the next packet for the guest into an rx chain; returns the used length, or `None` if
    /// there was nothing to send after all (the chain is then untouched).
    pub fn fill_rx(&mut self, writer: &mut Writer<'_>) -> Option<u32> {
        let capacity = packet::payload_capacity(writer)?;
        if let Some(header) = self.control.pop_front() {
            // Fails only on a chain too small for a header, which `capacity` excludes.
            return packet::write_packet(writer, &header, &[]).ok();
        }
        for _ in 0..self.rx_queue.len() {
            let Some(key) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(slot) = self.connections.get_mut(&key) else {
                continue;
            };
            slot.in_rx_queue = false;
            let mut used_len = None;
            if let Some((header, n)) = slot.connection.fill_rx(capacity, &mut self.scratch) {
                match packet::write_packet(writer, &header, &self.scratch[..n]) {
                    Ok(len) => used_len = Some(len),
                    // Data read from the host is lost: the stream cannot go on.
                    Err(_) => slot.connection.reset(),
                }
            }
            self.after_connection_change(key);
            if used_len.is_some() {
                return used_len;
            }
        }
        None
    }

    /// Brings the event loop's watch list in line with what each connection can act on, and lets go of
    /// retired sockets. Returns true if a connection had to be reset because its socket could not be
    /// registered (it then has an RST for the guest).
    pub fn sync_registrations<R: FdRegistry + ?Sized>(&mut self, registry: &mut R) -> bool {
        for retired in self.retired.drain(..) {
            if !retired.registered.is_empty() {
                // Nothing to do if this fails: the fd is closed right after, which removes it from epoll.
                let _ = registry.remove(
                    retired.stream.as_raw_fd(),
                    retired.token,
                    retired.registered,
                );
            }
        }
        let mut failed = Vec::new();
        for (key, slot) in &mut self.connections {
            let wanted = slot.connection.interest();
            if wanted == slot.registered {
                continue;
            }
            let fd = slot.connection.stream().as_raw_fd();
            if wanted.is_empty() {
                // If epoll had already forgotten the fd there is nothing left to remove.
                let _ = registry.remove(fd, slot.token, slot.registered);
                slot.registered = EventSet::empty();
                continue;
            }
            let result = if slot.registered.is_empty() {
                registry.add(fd, slot.token, wanted)
            } else {
                registry.modify(fd, slot.token, wanted)
            };
            match result {
                Ok(()) => slot.registered = wanted,
                Err(_) => failed.push(*key),
            }
        }
        let any_failed = !failed.is_empty();
        for key in failed {
            if let Some(slot) = self.connections.get_mut(&key) {
                // An unwatched socket would stall the connection forever.
                slot.connection.reset();
                self.after_connection_change(key);
            }
        }
        if any_failed {
            // The reset connections now want nothing: unregister what was registered.
            for slot in self.connections.values_mut() {
                if slot.connection.interest().is_empty() && !slot.registered.is_empty() {
                    let fd = slot.connection.stream().as_raw_fd();
                    let _ = registry.remove(fd, slot.token, slot.registered);
                    slot.registered = EventSet::empty();
                }
            }
        }
        any_failed
    }

    /// Drops every connection (device reset). The host ends are shut down at once, so the control logic
    /// sees EOF; the sockets are closed at the next [`Muxer::sync_registrations`].
    pub fn reset(&mut self) {
        for (_, mut slot) in self.connections.drain() {
            slot.connection.close_host();
            self.closed_bytes.0 += slot.connection.bytes_to_host();
            self.closed_bytes.1 += slot.connection.bytes_to_guest();
            self.retired.push(Retired {
                stream: slot.connection.into_stream(),
                token: slot.token,
                registered: slot.registered,
            });
        }
        self.tokens.clear();
        self.rx_queue.clear();
        self.control.clear();
    }

    fn accept(&mut self, request: &Header, key: ConnectionKey) {
        let Some(listener) = self.listeners.get(&request.dst_port).cloned() else {
            // Nobody listens on that port: connection refused.
            self.reply_reset(request);
            return;
        };
        if self.connections.len() >= MAX_CONNECTIONS {
            self.reply_reset(request);
            return;
        }
        let Ok((ours, theirs)) = UnixStream::pair() else {
            self.reply_reset(request);
            return;
        };
        let Ok(connection) = Connection::new(self.guest_cid, request, ours) else {
            self.reply_reset(request);
            return;
        };
        // A port takes one connection: the control logic reads one stream per port, and a socket
        // handed to nobody would stay open until vmm exits (an unprivileged guest process looping
        // connect/close would take one host fd each time). Later requests are refused.
        self.listeners.remove(&request.dst_port);
        if listener.send(theirs).is_err() {
            // The control logic stopped listening on this port.
            self.reply_reset(request);
            return;
        }
        let token = self.allocate_token();
        self.tokens.insert(token, key);
        self.connections.insert(
            key,
            Slot {
                connection,
                token,
                registered: EventSet::empty(),
                in_rx_queue: false,
            },
        );
        self.after_connection_change(key);
    }

    fn allocate_token(&mut self) -> u32 {
        // At most MAX_CONNECTIONS tokens are taken, so this finds a free one quickly.
        loop {
            let token = self.next_token;
            self.next_token = token
                .checked_add(1)
                .unwrap_or(FIRST_CONNECTION_TOKEN)
                .max(FIRST_CONNECTION_TOKEN);
            if !self.tokens.contains_key(&token) {
                return token;
            }
        }
    }

    /// Queues an RST answering `header`, unless it is an RST itself.
    fn reply_reset(&mut self, header: &Header) {
        if header.op == op::RST {
            return;
        }
        if self.control.len() >= MAX_PENDING_CONTROL {
            self.dropped_control += 1;
            return;
        }
        self.control.push_back(header.reset_reply(self.guest_cid));
    }

    /// After anything happened to a connection: drop it if it is over, or queue it for rx if it has
    /// something for the guest.
    fn after_connection_change(&mut self, key: ConnectionKey) {
        let Some(slot) = self.connections.get_mut(&key) else {
            return;
        };
        if slot.connection.state() == State::Closed {
            if let Some(slot) = self.connections.remove(&key) {
                self.tokens.remove(&slot.token);
                self.rx_queue.retain(|k| *k != key);
                self.closed_bytes.0 += slot.connection.bytes_to_host();
                self.closed_bytes.1 += slot.connection.bytes_to_guest();
                self.retired.push(Retired {
                    stream: slot.connection.into_stream(),
                    token: slot.token,
                    registered: slot.registered,
                });
            }
            return;
        }
        if !slot.in_rx_queue && slot.connection.has_rx() {
            slot.in_rx_queue = true;
            self.rx_queue.push_back(key);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use crate::devices::virtio::vsock::{HOST_CID, TYPE_STREAM};
    use std::io::{Read, Write};
    use std::sync::mpsc::{channel, Receiver};

    /// Records registrations the way epoll would hold them.
    #[derive(Default)]
    pub(crate) struct FakeRegistry {
        pub watched: HashMap<u32, (RawFd, EventSet)>,
        pub fail_adds: bool,
    }

    impl FdRegistry for FakeRegistry {
        fn add(
            &mut self,
            fd: RawFd,
            token: u32,
            set: EventSet,
        ) -> Result<(), event_manager::Error> {
            if self.fail_adds {
                return Err(event_manager::Error::FdAlreadyRegistered);
            }
            assert!(
                self.watched.insert(token, (fd, set)).is_none(),
                "token registered twice"
            );
            Ok(())
        }
        fn modify(
            &mut self,
            fd: RawFd,
            token: u32,
            set: EventSet,
        ) -> Result<(), event_manager::Error> {
            let entry = self
                .watched
                .get_mut(&token)
                .expect("modify of unregistered");
            assert_eq!(entry.0, fd);
            entry.1 = set;
            Ok(())
        }
        fn remove(
            &mut self,
            fd: RawFd,
            token: u32,
            _: EventSet,
        ) -> Result<(), event_manager::Error> {
            let entry = self.watched.remove(&token).expect("remove of unregistered");
            assert_eq!(entry.0, fd);
            Ok(())
        }
    }

    const GUEST_CID: u64 = 3;

    fn header(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    fn muxer(ports: &[u32]) -> (Muxer, Vec<Receiver<UnixStream>>) {
        let mut listeners = HashMap::new();
        let mut receivers = Vec::new();
        for &p in ports {
            let (tx, rx) = channel();
            listeners.insert(p, tx);
            receivers.push(rx);
        }
        (Muxer::new(GUEST_CID, listeners), receivers)
    }

    /// Pops the next packet for the guest without a real queue: a plain buffer behind a mock chain.
    fn next_packet(m: &mut Muxer) -> Option<(Header, Vec<u8>)> {
        use crate::devices::virtio::GuestMemory;
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(
                0x1_0000,
                4096,
                VRING_DESC_F_WRITE as u16,
                0,
            ))])
            .unwrap();
        let mut writer = chain.writer(&mem).unwrap();
        let len = m.fill_rx(&mut writer)? as usize;
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(0x1_0000)).unwrap();
        let mut hb = [0u8; packet::HEADER_SIZE];
        hb.copy_from_slice(&buf[..packet::HEADER_SIZE]);
        Some((Header::from_bytes(&hb), buf[packet::HEADER_SIZE..].to_vec()))
    }

    #[test]
    fn request_to_listening_port_is_accepted_and_stream_delivered() {
        let (mut m, rxs) = muxer(&[1024]);
        let mut reg = FakeRegistry::default();
        m.handle_guest_packet(&header(op::REQUEST, 5000, 1024), &[]);
        let mut host = rxs[0].try_recv().expect("stream delivered");
        let (h, _) = next_packet(&mut m).unwrap();
        assert_eq!(h.op, op::RESPONSE);
        assert_eq!((h.src_port, h.dst_port), (1024, 5000));
        m.sync_registrations(&mut reg);
        let (&token, &(_, set)) = reg.watched.iter().next().unwrap();
        assert!(token >= FIRST_CONNECTION_TOKEN);
        assert_eq!(set, EventSet::IN);
        // data both ways
        let mut rw = header(op::RW, 5000, 1024);
        rw.len = 3;
        m.handle_guest_packet(&rw, b"abc");
        let mut buf = [0u8; 3];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        host.write_all(b"xyz").unwrap();
        m.handle_host_event(token, EventSet::IN);
        let (h, data) = next_packet(&mut m).unwrap();
        assert_eq!((h.op, data.as_slice()), (op::RW, &b"xyz"[..]));
        assert_eq!(m.bytes_counters(), (3, 3));
    }

    #[test]
    fn a_port_takes_one_connection_and_refuses_the_rest_without_a_socket() {
        let (mut m, rxs) = muxer(&[1024]);
        m.handle_guest_packet(&header(op::REQUEST, 5000, 1024), &[]);
        let mut a = rxs[0].try_recv().unwrap();
        assert_eq!(next_packet(&mut m).unwrap().0.op, op::RESPONSE);
        // a guest process looping connect/close on the same port
        for port in 6000..6500 {
            m.handle_guest_packet(&header(op::REQUEST, port, 1024), &[]);
            let (h, _) = next_packet(&mut m).unwrap();
            assert_eq!((h.op, h.dst_port), (op::RST, port));
            m.handle_guest_packet(&header(op::RST, port, 1024), &[]);
        }
        // no socket pair was made for any of them: none handed over, none kept to be closed later
        assert!(rxs[0].try_recv().is_err(), "no second stream handed over");
        assert!(m.retired.is_empty());
        assert_eq!(m.connections.len(), 1);
        // the first connection still works
        let mut rw = header(op::RW, 5000, 1024);
        rw.len = 1;
        m.handle_guest_packet(&rw, b"A");
        let mut c = [0u8; 1];
        a.read_exact(&mut c).unwrap();
        assert_eq!(&c, b"A");
    }

    #[test]
    fn unknown_port_and_unknown_connection_get_rst_but_rst_gets_nothing() {
        let (mut m, _rxs) = muxer(&[1024]);
        m.handle_guest_packet(&header(op::REQUEST, 5000, 9999), &[]);
        let (h, _) = next_packet(&mut m).unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 9999, 5000));
        for o in [op::RW, op::SHUTDOWN, op::CREDIT_UPDATE, op::RESPONSE, 42] {
            m.handle_guest_packet(&header(o, 5000, 1024), &[]);
            assert_eq!(next_packet(&mut m).unwrap().0.op, op::RST);
        }
        m.handle_guest_packet(&header(op::RST, 5000, 1024), &[]);
        assert!(next_packet(&mut m).is_none());
    }

    #[test]
    fn bad_addresses_and_type_get_rst() {
        let (mut m, rxs) = muxer(&[1024]);
        let mut h = header(op::REQUEST, 5000, 1024);
        h.dst_cid = 9;
        m.handle_guest_packet(&h, &[]);
        let mut h = header(op::REQUEST, 5000, 1024);
        h.src_cid = 4;
        m.handle_guest_packet(&h, &[]);
        let mut h = header(op::REQUEST, 5000, 1024);
        h.type_ = 2;
        m.handle_guest_packet(&h, &[]);
        for _ in 0..3 {
            let (r, _) = next_packet(&mut m).unwrap();
            assert_eq!((r.op, r.dst_cid), (op::RST, GUEST_CID));
        }
        assert!(rxs[0].try_recv().is_err());
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn pending_resets_are_bounded() {
        let (mut m, _rxs) = muxer(&[]);
        for port in 0..10_000 {
            m.handle_guest_packet(&header(op::RW, port, 1), &[]);
        }
        assert_eq!(m.control.len(), MAX_PENDING_CONTROL);
        assert_eq!(m.dropped_control, 10_000 - MAX_PENDING_CONTROL as u64);
    }

    #[test]
    fn connections_are_bounded_and_closed_ones_are_forgotten() {
        // each port takes one connection: as many listening ports as connections tried
        let ports: Vec<u32> = (0..MAX_CONNECTIONS as u32 + 5).map(|p| 1024 + p).collect();
        let (mut m, rxs) = muxer(&ports);
        let mut reg = FakeRegistry::default();
        for port in 0..(MAX_CONNECTIONS as u32 + 5) {
            m.handle_guest_packet(&header(op::REQUEST, port, 1024 + port), &[]);
        }
        assert_eq!(m.connection_count(), MAX_CONNECTIONS);
        m.sync_registrations(&mut reg);
        assert_eq!(reg.watched.len(), MAX_CONNECTIONS);
        let mut rsts = 0;
        let mut responses = 0;
        while let Some((h, _)) = next_packet(&mut m) {
            match h.op {
                op::RST => rsts += 1,
                op::RESPONSE => responses += 1,
                o => panic!("unexpected op {o}"),
            }
        }
        assert_eq!((responses, rsts), (MAX_CONNECTIONS, 5));
        // guest resets all of them: all forgotten, sockets unregistered
        for port in 0..MAX_CONNECTIONS as u32 {
            m.handle_guest_packet(&header(op::RST, port, 1024 + port), &[]);
        }
        assert_eq!(m.connection_count(), 0);
        m.sync_registrations(&mut reg);
        assert!(reg.watched.is_empty());
        assert!(m.rx_queue.is_empty());
        drop(rxs);
    }

    #[test]
    fn listener_gone_refuses_connections() {
        let (mut m, rxs) = muxer(&[1024]);
        drop(rxs);
        m.handle_guest_packet(&header(op::REQUEST, 5000, 1024), &[]);
        assert_eq!(next_packet(&mut m).unwrap().0.op, op::RST);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn malformed_packet_resets_its_connection() {
        let (mut m, rxs) = muxer(&[1024]);
        m.handle_guest_packet(&header(op::REQUEST, 5000, 1024), &[]);
        let _host = rxs[0].try_recv().unwrap();
        assert_eq!(next_packet(&mut m).unwrap().0.op, op::RESPONSE);
        m.handle_malformed_packet(Some(&header(op::RW, 5000, 1024)));
        assert_eq!(next_packet(&mut m).unwrap().0.op, op::RST);
        assert_eq!(m.connection_count(), 0);
        m.handle_malformed_packet(None);
        assert!(next_packet(&mut m).is_none());
    }

    #[test]
    fn failed_registration_resets_the_connection() {
        let (mut m, rxs) = muxer(&[1024]);
        let mut reg = FakeRegistry {
            fail_adds: true,
            ..Default::default()
        };
        m.handle_guest_packet(&header(op::REQUEST, 5000, 1024), &[]);
        let _host = rxs[0].try_recv().unwrap();
        assert!(m.sync_registrations(&mut reg));
        assert_eq!(next_packet(&mut m).unwrap().0.op, op::RST);
        assert_eq!(m.connection_count(), 0);
        assert!(reg.watched.is_empty());
    }

    #[test]
    fn reset_drops_everything_and_host_sees_eof() {
        let (mut m, rxs) = muxer(&[1024]);
        let mut reg = FakeRegistry::default();
        m.handle_guest_packet(&header(op::REQUEST, 5000, 1024), &[]);
        let mut host = rxs[0].try_recv().unwrap();
        m.sync_registrations(&mut reg);
        m.reset();
        assert!(!m.has_rx());
        assert_eq!(host.read(&mut [0u8; 1]).unwrap(), 0);
        m.sync_registrations(&mut reg);
        assert!(reg.watched.is_empty());
        assert_eq!(m.connection_count(), 0);
    }
}
