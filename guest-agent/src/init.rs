//! What the agent does as the guest's PID 1 before it serves: mount the basic filesystems,
//! bring up loopback, set the hostname.
use std::ffi::CString;

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).map_err(|_| std::io::Error::other("NUL in mount argument"));
    let (src, tgt, fs, d) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), flags, d.as_ptr().cast()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Ok(())
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2), closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
    let r = unsafe {
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr)
        } else {
            -1
        }
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(s) };
    if r != 0 {
        return Err(e);
    }
    Ok(())
}

/// Prepares the guest. Failures are reported and skipped: a missing /tmp must not stop the
/// agent from answering.
pub fn init_system() {
    let nodev_nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    let steps: [(&str, &str, &str, libc::c_ulong, &str); 6] = [
        ("proc", "/proc", "proc", nodev_nosuid | libc::MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", nodev_nosuid | libc::MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "mode=0620,ptmxmode=0666"),
        ("tmpfs", "/tmp", "tmpfs", nodev_nosuid, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nodev_nosuid, "mode=0755"),
    ];
    for (src, tgt, fs, flags, data) in steps {
        if let Err(e) = mount(src, tgt, fs, flags, data) {
            eprintln!("flint-agent: mount {tgt}: {e}");
        }
    }
    if let Err(e) = loopback_up() {
        eprintln!("flint-agent: loopback: {e}");
    }
    let host = b"flint";
    // SAFETY: pointer and length describe `host`.
    unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) };
}
