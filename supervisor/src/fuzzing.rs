//! Body of the flintd API fuzz target (fuzz/fuzz_targets/): request bodies as a caller sends them, parsed into
//! the typed requests and checked with the limits the handlers apply. Replayed from the committed corpus in
//! `cargo test` (flint-tests).
use crate::services::pools::CreateClones;
use crate::services::templates::CreateTemplate;
use crate::vm::{valid_id, CreateSnapshot, CreateVm};

pub fn api_bodies(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<CreateVm>(data) {
        let _ = v.mem_mib.map(flint_vmm_api::config::check_mem_mib);
        let _ = v.vcpus.map(flint_vmm_api::config::check_vcpus);
        if let Some(id) = &v.id {
            let _ = valid_id("VM id", id);
        }
    }
    if let Ok(t) = serde_json::from_slice::<CreateTemplate>(data) {
        let _ = valid_id("template name", &t.name);
    }
    if let Ok(s) = serde_json::from_slice::<CreateSnapshot>(data) {
        let _ = valid_id("snapshot id", &s.id);
    }
    let _ = serde_json::from_slice::<CreateClones>(data);
    let _ = serde_json::from_slice::<flint_agent::protocol::ExecRequest>(data);
    // The same bytes as a whole HTTP request on the socket (flintd and the VMM share the codec).
    let mut r = std::io::Cursor::new(data);
    while let Ok(Some(_)) = flint_vmm_api::http::read_request(&mut r, 1 << 20) {}
}

/// Body of the DNS fuzz target: what a guest sends the VM's DNS proxy (a query) and what a resolver answers,
/// through the proxy's parsers (docs/networking.md).
pub fn dns(data: &[u8]) {
    if let Some(q) = crate::net::dns::parse_query(data) {
        let _ = crate::net::dns::error_reply(data, 5);
        let _ = crate::net::dns::answer_addresses(data, q.id, &q.name);
    }
    let id = data.first().map_or(0, |b| u16::from(*b));
    let _ = crate::net::dns::answer_addresses(data, id, "allowed.test");
    let _ = crate::net::dns::error_reply(data, 2);
}

/// Body of the front end's fuzz target: bytes of an anonymous client's connection as the front end parses them —
/// request heads, their framing and chunked bodies — and a guest's answer heads (docs/networking.md).
pub fn front_end(data: &[u8]) {
    use crate::net::http1;
    let mut rest = data;
    for _ in 0..8 {
        let Ok(Some(n)) = http1::head_end(rest) else { break };
        let Ok(head) = http1::parse(&rest[..n]) else { break };
        let body = head.request_body();
        let _ = head.keep_alive();
        rest = &rest[n..];
        if let Ok(http1::Body::Chunked) = body {
            let mut c = http1::Chunked::default();
            match c.feed(rest) {
                Ok((used, _)) => rest = &rest[used.min(rest.len())..],
                Err(_) => break,
            }
        }
    }
    if let Ok(Some(n)) = http1::response_head_end(data) {
        if let Ok(h) = http1::parse_response(&data[..n]) {
            let _ = h.response_body("GET");
            let _ = h.to_bytes();
        }
    }
}

/// Body of the E2B fuzz target: what any API caller sends flintd's E2B endpoint — Connect envelopes, multipart
/// upload bodies, percent-encoded query values (docs/e2b.md).
pub fn e2b(data: &[u8]) {
    let _ = crate::e2b::connect::decode_all(data);
    let _ = crate::e2b::connect::single(data);
    let (head, body) = data.split_at(data.len().min(data.first().map_or(0, |n| *n as usize % 64)));
    let ct = String::from_utf8_lossy(head);
    if let Some(b) = crate::e2b::multipart::boundary(&ct) {
        let _ = crate::e2b::multipart::parse(body, &b);
    }
    let _ = crate::e2b::multipart::parse(body, "xyz");
    let _ = crate::e2b::percent_decode(&String::from_utf8_lossy(data));
}
