//! The VMM's side of an external page server (`MemorySource::Pager`, see `flint_vmm_api::pager`): hand the
//! userfaultfd over, wait for the server's answer, and hand it over again if the server restarts.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flint_uffd::Userfault;
use flint_vmm_api::pager::{PagerHello, PagerRange, MAX_HELLO_BYTES, PAGER_PROTOCOL};

use crate::snapshot::RestoreError;

/// How long the first hand-over may take (the page server opens the snapshot before it answers).
const FIRST_ANSWER: Duration = Duration::from_secs(60);

/// Sends the userfaultfd and the memory layout to the page server at `socket` and waits for it to accept; then a
/// thread keeps the connection (its end tells the server the VM is gone) and reconnects after a server restart.
pub fn hand_over(
    socket: &Path,
    uffd: Userfault,
    ranges: Vec<PagerRange>,
    image_bytes: u64,
) -> Result<(), RestoreError> {
    let err = |e| RestoreError::Pager(socket.display().to_string(), e);
    let hello = PagerHello { protocol: PAGER_PROTOCOL, pid: std::process::id(), ranges, image_bytes, reconnect: false };
    let conn = connect_and_send(socket, &hello, &uffd, FIRST_ANSWER).map_err(err)?;
    let socket = socket.to_path_buf();
    std::thread::Builder::new()
        .name("pager-link".into())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Pager);
            keep(socket, conn, hello, uffd)
        })
        .map_err(err)?;
    Ok(())
}

fn connect_and_send(
    socket: &Path,
    hello: &PagerHello,
    uffd: &Userfault,
    wait: Duration,
) -> std::io::Result<UnixStream> {
    let mut conn = UnixStream::connect(socket)?;
    let bytes = serde_json::to_vec(hello).map_err(std::io::Error::other)?;
    if bytes.len() > MAX_HELLO_BYTES {
        return Err(std::io::Error::other("the memory layout does not fit in a page-server hello"));
    }
    flint_uffd::send_fd(&conn, &bytes, uffd.fd())?;
    // The answer: "ok\n", or a reason the server refused.
    conn.set_read_timeout(Some(wait))?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 4096 {
        match conn.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
    }
    conn.set_read_timeout(None)?;
    if answer != b"ok" {
        let why = String::from_utf8_lossy(&answer).into_owned();
        return Err(std::io::Error::other(if why.is_empty() {
            "the page server closed the connection".into()
        } else {
            why
        }));
    }
    Ok(conn)
}

/// Holds the connection; when the server goes away, connects again (every 100 ms) and hands the same fd over.
/// Faults meanwhile wait in the kernel: the vCPUs stall until a server is back.
fn keep(socket: PathBuf, mut conn: UnixStream, mut hello: PagerHello, uffd: Userfault) {
    hello.reconnect = true;
    loop {
        let mut buf = [0u8; 64];
        // The server sends nothing after its answer: a read returns only when it hangs up.
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let lost = Instant::now();
        eprintln!("flint-vmm: the page server at {} went away; waiting for it", socket.display());
        conn = loop {
            std::thread::sleep(Duration::from_millis(100));
            match connect_and_send(&socket, &hello, &uffd, Duration::from_secs(30)) {
                Ok(c) => break c,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => eprintln!("flint-vmm: page server hand-over failed: {e}"),
            }
        };
        let _ = writeln!(std::io::stderr(), "flint-vmm: page server back after {:?}", lost.elapsed());
    }
}
