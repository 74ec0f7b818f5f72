//! Counters for `/metrics` (Prometheus text format).
use std::sync::atomic::{AtomicU64, Ordering};

use flint_snapshot_store::StoreStats;

use crate::vm::model::{VmRecord, VmStatus};

#[derive(Default)]
pub struct Metrics {
    pub boots: AtomicU64,
    pub boot_ms_sum: AtomicU64,
    pub restores: AtomicU64,
    pub restore_ms_sum: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshot_ms_sum: AtomicU64,
    pub vm_failures: AtomicU64,
    pub requests: AtomicU64,
}

/// The exposition text.
pub fn render(m: &Metrics, vms: &[VmRecord], s: &StoreStats) -> String {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    out.push_str("# TYPE flint_vms gauge\n");
    for st in VmStatus::ALL {
        out.push_str(&format!(
            "flint_vms{{status=\"{}\"}} {}\n",
            st.name(),
            vms.iter().filter(|v| v.status == st).count()
        ));
    }
    for (name, help, count, sum) in [
        ("flint_boot", "cold boots", g(&m.boots), g(&m.boot_ms_sum)),
        ("flint_restore", "restores", g(&m.restores), g(&m.restore_ms_sum)),
        ("flint_snapshot", "snapshots", g(&m.snapshots), g(&m.snapshot_ms_sum)),
    ] {
        out.push_str(&format!(
            "# HELP {name}_ms {help}: start to ready\n# TYPE {name}_ms summary\n{name}_ms_count {count}\n{name}_ms_sum {sum}\n"
        ));
    }
    for (name, v) in [
        ("flint_vm_failures_total", g(&m.vm_failures)),
        ("flint_api_requests_total", g(&m.requests)),
        ("flint_store_l1_hits_total", s.l1_hits),
        ("flint_store_l1_misses_total", s.l1_misses),
        ("flint_store_remote_fetches_total", s.remote_fetches),
        ("flint_store_remote_bytes_total", s.remote_bytes),
        ("flint_store_uploaded_bytes_total", s.uploaded_bytes),
        ("flint_store_corrupt_chunks_total", s.corrupt),
        ("flint_store_evicted_chunks_total", s.evicted_chunks),
        ("flint_store_manifest_scans_total", s.manifest_scans),
    ] {
        out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
    }
    out.push_str(&format!("# TYPE flint_store_l1_bytes gauge\nflint_store_l1_bytes {}\n", s.l1_bytes));
    out
}

/// Sessions by state, hibernate and wake counts and latency histograms, bytes stored by hibernations.
pub fn render_sessions(s: &crate::session::Sessions, out: &mut String) {
    use crate::session::SessionState;
    let records = s.records();
    out.push_str("# TYPE flint_sessions gauge\n");
    for st in SessionState::ALL {
        let n = records.iter().filter(|r| r.state == st).count();
        out.push_str(&format!("flint_sessions{{state=\"{}\"}} {n}\n", st.name()));
    }
    let m = &s.metrics;
    m.hibernate_ms.render("flint_session_hibernate_ms", "session hibernations: start to stored", out);
    m.wake_ms.render("flint_session_wake_ms", "session wakes: start to agent refreshed", out);
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, v) in [
        ("flint_session_hibernate_stored_bytes_total", g(&m.hibernate_stored_bytes)),
        ("flint_session_idle_hibernations_total", g(&m.idle_hibernations)),
        ("flint_session_expired_total", g(&m.expired)),
    ] {
        out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
    }
}

/// Warm pools: ready VMs per template, hand-outs that found one (hits) or not (misses), and discarded VMs.
pub fn render_pools(p: &crate::pool::Pools, out: &mut String) {
    out.push_str("# TYPE flint_pool_ready gauge\n");
    for (t, n) in p.sizes() {
        out.push_str(&format!("flint_pool_ready{{template=\"{t}\"}} {n}\n"));
    }
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, v) in [
        ("flint_pool_hits_total", g(&p.hits)),
        ("flint_pool_misses_total", g(&p.misses)),
        ("flint_pool_discarded_total", g(&p.discarded)),
    ] {
        out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
    }
}

pub fn render_networks(n: &crate::net::Networks, out: &mut String) {
    out.push_str(&format!("# TYPE flint_networks gauge\nflint_networks {}\n", n.running()));
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let c = &n.counters;
    for (name, v) in [
        ("flint_dns_answered_total", g(&c.dns_answered)),
        ("flint_dns_refused_total", g(&c.dns_refused)),
        ("flint_front_requests_total", g(&c.front_routed)),
        ("flint_front_refused_total", g(&c.front_refused)),
    ] {
        out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
    }
}
