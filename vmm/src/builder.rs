//! Assembles a microVM from a [`VmConfig`]: KVM VM, memory, kernel, devices, vCPUs.
use crate::vstate::memory::GuestMem;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::{self as arch, cpuid, regs, InitrdRegion};
use crate::config::{NetConfig, VmConfig};
use crate::device_manager::{finish_devices, setup_devices, Devices};
use crate::devices::bus::lock;
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::{block, net, vsock, MmioTransport};
use crate::devices::Bus;
use crate::host::HostProfile;
use crate::spec::{MemorySource, RestoreSpec};
use crate::vstate::vcpu::{self, ExitReason, VcpuContext, VcpuControl, VcpuStats, VmExit};
use crate::vstate::{memory, vm};

/// Kernel command line Flint always starts from.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule 8250.nr_uarts=1";
/// Kernel message that marks the hand-over to /init (used for boot timing).
pub const INIT_MARKER: &str = "Run /init as init process";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("cannot read kernel {0}")]
    KernelRead(PathBuf, #[source] std::io::Error),
    #[error("kernel {0} is not an ELF vmlinux (Flint boots the uncompressed ELF kernel directly in 64-bit mode; a bzImage is not supported)")]
    KernelNotElf(PathBuf),
    #[error("cannot load kernel {0}")]
    KernelLoad(PathBuf, #[source] linux_loader::loader::Error),
    #[error("cannot read initramfs {0}")]
    Initramfs(PathBuf, #[source] std::io::Error),
    #[error("initramfs {0} ({1} bytes) does not fit in guest memory above the kernel; give the VM more memory")]
    InitramfsTooBig(PathBuf, u64),
    #[error("kernel command line is too long or invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line to guest memory")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error(transparent)]
    System(#[from] arch::ConfigureSystemError),
    #[error(transparent)]
    Regs(#[from] regs::SetupRegsError),
    #[error("cannot open the console output {0}")]
    Console(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error(transparent)]
    Tap(#[from] net::tap::TapError),
    #[error(transparent)]
    Vsock(#[from] vsock::VsockError),
    #[error("cannot set up device I/O: {0}")]
    DeviceIo(String),
    #[error("KVM failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot start a thread or event loop: {0}")]
    Runtime(String),
    #[error("cannot restore the snapshot")]
    Restore(#[from] crate::snapshot::RestoreError),
}

/// Size of the block a userfaultfd restore serves per fault (sequential touches within it cost
/// one round trip).
pub const UFFD_CHUNK: u64 = 64 * 1024;

/// The page server of a `uffd` restore, served in this process (for its counters in `describe`).
#[derive(Clone)]
pub struct LocalPager {
    pub stats: Arc<flint_uffd::UffdStats>,
    pub source: Arc<dyn flint_uffd::PageSource>,
}

/// The snapshot's memory file mapped privately at `layout`: into a standby's prepared slots if it has them (true:
/// registered already), else at new addresses (false: the caller registers them). A slot range something else
/// took meanwhile makes the slots go and the memory map anew.
fn private_memory(
    vm: &VmFd,
    path: &std::path::Path,
    layout: &[(u64, u64)],
    ahead: Option<crate::standby::PreparedMemory>,
) -> Result<(GuestMem, bool), BuildError> {
    use crate::snapshot::{memory::map_private, memory::MemFileError, RestoreError};
    if let Some(m) = ahead {
        match map_private(path, layout, Some(&m)) {
            Ok(mem) => return Ok((mem, true)),
            Err(MemFileError::Map(_, e)) if e.kind() == std::io::ErrorKind::AlreadyExists => m.release(vm)?,
            Err(e) => return Err(RestoreError::from(e).into()),
        }
    }
    Ok((map_private(path, layout, None).map_err(RestoreError::from)?, false))
}

/// Anonymous guest memory at `layout`, registered with a new userfaultfd; returns the memory, whether it is in
/// prepared KVM slots already, the fd and the registered ranges (in memory-image order).
fn lazy_memory(
    vm: &VmFd,
    layout: &[(u64, u64)],
    ahead: Option<crate::standby::PreparedMemory>,
) -> Result<(GuestMem, bool, flint_uffd::Userfault, Vec<flint_vmm_api::pager::PagerRange>), BuildError> {
    use crate::snapshot::RestoreError;
    // A standby's prepared slots get anonymous memory not touched yet, as userfaultfd needs it.
    let (mem, registered) =
        crate::standby::anonymous_guest_mem(vm, layout, ahead).map_err(|e| BuildError::Runtime(e.to_string()))?;
    let uffd = flint_uffd::Userfault::create().map_err(RestoreError::from)?;
    let mut off = 0;
    let mut uranges = Vec::new();
    for r in mem.iter() {
        uffd.register(r.as_ptr() as u64, r.len()).map_err(RestoreError::from)?;
        uranges.push(flint_vmm_api::pager::PagerRange { host: r.as_ptr() as u64, len: r.len(), image_offset: off });
        off += r.len();
    }
    Ok((mem, registered, uffd, uranges))
}

fn dirty_flag(config: &VmConfig) -> u32 {
    if config.track_dirty_pages {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    }
}

pub use flint_vmm_api::describe::{BootTimings, RestoreTimings};

/// One running (or ready to run) microVM: what the thread running it owns, and the shared part every other thread
/// reaches through a [`VmmHandle`].
pub struct Vmm {
    shared: VmmHandle,
    _kvm: Kvm,
    event_manager: EventManager<Box<dyn MutEventSubscriber + Send>>,
    pending_vcpus: Vec<(VcpuFd, VcpuContext)>,
    vcpu_threads: Vec<JoinHandle<VcpuFd>>,
    /// The dead man's switch ([`flint_vmm_api::LaunchSpec::fence`]), read by the event loop.
    fence: Option<Fence>,
}

/// How often the event loop reads the fence's deadline.
const FENCE_CHECK: Duration = Duration::from_millis(50);

struct Fence {
    file: std::fs::File,
    checked: Instant,
}

impl std::ops::Deref for Vmm {
    type Target = VmmShared;
    fn deref(&self) -> &VmmShared {
        &self.shared
    }
}

/// A thread-safe, cloneable view of a VM (for the control API).
#[derive(Clone)]
pub struct VmmHandle(Arc<VmmShared>);

impl std::ops::Deref for VmmHandle {
    type Target = VmmShared;
    fn deref(&self) -> &VmmShared {
        &self.0
    }
}

/// The part of a VM every thread may use.
pub struct VmmShared {
    pub config: VmConfig,
    pub profile: HostProfile,
    pub cmdline: String,
    pub(crate) vm: VmFd,
    pub mem: GuestMem,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub restore_timings: Option<RestoreTimings>,
    /// The CPUID each vCPU was configured with (what a snapshot records and a restore sets:
    /// on some hosts KVM_GET_CPUID2 reports the hardware's, not what the VMM set).
    pub(crate) cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    pub exit: Arc<VmExit>,
    pub control: Arc<VcpuControl>,
    pub stats: Vec<Arc<VcpuStats>>,
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    /// Each device's id (`vda`, `net0`, ...), in `devices` order.
    pub device_ids: Vec<String>,
    pub timings: Mutex<BootTimings>,
    pub(crate) init_seen: Arc<Mutex<Option<Instant>>>,
    /// When the vCPUs first ran (boot timings are derived from it).
    pub(crate) first_run: Mutex<Option<Instant>>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    /// The page server of a `uffd` restore.
    pub(crate) local_pager: Option<LocalPager>,
    /// One snapshot at a time.
    pub(crate) snapshot_lock: Mutex<()>,
    /// The next diff snapshot's parent is the snapshot this VM was restored from (no snapshot taken since): a page
    /// that holds that snapshot's content again is left out of it ([`crate::snapshot::memory::SourcePages`]).
    pub(crate) diff_on_source: std::sync::atomic::AtomicBool,
}

/// Everything a built or restored VM is made of, before its vCPU threads exist.
struct Parts {
    config: VmConfig,
    profile: HostProfile,
    cmdline: String,
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMem,
    exit: Arc<VmExit>,
    init_seen: Arc<Mutex<Option<Instant>>>,
    devices: Devices,
    fds: Vec<VcpuFd>,
    cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    timings: BootTimings,
    restore: Option<RestoreTimings>,
    local_pager: Option<LocalPager>,
}

/// The snapshot's configuration with the host-side devices the restore spec gives. A restore never opens a host
/// path named inside a snapshot (whoever can write the snapshot would choose what the VMM opens): every device
/// with a host side must be given one, and the console must be a path given here, stdout or off.
fn restored_config(saved: &VmConfig, spec: &RestoreSpec) -> Result<VmConfig, BuildError> {
    use crate::snapshot::RestoreError;
    let mut config = saved.clone();
    let d = &spec.devices;
    let missing = |what: &str, flag: &str| {
        RestoreError::Devices(format!(
            "the snapshot has {what}: its host side must be given ({flag}); a restore never opens a host path named in a snapshot"
        ))
    };
    if saved.vsock.is_some() && d.vsock_uds.is_none() {
        return Err(missing("a vsock device", "--vsock-uds / devices.vsock_uds").into());
    }
    if !saved.drives.is_empty() && d.drive_paths.is_none() {
        return Err(missing(&format!("{} drive(s)", saved.drives.len()), "--drive / devices.drive_paths").into());
    }
    if d.console.is_none() && !matches!(saved.console.as_str(), "stdout" | "off") {
        return Err(missing("a console file", "--console / devices.console").into());
    }
    if let Some(u) = &d.vsock_uds {
        match config.vsock.as_mut() {
            Some(v) => v.uds_path = u.clone(),
            None => {
                return Err(RestoreError::Devices(
                    "a vsock socket was given but the snapshot has no vsock device".into(),
                )
                .into())
            }
        }
    }
    if let Some(c) = &d.console {
        config.console = c.clone();
    }
    if let Some(l) = d.console_limit_bytes {
        config.console_limit_bytes = l;
    }
    match (&d.net, config.net.as_mut()) {
        (Some(_), None) => {
            return Err(RestoreError::Devices(
                "a tap was given but the snapshot has no network card (boot its template with one: flintd gives \
                 every VM a card)"
                    .into(),
            )
            .into())
        }
        (Some(n), Some(c)) => {
            // The snapshot's MAC unless the restore names one (a clone's own: flintd re-addresses the guest).
            let mac = n.mac.clone().or_else(|| c.mac.clone());
            *c = NetConfig { mac, ..n.clone() };
        }
        // No host side given: the card stays, detached (a restore never opens a tap named in a snapshot).
        (None, Some(c)) => *c = NetConfig { mac: c.mac.clone(), ..NetConfig::detached() },
        (None, None) => {}
    }
    if let Some(paths) = &d.drive_paths {
        if paths.len() != config.drives.len() {
            return Err(RestoreError::Devices(format!(
                "{} drive paths given, the snapshot has {} drives",
                paths.len(),
                config.drives.len()
            ))
            .into());
        }
        for (drive, p) in config.drives.iter_mut().zip(paths) {
            drive.path = p.clone();
        }
    }
    if let Some(track) = spec.track_dirty_pages {
        config.track_dirty_pages = track;
    }
    for drive in &config.drives {
        // An inherited fd (`/dev/fd/N`: a jailed VMM's file from outside its directory) is checked through the fd.
        let is_file = flint_vmm_api::spec::open_host_file(&drive.path, false)
            .and_then(|f| f.metadata())
            .is_ok_and(|m| m.is_file());
        if !is_file {
            return Err(crate::config::ConfigError::MissingFile(drive.path.clone()).into());
        }
    }
    Ok(config)
}

pub(crate) fn elapsed_us(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

impl Vmm {
    /// Builds the VM; vCPUs are created but not started (see [`Vmm::start`]).
    /// `prepared`: a standby VMM's KVM VM (and memory slots), made before it was handed the boot.
    pub fn build(
        config: VmConfig,
        profile: HostProfile,
        process_start: Instant,
        prepared: Option<crate::standby::Prepared>,
    ) -> Result<Self, BuildError> {
        config.validate()?;
        let mut timings = BootTimings::default();
        vcpu::install_kick_handler().map_err(|e| BuildError::Runtime(format!("signal handler: {e}")))?;

        let t = Instant::now();
        let layout = crate::arch::x86_64::layout::ram_regions(config.mem_mib * memory::MIB);
        let supported_ahead = prepared.as_ref().map(|p| p.supported_cpuid.clone());
        // A standby made the irqchip (and vCPU 0) ahead, after its slots.
        let irqchip_ahead = prepared.is_some();
        let (kvm, vm, ahead, mut vcpu0) = match prepared {
            Some(p) => {
                let t = p.take(&layout).map_err(|e| BuildError::Runtime(e.to_string()))?;
                (t.kvm, t.vm, t.memory, t.vcpu0)
            }
            None => {
                let kvm = vm::open_kvm()?;
                let vm = vm::create_vm(&kvm)?;
                (kvm, vm, None, None)
            }
        };
        timings.kvm_setup_us = elapsed_us(t);

        let t = Instant::now();
        let mem = if irqchip_ahead {
            let (mem, registered) = crate::standby::anonymous_guest_mem(&vm, &layout, ahead)
                .map_err(|e| BuildError::Runtime(e.to_string()))?;
            if registered {
                crate::standby::set_slot_flags(&vm, &mem, dirty_flag(&config))?;
            } else {
                vm::register_memory(&vm, &mem, dirty_flag(&config))?;
            }
            mem
        } else {
            let mem = memory::create_anonymous(config.mem_mib)?;
            vm::register_memory(&vm, &mem, dirty_flag(&config))?;
            mem
        };
        timings.memory_us = elapsed_us(t);
        if !irqchip_ahead {
            let t = Instant::now();
            vm::create_irqchip(&vm)?;
            timings.kvm_setup_us += elapsed_us(t);
        }

        let t = Instant::now();
        let (entry, kernel_end) = load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initramfs {
            Some(p) => Some(load_initramfs(&mem, p, kernel_end)?),
            None => None,
        };
        timings.kernel_load_us = elapsed_us(t);

        let t = Instant::now();
        let exit = Arc::new(VmExit::new().map_err(|e| BuildError::Runtime(e.to_string()))?);
        let init_seen = Arc::new(Mutex::new(None));
        let mut devices = setup_devices(&config, &vm, &mem, &exit, &init_seen, None)?;
        finish_devices(&mut devices);
        timings.devices_us = elapsed_us(t);

        // Command line: base, root, host quirks, devices, user additions.
        let mut parts: Vec<String> = vec![BASE_CMDLINE.into()];
        if let Some((dev, ro)) = &devices.root_dev {
            parts.push(format!("root={dev} {}", if *ro { "ro" } else { "rw" }));
        }
        let quirks = profile.cmdline_extra();
        if !quirks.is_empty() {
            parts.push(quirks.into());
        }
        parts.extend(devices.cmdline_devices.iter().cloned());
        if !config.cmdline_extra.trim().is_empty() {
            parts.push(config.cmdline_extra.trim().into());
        }
        let cmdline_str = parts.join(" ");
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
        cmdline.insert_str(&cmdline_str).map_err(BuildError::Cmdline)?;
        load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BuildError::CmdlineLoad)?;
        arch::configure_system(&mem, cmdline_str.len() + 1, initrd, config.vcpus)?;
        regs::write_boot_tables(&mem)?;

        let t = Instant::now();
        let supported = match supported_ahead {
            Some(c) => c,
            None => kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| BuildError::Kvm("read supported CPUID", e))?,
        };
        let mut fds = Vec::new();
        let mut cpuids = Vec::new();
        for i in 0..config.vcpus {
            let fd =
                crate::standby::vcpu(&vm, u64::from(i), &mut vcpu0).map_err(|e| BuildError::Kvm("create a vCPU", e))?;
            let mut c = supported.clone();
            cpuid::normalize(&mut c, i, config.vcpus);
            fd.set_cpuid2(&c).map_err(|e| BuildError::Kvm("set CPUID", e))?;
            cpuids.push(c.as_slice().to_vec());
            regs::setup_msrs(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lint(&fd)?;
            if i == 0 {
                regs::setup_boot_vcpu(&fd, entry)?;
            }
            fds.push(fd);
        }
        timings.vcpus_us = elapsed_us(t);
        timings.process_to_first_run_us = elapsed_us(process_start);
        Ok(Self::assemble(Parts {
            config,
            profile,
            cmdline: cmdline_str,
            kvm,
            vm,
            mem,
            exit,
            init_seen,
            devices,
            fds,
            cpuids,
            timings,
            restore: None,
            local_pager: None,
        }))
    }

    /// Restores a VM from a snapshot into this (new) process; vCPUs start with [`Vmm::start`].
    /// `prepared`: a standby VMM's KVM VM (and memory slots), made before it was handed the restore.
    pub fn restore(
        spec: RestoreSpec,
        process_start: Instant,
        prepared: Option<crate::standby::Prepared>,
    ) -> Result<Self, BuildError> {
        use crate::snapshot::{cpu, memory as snapmem, RestoreError};
        let mut rt = RestoreTimings { mode: Some(spec.memory.mode_name().to_string()), ..Default::default() };
        vcpu::install_kick_handler().map_err(|e| BuildError::Runtime(format!("signal handler: {e}")))?;

        let t = Instant::now();
        let (snap, version) = crate::snapshot::read_state(&spec.state_path)?;
        rt.format_version = version;
        if snap.memory_is_diff && !spec.merged_memory {
            return Err(RestoreError::DiffMemory.into());
        }
        if let Some(w) = crate::host::snapshot_warning(snap.host_profile, &snap.cmdline) {
            eprintln!("flint-vmm: warning: {w}");
        }
        let config = restored_config(&snap.config, &spec)?;
        rt.read_state_us = elapsed_us(t);

        let t = Instant::now();
        let (kvm, vm, ahead, mut vcpu0) = match prepared {
            Some(p) => {
                rt.prepared = true;
                let supported = p.supported_cpuid.clone();
                cpu::check_supported_cpuid(supported, &snap.cpu, snap.config.vcpus).map_err(RestoreError::from)?;
                let t = p.take(&snap.memory_layout).map_err(|e| BuildError::Runtime(e.to_string()))?;
                (t.kvm, t.vm, t.memory, t.vcpu0)
            }
            None => {
                let kvm = vm::open_kvm()?;
                cpu::check_host_cpu(&kvm, &snap.cpu, snap.config.vcpus).map_err(RestoreError::from)?;
                let vm = vm::create_vm(&kvm)?;
                (kvm, vm, None, None)
            }
        };
        rt.kvm_setup_us = elapsed_us(t);

        let t = Instant::now();
        let want: u64 = snap.memory_layout.iter().map(|r| r.1).sum();
        let mut local_pager = None;
        let layout = &snap.memory_layout;
        let (mem, registered) = match &spec.memory {
            MemorySource::Private { path } => private_memory(&vm, path, layout, ahead)?,
            MemorySource::Uffd { path } => {
                let read_err = |e| RestoreError::Memory(snapmem::MemFileError::Read(path.display().to_string(), e));
                let f = std::fs::File::open(path).map_err(read_err)?;
                let size = f.metadata().map_err(read_err)?.len();
                if size != want {
                    let e = snapmem::MemFileError::Size { path: path.display().to_string(), have: size, want };
                    return Err(RestoreError::Memory(e).into());
                }
                let (mem, registered, uffd, ranges) = lazy_memory(&vm, layout, ahead)?;
                let pager = LocalPager {
                    stats: Arc::new(flint_uffd::UffdStats::default()),
                    source: Arc::new(flint_uffd::FileSource { file: f, unit: UFFD_CHUNK, size }),
                };
                let on_fatal = Box::new(|message: String| {
                    eprintln!("flint-vmm: {message}; stopping the VM");
                    std::process::exit(2);
                });
                let cfg = flint_uffd::ServeConfig {
                    ranges,
                    source: pager.source.clone(),
                    workers: 1,
                    prefetch: Vec::new(),
                    stats: pager.stats.clone(),
                    on_fatal,
                    hangup: None,
                    thread_start: Some(crate::seccomp::enter_pager),
                };
                flint_uffd::serve(uffd, cfg).map_err(RestoreError::from)?;
                local_pager = Some(pager);
                (mem, registered)
            }
            MemorySource::Pager { socket } => {
                let (mem, registered, uffd, ranges) = lazy_memory(&vm, layout, ahead)?;
                crate::pager_link::hand_over(socket, uffd, ranges, want)?;
                (mem, registered)
            }
        };
        // Prepared slots are registered already (flags 0): only a dirty log is still to turn on.
        if registered {
            crate::standby::set_slot_flags(&vm, &mem, dirty_flag(&config))?;
        } else {
            vm::register_memory(&vm, &mem, dirty_flag(&config))?;
        }
        rt.memory_us = elapsed_us(t);
        if !rt.prepared {
            let t = Instant::now();
            vm::create_irqchip(&vm)?;
            rt.kvm_setup_us += elapsed_us(t);
        }

        let t = Instant::now();
        let exit = Arc::new(VmExit::new().map_err(|e| BuildError::Runtime(e.to_string()))?);
        let init_seen = Arc::new(Mutex::new(None));
        let mut devices = setup_devices(&config, &vm, &mem, &exit, &init_seen, Some(&snap.serial))?;
        rt.devices_us = elapsed_us(t);

        let t = Instant::now();
        cpu::restore_vm(&vm, &snap.vm).map_err(RestoreError::from)?;
        rt.vm_state_us = elapsed_us(t);

        let t = Instant::now();
        let mut fds = Vec::new();
        for (i, s) in snap.vcpus.iter().enumerate() {
            let fd =
                crate::standby::vcpu(&vm, i as u64, &mut vcpu0).map_err(|e| BuildError::Kvm("create a vCPU", e))?;
            cpu::restore_vcpu(&fd, s).map_err(RestoreError::from)?;
            fds.push(fd);
        }
        rt.vcpu_state_us = elapsed_us(t);

        // Device state last: restoring a transport can raise its interrupt (vsock's transport reset), and an
        // interrupt raised before the IOAPIC and LAPIC states are set is overwritten by them. The guest then
        // never sees the reset, and vsock holds new host connections until it does.
        let t = Instant::now();
        crate::persist::restore_devices(&devices.ids, &devices.transports, &snap.devices)?;
        finish_devices(&mut devices);
        rt.devices_us += elapsed_us(t);
        let timings = BootTimings { process_to_first_run_us: elapsed_us(process_start), ..Default::default() };
        let cpuids = snap.vcpus.iter().map(|v| v.cpuid.clone()).collect();
        Ok(Self::assemble(Parts {
            config,
            profile: snap.host_profile,
            cmdline: snap.cmdline.clone(),
            kvm,
            vm,
            mem,
            exit,
            init_seen,
            devices,
            fds,
            cpuids,
            timings,
            restore: Some(rt),
            local_pager,
        }))
    }

    fn assemble(p: Parts) -> Self {
        let Parts {
            config,
            profile,
            cmdline,
            kvm,
            vm,
            mem,
            exit,
            init_seen,
            devices,
            fds,
            cpuids,
            timings,
            restore,
            local_pager,
        } = p;
        let control = Arc::new(VcpuControl::new());
        let pio = Arc::new(devices.pio);
        let mmio = Arc::new(devices.mmio);
        let mut stats = Vec::new();
        let pending_vcpus = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let s = Arc::new(VcpuStats::default());
                stats.push(s.clone());
                let ctx = VcpuContext {
                    index: i as u8,
                    pio: pio.clone(),
                    mmio: mmio.clone(),
                    exit: exit.clone(),
                    control: control.clone(),
                    mem: mem.clone(),
                    stats: s,
                };
                (fd, ctx)
            })
            .collect();
        let shared = VmmShared {
            config,
            profile,
            cmdline,
            vm,
            mem,
            serial: devices.serial,
            diff_on_source: std::sync::atomic::AtomicBool::new(restore.is_some()),
            restore_timings: restore,
            cpuids,
            exit,
            control,
            stats,
            devices: devices.transports,
            device_ids: devices.ids,
            timings: Mutex::new(timings),
            init_seen,
            first_run: Mutex::new(None),
            pio,
            mmio,
            local_pager,
            snapshot_lock: Mutex::new(()),
        };
        Vmm {
            shared: VmmHandle(Arc::new(shared)),
            _kvm: kvm,
            event_manager: devices.event_manager,
            pending_vcpus,
            vcpu_threads: Vec::new(),
            fence: None,
        }
    }

    /// Arms the dead man's switch: from now on the vCPUs run only while the file's deadline is ahead of the clock
    /// (checked before they first run and every [`FENCE_CHECK`] after).
    pub fn set_fence(&mut self, file: std::fs::File) {
        self.fence = Some(Fence { file, checked: Instant::now() });
        self.check_fence(true);
    }

    fn check_fence(&mut self, now_anyway: bool) {
        let Some(f) = self.fence.as_mut() else { return };
        if !now_anyway && f.checked.elapsed() < FENCE_CHECK {
            return;
        }
        f.checked = Instant::now();
        let deadline = flint_vmm_api::spec::read_fence(&f.file);
        let passed = deadline != 0 && flint_vmm_api::monotonic_us() / 1000 >= deadline;
        if passed != self.control.is_fenced() {
            self.control.set_fenced(passed);
            match passed {
                true => eprintln!("flint-vmm: fence: the deadline passed (its flintd stopped renewing): vCPUs held"),
                false => eprintln!("flint-vmm: fence: the deadline moved on: vCPUs released"),
            }
        }
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self, process_start: Instant) -> Result<(), BuildError> {
        {
            let mut t = lock(&self.timings);
            t.process_to_first_run_us = elapsed_us(process_start);
            t.first_run_clock_us = Some(flint_vmm_api::monotonic_us());
        }
        *lock(&self.first_run) = Some(Instant::now());
        for (fd, ctx) in self.pending_vcpus.drain(..) {
            let h = vcpu::spawn(fd, ctx).map_err(|e| BuildError::Runtime(format!("vCPU thread: {e}")))?;
            self.vcpu_threads.push(h);
        }
        Ok(())
    }

    /// Runs the device event loop until the VM exits or `stop` is set; then stops the vCPUs.
    pub fn run(&mut self, stop: &AtomicBool) -> ExitReason {
        loop {
            if stop.load(Ordering::Relaxed) {
                self.exit.set(ExitReason::Requested);
            }
            if let Some(reason) = self.exit.get() {
                self.shutdown();
                return reason;
            }
            let wait = if self.fence.is_some() { FENCE_CHECK.as_millis() as i32 } else { 100 };
            if let Err(e) = self.event_manager.run_with_timeout(wait) {
                self.exit.set(ExitReason::Failed { message: format!("device event loop failed: {e:?}") });
            }
            self.check_fence(false);
        }
    }

    fn shutdown(&mut self) {
        self.control.stop();
        let handles = std::mem::take(&mut self.vcpu_threads);
        let deadline = Instant::now() + Duration::from_secs(5);
        while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            self.control.stop();
            std::thread::sleep(Duration::from_millis(5));
        }
        // A vCPU that has not left KVM_RUN by now is left to process exit (which reclaims it);
        // joining it could block the shutdown forever.
        let (done, stuck): (Vec<_>, Vec<_>) = handles.into_iter().partition(|h| h.is_finished());
        vcpu::join_all(done);
        std::mem::forget(stuck);
        // Remove the vsock socket file so nothing is left behind.
        if let Some(v) = &self.config.vsock {
            let _ = std::fs::remove_file(&v.uds_path);
        }
    }

    /// A thread-safe view of this VM for the control API.
    pub fn handle(&self) -> VmmHandle {
        self.shared.clone()
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }
}

fn load_kernel(mem: &GuestMem, path: &Path) -> Result<(u64, u64), BuildError> {
    let mut f: File =
        flint_vmm_api::spec::open_host_file(path, false).map_err(|e| BuildError::KernelRead(path.to_path_buf(), e))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(|e| BuildError::KernelRead(path.to_path_buf(), e))?;
    if &magic != b"\x7fELF" {
        return Err(BuildError::KernelNotElf(path.to_path_buf()));
    }
    f.seek(SeekFrom::Start(0)).map_err(|e| BuildError::KernelRead(path.to_path_buf(), e))?;
    let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BuildError::KernelLoad(path.to_path_buf(), e))?;
    Ok((r.kernel_load.0, r.kernel_end))
}

fn load_initramfs(mem: &GuestMem, path: &Path, kernel_end: u64) -> Result<InitrdRegion, BuildError> {
    let mut data = Vec::new();
    flint_vmm_api::spec::open_host_file(path, false)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut data))
        .map_err(|e| BuildError::Initramfs(path.to_path_buf(), e))?;
    let size = data.len() as u64;
    let addr =
        arch::initrd_load_addr(mem, size, kernel_end).ok_or(BuildError::InitramfsTooBig(path.to_path_buf(), size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BuildError::Initramfs(path.to_path_buf(), std::io::Error::other(e.to_string())))?;
    Ok(InitrdRegion { addr, size })
}
