//! virtio-blk backed by a host file: read-only or read-write, flush honoured.
use crate::vstate::memory::GuestMem;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use event_manager::EventSet;
use flint_vmm_api::config::RateLimiterConfig;

use crate::devices::rate_limiter::{RateLimiter, RateLimiterState};

use super::{DeviceCounters, DeviceCtx, VirtioDevice, TYPE_BLOCK};

pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;
/// Largest single request accepted (bounded buffer per request).
const MAX_REQUEST_BYTES: usize = 4 << 20;
const SEG_MAX: u32 = 126;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open drive file {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("drive file {0} is {1} bytes, not a multiple of 512")]
    Size(PathBuf, u64),
}

pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    nsectors: u64,
    id: [u8; ID_BYTES],
    pub counters: DeviceCounters,
    limiter: Option<RateLimiter>,
}

impl Block {
    /// Limits the guest's I/O to this drive.
    pub fn with_limiter(mut self, cfg: Option<&RateLimiterConfig>) -> Result<Self, BlockError> {
        if let Some(cfg) = cfg {
            let l = RateLimiter::new(cfg).map_err(|e| BlockError::Open(self.path.clone(), e))?;
            self.limiter = Some(l);
        }
        Ok(self)
    }

    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        // A path, or a host file flintd's jailed launcher passed as an inherited fd (`/dev/fd/N`).
        let file = flint_vmm_api::spec::open_host_file(path, !read_only)
            .map_err(|e| BlockError::Open(path.to_path_buf(), e))?;
        let len = file.metadata().map_err(|e| BlockError::Open(path.to_path_buf(), e))?.len();
        if len % SECTOR_SIZE != 0 {
            return Err(BlockError::Size(path.to_path_buf(), len));
        }
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            read_only,
            nsectors: len / SECTOR_SIZE,
            id: idb,
            counters: DeviceCounters::default(),
            limiter: None,
        })
    }

    /// Serves one request; returns (status, bytes written to the guest) or None when the chain
    /// is malformed (no room for the status byte).
    fn handle(&mut self, chain: virtio_queue::DescriptorChain<&GuestMem>, mem: &GuestMem) -> Option<u32> {
        let mut reader = chain.clone().reader(mem).ok()?;
        let mut writer = chain.writer(mem).ok()?;
        let avail = writer.available_bytes();
        if avail == 0 {
            return None;
        }
        // The last writable byte is the status; data goes before it.
        let mut status_w = writer.split_at(avail - 1).ok()?;
        let req_type: u32 = reader.read_obj().ok()?;
        let _reserved: u32 = reader.read_obj().ok()?;
        let sector: u64 = reader.read_obj().ok()?;
        let (status, written) = match req_type {
            T_IN => {
                let len = writer.available_bytes();
                match self.check_range(sector, len) {
                    Some(off) => {
                        let mut buf = vec![0u8; len];
                        match self.file.read_exact_at(&mut buf, off) {
                            Ok(()) if writer.write_all(&buf).is_ok() => {
                                self.counters.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
                                (S_OK, len)
                            }
                            _ => (S_IOERR, 0),
                        }
                    }
                    None => (S_IOERR, 0),
                }
            }
            T_OUT if self.read_only => (S_IOERR, 0),
            T_OUT => {
                let len = reader.available_bytes();
                match self.check_range(sector, len) {
                    Some(off) => {
                        let mut buf = vec![0u8; len];
                        match reader.read_exact(&mut buf) {
                            Ok(()) if self.file.write_all_at(&buf, off).is_ok() => {
                                self.counters.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
                                (S_OK, 0)
                            }
                            _ => (S_IOERR, 0),
                        }
                    }
                    None => (S_IOERR, 0),
                }
            }
            T_FLUSH if self.read_only => (S_OK, 0),
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        };
        if status == S_IOERR {
            self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        status_w.write_all(&[status]).ok()?;
        Some(written as u32 + 1)
    }

    /// Byte offset of a request when it lies inside the disk and is not oversized.
    fn check_range(&self, sector: u64, len: usize) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_REQUEST_BYTES {
            return None;
        }
        let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
        // `then`, not `then_some`: the offset must not be computed for a sector past the disk (found by fuzzing:
        // a guest-chosen sector near u64::MAX overflowed the multiplication).
        (end <= self.nsectors).then(|| sector * SECTOR_SIZE)
    }

    fn process(&mut self, ctx: &mut DeviceCtx) {
        if self.limiter.as_ref().is_some_and(|l| l.blocked()) {
            return; // its timer wakes the device
        }
        let mem = ctx.mem;
        let bad = std::sync::atomic::AtomicU64::new(0);
        let mut limiter = self.limiter.take();
        let gate = |chain: &virtio_queue::DescriptorChain<&GuestMem>| match limiter.as_mut() {
            // Bytes moved: the data descriptors (every descriptor but the 16-byte header and the status byte).
            Some(l) => l.consume(chain.clone().map(|d| u64::from(d.len())).sum::<u64>().saturating_sub(17)),
            None => true,
        };
        super::queue::drain_gated(ctx, 0, &bad, gate, |chain| {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.handle(chain, mem)
        });
        self.limiter = limiter;
        self.counters.bad_descriptors.fetch_add(bad.into_inner(), Ordering::Relaxed);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64), size_max (u32), seg_max (u32)
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.nsectors.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        let off = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(off + i).copied().unwrap_or(0);
        }
    }
    fn queue_notify(&mut self, _index: usize, ctx: &mut DeviceCtx, _ops: &mut dyn super::Watch) {
        self.process(ctx);
    }
    fn initial_fds(&self) -> Vec<(RawFd, EventSet, u32)> {
        self.limiter.iter().map(|l| (l.fd(), EventSet::IN, super::DEVICE_EVENT_BASE)).collect()
    }
    fn device_event(
        &mut self,
        _data: u32,
        _fd: RawFd,
        _set: EventSet,
        ctx: &mut DeviceCtx,
        _ops: &mut dyn super::Watch,
    ) {
        if let Some(l) = self.limiter.as_mut() {
            l.timer_fired();
        }
        if ctx.active {
            self.process(ctx);
        }
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "read_only": self.read_only,
            "sectors": self.nsectors,
            "counters": self.counters.snapshot(),
            "rate_limiter": self.limiter.as_ref().map(|l| l.describe()),
        })
    }
    /// Version 1: the rate limiter's budgets (JSON); nothing without a limiter.
    fn save_model(&self) -> crate::snapshot::ModelState {
        match &self.limiter {
            Some(l) => {
                crate::snapshot::ModelState { version: 1, data: serde_json::to_vec(&l.save()).unwrap_or_default() }
            }
            None => crate::snapshot::ModelState::default(),
        }
    }
    fn restore_model(&mut self, state: &crate::snapshot::ModelState) -> Result<(), String> {
        match (state.version, state.data.is_empty(), self.limiter.as_mut()) {
            (_, true, _) => Ok(()),
            (1, false, Some(l)) => {
                let s: RateLimiterState =
                    serde_json::from_slice(&state.data).map_err(|e| format!("block rate limiter state: {e}"))?;
                l.restore(&s);
                Ok(())
            }
            // The limiter was removed at restore: its budgets have nowhere to go.
            (1, false, None) => Ok(()),
            (v, false, _) => Err(format!("unknown block device state version {v}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::*;

    fn disk(read_only: bool) -> (Block, tempfile_path::TempPath) {
        let p = tempfile_path::TempPath::new("blk");
        let mut data = vec![0u8; 8 * 512];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        std::fs::write(&p.0, &data).unwrap();
        (Block::open(&p.0, read_only, "flint-test").unwrap(), p)
    }

    fn header(env: &QueueEnv, addr: u64, t: u32, sector: u64) {
        let mut h = Vec::new();
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        env.write(addr, &h);
    }

    #[test]
    fn a_rate_limited_drive_holds_requests_until_its_timer_fires() {
        let (dev, _p) = disk(false);
        // 1024 bytes per 100 ms: the first 1024-byte read passes, the second waits for the refill.
        let cfg = RateLimiterConfig {
            bandwidth: Some(flint_vmm_api::config::TokenBucketConfig {
                size: 1024,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
            ops: None,
        };
        let mut dev = dev.with_limiter(Some(&cfg)).unwrap();
        assert_eq!(dev.initial_fds().len(), 1, "the limiter's timer is watched");
        let mut env = QueueEnv::new(&[256]);
        for (i, at) in [0x10000u64, 0x20000].iter().enumerate() {
            header(&env, *at, T_IN, i as u64);
            env.add_chain(0, &[(*at, 16, false), (at + 0x1000, 1024, true), (at + 0x2000, 1, true)]);
        }
        env.run(|ctx| dev.process(ctx));
        assert_eq!(env.used(0).len(), 1, "the second request waits");
        // A notify while throttled does nothing; the timer (100 ms) lets the request through.
        env.run(|ctx| dev.process(ctx));
        assert_eq!(env.used(0).len(), 1);
        let fd = dev.initial_fds()[0].0;
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one pollfd we own, for at most a second.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1, "the timer fires");
        struct NoWatch;
        impl crate::devices::virtio::Watch for NoWatch {
            fn add(&mut self, _: RawFd, _: u32, _: EventSet) {}
            fn modify(&mut self, _: RawFd, _: u32, _: EventSet) {}
            fn remove(&mut self, _: RawFd) {}
        }
        env.run(|ctx| dev.device_event(crate::devices::virtio::DEVICE_EVENT_BASE, fd, EventSet::IN, ctx, &mut NoWatch));
        assert_eq!(env.used(0).len(), 2);
        assert_eq!(env.read(0x22000, 1), vec![S_OK]);
        // The budget is kept in the snapshot's device state.
        let state = dev.save_model();
        assert_eq!(state.version, 1);
        let (fresh, _q) = disk(false);
        let mut fresh = fresh.with_limiter(Some(&cfg)).unwrap();
        fresh.restore_model(&state).unwrap();
        assert!(fresh.restore_model(&crate::snapshot::ModelState { version: 9, data: vec![1] }).is_err());
    }

    #[test]
    fn reads_writes_and_flushes() {
        let (mut dev, p) = disk(false);
        let mut env = QueueEnv::new(&[256]);
        header(&env, 0x10000, T_IN, 2);
        env.add_chain(0, &[(0x10000, 16, false), (0x11000, 1024, true), (0x12000, 1, true)]);
        env.run(|ctx| dev.process(ctx));
        assert_eq!(env.used(0), vec![(0, 1025)]);
        assert_eq!(env.read(0x11000, 1024)[..512], [2u8; 512]);
        assert_eq!(env.read(0x11000, 1024)[512..], [3u8; 512]);
        assert_eq!(env.read(0x12000, 1), vec![S_OK]);

        header(&env, 0x13000, T_OUT, 7);
        env.write(0x14000, &[0xab; 512]);
        env.add_chain(0, &[(0x13000, 16, false), (0x14000, 512, false), (0x15000, 1, true)]);
        header(&env, 0x16000, T_FLUSH, 0);
        env.add_chain(0, &[(0x16000, 16, false), (0x17000, 1, true)]);
        env.run(|ctx| dev.process(ctx));
        assert_eq!(env.read(0x15000, 1), vec![S_OK]);
        assert_eq!(env.read(0x17000, 1), vec![S_OK]);
        assert_eq!(std::fs::read(&p.0).unwrap()[7 * 512..], [0xab; 512]);
    }

    #[test]
    fn read_only_rejects_writes_and_out_of_range_fails() {
        let (mut dev, p) = disk(true);
        let mut env = QueueEnv::new(&[256]);
        header(&env, 0x10000, T_OUT, 0);
        env.add_chain(0, &[(0x10000, 16, false), (0x11000, 512, false), (0x12000, 1, true)]);
        header(&env, 0x13000, T_IN, 8);
        env.add_chain(0, &[(0x13000, 16, false), (0x14000, 512, true), (0x15000, 1, true)]);
        env.run(|ctx| dev.process(ctx));
        assert_eq!(env.read(0x12000, 1), vec![S_IOERR]);
        assert_eq!(env.read(0x15000, 1), vec![S_IOERR]);
        assert_eq!(std::fs::read(&p.0).unwrap()[..512], [0u8; 512]);
    }

    #[test]
    fn malformed_chains_are_counted() {
        let (mut dev, _p) = disk(false);
        let mut env = QueueEnv::new(&[256]);
        // No writable status byte at all.
        header(&env, 0x10000, T_IN, 0);
        env.add_chain(0, &[(0x10000, 16, false)]);
        // A buffer beyond guest memory.
        env.add_chain(0, &[(0xfff_0000, 16, false), (0x12000, 1, true)]);
        // A descriptor loop: next points at itself.
        env.write_desc(0, 10, 0x10000, 16, 1, 10);
        env.publish(0, 10);
        env.run(|ctx| dev.process(ctx));
        assert_eq!(dev.counters.bad_descriptors.load(Ordering::Relaxed), 3);
    }
}

#[cfg(test)]
mod tempfile_path {
    /// A file path removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Self(std::env::temp_dir().join(format!("flint-{tag}-{}-{n}", std::process::id())))
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
