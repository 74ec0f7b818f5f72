//! Operations on an existing VM: pause, resume, delete, a pool's hand-out, the agent, dynamic mounts, network
//! changes and routes to exposed ports, and its detail (record plus what its VMM says).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use flint_agent::client::AgentClient;
use serde::{Deserialize, Serialize};
use tracing::{info, Instrument};

use super::error::VmError;
use super::model::*;
use super::{EventKind, Manager, Resource};
use crate::error::{Kind, Refusal};

/// A VM's record and, while it runs, what its VMM says (timings, restore breakdown, faults); for a lazily
/// restored VM whose memory flintd serves, `vmm.uffd` is the page server's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmDetail {
    #[serde(flatten)]
    pub record: VmRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<flint_vmm_api::describe::VmDescription>,
}

/// A pool's hand-out of a paused VM: resumed, refreshed with `env` and `hostname`, given to `owner`.
#[derive(Debug, Clone, Default)]
pub struct HandOut {
    pub env: BTreeMap<String, String>,
    pub hostname: Option<String>,
    /// The VM's new owner (none: an API caller's clone).
    pub owner: Option<OwnerTag>,
    /// Whether the VM should log dirty pages from now (it does already when it was restored so).
    pub track_dirty: bool,
}

/// Where an exposed guest port of a VM is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

fn mount_path(p: &str) -> Result<String, VmError> {
    let bad = |why: &str| VmError::Invalid(format!("mount path `{p}`: {why}"));
    if !p.starts_with('/') || p.contains('\0') {
        return Err(bad("must be absolute"));
    }
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if parts.contains(&"..") {
        return Err(bad("may not contain `..`"));
    }
    if parts.is_empty() || matches!(parts[0], "proc" | "sys" | "dev" | "run") {
        return Err(bad("not `/`, /proc, /sys, /dev or /run"));
    }
    Ok(format!("/{}", parts.join("/")))
}

impl Manager {
    /// The record and what the VMM says of itself.
    pub async fn detail(&self, id: &str) -> Result<VmDetail, VmError> {
        let record = self.get(id)?;
        let mut vmm = match record.pid {
            Some(_) => self.launcher.vmm(&record.dir, record.uid.is_some()).describe().await.ok(),
            None => None,
        };
        if let (Some(v), Some(u)) = (vmm.as_mut(), self.uffd_report(id)) {
            v.uffd = Some(u);
        }
        Ok(VmDetail { record, vmm })
    }

    /// The agent of a running VM (one connection per VM, reconnected when it breaks).
    pub async fn agent(&self, id: &str) -> Result<Arc<AgentClient>, VmError> {
        let v = self.vm(id)?;
        self.agent_of(&v).await
    }

    /// Stops a VM's guest at once, whatever operation is in progress on it (no lock, no answer from the VMM):
    /// SIGSTOP to its VMM with `frozen`, SIGCONT without. Its record is unchanged (a frozen VM is still running
    /// to the API; its calls wait). For a host that may have lost its claim on a session.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), VmError> {
        let rec = self.vm(id)?.rec.get();
        if let (Some(pid), Some(start)) = (rec.pid, rec.pid_start) {
            self.launcher.freeze(crate::launcher::Proc { pid, start }, frozen);
        }
        Ok(())
    }

    /// Kills a VM's VMM at once (SIGKILL), whatever operation is in progress on it; its exit is then handled as
    /// any VMM's (the VM fails, its owner is told). `delete` then releases the rest.
    pub fn kill_now(&self, id: &str) -> Result<(), VmError> {
        let rec = self.vm(id)?.rec.get();
        if let (Some(pid), Some(start)) = (rec.pid, rec.pid_start) {
            self.launcher.kill(crate::launcher::Proc { pid, start });
        }
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<VmRecord, VmError> {
        self.set_run_state(id, true).await
    }

    pub async fn resume(&self, id: &str) -> Result<VmRecord, VmError> {
        self.set_run_state(id, false).await
    }

    async fn set_run_state(&self, id: &str, pause: bool) -> Result<VmRecord, VmError> {
        let v = self.vm(id)?;
        let _op = v.rec.op.lock().await;
        let rec = v.rec.get();
        let (from, to) =
            if pause { (VmStatus::Running, VmStatus::Paused) } else { (VmStatus::Paused, VmStatus::Running) };
        if rec.status != from {
            return Err(VmError::WrongStatus { id: id.into(), status: rec.status, want: from.name() });
        }
        let vmm = self.launcher.vmm(&rec.dir, rec.uid.is_some());
        if pause {
            vmm.pause().await?;
        } else {
            vmm.resume().await?;
        }
        Ok(v.rec.commit(&self.db, |r| r.status = to)?)
    }

    /// Stops a VM (VMM shutdown, then SIGKILL), releases everything it holds, newest first, and forgets it.
    pub async fn delete(&self, id: &str) -> Result<(), VmError> {
        let v = self.vm(id)?;
        let _op = v.rec.op.lock().await;
        let span = tracing::info_span!("vm", id = %id, op = "delete");
        async {
            if v.rec.removed() {
                return Err(VmError::NotFound(id.into()));
            }
            let rec = v.rec.get();
            if rec.status != VmStatus::Stopping {
                v.rec.commit(&self.db, |r| r.status = VmStatus::Stopping)?;
            }
            self.forget(&v).await?;
            self.emit(&rec, EventKind::Deleted);
            info!(vm = %id, "VM deleted");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// A pool's hand-out, one operation on the VM: resume the paused VM, refresh its guest (clock, entropy, env,
    /// hostname), give it its new owner. A failure leaves it to the caller to delete.
    pub async fn hand_out(&self, id: &str, from: &OwnerTag, h: HandOut) -> Result<VmRecord, VmError> {
        let v = self.vm(id)?;
        let _op = v.rec.op.lock().await;
        let rec = v.rec.get();
        if rec.status != VmStatus::Paused || rec.owner.as_ref() != Some(from) {
            return Err(VmError::Conflict(format!(
                "pooled VM `{id}` is {} (owner {:?})",
                rec.status.name(),
                rec.owner
            )));
        }
        let t = Instant::now();
        self.launcher.vmm(&rec.dir, rec.uid.is_some()).resume().await?;
        let resume_ms = crate::ms_since(t);
        v.rec.stage(|r| r.status = VmStatus::Running)?;
        let agent = self.agent_of(&v).await?;
        let hostname = h.hostname.clone().unwrap_or_else(|| id.to_string());
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(self.cfg.restore_agent_timeout_s),
            agent.refresh(h.env.clone(), Some(hostname)),
        )
        .await
        .map_err(|_| VmError::Agent { id: id.into(), what: "refresh".into(), why: "no answer".into(), code: None })?
        .map_err(|e| VmError::agent(id, "refresh", &e))?;
        let refresh_agent_ms = crate::ms_since(sent);
        let ms = crate::ms_since(t);
        let rec = v.rec.commit(&self.db, |r| {
            r.owner = h.owner.clone();
            r.env = h.env.clone();
            r.hostname = h.hostname.clone();
            r.track_dirty |= h.track_dirty;
            // A hand-out is resume + refresh: what the caller waited for.
            r.timings.ready_ms = Some(ms);
            r.timings.refresh_ms = Some(ms);
            r.timings.refresh_guest_ms = super::start::refresh_guest_ms(Some(&answer));
            r.timings.refresh_agent_ms = Some(refresh_agent_ms);
            r.timings.resume_ms = Some(resume_ms);
        })?;
        self.emit(&rec, EventKind::Running);
        Ok(rec)
    }

    /// A dynamic mount (docs/images.md): a copy of host directory `source` as an ext4 filesystem written into the
    /// VM's mount slot, then mounted by the agent at `path` (read-only or read-write). The slot is a drive, so the
    /// mount's content is in the VM's snapshots: clones, hibernated sessions and forks keep it.
    pub async fn mount(&self, id: &str, m: VolumeMount) -> Result<VmRecord, VmError> {
        let v = self.vm(id)?;
        let _op = v.rec.op.lock().await;
        let rec = v.rec.get();
        let index = rec.mount_slot.ok_or_else(|| {
            VmError::Invalid(format!(
                "VM `{id}` has no mount slot: dynamic mounts need a disk-rooted image's VM (made by this flintd)"
            ))
        })?;
        if let Some(used) = rec.mounts.first() {
            return Err(VmError::Conflict(format!("VM `{id}`'s mount slot holds {}: unmount it first", used.path)));
        }
        let path = mount_path(&m.path)?;
        if !m.source.is_absolute() || !m.source.is_dir() {
            return Err(VmError::Invalid(format!(
                "source {} is not an existing directory (absolute path)",
                m.source.display()
            )));
        }
        // The slot is opened beneath the VM's directory (its VMM's uid owns it: a link there must not turn the
        // copy into a write to a host file); the copy is made by a walker that cannot leave the source.
        let slot_file = Arc::new(self.slot_file(&rec, index)?);
        let scratch = self.cfg.data_dir.join("tmp").join(format!("mount-{id}"));
        let (source, f) = (m.source.clone(), slot_file.clone());
        tokio::task::spawn_blocking(move || crate::image::fill_slot(&f, &source, &scratch))
            .await
            .map_err(|e| VmError::Io { what: "copy the mount".into(), source: std::io::Error::other(e) })??;
        let agent = self.agent_of(&v).await?;
        let device = format!("vd{}", (b'a' + index as u8) as char);
        if let Err(e) = agent.mount(&device, &path, m.read_only).await {
            let _ = crate::image::empty_slot(&slot_file);
            return Err(VmError::agent(id, format!("mount {} at {path}", m.source.display()), &e));
        }
        info!(vm = id, source = %m.source.display(), path, read_only = m.read_only, "directory mounted");
        Ok(v.rec.commit(&self.db, |r| r.mounts = vec![VolumeMount { path, ..m }])?)
    }

    /// Unmounts a dynamic mount and empties the slot.
    pub async fn unmount(&self, id: &str, path: &str) -> Result<VmRecord, VmError> {
        let v = self.vm(id)?;
        let _op = v.rec.op.lock().await;
        let rec = v.rec.get();
        let path = mount_path(path)?;
        let Some(index) = rec.mount_slot.filter(|_| rec.mounts.iter().any(|m| m.path == path)) else {
            return Err(VmError::Missing(format!("VM `{id}` has nothing mounted at {path}")));
        };
        let agent = self.agent_of(&v).await?;
        agent.unmount(&path).await.map_err(|e| VmError::agent(id, format!("unmount {path}"), &e))?;
        if let Ok(f) = self.slot_file(&rec, index) {
            let _ = crate::image::empty_slot(&f);
        }
        info!(vm = id, path, "directory unmounted");
        Ok(v.rec.commit(&self.db, |r| r.mounts.retain(|m| m.path != path))?)
    }

    fn slot_file(&self, rec: &VmRecord, index: usize) -> Result<std::fs::File, VmError> {
        crate::beneath::Beneath::open(&rec.dir)
            .and_then(|d| d.open_regular_rw(&crate::drives::file_name(index)))
            .map_err(|source| VmError::Io { what: format!("VM `{}`'s mount slot", rec.id), source })
    }

    /// Replaces a VM's network request (egress policy, exposed ports): applied to its running VMM's namespace at
    /// once, its plain TCP forwards (a VM without an owner) changed to match.
    pub async fn set_network(
        self: &Arc<Self>,
        id: &str,
        request: crate::net::NetworkRequest,
    ) -> Result<VmRecord, VmError> {
        let v = self.vm(id)?;
        let _op = v.rec.op.lock().await;
        let rec = v.rec.get();
        let Some(mut n) = rec.network.clone() else {
            return Err(VmError::Conflict(format!("VM `{id}` has no network (create it with a `network` request)")));
        };
        let rules = request.check(self.cfg.network.max_rules)?;
        if rec.owner.is_none() {
            self.net.forwards.check(id, &request)?;
        }
        if matches!(rec.status, VmStatus::Running | VmStatus::Paused | VmStatus::Starting) {
            let (net, vm, n2) = (self.net.clone(), id.to_string(), n.clone());
            tokio::task::spawn_blocking(move || net.set_policy(&vm, &n2, rules)).await.map_err(|e| VmError::Io {
                what: "apply the egress policy".into(),
                source: std::io::Error::other(e),
            })??;
            if rec.owner.is_none() {
                let up: Arc<dyn crate::net::forward::Upstream> = Arc::new(VmUpstream::new(self, id));
                let mut stack = flint_vmm_api::lock(&v.stack);
                let have = match stack.iter().position(|r| matches!(r, Resource::Forwards(_))) {
                    Some(i) => match stack.remove(i) {
                        Resource::Forwards(f) => f,
                        _ => Vec::new(),
                    },
                    None => Vec::new(),
                };
                let f = self.net.forwards.reconcile(id, Some(&request), have, &up)?;
                stack.push(Resource::Forwards(f));
            }
        }
        n.request = request;
        Ok(v.rec.commit(&self.db, |r| r.network = Some(n))?)
    }

    /// Where exposed port `port` of running VM `id` is reached, and its token.
    pub fn route(&self, id: &str, port: u16) -> Result<Route, VmError> {
        let rec = self.get(id)?;
        let n = rec.network.as_ref().ok_or_else(|| {
            VmError::Conflict(format!("VM `{id}` has no network (create it with a `network` request)"))
        })?;
        let exposed = n.request.ports.get(&port).ok_or_else(|| {
            VmError::Missing(format!("port {port} of `{id}` is not exposed (PUT /v1/vms/{id}/ports/{port})"))
        })?;
        if rec.status != VmStatus::Running {
            return Err(VmError::WrongStatus { id: id.into(), status: rec.status, want: "running" });
        }
        let b = self.net.block(n.index)?;
        Ok(Route { addr: SocketAddr::from((b.guest(), port)), token: exposed.token.clone() })
    }

    /// The VM's directory, as its owner's tools see it (tests, the crash harness).
    pub fn dir_of(&self, id: &str) -> Option<std::path::PathBuf> {
        self.get(id).ok().map(|r| r.dir)
    }

    /// Whether `path` is inside some VM's directory (a caller must not name those as drives).
    pub fn in_vm_dir(&self, path: &Path) -> bool {
        path.starts_with(self.vms_dir())
    }
}

/// A VM's own plain TCP forwards reach its guest directly.
pub(crate) struct VmUpstream {
    vms: Weak<Manager>,
    id: String,
}

impl VmUpstream {
    pub fn new(m: &Arc<Manager>, id: &str) -> VmUpstream {
        VmUpstream { vms: Arc::downgrade(m), id: id.to_string() }
    }
}

impl crate::net::forward::Upstream for VmUpstream {
    fn connect(&self, port: u16) -> crate::launcher::BoxFut<'_, Result<crate::net::forward::Destination, Refusal>> {
        Box::pin(async move {
            let m = self.vms.upgrade().ok_or_else(|| Refusal::new(Kind::Unavailable, "flintd is stopping"))?;
            let r = m.route(&self.id, port)?;
            Ok((r.addr, Box::new(()) as Box<dyn Send>))
        })
    }
}
