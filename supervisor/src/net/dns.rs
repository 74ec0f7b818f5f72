//! The little of DNS the egress proxy needs (RFC 1035): the question of a query, a refusal, and the A records of
//! an answer with their TTLs. Every read is bounds-checked: queries come from the guest, answers from the network.
use std::net::Ipv4Addr;

/// A query's question.
#[derive(Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: u16,
}

pub const MAX_MESSAGE: usize = 1232;

/// Reads a (possibly compressed) name at `pos`; returns it and the position after it in the message.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    let mut jumps = 0;
    let mut total = 0;
    loop {
        let len = *msg.get(pos)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => {
                end.get_or_insert(pos + 1);
                break;
            }
            0x00 => {
                let label = msg.get(pos + 1..pos + 1 + len)?;
                total += len + 1;
                if total > 255 {
                    return None;
                }
                labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
                pos += 1 + len;
            }
            0xc0 => {
                let target = ((len & 0x3f) << 8) | *msg.get(pos + 1)? as usize;
                end.get_or_insert(pos + 2);
                jumps += 1;
                if jumps > 16 || target >= pos {
                    return None; // loops and forward pointers
                }
                pos = target;
            }
            _ => return None,
        }
    }
    Some((labels.join("."), end?))
}

/// The question of a standard query with exactly one question, or None (not something the proxy answers).
pub fn parse_query(msg: &[u8]) -> Option<Question> {
    if msg.len() < 12 || msg.len() > MAX_MESSAGE {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let qr = msg[2] & 0x80 != 0;
    let opcode = (msg[2] >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if qr || opcode != 0 || qdcount != 1 {
        return None;
    }
    let (name, pos) = read_name(msg, 12)?;
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    msg.get(pos + 3)?;
    Some(Question { id, name, qtype })
}

/// The answer to `query` with only its header and question: `rcode` 5 (REFUSED) or 2 (SERVFAIL).
pub fn error_reply(query: &[u8], rcode: u8) -> Vec<u8> {
    let Some((_, qend)) = read_name(query, 12) else { return Vec::new() };
    let end = (qend + 4).min(query.len());
    let mut out = query[..end].to_vec();
    if out.len() < 12 {
        return Vec::new();
    }
    out[2] = 0x80 | (query[2] & 0x79); // QR, the query's opcode and RD
    out[3] = 0x80 | (rcode & 0x0f); // RA
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..12].fill(0);
    out
}

/// Longest CNAME chain followed from the question's name.
const MAX_CHAIN: usize = 8;

/// The addresses an answer to query `id` for `qname` gives that name, with their TTLs (seconds): its A records
/// and those of the names its CNAME chain leads to, nothing else (a resolver's answer may carry records for other
/// names, which the question never asked about). None: not an answer to that query.
pub fn answer_addresses(msg: &[u8], id: u16, qname: &str) -> Option<Vec<(Ipv4Addr, u32)>> {
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id || msg[2] & 0x80 == 0 {
        return None;
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = 12;
    for i in 0..qd {
        let (name, end) = read_name(msg, pos)?;
        if i == 0 && name != qname {
            return None;
        }
        pos = end + 4;
    }
    // (owner, A address or CNAME target, ttl)
    let mut addrs: Vec<(String, Ipv4Addr, u32)> = Vec::new();
    let mut aliases: Vec<(String, String)> = Vec::new();
    for _ in 0..an {
        let (owner, p) = read_name(msg, pos)?;
        let f = msg.get(p..p + 10)?;
        let (rtype, class) = (u16::from_be_bytes([f[0], f[1]]), u16::from_be_bytes([f[2], f[3]]));
        let ttl = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
        let rdlen = u16::from_be_bytes([f[8], f[9]]) as usize;
        let rdata = msg.get(p + 10..p + 10 + rdlen)?;
        match (rtype, class) {
            (1, 1) if rdlen == 4 => addrs.push((owner, Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]), ttl)),
            (5, 1) => aliases.push((owner, read_name(msg, p + 10)?.0)),
            _ => {}
        }
        pos = p + 10 + rdlen;
    }
    let mut chain = vec![qname.to_string()];
    while chain.len() <= MAX_CHAIN {
        let last = chain.last().expect("never empty");
        let Some((_, next)) = aliases.iter().find(|(o, _)| o == last) else { break };
        if chain.contains(next) {
            break; // a loop
        }
        chain.push(next.clone());
    }
    Some(addrs.into_iter().filter(|(o, _, _)| chain.contains(o)).map(|(_, a, t)| (a, t)).collect())
}

/// A query for `name` (tests, the benchmark).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// An answer to `query` giving `addrs` as A records (a compressed pointer to the question's name), TTL `ttl`;
/// NXDOMAIN when `addrs` is empty. The test harness's "world" DNS server uses it.
pub fn answer(query: &[u8], addrs: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    let mut out = error_reply(query, if addrs.is_empty() { 3 } else { 0 });
    if out.is_empty() {
        return out;
    }
    out[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
    for a in addrs {
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&a.octets());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_answers_and_refusals_round_trip() {
        let q = query(0x1234, "Allowed.Test", 1);
        assert_eq!(parse_query(&q), Some(Question { id: 0x1234, name: "allowed.test".into(), qtype: 1 }));
        let a = answer(&q, &["203.0.113.10".parse().unwrap(), "203.0.113.12".parse().unwrap()], 30);
        assert_eq!(
            answer_addresses(&a, 0x1234, "allowed.test").unwrap(),
            vec![("203.0.113.10".parse().unwrap(), 30), ("203.0.113.12".parse().unwrap(), 30)]
        );
        assert_eq!(answer_addresses(&a, 0x9999, "allowed.test"), None, "another query's answer");
        assert_eq!(answer_addresses(&a, 0x1234, "other.test"), None, "an answer to another question");
        let r = error_reply(&q, 5);
        assert_eq!((r[2] & 0x80, r[3] & 0x0f), (0x80, 5));
        assert_eq!(answer_addresses(&r, 0x1234, "allowed.test").unwrap(), vec![]);
        assert!(parse_query(&a).is_none(), "an answer is not a query");
    }

    #[test]
    fn hostile_messages_are_refused_without_panicking() {
        let q = query(1, "a.b", 1);
        for n in 0..q.len() {
            let _ = parse_query(&q[..n]);
            let _ = answer_addresses(&q[..n], 1, "a.b");
            let _ = error_reply(&q[..n], 5);
        }
        // A compression pointer to itself, and one pointing forward.
        let mut looped = q[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(parse_query(&looped).is_none());
        let mut forward = q[..12].to_vec();
        forward.extend_from_slice(&[0xc0, 40, 0, 1, 0, 1]);
        assert!(parse_query(&forward).is_none());
        // An answer claiming more records than it holds.
        let mut a = answer(&q, &["1.2.3.4".parse().unwrap()], 5);
        a[7] = 9;
        assert!(answer_addresses(&a, 1, "a.b").is_none());
    }

    /// Appends a resource record: `owner` and a CNAME target as full names, or an A address.
    fn record(m: &mut Vec<u8>, owner: &str, cname: Option<&str>, a: Option<[u8; 4]>) {
        let name = |m: &mut Vec<u8>, n: &str| {
            for l in n.split('.') {
                m.push(l.len() as u8);
                m.extend_from_slice(l.as_bytes());
            }
            m.push(0);
        };
        name(m, owner);
        m.extend_from_slice(&[0, if cname.is_some() { 5 } else { 1 }, 0, 1, 0, 0, 0, 60]);
        if let Some(t) = cname {
            let mut rd = Vec::new();
            name(&mut rd, t);
            m.extend_from_slice(&(rd.len() as u16).to_be_bytes());
            m.extend_from_slice(&rd);
        } else {
            m.extend_from_slice(&4u16.to_be_bytes());
            m.extend_from_slice(&a.unwrap());
        }
    }

    /// Only the question's name and its CNAME chain count: an A record for any other name in the answer (a
    /// hostile or careless resolver's extra) opens nothing; chains are bounded and loops end.
    #[test]
    fn only_the_cname_chain_of_the_question_counts() {
        let q = query(7, "app.allowed.test", 1);
        let mut m = error_reply(&q, 0);
        record(&mut m, "app.allowed.test", Some("edge.cdn.test"), None);
        record(&mut m, "edge.cdn.test", Some("node.cdn.test"), None);
        record(&mut m, "node.cdn.test", None, Some([198, 51, 100, 7]));
        record(&mut m, "evil.test", None, Some([198, 51, 100, 66]));
        record(&mut m, "unrelated.test", Some("app.allowed.test"), None);
        m[6..8].copy_from_slice(&5u16.to_be_bytes());
        assert_eq!(answer_addresses(&m, 7, "app.allowed.test").unwrap(), vec![("198.51.100.7".parse().unwrap(), 60)]);
        // A loop: a → b → a.
        let mut l = error_reply(&q, 0);
        record(&mut l, "app.allowed.test", Some("b.test"), None);
        record(&mut l, "b.test", Some("app.allowed.test"), None);
        record(&mut l, "b.test", None, Some([198, 51, 100, 8]));
        l[6..8].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(answer_addresses(&l, 7, "app.allowed.test").unwrap(), vec![("198.51.100.8".parse().unwrap(), 60)]);
    }
}
