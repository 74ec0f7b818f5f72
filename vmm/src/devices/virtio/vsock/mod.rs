//! virtio-vsock with a Firecracker-compatible host side.
//!
//! - Host → guest: a host client connects to the Unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; once the guest accepts, it reads `OK <host_port>\n` and the stream is
//!   connected to guest port `<port>`.
//! - Guest → host: a guest connection to host (CID 2) port `P` is connected to the Unix socket
//!   `<uds_path>_<P>`; if nothing listens there the guest gets a reset.
//!
//! Flow control is virtio-vsock's credit scheme in both directions: the VMM never reads more
//! from a host stream than the guest has buffer space for, and advertises its own buffer so
//! the guest never sends more than the VMM holds. Closing either end sends SHUTDOWN/RST.
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use event_manager::EventSet;
use virtio_queue::QueueT;

use super::{DeviceCounters, DeviceCtx, VirtioDevice, Watch, DEVICE_EVENT_BASE, TYPE_VSOCK};
use packet::*;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const EV_LISTENER: u32 = DEVICE_EVENT_BASE;
const EV_STREAM: u32 = DEVICE_EVENT_BASE + 1;
/// Buffer space the VMM advertises per connection (guest → host bytes in flight).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most bytes staged from a host stream waiting for guest RX buffers, per connection.
const RX_STAGE_MAX: usize = 64 * 1024;
/// Largest single payload read from the guest.
const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
const CONNECT_LINE_MAX: usize = 64;
/// Most control packets waiting for guest RX buffers. A guest that sends packets but posts no RX buffers would
/// otherwise grow this queue (one RST per bad packet) without bound: past this the device stops taking TX
/// descriptors until the guest drains RX. One guest packet queues at most two control packets.
pub const MAX_RX_CTRL: usize = 512;
/// First host-side port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Where a device's host-side ports start: a different place for each VMM process. A restored guest can still
/// hold connections from its snapshot's VMM until it takes the transport reset; a fresh port never collides with
/// one of those (the guest would answer our REQUEST on such a port with a reset).
fn first_local_port() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish() as u32;
    FIRST_LOCAL_PORT + r % (u32::MAX - FIRST_LOCAL_PORT)
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (use 3 or above)")]
    BadCid(u64),
    #[error("cannot listen on vsock socket {0}")]
    Listen(PathBuf, #[source] std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    /// Host-side port.
    local: u32,
    /// Guest-side port.
    peer: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// SHUTDOWN sent to the guest after host EOF; waiting for its RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// Guest's receive buffer and how much of it the guest has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest (RW payloads).
    rx_cnt: Wrapping<u32>,
    /// Bytes received from the guest and written to the host stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Host → guest bytes read but not yet delivered.
    rx_stage: VecDeque<u8>,
    /// Guest → host bytes not yet written (host stream would block).
    tx_pending: VecDeque<u8>,
    host_eof: bool,
    guest_no_more_send: bool,
    watch: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_stage: VecDeque::new(),
            tx_pending: VecDeque::new(),
            host_eof: false,
            guest_no_more_send: false,
            watch: EventSet::empty(),
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// What to watch on the host stream now.
    fn wanted_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        let can_read = self.state == ConnState::Established
            && !self.host_eof
            && self.rx_stage.len() < RX_STAGE_MAX
            && self.peer_credit() as usize > self.rx_stage.len();
        if can_read {
            set |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !self.tx_pending.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }
}

struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Conn>,
    pending: HashMap<RawFd, PendingHost>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Control packets waiting for guest RX buffers.
    rx_ctrl: VecDeque<Header>,
    next_local_port: u32,
    pub counters: DeviceCounters,
    /// Log every packet to stderr (`FLINT_TRACE_VSOCK` set when the device was created).
    trace: bool,
    /// After a restore: a transport reset was sent and the guest has not yet re-posted its
    /// event buffer (i.e. not yet processed the reset). New host connections wait for it, or
    /// the guest's reset would kill them.
    awaiting_reset_ack: bool,
    deferred_requests: Vec<Header>,
    /// Connections dropped where the event loop could not be told (driver reset): their streams stay open
    /// until their fds are unregistered at the next event, so a new connection cannot reuse a registered fd.
    retired: Vec<Conn>,
}

impl Vsock {
    /// Binds the host-side socket (a stale socket file at `uds_path` is replaced).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cid));
        }
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path).map_err(|e| VsockError::Listen(uds_path.to_path_buf(), e))?;
        listener.set_nonblocking(true).map_err(|e| VsockError::Listen(uds_path.to_path_buf(), e))?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            pending: HashMap::new(),
            by_fd: HashMap::new(),
            rx_ctrl: VecDeque::new(),
            next_local_port: first_local_port(),
            counters: DeviceCounters::default(),
            trace: std::env::var_os("FLINT_TRACE_VSOCK").is_some(),
            awaiting_reset_ack: false,
            deferred_requests: Vec::new(),
            retired: Vec::new(),
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn reply(&self, key: ConnKey, op: u16, flags: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get(&key) {
            Some(c) => (CONN_BUF_ALLOC, c.fwd_cnt.0),
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// No more guest packets until the guest takes control packets off the RX queue.
    fn tx_throttled(&self) -> bool {
        self.rx_ctrl.len() + 2 > MAX_RX_CTRL
    }

    /// Unregisters the fds of connections dropped without access to the event loop, then closes them.
    fn bury_retired(&mut self, ops: &mut dyn Watch) {
        for c in self.retired.drain(..) {
            if !c.watch.is_empty() {
                ops.remove(c.stream.as_raw_fd());
            }
        }
    }

    /// Drops every connection (the driver went away, or a restore): fds are unregistered at the next event.
    fn retire_all(&mut self) {
        self.retired.extend(self.conns.drain().map(|(_, c)| c));
        self.by_fd.clear();
        self.rx_ctrl.clear();
        self.deferred_requests.clear();
    }

    fn queue_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) {
        let h = self.reply(key, op, flags);
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        self.rx_ctrl.push_back(h);
    }

    fn update_watch(&mut self, key: ConnKey, ops: &mut dyn Watch) {
        if let Some(c) = self.conns.get_mut(&key) {
            let want = c.wanted_events();
            if want != c.watch {
                let fd = c.stream.as_raw_fd();
                if c.watch.is_empty() {
                    ops.add(fd, EV_STREAM, want);
                } else if want.is_empty() {
                    ops.remove(fd);
                } else {
                    ops.modify(fd, EV_STREAM, want);
                }
                c.watch = want;
            }
        }
    }

    fn drop_conn(&mut self, key: ConnKey, ops: &mut dyn Watch) {
        // A host connection that gave up while its REQUEST waited for the transport reset: the guest must not
        // get that REQUEST later.
        self.deferred_requests.retain(|h| h.src_port != key.local || h.dst_port != key.peer);
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            if !c.watch.is_empty() {
                ops.remove(fd);
            }
            self.by_fd.remove(&fd);
        }
    }

    fn reset_conn(&mut self, key: ConnKey, ops: &mut dyn Watch) {
        let unsent = self.deferred_requests.iter().any(|h| h.src_port == key.local && h.dst_port == key.peer);
        self.drop_conn(key, ops);
        // The guest never heard of a connection whose REQUEST was still held back: nothing to reset there.
        if !unsent {
            self.queue_ctrl(key, OP_RST, 0);
        }
    }

    /// Guest → host: drains the TX queue (while the control queue has room; see [`MAX_RX_CTRL`]).
    fn process_tx(&mut self, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        let mem = ctx.mem;
        let mut used = false;
        while !self.tx_throttled() {
            let Some(chain) = ctx.queues[TXQ].pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match chain.reader(mem) {
                Ok(mut r) => {
                    let mut hb = [0u8; HDR_LEN];
                    if r.read_exact(&mut hb).is_ok() {
                        let h = Header::parse(&hb);
                        let len = h.len.min(MAX_PKT_PAYLOAD) as usize;
                        let mut payload = vec![0u8; len.min(r.available_bytes())];
                        if h.len > MAX_PKT_PAYLOAD || r.read_exact(&mut payload).is_err() {
                            self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.handle_guest_packet(h, &payload, ops);
                        }
                    } else {
                        self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if ctx.queues[TXQ].add_used(mem, head, 0).is_err() {
                self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            used = true;
        }
        if used && ctx.queues[TXQ].needs_notification(mem).unwrap_or(true) {
            ctx.irq.signal_used();
        }
    }

    fn handle_guest_packet(&mut self, h: Header, payload: &[u8], ops: &mut dyn Watch) {
        if self.trace {
            eprintln!("vsock guest->host {h:?}");
        }
        let key = ConnKey { local: h.dst_port, peer: h.src_port };
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            if h.op != OP_RST {
                self.rx_ctrl.push_back(self.reply(key, OP_RST, 0));
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        }
        match h.op {
            OP_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.reset_conn(key, ops);
                    return;
                }
                let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                    Ok(stream) => {
                        let mut c = Conn::new(stream, ConnState::Established);
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
                        self.by_fd.insert(c.stream.as_raw_fd(), key);
                        self.conns.insert(key, c);
                        self.queue_ctrl(key, OP_RESPONSE, 0);
                        self.update_watch(key, ops);
                    }
                    Err(_) => self.rx_ctrl.push_back(self.reply(key, OP_RST, 0)),
                }
            }
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::Connecting => {
                    c.state = ConnState::Established;
                    // The handshake reply is not guest data: it must not count in fwd_cnt
                    // (the guest would see more bytes forwarded than it sent and stop
                    // sending). A fresh socket has room for these few bytes.
                    let line = format!("OK {}\n", key.local);
                    if c.stream.write_all(line.as_bytes()).is_err() {
                        self.reset_conn(key, ops);
                        return;
                    }
                    self.update_watch(key, ops);
                }
                _ => self.reset_conn(key, ops),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.rx_ctrl.push_back(self.reply(key, OP_RST, 0));
                    return;
                };
                if c.state != ConnState::Established && c.state != ConnState::Closing {
                    self.reset_conn(key, ops);
                    return;
                }
                if c.tx_pending.len() + payload.len() > CONN_BUF_ALLOC as usize {
                    // The guest ignored our credit: drop the connection rather than buffer
                    // without bound.
                    self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                    self.reset_conn(key, ops);
                    return;
                }
                c.tx_pending.extend(payload);
                self.counters.bytes_in.fetch_add(payload.len() as u64, Ordering::Relaxed);
                self.flush_to_host(key, ops);
            }
            OP_CREDIT_UPDATE => self.update_watch(key, ops),
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.queue_ctrl(key, OP_CREDIT_UPDATE, 0);
                } else {
                    self.rx_ctrl.push_back(self.reply(key, OP_RST, 0));
                }
            }
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_RCV != 0 && h.flags & SHUTDOWN_SEND != 0 {
                    // Full close: flush what we can, then reset.
                    if let Some(c) = self.conns.get_mut(&key) {
                        let buf: Vec<u8> = c.tx_pending.drain(..).collect();
                        let _ = c.stream.write_all(&buf);
                    }
                    self.reset_conn(key, ops);
                } else if let Some(c) = self.conns.get_mut(&key) {
                    if h.flags & SHUTDOWN_SEND != 0 {
                        c.guest_no_more_send = true;
                        if c.tx_pending.is_empty() {
                            let _ = c.stream.shutdown(std::net::Shutdown::Write);
                        }
                    }
                }
            }
            OP_RST => self.drop_conn(key, ops),
            _ => {
                self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                self.reset_conn(key, ops);
            }
        }
    }

    /// Writes pending guest → host bytes; sends a credit update when the guest has used up a
    /// good part of its window.
    fn flush_to_host(&mut self, key: ConnKey, ops: &mut dyn Watch) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while !c.tx_pending.is_empty() {
            let (a, _) = c.tx_pending.as_slices();
            match c.stream.write(a) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    c.tx_pending.drain(..n);
                    c.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
            self.reset_conn(key, ops);
            return;
        }
        if c.tx_pending.is_empty() && c.guest_no_more_send {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        let unannounced = (c.fwd_cnt - c.last_fwd_cnt_sent).0;
        if unannounced >= CONN_BUF_ALLOC / 4 && c.state != ConnState::Connecting {
            self.queue_ctrl(key, OP_CREDIT_UPDATE, 0);
        }
        self.update_watch(key, ops);
    }

    /// Host → guest: reads what the guest has credit for into the connection's stage.
    fn read_from_host(&mut self, key: ConnKey, ops: &mut dyn Watch) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != ConnState::Established || c.host_eof {
            return;
        }
        let room = (c.peer_credit() as usize)
            .saturating_sub(c.rx_stage.len())
            .min(RX_STAGE_MAX - c.rx_stage.len().min(RX_STAGE_MAX));
        if room > 0 {
            let mut buf = vec![0u8; room];
            match c.stream.read(&mut buf) {
                Ok(0) => c.host_eof = true,
                Ok(n) => c.rx_stage.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => c.host_eof = true,
            }
        }
        self.update_watch(key, ops);
    }

    /// Host → guest: fills guest RX buffers with control packets, then staged data.
    fn process_rx(&mut self, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        if !ctx.active {
            return;
        }
        let mem = ctx.mem;
        let mut used = false;
        loop {
            // Pick the next thing to send before taking a buffer.
            let data_key = if self.rx_ctrl.is_empty() { self.next_data_conn() } else { None };
            if self.rx_ctrl.is_empty() && data_key.is_none() {
                break;
            }
            let Some(chain) = ctx.queues[RXQ].pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut w = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                    let _ = ctx.queues[RXQ].add_used(mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let written = if let Some(h) = self.rx_ctrl.pop_front() {
                if self.trace {
                    eprintln!("vsock host->guest {h:?}");
                }
                w.write_all(&h.to_bytes()).map(|_| HDR_LEN).unwrap_or(0)
            } else if let Some(key) = data_key {
                self.write_data_packet(key, &mut w, ops)
            } else {
                0
            };
            if ctx.queues[RXQ].add_used(mem, head, written as u32).is_err() {
                self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            used = true;
        }
        if used && ctx.queues[RXQ].needs_notification(mem).unwrap_or(true) {
            ctx.irq.signal_used();
        }
    }

    /// A connection with staged data the guest has credit for, or a host EOF to report.
    fn next_data_conn(&self) -> Option<ConnKey> {
        self.conns
            .iter()
            .find(|(_, c)| {
                c.state == ConnState::Established
                    && ((!c.rx_stage.is_empty() && c.peer_credit() > 0) || (c.host_eof && c.rx_stage.is_empty()))
            })
            .map(|(k, _)| *k)
    }

    fn write_data_packet<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        key: ConnKey,
        w: &mut virtio_queue::Writer<'_, B>,
        ops: &mut dyn Watch,
    ) -> usize {
        let mut h = self.reply(key, OP_RW, 0);
        let trace = self.trace;
        let Some(c) = self.conns.get_mut(&key) else {
            return 0;
        };
        if c.rx_stage.is_empty() && c.host_eof {
            // Host closed its end: tell the guest neither direction carries more data.
            c.state = ConnState::Closing;
            h.op = OP_SHUTDOWN;
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            return w.write_all(&h.to_bytes()).map(|_| HDR_LEN).unwrap_or(0);
        }
        let n = (w.available_bytes() - HDR_LEN).min(c.rx_stage.len()).min(c.peer_credit() as usize);
        let data: Vec<u8> = c.rx_stage.drain(..n).collect();
        h.len = n as u32;
        c.rx_cnt += Wrapping(n as u32);
        c.last_fwd_cnt_sent = c.fwd_cnt;
        if trace {
            eprintln!("vsock host->guest {h:?}");
        }
        let ok = w.write_all(&h.to_bytes()).and_then(|_| w.write_all(&data)).is_ok();
        self.counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.update_watch(key, ops);
        if ok {
            HDR_LEN + n
        } else {
            0
        }
    }

    fn accept_host(&mut self, ops: &mut dyn Watch) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    ops.add(fd, EV_STREAM, EventSet::IN | EventSet::READ_HANG_UP);
                    self.pending.insert(fd, PendingHost { stream, line: Vec::new() });
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` line.
    fn read_connect_line(&mut self, fd: RawFd, ops: &mut dyn Watch) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; CONNECT_LINE_MAX];
        let n = match p.stream.read(&mut buf[..CONNECT_LINE_MAX - p.line.len()]) {
            Ok(0) => 0,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => return,
            Err(_) => 0,
        };
        if n == 0 {
            ops.remove(fd);
            self.pending.remove(&fd);
            return;
        }
        p.line.extend_from_slice(&buf[..n]);
        let Some(nl) = p.line.iter().position(|b| *b == b'\n') else {
            if p.line.len() >= CONNECT_LINE_MAX {
                ops.remove(fd);
                self.pending.remove(&fd);
            }
            return;
        };
        let Some(mut p) = self.pending.remove(&fd) else {
            return;
        };
        ops.remove(fd);
        let rest = p.line.split_off(nl + 1);
        let port = std::str::from_utf8(&p.line)
            .ok()
            .and_then(|l| l.trim_end().strip_prefix("CONNECT "))
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(port) = port else {
            let _ = p.stream.write_all(b"ERROR expected 'CONNECT <port>'\n");
            return;
        };
        let local = self.alloc_local_port();
        let key = ConnKey { local, peer: port };
        let mut c = Conn::new(p.stream, ConnState::Connecting);
        c.rx_stage.extend(rest);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, c);
        let h = self.reply(key, OP_REQUEST, 0);
        let queue_len = if self.awaiting_reset_ack { self.deferred_requests.len() } else { self.rx_ctrl.len() };
        if queue_len >= MAX_RX_CTRL {
            // The guest is not taking packets: refuse rather than queue without bound.
            if let Some(mut c) = self.conns.remove(&key) {
                let _ = c.stream.write_all(b"ERROR the guest is not receiving\n");
            }
            self.by_fd.remove(&fd);
            return;
        }
        if self.awaiting_reset_ack {
            self.deferred_requests.push(h);
        } else {
            self.rx_ctrl.push_back(h);
        }
        // Watch for the host hanging up while the guest has not answered yet.
        if let Some(c) = self.conns.get_mut(&key) {
            c.watch = EventSet::READ_HANG_UP;
            ops.add(fd, EV_STREAM, c.watch);
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX { FIRST_LOCAL_PORT } else { p + 1 };
            if !self.conns.keys().any(|k| k.local == p) {
                return p;
            }
        }
    }

    fn stream_event(&mut self, fd: RawFd, set: EventSet, ops: &mut dyn Watch) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd, ops);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            ops.remove(fd);
            return;
        };
        let state_connecting = self.conns.get(&key).map(|c| c.state == ConnState::Connecting).unwrap_or(false);
        if state_connecting {
            if set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
                // The host client gave up before the guest answered.
                self.reset_conn(key, ops);
            }
            return;
        }
        if set.contains(EventSet::OUT) {
            self.flush_to_host(key, ops);
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
            self.read_from_host(key, ops);
        }
    }

    fn send_transport_reset(&mut self, ctx: &mut DeviceCtx) {
        const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
        let mem = ctx.mem;
        let Some(chain) = ctx.queues[EVQ].pop_descriptor_chain(mem) else {
            self.counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let head = chain.head_index();
        let len = match chain.writer(mem) {
            Ok(mut w) => w.write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes()).map(|_| 4).unwrap_or(0),
            Err(_) => 0,
        };
        if ctx.queues[EVQ].add_used(mem, head, len).is_ok() {
            self.awaiting_reset_ack = true;
            ctx.irq.signal_used();
        }
    }

    /// Number of open connections (for `describe` and tests).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The socket file belongs to this device: leave nothing behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 256]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn reset(&mut self) {
        // The driver went away: every connection is gone with it.
        self.retire_all();
    }
    fn queue_notify(&mut self, index: usize, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        self.bury_retired(ops);
        match index {
            TXQ => {
                self.process_tx(ctx, ops);
                self.process_rx(ctx, ops);
            }
            RXQ => {
                self.process_rx(ctx, ops);
                // RX buffers freed control-queue room: take the TX packets left waiting.
                self.process_tx(ctx, ops);
                self.process_rx(ctx, ops);
            }
            // The guest re-posted its event buffer: the transport reset is processed.
            EVQ if self.awaiting_reset_ack => {
                self.awaiting_reset_ack = false;
                self.rx_ctrl.extend(self.deferred_requests.drain(..));
                self.process_rx(ctx, ops);
            }
            _ => {}
        }
    }
    fn initial_fds(&self) -> Vec<(RawFd, EventSet, u32)> {
        vec![(self.listener.as_raw_fd(), EventSet::IN, EV_LISTENER)]
    }
    fn restored(&mut self, _acked: u64, ctx: &mut DeviceCtx) {
        // Connections did not survive the snapshot: tell the guest to drop them all
        // (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue).
        self.retire_all();
        self.send_transport_reset(ctx);
    }
    fn device_event(&mut self, data: u32, fd: RawFd, set: EventSet, ctx: &mut DeviceCtx, ops: &mut dyn Watch) {
        self.bury_retired(ops);
        match data {
            EV_LISTENER => self.accept_host(ops),
            EV_STREAM => self.stream_event(fd, set, ops),
            _ => {}
        }
        self.process_rx(ctx, ops);
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "guest_cid": self.cid,
            "uds_path": self.uds_path,
            "connections": self.conns.len(),
            "control_queued": self.rx_ctrl.len(),
            "counters": self.counters.snapshot(),
        })
    }
}

#[cfg(test)]
mod tests;
