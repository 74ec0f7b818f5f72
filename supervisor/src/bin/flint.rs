//! `flint`: the command line for flintd's API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flint_agent::protocol::{ExecRequest, TtySize};
use flint_supervisor::session::{CreateSession, ForkSession, OnIdle, PreStop};
use flint_supervisor::vm::model::{CreateClones, CreateSnapshot, CreateTemplate, CreateVm, DriveSpec};
use serde_json::{json, Value};

/// A request body from flintd's own request types (the contract the API parses).
fn typed<T: serde::Serialize>(body: &T) -> Result<Value, String> {
    serde_json::to_value(body).map_err(|e| e.to_string())
}

#[derive(Parser)]
#[command(name = "flint", version, about = "Drive flintd: VMs, exec, files, snapshots, templates, clones")]
struct Cli {
    /// flintd's API socket.
    #[arg(long, env = "FLINT_SOCKET", default_value = "/run/flint/flintd.sock")]
    socket: PathBuf,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Is flintd up?
    Health,
    /// Guest images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Run a command in a VM or session (a hibernated session wakes): flint exec ID -- CMD ARGS...
    Exec {
        vm: String,
        /// Stream this terminal's stdin to the command (and forward ^C as SIGINT).
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Run the command on a terminal (a pty in the guest) sized like this one, in raw mode: `flint exec -it ID -- sh`.
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Run code in the VM's warm runner (state kept between runs, like a notebook): flint run ID 'print(6*7)'.
    /// The value of the last line is printed; an exception prints its traceback and exits 1, a timeout exits 124.
    Run {
        vm: String,
        /// The code; `-` reads it from stdin.
        code: String,
        #[arg(long, default_value = "python")]
        language: String,
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
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
        cmd: SnapCmd,
    },
    /// Templates: boot once, init, snapshot (SnapStart).
    Template {
        #[command(subcommand)]
        cmd: TemplateCmd,
    },
    /// Restore N clones of a template (or --snapshot).
    Clone {
        template: Option<String>,
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
        /// Start before memory arrives (pages fetched on first touch, working set prefetched).
        #[arg(long)]
        lazy: bool,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Sessions: sandboxes that hibernate to the store when idle and wake on the next call. `flint exec` and
    /// `flint cp` take a session id too.
    Session {
        #[command(subcommand)]
        cmd: SessionCmd,
    },
    /// The local snapshot cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Prometheus metrics.
    Metrics,
    /// A VM's or session's network: flint net show ID, flint net policy ID [--default deny] [--allow X]... [--deny X]...
    Net {
        #[command(subcommand)]
        cmd: NetCmd,
    },
    /// Exposed ports (reached through flintd's front end): flint port ls|expose|rm ID ...
    Port {
        #[command(subcommand)]
        cmd: PortCmd,
    },
}

/// A network for a new VM, clone or session.
/// An egress policy (docs/networking.md).
#[derive(clap::Args, Clone, Default)]
struct PolicyArgs {
    /// Egress allowed to a CIDR or domain (repeatable); with --default-deny only these are reached.
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Egress denied to a CIDR or domain (repeatable; wins over --allow).
    #[arg(long = "deny")]
    deny: Vec<String>,
    /// Deny what no rule names (default: allow).
    #[arg(long)]
    default_deny: bool,
}

impl PolicyArgs {
    fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && !self.default_deny
    }
    fn json(&self) -> Value {
        json!({ "default": if self.default_deny { "deny" } else { "allow" }, "allow": self.allow, "deny": self.deny })
    }
}

#[derive(clap::Args, Clone, Default)]
struct NetArgs {
    /// Give it a network of its own (implied by the options below).
    #[arg(long)]
    net: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Expose a guest port through the front end: PORT[:TOKEN] (repeatable).
    #[arg(long = "expose")]
    expose: Vec<String>,
}

impl NetArgs {
    fn request(&self) -> Result<Option<Value>, String> {
        if !self.net && self.policy.is_empty() && self.expose.is_empty() {
            return Ok(None);
        }
        let mut ports = serde_json::Map::new();
        for e in &self.expose {
            let (p, token) = match e.split_once(':') {
                Some((p, t)) => (p, Some(t)),
                None => (e.as_str(), None),
            };
            p.parse::<u16>().map_err(|_| format!("--expose {e:?}: expected PORT[:TOKEN]"))?;
            ports.insert(p.to_string(), json!({ "token": token }));
        }
        Ok(Some(json!({ "egress": self.policy.json(), "ports": ports })))
    }
}

/// Adds `network` to a request body.
fn with_network(mut body: Value, net: &NetArgs) -> Result<Value, String> {
    if let Some(n) = net.request()? {
        body["network"] = n;
    }
    Ok(body)
}

#[derive(Subcommand)]
enum NetCmd {
    /// Address, MAC, egress policy and exposed ports.
    Show { id: String },
    /// Replace the egress policy (applies to the running VM at once).
    Policy {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Subcommand)]
enum PortCmd {
    Ls {
        id: String,
    },
    /// Expose guest port PORT of ID through the HTTP front end, optionally behind an access token, or also as
    /// plain TCP on front-end port --tcp (within network.tcp_ports).
    Expose {
        id: String,
        port: u16,
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        tcp: Option<u16>,
    },
    Rm {
        id: String,
        port: u16,
    },
}

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum SessionCmd {
    /// flint session create TEMPLATE [--id ID] [--idle-timeout S] [--ttl S] [--pre-stop CMD]
    Create {
        /// Template to start from (or --snapshot).
        template: Option<String>,
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long)]
        id: Option<String>,
        /// Seconds without a call or a running exec before it hibernates (or stops, with --on-idle stop).
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Seconds of awake time (wall time with --ttl-counts-hibernated) after which the session ends.
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long)]
        ttl_counts_hibernated: bool,
        /// Seconds after creation after which the session ends, asleep or not.
        #[arg(long)]
        max_lifetime: Option<u64>,
        #[arg(long, value_parser = ["hibernate", "stop"], default_value = "hibernate")]
        on_idle: String,
        /// Command run in the guest (through sh -c) before every hibernation.
        #[arg(long)]
        pre_stop: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        pre_stop_timeout_ms: u64,
        /// Environment for execs: KEY=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Metadata: KEY=VALUE (repeatable); `session ls --meta KEY=VALUE` filters on it.
        #[arg(long = "meta")]
        meta: Vec<String>,
        #[command(flatten)]
        net: NetArgs,
    },
    Ls {
        /// Only sessions whose metadata has KEY=VALUE (repeatable).
        #[arg(long = "meta")]
        meta: Vec<String>,
    },
    Get {
        id: String,
    },
    /// Hibernate now (a diff snapshot into the store; the VM stops).
    Hibernate {
        id: String,
    },
    /// Wake from the last hibernation (any exec or cp wakes it too).
    Wake {
        id: String,
    },
    /// New sessions from this one as it is now.
    Fork {
        id: String,
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
    },
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// `KEY=VALUE` arguments as a map.
fn pairs(flag: &str, args: &[String]) -> Result<std::collections::BTreeMap<String, String>, String> {
    args.iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("{flag} `{kv}`: expected KEY=VALUE"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

fn print_sessions(v: &Value) {
    println!("{:<24} {:<11} {:<26} {:>5} {:>5} {:>10} ERROR", "ID", "STATE", "VM", "HIB", "WAKES", "WAKE ms");
    for s in v.as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<11} {:<26} {:>5} {:>5} {:>10} {}",
            s["id"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?"),
            s["vm"].as_str().unwrap_or("-"),
            s["hibernations"],
            s["wakes"],
            s["last_wake_ms"].as_f64().map(|m| format!("{m:.0}")).unwrap_or("-".into()),
            s["error"].as_str().unwrap_or("")
        );
    }
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Drop every chunk not pinned by a running VM (the next restore fetches from S3).
    Clear,
}

#[derive(Subcommand)]
enum ImageCmd {
    Ls,
    /// Import an OCI image layout (directory or tar) or a `docker save` archive as a disk-rooted image:
    /// flint image import NAME --oci PATH. No registry access; the kernel and agent are the default image's.
    Import {
        name: String,
        #[arg(long)]
        oci: std::path::PathBuf,
        /// The writable disk of the image's VMs (their storage quota), MiB.
        #[arg(long)]
        disk_mib: Option<u64>,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a VM from an image.
    Create {
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        mem_mib: Option<u64>,
        #[arg(long)]
        vcpus: Option<u8>,
        #[arg(long)]
        id: Option<String>,
        /// A disk-rooted image's writable disk (the VM's storage quota), MiB; default: the image's.
        #[arg(long)]
        disk_mib: Option<u64>,
        /// Extra block device: PATH[,ro][,bw=BYTES_PER_S][,iops=N] (repeatable; bw and iops limit the guest's I/O, kept in snapshots).
        #[arg(long = "drive")]
        drives: Vec<String>,
        /// Environment for execs: KEY=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        #[command(flatten)]
        net: NetArgs,
    },
    Ls,
    Get {
        id: String,
    },
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
}

#[derive(Subcommand)]
enum SnapCmd {
    /// Snapshot a running VM (it keeps running).
    Create {
        vm: String,
        id: String,
        /// Upload to S3 too.
        #[arg(long)]
        push: bool,
    },
    Ls,
    Rm {
        id: String,
        /// Delete from S3 too.
        #[arg(long)]
        remote: bool,
    },
    Push {
        id: String,
    },
    Pull {
        id: String,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// flint template create NAME [--image I] [--push] [-- INIT CMD...]
    Create {
        name: String,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        push: bool,
        /// A disk-rooted image's writable disk (every clone's and session's storage quota), MiB.
        #[arg(long)]
        disk_mib: Option<u64>,
        /// Block device of the template's VM: PATH[,ro][,bw=BYTES_PER_S][,iops=N] (repeatable). Its content at snapshot time is part of the
        /// snapshot; every clone gets its own copy.
        #[arg(long = "drive")]
        drives: Vec<String>,
        /// Keep this many clones restored and paused (the warm pool): clones and sessions of the template take one.
        #[arg(long, default_value_t = 0)]
        pool: u32,
        #[arg(last = true)]
        init: Vec<String>,
    },
    Ls,
    Rm {
        name: String,
    },
    /// Set the template's warm pool size (0: none).
    Pool {
        name: String,
        size: u32,
    },
}

/// `flint run`: prints the code's output as it comes, then its value or traceback; the exit code says how it ended
/// (0 ok, 1 an exception, 124 a timeout).
async fn run_code(socket: &std::path::Path, vm: &str, body: &str, as_json: bool) -> Result<i32, String> {
    let mut code = 1;
    ndjson_call(socket, &format!("/v1/vms/{}/run", enc(vm)), body, as_json, |v| {
        let Some(r) = v.get("result") else { return };
        code = match r["status"].as_str() {
            Some("ok") => 0,
            Some("timeout") => 124,
            _ => 1,
        };
        if as_json {
            return;
        }
        if let Some(val) = r["value"].as_str() {
            println!("{val}");
        }
        if let Some(tb) = r["error"]["traceback"].as_str().filter(|t| !t.is_empty()) {
            eprint!("{tb}");
        } else if let Some(m) = r["error"]["message"].as_str() {
            eprintln!("{}: {m}", r["error"]["name"].as_str().unwrap_or("error"));
        }
        if code == 124 {
            eprintln!("flint: the code ran past its timeout and was interrupted");
        }
    })
    .await?;
    Ok(code)
}

/// A POST answered with NDJSON lines (exec, run): `stdout` and `stderr` lines are printed as they arrive (or every
/// line with `--json`), every other line goes to `other`; an `error` line or an HTTP error is the `Err`.
async fn ndjson_call(
    socket: &std::path::Path,
    path: &str,
    body: &str,
    as_json: bool,
    mut other: impl FnMut(&Value),
) -> Result<(), String> {
    use std::io::Write;
    let mut pending: Vec<u8> = Vec::new();
    let mut failure: Option<String> = None;
    let mut error_body = Vec::new();
    let status = flint_supervisor::http::request_stream(socket, "POST", path, Some(body.as_bytes()), |data| {
        pending.extend_from_slice(data);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                error_body.extend_from_slice(&line);
                continue;
            };
            if as_json {
                println!("{v}");
            }
            if let Some(s) = v["stdout"].as_str() {
                if !as_json {
                    print!("{s}");
                    let _ = std::io::stdout().flush();
                }
            } else if let Some(s) = v["stderr"].as_str() {
                if !as_json {
                    eprint!("{s}");
                }
            } else if let Some(e) = v["error"].as_str() {
                failure = Some(e.to_string());
            } else {
                other(&v);
            }
        }
        if pending.len() > 1 << 20 {
            error_body.append(&mut pending);
        }
    })
    .await
    .map_err(|e| format!("{e} (is flintd running? set FLINT_SOCKET or --socket)"))?;
    error_body.extend_from_slice(&pending);
    if status >= 300 {
        let msg = serde_json::from_slice::<Value>(&error_body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .or(failure)
            .unwrap_or_else(|| String::from_utf8_lossy(&error_body).into_owned());
        return Err(format!("{msg} (HTTP {status})"));
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// `PATH[,ro][,bw=BYTES_PER_S][,iops=N]` arguments as drives.
fn drive_specs(args: &[String]) -> Result<Vec<DriveSpec>, String> {
    args.iter()
        .map(|d| {
            let mut parts = d.split(',');
            let path = parts.next().filter(|p| !p.is_empty()).ok_or("--drive needs a path")?;
            let mut spec = DriveSpec { path: path.into(), ..Default::default() };
            for opt in parts {
                match opt {
                    "ro" => spec.read_only = true,
                    o if flint_vmm_api::config::parse_limit_option(o, &mut spec.rate_limiter)? => {}
                    o => return Err(format!("--drive {d}: unknown option `{o}` (ro, bw=BYTES_PER_S, iops=N)")),
                }
            }
            Ok(spec)
        })
        .collect()
}

/// What a long call's progress line shows besides its label: the VMs the call is starting, polled from the API.
#[derive(Clone, Copy)]
enum Watch<'a> {
    Nothing,
    /// VMs created since the call began (restored from `snapshot`, or booted from an image when `None`).
    NewVms {
        snapshot: Option<&'a str>,
    },
}

impl Watch<'_> {
    async fn phase(&self, api: &Api, since_ms: u64) -> Option<String> {
        let Watch::NewVms { snapshot } = *self else { return None };
        let vms = api.call("GET", "/v1/vms", None).await.ok()?;
        let mut counts = std::collections::BTreeMap::<String, u32>::new();
        for vm in vms.as_array()?.iter().filter(|v| {
            v["created_unix_ms"].as_u64().is_some_and(|t| t >= since_ms) && v["snapshot"].as_str() == snapshot
        }) {
            *counts.entry(vm["status"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
        if snapshot.is_none() {
            // A template: its build VM boots, runs the init and is snapshotted, then deleted.
            return Some(match counts.keys().next().map(String::as_str) {
                None => "starting".into(),
                Some("starting") => "booting the VM".into(),
                Some("running") => "running the init command, snapshotting".into(),
                _ => "storing the snapshot".into(),
            });
        }
        Some(counts.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", "))
    }
}

/// Runs a call that may take minutes. On a terminal: a spinner line with the phase and the elapsed time, left as
/// a summary when done. Quiet with `--json` or when stderr is not a terminal (scripts, logs).
async fn long_call(
    api: &Api,
    json: bool,
    label: String,
    watch: Watch<'_>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return api.call(method, path, body).await;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(label.clone());
    bar.enable_steady_tick(Duration::from_millis(120));
    let since_ms = flint_vmm_api::now_unix_ms();
    let call = api.call(method, path, body);
    tokio::pin!(call);
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = poll.tick() => {
                if let Some(phase) = watch.phase(api, since_ms).await {
                    bar.set_message(format!("{label}: {phase}"));
                }
            }
        }
    };
    let secs = bar.elapsed().as_secs_f64();
    match &result {
        Ok(_) => bar.finish_with_message(format!("{label}: done in {secs:.1} s")),
        Err(_) => bar.finish_with_message(format!("{label}: failed after {secs:.1} s")),
    }
    result
}

struct Api {
    socket: PathBuf,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let raw = self.raw(method, path, body.map(|b| b.to_string().into_bytes())).await?;
        if raw.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&raw).map_err(|e| format!("flintd sent invalid JSON: {e}"))
    }

    async fn raw(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>, String> {
        // Long operations (templates boot a VM; clones restore many) may take minutes on slow hosts.
        let (status, out) =
            flint_supervisor::http::request(&self.socket, method, path, body.as_deref(), Duration::from_secs(3600))
                .await
                .map_err(|e| format!("{e} (is flintd running? set FLINT_SOCKET or --socket)"))?;
        if status >= 300 {
            let msg = serde_json::from_slice::<Value>(&out)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&out).into_owned());
            return Err(format!("{msg} (HTTP {status})"));
        }
        Ok(out)
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_vms(v: &Value) {
    println!("{:<24} {:<9} {:>8} {:>10} {:<20} ERROR", "ID", "STATUS", "MEM MiB", "READY ms", "FROM");
    for vm in v.as_array().into_iter().flatten() {
        let from = vm["snapshot"].as_str().or(vm["image"].as_str()).unwrap_or("-");
        println!(
            "{:<24} {:<9} {:>8} {:>10} {:<20} {}",
            vm["id"].as_str().unwrap_or("?"),
            vm["status"].as_str().unwrap_or("?"),
            vm["mem_mib"],
            vm["ready_ms"].as_f64().map(|m| format!("{m:.0}")).unwrap_or("-".into()),
            from,
            vm["error"].as_str().unwrap_or("")
        );
    }
}

async fn run(cli: Cli) -> Result<i32, String> {
    let api = Api { socket: cli.socket.clone() };
    let out = |v: &Value, human: &dyn Fn(&Value)| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human(v);
        }
    };
    let pretty = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cli.cmd {
        Cmd::Health => out(&api.call("GET", "/v1/health", None).await?, &pretty),
        Cmd::Image { cmd: ImageCmd::Ls } => out(&api.call("GET", "/v1/images", None).await?, &|v| {
            for i in v.as_array().into_iter().flatten() {
                println!("{:<16} {}", i["name"].as_str().unwrap_or("?"), i["dir"].as_str().unwrap_or("?"));
            }
        }),
        Cmd::Image { cmd: ImageCmd::Import { name, oci, disk_mib } } => {
            let oci = std::path::absolute(&oci).map_err(|e| format!("--oci {}: {e}", oci.display()))?;
            let body = json!({"name": name, "oci": oci, "disk_mib": disk_mib});
            let label = format!("importing image {name}");
            out(&long_call(&api, cli.json, label, Watch::Nothing, "POST", "/v1/images", Some(body)).await?, &pretty)
        }
        Cmd::Vm { cmd } => match cmd {
            VmCmd::Create { image, mem_mib, vcpus, id, disk_mib, drives, env, net } => {
                let drives = drive_specs(&drives)?;
                let mut envs = std::collections::BTreeMap::new();
                for kv in env {
                    let (k, v) = kv.split_once('=').ok_or_else(|| format!("--env `{kv}`: expected KEY=VALUE"))?;
                    envs.insert(k.to_string(), v.to_string());
                }
                let body = CreateVm { id, image, mem_mib, vcpus, drives, env: envs, network: None, disk_mib };
                let label = "booting a VM (until its agent answers)".to_string();
                let v = long_call(
                    &api,
                    cli.json,
                    label,
                    Watch::NewVms { snapshot: None },
                    "POST",
                    "/v1/vms",
                    Some(with_network(typed(&body)?, &net)?),
                )
                .await?;
                out(&v, &|v| print_vms(&json!([v])));
            }
            VmCmd::Ls => out(&api.call("GET", "/v1/vms", None).await?, &print_vms),
            VmCmd::Get { id } => out(&api.call("GET", &format!("/v1/vms/{}", enc(&id)), None).await?, &pretty),
            VmCmd::Rm { ids } => {
                for id in ids {
                    api.call("DELETE", &format!("/v1/vms/{}", enc(&id)), None).await?;
                    if !cli.json {
                        println!("deleted {id}");
                    }
                }
            }
            VmCmd::Pause { id } => {
                out(&api.call("POST", &format!("/v1/vms/{}/pause", enc(&id)), None).await?, &|v| print_vms(&json!([v])))
            }
            VmCmd::Resume { id } => {
                out(&api.call("POST", &format!("/v1/vms/{}/resume", enc(&id)), None).await?, &|v| {
                    print_vms(&json!([v]))
                })
            }
        },
        Cmd::Exec { vm, interactive, tty, timeout_ms, cwd, argv } if interactive || tty => {
            let req = ExecRequest { argv, timeout_ms, cwd, ..Default::default() };
            return interactive_exec(&cli.socket, &vm, req, tty).await;
        }
        Cmd::Exec { vm, timeout_ms, cwd, argv, .. } => {
            // Output is printed as the guest produces it (NDJSON lines over a chunked response).
            let body = serde_json::to_string(&ExecRequest { argv, timeout_ms, cwd, ..Default::default() })
                .map_err(|e| e.to_string())?;
            let mut code = 1;
            ndjson_call(&cli.socket, &format!("/v1/vms/{}/exec", enc(&vm)), &body, cli.json, |v| {
                if let Some(e) = v.get("exit") {
                    code =
                        e["code"].as_i64().map(|c| c as i32).unwrap_or(128 + e["signal"].as_i64().unwrap_or(0) as i32);
                    if e["timed_out"].as_bool() == Some(true) {
                        eprintln!("flint: the command timed out");
                    }
                }
            })
            .await?;
            return Ok(code);
        }
        Cmd::Mount { vm, spec } => {
            let mut parts = spec.split(':');
            let (Some(src), Some(path)) = (parts.next(), parts.next()) else {
                return Err(format!("`{spec}`: expected HOSTDIR:GUESTPATH[:ro]"));
            };
            let read_only = match parts.next() {
                None | Some("rw") => false,
                Some("ro") => true,
                Some(o) => return Err(format!("`{spec}`: unknown option `{o}` (ro or rw)")),
            };
            let src = std::path::absolute(src).map_err(|e| format!("{src}: {e}"))?;
            let body = json!({"source": src, "path": path, "read_only": read_only});
            out(&api.call("POST", &format!("/v1/vms/{}/mounts", enc(&vm)), Some(body)).await?, &|v| {
                for m in v["mounts"].as_array().into_iter().flatten() {
                    println!(
                        "{} -> {}{}",
                        m["source"].as_str().unwrap_or("?"),
                        m["path"].as_str().unwrap_or("?"),
                        if m["read_only"] == true { " (ro)" } else { "" }
                    );
                }
            })
        }
        Cmd::Umount { vm, path } => {
            out(&api.call("DELETE", &format!("/v1/vms/{}/mounts?path={}", enc(&vm), enc(&path)), None).await?, &|_| {
                println!("unmounted {path}")
            })
        }
        Cmd::Run { vm, code, language, timeout_ms } => {
            let code = if code == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| format!("read stdin: {e}"))?;
                s
            } else {
                code
            };
            let body = json!({"language": language, "code": code, "timeout_ms": timeout_ms}).to_string();
            return run_code(&cli.socket, &vm, &body, cli.json).await;
        }
        Cmd::Cp { src, dst, mode } => match (src.split_once(":/"), dst.split_once(":/")) {
            (None, Some((vm, path))) => {
                let data = std::fs::read(&src).map_err(|e| format!("read {src}: {e}"))?;
                let v = api
                    .raw(
                        "PUT",
                        &format!("/v1/vms/{}/files?path=/{}&mode={}", enc(vm), enc(path), enc(&mode)),
                        Some(data),
                    )
                    .await?;
                if cli.json {
                    println!("{}", String::from_utf8_lossy(&v));
                }
            }
            (Some((vm, path)), None) => {
                let data = api.raw("GET", &format!("/v1/vms/{}/files?path=/{}", enc(vm), enc(path)), None).await?;
                std::fs::write(&dst, data).map_err(|e| format!("write {dst}: {e}"))?;
            }
            _ => return Err("exactly one of SRC and DST must be VM:/path".into()),
        },
        Cmd::Snapshot { cmd } => match cmd {
            SnapCmd::Create { vm, id, push } => {
                let v = api
                    .call(
                        "POST",
                        &format!("/v1/vms/{}/snapshots", enc(&vm)),
                        Some(typed(&CreateSnapshot { id, publish: push })?),
                    )
                    .await?;
                out(&v, &pretty);
            }
            SnapCmd::Ls => out(&api.call("GET", "/v1/snapshots", None).await?, &|v| {
                println!("{:<28} {:>10} {:>10} {:<6} {:<6}", "ID", "LOGICAL MB", "STORED MB", "LOCAL", "S3");
                for s in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<28} {:>10.1} {:>10.1} {:<6} {:<6}",
                        s["id"].as_str().unwrap_or("?"),
                        s["logical_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                        s["stored_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                        if s["local_complete"].as_bool() == Some(true) { "yes" } else { "no" },
                        if s["remote"].as_bool() == Some(true) { "yes" } else { "no" }
                    );
                }
            }),
            SnapCmd::Rm { id, remote } => {
                api.call("DELETE", &format!("/v1/snapshots/{}?remote={remote}", enc(&id)), None).await?;
            }
            SnapCmd::Push { id } => {
                let path = format!("/v1/snapshots/{}/push", enc(&id));
                let label = format!("uploading snapshot {id}");
                out(&long_call(&api, cli.json, label, Watch::Nothing, "POST", &path, None).await?, &pretty)
            }
            SnapCmd::Pull { id } => {
                let path = format!("/v1/snapshots/{}/pull", enc(&id));
                let label = format!("downloading snapshot {id}");
                out(&long_call(&api, cli.json, label, Watch::Nothing, "POST", &path, None).await?, &pretty)
            }
        },
        Cmd::Template { cmd } => match cmd {
            TemplateCmd::Create { name, image, push, disk_mib, drives, pool, init } => {
                let body = typed(&CreateTemplate {
                    name: name.clone(),
                    image,
                    disk_mib,
                    init,
                    publish: push,
                    drives: drive_specs(&drives)?,
                    pool_size: pool,
                    ..Default::default()
                })?;
                let label = format!("creating template {name}");
                let watch = Watch::NewVms { snapshot: None };
                let v = long_call(&api, cli.json, label, watch, "POST", "/v1/templates", Some(body)).await?;
                out(&v, &pretty);
            }
            TemplateCmd::Ls => out(&api.call("GET", "/v1/templates", None).await?, &pretty),
            TemplateCmd::Rm { name } => {
                api.call("DELETE", &format!("/v1/templates/{}", enc(&name)), None).await?;
            }
            TemplateCmd::Pool { name, size } => {
                let path = format!("/v1/templates/{}/pool", enc(&name));
                out(&api.call("POST", &path, Some(json!({ "size": size }))).await?, &pretty)
            }
        },
        Cmd::Clone { template, snapshot, count, lazy, net } => {
            let label = format!("restoring {count} clone(s){}", if lazy { " lazily" } else { "" });
            // The clones' records name the snapshot (a template's is tmpl-NAME).
            let source = snapshot.clone().or_else(|| template.as_ref().map(|t| format!("tmpl-{t}")));
            let body =
                with_network(typed(&CreateClones { template, snapshot, count, lazy, ..Default::default() })?, &net)?;
            let watch = Watch::NewVms { snapshot: source.as_deref() };
            let v = long_call(&api, cli.json, label, watch, "POST", "/v1/clones", Some(body)).await?;
            out(&v, &print_vms);
        }
        Cmd::Session { cmd } => match cmd {
            SessionCmd::Create {
                template,
                snapshot,
                id,
                idle_timeout,
                ttl,
                ttl_counts_hibernated,
                max_lifetime,
                on_idle,
                pre_stop,
                pre_stop_timeout_ms,
                env,
                meta,
                net,
            } => {
                let body = CreateSession {
                    template,
                    snapshot,
                    id,
                    idle_timeout_s: idle_timeout,
                    ttl_s: ttl,
                    max_lifetime_s: max_lifetime,
                    ttl_counts_hibernated,
                    env: pairs("--env", &env)?,
                    metadata: pairs("--meta", &meta)?,
                    on_idle: if on_idle == "stop" { OnIdle::Stop } else { OnIdle::Hibernate },
                    pre_stop: pre_stop
                        .map(|c| PreStop { argv: vec!["sh".into(), "-c".into(), c], timeout_ms: pre_stop_timeout_ms }),
                    network: None,
                };
                let label = "starting a session".to_string();
                let body = with_network(typed(&body)?, &net)?;
                let v = long_call(&api, cli.json, label, Watch::Nothing, "POST", "/v1/sessions", Some(body)).await?;
                out(&v, &|v| print_sessions(&json!([v])));
            }
            SessionCmd::Ls { meta } => {
                let q: Vec<String> =
                    pairs("--meta", &meta)?.iter().map(|(k, v)| format!("metadata.{}={}", enc(k), enc(v))).collect();
                let path =
                    if q.is_empty() { "/v1/sessions".to_string() } else { format!("/v1/sessions?{}", q.join("&")) };
                out(&api.call("GET", &path, None).await?, &print_sessions)
            }
            SessionCmd::Get { id } => {
                out(&api.call("GET", &format!("/v1/sessions/{}", enc(&id)), None).await?, &pretty)
            }
            SessionCmd::Hibernate { id } => {
                let path = format!("/v1/sessions/{}/hibernate", enc(&id));
                let v =
                    long_call(&api, cli.json, format!("hibernating {id}"), Watch::Nothing, "POST", &path, None).await?;
                out(&v, &|v| print_sessions(&json!([v])));
            }
            SessionCmd::Wake { id } => {
                let path = format!("/v1/sessions/{}/wake", enc(&id));
                let v = long_call(&api, cli.json, format!("waking {id}"), Watch::Nothing, "POST", &path, None).await?;
                out(&v, &|v| print_sessions(&json!([v])));
            }
            SessionCmd::Fork { id, count } => {
                let path = format!("/v1/sessions/{}/fork", enc(&id));
                let body = typed(&ForkSession { count, ..Default::default() })?;
                let v = long_call(
                    &api,
                    cli.json,
                    format!("forking {id} ×{count}"),
                    Watch::Nothing,
                    "POST",
                    &path,
                    Some(body),
                )
                .await?;
                out(&v, &print_sessions);
            }
            SessionCmd::Rm { ids } => {
                for id in ids {
                    api.call("DELETE", &format!("/v1/sessions/{}", enc(&id)), None).await?;
                    if !cli.json {
                        println!("deleted {id}");
                    }
                }
            }
        },
        Cmd::Net { cmd: NetCmd::Show { id } } => {
            out(&api.call("GET", &format!("/v1/vms/{}/network", enc(&id)), None).await?, &pretty)
        }
        Cmd::Net { cmd: NetCmd::Policy { id, policy } } => {
            let path = format!("/v1/vms/{}/network/egress", enc(&id));
            out(&api.call("PUT", &path, Some(policy.json())).await?, &pretty)
        }
        Cmd::Port { cmd } => {
            let (method, id, port, body) = match cmd {
                PortCmd::Ls { id } => ("GET", id, None, None),
                PortCmd::Expose { id, port, token, tcp } => {
                    ("PUT", id, Some(port), Some(json!({ "token": token, "tcp_listen": tcp })))
                }
                PortCmd::Rm { id, port } => ("DELETE", id, Some(port), None),
            };
            let path = match port {
                Some(p) => format!("/v1/vms/{}/ports/{p}", enc(&id)),
                None => format!("/v1/vms/{}/network", enc(&id)),
            };
            out(&api.call(method, &path, body).await?, &|v| {
                for p in v["ports"].as_array().into_iter().flatten() {
                    println!(
                        "{:<6} {:<6} {} {}",
                        p["port"],
                        if p["token"] == true { "token" } else { "open" },
                        p["url"].as_str().unwrap_or("(front end off)"),
                        p["tcp"].as_str().map(|t| format!("tcp {t}")).unwrap_or_default()
                    );
                }
            })
        }
        Cmd::Cache { cmd: CacheCmd::Clear } => out(&api.call("DELETE", "/v1/store/cache", None).await?, &pretty),
        Cmd::Metrics => {
            let raw = api.raw("GET", "/metrics", None).await?;
            print!("{}", String::from_utf8_lossy(&raw));
        }
    }
    Ok(0)
}

/// The local terminal in raw mode while this lives (the guest's terminal then does echo and line editing).
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        // SAFETY: `termios` is plain data; tcgetattr fills it for fd 0, checked below.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into `saved`, which lives for the call.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw and tcsetattr only read and write the termios values passed.
        if unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw)
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read at entry on fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// This terminal's size (of stdout, else stdin).
fn term_size() -> Option<TtySize> {
    for fd in [1, 0] {
        // SAFETY: `winsize` is plain data; TIOCGWINSZ writes it for a terminal fd and fails otherwise.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `ws` lives for the call.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some(TtySize { rows: ws.ws_row, cols: ws.ws_col });
        }
    }
    None
}

/// `flint exec -i` / `-it`: an interactive exec over an upgraded connection (agent-protocol frames both ways).
async fn interactive_exec(socket: &std::path::Path, id: &str, mut req: ExecRequest, tty: bool) -> Result<i32, String> {
    use flint_agent::protocol::{kind, read_frame, write_frame, Frame, Request, Response};
    use std::io::{IsTerminal, Write};
    use tokio::io::AsyncWriteExt;
    if tty {
        if !std::io::stdin().is_terminal() {
            return Err("-t needs a terminal on stdin (use -i alone to stream input from a pipe)".into());
        }
        req.tty = Some(term_size().unwrap_or(TtySize { rows: 24, cols: 80 }));
    }
    req.stdin = true;
    let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    let path = format!("/v1/vms/{}/exec", enc(id));
    let up = flint_supervisor::http::upgrade(socket, &path, &body, flint_supervisor::api::EXEC_UPGRADE)
        .await
        .map_err(|e| format!("{e} (is flintd running? set FLINT_SOCKET or --socket)"))?;
    let (stream, early) = match up {
        flint_supervisor::http::Upgrade::Switched { stream, early } => (stream, early),
        flint_supervisor::http::Upgrade::Refused { status, body } => {
            let msg = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(format!("{msg} (HTTP {status})"));
        }
    };
    let raw = if tty { Some(RawMode::enter().map_err(|e| format!("raw mode: {e}"))?) } else { None };
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(early), rd);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Frame>(16);
    // Input: a plain thread (a blocking read of stdin must not hold up the runtime's exit).
    let input = out_tx.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 32 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = input.blocking_send(Frame::data(kind::EOF, 0, Vec::new()));
                    return;
                }
                Ok(n) => {
                    if input.blocking_send(Frame::data(kind::STDIN, 0, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let signals = out_tx.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut winch), Ok(mut int)) = (signal(SignalKind::window_change()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        loop {
            let frame = tokio::select! {
                _ = winch.recv() => match term_size() {
                    Some(t) if tty => Frame::json(0, &Request::Resize { rows: t.rows, cols: t.cols }),
                    _ => continue,
                },
                // Without a tty ^C reaches this process, not the guest's terminal: pass it on.
                _ = int.recv() => Frame::json(0, &Request::Signal { signal: libc::SIGINT }),
            };
            if signals.send(frame).await.is_err() {
                return;
            }
        }
    });
    drop(out_tx);
    tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if write_frame(&mut wr, &f).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        let f = match read_frame(&mut rd).await {
            Ok(f) => f,
            Err(e) => break Err(format!("the exec's connection ended before its exit status: {e}")),
        };
        match f.kind {
            kind::STDOUT => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&f.payload).and_then(|_| o.flush());
            }
            kind::STDERR => {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(&f.payload).and_then(|_| e.flush());
            }
            kind::JSON => match serde_json::from_slice::<Response>(&f.payload) {
                Ok(Response::Exit { code, signal, timed_out, .. }) => {
                    if timed_out {
                        eprintln!("flint: the command timed out");
                    }
                    break Ok(code.unwrap_or(128 + signal.unwrap_or(0)));
                }
                Ok(Response::Error { message, .. }) => break Err(message),
                _ => {}
            },
            _ => {}
        }
    };
    drop(raw);
    result
}

fn main() -> ExitCode {
    // Output piped into `head` and closed early ends the program quietly, as for any Unix tool (Rust ignores
    // SIGPIPE, so a print would fail and panic instead).
    // SAFETY: signal(2) restoring the default action, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flint: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // An interactive exec's input thread may still be blocked reading stdin: nothing waits for it.
    rt.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("flint: {e}");
            ExitCode::FAILURE
        }
    }
}
