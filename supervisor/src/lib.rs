//! flintd, the host supervisor daemon, and the flint CLI. See docs/operations.md and docs/api/flintd.yaml.

//!
//! Layers, bottom up (docs/design.md draws them):
//! - infrastructure: `launcher` (+ `jail`, `cgroup`), `net` (namespaces, nftables, DNS proxy, forwards, front
//!   end), `pager`, `image` + `oci` + `beneath`, `drives`, `db`, `config`, `tasks`, `error`, `owner`;
//! - the VM layer: `vm` (one owner per VM with its cleanup stack, create/restore/snapshot/pause/resume/delete,
//!   events);
//! - services on it: `services::{templates, pools, sessions, network, images}`;
//! - composition: `daemon` (the one `Daemon`);
//! - edges: `api` (the Unix-socket API), `net::front` (exposed ports), `client` (the typed client library the
//!   CLI, tests and benches use).
pub mod api;
pub mod beneath;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod db;
pub mod drives;
pub mod e2b;
pub mod error;
#[doc(hidden)]
pub mod fake;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod image;
pub mod jail;
pub mod launcher;
pub mod metrics;
pub mod net;
pub mod oci;
#[doc(hidden)]
pub mod openapi;
pub mod owner;
pub mod pager;
pub mod router;
pub mod sched;
pub mod services;
pub mod tasks;
pub mod tls;
pub mod vm;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use tracing::{info, warn};

/// Milliseconds since `t`, as the figures flintd records and reports (`ready_ms`, `refresh_agent_ms`, ...).
pub(crate) fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Colour in logs only for a person at a terminal: not under systemd (journald sets JOURNAL_STREAM), not into a
/// file or pipe, not with NO_COLOR.
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

/// Why flintd stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Open(#[from] daemon::OpenError),
    #[error("socket_group `{0}`: no such group")]
    NoGroup(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0} is in use: another flintd is running")]
    InUse(std::path::PathBuf),
    #[error("{0}")]
    E2b(String),
    #[error("cluster listener: {0}")]
    Cluster(String),
}

/// The gid of a group by name.
fn group_id(name: &str) -> Result<libc::gid_t, RunError> {
    let c = std::ffi::CString::new(name).map_err(|_| RunError::NoGroup(name.into()))?;
    // SAFETY: `struct group` is plain data (integers and pointers) for which all-zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes the entry into `grp` and its strings into `buf` (both ours, with their sizes), and
    // sets `out` to `&grp` or null; nothing outlives this call.
    let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(RunError::NoGroup(name.into()));
    }
    Ok(grp.gr_gid)
}

/// Binds the API socket: a stale socket (nothing answers) is removed; a live one is an error.
fn bind(path: &std::path::Path, group: Option<&str>) -> Result<tokio::net::UnixListener, RunError> {
    let io = |what: String| move |source| RunError::Io { what, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(RunError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io(format!("remove stale {}", path.display())))?;
    }
    // The path appears only once the socket listens with its final mode and group (a client never sees it half
    // made, nor with the umask's mode). The group is resolved first: a bad one makes no socket at all.
    let gid = group.map(|g| group_id(g).map(|gid| (g, gid))).transpose()?;
    let with = |what: String| move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    flint_agent::listen::bind_unix(path, |staging| {
        std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o660))
            .map_err(with(format!("chmod {}", staging.display())))?;
        if let Some((g, gid)) = gid {
            std::os::unix::fs::chown(staging, None, Some(gid))
                .map_err(with(format!("chown {} to group {g}", staging.display())))?;
        }
        Ok(())
    })
    .map_err(io(format!("the API socket {}", path.display())))
}

/// Resolves at SIGTERM or SIGINT (never, if the handler cannot be installed).
pub async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Tells systemd (Type=notify) about the daemon's state.
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

/// How long a shutdown waits for operations in flight (requests, restores, hibernations) before it exits anyway.
pub const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs flintd until SIGTERM/SIGINT: then it stops accepting, lets operations in flight finish (up to
/// [`SHUTDOWN_DEADLINE`]) and exits. VMs keep running across a daemon restart (they are re-adopted).
pub async fn run(cfg: config::Config) -> Result<(), RunError> {
    if let Some(g) = &cfg.socket_group {
        group_id(g)?; // before anything starts
    }
    serve(daemon::Daemon::open(cfg)?).await
}

/// Runs flintd as [`run`] does, but on fake VMMs and a fake host network (`flintd --fake-vmm`): the control plane
/// (API, sessions, pools, the store, etcd, routers) without KVM, for multi-host tests on one machine. A fake VM is
/// a table entry in this process, and its "guest agent" is flint-agent in host mode: commands run **on this
/// host** as flintd's user. Never on a host with tenants.
pub async fn run_without_kvm(cfg: config::Config) -> Result<(), RunError> {
    if let Some(g) = &cfg.socket_group {
        group_id(g)?;
    }
    warn!("--fake-vmm: VMs are in-process fakes whose commands run on this host; for tests only");
    let net = net::Networks::with_fake_host(cfg.network.clone(), &cfg.data_dir);
    let launcher = Arc::new(fake::FakeLauncher::default());
    serve(daemon::Daemon::open_parts(cfg, launcher, Arc::new(net))?).await
}

async fn serve(daemon: Arc<daemon::Daemon>) -> Result<(), RunError> {
    let socket = daemon.cfg.socket.clone();
    let group = daemon.cfg.socket_group.clone();
    let listener = bind(&socket, group.as_deref())?;
    if let Some(addr) = daemon.cfg.network.front_end {
        let l = net::front::bind(addr)
            .await
            .map_err(|source| RunError::Io { what: format!("bind the front end to {addr}"), source })?;
        let routes = Arc::new(daemon::FrontRoutes(Arc::downgrade(&daemon)));
        info!(%addr, domain = %daemon.cfg.network.domain, "front end for exposed ports");
        let limits = net::front::Limits::default();
        daemon.tasks.spawn_loop(net::front::serve(l, daemon.cfg.network.domain.clone(), routes, limits));
    }
    // The cluster listener and the routers' front end share one mutual-TLS configuration (read once).
    let c = &daemon.cfg.cluster;
    let cluster_tls = match (&c.tls_cert, &c.tls_key) {
        (Some(cert), Some(key)) if c.listen.is_some() || c.front_listen.is_some() => {
            Some(tls::server_config(cert, key, c.client_ca.as_deref()).map_err(|e| RunError::Cluster(e.to_string()))?)
        }
        _ => None,
    };
    if let Some(addr) = daemon.cfg.cluster.front_listen {
        let Some(tls) = cluster_tls.clone() else { unreachable!("checked with the config") };
        let l = net::front::bind(addr)
            .await
            .map_err(|source| RunError::Io { what: format!("bind the routers' front end to {addr}"), source })?;
        let routes = Arc::new(daemon::FrontRoutes(Arc::downgrade(&daemon)));
        info!(%addr, domain = %daemon.cfg.network.domain, "front end for exposed ports, for routers (mutual TLS)");
        let (domain, limits) = (daemon.cfg.network.domain.clone(), net::front::Limits::default());
        let role = net::front::Role::BehindRouter;
        let acceptor = Some(tokio_rustls::TlsAcceptor::from(tls));
        daemon.tasks.spawn_loop(net::front::serve_as(l, domain, routes, limits, role, acceptor));
    }
    if daemon.cfg.e2b.listen.is_some() || daemon.cfg.e2b.tls_listen.is_some() {
        let serving = e2b::serve(daemon.e2b.clone()).await.map_err(|e| RunError::E2b(e.to_string()))?;
        daemon.tasks.spawn_loop(serving);
    }
    if let Some(addr) = daemon.cfg.cluster.listen {
        let Some(tls) = cluster_tls else { unreachable!("checked with the config") };
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Io { what: format!("bind the cluster listener to {addr}"), source })?;
        let l = tls::TlsListener::new(l, tls)
            .map_err(|source| RunError::Io { what: "the cluster listener".into(), source })?;
        info!(%addr, "cluster listener (mutual TLS)");
        let app = api::router(daemon.clone());
        daemon.tasks.spawn_loop(async move {
            if let Err(e) = axum::serve(l, app).await {
                warn!(error = %e, "the cluster listener stopped");
            }
        });
    }
    info!(socket = %socket.display(), vms = daemon.vms.len(), s3 = daemon.store.has_remote(), "flintd ready");
    sd_notify("READY=1");
    let app = api::router(daemon.clone());
    let shutdown = async {
        terminated().await;
        info!("flintd stopping: no new requests; operations in flight finish (VMs keep running and are re-adopted)");
        sd_notify("STOPPING=1");
    };
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    let _ = std::fs::remove_file(&socket);
    if !daemon.shutdown(SHUTDOWN_DEADLINE).await {
        warn!(left = daemon.tasks.len(), "operations still running at the shutdown deadline; exiting anyway");
    }
    served.map_err(|source| RunError::Io { what: "the API server".into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_api_socket_appears_only_when_ready() {
        let dir = std::env::temp_dir().join(format!("flint-bind-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("run/api.sock");
        let staging = dir.join("run/api.sock~");

        // A group that does not exist: nothing is left behind, under either name.
        let e = bind(&path, Some("flint-no-such-group")).unwrap_err();
        assert!(matches!(e, RunError::NoGroup(_)), "{e}");
        assert!(!path.exists() && !staging.exists());

        // A stale staging socket (a crash mid-bind) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&staging).unwrap());
        let l = bind(&path, None).unwrap();
        assert!(!staging.exists());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
        std::os::unix::net::UnixStream::connect(&path).expect("listening as soon as it is there");

        // A live socket is another flintd's; a dead one is stale and replaced.
        assert!(matches!(bind(&path, None), Err(RunError::InUse(_))));
        drop(l);
        let _l = bind(&path, None).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
