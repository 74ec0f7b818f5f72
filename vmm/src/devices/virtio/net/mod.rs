//! virtio-net backed by a tap device. Frames carry the 12-byte virtio-net header straight
//! through to the tap (IFF_VNET_HDR), no offloads are negotiated.
pub mod tap;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use event_manager::EventSet;
use virtio_queue::QueueT;

use super::{DeviceCounters, DeviceCtx, VirtioDevice, Watch, DEVICE_EVENT_BASE, TYPE_NET};

pub const NET_HDR_LEN: usize = 12;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EV_TAP: u32 = DEVICE_EVENT_BASE;
const MAX_FRAME: usize = 65562;

pub struct Net {
    tap: File,
    tap_name: String,
    mac: [u8; 6],
    /// A frame read from the tap that found no guest buffer yet.
    pending_rx: Option<Vec<u8>>,
    tap_watched: bool,
    pub counters: DeviceCounters,
    pub dropped_rx: u64,
}

impl Net {
    pub fn new(tap: File, tap_name: &str, mac: [u8; 6]) -> Self {
        Net {
            tap,
            tap_name: tap_name.into(),
            mac,
            pending_rx: None,
            tap_watched: true,
            counters: DeviceCounters::default(),
            dropped_rx: 0,
        }
    }

    fn process_tx(&mut self, ctx: &mut DeviceCtx) {
        let mem = ctx.mem;
        let mut used = false;
        while let Some(chain) = ctx.queues[TXQ].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match chain.reader(mem) {
                Ok(mut r) if r.available_bytes() <= MAX_FRAME => {
                    let mut frame = vec![0u8; r.available_bytes()];
                    if r.read_exact(&mut frame).is_ok() {
                        // A tap takes a whole frame per write (or none).
                        match self.tap.write_all(&frame) {
                            Ok(_) => {
                                self.counters.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
                            }
                            Err(_) => {
                                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else {
                        self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if ctx.queues[TXQ].add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used && ctx.queues[TXQ].needs_notification(mem).unwrap_or(true) {
            ctx.irq.signal_used();
        }
    }

    /// Moves frames from the tap into guest RX buffers until either runs out.
    fn process_rx(&mut self, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        if !ctx.active {
            return;
        }
        let mem = ctx.mem;
        let mut used = false;
        loop {
            let frame = match self.pending_rx.take() {
                Some(f) => f,
                None => {
                    let mut buf = vec![0u8; MAX_FRAME];
                    match self.tap.read(&mut buf) {
                        Ok(n) => {
                            buf.truncate(n);
                            buf
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            };
            let Some(chain) = ctx.queues[RXQ].pop_descriptor_chain(mem) else {
                // No guest buffer: keep the frame and stop watching the tap until the guest
                // gives us buffers (RX queue notification).
                self.pending_rx = Some(frame);
                if self.tap_watched {
                    ops.remove(self.tap.as_raw_fd());
                    self.tap_watched = false;
                }
                break;
            };
            let head = chain.head_index();
            let len = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => match w.write_all(&frame) {
                    Ok(()) => frame.len() as u32,
                    Err(_) => 0,
                },
                _ => {
                    self.dropped_rx += 1;
                    0
                }
            };
            self.counters.bytes_in.fetch_add(u64::from(len), Ordering::Relaxed);
            if ctx.queues[RXQ].add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        if used && ctx.queues[RXQ].needs_notification(mem).unwrap_or(true) {
            ctx.irq.signal_used();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }
    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (link up = 1 when VIRTIO_NET_F_STATUS; not offered)
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mac.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn queue_notify(&mut self, index: usize, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        match index {
            TXQ => self.process_tx(ctx),
            RXQ => {
                if !self.tap_watched {
                    ops.add(self.tap.as_raw_fd(), EV_TAP, EventSet::IN);
                    self.tap_watched = true;
                }
                self.process_rx(ctx, ops);
            }
            _ => {}
        }
    }
    fn initial_fds(&self) -> Vec<(RawFd, EventSet, u32)> {
        vec![(self.tap.as_raw_fd(), EventSet::IN, EV_TAP)]
    }
    fn device_event(&mut self, _data: u32, _fd: RawFd, _set: EventSet, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        if !ctx.active {
            // Frames before the driver is up are dropped (a real NIC would do the same).
            let mut buf = vec![0u8; MAX_FRAME];
            while self.tap.read(&mut buf).is_ok() {
                self.dropped_rx += 1;
            }
            return;
        }
        self.process_rx(ctx, ops);
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "tap": self.tap_name,
            "mac": self.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
            "dropped_rx": self.dropped_rx,
            "counters": self.counters.snapshot(),
        })
    }
}
