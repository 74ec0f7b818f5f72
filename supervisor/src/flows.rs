//! Workflows over several VMs: templates (SnapStart: boot, init, snapshot, stop) and clones.
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use crate::daemon::{valid_id, Daemon};
use crate::vm::model::*;

/// The results of tasks that each start something: all that started; an error only if none did (the first).
pub(crate) async fn gather<T>(
    tasks: Vec<tokio::task::JoinHandle<Result<T, OpError>>>,
    what: &str,
) -> Result<Vec<T>, OpError> {
    let mut out = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(OpError::Internal(e.to_string()))),
        }
    }
    match first_err {
        Some(e) if out.is_empty() => Err(e),
        Some(e) => {
            warn!(error = %e, ok = out.len(), "some {what} failed");
            Ok(out)
        }
        None => Ok(out),
    }
}

impl Daemon {
    pub async fn clones(self: &Arc<Self>, req: CreateClones) -> Result<Vec<VmRecord>, OpError> {
        let snapshot = match (&req.template, &req.snapshot) {
            (Some(t), None) => self.template(t)?.snapshot,
            (None, Some(s)) => s.clone(),
            _ => return Err(OpError::BadRequest("give exactly one of `template` and `snapshot`".into())),
        };
        if req.count == 0 {
            return Err(OpError::BadRequest("count 0: ask for at least one clone".into()));
        }
        let max = self.cfg.limits.max_clones_per_call;
        if req.count > max {
            return Err(OpError::QuotaExceeded(format!(
                "quota: {} clones in one call, limits.max_clones_per_call = {max}",
                req.count
            )));
        }
        // Fetch once (the clones then share the L1 chunks), then restore in parallel up to the slot limit.
        let manifest = self.store.manifest(&snapshot).await?;
        // All or nothing: every clone must fit the quotas before the first starts (each also checks as it starts).
        let mem = manifest.metadata.get("mem_mib").and_then(|m| m.parse().ok()).unwrap_or(0);
        self.check_quota(&flint_vmm_api::lock(&self.vms), req.count as usize, mem)?;
        let tasks: Vec<_> = (0..req.count)
            .map(|_| {
                let this = self.clone();
                let snapshot = snapshot.clone();
                let opts = crate::daemon::RestoreOpts {
                    env: req.env.clone(),
                    lazy: req.lazy,
                    network: req.network.clone(),
                    ..Default::default()
                };
                let template = req.template.clone();
                tokio::spawn(async move {
                    // A warm pool's VM first (resume + refresh), else a restore. Pooled VMs have no network: a
                    // clone that asks for one is restored.
                    if let (Some(t), None) = (&template, &opts.network) {
                        if let Some(vm) = this.take_pooled(t, &opts.env, None).await {
                            return Ok(vm);
                        }
                    }
                    this.restore(&snapshot, &opts).await
                })
            })
            .collect();
        gather(tasks, "clones").await
    }

    /// SnapStart: boot an image, run the init command once, snapshot, (publish), stop the VM.
    pub async fn create_template(self: &Arc<Self>, req: CreateTemplate) -> Result<TemplateRecord, OpError> {
        valid_id("template name", &req.name)?;
        if req.pool_size as usize > self.cfg.pools.max_total {
            return Err(OpError::QuotaExceeded(format!(
                "quota: pool size {} is over pools.max_total = {}",
                req.pool_size, self.cfg.pools.max_total
            )));
        }
        if self.template(&req.name).is_ok() {
            return Err(OpError::Conflict(format!("template `{}` already exists", req.name)));
        }
        let snapshot = format!("tmpl-{}", req.name);
        if self.store.manifest(&snapshot).await.is_ok() {
            return Err(OpError::Conflict(format!("snapshot `{snapshot}` already exists")));
        }
        let vm = self
            .create(CreateVm {
                image: req.image.clone(),
                mem_mib: req.mem_mib,
                vcpus: req.vcpus,
                drives: req.drives.clone(),
                disk_mib: req.disk_mib,
                ..Default::default()
            })
            .await?;
        let result = async {
            let boot_ms = vm.ready_ms.unwrap_or(0.0);
            let t = Instant::now();
            if !req.init.is_empty() {
                let agent = self.agent(&vm.id).await?;
                let out = agent
                    .exec_output(flint_agent::protocol::ExecRequest {
                        argv: req.init.clone(),
                        timeout_ms: Some(self.cfg.agent_timeout_s * 1000),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| OpError::VmFailed(format!("init command: {e}")))?;
                if out.code != Some(0) {
                    return Err(OpError::BadRequest(format!(
                        "init command {:?} failed ({:?}): {}",
                        req.init,
                        out.code.map(|c| format!("exit {c}")).or(out.signal.map(|s| format!("signal {s}"))),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            let init_ms = crate::ms_since(t);
            let t = Instant::now();
            self.snapshot(&vm.id, CreateSnapshot { id: snapshot.clone(), publish: req.publish }).await?;
            let rec = TemplateRecord {
                name: req.name.clone(),
                image: vm.image.clone().unwrap_or_default(),
                init: req.init.clone(),
                snapshot: snapshot.clone(),
                created_unix_ms: flint_vmm_api::now_unix_ms(),
                boot_ms,
                init_ms,
                snapshot_ms: crate::ms_since(t),
                pool_size: req.pool_size,
            };
            self.put_template(&rec)?;
            Ok(rec)
        }
        .await;
        if let Err(e) = self.delete(&vm.id).await {
            warn!(vm = %vm.id, error = %e, "could not delete the template's build VM");
        }
        if let Ok(t) = &result {
            if t.pool_size > 0 {
                self.refill_pool(&t.name);
            }
        }
        result
    }
}
