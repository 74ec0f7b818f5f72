//! virtio devices over the virtio-mmio transport (virtio 1.x, "modern" register layout).
//!
//! Each device is one [`MmioTransport`] behind a mutex: vCPU threads access its registers
//! through the MMIO bus; the event-manager thread processes its queues when the guest's
//! ioeventfd notification fires and when the device's own fds (tap, sockets) are ready.
pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[doc(hidden)]
pub mod test_util;
pub mod vsock;

use crate::vstate::memory::GuestMem;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::Queue;

use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: an irqfd plus the InterruptStatus register it sets.
pub struct Interrupt {
    pub status: AtomicU32,
    pub irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    /// Tells the guest that a used ring has new entries.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        let _ = self.irqfd.write(1);
    }
}

/// Errors a device counts instead of crashing the VMM: a malformed request from the guest
/// fails that request (or marks the device broken), never the process.
#[derive(Default)]
pub struct DeviceCounters {
    pub requests: AtomicU64,
    pub bad_descriptors: AtomicU64,
    pub io_errors: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl DeviceCounters {
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "bad_descriptors": self.bad_descriptors.load(Ordering::Relaxed),
            "io_errors": self.io_errors.load(Ordering::Relaxed),
            "bytes_in": self.bytes_in.load(Ordering::Relaxed),
            "bytes_out": self.bytes_out.load(Ordering::Relaxed),
        })
    }
}

/// What a device sees while it works: guest memory, its queues and its interrupt.
pub struct DeviceCtx<'a> {
    /// False until the driver set DRIVER_OK (and after a reset): queues must not be touched.
    pub active: bool,
    pub mem: &'a GuestMem,
    pub queues: &'a mut [Queue],
    pub irq: &'a Interrupt,
}

/// Event data values at or above this belong to the device (below are queue indices).
pub const DEVICE_EVENT_BASE: u32 = 0x100;

/// One virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with `acked` features: the queues are live.
    fn activate(&mut self, _acked: u64, _ctx: &mut DeviceCtx) {}
    /// The driver reset the device (status 0).
    fn reset(&mut self) {}
    /// The transport was restored from a snapshot with the device active.
    fn restored(&mut self, _acked: u64, _ctx: &mut DeviceCtx) {}
    /// The guest notified queue `index`.
    fn queue_notify(&mut self, index: usize, ctx: &mut DeviceCtx, ops: &mut dyn Watch);
    /// Device fds to watch from the start: (fd, events, data >= DEVICE_EVENT_BASE).
    fn initial_fds(&self) -> Vec<(RawFd, EventSet, u32)> {
        Vec::new()
    }
    /// One of the device's own fds is ready (also before activation: check `ctx.active`).
    fn device_event(&mut self, _data: u32, _fd: RawFd, _set: EventSet, _ctx: &mut DeviceCtx, _ops: &mut dyn Watch) {}
    /// JSON for `describe`.
    fn describe(&self) -> serde_json::Value;
    /// The device model's own state for a snapshot, encoded and versioned by the device. Default: nothing to keep.
    fn save_model(&self) -> crate::snapshot::ModelState {
        crate::snapshot::ModelState::default()
    }
    /// Takes back what [`VirtioDevice::save_model`] gave (called before the transport is restored). A device that
    /// keeps nothing refuses state it does not know rather than drop it silently.
    fn restore_model(&mut self, state: &crate::snapshot::ModelState) -> Result<(), String> {
        if state.data.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected device state (version {}, {} bytes)", state.version, state.data.len()))
        }
    }
}

/// What a device may change about the fds it watches (the event manager in production, a
/// recorder in unit tests).
pub trait Watch {
    fn add(&mut self, fd: RawFd, data: u32, set: EventSet);
    fn modify(&mut self, fd: RawFd, data: u32, set: EventSet);
    fn remove(&mut self, fd: RawFd);
}

impl Watch for EventOps<'_> {
    fn add(&mut self, fd: RawFd, data: u32, set: EventSet) {
        let _ = EventOps::add(self, Events::with_data_raw(fd, data, set));
    }
    fn modify(&mut self, fd: RawFd, data: u32, set: EventSet) {
        let _ = EventOps::modify(self, Events::with_data_raw(fd, data, set));
    }
    fn remove(&mut self, fd: RawFd) {
        let _ = EventOps::remove(self, Events::empty_raw(fd));
    }
}

/// A [`Watch`] that records calls (unit tests, fuzzing).
#[derive(Default)]
pub struct NoWatch {
    pub watched: std::collections::HashMap<RawFd, (u32, EventSet)>,
}

impl Watch for NoWatch {
    fn add(&mut self, fd: RawFd, data: u32, set: EventSet) {
        self.watched.insert(fd, (data, set));
    }
    fn modify(&mut self, fd: RawFd, data: u32, set: EventSet) {
        self.watched.insert(fd, (data, set));
    }
    fn remove(&mut self, fd: RawFd) {
        self.watched.remove(&fd);
    }
}
