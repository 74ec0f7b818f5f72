//! A sandbox's processes as envd's `Process` service sees them: started through the agent's exec, kept by pid on
//! the host (not in the guest), so that `Connect` re-attaches to one, `SendInput`/`SendSignal`/`CloseStdin`/`Update`
//! reach it and `List` names it, whether or not the stream that started it is still open.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flint_agent::client::{AgentClient, ClientError, ExecEvent};
use flint_agent::protocol::ExecRequest;
use flint_vmm_api::lock;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::services::sessions::Activity;

/// What a process does, as its streams carry it.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Terminal output (a process started with a PTY).
    Pty(Vec<u8>),
    End {
        code: Option<i32>,
        signal: Option<i32>,
        error: Option<String>,
    },
}

/// What a caller asks of a running process.
#[derive(Debug)]
pub enum Ctl {
    Stdin(Vec<u8>),
    CloseStdin,
    Signal(i32),
    Resize(u16, u16),
}

/// One process.
pub struct Proc {
    pub pid: u32,
    pub tag: Option<String>,
    /// Its `ProcessConfig` as the caller gave it (`List` answers it).
    pub config: serde_json::Value,
    pub stdin: bool,
    events: broadcast::Sender<ProcEvent>,
    ctl: mpsc::Sender<Ctl>,
}

impl Proc {
    /// Events from now on (a re-attach).
    pub fn subscribe(&self) -> broadcast::Receiver<ProcEvent> {
        self.events.subscribe()
    }

    /// Sends `c` to the process; `false` if it has ended.
    pub async fn send(&self, c: Ctl) -> bool {
        self.ctl.send(c).await.is_ok()
    }
}

/// A sandbox's processes by pid.
#[derive(Default)]
pub struct Procs {
    map: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl Procs {
    pub fn get(&self, pid: u32) -> Option<Arc<Proc>> {
        lock(&self.map).get(&pid).cloned()
    }

    pub fn by_tag(&self, tag: &str) -> Option<Arc<Proc>> {
        lock(&self.map).values().find(|p| p.tag.as_deref() == Some(tag)).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Proc>> {
        let mut v: Vec<_> = lock(&self.map).values().cloned().collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// Forgets every process (the sandbox's VM is going: their agent streams end with it).
    pub fn clear(&self) {
        lock(&self.map).clear();
    }

    /// Starts `req` through `agent` and keeps it here until it ends; `activity` (the session's) is held as long
    /// as it runs. Returns the process and the stream of its events for the caller that started it (closing that
    /// stream leaves the process running: E2B's background commands).
    pub async fn start(
        self: &Arc<Self>,
        agent: Arc<AgentClient>,
        activity: Option<Activity>,
        req: ExecRequest,
        tag: Option<String>,
        config: serde_json::Value,
    ) -> Result<(Arc<Proc>, mpsc::Receiver<ProcEvent>), ClientError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (first_tx, first_rx) = mpsc::channel(256);
        let (events, _) = broadcast::channel(1024);
        let (ctl_tx, mut ctl_rx) = mpsc::channel(64);
        let procs = self.clone();
        let stdin = req.stdin;
        let pty = req.tty.is_some();
        tokio::spawn(async move {
            let _activity = activity;
            let mut s = match agent.exec(req).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let pid = s.pid;
            let proc = Arc::new(Proc { pid, tag, config, stdin, events: events.clone(), ctl: ctl_tx });
            lock(&procs.map).insert(pid, proc.clone());
            let _ = ready_tx.send(Ok(proc));
            let mut first = Some(first_tx);
            let mut ctl_open = true;
            loop {
                tokio::select! {
                    ev = s.next() => {
                        let ev = match ev {
                            Ok(Some(ExecEvent::Stdout(b))) if pty => ProcEvent::Pty(b),
                            Ok(Some(ExecEvent::Stdout(b))) => ProcEvent::Stdout(b),
                            Ok(Some(ExecEvent::Stderr(b))) => ProcEvent::Stderr(b),
                            Ok(Some(ExecEvent::Exit { code, signal, .. })) => ProcEvent::End { code, signal, error: None },
                            Ok(None) => break,
                            Err(e) => ProcEvent::End { code: None, signal: None, error: Some(e.to_string()) },
                        };
                        let last = matches!(ev, ProcEvent::End { .. });
                        if let Some(f) = &first {
                            if f.send(ev.clone()).await.is_err() {
                                first = None;
                            }
                        }
                        let _ = events.send(ev);
                        if last {
                            break;
                        }
                    }
                    c = ctl_rx.recv(), if ctl_open => {
                        let _ = match c {
                            Some(Ctl::Stdin(d)) => s.write_stdin(&d).await,
                            Some(Ctl::CloseStdin) => s.close_stdin().await,
                            Some(Ctl::Signal(n)) => s.signal(n).await,
                            Some(Ctl::Resize(rows, cols)) => s.resize(rows, cols).await,
                            None => {
                                ctl_open = false;
                                Ok(())
                            }
                        };
                    }
                }
            }
            lock(&procs.map).remove(&pid);
        });
        let proc = ready_rx.await.map_err(|_| ClientError::Closed)??;
        Ok((proc, first_rx))
    }
}
