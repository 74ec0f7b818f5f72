//! Lazy restore: guest memory served on first touch through userfaultfd (MISSING mode).
//!
//! The guest's RAM is anonymous memory registered with a userfaultfd created *without*
//! UFFD_USER_MODE_ONLY, because the faults come from the kernel (KVM touching guest pages on
//! the vCPU's behalf). A handler thread answers each fault by copying the page from a
//! [`PageSource`] (UFFDIO_COPY) or mapping the zero page (UFFDIO_ZEROPAGE).
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const PAGE: u64 = 4096;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// Where page contents come from: a local memory file, or the snapshot store (lazy restore from L1/S3).
///
/// Memory is served in *units* (the source's natural granularity: 64 KiB of a file, one store chunk); a fault
/// installs the whole unit around it.
pub trait PageSource: Send + Sync {
    /// Bytes per unit (a multiple of the page size).
    fn unit(&self) -> u64;
    /// Total bytes of the memory image.
    fn size(&self) -> u64;
    /// Fills `buf` (the unit's length, shorter for the last one) with unit `index`; returns false when the unit is
    /// all zero (no copy needed). An error is fatal to the VM: its memory cannot be provided.
    fn read_unit(&self, index: u64, buf: &mut [u8]) -> std::io::Result<bool>;
    /// Extra counters for `describe` (bytes fetched from the store, ...).
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A memory file on local disk.
pub struct FileSource {
    pub file: File,
    pub unit: u64,
    pub size: u64,
}

impl PageSource for FileSource {
    fn unit(&self) -> u64 {
        self.unit
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_unit(&self, index: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        self.file.read_exact_at(buf, index * self.unit)?;
        Ok(buf.iter().any(|b| *b != 0))
    }
}

/// Counters of the fault handler (for `describe` and benchmarks).
#[derive(Default)]
pub struct UffdStats {
    pub faults: AtomicU64,
    pub pages_copied: AtomicU64,
    pub zero_pages: AtomicU64,
    pub bytes_read: AtomicU64,
    pub handler_ns: AtomicU64,
    pub failed: AtomicBool,
    /// Units installed ahead of any fault (working-set prefetch).
    pub prefetched: AtomicU64,
    /// Units first faulted by the guest, in first-touch order (the working set of this restore).
    pub touched: Mutex<Vec<u32>>,
    /// Unit size of the source, for interpreting `touched`.
    pub unit: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd (is /dev/userfaultfd or vm.unprivileged_userfaultfd available?)")]
    Create(#[source] std::io::Error),
    #[error("userfaultfd {0} failed")]
    Ioctl(&'static str, #[source] std::io::Error),
}

/// One registered range: host address, length, and its offset in the memory image.
#[derive(Clone, Copy)]
pub struct Range {
    pub host: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Unit states.
const MISSING: u8 = 0;
const QUEUED: u8 = 1;
const DONE: u8 = 2;

/// Work for the fetch workers: demand faults first, then prefetch.
struct Queue {
    jobs: Mutex<(VecDeque<u64>, VecDeque<u64>)>,
    ready: Condvar,
}

struct Shared {
    uffd: OwnedFd,
    ranges: Vec<Range>,
    source: Arc<dyn PageSource>,
    states: Vec<AtomicU8>,
    queue: Queue,
    stats: Arc<UffdStats>,
}

/// Creates the userfaultfd, registers `ranges`, and starts the fault thread plus `workers` fetch threads. A fault
/// queues the unit around it (once); workers fetch units in parallel, so a slow fetch never blocks faults on other
/// units. `prefetch` units are fetched and installed ahead of faults, after any demand fault.
pub fn start(
    ranges: Vec<Range>,
    source: Arc<dyn PageSource>,
    workers: usize,
    prefetch: &[u32],
    stats: Arc<UffdStats>,
) -> Result<(), UffdError> {
    // SAFETY: plain syscall; the result is checked and owned.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
    if fd < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh userfaultfd nobody else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes a uffdio_api, which `api` is laid out as.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
        return Err(UffdError::Ioctl("API handshake", std::io::Error::last_os_error()));
    }
    for r in &ranges {
        let mut reg = UffdioRegister { start: r.host, len: r.len, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register; the range is our own
        // anonymous mapping.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(UffdError::Ioctl("register", std::io::Error::last_os_error()));
        }
    }
    let unit = source.unit();
    if unit == 0 || !unit.is_multiple_of(PAGE) {
        return Err(UffdError::Ioctl("unit size", std::io::Error::other(format!("{unit} is not a page multiple"))));
    }
    stats.unit.store(unit, Ordering::Relaxed);
    let units = source.size().div_ceil(unit) as usize;
    let shared = Arc::new(Shared {
        uffd,
        ranges,
        source,
        states: (0..units).map(|_| AtomicU8::new(MISSING)).collect(),
        queue: Queue { jobs: Mutex::new((VecDeque::new(), VecDeque::new())), ready: Condvar::new() },
        stats,
    });
    {
        let mut jobs = lock(&shared.queue.jobs);
        for &u in prefetch {
            if let Some(st) = shared.states.get(u as usize) {
                if st.compare_exchange(MISSING, QUEUED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    jobs.1.push_back(u as u64);
                }
            }
        }
    }
    for i in 0..workers.max(1) {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("uffd-fetch{i}"))
            .spawn(move || worker(sh))
            .map_err(|e| UffdError::Ioctl("worker thread", e))?;
    }
    std::thread::Builder::new()
        .name("uffd".into())
        .spawn(move || handler(shared))
        .map_err(|e| UffdError::Ioctl("handler thread", e))?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn handler(sh: Arc<Shared>) {
    let mut msg = [0u8; 32];
    let unit = sh.source.unit();
    loop {
        // SAFETY: reading one uffd_msg (32 bytes) into our buffer.
        let n = unsafe { libc::read(sh.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != msg.len() as isize {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return; // the VM is gone
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&msg[16..24]);
        let addr = u64::from_le_bytes(a) & !(PAGE - 1);
        sh.stats.faults.fetch_add(1, Ordering::Relaxed);
        let Some(r) = sh.ranges.iter().find(|r| addr >= r.host && addr < r.host + r.len) else { continue };
        let u = (r.file_offset + (addr - r.host)) / unit;
        let Some(state) = sh.states.get(u as usize) else { continue };
        match state.compare_exchange(MISSING, QUEUED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                lock(&sh.stats.touched).push(u as u32);
                lock(&sh.queue.jobs).0.push_back(u);
                sh.queue.ready.notify_one();
            }
            Err(QUEUED) => {
                // Queued for prefetch, or being fetched: move it to the front if it is still waiting.
                let mut jobs = lock(&sh.queue.jobs);
                if let Some(pos) = jobs.1.iter().position(|x| *x == u) {
                    jobs.1.remove(pos);
                    jobs.0.push_back(u);
                    drop(jobs);
                    sh.queue.ready.notify_one();
                }
            }
            Err(_) => wake(&sh.uffd, addr, PAGE), // installed meanwhile: make sure the faulting thread runs on
        }
    }
}

fn worker(sh: Arc<Shared>) {
    let unit = sh.source.unit();
    let mut buf = vec![0u8; unit as usize];
    loop {
        let (u, demand) = {
            let mut jobs = lock(&sh.queue.jobs);
            loop {
                if let Some(u) = jobs.0.pop_front() {
                    break (u, true);
                }
                if let Some(u) = jobs.1.pop_front() {
                    break (u, false);
                }
                jobs = sh.queue.ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
            }
        };
        let t = std::time::Instant::now();
        let start = u * unit;
        let len = unit.min(sh.source.size() - start);
        let data = &mut buf[..len as usize];
        let nonzero = match sh.source.read_unit(u, data) {
            Ok(nz) => nz,
            Err(e) => fatal(&sh, u, &e),
        };
        if nonzero {
            sh.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
        }
        // Install the unit into every registered range it overlaps (units are in image-offset space).
        for r in &sh.ranges {
            let lo = start.max(r.file_offset);
            let hi = (start + len).min(r.file_offset + r.len);
            if lo >= hi {
                continue;
            }
            let dst = r.host + (lo - r.file_offset);
            let ok = if nonzero {
                copy(&sh.uffd, dst, &data[(lo - start) as usize..(hi - start) as usize], &sh.stats)
            } else {
                zero(&sh.uffd, dst, hi - lo, &sh.stats)
            };
            if !ok {
                fatal(&sh, u, &std::io::Error::last_os_error());
            }
        }
        sh.states[u as usize].store(DONE, Ordering::Release);
        if !demand {
            sh.stats.prefetched.fetch_add(1, Ordering::Relaxed);
        }
        sh.stats.handler_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The guest's memory cannot be provided: stop the VM with a clear error rather than leave a vCPU waiting on a
/// page that will never come (or give it wrong data).
fn fatal(sh: &Shared, unit: u64, e: &std::io::Error) -> ! {
    sh.stats.failed.store(true, Ordering::Relaxed);
    eprintln!(
        "flint-vmm: lazy restore failed: memory unit {unit} ({} bytes at offset {}) could not be provided: {e}; stopping the VM",
        sh.source.unit(),
        unit * sh.source.unit()
    );
    std::process::exit(2);
}

/// Installs `data` at `dst`. Units are installed once each, so EEXIST means a bug, not a race.
fn copy(uffd: &OwnedFd, dst: u64, data: &[u8], stats: &UffdStats) -> bool {
    let mut c = UffdioCopy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
    // SAFETY: UFFDIO_COPY copies `len` bytes from our buffer into the registered range.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
    if r == 0 {
        stats.pages_copied.fetch_add(data.len() as u64 / PAGE, Ordering::Relaxed);
        return true;
    }
    false
}

fn zero(uffd: &OwnedFd, start: u64, len: u64, stats: &UffdStats) -> bool {
    let mut z = UffdioZeropage { start, len, mode: 0, zeropage: 0 };
    // SAFETY: UFFDIO_ZEROPAGE maps zero pages into the registered range.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
    if r == 0 {
        stats.zero_pages.fetch_add(len / PAGE, Ordering::Relaxed);
        return true;
    }
    false
}

fn wake(uffd: &OwnedFd, start: u64, len: u64) {
    let mut range = [start, len];
    // SAFETY: UFFDIO_WAKE reads a uffdio_range {start, len}, which `range` is laid out as.
    unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, range.as_mut_ptr()) };
}
