//! Per-VM networks (docs/networking.md): a network namespace per VM holding its tap and one end of a veth pair,
//! addresses from a configured pool, NAT to the host's uplink, an egress policy enforced with nftables in the
//! VM's namespace (never in the guest), a DNS proxy per VM that answers only what the policy allows and opens the
//! answers of allowed domains, and (`front`) an HTTP front end that routes requests to exposed guest ports.
//!
//! ```text
//!  guest eth0 ── tap0 [VM netns: nft table inet flint, DNS proxy on the gateway] veth0 ── flv<N> [host] ── uplink
//! ```
pub mod dns;
pub mod forward;
pub mod front;
pub mod http1;
pub mod pipe;
pub mod policy;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flint_vmm_api::lock;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

pub use policy::{Block, Cidr, EgressPolicy, ExposedPort, NetworkRequest, PolicyError, Rules, Verdict};

/// `[network]` in flintd's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Addresses for VM networks; each VM takes an aligned block of 8. Must not overlap the host's own networks.
    pub pool: Cidr,
    /// Where the DNS proxy sends the queries it lets through; default: the first `nameserver` of the host's
    /// /etc/resolv.conf.
    pub upstream_dns: Option<SocketAddr>,
    /// The front end for exposed ports (HTTP routed by Host, headers or cookie). None: off.
    pub front_end: Option<SocketAddr>,
    /// Exposed ports are reached as `<port>-<id>.<domain>` in the Host header.
    pub domain: String,
    /// Host ports (first, last) an exposed port may forward plain TCP on (`tcp_listen`), at the front end's
    /// address. None: no plain TCP forwarding.
    pub tcp_ports: Option<[u16; 2]>,
    /// Rules per list (allow, deny) of an egress policy.
    pub max_rules: usize,
    /// Destinations no policy can open, besides the built-in ones (loopback, link-local incl. 169.254.169.254,
    /// multicast, the pool: other VMs and the host ends; the host's own addresses are refused on the host).
    pub deny_always: Vec<Cidr>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            pool: Cidr { addr: Ipv4Addr::new(10, 200, 0, 0), len: 16 },
            upstream_dns: None,
            front_end: None,
            domain: "flint.localhost".into(),
            tcp_ports: None,
            max_rules: 256,
            deny_always: Vec::new(),
        }
    }
}

/// A VM's network as its record keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmNet {
    /// The block of the pool it holds.
    pub index: u32,
    pub mac: String,
    pub request: NetworkRequest,
}

/// What the guest and the API see of a VM's network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetInfo {
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mac: String,
    pub egress: EgressPolicy,
    pub ports: Vec<u16>,
}

/// The name of the VM's tap in its namespace, and of the namespace's veth end.
pub const TAP: &str = "tap0";
const NS_VETH: &str = "veth0";
/// How long an allowed domain's answer stays open at least (a TTL of 0 would close it before the guest connects).
const MIN_DNS_OPEN_S: u32 = 30;
const MAX_DNS_OPEN_S: u32 = 3600;

/// Addresses the DNS proxy opened for a VM: address → (the name it answered, until when).
type Learned = HashMap<Ipv4Addr, (String, Instant)>;

struct Running {
    rules: Arc<Mutex<Rules>>,
    learned: Arc<Mutex<Learned>>,
    /// Addresses answered and not yet in the VM's table: whoever holds `writer` next writes them all in one nft
    /// run (answers arriving together cost one process, not one each).
    pending: Arc<Mutex<Vec<(Ipv4Addr, u32, String)>>>,
    /// One writer of the VM's table at a time (DNS openings and policy changes): an opening checks the rules
    /// in force when it writes, so it cannot undo a policy change that raced it.
    writer: Arc<Mutex<()>>,
    proxy: tokio::task::JoinHandle<()>,
}

impl Running {
    fn new(rules: Arc<Mutex<Rules>>, learned: Arc<Mutex<Learned>>, proxy: tokio::task::JoinHandle<()>) -> Running {
        Running { rules, learned, pending: Arc::default(), writer: Arc::default(), proxy }
    }
}

/// Most addresses DNS answers keep open in one VM's table at once (past it, new answers are not opened).
pub const MAX_LEARNED: usize = 4096;

/// What the DNS proxies and the front end did (for /metrics).
#[derive(Default)]
pub struct Counters {
    pub dns_answered: std::sync::atomic::AtomicU64,
    pub dns_refused: std::sync::atomic::AtomicU64,
    pub front_routed: std::sync::atomic::AtomicU64,
    pub front_refused: std::sync::atomic::AtomicU64,
    /// DNS answers' addresses not opened: private or the host's (no CIDR rule covers them), or past the cap.
    pub dns_withheld: std::sync::atomic::AtomicU64,
}

/// This host's VM networks.
pub struct Networks {
    pub cfg: NetworkConfig,
    pub counters: Arc<Counters>,
    /// Plain TCP forwards of exposed ports, by front-end port.
    pub forwards: Arc<forward::Forwards>,
    /// Network namespaces are bind mounts on files here (they outlive a flintd restart).
    dir: PathBuf,
    host_ready: Mutex<bool>,
    /// The networks of the host's own interfaces (its LANs), found when the host is first set up: denied to
    /// guests unless a CIDR rule covers them.
    host_lans: Mutex<Vec<Cidr>>,
    running: Mutex<HashMap<String, Running>>,
    /// Unit tests: a recording fake of the host (a namespace is a plain file, no command runs, setups can be
    /// made to fail).
    fake: Option<FakeHost>,
}

/// What a fake host does instead of namespaces, taps and nftables.
#[derive(Default)]
pub struct FakeHost {
    /// The next this many setups fail.
    pub fail_setups: std::sync::atomic::AtomicU32,
    /// Policies applied, per VM (the last one).
    pub policies: Mutex<HashMap<String, Rules>>,
}

/// Why a VM's network could not be built, changed or served.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{prog} {args} failed ({status}): {stderr}\ninput:\n{input}")]
    Command { prog: String, args: String, status: String, stderr: String, input: String },
    /// Every block of the pool is taken.
    #[error("{0}")]
    Exhausted(String),
    #[error("VM networks need flintd to run as root (network namespaces, taps, nftables)")]
    NotRoot,
    #[error("VM `{vm}` has no network namespace ({} is gone)", path.display())]
    Gone { vm: String, path: PathBuf },
    #[error("a network namespace thread panicked")]
    Panicked,
    #[error("NUL in a path")]
    Nul,
}

impl crate::error::Classify for NetError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            NetError::Exhausted(_) => crate::error::Kind::Quota,
            _ => crate::error::Kind::Unavailable,
        }
    }
}

fn io(what: impl std::fmt::Display, source: std::io::Error) -> NetError {
    NetError::Io { what: what.to_string(), source }
}

/// The mark flintd's own connections into guests carry (the front end's, the plain TCP forwards'): the host's
/// `flint` table lets a new connection from the host into a VM network out only with it, so other processes of
/// the host cannot reach guest ports (only exposed ones, through flintd).
pub const FORWARDER_MARK: u32 = 0xf117;

/// Connects to `addr` from a socket marked with [`FORWARDER_MARK`] before its SYN.
pub async fn connect_marked(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    let mark = FORWARDER_MARK;
    // SAFETY: setsockopt(2) on the fresh socket's fd, with a u32 value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &mark as *const u32 as *const libc::c_void,
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.connect(addr).await
}

/// Runs `prog args` with `stdin` as its input, inside the network namespace `ns` (None: flintd's own).
fn run_in(ns: Option<&Path>, prog: &str, args: &[&str], stdin: &str) -> Result<(), NetError> {
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let nsf = ns.map(|p| File::open(p).map_err(|e| io(format!("open network namespace {}", p.display()), e)));
    let nsf = nsf.transpose()?;
    if let Some(f) = &nsf {
        let fd = f.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe and changes only the child, between fork and exec; `fd` stays open
        // in the parent until the child has been spawned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| io(format!("run {prog} (is it installed?)"), e))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes()).map_err(|e| io(format!("write to {prog}"), e))?;
    }
    let out = child.wait_with_output().map_err(|e| io(format!("wait for {prog}"), e))?;
    if !out.status.success() {
        return Err(NetError::Command {
            prog: prog.into(),
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            input: stdin.into(),
        });
    }
    Ok(())
}

/// Runs `f` on a thread that entered network namespace `ns` (sockets it makes stay in that namespace).
fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    let nsf = File::open(ns).map_err(|e| io(format!("open network namespace {}", ns.display()), e))?;
    std::thread::spawn(move || {
        // SAFETY: setns(2) on a namespace fd we hold; it changes only this short-lived thread's network namespace.
        if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io("enter the VM's network namespace", std::io::Error::last_os_error()));
        }
        f()
    })
    .join()
    .map_err(|_| NetError::Panicked)?
}

/// A new network namespace, kept by a bind mount on `path`.
fn create_netns(path: &Path) -> Result<(), NetError> {
    File::create(path).map_err(|e| io(format!("create {}", path.display()), e))?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| NetError::Nul)?;
    std::thread::spawn(move || {
        // SAFETY: unshare(2) gives only this thread a new network namespace; mount(2) bind-mounts that namespace
        // (this thread's nsfs file) on `target`, a file we created, with NUL-terminated strings alive for the call.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io("make a network namespace (flintd needs root)", std::io::Error::last_os_error()));
            }
            let src = c"/proc/thread-self/ns/net";
            if libc::mount(src.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
                return Err(io("bind-mount the network namespace", std::io::Error::last_os_error()));
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| NetError::Panicked)?
}

fn remove_netns(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2(2) with a NUL-terminated path; failure (not mounted) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(path);
}

/// Opens `name`, a tap in namespace `ns`, with a virtio-net header (the VMM configures the rest): for a jailed
/// VMM, whose own network namespace is empty.
pub fn open_tap(ns: &Path, name: &str) -> Result<OwnedFd, NetError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    let name = name.to_string();
    in_netns(ns, move || {
        // SAFETY: open(2) of a NUL-terminated path; the fd is owned below.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io("open /dev/net/tun", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd nobody else owns.
        let f = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain data; zeroed is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in name.bytes().take(15).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
        if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut ifr) } != 0 {
            return Err(io(format!("attach to tap {name}"), std::io::Error::last_os_error()));
        }
        Ok(f)
    })
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|e| io(format!("write {path}"), e))
}

/// The first `nameserver` of /etc/resolv.conf.
fn host_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<Ipv4Addr>().ok().map(|a| SocketAddr::from((a, 53))))?
    })
}

impl Networks {
    pub fn new(cfg: NetworkConfig, data_dir: &Path) -> Self {
        let counters = Arc::new(Counters::default());
        Networks {
            forwards: Arc::new(forward::Forwards::new(cfg.front_end, cfg.tcp_ports, counters.clone())),
            cfg,
            dir: data_dir.join("netns"),
            host_ready: Mutex::new(false),
            host_lans: Mutex::new(Vec::new()),
            running: Mutex::new(HashMap::new()),
            counters,
            fake: None,
        }
    }

    /// Networks on a recording fake of the host (unit tests of the VM lifecycle without root or nftables).
    pub fn with_fake_host(cfg: NetworkConfig, data_dir: &Path) -> Self {
        Networks { fake: Some(FakeHost::default()), ..Networks::new(cfg, data_dir) }
    }

    pub fn fake(&self) -> Option<&FakeHost> {
        self.fake.as_ref()
    }

    /// VMs whose network (DNS proxy) runs.
    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    pub fn block(&self, index: u32) -> Result<Block, NetError> {
        Block::new(self.cfg.pool, index)
            .ok_or_else(|| NetError::Exhausted(format!("the network pool {} is full", self.cfg.pool)))
    }

    /// How many VM networks the pool holds (blocks of 8 addresses).
    pub fn blocks(&self) -> u32 {
        (self.cfg.pool.size() / u64::from(policy::BLOCK)).min(u64::from(u32::MAX)) as u32
    }

    pub fn netns_path(&self, vm: &str) -> PathBuf {
        self.dir.join(vm)
    }

    pub fn info(&self, n: &VmNet) -> Option<NetInfo> {
        let b = self.block(n.index).ok()?;
        Some(NetInfo {
            address: b.guest(),
            gateway: b.gateway(),
            mac: n.mac.clone(),
            egress: n.request.egress.clone(),
            ports: n.request.ports.keys().copied().collect(),
        })
    }

    /// What the agent is told (address, MAC, gateway, the DNS proxy).
    pub fn guest(&self, n: &VmNet) -> Result<flint_agent::protocol::GuestNetwork, NetError> {
        let b = self.block(n.index)?;
        Ok(flint_agent::protocol::GuestNetwork {
            interface: "eth0".into(),
            mac: n.mac.clone(),
            address: b.guest(),
            prefix_len: 30,
            gateway: b.gateway(),
            dns: vec![b.gateway()],
        })
    }

    /// flintd's own namespace: forwarding on for Flint's interfaces and the uplinks only (not host-wide), NAT of
    /// the pool to the uplink, VMs kept off the host's addresses and off each other, and new connections into VM
    /// networks only from flintd's own marked sockets (table `ip flint`, replaced whole).
    pub fn ensure_host(&self) -> Result<(), NetError> {
        let mut ready = lock(&self.host_ready);
        if *ready || self.fake.is_some() {
            return Ok(());
        }
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NetError::NotRoot);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| io(format!("create {}", self.dir.display()), e))?;
        let p = policy::HOST_LINK_PREFIX;
        let (lans, uplinks) = host_interfaces(p);
        // Replies from the uplinks are forwarded back to the VMs; the VMs' own ends turn forwarding on as made.
        for dev in &uplinks {
            write_sysctl(&format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"), "1")?;
        }
        *lock(&self.host_lans) = lans;
        let (pool, mark) = (self.cfg.pool, FORWARDER_MARK);
        let script = format!(
            "table ip flint {{}}\ndelete table ip flint\n\
             table ip flint {{\n\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {pool} oifname != \"{p}*\" masquerade\n\t}}\n\
             \tchain forward {{ type filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{p}*\" oifname \"{p}*\" drop\n\t}}\n\
             \tchain input {{ type filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{p}*\" ct state established,related accept\n\
             \t\tiifname \"{p}*\" drop\n\t}}\n\
             \tchain output {{ type filter hook output priority filter; policy accept;\n\
             \t\toifname \"{p}*\" ct state new meta mark != {mark:#x} drop\n\t}}\n}}\n"
        );
        run_in(None, "nft", &["-f", "-"], &script)?;
        *ready = true;
        Ok(())
    }

    /// The VM namespace's table: the egress policy, the DNS proxy's openings, the front end's way in (exposed
    /// `ports` only).
    fn render(&self, b: &Block, rules: &Rules, learned: &Learned, ports: &[u16]) -> String {
        let set = |name: &str, flags: &str, elems: Vec<String>| {
            let e = if elems.is_empty() { String::new() } else { format!(" elements = {{ {} }};", elems.join(", ")) };
            format!("\tset {name} {{ type ipv4_addr; flags {flags};{e} }}\n")
        };
        let cidrs = |c: Vec<Cidr>| policy::outermost(&c).iter().map(|c| c.to_string()).collect::<Vec<_>>();
        let mut always = policy::NEVER_NETS.to_vec();
        always.push(self.cfg.pool);
        always.extend(self.cfg.deny_always.iter().copied());
        let mut private = policy::PRIVATE_NETS.to_vec();
        private.extend(lock(&self.host_lans).iter().copied());
        let now = Instant::now();
        let open: Vec<String> = learned
            .iter()
            .filter(|(_, (name, until))| *until > now && rules.dns(name) == policy::DnsDecision::AnswerAndAllow)
            .map(|(ip, (_, until))| format!("{ip} timeout {}s", (*until - now).as_secs().max(1)))
            .collect();
        let verdict = match rules.default {
            Verdict::Allow => "accept",
            Verdict::Deny => "drop",
        };
        let (gw, guest, host) = (b.gateway(), b.guest(), b.host());
        let front = if ports.is_empty() {
            String::new()
        } else {
            let list = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
            format!(
                "\t\tiifname \"{NS_VETH}\" oifname \"{TAP}\" ip saddr {host} ip daddr {guest} tcp dport {{ {list} }} \
                 tcp flags & (syn | ack) == syn ct state new accept\n"
            )
        };
        let mut s = String::from("table inet flint {}\ndelete table inet flint\ntable inet flint {\n");
        s += &set("always_deny", "interval", cidrs(always));
        s += &set("private", "interval", cidrs(private));
        s += &set("deny_nets", "interval", cidrs(rules.deny_nets.clone()));
        s += &set("allow_nets", "interval", cidrs(rules.allow_nets.clone()));
        s += &set("allow_dns", "timeout", open);
        s += &format!(
            "\tchain input {{ type filter hook input priority filter; policy drop;\n\
             \t\tiif \"lo\" accept\n\
             \t\tct state established,related accept\n\
             \t\tiifname \"{TAP}\" ip saddr {guest} ip daddr {gw} udp dport 53 accept\n\
             \t\tiifname \"{TAP}\" ip daddr {gw} icmp type echo-request accept\n\t}}\n\
             \tchain forward {{ type filter hook forward priority filter; policy drop;\n\
             \t\tiifname \"{TAP}\" ip saddr != {guest} drop\n\
             \t\tiifname \"{TAP}\" oifname \"{NS_VETH}\" ip daddr {host} ct direction reply accept\n\
             \t\tiifname \"{TAP}\" oifname \"{NS_VETH}\" jump egress\n\
             \t\tiifname \"{NS_VETH}\" oifname \"{TAP}\" ct state established,related accept\n\
             {front}\t}}\n\
             \tchain egress {{\n\
             \t\tmeta nfproto != ipv4 drop\n\
             \t\tip daddr @always_deny drop\n\
             \t\tmeta l4proto {{ tcp, udp }} th dport 53 drop\n\
             \t\tip daddr @deny_nets drop\n\
             \t\tip daddr @allow_nets accept\n\
             \t\tip daddr @private drop\n\
             \t\tmeta l4proto {{ tcp, udp }} ip daddr @allow_dns accept\n\
             \t\t{verdict}\n\t}}\n}}\n"
        );
        s
    }

    /// Whether a DNS answer's address may be opened by a domain rule: not one no policy opens, not private or
    /// the host's own (those only by a CIDR rule, which opens them anyway).
    fn openable(&self, ip: Ipv4Addr) -> bool {
        let lans = lock(&self.host_lans);
        !(policy::NEVER_NETS.iter().chain(policy::PRIVATE_NETS.iter()).chain(lans.iter()).any(|c| c.contains(ip))
            || self.cfg.pool.contains(ip)
            || self.cfg.deny_always.iter().any(|c| c.contains(ip)))
    }

    /// Builds VM `vm`'s network (namespace, tap, veth pair, addresses, routes, policy) and starts its DNS proxy.
    /// Blocking (commands): call from a blocking thread. On error nothing is left behind.
    pub fn setup(&self, vm: &str, n: &VmNet, rules: Rules) -> Result<PathBuf, NetError> {
        if let Some(f) = &self.fake {
            use std::sync::atomic::Ordering::Relaxed;
            if f.fail_setups.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok() {
                return Err(NetError::Io {
                    what: "fake network setup".into(),
                    source: std::io::Error::other("injected"),
                });
            }
            let ns = self.netns_path(vm);
            std::fs::create_dir_all(&self.dir).map_err(|e| io("create the netns directory", e))?;
            File::create(&ns).map_err(|e| io("create the fake namespace", e))?;
            lock(&f.policies).insert(vm.to_string(), rules);
            return Ok(ns);
        }
        self.ensure_host()?;
        let b = self.block(n.index)?;
        let ns = self.netns_path(vm);
        let done = (|| {
            remove_netns(&ns);
            let _ = run_in(None, "ip", &["link", "del", &b.host_link()], "");
            create_netns(&ns)?;
            let pid = std::process::id().to_string();
            let (gw, nsv, host, hl) = (b.gateway(), b.ns_veth(), b.host(), b.host_link());
            run_in(
                Some(&ns),
                "ip",
                &["-batch", "-"],
                &format!(
                    "link set lo up\n\
                     tuntap add dev {TAP} mode tap vnet_hdr\n\
                     addr add {gw}/30 dev {TAP}\n\
                     link set {TAP} up\n\
                     link add {hl} type veth peer name {NS_VETH}\n\
                     addr add {nsv}/30 dev {NS_VETH}\n\
                     link set {NS_VETH} up\n\
                     route add default via {host}\n\
                     link set {hl} netns {pid}\n"
                ),
            )?;
            in_netns(&ns, || write_sysctl("/proc/sys/net/ipv4/ip_forward", "1"))?;
            run_in(
                None,
                "ip",
                &["-batch", "-"],
                &format!(
                    "addr add {host}/30 dev {hl}\nlink set {hl} up\nroute add {} via {nsv} dev {hl}\n",
                    b.guest_net()
                ),
            )?;
            write_sysctl(&format!("/proc/sys/net/ipv4/conf/{hl}/forwarding"), "1")?;
            let ports: Vec<u16> = n.request.ports.keys().copied().collect();
            run_in(Some(&ns), "nft", &["-f", "-"], &self.render(&b, &rules, &Learned::new(), &ports))?;
            Ok(())
        })();
        if let Err(e) = done {
            self.teardown(vm, n);
            return Err(e);
        }
        Ok(ns)
    }

    /// Starts (or restarts, after a flintd restart) the DNS proxy of a VM whose namespace exists, re-applying its
    /// policy. Needs a tokio runtime.
    pub fn start_proxy(self: &Arc<Self>, vm: &str, n: &VmNet, rules: Rules) -> Result<(), NetError> {
        let b = self.block(n.index)?;
        let ns = self.netns_path(vm);
        if !ns.exists() {
            return Err(NetError::Gone { vm: vm.into(), path: ns });
        }
        if self.fake.is_some() {
            let running =
                Running::new(Arc::new(Mutex::new(rules)), Arc::default(), tokio::spawn(std::future::pending()));
            if let Some(old) = lock(&self.running).insert(vm.to_string(), running) {
                old.proxy.abort();
            }
            return Ok(());
        }
        let gw = b.gateway();
        let sock = in_netns(&ns, move || {
            let s = std::net::UdpSocket::bind((gw, 53)).map_err(|e| io(format!("bind the DNS proxy to {gw}:53"), e))?;
            s.set_nonblocking(true).map_err(|e| io("DNS proxy socket", e))?;
            Ok(s)
        })?;
        let sock = tokio::net::UdpSocket::from_std(sock).map_err(|e| io("DNS proxy socket", e))?;
        let rules = Arc::new(Mutex::new(rules));
        let learned = Arc::new(Mutex::new(Learned::new()));
        let upstream = self.cfg.upstream_dns.or_else(host_resolver);
        let proxy = tokio::spawn(dns_proxy(self.clone(), vm.to_string(), sock, upstream, rules.clone()));
        if let Some(old) = lock(&self.running).insert(vm.to_string(), Running::new(rules, learned, proxy)) {
            old.proxy.abort();
        }
        Ok(())
    }

    /// Applies a new policy to a running VM (one nft transaction: no moment without a policy). Addresses the DNS
    /// proxy opened stay open only while their name is still allowed. Blocking.
    pub fn set_policy(&self, vm: &str, n: &VmNet, rules: Rules) -> Result<(), NetError> {
        let b = self.block(n.index)?;
        if let Some(f) = &self.fake {
            lock(&f.policies).insert(vm.to_string(), rules.clone());
            if let Some(r) = lock(&self.running).get(vm) {
                *lock(&r.rules) = rules;
            }
            return Ok(());
        }
        let (writer, learned, current) = match lock(&self.running).get(vm) {
            Some(r) => (r.writer.clone(), r.learned.clone(), Some(r.rules.clone())),
            None => (Arc::default(), Arc::default(), None),
        };
        let _w = lock(&writer);
        let learned = lock(&learned).clone();
        let ports: Vec<u16> = n.request.ports.keys().copied().collect();
        run_in(Some(&self.netns_path(vm)), "nft", &["-f", "-"], &self.render(&b, &rules, &learned, &ports))?;
        if let Some(r) = current {
            *lock(&r) = rules;
        }
        Ok(())
    }

    /// Removes everything VM `vm`'s network holds on the host. Idempotent.
    pub fn teardown(&self, vm: &str, n: &VmNet) {
        if let Some(r) = lock(&self.running).remove(vm) {
            r.proxy.abort();
        }
        if let (Ok(b), None) = (self.block(n.index), &self.fake) {
            let _ = run_in(None, "ip", &["link", "del", &b.host_link()], "");
        }
        remove_netns(&self.netns_path(vm));
    }

    /// Network namespaces under the data directory that no VM in `keep` owns (left by a crash): removed.
    pub fn remove_orphans(&self, keep: &std::collections::HashSet<String>) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                warn!(vm = %name, "removing the network namespace of a VM no record owns");
                remove_netns(&e.path());
            }
        }
    }

    /// Opens `ips` (answers for `name`) in the VM's allowed set for their TTL (clamped): only addresses a domain
    /// rule may open, at most [`MAX_LEARNED`] per VM, written by one writer in one nft run with whatever else is
    /// pending, under the rules in force at that moment.
    fn open_addresses(&self, vm: &str, ips: &[(Ipv4Addr, u32)], name: &str) -> Result<(), NetError> {
        let (writer, pending, rules) = {
            let running = lock(&self.running);
            let Some(r) = running.get(vm) else { return Ok(()) };
            let mut learned = lock(&r.learned);
            let now = Instant::now();
            learned.retain(|_, (_, until)| *until > now);
            let mut pending = lock(&r.pending);
            for (ip, ttl) in ips {
                if !self.openable(*ip) || (learned.len() >= MAX_LEARNED && !learned.contains_key(ip)) {
                    self.counters.dns_withheld.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                let secs = (*ttl).clamp(MIN_DNS_OPEN_S, MAX_DNS_OPEN_S);
                let until = now + Duration::from_secs(u64::from(secs));
                // Still open for more than half the new time: nothing to write (a guest repeating a query must
                // not make flintd fork a process per answer).
                let fresh = learned.get(ip).is_some_and(|(n, u)| n == name && *u > now + (until - now) / 2);
                if !fresh {
                    learned.insert(*ip, (name.to_string(), until));
                    pending.push((*ip, secs, name.to_string()));
                }
            }
            (r.writer.clone(), r.pending.clone(), r.rules.clone())
        };
        let _w = lock(&writer);
        let batch = std::mem::take(&mut *lock(&pending));
        let rules = lock(&rules).clone();
        // `add` of an element already there keeps its old timeout: add (so the delete cannot fail), delete, add
        // with the new timeout, in one transaction.
        let script: String = batch
            .iter()
            .filter(|(_, _, name)| rules.dns(name) == policy::DnsDecision::AnswerAndAllow)
            .map(|(ip, secs, _)| {
                format!(
                    "add element inet flint allow_dns {{ {ip} }}\ndelete element inet flint allow_dns {{ {ip} }}\n\
                     add element inet flint allow_dns {{ {ip} timeout {secs}s }}\n"
                )
            })
            .collect();
        if script.is_empty() {
            return Ok(()); // written by the writer before us, or no longer allowed
        }
        run_in(Some(&self.netns_path(vm)), "nft", &["-f", "-"], &script)
    }
}

/// The host's IPv4 networks on interfaces other than Flint's and loopback (its LANs), and the interfaces its
/// default routes leave by (its uplinks).
fn host_interfaces(flint_prefix: &str) -> (Vec<Cidr>, Vec<String>) {
    let out = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut lans = Vec::new();
    // `2: eth0    inet 192.0.2.7/24 brd 192.0.2.255 scope global eth0 ...`
    for line in out(&["-4", "-o", "addr", "show"]).lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(dev), Some(i)) = (w.get(1), w.iter().position(|x| *x == "inet")) else { continue };
        if *dev == "lo" || dev.starts_with(flint_prefix) {
            continue;
        }
        let Some((addr, len)) = w.get(i + 1).and_then(|a| a.split_once('/')) else { continue };
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u8>()) else { continue };
        if len == 0 || len > 32 {
            continue;
        }
        let net = Cidr { addr, len };
        lans.push(Cidr { addr: Ipv4Addr::from(u32::from(addr) & net.mask()), len });
    }
    // `default via 192.0.2.1 dev eth0 ...`
    let uplinks = out(&["-4", "route", "show", "default"])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter().position(|x| *x == "dev").and_then(|i| w.get(i + 1)).map(|d| d.to_string())
        })
        .filter(|d| !d.starts_with(flint_prefix))
        .collect();
    (lans, uplinks)
}

/// Serves a VM's DNS: a query the policy allows is forwarded upstream and answered (answers of allowed domains
/// opened in the VM's set first, so the guest's connection that follows passes); others get REFUSED.
async fn dns_proxy(
    nets: Arc<Networks>,
    vm: String,
    sock: tokio::net::UdpSocket,
    upstream: Option<SocketAddr>,
    rules: Arc<Mutex<Rules>>,
) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; dns::MAX_MESSAGE];
    // At most this many queries in flight per VM: a guest flooding queries cannot fan out without bound.
    let inflight = Arc::new(tokio::sync::Semaphore::new(32));
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
        let q = buf[..n].to_vec();
        let Some(question) = dns::parse_query(&q) else { continue };
        let decision = lock(&rules).dns(&question.name);
        let counter = match decision {
            policy::DnsDecision::Refuse => &nets.counters.dns_refused,
            _ => &nets.counters.dns_answered,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(vm = %vm, name = %question.name, ?decision, "DNS query");
        let Ok(permit) = inflight.clone().try_acquire_owned() else { continue };
        let (sock, nets, vm) = (sock.clone(), nets.clone(), vm.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = match (decision, upstream) {
                (policy::DnsDecision::Refuse, _) => dns::error_reply(&q, 5),
                (_, None) => dns::error_reply(&q, 2),
                (d, Some(up)) => match forward(&q, up).await {
                    Some(answer) => {
                        if d == policy::DnsDecision::AnswerAndAllow {
                            let ips = dns::answer_addresses(&answer, question.id, &question.name).unwrap_or_default();
                            let name = question.name.clone();
                            let nets2 = nets.clone();
                            let vm2 = vm.clone();
                            let opened =
                                tokio::task::spawn_blocking(move || nets2.open_addresses(&vm2, &ips, &name)).await;
                            if let Ok(Err(e)) = opened {
                                warn!(vm = %vm, error = %e, "could not open a DNS answer's addresses");
                            }
                        }
                        answer
                    }
                    None => dns::error_reply(&q, 2),
                },
            };
            if !reply.is_empty() {
                let _ = sock.send_to(&reply, from).await;
            }
        });
    }
}

/// One query to the upstream resolver (3 s); its answer, if it answers this query.
async fn forward(q: &[u8], up: SocketAddr) -> Option<Vec<u8>> {
    let s = tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await.ok()?;
    s.send_to(q, up).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let id = u16::from_be_bytes([q[0], q[1]]);
    tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let (n, from) = s.recv_from(&mut buf).await.ok()?;
            if from == up && n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                return Some(buf[..n].to_vec());
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_table_denies_what_no_policy_may_open() {
        let nets = Networks::new(NetworkConfig::default(), Path::new("/nonexistent"));
        let b = nets.block(3).unwrap();
        let rules = EgressPolicy {
            default: Verdict::Deny,
            allow: vec!["allowed.test".into(), "203.0.113.0/24".into()],
            deny: vec!["203.0.113.11".into()],
        }
        .check(16)
        .unwrap();
        let mut learned = Learned::new();
        learned.insert(
            "198.51.100.7".parse().unwrap(),
            ("x.allowed.test".into(), Instant::now() + Duration::from_secs(60)),
        );
        learned
            .insert("198.51.100.8".parse().unwrap(), ("other.test".into(), Instant::now() + Duration::from_secs(60)));
        *lock(&nets.host_lans) = vec!["192.0.2.0/24".parse().unwrap(), "10.1.0.0/16".parse().unwrap()];
        let t = nets.render(&b, &rules, &learned, &[8080]);
        for want in [
            "elements = { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3, 10.200.0.0/16 }",
            "set private { type ipv4_addr; flags interval; elements = { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, \
             100.64.0.0/10, 192.0.0.0/24, 198.18.0.0/15, 168.63.129.16/32, 192.0.2.0/24 }; }",
            "ip daddr @allow_nets accept\n\t\tip daddr @private drop\n\t\tmeta l4proto { tcp, udp } ip daddr @allow_dns accept",
            "tcp dport { 8080 } tcp flags & (syn | ack) == syn ct state new accept",
            "meta nfproto != ipv4 drop",
            "set deny_nets { type ipv4_addr; flags interval; elements = { 203.0.113.11/32 }; }",
            "set allow_nets { type ipv4_addr; flags interval; elements = { 203.0.113.0/24 }; }",
            "198.51.100.7 timeout",
            "ip saddr != 10.200.0.26 drop",
            "\t\tdrop\n\t}\n}",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert!(!t.contains("198.51.100.8"), "an answer for a name no longer allowed stays closed");
        let open = nets.render(&b, &EgressPolicy::default().check(16).unwrap(), &Learned::new(), &[]);
        assert!(
            open.contains("\t\taccept\n\t}\n}") && open.contains("set allow_dns { type ipv4_addr; flags timeout; }")
        );
        assert!(!open.contains("tcp dport {"), "no exposed port: nothing from the host gets in");
        // DNS answers open only addresses no CIDR rule must open.
        for (ip, ok) in [
            ("198.51.100.7", true),
            ("10.1.2.3", false),
            ("100.100.100.200", false),
            ("192.0.2.9", false),
            ("168.63.129.16", false),
            ("169.254.169.254", false),
            ("10.200.0.9", false),
            ("8.8.8.8", true),
        ] {
            assert_eq!(nets.openable(ip.parse().unwrap()), ok, "{ip}");
        }
    }

    #[test]
    fn nested_networks_are_given_to_nftables_once() {
        let n = |s: &str| s.parse::<Cidr>().unwrap();
        assert_eq!(
            policy::outermost(&[
                n("10.1.0.0/16"),
                n("10.0.0.0/8"),
                n("192.0.2.0/24"),
                n("10.0.0.0/8"),
                n("10.1.2.3/32")
            ]),
            vec![n("10.0.0.0/8"), n("192.0.2.0/24")]
        );
    }
}
