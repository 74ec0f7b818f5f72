//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/...`, bytes as base64, int64 as strings): the
//! handful of calls flintd needs — leases (grant, keep-alive, revoke), range, put, delete and transactions. The
//! gateway ships with every etcd ≥ 3.4 and needs no code generation; a request that finds no quorum times out
//! (`timeout`) rather than waiting forever, and the next endpoint is tried on a connection error.
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::e2b::b64;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered (connection refused, timeout: no quorum, a partition).
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// An endpoint answered with an error.
    #[error("etcd refused {call}: {detail}")]
    Refused { call: &'static str, detail: String },
    #[error("etcd answered {call} with something unexpected: {detail}")]
    Protocol { call: &'static str, detail: String },
    #[error("etcd client setup: {0}")]
    Setup(String),
}

/// TLS towards etcd: the CA that signs its certificates and, for mutual TLS, this client's certificate and key.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

/// One key's value as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

/// One condition of a transaction (all must hold).
#[derive(Debug, Clone)]
pub enum Cmp {
    /// The key does not exist.
    Absent(String),
    /// The key was last written at this revision.
    ModRevision(String, i64),
    /// The key holds exactly this value.
    Value(String, Vec<u8>),
    /// The key is bound to this lease.
    Lease(String, i64),
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put { key: String, value: Vec<u8>, lease: i64 },
    Delete(String),
    Get(String),
}

/// What a transaction did.
#[derive(Debug, Clone)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction (a put's new mod revision when it succeeded).
    pub revision: i64,
    /// Keys read by `Op::Get`, in order (a missing key: `None`).
    pub got: Vec<Option<Kv>>,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Kv),
    Delete(String),
}

#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    http: reqwest::Client,
    /// For watches: no whole-request deadline (a watch lasts as long as it is wanted).
    watch_http: reqwest::Client,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("endpoints", &self.endpoints).finish()
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_of(v: &Value) -> Option<Kv> {
    let key = String::from_utf8(b64::decode(v.get("key")?.as_str()?)?).ok()?;
    let value = match v.get("value").and_then(Value::as_str) {
        Some(s) => b64::decode(s)?,
        None => Vec::new(),
    };
    Some(Kv {
        key,
        value,
        create_revision: v.get("create_revision").map_or(0, int),
        mod_revision: v.get("mod_revision").map_or(0, int),
        lease: v.get("lease").map_or(0, int),
    })
}

/// The smallest key above every key starting with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// A client for `endpoints` (`http://host:port` or `https://…`, the latter with `tls`).
    pub fn new(endpoints: &[String], tls: &EtcdTls, timeout: Duration) -> Result<Etcd, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Setup("no etcd endpoints".into()));
        }
        for e in endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(EtcdError::Setup(format!("etcd endpoint `{e}`: give it as http://host:port or https://…")));
            }
        }
        let build = |b: reqwest::ClientBuilder| -> Result<reqwest::Client, EtcdError> {
            let mut b = b.connect_timeout(timeout).no_proxy();
            if let Some(ca) = &tls.ca {
                let pem = std::fs::read(ca).map_err(|e| EtcdError::Setup(format!("{}: {e}", ca.display())))?;
                let cert = reqwest::Certificate::from_pem(&pem)
                    .map_err(|e| EtcdError::Setup(format!("{}: {e}", ca.display())))?;
                b = b.add_root_certificate(cert);
            }
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => {
                    let mut pem = std::fs::read(c).map_err(|e| EtcdError::Setup(format!("{}: {e}", c.display())))?;
                    pem.extend(std::fs::read(k).map_err(|e| EtcdError::Setup(format!("{}: {e}", k.display())))?);
                    let id = reqwest::Identity::from_pem(&pem)
                        .map_err(|e| EtcdError::Setup(format!("etcd client certificate: {e}")))?;
                    b = b.identity(id);
                }
                (None, None) => {}
                _ => return Err(EtcdError::Setup("etcd TLS: give both a client certificate and its key".into())),
            }
            b.build().map_err(|e| EtcdError::Setup(e.to_string()))
        };
        Ok(Etcd {
            endpoints: endpoints.iter().map(|e| e.trim_end_matches('/').to_string()).collect(),
            http: build(reqwest::Client::builder().timeout(timeout))?,
            watch_http: build(reqwest::Client::builder())?,
        })
    }

    /// Watches every key under `prefix` from revision `from` on, handing each change to `on`, until the stream
    /// ends or fails (returned either way: the caller lists again and watches from there).
    pub async fn watch_prefix(&self, prefix: &str, from: i64, mut on: impl FnMut(WatchEvent)) -> EtcdError {
        let body = json!({ "create_request": {
            "key": b64::encode(prefix.as_bytes()),
            "range_end": b64::encode(&prefix_end(prefix)),
            "start_revision": from.to_string(),
        }});
        let ep = &self.endpoints[0];
        let mut r = match self.watch_http.post(format!("{ep}/v3/watch")).body(body.to_string()).send().await {
            Ok(r) => r,
            Err(e) => return EtcdError::Unreachable(format!("{ep}: {e}")),
        };
        let mut buf = Vec::new();
        loop {
            let chunk = match r.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => return EtcdError::Unreachable(format!("{ep}: the watch ended")),
                Err(e) => return EtcdError::Unreachable(format!("{ep}: {e}")),
            };
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
                let v = v.get("result").cloned().unwrap_or(v);
                if v.get("canceled").and_then(Value::as_bool) == Some(true) || v.get("error").is_some() {
                    return EtcdError::Refused { call: "watch", detail: v.to_string() };
                }
                for e in v.get("events").and_then(Value::as_array).into_iter().flatten() {
                    let Some(kv) = e.get("kv").and_then(kv_of) else { continue };
                    if e.get("type").and_then(Value::as_str) == Some("DELETE") {
                        on(WatchEvent::Delete(kv.key));
                    } else {
                        on(WatchEvent::Put(kv));
                    }
                }
            }
        }
    }

    /// One gateway call, on each endpoint in turn until one answers.
    async fn call(&self, call: &'static str, path: &str, body: Value) -> Result<Value, EtcdError> {
        let body = serde_json::to_vec(&body).map_err(|e| EtcdError::Setup(e.to_string()))?;
        let mut last = String::new();
        for ep in &self.endpoints {
            let r = self.http.post(format!("{ep}{path}")).body(body.clone()).send().await;
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            };
            let status = r.status();
            let bytes = match r.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            };
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| EtcdError::Protocol {
                call,
                detail: format!("{status}: {e}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])),
            })?;
            // A streaming call's one answer comes wrapped in `result`; an error in `error`.
            if let Some(err) = v.get("error") {
                let msg = err.get("message").or(v.get("message")).unwrap_or(err);
                let detail = msg.as_str().map_or_else(|| msg.to_string(), str::to_string);
                // No leader (quorum lost): as good as unreachable, another endpoint may know better.
                if detail.contains("no leader") || detail.contains("timed out") || status.is_server_error() {
                    last = format!("{ep}: {detail}");
                    continue;
                }
                return Err(EtcdError::Refused { call, detail });
            }
            if !status.is_success() {
                return Err(EtcdError::Refused { call, detail: format!("HTTP {status}") });
            }
            return Ok(v.get("result").cloned().unwrap_or(v));
        }
        Err(EtcdError::Unreachable(last))
    }

    /// A lease of `ttl_s` seconds; its id.
    pub async fn grant(&self, ttl_s: u64) -> Result<i64, EtcdError> {
        let v = self.call("lease grant", "/v3/lease/grant", json!({ "TTL": ttl_s.to_string() })).await?;
        let id = v.get("ID").map_or(0, int);
        if id == 0 {
            return Err(EtcdError::Protocol { call: "lease grant", detail: v.to_string() });
        }
        Ok(id)
    }

    /// Keeps `lease` alive: its remaining TTL in seconds, `None` when etcd no longer has it (expired or revoked).
    pub async fn keep_alive(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let v = self.call("lease keep-alive", "/v3/lease/keepalive", json!({ "ID": lease.to_string() })).await?;
        let ttl = v.get("TTL").map_or(0, int);
        Ok((ttl > 0).then_some(ttl))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        match self.call("lease revoke", "/v3/lease/revoke", json!({ "ID": lease.to_string() })).await {
            Err(EtcdError::Refused { detail, .. }) if detail.contains("not found") => Ok(()),
            r => r.map(drop),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self.call("range", "/v3/kv/range", json!({ "key": b64::encode(key.as_bytes()) })).await?;
        Ok(v.get("kvs").and_then(Value::as_array).and_then(|a| a.first()).and_then(kv_of))
    }

    /// Every key starting with `prefix`, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let v = self
            .call(
                "range",
                "/v3/kv/range",
                json!({ "key": b64::encode(prefix.as_bytes()), "range_end": b64::encode(&prefix_end(prefix)) }),
            )
            .await?;
        let kvs = v.get("kvs").and_then(Value::as_array).map(|a| a.iter().filter_map(kv_of).collect());
        Ok((kvs.unwrap_or_default(), header_revision(&v)))
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({ "key": b64::encode(key.as_bytes()), "value": b64::encode(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let v = self.call("put", "/v3/kv/put", body).await?;
        Ok(header_revision(&v))
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("delete", "/v3/kv/deleterange", json!({ "key": b64::encode(key.as_bytes()) })).await.map(drop)
    }

    /// If every `when` holds, runs `then`, else `otherwise`.
    pub async fn txn(&self, when: &[Cmp], then: &[Op], otherwise: &[Op]) -> Result<TxnResult, EtcdError> {
        let cmp = |c: &Cmp| match c {
            Cmp::Absent(k) => json!({ "key": b64::encode(k.as_bytes()), "target": "CREATE", "result": "EQUAL",
                                      "create_revision": "0" }),
            Cmp::ModRevision(k, r) => json!({ "key": b64::encode(k.as_bytes()), "target": "MOD", "result": "EQUAL",
                                              "mod_revision": r.to_string() }),
            Cmp::Value(k, v) => json!({ "key": b64::encode(k.as_bytes()), "target": "VALUE", "result": "EQUAL",
                                        "value": b64::encode(v) }),
            Cmp::Lease(k, l) => json!({ "key": b64::encode(k.as_bytes()), "target": "LEASE", "result": "EQUAL",
                                        "lease": l.to_string() }),
        };
        let op = |o: &Op| match o {
            Op::Put { key, value, lease } => {
                let mut p = json!({ "key": b64::encode(key.as_bytes()), "value": b64::encode(value) });
                if *lease != 0 {
                    p["lease"] = json!(lease.to_string());
                }
                json!({ "request_put": p })
            }
            Op::Delete(k) => json!({ "request_delete_range": { "key": b64::encode(k.as_bytes()) } }),
            Op::Get(k) => json!({ "request_range": { "key": b64::encode(k.as_bytes()) } }),
        };
        let body = json!({
            "compare": when.iter().map(cmp).collect::<Vec<_>>(),
            "success": then.iter().map(op).collect::<Vec<_>>(),
            "failure": otherwise.iter().map(op).collect::<Vec<_>>(),
        });
        let v = self.call("txn", "/v3/kv/txn", body).await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let got = v
            .get("responses")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r.get("response_range"))
                    .map(|r| r.get("kvs").and_then(Value::as_array).and_then(|a| a.first()).and_then(kv_of))
                    .collect()
            })
            .unwrap_or_default();
        Ok(TxnResult { succeeded, revision: header_revision(&v), got })
    }

    /// The cluster's members' client URLs (a health check: needs a quorum-less answer only).
    pub async fn status(&self) -> Result<Value, EtcdError> {
        self.call("maintenance status", "/v3/maintenance/status", json!({})).await
    }
}

fn header_revision(v: &Value) -> i64 {
    v.get("header").and_then(|h| h.get("revision")).map_or(0, int)
}

/// Deserialises a JSON value stored in etcd.
pub fn decode<T: for<'de> Deserialize<'de>>(kv: &Kv) -> Result<T, EtcdError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| EtcdError::Protocol { call: "range", detail: format!("{}: {e}", kv.key) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_the_prefix() {
        assert_eq!(prefix_end("a/"), b"a0".to_vec());
        assert_eq!(prefix_end("\u{7f}"), vec![0x80]);
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn gateway_key_values_parse() {
        let v = json!({ "key": b64::encode(b"k"), "value": b64::encode(b"v"), "create_revision": "3",
                        "mod_revision": "7", "lease": "694d7a1b" });
        let kv = kv_of(&v).unwrap();
        assert_eq!((kv.key.as_str(), kv.value.as_slice(), kv.create_revision, kv.mod_revision), ("k", &b"v"[..], 3, 7));
        assert_eq!(kv.lease, 0, "a lease id that is not a number is no lease");
        assert!(Etcd::new(&["localhost:2379".into()], &EtcdTls::default(), Duration::from_secs(1)).is_err());
    }
}
