//! What the agent does as the guest's PID 1 before it serves: mount the basic filesystems,
//! bring up loopback, set the hostname.
use std::ffi::CString;

pub(crate) fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
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

/// The value of `name=` on the kernel command line.
fn cmdline_param(cmdline: &str, name: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=').map(str::to_string))
}

/// A virtio block device name as the command line gives it (`vda`), checked: it becomes a path.
pub fn block_device(name: &str) -> Result<String, String> {
    let ok = name.len() == 3 && name.starts_with("vd") && name.as_bytes()[2].is_ascii_lowercase();
    if ok {
        Ok(format!("/dev/{name}"))
    } else {
        Err(format!("`{name}` is not a virtio block device name (vda, vdb, ...)"))
    }
}

/// Disk-rooted images (docs/images.md): with `flint.root=vdX` on the kernel command line, the agent (PID 1 in a
/// tiny initramfs) mounts that drive read-only as the lower layer, the VM's own writable disk (`flint.overlay=vdY`,
/// ext4; a tmpfs without one) as the upper layer, joins them with overlayfs and makes the result `/`. Returns
/// whether it switched. On an error the agent stays in the initramfs and says why on the console.
pub fn enter_disk_root() -> Result<bool, String> {
    mount("proc", "/proc", "proc", 0, "").map_err(|e| format!("mount /proc: {e}"))?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    // SAFETY: umount2 of the mount made just above, by a NUL-terminated literal path.
    unsafe { libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) };
    let Some(root) = cmdline_param(&cmdline, "flint.root") else {
        return Ok(false);
    };
    let lower_dev = block_device(&root)?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755").map_err(|e| format!("mount /dev: {e}"))?;
    mount(&lower_dev, "/mnt/lower", "ext4", libc::MS_RDONLY, "")
        .map_err(|e| format!("mount the image's root {lower_dev} read-only: {e}"))?;
    match cmdline_param(&cmdline, "flint.overlay") {
        Some(dev) => {
            let dev = block_device(&dev)?;
            // noinit_itable: the disk was made with lazy inode tables; zeroing them would fill the sparse host file.
            mount(&dev, "/mnt/rw", "ext4", libc::MS_NOATIME, "noinit_itable")
                .map_err(|e| format!("mount the VM's disk {dev}: {e}"))?
        }
        None => mount("tmpfs", "/mnt/rw", "tmpfs", 0, "mode=0755").map_err(|e| format!("mount a tmpfs: {e}"))?,
    }
    for d in ["/mnt/rw/upper", "/mnt/rw/work"] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {d}: {e}"))?;
    }
    mount("overlay", "/mnt/root", "overlay", 0, "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work")
        .map_err(|e| format!("mount the overlay: {e}"))?;
    mount("/dev", "/mnt/root/dev", "", libc::MS_MOVE, "").map_err(|e| format!("move /dev: {e}"))?;
    std::env::set_current_dir("/mnt/root").map_err(|e| format!("chdir: {e}"))?;
    // SAFETY: the switch_root sequence on NUL-terminated literal paths: move the new root over `/`, then chroot
    // into it; the initramfs stays underneath (it holds only this binary).
    let r = unsafe {
        if libc::mount(c".".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) != 0 {
            -1
        } else {
            libc::chroot(c".".as_ptr())
        }
    };
    if r != 0 {
        return Err(format!("switch to the new root: {}", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(true)
}

/// A dynamic mount (docs/images.md): drops `device`'s cached blocks (the host rewrote its backing file while it was
/// not mounted), then mounts its ext4 at `path`.
pub fn mount_volume(device: &str, path: &str, read_only: bool) -> Result<(), String> {
    let dev = block_device(device)?;
    let f = std::fs::File::open(&dev).map_err(|e| format!("open {dev}: {e}"))?;
    // BLKFLSBUF = _IO(0x12, 97): write back and drop the device's buffer cache.
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: BLKFLSBUF takes no argument; the fd is an open block device for the call.
    if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), BLKFLSBUF as _, 0) } != 0 {
        return Err(format!("flush {dev}: {}", std::io::Error::last_os_error()));
    }
    drop(f);
    std::fs::create_dir_all(path).map_err(|e| format!("create the mount point {path}: {e}"))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | if read_only { libc::MS_RDONLY } else { 0 };
    let data = if read_only { "noload" } else { "noinit_itable" };
    if std::path::Path::new("/proc/self/mounts").exists() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(path)) {
            return Err(format!("something is already mounted at {path}"));
        }
    }
    mount(&dev, path, "ext4", flags, data).map_err(|e| format!("mount {dev} at {path}: {e}"))
}

/// Unmounts `path` (lazily if busy, so a process holding a file there cannot keep the volume attached).
pub fn unmount_volume(path: &str) -> Result<(), String> {
    let c = CString::new(path).map_err(|_| "NUL in path".to_string())?;
    // SAFETY: umount2 on a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        // SAFETY: as above, detaching instead.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
    }
    Err(format!("unmount {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parameters_and_devices() {
        let c = "console=ttyS0 flint.root=vda flint.overlay=vdb quiet";
        assert_eq!(cmdline_param(c, "flint.root").as_deref(), Some("vda"));
        assert_eq!(cmdline_param(c, "flint.overlay").as_deref(), Some("vdb"));
        assert_eq!(cmdline_param(c, "flint.rootx"), None);
        assert_eq!(cmdline_param("flint.root", "flint.root"), None);
        assert_eq!(block_device("vdb").unwrap(), "/dev/vdb");
        for bad in ["sda", "vd", "vdB", "vda1", "../x", "vd/"] {
            assert!(block_device(bad).is_err(), "{bad}");
        }
    }
}
