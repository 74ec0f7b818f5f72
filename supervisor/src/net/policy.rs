//! What a VM's network request says, checked: egress rules (CIDRs and domain names), exposed ports; and the
//! addresses a VM's network block holds. Pure: no system calls.
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 network: address and prefix length, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }
    pub fn overlaps(self, o: Cidr) -> bool {
        let m = self.mask() & o.mask();
        u32::from(self.addr) & m == u32::from(o.addr) & m
    }
    /// Addresses in it.
    pub fn size(self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }
}

/// Destinations a default-allow policy does not reach either, unless an explicit CIDR rule (`allow`) covers them:
/// private networks (RFC 1918), shared address space (RFC 6598, where Alibaba Cloud's metadata service
/// 100.100.100.200 lives), IETF protocol assignments, benchmarking, and Azure's wire server (168.63.129.16).
/// The host's own LANs are added at run time. DNS answers in them are never opened by a domain rule.
pub const PRIVATE_NETS: [Cidr; 7] = [
    Cidr { addr: Ipv4Addr::new(10, 0, 0, 0), len: 8 },
    Cidr { addr: Ipv4Addr::new(172, 16, 0, 0), len: 12 },
    Cidr { addr: Ipv4Addr::new(192, 168, 0, 0), len: 16 },
    Cidr { addr: Ipv4Addr::new(100, 64, 0, 0), len: 10 },
    Cidr { addr: Ipv4Addr::new(192, 0, 0, 0), len: 24 },
    Cidr { addr: Ipv4Addr::new(198, 18, 0, 0), len: 15 },
    Cidr { addr: Ipv4Addr::new(168, 63, 129, 16), len: 32 },
];

/// Destinations no policy can open: this network, loopback, link-local (169.254.169.254, the metadata service
/// of AWS, GCP and others), multicast and reserved.
pub const NEVER_NETS: [Cidr; 4] = [
    Cidr { addr: Ipv4Addr::new(0, 0, 0, 0), len: 8 },
    Cidr { addr: Ipv4Addr::new(127, 0, 0, 0), len: 8 },
    Cidr { addr: Ipv4Addr::new(169, 254, 0, 0), len: 16 },
    Cidr { addr: Ipv4Addr::new(224, 0, 0, 0), len: 3 },
];

/// The networks of `nets` not inside another one of them, in order (nftables refuses overlapping elements of an
/// interval set).
pub fn outermost(nets: &[Cidr]) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = Vec::new();
    for (i, n) in nets.iter().enumerate() {
        let inside = nets
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.len <= n.len && o.contains(n.addr) && (o.len < n.len || j < i));
        if !inside && !out.contains(n) {
            out.push(*n);
        }
    }
    out
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why an egress policy, a CIDR, a domain rule or an exposed port is refused (a 400: nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

impl crate::error::Classify for PolicyError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Invalid
    }
}

macro_rules! refuse {
    ($($t:tt)*) => { PolicyError(format!($($t)*)) };
}

impl FromStr for Cidr {
    type Err = PolicyError;
    /// `a.b.c.d/len` or a bare address (a /32). Host bits must be zero: `10.0.0.1/8` is refused, not guessed at.
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => {
                let len: u8 = l.parse().map_err(|_| refuse!("{s:?}: prefix length {l:?} is not a number 0-32"))?;
                (a, len)
            }
            None => (s, 32),
        };
        if a.contains(':') {
            return Err(refuse!("{s:?}: IPv6 is not supported (guest networks are IPv4)"));
        }
        let addr: Ipv4Addr = a.parse().map_err(|_| refuse!("{s:?} is not an IPv4 address or CIDR"))?;
        if len > 32 {
            return Err(refuse!("{s:?}: prefix length {len} is over 32"));
        }
        let c = Cidr { addr, len };
        if u32::from(addr) & !c.mask() != 0 {
            return Err(refuse!(
                "{s:?} has host bits set (did you mean {}/{len}?)",
                Ipv4Addr::from(u32::from(addr) & c.mask())
            ));
        }
        Ok(c)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A domain rule: `example.com` matches that name and every name under it; `*.example.com` only names under it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DomainRule {
    pub name: String,
    pub subdomains_only: bool,
}

impl DomainRule {
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        let (rest, sub) = match s.strip_prefix("*.") {
            Some(r) => (r, true),
            None => (s, false),
        };
        let name = rest.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return Err(refuse!("{s:?} is not a domain name (1-253 characters)"));
        }
        for label in name.split('.') {
            if label.is_empty()
                || label.len() > 63
                || label.starts_with('-')
                || label.ends_with('-')
                || !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(refuse!(
                    "{s:?} is not a domain name or CIDR (labels of letters, digits and '-', or a.b.c.d/len)"
                ));
            }
        }
        if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(refuse!("{s:?} is neither an IPv4 address nor a domain name"));
        }
        Ok(DomainRule { name, subdomains_only: sub })
    }

    /// Whether `qname` (lower case, no trailing dot) is covered.
    pub fn matches(&self, qname: &str) -> bool {
        let under = qname.len() > self.name.len()
            && qname.ends_with(&self.name)
            && qname.as_bytes()[qname.len() - self.name.len() - 1] == b'.';
        under || (!self.subdomains_only && qname == self.name)
    }
}

impl fmt::Display for DomainRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subdomains_only {
            write!(f, "*.")?;
        }
        f.write_str(&self.name)
    }
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

/// A VM's egress policy as the API takes it: rules are CIDRs or domain names (see `DomainRule`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// What traffic no rule names gets.
    #[serde(default)]
    pub default: Verdict,
    #[serde(default)]
    pub allow: Vec<String>,
    /// Deny rules win over allow rules.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// An egress policy, checked and split by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub default: Verdict,
    pub allow_nets: Vec<Cidr>,
    pub deny_nets: Vec<Cidr>,
    pub allow_domains: Vec<DomainRule>,
    pub deny_domains: Vec<DomainRule>,
}

impl Rules {
    /// What the DNS proxy does with a query for `qname`: answer it (and, when an allow rule names it, let the
    /// guest reach the answers), or refuse it.
    pub fn dns(&self, qname: &str) -> DnsDecision {
        if self.deny_domains.iter().any(|d| d.matches(qname)) {
            return DnsDecision::Refuse;
        }
        if self.allow_domains.iter().any(|d| d.matches(qname)) {
            return DnsDecision::AnswerAndAllow;
        }
        match self.default {
            Verdict::Allow => DnsDecision::Answer,
            Verdict::Deny => DnsDecision::Refuse,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsDecision {
    Refuse,
    /// Resolve; the addresses need no rule (the default allows them).
    Answer,
    /// Resolve and add the answers to the VM's allowed set for their TTL.
    AnswerAndAllow,
}

impl EgressPolicy {
    /// Checks every rule (at most `max_rules` per list): a bad policy changes nothing.
    pub fn check(&self, max_rules: usize) -> Result<Rules, PolicyError> {
        let mut r = Rules { default: self.default, ..Rules::default() };
        for (list, nets, domains, what) in [
            (&self.allow, &mut r.allow_nets, &mut r.allow_domains, "allow"),
            (&self.deny, &mut r.deny_nets, &mut r.deny_domains, "deny"),
        ] {
            if list.len() > max_rules {
                return Err(refuse!("{} {what} rules: at most {max_rules}", list.len()));
            }
            for rule in list {
                let rule = rule.trim();
                let looks_like_ip = rule.contains('/') || rule.contains(':') || rule.parse::<Ipv4Addr>().is_ok();
                if looks_like_ip {
                    nets.push(rule.parse().map_err(|e| refuse!("{what}: {e}"))?);
                } else {
                    domains.push(DomainRule::parse(rule).map_err(|e| refuse!("{what}: {e}"))?);
                }
            }
        }
        Ok(r)
    }
}

/// An exposed guest port: reachable through flintd's front end (docs/networking.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposedPort {
    /// A request must carry it (`flint-token` header, `flint_token` query parameter, or the cookie the front end
    /// sets after one carried it). None: open to anyone who can reach the front end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Also forward plain TCP: connections to this port of the front end's address reach the guest port (any
    /// protocol; no token can guard it). Within `network.tcp_ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_listen: Option<u16>,
}

/// A network request for a VM or session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    #[serde(default)]
    pub egress: EgressPolicy,
    /// Guest ports reachable through the front end, by port number.
    #[serde(default, deserialize_with = "port_map")]
    pub ports: BTreeMap<u16, ExposedPort>,
}

/// A map keyed by port numbers, which JSON writes as strings (read also where serde buffers the input, as for a
/// flattened record, and integer keys would not parse).
fn port_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, ExposedPort>, D::Error> {
    let raw = BTreeMap::<String, ExposedPort>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<u16>()
                .map(|p| (p, v))
                .map_err(|_| serde::de::Error::custom(format!("port `{k}` is not a port number")))
        })
        .collect()
}

impl NetworkRequest {
    pub fn check(&self, max_rules: usize) -> Result<Rules, PolicyError> {
        if self.ports.len() > 64 {
            return Err(refuse!("{} exposed ports: at most 64", self.ports.len()));
        }
        for (p, e) in &self.ports {
            check_port(*p, e)?;
        }
        self.egress.check(max_rules)
    }
}

pub fn check_port(port: u16, e: &ExposedPort) -> Result<(), PolicyError> {
    if port == 0 {
        return Err(refuse!("port 0 cannot be exposed"));
    }
    if e.tcp_listen.is_some() && e.token.is_some() {
        return Err(refuse!(
            "port {port}: a token cannot guard plain TCP forwarding (tcp_listen); use the HTTP front end for a token"
        ));
    }
    if let Some(t) = &e.token {
        if t == GENERATE_TOKEN {
            return Ok(());
        }
        let ok = t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b));
        if t.len() < MIN_TOKEN_LEN || t.len() > 256 || !ok {
            return Err(refuse!(
                "an access token is {MIN_TOKEN_LEN}-256 characters of [A-Za-z0-9-_.~] (at least 128 bits of a \
                 random one), or `{GENERATE_TOKEN}` for flintd to make one"
            ));
        }
    }
    Ok(())
}

/// An exposed port's `token` that asks flintd to make one (128 random bits, 32 hex digits), shown once in the
/// answer that made it.
pub const GENERATE_TOKEN: &str = "auto";
/// Shortest token a caller may give (128 bits in base64).
pub const MIN_TOKEN_LEN: usize = 22;

/// A new access token: 128 bits from the kernel's CSPRNG, as 32 hex digits.
pub fn new_token() -> String {
    let mut r = [0u8; 16];
    getrandom::getrandom(&mut r).expect("the kernel's random source");
    r.iter().map(|b| format!("{b:02x}")).collect()
}

impl NetworkRequest {
    /// Makes a token for every port that asks for one (`auto`); returns them by port (the only time they are
    /// shown: records show `(set)`).
    pub fn make_tokens(&mut self) -> BTreeMap<u16, String> {
        let mut made = BTreeMap::new();
        for (p, e) in self.ports.iter_mut() {
            if e.token.as_deref() == Some(GENERATE_TOKEN) {
                let t = new_token();
                e.token = Some(t.clone());
                made.insert(*p, t);
            }
        }
        made
    }

    /// The same ports with new tokens where they had one (a fork: children never share their parent's tokens).
    pub fn with_new_tokens(&self) -> NetworkRequest {
        let mut n = self.clone();
        for e in n.ports.values_mut().filter(|e| e.token.is_some()) {
            e.token = Some(GENERATE_TOKEN.into());
        }
        n
    }
}

/// The addresses of VM network number `index` in `pool`: each VM takes an aligned block of 8.
///
/// ```text
/// block+0 .. +3  /30  guest link: tap0 in the VM's namespace (+1, the guest's gateway and DNS), the guest (+2)
/// block+4 .. +7  /30  veth link:  the host end (+5), the VM namespace's end (+6)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub index: u32,
    pub base: u32,
}

pub const BLOCK: u32 = 8;

impl Block {
    pub fn new(pool: Cidr, index: u32) -> Option<Block> {
        (u64::from(index + 1) * u64::from(BLOCK) <= pool.size())
            .then(|| Block { index, base: u32::from(pool.addr) + index * BLOCK })
    }
    fn at(&self, off: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + off)
    }
    pub fn guest_net(&self) -> Cidr {
        Cidr { addr: self.at(0), len: 30 }
    }
    pub fn gateway(&self) -> Ipv4Addr {
        self.at(1)
    }
    pub fn guest(&self) -> Ipv4Addr {
        self.at(2)
    }
    pub fn host(&self) -> Ipv4Addr {
        self.at(5)
    }
    pub fn ns_veth(&self) -> Ipv4Addr {
        self.at(6)
    }
    /// The host end of the veth pair.
    pub fn host_link(&self) -> String {
        format!("{HOST_LINK_PREFIX}{}", self.index)
    }
    /// A locally administered unicast MAC naming the block and a per-VM nonce (clones never share one).
    pub fn mac(&self, nonce: u8) -> String {
        let g = self.guest().octets();
        format!("06:{nonce:02x}:{:02x}:{:02x}:{:02x}:{:02x}", g[0], g[1], g[2], g[3])
    }
}

/// Host ends of VM veth pairs are `flv<index>`.
pub const HOST_LINK_PREFIX: &str = "flv";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().to_string(), "1.2.3.4/32");
        for (bad, want) in [
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0/33", "over 32"),
            ("10.0.0.0/x", "not a number"),
            ("::1/128", "IPv6"),
            ("300.1.1.1", "not an IPv4"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.to_string().contains(want), "{bad}: {e}");
        }
        let c: Cidr = "10.200.0.0/16".parse().unwrap();
        assert!(c.contains("10.200.255.1".parse().unwrap()) && !c.contains("10.201.0.0".parse().unwrap()));
        assert!(c.overlaps("10.0.0.0/8".parse().unwrap()) && !c.overlaps("10.201.0.0/16".parse().unwrap()));
    }

    #[test]
    fn domain_rules_match_names_and_subdomains() {
        let d = DomainRule::parse("Example.COM.").unwrap();
        assert!(d.matches("example.com") && d.matches("a.b.example.com"));
        assert!(!d.matches("badexample.com") && !d.matches("example.co"));
        let s = DomainRule::parse("*.example.com").unwrap();
        assert!(s.matches("www.example.com") && !s.matches("example.com"));
        for bad in ["", "a..b", "-a.com", "a b.com", "1.2.3", "x".repeat(64).as_str()] {
            assert!(DomainRule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn policies_are_checked_whole_and_decide_dns() {
        let p = EgressPolicy {
            default: Verdict::Deny,
            allow: vec!["allowed.test".into(), "203.0.113.0/24".into()],
            deny: vec!["bad.allowed.test".into()],
        };
        let r = p.check(8).unwrap();
        assert_eq!(r.allow_nets.len(), 1);
        assert_eq!(r.dns("allowed.test"), DnsDecision::AnswerAndAllow);
        assert_eq!(r.dns("x.allowed.test"), DnsDecision::AnswerAndAllow);
        assert_eq!(r.dns("bad.allowed.test"), DnsDecision::Refuse);
        assert_eq!(r.dns("other.test"), DnsDecision::Refuse);
        let open = EgressPolicy { deny: vec!["denied.test".into()], ..Default::default() }.check(8).unwrap();
        assert_eq!(open.dns("other.test"), DnsDecision::Answer);
        assert_eq!(open.dns("denied.test"), DnsDecision::Refuse);
        let too_many = EgressPolicy { allow: vec!["a.com".into(); 9], ..Default::default() };
        assert!(too_many.check(8).unwrap_err().to_string().contains("at most 8"));
        let bad = EgressPolicy { deny: vec!["10.0.0.1/8".into()], ..Default::default() };
        assert!(bad.check(8).unwrap_err().to_string().starts_with("deny: "));
        let unknown = serde_json::from_str::<NetworkRequest>(r#"{"egress":{"allow":[],"alow":[]}}"#);
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn blocks_do_not_overlap_and_stay_in_the_pool() {
        let pool: Cidr = "10.200.0.0/24".parse().unwrap();
        let a = Block::new(pool, 0).unwrap();
        let b = Block::new(pool, 1).unwrap();
        assert_eq!(
            (a.gateway(), a.guest(), a.host(), a.ns_veth()),
            (
                "10.200.0.1".parse().unwrap(),
                "10.200.0.2".parse().unwrap(),
                "10.200.0.5".parse().unwrap(),
                "10.200.0.6".parse().unwrap()
            )
        );
        assert_eq!(b.guest().to_string(), "10.200.0.10");
        assert!(Block::new(pool, 31).is_some() && Block::new(pool, 32).is_none());
        assert_ne!(a.mac(1), a.mac(2));
        assert_eq!(a.mac(1), "06:01:0a:c8:00:02");
        assert!(check_port(80, &ExposedPort { token: Some("short".into()), tcp_listen: None }).is_err());
        let both = ExposedPort { token: Some("a-token-of-22-chars-ok".into()), tcp_listen: Some(20000) };
        assert!(check_port(80, &both).unwrap_err().to_string().contains("plain TCP"));
    }

    #[test]
    fn tokens_are_long_and_plain_or_made_by_flintd() {
        let port = |t: &str| ExposedPort { token: Some(t.into()), tcp_listen: None };
        // Guessable or header-breaking tokens are refused.
        for bad in ["s3cret-token", "a-token-of-21-chars-x", "a token with spaces ok!", "tok;en=aaaaaaaaaaaaaaaaaaaa"] {
            assert!(check_port(80, &port(bad)).is_err(), "{bad}");
        }
        assert!(check_port(80, &port(&"x".repeat(257))).is_err());
        assert!(check_port(80, &port("a-token-of-22-chars-ok")).is_ok());
        assert!(check_port(80, &port(GENERATE_TOKEN)).is_ok());
        // `auto` becomes 128 random bits, one per port, different each time; given tokens stay.
        let mut req = NetworkRequest::default();
        req.ports.insert(80, port(GENERATE_TOKEN));
        req.ports.insert(81, port(GENERATE_TOKEN));
        req.ports.insert(82, port("a-token-of-22-chars-ok"));
        req.ports.insert(83, ExposedPort::default());
        let made = req.make_tokens();
        assert_eq!(made.keys().copied().collect::<Vec<_>>(), vec![80, 81]);
        assert!(made.values().all(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit())));
        assert_ne!(made[&80], made[&81]);
        assert_eq!(req.ports[&80].token.as_ref(), Some(&made[&80]));
        assert!(req.make_tokens().is_empty(), "made once");
        // A fork's copy asks for new ones wherever there was a token, and keeps open ports open.
        let mut child = req.with_new_tokens();
        let again = child.make_tokens();
        assert_eq!(again.keys().copied().collect::<Vec<_>>(), vec![80, 81, 82]);
        assert!(again.iter().all(|(p, t)| req.ports[p].token.as_ref() != Some(t)));
        assert!(child.ports[&83].token.is_none());
    }
}
