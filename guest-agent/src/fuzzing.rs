//! Body of the agent-frame fuzz target (fuzz/fuzz_targets/): a byte stream on an agent connection, in either
//! direction, split into frames and each JSON payload parsed as a request (host → agent) and as a response
//! (agent → host). flint-tests replays the committed corpus in `cargo test`.
use crate::protocol::{kind, read_frame, Request, Response};

pub fn frames(data: &[u8]) {
    static RT: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    let Some(rt) = RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().ok()) else { return };
    rt.block_on(async {
        let mut r = data;
        while let Ok(f) = read_frame(&mut r).await {
            if f.kind == kind::JSON {
                let _ = serde_json::from_slice::<Request>(&f.payload);
                let _ = serde_json::from_slice::<Response>(&f.payload);
            }
        }
    });
}
