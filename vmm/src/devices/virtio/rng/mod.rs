//! virtio-rng: fills the guest's buffers from the host's getrandom(2).
use std::io::Write;
use std::sync::atomic::Ordering;

use super::{DeviceCounters, DeviceCtx, VirtioDevice, TYPE_RNG};

/// Largest amount served per request (a guest asking for more gets this much).
const MAX_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    pub counters: DeviceCounters,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    fn process(&mut self, ctx: &mut DeviceCtx) {
        let mem = ctx.mem;
        let counters = &self.counters;
        super::queue::drain(ctx, 0, &counters.bad_descriptors, |chain| {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            let mut w = chain.writer(mem).ok()?;
            let n = w.available_bytes().min(MAX_PER_REQUEST);
            let mut buf = vec![0u8; n];
            if getrandom::getrandom(&mut buf).is_err() {
                counters.io_errors.fetch_add(1, Ordering::Relaxed);
                return Some(0);
            }
            w.write_all(&buf).ok()?;
            counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            Some(n as u32)
        });
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn queue_notify(&mut self, _index: usize, ctx: &mut DeviceCtx, _ops: &mut dyn super::Watch) {
        self.process(ctx);
    }
    fn describe(&self) -> serde_json::Value {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::*;

    #[test]
    fn fills_writable_buffers() {
        let mut env = QueueEnv::new(&[256]);
        env.add_chain(0, &[(0x10000, 64, true), (0x10040, 64, true)]);
        let mut dev = Rng::new();
        env.run(|ctx| dev.process(ctx));
        assert_eq!(env.used(0), vec![(0, 128)]);
        let data = env.read(0x10000, 128);
        assert!(data.iter().any(|b| *b != 0));
        assert!(env.interrupted());
    }

    #[test]
    fn read_only_buffer_is_counted_not_fatal() {
        let mut env = QueueEnv::new(&[256]);
        env.add_chain(0, &[(0x10000, 64, false)]);
        let mut dev = Rng::new();
        env.run(|ctx| dev.process(ctx));
        assert_eq!(env.used(0), vec![(0, 0)]);
    }
}
