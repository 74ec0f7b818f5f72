//! Address-range dispatch of PIO and MMIO exits to devices.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device that answers guest accesses to an address range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {0:#x}+{1:#x} is empty or overlaps another device")]
    Overlap(u64, u64),
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (PIO or MMIO).
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
    /// Accesses that hit no device (reads return all-ones).
    pub unhandled: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::Overlap(base, len))?;
        if let Some((b, e)) = self.devices.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap(base, len));
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, e) = self.devices.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((addr - base, e))
    }

    /// Dispatches a read; returns false (and fills all-ones) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, e)) => {
                lock(&e.device).read(off, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, e)) => {
                lock(&e.device).write(off, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Locks a device mutex, recovering from a poisoned lock (a panicking device thread must not
/// wedge every vCPU).
pub use flint_vmm_api::lock;

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Reg(1)))).unwrap();
        bus.insert(0x20, 8, Arc::new(Mutex::new(Reg(100)))).unwrap();
        assert_eq!(bus.insert(0x14, 8, Arc::new(Mutex::new(Reg(0)))), Err(BusError::Overlap(0x14, 8)));
        assert_eq!(bus.insert(0x0c, 8, Arc::new(Mutex::new(Reg(0)))), Err(BusError::Overlap(0x0c, 8)));
        assert_eq!(bus.insert(0x30, 0, Arc::new(Mutex::new(Reg(0)))), Err(BusError::Overlap(0x30, 0)));
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x21, &[7]));
        assert!(bus.read(0x20, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x18, &mut b));
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.unhandled.load(Ordering::Relaxed), 1);
    }
}
