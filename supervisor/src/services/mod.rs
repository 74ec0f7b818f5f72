//! The services on top of the VM layer: what flintd offers beyond single VMs. Each uses `crate::vm`; the VM
//! layer uses none of them.
//!
//! - `templates`: SnapStart templates (boot, init, snapshot);
//! - `pools`: warm pools of paused clones per template, and clones;
//! - `sessions`: sandboxes that hibernate when idle and wake on the next call, on any host of the bucket;
//! - `network`: a VM's or session's egress policy and exposed ports, and routes for the front end;
//! - `images`: the images a host has, OCI imports.
pub mod images;
pub mod network;
pub mod pools;
#[cfg(test)]
mod pools_tests;
pub mod sessions;
pub mod templates;

use tracing::warn;

/// The results of tasks that each start something: all that started; an error only if none did (the first).
pub async fn gather<T, E>(tasks: Vec<tokio::task::JoinHandle<Result<T, E>>>, what: &str) -> Result<Vec<T>, E>
where
    E: std::fmt::Display + From<JoinFailed>,
{
    let mut out = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(E::from(JoinFailed(e.to_string())))),
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

/// As [`gather`], for VM starts: a failed start is answered with its last record (status `failed`, its error),
/// next to the ones that started.
pub async fn gather_with_failures(
    tasks: Vec<tokio::task::JoinHandle<Result<crate::vm::VmRecord, templates::TemplateError>>>,
    what: &str,
) -> Result<Vec<crate::vm::VmRecord>, templates::TemplateError> {
    let mut out = Vec::new();
    let mut failed = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(templates::TemplateError::Start(f))) if f.vm.is_some() => {
                warn!(error = %f, "one of the {what} failed");
                failed.extend(f.vm.clone().map(|b| *b));
                first_err = first_err.or(Some(templates::TemplateError::Start(f)));
            }
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(templates::TemplateError::Invalid(e.to_string()))),
        }
    }
    match first_err {
        Some(e) if out.is_empty() => Err(e),
        _ => {
            out.extend(failed);
            Ok(out)
        }
    }
}

/// A spawned task that ended without a result (it panicked or was cancelled).
#[derive(Debug)]
pub struct JoinFailed(pub String);

impl From<JoinFailed> for sessions::SessionError {
    fn from(e: JoinFailed) -> Self {
        sessions::SessionError::Internal(format!("a task failed: {}", e.0))
    }
}
