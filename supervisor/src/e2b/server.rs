//! The E2B listener: plain HTTP/1.1, or TLS (HTTP/1.1 by ALPN) with a configured certificate; every request
//! routed on its own (the SDK keeps one connection for both planes and for several sandboxes).
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::control;
use super::envd::{self, Target, ENVD_PORT, INTERPRETER_PORT};
use super::E2b;

/// Why the E2B endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bind the E2B endpoint to {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("the E2B endpoint's TLS: {0}")]
    Tls(String),
}

/// The sandbox and port a request is for, if it is a data-plane request: the `E2b-Sandbox-Id` and
/// `E2b-Sandbox-Port` headers, else a `Host` of `<port>-<id>.<domain>` (split at the first `-`).
pub fn data_plane_target(headers: &axum::http::HeaderMap, domain: &str) -> Option<Target> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let (Some(id), Some(port)) = (h("e2b-sandbox-id"), h("e2b-sandbox-port")) {
        return Some(Target { id: id.to_string(), port: port.parse().ok()? });
    }
    let host = h("host")?.to_ascii_lowercase();
    let domain = domain.to_ascii_lowercase();
    // The domain may carry the port (`flint.localhost:8443`); a Host without one matches a domain without one.
    let label = host.strip_suffix(&format!(".{domain}")).or_else(|| {
        let bare = domain.split(':').next().unwrap_or(&domain);
        let host_bare = host.split(':').next().unwrap_or(&host);
        host_bare.strip_suffix(&format!(".{bare}"))
    })?;
    let (port, id) = label.split_once('-')?;
    Some(Target { id: id.to_string(), port: port.parse().ok()? })
}

/// One request, routed.
pub async fn dispatch(e: Arc<E2b>, req: Request<Body>) -> Response {
    route(e, req, false).await
}

/// One request that `flint-router` sends for the fleet's E2B endpoint (`/v1/e2b/fleet/…` on a host's API): the
/// router checked the API key already, and names a data-plane call's sandbox and port in the `E2b-Sandbox-*`
/// headers. The path is the SDK's, after the prefix.
pub async fn dispatch_from_router(e: Arc<E2b>, req: Request<Body>) -> Response {
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let rest = pq.strip_prefix(FLEET_PREFIX).unwrap_or(pq);
    let rest = if rest.starts_with('/') { rest.to_string() } else { format!("/{rest}") };
    match rest.parse() {
        Ok(uri) => parts.uri = uri,
        Err(_) => return control::error(400, format!("bad path `{rest}`")),
    }
    route(e, Request::from_parts(parts, body), true).await
}

/// Where a host's API takes the E2B calls a router forwards.
pub const FLEET_PREFIX: &str = "/v1/e2b/fleet";

async fn route(e: Arc<E2b>, req: Request<Body>, key_checked: bool) -> Response {
    if let Some(t) = data_plane_target(req.headers(), &e.cfg.e2b.domain) {
        let Some(sbx) = e.sandbox(&t.id).await else { return envd::not_found(&t.id) };
        if flint_vmm_api::lock(&sbx.rec).paused {
            return envd::not_found(&t.id);
        }
        return match t.port {
            ENVD_PORT => envd::serve(e, sbx, t, req).await,
            INTERPRETER_PORT => super::interp::serve(e, sbx, t, req).await,
            port => {
                let body = serde_json::json!({
                    "sandboxId": t.id,
                    "message": format!("The sandbox is running but port {port} is not open (flintd's E2B endpoint serves \
                                        envd and the code interpreter; expose other ports with Flint's front end)"),
                    "port": port,
                    "code": 502,
                });
                (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
            }
        };
    }
    if !key_checked && !control::authorised(&e, req.headers()) {
        return control::error(401, "Invalid API key (flint e2b key create makes one)");
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(err) => return control::error(413, format!("request body: {err}")),
    };
    control::serve(e, &parts.method, parts.uri.path(), parts.uri.query().unwrap_or(""), &body).await
}

/// Binds the endpoint's listeners (and loads its certificate) before flintd says it is ready; the returned
/// future serves them.
pub async fn serve(e: Arc<E2b>) -> Result<impl std::future::Future<Output = ()>, ServeError> {
    let c = &e.cfg.e2b;
    let tls = match (c.tls_listen, &c.tls_cert, &c.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some((
            addr,
            tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(cert, key, None).map_err(|e| ServeError::Tls(e.0))?,
            ),
        )),
        (Some(_), _, _) => return Err(ServeError::Tls("[e2b] tls_listen needs tls_cert and tls_key".into())),
        (None, _, _) => None,
    };
    let mut listeners = Vec::new();
    for (addr, acceptor) in c.listen.map(|a| (a, None)).into_iter().chain(tls.map(|(a, t)| (a, Some(t)))) {
        let l = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
        info!(%addr, tls = acceptor.is_some(), domain = %c.domain, "E2B endpoint");
        listeners.push((l, acceptor));
    }
    Ok(async move {
        // A JoinSet: the loops end when this future is dropped (flintd's shutdown cancels it).
        let mut loops = tokio::task::JoinSet::new();
        for (l, t) in listeners {
            loops.spawn(accept_loop(e.clone(), l, t));
        }
        while loops.join_next().await.is_some() {}
    })
}

async fn accept_loop(e: Arc<E2b>, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(err) => {
                warn!(error = %err, "E2B endpoint: accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let (e, tls) = (e.clone(), tls.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let e = e.clone();
                async move { Ok::<_, std::convert::Infallible>(dispatch(e, req.map(Body::new)).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            let served = match tls {
                Some(acceptor) => match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(conn)).await {
                    Ok(Ok(s)) => http.serve_connection(TokioIo::new(s), svc).await,
                    Ok(Err(err)) => return debug!(%peer, error = %err, "E2B endpoint: TLS handshake"),
                    Err(_) => return debug!(%peer, "E2B endpoint: TLS handshake timed out"),
                },
                None => http.serve_connection(TokioIo::new(conn), svc).await,
            };
            if let Err(err) = served {
                debug!(%peer, error = %err, "E2B endpoint connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_headers_then_host() {
        let hm = |pairs: &[(&'static str, &str)]| {
            let mut h = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let t = |id: &str, port| Some(Target { id: id.into(), port });
        let d = "flint.localhost:8443";
        assert_eq!(
            data_plane_target(
                &hm(&[("e2b-sandbox-id", "iabc"), ("e2b-sandbox-port", "49983"), ("host", "127.0.0.1:80")]),
                d
            ),
            t("iabc", 49983)
        );
        assert_eq!(data_plane_target(&hm(&[("host", "49999-iabc.flint.localhost:8443")]), d), t("iabc", 49999));
        assert_eq!(
            data_plane_target(&hm(&[("host", "49983-iabc.flint.localhost")]), "flint.localhost"),
            t("iabc", 49983)
        );
        assert_eq!(data_plane_target(&hm(&[("host", "api.flint.localhost:8443")]), d), None, "the control plane");
        assert_eq!(data_plane_target(&hm(&[("host", "127.0.0.1:8480")]), d), None);
        assert_eq!(data_plane_target(&hm(&[("host", "x-iabc.flint.localhost:8443")]), d), None, "not a port");
    }
}
