//! The vsock device's connection state machine and muxer, driven through the whole device as in vmm:
//! a guest driver that sends packets (well-formed ones, and ones that lie about their length, address
//! or type, laid out over descriptors in the ways Linux does), posts rx buffers and reads what the
//! device answers; host peers on the listening ports that write, read, half-close and close; a device
//! reset; and the event loop (event-manager, real epoll on the host sockets) between every two steps.
//!
//! Input: a sequence of [`Op`]s, decoded with `arbitrary`.

#![no_main]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::{arbitrary, fuzz_target};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::vsock::packet::{Header, HEADER_SIZE};
use vmm::devices::virtio::vsock::{
    op, Vsock, BUF_ALLOC, HOST_CID, MAX_CONNECTIONS, MAX_PKT_DATA, RX_QUEUE, TX_QUEUE, TYPE_STREAM,
};
use vmm::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_fuzz::ring::{Ring, NEXT, WRITE};
use vmm_fuzz::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;
/// Ports the host listens on; 1026 has no listener.
const HOST_PORTS: [u32; 4] = [1024, 1025, 1026, 1024];
const GUEST_PORTS: [u32; 3] = [49152, 49153, 49154];
const RING_SIZE: u16 = 64;
const MAX_QUEUE_SIZE: u16 = 256;
const RX_BUFS: u64 = 0x1_0000;
const RX_SLOT: u64 = 0x1000;
const TX_BUFS: u64 = RX_BUFS + RX_SLOT * RING_SIZE as u64;
const TX_SLOT: u64 = 0x1100;
const MEM_SIZE: usize = 0x10_0000;
/// Largest payload the driver sends (the device takes up to 64 KiB; 4 KiB reaches the same code).
const MAX_PAYLOAD: usize = 4096;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

#[derive(arbitrary::Arbitrary, Debug)]
enum Op {
    Send(Packet),
    /// Post `count` rx buffers laid out as `layout` says.
    RxBuffers {
        count: u8,
        layout: u8,
    },
    HostWrite {
        conn: u8,
        len: u16,
    },
    HostRead {
        conn: u8,
    },
    HostShutdown {
        conn: u8,
        how: u8,
    },
    HostClose {
        conn: u8,
    },
    /// The driver resets the device and activates it again.
    Reset,
}

#[derive(arbitrary::Arbitrary, Debug)]
struct Packet {
    op: u8,
    guest_port: u8,
    host_port: u8,
    flags: u8,
    /// None: the credit a Linux guest gives.
    buf_alloc: Option<u32>,
    /// None: what the driver really consumed on that connection.
    fwd_cnt: Option<u32>,
    len: u16,
    /// 0..=6: a lie (see `Driver::send`), else an honest packet.
    lie: u8,
    /// How the packet is spread over descriptors.
    layout: u8,
}

/// The guest's side: three rings, buffers, and what it received per connection.
struct Driver {
    rx: Ring,
    tx: Ring,
    event: Ring,
    rx_free: Vec<u16>,
    tx_free: Vec<u16>,
    rx_chains: HashMap<u16, Vec<u16>>,
    tx_chains: HashMap<u16, Vec<u16>>,
    /// Payload bytes received per (host port, guest port): the honest fwd_cnt.
    received: HashMap<(u32, u32), u32>,
}

impl Driver {
    fn new(mem: &GuestMemory) -> Driver {
        Driver {
            rx: Ring::new(mem, 0x0000, RING_SIZE),
            tx: Ring::new(mem, 0x1000, RING_SIZE),
            event: Ring::new(mem, 0x2000, RING_SIZE),
            rx_free: (0..RING_SIZE).rev().collect(),
            tx_free: (0..RING_SIZE).rev().collect(),
            rx_chains: HashMap::new(),
            tx_chains: HashMap::new(),
            received: HashMap::new(),
        }
    }

    fn queues(&self) -> Vec<virtio_queue::Queue> {
        [&self.rx, &self.tx, &self.event]
            .iter()
            .map(|r| r.queue(MAX_QUEUE_SIZE))
            .collect()
    }

    /// Puts a chain of (addr, len, flags) on `ring`; false if there are not enough free descriptors.
    fn push(
        mem: &GuestMemory,
        ring: &mut Ring,
        free: &mut Vec<u16>,
        chains: &mut HashMap<u16, Vec<u16>>,
        descs: &[(u64, u32, u16)],
    ) -> bool {
        if descs.is_empty() || free.len() < descs.len() {
            return false;
        }
        let idx: Vec<u16> = (0..descs.len()).map(|_| free.pop().unwrap()).collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(i + 1) {
                Some(&n) => (flags | NEXT, n),
                None => (flags, 0),
            };
            ring.write_desc(mem, idx[i], addr, len, flags, next);
        }
        ring.push_avail(mem, idx[0]);
        chains.insert(idx[0], idx);
        true
    }

    fn send(&mut self, mem: &GuestMemory, p: &Packet) -> bool {
        let guest_port = GUEST_PORTS[p.guest_port as usize % GUEST_PORTS.len()];
        let host_port = HOST_PORTS[p.host_port as usize % HOST_PORTS.len()];
        let len = p.len as usize % (MAX_PAYLOAD + 1);
        let mut header = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op: u16::from(p.op % 10),
            flags: u32::from(p.flags),
            buf_alloc: p.buf_alloc.unwrap_or(BUF_ALLOC),
            fwd_cnt: p.fwd_cnt.unwrap_or_else(|| {
                self.received
                    .get(&(host_port, guest_port))
                    .copied()
                    .unwrap_or(0)
            }),
        };
        let mut chain_len = HEADER_SIZE + len;
        match p.lie {
            0 => header.len = len as u32 + 1 + u32::from(p.flags),
            1 => header.src_cid = GUEST_CID + 1,
            2 => header.dst_cid = GUEST_CID,
            3 => header.type_ = 2,
            4 => header.len = MAX_PKT_DATA + 1,
            5 => chain_len = HEADER_SIZE / 2,
            6 => header.op = op::REQUEST,
            _ => {}
        }
        let Some(&slot) = self.tx_free.last() else {
            return false;
        };
        let base = TX_BUFS + TX_SLOT * u64::from(slot);
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend((0..len).map(|i| (i as u8) ^ (guest_port as u8)));
        bytes.truncate(chain_len);
        mem.write_slice(&bytes, GuestAddress(base)).unwrap();
        let n = bytes.len() as u32;
        let h = HEADER_SIZE as u32;
        let descs: Vec<(u64, u32, u16)> = match p.layout % 4 {
            // header and data in one descriptor
            0 => vec![(base, n, 0)],
            // header, then data (Linux up to 6.1); a zero-length data descriptor when there is none
            1 => vec![
                (base, n.min(h), 0),
                (base + u64::from(h), n.saturating_sub(h), 0),
            ],
            // the header itself split in two
            2 => vec![(base, n.min(20), 0), (base + 20, n.saturating_sub(20), 0)],
            // data in fragments of 1000 bytes (zero-copy tx)
            _ => {
                let mut v = vec![(base, n.min(h), 0)];
                let mut at = h;
                while at < n {
                    let step = (n - at).min(1000);
                    v.push((base + u64::from(at), step, 0));
                    at += step;
                }
                v
            }
        };
        Self::push(
            mem,
            &mut self.tx,
            &mut self.tx_free,
            &mut self.tx_chains,
            &descs,
        )
    }

    fn post_rx(&mut self, mem: &GuestMemory, count: u8, layout: u8) -> bool {
        let mut any = false;
        for _ in 0..count % 8 {
            let Some(&slot) = self.rx_free.last() else {
                break;
            };
            let base = RX_BUFS + RX_SLOT * u64::from(slot);
            let descs: Vec<(u64, u32, u16)> = match layout % 4 {
                // one buffer for header and data (Linux 6.2+)
                0 => vec![(base, RX_SLOT as u32, WRITE)],
                // header, then data (Linux up to 6.1)
                1 => vec![(base, HEADER_SIZE as u32, WRITE), (base + 64, 0xf00, WRITE)],
                // too small for a header: the device must give it back, not stall on it
                2 => vec![(base, HEADER_SIZE as u32 - 1, WRITE)],
                // a header and a few bytes of data
                _ => vec![(base, HEADER_SIZE as u32 + 7, WRITE)],
            };
            if !Self::push(
                mem,
                &mut self.rx,
                &mut self.rx_free,
                &mut self.rx_chains,
                &descs,
            ) {
                break;
            }
            any = true;
        }
        any
    }

    /// Takes back the buffers the device used, and counts the payload received per connection.
    fn reclaim(&mut self, mem: &GuestMemory) {
        for (id, len) in self.tx.take_used(mem) {
            let chain = self.tx_chains.remove(&(id as u16));
            let chain = chain.expect("the device returned a tx chain the driver did not post");
            assert_eq!(len, 0, "the device wrote into a tx buffer");
            self.tx_free.extend(chain);
        }
        for (id, len) in self.rx.take_used(mem) {
            let chain = self.rx_chains.remove(&(id as u16));
            let chain = chain.expect("the device returned an rx chain the driver did not post");
            let base = RX_BUFS + RX_SLOT * u64::from(*chain.first().unwrap());
            if len as usize >= HEADER_SIZE {
                let mut raw = [0u8; HEADER_SIZE];
                mem.read_slice(&mut raw, GuestAddress(base)).unwrap();
                let header = Header::from_bytes(&raw);
                assert_eq!(header.dst_cid, GUEST_CID, "a packet for another guest");
                // An RST answers a packet with its addresses swapped: its source is whatever the guest
                // claimed as destination. Everything else comes from the host.
                if header.op != op::RST {
                    assert_eq!(header.src_cid, HOST_CID);
                }
                assert_eq!(header.type_, TYPE_STREAM);
                assert_eq!(
                    len as usize,
                    HEADER_SIZE + header.len as usize,
                    "used length and header disagree"
                );
                if header.op == op::RW {
                    let n = self
                        .received
                        .entry((header.src_port, header.dst_port))
                        .or_insert(0);
                    *n = n.wrapping_add(header.len);
                }
            }
            self.rx_free.extend(chain);
        }
    }
}

fn turns(manager: &mut Manager) {
    // Timeout 0: what is ready now. The device re-arms its own eventfds past its per-pass budget.
    for _ in 0..8 {
        if manager.run_with_timeout(0).unwrap() == 0 {
            break;
        }
    }
}

fn activate(vsock: &Arc<Mutex<Vsock>>, mem: &GuestMemory, driver: &Driver) {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    vsock
        .lock()
        .unwrap()
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: driver.queues(),
            interrupt,
            acked_features: VIRTIO_F_VERSION_1,
        })
        .expect("activation with valid queues");
}

fn kick(vsock: &Arc<Mutex<Vsock>>, queue: usize) {
    vsock.lock().unwrap().queue_events()[queue]
        .write(1)
        .unwrap();
}

fn accept(receivers: &[Receiver<UnixStream>], hosts: &mut Vec<UnixStream>) {
    for rx in receivers {
        while let Ok(stream) = rx.try_recv() {
            stream.set_nonblocking(true).unwrap();
            hosts.push(stream);
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mem = vmm_fuzz::guest_memory(&[(0, MEM_SIZE)]);
    let mut listeners = HashMap::new();
    let mut receivers = Vec::new();
    for port in [1024, 1025] {
        let (tx, rx) = channel();
        listeners.insert(port, tx);
        receivers.push(rx);
    }
    let vsock = Arc::new(Mutex::new(Vsock::new(GUEST_CID, listeners).unwrap()));
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(vsock.clone());
    let mut driver = Driver::new(&mem);
    activate(&vsock, &mem, &driver);
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];

    for op in ops.iter().take(64) {
        match op {
            Op::Send(p) => {
                if driver.send(&mem, p) {
                    kick(&vsock, TX_QUEUE);
                }
            }
            Op::RxBuffers { count, layout } => {
                if driver.post_rx(&mem, *count, *layout) {
                    kick(&vsock, RX_QUEUE);
                }
            }
            Op::HostWrite { conn, len } => {
                let i = *conn as usize % hosts.len().max(1);
                if let Some(s) = hosts.get_mut(i) {
                    let data: Vec<u8> = (0..*len).map(|i| i as u8).collect();
                    let _ = s.write(&data);
                }
            }
            Op::HostRead { conn } => {
                let i = *conn as usize % hosts.len().max(1);
                if let Some(s) = hosts.get_mut(i) {
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                }
            }
            Op::HostShutdown { conn, how } => {
                if let Some(s) = hosts.get(*conn as usize % hosts.len().max(1)) {
                    let how = [Shutdown::Read, Shutdown::Write, Shutdown::Both][*how as usize % 3];
                    let _ = s.shutdown(how);
                }
            }
            Op::HostClose { conn } => {
                if !hosts.is_empty() {
                    let i = *conn as usize % hosts.len();
                    hosts.remove(i);
                }
            }
            Op::Reset => {
                assert!(
                    vsock.lock().unwrap().reset(),
                    "the vsock device can always be reset"
                );
                driver = Driver::new(&mem);
                activate(&vsock, &mem, &driver);
            }
        }
        turns(&mut manager);
        accept(&receivers, &mut hosts);
        driver.reclaim(&mem);
        assert!(vsock.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
    }
    // The event queue is never used by the device.
    assert_eq!(driver.event.used_idx(&mem), 0);
});
