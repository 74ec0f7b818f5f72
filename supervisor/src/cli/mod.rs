//! The `flint` command line over flintd's API, through the typed client. Each area is a module: `vms` (VMs,
//! exec, run, files, mounts), `sessions`, `templates` (templates, clones, snapshots, images, the cache), `net`
//! (egress policies, exposed ports); `interactive` is `flint exec -i/-t`. Every command turns its arguments into
//! a typed request (unit-tested here), calls the client, and prints a table or, with `--json`, the answer.
mod e2b;
mod interactive;
mod net;
mod sessions;
mod templates;
mod vms;

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::client::{Client, ClientError};

#[derive(Parser, Debug)]
#[command(name = "flint", version, about = "Drive flintd: VMs, exec, files, snapshots, templates, clones, sessions")]
pub struct Cli {
    /// flintd's API socket.
    #[arg(long, env = "FLINT_SOCKET", default_value = "/run/flint/flintd.sock")]
    pub socket: PathBuf,
    /// Drive a router (or a host's cluster listener) instead: https://router:7443 (docs/cluster.md).
    #[arg(long, env = "FLINT_URL", global = true)]
    pub url: Option<String>,
    /// With --url https://…: the fleet's CA, and this client's certificate and key (mutual TLS).
    #[arg(long, env = "FLINT_CA", global = true)]
    pub ca: Option<PathBuf>,
    #[arg(long, env = "FLINT_CERT", global = true)]
    pub cert: Option<PathBuf>,
    #[arg(long, env = "FLINT_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// Registered hosts with their headroom.
    Ls,
    /// No new sessions on HOST; its running sessions hibernate and wake elsewhere at their next call.
    Drain { host: String },
    /// Take HOST back into placement.
    Undrain { host: String },
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Is flintd up?
    Health,
    /// Guest images.
    Image {
        #[command(subcommand)]
        cmd: templates::ImageCmd,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        cmd: vms::VmCmd,
    },
    /// Run a command in a VM or session (a hibernated session wakes): flint exec ID -- CMD ARGS...
    Exec(vms::ExecArgs),
    /// Run code in the VM's warm runner (state kept between runs, like a notebook): flint run ID 'print(6*7)'.
    /// The value of the last line is printed; an exception prints its traceback and exits 1, a timeout exits 124.
    Run(vms::RunArgs),
    /// Mount a copy of a host directory into a running VM or session: flint mount ID HOSTDIR:GUESTPATH[:ro]
    /// (disk-rooted images; one mount at a time; kept in snapshots).
    Mount { vm: String, spec: String },
    /// Unmount a directory mounted with flint mount: flint umount ID GUESTPATH.
    Umount { vm: String, path: String },
    /// Copy a file into or out of a VM: flint cp LOCAL VM:/path, or flint cp VM:/path LOCAL.
    Cp {
        src: String,
        dst: String,
        /// Octal mode for files copied into a VM.
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// Snapshots in the store.
    Snapshot {
        #[command(subcommand)]
        cmd: templates::SnapCmd,
    },
    /// Templates: boot once, init, snapshot (SnapStart).
    Template {
        #[command(subcommand)]
        cmd: templates::TemplateCmd,
    },
    /// Restore N clones of a template (or --snapshot).
    Clone(templates::CloneArgs),
    /// Sessions: sandboxes that hibernate to the store when idle and wake on the next call. `flint exec` and
    /// `flint cp` take a session id too.
    Session {
        #[command(subcommand)]
        cmd: sessions::SessionCmd,
    },
    /// The local snapshot cache.
    Cache {
        #[command(subcommand)]
        cmd: templates::CacheCmd,
    },
    /// Prometheus metrics.
    Metrics,
    /// A VM's or session's network: flint net show ID, flint net policy ID [--default-deny] [--allow X]... [--deny X]...
    Net {
        #[command(subcommand)]
        cmd: net::NetCmd,
    },
    /// Exposed ports (reached through flintd's front end): flint port ls|expose|rm ID ...
    Port {
        #[command(subcommand)]
        cmd: net::PortCmd,
    },
    /// The fleet's hosts, as a router sees them: flint --url https://router host ls (docs/cluster.md).
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// The E2B-compatible endpoint: flint e2b key create|ls|rm (docs/e2b.md).
    E2b {
        #[command(subcommand)]
        cmd: e2b::E2bCmd,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The arguments do not make a request.
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

pub(crate) fn usage(m: impl Into<String>) -> CliError {
    CliError::Usage(m.into())
}

/// How a command prints: a table for a person, or the API's JSON with `--json`.
pub struct Out {
    pub json: bool,
}

impl Out {
    pub fn show<T: Serialize>(&self, v: &T, human: impl FnOnce(&T)) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human(v);
        }
    }

    /// Pretty JSON either way (records without a table of their own).
    pub fn pretty<T: Serialize>(&self, v: &T) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

/// `KEY=VALUE` arguments as a map.
pub fn pairs(flag: &str, args: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    args.iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| usage(format!("{flag} `{kv}`: expected KEY=VALUE")))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Runs one command; its exit code.
pub async fn run(cli: Cli) -> Result<i32, CliError> {
    let client = match &cli.url {
        None => Client::new(&cli.socket),
        Some(url) => {
            let tls = match (&cli.ca, &cli.cert, &cli.key) {
                (None, None, None) => None,
                (Some(ca), cert, key) => {
                    let identity = match (cert, key) {
                        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                        (None, None) => None,
                        _ => return Err(usage("--cert and --key go together")),
                    };
                    Some(crate::tls::client_config(ca, identity).map_err(|e| usage(e.to_string()))?)
                }
                (None, _, _) => {
                    return Err(usage("--cert/--key need --ca (the CA that signed the server's certificate)"))
                }
            };
            Client::with_target(crate::http::Target::url(url, tls).map_err(|e| usage(format!("--url {e}")))?)
        }
    };
    let out = Out { json: cli.json };
    match cli.cmd {
        Cmd::Health => out.pretty(&client.health().await?),
        Cmd::Image { cmd } => templates::image(&client, &out, cmd).await?,
        Cmd::Vm { cmd } => vms::vm(&client, &out, cmd).await?,
        Cmd::Exec(a) => return vms::exec(&client, &out, a).await,
        Cmd::Run(a) => return vms::run_code(&client, &out, a).await,
        Cmd::Mount { vm, spec } => vms::mount(&client, &out, &vm, &spec).await?,
        Cmd::Umount { vm, path } => {
            let r = client.unmount(&vm, &path).await?;
            out.show(&r, |_| println!("unmounted {path}"));
        }
        Cmd::Cp { src, dst, mode } => vms::cp(&client, &out, &src, &dst, &mode).await?,
        Cmd::Snapshot { cmd } => templates::snapshot(&client, &out, cmd).await?,
        Cmd::Template { cmd } => templates::template(&client, &out, cmd).await?,
        Cmd::Clone(a) => templates::clone(&client, &out, a).await?,
        Cmd::Session { cmd } => sessions::session(&client, &out, cmd).await?,
        Cmd::Cache { cmd: templates::CacheCmd::Clear } => out.pretty(&client.clear_cache().await?),
        Cmd::Metrics => print!("{}", client.metrics().await?),
        Cmd::Net { cmd } => net::net(&client, &out, cmd).await?,
        Cmd::Port { cmd } => net::port(&client, &out, cmd).await?,
        Cmd::E2b { cmd } => e2b::e2b(&client, &out, cmd).await?,
        Cmd::Host { cmd: HostCmd::Drain { host } } => {
            let r = client.drain_host(&host, true).await?;
            out.show(&r, |r| {
                println!("{} draining: {} sessions hibernated", r.host, r.hibernated.len());
                for (id, e) in &r.failed {
                    println!("  {id} keeps running here: {e}");
                }
            });
        }
        Cmd::Host { cmd: HostCmd::Undrain { host } } => {
            let r = client.drain_host(&host, false).await?;
            out.show(&r, |r| println!("{} takes new sessions again", r.host));
        }
        Cmd::Host { cmd: HostCmd::Ls } => {
            let hosts = client.hosts().await?;
            out.show(&hosts, |hs| {
                println!(
                    "{:<28} {:<28} {:>9} {:>9} {:>8} DRAINING",
                    "HOST", "ADVERTISE", "FREE MiB", "SESSIONS", "VMS"
                );
                for h in hs {
                    println!(
                        "{:<28} {:<28} {:>9} {:>9} {:>8} {}",
                        h.host,
                        h.advertise.as_deref().unwrap_or("-"),
                        h.mem_free_mib,
                        h.sessions,
                        h.vms,
                        h.draining
                    );
                }
            });
        }
    }
    Ok(0)
}

/// `flint`'s main: parses, runs, prints an error once.
pub fn main() -> std::process::ExitCode {
    // Output piped into `head` and closed early ends the program quietly, as for any Unix tool (Rust ignores
    // SIGPIPE, so a print would fail and panic instead).
    // SAFETY: signal(2) restoring the default action, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flint: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // An interactive exec's input thread may still be blocked reading stdin: nothing waits for it.
    rt.shutdown_background();
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("flint: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
pub(crate) fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("flint").chain(args.iter().copied())).unwrap()
}

/// The command `args` parse into (tests).
#[cfg(test)]
pub(crate) fn parse_cmd(args: &[&str]) -> Cmd {
    parse(args).cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_global_flags() {
        let m = pairs("--env", &["A=1".into(), "B=x=y".into()]).unwrap();
        assert_eq!(m.get("B").map(String::as_str), Some("x=y"));
        assert!(pairs("--env", &["nope".into()]).unwrap_err().to_string().contains("expected KEY=VALUE"));
        let c = parse(&["--socket", "/tmp/s.sock", "vm", "ls", "--json"]);
        assert!(c.json && c.socket == std::path::Path::new("/tmp/s.sock"));
        assert!(Cli::try_parse_from(["flint", "vm", "frobnicate"]).is_err());
    }
}
