//! vCPU register, MSR and LAPIC set-up for direct 64-bit kernel entry.
use crate::vstate::memory::GuestMem;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{segment_from_gdt, BOOT_GDT};
use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

#[derive(Debug, thiserror::Error)]
pub enum SetupRegsError {
    #[error("cannot write boot page tables or GDT to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("KVM rejected the vCPU {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM accepted only {0} of {1} boot MSRs")]
    Msrs(usize, usize),
}

/// Writes the boot GDT, an empty IDT and identity-mapping page tables for the first 1 GiB.
pub fn write_boot_tables(mem: &GuestMem) -> Result<(), SetupRegsError> {
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START)).map_err(SetupRegsError::GuestMemory)?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(SetupRegsError::GuestMemory)?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START)).map_err(SetupRegsError::GuestMemory)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START)).map_err(SetupRegsError::GuestMemory)?;
    let pde: Vec<u8> = (0..512u64).flat_map(|i| ((i << 21) | 0x83).to_le_bytes()).collect();
    mem.write_slice(&pde, GuestAddress(PDE_START)).map_err(SetupRegsError::GuestMemory)?;
    Ok(())
}

/// Puts the boot vCPU in 64-bit mode at `entry` with RSI pointing at the zero page.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), SetupRegsError> {
    let mut sregs = vcpu.get_sregs().map_err(|e| SetupRegsError::Kvm("get sregs", e))?;
    let code = segment_from_gdt(BOOT_GDT[2], 2);
    let data = segment_from_gdt(BOOT_GDT[3], 3);
    let tss = segment_from_gdt(BOOT_GDT[4], 4);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(|e| SetupRegsError::Kvm("set sregs", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| SetupRegsError::Kvm("set regs", e))
}

/// FPU defaults (every vCPU).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), SetupRegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| SetupRegsError::Kvm("set FPU", e))
}

/// The MSRs a freshly reset x86 CPU is expected to have (every vCPU).
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), SetupRegsError> {
    let e = |index: u32, data: u64| kvm_msr_entry { index, data, ..Default::default() };
    let entries = [
        e(0x174, 0),             // IA32_SYSENTER_CS
        e(0x175, 0),             // IA32_SYSENTER_ESP
        e(0x176, 0),             // IA32_SYSENTER_EIP
        e(0xc000_0081, 0),       // STAR
        e(0xc000_0082, 0),       // LSTAR
        e(0xc000_0083, 0),       // CSTAR
        e(0xc000_0084, 0),       // SYSCALL_MASK
        e(0xc000_0102, 0),       // KERNEL_GS_BASE
        e(0x10, 0),              // TSC
        e(0x1a0, 1),             // MISC_ENABLE: fast strings
        e(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| SetupRegsError::Msrs(0, entries.len()))?;
    let n = vcpu.set_msrs(&msrs).map_err(|e| SetupRegsError::Kvm("set MSRs", e))?;
    if n != entries.len() {
        return Err(SetupRegsError::Msrs(n, entries.len()));
    }
    Ok(())
}

/// LAPIC LINT0 = ExtINT (the PIC), LINT1 = NMI (every vCPU).
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), SetupRegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(|e| SetupRegsError::Kvm("get LAPIC", e))?;
    let set_mode = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    };
    set_mode(&mut lapic.regs, APIC_LVT0, MODE_EXTINT);
    set_mode(&mut lapic.regs, APIC_LVT1, MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(|e| SetupRegsError::Kvm("set LAPIC", e))
}
