//! Guest memory: anonymous, 2 MiB-aligned regions laid out by [`crate::arch::x86_64::layout`].
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestAddress;

/// Guest memory with a dirty bitmap that records every write the VMM's devices make (KVM's
/// dirty log only sees vCPU writes; a diff snapshot needs both).
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub type GuestRegion = vm_memory::GuestRegionMmap<AtomicBitmap>;

use crate::arch::x86_64::layout::ram_regions;

pub const MIB: u64 = 1 << 20;
/// Region sizes and starts are multiples of this, so the memory can later be backed by
/// 2 MiB huge pages without changing the layout.
pub const REGION_ALIGN: u64 = 2 * MIB;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is not a multiple of 2 MiB or is below 64 MiB")]
    BadSize(u64),
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Allocates anonymous guest memory of `mem_mib` MiB (private, not reserved up front).
pub fn create_anonymous(mem_mib: u64) -> Result<GuestMem, MemoryError> {
    let size = mem_mib * MIB;
    if mem_mib < 64 || !size.is_multiple_of(REGION_ALIGN) {
        return Err(MemoryError::BadSize(mem_mib));
    }
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(size).into_iter().map(|(start, len)| (GuestAddress(start), len as usize)).collect();
    GuestMem::from_ranges(&ranges).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn rejects_odd_sizes() {
        assert!(matches!(create_anonymous(63), Err(MemoryError::BadSize(63))));
        assert!(matches!(create_anonymous(129), Err(MemoryError::BadSize(129))));
    }

    #[test]
    fn anonymous_memory_reads_back() {
        let m = create_anonymous(64).unwrap();
        m.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        assert_eq!(m.num_regions(), 1);
    }
}
