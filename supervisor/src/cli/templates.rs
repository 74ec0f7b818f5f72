//! `flint template ...`, `flint clone`, `flint snapshot ...`, `flint image ...`, `flint cache ...`.
use clap::{Args, Subcommand};

use super::{net::NetArgs, CliError, Out};
use crate::client::progress::with_progress;
use crate::client::Client;
use crate::services::images::ImportImage;
use crate::services::pools::CreateClones;
use crate::services::templates::CreateTemplate;
use crate::vm::CreateSnapshot;

#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// Drop every chunk not pinned by a running VM (the next restore fetches from S3).
    Clear,
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
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

#[derive(Subcommand, Debug)]
pub enum SnapCmd {
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

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// flint template create NAME [--image I] [--push] [-- INIT CMD...]
    Create(TemplateArgs),
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

#[derive(Args, Debug)]
pub struct TemplateArgs {
    name: String,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    push: bool,
    /// A disk-rooted image's writable disk (every clone's and session's storage quota), MiB.
    #[arg(long)]
    disk_mib: Option<u64>,
    /// Block device of the template's VM: PATH[,ro][,bw=BYTES_PER_S][,iops=N] (repeatable). Its content at snapshot
    /// time is part of the snapshot; every clone gets its own copy.
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// Keep this many clones restored and paused (the warm pool): clones and sessions of the template take one.
    #[arg(long, default_value_t = 0)]
    pool: u32,
    /// A CPU limit, a fraction of one core, for the template's VM and (by default) its clones and sessions.
    #[arg(long)]
    cpu: Option<f64>,
    #[arg(last = true)]
    init: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    template: Option<String>,
    #[arg(long)]
    snapshot: Option<String>,
    #[arg(short = 'n', long, default_value_t = 1)]
    count: u32,
    /// Start before memory arrives (pages fetched on first touch, working set prefetched).
    #[arg(long)]
    lazy: bool,
    /// A CPU limit, a fraction of one core; default: the template's.
    #[arg(long)]
    cpu: Option<f64>,
    #[command(flatten)]
    net: NetArgs,
}

impl TemplateArgs {
    fn request(&self) -> Result<CreateTemplate, CliError> {
        Ok(CreateTemplate {
            name: self.name.clone(),
            image: self.image.clone(),
            disk_mib: self.disk_mib,
            init: self.init.clone(),
            publish: self.push,
            drives: super::vms::drive_specs(&self.drives)?,
            pool_size: self.pool,
            cpu: self.cpu,
            ..Default::default()
        })
    }
}

impl CloneArgs {
    fn request(&self) -> Result<CreateClones, CliError> {
        Ok(CreateClones {
            template: self.template.clone(),
            snapshot: self.snapshot.clone(),
            count: self.count,
            lazy: self.lazy,
            network: self.net.request()?,
            cpu: self.cpu,
            ..Default::default()
        })
    }
}

/// The table `flint snapshot ls` prints.
pub fn snapshot_table(v: &[flint_snapshot_store::SnapshotInfo]) -> String {
    use std::fmt::Write;
    let mut t = format!("{:<28} {:>10} {:>10} {:<6} {:<6}\n", "ID", "LOGICAL MB", "STORED MB", "LOCAL", "S3");
    for s in v {
        let _ = writeln!(
            t,
            "{:<28} {:>10.1} {:>10.1} {:<6} {:<6}",
            s.id,
            s.logical_bytes as f64 / 1e6,
            s.stored_bytes as f64 / 1e6,
            if s.local_complete { "yes" } else { "no" },
            if s.remote { "yes" } else { "no" }
        );
    }
    t
}

pub async fn image(client: &Client, out: &Out, cmd: ImageCmd) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Ls => out.show(&client.images().await?, |v| {
            for i in v {
                println!("{:<16} {}", i.name, i.dir.display());
            }
        }),
        ImageCmd::Import { name, oci, disk_mib } => {
            let oci = std::path::absolute(&oci)
                .map_err(|source| CliError::Io { what: format!("--oci {}", oci.display()), source })?;
            let req = ImportImage { name: name.clone(), oci, disk_mib };
            let quiet = || async { None::<String> };
            let v =
                with_progress(format!("importing image {name}"), !out.json, client.import_image(&req), quiet).await?;
            out.pretty(&v);
        }
    }
    Ok(())
}

pub async fn snapshot(client: &Client, out: &Out, cmd: SnapCmd) -> Result<(), CliError> {
    let quiet = || async { None::<String> };
    match cmd {
        SnapCmd::Create { vm, id, push } => {
            out.pretty(&client.snapshot_vm(&vm, &CreateSnapshot { id, publish: push }).await?)
        }
        SnapCmd::Ls => out.show(&client.snapshots().await?, |v| print!("{}", snapshot_table(v))),
        SnapCmd::Rm { id, remote } => client.delete_snapshot(&id, remote).await?,
        SnapCmd::Push { id } => out.pretty(
            &with_progress(format!("uploading snapshot {id}"), !out.json, client.push_snapshot(&id), quiet).await?,
        ),
        SnapCmd::Pull { id } => out.pretty(
            &with_progress(format!("downloading snapshot {id}"), !out.json, client.pull_snapshot(&id), quiet).await?,
        ),
    }
    Ok(())
}

pub async fn template(client: &Client, out: &Out, cmd: TemplateCmd) -> Result<(), CliError> {
    match cmd {
        TemplateCmd::Create(a) => {
            let req = a.request()?;
            let since = flint_vmm_api::now_unix_ms();
            let label = format!("creating template {}", a.name);
            let v =
                with_progress(label, !out.json, client.create_template(&req), || super::vms::boot_phase(client, since))
                    .await?;
            out.pretty(&v);
        }
        TemplateCmd::Ls => out.pretty(&client.templates().await?),
        TemplateCmd::Rm { name } => client.delete_template(&name).await?,
        TemplateCmd::Pool { name, size } => out.pretty(&client.set_pool(&name, size).await?),
    }
    Ok(())
}

pub async fn clone(client: &Client, out: &Out, a: CloneArgs) -> Result<(), CliError> {
    let req = a.request()?;
    // The clones' records name the snapshot (a template's is tmpl-NAME).
    let source = a.snapshot.clone().or_else(|| a.template.as_ref().map(|t| format!("tmpl-{t}")));
    let since = flint_vmm_api::now_unix_ms();
    let label = format!("restoring {} clone(s){}", a.count, if a.lazy { " lazily" } else { "" });
    let phase = || {
        let source = source.clone();
        async move {
            let vms = client.vms().await.ok()?;
            let mut counts = std::collections::BTreeMap::<&str, u32>::new();
            for v in vms.iter().filter(|v| v.created_unix_ms >= since && v.snapshot == source) {
                *counts.entry(v.status.name()).or_default() += 1;
            }
            Some(counts.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", "))
        }
    };
    let v = with_progress(label, !out.json, client.clones(&req), phase).await?;
    out.show(&v, |v| super::vms::print_vms(v));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse_cmd as parse, Cmd};

    #[test]
    fn template_and_clone_arguments_make_the_request() {
        let Cmd::Template { cmd: TemplateCmd::Create(a) } = parse(&[
            "template", "create", "py", "--image", "python", "--pool", "2", "--push", "--", "python3", "-c", "1",
        ]) else {
            panic!("not template create")
        };
        let r = a.request().unwrap();
        assert_eq!((r.name.as_str(), r.pool_size, r.publish), ("py", 2, true));
        assert_eq!(r.init, ["python3", "-c", "1"]);
        let Cmd::Clone(c) = parse(&["clone", "py", "-n", "3", "--lazy", "--net"]) else { panic!("not clone") };
        let r = c.request().unwrap();
        assert_eq!((r.template.as_deref(), r.count, r.lazy, r.network.is_some()), (Some("py"), 3, true, true));
        let info = flint_snapshot_store::SnapshotInfo {
            id: "s".into(),
            parent: None,
            created_unix_ms: 0,
            logical_bytes: 2_000_000,
            stored_bytes: 500_000,
            chunks: 1,
            local: true,
            local_complete: true,
            remote: false,
            metadata: Default::default(),
        };
        assert!(snapshot_table(&[info]).contains("s                                   2.0        0.5 yes    no"));
    }
}
