//! Intel MultiProcessor table (MP spec 1.4): tells the guest about its CPUs, the IOAPIC and
//! how ISA interrupts are routed, without ACPI.
use super::layout::{APIC_ADDR, IOAPIC_ADDR, IRQ_MAX, MPTABLE_START};

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_EXTINT: u8 = 3;
const MP_IRQ_NMI: u8 = 1;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table, to be written at
/// [`MPTABLE_START`]. Returns the bytes.
pub fn build(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus + 1;
    let mut t: Vec<u8> = Vec::with_capacity(512);
    t.extend_from_slice(MPC_SIGNATURE);
    t.extend_from_slice(&[0, 0]); // length, patched below
    t.push(4); // spec revision 1.4
    t.push(0); // checksum, patched below
    t.extend_from_slice(b"FLINT   ");
    t.extend_from_slice(b"MICROVM     ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count, patched below
    t.extend_from_slice(&APIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        t.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION]);
        t.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        t.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature (family 6)
        t.extend_from_slice(&0x201u32.to_le_bytes()); // feature flags: FPU, APIC
        t.extend_from_slice(&[0; 8]);
        count += 1;
    }
    t.extend_from_slice(&[MP_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    count += 1;
    t.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // type, irq type, flags (2 bytes), source bus, source irq, dest apic, dest pin
        t.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    t.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    t.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[7] = checksum(&t);

    let table_addr = (MPTABLE_START + 16) as u32;
    let mut out = Vec::with_capacity(16 + t.len());
    out.extend_from_slice(MPF_SIGNATURE);
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 B, rev 1.4, checksum, features
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_valid() {
        for cpus in [1u8, 2, 8] {
            let b = build(cpus);
            assert_eq!(&b[0..4], MPF_SIGNATURE);
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let t = &b[16..];
            assert_eq!(&t[0..4], MPC_SIGNATURE);
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
        }
    }

    #[test]
    fn fits_in_the_ebda() {
        assert!(MPTABLE_START as usize + build(8).len() < 0x10_0000);
    }
}
