//! The scheduling slice of flintd's own threads (`sched_slice_us`, docs/operations.md).
//!
//! Beside running guests, flintd's API threads wait for a CPU: the third N=1,000 scale run measured 6.8 s of
//! run-queue wait over its probes, and the p99s of in-memory calls grew with it (docs/performance.md). EEVDF
//! (Linux 6.12 and later) takes a SCHED_OTHER task's `sched_runtime` as its slice: a shorter slice gives a woken
//! thread an earlier deadline, so it runs sooner, without any priority over the guests' share of the CPU.

/// `struct sched_attr` (include/uapi/linux/sched/types.h), its first size (56 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks for a slice of `us` microseconds for the calling thread: SCHED_OTHER, its nice value kept. A kernel
/// before 6.12 takes the call and ignores the slice.
pub fn set_thread_slice(us: u64) -> std::io::Result<()> {
    // SAFETY: errno is this thread's; clearing it tells getpriority's -1 (nice -1) from an error.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority(2) of the calling thread (who = 0) reads its nice value; nothing else is touched.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let nice = if nice == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) { 0 } else { nice };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice,
        runtime: us.saturating_mul(1000),
        ..Default::default()
    };
    // SAFETY: sched_setattr(2) for the calling thread (pid 0) reads `attr`, which outlives the call; flags 0.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_takes_a_slice_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: setpriority(2) on this test's own thread.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) }, 0);
            super::set_thread_slice(100).expect("sched_setattr");
            // SAFETY: getpriority(2) of the calling thread.
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, 5, "nice kept");
            // The slice shows in /proc on kernels that take it (EEVDF): `se.slice` in ns.
            let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
            if let Some(l) = sched.lines().find(|l| l.starts_with("se.slice")) {
                let ns: f64 = l.split(':').nth(1).unwrap().trim().parse().unwrap();
                assert_eq!(ns, 100_000.0, "{l}");
            }
        })
        .join()
        .unwrap();
    }
}
