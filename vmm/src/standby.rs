//! A standby VMM (`flint-vmm --standby FILE`, flintd's `[standby]`): a process flintd starts ahead of any VM,
//! already jailed, which makes what does not depend on the VM ahead (its KVM VM with its irqchip, PIT and first
//! vCPU and, for one memory size, the VM's memory slots) and then waits for one launch spec on its control socket.
//! A restore handed to it skips the process start, the jail and KVM's per-VM setup: what is left is reading the
//! state, mapping the snapshot's memory into the prepared slots and restoring devices and vCPUs.
//!
//! The memory slots are registered over address ranges where nothing is mapped (KVM records a slot's host
//! address; it reaches the pages only when the guest touches them). A restore maps the snapshot's memory file
//! into those ranges (`MAP_FIXED_NOREPLACE`): the slots keep their host addresses, and the per-slot arrays KVM
//! allocated (which grow with guest memory) are already there. Mapping over memory that was already there
//! instead would make KVM's MMU notifier walk the slot's reverse map page by page (0.75 ms at 2 GiB on a host
//! that shadow-pages). The ranges lie at a random address far below where the kernel places mappings (top-down
//! from the stack), so nothing else lands in them; should something have, the restore deletes the slots and
//! registers fresh memory instead (`PreparedMemory::release`).
//!
//! After the irqchip and PIT, KVM's next memory-slot change waits for an SRCU grace period (4-8 ms on a nested
//! host) unless the VM's earlier grace periods are some time past: a standby waits long enough before any
//! hand-over, so a VM that logs dirty pages turns its log on at the hand-over for ~0.1 ms.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use flint_vmm_api::spec::{
    LaunchSpec, StandbySpec, HANDOVER_FIRST_FD, HANDOVER_MAX_FDS, MAX_SPEC_BYTES, STANDBY_CONTROL_FD,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

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

/// A KVM VM made ahead, with its irqchip and PIT, vCPU 0, and memory slots 0.. for `memory`'s layout (flags 0)
/// if it has some.
pub struct Prepared {
    pub kvm: Kvm,
    pub vm: VmFd,
    memory: Option<PreparedMemory>,
    vcpu0: VcpuFd,
    /// What `KVM_GET_SUPPORTED_CPUID` answers (~0.4 ms on a nested host): read ahead.
    pub supported_cpuid: kvm_bindings::CpuId,
}

/// The prepared VM's memory slots, in layout order: each registered over a range of host addresses where nothing
/// is mapped yet. Whoever maps guest memory into them owns that memory; the VM must not outlive the slots'
/// memory, so a VM that does not use them deletes them first ([`PreparedMemory::release`]).
pub struct PreparedMemory {
    pub layout: Vec<(u64, u64)>,
    addrs: Vec<usize>,
}

/// Where the prepared slots' ranges may start: 1 GiB-aligned, between 32 and 48 TiB. The kernel places mappings
/// top-down from below the stack (~128 TiB) and a position-independent binary and its heap near 85 TiB.
const SLOTS_LOW: usize = 32 << 40;
const SLOTS_SPAN_GIB: u64 = 16 << 10;
const GIB: usize = 1 << 30;

impl PreparedMemory {
    /// The host address of each region, in layout order.
    pub fn addrs(&self) -> &[usize] {
        &self.addrs
    }

    /// Ranges for `layout` at a random place between [`SLOTS_LOW`] and +16 TiB, each 1 GiB-aligned with a 1 GiB
    /// gap after it, checked free (mapped `PROT_NONE` with `MAP_FIXED_NOREPLACE`, then unmapped: before they are
    /// slots, so KVM has nothing to walk).
    fn reserve(layout: &[(u64, u64)]) -> Result<Self, StandbyError> {
        let mut last = None;
        for _ in 0..8 {
            let mut r = [0u8; 8];
            getrandom::getrandom(&mut r).map_err(|e| StandbyError::Sys {
                what: "pick guest memory's place",
                source: std::io::Error::other(e.to_string()),
            })?;
            let mut at = SLOTS_LOW + (u64::from_le_bytes(r) % SLOTS_SPAN_GIB) as usize * GIB;
            let mut addrs = Vec::new();
            for &(_, len) in layout {
                addrs.push(at);
                at += (len as usize).div_ceil(GIB) * GIB + GIB;
            }
            let m = PreparedMemory { layout: layout.to_vec(), addrs };
            match m.map_regions(libc::PROT_NONE, None) {
                Ok(()) => {
                    m.unmap();
                    return Ok(m);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(StandbyError::Sys { what: "find free host addresses for guest memory", source: last.unwrap() })
    }

    /// Maps every region into its range (`MAP_FIXED_NOREPLACE`): anonymous, or `file` from offset 0 on in layout
    /// order, private, read-write unless `prot` says otherwise. `AlreadyExists`: something else is mapped in a
    /// range now (nothing is left mapped then).
    pub fn map_regions(&self, prot: i32, file: Option<RawFd>) -> std::io::Result<()> {
        let mut off = 0u64;
        for (i, (&addr, &(_, len))) in self.addrs.iter().zip(&self.layout).enumerate() {
            let (flags, fd) = match file {
                Some(fd) => (libc::MAP_PRIVATE, fd),
                None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            };
            // SAFETY: a new mapping at a range this struct names, which MAP_FIXED_NOREPLACE makes only if nothing
            // is mapped there (it replaces nothing); the result is checked below.
            let got = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    len as usize,
                    prot,
                    flags | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE,
                    fd,
                    off as libc::off_t,
                )
            };
            // A kernel before 4.17 takes the flag for a hint and may map elsewhere.
            let err = if got == libc::MAP_FAILED {
                Some(std::io::Error::last_os_error())
            } else if got as usize != addr {
                // SAFETY: the mapping just made, elsewhere than asked; nobody else knows of it.
                unsafe { libc::munmap(got, len as usize) };
                Some(std::io::Error::from(std::io::ErrorKind::AlreadyExists))
            } else {
                None
            };
            if let Some(e) = err {
                PreparedMemory { layout: self.layout[..i].to_vec(), addrs: self.addrs[..i].to_vec() }.unmap();
                return Err(e);
            }
            off += len;
        }
        Ok(())
    }

    fn unmap(&self) {
        for (&addr, &(_, len)) in self.addrs.iter().zip(&self.layout) {
            // SAFETY: a range this struct mapped (map_regions) and nobody took.
            unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
        }
    }

    /// Deletes the slots from `vm` (they then name no memory; cheap on a VM idle for a while).
    pub fn release(self, vm: &VmFd) -> Result<(), vm::VmError> {
        for slot in 0..self.layout.len() {
            let r = kvm_userspace_memory_region { slot: slot as u32, ..Default::default() };
            // SAFETY: a size of 0 deletes the slot; nothing of ours is mapped in its range.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| vm::VmError::Kvm("delete a memory slot made ahead", e))?;
        }
        Ok(())
    }
}

/// Makes the KVM VM (and its memory slots for `mem_mib`, if given), its irqchip and PIT, and vCPU 0.
pub fn prepare(mem_mib: Option<u64>) -> Result<Prepared, StandbyError> {
    let kvm = vm::open_kvm()?;
    let supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| vm::VmError::Kvm("read supported CPUID", e))?;
    let vm = vm::create_vm(&kvm)?;
    let memory = match mem_mib {
        None => None,
        Some(mib) => {
            let m = PreparedMemory::reserve(&ram_regions(mib * MIB))?;
            for (slot, (&addr, &(gpa, len))) in m.addrs.iter().zip(&m.layout).enumerate() {
                let r = kvm_userspace_memory_region {
                    slot: slot as u32,
                    flags: 0,
                    guest_phys_addr: gpa,
                    memory_size: len,
                    userspace_addr: addr as u64,
                };
                // SAFETY: nothing is mapped in the range yet; whoever maps guest memory there keeps it as long as
                // the VmFd, and a VM that does not use the slots deletes them first (PreparedMemory::release).
                unsafe { vm.set_user_memory_region(r) }
                    .map_err(|e| vm::VmError::Kvm("register guest memory ahead", e))?;
            }
            Some(m)
        }
    };
    // After the slots: a slot change right after the irqchip waits for an SRCU grace period (module docs).
    vm::create_irqchip(&vm)?;
    let vcpu0 = vm.create_vcpu(0).map_err(|e| vm::VmError::Kvm("create vCPU 0 ahead", e))?;
    Ok(Prepared { kvm, vm, memory, vcpu0, supported_cpuid })
}

/// What a launch takes of a [`Prepared`] VM.
pub struct Taken {
    pub kvm: Kvm,
    pub vm: VmFd,
    /// The prepared slots, if they have the launch's layout.
    pub memory: Option<PreparedMemory>,
    /// vCPU 0, made ahead (see [`vcpu`]).
    pub vcpu0: Option<VcpuFd>,
}

impl Prepared {
    /// The KVM VM, and its prepared memory if that has `layout`. Prepared memory of another layout is removed
    /// from the VM (its slots deleted).
    pub fn take(self, layout: &[(u64, u64)]) -> Result<Taken, StandbyError> {
        let Prepared { kvm, vm, memory, vcpu0, .. } = self;
        let memory = match memory {
            Some(m) if m.layout == layout => Some(m),
            Some(m) => {
                m.release(&vm)?;
                None
            }
            None => None,
        };
        Ok(Taken { kvm, vm, memory, vcpu0: Some(vcpu0) })
    }
}

/// vCPU `index` of `vm`: the one made ahead (`ahead`, vCPU 0) or a new one.
pub fn vcpu(vm: &VmFd, index: u64, ahead: &mut Option<VcpuFd>) -> Result<VcpuFd, kvm_ioctls::Error> {
    match ahead.take() {
        Some(fd) if index == 0 => Ok(fd),
        other => {
            *ahead = other;
            vm.create_vcpu(index)
        }
    }
}

/// Guest memory of `layout` (anonymous, private) for a VM made ahead: in its prepared slots if it has them
/// (true: registered already), else new (false: the caller registers it).
pub fn anonymous_guest_mem(
    vm: &VmFd,
    layout: &[(u64, u64)],
    ahead: Option<PreparedMemory>,
) -> Result<(GuestMem, bool), StandbyError> {
    let io = |what| move |source| StandbyError::Sys { what, source };
    if let Some(m) = ahead {
        match m.map_regions(libc::PROT_READ | libc::PROT_WRITE, None) {
            Ok(()) => {
                let mem = crate::snapshot::memory::guest_mem_over(
                    &m.layout,
                    &m.addrs,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
                .map_err(io("track guest memory"))?;
                return Ok((mem, true));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => m.release(vm)?,
            Err(e) => return Err(io("map guest memory into its slots")(e)),
        }
    }
    let ranges: Vec<(vm_memory::GuestAddress, usize)> =
        layout.iter().map(|&(g, l)| (vm_memory::GuestAddress(g), l as usize)).collect();
    let mem =
        GuestMem::from_ranges(&ranges).map_err(|e| io("map guest memory")(std::io::Error::other(e.to_string())))?;
    Ok((mem, false))
}

/// Sets the (prepared) slots' flags: a VM that logs dirty pages turns the log on.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn is_mapped(addr: usize) -> bool {
        // SAFETY: msync(2) only asks whether the page is mapped (ENOMEM if not); nothing is written.
        unsafe { libc::msync(addr as *mut libc::c_void, 4096, libc::MS_ASYNC) == 0 }
    }

    #[test]
    fn prepared_ranges_are_free_apart_and_take_a_file_in_layout_order() {
        let layout = [(0u64, 2 << 20), (1 << 32, 1 << 20)];
        let m = PreparedMemory::reserve(&layout).unwrap();
        let a = m.addrs().to_vec();
        assert!(a.iter().all(|&x| x % GIB == 0 && (SLOTS_LOW..SLOTS_LOW + (16 << 40)).contains(&x)), "{a:x?}");
        assert!(a[1] >= a[0] + 2 * GIB, "a guard gap after each range: {a:x?}");
        assert!(!is_mapped(a[0]) && !is_mapped(a[1]), "reserved ranges hold no mapping");

        let path = std::env::temp_dir().join(format!("flint-standby-mem-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![1u8; 2 << 20]).unwrap();
        f.write_all(&vec![2u8; 1 << 20]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        m.map_regions(libc::PROT_READ | libc::PROT_WRITE, Some(f.as_raw_fd())).unwrap();
        // SAFETY: both ranges were just mapped readable from the file.
        let (x, y) = unsafe { (*((a[0] + 4096) as *const u8), *((a[1] + 8) as *const u8)) };
        assert_eq!((x, y), (1, 2), "each region maps its part of the file");
        m.unmap();
        assert!(!is_mapped(a[0]));
    }

    #[test]
    fn a_prepared_range_something_else_took_is_refused_and_nothing_is_left_mapped() {
        let layout = [(0u64, 1 << 20), (1 << 32, 1 << 20)];
        let m = PreparedMemory::reserve(&layout).unwrap();
        let a = m.addrs().to_vec();
        // Something else lands in the second range.
        // SAFETY: a fresh anonymous mapping at a free address (MAP_FIXED_NOREPLACE), unmapped below.
        let other = unsafe {
            libc::mmap(
                a[1] as *mut libc::c_void,
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(other as usize, a[1]);
        let e = m.map_regions(libc::PROT_READ | libc::PROT_WRITE, None).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert!(!is_mapped(a[0]), "the first range, mapped before the refusal, is unmapped again");
        assert!(is_mapped(a[1]), "what took the second range is left alone");
        // SAFETY: the page mapped above.
        unsafe { libc::munmap(other, 4096) };
    }
}
