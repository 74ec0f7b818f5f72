//! Queue processing shared by the request/response devices (block, rng): pop every available chain, let the
//! device handle it, return it to the guest, and interrupt the guest once if it wants to be told.
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};

use super::DeviceCtx;
use crate::vstate::memory::GuestMem;

/// Drains queue `q`. `handle` returns the bytes written into the chain, or `None` for a chain it could not
/// process (counted in `bad`; the chain is returned with 0 bytes so the guest driver does not wait forever). A used
/// ring the guest broke stops the drain (counted in `bad`).
pub fn drain(
    ctx: &mut DeviceCtx,
    q: usize,
    bad: &AtomicU64,
    handle: impl FnMut(DescriptorChain<&GuestMem>) -> Option<u32>,
) {
    drain_gated(ctx, q, bad, |_| true, handle)
}

/// [`drain`], with a gate asked before each chain: false puts the chain back (it stays first in the queue) and
/// stops (a rate limiter without tokens; it wakes the device later).
pub fn drain_gated(
    ctx: &mut DeviceCtx,
    q: usize,
    bad: &AtomicU64,
    mut gate: impl FnMut(&DescriptorChain<&GuestMem>) -> bool,
    mut handle: impl FnMut(DescriptorChain<&GuestMem>) -> Option<u32>,
) {
    let mem = ctx.mem;
    let mut used = false;
    while let Some(chain) = ctx.queues[q].pop_descriptor_chain(mem) {
        if !gate(&chain) {
            ctx.queues[q].go_to_previous_position();
            break;
        }
        let head = chain.head_index();
        let len = handle(chain).unwrap_or_else(|| {
            bad.fetch_add(1, Ordering::Relaxed);
            0
        });
        if ctx.queues[q].add_used(mem, head, len).is_err() {
            bad.fetch_add(1, Ordering::Relaxed);
            break;
        }
        used = true;
    }
    if used && ctx.queues[q].needs_notification(mem).unwrap_or(true) {
        ctx.irq.signal_used();
    }
}
