//! The write lease over the local cache, shared by every process that opens it (flintd, `flint-store`): a put
//! holds it shared from its first chunk to its manifest; the local GC holds it alone, so it never sees chunks that
//! a manifest not yet written will reference. An flock(2) on `<local_dir>/lock`: released by the kernel when the
//! holder exits, even by kill -9, so a crashed writer never blocks GC.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::*;

/// How long a put waits for a running GC, and a GC for running puts, before giving up.
pub(super) const LEASE_WAIT: Duration = Duration::from_secs(60);

/// Held while it lives (closing the file releases the flock).
pub(super) struct Lease {
    _file: File,
}

impl Store {
    /// Takes the lease, shared (writers) or exclusive (GC), waiting up to `wait`.
    pub(super) async fn lease(&self, exclusive: bool, wait: Duration) -> Result<Lease, StoreError> {
        let path = self.inner.l1.root().join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: flock on an fd this function owns; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Lease { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Io { context: format!("lock {}", path.display()), source: e });
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Busy(if exclusive {
                    format!("a snapshot is being written to {} (waited {wait:?}); run GC again later", path.display())
                } else {
                    format!("a GC of {} is running (waited {wait:?}); retry", path.display())
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writers_share_the_lease_and_gc_waits_for_them() {
        let dir = std::env::temp_dir().join(format!("flint-lease-{}", std::process::id()));
        let a = Store::open(StoreConfig::new(&dir)).unwrap();
        // A second handle on the same directory stands for another process (a separate open file description).
        let b = Store::open(StoreConfig::new(&dir)).unwrap();
        let w1 = a.lease(false, Duration::ZERO).await.unwrap();
        let _w2 = b.lease(false, Duration::ZERO).await.unwrap();
        match b.lease(true, Duration::from_millis(100)).await {
            Err(StoreError::Busy(m)) => assert!(m.contains("being written"), "{m}"),
            other => panic!("GC got the lease during a write: {:?}", other.map(|_| ())),
        }
        drop(w1);
        drop(_w2);
        let gc = b.lease(true, Duration::ZERO).await.unwrap();
        assert!(matches!(a.lease(false, Duration::from_millis(100)).await, Err(StoreError::Busy(_))));
        drop(gc);
        a.lease(false, Duration::ZERO).await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
