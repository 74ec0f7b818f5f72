//! Guest memory in a snapshot: one file holding every RAM region back to back (region i at
//! the sum of the sizes before it). Zero pages are holes. A diff file has the same layout and
//! holds only the pages dirtied since the previous snapshot as data; everything else is a hole.
use crate::vstate::memory::GuestMem;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

pub const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    #[error("cannot write the memory file {0}")]
    Write(String, #[source] std::io::Error),
    #[error("cannot read the memory file {0}")]
    Read(String, #[source] std::io::Error),
    #[error("memory file {path} is {have} bytes, the snapshot needs {want}")]
    Size { path: String, have: u64, want: u64 },
    #[error("cannot map guest memory from {0}")]
    Map(String, #[source] std::io::Error),
    #[error("KVM failed to read the dirty log")]
    DirtyLog(#[source] kvm_ioctls::Error),
}

pub use flint_vmm_api::snapshot::WriteStats;

fn region_slice(r: &crate::vstate::memory::GuestRegion) -> &[u8] {
    let host = r.as_ptr();
    // SAFETY: the region maps `r.len()` bytes at `host` for as long as `r` lives; the vCPUs
    // are paused, so nothing writes to it while the slice is in use.
    unsafe { std::slice::from_raw_parts(host, r.len() as usize) }
}

/// Writes `data` at `off`, skipping all-zero pages (they stay holes); returns stats.
fn write_sparse(f: &File, off: u64, data: &[u8], path: &str, stats: &mut WriteStats) -> Result<(), MemFileError> {
    let mut run_start: Option<usize> = None;
    let flush = |start: usize, end: usize, stats: &mut WriteStats| -> Result<(), MemFileError> {
        f.write_all_at(&data[start..end], off + start as u64).map_err(|e| MemFileError::Write(path.into(), e))?;
        stats.bytes_written += (end - start) as u64;
        stats.pages_written += ((end - start) / PAGE) as u64;
        Ok(())
    };
    for (i, page) in data.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|b| *b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * PAGE),
            (true, Some(s)) => {
                flush(s, i * PAGE, stats)?;
                run_start = None;
                stats.zero_pages_skipped += 1;
            }
            (true, None) => stats.zero_pages_skipped += 1,
            (false, Some(_)) => {}
        }
    }
    if let Some(s) = run_start {
        flush(s, data.len(), stats)?;
    }
    Ok(())
}

fn total_len(mem: &GuestMem) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Writes a full memory file at `path` (via a temporary file, fsynced, then renamed).
pub fn write_full(mem: &GuestMem, path: &Path) -> Result<WriteStats, MemFileError> {
    let p = path.display().to_string();
    let tmp = path.with_extension("tmp");
    let f = File::create(&tmp).map_err(|e| MemFileError::Write(p.clone(), e))?;
    f.set_len(total_len(mem)).map_err(|e| MemFileError::Write(p.clone(), e))?;
    let mut stats = WriteStats::default();
    let mut off = 0;
    for r in mem.iter() {
        write_sparse(&f, off, region_slice(r), &p, &mut stats)?;
        off += r.len();
    }
    f.sync_all().map_err(|e| MemFileError::Write(p.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| MemFileError::Write(p, e))?;
    Ok(stats)
}

/// The VMM's page table as `/proc/self/pagemap` shows it: which pages of a restored VM's memory hold the restored
/// snapshot's content again. A page is such when it is not present (never touched, or given back through free
/// page reporting: its next touch maps the snapshot file's page or has the page server fetch it) or is a page of
/// the mapped snapshot file itself (read, never copied on write). A present anonymous page or a swapped one may
/// differ.
pub struct SourcePages {
    pagemap: File,
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// The page map opened ahead by the jail (a jailed VMM cannot open it later: see `jail::enter`).
static PAGEMAP: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// Opens `/proc/self/pagemap` now and keeps it for [`SourcePages::open`]; a failure leaves diffs whole.
pub fn preopen_pagemap() {
    if let Ok(f) = File::open("/proc/self/pagemap") {
        let _ = PAGEMAP.set(f);
    }
}

impl SourcePages {
    pub fn open() -> std::io::Result<Self> {
        let pagemap = match PAGEMAP.get() {
            Some(f) => f.try_clone()?,
            None => File::open("/proc/self/pagemap")?,
        };
        Ok(Self { pagemap })
    }

    /// For each of the `n` pages at host address `addr`: whether it holds the restored snapshot's page.
    pub fn unchanged(&self, addr: usize, n: usize) -> std::io::Result<Vec<bool>> {
        let mut raw = vec![0u8; n * 8];
        self.pagemap.read_exact_at(&mut raw, (addr / PAGE) as u64 * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|e| {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                e & PM_SWAP == 0 && (e & PM_PRESENT == 0 || e & PM_FILE != 0)
            })
            .collect())
    }
}

/// Writes only the pages KVM logged as dirty since the last call (the dirty log is cleared
/// by reading it). Dirty pages are written even when zero: in a diff a hole means "unchanged".
/// With `source` (the diff's parent is the snapshot this VM was restored from, and no snapshot was taken since),
/// a dirtied page that holds that snapshot's page again is left out: memory the guest freed and gave back.
pub fn write_diff(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMem,
    path: &Path,
    source: Option<&SourcePages>,
) -> Result<WriteStats, MemFileError> {
    let p = path.display().to_string();
    let tmp = path.with_extension("tmp");
    let f = File::create(&tmp).map_err(|e| MemFileError::Write(p.clone(), e))?;
    f.set_len(total_len(mem)).map_err(|e| MemFileError::Write(p.clone(), e))?;
    let mut stats = WriteStats::default();
    let mut off = 0u64;
    for (slot, r) in mem.iter().enumerate() {
        let bitmap = vm.get_dirty_log(slot as u32, r.len() as usize).map_err(MemFileError::DirtyLog)?;
        let data = region_slice(r);
        let pages = r.len() as usize / PAGE;
        let mut page = 0;
        // Written by a vCPU (KVM's log) or by a device in the VMM (the region's own bitmap).
        let devices: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(r).bitmap();
        while page < pages {
            let dirty = |p: usize| {
                bitmap.get(p / 64).map(|w| w >> (p % 64) & 1 == 1).unwrap_or(false) || devices.is_addr_set(p * PAGE)
            };
            if !dirty(page) {
                page += 1;
                continue;
            }
            let start = page;
            while page < pages && dirty(page) {
                page += 1;
            }
            let kept = match source {
                Some(s) => s
                    .unchanged(data.as_ptr() as usize + start * PAGE, page - start)
                    .map_err(|e| MemFileError::Read("/proc/self/pagemap".into(), e))?,
                None => vec![false; page - start],
            };
            // Runs of pages that changed, each one write.
            let mut i = 0;
            while i < kept.len() {
                if kept[i] {
                    stats.returned_pages_skipped += 1;
                    i += 1;
                    continue;
                }
                let run = i;
                while i < kept.len() && !kept[i] {
                    i += 1;
                }
                let (a, b) = ((start + run) * PAGE, (start + i) * PAGE);
                f.write_all_at(&data[a..b], off + a as u64).map_err(|e| MemFileError::Write(p.clone(), e))?;
                stats.bytes_written += (b - a) as u64;
                stats.pages_written += (i - run) as u64;
            }
        }
        devices.reset();
        off += r.len();
    }
    f.sync_all().map_err(|e| MemFileError::Write(p.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| MemFileError::Write(p, e))?;
    Ok(stats)
}

/// Clears the dirty log (after a full snapshot, so the next diff holds only newer writes).
pub fn clear_dirty_log(vm: &kvm_ioctls::VmFd, mem: &GuestMem) -> Result<(), MemFileError> {
    for (slot, r) in mem.iter().enumerate() {
        vm.get_dirty_log(slot as u32, r.len() as usize).map_err(MemFileError::DirtyLog)?;
        let devices: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(r).bitmap();
        devices.reset();
    }
    Ok(())
}

/// Copies every data extent of `diff` onto `base` (both full-size memory files); the result is
/// the memory of the diff's snapshot. Returns the bytes copied.
pub fn merge_diff(base: &Path, diff: &Path) -> Result<u64, MemFileError> {
    let bp = base.display().to_string();
    let dp = diff.display().to_string();
    let b = std::fs::OpenOptions::new().write(true).open(base).map_err(|e| MemFileError::Write(bp.clone(), e))?;
    let d = File::open(diff).map_err(|e| MemFileError::Read(dp.clone(), e))?;
    let (blen, dlen) = (
        b.metadata().map_err(|e| MemFileError::Write(bp.clone(), e))?.len(),
        d.metadata().map_err(|e| MemFileError::Read(dp.clone(), e))?.len(),
    );
    if blen != dlen {
        return Err(MemFileError::Size { path: bp, have: blen, want: dlen });
    }
    let fd = d.as_raw_fd();
    let mut pos: i64 = 0;
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no more data
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { dlen as i64 } else { hole };
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            d.read_exact_at(&mut buf[..n], at as u64).map_err(|e| MemFileError::Read(dp.clone(), e))?;
            b.write_all_at(&buf[..n], at as u64).map_err(|e| MemFileError::Write(bp.clone(), e))?;
            at += n as i64;
            copied += n as u64;
        }
        pos = end;
    }
    b.sync_all().map_err(|e| MemFileError::Write(bp, e))?;
    Ok(copied)
}

/// Maps the memory file privately at the given layout: at new addresses, or (`at`: a standby VMM's prepared
/// memory slots) into the slots' ranges. `MemFileError::Map` with `AlreadyExists`: a slot's range is taken.
pub fn map_private(
    path: &Path,
    layout: &[(u64, u64)],
    at: Option<&crate::standby::PreparedMemory>,
) -> Result<GuestMem, MemFileError> {
    let p = path.display().to_string();
    // A jailed VMM gets the (shared) memory file as an inherited fd.
    let f = flint_vmm_api::spec::open_host_file(path, false).map_err(|e| MemFileError::Read(p.clone(), e))?;
    let want: u64 = layout.iter().map(|r| r.1).sum();
    let have = f.metadata().map_err(|e| MemFileError::Read(p.clone(), e))?.len();
    if have != want {
        return Err(MemFileError::Size { path: p, have, want });
    }
    if let Some(m) = at {
        if m.layout != layout {
            return Err(MemFileError::Map(p, std::io::Error::other("prepared regions do not match the layout")));
        }
        m.map_regions(libc::PROT_READ | libc::PROT_WRITE, Some(f.as_raw_fd()))
            .map_err(|e| MemFileError::Map(p.clone(), e))?;
        return guest_mem_over(layout, m.addrs(), libc::MAP_PRIVATE).map_err(|e| MemFileError::Map(p, e));
    }
    let mut addrs = Vec::new();
    let mut off = 0u64;
    for &(_, len) in layout {
        // SAFETY: a new private mapping of `len` bytes of our file; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                f.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            for (&a, &(_, l)) in addrs.iter().zip(layout) {
                // SAFETY: a mapping made above, owned by nobody else yet.
                unsafe { libc::munmap(a as *mut libc::c_void, l as usize) };
            }
            return Err(MemFileError::Map(p, e));
        }
        addrs.push(addr as usize);
        off += len;
    }
    guest_mem_over(layout, &addrs, libc::MAP_PRIVATE).map_err(|e| MemFileError::Map(p, e))
}

/// Guest memory over mappings this process made (`addrs[i]` maps `layout[i]`, with mmap `flags`), which it owns
/// from here on (unmapped when it drops).
pub fn guest_mem_over(layout: &[(u64, u64)], addrs: &[usize], flags: i32) -> Result<GuestMem, std::io::Error> {
    let mut regions = Vec::new();
    for (&(gpa, len), &addr) in layout.iter().zip(addrs) {
        // SAFETY: `addr` maps `len` bytes read-write with `flags`; the caller hands it over, and the MmapRegion
        // owns it from here on.
        let region = unsafe {
            MmapRegion::<vm_memory::bitmap::AtomicBitmap>::build_raw(
                addr as *mut u8,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
            )
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(region, vm_memory::GuestAddress(gpa))
                .ok_or_else(|| std::io::Error::other("bad region"))?,
        );
    }
    GuestMem::from_regions(regions).map_err(|e| std::io::Error::other(e.to_string()))
}

/// The (guest address, length) of every region.
pub fn layout(mem: &GuestMem) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("flint-memfile-{name}-{}", std::process::id()))
    }

    #[test]
    fn full_write_is_sparse_and_maps_back() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 30), 1 << 20)]).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress((1 << 30) + 0x3000)).unwrap();
        let p = tmp("full");
        let st = write_full(&mem, &p).unwrap();
        assert_eq!(st.pages_written, 2);
        assert_eq!(st.zero_pages_skipped, 510);
        let back = map_private(&p, &layout(&mem), None).unwrap();
        assert_eq!(back.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0x1122_3344);
        assert_eq!(back.read_obj::<u32>(GuestAddress((1 << 30) + 0x3000)).unwrap(), 0x5566_7788);
        // Copy-on-write: writes do not reach the file.
        back.write_obj(1u32, GuestAddress(0x5000)).unwrap();
        let again = map_private(&p, &layout(&mem), None).unwrap();
        assert_eq!(again.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0x1122_3344);
        assert!(matches!(map_private(&p, &[(0, 4096)], None), Err(MemFileError::Size { .. })));
        std::fs::remove_file(&p).unwrap();
    }

    /// Which pages of a private mapping of a snapshot file hold the file's page: untouched, read, and written then
    /// given back (MADV_DONTNEED, what free page reporting does) do; written ones do not.
    #[test]
    fn pagemap_tells_pages_given_back_from_pages_written() {
        let p = tmp("pagemap");
        std::fs::write(&p, vec![7u8; 8 * PAGE]).unwrap();
        let mem = map_private(&p, &[(0, 8 * PAGE as u64)], None).unwrap();
        let r = mem.find_region(GuestAddress(0)).unwrap();
        let host = r.as_ptr() as usize;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE as u64)).unwrap(), 7);
        for page in [2u64, 3, 4] {
            mem.write_obj(1u8, GuestAddress(page * PAGE as u64)).unwrap();
        }
        // SAFETY: pages 3..5 of the mapping `mem` owns; MADV_DONTNEED only drops their private copies.
        let rc = unsafe { libc::madvise((host + 3 * PAGE) as *mut libc::c_void, 2 * PAGE, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
        let source = SourcePages::open().unwrap();
        let unchanged = source.unchanged(host, 8).unwrap();
        assert_eq!(unchanged, [true, true, false, true, true, true, true, true]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * PAGE as u64)).unwrap(), 7, "the file's page again");
        drop(mem);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn merge_copies_only_data_extents() {
        let base = tmp("base");
        let diff = tmp("diff");
        std::fs::write(&base, vec![1u8; 4 * PAGE]).unwrap();
        let d = File::create(&diff).unwrap();
        d.set_len(4 * PAGE as u64).unwrap();
        d.write_all_at(&[0u8; PAGE], 2 * PAGE as u64).unwrap(); // a dirty page that is zero
        drop(d);
        let n = merge_diff(&base, &diff).unwrap();
        assert_eq!(n, PAGE as u64);
        let merged = std::fs::read(&base).unwrap();
        assert!(merged[..2 * PAGE].iter().all(|b| *b == 1));
        assert!(merged[2 * PAGE..3 * PAGE].iter().all(|b| *b == 0));
        assert!(merged[3 * PAGE..].iter().all(|b| *b == 1));
        std::fs::remove_file(&base).unwrap();
        std::fs::remove_file(&diff).unwrap();
    }
}
