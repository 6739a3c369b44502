//! The two legacy PIO devices: the 8250 serial port (only with `--console`) and the i8042 keyboard
//! controller, whose only job here is to turn the guest's reset request (0xFE to port 0x64, what
//! `reboot=k` does) into the end of the VM.

use std::io::Write;
use std::ops::Deref;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
/// The i8042 data (0x60) to command/status (0x64) ports.
pub const I8042_PORT_BASE: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;

/// An [`EventFd`] as a vm-superio interrupt or reset line.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}

/// The 8250 UART on COM1, its interrupt an irqfd on IRQ 4, its output going to `out`.
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> SerialDevice<W> {
    pub fn new(irqfd: EventFd, out: W) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger::new(irqfd), out),
        }
    }
}

impl<W: Write + Send> MutDevicePio for SerialDevice<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.serial.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A console that cannot be written (stderr closed) must not stop the guest.
            let _ = self.serial.write(offset, *byte);
        }
    }
}

/// The console's output: the guest's serial bytes go to our stderr as they come, and printk lines are
/// kept with their timestamps for `--trace`.
pub struct ConsoleOut {
    pub printk: std::sync::Arc<std::sync::Mutex<crate::printk::PrintkLog>>,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.printk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .feed(buf);
        // A closed stderr must not stop the guest: the bytes are dropped.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The guest's reset request, as the end of the VM.
pub struct ResetTrigger(pub std::sync::Arc<crate::vm_end::VmEnd>);

impl Trigger for ResetTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.report(crate::vm_end::GuestEnd::Reset);
        Ok(())
    }
}

/// The i8042 controller; a CPU reset command fires `reset`.
pub struct I8042<T: Trigger = ResetTrigger> {
    device: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    pub fn new(reset: T) -> Self {
        I8042 {
            device: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger> MutDevicePio for I8042<T> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.device.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // If the reset eventfd cannot be written the VM keeps running; the guest retries the reset.
            let _ = self.device.write(offset, *byte);
        }
    }
}

/// Host-clock stamps of guest milestones, in the order the guest reached them.
pub type Stamps = std::sync::Arc<std::sync::Mutex<Vec<(u8, std::time::Instant)>>>;

/// The timestamp device: guest-init writes a milestone number to [`vmm_protocol::TIMESTAMP_PORT`] as it
/// reaches it, and we stamp it with the host clock at that exit (as Firecracker's boot timer does), so the
/// guest's phases line up with the host's on one timeline.
pub struct TimestampDevice {
    stamps: Stamps,
}

/// Bounds what a guest that writes the port in a loop can make us keep.
const MAX_STAMPS: usize = 64;

impl TimestampDevice {
    pub fn new(stamps: Stamps) -> Self {
        TimestampDevice { stamps }
    }
}

impl MutDevicePio for TimestampDevice {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let now = std::time::Instant::now();
        if let [value] = data {
            let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if stamps.len() < MAX_STAMPS {
                stamps.push((*value, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_command_fires_the_reset_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        let mut status = [0u8];
        dev.pio_read(PioAddress(I8042_PORT_BASE), 4, &mut status);
        dev.pio_write(PioAddress(I8042_PORT_BASE), 4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        // wider accesses are ignored, not a panic
        dev.pio_write(PioAddress(I8042_PORT_BASE), 4, &[0xfe, 0xfe]);
        assert!(evt.read().is_err());
    }

    #[test]
    fn timestamps_are_recorded_and_bounded() {
        let stamps = Stamps::default();
        let mut dev = TimestampDevice::new(stamps.clone());
        dev.pio_write(PioAddress(0x440), 0, &[3]);
        dev.pio_write(PioAddress(0x440), 0, &[1, 2]); // wrong width: ignored
        assert_eq!(stamps.lock().unwrap().len(), 1);
        assert_eq!(stamps.lock().unwrap()[0].0, 3);
        for _ in 0..1000 {
            dev.pio_write(PioAddress(0x440), 0, &[4]);
        }
        assert_eq!(stamps.lock().unwrap().len(), MAX_STAMPS);
    }

    #[test]
    fn serial_writes_reach_the_output() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Vec::new());
        for b in b"hi" {
            dev.pio_write(PioAddress(SERIAL_PORT_BASE), 0, &[*b]);
        }
        assert_eq!(dev.serial.writer(), b"hi");
    }
}
