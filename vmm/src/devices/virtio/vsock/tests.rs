//! Device-level tests: a driver model on MockSplitQueue rings in a GuestMemoryMmap, playing the guest,
//! against the whole device. Host sockets are driven either by a fake registry that fires every watched
//! socket (spurious wake-ups included, which the device must tolerate) or by a real EventManager.

// test data is small
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventSet, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::tests::FakeRegistry;
use super::packet::{Header, HEADER_SIZE};
use super::*;
use crate::devices::virtio::test_ring::Ring;
use crate::devices::virtio::{
    ActivateContext, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};

const GUEST_CID: u64 = 3;
const PORT: u32 = 1024;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x1_0000;
const EVENT_RING: u64 = 0x2_0000;
/// Where each queue's used ring lives, from the queue's base.
const USED_RING_OFFSET: u64 = 0x8000;
/// Each descriptor index of each queue owns a buffer this big (a full packet plus slack).
const SLOT: u64 = 0x1_0100;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = RX_BUFS + SLOT * QUEUE_SIZE as u64;
const MEM_SIZE: usize = (TX_BUFS + SLOT * QUEUE_SIZE as u64 + 0x10_0000) as usize;

fn new_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// How the driver lays out an rx buffer.
#[derive(Clone, Copy)]
enum RxLayout {
    /// Header and data in separate descriptors (Linux up to 6.1).
    Split { data: u32 },
    /// One descriptor for both (Linux 6.2+).
    Single { len: u32 },
}

/// The guest's side of the rings.
struct Driver<'a> {
    mem: &'a GuestMemory,
    rx: MockSplitQueue<'a, GuestMemory>,
    tx: MockSplitQueue<'a, GuestMemory>,
    event: MockSplitQueue<'a, GuestMemory>,
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
            event: MockSplitQueue::create(mem, GuestAddress(EVENT_RING), QUEUE_SIZE),
            rx_free: (0..QUEUE_SIZE).rev().collect(),
            tx_free: (0..QUEUE_SIZE).rev().collect(),
            rx_chains: HashMap::new(),
            tx_chains: HashMap::new(),
            rx_used_seen: 0,
            tx_used_seen: 0,
        }
    }

    /// The device's queues. MockSplitQueue::create puts the used ring `len` bytes after the start of
    /// the avail ring entries, which are 2 bytes each: with more than len/2 entries posted the two
    /// overlap. The used rings are therefore moved to an area of their own and read by hand.
    fn queues(&self) -> Vec<Queue> {
        [
            (&self.rx, RX_RING),
            (&self.tx, TX_RING),
            (&self.event, EVENT_RING),
        ]
        .into_iter()
        .map(|(mock, base)| ring(base).queue(mock))
        .collect()
    }

    /// Entry `i` of the used ring at `base` (the queue's base address): (descriptor id, length).
    fn used_elem(&self, base: u64, i: u16) -> (u32, u32) {
        ring(base).used_elem(self.mem, i)
    }

    fn used_idx(&self, base: u64) -> u16 {
        ring(base).used_idx(self.mem)
    }

    /// Puts a chain of (len, flags) descriptors on a ring; descriptor i uses its own buffer slot.
    fn push_chain(
        q: &MockSplitQueue<'a, GuestMemory>,
        free: &mut Vec<u16>,
        chains: &mut HashMap<u16, Vec<u16>>,
        base: u64,
        descs: &[(u64, u32, u16)],
    ) -> Option<Vec<u64>> {
        // the ring's own base does not matter for posting: only its size does
        ring(0).push_chain(q, free, chains, (base, SLOT), descs)
    }

    fn post_rx(&mut self, layout: RxLayout) -> bool {
        let w = VRING_DESC_F_WRITE as u16;
        let descs: Vec<(u64, u32, u16)> = match layout {
            RxLayout::Split { data } => {
                vec![(u64::MAX, HEADER_SIZE as u32, w), (u64::MAX, data, w)]
            }
            RxLayout::Single { len } => vec![(u64::MAX, len, w)],
        };
        Self::push_chain(
            &self.rx,
            &mut self.rx_free,
            &mut self.rx_chains,
            RX_BUFS,
            &descs,
        )
        .is_some()
    }

    fn rx_in_flight(&self) -> usize {
        self.rx_chains.len()
    }

    /// Queues a packet: header in one descriptor, payload (if any) in a second.
    fn send(&mut self, header: &Header, payload: &[u8]) -> bool {
        let mut descs = vec![(u64::MAX, HEADER_SIZE as u32, 0)];
        if !payload.is_empty() {
            descs.push((u64::MAX, payload.len() as u32, 0));
        }
        let Some(addrs) = Self::push_chain(
            &self.tx,
            &mut self.tx_free,
            &mut self.tx_chains,
            TX_BUFS,
            &descs,
        ) else {
            return false;
        };
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(addrs[0]))
            .unwrap();
        if !payload.is_empty() {
            self.mem
                .write_slice(payload, GuestAddress(addrs[1]))
                .unwrap();
        }
        true
    }

    /// Queues an arbitrary chain of (addr or u64::MAX for the slot, len, flags) on tx, with `bytes`
    /// written at the start of the first descriptor.
    fn send_raw(&mut self, descs: &[(u64, u32, u16)], bytes: &[u8]) {
        let addrs = Self::push_chain(
            &self.tx,
            &mut self.tx_free,
            &mut self.tx_chains,
            TX_BUFS,
            descs,
        )
        .unwrap();
        if !bytes.is_empty() {
            self.mem.write_slice(bytes, GuestAddress(addrs[0])).unwrap();
        }
    }

    fn post_rx_raw(&mut self, descs: &[(u64, u32, u16)]) {
        Self::push_chain(
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
            assert_eq!(len, 0, "tx buffers are returned with length 0");
            let chain = self.tx_chains.remove(&(id as u16)).expect("known chain");
            self.tx_free.extend(chain);
            self.tx_used_seen = self.tx_used_seen.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Takes the packets the device put in rx buffers. Buffers returned with a length under a header
    /// are reported with `None`.
    fn receive(&mut self) -> Vec<Option<(Header, Vec<u8>)>> {
        let used = self.used_idx(RX_RING);
        let mut out = Vec::new();
        while self.rx_used_seen != used {
            let (id, len) = self.used_elem(RX_RING, self.rx_used_seen);
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let chain = self.rx_chains.remove(&(id as u16)).expect("known chain");
            // Gather the bytes of the chain, in order.
            let mut bytes = Vec::new();
            for &i in &chain {
                let d = SplitDescriptor::from(self.rx.desc_table().load(i).unwrap());
                let mut b = vec![0u8; d.len() as usize];
                if self.mem.read_slice(&mut b, d.addr()).is_ok() {
                    bytes.extend_from_slice(&b);
                }
            }
            self.rx_free.extend(chain);
            let len = len as usize;
            if len < HEADER_SIZE {
                out.push(None);
                continue;
            }
            let mut hb = [0u8; HEADER_SIZE];
            hb.copy_from_slice(&bytes[..HEADER_SIZE]);
            let header = Header::from_bytes(&hb);
            assert_eq!(header.len as usize + HEADER_SIZE, len, "used length");
            out.push(Some((header, bytes[HEADER_SIZE..len].to_vec())));
        }
        out
    }
}

/// The device with its queues, run on a fake registry.
struct Harness<'a> {
    drv: Driver<'a>,
    dev: Vsock,
    reg: FakeRegistry,
    irq: Arc<Interrupt>,
    listeners: Vec<Receiver<UnixStream>>,
}

fn listeners(
    ports: &[u32],
) -> (
    HashMap<u32, std::sync::mpsc::Sender<UnixStream>>,
    Vec<Receiver<UnixStream>>,
) {
    let mut map = HashMap::new();
    let mut rxs = Vec::new();
    for &p in ports {
        let (tx, rx) = channel();
        map.insert(p, tx);
        rxs.push(rx);
    }
    (map, rxs)
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemory) -> Self {
        let drv = Driver::new(mem);
        let (map, rxs) = listeners(&[PORT]);
        let mut dev = Vsock::new(GUEST_CID, map).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: drv.queues(),
            interrupt: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        Harness {
            drv,
            dev,
            reg: FakeRegistry::default(),
            irq,
            listeners: rxs,
        }
    }

    fn kick_tx(&mut self) {
        self.dev
            .handle_event(TX_QUEUE as u32, EventSet::IN, &mut self.reg);
        self.drv.reclaim_tx();
    }

    fn kick_rx(&mut self) {
        self.dev
            .handle_event(RX_QUEUE as u32, EventSet::IN, &mut self.reg);
    }

    /// Fires every watched host socket with what it is watched for.
    fn poll_host(&mut self) {
        let watched: Vec<(u32, EventSet)> = self
            .reg
            .watched
            .iter()
            .map(|(&t, &(_, s))| (t, s))
            .collect();
        for (token, set) in watched {
            self.dev.handle_event(token, set, &mut self.reg);
        }
    }

    fn send(&mut self, header: &Header, payload: &[u8]) {
        assert!(self.drv.send(header, payload));
        self.kick_tx();
    }

    fn receive(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.drv.receive().into_iter().flatten().collect()
    }

    fn fill_rx(&mut self, n: usize) {
        for _ in 0..n {
            assert!(self.drv.post_rx(RxLayout::Split { data: 4096 }));
        }
        self.kick_rx();
    }

    /// Connects guest port `guest_port` to PORT; returns the guest's view and the host's stream.
    fn connect(&mut self, guest_port: u32, guest_buf_alloc: u32) -> (GuestConn, UnixStream) {
        let mut g = GuestConn::new(guest_port, PORT, guest_buf_alloc);
        self.fill_rx(1);
        self.send(&g.header(op::REQUEST, 0), &[]);
        let pkts = self.receive();
        assert_eq!(pkts.len(), 1);
        let (h, _) = &pkts[0];
        assert_eq!(h.op, op::RESPONSE);
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!((h.src_port, h.dst_port), (PORT, guest_port));
        assert_eq!(h.type_, TYPE_STREAM);
        g.saw(h);
        let stream = self.listeners[0].try_recv().expect("stream handed over");
        (g, stream)
    }
}

/// The guest's bookkeeping for one connection, as an honest driver keeps it.
struct GuestConn {
    src_port: u32,
    dst_port: u32,
    buf_alloc: u32,
    /// Bytes the guest application consumed.
    fwd_cnt: u32,
    /// fwd_cnt last told to the device.
    fwd_cnt_sent: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl GuestConn {
    fn new(src_port: u32, dst_port: u32, buf_alloc: u32) -> Self {
        GuestConn {
            src_port,
            dst_port,
            buf_alloc,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    fn header(&mut self, op: u16, len: u32) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: self.src_port,
            dst_port: self.dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn rw(&mut self, data: &[u8]) -> Header {
        self.tx_cnt = self.tx_cnt.wrapping_add(data.len() as u32);
        self.header(op::RW, data.len() as u32)
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn saw(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }
}

fn read_available(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    out
}

#[test]
fn device_identity_config_and_features() {
    let (map, _rxs) = listeners(&[PORT]);
    let mut dev = Vsock::new(0x1234_5678, map).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.queue_events().len(), 3);
    assert_eq!(dev.features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x1234_5678);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [0xffu8; 2];
    dev.read_config(7, &mut past);
    assert_eq!(past, [0, 0]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0, 0]);
    dev.write_config(0, &[9; 8]);
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x1234_5678);
    assert!(dev.reset());

    for bad in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        assert!(Vsock::new(bad, HashMap::new()).is_err(), "cid {bad}");
    }
}

#[test]
fn connect_gets_response_and_interrupt() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let _ = h.irq.irqfd().read();
    let (_g, _host) = h.connect(40_000, 65536);
    assert!(h.irq.irqfd().read().unwrap() > 0);
    assert_eq!(h.dev.connection_count(), 1);
    // Its host socket is watched for input.
    assert_eq!(h.reg.watched.len(), 1);
}

#[test]
fn guest_to_host_data_arrives_in_order() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let (mut g, mut host) = h.connect(40_000, 65536);
    let mut expected = Vec::new();
    for i in 0..50u32 {
        let data: Vec<u8> = (0..(i * 97 % 3000 + 1)).map(|b| (b + i) as u8).collect();
        let hdr = g.rw(&data);
        h.send(&hdr, &data);
        expected.extend_from_slice(&data);
    }
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; expected.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, expected);
    assert_eq!(h.dev.bytes_counters().0, expected.len() as u64);
}

#[test]
fn host_to_guest_data_arrives_in_rx_buffers_of_either_layout() {
    for layout in [
        RxLayout::Split { data: 1000 },
        RxLayout::Single { len: 1500 },
    ] {
        let mem = new_mem();
        let mut h = Harness::new(&mem);
        let (_g, mut host) = h.connect(40_000, 65536);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        host.write_all(&data).unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            while h.drv.rx_in_flight() < 8 {
                assert!(h.drv.post_rx(layout));
            }
            h.kick_rx();
            h.poll_host();
            for (hdr, payload) in h.receive() {
                assert_eq!(hdr.op, op::RW);
                assert_eq!((hdr.src_port, hdr.dst_port), (PORT, 40_000));
                let room = match layout {
                    RxLayout::Split { data } => data as usize,
                    RxLayout::Single { len } => len as usize - HEADER_SIZE,
                };
                assert!(payload.len() <= room);
                got.extend_from_slice(&payload);
            }
            if got.len() == data.len() {
                break;
            }
        }
        assert_eq!(got, data);
        assert_eq!(h.dev.bytes_counters().1, data.len() as u64);
    }
}

#[test]
fn host_data_is_held_back_beyond_guest_credit_until_credit_update() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let (mut g, mut host) = h.connect(40_000, 8192);
    host.write_all(&[5u8; 50_000]).unwrap();
    let mut data = 0;
    let mut credit_requests = 0;
    for _ in 0..10 {
        h.fill_rx(4);
        h.poll_host();
        for (hdr, payload) in h.receive() {
            match hdr.op {
                op::RW => data += payload.len(),
                op::CREDIT_REQUEST => credit_requests += 1,
                o => panic!("unexpected op {o}"),
            }
        }
    }
    assert_eq!(data, 8192);
    assert_eq!(credit_requests, 1);
    // The guest consumes it all and says so.
    g.fwd_cnt = 8192;
    let upd = g.header(op::CREDIT_UPDATE, 0);
    h.send(&upd, &[]);
    for _ in 0..10 {
        h.fill_rx(4);
        h.poll_host();
        for (hdr, payload) in h.receive() {
            if hdr.op == op::RW {
                data += payload.len();
            }
        }
    }
    assert_eq!(data, 16384);
}

#[test]
fn guest_overrunning_credit_gets_rst_and_memory_stays_bounded() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let (mut g, mut host) = h.connect(40_000, 65536);
    h.fill_rx(8);
    // The host never reads; the guest ignores its credit.
    let chunk = vec![1u8; MAX_PKT_DATA as usize];
    let mut rst = false;
    for _ in 0..64 {
        let hdr = g.rw(&chunk);
        h.send(&hdr, &chunk);
        if h.receive().iter().any(|(hd, _)| hd.op == op::RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "a guest overrunning its credit must be reset");
    assert_eq!(h.dev.connection_count(), 0);
    // The host sees the stream end after what was written.
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert!(all.len() <= BUF_ALLOC as usize + 5 * MAX_PKT_DATA as usize);
    assert!(all.iter().all(|&b| b == 1));
    // Its socket is no longer watched.
    assert!(h.reg.watched.is_empty());
}

#[test]
fn unknown_port_and_unknown_connection_get_rst() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    h.fill_rx(4);
    let mut g = GuestConn::new(40_000, 7777, 65536);
    h.send(&g.header(op::REQUEST, 0), &[]);
    let mut g2 = GuestConn::new(40_001, PORT, 65536);
    let hdr = g2.rw(b"hi");
    h.send(&hdr, b"hi");
    let pkts = h.receive();
    assert_eq!(pkts.len(), 2);
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (op::RST, 7777, 40_000)
    );
    assert_eq!((pkts[1].0.op, pkts[1].0.dst_port), (op::RST, 40_001));
    assert!(h.listeners[0].try_recv().is_err());
}

#[test]
fn malformed_tx_chains_do_not_panic_and_get_rst_when_addressable() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    h.fill_rx(16);
    let mut g = GuestConn::new(40_000, PORT, 65536);
    let req = g.header(op::REQUEST, 0).to_bytes();
    let w = VRING_DESC_F_WRITE as u16;
    // 1. header descriptor too short
    h.drv.send_raw(&[(u64::MAX, 20, 0)], &req[..20]);
    // 2. only a write-only descriptor (no readable bytes at all)
    h.drv.send_raw(&[(u64::MAX, 44, w)], &[]);
    // 3. descriptor outside guest memory
    h.drv.send_raw(&[(1 << 40, 44, 0)], &[]);
    // 4. header announces more payload than the chain has
    let mut short = g.header(op::RW, 1000);
    short.len = 1000;
    h.drv
        .send_raw(&[(u64::MAX, 44, 0), (u64::MAX, 10, 0)], &short.to_bytes());
    // 5. payload length beyond the maximum
    let mut huge = g.header(op::RW, 0);
    huge.len = u32::MAX;
    h.drv.send_raw(&[(u64::MAX, 44, 0)], &huge.to_bytes());
    // 6. wrong type, wrong cids
    let mut t = g.header(op::REQUEST, 0);
    t.type_ = 2;
    h.drv.send_raw(&[(u64::MAX, 44, 0)], &t.to_bytes());
    let mut c = g.header(op::REQUEST, 0);
    c.dst_cid = 42;
    h.drv.send_raw(&[(u64::MAX, 44, 0)], &c.to_bytes());
    let mut c = g.header(op::REQUEST, 0);
    c.src_cid = 4;
    h.drv.send_raw(&[(u64::MAX, 44, 0)], &c.to_bytes());
    h.kick_tx();
    assert_eq!(h.dev.malformed_packets(), 5);
    let pkts = h.receive();
    // 4, 5 (header readable) and the three bad addresses get an RST; 1-3 are dropped.
    assert_eq!(pkts.len(), 5);
    assert!(pkts
        .iter()
        .all(|(hd, _)| hd.op == op::RST && hd.dst_cid == GUEST_CID));
    assert_eq!(h.dev.connection_count(), 0);
    // All tx buffers came back.
    assert_eq!(h.drv.tx_chains.len(), 0);
    // The device still works.
    let (_g, _host) = h.connect(40_002, 65536);
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let w = VRING_DESC_F_WRITE as u16;
    // too small for a header, read-only, outside memory
    h.drv.post_rx_raw(&[(u64::MAX, 10, w)]);
    h.drv.post_rx_raw(&[(u64::MAX, 4096, 0)]);
    h.drv.post_rx_raw(&[(1 << 40, 4096, w)]);
    let mut g = GuestConn::new(40_000, PORT, 65536);
    h.send(&g.header(op::REQUEST, 0), &[]);
    let got = h.drv.receive();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|p| p.is_none()));
    // The RESPONSE waits for a usable buffer.
    h.fill_rx(1);
    let pkts = h.receive();
    assert_eq!(pkts[0].0.op, op::RESPONSE);
}

#[test]
fn rx_waits_for_buffers_and_resumes_on_kick() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let mut g = GuestConn::new(40_000, PORT, 65536);
    h.send(&g.header(op::REQUEST, 0), &[]);
    assert!(h.receive().is_empty());
    let mut host = h.listeners[0].try_recv().unwrap();
    host.write_all(b"early data").unwrap();
    h.poll_host();
    h.poll_host();
    assert!(h.receive().is_empty());
    h.fill_rx(4);
    h.poll_host();
    let pkts = h.receive();
    assert_eq!(pkts[0].0.op, op::RESPONSE);
    assert_eq!(pkts[1].1, b"early data");
}

#[test]
fn shutdown_from_host_then_guest_close() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let (mut g, mut host) = h.connect(40_000, 65536);
    host.write_all(b"result").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    h.fill_rx(4);
    h.poll_host();
    let pkts = h.receive();
    assert_eq!(pkts.len(), 2);
    assert_eq!(pkts[0].1, b"result");
    assert_eq!(
        (pkts[1].0.op, pkts[1].0.flags),
        (op::SHUTDOWN, SHUTDOWN_SEND)
    );
    // The guest still writes, then closes.
    let hdr = g.rw(b"ack");
    h.send(&hdr, b"ack");
    let mut sd = g.header(op::SHUTDOWN, 0);
    sd.flags = SHUTDOWN_BOTH;
    h.send(&sd, &[]);
    let pkts = h.receive();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RST);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"ack");
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.reg.watched.is_empty());
}

#[test]
fn shutdown_from_guest_half_then_host_close() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let (mut g, mut host) = h.connect(40_000, 65536);
    let hdr = g.rw(b"request");
    h.send(&hdr, b"request");
    let mut sd = g.header(op::SHUTDOWN, 0);
    sd.flags = SHUTDOWN_SEND;
    h.send(&sd, &[]);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = Vec::new();
    host.read_to_end(&mut req).unwrap();
    assert_eq!(req, b"request");
    host.write_all(b"response").unwrap();
    drop(host);
    h.fill_rx(4);
    h.poll_host();
    let pkts = h.receive();
    assert_eq!(pkts[0].1, b"response");
    assert_eq!(pkts[1].0.op, op::SHUTDOWN);
    assert_ne!(pkts[1].0.flags & SHUTDOWN_SEND, 0);
    // the guest resets: gone
    h.send(&g.header(op::RST, 0), &[]);
    assert_eq!(h.dev.connection_count(), 0);
    assert!(h.receive().is_empty());
}

#[test]
fn reset_drops_connections_and_device_can_be_activated_again() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let (_g, mut host) = h.connect(40_000, 65536);
    assert!(h.dev.reset());
    assert_eq!(h.dev.connection_count(), 0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
    // A kick after reset is ignored but lets the muxer forget the old socket.
    h.kick_tx();
    assert!(h.reg.watched.is_empty());
    // Reactivate on fresh (zeroed) rings, as a driver does after a reset.
    mem.write_slice(&vec![0u8; RX_BUFS as usize], GuestAddress(0))
        .unwrap();
    h.drv = Driver::new(&mem);
    h.dev
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: h.drv.queues(),
            interrupt: h.irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    // The device serves again; the port took its one connection before the reset, so it refuses.
    h.fill_rx(1);
    let mut g = GuestConn::new(40_001, PORT, 65536);
    h.send(&g.header(op::REQUEST, 0), &[]);
    let pkts = h.receive();
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::RST, 40_001));
    assert!(h.listeners[0].try_recv().is_err());
}

#[test]
fn second_activation_without_reset_is_refused() {
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let queues = h.drv.queues();
    assert!(h
        .dev
        .activate(ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: h.irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .is_err());
}

/// Pattern byte `i` of stream `seed`: position-dependent so that loss or reordering shows.
fn pattern(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8
}

fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The guest side of a bulk transfer both ways on one connection, driving `step` (which runs the
/// device) until done, that is until the guest has sent everything and seen EOF and the host has read
/// everything (`host_done`). Returns (bytes guest->host, bytes host->guest) as the guest saw them.
fn bulk_transfer(
    drv: &mut Driver<'_>,
    g: &mut GuestConn,
    to_host: u64,
    from_host: u64,
    host_done: &std::thread::JoinHandle<(u64, u64)>,
    mut step: impl FnMut(&mut Driver<'_>) -> String,
) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut state = String::new();
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut shut = false;
    let mut eof = false;
    while !(shut && eof && host_done.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "transfer stalled: sent {sent} received {received} shut {shut} eof {eof} credit {} g.fwd {} \
             g.fwd_sent {} rx_in_flight {} tx_in_flight {} device: {state}",
            g.credit(),
            g.fwd_cnt,
            g.fwd_cnt_sent,
            drv.rx_in_flight(),
            drv.tx_chains.len()
        );
        // Keep the rx ring stocked (Linux keeps it full).
        while drv.rx_in_flight() < 128 {
            assert!(drv.post_rx(RxLayout::Single { len: 4096 }));
        }
        // Send within credit, in packets of at most 64 KiB.
        while sent < to_host {
            let n = u64::from(g.credit())
                .min(to_host - sent)
                .min(u64::from(MAX_PKT_DATA));
            if n == 0 {
                break;
            }
            let data: Vec<u8> = (sent..sent + n).map(|i| pattern(1, i)).collect();
            let hdr = g.rw(&data);
            if !drv.send(&hdr, &data) {
                g.tx_cnt = g.tx_cnt.wrapping_sub(n as u32);
                break;
            }
            sent += n;
        }
        if sent == to_host && !shut {
            let mut sd = g.header(op::SHUTDOWN, 0);
            sd.flags = SHUTDOWN_SEND;
            if drv.send(&sd, &[]) {
                shut = true;
            }
        }
        state = step(drv);
        drv.reclaim_tx();
        for p in drv.receive() {
            let (hdr, payload) = p.expect("no empty rx buffers");
            g.saw(&hdr);
            match hdr.op {
                op::RW => {
                    for (k, &b) in payload.iter().enumerate() {
                        assert_eq!(
                            b,
                            pattern(2, received + k as u64),
                            "byte {}",
                            received + k as u64
                        );
                    }
                    received += payload.len() as u64;
                    // The application reads it at once.
                    g.fwd_cnt = g.fwd_cnt.wrapping_add(payload.len() as u32);
                }
                op::SHUTDOWN => {
                    assert_eq!(hdr.flags, SHUTDOWN_SEND);
                    eof = true;
                }
                op::CREDIT_UPDATE => {}
                op::CREDIT_REQUEST => {
                    let upd = g.header(op::CREDIT_UPDATE, 0);
                    assert!(drv.send(&upd, &[]));
                }
                o => panic!("unexpected op {o}"),
            }
        }
        // Like Linux: tell the device about consumed data before it runs out of credit.
        if g.fwd_cnt.wrapping_sub(g.fwd_cnt_sent) > g.buf_alloc / 2 {
            let upd = g.header(op::CREDIT_UPDATE, 0);
            drv.send(&upd, &[]);
        }
    }
    assert_eq!(received, from_host);
    (sent, received)
}

/// The host's side: one thread writes the pattern then closes its write side, another reads and
/// checksums. Returns the join handles' results: (checksum of what was read, bytes read).
fn host_side(
    stream: UnixStream,
    from_host: u64,
) -> (
    std::thread::JoinHandle<()>,
    std::thread::JoinHandle<(u64, u64)>,
) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = stream;
    let w = std::thread::spawn(move || {
        let mut off = 0u64;
        while off < from_host {
            let n = (from_host - off).min(100_000);
            let data: Vec<u8> = (off..off + n).map(|i| pattern(2, i)).collect();
            writer.write_all(&data).unwrap();
            off += n;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let r = std::thread::spawn(move || {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut total = 0u64;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hash = fnv(hash, &buf[..n]);
            total += n as u64;
        }
        (hash, total)
    });
    (w, r)
}

fn expected_hash(seed: u64, len: u64) -> u64 {
    let data: Vec<u8> = (0..len).map(|i| pattern(seed, i)).collect();
    fnv(0xcbf2_9ce4_8422_2325, &data)
}

#[test]
fn stress_few_mib_both_ways_with_checksums() {
    const TO_HOST: u64 = 6 << 20;
    const FROM_HOST: u64 = 5 << 20;
    let mem = new_mem();
    let mut h = Harness::new(&mem);
    let (mut g, host) = h.connect(40_000, 256 * 1024);
    let (w, r) = host_side(host, FROM_HOST);
    let Harness { drv, dev, reg, .. } = &mut h;
    bulk_transfer(drv, &mut g, TO_HOST, FROM_HOST, &r, |_drv| {
        dev.handle_event(TX_QUEUE as u32, EventSet::IN, reg);
        dev.handle_event(RX_QUEUE as u32, EventSet::IN, reg);
        let watched: Vec<(u32, EventSet)> =
            reg.watched.iter().map(|(&t, &(_, s))| (t, s)).collect();
        for (token, set) in watched {
            dev.handle_event(token, set, reg);
        }
        dev.debug_state()
    });
    w.join().unwrap();
    let (hash, total) = r.join().unwrap();
    assert_eq!(total, TO_HOST);
    assert_eq!(hash, expected_hash(1, TO_HOST));
    assert_eq!(h.dev.bytes_counters(), (TO_HOST, FROM_HOST));
}

/// The same through a real EventManager: queue kicks through the eventfds, host sockets through epoll.
#[test]
fn event_manager_drives_the_device_end_to_end() {
    const TO_HOST: u64 = 3 << 20;
    const FROM_HOST: u64 = 3 << 20;
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    // a port takes one connection: one port per round, and one for the bulk transfer
    let ports: Vec<u32> = (0..6).map(|i| PORT + i).collect();
    let (map, rxs) = listeners(&ports);
    let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, map).unwrap()));
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    em.add_subscriber(dev.clone());
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    dev.lock()
        .unwrap()
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: drv.queues(),
            interrupt: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    let kick = |dev: &Arc<Mutex<Vsock>>, q: usize| {
        dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    };
    let run = |em: &mut EventManager<Arc<Mutex<Vsock>>>| {
        // Let every ready source be handled; a spinning source would keep this from returning 0.
        for _ in 0..100 {
            if em.run_with_timeout(1).unwrap() == 0 {
                break;
            }
        }
    };

    // Several connections opened and closed in turn: fds get reused, registrations must not go stale.
    for round in 0..5u32 {
        let mut g = GuestConn::new(30_000 + round, PORT + round, 65536);
        drv.post_rx(RxLayout::Single { len: 4096 });
        drv.send(&g.header(op::REQUEST, 0), &[]);
        kick(&dev, TX_QUEUE);
        run(&mut em);
        let pkts: Vec<_> = drv.receive().into_iter().flatten().collect();
        assert_eq!(pkts[0].0.op, op::RESPONSE, "round {round}");
        let mut host = rxs[round as usize].try_recv().unwrap();
        host.write_all(b"ping").unwrap();
        drv.post_rx(RxLayout::Single { len: 4096 });
        kick(&dev, RX_QUEUE);
        run(&mut em);
        let pkts: Vec<_> = drv.receive().into_iter().flatten().collect();
        assert_eq!(pkts[0].1, b"ping", "round {round}");
        let mut sd = g.header(op::SHUTDOWN, 0);
        sd.flags = SHUTDOWN_BOTH;
        drv.send(&sd, &[]);
        drv.post_rx(RxLayout::Single { len: 4096 });
        kick(&dev, TX_QUEUE);
        run(&mut em);
        let pkts: Vec<_> = drv.receive().into_iter().flatten().collect();
        assert_eq!(pkts[0].0.op, op::RST, "round {round}");
        assert_eq!(read_available(&mut host), b"");
        drv.reclaim_tx();
    }
    assert_eq!(dev.lock().unwrap().connection_count(), 0);

    // Bulk both ways.
    let mut g = GuestConn::new(40_000, PORT + 5, 256 * 1024);
    drv.post_rx(RxLayout::Single { len: 4096 });
    drv.send(&g.header(op::REQUEST, 0), &[]);
    kick(&dev, TX_QUEUE);
    run(&mut em);
    let pkts: Vec<_> = drv.receive().into_iter().flatten().collect();
    assert_eq!(pkts[0].0.op, op::RESPONSE);
    g.saw(&pkts[0].0);
    let host = rxs[5].try_recv().unwrap();
    let (w, r) = host_side(host, FROM_HOST);
    bulk_transfer(&mut drv, &mut g, TO_HOST, FROM_HOST, &r, |_drv| {
        kick(&dev, TX_QUEUE);
        kick(&dev, RX_QUEUE);
        run(&mut em);
        dev.lock().unwrap().debug_state()
    });
    w.join().unwrap();
    let (hash, total) = r.join().unwrap();
    assert_eq!(total, TO_HOST);
    assert_eq!(hash, expected_hash(1, TO_HOST));
    assert!(irq.irqfd().read().unwrap() > 0);
}
