//! Networking as callers see it, for a VM or a session alike: its view (address, policy, exposed ports), its
//! egress policy and exposed ports changed at run time, and what the front end needs to authorise and route a
//! request to an exposed port.
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Classify, Kind};
use crate::net::{EgressPolicy, ExposedPort, NetworkRequest, PolicyError};
use crate::services::sessions::{SessionError, Sessions};
use crate::vm::{self, VmError};

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
    /// The token in clear: only in the answer of the call that set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// The front-end address forwarding plain TCP to it, if any.
    pub tcp: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetOpError {
    #[error("no VM or session `{0}`")]
    NotFound(String),
    #[error("{what} `{id}` has no network (create it with a `network` request)")]
    NoNetwork { what: &'static str, id: String },
    #[error("port {0} is not exposed")]
    NotExposed(u16),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Session(Box<SessionError>),
}

impl From<SessionError> for NetOpError {
    fn from(e: SessionError) -> Self {
        NetOpError::Session(Box::new(e))
    }
}

impl Classify for NetOpError {
    fn kind(&self) -> Kind {
        match self {
            NetOpError::NotFound(_) | NetOpError::NotExposed(_) => Kind::NotFound,
            NetOpError::NoNetwork { .. } => Kind::Conflict,
            NetOpError::Policy(e) => e.kind(),
            NetOpError::Vm(e) => e.kind(),
            NetOpError::Session(e) => e.kind(),
        }
    }
}

pub struct NetworkService {
    cfg: Arc<Config>,
    vms: Arc<vm::Manager>,
    sessions: Arc<Sessions>,
}

/// Exposes or hides a port in a request.
pub fn set_port(n: &mut NetworkRequest, port: u16, exposed: Option<ExposedPort>) -> Result<(), PolicyError> {
    match exposed {
        Some(e) => {
            crate::net::policy::check_port(port, &e)?;
            n.ports.insert(port, e);
        }
        None => {
            n.ports.remove(&port).ok_or_else(|| PolicyError(format!("port {port} is not exposed")))?;
        }
    }
    Ok(())
}

impl NetworkService {
    pub fn new(cfg: Arc<Config>, vms: Arc<vm::Manager>, sessions: Arc<Sessions>) -> NetworkService {
        NetworkService { cfg, vms, sessions }
    }

    fn view_of(&self, id: &str, vm: Option<&vm::VmRecord>, req: &NetworkRequest) -> NetworkView {
        let n = vm.and_then(|v| v.network.as_ref());
        let info = n.and_then(|n| self.vms.net.info(n));
        let fe = self.cfg.network.front_end;
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
                    url: fe.map(|fe| format!("http://{p}-{id}.{}:{}", self.cfg.network.domain, fe.port())),
                    token: e.token.is_some(),
                    access_token: None,
                    tcp: e.tcp_listen.zip(fe).map(|(l, fe)| SocketAddr::new(fe.ip(), l).to_string()),
                })
                .collect(),
        }
    }

    /// The network of a VM or session.
    pub fn view(&self, id: &str) -> Result<NetworkView, NetOpError> {
        if let Ok(v) = self.vms.get(id) {
            let n = v.network.as_ref().ok_or_else(|| NetOpError::NoNetwork { what: "VM", id: id.into() })?;
            return Ok(self.view_of(id, Some(&v), &n.request));
        }
        let s = self.sessions.session(id).ok_or_else(|| NetOpError::NotFound(id.into()))?.rec.get();
        let req = s.network.as_ref().ok_or_else(|| NetOpError::NoNetwork { what: "session", id: id.into() })?;
        let vm = s.vm.as_deref().and_then(|v| self.vms.get(v).ok());
        Ok(self.view_of(id, vm.as_ref(), req))
    }

    /// Changes a VM's or session's network request with `f` (checked whole first: a bad change changes nothing)
    /// and applies it to the VM running now.
    pub async fn change(
        &self,
        id: &str,
        f: impl FnOnce(&mut NetworkRequest) -> Result<(), PolicyError>,
    ) -> Result<NetworkView, NetOpError> {
        if let Ok(v) = self.vms.get(id) {
            let mut next = v.network.ok_or_else(|| NetOpError::NoNetwork { what: "VM", id: id.into() })?.request;
            f(&mut next)?;
            self.vms.set_network(id, next).await?;
        } else if self.sessions.session(id).is_some() {
            self.sessions.change_network(id, f).await?;
        } else {
            return Err(NetOpError::NotFound(id.into()));
        }
        self.view(id)
    }

    pub async fn set_egress(&self, id: &str, policy: EgressPolicy) -> Result<NetworkView, NetOpError> {
        self.change(id, move |n| {
            n.egress = policy;
            Ok(())
        })
        .await
    }

    /// Exposes (or hides) a port; a token asked for with `auto` is made here and shown in this answer alone.
    pub async fn set_port(&self, id: &str, port: u16, mut e: Option<ExposedPort>) -> Result<NetworkView, NetOpError> {
        let shown = e.as_mut().and_then(|e| e.token.as_mut()).map(|t| {
            if t == crate::net::policy::GENERATE_TOKEN {
                *t = crate::net::policy::new_token();
            }
            t.clone()
        });
        let mut view = self.change(id, move |n| set_port(n, port, e)).await?;
        for p in view.ports.iter_mut().filter(|p| p.port == port) {
            p.access_token = shown.clone();
        }
        Ok(view)
    }

    /// An exposed port of a VM or session known to this host, as the front end must check it before anything
    /// wakes: `None` if `id` is neither; an error if it is but the port is not exposed.
    pub fn exposed(&self, id: &str, port: u16) -> Result<Option<ExposedPort>, NetOpError> {
        let req = if let Ok(v) = self.vms.get(id) {
            v.network.map(|n| n.request).ok_or_else(|| NetOpError::NoNetwork { what: "VM", id: id.into() })?
        } else if let Some(s) = self.sessions.session(id) {
            s.rec.get().network.ok_or_else(|| NetOpError::NoNetwork { what: "session", id: id.into() })?
        } else {
            return Ok(None);
        };
        req.ports.get(&port).cloned().map(Some).ok_or(NetOpError::NotExposed(port))
    }
}
