//! What VMs hold of the host's finite things: the quotas of `[limits]` (VMs, guest memory), the jail's uids and
//! the network pool's blocks. Kept as counts and sets updated as VMs come and go, so that a new VM is checked
//! and given its uid and block under one short lock, without reading (or cloning) any VM's record.
use std::collections::{BTreeSet, HashMap, HashSet};

use crate::config::{JailConfig, Limits};

/// What one VM holds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Held {
    /// Counts toward the quotas (not failed or lost).
    pub live: bool,
    pub mem_mib: u64,
    /// Most MiB its sparse disks (writable disk, mount slot) may grow to on the data filesystem.
    pub disk_mib: u64,
    pub uid: Option<u32>,
    pub net: Option<u32>,
}

/// Where a VM's jail uid comes from.
#[derive(Debug, Clone, Copy)]
pub enum Uid<'a> {
    /// A free one of the jail's range.
    Free(&'a JailConfig),
    /// The one a standby VMM holds under this key.
    From(&'a str),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AllocError {
    #[error("{0}")]
    Quota(String),
}

#[derive(Default)]
pub struct Allocator {
    held: HashMap<String, Held>,
    live: usize,
    mem_mib: u64,
    /// Of every VM it holds, live or not (their files stay until they are deleted).
    disk_mib: u64,
    uids: BTreeSet<u32>,
    nets: HashSet<u32>,
}

impl Allocator {
    /// Guest memory live VMs may still be given under `limits` (`max_total_mem_mib`, `memory_overcommit`), MiB;
    /// `None`: no limit.
    pub fn mem_headroom_mib(&self, limits: &Limits) -> Option<u64> {
        let caps = [(limits.max_total_mem_mib > 0).then_some(limits.max_total_mem_mib), limits.overcommit_cap_mib()];
        caps.into_iter().flatten().min().map(|cap| cap.saturating_sub(self.mem_mib))
    }

    /// Whether `n` more live VMs of `mem_mib` of memory and `disk_mib` of disks each fit `limits`.
    pub fn check(&self, limits: &Limits, n: usize, mem_mib: u64, disk_mib: u64) -> Result<(), AllocError> {
        let disk = self.disk_mib + n as u64 * disk_mib;
        if limits.max_total_disk_mib > 0 && disk_mib > 0 && disk > limits.max_total_disk_mib {
            return Err(AllocError::Quota(format!(
                "{} MiB of VM disks in use (at their full size), {n} more VM(s) of {disk_mib} MiB would pass \
                 limits.max_total_disk_mib = {}",
                self.disk_mib, limits.max_total_disk_mib
            )));
        }
        if self.live + n > limits.max_vms {
            return Err(AllocError::Quota(format!(
                "{} VM(s) live, {n} more would pass limits.max_vms = {}",
                self.live, limits.max_vms
            )));
        }
        let want = self.mem_mib + n as u64 * mem_mib;
        if limits.max_total_mem_mib > 0 && want > limits.max_total_mem_mib {
            return Err(AllocError::Quota(format!(
                "{} MiB of guest memory in use, {n} more VM(s) of {mem_mib} MiB would pass limits.max_total_mem_mib = {}",
                self.mem_mib, limits.max_total_mem_mib
            )));
        }
        if let Some(cap) = limits.overcommit_cap_mib().filter(|cap| want > *cap) {
            return Err(AllocError::Quota(format!(
                "{} MiB of guest memory in use, {n} more VM(s) of {mem_mib} MiB would pass limits.memory_overcommit = {} \
                 times this host's {} MiB of RAM ({cap} MiB)",
                self.mem_mib,
                limits.memory_overcommit,
                crate::config::host_ram_mib()
            )));
        }
        Ok(())
    }

    /// Reserves what VM `id` needs: a place in the quotas, a uid of the jail's range (`jail`), a block of the
    /// network pool (`net_blocks`: how many the pool has).
    pub fn reserve(
        &mut self,
        id: &str,
        limits: &Limits,
        (mem_mib, disk_mib): (u64, u64),
        jail: Option<&JailConfig>,
        net_blocks: Option<u32>,
    ) -> Result<Held, AllocError> {
        self.reserve_with(id, limits, (mem_mib, disk_mib), jail.map(Uid::Free), net_blocks)
    }

    /// [`Allocator::reserve`], with the uid `Uid` says: a free one of the jail's range, or the one a standby VMM
    /// held (under its key), which moves to `id`.
    pub fn reserve_with(
        &mut self,
        id: &str,
        limits: &Limits,
        (mem_mib, disk_mib): (u64, u64),
        uid: Option<Uid>,
        net_blocks: Option<u32>,
    ) -> Result<Held, AllocError> {
        self.check(limits, 1, mem_mib, disk_mib)?;
        let net = match net_blocks {
            Some(blocks) => Some((0..blocks).find(|i| !self.nets.contains(i)).ok_or_else(|| {
                AllocError::Quota(format!("every block of the network pool is in use ({blocks} VMs with a network)"))
            })?),
            None => None,
        };
        let uid = match uid {
            Some(Uid::Free(j)) => Some(self.free_uid(j)?),
            Some(Uid::From(key)) => {
                let u = self
                    .held(key)
                    .and_then(|h| h.uid)
                    .ok_or_else(|| AllocError::Quota(format!("standby `{key}` holds no uid (released already)")))?;
                self.release(key);
                Some(u)
            }
            None => None,
        };
        let h = Held { live: true, mem_mib, disk_mib, uid, net };
        self.add(id, h);
        Ok(h)
    }

    /// Reserves a uid of the jail's range for a standby VMM, under `key` (never a VM id): no quota, no block.
    pub fn reserve_uid(&mut self, key: &str, j: &JailConfig) -> Result<u32, AllocError> {
        let uid = self.free_uid(j)?;
        self.add(key, Held { live: false, uid: Some(uid), ..Held::default() });
        Ok(uid)
    }

    fn free_uid(&self, j: &JailConfig) -> Result<u32, AllocError> {
        let end = j.uid_base.saturating_add(j.uid_count);
        let mut next = j.uid_base;
        for u in self.uids.range(j.uid_base..end) {
            if *u != next {
                break;
            }
            next += 1;
        }
        if next >= end {
            return Err(AllocError::Quota(format!(
                "every uid of the jail's range ({} from {}) is in use",
                j.uid_count, j.uid_base
            )));
        }
        Ok(next)
    }

    /// Records what an existing VM holds (re-adoption).
    pub fn add(&mut self, id: &str, h: Held) {
        self.release(id);
        if h.live {
            self.live += 1;
            self.mem_mib += h.mem_mib;
        }
        self.disk_mib += h.disk_mib;
        self.uids.extend(h.uid);
        self.nets.extend(h.net);
        self.held.insert(id.to_string(), h);
    }

    /// A VM failed or was lost: it holds no quota any more (its uid and block stay until it is deleted).
    pub fn set_live(&mut self, id: &str, live: bool) {
        if let Some(h) = self.held.get(id).copied() {
            self.add(id, Held { live, ..h });
        }
    }

    /// A VM's memory became known (after a restore, from its VMM).
    pub fn set_mem(&mut self, id: &str, mem_mib: u64) {
        if let Some(h) = self.held.get(id).copied() {
            self.add(id, Held { mem_mib, ..h });
        }
    }

    pub fn release(&mut self, id: &str) {
        if let Some(h) = self.held.remove(id) {
            if h.live {
                self.live -= 1;
                self.mem_mib -= h.mem_mib;
            }
            self.disk_mib -= h.disk_mib;
            if let Some(u) = h.uid {
                self.uids.remove(&u);
            }
            if let Some(n) = h.net {
                self.nets.remove(&n);
            }
        }
    }

    pub fn held(&self, id: &str) -> Option<Held> {
        self.held.get(id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_uid_moves_to_the_vm_that_takes_it() {
        let limits = Limits { max_vms: 1, ..Limits::default() };
        let jail = JailConfig { uid_base: 100, uid_count: 3, ..Default::default() };
        let mut a = Allocator::default();
        assert_eq!(a.reserve_uid("\0standby-1", &jail).unwrap(), 100);
        assert_eq!(a.reserve_uid("\0standby-2", &jail).unwrap(), 101);
        // Standbys hold no quota: the one VM the limits allow still fits.
        let x = a.reserve_with("x", &limits, (64, 0), Some(Uid::From("\0standby-2")), None).unwrap();
        assert_eq!(x.uid, Some(101));
        assert!(a.held("\0standby-2").is_none(), "the standby's key is gone");
        assert!(a.reserve_with("y", &limits, (64, 0), Some(Uid::From("\0standby-1")), None).is_err(), "max_vms");
        assert_eq!(a.held("\0standby-1").and_then(|h| h.uid), Some(100), "a refused take leaves the standby's uid");
        a.release("x");
        assert_eq!(a.reserve_uid("\0standby-3", &jail).unwrap(), 101, "the VM's uid is free once it is deleted");
    }

    #[test]
    fn guest_memory_past_the_overcommit_ratio_is_refused() {
        let ram = crate::config::host_ram_mib();
        assert!(ram > 0, "MemTotal read");
        let limits = Limits { memory_overcommit: 0.5, ..Default::default() };
        let mut a = Allocator::default();
        a.reserve("x", &limits, (ram / 4, 0), None, None).unwrap();
        let e = a.reserve("y", &limits, (ram / 3, 0), None, None).unwrap_err().to_string();
        assert!(e.contains("limits.memory_overcommit = 0.5 times this host's"), "{e}");
        a.reserve("y", &limits, (ram / 8, 0), None, None).unwrap();
        let off = Limits { memory_overcommit: 0.0, ..Default::default() };
        assert!(a.check(&off, 1, ram * 100, 0).is_ok(), "0: no limit");
    }

    #[test]
    fn memory_headroom_is_the_tightest_quota_left() {
        let ram = crate::config::host_ram_mib();
        let mut a = Allocator::default();
        let off = Limits { memory_overcommit: 0.0, ..Default::default() };
        assert_eq!(a.mem_headroom_mib(&off), None, "no memory quota: no limit");
        let both = Limits { memory_overcommit: 4.0, max_total_mem_mib: 1024, ..Default::default() };
        a.reserve("x", &both, (256, 0), None, None).unwrap();
        assert_eq!(a.mem_headroom_mib(&both), Some(768));
        let ratio = Limits { memory_overcommit: 0.5, ..Default::default() };
        assert_eq!(a.mem_headroom_mib(&ratio), Some((ram / 2).saturating_sub(256)));
        a.release("x");
        assert_eq!(a.mem_headroom_mib(&both), Some(1024), "a deleted VM's memory is free again");
    }

    #[test]
    fn quotas_uids_and_blocks_come_and_go() {
        let limits = Limits { max_vms: 3, max_total_mem_mib: 1024, ..Default::default() };
        let jail = JailConfig { uid_base: 100, uid_count: 3, ..Default::default() };
        let mut a = Allocator::default();
        let x = a.reserve("x", &limits, (512, 0), Some(&jail), Some(4)).unwrap();
        assert_eq!((x.uid, x.net), (Some(100), Some(0)));
        let y = a.reserve("y", &limits, (256, 0), Some(&jail), None).unwrap();
        assert_eq!((y.uid, y.net), (Some(101), None));
        assert!(a
            .reserve("z", &limits, (512, 0), Some(&jail), None)
            .unwrap_err()
            .to_string()
            .contains("max_total_mem_mib"));
        // A failed VM holds no quota, but its uid (its files are still that uid's) and block.
        a.set_live("x", false);
        let z = a.reserve("z", &limits, (512, 0), Some(&jail), Some(4)).unwrap();
        assert_eq!((z.uid, z.net), (Some(102), Some(1)));
        assert!(a.reserve("w", &limits, (1, 0), Some(&jail), None).unwrap_err().to_string().contains("every uid"));
        a.release("y");
        assert_eq!(a.reserve("w", &limits, (1, 0), Some(&jail), None).unwrap().uid, Some(101), "the freed uid");
        assert!(a.check(&limits, 2, 1, 0).unwrap_err().to_string().contains("max_vms"));
        a.release("x");
        assert_eq!(a.reserve("v", &limits, (1, 0), None, Some(4)).unwrap().net, Some(0), "the freed block");
    }

    #[test]
    fn disks_count_at_their_full_size_until_deleted() {
        let limits = Limits { max_total_disk_mib: 3000, ..Default::default() };
        let mut a = Allocator::default();
        a.reserve("x", &limits, (256, 2048), None, None).unwrap();
        let e = a.reserve("y", &limits, (256, 1024), None, None).unwrap_err().to_string();
        assert!(e.contains("2048 MiB of VM disks in use") && e.contains("max_total_disk_mib = 3000"), "{e}");
        a.reserve("y", &limits, (256, 512), None, None).unwrap();
        a.reserve("no-disk", &limits, (256, 0), None, None).unwrap();
        // A failed VM's disk is still on the filesystem.
        a.set_live("x", false);
        assert!(a.check(&limits, 1, 1, 1024).is_err());
        a.release("x");
        assert!(a.check(&limits, 1, 1, 2048).is_ok());
        assert!(a.check(&limits, 2, 1, 2048).is_err(), "all or nothing for several clones");
    }
}
