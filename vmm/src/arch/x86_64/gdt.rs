//! Boot GDT for entering the kernel directly in 64-bit mode (Linux boot protocol: CS=0x10, DS=0x18).
use kvm_bindings::kvm_segment;

/// Packs a GDT descriptor from its flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Expands a GDT descriptor into the segment register KVM expects.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 0 { raw_limit } else { (raw_limit << 12) | 0xfff },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // gdt_entry(0xa09b, 0, 0xfffff)
    0x00cf_9300_0000_ffff, // gdt_entry(0xc093, 0, 0xfffff)
    0x008f_8b00_0000_ffff, // gdt_entry(0x808b, 0, 0xfffff)
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_gdt_matches_its_flags() {
        assert_eq!(BOOT_GDT[2], gdt_entry(0xa09b, 0, 0xfffff));
        assert_eq!(BOOT_GDT[3], gdt_entry(0xc093, 0, 0xfffff));
        assert_eq!(BOOT_GDT[4], gdt_entry(0x808b, 0, 0xfffff));
    }

    #[test]
    fn code_segment_is_long_mode() {
        let cs = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((cs.l, cs.db, cs.present, cs.selector, cs.type_), (1, 0, 1, 0x10, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((ds.l, ds.db, ds.selector, ds.type_), (0, 1, 0x18, 0x3));
    }
}
