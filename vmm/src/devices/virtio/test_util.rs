//! Test helpers: a guest memory with virtqueues laid out in it, driven like a guest driver would.
use crate::vstate::memory::GuestMem;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceCtx, Interrupt};

const DESC_BASE: u64 = 0x1000;
const QUEUE_STRIDE: u64 = 0x3000;

/// Guest memory (1 MiB) with ready queues; descriptor tables at 0x1000 + i*0x3000.
pub struct QueueEnv {
    pub mem: GuestMem,
    pub queues: Vec<Queue>,
    pub irq: Interrupt,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
}

impl QueueEnv {
    pub fn new(sizes: &[u16]) -> Self {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut queues = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let base = DESC_BASE + i as u64 * QUEUE_STRIDE;
            let mut q = Queue::new(size).unwrap();
            q.set_size(size.min(64));
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some((base + 0x400) as u32), Some(0));
            q.set_used_ring_address(Some((base + 0x800) as u32), Some(0));
            q.set_ready(true);
            assert!(q.is_valid(&mem));
            queues.push(q);
        }
        let n = sizes.len();
        Self {
            mem,
            queues,
            irq: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            next_desc: vec![0; n],
            avail_idx: vec![0; n],
        }
    }

    fn base(q: usize) -> u64 {
        DESC_BASE + q as u64 * QUEUE_STRIDE
    }

    /// Adds a chain of (addr, len, device-writable) buffers and makes it available.
    pub fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc[q];
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.next_desc[q];
            let mut flags: u16 = if write { 2 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            self.write_desc(q, idx, addr, len, flags, idx + 1);
            self.next_desc[q] += 1;
        }
        self.publish(q, head);
        head
    }

    /// Writes one raw descriptor (for malformed-chain tests).
    pub fn write_desc(&mut self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Self::base(q) + u64::from(idx) * 16;
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Puts `head` in the avail ring.
    pub fn publish(&mut self, q: usize, head: u16) {
        let avail = Self::base(q) + 0x400;
        let size = u64::from(self.queues[q].size());
        let slot = u64::from(self.avail_idx[q]) % size;
        self.mem.write_obj(head, GuestAddress(avail + 4 + slot * 2)).unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem.write_obj(self.avail_idx[q], GuestAddress(avail + 2)).unwrap();
    }

    pub fn run<F: FnOnce(&mut DeviceCtx)>(&mut self, f: F) {
        let mut ctx = DeviceCtx { active: true, mem: &self.mem, queues: &mut self.queues, irq: &self.irq };
        f(&mut ctx);
    }

    /// All used-ring entries so far: (id, len).
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let used = Self::base(q) + 0x800;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let size = u64::from(self.queues[q].size());
        (0..idx)
            .map(|i| {
                let e = used + 4 + (u64::from(i) % size) * 8;
                (self.mem.read_obj(GuestAddress(e)).unwrap(), self.mem.read_obj(GuestAddress(e + 4)).unwrap())
            })
            .collect()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn interrupted(&self) -> bool {
        self.irq.status.load(Ordering::SeqCst) & super::INT_USED_RING != 0
    }
}
