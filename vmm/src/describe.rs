//! `GET /vm`: the VM's description from its shared state.
use std::sync::atomic::Ordering;

use flint_vmm_api::describe::{RunState, VcpuCounters, VmDescription};

use crate::builder::VmmHandle;
use crate::devices::bus::lock;

impl VmmHandle {
    /// The VM's state, configuration, timings and counters.
    pub fn describe(&self) -> VmDescription {
        let mut timings = lock(&self.timings).clone();
        if let (Some(first), Some(init)) = (*lock(&self.first_run), *lock(&self.init_seen)) {
            timings.first_run_to_init_us = Some(init.saturating_duration_since(first).as_micros() as u64);
        }
        VmDescription {
            state: self.run_state(),
            exit: self.exit.get(),
            host_profile: self.profile,
            config: self.config.clone(),
            cmdline: self.cmdline.clone(),
            timings,
            vcpus: self
                .stats
                .iter()
                .map(|s| VcpuCounters {
                    exits: s.exits.load(Ordering::Relaxed),
                    pio_exits: s.pio.load(Ordering::Relaxed),
                    mmio_exits: s.mmio.load(Ordering::Relaxed),
                })
                .collect(),
            devices: self
                .devices
                .iter()
                .zip(&self.device_ids)
                .map(|(d, id)| {
                    let mut v = lock(d).describe();
                    if let Some(o) = v.as_object_mut() {
                        o.insert("id".into(), id.clone().into());
                    }
                    v
                })
                .collect(),
            unhandled_pio: self.pio.unhandled.load(Ordering::Relaxed),
            unhandled_mmio: self.mmio.unhandled.load(Ordering::Relaxed),
            restore: self.restore_timings.clone(),
            uffd: self.local_pager.as_ref().map(|p| p.stats.report(p.source.as_ref())),
            rss_kib: rss_kib(),
        }
    }

    pub fn run_state(&self) -> RunState {
        match (self.exit.get(), self.control.is_paused()) {
            (Some(_), _) => RunState::Exited,
            (None, true) => RunState::Paused,
            (None, false) => RunState::Running,
        }
    }
}

/// This process's resident set size (VmRSS), for memory-sharing checks.
pub fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
