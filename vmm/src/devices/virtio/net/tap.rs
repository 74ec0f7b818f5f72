//! Opening a tap device by name, optionally inside another network namespace; adopting one a parent attached
//! (flintd hands a jailed VMM its tap as an inherited fd); a detached backend for a card with no host side.
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("no tap device named {0:?} in the VMM's network namespace or the one given (create it first)")]
    NoSuchTap(String),
    #[error("cannot attach to tap device {0:?} (is it a tap, and is it free?)")]
    SetIff(String, #[source] std::io::Error),
    #[error("cannot configure tap device {0:?}")]
    Configure(String, #[source] std::io::Error),
    #[error("cannot enter network namespace {0}")]
    Netns(PathBuf, #[source] std::io::Error),
    #[error("the tap-opening thread failed")]
    Thread,
    #[error("fd {0} is not an attached tap with a virtio-net header (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)")]
    NotATap(i32),
    #[error("cannot make the detached network backend")]
    Detached(#[source] std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens tap `name` with a 12-byte virtio-net header and no offloads. With `netns`, the tap
/// is looked up in that network namespace (a thread enters it just to open the device; the
/// fd keeps working from the VMM's own namespace).
pub fn open_tap(name: &str, netns: Option<&Path>) -> Result<File, TapError> {
    if name.is_empty() || name.len() > 15 {
        return Err(TapError::BadName(name.into()));
    }
    match netns {
        None => open_here(name),
        Some(ns) => {
            let ns = ns.to_path_buf();
            let name = name.to_string();
            std::thread::spawn(move || -> Result<File, TapError> {
                let f = File::open(&ns).map_err(|e| TapError::Netns(ns.clone(), e))?;
                // SAFETY: plain syscall on a valid fd; it changes only this short-lived thread's
                // network namespace.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(TapError::Netns(ns, std::io::Error::last_os_error()));
                }
                open_here(&name)
            })
            .join()
            .map_err(|_| TapError::Thread)?
        }
    }
}

/// Takes over fd `fd`, a tap its parent attached (TUNSETIFF done): checks it is one, then configures it as
/// `open_tap` does.
pub fn adopt_tap(fd: i32, name: &str) -> Result<File, TapError> {
    if fd < 3 {
        return Err(TapError::NotATap(fd));
    }
    // SAFETY: F_GETFD only asks whether `fd` is open; nothing is read or written.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(TapError::NotATap(fd));
    }
    // SAFETY: the launch spec names `fd` as this process's tap, inherited from its parent and owned by nobody else
    // here: this is the only place that takes it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut req = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
    // SAFETY: TUNGETIFF writes an ifreq, which `req` is laid out as (40 bytes); it fails on anything but a tun/tap.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF as _, &mut req) } < 0
        || req.flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) != IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    {
        return Err(TapError::NotATap(fd));
    }
    // SAFETY: F_GETFL/F_SETFL on the fd we own; the event loop needs it non-blocking and no child may inherit it.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(TapError::Configure(name.into(), std::io::Error::last_os_error()));
        }
        libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    configure(file, name)
}

/// The backend of a card with no host side: one end of a datagram socket pair whose other end is kept but never
/// read (frames the guest sends are dropped once its buffer is full; nothing ever arrives).
pub fn detached() -> Result<(File, File), TapError> {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) writes two fds into the array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(TapError::Detached(std::io::Error::last_os_error()));
    }
    // SAFETY: two fresh fds nobody else owns.
    Ok(unsafe { (File::from(OwnedFd::from_raw_fd(fds[0])), File::from(OwnedFd::from_raw_fd(fds[1]))) })
}

fn open_here(name: &str) -> Result<File, TapError> {
    // TUNSETIFF would silently create a missing device: refuse instead, the caller owns taps.
    let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.into()))?;
    // SAFETY: valid NUL-terminated name.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(TapError::NoSuchTap(name.into()));
    }
    let path = c"/dev/net/tun";
    // SAFETY: valid NUL-terminated path; the returned fd is checked and then owned.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(TapError::OpenTun(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads/writes an ifreq, which `req` is laid out as (40 bytes).
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(TapError::SetIff(name.into(), std::io::Error::last_os_error()));
    }
    configure(file, name)
}

/// A 12-byte virtio-net header on every frame, no offloads.
fn configure(file: File, name: &str) -> Result<File, TapError> {
    let hdr: libc::c_int = super::NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr) } < 0 {
        return Err(TapError::Configure(name.into(), std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETOFFLOAD takes an unsigned long by value; 0 = no offloads.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
        return Err(TapError::Configure(name.into(), std::io::Error::last_os_error()));
    }
    Ok(file)
}
