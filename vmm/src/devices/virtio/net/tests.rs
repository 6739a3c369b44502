//! The device end to end: a driver model on MockSplitQueue rings in real guest memory plays the guest,
//! and the other end of a socket pair plays passt.

// test data is small
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_ring::Ring;
use crate::devices::virtio::vsock::muxer::tests::FakeRegistry;
use crate::net::{NetAddresses, Policy};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GUEST4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const DNS4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const PUBLIC4: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);

const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x1_0000;
const USED_RING_OFFSET: u64 = 0x8000;
/// Each descriptor index owns a buffer this big: a largest frame and its header, rounded up.
const SLOT: u64 = 0x1_1000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = RX_BUFS + SLOT * QUEUE_SIZE as u64;
const MEM_SIZE: usize = (TX_BUFS + SLOT * QUEUE_SIZE as u64 + 0x10_0000) as usize;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn new_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn addrs() -> NetAddresses {
    NetAddresses {
        guest_mac: GUEST_MAC,
        guest_ipv4: GUEST4,
        gateway_ipv4: GW4,
        dns_ipv4: Some(DNS4),
        guest_ipv6: None,
        gateway_ipv6: None,
        dns_ipv6: None,
    }
}

/// A UDP datagram from the guest to `dst`:`port` with `len` bytes of patterned payload.
fn udp_frame(dst: Ipv4Addr, port: u16, len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&((20 + 8 + len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&GUEST4.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[0xc3, 0x50]);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&((8 + len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

/// A frame from passt to the guest (any bytes after the Ethernet header do).
fn rx_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn framed(frame: &[u8]) -> Vec<u8> {
    let mut out = (frame.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(frame);
    out
}

/// The guest's side of the rings.
struct Driver<'a> {
    mem: &'a GuestMemory,
    rx: MockSplitQueue<'a, GuestMemory>,
    tx: MockSplitQueue<'a, GuestMemory>,
    rx_free: Vec<u16>,
    tx_free: Vec<u16>,
    rx_chains: HashMap<u16, Vec<u16>>,
    tx_chains: HashMap<u16, Vec<u16>>,
    rx_used_seen: u16,
    tx_used_seen: u16,
}

/// The ring at `base` as this driver lays it out.
fn ring(base: u64) -> Ring {
    Ring {
        base,
        used_offset: USED_RING_OFFSET,
        size: QUEUE_SIZE,
    }
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemory) -> Self {
        Driver {
            mem,
            rx: MockSplitQueue::create(mem, GuestAddress(RX_RING), QUEUE_SIZE),
            tx: MockSplitQueue::create(mem, GuestAddress(TX_RING), QUEUE_SIZE),
            rx_free: (0..QUEUE_SIZE).rev().collect(),
            tx_free: (0..QUEUE_SIZE).rev().collect(),
            rx_chains: HashMap::new(),
            tx_chains: HashMap::new(),
            rx_used_seen: 0,
            tx_used_seen: 0,
        }
    }

    /// The device's queues, used rings moved clear of the avail rings (MockSplitQueue puts them
    /// close enough to overlap once more than half the entries are posted).
    fn queues(&self) -> Vec<Queue> {
        [(&self.rx, RX_RING), (&self.tx, TX_RING)]
            .into_iter()
            .map(|(mock, base)| ring(base).queue(mock))
            .collect()
    }

    fn used_elem(&self, base: u64, i: u16) -> (u32, u32) {
        ring(base).used_elem(self.mem, i)
    }

    fn used_idx(&self, base: u64) -> u16 {
        ring(base).used_idx(self.mem)
    }

    /// Puts a chain of (addr or u64::MAX for the descriptor's own slot, len, flags) on a ring.
    fn push(
        q: &MockSplitQueue<'a, GuestMemory>,
        free: &mut Vec<u16>,
        chains: &mut HashMap<u16, Vec<u16>>,
        base: u64,
        descs: &[(u64, u32, u16)],
    ) -> Option<Vec<u64>> {
        // the ring's own base does not matter for posting: only its size does
        ring(0).push_chain(q, free, chains, (base, SLOT), descs)
    }

    /// Queues a frame behind a zeroed header: in one descriptor, or header and frame apart.
    fn send(&mut self, frame: &[u8], split: bool) -> bool {
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        let descs: Vec<(u64, u32, u16)> = if split {
            vec![
                (u64::MAX, NET_HDR_LEN as u32, 0),
                (u64::MAX, frame.len() as u32, 0),
            ]
        } else {
            vec![(u64::MAX, bytes.len() as u32, 0)]
        };
        let Some(addrs) = Self::push(
            &self.tx,
            &mut self.tx_free,
            &mut self.tx_chains,
            TX_BUFS,
            &descs,
        ) else {
            return false;
        };
        if split {
            self.mem
                .write_slice(&bytes[..NET_HDR_LEN], GuestAddress(addrs[0]))
                .unwrap();
            self.mem.write_slice(frame, GuestAddress(addrs[1])).unwrap();
        } else {
            self.mem
                .write_slice(&bytes, GuestAddress(addrs[0]))
                .unwrap();
        }
        true
    }

    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        Self::push(
            &self.tx,
            &mut self.tx_free,
            &mut self.tx_chains,
            TX_BUFS,
            descs,
        )
        .unwrap();
    }

    /// Posts an rx buffer of `len` bytes, in one descriptor or as a header and the rest.
    fn post_rx(&mut self, len: u32, split: bool) -> bool {
        let descs = if split {
            vec![
                (u64::MAX, NET_HDR_LEN as u32, W),
                (u64::MAX, len - NET_HDR_LEN as u32, W),
            ]
        } else {
            vec![(u64::MAX, len, W)]
        };
        Self::push(
            &self.rx,
            &mut self.rx_free,
            &mut self.rx_chains,
            RX_BUFS,
            &descs,
        )
        .is_some()
    }

    fn post_rx_raw(&mut self, descs: &[(u64, u32, u16)]) {
        Self::push(
            &self.rx,
            &mut self.rx_free,
            &mut self.rx_chains,
            RX_BUFS,
            descs,
        )
        .unwrap();
    }

    /// Takes back the tx buffers the device is done with; returns how many.
    fn reclaim_tx(&mut self) -> usize {
        let used = self.used_idx(TX_RING);
        let mut n = 0;
        while self.tx_used_seen != used {
            let (id, len) = self.used_elem(TX_RING, self.tx_used_seen);
            assert_eq!(len, 0, "tx buffers come back with length 0");
            let chain = self.tx_chains.remove(&(id as u16)).expect("known chain");
            self.tx_free.extend(chain);
            self.tx_used_seen = self.tx_used_seen.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Takes back the rx buffers the device used, without looking into them (for chains whose
    /// layout the model does not follow).
    fn reclaim_rx(&mut self) -> usize {
        let used = self.used_idx(RX_RING);
        let mut n = 0;
        while self.rx_used_seen != used {
            let (id, _) = self.used_elem(RX_RING, self.rx_used_seen);
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let chain = self.rx_chains.remove(&(id as u16)).expect("known chain");
            self.rx_free.extend(chain);
            n += 1;
        }
        n
    }

    /// The frames the device delivered (header checked and stripped); None for a buffer returned
    /// empty.
    fn receive(&mut self) -> Vec<Option<Vec<u8>>> {
        let used = self.used_idx(RX_RING);
        let mut out = Vec::new();
        while self.rx_used_seen != used {
            let (id, len) = self.used_elem(RX_RING, self.rx_used_seen);
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let chain = self.rx_chains.remove(&(id as u16)).expect("known chain");
            let mut bytes = Vec::new();
            for &i in &chain {
                let d = SplitDescriptor::from(self.rx.desc_table().load(i).unwrap());
                let mut b = vec![0u8; d.len() as usize];
                if self.mem.read_slice(&mut b, d.addr()).is_ok() {
                    bytes.extend_from_slice(&b);
                }
            }
            self.rx_free.extend(chain);
            if len == 0 {
                out.push(None);
                continue;
            }
            let len = len as usize;
            let mut expected = [0u8; NET_HDR_LEN];
            expected[10] = 1;
            assert_eq!(
                bytes[..NET_HDR_LEN],
                expected,
                "virtio_net_hdr_v1, num_buffers 1"
            );
            out.push(Some(bytes[NET_HDR_LEN..len].to_vec()));
        }
        out
    }
}

/// The device on a fake registry, with passt's end of the socket.
struct Harness<'a> {
    drv: Driver<'a>,
    dev: Net,
    reg: FakeRegistry,
    irq: Arc<Interrupt>,
    passt: UnixStream,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemory) -> Self {
        Self::with_policy(mem, Policy::new(addrs(), Vec::new()))
    }

    fn with_policy(mem: &'a GuestMemory, policy: Policy) -> Self {
        let drv = Driver::new(mem);
        let (ours, passt) = UnixStream::pair().unwrap();
        passt.set_nonblocking(true).unwrap();
        let mut dev = Net::new(GUEST_MAC, ours, policy).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: drv.queues(),
            interrupt: irq.clone(),
            acked_features: dev.features(),
        })
        .unwrap();
        let mut h = Harness {
            drv,
            dev,
            reg: FakeRegistry::default(),
            irq,
            passt,
        };
        // the wake-up activation leaves for the event loop
        h.event(RX_TOKEN);
        h
    }

    fn event(&mut self, token: u32) {
        self.dev.handle_event(token, EventSet::IN, &mut self.reg);
    }

    fn kick_tx(&mut self) {
        self.event(TX_TOKEN);
        self.drv.reclaim_tx();
    }

    fn kick_rx(&mut self) {
        self.event(RX_TOKEN);
    }

    /// The socket as epoll would report it: only for what it is watched.
    fn socket_ready(&mut self) {
        if let Some(&(_, set)) = self.reg.watched.get(&SOCKET_TOKEN) {
            self.dev.handle_event(SOCKET_TOKEN, set, &mut self.reg);
        }
    }

    fn interest(&self) -> Option<EventSet> {
        self.reg.watched.get(&SOCKET_TOKEN).map(|&(_, s)| s)
    }

    /// Everything passt has been sent so far, cut into frames.
    fn passt_frames(&mut self) -> Vec<Vec<u8>> {
        let bytes = read_available(&mut self.passt);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            frames.push(bytes[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        frames
    }

    fn counter(&self, name: &str) -> u64 {
        self.dev
            .counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| v)
    }
}

fn read_available(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    out
}

#[test]
fn identity_features_and_mac_in_config_space() {
    let (ours, _passt) = UnixStream::pair().unwrap();
    let dev = Net::new(GUEST_MAC, ours, Policy::new(addrs(), Vec::new())).unwrap();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.features(), VIRTIO_F_VERSION_1 | 1 << 5);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let mut mac = [0u8; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, GUEST_MAC);
    let mut rest = [0xffu8; 4];
    dev.read_config(6, &mut rest);
    assert_eq!(rest, [0; 4]);
    let mut odd = [0u8; 2];
    dev.read_config(u64::MAX, &mut odd);
    assert_eq!(odd, [0, 0]);
}

#[test]
fn allowed_frames_reach_passt_length_prefixed_in_either_layout() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let a = udp_frame(PUBLIC4, 443, 100, 1);
    let b = udp_frame(PUBLIC4, 443, 1400, 2);
    assert!(h.drv.send(&a, false));
    assert!(h.drv.send(&b, true));
    h.kick_tx();
    assert_eq!(h.passt_frames(), vec![a.clone(), b.clone()]);
    assert_eq!(
        h.drv.tx_free.len(),
        QUEUE_SIZE as usize,
        "every chain returned"
    );
    assert_eq!(h.counter("tx_frames"), 2);
    assert_eq!(h.counter("tx_bytes"), (a.len() + b.len()) as u64);
    assert!(h.irq.irqfd().read().unwrap() > 0);
}

#[test]
fn denied_frames_are_consumed_counted_and_never_sent() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let metadata = udp_frame(Ipv4Addr::new(169, 254, 169, 254), 80, 10, 0);
    let private = udp_frame(Ipv4Addr::new(192, 168, 1, 1), 80, 10, 0);
    let mut spoofed = udp_frame(PUBLIC4, 80, 10, 0);
    spoofed[26] = 11;
    let allowed = udp_frame(PUBLIC4, 80, 10, 0);
    for f in [&metadata, &private, &spoofed, &allowed] {
        assert!(h.drv.send(f, false));
    }
    h.kick_tx();
    assert_eq!(h.passt_frames(), vec![allowed]);
    assert_eq!(h.drv.tx_free.len(), QUEUE_SIZE as usize);
    assert_eq!(h.counter("tx_dropped"), 3);
    assert_eq!(h.counter("dropped_to_metadata"), 1);
    assert_eq!(h.counter("dropped_to_private"), 1);
    assert_eq!(h.counter("dropped_spoofed_source"), 1);
    // reasons that did not happen are left out
    assert!(h.dev.counters().iter().all(|(n, _)| *n != "dropped_vlan"));
}

/// A SYN from the guest to `dst`:`port`.
fn syn_frame(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&GUEST4.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[0xc3, 0x50]);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&[
        0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f
}

#[test]
fn refused_connections_get_a_reset_at_once() {
    let mem = new_mem();
    let policy = Policy::new(
        addrs(),
        vec![Policy::parse_allow("93.184.216.34:443").unwrap()],
    );
    let mut h = Harness::with_policy(&mem, policy);
    let allowed = syn_frame(PUBLIC4, 443);
    assert!(h
        .drv
        .send(&syn_frame(Ipv4Addr::new(169, 254, 169, 254), 80), false));
    assert!(h.drv.send(&syn_frame(PUBLIC4, 22), false));
    assert!(h.drv.send(&allowed, false));
    // spoofed: dropped without an answer
    let mut spoofed = syn_frame(PUBLIC4, 22);
    spoofed[29] = 99;
    assert!(h.drv.send(&spoofed, false));
    h.kick_tx();
    assert_eq!(h.passt_frames(), vec![allowed]);
    assert_eq!(h.counter("tx_refused_with_reset"), 2);
    // the resets wait for rx buffers, and come before anything passt sends; meanwhile the readable
    // socket is not watched (it would wake the loop for nothing)
    h.passt.write_all(&framed(&rx_frame(100, 1))).unwrap();
    assert_eq!(h.interest(), None);
    for _ in 0..3 {
        h.drv.post_rx(1526, false);
    }
    h.kick_rx();
    let got: Vec<_> = h.drv.receive().into_iter().map(Option::unwrap).collect();
    assert_eq!(got.len(), 3);
    for (rst, from) in got[..2]
        .iter()
        .zip([[169, 254, 169, 254], [93, 184, 216, 34]])
    {
        assert_eq!(&rst[..6], &GUEST_MAC);
        assert_eq!(&rst[14 + 12..14 + 16], &from);
        assert_eq!(&rst[14 + 16..14 + 20], &GUEST4.octets());
        assert_eq!(rst[14 + 20 + 13], 0x14, "RST|ACK");
        assert_eq!(&rst[14 + 20 + 8..14 + 20 + 12], &0x1001u32.to_be_bytes());
    }
    assert_eq!(got[2], rx_frame(100, 1));
    assert_eq!(
        h.counter("rx_frames"),
        1,
        "resets are not counted as passt's frames"
    );
}

#[test]
fn malformed_tx_chains_are_returned_and_counted() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    // shorter than a header; a header and less than an Ethernet header; write-only; outside memory;
    // longer than a largest frame; an indirect table
    h.drv.send_raw(&[(u64::MAX, 11, 0)]);
    h.drv.send_raw(&[(u64::MAX, (NET_HDR_LEN + 13) as u32, 0)]);
    h.drv.send_raw(&[(u64::MAX, 100, W)]);
    h.drv.send_raw(&[(MEM_SIZE as u64 - 10, 100, 0)]);
    h.drv
        .send_raw(&[(u64::MAX, 0x1_0000, 0), (u64::MAX, 0x1_0000, 0)]);
    h.drv
        .send_raw(&[(u64::MAX, 64, VRING_DESC_F_INDIRECT as u16)]);
    h.drv.send_raw(&[(0, 0, 0)]);
    h.kick_tx();
    assert_eq!(
        h.drv.tx_free.len(),
        QUEUE_SIZE as usize,
        "every chain returned"
    );
    assert_eq!(h.counter("tx_malformed"), 7);
    assert!(h.passt_frames().is_empty());
    // the queue still works
    let f = udp_frame(PUBLIC4, 53, 20, 3);
    assert!(h.drv.send(&f, true));
    h.kick_tx();
    assert_eq!(h.passt_frames(), vec![f]);
}

#[test]
fn a_full_socket_holds_the_queue_back_and_loses_nothing() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let frames: Vec<Vec<u8>> = (0..200)
        .map(|i| udp_frame(PUBLIC4, 443, 8000, i as u8))
        .collect();
    let mut sent = 0;
    let mut received = Vec::new();
    let mut stalled = false;
    while received.len() < frames.len() {
        while sent < frames.len() && h.drv.send(&frames[sent], sent % 2 == 0) {
            sent += 1;
        }
        h.kick_tx();
        if h.interest().is_some_and(|s| s.contains(EventSet::OUT)) {
            stalled = true;
            // chains are left in the queue while the socket is full
            assert!(h.drv.tx_free.len() < QUEUE_SIZE as usize || sent == frames.len());
        }
        received.extend(h.passt_frames());
        h.socket_ready();
        h.drv.reclaim_tx();
        received.extend(h.passt_frames());
    }
    assert!(stalled, "1.6 MB should fill a socket pair's buffer");
    assert_eq!(received, frames);
    assert_eq!(h.counter("tx_frames"), 200);
    assert!(!h.interest().is_some_and(|s| s.contains(EventSet::OUT)));
}

#[test]
fn frames_from_passt_land_in_rx_buffers_of_either_layout() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let frames = [rx_frame(60, 1), rx_frame(1514, 2), rx_frame(14, 3)];
    for f in &frames {
        h.passt.write_all(&framed(f)).unwrap();
    }
    h.drv.post_rx(1526, true);
    h.drv.post_rx(1526, false);
    h.drv.post_rx(1526, false);
    h.kick_rx();
    let got: Vec<_> = h.drv.receive().into_iter().map(Option::unwrap).collect();
    assert_eq!(got, frames);
    assert_eq!(h.counter("rx_frames"), 3);
    assert_eq!(h.counter("rx_bytes"), 60 + 1514 + 14);
}

#[test]
fn rx_waits_for_buffers_without_watching_the_socket() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    assert_eq!(h.interest(), Some(EventSet::IN));
    let frames: Vec<_> = (0..5).map(|i| rx_frame(100 + i, i as u8)).collect();
    for f in &frames {
        h.passt.write_all(&framed(f)).unwrap();
    }
    h.socket_ready();
    // a whole frame waits for a buffer: the readable socket must not wake the loop meanwhile
    assert_eq!(h.interest(), None);
    assert!(h.drv.receive().is_empty());
    for _ in 0..2 {
        h.drv.post_rx(2048, false);
    }
    h.kick_rx();
    assert_eq!(h.drv.receive().len(), 2);
    assert_eq!(h.interest(), None);
    for _ in 0..8 {
        h.drv.post_rx(2048, false);
    }
    h.kick_rx();
    let got: Vec<_> = h.drv.receive().into_iter().map(Option::unwrap).collect();
    assert_eq!(got, frames[2..]);
    assert_eq!(h.interest(), Some(EventSet::IN));
    // a frame split across writes arrives whole
    let f = rx_frame(900, 9);
    let bytes = framed(&f);
    h.passt.write_all(&bytes[..2]).unwrap();
    h.socket_ready();
    h.passt.write_all(&bytes[2..500]).unwrap();
    h.socket_ready();
    assert!(h.drv.receive().is_empty());
    h.passt.write_all(&bytes[500..]).unwrap();
    h.socket_ready();
    assert_eq!(h.drv.receive(), vec![Some(f)]);
}

#[test]
fn oversized_and_runt_frames_are_dropped_and_the_buffer_kept() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let big = rx_frame(9000, 1);
    let runt = vec![1u8; 13];
    let ok = rx_frame(1000, 2);
    for f in [&big, &runt, &ok] {
        h.passt.write_all(&framed(f)).unwrap();
    }
    h.drv.post_rx(1526, false);
    h.kick_rx();
    assert_eq!(h.drv.receive(), vec![Some(ok)]);
    assert_eq!(h.counter("rx_dropped"), 2);
    // a largest frame fits a large enough buffer
    let largest = rx_frame(MAX_FRAME_LEN, 3);
    h.passt.write_all(&framed(&largest)).unwrap();
    h.drv.post_rx((NET_HDR_LEN + MAX_FRAME_LEN) as u32, true);
    h.socket_ready();
    assert_eq!(h.drv.receive(), vec![Some(largest)]);
}

#[test]
fn unusable_rx_chains_are_returned_empty() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    h.passt.write_all(&framed(&rx_frame(100, 1))).unwrap();
    h.drv.post_rx_raw(&[(u64::MAX, 2048, 0)]); // device-readable
    h.drv.post_rx_raw(&[(MEM_SIZE as u64 - 8, 2048, W)]); // outside memory
    h.drv
        .post_rx_raw(&[(u64::MAX, 64, W | VRING_DESC_F_INDIRECT as u16)]);
    h.drv.post_rx(2048, false);
    h.kick_rx();
    let got = h.drv.receive();
    assert_eq!(got.len(), 4);
    assert_eq!(got[..3], [None, None, None]);
    assert_eq!(got[3], Some(rx_frame(100, 1)));
}

#[test]
fn a_frame_length_over_the_limit_ends_the_connection() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let ok = rx_frame(100, 1);
    h.passt.write_all(&framed(&ok)).unwrap();
    h.passt
        .write_all(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes())
        .unwrap();
    h.drv.post_rx(2048, false);
    h.drv.post_rx(2048, false);
    h.kick_rx();
    assert_eq!(h.drv.receive(), vec![Some(ok)]);
    assert_eq!(
        h.dev.backend_end(),
        Some(&BackendEnd::FrameTooLong(MAX_FRAME_LEN + 1))
    );
    assert_eq!(h.interest(), None, "the socket is no longer watched");
    // the guest's frames are still consumed, and counted
    assert!(h.drv.send(&udp_frame(PUBLIC4, 443, 10, 0), false));
    h.kick_tx();
    assert_eq!(h.drv.tx_free.len(), QUEUE_SIZE as usize);
    assert_eq!(h.counter("tx_no_backend"), 1);
}

#[test]
fn passt_going_away_ends_the_connection_cleanly() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let last = rx_frame(200, 4);
    h.passt.write_all(&framed(&last)).unwrap();
    // and half of another frame
    h.passt.write_all(&[0, 0, 1]).unwrap();
    let Harness { passt, .. } = &mut h;
    let (_, dead) = UnixStream::pair().unwrap();
    drop(std::mem::replace(passt, dead));
    h.drv.post_rx(2048, false);
    h.drv.post_rx(2048, false);
    h.socket_ready();
    assert_eq!(h.drv.receive(), vec![Some(last)]);
    assert_eq!(h.dev.backend_end(), Some(&BackendEnd::Closed));
    assert_eq!(h.interest(), None);
    assert!(h.drv.send(&udp_frame(PUBLIC4, 443, 10, 0), true));
    h.kick_tx();
    assert_eq!(h.counter("tx_no_backend"), 1);
}

#[test]
fn dns_answers_from_passt_teach_the_policy_allowed_names() {
    use crate::net::dns::tests::{response, TO_QUESTION};
    let mem = new_mem();
    let policy = Policy::new(
        addrs(),
        vec![Policy::parse_allow("proxy.example.com:443").unwrap()],
    );
    let mut h = Harness::with_policy(&mem, policy);
    let target = Ipv4Addr::new(151, 101, 1, 1);
    let query = udp_frame(DNS4, 53, 30, 0);
    let denied = udp_frame(target, 443, 30, 0);
    assert!(h.drv.send(&query, false));
    assert!(h.drv.send(&denied, false));
    h.kick_tx();
    assert_eq!(h.passt_frames(), vec![query]);
    // passt relays the answer
    let message = response(
        "proxy.example.com",
        &[(TO_QUESTION.to_vec(), 1, target.octets().to_vec())],
    );
    let mut udp = vec![0, 53, 0xc3, 0x50];
    udp.extend_from_slice(&((8 + message.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&message);
    let mut answer = Vec::new();
    answer.extend_from_slice(&GUEST_MAC);
    answer.extend_from_slice(&GW_MAC);
    answer.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    answer.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    answer.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    answer.extend_from_slice(&DNS4.octets());
    answer.extend_from_slice(&GUEST4.octets());
    answer.extend_from_slice(&udp);
    h.passt.write_all(&framed(&answer)).unwrap();
    h.drv.post_rx(2048, false);
    h.socket_ready();
    assert_eq!(h.drv.receive(), vec![Some(answer)]);
    assert!(h.drv.send(&denied, false));
    h.kick_tx();
    assert_eq!(h.passt_frames(), vec![denied]);
    assert_eq!(h.counter("dns_learned"), 1);
    assert_eq!(h.counter("dropped_not_allowed"), 1);
}

#[test]
fn random_chains_never_panic_or_stall() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let mut seed = 0x0123_4567_89ab_cdefu64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        for _ in 0..(next() % 6) {
            let n = 1 + (next() % 3) as usize;
            let descs: Vec<(u64, u32, u16)> = (0..n)
                .map(|_| {
                    let addr = match next() % 4 {
                        0 => next() % (MEM_SIZE as u64 + 0x1000),
                        _ => u64::MAX,
                    };
                    let len = match next() % 3 {
                        0 => (next() % 64) as u32,
                        1 => (next() % 2048) as u32,
                        _ => (next() % 0x1_0000) as u32,
                    };
                    let flags = match next() % 8 {
                        0 => W,
                        1 => VRING_DESC_F_INDIRECT as u16,
                        _ => 0,
                    };
                    (addr, len, flags)
                })
                .collect();
            if h.drv.tx_free.len() >= n {
                h.drv.send_raw(&descs);
            }
            let rx: Vec<_> = descs.iter().map(|&(a, l, f)| (a, l, f ^ W)).collect();
            if h.drv.rx_free.len() >= n {
                h.drv.post_rx_raw(&rx);
            }
        }
        if round % 3 == 0 {
            let len = (next() % 1500) as usize;
            let _ = h.passt.write_all(&framed(&rx_frame(len, round as u8)));
        }
        h.kick_tx();
        h.kick_rx();
        h.socket_ready();
        h.drv.reclaim_rx();
        read_available(&mut h.passt);
    }
    assert!(h.dev.backend_end().is_none());
    assert_eq!(h.drv.reclaim_tx(), 0);
    assert_eq!(h.drv.tx_free.len(), QUEUE_SIZE as usize, "no tx chain held");
}

#[test]
fn reset_and_activate_again_keeps_the_stream_in_step() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let first = rx_frame(300, 1);
    let bytes = framed(&first);
    // half a frame read before the reset
    h.passt.write_all(&bytes[..100]).unwrap();
    h.socket_ready();
    assert!(h.dev.reset());
    assert!(h
        .dev
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: h.drv.queues(),
            interrupt: h.irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .is_ok());
    assert!(matches!(
        h.dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: h.drv.queues(),
            interrupt: h.irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        }),
        Err(ActivateError::AlreadyActive)
    ));
    h.passt.write_all(&bytes[100..]).unwrap();
    h.drv.post_rx(2048, false);
    h.kick_rx();
    assert_eq!(h.drv.receive(), vec![Some(first)]);
}

/// The device under a real EventManager: queue kicks through the eventfds, the socket through epoll,
/// a few thousand frames each way with a peer thread playing passt.
#[test]
fn event_manager_drives_frames_both_ways() {
    const FRAMES: usize = 2000;
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let (ours, passt) = UnixStream::pair().unwrap();
    let dev = Arc::new(Mutex::new(
        Net::new(GUEST_MAC, ours, Policy::new(addrs(), Vec::new())).unwrap(),
    ));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(dev.clone());
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.lock()
        .unwrap()
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: drv.queues(),
            interrupt: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1 | 1 << 5,
        })
        .unwrap();
    // passt: sends FRAMES frames, and reads until it has seen FRAMES frames from the guest
    let mut writer = passt.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..FRAMES {
            writer
                .write_all(&framed(&rx_frame(60 + (i * 37) % 1400, i as u8)))
                .unwrap();
        }
    });
    let mut reader = passt;
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..FRAMES {
            let mut len = [0u8; 4];
            reader.read_exact(&mut len).unwrap();
            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
            reader.read_exact(&mut f).unwrap();
            got.push(f);
        }
        got
    });
    let kick = |q: usize| dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    let mut sent = 0;
    let mut received = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while (sent < FRAMES || received.len() < FRAMES) && std::time::Instant::now() < deadline {
        drv.reclaim_tx();
        let mut queued = false;
        while sent < FRAMES
            && drv.send(
                &udp_frame(PUBLIC4, 443, 100 + sent % 1000, sent as u8),
                sent % 2 == 1,
            )
        {
            sent += 1;
            queued = true;
        }
        if queued {
            kick(TX_QUEUE);
        }
        let mut posted = false;
        while drv.rx_free.len() >= 2 && drv.post_rx(1526, received.len() % 2 == 0) {
            posted = true;
        }
        if posted {
            kick(RX_QUEUE);
        }
        em.run_with_timeout(10).unwrap();
        received.extend(drv.receive().into_iter().map(Option::unwrap));
    }
    sender.join().unwrap();
    let to_passt = receiver.join().unwrap();
    let expected_rx: Vec<_> = (0..FRAMES)
        .map(|i| rx_frame(60 + (i * 37) % 1400, i as u8))
        .collect();
    let expected_tx: Vec<_> = (0..FRAMES)
        .map(|i| udp_frame(PUBLIC4, 443, 100 + i % 1000, i as u8))
        .collect();
    assert!(
        received == expected_rx,
        "frames to the guest arrive whole and in order"
    );
    assert!(
        to_passt == expected_tx,
        "frames to passt arrive whole and in order"
    );
    let stats = dev.lock().unwrap().stats();
    assert_eq!(
        (stats.tx_frames, stats.rx_frames),
        (FRAMES as u64, FRAMES as u64)
    );
    assert!(irq.irqfd().read().unwrap() > 0);
}

/// With passt installed: the guest's ARP request for the gateway goes through the policy to a real
/// passt, and passt's reply lands in an rx buffer.
#[test]
fn a_real_passt_answers_the_guests_arp_request() {
    let Some(program) = crate::net::passt::find() else {
        eprintln!("passt is not installed: skipped");
        return;
    };
    let (_passt, socket) = crate::net::passt::start(&program).unwrap();
    let mem = new_mem();
    let drv = Driver::new(&mem);
    let policy = Policy::new(crate::net::passt::addresses(), Vec::new());
    let mut dev = Net::new(crate::net::passt::GUEST_MAC, socket, policy).unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: drv.queues(),
        interrupt: irq,
        acked_features: VIRTIO_F_VERSION_1,
    })
    .unwrap();
    let mut h = Harness {
        drv,
        dev,
        reg: FakeRegistry::default(),
        irq: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        passt: UnixStream::pair().unwrap().0,
    };
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&crate::net::passt::GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&crate::net::passt::GUEST_MAC);
    arp.extend_from_slice(&crate::net::passt::GUEST_IPV4.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&crate::net::passt::GATEWAY_IPV4.octets());
    h.drv.post_rx(1526, false);
    assert!(h.drv.send(&arp, false));
    h.kick_tx();
    assert_eq!(h.counter("tx_frames"), 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reply = loop {
        h.socket_ready();
        if let Some(Some(frame)) = h.drv.receive().pop() {
            break frame;
        }
        assert!(std::time::Instant::now() < deadline, "no answer from passt");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(&reply[..6], &crate::net::passt::GUEST_MAC);
    assert_eq!(&reply[12..14], &[0x08, 0x06]);
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&reply[28..32], &crate::net::passt::GATEWAY_IPV4.octets());
}
