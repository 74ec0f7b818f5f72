//! `flint-agent`: Flint's in-guest agent. As the guest's PID 1 it sets up the system and
//! reaps orphans; everywhere it serves the agent protocol (docs/agent-protocol.md).
use std::path::PathBuf;
use std::process::ExitCode;

use flint_agent::listen::{ListenAddr, Listener};
use flint_agent::server::{serve_connection, Agent, Settings};

struct Args {
    listen: ListenAddr,
    settings: Settings,
}

const USAGE: &str = "usage: flint-agent [--listen vsock:PORT|unix:PATH] [--root DIR] [--max-file-bytes N] [--hooks-dir DIR]\n       flint-agent vsock-cat CID PORT";

fn parse_args() -> Result<Args, String> {
    let mut a = Args { listen: ListenAddr::Vsock(flint_agent::protocol::DEFAULT_PORT), settings: Settings::default() };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{k} needs a value\n{USAGE}"));
        match k.as_str() {
            "--listen" => a.listen = val()?.parse()?,
            "--root" => a.settings.root = PathBuf::from(val()?),
            "--max-file-bytes" => {
                a.settings.max_file_bytes = val()?.parse().map_err(|_| "--max-file-bytes takes a number".to_string())?
            }
            "--hooks-dir" => a.settings.hooks_dir = PathBuf::from(val()?),
            "--help" | "-h" => return Err(USAGE.into()),
            "--version" => return Err(format!("flint-agent {}", env!("CARGO_PKG_VERSION"))),
            // The kernel passes unknown boot parameters to init as arguments: ignore them.
            _ if std::process::id() == 1 => {}
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let argv: Vec<String> = std::env::args().collect();
    if !pid1 && argv.get(1).map(String::as_str) == Some("vsock-cat") {
        let parsed = (argv.get(2).and_then(|c| c.parse().ok()), argv.get(3).and_then(|p| p.parse().ok()));
        let (Some(cid), Some(port)) = parsed else {
            eprintln!("usage: flint-agent vsock-cat CID PORT");
            return ExitCode::from(2);
        };
        return match flint_agent::vsock_cat::run(cid, port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flint-agent vsock-cat {cid} {port}: {e}");
                ExitCode::from(1)
            }
        };
    }
    let mut args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if pid1 {
        match flint_agent::init::enter_disk_root() {
            Ok(true) => eprintln!("flint-agent: root is the image's disk under the VM's overlay"),
            Ok(false) => {}
            Err(e) => eprintln!("flint-agent: cannot enter the image's root, staying in the initramfs: {e}"),
        }
        flint_agent::init::init_system();
        args.settings.is_init = true;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flint-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(run(args));
    if let Err(e) = &r {
        eprintln!("flint-agent: {e}");
    }
    if pid1 {
        // PID 1 must never exit (the kernel would panic): keep reaping and wait.
        loop {
            // SAFETY: pause(2) has no preconditions.
            unsafe { libc::pause() };
        }
    }
    if r.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let agent = Agent::new(args.settings);
    tokio::spawn(agent.reaper.clone().run());
    if !agent.runners.names().is_empty() {
        // Warm from boot: a template's snapshot then holds started interpreters.
        let a = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = a.warm_runners().await {
                eprintln!("flint-agent: {e}");
            }
        });
    }
    let listener = Listener::bind(&args.listen)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {:?}: {e}", args.listen)))?;
    eprintln!("flint-agent {} ready on {:?}", env!("CARGO_PKG_VERSION"), args.listen);
    loop {
        match listener.accept().await {
            Ok(stream) => {
                tokio::spawn(serve_connection(agent.clone(), stream));
            }
            Err(e) => {
                eprintln!("flint-agent: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
