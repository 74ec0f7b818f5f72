//! The KVM VM: in-kernel irqchip and PIT, guest memory slots.
use crate::vstate::memory::GuestMem;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::TSS_ADDRESS;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability Flint needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// Capabilities every Flint VM relies on.
const REQUIRED_CAPS: &[(kvm_ioctls::Cap, &str)] = &[
    (kvm_ioctls::Cap::Irqchip, "IRQCHIP"),
    (kvm_ioctls::Cap::Pit2, "PIT2"),
    (kvm_ioctls::Cap::Ioeventfd, "IOEVENTFD"),
    (kvm_ioctls::Cap::Irqfd, "IRQFD"),
    (kvm_ioctls::Cap::UserMemory, "USER_MEMORY"),
    (kvm_ioctls::Cap::ImmediateExit, "IMMEDIATE_EXIT"),
];

/// Opens /dev/kvm and checks the API version and required capabilities.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates a VM with the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(|e| VmError::Kvm("create the VM", e))?;
    vm.set_tss_address(TSS_ADDRESS).map_err(|e| VmError::Kvm("set the TSS address", e))?;
    Ok(vm)
}

/// Creates the in-kernel irqchip and PIT. Call it after [`register_memory`]: making them runs SRCU grace periods
/// back to back, and a memory-slot change right after waits for the next one, throttled: 4-11 ms on an emulating
/// host against 0.1-0.2 ms before them (measured with the same 256 MiB slot). After ~50 ms of quiet, a change is
/// fast again (what a standby VMM counts on: `standby.rs`).
pub fn create_irqchip(vm: &VmFd) -> Result<(), VmError> {
    vm.create_irq_chip().map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| VmError::Kvm("create the PIT", e))?;
    Ok(())
}

/// Registers every region of `mem` as a KVM memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMem, flags: u32) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Kvm("find a memory region's host address", kvm_ioctls::Error::new(libc::EFAULT)))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region's host mapping is owned by `mem`, which outlives the VM's use of
        // it (the caller keeps the GuestMem alive as long as the VmFd).
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| VmError::Kvm("register guest memory", e))?;
    }
    Ok(())
}
