//! Bodies of the fuzz targets that reach flint-vmm (fuzz/fuzz_targets/): what a guest, a caller of the control
//! API or a snapshot file can feed it. flint-tests replays the committed corpora through them in `cargo test`,
//! so CI guards every case the fuzzer found. None of them may panic, hang or allocate without bound.
use std::io::Cursor;

use flint_vmm_api::http;

/// A snapshot state file from untrusted storage.
pub fn state_file(data: &[u8]) {
    let _ = crate::snapshot::decode_state(data);
}

/// Bytes on the VMM's control socket: requests parsed and mapped to actions (not applied).
pub fn control_api(data: &[u8]) {
    let mut r = Cursor::new(data);
    while let Ok(Some(req)) = http::read_request(&mut r, http::MAX_REQUEST_BODY_BYTES) {
        let _ = crate::api::parse(&req.method, &req.path, &req.body);
    }
}

mod queues {
    use std::os::unix::io::{FromRawFd, OwnedFd};

    use crate::devices::virtio::test_util::QueueEnv;
    use crate::devices::virtio::{block, net, rng, vsock, NoWatch, VirtioDevice};

    /// The guest side, from fuzzer bytes: raw descriptors (16 bytes each: addr, len, flags, next) written into
    /// a queue's table, heads published in the avail ring, payload bytes in guest memory, then a notification.
    fn drive(dev: &mut dyn VirtioDevice, sizes: &[u16], data: &[u8]) {
        let mut env = QueueEnv::new(sizes);
        let mut it = data.iter().copied();
        let mut next = || it.next().unwrap_or(0);
        let q = next() as usize % sizes.len();
        let ndesc = (next() % 16) as u16;
        for i in 0..ndesc {
            let mut d = [0u8; 16];
            d.iter_mut().for_each(|b| *b = next());
            // Mostly inside the 1 MiB of guest memory, so the fuzzer reaches the device code behind the checks.
            let addr = u64::from_le_bytes(d[..8].try_into().unwrap_or_default()) % (2 << 20);
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default()) % (128 << 10);
            let flags = u16::from_le_bytes([d[12], d[13]]) & 0x7;
            let nxt = u16::from_le_bytes([d[14], d[15]]) % 64;
            env.write_desc(q, i, addr, len, flags, nxt);
        }
        let heads = next() % 8;
        for _ in 0..heads {
            env.publish(q, u16::from(next()) % 64);
        }
        let rest: Vec<u8> = std::iter::from_fn(|| Some(next())).take(data.len().min(64 << 10)).collect();
        env.write(0x20000, &rest);
        let mut watch = NoWatch::default();
        env.run(|ctx| {
            dev.activate(0, ctx);
            dev.queue_notify(q, ctx, &mut watch);
            // And the other queues, as a guest notifying them all would.
            for other in 0..sizes.len() {
                dev.queue_notify(other, ctx, &mut watch);
            }
        });
    }

    /// The disk the block target uses (one per process).
    pub fn block_disk() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("flint-fuzz-block-{}", std::process::id()))
    }

    pub fn block(data: &[u8]) {
        let path = block_disk();
        if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) != 64 << 10 {
            let _ = std::fs::write(&path, vec![0u8; 64 << 10]);
        }
        let read_only = data.first().is_some_and(|b| b & 1 == 1);
        let Ok(mut dev) = block::Block::open(&path, read_only, "fuzz") else { return };
        drive(&mut dev, &[256], data.get(1..).unwrap_or_default());
    }

    pub fn rng(data: &[u8]) {
        drive(&mut rng::Rng::new(), &[256], data);
    }

    pub fn net(data: &[u8]) {
        // The "tap": one end of a datagram socket pair (frames the device sends go nowhere).
        let mut fds = [0i32; 2];
        // SAFETY: socketpair(2) fills two fds we then own; the result is checked.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) } != 0
        {
            return;
        }
        // SAFETY: both fds are fresh and owned by nobody else.
        let (a, _b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut dev = net::Net::new(std::fs::File::from(a), "fuzz", [6, 0, 0, 0, 0, 1]);
        drive(&mut dev, &[256, 256], data);
    }

    pub fn vsock(data: &[u8]) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let uds = std::env::temp_dir().join(format!("flint-fuzz-vsock-{}-{n}.sock", std::process::id()));
        let Ok(mut dev) = vsock::Vsock::new(3, &uds) else { return };
        drive(&mut dev, &[256, 256, 256], data);
    }
}

pub use queues::{block, block_disk, net, rng, vsock};
