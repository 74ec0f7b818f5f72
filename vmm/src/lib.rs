//! flint-vmm: Flint's KVM virtual machine monitor, one process per microVM.
//!
//! Layout follows what the VMM is: [`vstate`] (KVM VM, memory, vCPUs), [`arch`] (x86_64 boot),
//! [`devices`] (buses, legacy and virtio devices), [`builder`] (assembly), [`api`] (control
//! socket), [`host`] (host profiles). See docs/vmm.md.
pub mod api;
pub mod arch;
pub mod builder;
pub mod describe;
pub mod device_manager;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod jail;
pub mod pager_link;
pub mod persist;
pub mod seccomp;
pub mod snapshot;
pub mod standby;
pub mod vstate;

/// The VM configuration and host profiles are part of the flintd-VMM contract.
pub use flint_vmm_api::{config, host, spec};

pub use builder::{BuildError, Vmm, VmmHandle};
pub use config::VmConfig;
pub use host::HostProfile;
