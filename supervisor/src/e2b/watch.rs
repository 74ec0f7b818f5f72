//! envd's directory watches over the agent's `watch` (inotify in the guest): the `WatchDir` server stream (the
//! async Python and the JavaScript SDKs) and the polling `CreateWatcher`/`GetWatcherEvents`/`RemoveWatcher` of
//! the synchronous Python SDK. A watch holds its session awake (like a running process), and ends with the
//! sandbox's VM (kill, pause) or when its directory goes.
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use flint_agent::client::{AgentClient, ClientError};
use flint_agent::protocol::{FsEvent, FsOp};
use flint_vmm_api::lock;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::connect::{self, Code, ConnectError};
use crate::services::sessions::Activity;

/// Polling watchers one sandbox may hold at once.
pub const MAX_WATCHERS: usize = 64;
/// Events a polling watcher keeps between two polls; past this the oldest are dropped (and counted).
pub const MAX_QUEUED: usize = 10_000;

/// `FilesystemEvent` as ProtoJSON: the name relative to the watched directory, the type by name.
pub fn event_json(e: &FsEvent) -> Value {
    let t = match e.op {
        FsOp::Create => "EVENT_TYPE_CREATE",
        FsOp::Write => "EVENT_TYPE_WRITE",
        FsOp::Remove => "EVENT_TYPE_REMOVE",
        FsOp::Rename => "EVENT_TYPE_RENAME",
        FsOp::Chmod => "EVENT_TYPE_CHMOD",
    };
    json!({"name": e.name, "type": t})
}

/// How a watch's events reach whoever wants them.
enum Sink {
    /// A `WatchDir` stream's body.
    Stream(mpsc::Sender<Result<Bytes, Infallible>>, Option<Duration>),
    /// A polling watcher's queue.
    Queue(Arc<Polled>),
}

/// A polling watcher: its queued events, and why it ended.
#[derive(Default)]
pub struct Polled {
    state: Mutex<PolledState>,
}

#[derive(Default)]
struct PolledState {
    events: VecDeque<FsEvent>,
    dropped: u64,
    ended: Option<String>,
    stop: Option<oneshot::Sender<()>>,
}

/// Starts a watch of `path` through `agent`; answers once it is in place (or why it could not be), then feeds
/// `sink` until the watch ends, `stop` fires or the sink's reader goes.
async fn run(
    agent: Arc<AgentClient>,
    activity: Option<Activity>,
    path: String,
    recursive: bool,
    sink: Sink,
    mut stop: Option<oneshot::Receiver<()>>,
) -> Result<(), ConnectError> {
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), ClientError>>();
    tokio::spawn(async move {
        let _activity = activity;
        let mut w = match agent.watch(&path, recursive).await {
            Ok(w) => w,
            Err(e) => return drop(ready_tx.send(Err(e))),
        };
        if let Sink::Stream(tx, _) = &sink {
            // The stream's first message, before any event.
            let _ = tx.send(Ok(Bytes::from(connect::message(&json!({"start": {}}))))).await;
        }
        let _ = ready_tx.send(Ok(()));
        let why = loop {
            let period = match &sink {
                Sink::Stream(_, Some(p)) => *p,
                _ => Duration::from_secs(3600),
            };
            let closed = async {
                match &sink {
                    Sink::Stream(tx, _) => tx.closed().await,
                    Sink::Queue(_) => std::future::pending().await,
                }
            };
            let stopped = async {
                match stop.as_mut() {
                    // Sent, or its sender dropped: either way the watcher is gone.
                    Some(rx) => drop(rx.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopped => break None,
                _ = closed => break None,
                _ = tokio::time::sleep(period) => {
                    if let Sink::Stream(tx, _) = &sink {
                        if tx.send(Ok(Bytes::from(connect::message(&json!({"keepalive": {}}))))).await.is_err() {
                            break None;
                        }
                    }
                }
                ev = w.next() => match ev {
                    Ok(Some(events)) => match &sink {
                        Sink::Stream(tx, _) => {
                            for e in &events {
                                let m = connect::message(&json!({"filesystem": event_json(e)}));
                                if tx.send(Ok(Bytes::from(m))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Sink::Queue(q) => {
                            let mut s = lock(&q.state);
                            s.events.extend(events);
                            while s.events.len() > MAX_QUEUED {
                                s.events.pop_front();
                                s.dropped += 1;
                            }
                        }
                    },
                    Ok(None) => break Some(format!("the watch of {path} ended: the directory is gone")),
                    Err(e) => break Some(format!("the watch of {path} ended: {e}")),
                },
            }
        };
        match sink {
            Sink::Stream(tx, _) => {
                let err = why.map(|m| ConnectError::new(Code::NotFound, m));
                let _ = tx.send(Ok(Bytes::from(connect::end(err.as_ref())))).await;
            }
            Sink::Queue(q) => {
                lock(&q.state).ended = Some(why.unwrap_or_else(|| "the watcher was stopped".into()));
            }
        }
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(super::envd::agent_error(e)),
        Err(_) => Err(ConnectError::new(Code::Unavailable, "the watch could not start")),
    }
}

/// The `WatchDir` answer: `start{}`, then a `filesystem` message per change (`keepalive{}` every `keepalive`
/// without one), until the caller goes or the directory does.
pub async fn stream(
    agent: Arc<AgentClient>,
    activity: Option<Activity>,
    path: String,
    recursive: bool,
    keepalive: Option<Duration>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    // A watch that could not start: the stream's only message is its end, with the reason (the channel is
    // empty, so this never waits).
    if let Err(err) = run(agent, activity, path, recursive, Sink::Stream(tx.clone(), keepalive), None).await {
        let _ = tx.try_send(Ok(Bytes::from(connect::end(Some(&err)))));
    }
    drop(tx);
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([("content-type", "application/connect+json")], body).into_response()
}

/// A sandbox's polling watchers by id.
#[derive(Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, Arc<Polled>>>,
}

impl Watchers {
    /// `CreateWatcher`: a new watcher's id.
    pub async fn create(
        &self,
        agent: Arc<AgentClient>,
        activity: Option<Activity>,
        path: String,
        recursive: bool,
    ) -> Result<String, ConnectError> {
        if lock(&self.map).len() >= MAX_WATCHERS {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("a sandbox holds at most {MAX_WATCHERS} watchers: remove one first"),
            ));
        }
        let q = Arc::new(Polled::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        lock(&q.state).stop = Some(stop_tx);
        run(agent, activity, path, recursive, Sink::Queue(q.clone()), Some(stop_rx)).await?;
        let id = new_id();
        lock(&self.map).insert(id.clone(), q);
        Ok(id)
    }

    /// `GetWatcherEvents`: what happened since the last call. A watcher that ended answers its last events,
    /// then `not_found` with the reason.
    pub fn events(&self, id: &str) -> Result<Vec<FsEvent>, ConnectError> {
        let q = lock(&self.map).get(id).cloned().ok_or_else(|| unknown(id))?;
        let mut s = lock(&q.state);
        if s.events.is_empty() {
            if let Some(why) = s.ended.clone() {
                drop(s);
                lock(&self.map).remove(id);
                return Err(ConnectError::new(Code::NotFound, format!("watcher {id}: {why}")));
            }
        }
        if s.dropped > 0 {
            tracing::warn!(watcher = %id, dropped = s.dropped, "a watcher's oldest events were dropped (not polled)");
            s.dropped = 0;
        }
        Ok(s.events.drain(..).collect())
    }

    /// `RemoveWatcher`: `false` if there is no such watcher.
    pub fn remove(&self, id: &str) -> bool {
        let Some(q) = lock(&self.map).remove(id) else { return false };
        if let Some(stop) = lock(&q.state).stop.take() {
            let _ = stop.send(());
        }
        true
    }

    /// Stops every watcher (the sandbox's VM is going).
    pub fn clear(&self) {
        let ids: Vec<String> = lock(&self.map).keys().cloned().collect();
        for id in ids {
            self.remove(&id);
        }
    }
}

fn unknown(id: &str) -> ConnectError {
    ConnectError::new(Code::NotFound, format!("watcher {id} not found"))
}

fn new_id() -> String {
    let mut r = [0u8; 8];
    let _ = getrandom::getrandom(&mut r);
    r.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_protojson_and_unknown_watchers_are_not_found() {
        let e = FsEvent { name: "sub/a.txt".into(), op: FsOp::Rename };
        assert_eq!(event_json(&e), json!({"name": "sub/a.txt", "type": "EVENT_TYPE_RENAME"}));
        let w = Watchers::default();
        assert_eq!(w.events("nope").unwrap_err().code, Code::NotFound);
        assert!(!w.remove("nope"));
        // A watcher that ended answers what it queued, then not_found with the reason, then it is gone.
        let q = Arc::new(Polled::default());
        {
            let mut s = lock(&q.state);
            s.events.push_back(e.clone());
            s.ended = Some("the directory is gone".into());
        }
        lock(&w.map).insert("w1".into(), q);
        assert_eq!(w.events("w1").unwrap(), vec![e]);
        let err = w.events("w1").unwrap_err();
        assert!(err.code == Code::NotFound && err.message.contains("the directory is gone"), "{err:?}");
        assert_eq!(w.events("w1").unwrap_err().code, Code::NotFound);
    }
}
