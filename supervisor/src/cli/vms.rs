//! `flint vm ...`, `flint exec`, `flint run`, `flint cp`, `flint mount`.
use std::io::Write;

use clap::{Args, Subcommand};
use flint_agent::protocol::ExecRequest;

use super::{net::NetArgs, pairs, usage, CliError, Out};
use crate::client::progress::with_progress;
use crate::client::{Client, ExecLine, RunCode, RunLine};
use crate::vm::{CreateVm, DriveSpec, VmRecord, VolumeMount};

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Boot a VM from an image.
    Create(Box<CreateArgs>),
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

#[derive(Args, Debug)]
pub struct CreateArgs {
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
    /// A CPU limit, a fraction of one core (0.25 = a quarter); needs the jail.
    #[arg(long)]
    cpu: Option<f64>,
    /// Extra block device: PATH[,ro][,bw=BYTES_PER_S][,iops=N] (repeatable; bw and iops limit the guest's I/O, kept in snapshots).
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// Environment for execs: KEY=VALUE (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    #[command(flatten)]
    net: NetArgs,
}

impl CreateArgs {
    fn request(&self) -> Result<CreateVm, CliError> {
        Ok(CreateVm {
            id: self.id.clone(),
            image: self.image.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            drives: drive_specs(&self.drives)?,
            env: pairs("--env", &self.env)?,
            network: self.net.request()?,
            disk_mib: self.disk_mib,
            cpu: self.cpu,
        })
    }
}

#[derive(Args, Debug)]
pub struct ExecArgs {
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
}

#[derive(Args, Debug)]
pub struct RunArgs {
    vm: String,
    /// The code; `-` reads it from stdin.
    code: String,
    #[arg(long, default_value = "python")]
    language: String,
    #[arg(long)]
    timeout_ms: Option<u64>,
}

/// `PATH[,ro][,bw=BYTES_PER_S][,iops=N]` arguments as drives.
pub fn drive_specs(args: &[String]) -> Result<Vec<DriveSpec>, CliError> {
    args.iter()
        .map(|d| {
            let mut parts = d.split(',');
            let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| usage("--drive needs a path"))?;
            let mut spec = DriveSpec { path: path.into(), ..Default::default() };
            for opt in parts {
                match opt {
                    "ro" => spec.read_only = true,
                    o if flint_vmm_api::config::parse_limit_option(o, &mut spec.rate_limiter).map_err(usage)? => {}
                    o => return Err(usage(format!("--drive {d}: unknown option `{o}` (ro, bw=BYTES_PER_S, iops=N)"))),
                }
            }
            Ok(spec)
        })
        .collect()
}

/// `HOSTDIR:GUESTPATH[:ro|:rw]` as a mount (the host directory made absolute).
pub fn mount_spec(spec: &str) -> Result<VolumeMount, CliError> {
    let mut parts = spec.split(':');
    let (Some(src), Some(path)) = (parts.next(), parts.next()) else {
        return Err(usage(format!("`{spec}`: expected HOSTDIR:GUESTPATH[:ro]")));
    };
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(o) => return Err(usage(format!("`{spec}`: unknown option `{o}` (ro or rw)"))),
    };
    let source = std::path::absolute(src).map_err(|source| CliError::Io { what: src.into(), source })?;
    Ok(VolumeMount { source, path: path.into(), read_only })
}

pub fn print_vms(v: &[VmRecord]) {
    print!("{}", vm_table(v));
}

/// The table `flint vm ls` prints.
pub fn vm_table(v: &[VmRecord]) -> String {
    use std::fmt::Write;
    let mut t = format!("{:<24} {:<9} {:>8} {:>10} {:<20} ERROR\n", "ID", "STATUS", "MEM MiB", "READY ms", "FROM");
    for vm in v {
        let _ = writeln!(
            t,
            "{:<24} {:<9} {:>8} {:>10} {:<20} {}",
            vm.id,
            vm.status.name(),
            vm.mem_mib,
            vm.timings.ready_ms.map(|m| format!("{m:.0}")).unwrap_or("-".into()),
            vm.snapshot.as_deref().or(vm.image.as_deref()).unwrap_or("-"),
            vm.error.as_deref().unwrap_or("")
        );
    }
    t
}

/// While a boot runs: what its VM is doing, from the VM list (it is the newest VM booted from an image).
pub(super) async fn boot_phase(client: &Client, since_ms: u64) -> Option<String> {
    let vms = client.vms().await.ok()?;
    let status = vms.iter().filter(|v| v.created_unix_ms >= since_ms && v.snapshot.is_none()).map(|v| v.status).next();
    Some(match status {
        None => "starting".into(),
        Some(crate::vm::VmStatus::Starting) => "booting the VM".into(),
        Some(crate::vm::VmStatus::Running) => "running the init command, snapshotting".into(),
        Some(_) => "storing the snapshot".into(),
    })
}

pub async fn vm(client: &Client, out: &Out, cmd: VmCmd) -> Result<(), CliError> {
    match cmd {
        VmCmd::Create(a) => {
            let req = a.request()?;
            let since = flint_vmm_api::now_unix_ms();
            let label = "booting a VM (until its agent answers)".to_string();
            let v = with_progress(label, !out.json, client.create_vm(&req), || boot_phase(client, since)).await?;
            out.show(&v, |v| print_vms(std::slice::from_ref(v)));
        }
        VmCmd::Ls => out.show(&client.vms().await?, |v| print_vms(v)),
        VmCmd::Get { id } => out.pretty(&client.vm(&id).await?),
        VmCmd::Rm { ids } => {
            for id in ids {
                client.delete_vm(&id).await?;
                if !out.json {
                    println!("deleted {id}");
                }
            }
        }
        VmCmd::Pause { id } => out.show(&client.pause_vm(&id).await?, |v| print_vms(std::slice::from_ref(v))),
        VmCmd::Resume { id } => out.show(&client.resume_vm(&id).await?, |v| print_vms(std::slice::from_ref(v))),
    }
    Ok(())
}

/// Prints an exec's or run's output line as it comes (every line as JSON with `--json`).
fn echo_line<T: serde::Serialize>(json: bool, line: &T, stdout: Option<&str>, stderr: Option<&str>) {
    if json {
        println!("{}", serde_json::to_string(line).unwrap_or_default());
        return;
    }
    if let Some(s) = stdout {
        print!("{s}");
        let _ = std::io::stdout().flush();
    }
    if let Some(s) = stderr {
        eprint!("{s}");
    }
}

pub async fn exec(client: &Client, out: &Out, a: ExecArgs) -> Result<i32, CliError> {
    let req = ExecRequest { argv: a.argv, timeout_ms: a.timeout_ms, cwd: a.cwd, ..Default::default() };
    if a.interactive || a.tty {
        return super::interactive::exec(client.target(), &a.vm, req, a.tty).await;
    }
    // Output is printed as the guest produces it (NDJSON lines over a chunked response).
    let exit = client
        .exec(&a.vm, &req, |l| match l {
            ExecLine::Stdout(s) => echo_line(out.json, l, Some(s), None),
            ExecLine::Stderr(s) => echo_line(out.json, l, None, Some(s)),
            other => echo_line(out.json, other, None, None),
        })
        .await?;
    if exit.timed_out {
        eprintln!("flint: the command timed out");
    }
    Ok(exit.shell_code())
}

/// `flint run`: prints the code's output as it comes, then its value or traceback; the exit code says how it ended
/// (0 ok, 1 an exception, 124 a timeout).
pub async fn run_code(client: &Client, out: &Out, a: RunArgs) -> Result<i32, CliError> {
    let code = if a.code == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|source| CliError::Io { what: "read stdin".into(), source })?;
        s
    } else {
        a.code
    };
    let req = RunCode { language: a.language, code, timeout_ms: a.timeout_ms };
    let r = client
        .run(&a.vm, &req, |l| match l {
            RunLine::Stdout(s) => echo_line(out.json, l, Some(s), None),
            RunLine::Stderr(s) => echo_line(out.json, l, None, Some(s)),
            other => echo_line(out.json, other, None, None),
        })
        .await?;
    if !out.json {
        if let Some(v) = &r.value {
            println!("{v}");
        }
        match &r.error {
            Some(e) if !e.traceback.is_empty() => eprint!("{}", e.traceback),
            Some(e) => eprintln!("{}: {}", if e.name.is_empty() { "error" } else { &e.name }, e.message),
            None => {}
        }
    }
    let code = r.exit_code();
    if code == 124 {
        eprintln!("flint: the code ran past its timeout and was interrupted");
    }
    Ok(code)
}

pub async fn mount(client: &Client, out: &Out, vm: &str, spec: &str) -> Result<(), CliError> {
    let m = mount_spec(spec)?;
    let r = client.mount(vm, &m).await?;
    out.show(&r, |r| {
        for m in &r.mounts {
            println!("{} -> {}{}", m.source.display(), m.path, if m.read_only { " (ro)" } else { "" });
        }
    });
    Ok(())
}

pub async fn cp(client: &Client, out: &Out, src: &str, dst: &str, mode: &str) -> Result<(), CliError> {
    match (src.split_once(":/"), dst.split_once(":/")) {
        (None, Some((vm, path))) => {
            let data = std::fs::read(src).map_err(|source| CliError::Io { what: format!("read {src}"), source })?;
            let mode = u32::from_str_radix(mode, 8).map_err(|_| usage(format!("--mode `{mode}` is not octal")))?;
            let w = client.write_file(vm, &format!("/{path}"), mode, &data).await?;
            if out.json {
                out.pretty(&w);
            }
        }
        (Some((vm, path)), None) => {
            let data = client.read_file(vm, &format!("/{path}"), None).await?;
            std::fs::write(dst, data).map_err(|source| CliError::Io { what: format!("write {dst}"), source })?;
        }
        _ => return Err(usage("exactly one of SRC and DST must be VM:/path")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse_cmd as parse, Cmd};

    #[test]
    fn vm_create_arguments_make_the_request() {
        let Cmd::Vm { cmd: VmCmd::Create(a) } = parse(&[
            "vm",
            "create",
            "--image",
            "python",
            "--disk-mib",
            "64",
            "--drive",
            "/d.img,ro,bw=1000",
            "--env",
            "K=v",
            "--expose",
            "8080:secret-token",
            "--default-deny",
            "--allow",
            "pypi.org",
        ]) else {
            panic!("not vm create")
        };
        let r = a.request().unwrap();
        assert_eq!((r.image.as_deref(), r.disk_mib), (Some("python"), Some(64)));
        assert!(r.drives[0].read_only && r.drives[0].rate_limiter.is_some());
        assert_eq!(r.env.get("K").map(String::as_str), Some("v"));
        let n = r.network.unwrap();
        assert_eq!(n.ports[&8080].token.as_deref(), Some("secret-token"));
        assert_eq!(
            (n.egress.default, n.egress.allow.clone()),
            (crate::net::Verdict::Deny, vec!["pypi.org".to_string()])
        );
        assert!(drive_specs(&["/d,zz".into()]).unwrap_err().to_string().contains("unknown option `zz`"));
        assert!(drive_specs(&[",ro".into()]).is_err());
    }

    #[test]
    fn mounts_and_exec_parse() {
        let m = mount_spec("/srv/data:/mnt/x:ro").unwrap();
        assert_eq!((m.path.as_str(), m.read_only), ("/mnt/x", true));
        assert!(mount_spec("/srv").is_err() && mount_spec("/a:/b:zz").is_err());
        let Cmd::Exec(e) = parse(&["exec", "-it", "s1", "--", "sh", "-c", "echo"]) else { panic!("not exec") };
        assert!(e.interactive && e.tty && e.argv == ["sh", "-c", "echo"]);
    }

    #[test]
    fn the_vm_table_shows_each_record() {
        let r: VmRecord = serde_json::from_str(
            r#"{"id":"a","status":"running","pid":1,"pid_start":1,"dir":"/d","image":"default","snapshot":null,
                "mem_mib":256,"vcpus":1,"created_unix_ms":1,"ready_ms":12.4,"error":null}"#,
        )
        .unwrap();
        let t = vm_table(&[r]);
        let row = t.lines().nth(1).unwrap();
        assert!(
            row.starts_with("a ") && row.contains("running") && row.contains(" 12 ") && row.contains("default"),
            "{t}"
        );
    }
}
