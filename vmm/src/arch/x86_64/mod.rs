//! x86_64 boot: memory layout, boot_params (Linux 64-bit boot protocol), MP table, vCPU set-up.
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;

use crate::vstate::memory::GuestMem;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigureSystemError {
    #[error("too many e820 entries")]
    E820Overflow,
    #[error("cannot write boot_params to guest memory")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error("cannot write the MP table to guest memory")]
    MpTable(#[source] vm_memory::GuestMemoryError),
}

/// Where the initramfs was placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct InitrdRegion {
    pub addr: u64,
    pub size: u64,
}

/// Highest page-aligned address below which an initramfs of `size` bytes fits in low RAM
/// (below the MMIO gap), or `None` when it does not fit above the kernel.
pub fn initrd_load_addr(mem: &GuestMem, size: u64, kernel_end: u64) -> Option<u64> {
    let low_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let addr = low_end.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

/// Writes boot_params (zero page), the e820 map and the MP table.
pub fn configure_system(
    mem: &GuestMem,
    cmdline_size: usize,
    initrd: Option<InitrdRegion>,
    num_cpus: u8,
) -> Result<(), ConfigureSystemError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    let mut add = |addr: u64, size: u64, kind: u32| -> Result<(), ConfigureSystemError> {
        let i = params.e820_entries as usize;
        if i >= params.e820_table.len() {
            return Err(ConfigureSystemError::E820Overflow);
        }
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: kind };
        params.e820_entries += 1;
        Ok(())
    };
    add(0, EBDA_START, E820_RAM)?;
    add(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)?;
    let mem_end = mem.last_addr().raw_value() + 1;
    if mem_end <= MMIO_GAP_START {
        add(HIMEM_START, mem_end - HIMEM_START, E820_RAM)?;
    } else {
        add(HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)?;
        add(MMIO_GAP_END, mem_end - MMIO_GAP_END, E820_RAM)?;
    }
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMem>(&bp, mem).map_err(ConfigureSystemError::BootParams)?;
    mem.write_slice(&mptable::build(num_cpus), GuestAddress(MPTABLE_START)).map_err(ConfigureSystemError::MpTable)
}

/// Translates a guest virtual address through the guest's 4-level page tables (for error
/// reports: the instruction bytes at RIP). Returns `None` when a level is not present.
pub fn translate_gva(mem: &GuestMem, cr3: u64, gva: u64) -> Option<u64> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4u32).rev() {
        let idx = (gva >> (12 + 9 * level)) & 0x1ff;
        let e: u64 = mem.read_obj(GuestAddress(table + idx * 8)).ok()?;
        if e & 1 == 0 {
            return None;
        }
        if (level == 1 || level == 2) && e & 0x80 != 0 {
            let shift = 12 + 9 * level;
            let base = e & ADDR_MASK & !((1u64 << shift) - 1);
            return Some(base | (gva & ((1u64 << shift) - 1)));
        }
        table = e & ADDR_MASK;
    }
    Some(table | (gva & 0xfff))
}
