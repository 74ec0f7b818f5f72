//! `flint net ...`, `flint port ...`, and the network flags of `vm create`, `clone` and `session create`.
use clap::{Args, Subcommand};

use super::{usage, CliError, Out};
use crate::client::Client;
use crate::net::{EgressPolicy, ExposedPort, NetworkRequest, Verdict};
use crate::services::network::NetworkView;

/// An egress policy (docs/networking.md).
#[derive(Args, Clone, Default, Debug)]
pub struct PolicyArgs {
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

    pub fn policy(&self) -> EgressPolicy {
        EgressPolicy {
            default: if self.default_deny { Verdict::Deny } else { Verdict::Allow },
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }
}

/// A network for a new VM, clone or session.
#[derive(Args, Clone, Default, Debug)]
pub struct NetArgs {
    /// Give it a network of its own (implied by the options below).
    #[arg(long)]
    net: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Expose a guest port through the front end: PORT[:TOKEN] (repeatable); TOKEN `auto` has flintd make one,
    /// printed once in the answer.
    #[arg(long = "expose")]
    expose: Vec<String>,
}

impl NetArgs {
    /// The request the flags ask for; none without any.
    pub fn request(&self) -> Result<Option<NetworkRequest>, CliError> {
        if !self.net && self.policy.is_empty() && self.expose.is_empty() {
            return Ok(None);
        }
        let mut req = NetworkRequest { egress: self.policy.policy(), ..Default::default() };
        for e in &self.expose {
            let (p, token) = match e.split_once(':') {
                Some((p, t)) => (p, Some(t.to_string())),
                None => (e.as_str(), None),
            };
            let port = p.parse::<u16>().map_err(|_| usage(format!("--expose {e:?}: expected PORT[:TOKEN]")))?;
            req.ports.insert(port, ExposedPort { token, tcp_listen: None });
        }
        Ok(Some(req))
    }
}

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    /// Address, MAC, egress policy and exposed ports.
    Show { id: String },
    /// Replace the egress policy (applies to the running VM at once).
    Policy {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum PortCmd {
    Ls {
        id: String,
    },
    /// Expose guest port PORT of ID through the HTTP front end, optionally behind an access token, or also as
    /// plain TCP on front-end port --tcp (within network.tcp_ports). `--token auto` has flintd make one (printed
    /// once); a token of your own is at least 22 characters of [A-Za-z0-9-_.~].
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

pub async fn net(client: &Client, out: &Out, cmd: NetCmd) -> Result<(), CliError> {
    match cmd {
        NetCmd::Show { id } => out.pretty(&client.network(&id).await?),
        NetCmd::Policy { id, policy } => out.pretty(&client.set_egress(&id, &policy.policy()).await?),
    }
    Ok(())
}

/// The table `flint port ls` prints.
pub fn port_table(v: &NetworkView) -> String {
    v.ports
        .iter()
        .map(|p| {
            let shown = p.access_token.as_deref().map(|t| format!(" (token {t}: shown once)")).unwrap_or_default();
            format!(
                "{:<6} {:<6} {} {}{shown}\n",
                p.port,
                if p.token { "token" } else { "open" },
                p.url.as_deref().unwrap_or("(front end off)"),
                p.tcp.as_deref().map(|t| format!("tcp {t}")).unwrap_or_default()
            )
        })
        .collect()
}

pub async fn port(client: &Client, out: &Out, cmd: PortCmd) -> Result<(), CliError> {
    let v = match cmd {
        PortCmd::Ls { id } => client.network(&id).await?,
        PortCmd::Expose { id, port, token, tcp } => {
            client.expose_port(&id, port, &ExposedPort { token, tcp_listen: tcp }).await?
        }
        PortCmd::Rm { id, port } => client.hide_port(&id, port).await?,
    };
    out.show(&v, |v| print!("{}", port_table(v)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse_cmd as parse, Cmd};

    #[test]
    fn policy_and_port_flags() {
        let Cmd::Net { cmd: NetCmd::Policy { policy, .. } } =
            parse(&["net", "policy", "s1", "--default-deny", "--allow", "10.0.0.0/8", "--deny", "evil.test"])
        else {
            panic!("not net policy")
        };
        let p = policy.policy();
        assert_eq!((p.default, p.allow, p.deny), (Verdict::Deny, vec!["10.0.0.0/8".into()], vec!["evil.test".into()]));
        let none = NetArgs::default();
        assert_eq!(none.request().unwrap(), None);
        let bad = NetArgs { expose: vec!["http".into()], ..Default::default() };
        assert!(bad.request().unwrap_err().to_string().contains("PORT[:TOKEN]"));
        let view = NetworkView {
            id: "s".into(),
            vm: None,
            address: None,
            mac: None,
            egress: EgressPolicy::default(),
            ports: vec![crate::services::network::PortView {
                port: 80,
                url: None,
                token: true,
                access_token: None,
                tcp: Some("1.2.3.4:9".into()),
            }],
        };
        assert_eq!(port_table(&view), "80     token  (front end off) tcp 1.2.3.4:9\n");
    }
}
