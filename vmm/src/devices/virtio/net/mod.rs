//! virtio-net backed by a tap device. Frames carry the 12-byte virtio-net header straight
//! through to the tap (IFF_VNET_HDR), no offloads are negotiated.
pub mod tap;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use event_manager::EventSet;
use flint_vmm_api::config::RateLimiterConfig;
use virtio_queue::{QueueOwnedT, QueueT};

use crate::devices::rate_limiter::{RateLimiter, RateLimiterState};

use super::{DeviceCounters, DeviceCtx, VirtioDevice, Watch, DEVICE_EVENT_BASE, TYPE_NET};

pub const NET_HDR_LEN: usize = 12;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EV_TAP: u32 = DEVICE_EVENT_BASE;
const EV_RX_LIMIT: u32 = DEVICE_EVENT_BASE + 1;
const EV_TX_LIMIT: u32 = DEVICE_EVENT_BASE + 2;
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
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// A detached card's other socket end, kept open (never read) so sends do not fail.
    _detached_peer: Option<File>,
}

impl Net {
    /// A card with no host side (see `tap::detached`).
    pub fn detached(mac: [u8; 6]) -> Result<Self, tap::TapError> {
        let (a, b) = tap::detached()?;
        let mut n = Net::new(a, "", mac);
        n._detached_peer = Some(b);
        Ok(n)
    }

    pub fn new(tap: File, tap_name: &str, mac: [u8; 6]) -> Self {
        Net {
            tap,
            tap_name: tap_name.into(),
            mac,
            pending_rx: None,
            tap_watched: true,
            counters: DeviceCounters::default(),
            dropped_rx: 0,
            rx_limiter: None,
            tx_limiter: None,
            _detached_peer: None,
        }
    }

    /// Limits what the guest receives (`rx`) and sends (`tx`).
    pub fn with_limiters(
        mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> std::io::Result<Self> {
        self.rx_limiter = rx.map(RateLimiter::new).transpose()?;
        self.tx_limiter = tx.map(RateLimiter::new).transpose()?;
        Ok(self)
    }

    fn process_tx(&mut self, ctx: &mut DeviceCtx) {
        if self.tx_limiter.as_ref().is_some_and(|l| l.blocked()) {
            return; // its timer wakes the device
        }
        let mem = ctx.mem;
        let mut used = false;
        while let Some(chain) = ctx.queues[TXQ].pop_descriptor_chain(mem) {
            if let Some(l) = self.tx_limiter.as_mut() {
                let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
                if !l.consume(bytes.saturating_sub(NET_HDR_LEN as u64)) {
                    ctx.queues[TXQ].go_to_previous_position();
                    break;
                }
            }
            let head = chain.head_index();
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match chain.reader(mem) {
                Ok(mut r) if (NET_HDR_LEN..=MAX_FRAME).contains(&r.available_bytes()) => {
                    let mut frame = vec![0u8; r.available_bytes()];
                    if r.read_exact(&mut frame).is_ok() {
                        // No offload is negotiated, so the guest's virtio-net header means nothing: zeroed, the
                        // host kernel's tap never acts on guest-chosen GSO or checksum fields.
                        frame[..NET_HDR_LEN].fill(0);
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
            if self.rx_limiter.as_ref().is_some_and(|l| l.blocked()) {
                self.unwatch_tap(ops);
                break;
            }
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
            if let Some(l) = self.rx_limiter.as_mut() {
                if !l.consume(frame.len().saturating_sub(NET_HDR_LEN) as u64) {
                    // Over the limit: keep the frame, stop reading the tap until the limiter's timer fires.
                    self.pending_rx = Some(frame);
                    self.unwatch_tap(ops);
                    break;
                }
            }
            let Some(chain) = ctx.queues[RXQ].pop_descriptor_chain(mem) else {
                // No guest buffer: keep the frame and stop watching the tap until the guest
                // gives us buffers (RX queue notification). Its tokens are taken already.
                self.pending_rx = Some(frame);
                self.unwatch_tap(ops);
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

    fn unwatch_tap(&mut self, ops: &mut dyn Watch) {
        if self.tap_watched {
            ops.remove(self.tap.as_raw_fd());
            self.tap_watched = false;
        }
    }

    fn watch_tap(&mut self, ops: &mut dyn Watch) {
        if !self.tap_watched {
            ops.add(self.tap.as_raw_fd(), EV_TAP, EventSet::IN);
            self.tap_watched = true;
        }
    }
}

/// Version 1 of the net device's model state: the limiters' budgets.
#[derive(serde::Serialize, serde::Deserialize)]
struct NetModel {
    rx: Option<RateLimiterState>,
    tx: Option<RateLimiterState>,
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
                if !self.rx_limiter.as_ref().is_some_and(|l| l.blocked()) {
                    self.watch_tap(ops);
                }
                self.process_rx(ctx, ops);
            }
            _ => {}
        }
    }
    fn initial_fds(&self) -> Vec<(RawFd, EventSet, u32)> {
        let mut fds = vec![(self.tap.as_raw_fd(), EventSet::IN, EV_TAP)];
        fds.extend(self.rx_limiter.iter().map(|l| (l.fd(), EventSet::IN, EV_RX_LIMIT)));
        fds.extend(self.tx_limiter.iter().map(|l| (l.fd(), EventSet::IN, EV_TX_LIMIT)));
        fds
    }
    fn device_event(&mut self, data: u32, _fd: RawFd, _set: EventSet, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        match data {
            EV_RX_LIMIT => {
                if let Some(l) = self.rx_limiter.as_mut() {
                    l.timer_fired();
                }
                if ctx.active {
                    self.watch_tap(ops);
                    self.process_rx(ctx, ops);
                }
                return;
            }
            EV_TX_LIMIT => {
                if let Some(l) = self.tx_limiter.as_mut() {
                    l.timer_fired();
                }
                if ctx.active {
                    self.process_tx(ctx);
                }
                return;
            }
            _ => {}
        }
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
            "detached": self._detached_peer.is_some(),
            "mac": self.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
            "dropped_rx": self.dropped_rx,
            "counters": self.counters.snapshot(),
            "rx_rate_limiter": self.rx_limiter.as_ref().map(|l| l.describe()),
            "tx_rate_limiter": self.tx_limiter.as_ref().map(|l| l.describe()),
        })
    }
    fn save_model(&self) -> crate::snapshot::ModelState {
        if self.rx_limiter.is_none() && self.tx_limiter.is_none() {
            return crate::snapshot::ModelState::default();
        }
        let m =
            NetModel { rx: self.rx_limiter.as_ref().map(|l| l.save()), tx: self.tx_limiter.as_ref().map(|l| l.save()) };
        crate::snapshot::ModelState { version: 1, data: serde_json::to_vec(&m).unwrap_or_default() }
    }
    fn restore_model(&mut self, state: &crate::snapshot::ModelState) -> Result<(), String> {
        if state.data.is_empty() {
            return Ok(());
        }
        if state.version != 1 {
            return Err(format!("unknown net device state version {}", state.version));
        }
        let m: NetModel = serde_json::from_slice(&state.data).map_err(|e| format!("net rate limiter state: {e}"))?;
        for (l, s) in [(&mut self.rx_limiter, m.rx), (&mut self.tx_limiter, m.tx)] {
            if let (Some(l), Some(s)) = (l.as_mut(), s) {
                l.restore(&s);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::QueueEnv;
    use flint_vmm_api::config::TokenBucketConfig;
    use std::os::fd::{FromRawFd, OwnedFd};

    #[derive(Default)]
    struct Recorder(Vec<String>);
    impl Watch for Recorder {
        fn add(&mut self, _: RawFd, data: u32, _: EventSet) {
            self.0.push(format!("add {data}"));
        }
        fn modify(&mut self, _: RawFd, _: u32, _: EventSet) {}
        fn remove(&mut self, _: RawFd) {
            self.0.push("remove".into());
        }
    }

    fn wait_readable(fd: RawFd) {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one pollfd we own, for at most a second.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1, "the limiter's timer fires");
    }

    #[test]
    fn rate_limited_send_and_receive_wait_for_their_timers() {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair(2) fills two fds we then own.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds owned by nobody else.
        let (tap, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut peer = File::from(peer);
        // 1000 bytes per 100 ms each way.
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig { size: 1000, one_time_burst: 0, refill_time_ms: 100 }),
            ops: None,
        };
        let mut dev = Net::new(File::from(tap), "t", [6, 0, 0, 0, 0, 1]).with_limiters(Some(&cfg), Some(&cfg)).unwrap();
        let fds = dev.initial_fds();
        assert_eq!(fds.len(), 3, "tap and two timers");
        let (rx_timer, tx_timer) = (fds[1].0, fds[2].0);
        let mut env = QueueEnv::new(&[256, 256]);
        let mut ops = Recorder::default();
        // Send: two frames of 12 + 800 bytes; the second waits for the refill.
        for at in [0x10000u64, 0x20000] {
            env.write(at, &[7u8; 812]);
            env.add_chain(TXQ, &[(at, 812, false)]);
        }
        env.run(|ctx| dev.queue_notify(TXQ, ctx, &mut ops));
        assert_eq!(env.used(TXQ).len(), 1);
        wait_readable(tx_timer);
        env.run(|ctx| dev.device_event(EV_TX_LIMIT, tx_timer, EventSet::IN, ctx, &mut ops));
        assert_eq!(env.used(TXQ).len(), 2);
        let mut buf = [0u8; 2048];
        assert_eq!((peer.read(&mut buf).unwrap(), peer.read(&mut buf).unwrap()), (812, 812));
        // Receive: two frames arrive; the guest has buffers; the second waits (the tap unwatched meanwhile).
        for at in [0x30000u64, 0x40000] {
            env.add_chain(RXQ, &[(at, 2048, true)]);
        }
        peer.write_all(&[1u8; 812]).unwrap();
        peer.write_all(&[2u8; 812]).unwrap();
        env.run(|ctx| dev.device_event(EV_TAP, 0, EventSet::IN, ctx, &mut ops));
        assert_eq!(env.used(RXQ).len(), 1);
        assert!(ops.0.contains(&"remove".to_string()), "{:?}", ops.0);
        wait_readable(rx_timer);
        env.run(|ctx| dev.device_event(EV_RX_LIMIT, rx_timer, EventSet::IN, ctx, &mut ops));
        assert_eq!(env.used(RXQ), vec![(0, 812), (1, 812)]);
        assert_eq!(env.read(0x40000, 4), vec![2u8; 4]);
        assert!(ops.0.contains(&format!("add {EV_TAP}")), "the tap is watched again: {:?}", ops.0);
        // Budgets go into the snapshot's model state and come back.
        let state = dev.save_model();
        assert_eq!(state.version, 1);
        dev.restore_model(&state).unwrap();
    }

    /// The guest's virtio-net header reaches the tap zeroed (no offloads: a GSO or checksum request of the guest
    /// must never be acted on by the host kernel); a chain shorter than the header is refused.
    #[test]
    fn the_guests_net_header_is_zeroed_before_the_tap() {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair(2) fills two fds we then own.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds owned by nobody else.
        let (tap, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut peer = File::from(peer);
        let mut dev = Net::new(File::from(tap), "t", [6, 0, 0, 0, 0, 1]);
        let mut env = QueueEnv::new(&[256, 256]);
        let mut ops = Recorder::default();
        // flags NEEDS_CSUM, gso TCPV4 with a hostile size and offsets, then a payload.
        let mut frame = vec![1u8, 1, 0xff, 0xff, 0xff, 0x7f, 0x10, 0, 0x20, 0, 1, 0];
        frame.extend_from_slice(&[0xab; 60]);
        env.write(0x10000, &frame);
        env.add_chain(TXQ, &[(0x10000, frame.len() as u32, false)]);
        env.write(0x20000, &[9u8; 4]);
        env.add_chain(TXQ, &[(0x20000, 4, false)]);
        env.run(|ctx| dev.queue_notify(TXQ, ctx, &mut ops));
        assert_eq!(env.used(TXQ).len(), 2, "both chains are given back");
        let mut buf = [0u8; 2048];
        let n = peer.read(&mut buf).unwrap();
        assert_eq!(&buf[..NET_HDR_LEN], &[0u8; NET_HDR_LEN]);
        assert_eq!(&buf[NET_HDR_LEN..n], &[0xab; 60]);
        assert!(peer.read(&mut buf).is_err(), "the 4-byte chain never reached the tap");
    }
}
