//! Opening a tap device by name, optionally inside another network namespace.
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

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
