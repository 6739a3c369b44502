//! Devices on the bus and in the event loop, wired to KVM, and the registry of what is where.
//!
//! Every virtio device comes in through [`DeviceManager::add_virtio_device`], which gives it an MMIO
//! window and an IRQ, puts its transport on the bus, registers its irqfd and queue ioeventfds with
//! KVM, announces it on the kernel command line, makes it an event-loop subscriber and records it in
//! the [`DeviceRegistry`]. Exit naming, device statistics and the result read the registry, so a new
//! device is added in one place. Legacy port devices come in through
//! [`DeviceManager::add_port_device`], which records their ports for exit naming.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use linux_loader::cmdline::Cmdline;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::MutDevicePio;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IOAPIC_PINS, IOAPIC_START, VIRTIO_IRQ_BASE, VIRTIO_MMIO_START};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, REG_QUEUE_NOTIFY};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::guest_ram::GuestMemory;
use crate::vstate::{KvmVm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error("device bus: {0}")]
    Bus(#[from] vm_device::bus::Error),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("the queues of {name}: {source:?}")]
    Queues {
        name: String,
        source: virtio_queue::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("no MMIO window or IRQ left for {0}")]
    NoRoom(String),
}

/// Where a virtio device is: what the guest sees of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// e.g. "virtio-blk", "virtio-vsock", "virtio-blk scratch"
    pub name: String,
    pub mmio_base: u64,
    pub mmio_size: u64,
    pub irq: u32,
}

/// A device's statistics at the end of the run: where it was and what it counted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReport {
    pub name: String,
    pub mmio_base: u64,
    pub irq: u32,
    /// by name, in the device's order (a JSON object)
    #[serde(serialize_with = "as_map")]
    pub counters: Vec<(&'static str, u64)>,
}

fn as_map<S: serde::Serializer>(pairs: &[(&'static str, u64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// Every device the guest can reach, by MMIO window or port range.
#[derive(Default)]
pub struct DeviceRegistry {
    windows: Vec<DeviceInfo>,
    /// the device behind each of `windows`, in the same order
    virtio: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    /// (first port, count, name)
    ports: Vec<(u16, u16, &'static str)>,
}

impl DeviceRegistry {
    /// The name of the virtio device whose window holds `addr`.
    pub fn mmio_name(&self, addr: u64) -> Option<&str> {
        self.windows
            .iter()
            .find(|info| {
                addr.checked_sub(info.mmio_base)
                    .is_some_and(|offset| offset < info.mmio_size)
            })
            .map(|info| info.name.as_str())
    }

    /// The name of the port device at `port`.
    pub fn port_name(&self, port: u16) -> Option<&'static str> {
        self.ports
            .iter()
            .find(|(base, len, _)| port.checked_sub(*base).is_some_and(|o| o < *len))
            .map(|(_, _, name)| *name)
    }

    /// The virtio devices in the order they were added.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.windows
    }

    /// Every virtio device's queues, for the dump at a triple fault.
    pub fn queue_dumps(&self) -> Vec<crate::fault_dump::QueueDump> {
        self.windows
            .iter()
            .zip(&self.virtio)
            .flat_map(|(info, device)| {
                device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .queue_dumps(&info.name)
            })
            .collect()
    }

    /// Each virtio device's counters, now.
    pub fn reports(&self) -> Vec<DeviceReport> {
        self.windows
            .iter()
            .zip(&self.virtio)
            .map(|(info, device)| DeviceReport {
                name: info.name.clone(),
                mmio_base: info.mmio_base,
                irq: info.irq,
                counters: device.lock().unwrap_or_else(|p| p.into_inner()).counters(),
            })
            .collect()
    }
}

/// The devices being assembled: the bus the vCPUs dispatch to, the event loop's subscribers and the
/// registry.
#[derive(Default)]
pub struct DeviceManager {
    io: IoManager,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    registry: DeviceRegistry,
}

/// What the running VM needs of the devices.
pub struct Devices {
    /// The bus the vCPU threads dispatch port and MMIO exits to.
    pub io: Arc<IoManager>,
    /// The devices' event-loop halves.
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub registry: DeviceRegistry,
}

impl DeviceManager {
    /// Adds a virtio device named `name`: the next MMIO window and IRQ, its transport on the bus, its
    /// irqfd and one ioeventfd per queue (on QueueNotify, the queue index as datamatch) in KVM, its
    /// `virtio_mmio.device=` on the command line, and the device as an event-loop subscriber.
    pub fn add_virtio_device<D: VirtioDevice + 'static>(
        &mut self,
        name: &str,
        device: Arc<Mutex<D>>,
        vm: &KvmVm,
        mem: &GuestMemory,
        cmdline: &mut Cmdline,
    ) -> Result<(), DeviceError> {
        let index = u32::try_from(self.registry.windows.len())
            .map_err(|_| DeviceError::NoRoom(name.to_string()))?;
        let irq = VIRTIO_IRQ_BASE + index;
        let mmio_base = VIRTIO_MMIO_START + u64::from(index) * MMIO_WINDOW_SIZE;
        if irq >= IOAPIC_PINS || mmio_base + MMIO_WINDOW_SIZE > IOAPIC_START {
            return Err(DeviceError::NoRoom(name.to_string()));
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)?;
        {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            for (queue, evt) in (0u32..).zip(dev.queue_events()) {
                vm.register_mmio_ioevent(evt, mmio_base + REG_QUEUE_NOTIFY, queue)?;
            }
        }
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = MmioTransport::new(
            as_virtio.clone(),
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
        )
        .map_err(|source| DeviceError::Queues {
            name: name.to_string(),
            source,
        })?;
        let range = MmioRange::new(MmioAddress(mmio_base), MMIO_WINDOW_SIZE)?;
        self.io
            .register_mmio(range, Arc::new(Mutex::new(transport)))?;
        cmdline.add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(mmio_base), irq, None)?;
        self.subscribers.push(device);
        let info = DeviceInfo {
            name: name.to_string(),
            mmio_base,
            mmio_size: MMIO_WINDOW_SIZE,
            irq,
        };
        self.registry.windows.push(info);
        self.registry.virtio.push(as_virtio);
        Ok(())
    }

    /// Puts a port device named `name` on ports `base..base + len`.
    pub fn add_port_device<D: MutDevicePio + Send + 'static>(
        &mut self,
        name: &'static str,
        base: u16,
        len: u16,
        device: D,
    ) -> Result<(), DeviceError> {
        let range = PioRange::new(PioAddress(base), len)?;
        self.io.register_pio(range, Arc::new(Mutex::new(device)))?;
        self.registry.ports.push((base, len, name));
        Ok(())
    }

    /// The devices, assembled.
    pub fn finish(self) -> Devices {
        Devices {
            io: Arc::new(self.io),
            subscribers: self.subscribers,
            registry: self.registry,
        }
    }
}

#[cfg(test)]
impl DeviceRegistry {
    /// A registry of names only (no devices behind the windows), for naming tests.
    pub(crate) fn of_names(windows: &[(&str, u64)], ports: &[(u16, u16, &'static str)]) -> Self {
        DeviceRegistry {
            windows: windows
                .iter()
                .enumerate()
                .map(|(i, (name, base))| DeviceInfo {
                    name: name.to_string(),
                    mmio_base: *base,
                    mmio_size: MMIO_WINDOW_SIZE,
                    irq: VIRTIO_IRQ_BASE + u32::try_from(i).unwrap_or(0),
                })
                .collect(),
            virtio: Vec::new(),
            ports: ports.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_names_windows_and_ports() {
        let registry =
            DeviceRegistry::of_names(&[("virtio-blk", VIRTIO_MMIO_START)], &[(0x60, 5, "i8042")]);
        assert_eq!(registry.port_name(0x64), Some("i8042"));
        assert_eq!(registry.port_name(0x65), None);
        assert_eq!(registry.port_name(0x5f), None);
        assert_eq!(
            registry.mmio_name(VIRTIO_MMIO_START + 0xfff),
            Some("virtio-blk")
        );
        assert_eq!(registry.mmio_name(VIRTIO_MMIO_START + 0x1000), None);
    }
}
