//! `/metrics` (Prometheus text format): VMs, sessions, pools, networks, the store, the API.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::daemon::Daemon;

fn g(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn counters(out: &mut String, list: &[(&str, u64)]) {
    for (name, v) in list {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
    }
}

/// The exposition text.
pub fn render(d: &Daemon) -> String {
    let mut out = String::new();
    vms(d, &mut out);
    sessions(d, &mut out);
    pools(d, &mut out);
    networks(d, &mut out);
    out
}

fn vms(d: &Daemon, out: &mut String) {
    let by_status = d.vms.count_by_status();
    out.push_str("# TYPE flint_vms gauge\n");
    for st in crate::vm::VmStatus::ALL {
        let _ =
            writeln!(out, "flint_vms{{status=\"{}\"}} {}", st.name(), by_status.get(st.name()).copied().unwrap_or(0));
    }
    let m = &d.vms.metrics;
    for (name, help, count, sum) in [
        ("flint_boot", "cold boots", g(&m.boots), g(&m.boot_ms_sum)),
        ("flint_restore", "restores", g(&m.restores), g(&m.restore_ms_sum)),
        ("flint_snapshot", "snapshots", g(&m.snapshots), g(&m.snapshot_ms_sum)),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name}_ms {help}: start to ready\n# TYPE {name}_ms summary\n{name}_ms_count {count}\n{name}_ms_sum {sum}"
        );
    }
    out.push_str("# TYPE flint_standby_vmms gauge\n");
    for (mib, n) in d.vms.standby_counts() {
        let _ = writeln!(out, "flint_standby_vmms{{mem_mib=\"{mib}\"}} {n}");
    }
    let sb = &d.vms.standbys;
    let s = d.store.stats();
    counters(
        out,
        &[
            ("flint_standby_started_total", g(&sb.started)),
            ("flint_standby_taken_total", g(&sb.taken)),
            ("flint_standby_lost_total", g(&sb.lost)),
            ("flint_vm_failures_total", g(&m.vm_failures)),
            ("flint_api_requests_total", g(&d.requests)),
            ("flint_store_l1_hits_total", s.l1_hits),
            ("flint_store_l1_misses_total", s.l1_misses),
            ("flint_store_remote_fetches_total", s.remote_fetches),
            ("flint_store_remote_bytes_total", s.remote_bytes),
            ("flint_store_uploaded_bytes_total", s.uploaded_bytes),
            ("flint_store_corrupt_chunks_total", s.corrupt),
            ("flint_store_evicted_chunks_total", s.evicted_chunks),
            ("flint_store_manifest_scans_total", s.manifest_scans),
        ],
    );
    let _ = writeln!(out, "# TYPE flint_store_l1_bytes gauge\nflint_store_l1_bytes {}", s.l1_bytes);
    let _ = writeln!(out, "# TYPE flint_tasks gauge\nflint_tasks {}", d.tasks.len());
}

/// Sessions by state, hibernate and wake counts and latency histograms, bytes stored by hibernations.
fn sessions(d: &Daemon, out: &mut String) {
    use crate::services::sessions::SessionState;
    let by_state = d.sessions.count_by_state();
    out.push_str("# TYPE flint_sessions gauge\n");
    for st in SessionState::ALL {
        let _ = writeln!(
            out,
            "flint_sessions{{state=\"{}\"}} {}",
            st.name(),
            by_state.get(st.name()).copied().unwrap_or(0)
        );
    }
    let m = &d.sessions.metrics;
    m.hibernate_ms.render("flint_session_hibernate_ms", "session hibernations: start to stored", out);
    m.wake_ms.render("flint_session_wake_ms", "session wakes: start to agent refreshed", out);
    counters(
        out,
        &[
            ("flint_session_hibernate_stored_bytes_total", g(&m.hibernate_stored_bytes)),
            ("flint_session_idle_hibernations_total", g(&m.idle_hibernations)),
            ("flint_session_expired_total", g(&m.expired)),
            ("flint_session_lease_renew_failures_total", g(&m.lease_renew_failures)),
            ("flint_session_lease_freezes_total", g(&m.lease_freezes)),
            ("flint_session_lease_fences_total", g(&m.lease_fences)),
        ],
    );
}

/// Warm pools: ready VMs per template, hand-outs that found one (hits) or not (misses), and discarded VMs.
fn pools(d: &Daemon, out: &mut String) {
    out.push_str("# TYPE flint_pool_ready gauge\n");
    for (t, n) in d.pools.sizes() {
        let _ = writeln!(out, "flint_pool_ready{{template=\"{t}\"}} {n}");
    }
    let p = &d.pools;
    counters(
        out,
        &[
            ("flint_pool_hits_total", g(&p.hits)),
            ("flint_pool_misses_total", g(&p.misses)),
            ("flint_pool_discarded_total", g(&p.discarded)),
        ],
    );
}

fn networks(d: &Daemon, out: &mut String) {
    let n = &d.vms.net;
    let _ = writeln!(out, "# TYPE flint_networks gauge\nflint_networks {}", n.running());
    let c = &n.counters;
    counters(
        out,
        &[
            ("flint_dns_answered_total", g(&c.dns_answered)),
            ("flint_dns_refused_total", g(&c.dns_refused)),
            ("flint_dns_withheld_total", g(&c.dns_withheld)),
            ("flint_front_requests_total", g(&c.front_routed)),
            ("flint_front_refused_total", g(&c.front_refused)),
        ],
    );
}
