//! flint-agent: the in-guest agent (server side) and the host's client for it.
//!
//! - [`protocol`]: frames and messages (docs/agent-protocol.md).
//! - [`server`]: the service the agent runs, in a guest or on a host Unix socket.
//! - [`client`]: what `flintd` and tests use to talk to an agent.
pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod init;
pub mod listen;
pub mod net;
pub mod protocol;
pub mod reaper;
pub mod runner;
pub mod server;
pub mod vsock_cat;
pub mod watch;

/// Locks a mutex, recovering from poisoning (a panicked task must not wedge the others).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
