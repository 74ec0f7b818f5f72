//! The hand-over of guest memory to an external page server (`MemorySource::Pager`).
//!
//! The VMM creates a userfaultfd (MISSING mode, not user-mode-only: KVM touches guest pages from the kernel),
//! registers every guest RAM region with it, connects to the page server's Unix socket and sends one
//! [`PagerHello`] (JSON, one datagram-sized message on a stream socket, at most [`MAX_HELLO_BYTES`]) with the
//! userfaultfd attached (SCM_RIGHTS). The page server answers faults with UFFDIO_COPY / UFFDIO_ZEROPAGE into the
//! VMM's memory. The connection stays open for the VMM's life: its end tells the page server the VM is gone.
//! When the page server goes away (flintd restarts), the VMM connects again and sends the same hello and fd;
//! pages already installed are kept (the new server treats EEXIST as installed).
use serde::{Deserialize, Serialize};

/// Largest hello message.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;
/// The hello's version; a page server refuses one it does not know.
pub const PAGER_PROTOCOL: u32 = 1;

/// One guest RAM region as registered: host virtual address in the VMM, length, and its offset in the memory
/// image (the snapshot's memory file order).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PagerRange {
    pub host: u64,
    pub len: u64,
    pub image_offset: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PagerHello {
    pub protocol: u32,
    /// The VMM's pid as it sees it (1 when jailed); flintd checks the socket peer's credentials instead.
    pub pid: u32,
    pub ranges: Vec<PagerRange>,
    /// Total bytes of the memory image (the sum of the ranges).
    pub image_bytes: u64,
    /// A reconnect after the page server went away: some pages are installed already.
    #[serde(default)]
    pub reconnect: bool,
}
