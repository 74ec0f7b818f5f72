//! CPUID normalisation: starts from `KVM_GET_SUPPORTED_CPUID` and makes it describe one
//! vCPU of a `count`-vCPU microVM, without paravirtual features that need hypercalls.
use kvm_bindings::CpuId;

/// KVM paravirt features a Flint guest may use: kvmclock (old and new MSRs), no I/O delay,
/// and the "stable clocksource" bit. Everything else is hidden: PV spinlock kick, PV IPI,
/// PV sched-yield and map-GPA-range issue hypercalls (which hang on emulating hosts), and
/// async PF / steal time / PV EOI put guest state into shared pages a snapshot must not carry.
pub const KVM_FEATURES_ALLOWED: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_MONITOR: u32 = 1 << 3;
const EDX_HTT: u32 = 1 << 28;

/// Rewrites `cpuid` (as returned by KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8) {
    let shift = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !ECX_MONITOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                e.eax &= 0x3fff;
                if e.eax & 0x1f != 0 {
                    e.eax |= (u32::from(count) - 1) << 26;
                    let level = (e.eax >> 5) & 0x7;
                    if level >= 2 {
                        e.eax |= (u32::from(count) - 1) << 14;
                    }
                }
            }
            LEAF_PMU => {
                // No virtual PMU: the guest must not touch perf MSRs.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY => {
                // One thread per core, `count` cores in one package.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
                e.edx = u32::from(index);
            }
            LEAF_KVM_FEATURES => {
                e.eax &= KVM_FEATURES_ALLOWED;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax: !0, ebx: !0, ecx: !0, edx: !0, ..Default::default() }
    }

    #[test]
    fn hides_hypercall_features_and_sets_topology() {
        let mut c = CpuId::from_entries(&[entry(1, 0), entry(0xa, 0), entry(0xb, 1), entry(0x4000_0001, 0)]).unwrap();
        normalize(&mut c, 2, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(s[0].ecx & ECX_MONITOR, 0);
        assert_eq!((s[1].eax, s[1].ebx), (0, 0));
        assert_eq!((s[2].eax, s[2].ebx, s[2].edx), (2, 4, 2));
        assert_eq!(s[3].eax, KVM_FEATURES_ALLOWED);
    }
}
