//! The virtio-mmio transport (virtio spec 1.2, section 4.2.2, version 2 registers).
use crate::vstate::memory::GuestMem;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};

use vmm_sys_util::eventfd::EventFd;

use super::{DeviceCtx, Interrupt, VirtioDevice, DEVICE_EVENT_BASE, VIRTIO_F_VERSION_1};
use crate::devices::bus::{lock, BusDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x464c_4e54; // "FLNT"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Offset of the queue-notify register; the VMM registers an ioeventfd on it per queue.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

/// Transport state plus the device model.
pub struct MmioTransport {
    pub device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub irq: Arc<Interrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    pub acked_features: u64,
    queue_sel: u32,
    pub status: u32,
    config_generation: u32,
    pub activated: bool,
    /// Why the transport marked the device broken, if it did.
    pub broken: Option<String>,
    /// Status writes that tried to clear a bit without a reset (ignored).
    pub bad_status_writes: u64,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMem, irq: Arc<Interrupt>) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| std::io::Error::other(format!("queue size {max}: {e}")))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            irq,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            broken: None,
            bad_status_writes: 0,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.status = 0;
        self.acked_features = 0;
        self.activated = false;
        self.broken = None;
        self.irq.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & self.status != self.status {
            // "The driver MUST NOT clear a device status bit" (virtio 1.1, 2.1.2): only a reset (0) does. Ignored,
            // so an active device's queues can never be re-pointed by dropping DRIVER_OK.
            self.bad_status_writes += 1;
            return;
        }
        if v & STATUS_FEATURES_OK != 0
            && self.status & STATUS_FEATURES_OK == 0
            && self.acked_features & VIRTIO_F_VERSION_1 == 0
        {
            // Only modern drivers are supported: refuse FEATURES_OK.
            self.status = v & !STATUS_FEATURES_OK;
            return;
        }
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if newly_ok && !self.activated {
            let all_valid = self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem));
            if !all_valid {
                self.mark_broken("the driver enabled a queue whose rings lie outside guest memory".into());
                return;
            }
            for q in &mut self.queues {
                q.set_event_idx(self.acked_features & super::VIRTIO_F_RING_EVENT_IDX != 0);
            }
            self.activated = true;
            let acked = self.acked_features;
            let mut ctx =
                DeviceCtx { active: self.activated, mem: &self.mem, queues: &mut self.queues, irq: &self.irq };
            self.device.activate(acked, &mut ctx);
        }
    }

    /// Stops using the device after a guest error and tells the driver (DEVICE_NEEDS_RESET).
    pub fn mark_broken(&mut self, why: String) {
        self.broken = Some(why);
        self.activated = false;
        self.status |= STATUS_NEEDS_RESET;
        self.irq.status.fetch_or(super::INT_CONFIG, Ordering::SeqCst);
        let _ = self.irq.irqfd.write(1);
    }

    fn process(&mut self, data: u32, fd: i32, set: EventSet, ops: &mut EventOps) {
        if data < DEVICE_EVENT_BASE {
            let i = data as usize;
            if let Some(evt) = self.queue_evts.get(i) {
                let _ = evt.read();
            }
            if !self.activated || i >= self.queues.len() {
                return;
            }
            let mut ctx =
                DeviceCtx { active: self.activated, mem: &self.mem, queues: &mut self.queues, irq: &self.irq };
            self.device.queue_notify(i, &mut ctx, ops);
        } else {
            let mut ctx =
                DeviceCtx { active: self.activated, mem: &self.mem, queues: &mut self.queues, irq: &self.irq };
            self.device.device_event(data, fd, set, &mut ctx, ops);
        }
    }

    /// The device model's own state.
    pub fn save_model(&self) -> crate::snapshot::ModelState {
        self.device.save_model()
    }

    /// Gives the device model its saved state.
    pub fn restore_model(&mut self, s: &crate::snapshot::ModelState) -> Result<(), String> {
        self.device.restore_model(s)
    }

    /// The transport's state as plain data.
    pub fn save_state(&self) -> crate::snapshot::TransportState {
        crate::snapshot::TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status.load(Ordering::SeqCst),
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let st = q.state();
                    crate::snapshot::QueueSnapshot {
                        max_size: st.max_size,
                        size: st.size,
                        ready: st.ready,
                        next_avail: st.next_avail,
                        next_used: st.next_used,
                        event_idx: st.event_idx_enabled,
                        desc_table: st.desc_table,
                        avail_ring: st.avail_ring,
                        used_ring: st.used_ring,
                    }
                })
                .collect(),
        }
    }

    /// Puts the transport back in a saved state (same device type and queue count), then lets
    /// the device react to the restore (vsock resets its connections).
    pub fn restore_state(&mut self, s: &crate::snapshot::TransportState) -> Result<(), String> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "saved device type {} with {} queues, configured type {} with {} queues",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        for (q, qs) in self.queues.iter_mut().zip(&s.queues) {
            let st = virtio_queue::QueueState {
                max_size: qs.max_size,
                next_avail: qs.next_avail,
                next_used: qs.next_used,
                event_idx_enabled: qs.event_idx,
                size: qs.size,
                ready: qs.ready,
                desc_table: qs.desc_table,
                avail_ring: qs.avail_ring,
                used_ring: qs.used_ring,
            };
            *q = Queue::try_from(st).map_err(|e| format!("queue: {e}"))?;
        }
        self.status = s.status;
        self.acked_features = s.acked_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.irq.status.store(s.interrupt_status, Ordering::SeqCst);
        self.activated = s.activated;
        if self.activated {
            let acked = self.acked_features;
            let mut ctx = DeviceCtx { active: true, mem: &self.mem, queues: &mut self.queues, irq: &self.irq };
            self.device.restored(acked, &mut ctx);
        }
        Ok(())
    }

    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "type": self.device.device_type(),
            "status": self.status,
            "activated": self.activated,
            "broken": self.broken,
            "device": self.device.describe(),
        })
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected_queue().map(|q| u32::from(q.max_size())).unwrap_or(0),
            0x44 => self.selected_queue().map(|q| u32::from(q.ready())).unwrap_or(0),
            0x60 => self.irq.status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue registers change only while the driver sets the device up, never while it is live.
        let configuring = self.status & STATUS_DRIVER_OK == 0 && !self.activated;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let offered = self.features();
                self.acked_features &= !(0xffff_ffffu64 << shift);
                self.acked_features |= (u64::from(v) << shift) & offered;
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => {
                // Only reached when no ioeventfd matched (e.g. before registration).
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => {
                self.irq.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.set_status(v),
            0x80 if configuring => {
                self.selected_queue().into_iter().for_each(|q| q.set_desc_table_address(Some(v), None))
            }
            0x84 if configuring => {
                self.selected_queue().into_iter().for_each(|q| q.set_desc_table_address(None, Some(v)))
            }
            0x90 if configuring => {
                self.selected_queue().into_iter().for_each(|q| q.set_avail_ring_address(Some(v), None))
            }
            0x94 if configuring => {
                self.selected_queue().into_iter().for_each(|q| q.set_avail_ring_address(None, Some(v)))
            }
            0xa0 if configuring => {
                self.selected_queue().into_iter().for_each(|q| q.set_used_ring_address(Some(v), None))
            }
            0xa4 if configuring => {
                self.selected_queue().into_iter().for_each(|q| q.set_used_ring_address(None, Some(v)))
            }
            _ => {}
        }
    }
}

/// Event-manager glue: routes queue notifications and device fds to the transport.
pub struct MmioSubscriber(pub Arc<Mutex<MmioTransport>>);

impl MutEventSubscriber for MmioSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        lock(&self.0).process(events.data(), events.fd(), events.event_set(), ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let t = lock(&self.0);
        for (i, evt) in t.queue_evts.iter().enumerate() {
            let _ = ops.add(Events::with_data(evt, i as u32, EventSet::IN));
        }
        for (fd, set, data) in t.device.initial_fds() {
            let _ = ops.add(Events::with_data_raw(fd, data, set));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    pub fn test_memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn queue_notify(&mut self, _index: usize, _ctx: &mut DeviceCtx, _ops: &mut dyn crate::devices::virtio::Watch) {}
        fn describe(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn negotiates_and_activates() {
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(Box::new(Dummy), test_memory(), irq).unwrap();
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 42);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1); // VERSION_1 is bit 32
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Acks are masked to what is offered.
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 0xffff_ffff);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        assert_eq!(t.acked_features, (1 << 3) | VIRTIO_F_VERSION_1);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        for q in 0..2u32 {
            wr(&mut t, 0x30, q);
            assert_eq!(rd(&mut t, 0x34), 16);
            wr(&mut t, 0x38, 8);
            wr(&mut t, 0x80, 0x1000 * (q + 1));
            wr(&mut t, 0x90, 0x4000 * (q + 1));
            wr(&mut t, 0xa0, 0x8000 * (q + 1));
            wr(&mut t, 0x44, 1);
        }
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(t.activated);
        assert!(t.broken.is_none());
        // Reset clears everything.
        wr(&mut t, 0x70, 0);
        assert!(!t.activated);
        assert_eq!(rd(&mut t, 0x70), 0);
    }

    /// A modern driver's negotiation up to FEATURES_OK, then queue 0 selected with 8 entries.
    fn features_ok_queue0(t: &mut MmioTransport) {
        wr(t, 0x24, 1);
        wr(t, 0x20, 1);
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        wr(t, 0x30, 0);
        wr(t, 0x38, 8);
    }

    /// A live device's queues cannot be re-pointed: clearing DRIVER_OK without a reset is ignored, and queue
    /// registers are read-only while the device is active.
    #[test]
    fn an_active_device_cannot_be_reconfigured_without_a_reset() {
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(Box::new(Dummy), test_memory(), irq).unwrap();
        features_ok_queue0(&mut t);
        wr(&mut t, 0x80, 0x1000);
        wr(&mut t, 0x90, 0x4000);
        wr(&mut t, 0xa0, 0x8000);
        wr(&mut t, 0x44, 1);
        let live = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        wr(&mut t, 0x70, live);
        assert!(t.activated);
        // Drop DRIVER_OK without a reset, then point queue 0 elsewhere.
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70), live, "a status bit was cleared without a reset");
        assert_eq!(t.bad_status_writes, 1);
        wr(&mut t, 0x80, 0x9_0000);
        wr(&mut t, 0x38, 4);
        wr(&mut t, 0x44, 0);
        assert_eq!(t.queues[0].desc_table(), 0x1000, "an active queue was re-pointed");
        assert_eq!(t.queues[0].size(), 8);
        assert!(t.queues[0].ready());
        assert!(t.activated);
        // A reset, and the driver may set it up again.
        wr(&mut t, 0x70, 0);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x80, 0x2000);
        assert_eq!(t.queues[0].desc_table(), 0x2000);
    }

    #[test]
    fn legacy_drivers_are_refused() {
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(Box::new(Dummy), test_memory(), irq).unwrap();
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn rings_outside_memory_break_the_device_not_the_vmm() {
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(Box::new(Dummy), test_memory(), irq).unwrap();
        features_ok_queue0(&mut t);
        wr(&mut t, 0x80, 0xfff0_0000); // beyond 1 MiB of memory
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(!t.activated);
        assert!(t.broken.is_some());
        assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }
}
