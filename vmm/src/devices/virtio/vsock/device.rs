//! The virtio plumbing of the vsock device: configuration space, queues, eventfds and interrupts.
//!
//! All the work happens on the event loop's thread in [`MutEventSubscriber::process`]: a tx kick reads
//! every packet the guest queued and hands it to the muxer; then, whatever woke the device (a kick, a host
//! socket), packets owed to the guest are written into rx buffers while there are both; and finally the
//! event loop's watch on the host sockets is brought up to date.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::{FdRegistry, Muxer};
use super::packet::{self, Header};
use super::{
    Error, EVENT_QUEUE, HOST_CID, MAX_PKT_DATA, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_VSOCK,
};
use crate::devices::virtio::{
    indirect_negotiated, pop_chain, ActivateContext, ActivateError, GuestMemory, Interrupt,
    VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::fault_dump::{dump_queue, QueueDump, RecentUsed};

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Chains handled per queue in one pass. A guest that keeps adding buffers as fast as the device takes
/// them (on another vCPU) would otherwise hold the event loop here, away from the timeout and signals;
/// past this the device re-kicks its own queue eventfd and lets the loop go round.
const CHAINS_PER_PASS: usize = QUEUE_SIZE as usize;

/// What the device works with once the driver has set DRIVER_OK.
struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    /// Holds the driver's event buffers; the device sends no events (no transport reset is ever needed,
    /// as the VM is never migrated or snapshotted).
    _event: Queue,
    interrupt: Arc<Interrupt>,
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated (never, as it is not offered)
    indirect: bool,
    /// The last used entries written on rx and tx, for the dump at a triple fault.
    rx_recent: RecentUsed,
    tx_recent: RecentUsed,
}

/// The virtio-vsock device. See the module documentation of [`super`].
pub struct Vsock {
    guest_cid: u64,
    /// rx, tx, event: the builder registers them as ioeventfds, the device watches them.
    queue_events: Vec<EventFd>,
    muxer: Muxer,
    active: Option<Active>,
    /// Set if `init` could not register the queue eventfds; activation then fails.
    registration_error: Option<Error>,
    /// The payload of the tx packet being handled (at most [`MAX_PKT_DATA`] bytes).
    tx_payload: Vec<u8>,
    /// Tx chains that could not be parsed (for diagnostics).
    malformed_packets: u64,
}

impl Vsock {
    /// `guest_cid` >= 3. `listeners`: host ports the guest may connect to. When the guest connects to
    /// (CID 2, port P) and P is a key, the device creates a `UnixStream::pair()`, keeps one end
    /// (non-blocking, watched by the event loop) and sends the other end through the Sender; the VMM's
    /// control logic then reads/writes plain bytes on it with blocking I/O on another thread. Each
    /// port takes one connection; later requests to it are refused (RST).
    pub fn new(guest_cid: u64, listeners: HashMap<u32, Sender<UnixStream>>) -> io::Result<Self> {
        // 0-2 are reserved (hypervisor, local, host); the upper 32 bits are reserved by the spec and
        // u32::MAX is VMADDR_CID_ANY.
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                Error::InvalidGuestCid(guest_cid),
            ));
        }
        let queue_events = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| io::Error::new(e.kind(), Error::QueueEventFd(e)))?;
        Ok(Vsock {
            guest_cid,
            queue_events,
            muxer: Muxer::new(guest_cid, listeners),
            active: None,
            registration_error: None,
            tx_payload: Vec::with_capacity(MAX_PKT_DATA as usize),
            malformed_packets: 0,
        })
    }

    /// Bytes moved guest->host and host->guest (for the run's statistics).
    pub fn bytes_counters(&self) -> (u64, u64) {
        self.muxer.bytes_counters()
    }

    /// Tx chains the guest queued that were not valid packets.
    pub fn malformed_packets(&self) -> u64 {
        self.malformed_packets
    }

    /// Connections currently open.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    #[cfg(test)]
    pub(crate) fn debug_state(&self) -> String {
        self.muxer.debug_state()
    }

    /// Handles one event: `data` is the event's token (a queue index, or a host socket's token).
    pub(super) fn handle_event<R: FdRegistry + ?Sized>(
        &mut self,
        data: u32,
        events: EventSet,
        registry: &mut R,
    ) {
        match data as usize {
            RX_QUEUE => {
                // The guest added rx buffers: nothing to do beyond the rx pass below.
                self.drain_queue_event(RX_QUEUE);
            }
            TX_QUEUE => {
                self.drain_queue_event(TX_QUEUE);
                self.process_tx();
            }
            EVENT_QUEUE => self.drain_queue_event(EVENT_QUEUE),
            _ => self.muxer.handle_host_event(data, events),
        }
        self.process_rx();
        if self.muxer.sync_registrations(registry) {
            // Connections were reset for want of a registration: send their RSTs now.
            self.process_rx();
            self.muxer.sync_registrations(registry);
        }
    }

    fn drain_queue_event(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            // EAGAIN only means the counter was already zero (a spurious wake-up).
            let _ = evt.read();
        }
    }

    /// Hands every packet on the tx queue to the muxer.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        let mut budget = CHAINS_PER_PASS;
        while let Some(popped) = pop_chain(&mut active.tx, mem, active.indirect) {
            if budget == 0 {
                // Come back after the other event sources have had their turn.
                active.tx.go_to_previous_position();
                if let Some(evt) = self.queue_events.get(TX_QUEUE) {
                    let _ = evt.write(1);
                }
                break;
            }
            budget -= 1;
            let (head, first, parsed) = match popped {
                Ok(chain) => (
                    chain.head_index(),
                    first_buffer(&chain),
                    read_tx_packet(mem, chain, &mut self.tx_payload),
                ),
                Err(head) => (head, 0, Err(None)),
            };
            // The payload has been copied out: the buffer goes back to the guest first.
            active
                .tx_recent
                .record(active.tx.next_used(), head, 0, first);
            if active.tx.add_used(mem, head, 0).is_err() {
                // The used ring is not writable: the queue is unusable until the driver resets it.
                break;
            }
            used_any = true;
            match parsed {
                Ok(header) => self.muxer.handle_guest_packet(&header, &self.tx_payload),
                Err(header) => {
                    self.malformed_packets += 1;
                    self.muxer.handle_malformed_packet(header.as_ref());
                }
            }
        }
        if used_any {
            notify(&mut active.tx, mem, &active.interrupt);
        }
    }

    /// Writes packets owed to the guest into rx buffers, while there are both.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        let mut budget = CHAINS_PER_PASS;
        while self.muxer.has_rx() {
            if budget == 0 {
                // Come back after the other event sources have had their turn.
                if let Some(evt) = self.queue_events.get(RX_QUEUE) {
                    let _ = evt.write(1);
                }
                break;
            }
            budget -= 1;
            let Some(popped) = pop_chain(&mut active.rx, mem, active.indirect) else {
                // Out of buffers: the guest's next rx kick resumes.
                break;
            };
            let (head, first, writer) = match popped {
                Ok(chain) => (
                    chain.head_index(),
                    first_buffer(&chain),
                    chain.writer(mem).ok(),
                ),
                Err(head) => (head, 0, None),
            };
            let used_len = match writer {
                Some(mut writer) if packet::payload_capacity(&writer).is_some() => {
                    match self.muxer.fill_rx(&mut writer) {
                        Some(len) => len,
                        None => {
                            // Nothing to send after all: leave the buffer to the next packet.
                            active.rx.go_to_previous_position();
                            break;
                        }
                    }
                }
                // A chain outside guest memory or too small for a header can never be used: give it
                // back empty rather than stall on it.
                _ => 0,
            };
            active
                .rx_recent
                .record(active.rx.next_used(), head, used_len, first);
            if active.rx.add_used(mem, head, used_len).is_err() {
                break;
            }
            used_any = true;
        }
        if used_any {
            notify(&mut active.rx, mem, &active.interrupt);
        }
    }
}

/// The guest address of a chain's first buffer (0 if it has none), for the fault dump.
fn first_buffer(chain: &virtio_queue::DescriptorChain<&GuestMemory>) -> u64 {
    chain.clone().next().map_or(0, |d| d.addr().0)
}

/// Reads a packet off a tx chain into `payload`. On error, returns the header if it could be read (so
/// that the sender can be told with an RST).
fn read_tx_packet(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    payload: &mut Vec<u8>,
) -> Result<Header, Option<Header>> {
    payload.clear();
    let mut reader = chain.reader(mem).map_err(|_| None)?;
    let header = packet::read_header(&mut reader).map_err(|_| None)?;
    packet::read_payload(&mut reader, &header, payload).map_err(|_| Some(header))?;
    Ok(header)
}

/// Interrupts the guest after used entries were added, unless it asked not to be.
fn notify(queue: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) {
    // Without EVENT_IDX (not offered) this is always true; on error, notifying is the safe choice.
    if queue.needs_notification(mem).unwrap_or(true) {
        // Fails only if the eventfd counter would overflow, in which case the guest is interrupted anyway.
        let _ = interrupt.signal_used_queue();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_dumps(&self, name: &str) -> Vec<QueueDump> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        vec![
            dump_queue(name, "rx", &a.rx, &a.mem, &a.rx_recent),
            dump_queue(name, "tx", &a.tx, &a.mem, &a.tx_recent),
        ]
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let (to_host, to_guest) = self.bytes_counters();
        vec![
            ("bytes_to_host", to_host),
            ("bytes_to_guest", to_guest),
            ("malformed_packets", self.malformed_packets),
        ]
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        crate::devices::virtio::read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if let Some(e) = &self.registration_error {
            return Err(ActivateError::Events(e.to_string()));
        }
        let count = ctx.queues.len();
        let Ok([rx, tx, event]) = <[Queue; 3]>::try_from(ctx.queues) else {
            return Err(ActivateError::InvalidQueue(count.min(QUEUE_SIZES.len())));
        };
        self.active = Some(Active {
            mem: ctx.mem,
            rx,
            tx,
            _event: event,
            interrupt: ctx.interrupt,
            indirect: indirect_negotiated(ctx.acked_features),
            rx_recent: RecentUsed::default(),
            tx_recent: RecentUsed::default(),
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.muxer.reset();
        true
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.data(), events.event_set(), ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for ((queue, evt), data) in self.queue_events.iter().enumerate().zip(0u32..) {
            if let Err(source) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                self.registration_error = Some(Error::RegisterQueueEvent { queue, source });
            }
        }
    }
}
