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
