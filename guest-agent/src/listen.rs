//! Where the agent listens: a vsock port (in a guest) or a Unix socket (host mode, tests).
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock(u32),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("vsock:") {
            return p.parse().map(ListenAddr::Vsock).map_err(|_| format!("bad vsock port in {s:?}"));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(ListenAddr::Unix(p.into()));
        }
        Err(format!("listen address {s:?} must be vsock:PORT or unix:PATH"))
    }
}

/// Only the host (CID 2) may talk to the agent over vsock.
pub fn peer_allowed(cid: u32) -> bool {
    cid == libc::VMADDR_CID_HOST
}

/// A Unix socket listening at `path` that appears there only once it listens and `prepare` (given
/// the socket's staging path: its mode, its group) has succeeded. It is made under a sibling name
/// (`PATH~`) and renamed into place, so whoever sees the path can connect (between bind(2) and
/// listen(2) a connect is refused) and never sees it half made. On failure nothing is left under
/// either name; a stale staging socket (a crash mid-bind) is replaced.
pub fn bind_unix(
    path: &Path,
    prepare: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<tokio::net::UnixListener> {
    let mut staging = path.as_os_str().to_owned();
    staging.push("~");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = tokio::net::UnixListener::bind(&staging)
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind {}: {e}", staging.display())))?;
    let published = prepare(&staging).and_then(|()| {
        std::fs::rename(&staging, path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("rename {} into place: {e}", staging.display())))
    });
    if let Err(e) = published {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}

pub enum Listener {
    Vsock(AsyncFd<OwnedFd>),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    pub fn bind(addr: &ListenAddr) -> std::io::Result<Self> {
        match addr {
            ListenAddr::Unix(p) => Ok(Listener::Unix(bind_unix(p, |_| Ok(()))?)),
            ListenAddr::Vsock(port) => {
                // SAFETY: plain socket(2); the result is checked and then owned.
                let fd = unsafe {
                    libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
                };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `fd` is a fresh socket nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
                let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
                sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
                sa.svm_port = *port;
                sa.svm_cid = libc::VMADDR_CID_ANY;
                let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
                // SAFETY: `sa` is a valid sockaddr_vm of `len` bytes.
                if unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_vm).cast(), len) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: listen(2) on a bound socket we own.
                if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `fd` is an OwnedFd: it stays open and the same for the AsyncFd's life.
                let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| std::io::Error::other(e.to_string()))?;
                Ok(Listener::Vsock(afd))
            }
        }
    }

    /// Accepts one connection as a stream (a vsock stream socket is driven through the same
    /// read/write/epoll calls as a Unix stream).
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        match self {
            Listener::Unix(l) => Ok(l.accept().await?.0),
            Listener::Vsock(afd) => loop {
                let mut guard = afd.readable().await?;
                // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
                let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
                // SAFETY: accept4 writes at most `len` bytes of the peer's address into `peer`.
                let fd = unsafe {
                    libc::accept4(
                        afd.get_ref().as_raw_fd(),
                        (&mut peer as *mut libc::sockaddr_vm).cast(),
                        &mut len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if fd >= 0 {
                    // SAFETY: `fd` is a fresh connected stream socket nobody else owns.
                    let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
                    if !peer_allowed(peer.svm_cid) {
                        // A process in this guest (loopback vsock) or another VM: never served. The agent runs
                        // as root, so serving a local process would hand it root.
                        eprintln!("flint-agent: refused a vsock connection from CID {}", peer.svm_cid);
                        drop(std_stream);
                        continue;
                    }
                    return UnixStream::from_std(std_stream);
                }
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                if e.kind() == std::io::ErrorKind::Interrupted || e.raw_os_error() == Some(libc::ECONNABORTED) {
                    continue;
                }
                return Err(e);
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_host_is_served() {
        assert!(super::peer_allowed(2));
        for cid in [0, 1, 3, 4, u32::MAX] {
            assert!(!super::peer_allowed(cid), "CID {cid}");
        }
    }
}
