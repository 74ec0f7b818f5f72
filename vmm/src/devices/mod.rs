//! Devices: the I/O buses, legacy devices (serial, i8042) and virtio-mmio devices.
pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
