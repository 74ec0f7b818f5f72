//! The fleet's front end for exposed ports (`flint-router --front-listen`, docs/cluster.md): the same HTTP/1.1
//! front end a host serves ([`crate::net::front`], [`Role::Router`]), routing each request by its session to the
//! host that holds it — or that is placed to wake it — and sending it, as it came plus the client's address, to
//! that host's `cluster.front_listen` over mutual TLS. The host authorises (the port's token), wakes, strips
//! Flint's routing and token, and answers; its answer passes back unchanged.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::Router;
use crate::error::{Kind, Refusal};
use crate::launcher::BoxFut;
use crate::net::front::{Io, Resolve, Role, Target};

/// The router as the front end's resolver: session id → its host's front end.
pub struct FrontRelay(pub Arc<Router>);

impl FrontRelay {
    /// The role its front end serves in.
    pub const ROLE: Role = Role::Router;

    /// The session `id` names: itself, or a held session whose id differs only in case (a DNS name reaches the
    /// router lower-cased).
    fn session_named(&self, id: &str) -> String {
        let v = self.0.view.read().unwrap_or_else(|p| p.into_inner());
        if v.owners.contains_key(id) {
            return id.to_string();
        }
        v.owners.keys().find(|k| k.eq_ignore_ascii_case(id)).cloned().unwrap_or_else(|| id.to_string())
    }
}

impl Resolve for FrontRelay {
    fn resolve(&self, id: String, _port: u16, _token: Option<String>) -> BoxFut<'_, Result<Target, Refusal>> {
        Box::pin(async move {
            let id = self.session_named(&id);
            let host = self.0.host_for(&id).await.map_err(|r| {
                let kind =
                    if r.status() == axum::http::StatusCode::NOT_FOUND { Kind::NotFound } else { Kind::Unavailable };
                Refusal::new(kind, format!("session `{id}`: no host holds it or can wake it ({})", r.status()))
            })?;
            let front = {
                let v = self.0.view.read().unwrap_or_else(|p| p.into_inner());
                v.hosts.get(&host).and_then(|h| h.front.clone())
            };
            let front = front.ok_or_else(|| {
                Refusal::new(Kind::Unavailable, format!("host `{host}` serves no front end to routers (front_listen)"))
            })?;
            let addr = tokio::net::lookup_host(&front).await.ok().and_then(|mut a| a.next()).ok_or_else(|| {
                Refusal::new(Kind::Unavailable, format!("host `{host}`: its front end `{front}` does not resolve"))
            })?;
            let name = front.rsplit_once(':').map_or(front.as_str(), |(h, _)| h);
            let name = name.trim_start_matches('[').trim_end_matches(']').to_string();
            self.0.metrics.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Target { addr, guard: Box::new(()), name: Some(name) })
        })
    }

    fn connect(&self, addr: SocketAddr, name: Option<String>) -> BoxFut<'_, Result<Box<dyn Io>, Refusal>> {
        Box::pin(async move {
            let failed = |what: String| {
                self.0.metrics.host_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Refusal::new(Kind::Unavailable, format!("the front end at {addr}: {what}"))
            };
            let name = name.unwrap_or_else(|| addr.ip().to_string());
            let server = rustls::pki_types::ServerName::try_from(name).map_err(|e| failed(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.0.host_tls.clone());
            let connected = tokio::time::timeout(Duration::from_secs(5), async {
                let tcp = TcpStream::connect(addr).await.map_err(|e| failed(e.to_string()))?;
                let _ = tcp.set_nodelay(true);
                tls.connect(server, tcp).await.map_err(|e| failed(format!("TLS: {e}")))
            })
            .await
            .map_err(|_| failed("no connection within 5 s".into()))??;
            Ok(Box::new(connected) as Box<dyn Io>)
        })
    }
}
