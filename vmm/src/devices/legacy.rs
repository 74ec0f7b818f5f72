//! Legacy PIO devices: the 8250 serial console (vm-superio) and the i8042 reset line.
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::vstate::vcpu::{ExitReason, VmExit};

pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

/// Raises the serial IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1, output to any writer (a log file or stdout).
pub struct SerialDevice {
    pub serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self { serial: Serial::new(IrqTrigger(irq), out) }
    }

    /// A UART in a saved state (restore).
    pub fn from_state(
        state: &vm_superio::serial::SerialState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        Serial::from_state(state, IrqTrigger(irq), NoEvents, out)
            .map(|serial| Self { serial })
            .map_err(|e| format!("{e:?}"))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            // A console that cannot be written (full disk, closed pipe) must not stop the guest.
            let _ = self.serial.write(offset as u8, data[0]);
        }
    }
}

/// The i8042 controller, only as far as the guest's reboot path needs: writing 0xfe (pulse
/// reset line) to the command port ends the VM.
pub struct I8042Device {
    exit: Arc<VmExit>,
}

impl I8042Device {
    const CMD_RESET_CPU: u8 = 0xfe;
    const OFFSET_COMMAND: u64 = 4;

    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for commands).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == Self::OFFSET_COMMAND && data.first() == Some(&Self::CMD_RESET_CPU) {
            self.exit.set(ExitReason::GuestReset);
        }
    }
}
