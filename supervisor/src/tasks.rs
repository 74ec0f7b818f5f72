//! flintd's background tasks: every one is spawned through [`Tasks`], so it is tracked (a shutdown waits for the
//! ones in flight, up to a deadline) and can see the shutdown coming ([`Tasks::cancelled`]) to stop taking new
//! work. VMs are not tasks: they keep running across a shutdown and are re-adopted at the next start.
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns `fut`, tracked.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Spawns a loop that runs until the shutdown: `fut` is dropped when it begins.
    pub fn spawn_loop<F>(&self, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = fut => {}
            }
        })
    }

    /// Resolves when the shutdown begins.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Begins the shutdown (loops stop) and waits up to `deadline` for the tasks in flight; true if all ended.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loops_stop_and_work_in_flight_is_awaited() {
        let t = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.spawn_loop(std::future::pending());
        t.spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(t.len(), 2);
        assert!(!t.shutdown(Duration::from_millis(50)).await, "one task is still working");
        tx.send(()).unwrap();
        assert!(t.shutdown(Duration::from_secs(5)).await);
        assert!(t.is_cancelled() && t.is_empty());
    }
}
