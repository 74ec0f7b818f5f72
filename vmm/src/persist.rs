//! Snapshot of a running VM (pause, every part saves its own state, memory, resume) and the device side of a
//! restore (states matched to devices by id).
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::VmmHandle;
use crate::devices::bus::lock;
use crate::devices::virtio::MmioTransport;
use crate::snapshot::{cpu, format, memory as snapmem, DeviceState, RestoreError, SnapshotError, SnapshotState};
use crate::snapshot::{SnapshotKind, SnapshotReport, SnapshotRequest};

use crate::builder::elapsed_us;

impl VmmHandle {
    /// Pauses the VM, writes a snapshot (state file + memory file) and resumes it unless asked
    /// not to. Devices are held still for the duration, so memory and queue state agree.
    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotReport, SnapshotError> {
        let _one_at_a_time = lock(&self.snapshot_lock);
        if self.exit.get().is_some() {
            return Err(SnapshotError::NotRunning);
        }
        if req.kind == SnapshotKind::Diff && !self.config.track_dirty_pages {
            return Err(SnapshotError::NoDirtyTracking);
        }
        let total = Instant::now();
        let mut report = SnapshotReport {
            guest_memory_bytes: self.mem.iter().map(|r| r.len()).sum(),
            vcpus: self.config.vcpus,
            mem_mib: self.config.mem_mib,
            format_version: format::FORMAT_VERSION,
            drives: self.config.drives.len() as u32,
            ..Default::default()
        };
        let was_paused = self.control.is_paused();
        let t = Instant::now();
        self.control.pause();
        report.pause_us = elapsed_us(t);
        let result = (|| -> Result<(), SnapshotError> {
            // Hold every device still: no queue processing may touch guest memory meanwhile.
            let guards: Vec<_> = self.devices.iter().map(|d| lock(d)).collect();
            let t = Instant::now();
            let mut vcpus = self.control.save_states(self.stats.len()).map_err(SnapshotError::Vcpus)?;
            for (v, c) in vcpus.iter_mut().zip(self.cpuids.iter()) {
                v.cpuid = c.clone();
            }
            let vm = cpu::save_vm(&self.vm)?;
            let devices = guards
                .iter()
                .zip(&self.device_ids)
                .map(|(g, id)| DeviceState { id: id.clone(), transport: g.save_state(), model: g.save_model() })
                .collect();
            let serial = lock(&self.serial).serial.state().into();
            let state = SnapshotState {
                created_unix_ms: crate::snapshot::now_unix_ms(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                host_profile: self.profile,
                cpu: cpu::cpu_identity(vcpus.first().map(|v| v.cpuid.as_slice()).unwrap_or(&[])),
                config: self.config.clone(),
                cmdline: self.cmdline.clone(),
                memory_layout: snapmem::layout(&self.mem),
                memory_is_diff: req.kind == SnapshotKind::Diff,
                vm,
                vcpus,
                devices,
                serial,
            };
            report.save_state_us = elapsed_us(t);
            let t = Instant::now();
            report.state_bytes = crate::snapshot::write_state(&state, &req.state_path)?;
            report.write_state_us = elapsed_us(t);
            let t = Instant::now();
            // From here on the parent of a later diff is this snapshot, whatever becomes of it.
            let on_source = self.diff_on_source.swap(false, std::sync::atomic::Ordering::AcqRel);
            report.memory = match req.kind {
                SnapshotKind::Full => {
                    let st = snapmem::write_full(&self.mem, &req.mem_path)?;
                    if self.config.track_dirty_pages {
                        snapmem::clear_dirty_log(&self.vm, &self.mem)?;
                    }
                    st
                }
                SnapshotKind::Diff => {
                    // Without the pagemap every dirtied page is written: larger, never wrong.
                    let source = on_source.then(|| snapmem::SourcePages::open().ok()).flatten();
                    snapmem::write_diff(&self.vm, &self.mem, &req.mem_path, source.as_ref())?
                }
            };
            report.write_memory_us = elapsed_us(t);
            drop(guards);
            Ok(())
        })();
        if req.resume && !was_paused {
            self.control.resume();
        }
        result?;
        report.total_us = elapsed_us(total);
        Ok(report)
    }
}

/// Puts every saved device state into the configured device with the same id. Every configured device needs a
/// saved state and every saved state a device: a mismatch names the ids.
pub fn restore_devices(
    ids: &[String],
    transports: &[Arc<Mutex<MmioTransport>>],
    saved: &[DeviceState],
) -> Result<(), RestoreError> {
    let missing: Vec<&str> = ids.iter().filter(|id| !saved.iter().any(|s| &s.id == *id)).map(String::as_str).collect();
    let extra: Vec<&str> = saved.iter().filter(|s| !ids.contains(&s.id)).map(|s| s.id.as_str()).collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(RestoreError::Devices(format!(
            "configured devices without saved state: [{}]; saved states without a device: [{}]",
            missing.join(", "),
            extra.join(", ")
        )));
    }
    for (id, t) in ids.iter().zip(transports) {
        let Some(s) = saved.iter().find(|s| &s.id == id) else { continue };
        let mut t = lock(t);
        t.restore_model(&s.model).map_err(|e| RestoreError::Devices(format!("{id}: {e}")))?;
        t.restore_state(&s.transport).map_err(|e| RestoreError::Devices(format!("{id}: {e}")))?;
    }
    Ok(())
}
