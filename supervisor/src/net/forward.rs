//! Plain TCP forwarding of exposed ports (`tcp_listen`): a listener on the front end's address whose connections
//! are piped to a guest port. A forward is a resource with one owner (a VM, or a session whose forward outlives
//! its VMs): it exists while its [`Forward`] handle lives, and the port is free again when that is dropped.
//! Where a connection goes is asked of the owner's [`Upstream`] per connection (a session wakes first).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flint_vmm_api::lock;
use tokio::io::AsyncWriteExt;

use super::NetworkRequest;
use crate::error::{Classify, Kind, Refusal};
use crate::launcher::BoxFut;

/// Connections one forward carries at once (each holds two sockets of flintd's).
pub const MAX_CONNECTIONS_PER_FORWARD: usize = 256;
/// A forwarded connection with no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a connection to an exposed port goes (the guest's address and port), and what to hold while it lasts
/// (a session's activity).
pub type Destination = (SocketAddr, Box<dyn Send>);

/// Where a forwarded connection goes, asked per connection.
pub trait Upstream: Send + Sync + 'static {
    fn connect(&self, port: u16) -> BoxFut<'_, Result<Destination, Refusal>>;
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("plain TCP forwarding is off on this host (network.front_end and network.tcp_ports)")]
    Off,
    #[error("port {port}: tcp_listen {listen} is outside network.tcp_ports {lo}-{hi}")]
    OutOfRange { port: u16, listen: u16, lo: u16, hi: u16 },
    #[error("front-end port {listen} already forwards to `{holder}`")]
    Taken { listen: u16, holder: String },
    #[error("cannot listen on {addr} for plain TCP forwarding: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

impl Classify for ForwardError {
    fn kind(&self) -> Kind {
        match self {
            ForwardError::Off | ForwardError::OutOfRange { .. } => Kind::Invalid,
            ForwardError::Taken { .. } => Kind::Conflict,
            ForwardError::Bind { .. } => Kind::Unavailable,
        }
    }
}

/// This host's plain TCP forwards: which front-end port belongs to whom.
pub struct Forwards {
    front_end: Option<SocketAddr>,
    range: Option<[u16; 2]>,
    claims: Mutex<HashMap<u16, String>>,
    pub counters: Arc<super::Counters>,
}

/// A running forward; dropping it stops the listener (connections already piped finish) and frees the port.
pub struct Forward {
    listen: u16,
    task: tokio::task::JoinHandle<()>,
    forwards: Arc<Forwards>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
        lock(&self.forwards.claims).remove(&self.listen);
    }
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Forward({})", self.listen)
    }
}

impl Forwards {
    pub fn new(front_end: Option<SocketAddr>, range: Option<[u16; 2]>, counters: Arc<super::Counters>) -> Forwards {
        Forwards { front_end, range, claims: Mutex::new(HashMap::new()), counters }
    }

    /// Whether `id`'s request may have its plain TCP ports: within `network.tcp_ports`, and not another's.
    pub fn check(&self, id: &str, req: &NetworkRequest) -> Result<(), ForwardError> {
        let claims = lock(&self.claims);
        for (p, e) in &req.ports {
            let Some(listen) = e.tcp_listen else { continue };
            let (Some(_), Some([lo, hi])) = (self.front_end, self.range) else { return Err(ForwardError::Off) };
            if !(lo..=hi).contains(&listen) {
                return Err(ForwardError::OutOfRange { port: *p, listen, lo, hi });
            }
            if let Some(holder) = claims.get(&listen).filter(|h| *h != id) {
                return Err(ForwardError::Taken { listen, holder: holder.clone() });
            }
        }
        Ok(())
    }

    /// Starts the forwards `req` asks for, owned by `id` (its existing ones in `have` are kept if still asked for;
    /// the others are dropped). Returns the new set.
    pub fn reconcile(
        self: &Arc<Self>,
        id: &str,
        req: Option<&NetworkRequest>,
        mut have: Vec<(u16, u16, Forward)>,
        upstream: &Arc<dyn Upstream>,
    ) -> Result<Vec<(u16, u16, Forward)>, ForwardError> {
        let want: Vec<(u16, u16)> = req
            .map(|r| r.ports.iter().filter_map(|(p, e)| e.tcp_listen.map(|l| (l, *p))).collect())
            .unwrap_or_default();
        have.retain(|(l, p, _)| want.contains(&(*l, *p)));
        for (listen, port) in want {
            if have.iter().any(|(l, _, _)| *l == listen) {
                continue;
            }
            have.push((listen, port, self.start(id, listen, port, upstream.clone())?));
        }
        Ok(have)
    }

    /// Listens on front-end port `listen` for `id`, piping each connection to guest port `port`.
    pub fn start(
        self: &Arc<Self>,
        id: &str,
        listen: u16,
        port: u16,
        upstream: Arc<dyn Upstream>,
    ) -> Result<Forward, ForwardError> {
        let fe = self.front_end.ok_or(ForwardError::Off)?;
        {
            let mut claims = lock(&self.claims);
            if let Some(holder) = claims.get(&listen).filter(|h| *h != id) {
                return Err(ForwardError::Taken { listen, holder: holder.clone() });
            }
            claims.insert(listen, id.to_string());
        }
        let addr = SocketAddr::new(fe.ip(), listen);
        let bound = std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        });
        let listener = match bound {
            Ok(l) => l,
            Err(source) => {
                lock(&self.claims).remove(&listen);
                return Err(ForwardError::Bind { addr, source });
            }
        };
        let task = tokio::spawn(serve(listener, port, upstream, self.counters.clone()));
        Ok(Forward { listen, task, forwards: self.clone() })
    }
}

/// Accepts on `listener` and pipes each connection to guest port `port` (at most
/// [`MAX_CONNECTIONS_PER_FORWARD`] at once; idle ones closed after [`IDLE_TIMEOUT`]).
async fn serve(listener: tokio::net::TcpListener, port: u16, up: Arc<dyn Upstream>, counters: Arc<super::Counters>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS_PER_FORWARD));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.front_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue; // dropped: closed at once
        };
        let (up, counters) = (up.clone(), counters.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (addr, guard) = match up.connect(port).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(port, error = %e, "plain TCP forward refused");
                    counters.front_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = client.shutdown().await;
                    return;
                }
            };
            counters.front_routed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _guard = guard;
            let connect = super::connect_marked(addr);
            if let Ok(Ok(guest)) = tokio::time::timeout(Duration::from_secs(5), connect).await {
                let _ = client.set_nodelay(true);
                let _ = guest.set_nodelay(true);
                super::pipe::splice(client, guest, IDLE_TIMEOUT).await;
            }
        });
    }
}
