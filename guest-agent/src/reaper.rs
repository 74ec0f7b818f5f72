//! Child processes: spawning with non-blocking pipes, and one reaper for every child.
//!
//! The agent reaps all children itself (`waitpid(-1)` on SIGCHLD) instead of letting each
//! spawn wait for its own pid: as the guest's PID 1 it inherits orphans too, and a second
//! waiter would steal exit statuses. Exec children register a waiter before the reaper can
//! run (the runtime is single-threaded, and spawn + register has no await in between).
use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};

use tokio::net::unix::pipe;

use crate::lock;
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<u32, oneshot::Sender<ExitStatus>>>,
    pub orphans_reaped: std::sync::atomic::AtomicU64,
}

/// A spawned child with async pipes.
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    pub exit: oneshot::Receiver<ExitStatus>,
}

pub(crate) fn nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Spawns `cmd` and registers its waiter. Must not be awaited across (see module docs).
    pub fn spawn(&self, cmd: &mut std::process::Command) -> std::io::Result<Spawned> {
        let mut waiters = lock(&self.waiters);
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        drop(waiters);
        let stdin = match child.stdin.take() {
            Some(s) => {
                let fd = OwnedFd::from(s);
                nonblocking(&fd)?;
                Some(pipe::Sender::from_owned_fd_unchecked(fd)?)
            }
            None => None,
        };
        let recv = |fd: Option<OwnedFd>| -> std::io::Result<Option<pipe::Receiver>> {
            match fd {
                Some(fd) => {
                    nonblocking(&fd)?;
                    Ok(Some(pipe::Receiver::from_owned_fd_unchecked(fd)?))
                }
                None => Ok(None),
            }
        };
        let stdout = recv(child.stdout.take().map(OwnedFd::from))?;
        let stderr = recv(child.stderr.take().map(OwnedFd::from))?;
        // `child` is dropped without waiting: the reaper owns its exit status.
        Ok(Spawned { pid, stdin, stdout, stderr, exit: rx })
    }

    /// Reaps every exited child; exec children's statuses go to their waiters.
    pub fn reap_all(&self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let tx = lock(&self.waiters).remove(&(pid as u32));
            match tx {
                Some(tx) => {
                    let _ = tx.send(ExitStatus::from_raw(status));
                }
                None => {
                    self.orphans_reaped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self: Arc<Self>) -> std::io::Result<()> {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        loop {
            self.reap_all();
            if sig.recv().await.is_none() {
                return Ok(());
            }
        }
    }

    pub fn running(&self) -> usize {
        lock(&self.waiters).len()
    }
}
