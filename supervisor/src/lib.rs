//! flintd, the host supervisor daemon, and the flint CLI. See docs/operations.md and docs/api/flintd.yaml.

pub mod api;
pub mod beneath;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod db;
pub mod drives;
#[cfg(test)]
mod fake;
pub mod flows;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod image;
pub mod jail;
pub mod launcher;
pub mod metrics;
pub mod net;
pub mod oci;
pub mod pager;
pub mod pool;
pub mod session;
pub mod vm;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use tracing::{info, warn};

/// Colour in logs only for a person at a terminal: not under systemd (journald sets JOURNAL_STREAM), not into a
/// file or pipe, not with NO_COLOR.
/// Milliseconds since `t`, as the figures flintd records and reports (`ready_ms`, `refresh_agent_ms`, ...).
pub(crate) fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

pub fn log_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
        && std::env::var_os("JOURNAL_STREAM").is_none()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Files flintd and its VMMs create (guest memory, snapshots, chunks, drive copies, logs, sockets) are its
/// user's only: umask 077, inherited by every VMM.
pub fn private_umask() {
    // SAFETY: umask(2) only sets the process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
}

/// The gid of a group by name.
fn group_id(name: &str) -> Result<libc::gid_t, String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("socket_group `{name}`: not a group name"))?;
    // SAFETY: `struct group` is plain data (integers and pointers) for which all-zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes the entry into `grp` and its strings into `buf` (both ours, with their sizes), and
    // sets `out` to `&grp` or null; nothing outlives this call.
    let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!("socket_group `{name}`: no such group"));
    }
    Ok(grp.gr_gid)
}

/// Binds the API socket: a stale socket (nothing answers) is removed; a live one is an error.
fn bind(path: &std::path::Path, group: Option<&str>) -> Result<tokio::net::UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("{} is in use: another flintd is running", path.display()));
        }
        std::fs::remove_file(path).map_err(|e| format!("remove stale {}: {e}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    if let Some(g) = group {
        let gid = group_id(g)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("chown {} to group {g}: {e}", path.display()))?;
    }
    Ok(l)
}

/// Tells systemd (Type=notify) that the API is up.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return warn!(error = %e, "sd_notify"),
    };
    let path = path.to_string_lossy().into_owned();
    let r = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = r {
        warn!(error = %e, "sd_notify");
    }
}

/// Runs flintd until SIGTERM/SIGINT. VMs keep running across a daemon restart (they are re-adopted).
pub async fn run(cfg: config::Config) -> Result<(), String> {
    let socket = cfg.socket.clone();
    let group = cfg.socket_group.clone();
    if let Some(g) = &group {
        group_id(g)?; // before anything starts
    }
    let daemon = daemon::Daemon::open(cfg)?;
    let listener = bind(&socket, group.as_deref())?;
    let front = match daemon.cfg.network.front_end {
        Some(addr) => {
            let l = net::front::bind(addr).await?;
            let routes = Arc::new(net::ops::DaemonRoutes(Arc::downgrade(&daemon)));
            info!(%addr, domain = %daemon.cfg.network.domain, "front end for exposed ports");
            Some(tokio::spawn(net::front::serve(l, daemon.cfg.network.domain.clone(), routes)))
        }
        None => None,
    };
    info!(socket = %socket.display(), vms = daemon.list().len(), s3 = daemon.store.has_remote(), "flintd ready");
    sd_notify("READY=1");
    let app = api::router(daemon.clone());
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        info!("flintd stopping (VMs keep running and are re-adopted at the next start)");
        sd_notify("STOPPING=1");
    };
    let r = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    if let Some(f) = front {
        f.abort();
    }
    let _ = std::fs::remove_file(&socket);
    drop(Arc::clone(&daemon));
    r.map_err(|e| format!("API server: {e}"))
}
