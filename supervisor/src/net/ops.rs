//! Network operations on a running VM or a session: the egress policy and exposed ports, changed at run time;
//! what the front end asks to route a request.
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{EgressPolicy, ExposedPort, NetworkRequest};
use crate::daemon::Daemon;
use crate::vm::model::{OpError, VmStatus};

/// What `GET /v1/vms/{id}/network` shows (tokens are never shown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkView {
    /// The VM or session the call named.
    pub id: String,
    /// The VM running now (a hibernated session has none).
    pub vm: Option<String>,
    pub address: Option<Ipv4Addr>,
    pub mac: Option<String>,
    pub egress: EgressPolicy,
    pub ports: Vec<PortView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortView {
    pub port: u16,
    /// The Host-routed URL, when the front end is on.
    pub url: Option<String>,
    pub token: bool,
    /// The front-end address forwarding plain TCP to it, if any.
    pub tcp: Option<String>,
}

impl Daemon {
    fn view(&self, id: &str, vm: Option<&crate::vm::model::VmRecord>, req: &NetworkRequest) -> NetworkView {
        let n = vm.and_then(|v| v.network.as_ref());
        let info = n.and_then(|n| self.net.info(n));
        NetworkView {
            id: id.to_string(),
            vm: vm.map(|v| v.id.clone()),
            address: info.as_ref().map(|i| i.address),
            mac: info.map(|i| i.mac),
            egress: req.egress.clone(),
            ports: req
                .ports
                .iter()
                .map(|(p, e)| PortView {
                    port: *p,
                    url: self
                        .cfg
                        .network
                        .front_end
                        .map(|fe| format!("http://{p}-{id}.{}:{}", self.cfg.network.domain, fe.port())),
                    token: e.token.is_some(),
                    tcp: e
                        .tcp_listen
                        .zip(self.cfg.network.front_end)
                        .map(|(l, fe)| SocketAddr::new(fe.ip(), l).to_string()),
                })
                .collect(),
        }
    }

    /// The network of a VM or session.
    pub fn network(&self, id: &str) -> Result<NetworkView, OpError> {
        if let Ok(vm) = self.get(id) {
            let n = vm.network.as_ref().ok_or_else(|| no_network("VM", id))?;
            return Ok(self.view(id, Some(&vm), &n.request));
        }
        let s = self.sessions.slot(id).ok_or_else(|| OpError::NotFound(format!("no VM or session `{id}`")))?.get();
        let req = s.network.as_ref().ok_or_else(|| no_network("session", id))?;
        let vm = s.vm.as_deref().and_then(|v| self.get(v).ok());
        Ok(self.view(id, vm.as_ref(), req))
    }

    /// Changes a VM's or session's network request with `f` (checked whole first: a bad change changes nothing)
    /// and applies it to the VM running now.
    pub async fn change_network(
        self: &Arc<Self>,
        id: &str,
        f: impl FnOnce(&mut NetworkRequest) -> Result<(), OpError>,
    ) -> Result<NetworkView, OpError> {
        let (vm_id, session) = match self.get(id) {
            Ok(_) => (Some(id.to_string()), None),
            Err(_) => {
                let s = self.sessions.slot(id).ok_or_else(|| OpError::NotFound(format!("no VM or session `{id}`")))?;
                (None, Some(s))
            }
        };
        // A session's change waits for its hibernation or wake to end (its VM then is what the record says).
        let _session_op = match &session {
            Some(s) => Some(s.op.lock().await),
            None => None,
        };
        let current = match (&vm_id, &session) {
            (Some(v), _) => self.get(v)?.network.ok_or_else(|| no_network("VM", id))?.request,
            (None, Some(s)) => s.get().network.ok_or_else(|| no_network("session", id))?,
            _ => unreachable!("one of them"),
        };
        let mut next = current.clone();
        f(&mut next)?;
        let rules = next.check(self.cfg.network.max_rules).map_err(|e| OpError::BadRequest(format!("network: {e}")))?;
        self.check_tcp(Some(id), Some(&next))?;
        if let Some(s) = &session {
            s.commit(&self.db, |r| r.network = Some(next.clone()))?;
        }
        let running: Option<String> = vm_id.or_else(|| session.as_ref().and_then(|s| s.get().vm));
        if let Some(vm) = running {
            let slot = self.slot(&vm)?;
            let _op = slot.op.lock().await;
            let rec = slot.get();
            if let Some(mut n) = rec.network.clone() {
                if matches!(rec.status, VmStatus::Running | VmStatus::Paused | VmStatus::Starting) {
                    let (net, vm2, n2) = (self.net.clone(), vm.clone(), n.clone());
                    tokio::task::spawn_blocking(move || net.set_policy(&vm2, &n2, rules))
                        .await
                        .map_err(|e| OpError::Internal(e.to_string()))?
                        .map_err(|e| OpError::Internal(format!("apply the egress policy: {e}")))?;
                }
                n.request = next.clone();
                self.commit_vm(&vm, |r| r.network = Some(n))?;
            }
        }
        self.sync_tcp();
        self.network(id)
    }

    /// The guest behind (VM or session `id`, `port`) for the front end: a hibernated session is woken.
    pub async fn route_port(self: &Arc<Self>, id: &str, port: u16) -> Result<super::front::Target, OpError> {
        let (vm, activity) = self.awake_vm(id).await?;
        let rec = self.get(&vm)?;
        let n = rec.network.as_ref().ok_or_else(|| no_network("VM", id))?;
        let exposed = n.request.ports.get(&port).ok_or_else(|| {
            OpError::NotFound(format!("port {port} of `{id}` is not exposed (PUT /v1/vms/{id}/ports/{port})"))
        })?;
        if rec.status != VmStatus::Running {
            return Err(OpError::Unavailable(format!("VM `{vm}` is {}", rec.status.name())));
        }
        let b = self.net.block(n.index).map_err(OpError::Internal)?;
        Ok(super::front::Target {
            addr: SocketAddr::from((b.guest(), port)),
            token: exposed.token.clone(),
            guard: Box::new(activity),
        })
    }
}

fn no_network(what: &str, id: &str) -> OpError {
    OpError::Conflict(format!("{what} `{id}` has no network (create it with a `network` request)"))
}

/// The front end's view of the daemon.
pub struct DaemonRoutes(pub std::sync::Weak<Daemon>);

impl super::front::Resolve for DaemonRoutes {
    fn resolve(
        &self,
        id: String,
        port: u16,
    ) -> crate::launcher::BoxFut<'_, Result<super::front::Target, super::front::Refusal>> {
        Box::pin(async move {
            let d = self.0.upgrade().ok_or((503, "flintd is stopping".to_string()))?;
            let routed = d.route_port(&id, port).await;
            let c = &d.net.counters;
            let counter = if routed.is_ok() { &c.front_routed } else { &c.front_refused };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            routed.map_err(|e| {
                let status = match &e {
                    OpError::BadRequest(_) => 400,
                    OpError::NotFound(_) => 404,
                    OpError::Conflict(_) => 409,
                    _ => 503,
                };
                (status, e.to_string())
            })
        })
    }
}

/// Exposes or hides a port of `id`.
pub fn set_port(n: &mut NetworkRequest, port: u16, exposed: Option<ExposedPort>) -> Result<(), OpError> {
    match exposed {
        Some(e) => {
            super::policy::check_port(port, &e).map_err(OpError::BadRequest)?;
            n.ports.insert(port, e);
        }
        None => {
            n.ports.remove(&port).ok_or_else(|| OpError::NotFound(format!("port {port} is not exposed")))?;
        }
    }
    Ok(())
}

impl Daemon {
    /// The plain TCP forwards the records ask for: front-end port → (id, guest port). Running VMs that are not a
    /// session's (a session's forward is the session's, asleep or awake), and every session with a network.
    fn tcp_wanted(&self) -> std::collections::BTreeMap<u16, (String, u16)> {
        let mut want = std::collections::BTreeMap::new();
        let mut add = |id: &str, req: &NetworkRequest| {
            for (p, e) in &req.ports {
                if let Some(l) = e.tcp_listen {
                    want.entry(l).or_insert_with(|| (id.to_string(), *p));
                }
            }
        };
        let vms: Vec<_> = flint_vmm_api::lock(&self.vms).values().map(|s| s.get()).collect();
        for v in vms {
            if let (Some(n), None, VmStatus::Running | VmStatus::Paused | VmStatus::Starting) =
                (&v.network, &v.session, v.status)
            {
                add(&v.id, &n.request);
            }
        }
        let sessions: Vec<_> = flint_vmm_api::lock(&self.sessions.map).values().map(|s| s.get()).collect();
        for s in sessions {
            if let Some(n) = &s.network {
                add(&s.id, n);
            }
        }
        want
    }

    /// A request's plain TCP ports: within `network.tcp_ports`, and not another VM's or session's.
    pub(crate) fn check_tcp(&self, id: Option<&str>, req: Option<&NetworkRequest>) -> Result<(), OpError> {
        let Some(req) = req else { return Ok(()) };
        let wanted = self.tcp_wanted();
        for (p, e) in &req.ports {
            let Some(l) = e.tcp_listen else { continue };
            match (self.cfg.network.front_end, self.cfg.network.tcp_ports) {
                (Some(_), Some([lo, hi])) if (lo..=hi).contains(&l) => {}
                (Some(_), Some([lo, hi])) => {
                    return Err(OpError::BadRequest(format!(
                        "port {p}: tcp_listen {l} is outside network.tcp_ports {lo}-{hi}"
                    )))
                }
                _ => {
                    return Err(OpError::BadRequest(
                        "plain TCP forwarding is off on this host (network.front_end and network.tcp_ports)".into(),
                    ))
                }
            }
            if let Some((other, _)) = wanted.get(&l).filter(|(o, _)| Some(o.as_str()) != id) {
                return Err(OpError::Conflict(format!("front-end port {l} already forwards to `{other}`")));
            }
        }
        Ok(())
    }

    /// Starts and stops plain TCP forwarders to match the records (after anything that changes them).
    pub(crate) fn sync_tcp(self: &Arc<Self>) {
        let Some(fe) = self.cfg.network.front_end else { return };
        let want = self.tcp_wanted();
        let mut have = flint_vmm_api::lock(&self.net.tcp);
        have.retain(|l, f| {
            let keep = want.get(l).is_some_and(|(id, p)| *id == f.id && *p == f.port);
            if !keep {
                f.task.abort();
            }
            keep
        });
        for (l, (id, port)) in want {
            if have.contains_key(&l) {
                continue;
            }
            let addr = SocketAddr::new(fe.ip(), l);
            let listener = match std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, id = %id, port, error = %e, "cannot listen for plain TCP forwarding");
                    continue;
                }
            };
            let task = tokio::spawn(forward_tcp(listener, Arc::downgrade(self), id.clone(), port));
            have.insert(l, crate::net::TcpForward { id, port, task });
        }
    }
}

/// Accepts on `listener` and pipes each connection to guest port `port` of `id` (a session is woken first).
async fn forward_tcp(listener: tokio::net::TcpListener, d: std::sync::Weak<Daemon>, id: String, port: u16) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (d, id) = (d.clone(), id.clone());
        tokio::spawn(async move {
            let Some(d) = d.upgrade() else { return };
            let target = match d.route_port(&id, port).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(id = %id, port, error = %e, "plain TCP forward refused");
                    d.net.counters.front_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            };
            d.net.counters.front_routed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(d);
            let _guard = target.guard;
            let connect = tokio::net::TcpStream::connect(target.addr);
            if let Ok(Ok(mut guest)) = tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
                let _ = client.set_nodelay(true);
                let _ = guest.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
            }
        });
    }
}
