//! virtio-balloon, for memory that goes back to the host: **free page reporting** (VIRTIO_BALLOON_F_REPORTING).
//! The guest kernel hands the device blocks of memory it has free (order ≥ pageblock order: 4 MiB on Flint's
//! kernel), each as a device-writable descriptor of a chain on the reporting queue; the device discards them
//! (`MADV_DONTNEED`: a private copy-on-write page of the snapshot's memory file or an anonymous page goes back to
//! the host, and the next touch reads the snapshot's page again, or zeros) and returns the chain. The guest keeps
//! a reported block marked as such and does not report it again until it was allocated and freed.
//!
//! The balloon proper (inflate/deflate queues, `num_pages`) is kept to what the specification requires: Flint
//! never asks for pages (`num_pages` stays 0), an inflated page is discarded like a reported one, and a deflate
//! needs nothing (the page faults back in). Queues: 0 inflate, 1 deflate, 2 reporting (the driver numbers only
//! the queues of negotiated features, and only reporting is offered).
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{DeviceCounters, DeviceCtx, VirtioDevice, Watch, TYPE_BALLOON};
use crate::vstate::memory::GuestMem;

/// VIRTIO_BALLOON_F_REPORTING: the reporting queue.
pub const F_REPORTING: u64 = 1 << 5;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
/// The driver needs room for PAGE_REPORTING_CAPACITY (32) descriptors in one chain.
const QUEUE_SIZES: [u16; 3] = [256, 256, 128];
/// Balloon page frames are 4 KiB whatever the guest's page size.
const PFN_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PFN_SHIFT;

/// Gives guest memory back to the host (`MADV_DONTNEED` in production, a recorder in unit tests).
pub trait Discard: Send {
    /// Discards `len` bytes of guest memory at `gpa` (page-aligned, inside one region).
    fn discard(&mut self, mem: &GuestMem, gpa: u64, len: u64) -> std::io::Result<()>;
}

/// `madvise(MADV_DONTNEED)` on the VMM's mapping of the range.
pub struct Madvise;

impl Discard for Madvise {
    fn discard(&mut self, mem: &GuestMem, gpa: u64, len: u64) -> std::io::Result<()> {
        let host = host_range(mem, gpa, len)?;
        // SAFETY: `host..host+len` lies inside one guest memory region this process mapped and keeps mapped for
        // the VMM's lifetime; MADV_DONTNEED only drops its pages (the guest sees the snapshot's page or zeros on
        // the next touch, which is what a reported free page may hold), it never unmaps the range.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The host address of `gpa..gpa+len`, which must be page-aligned and inside one region.
fn host_range(mem: &GuestMem, gpa: u64, len: u64) -> std::io::Result<usize> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{gpa:#x}+{len:#x}: {why}"));
    if !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
        return Err(bad("not whole pages"));
    }
    let r = mem.find_region(GuestAddress(gpa)).ok_or_else(|| bad("outside guest memory"))?;
    let off = gpa - r.start_addr().raw_value();
    if off.checked_add(len).is_none_or(|end| end > r.len()) {
        return Err(bad("crosses the end of a memory region"));
    }
    Ok(r.as_ptr() as usize + off as usize)
}

/// What the device did, for `describe` (flintd's metrics read them).
#[derive(Default)]
pub struct BalloonCounters {
    /// Reporting chains served, ranges in them, bytes discarded.
    pub reports: AtomicU64,
    pub reported_ranges: AtomicU64,
    pub reported_bytes: AtomicU64,
    /// Pages the guest inflated (discarded) and deflated.
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    /// Ranges the discard refused (outside memory, misaligned) or failed.
    pub discard_errors: AtomicU64,
}

pub struct Balloon {
    discard: Box<dyn Discard>,
    /// The guest's `actual` (pages it says it holds in the balloon); kept in snapshots.
    actual: u32,
    pub counters: DeviceCounters,
    pub balloon: BalloonCounters,
}

/// The model's state in a snapshot (version 1, JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct BalloonModel {
    actual: u32,
}

impl Balloon {
    pub fn new() -> Self {
        Self::with_discard(Box::new(Madvise))
    }

    pub fn with_discard(discard: Box<dyn Discard>) -> Self {
        Self { discard, actual: 0, counters: DeviceCounters::default(), balloon: BalloonCounters::default() }
    }

    fn discard(&mut self, mem: &GuestMem, gpa: u64, len: u64) -> bool {
        match self.discard.discard(mem, gpa, len) {
            Ok(()) => true,
            Err(_) => {
                self.balloon.discard_errors.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The reporting queue: every descriptor of a chain is a free block; each is discarded, the chain returned.
    fn report(&mut self, ctx: &mut DeviceCtx) {
        let mem = ctx.mem;
        let mut ranges = Vec::new();
        let mut chains = 0;
        super::queue::drain(ctx, REPORTING, &self.counters.bad_descriptors, |chain| {
            chains += 1;
            for d in chain {
                if !d.is_write_only() {
                    return None;
                }
                ranges.push((d.addr().raw_value(), u64::from(d.len())));
            }
            Some(0)
        });
        for (gpa, len) in ranges.drain(..) {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if self.discard(mem, gpa, len) {
                self.balloon.reported_ranges.fetch_add(1, Ordering::Relaxed);
                self.balloon.reported_bytes.fetch_add(len, Ordering::Relaxed);
            }
        }
        self.balloon.reports.fetch_add(chains, Ordering::Relaxed);
    }

    /// Inflate (discard each page frame) or deflate (nothing to do) queue: chains of readable little-endian u32
    /// page frame numbers.
    fn pfns(&mut self, q: usize, ctx: &mut DeviceCtx) {
        let mem = ctx.mem;
        let mut pfns = Vec::new();
        super::queue::drain(ctx, q, &self.counters.bad_descriptors, |chain| {
            for d in chain {
                if d.is_write_only() || !d.len().is_multiple_of(4) {
                    return None;
                }
                for i in 0..u64::from(d.len() / 4) {
                    let pfn: u32 = mem.read_obj(d.addr().checked_add(i * 4)?).ok()?;
                    pfns.push(u32::from_le(pfn));
                }
            }
            Some(0)
        });
        if q == DEFLATE {
            self.balloon.deflated_pages.fetch_add(pfns.len() as u64, Ordering::Relaxed);
            return;
        }
        pfns.sort_unstable();
        pfns.dedup();
        // Runs of consecutive frames, one discard each.
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                j += 1;
            }
            let gpa = u64::from(pfns[i]) << PFN_SHIFT;
            if self.discard(mem, gpa, (j - i) as u64 * PAGE) {
                self.balloon.inflated_pages.fetch_add((j - i) as u64, Ordering::Relaxed);
            }
            i = j;
        }
    }

    fn process(&mut self, q: usize, ctx: &mut DeviceCtx) {
        if !ctx.active || q >= ctx.queues.len() {
            return;
        }
        match q {
            INFLATE | DEFLATE => self.pfns(q, ctx),
            _ => self.report(ctx),
        }
    }
}

impl Default for Balloon {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        F_REPORTING
    }
    /// struct virtio_balloon_config: num_pages (0: Flint never asks for pages), actual, free_page_hint_cmd_id,
    /// poison_val (features not offered: 0).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[4..8].copy_from_slice(&self.actual.to_le_bytes());
        data.fill(0);
        let start = (offset as usize).min(config.len());
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }
    /// Only `actual` is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }
    fn queue_notify(&mut self, index: usize, ctx: &mut DeviceCtx, _ops: &mut dyn Watch) {
        self.process(index, ctx);
    }
    /// A snapshot taken while a chain waited (the guest's reporting thread blocks until it is returned): serve it.
    fn restored(&mut self, _acked: u64, ctx: &mut DeviceCtx) {
        for q in 0..ctx.queues.len().min(QUEUE_SIZES.len()) {
            self.process(q, ctx);
        }
    }
    fn describe(&self) -> serde_json::Value {
        let b = &self.balloon;
        serde_json::json!({
            "actual_pages": self.actual,
            "reports": b.reports.load(Ordering::Relaxed),
            "reported_ranges": b.reported_ranges.load(Ordering::Relaxed),
            "reported_bytes": b.reported_bytes.load(Ordering::Relaxed),
            "inflated_pages": b.inflated_pages.load(Ordering::Relaxed),
            "deflated_pages": b.deflated_pages.load(Ordering::Relaxed),
            "discard_errors": b.discard_errors.load(Ordering::Relaxed),
            "counters": self.counters.snapshot(),
        })
    }
    /// Version 1: `actual` (JSON); nothing while it is 0, which Flint's guests always leave it at (it never asks
    /// for pages), so their state files stay writable in format version 1 like those of a VM without the device.
    fn save_model(&self) -> crate::snapshot::ModelState {
        if self.actual == 0 {
            return crate::snapshot::ModelState::default();
        }
        let m = BalloonModel { actual: self.actual };
        crate::snapshot::ModelState { version: 1, data: serde_json::to_vec(&m).unwrap_or_default() }
    }
    fn restore_model(&mut self, state: &crate::snapshot::ModelState) -> Result<(), String> {
        if state.data.is_empty() {
            self.actual = 0;
            return Ok(());
        }
        if state.version != 1 {
            return Err(format!("unknown balloon device state version {}", state.version));
        }
        let m: BalloonModel = serde_json::from_slice(&state.data).map_err(|e| format!("balloon state: {e}"))?;
        self.actual = m.actual;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::*;
    use std::sync::{Arc, Mutex};

    /// Records every discard; refuses what the production discard would (outside memory, misaligned).
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(u64, u64)>>>);

    impl Discard for Recorder {
        fn discard(&mut self, mem: &GuestMem, gpa: u64, len: u64) -> std::io::Result<()> {
            host_range(mem, gpa, len)?;
            self.0.lock().unwrap().push((gpa, len));
            Ok(())
        }
    }

    fn device() -> (Balloon, Recorder) {
        let r = Recorder::default();
        (Balloon::with_discard(Box::new(r.clone())), r)
    }

    #[test]
    fn reported_blocks_are_discarded_and_returned() {
        let mut env = QueueEnv::new(&QUEUE_SIZES);
        let head = env.add_chain(REPORTING, &[(0x40000, 0x20000, true), (0x80000, 0x40000, true)]);
        let (mut dev, rec) = device();
        env.run(|ctx| dev.process(REPORTING, ctx));
        assert_eq!(*rec.0.lock().unwrap(), vec![(0x40000, 0x20000), (0x80000, 0x40000)]);
        assert_eq!(env.used(REPORTING), vec![(u32::from(head), 0)]);
        assert!(env.interrupted());
        assert_eq!(dev.balloon.reported_bytes.load(Ordering::Relaxed), 0x60000);
        assert_eq!(dev.balloon.reports.load(Ordering::Relaxed), 1);
        env.run(|ctx| dev.process(REPORTING, ctx));
        assert_eq!(dev.balloon.reports.load(Ordering::Relaxed), 1, "a notification without a chain is no report");
    }

    /// A report the guest got wrong (a readable descriptor; a range outside memory or not page-aligned) is
    /// counted and returned; nothing outside guest memory is ever discarded.
    #[test]
    fn bad_reports_are_counted_never_discarded() {
        let mut env = QueueEnv::new(&QUEUE_SIZES);
        env.add_chain(REPORTING, &[(0x40000, 0x1000, false)]);
        env.add_chain(REPORTING, &[(0xff000, 0x2000, true)]);
        env.add_chain(REPORTING, &[(0x40800, 0x1000, true)]);
        let (mut dev, rec) = device();
        env.run(|ctx| dev.process(REPORTING, ctx));
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(env.used(REPORTING).len(), 3, "every chain goes back to the guest");
        assert_eq!(dev.counters.bad_descriptors.load(Ordering::Relaxed), 1);
        assert_eq!(dev.balloon.discard_errors.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn inflated_frames_are_discarded_in_runs_and_deflates_change_nothing() {
        let mut env = QueueEnv::new(&QUEUE_SIZES);
        let pfns: [u32; 4] = [0x41, 0x40, 0x42, 0x90];
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        env.write(0x20000, &bytes);
        env.add_chain(INFLATE, &[(0x20000, bytes.len() as u32, false)]);
        env.add_chain(DEFLATE, &[(0x20000, 8, false)]);
        let (mut dev, rec) = device();
        env.run(|ctx| {
            dev.process(INFLATE, ctx);
            dev.process(DEFLATE, ctx);
        });
        assert_eq!(*rec.0.lock().unwrap(), vec![(0x40000, 0x3000), (0x90000, 0x1000)]);
        assert_eq!(dev.balloon.inflated_pages.load(Ordering::Relaxed), 4);
        assert_eq!(dev.balloon.deflated_pages.load(Ordering::Relaxed), 2);
        assert_eq!(env.used(INFLATE).len(), 1);
        assert_eq!(env.used(DEFLATE).len(), 1);
    }

    #[test]
    fn config_space_and_state() {
        let (mut dev, _) = device();
        assert_eq!(dev.features(), F_REPORTING);
        dev.write_config(4, &7u32.to_le_bytes());
        dev.write_config(0, &9u32.to_le_bytes()); // num_pages is the device's: ignored
        let mut buf = [0u8; 8];
        dev.read_config(0, &mut buf);
        assert_eq!(buf, [0, 0, 0, 0, 7, 0, 0, 0]);
        let mut past = [0xffu8; 4];
        dev.read_config(64, &mut past);
        assert_eq!(past, [0; 4]);
        let saved = dev.save_model();
        let (mut other, _) = device();
        other.restore_model(&saved).unwrap();
        assert_eq!(other.actual, 7);
        assert!(other.restore_model(&crate::snapshot::ModelState { version: 9, data: b"{}".to_vec() }).is_err());
        // `actual` 0 (what Flint's guests leave it at) keeps no state: a version-1 state file can hold the device.
        let (idle, _) = device();
        assert!(idle.save_model().data.is_empty());
        other.restore_model(&idle.save_model()).unwrap();
        assert_eq!(other.actual, 0);
    }

    /// The production discard drops the pages of the range: anonymous memory reads zero again.
    #[test]
    fn madvise_gives_pages_back() {
        let env = QueueEnv::new(&QUEUE_SIZES);
        env.write(0x80000, &[0xab; 0x2000]);
        Madvise.discard(&env.mem, 0x80000, 0x1000).unwrap();
        assert_eq!(env.read(0x80000, 0x1000), vec![0; 0x1000]);
        assert_eq!(env.read(0x81000, 0x1000), vec![0xab; 0x1000], "only the range");
        assert!(Madvise.discard(&env.mem, 0x200000, 0x1000).is_err(), "outside memory");
    }
}
