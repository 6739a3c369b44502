//! The virtio-mmio transport (virtio 1.2, section 4.2, register layout version 2).
//!
//! Every register access of the guest lands here from a vCPU thread. The guest is not trusted: accesses
//! of the wrong width, to unknown offsets, or in the wrong device state are ignored (reads give zero), and a
//! queue that the driver set up badly makes activation fail with DEVICE_NEEDS_RESET instead of a panic.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio as mm;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use super::{ActivateContext, GuestMemory, Interrupt, VirtioDevice};

/// Size of one device's MMIO window; the kernel parameter `virtio_mmio.device=` names it.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x564d_4d00; // "VMM\0"

// Register offsets (virtio 1.2, 4.2.2), from virtio-bindings; the bus hands us u64 offsets.
const REG_MAGIC: u64 = mm::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = mm::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = mm::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = mm::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = mm::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = mm::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = mm::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = mm::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = mm::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = mm::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = mm::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = mm::VIRTIO_MMIO_QUEUE_READY as u64;
/// Offset of QueueNotify: the device manager registers each queue's ioeventfd here.
pub const REG_QUEUE_NOTIFY: u64 = mm::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const REG_INTERRUPT_STATUS: u64 = mm::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = mm::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = mm::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = mm::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = mm::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_DRIVER_LOW: u64 = mm::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_DRIVER_HIGH: u64 = mm::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_DEVICE_LOW: u64 = mm::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_DEVICE_HIGH: u64 = mm::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = mm::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const REG_CONFIG: u64 = mm::VIRTIO_MMIO_CONFIG as u64;

/// Device status bits (virtio 1.2, 2.1), from virtio-bindings.
pub mod status {
    use virtio_bindings::virtio_config as c;
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_type: u32,
    offered_features: u64,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, virtio_queue::Error> {
        let (queues, device_type, offered_features) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max))
                .collect::<Result<Vec<_>, _>>()?;
            (queues, dev.device_type(), dev.features())
        };
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            device_type,
            offered_features,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The device status register as the driver last left it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The queue that QueueSel points at, if it exists and may still be configured.
    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & status::FEATURES_OK == 0 || self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.offered_features & 0xffff_ffff) as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                // Features are frozen once the driver has set FEATURES_OK.
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                // The driver can only accept what was offered.
                let value = (u64::from(value) << shift) & self.offered_features;
                self.acked_features = (self.acked_features & !mask) | value;
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                // virtio-queue ignores a size that is zero, not a power of two or over the maximum: the
                // queue keeps the size it had. A value past u16 is no size at all and is ignored the
                // same way, not cut to its low 16 bits (0x1_0100 would have become 256).
                let Ok(size) = u16::try_from(value) else {
                    return;
                };
                if let Some(q) = self.selected_queue() {
                    q.set_size(size);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            REG_QUEUE_DRIVER_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_DEVICE_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => {
                // Normally consumed by the queue's ioeventfd inside KVM; this is the fallback.
                let dev = lock(&self.device);
                if let Some(evt) = dev.queue_events().get(value as usize) {
                    // A failed write leaves the guest's kick unanswered, which it will retry.
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, never clear them, short of a reset.
        if value & self.status != self.status {
            return;
        }
        let newly_set = value & !self.status;
        self.status = value;
        if newly_set & status::DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            self.status |= status::FAILED;
            return;
        }
        let mem = &self.mem;
        let bad_queue = self.queues.iter().position(|q| !q.is_valid(mem));
        let result = match bad_queue {
            Some(index) => Err(super::ActivateError::InvalidQueue(index)),
            None => {
                // The device gets its own copies; the transport keeps the registers' view.
                let queues = self
                    .queues
                    .iter()
                    .map(|q| Queue::try_from(q.state()))
                    .collect::<Result<Vec<_>, _>>();
                let Ok(queues) = queues else {
                    self.status |= status::DEVICE_NEEDS_RESET;
                    return;
                };
                let ctx = ActivateContext {
                    mem: self.mem.clone(),
                    queues,
                    interrupt: self.interrupt.clone(),
                    acked_features: self.acked_features,
                };
                lock(&self.device).activate(ctx)
            }
        };
        match result {
            Ok(()) => self.active = true,
            Err(_) => {
                self.status |= status::DEVICE_NEEDS_RESET;
                // Config-change interrupt tells the driver to look at the status.
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    fn reset(&mut self) {
        if self.active && !lock(&self.device).reset() {
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.acknowledge(u32::MAX);
        for q in &mut self.queues {
            q.reset();
        }
    }
}

/// Locks a device, recovering it if another thread panicked while holding it: the state of a device is
/// guest-controlled data that the guest can already set to anything, so poisoning adds no safety.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            lock(&self.device).read_config(offset - REG_CONFIG, data);
            return;
        }
        // Registers below the config space are 32 bits wide and must be accessed as such.
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & status::DRIVER != 0 {
                lock(&self.device).write_config(offset - REG_CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct DummyDevice {
        queue_sizes: Vec<u16>,
        events: Vec<EventFd>,
        config: [u8; 8],
        activated: Option<u64>,
        resettable: bool,
    }

    impl MutEventSubscriber for DummyDevice {
        fn process(&mut self, _: Events, _: &mut EventOps) {}
        fn init(&mut self, _: &mut EventOps) {}
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.queue_sizes
        }
        fn features(&self) -> u64 {
            super::super::VIRTIO_F_VERSION_1 | 0b101
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.config.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), super::super::ActivateError> {
            self.activated = Some(ctx.acked_features);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.activated = None;
            self.resettable
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(DummyDevice {
            queue_sizes: vec![16, 16],
            events: vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            activated: None,
            resettable: true,
        }));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(dev.clone(), mem, interrupt).unwrap();
        (t, dev)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.mmio_read(MmioAddress(0), offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.mmio_write(MmioAddress(0), offset, &value.to_le_bytes());
    }

    /// Sets up both queues at valid addresses, as the Linux driver does.
    fn configure_queues(t: &mut MmioTransport) {
        for (i, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            write(t, REG_QUEUE_SEL, i);
            write(t, REG_QUEUE_NUM, 16);
            write(t, REG_QUEUE_DESC_LOW, base);
            write(t, REG_QUEUE_DRIVER_LOW, base + 0x1000);
            write(t, REG_QUEUE_DEVICE_LOW, base + 0x2000);
            write(t, REG_QUEUE_READY, 1);
        }
    }

    fn negotiate(t: &mut MmioTransport) {
        write(t, REG_STATUS, status::ACKNOWLEDGE);
        write(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, 0xffff_ffff);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, 1);
        write(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = setup();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 2);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0b101);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn driver_can_only_ack_offered_features_and_activation_sees_them() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        configure_queues(&mut t);
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(
            dev.lock().unwrap().activated,
            Some(super::super::VIRTIO_F_VERSION_1 | 0b101)
        );
        assert_eq!(read(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn invalid_queue_fails_activation_without_panic() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        // queue 0 points outside guest memory
        write(&mut t, REG_QUEUE_SEL, 0);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DESC_LOW, 0xffff_0000);
        write(&mut t, REG_QUEUE_DESC_HIGH, 0xffff_ffff);
        write(&mut t, REG_QUEUE_READY, 1);
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(read(&mut t, REG_INTERRUPT_STATUS) & 2, 0);
    }

    #[test]
    fn queue_registers_ignored_outside_configuration_phase() {
        let (mut t, _) = setup();
        // before FEATURES_OK: ignored
        write(&mut t, REG_QUEUE_SEL, 0);
        write(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
        // out-of-range queue index reads as absent
        write(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0);
        write(&mut t, REG_QUEUE_NUM, 8); // no panic
    }

    #[test]
    fn queue_size_past_u16_is_ignored_not_truncated() {
        let (mut t, _) = setup();
        negotiate(&mut t);
        write(&mut t, REG_QUEUE_SEL, 0);
        write(&mut t, REG_QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 4);
        // the low 16 bits alone would be a valid size of 8
        write(&mut t, REG_QUEUE_NUM, 0x1_0008);
        assert_eq!(t.queues[0].size(), 4);
    }

    #[test]
    fn activation_without_features_ok_fails() {
        let (mut t, dev) = setup();
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, REG_STATUS) & status::FAILED, 0);
    }

    #[test]
    fn status_bits_cannot_be_cleared_and_reset_clears_all() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        assert_ne!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        configure_queues(&mut t);
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert!(dev.lock().unwrap().activated.is_none());
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn odd_width_and_unaligned_accesses_are_harmless() {
        let (mut t, _) = setup();
        let mut byte = [0xffu8; 1];
        t.mmio_read(MmioAddress(0), REG_MAGIC, &mut byte);
        assert_eq!(byte, [0]);
        let mut word = [0xffu8; 4];
        t.mmio_read(MmioAddress(0), 2, &mut word);
        assert_eq!(word, [0; 4]);
        t.mmio_write(MmioAddress(0), REG_STATUS, &[1, 2]);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        t.mmio_read(MmioAddress(0), 0xdead_beef, &mut word); // config space far past its end
    }

    #[test]
    fn config_space_reads_and_writes_go_to_the_device() {
        let (mut t, dev) = setup();
        let mut data = [0u8; 2];
        t.mmio_read(MmioAddress(0), REG_CONFIG + 2, &mut data);
        assert_eq!(data, [3, 4]);
        // writes before DRIVER are dropped
        t.mmio_write(MmioAddress(0), REG_CONFIG, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 1);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        t.mmio_write(MmioAddress(0), REG_CONFIG, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 9);
    }

    #[test]
    fn queue_notify_fallback_kicks_the_queue_event() {
        let (mut t, dev) = setup();
        write(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(dev.lock().unwrap().events[1].read().unwrap(), 1);
        write(&mut t, REG_QUEUE_NOTIFY, 1000); // no such queue: ignored
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let (mut t, _) = setup();
        t.interrupt.signal_used_queue().unwrap();
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 1);
        write(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
    }
}
