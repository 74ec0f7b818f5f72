//! `flint-router`: the fleet's API at one address (docs/cluster.md). Unprivileged and stateless: run several.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(name = "flint-router", version, about = "Flint fleet router: places sessions on hosts and routes calls")]
struct Args {
    /// etcd client URLs (repeatable).
    #[arg(long, required = true)]
    etcd: Vec<String>,
    /// The cluster's etcd key prefix (flintd's cluster.prefix).
    #[arg(long, default_value = "/flint/")]
    prefix: String,
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// Where callers reach the router.
    #[arg(long, default_value = "127.0.0.1:7480")]
    listen: std::net::SocketAddr,
    /// The router's server certificate and key (callers see these).
    #[arg(long)]
    tls_cert: PathBuf,
    #[arg(long)]
    tls_key: PathBuf,
    /// The CA whose client certificates callers must present (mutual TLS).
    #[arg(long)]
    client_ca: PathBuf,
    /// The CA that signed hosts' cluster listener certificates.
    #[arg(long)]
    host_ca: PathBuf,
    /// The certificate and key the router presents to hosts.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Hosts with less free memory get no new sessions.
    #[arg(long, default_value_t = 512)]
    min_free_mib: u64,
    /// The fleet's front end for exposed ports (plain HTTP, as a host's `network.front_end`): each request goes to
    /// the front end of the host holding its session (the hosts' `cluster.front_listen`, mutual TLS).
    #[arg(long)]
    front_listen: Option<std::net::SocketAddr>,
    /// The domain of the front end's Host routing (`<port>-<id>.<domain>`): the hosts' `network.domain`.
    #[arg(long, default_value = "flint.localhost")]
    front_domain: String,
    /// The fleet's E2B endpoint (docs/e2b.md): where the unchanged E2B SDKs reach every host at once. Plain HTTP
    /// (`E2B_API_URL`/`E2B_SANDBOX_URL`) unless `--e2b-tls-cert` is given (`E2B_DOMAIN`).
    #[arg(long, requires = "e2b_keys")]
    e2b_listen: Option<std::net::SocketAddr>,
    /// The domain of the E2B endpoint's Host routing (`<port>-<id>.<domain>`).
    #[arg(long, default_value = "flint.localhost")]
    e2b_domain: String,
    /// The API keys the E2B endpoint accepts: keys or `sha256:<hex>` digests, one per line (re-read on change).
    #[arg(long)]
    e2b_keys: Option<PathBuf>,
    /// A certificate (a wildcard for `*.<domain>`) and key: the E2B endpoint serves TLS.
    #[arg(long, requires = "e2b_tls_key")]
    e2b_tls_cert: Option<PathBuf>,
    #[arg(long)]
    e2b_tls_key: Option<PathBuf>,
}

/// Why the router stopped.
#[derive(Debug, thiserror::Error)]
enum RouterError {
    #[error("etcd: {0}")]
    Etcd(#[from] flint_supervisor::cluster::etcd::EtcdError),
    #[error(transparent)]
    Tls(#[from] flint_supervisor::tls::TlsError),
    #[error("bind {0}: {1}")]
    Bind(std::net::SocketAddr, #[source] std::io::Error),
    #[error("serve: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Keys(#[from] flint_supervisor::router::KeyFileError),
}

async fn run(a: Args) -> Result<(), RouterError> {
    use flint_supervisor::{cluster, router, tls};
    let etcd_tls = cluster::etcd::EtcdTls { ca: a.etcd_ca, cert: a.etcd_cert, key: a.etcd_key };
    let etcd = cluster::etcd::Etcd::new(&a.etcd, &etcd_tls, Duration::from_secs(2))?;
    let host_tls = tls::client_config(&a.host_ca, Some((&a.cert, &a.key)))?;
    let server_tls = tls::server_config(&a.tls_cert, &a.tls_key, Some(&a.client_ca))?;
    let r = Arc::new(router::Router::new(etcd, a.prefix, host_tls, a.min_free_mib));
    tokio::spawn(r.clone().keep_view());
    let l = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| RouterError::Bind(a.listen, e))?;
    let l = tls::TlsListener::new(l, server_tls).map_err(RouterError::Serve)?;
    if let Some(addr) = a.front_listen {
        let l = flint_supervisor::net::front::bind(addr).await.map_err(|e| RouterError::Bind(addr, e))?;
        let relay = Arc::new(router::FrontRelay(r.clone()));
        let limits = flint_supervisor::net::front::Limits::default();
        tracing::info!(listen = %addr, domain = %a.front_domain, "front end for the fleet's exposed ports");
        let serving = flint_supervisor::net::front::serve_as(
            l,
            a.front_domain.clone(),
            relay,
            limits,
            router::FrontRelay::ROLE,
            None,
        );
        tokio::spawn(serving);
    }
    if let (Some(addr), Some(keys)) = (a.e2b_listen, &a.e2b_keys) {
        let front = Arc::new(router::E2bFront { domain: a.e2b_domain.clone(), keys: router::KeyFile::open(keys)? });
        let tls = match (&a.e2b_tls_cert, &a.e2b_tls_key) {
            (Some(c), Some(k)) => Some(tls::server_config(c, k, None)?),
            _ => None,
        };
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| RouterError::Bind(addr, e))?;
        let r = r.clone();
        let app =
            axum::Router::new().fallback(move |req: axum::extract::Request| r.clone().handle_e2b(front.clone(), req));
        tracing::info!(listen = %addr, tls = tls.is_some(), domain = %a.e2b_domain, "E2B endpoint for the fleet");
        match tls {
            Some(t) => {
                let l = tls::TlsListener::new(l, t).map_err(RouterError::Serve)?;
                tokio::spawn(async move { axum::serve(l, app).await });
            }
            None => {
                tokio::spawn(async move { axum::serve(l, app).await });
            }
        }
    }
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| r.clone().handle(req));
    tracing::info!(listen = %a.listen, "flint-router ready");
    axum::serve(l, app).with_graceful_shutdown(flint_supervisor::terminated()).await.map_err(RouterError::Serve)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(flint_supervisor::log_colours())
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flint-router: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flint-router: {e}");
            ExitCode::FAILURE
        }
    }
}
