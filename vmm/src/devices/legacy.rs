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

/// The i8042 controller; a CPU reset command writes `reset_evt`.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
}

impl I8042 {
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            device: I8042Device::new(EventFdTrigger::new(reset_evt)),
        }
    }
}

impl MutDevicePio for I8042 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_command_fires_the_reset_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        let mut status = [0u8];
        dev.pio_read(PioAddress(I8042_PORT_BASE), 4, &mut status);
        dev.pio_write(PioAddress(I8042_PORT_BASE), 4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        // wider accesses are ignored, not a panic
        dev.pio_write(PioAddress(I8042_PORT_BASE), 4, &[0xfe, 0xfe]);
        assert!(evt.read().is_err());
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
