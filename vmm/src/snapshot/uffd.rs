//! Lazy restore: guest memory served on first touch through userfaultfd (MISSING mode).
//!
//! The guest's RAM is anonymous memory registered with a userfaultfd created *without*
//! UFFD_USER_MODE_ONLY, because the faults come from the kernel (KVM touching guest pages on
//! the vCPU's behalf). A handler thread answers each fault by copying the page from a
//! [`PageSource`] (UFFDIO_COPY) or mapping the zero page (UFFDIO_ZEROPAGE).
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
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

/// Where page contents come from (a local file now; the snapshot store later).
pub trait PageSource: Send + Sync {
    /// Fills `buf` with the bytes at `offset` of the memory image; returns false when the whole
    /// range is known to be zero (no copy needed).
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<bool>;
}

/// A memory file on local disk.
pub struct FileSource(pub File);

impl PageSource for FileSource {
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        self.0.read_exact_at(buf, offset)?;
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

/// Creates the userfaultfd, registers `ranges`, and starts the handler thread. Faults are
/// served a whole `chunk` (a multiple of the page size) at a time, so sequential touches cost
/// one round trip per chunk.
pub fn start(
    ranges: Vec<Range>,
    source: Arc<dyn PageSource>,
    chunk: u64,
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
    let chunk = chunk.max(PAGE) / PAGE * PAGE;
    std::thread::Builder::new()
        .name("uffd".into())
        .spawn(move || handler(uffd, ranges, source, chunk, stats))
        .map_err(|e| UffdError::Ioctl("handler thread", e))?;
    Ok(())
}

fn handler(uffd: OwnedFd, ranges: Vec<Range>, source: Arc<dyn PageSource>, chunk: u64, stats: Arc<UffdStats>) {
    let mut msg = [0u8; 32];
    let mut buf = vec![0u8; chunk as usize];
    loop {
        // SAFETY: reading one uffd_msg (32 bytes) into our buffer.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
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
        let t = std::time::Instant::now();
        let mut a = [0u8; 8];
        a.copy_from_slice(&msg[16..24]);
        let addr = u64::from_le_bytes(a) & !(PAGE - 1);
        stats.faults.fetch_add(1, Ordering::Relaxed);
        let Some(r) = ranges.iter().find(|r| addr >= r.host && addr < r.host + r.len) else { continue };
        // Serve the aligned chunk around the fault, clipped to the range.
        let start = (addr - r.host) / chunk * chunk;
        let len = chunk.min(r.len - start);
        let dst = r.host + start;
        let ok = match source.read(r.file_offset + start, &mut buf[..len as usize]) {
            Ok(true) => {
                stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                copy(&uffd, dst, &buf[..len as usize], &stats)
            }
            Ok(false) => zero(&uffd, dst, len, &stats),
            Err(_) => false,
        };
        if !ok {
            // Try the single page: another fault may have filled part of the chunk (EEXIST).
            let off = addr - r.host;
            let page = &mut buf[..PAGE as usize];
            let served = match source.read(r.file_offset + off, page) {
                Ok(true) => copy(&uffd, addr, page, &stats),
                Ok(false) => zero(&uffd, addr, PAGE, &stats),
                Err(_) => false,
            };
            if !served {
                stats.failed.store(true, Ordering::Relaxed);
            }
        }
        stats.handler_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

fn copy(uffd: &OwnedFd, dst: u64, data: &[u8], stats: &UffdStats) -> bool {
    let mut c = UffdioCopy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
    // SAFETY: UFFDIO_COPY copies `len` bytes from our buffer into the registered range.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
    if r == 0 {
        stats.pages_copied.fetch_add(data.len() as u64 / PAGE, Ordering::Relaxed);
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) && data.len() as u64 == PAGE
}

fn zero(uffd: &OwnedFd, start: u64, len: u64, stats: &UffdStats) -> bool {
    let mut z = UffdioZeropage { start, len, mode: 0, zeropage: 0 };
    // SAFETY: UFFDIO_ZEROPAGE maps zero pages into the registered range.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
    if r == 0 {
        stats.zero_pages.fetch_add(len / PAGE, Ordering::Relaxed);
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) && len == PAGE
}
