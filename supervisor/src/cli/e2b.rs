//! `flint e2b key create|ls|rm`: the API keys of flintd's E2B endpoint (docs/e2b.md).
use clap::Subcommand;

use super::{CliError, Out};
use crate::client::Client;

#[derive(Subcommand, Debug)]
pub enum E2bCmd {
    /// E2B API keys (`E2B_API_KEY`): create prints a new key once.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// A new key, printed on stdout (stored hashed: it is never shown again).
    Create {
        #[arg(long, default_value = "")]
        name: String,
    },
    Ls,
    Rm {
        id: String,
    },
}

pub async fn e2b(client: &Client, out: &Out, cmd: E2bCmd) -> Result<(), CliError> {
    let E2bCmd::Key { cmd } = cmd;
    match cmd {
        KeyCmd::Create { name } => {
            let k = client.create_e2b_key(&name).await?;
            out.show(&k, |k| println!("{}", k.key));
        }
        KeyCmd::Ls => {
            let keys = client.e2b_keys().await?;
            out.show(&keys, |keys| {
                for k in keys {
                    println!("{:<14} {:<10} {}", k.id, k.prefix, k.name);
                }
            });
        }
        KeyCmd::Rm { id } => {
            client.delete_e2b_key(&id).await?;
            out.show(&serde_json::json!({"deleted": id}), |_| println!("deleted {id}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse_cmd as parse, Cmd};

    #[test]
    fn key_commands_parse() {
        let Cmd::E2b { cmd: E2bCmd::Key { cmd: KeyCmd::Create { name } } } =
            parse(&["e2b", "key", "create", "--name", "ci"])
        else {
            panic!("not e2b key create")
        };
        assert_eq!(name, "ci");
        assert!(matches!(
            parse(&["e2b", "key", "rm", "abc"]),
            Cmd::E2b { cmd: E2bCmd::Key { cmd: KeyCmd::Rm { .. } } }
        ));
        assert!(matches!(parse(&["e2b", "key", "ls"]), Cmd::E2b { cmd: E2bCmd::Key { cmd: KeyCmd::Ls } }));
    }
}
