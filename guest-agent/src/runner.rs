//! Warm code runners (docs/agent-protocol.md, "Runners"): long-lived interpreters an image names in
//! `/etc/flint/image.json`, started at boot so that a template's snapshot captures them warm. One run at a time per
//! runner; its globals live on between runs.
//!
//! The runner reads requests (one JSON line) on its fd 3 and answers on its fd 4; its fds 1 and 2 are the code's
//! stdout and stderr, streamed to the caller while the code runs. A run past its timeout gets SIGINT; a runner that
//! does not answer within [`INTERRUPT_GRACE`] after that is killed and started again (its state is lost, and the
//! answer says so).
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::protocol::{kind, Frame, Response, RunError, RunRequest, RunStatus, CHUNK};
use crate::reaper::{nonblocking, Reaper};

/// How long a runner may take to say it is ready (an interpreter starting in an emulated guest is slow).
pub const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long an interrupted run may take to answer before its runner is killed.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// An interrupted run is interrupted again this often until it answers: the runner drops an interrupt that lands
/// while it is not running a cell (one meant for a run that had just answered), so one that lands while it still
/// reads the request is not lost either.
const INTERRUPT_AGAIN: Duration = Duration::from_millis(100);
/// Longest reply line a runner may send.
const MAX_REPLY: u64 = 1 << 20;

/// A runner as the image describes it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RunnerSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// What a disk-rooted image tells the agent (`/etc/flint/image.json`): the one type for it, written by flintd's
/// OCI import (serialized from this type) and by images/image.py (checked against it by the Python image's test).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ImageConfig {
    #[serde(default)]
    pub name: String,
    /// For every process the agent starts.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where an exec without a `cwd` runs.
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub runners: BTreeMap<String, RunnerSpec>,
}

impl ImageConfig {
    pub const PATH: &'static str = "/etc/flint/image.json";

    /// The image's configuration below `root`; none (the default image) is an empty one.
    pub fn load(root: &std::path::Path) -> Result<ImageConfig, String> {
        let path = root.join(Self::PATH.trim_start_matches('/'));
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ImageConfig::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

struct Proc {
    pid: u32,
    requests: pipe::Sender,
    replies: BufReader<pipe::Receiver>,
    out: pipe::Receiver,
    err: pipe::Receiver,
    exit: oneshot::Receiver<ExitStatus>,
    next_id: u64,
}

#[derive(Default)]
struct Slot {
    proc: Option<Proc>,
    /// The refresh generation the runner last reseeded for.
    seeded: u64,
}

/// Every runner of the image.
pub struct Runners {
    specs: BTreeMap<String, RunnerSpec>,
    slots: BTreeMap<String, Mutex<Slot>>,
    /// Bumped by every refresh (a restore): the next run reseeds the interpreter's PRNG.
    generation: AtomicU64,
}

/// The answer of one reply line.
#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    error: Option<RunError>,
}

impl Runners {
    pub fn new(specs: BTreeMap<String, RunnerSpec>) -> Self {
        let slots = specs.keys().map(|k| (k.clone(), Mutex::new(Slot::default()))).collect();
        Runners { specs, slots, generation: AtomicU64::new(0) }
    }

    pub fn names(&self) -> Vec<String> {
        self.specs.keys().cloned().collect()
    }

    /// A refresh happened (the VM may be a clone): runs from now on reseed.
    pub fn refreshed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts every runner that is not running and waits until each is ready (at boot, and before a checkpoint so
    /// the snapshot holds warm runners).
    pub async fn warm(&self, reaper: &Reaper, env: &[(String, String)]) -> Result<(), String> {
        for (name, slot) in &self.slots {
            let mut slot = slot.lock().await;
            self.ensure(name, &mut slot, reaper, env).await?;
        }
        Ok(())
    }

    async fn ensure(
        &self,
        name: &str,
        slot: &mut Slot,
        reaper: &Reaper,
        env: &[(String, String)],
    ) -> Result<(), String> {
        if let Some(p) = slot.proc.as_mut() {
            match p.exit.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                _ => slot.proc = None, // exited since its last run
            }
        }
        let spec = &self.specs[name];
        let mut proc =
            start(spec, reaper, env).map_err(|e| format!("runner `{name}`: cannot start {:?}: {e}", spec.argv))?;
        let ready = tokio::time::timeout(START_TIMEOUT, read_reply(&mut proc.replies)).await;
        match ready {
            Ok(Ok(r)) if r.ready => {
                slot.proc = Some(proc);
                Ok(())
            }
            other => {
                // SAFETY: kill(2) on the runner we started; no memory is involved.
                unsafe { libc::kill(proc.pid as i32, libc::SIGKILL) };
                let why = match other {
                    Ok(Ok(_)) => "its first line was not `ready`".to_string(),
                    Ok(Err(e)) => e,
                    Err(_) => format!("not ready within {} s", START_TIMEOUT.as_secs()),
                };
                Err(format!("runner `{name}` did not start: {why}"))
            }
        }
    }

    /// One run; streams the code's output to `tx` on stream `id` and returns the final answer.
    pub async fn run(
        &self,
        reaper: &Reaper,
        env: &[(String, String)],
        req: &RunRequest,
        id: u32,
        tx: &mpsc::Sender<Frame>,
        cancel: &tokio::sync::Notify,
    ) -> Result<Response, String> {
        let started = std::time::Instant::now();
        let (language, code) = (req.language.as_str(), req.code.as_str());
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let Some(slot) = self.slots.get(language) else {
            return Err(format!("no runner `{language}` in this image (it has: {})", self.names().join(", ")));
        };
        let mut slot = slot.lock().await;
        self.ensure(language, &mut slot, reaper, env).await?;
        let generation = self.generation.load(Ordering::Relaxed);
        let reseed = slot.seeded != generation;
        slot.seeded = generation;
        let proc = slot.proc.as_mut().expect("ensured above");
        proc.next_id += 1;
        let rid = proc.next_id;
        let line = serde_json::json!({
            "id": rid, "code": code, "reseed": reseed, "context": req.context, "env": req.env,
        })
        .to_string()
            + "\n";
        if let Err(e) = proc.requests.write_all(line.as_bytes()).await {
            slot.proc = None;
            return Err(format!("runner `{language}`: cannot send the code: {e}"));
        }
        let mut deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut interrupted = false;
        let mut grace: Option<tokio::time::Instant> = None;
        let (mut obuf, mut ebuf) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let (mut out_open, mut err_open) = (true, true);
        let outcome = loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = proc.out.read(&mut obuf), if out_open => match n {
                    Ok(n @ 1..) => { let _ = tx.send(Frame::data(kind::STDOUT, id, obuf[..n].to_vec())).await; }
                    _ => out_open = false,
                },
                n = proc.err.read(&mut ebuf), if err_open => match n {
                    Ok(n @ 1..) => { let _ = tx.send(Frame::data(kind::STDERR, id, ebuf[..n].to_vec())).await; }
                    _ => err_open = false,
                },
                r = read_reply(&mut proc.replies) => match r {
                    Ok(r) if r.id == Some(rid) => break Ok(r),
                    Ok(_) => {} // a stale answer (to an interrupted run that answered late)
                    Err(e) => break Err(e),
                },
                st = &mut proc.exit => break Err(match st {
                    Ok(st) => format!("the runner exited ({st})"),
                    Err(_) => "the runner's exit status was lost".into(),
                }),
                _ = cancel.notified(), if !interrupted => deadline = Some(tokio::time::Instant::now()),
                _ = sleep => {
                    let now = tokio::time::Instant::now();
                    let grace_end = *grace.get_or_insert(now + INTERRUPT_GRACE);
                    if now >= grace_end {
                        break Err(format!("the runner did not stop within {} s of an interrupt", INTERRUPT_GRACE.as_secs()));
                    }
                    interrupted = true;
                    // SAFETY: kill(2) on the runner's pid; no memory is involved.
                    unsafe { libc::kill(proc.pid as i32, libc::SIGINT) };
                    deadline = Some((now + INTERRUPT_AGAIN).min(grace_end));
                }
            }
        };
        // Output written before the answer is already in the pipes: forward it before the answer.
        for (pipe, k) in [(&proc.out, kind::STDOUT), (&proc.err, kind::STDERR)] {
            while let Ok(n @ 1..) = pipe.try_read(&mut obuf) {
                let _ = tx.send(Frame::data(k, id, obuf[..n].to_vec())).await;
            }
        }
        let guest_us = Some(started.elapsed().as_micros() as u64);
        Ok(match outcome {
            Ok(r) => {
                let status = match r.status.as_deref() {
                    Some("ok") => RunStatus::Ok,
                    Some("interrupted") if interrupted => RunStatus::Timeout,
                    _ => RunStatus::Error,
                };
                Response::Ran { status, value: r.value, error: r.error, restarted: false, guest_us }
            }
            Err(why) => {
                if let Some(p) = slot.proc.take() {
                    // SAFETY: kill(2) on the runner's pid; no memory is involved.
                    unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
                }
                let status = if interrupted { RunStatus::Timeout } else { RunStatus::Error };
                let error = RunError {
                    name: "RunnerRestarted".into(),
                    message: format!("{why}; a new runner starts with the next run (earlier state is lost)"),
                    traceback: String::new(),
                };
                Response::Ran { status, value: None, error: Some(error), restarted: true, guest_us }
            }
        })
    }
}

async fn read_reply<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<Reply, String> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_REPLY)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading the runner's answer: {e}"))?;
    if n == 0 {
        return Err("the runner closed its answer pipe".into());
    }
    if !line.ends_with(b"\n") {
        return Err(format!("the runner's answer is longer than {MAX_REPLY} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("the runner's answer is not JSON: {e}"))
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn start(spec: &RunnerSpec, reaper: &Reaper, env: &[(String, String)]) -> std::io::Result<Proc> {
    let (program, args) = spec.argv.split_first().ok_or_else(|| std::io::Error::other("empty argv"))?;
    let (req_r, req_w) = pipe_pair()?;
    let (rep_r, rep_w) = pipe_pair()?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_clear().envs(env.iter().map(|(k, v)| (k, v))).envs(&spec.env);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).current_dir("/");
    let (a, b) = (req_r.as_raw_fd(), rep_w.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe calls: fcntl(F_DUPFD) moves both ends above 9 (so the
    // dup2s cannot overwrite each other), dup2 puts them at 3 and 4 without close-on-exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let (a, b) = (libc::fcntl(a, libc::F_DUPFD, 10), libc::fcntl(b, libc::F_DUPFD, 10));
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = reaper.spawn(&mut cmd)?;
    drop((req_r, rep_w));
    nonblocking(&req_w)?;
    nonblocking(&rep_r)?;
    Ok(Proc {
        pid: child.pid,
        requests: pipe::Sender::from_owned_fd_unchecked(req_w)?,
        replies: BufReader::new(pipe::Receiver::from_owned_fd_unchecked(rep_r)?),
        out: child.stdout.ok_or_else(|| std::io::Error::other("no stdout pipe"))?,
        err: child.stderr.ok_or_else(|| std::io::Error::other("no stderr pipe"))?,
        exit: child.exit,
        next_id: 0,
    })
}
