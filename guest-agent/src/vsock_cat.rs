//! `flint-agent vsock-cat CID PORT`: connects to a vsock port and copies stdin to it and it to
//! stdout (a guest-side diagnostic: checks guest → host connections without other tools).
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

/// Connects to `cid:port` and shuttles bytes until both directions are done.
pub fn run(cid: u32, port: u32) -> std::io::Result<()> {
    // SAFETY: plain socket(2); the result is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `sa` is a valid sockaddr_vm of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (&sa as *const libc::sockaddr_vm).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sock = std::fs::File::from(fd);
    let mut writer = sock.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        std::io::copy(&mut std::io::stdin().lock(), &mut writer)?;
        // SAFETY: shutdown(2) on the socket we own; the reader half stays open.
        unsafe { libc::shutdown(writer.as_raw_fd(), libc::SHUT_WR) };
        Ok(())
    });
    let mut reader = sock;
    let mut buf = [0u8; 16384];
    let mut out = std::io::stdout().lock();
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    sender.join().map_err(|_| std::io::Error::other("stdin thread panicked"))??;
    Ok(())
}
