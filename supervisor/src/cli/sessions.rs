//! `flint session ...`.
use clap::{Args, Subcommand};

use super::{net::NetArgs, pairs, CliError, Out};
use crate::client::progress::with_progress;
use crate::client::Client;
use crate::services::sessions::{CreateSession, ForkSession, OnIdle, PreStop, SessionRecord};

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    /// flint session create TEMPLATE [--id ID] [--idle-timeout S] [--ttl S] [--pre-stop CMD]
    Create(CreateArgs),
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

#[derive(Args, Debug)]
pub struct CreateArgs {
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
    /// A CPU limit, a fraction of one core (0.1 = a tenth), kept across wakes; default: the template's.
    #[arg(long)]
    cpu: Option<f64>,
    #[command(flatten)]
    net: NetArgs,
}

impl CreateArgs {
    fn request(&self) -> Result<CreateSession, CliError> {
        Ok(CreateSession {
            template: self.template.clone(),
            snapshot: self.snapshot.clone(),
            id: self.id.clone(),
            idle_timeout_s: self.idle_timeout,
            ttl_s: self.ttl,
            max_lifetime_s: self.max_lifetime,
            ttl_counts_hibernated: self.ttl_counts_hibernated,
            env: pairs("--env", &self.env)?,
            metadata: pairs("--meta", &self.meta)?,
            on_idle: if self.on_idle == "stop" { OnIdle::Stop } else { OnIdle::Hibernate },
            pre_stop: self
                .pre_stop
                .clone()
                .map(|c| PreStop { argv: vec!["sh".into(), "-c".into(), c], timeout_ms: self.pre_stop_timeout_ms }),
            network: self.net.request()?,
            cpu: self.cpu,
            annotations: Default::default(),
        })
    }
}

/// The table `flint session ls` prints.
pub fn session_table(v: &[SessionRecord]) -> String {
    use std::fmt::Write;
    let mut t =
        format!("{:<24} {:<11} {:<26} {:>5} {:>5} {:>10} ERROR\n", "ID", "STATE", "VM", "HIB", "WAKES", "WAKE ms");
    for s in v {
        let _ = writeln!(
            t,
            "{:<24} {:<11} {:<26} {:>5} {:>5} {:>10} {}",
            s.id,
            s.state.name(),
            s.vm.as_deref().unwrap_or("-"),
            s.hibernations,
            s.wakes,
            s.last_wake_ms.map(|m| format!("{m:.0}")).unwrap_or("-".into()),
            s.error.as_deref().unwrap_or("")
        );
    }
    t
}

fn print(v: &[SessionRecord]) {
    print!("{}", session_table(v));
}

pub async fn session(client: &Client, out: &Out, cmd: SessionCmd) -> Result<(), CliError> {
    let quiet = || async { None::<String> };
    match cmd {
        SessionCmd::Create(a) => {
            let req = a.request()?;
            let v = with_progress("starting a session".into(), !out.json, client.create_session(&req), quiet).await?;
            out.show(&v, |v| print(std::slice::from_ref(v)));
        }
        SessionCmd::Ls { meta } => out.show(&client.sessions(&pairs("--meta", &meta)?).await?, |v| print(v)),
        SessionCmd::Get { id } => out.pretty(&client.session(&id).await?),
        SessionCmd::Hibernate { id } => {
            let v = with_progress(format!("hibernating {id}"), !out.json, client.hibernate(&id), quiet).await?;
            out.show(&v, |v| print(std::slice::from_ref(v)));
        }
        SessionCmd::Wake { id } => {
            let v = with_progress(format!("waking {id}"), !out.json, client.wake(&id), quiet).await?;
            out.show(&v, |v| print(std::slice::from_ref(v)));
        }
        SessionCmd::Fork { id, count } => {
            let req = ForkSession { count, ..Default::default() };
            let v = with_progress(format!("forking {id} ×{count}"), !out.json, client.fork(&id, &req), quiet).await?;
            out.show(&v, |v| print(v));
        }
        SessionCmd::Rm { ids } => {
            for id in ids {
                client.delete_session(&id).await?;
                if !out.json {
                    println!("deleted {id}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse_cmd as parse, Cmd};

    #[test]
    fn session_create_arguments_make_the_request() {
        let Cmd::Session { cmd: SessionCmd::Create(a) } = parse(&[
            "session",
            "create",
            "py",
            "--id",
            "s1",
            "--idle-timeout",
            "60",
            "--on-idle",
            "stop",
            "--pre-stop",
            "sync",
            "--meta",
            "user=ada",
            "--ttl",
            "30",
        ]) else {
            panic!("not session create")
        };
        let r = a.request().unwrap();
        assert_eq!(
            (r.template.as_deref(), r.id.as_deref(), r.idle_timeout_s, r.ttl_s),
            (Some("py"), Some("s1"), Some(60), Some(30))
        );
        assert_eq!(r.on_idle, OnIdle::Stop);
        assert_eq!(r.pre_stop.unwrap().argv, ["sh", "-c", "sync"]);
        assert_eq!(r.metadata.get("user").map(String::as_str), Some("ada"));
        assert!(r.network.is_none());
        let rec = crate::services::sessions::SessionRecord::new(
            "s1",
            &CreateSession::default(),
            "b".into(),
            60,
            false,
            None,
            0,
        );
        let t = session_table(&[rec]);
        assert!(t.lines().nth(1).is_some_and(|l| l.starts_with("s1 ") && l.contains("starting")), "{t}");
    }
}
