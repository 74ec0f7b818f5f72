//! vCPU and VM (irqchip, PIT, clock) state: saved from a paused VM, restored into a new one.
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CpuStateError {
    #[error("KVM failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM restored only {0} of {1} MSRs")]
    Msrs(usize, usize),
    #[error("the snapshot's CPU does not match this host: {0}")]
    CpuMismatch(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuStateError {
    move |e| CpuStateError::Kvm(what, e)
}

/// Everything KVM holds for one vCPU. XSAVE, not KVM_GET_FPU (which loses SSE state on some
/// hosts).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// MSRs this host's KVM can read for `fd` (probed one by one: KVM_GET_MSRS stops at the first
/// it cannot read).
pub fn readable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else { return Vec::new() };
    list.as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .ok()
                .and_then(|mut m| fd.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

pub fn save_vcpu(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, CpuStateError> {
    // Tell the guest's kvmclock it was paused (no soft-lockup warnings on resume); not fatal.
    let _ = fd.kvmclock_ctrl();
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm("read CPUID"))?.as_slice().to_vec();
    let mut msrs = Vec::with_capacity(msr_list.len());
    for chunk in msr_list.chunks(64) {
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = Msrs::from_entries(&entries).map_err(|_| CpuStateError::Msrs(0, entries.len()))?;
        let n = fd.get_msrs(&mut m).map_err(kvm("read MSRs"))?;
        if n != entries.len() {
            return Err(CpuStateError::Msrs(n, entries.len()));
        }
        msrs.extend(m.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(VcpuState {
        cpuid,
        mp_state: fd.get_mp_state().map_err(kvm("read the MP state"))?,
        regs: fd.get_regs().map_err(kvm("read registers"))?,
        sregs: fd.get_sregs().map_err(kvm("read special registers"))?,
        xsave: fd.get_xsave().map_err(kvm("read XSAVE state"))?,
        xcrs: fd.get_xcrs().map_err(kvm("read XCRs"))?,
        debugregs: fd.get_debug_regs().map_err(kvm("read debug registers"))?,
        lapic: fd.get_lapic().map_err(kvm("read the LAPIC"))?,
        msrs,
        events: fd.get_vcpu_events().map_err(kvm("read vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Restores in the order KVM needs: CPUID first (it shapes what the rest accepts), MSRs after
/// the LAPIC, events last.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), CpuStateError> {
    let cpuid =
        CpuId::from_entries(&s.cpuid).map_err(|_| CpuStateError::CpuMismatch("too many CPUID entries".into()))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    fd.set_mp_state(s.mp_state).map_err(kvm("set the MP state"))?;
    fd.set_regs(&s.regs).map_err(kvm("set registers"))?;
    fd.set_sregs(&s.sregs).map_err(kvm("set special registers"))?;
    // SAFETY: KVM_SET_XSAVE reads past the 4096-byte legacy `kvm_xsave` only when the process has
    // enabled dynamic XSTATE features for guests (arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM), e.g. AMX
    // tiles). flint-vmm never does, so the kernel reads exactly the 4096 bytes `s.xsave` holds.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("set XSAVE state"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("set XCRs"))?;
    fd.set_debug_regs(&s.debugregs).map_err(kvm("set debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("set the LAPIC"))?;
    let entries: Vec<kvm_msr_entry> =
        s.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    for chunk in entries.chunks(64) {
        let m = Msrs::from_entries(chunk).map_err(|_| CpuStateError::Msrs(0, chunk.len()))?;
        let n = fd.set_msrs(&m).map_err(kvm("set MSRs"))?;
        if n != chunk.len() {
            return Err(CpuStateError::Msrs(n, chunk.len()));
        }
    }
    fd.set_vcpu_events(&s.events).map_err(kvm("set vCPU events"))?;
    if let Some(khz) = s.tsc_khz {
        // Without TSC scaling the host rejects a different frequency; the guest's kvmclock
        // copes with that, so this is best effort.
        let _ = fd.set_tsc_khz(khz);
    }
    Ok(())
}

pub fn save_vm(vm: &VmFd) -> Result<VmState, CpuStateError> {
    let chip = |id| -> Result<kvm_irqchip, CpuStateError> {
        let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
        vm.get_irqchip(&mut c).map_err(kvm("read the irqchip"))?;
        Ok(c)
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm("read the VM clock"))?,
    })
}

/// Restores the irqchip, PIT and kvmclock. The clock resumes at the snapshot's value, so the
/// guest's monotonic time neither jumps back nor forward; the agent's refresh sets wall time.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), CpuStateError> {
    vm.set_pit2(&s.pit).map_err(kvm("set the PIT"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("set the VM clock"))?;
    vm.set_irqchip(&s.pic_master).map_err(kvm("set the PIC"))?;
    vm.set_irqchip(&s.pic_slave).map_err(kvm("set the PIC"))?;
    vm.set_irqchip(&s.ioapic).map_err(kvm("set the IOAPIC"))?;
    Ok(())
}

/// CPU identity recorded in a snapshot and checked before restore.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuIdentity {
    pub vendor: String,
    /// CPUID.1:ECX/EDX and CPUID.7.0:EBX/ECX/EDX feature words the guest was given.
    pub features: Vec<u32>,
}

fn leaf(c: &[kvm_cpuid_entry2], f: u32, i: u32) -> Option<&kvm_cpuid_entry2> {
    c.iter().find(|e| e.function == f && e.index == i)
}

pub fn cpu_identity(cpuid: &[kvm_cpuid_entry2]) -> CpuIdentity {
    let vendor = leaf(cpuid, 0, 0)
        .map(|e| {
            let mut v = Vec::new();
            for r in [e.ebx, e.edx, e.ecx] {
                v.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&v).into_owned()
        })
        .unwrap_or_default();
    let mut features = Vec::new();
    if let Some(e) = leaf(cpuid, 1, 0) {
        features.extend([e.ecx, e.edx]);
    }
    if let Some(e) = leaf(cpuid, 7, 0) {
        features.extend([e.ebx, e.ecx, e.edx]);
    }
    CpuIdentity { vendor, features }
}

/// Fails unless this host offers every feature the snapshot's guest was given, on the same
/// vendor (a guest that used AVX-512 cannot run where there is none).
pub fn check_host_cpu(kvm: &Kvm, saved: &CpuIdentity, vcpus: u8) -> Result<(), CpuStateError> {
    let host = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("read supported CPUID"))?;
    check_supported_cpuid(host, saved, vcpus)
}

/// [`check_host_cpu`] against CPUID KVM reported as supported (`KVM_GET_SUPPORTED_CPUID`, ~0.4 ms on a nested
/// host: a standby VMM reads it ahead).
pub fn check_supported_cpuid(mut host: CpuId, saved: &CpuIdentity, vcpus: u8) -> Result<(), CpuStateError> {
    // Compare like with like: what this host would configure for such a VM.
    crate::arch::x86_64::cpuid::normalize(&mut host, 0, vcpus.max(1));
    let mine = cpu_identity(host.as_slice());
    if mine.vendor != saved.vendor {
        return Err(CpuStateError::CpuMismatch(format!(
            "snapshot vendor {:?}, host vendor {:?}",
            saved.vendor, mine.vendor
        )));
    }
    // Bits the VMM itself sets (hypervisor, APIC-id-derived) are ignored: ECX bit 31 of leaf 1.
    const IGNORE_LEAF1_ECX: u32 = 1 << 31;
    for (i, (&want, &have)) in saved.features.iter().zip(mine.features.iter()).enumerate() {
        let want = if i == 0 { want & !IGNORE_LEAF1_ECX } else { want };
        let missing = want & !have;
        if missing != 0 {
            return Err(CpuStateError::CpuMismatch(format!(
                "feature word {i} lacks bits {missing:#010x} (snapshot {want:#010x}, host {have:#010x})"
            )));
        }
    }
    Ok(())
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuStateError {
    kvm(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_reads_vendor_and_features() {
        let e0 = kvm_cpuid_entry2 {
            function: 0,
            ebx: u32::from_le_bytes(*b"Auth"),
            edx: u32::from_le_bytes(*b"enti"),
            ecx: u32::from_le_bytes(*b"cAMD"),
            ..Default::default()
        };
        let e1 = kvm_cpuid_entry2 { function: 1, ecx: 5, edx: 6, ..Default::default() };
        let id = cpu_identity(&[e0, e1]);
        assert_eq!(id.vendor, "AuthenticAMD");
        assert_eq!(id.features, vec![5, 6]);
    }
}
