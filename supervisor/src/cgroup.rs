//! A cgroup per VM: memory limit (guest memory plus the VMM's allowance), CPU weight, pids limit. cgroup v2 (the
//! unified hierarchy mounted at /sys/fs/cgroup with the memory controller) or v1 (memory, cpu and pids
//! hierarchies), detected at start. The VMM is moved in by its launcher before it executes anything.
use std::path::{Path, PathBuf};

/// The cgroup hierarchies of this host.
#[derive(Debug, Clone, PartialEq)]
pub enum Hierarchy {
    /// Unified: one directory per cgroup, controllers enabled through `cgroup.subtree_control`. `base` is the
    /// cgroup flintd manages below: the root, or (under systemd with `Delegate=yes`) its unit's own cgroup.
    V2 { root: PathBuf, base: PathBuf },
    /// One hierarchy per controller.
    V1 { memory: PathBuf, cpu: PathBuf, pids: PathBuf },
}

/// Limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// 1-10000, 100 is the default share (v1: cpu.shares = weight * 1024 / 100).
    pub cpu_weight: u32,
    pub pids: u64,
    /// A CPU limit, a fraction of one core (v2 `cpu.max`, v1 CFS quota, over 100 ms periods); none: no limit.
    pub cpu_max: Option<f64>,
}

/// The CFS period a CPU limit is counted over, µs.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The quota per period of a limit of `cpu` cores (at least 1 ms: the kernel's floor).
pub fn cpu_quota_us(cpu: f64) -> u64 {
    ((cpu * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// One VM's cgroup: a directory per hierarchy.
#[derive(Debug, Clone, PartialEq)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
    /// Where the memory limit is (the file tests and operators read).
    pub memory_dir: PathBuf,
}

/// Why a cgroup could not be made, read or joined.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{what} {}: {source}", path.display())]
    Io { what: String, path: PathBuf, source: std::io::Error },
    #[error(
        "no usable cgroup hierarchy under {0} (need cgroup v2 with the memory controller, or v1 memory, cpu and pids)"
    )]
    NoHierarchy(PathBuf),
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        what: format!("write {value:?} to"),
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(d: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(d).map_err(|source| CgroupError::Io {
        what: "create".into(),
        path: d.to_path_buf(),
        source,
    })
}

impl Hierarchy {
    /// What this host has, under `fs` (normally /sys/fs/cgroup).
    pub fn detect(fs: &Path) -> Result<Hierarchy, CgroupError> {
        if let Ok(c) = std::fs::read_to_string(fs.join("cgroup.controllers")) {
            if c.split_whitespace().any(|w| w == "memory") {
                return Ok(Hierarchy::V2 { root: fs.to_path_buf(), base: fs.to_path_buf() });
            }
        }
        let cpu = ["cpu", "cpu,cpuacct"].iter().map(|d| fs.join(d)).find(|p| p.join("cpu.shares").exists());
        match (fs.join("memory"), cpu, fs.join("pids")) {
            // The root of the pids hierarchy has no pids.max (only its children do).
            (m, Some(c), p) if m.join("memory.limit_in_bytes").exists() && p.join("cgroup.procs").exists() => {
                Ok(Hierarchy::V1 { memory: m, cpu: c, pids: p })
            }
            _ => Err(CgroupError::NoHierarchy(fs.to_path_buf())),
        }
    }

    /// Under systemd (`in_unit`: `INVOCATION_ID` is set) on the unified hierarchy, flintd's unit delegates its
    /// cgroup (`Delegate=yes`) and starts flintd in its leaf `<unit>/daemon` (`DelegateSubgroup=daemon`, systemd
    /// 254 and later): VM cgroups then go below the unit, beside `daemon`, not beside systemd's own tree, and the
    /// unit's cgroup gets the controllers. `self_cgroup`: /proc/self/cgroup. Elsewhere (no systemd, v1, a systemd
    /// too old to start flintd in the leaf, where a restart could not place it once VMs run below the unit)
    /// nothing changes.
    pub fn delegated(self, in_unit: bool, self_cgroup: &str) -> Result<Hierarchy, CgroupError> {
        let Hierarchy::V2 { root, .. } = &self else { return Ok(self) };
        let own = self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim();
        let Some(unit) = own.strip_suffix("/daemon").filter(|u| in_unit && !u.is_empty() && !u.contains("..")) else {
            return Ok(self);
        };
        let base = root.join(unit.trim_start_matches('/'));
        write(&base.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
        Ok(Hierarchy::V2 { root: root.clone(), base })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Hierarchy::V2 { .. } => "v2",
            Hierarchy::V1 { .. } => "v1",
        }
    }

    /// Where `<parent>/<vm>` is (existing or not): one directory (v2), or the memory, cpu and pids ones (v1).
    pub fn vm_cgroup(&self, parent: &str, vm: &str) -> VmCgroup {
        let dirs: Vec<PathBuf> = match self {
            Hierarchy::V2 { base, .. } => vec![base.join(parent).join(vm)],
            Hierarchy::V1 { memory, cpu, pids } => {
                [memory, cpu, pids].iter().map(|b| b.join(parent).join(vm)).collect()
            }
        };
        VmCgroup { memory_dir: dirs[0].clone(), dirs }
    }

    /// Creates (or reuses) `<parent>/<vm>` with `limits`.
    pub fn create(&self, parent: &str, vm: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let cg = self.vm_cgroup(parent, vm);
        if let Hierarchy::V2 { base, .. } = self {
            let p = base.join(parent);
            create_dir(&p)?;
            // Controllers reach a child only if every ancestor enables them (`base` and `parent` hold no
            // processes of ours, as v2 requires of a cgroup that delegates controllers).
            for dir in [base.as_path(), p.as_path()] {
                let _ = write(&dir.join("cgroup.subtree_control"), "+memory +cpu +pids");
            }
        }
        for d in &cg.dirs {
            create_dir(d)?;
        }
        let weight = limits.cpu_weight.clamp(1, 10000);
        match self {
            Hierarchy::V2 { .. } => {
                let d = &cg.dirs[0];
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                let _ = write(&d.join("memory.swap.max"), "0");
                write(&d.join("cpu.weight"), &weight.to_string())?;
                let max = limits.cpu_max.map_or("max".to_string(), |c| cpu_quota_us(c).to_string());
                write(&d.join("cpu.max"), &format!("{max} {CPU_PERIOD_US}"))?;
                write(&d.join("pids.max"), &limits.pids.to_string())?;
            }
            Hierarchy::V1 { .. } => {
                let (m, c, p) = (&cg.dirs[0], &cg.dirs[1], &cg.dirs[2]);
                write(&m.join("memory.limit_in_bytes"), &limits.memory_bytes.to_string())?;
                let _ = write(&m.join("memory.swappiness"), "0");
                let shares = (u64::from(weight) * 1024 / 100).max(2);
                write(&c.join("cpu.shares"), &shares.to_string())?;
                write(&c.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let quota = limits.cpu_max.map_or(-1, |c| cpu_quota_us(c) as i64);
                write(&c.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&p.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        Ok(cg)
    }
}

impl Hierarchy {
    /// Changes `cg`'s limits from `was` to `now`, writing only those that differ (a standby's cgroup given its
    /// VM's limits at the hand-over).
    pub fn update(&self, cg: &VmCgroup, was: &Limits, now: &Limits) -> Result<(), CgroupError> {
        let quota = |l: &Limits| l.cpu_max.map(cpu_quota_us);
        match self {
            Hierarchy::V2 { .. } => {
                let d = &cg.dirs[0];
                if was.memory_bytes != now.memory_bytes {
                    write(&d.join("memory.max"), &now.memory_bytes.to_string())?;
                }
                if quota(was) != quota(now) {
                    let max = quota(now).map_or("max".to_string(), |q| q.to_string());
                    write(&d.join("cpu.max"), &format!("{max} {CPU_PERIOD_US}"))?;
                }
                if was.pids != now.pids {
                    write(&d.join("pids.max"), &now.pids.to_string())?;
                }
            }
            Hierarchy::V1 { .. } => {
                let (m, c, p) = (&cg.dirs[0], &cg.dirs[1], &cg.dirs[2]);
                if was.memory_bytes != now.memory_bytes {
                    write(&m.join("memory.limit_in_bytes"), &now.memory_bytes.to_string())?;
                }
                if quota(was) != quota(now) {
                    let q = quota(now).map_or(-1, |q| q as i64);
                    write(&c.join("cpu.cfs_quota_us"), &q.to_string())?;
                }
                if was.pids != now.pids {
                    write(&p.join("pids.max"), &now.pids.to_string())?;
                }
            }
        }
        Ok(())
    }
}

/// An open memory.events (v2) or memory.failcnt (v1) of one cgroup.
pub struct FailedCharges {
    file: std::fs::File,
    v2: bool,
}

impl FailedCharges {
    /// The count now; none once the cgroup is gone.
    pub fn read(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 512];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        failed_charges_in(std::str::from_utf8(&buf[..n]).ok()?, self.v2)
    }
}

/// The failed charges in memory.events (v2: its `max` line) or memory.failcnt (v1: the number).
fn failed_charges_in(text: &str, v2: bool) -> Option<u64> {
    if v2 {
        stat_value(text, "max")
    } else {
        text.trim().parse().ok()
    }
}

/// One reading of a cgroup's memory: its limit, what it uses that cannot be reclaimed without swap (everything but
/// file cache: anonymous memory, page tables, kernel memory) and how many charges have failed at the limit so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReading {
    pub limit: u64,
    pub anon: u64,
    pub failed_charges: u64,
}

fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl VmCgroup {
    /// Reads the memory controller's files (v2: memory.max, memory.stat `anon`, memory.events `max`; v1:
    /// memory.limit_in_bytes, memory.stat `rss`, memory.failcnt).
    pub fn memory(&self) -> Option<MemoryReading> {
        let d = &self.memory_dir;
        let read = |f: &str| std::fs::read_to_string(d.join(f)).ok();
        if let Some(max) = read("memory.max") {
            let stat = read("memory.stat")?;
            let events = read("memory.events")?;
            let current: u64 = read("memory.current")?.trim().parse().ok()?;
            return Some(MemoryReading {
                limit: max.trim().parse().unwrap_or(u64::MAX),
                anon: current.saturating_sub(stat_value(&stat, "file").unwrap_or(0)),
                failed_charges: failed_charges_in(&events, true)?,
            });
        }
        let stat = read("memory.stat")?;
        let usage: u64 = read("memory.usage_in_bytes")?.trim().parse().ok()?;
        Some(MemoryReading {
            limit: read("memory.limit_in_bytes")?.trim().parse().ok()?,
            anon: usage.saturating_sub(stat_value(&stat, "cache").unwrap_or(0)),
            failed_charges: failed_charges_in(&read("memory.failcnt")?, false)?,
        })
    }

    /// A reader of how many memory charges have failed at the limit (v2: memory.events `max`; v1:
    /// memory.failcnt): the file is opened once and read again from its start on each check (a path lookup in
    /// the cgroup file system costs more than the read).
    pub fn failed_charges(&self) -> Option<FailedCharges> {
        let d = &self.memory_dir;
        match std::fs::File::open(d.join("memory.events")) {
            Ok(file) => Some(FailedCharges { file, v2: true }),
            Err(_) => Some(FailedCharges { file: std::fs::File::open(d.join("memory.failcnt")).ok()?, v2: false }),
        }
    }

    /// Moves process `pid` into every hierarchy of this cgroup.
    pub fn join(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the cgroup once its processes are gone (best effort: a cgroup still in use stays).
    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under a systemd unit with `Delegate=yes`, VM cgroups nest in the unit's own cgroup, flintd itself in a
    /// leaf of it; without systemd (or in the root cgroup) nothing moves.
    #[test]
    fn a_systemd_unit_delegates_its_cgroup() {
        let fs = std::env::temp_dir().join(format!("flint-cgdel-{}", std::process::id()));
        let unit = fs.join("system.slice/flintd.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(fs.join("cgroup.controllers"), "cpu memory pids").unwrap();
        let h = Hierarchy::detect(&fs).unwrap();
        let leaf = "0::/system.slice/flintd.service/daemon\n";
        assert_eq!(h.clone().delegated(false, leaf).unwrap(), h, "no systemd");
        assert_eq!(h.clone().delegated(true, "0::/\n").unwrap(), h, "the root cgroup");
        let old = h.clone().delegated(true, "0::/system.slice/flintd.service\n").unwrap();
        assert_eq!(old, h, "a systemd that did not start flintd in the leaf");
        let d = h.clone().delegated(true, leaf).unwrap();
        assert_eq!(std::fs::read_to_string(unit.join("cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");
        let cg = d
            .create("flint", "vm-1", Limits { memory_bytes: 1 << 30, cpu_weight: 100, pids: 32, cpu_max: None })
            .unwrap();
        assert_eq!(cg.memory_dir, unit.join("flint/vm-1"));
        assert_eq!(std::fs::read_to_string(unit.join("flint/vm-1/memory.max")).unwrap(), "1073741824");
        assert!(!fs.join("flint").exists(), "nothing outside the unit's tree");
        let _ = std::fs::remove_dir_all(&fs);
    }

    #[test]
    fn detects_v2_v1_or_says_what_is_missing() {
        let fs = std::env::temp_dir().join(format!("flint-cgfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&fs);
        std::fs::create_dir_all(&fs).unwrap();
        assert!(Hierarchy::detect(&fs).unwrap_err().to_string().contains("no usable cgroup hierarchy"));
        // v1 (this development host's layout: cpu,cpuacct may be the cpu directory).
        for (d, f) in [("memory", "memory.limit_in_bytes"), ("cpu,cpuacct", "cpu.shares"), ("pids", "cgroup.procs")] {
            std::fs::create_dir_all(fs.join(d)).unwrap();
            std::fs::write(fs.join(d).join(f), "").unwrap();
        }
        let v1 = Hierarchy::detect(&fs).unwrap();
        assert_eq!(v1, Hierarchy::V1 { memory: fs.join("memory"), cpu: fs.join("cpu,cpuacct"), pids: fs.join("pids") });
        let limits = Limits { memory_bytes: 300 << 20, cpu_weight: 50, pids: 64, cpu_max: Some(0.1) };
        let cg = v1.create("flint", "vm-1", limits).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(cg.memory_dir.join("memory.limit_in_bytes")), (300u64 << 20).to_string());
        assert_eq!(read(fs.join("cpu,cpuacct/flint/vm-1/cpu.shares")), "512");
        assert_eq!(read(fs.join("pids/flint/vm-1/pids.max")), "64");
        assert_eq!(read(fs.join("cpu,cpuacct/flint/vm-1/cpu.cfs_quota_us")), "10000", "a tenth of a core");
        assert_eq!(read(fs.join("cpu,cpuacct/flint/vm-1/cpu.cfs_period_us")), "100000");
        // v2 wins when the unified hierarchy has the memory controller.
        std::fs::write(fs.join("cgroup.controllers"), "cpu memory pids").unwrap();
        let v2 = Hierarchy::detect(&fs).unwrap();
        let cg = v2
            .create("flint", "vm-2", Limits { memory_bytes: 1 << 30, cpu_weight: 100, pids: 32, cpu_max: Some(0.25) })
            .unwrap();
        assert_eq!(read(cg.memory_dir.join("memory.max")), (1u64 << 30).to_string());
        assert_eq!(read(fs.join("flint/vm-2/cpu.max")), "25000 100000");
        assert_eq!(cpu_quota_us(0.001), 1000, "the kernel's 1 ms floor");
        assert_eq!(read(fs.join("flint/vm-2/cpu.weight")), "100");
        assert_eq!(read(fs.join("flint/cgroup.subtree_control")), "+memory +cpu +pids");
        // Readings: v2 from memory.max / memory.stat anon / memory.events max.
        std::fs::write(cg.memory_dir.join("memory.stat"), "anon 1048576\nfile 4096\n").unwrap();
        std::fs::write(cg.memory_dir.join("memory.current"), "1052672\n").unwrap();
        std::fs::write(cg.memory_dir.join("memory.events"), "low 0\nhigh 0\nmax 7\noom 0\n").unwrap();
        let m = cg.memory().unwrap();
        assert_eq!((m.limit, m.anon, m.failed_charges), (1 << 30, 1 << 20, 7));
        std::fs::remove_dir_all(&fs).unwrap();
    }
}
