//! Lazy guest memory: pages served on first touch through userfaultfd (MISSING mode).
//!
//! The guest's RAM is anonymous memory registered with a userfaultfd created *without* UFFD_USER_MODE_ONLY,
//! because the faults come from the kernel (KVM touching guest pages on the vCPU's behalf). A handler thread
//! answers each fault by queueing the unit around it; worker threads read units from a [`PageSource`] and install
//! them (UFFDIO_COPY) or map the zero page (UFFDIO_ZEROPAGE).
//!
//! The VMM creates the userfaultfd and registers its memory ([`Userfault::create`], [`Userfault::register`]). It
//! serves the faults itself for a local memory file, or hands the fd to flintd's page server ([`send_fd`] /
//! [`recv_fd`], SCM_RIGHTS), which owns the snapshot store: UFFDIO_COPY works from any process holding the fd.
use std::collections::VecDeque;
use std::fs::File;
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use flint_vmm_api::describe::UffdReport;
use flint_vmm_api::lock;
use flint_vmm_api::pager::PagerRange;

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const PAGE: u64 = 4096;

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

/// Counters of a page server.
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

impl UffdStats {
    /// The counters as the contract's report, with the source's own.
    pub fn report(&self, source: &dyn PageSource) -> UffdReport {
        UffdReport {
            faults: self.faults.load(Ordering::Relaxed),
            pages_copied: self.pages_copied.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            handler_us: self.handler_ns.load(Ordering::Relaxed) / 1000,
            failed: self.failed.load(Ordering::Relaxed),
            prefetched_units: self.prefetched.load(Ordering::Relaxed),
            unit_bytes: self.unit.load(Ordering::Relaxed),
            touched_units: lock(&self.touched).clone(),
            source: source.stats(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd (is /dev/userfaultfd or vm.unprivileged_userfaultfd available?)")]
    Create(#[source] std::io::Error),
    #[error("userfaultfd {0} failed")]
    Ioctl(&'static str, #[source] std::io::Error),
    #[error("the page source's unit of {0} bytes is not a multiple of the page size")]
    Unit(u64),
    #[error("the memory image is {have} bytes, the registered ranges {want}")]
    Size { have: u64, want: u64 },
    #[error("cannot start a page-server thread")]
    Thread(#[source] std::io::Error),
}

/// A userfaultfd.
pub struct Userfault(OwnedFd);

impl Userfault {
    /// Creates a userfaultfd for kernel and user faults, after the API handshake.
    pub fn create() -> Result<Self, UffdError> {
        // SAFETY: plain syscall; the result is checked and owned.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
        if fd < 0 {
            let sys_err = std::io::Error::last_os_error();
            // Unprivileged (a jailed VMM, vm.unprivileged_userfaultfd = 0): the /dev/userfaultfd node its jail
            // holds grants userfaultfds that see kernel faults too (Linux 6.1+).
            fd = Self::from_device().map_err(|_| UffdError::Create(sys_err))?;
        }
        // SAFETY: `fd` is a fresh userfaultfd nobody else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes a uffdio_api, which `api` is laid out as.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(UffdError::Ioctl("API handshake", std::io::Error::last_os_error()));
        }
        Ok(Userfault(uffd))
    }

    /// A userfaultfd from `/dev/userfaultfd` (USERFAULTFD_IOC_NEW).
    fn from_device() -> std::io::Result<i32> {
        const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and returns a new fd (or -1).
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Registers `[host, host + len)` of this process's memory for MISSING faults.
    pub fn register(&self, host: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { start: host, len, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register; registering only changes how faults in the
        // range are resolved (they wait for the handler), it does not touch the memory.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(UffdError::Ioctl("register", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.0
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Userfault(fd)
    }
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

/// Called once when a unit cannot be provided (the VM must stop: its vCPU would wait forever, or run on wrong
/// data); gets the message.
pub type OnFatal = Box<dyn Fn(String) + Send + Sync>;

struct Shared {
    uffd: OwnedFd,
    ranges: Vec<PagerRange>,
    source: Arc<dyn PageSource>,
    states: Vec<AtomicU8>,
    queue: Queue,
    stats: Arc<UffdStats>,
    stopped: AtomicBool,
    on_fatal: OnFatal,
}

/// What to serve and how.
pub struct ServeConfig {
    pub ranges: Vec<PagerRange>,
    pub source: Arc<dyn PageSource>,
    pub workers: usize,
    pub prefetch: Vec<u32>,
    pub stats: Arc<UffdStats>,
    pub on_fatal: OnFatal,
    /// The serving ends when this socket's peer hangs up (the VMM exited); None: when the uffd does.
    pub hangup: Option<UnixStream>,
    /// Run first on every serving thread (the VMM installs its seccomp filter for the kind there).
    pub thread_start: Option<fn()>,
}

/// Serves faults on `uffd`: the fault thread plus `workers` fetch threads. A fault queues the unit around it
/// (once); workers fetch units in parallel, so a slow fetch never blocks faults on other units. `prefetch` units
/// are fetched and installed ahead of faults, after any demand fault.
pub fn serve(uffd: Userfault, cfg: ServeConfig) -> Result<(), UffdError> {
    let unit = cfg.source.unit();
    if unit == 0 || !unit.is_multiple_of(PAGE) {
        return Err(UffdError::Unit(unit));
    }
    let want: u64 = cfg.ranges.iter().map(|r| r.len).sum();
    if cfg.source.size() != want {
        return Err(UffdError::Size { have: cfg.source.size(), want });
    }
    // poll(2) on a blocking userfaultfd reports POLLERR ("poll() never guarantees that read won't block"):
    // serve it non-blocking.
    // SAFETY: fcntl(2) F_GETFL/F_SETFL on a descriptor we own; only the status flags change.
    let nonblocking = unsafe {
        let flags = libc::fcntl(uffd.0.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(uffd.0.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !nonblocking {
        return Err(UffdError::Ioctl("non-blocking mode", std::io::Error::last_os_error()));
    }
    cfg.stats.unit.store(unit, Ordering::Relaxed);
    let units = cfg.source.size().div_ceil(unit) as usize;
    let shared = Arc::new(Shared {
        uffd: uffd.0,
        ranges: cfg.ranges,
        source: cfg.source,
        states: (0..units).map(|_| AtomicU8::new(MISSING)).collect(),
        queue: Queue { jobs: Mutex::new((VecDeque::new(), VecDeque::new())), ready: Condvar::new() },
        stats: cfg.stats,
        stopped: AtomicBool::new(false),
        on_fatal: cfg.on_fatal,
    });
    {
        let mut jobs = lock(&shared.queue.jobs);
        for &u in &cfg.prefetch {
            if let Some(st) = shared.states.get(u as usize) {
                if st.compare_exchange(MISSING, QUEUED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    jobs.1.push_back(u as u64);
                }
            }
        }
    }
    let start = cfg.thread_start;
    for i in 0..cfg.workers.max(1) {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("uffd-fetch{i}"))
            .spawn(move || {
                if let Some(f) = start {
                    f();
                }
                worker(sh)
            })
            .map_err(UffdError::Thread)?;
    }
    let hangup = cfg.hangup;
    std::thread::Builder::new()
        .name("uffd".into())
        .spawn(move || {
            if let Some(f) = start {
                f();
            }
            if let Err(e) = handler(&shared, hangup.as_ref().map(|s| s.as_raw_fd())) {
                // Faults can no longer be answered: as fatal as a unit that cannot be read.
                if !shared.stats.failed.swap(true, Ordering::AcqRel) {
                    (shared.on_fatal)(format!("lazy restore failed: the page server stopped: {e}"));
                }
            }
            stop(&shared);
            drop(hangup);
        })
        .map_err(UffdError::Thread)?;
    Ok(())
}

fn stop(sh: &Shared) {
    sh.stopped.store(true, Ordering::Release);
    let _jobs = lock(&sh.queue.jobs);
    sh.queue.ready.notify_all();
}

/// Reads faults until the VM is gone (`Ok`) or the userfaultfd fails (`Err`).
fn handler(sh: &Shared, hangup: Option<RawFd>) -> std::io::Result<()> {
    let mut msg = [0u8; 32];
    let unit = sh.source.unit();
    loop {
        if sh.stopped.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut fds = [
            libc::pollfd { fd: sh.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: hangup.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll(2) on two pollfd structs we own; a negative fd is ignored by the kernel.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            // The VMM's end of the connection: readable means hung up (it sends nothing after the hello).
            return Ok(());
        }
        if fds[0].revents & libc::POLLHUP != 0 {
            return Ok(()); // the VM's memory is gone
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(std::io::Error::other(format!("poll on the userfaultfd: revents {:#x}", fds[0].revents)));
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: reading one uffd_msg (32 bytes) into our buffer; the fd is non-blocking only if the creator made
        // it so, and poll said a message is there.
        let n = unsafe { libc::read(sh.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != msg.len() as isize {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) {
                continue;
            }
            return Err(e);
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&msg[16..24]);
        let addr = u64::from_le_bytes(a) & !(PAGE - 1);
        sh.stats.faults.fetch_add(1, Ordering::Relaxed);
        let Some(r) = sh.ranges.iter().find(|r| addr >= r.host && addr < r.host + r.len) else { continue };
        let u = (r.image_offset + (addr - r.host)) / unit;
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
                if sh.stopped.load(Ordering::Acquire) {
                    return;
                }
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
            Err(e) => return fatal(&sh, u, &e),
        };
        if nonzero {
            sh.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
        }
        // Install the unit into every registered range it overlaps (units are in image-offset space).
        for r in &sh.ranges {
            let lo = start.max(r.image_offset);
            let hi = (start + len).min(r.image_offset + r.len);
            if lo >= hi {
                continue;
            }
            let dst = r.host + (lo - r.image_offset);
            let result = if nonzero {
                copy(&sh.uffd, dst, &data[(lo - start) as usize..(hi - start) as usize], &sh.stats)
            } else {
                zero(&sh.uffd, dst, hi - lo, &sh.stats)
            };
            if let Err(e) = result {
                if e.raw_os_error() == Some(libc::ESRCH) || sh.stopped.load(Ordering::Acquire) {
                    return stop(&sh); // the VM's memory is gone: nothing left to serve
                }
                return fatal(&sh, u, &e);
            }
        }
        sh.states[u as usize].store(DONE, Ordering::Release);
        if !demand {
            sh.stats.prefetched.fetch_add(1, Ordering::Relaxed);
        }
        sh.stats.handler_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The guest's memory cannot be provided: stop serving and tell the owner, who stops the VM with a clear error
/// rather than leave a vCPU waiting on a page that will never come (or give it wrong data).
fn fatal(sh: &Shared, unit: u64, e: &std::io::Error) {
    if sh.stats.failed.swap(true, Ordering::AcqRel) {
        return;
    }
    stop(sh);
    (sh.on_fatal)(format!(
        "lazy restore failed: memory unit {unit} ({} bytes at offset {}) could not be provided: {e}",
        sh.source.unit(),
        unit * sh.source.unit()
    ));
}

/// Installs `data` at `dst`, page by page where some pages are present already (a page server that took over
/// from an earlier one: what is installed stays).
fn copy(uffd: &OwnedFd, dst: u64, data: &[u8], stats: &UffdStats) -> std::io::Result<()> {
    let mut c = UffdioCopy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
    // SAFETY: UFFDIO_COPY copies `len` bytes from our buffer (valid for that length) into the registered range.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
    if r == 0 {
        stats.pages_copied.fetch_add(data.len() as u64 / PAGE, Ordering::Relaxed);
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EEXIST) {
        return Err(e);
    }
    for (i, page) in data.chunks(PAGE as usize).enumerate() {
        let mut c = UffdioCopy {
            dst: dst + i as u64 * PAGE,
            src: page.as_ptr() as u64,
            len: page.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: as above, for one page of our buffer.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut c) } == 0 {
            stats.pages_copied.fetch_add(1, Ordering::Relaxed);
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
    }
    wake(uffd, dst, data.len() as u64);
    Ok(())
}

fn zero(uffd: &OwnedFd, start: u64, len: u64, stats: &UffdStats) -> std::io::Result<()> {
    let mut z = UffdioZeropage { start, len, mode: 0, zeropage: 0 };
    // SAFETY: UFFDIO_ZEROPAGE maps zero pages into the registered range; it reads only the struct.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
    if r == 0 {
        stats.zero_pages.fetch_add(len / PAGE, Ordering::Relaxed);
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EEXIST) {
        return Err(e);
    }
    for off in (0..len).step_by(PAGE as usize) {
        let mut z = UffdioZeropage { start: start + off, len: PAGE, mode: 0, zeropage: 0 };
        // SAFETY: as above, for one page.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) } == 0 {
            stats.zero_pages.fetch_add(1, Ordering::Relaxed);
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
    }
    wake(uffd, start, len);
    Ok(())
}

fn wake(uffd: &OwnedFd, start: u64, len: u64) {
    let mut range = [start, len];
    // SAFETY: UFFDIO_WAKE reads a uffdio_range {start, len}, which `range` is laid out as.
    unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, range.as_mut_ptr()) };
}

/// Sends `bytes` with `fd` attached (SCM_RIGHTS) in one message.
pub fn send_fd(sock: &UnixStream, bytes: &[u8], fd: &OwnedFd) -> std::io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; we fill in the fields below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` bytes, enough for one cmsg carrying one fd (CMSG_SPACE above), so
    // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for a RawFd.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
    }
    // SAFETY: sendmsg(2) with a msghdr whose buffers all outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(std::io::Error::other("short sendmsg"));
    }
    Ok(())
}

/// Receives one message of at most `max` bytes and the fd attached to it, if any. Extra fds are closed.
pub fn recv_fd(sock: &UnixStream, max: usize) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; max];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; we fill in the fields below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: recvmsg(2) into buffers we own that outlive the call; MSG_CMSG_CLOEXEC keeps received fds from
    // leaking into children.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into `cbuf` with the CMSG_* macros, which stay within
    // msg_controllen; each SCM_RIGHTS payload holds whole RawFds that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other("control message truncated"));
    }
    Ok((buf, fd))
}

/// The pid of the process at the other end of a Unix socket (SO_PEERCRED).
pub fn peer_pid(sock: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cred`, which is a ucred.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pattern;
    impl PageSource for Pattern {
        fn unit(&self) -> u64 {
            16 * PAGE
        }
        fn size(&self) -> u64 {
            64 * PAGE
        }
        fn read_unit(&self, index: u64, buf: &mut [u8]) -> std::io::Result<bool> {
            if index == 3 {
                return Ok(false);
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (index as usize * 7 + i / 4096) as u8 | 1;
            }
            Ok(true)
        }
    }

    /// Registers anonymous memory, passes the uffd through a socket pair (as the VMM does to flintd), serves it
    /// from the other end and checks every page, including a zero unit.
    #[test]
    fn serves_faults_through_a_passed_fd() {
        let Ok(uffd) = Userfault::create() else {
            eprintln!("no userfaultfd here; skipping");
            return;
        };
        let len = 64 * PAGE;
        // SAFETY: a fresh anonymous mapping; checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        uffd.register(mem as u64, len).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_fd(&a, b"hello", uffd.fd()).unwrap();
        drop(uffd);
        let (bytes, fd) = recv_fd(&b, 64).unwrap();
        assert_eq!(bytes, b"hello");
        assert_eq!(peer_pid(&b).unwrap(), std::process::id());
        let stats = Arc::new(UffdStats::default());
        let fatal = Arc::new(Mutex::new(None));
        let f2 = fatal.clone();
        serve(
            Userfault::from_fd(fd.unwrap()),
            ServeConfig {
                ranges: vec![PagerRange { host: mem as u64, len, image_offset: 0 }],
                source: Arc::new(Pattern),
                workers: 2,
                prefetch: vec![2],
                stats: stats.clone(),
                on_fatal: Box::new(move |m| *lock(&f2) = Some(m)),
                hangup: Some(b),
                thread_start: None,
            },
        )
        .unwrap();
        // SAFETY: reading our own mapping; faults are resolved by the server threads.
        let view = unsafe { std::slice::from_raw_parts(mem as *const u8, len as usize) };
        for page in 0..64usize {
            let unit = page / 16;
            let want = if unit == 3 { 0 } else { (unit * 7 + page % 16) as u8 | 1 };
            assert_eq!(view[page * 4096 + 5], want, "page {page}");
        }
        assert!(lock(&fatal).is_none());
        // The ioctl wakes the faulting thread before the worker counts what it installed: wait for the count.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stats.zero_pages.load(Ordering::Relaxed) < 16 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(stats.zero_pages.load(Ordering::Relaxed), 16);
        assert!(!lock(&stats.touched).is_empty());
        drop(a); // hang up: the server threads end
                 // SAFETY: unmapping what we mapped; nothing refers to it any more.
        unsafe { libc::munmap(mem, len as usize) };
    }
}
