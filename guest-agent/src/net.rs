//! Addressing the guest's network card (as the guest's init, after a boot or a restore): MAC, IPv4 address and
//! mask, link up, default route, /etc/resolv.conf. Plain ioctls on a datagram socket: no `ip` binary, no fork
//! (each costs ~1 s in an emulated guest).
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::protocol::GuestNetwork;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The checks flintd's values must pass before anything is changed.
pub fn validate(n: &GuestNetwork) -> Result<[u8; 6], String> {
    if n.interface.is_empty() || n.interface.len() > 15 || n.interface.contains(['/', '\0', ' ']) {
        return Err(format!("bad interface name {:?}", n.interface));
    }
    let mac = parse_mac(&n.mac).ok_or_else(|| format!("bad MAC {:?} (want aa:bb:cc:dd:ee:ff)", n.mac))?;
    if mac[0] & 1 != 0 {
        return Err(format!("MAC {} is a multicast address", n.mac));
    }
    if n.prefix_len == 0 || n.prefix_len > 30 {
        return Err(format!("prefix length {} (want 1-30)", n.prefix_len));
    }
    if n.dns.len() > 3 {
        return Err(format!("{} name servers (at most 3)", n.dns.len()));
    }
    Ok(mac)
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(15).enumerate() {
        ifr.ifr_name[i] = b as libc::c_char;
    }
    ifr
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(s: &OwnedFd, what: &str, req: libc::c_ulong, arg: *mut libc::c_void) -> Result<(), String> {
    // SAFETY: every caller passes a request together with the struct it reads or writes (ifreq or rtentry), alive
    // for the call.
    if unsafe { libc::ioctl(s.as_raw_fd(), req as _, arg) } != 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The default route through `gateway` (`add`) or whichever default route there is (remove).
fn default_route(s: &OwnedFd, dev: &std::ffi::CString, gateway: Option<Ipv4Addr>) -> Result<(), String> {
    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_flags = libc::RTF_UP;
    rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    match gateway {
        Some(gw) => {
            rt.rt_gateway = sockaddr(gw);
            rt.rt_flags |= libc::RTF_GATEWAY;
            ioctl(s, "add the default route", libc::SIOCADDRT, (&mut rt as *mut libc::rtentry).cast())
        }
        None => {
            // Removes one default route (ESRCH: none left).
            let _ = ioctl(s, "remove the default route", libc::SIOCDELRT, (&mut rt as *mut libc::rtentry).cast());
            Ok(())
        }
    }
}

/// Gives the card `n`'s MAC, address and default route, brings it up and writes the name servers. Changing the
/// MAC also flushes the card's neighbour (ARP) entries: a clone never talks to the template's gateway MAC.
pub fn configure(n: &GuestNetwork) -> Result<(), String> {
    let mac = validate(n)?;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nobody else owns.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = &n.interface;
    let mut ifr = ifreq(name);
    // SAFETY: writing the hwaddr member of the ifreq union (a sockaddr).
    unsafe {
        ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (i, b) in mac.iter().enumerate() {
            ifr.ifr_ifru.ifru_hwaddr.sa_data[i] = *b as libc::c_char;
        }
    }
    ioctl(&s, &format!("set {name}'s MAC"), libc::SIOCSIFHWADDR, (&mut ifr as *mut libc::ifreq).cast())?;
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_addr = sockaddr(n.address);
    ioctl(&s, &format!("set {name}'s address"), libc::SIOCSIFADDR, (&mut ifr as *mut libc::ifreq).cast())?;
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(n.prefix_len)));
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(&s, &format!("set {name}'s netmask"), libc::SIOCSIFNETMASK, (&mut ifr as *mut libc::ifreq).cast())?;
    let mut ifr = ifreq(name);
    ioctl(&s, &format!("read {name}'s flags"), libc::SIOCGIFFLAGS, (&mut ifr as *mut libc::ifreq).cast())?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(&s, &format!("bring {name} up"), libc::SIOCSIFFLAGS, (&mut ifr as *mut libc::ifreq).cast())?;
    let dev = std::ffi::CString::new(name.as_str()).map_err(|_| "NUL in the interface name".to_string())?;
    default_route(&s, &dev, None)?;
    default_route(&s, &dev, Some(n.gateway))?;
    let resolv: String = n.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    let tmp = "/etc/.resolv.conf.flint";
    std::fs::create_dir_all("/etc").map_err(|e| format!("create /etc: {e}"))?;
    std::fs::write(tmp, resolv).map_err(|e| format!("write {tmp}: {e}"))?;
    std::fs::rename(tmp, "/etc/resolv.conf").map_err(|e| format!("replace /etc/resolv.conf: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> GuestNetwork {
        GuestNetwork {
            interface: "eth0".into(),
            mac: "06:00:0a:c8:00:02".into(),
            address: Ipv4Addr::new(10, 200, 0, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
            dns: vec![Ipv4Addr::new(10, 200, 0, 1)],
        }
    }

    #[test]
    fn bad_values_are_refused_before_anything_changes() {
        assert_eq!(validate(&net()), Ok([6, 0, 10, 200, 0, 2]));
        for (bad, want) in [
            (GuestNetwork { mac: "06:00:0a:c8:00".into(), ..net() }, "bad MAC"),
            (GuestNetwork { mac: "07:00:0a:c8:00:02".into(), ..net() }, "multicast"),
            (GuestNetwork { mac: "06:00:0a:c8:00:0g".into(), ..net() }, "bad MAC"),
            (GuestNetwork { prefix_len: 31, ..net() }, "prefix length"),
            (GuestNetwork { interface: "../eth0".into(), ..net() }, "interface"),
            (GuestNetwork { dns: vec![Ipv4Addr::LOCALHOST; 4], ..net() }, "name servers"),
        ] {
            let e = validate(&bad).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
