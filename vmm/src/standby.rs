//! A standby VMM (`flint-vmm --standby FILE`, flintd's `[standby]`): a process flintd starts ahead of any VM,
//! already jailed, which makes what does not depend on the VM ahead (its KVM VM and, for one memory size, the
//! VM's memory slots) and then waits for one launch spec on its control socket. A restore handed to it skips the
//! process start, the jail and KVM's per-VM setup: what is left is reading the state, mapping the snapshot's
//! memory over the prepared slots and restoring devices and vCPUs.
//!
//! The memory slots are anonymous mappings registered with KVM before the VM has an irqchip (after it, every
//! slot change waits for an SRCU grace period: milliseconds on a nested host). A restore maps the snapshot's
//! memory file over them (`MAP_FIXED`): the slots keep their host addresses, KVM's MMU notifier sees the new
//! pages, and the per-slot arrays KVM allocated (which grow with guest memory) are already there.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use flint_vmm_api::spec::{
    LaunchSpec, StandbySpec, HANDOVER_FIRST_FD, HANDOVER_MAX_FDS, MAX_SPEC_BYTES, STANDBY_CONTROL_FD,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::x86_64::layout::ram_regions;
use crate::vstate::memory::{GuestMem, MIB};
use crate::vstate::vm;

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("standby spec {0}: {1}")]
    Spec(String, String),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error("standby: {what}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("standby: the launch spec handed over: {0}")]
    Handover(String),
}

fn sys(what: &'static str) -> StandbyError {
    StandbyError::Sys { what, source: std::io::Error::last_os_error() }
}

/// A KVM VM made ahead, with memory slots 0.. for `memory`'s layout (flags 0) if it has some.
pub struct Prepared {
    pub kvm: Kvm,
    pub vm: VmFd,
    memory: Option<PreparedMemory>,
    /// What `KVM_GET_SUPPORTED_CPUID` answers (~0.4 ms on a nested host): read ahead.
    pub supported_cpuid: kvm_bindings::CpuId,
}

/// Anonymous private mappings registered as the prepared VM's memory slots, in layout order. Unmapped on drop
/// unless taken into a [`GuestMem`].
pub struct PreparedMemory {
    pub layout: Vec<(u64, u64)>,
    addrs: Vec<usize>,
}

impl PreparedMemory {
    /// The host address of each region, in layout order.
    pub fn addrs(&self) -> &[usize] {
        &self.addrs
    }

    /// Hands the mappings over: whoever takes the addresses unmaps them.
    pub fn take(mut self) -> Vec<usize> {
        std::mem::take(&mut self.addrs)
    }
}

impl Drop for PreparedMemory {
    fn drop(&mut self) {
        for (&addr, &(_, len)) in self.addrs.iter().zip(&self.layout) {
            // SAFETY: a mapping this struct made and still owns (not taken), of `len` bytes.
            unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
        }
    }
}

/// Makes the KVM VM (and its memory slots for `mem_mib`, if given).
pub fn prepare(mem_mib: Option<u64>) -> Result<Prepared, StandbyError> {
    let kvm = vm::open_kvm()?;
    let supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| vm::VmError::Kvm("read supported CPUID", e))?;
    let vm = vm::create_vm(&kvm)?;
    let memory = match mem_mib {
        None => None,
        Some(mib) => {
            let layout = ram_regions(mib * MIB);
            let mut m = PreparedMemory { layout: layout.clone(), addrs: Vec::new() };
            for (slot, &(gpa, len)) in layout.iter().enumerate() {
                // SAFETY: a fresh anonymous private mapping; the result is checked and owned by `m`.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if addr == libc::MAP_FAILED {
                    return Err(sys("map guest memory ahead"));
                }
                m.addrs.push(addr as usize);
                let r = kvm_userspace_memory_region {
                    slot: slot as u32,
                    flags: 0,
                    guest_phys_addr: gpa,
                    memory_size: len,
                    userspace_addr: addr as u64,
                };
                // SAFETY: the mapping is owned by `m`, which the restore either takes into the VM's GuestMem
                // (kept as long as the VmFd) or, if unused, deletes the slot before it drops (`take`).
                unsafe { vm.set_user_memory_region(r) }
                    .map_err(|e| vm::VmError::Kvm("register guest memory ahead", e))?;
            }
            Some(m)
        }
    };
    Ok(Prepared { kvm, vm, memory, supported_cpuid })
}

impl Prepared {
    /// The KVM VM, and its prepared memory if that has `layout`. Prepared memory of another layout is removed
    /// from the VM (its slots deleted: cheap before the VM has an irqchip) and unmapped.
    pub fn take(self, layout: &[(u64, u64)]) -> Result<(Kvm, VmFd, Option<PreparedMemory>), StandbyError> {
        let Prepared { kvm, vm, memory, .. } = self;
        let memory = match memory {
            Some(m) if m.layout == layout => Some(m),
            Some(m) => {
                for slot in 0..m.layout.len() {
                    let r = kvm_userspace_memory_region { slot: slot as u32, ..Default::default() };
                    // SAFETY: a size of 0 deletes the slot; KVM stops using the mapping before `m` unmaps it.
                    unsafe { vm.set_user_memory_region(r) }
                        .map_err(|e| vm::VmError::Kvm("delete a memory slot made ahead", e))?;
                }
                drop(m);
                None
            }
            None => None,
        };
        Ok((kvm, vm, memory))
    }
}

/// Guest memory over prepared anonymous mappings (boot, or a lazy restore whose pages userfaultfd fills).
pub fn anonymous_guest_mem(m: PreparedMemory) -> Result<GuestMem, std::io::Error> {
    let layout = m.layout.clone();
    let addrs = m.take();
    crate::snapshot::memory::guest_mem_over(&layout, &addrs, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
}

/// Sets the (prepared) slots' flags: a VM that logs dirty pages turns the log on (before its irqchip: cheap).
pub fn set_slot_flags(vm: &VmFd, mem: &GuestMem, flags: u32) -> Result<(), vm::VmError> {
    if flags == 0 {
        return Ok(());
    }
    vm::register_memory(vm, mem, flags)
}

/// Runs a standby: reads its spec, confines itself, prepares, and waits for the launch spec. None: flintd closed
/// the socket (it discarded this standby, or it is gone): exit quietly.
pub fn run(path: &Path) -> Result<Option<(LaunchSpec, Prepared, u32)>, StandbyError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| StandbyError::Spec(path.display().to_string(), e.to_string()))?;
    let spec: StandbySpec =
        serde_json::from_str(&text).map_err(|e| StandbyError::Spec(path.display().to_string(), e.to_string()))?;
    crate::seccomp::prepare(spec.seccomp)?;
    // The host profile is read from /sys, which the jail does not have.
    let profile = crate::HostProfile::detect();
    let mut jail = spec.jail.clone();
    if !jail.keep_fds.contains(&STANDBY_CONTROL_FD) {
        jail.keep_fds.push(STANDBY_CONTROL_FD);
    }
    crate::jail::enter(&jail)?;
    eprintln!("flint-vmm: standby, jailed in {} as uid {}", jail.root.display(), jail.uid);
    let prepared = prepare(spec.mem_mib)?;
    // SAFETY: fd 3 is the control socket flintd's launcher passed (kept by the jail); owned from here on.
    let ctl = unsafe { OwnedFd::from_raw_fd(STANDBY_CONTROL_FD) };
    // Ready: jailed, with its KVM VM. flintd offers a standby for hand-over only after this (its directory is
    // renamed then; before, the paths this process still had to open would be gone).
    // SAFETY: send(2) of a 5-byte buffer we own on the control socket we own.
    if unsafe { libc::send(ctl.as_raw_fd(), b"ready".as_ptr().cast(), 5, libc::MSG_NOSIGNAL) } != 5 {
        return Err(StandbyError::Handover(format!("telling flintd it is ready: {}", std::io::Error::last_os_error())));
    }
    let Some(mut launch) = receive(&ctl)? else { return Ok(None) };
    drop(ctl);
    let j = launch.jail.as_ref().ok_or_else(|| StandbyError::Handover("it has no jail".into()))?;
    if (j.uid, j.gid) != (spec.jail.uid, spec.jail.gid) {
        return Err(StandbyError::Handover(format!(
            "it is for uid {} but this standby runs as uid {}",
            j.uid, spec.jail.uid
        )));
    }
    for (res, value) in [(libc::RLIMIT_NOFILE, j.rlimits.nofile), (libc::RLIMIT_FSIZE, j.rlimits.fsize)] {
        let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit(2) reads the struct above (lowering a limit needs no privilege).
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(sys("set the VM's rlimits"));
        }
    }
    if let flint_vmm_api::spec::Launch::Boot(c) = &mut launch.launch {
        c.host_profile.get_or_insert(profile);
    }
    Ok(Some((launch, prepared, spec.jail.uid)))
}

/// Reads the one message of the control socket: the launch spec and its fds, moved to `HANDOVER_FIRST_FD..`.
fn receive(ctl: &OwnedFd) -> Result<Option<LaunchSpec>, StandbyError> {
    let mut buf = vec![0u8; MAX_SPEC_BYTES as usize];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((HANDOVER_MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; the pointers set below outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: recvmsg(2) into the buffers `msg` describes.
        let n = unsafe { libc::recvmsg(ctl.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(sys("read the control socket"));
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walks the control messages recvmsg wrote into `cbuf` with the CMSG macros; every SCM_RIGHTS fd is
    // new to this process and owned from here on.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(StandbyError::Handover(format!(
            "truncated (at most {MAX_SPEC_BYTES} bytes and {HANDOVER_MAX_FDS} fds)"
        )));
    }
    let spec: LaunchSpec = serde_json::from_slice(&buf[..n]).map_err(|e| StandbyError::Handover(e.to_string()))?;
    for (i, fd) in fds.into_iter().enumerate() {
        let target = HANDOVER_FIRST_FD + i as RawFd;
        // SAFETY: dup2(2) onto a number this process does not use (it has a handful of fds, all below 100);
        // `fd` is then closed when it drops.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(sys("move a handed-over fd"));
        }
    }
    Ok(Some(spec))
}
