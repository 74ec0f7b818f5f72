use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::*;
use crate::devices::virtio::test_util::QueueEnv;
use crate::devices::virtio::NoWatch;

const GUEST_CID: u64 = 3;
const RX_BUF: u64 = 0x20000;
const TX_BUF: u64 = 0x40000;

struct Env {
    q: QueueEnv,
    dev: Vsock,
    watch: NoWatch,
    dir: std::path::PathBuf,
    rx_next: u64,
    tx_next: u64,
    rx_seen: usize,
}

impl Env {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("flint-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dev = Vsock::new(GUEST_CID, &dir.join("v.sock")).unwrap();
        Env {
            q: QueueEnv::new(&[256, 256, 256]),
            dev,
            watch: NoWatch::default(),
            dir,
            rx_next: RX_BUF,
            tx_next: TX_BUF,
            rx_seen: 0,
        }
    }

    fn give_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let a = self.rx_next;
            self.q.add_chain(RXQ, &[(a, HDR_LEN as u32, true), (a + 0x100, 4096, true)]);
            self.rx_next += 0x2000;
        }
        let Env { q, dev, watch, .. } = self;
        q.run(|ctx| dev.queue_notify(RXQ, ctx, watch));
    }

    fn guest_send(&mut self, h: Header, payload: &[u8]) {
        let a = self.tx_next;
        self.q.write(a, &h.to_bytes());
        self.q.write(a + 0x100, payload);
        if payload.is_empty() {
            self.q.add_chain(TXQ, &[(a, HDR_LEN as u32, false)]);
        } else {
            self.q.add_chain(TXQ, &[(a, HDR_LEN as u32, false), (a + 0x100, payload.len() as u32, false)]);
        }
        self.tx_next += 0x2000;
        let Env { q, dev, watch, .. } = self;
        q.run(|ctx| dev.queue_notify(TXQ, ctx, watch));
    }

    fn host_event(&mut self, fd: RawFd, data: u32, set: EventSet) {
        let Env { q, dev, watch, .. } = self;
        q.run(|ctx| dev.device_event(data, fd, set, ctx, watch));
    }

    /// Packets the device put in guest RX buffers since the last call.
    fn guest_recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.q.used(RXQ);
        let out = used[self.rx_seen..]
            .iter()
            .map(|&(id, len)| {
                // Each chain uses two descriptors: chain head ids are 0, 2, 4, ...
                let a = RX_BUF + u64::from(id / 2) * 0x2000;
                let mut hb = [0u8; HDR_LEN];
                hb.copy_from_slice(&self.q.read(a, HDR_LEN));
                let h = Header::parse(&hb);
                assert_eq!(len as usize, HDR_LEN + h.len as usize);
                (h, self.q.read(a + 0x100, h.len as usize))
            })
            .collect();
        self.rx_seen = used.len();
        out
    }

    fn guest_hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Default::default()
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn guest_connects_to_host_listener_and_data_flows_both_ways() {
    let mut env = Env::new("g2h");
    let listener = UnixListener::bind(env.dir.join("v.sock_5000")).unwrap();
    env.give_rx_buffers(8);
    env.guest_send(env.guest_hdr(OP_REQUEST, 1025, 5000), &[]);
    let pkts = env.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!((pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port), (OP_RESPONSE, 5000, 1025));
    assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_ALLOC);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let mut h = env.guest_hdr(OP_RW, 1025, 5000);
    h.len = 5;
    env.guest_send(h, b"hello");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    host.write_all(b"world").unwrap();
    let fd = *env.dev.by_fd.keys().next().unwrap();
    env.host_event(fd, EV_STREAM, EventSet::IN);
    let pkts = env.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!(pkts[0].1, b"world");
    assert_eq!(pkts[0].0.fwd_cnt, 5, "the device reports what it forwarded");

    // Host closes: the guest is told with a SHUTDOWN, then its RST removes the connection.
    drop(host);
    env.host_event(fd, EV_STREAM, EventSet::IN | EventSet::READ_HANG_UP);
    let pkts = env.guest_recv();
    assert_eq!(pkts.last().unwrap().0.op, OP_SHUTDOWN);
    env.guest_send(env.guest_hdr(OP_RST, 1025, 5000), &[]);
    assert_eq!(env.dev.connections(), 0);
}

#[test]
fn guest_connect_without_host_listener_is_reset() {
    let mut env = Env::new("nolisten");
    env.give_rx_buffers(2);
    env.guest_send(env.guest_hdr(OP_REQUEST, 1026, 6000), &[]);
    let pkts = env.guest_recv();
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(env.dev.connections(), 0);
}

#[test]
fn host_connect_handshake() {
    let mut env = Env::new("h2g");
    env.give_rx_buffers(8);
    let mut client = UnixStream::connect(env.dir.join("v.sock")).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let lfd = env.dev.listener.as_raw_fd();
    env.host_event(lfd, EV_LISTENER, EventSet::IN);
    client.write_all(b"CONNECT 52\nearly").unwrap();
    let pfd = *env.dev.pending.keys().next().unwrap();
    env.host_event(pfd, EV_STREAM, EventSet::IN);
    let pkts = env.guest_recv();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].0;
    assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 52, GUEST_CID));
    // Guest accepts.
    let mut resp = env.guest_hdr(OP_RESPONSE, 52, req.src_port);
    resp.buf_alloc = 65536;
    env.guest_send(resp, &[]);
    let mut line = [0u8; 64];
    let n = client.read(&mut line).unwrap();
    assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {}\n", req.src_port));
    // Bytes the client sent right after its CONNECT line reach the guest.
    env.host_event(pfd, EV_STREAM, EventSet::IN);
    let pkts = env.guest_recv();
    let data: Vec<u8> = pkts.iter().filter(|p| p.0.op == OP_RW).flat_map(|p| p.1.clone()).collect();
    assert_eq!(data, b"early");
}

#[test]
fn bad_connect_line_is_refused() {
    let mut env = Env::new("badline");
    let mut client = UnixStream::connect(env.dir.join("v.sock")).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let lfd = env.dev.listener.as_raw_fd();
    env.host_event(lfd, EV_LISTENER, EventSet::IN);
    client.write_all(b"HELLO\n").unwrap();
    let pfd = *env.dev.pending.keys().next().unwrap();
    env.host_event(pfd, EV_STREAM, EventSet::IN);
    let mut s = String::new();
    client.read_to_string(&mut s).unwrap();
    assert!(s.starts_with("ERROR"), "{s}");
    assert_eq!(env.dev.connections(), 0);
}

#[test]
fn credit_is_respected_host_to_guest() {
    let mut env = Env::new("credit");
    let listener = UnixListener::bind(env.dir.join("v.sock_7000")).unwrap();
    env.give_rx_buffers(32);
    let mut req = env.guest_hdr(OP_REQUEST, 2000, 7000);
    req.buf_alloc = 1000; // tiny guest buffer
    env.guest_send(req, &[]);
    env.guest_recv();
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&vec![7u8; 5000]).unwrap();
    let fd = *env.dev.by_fd.keys().next().unwrap();
    env.host_event(fd, EV_STREAM, EventSet::IN);
    let sent: usize = env.guest_recv().iter().map(|p| p.1.len()).sum();
    assert_eq!(sent, 1000, "never more than the guest's buffer");
    // The guest consumed it and says so.
    let mut cu = env.guest_hdr(OP_CREDIT_UPDATE, 2000, 7000);
    cu.buf_alloc = 1000;
    cu.fwd_cnt = 1000;
    env.guest_send(cu, &[]);
    env.host_event(fd, EV_STREAM, EventSet::IN);
    let sent: usize = env.guest_recv().iter().map(|p| p.1.len()).sum();
    assert_eq!(sent, 1000);
}

#[test]
fn foreign_and_malformed_packets_get_reset_not_crash() {
    let mut env = Env::new("bad");
    env.give_rx_buffers(4);
    let mut h = env.guest_hdr(OP_RW, 1, 2);
    h.src_cid = 99; // spoofed source
    env.guest_send(h, &[]);
    let mut h = env.guest_hdr(OP_RW, 1, 2);
    h.len = 1 << 30; // larger than the buffer behind it
    env.guest_send(h, &[]);
    env.guest_send(env.guest_hdr(OP_RW, 5, 6), b"x"); // no such connection
    let ops: Vec<u16> = env.guest_recv().iter().map(|p| p.0.op).collect();
    assert!(ops.iter().all(|o| *o == OP_RST));
    assert!(env.dev.counters.bad_descriptors.load(Ordering::Relaxed) >= 2);
}

/// A guest that sends packets the device answers with RST but never posts RX buffers: the control queue stays
/// bounded, the device stops taking TX, and takes it again once the guest drains RX.
#[test]
fn a_guest_that_posts_no_rx_buffers_cannot_grow_the_control_queue() {
    let mut env = Env::new("norx");
    let h = env.guest_hdr(OP_RW, 5, 6); // no such connection: each one is answered with a RST
    env.q.write(TX_BUF, &h.to_bytes());
    env.q.write_desc(TXQ, 0, TX_BUF, HDR_LEN as u32, 0, 0);
    let mut taken = 0;
    for _ in 0..10_000 {
        // The same descriptor, posted again as soon as the device has returned it.
        env.q.publish(TXQ, 0);
        let Env { q, dev, watch, .. } = &mut env;
        q.run(|ctx| dev.queue_notify(TXQ, ctx, watch));
        let used = env.q.used(TXQ).len();
        if used == taken {
            break;
        }
        taken = used;
    }
    assert!(taken < 10_000, "the device kept taking TX with nowhere to put the answers");
    assert!(env.dev.rx_ctrl.len() <= MAX_RX_CTRL, "control queue grew to {}", env.dev.rx_ctrl.len());
    assert!(taken >= MAX_RX_CTRL / 2, "throttled too early: {taken}");
    // RX buffers drain the queue; the packet left waiting is then taken.
    env.give_rx_buffers(16);
    assert_eq!(env.guest_recv().len(), 16);
    assert_eq!(env.q.used(TXQ).len(), taken + 1, "the waiting TX packet is processed once there is room");
}

/// A driver reset drops every connection; their fds are unregistered from the event loop (at the next event)
/// before they are closed, so a later connection reusing the fd number is not confused with them.
#[test]
fn a_driver_reset_unregisters_connection_fds() {
    let mut env = Env::new("resetfd");
    let listener = UnixListener::bind(env.dir.join("v.sock_5001")).unwrap();
    env.give_rx_buffers(4);
    env.guest_send(env.guest_hdr(OP_REQUEST, 1030, 5001), &[]);
    let (_host, _) = listener.accept().unwrap();
    let fd = *env.dev.by_fd.keys().next().unwrap();
    assert!(env.watch.watched.contains_key(&fd), "the connection is watched");
    env.dev.reset();
    assert_eq!(env.dev.connections(), 0);
    let lfd = env.dev.listener.as_raw_fd();
    env.host_event(lfd, EV_LISTENER, EventSet::IN);
    assert!(!env.watch.watched.contains_key(&fd), "fd {fd} of a dropped connection is still registered");
}

#[test]
fn a_host_connection_that_gives_up_before_the_reset_is_taken_never_reaches_the_guest() {
    let mut env = Env::new("deferred");
    env.give_rx_buffers(8);
    env.q.add_chain(EVQ, &[(0x60000, 8, true)]);
    {
        let Env { q, dev, .. } = &mut env;
        q.run(|ctx| dev.restored(0, ctx));
    }
    assert!(env.dev.awaiting_reset_ack);
    let lfd = env.dev.listener.as_raw_fd();
    let connect = |env: &mut Env| {
        let mut c = UnixStream::connect(env.dir.join("v.sock")).unwrap();
        env.host_event(lfd, EV_LISTENER, EventSet::IN);
        c.write_all(b"CONNECT 52\n").unwrap();
        let pfd = *env.dev.pending.keys().next().unwrap();
        env.host_event(pfd, EV_STREAM, EventSet::IN);
        (c, pfd)
    };
    // Held back until the guest takes the reset; then the client gives up.
    let (gone, gone_fd) = connect(&mut env);
    assert!(env.guest_recv().is_empty(), "nothing reaches the guest before it takes the reset");
    drop(gone);
    env.host_event(gone_fd, EV_STREAM, EventSet::READ_HANG_UP);
    assert!(env.guest_recv().is_empty(), "no RST for a connection the guest never heard of");
    let (mut live, _) = connect(&mut env);
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The guest re-posts its event buffer: the reset is taken.
    env.q.add_chain(EVQ, &[(0x60000, 8, true)]);
    {
        let Env { q, dev, watch, .. } = &mut env;
        q.run(|ctx| dev.queue_notify(EVQ, ctx, watch));
    }
    let pkts = env.guest_recv();
    assert_eq!(pkts.len(), 1, "only the live client's REQUEST: {pkts:?}");
    let req = pkts[0].0;
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
    env.guest_send(env.guest_hdr(OP_RESPONSE, 52, req.src_port), &[]);
    let mut line = [0u8; 64];
    let n = live.read(&mut line).unwrap();
    assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {}\n", req.src_port));
}

#[test]
fn each_device_starts_its_host_ports_somewhere_else() {
    let a = Env::new("port-a").dev.next_local_port;
    let b = Env::new("port-b").dev.next_local_port;
    let c = Env::new("port-c").dev.next_local_port;
    assert!(a >= FIRST_LOCAL_PORT && b >= FIRST_LOCAL_PORT && c >= FIRST_LOCAL_PORT);
    assert!(a != b || b != c, "three devices started at the same port {a}");
}
