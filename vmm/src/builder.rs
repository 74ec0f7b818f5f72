//! Assembles a microVM from a [`VmConfig`]: KVM VM, memory, kernel, devices, vCPUs.
use crate::vstate::memory::GuestMem;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::{self as arch, cpuid, regs, InitrdRegion};
use crate::config::{mac_from_name, parse_mac, VmConfig};
use crate::devices::bus::lock;
use crate::devices::legacy::{I8042Device, SerialDevice, I8042_PORT, I8042_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN};
use crate::devices::virtio::mmio::{MmioSubscriber, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{block, net, rng, vsock, Interrupt, MmioTransport, VirtioDevice};
use crate::devices::Bus;
use crate::host::HostProfile;
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

/// Anonymous guest memory at `layout`, registered with a userfaultfd whose faults `source` serves (uffd and store
/// restore modes). `what` names the source in errors.
fn lazy_memory(
    layout: &[(u64, u64)],
    source: Arc<dyn crate::snapshot::uffd::PageSource>,
    what: &str,
    workers: usize,
    prefetch: &[u32],
) -> Result<GuestMem, BuildError> {
    use crate::snapshot::{memory as snapmem, uffd, RestoreError};
    let want: u64 = layout.iter().map(|r| r.1).sum();
    let have = source.size();
    if have != want {
        return Err(RestoreError::Memory(snapmem::MemFileError::Size { path: what.to_string(), have, want }).into());
    }
    let ranges: Vec<(GuestAddress, usize)> = layout.iter().map(|&(g, l)| (GuestAddress(g), l as usize)).collect();
    let mem = GuestMem::from_ranges(&ranges).map_err(|e| BuildError::Memory(memory::MemoryError::Map(e)))?;
    let mut off = 0;
    let mut uranges = Vec::new();
    for r in mem.iter() {
        uranges.push(uffd::Range { host: r.as_ptr() as u64, len: r.len(), file_offset: off });
        off += r.len();
    }
    *lock_source() = Some(source.clone());
    uffd::start(uranges, source, workers, prefetch, UFFD_STATS.clone()).map_err(RestoreError::from)?;
    Ok(mem)
}

/// The page source of a lazy restore (for its counters in `describe`).
static PAGE_SOURCE: Mutex<Option<Arc<dyn crate::snapshot::uffd::PageSource>>> = Mutex::new(None);

fn lock_source() -> std::sync::MutexGuard<'static, Option<Arc<dyn crate::snapshot::uffd::PageSource>>> {
    PAGE_SOURCE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fault-handler counters of this process's userfaultfd restore (one VM per process).
pub static UFFD_STATS: std::sync::LazyLock<Arc<crate::snapshot::uffd::UffdStats>> =
    std::sync::LazyLock::new(|| Arc::new(crate::snapshot::uffd::UffdStats::default()));

fn dirty_flag(config: &VmConfig) -> u32 {
    if config.track_dirty_pages {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    }
}

/// Time spent in each phase of building and booting, for `describe` and benchmarks.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BootTimings {
    pub kvm_setup_us: u64,
    pub memory_us: u64,
    pub kernel_load_us: u64,
    pub devices_us: u64,
    pub vcpus_us: u64,
    /// From process start to the first KVM_RUN.
    pub process_to_first_run_us: u64,
    /// From the first KVM_RUN to the kernel handing over to /init.
    pub first_run_to_init_us: Option<u64>,
}

/// A serial console writer that also notes when the kernel reaches /init.
struct ConsoleOut {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    init_seen: Arc<Mutex<Option<Instant>>>,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                if self.line.windows(INIT_MARKER.len()).any(|w| w == INIT_MARKER.as_bytes()) {
                    lock(&self.init_seen).get_or_insert_with(Instant::now);
                }
                self.line.clear();
            } else if self.line.len() < 512 {
                self.line.push(b);
            }
        }
        let r = self.out.write(buf);
        let _ = self.out.flush();
        r
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// One running (or ready to run) microVM.
pub struct Vmm {
    pub config: VmConfig,
    pub profile: HostProfile,
    pub cmdline: String,
    _kvm: Kvm,
    vm: Arc<VmFd>,
    pub mem: GuestMem,
    serial: Arc<Mutex<SerialDevice>>,
    pub restore_timings: Option<RestoreTimings>,
    /// The CPUID each vCPU was configured with (what a snapshot records and a restore sets:
    /// on some hosts KVM_GET_CPUID2 reports the hardware's, not what the VMM set).
    cpuids: Arc<Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>>,
    pub exit: Arc<VmExit>,
    pub control: Arc<VcpuControl>,
    pub stats: Vec<Arc<VcpuStats>>,
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    pub timings: Arc<Mutex<BootTimings>>,
    init_seen: Arc<Mutex<Option<Instant>>>,
    /// When the vCPUs first ran (shared with the handle, which derives boot timings from it).
    first_run: Arc<Mutex<Option<Instant>>>,
    event_manager: EventManager<Box<dyn MutEventSubscriber + Send>>,
    pending_vcpus: Vec<(VcpuFd, VcpuContext)>,
    vcpu_threads: Vec<JoinHandle<VcpuFd>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

/// Wakes the event loop when the VM exits.
struct ExitWatcher(Arc<VmExit>);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.evt.read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.0.evt, EventSet::IN));
    }
}

fn elapsed_us(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

/// Devices of a VM, wired to KVM and the buses.
struct Devices {
    pio: Bus,
    mmio: Bus,
    event_manager: EventManager<Box<dyn MutEventSubscriber + Send>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
    cmdline_devices: Vec<String>,
    root_dev: Option<(String, bool)>,
}

fn setup_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMem,
    exit: &Arc<VmExit>,
    init_seen: &Arc<Mutex<Option<Instant>>>,
    serial_state: Option<&crate::snapshot::SerialSnapshot>,
) -> Result<Devices, BuildError> {
    let mut pio = Bus::new();
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::DeviceIo(e.to_string()))?;
    vm.register_irqfd(&serial_evt, SERIAL_IRQ).map_err(|e| BuildError::Kvm("register the serial irqfd", e))?;
    let console_out: Box<dyn Write + Send> = match config.console.as_str() {
        "stdout" => Box::new(std::io::stdout()),
        "off" => Box::new(std::io::sink()),
        path => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| BuildError::Console(path.into(), e))?,
        ),
    };
    let console = ConsoleOut { out: console_out, line: Vec::new(), init_seen: init_seen.clone() };
    let serial = match serial_state {
        None => SerialDevice::new(serial_evt, Box::new(console)),
        Some(st) => SerialDevice::from_state(&st.into(), serial_evt, Box::new(console))
            .map_err(|e| BuildError::DeviceIo(format!("serial state: {e:?}")))?,
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(SERIAL_PORT, SERIAL_PORT_LEN, serial.clone()).map_err(|e| BuildError::DeviceIo(e.to_string()))?;
    pio.insert(I8042_PORT, I8042_PORT_LEN, Arc::new(Mutex::new(I8042Device::new(exit.clone()))))
        .map_err(|e| BuildError::DeviceIo(e.to_string()))?;

    // virtio devices: drives first so that they are vda, vdb, ... in config order.
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut root_dev = None;
    for (i, d) in config.drives.iter().enumerate() {
        let letter = (b'a' + i as u8) as char;
        virtio.push(Box::new(block::Block::open(&d.path, d.read_only, &format!("flint-vd{letter}"))?));
        if d.root {
            root_dev = Some((format!("/dev/vd{letter}"), d.read_only));
        }
    }
    if let Some(n) = &config.net {
        let tap = net::tap::open_tap(&n.tap, n.netns.as_deref())?;
        let mac = n.mac.as_deref().and_then(parse_mac).unwrap_or_else(|| mac_from_name(&n.tap));
        virtio.push(Box::new(net::Net::new(tap, &n.tap, mac)));
    }
    if let Some(v) = &config.vsock {
        virtio.push(Box::new(vsock::Vsock::new(v.guest_cid, &v.uds_path)?));
    }
    if config.rng {
        virtio.push(Box::new(rng::Rng::new()));
    }

    let mut mmio = Bus::new();
    let mut event_manager: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| BuildError::Runtime(format!("event manager: {e:?}")))?;
    let mut transports = Vec::new();
    let mut cmdline_devices = Vec::new();
    for (i, dev) in virtio.into_iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let irq_line = VIRTIO_IRQ_BASE + i as u32;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::DeviceIo(e.to_string()))?;
        vm.register_irqfd(&irqfd, irq_line).map_err(|e| BuildError::Kvm("register a virtio irqfd", e))?;
        let transport = MmioTransport::new(dev, mem.clone(), Arc::new(Interrupt::new(irqfd)))
            .map_err(|e| BuildError::DeviceIo(e.to_string()))?;
        for (q, evt) in transport.queue_evts.iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), q as u32)
                .map_err(|e| BuildError::Kvm("register a queue ioeventfd", e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone()).map_err(|e| BuildError::DeviceIo(e.to_string()))?;
        cmdline_devices.push(format!("virtio_mmio.device=4K@{base:#x}:{irq_line}"));
        transports.push(transport);
    }
    // Subscribers are added after any restore of transport state (see `finish_devices`).
    event_manager.add_subscriber(Box::new(ExitWatcher(exit.clone())));
    Ok(Devices { pio, mmio, event_manager, transports, serial, cmdline_devices, root_dev })
}

/// Registers every transport with the event loop (after their state is final).
fn finish_devices(d: &mut Devices) {
    for t in &d.transports {
        d.event_manager.add_subscriber(Box::new(MmioSubscriber(t.clone())));
    }
}

/// What a restore may change about the snapshot's configuration.
#[derive(Clone, Debug, Default)]
pub struct RestoreOverrides {
    pub vsock_uds: Option<PathBuf>,
    pub console: Option<String>,
    pub net: Option<crate::config::NetConfig>,
    /// Replaces the drives' paths, in order (same count as the snapshot's drives).
    pub drive_paths: Option<Vec<PathBuf>>,
    pub track_dirty_pages: Option<bool>,
    /// The memory file is the diff's base with the diff merged onto it.
    pub merged_memory: bool,
}

/// Timings of a restore, for `describe` and benchmarks.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreTimings {
    pub read_state_us: u64,
    pub kvm_setup_us: u64,
    pub memory_us: u64,
    pub devices_us: u64,
    pub vm_state_us: u64,
    pub vcpu_state_us: u64,
    pub mode: Option<crate::snapshot::memory::RestoreMode>,
}

impl Vmm {
    /// Builds the VM; vCPUs are created but not started (see [`Vmm::start`]).
    pub fn build(config: VmConfig, profile: HostProfile, process_start: Instant) -> Result<Self, BuildError> {
        config.validate()?;
        let mut timings = BootTimings::default();
        vcpu::install_kick_handler().map_err(|e| BuildError::Runtime(format!("signal handler: {e}")))?;

        let t = Instant::now();
        let kvm = vm::open_kvm()?;
        let vm = vm::create_vm(&kvm)?;
        timings.kvm_setup_us = elapsed_us(t);

        let t = Instant::now();
        let mem = memory::create_anonymous(config.mem_mib)?;
        vm::register_memory(&vm, &mem, dirty_flag(&config))?;
        timings.memory_us = elapsed_us(t);

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
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| BuildError::Kvm("read supported CPUID", e))?;
        let mut fds = Vec::new();
        let mut cpuids = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm.create_vcpu(u64::from(i)).map_err(|e| BuildError::Kvm("create a vCPU", e))?;
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
        Ok(Self::assemble(
            config,
            profile,
            cmdline_str,
            kvm,
            vm,
            mem,
            exit,
            init_seen,
            devices,
            fds,
            cpuids,
            timings,
            None,
        ))
    }

    /// Restores a VM from a snapshot into this (new) process; vCPUs start with [`Vmm::start`].
    pub fn restore(
        state_path: &std::path::Path,
        mem_path: &std::path::Path,
        mode: crate::snapshot::memory::RestoreMode,
        overrides: RestoreOverrides,
        process_start: Instant,
    ) -> Result<Self, BuildError> {
        use crate::snapshot::{cpu, memory as snapmem, uffd, RestoreError};
        let mut rt = RestoreTimings { mode: Some(mode), ..Default::default() };
        vcpu::install_kick_handler().map_err(|e| BuildError::Runtime(format!("signal handler: {e}")))?;

        let t = Instant::now();
        let snap = crate::snapshot::read_state(state_path)?;
        if snap.memory_is_diff && !overrides.merged_memory {
            return Err(RestoreError::DiffMemory.into());
        }
        if let Some(w) = crate::host::snapshot_warning(snap.host_profile, &snap.cmdline) {
            eprintln!("flint-vmm: warning: {w}");
        }
        let mut config = snap.config.clone();
        if let Some(u) = overrides.vsock_uds {
            match config.vsock.as_mut() {
                Some(v) => v.uds_path = u,
                None => {
                    return Err(RestoreError::Devices(
                        "a vsock socket was given but the snapshot has no vsock device".into(),
                    )
                    .into())
                }
            }
        }
        if let Some(c) = overrides.console {
            config.console = c;
        }
        if let Some(n) = overrides.net {
            if config.net.is_none() {
                return Err(
                    RestoreError::Devices("a tap was given but the snapshot has no network device".into()).into()
                );
            }
            config.net = Some(n);
        }
        if let Some(paths) = overrides.drive_paths {
            if paths.len() != config.drives.len() {
                return Err(RestoreError::Devices(format!(
                    "{} drive paths given, the snapshot has {} drives",
                    paths.len(),
                    config.drives.len()
                ))
                .into());
            }
            for (d, p) in config.drives.iter_mut().zip(paths) {
                d.path = p;
            }
        }
        if let Some(track) = overrides.track_dirty_pages {
            config.track_dirty_pages = track;
        }
        for d in &config.drives {
            if !d.path.is_file() {
                return Err(crate::config::ConfigError::MissingFile(d.path.clone()).into());
            }
        }
        rt.read_state_us = elapsed_us(t);

        let t = Instant::now();
        let kvm = vm::open_kvm()?;
        cpu::check_host_cpu(&kvm, &snap.cpu, snap.config.vcpus).map_err(RestoreError::from)?;
        let vm = vm::create_vm(&kvm)?;
        rt.kvm_setup_us = elapsed_us(t);

        let t = Instant::now();
        let mem = match mode {
            snapmem::RestoreMode::Private => {
                snapmem::map_private(mem_path, &snap.memory_layout).map_err(RestoreError::from)?
            }
            snapmem::RestoreMode::Uffd => {
                let f = std::fs::File::open(mem_path).map_err(|e| {
                    RestoreError::Memory(snapmem::MemFileError::Read(mem_path.display().to_string(), e))
                })?;
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                let source = Arc::new(uffd::FileSource { file: f, unit: UFFD_CHUNK, size });
                lazy_memory(&snap.memory_layout, source, &mem_path.display().to_string(), 1, &[])?
            }
            snapmem::RestoreMode::Store => {
                let (source, scfg) = crate::snapshot::store_source::StoreSource::open(mem_path)
                    .map_err(|e| RestoreError::Memory(snapmem::MemFileError::Store(e)))?;
                let what = format!("snapshot {} image {}", scfg.snapshot, scfg.image);
                lazy_memory(&snap.memory_layout, Arc::new(source), &what, scfg.workers, &scfg.prefetch)?
            }
        };
        vm::register_memory(&vm, &mem, dirty_flag(&config))?;
        rt.memory_us = elapsed_us(t);

        let t = Instant::now();
        let exit = Arc::new(VmExit::new().map_err(|e| BuildError::Runtime(e.to_string()))?);
        let init_seen = Arc::new(Mutex::new(None));
        let mut devices = setup_devices(&config, &vm, &mem, &exit, &init_seen, Some(&snap.serial))?;
        if devices.transports.len() != snap.devices.len() {
            return Err(RestoreError::Devices(format!(
                "{} devices configured, {} saved",
                devices.transports.len(),
                snap.devices.len()
            ))
            .into());
        }
        for (t, s) in devices.transports.iter().zip(&snap.devices) {
            lock(t).restore_state(s).map_err(RestoreError::Devices)?;
        }
        finish_devices(&mut devices);
        rt.devices_us = elapsed_us(t);

        let t = Instant::now();
        cpu::restore_vm(&vm, &snap.vm).map_err(RestoreError::from)?;
        rt.vm_state_us = elapsed_us(t);

        let t = Instant::now();
        let mut fds = Vec::new();
        for (i, s) in snap.vcpus.iter().enumerate() {
            let fd = vm.create_vcpu(i as u64).map_err(|e| BuildError::Kvm("create a vCPU", e))?;
            cpu::restore_vcpu(&fd, s).map_err(RestoreError::from)?;
            fds.push(fd);
        }
        rt.vcpu_state_us = elapsed_us(t);
        let timings = BootTimings { process_to_first_run_us: elapsed_us(process_start), ..Default::default() };
        let cpuids = snap.vcpus.iter().map(|v| v.cpuid.clone()).collect();
        Ok(Self::assemble(
            config,
            snap.host_profile,
            snap.cmdline.clone(),
            kvm,
            vm,
            mem,
            exit,
            init_seen,
            devices,
            fds,
            cpuids,
            timings,
            Some(rt),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
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
    ) -> Self {
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
        Vmm {
            config,
            profile,
            cmdline,
            _kvm: kvm,
            vm: Arc::new(vm),
            mem,
            exit,
            control,
            stats,
            devices: devices.transports,
            serial: devices.serial,
            timings: Arc::new(Mutex::new(timings)),
            restore_timings: restore,
            cpuids: Arc::new(cpuids),
            init_seen,
            first_run: Arc::new(Mutex::new(None)),
            event_manager: devices.event_manager,
            pending_vcpus,
            vcpu_threads: Vec::new(),
            pio,
            mmio,
        }
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self, process_start: Instant) -> Result<(), BuildError> {
        lock(&self.timings).process_to_first_run_us = elapsed_us(process_start);
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
            if let Err(e) = self.event_manager.run_with_timeout(100) {
                self.exit.set(ExitReason::Failed { message: format!("device event loop failed: {e:?}") });
            }
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
        vcpu::join_all(&self.control, done);
        std::mem::forget(stuck);
        // Remove the vsock socket file so nothing is left behind.
        if let Some(v) = &self.config.vsock {
            let _ = std::fs::remove_file(&v.uds_path);
        }
    }

    /// A thread-safe view of this VM for the control API.
    pub fn handle(&self) -> VmmHandle {
        VmmHandle {
            config: self.config.clone(),
            profile: self.profile,
            cmdline: self.cmdline.clone(),
            exit: self.exit.clone(),
            control: self.control.clone(),
            stats: self.stats.clone(),
            devices: self.devices.clone(),
            timings: self.timings.clone(),
            init_seen: self.init_seen.clone(),
            first_run: self.first_run.clone(),
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            vm: self.vm.clone(),
            mem: self.mem.clone(),
            serial: self.serial.clone(),
            restore_timings: self.restore_timings.clone(),
            cpuids: self.cpuids.clone(),
            snapshot_lock: Arc::new(Mutex::new(())),
        }
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }
}

fn load_kernel(mem: &GuestMem, path: &PathBuf) -> Result<(u64, u64), BuildError> {
    let mut f = File::open(path).map_err(|e| BuildError::KernelRead(path.clone(), e))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(|e| BuildError::KernelRead(path.clone(), e))?;
    if &magic != b"\x7fELF" {
        return Err(BuildError::KernelNotElf(path.clone()));
    }
    f.seek(SeekFrom::Start(0)).map_err(|e| BuildError::KernelRead(path.clone(), e))?;
    let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BuildError::KernelLoad(path.clone(), e))?;
    Ok((r.kernel_load.0, r.kernel_end))
}

fn load_initramfs(mem: &GuestMem, path: &PathBuf, kernel_end: u64) -> Result<InitrdRegion, BuildError> {
    let data = std::fs::read(path).map_err(|e| BuildError::Initramfs(path.clone(), e))?;
    let size = data.len() as u64;
    let addr = arch::initrd_load_addr(mem, size, kernel_end).ok_or(BuildError::InitramfsTooBig(path.clone(), size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BuildError::Initramfs(path.clone(), std::io::Error::other(e.to_string())))?;
    Ok(InitrdRegion { addr, size })
}

/// What the control API needs of a running VM (all shared, thread-safe).
#[derive(Clone)]
pub struct VmmHandle {
    pub config: VmConfig,
    pub profile: HostProfile,
    pub cmdline: String,
    pub exit: Arc<VmExit>,
    pub control: Arc<VcpuControl>,
    stats: Vec<Arc<VcpuStats>>,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    timings: Arc<Mutex<BootTimings>>,
    init_seen: Arc<Mutex<Option<Instant>>>,
    first_run: Arc<Mutex<Option<Instant>>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    vm: Arc<VmFd>,
    mem: GuestMem,
    serial: Arc<Mutex<SerialDevice>>,
    restore_timings: Option<RestoreTimings>,
    cpuids: Arc<Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>>,
    snapshot_lock: Arc<Mutex<()>>,
}

impl VmmHandle {
    /// Pauses the VM, writes a snapshot (state file + memory file) and resumes it unless asked
    /// not to. Devices are held still for the duration, so memory and queue state agree.
    pub fn snapshot(
        &self,
        req: &crate::snapshot::SnapshotRequest,
    ) -> Result<crate::snapshot::SnapshotReport, crate::snapshot::SnapshotError> {
        use crate::snapshot::{cpu, memory as snapmem, SnapshotError, SnapshotKind, SnapshotReport, SnapshotState};
        let _one_at_a_time = lock(&self.snapshot_lock);
        if self.exit.get().is_some() {
            return Err(SnapshotError::NotRunning);
        }
        if req.kind == SnapshotKind::Diff && !self.config.track_dirty_pages {
            return Err(SnapshotError::NoDirtyTracking);
        }
        let total = Instant::now();
        let mut report =
            SnapshotReport { guest_memory_bytes: self.mem.iter().map(|r| r.len()).sum(), ..Default::default() };
        let was_paused = self.control.is_paused();
        let t = Instant::now();
        self.control.pause();
        report.pause_us = elapsed_us(t);
        let result = (|| -> Result<(), SnapshotError> {
            // Hold every device still: no queue processing may touch guest memory meanwhile.
            let guards: Vec<_> = self.devices.iter().map(|d| lock(d)).collect();
            let t = Instant::now();
            let mut vcpus = self.control.save_states(self.stats.len()).map_err(SnapshotError::Vcpus)?;
            for (v, c) in vcpus.iter_mut().zip(self.cpuids.iter()) {
                v.cpuid = c.clone();
            }
            let vm = cpu::save_vm(&self.vm)?;
            let devices = guards.iter().map(|g| g.save_state()).collect();
            let serial = lock(&self.serial).serial.state().into();
            let state = SnapshotState {
                created_unix_ms: crate::snapshot::now_unix_ms(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                host_profile: self.profile,
                cpu: cpu::cpu_identity(vcpus.first().map(|v| v.cpuid.as_slice()).unwrap_or(&[])),
                config: self.config.clone(),
                cmdline: self.cmdline.clone(),
                memory_layout: snapmem::layout(&self.mem),
                memory_is_diff: req.kind == SnapshotKind::Diff,
                vm,
                vcpus,
                devices,
                serial,
            };
            report.save_state_us = elapsed_us(t);
            let t = Instant::now();
            report.state_bytes = crate::snapshot::write_state(&state, &req.state_path)?;
            report.write_state_us = elapsed_us(t);
            let t = Instant::now();
            report.memory = match req.kind {
                SnapshotKind::Full => {
                    let st = snapmem::write_full(&self.mem, &req.mem_path)?;
                    if self.config.track_dirty_pages {
                        snapmem::clear_dirty_log(&self.vm, &self.mem)?;
                    }
                    st
                }
                SnapshotKind::Diff => snapmem::write_diff(&self.vm, &self.mem, &req.mem_path)?,
            };
            report.write_memory_us = elapsed_us(t);
            drop(guards);
            Ok(())
        })();
        if req.resume && !was_paused {
            self.control.resume();
        }
        result?;
        report.total_us = elapsed_us(total);
        Ok(report)
    }

    /// JSON description for the control API.
    pub fn describe(&self) -> serde_json::Value {
        let mut timings = lock(&self.timings).clone();
        if let (Some(first), Some(init)) = (*lock(&self.first_run), *lock(&self.init_seen)) {
            timings.first_run_to_init_us = Some(init.saturating_duration_since(first).as_micros() as u64);
        }
        let devices: Vec<serde_json::Value> = self.devices.iter().map(|d| lock(d).describe()).collect();
        let vcpus: Vec<serde_json::Value> = self
            .stats
            .iter()
            .map(|s| {
                serde_json::json!({
                    "exits": s.exits.load(Ordering::Relaxed),
                    "pio_exits": s.pio.load(Ordering::Relaxed),
                    "mmio_exits": s.mmio.load(Ordering::Relaxed),
                })
            })
            .collect();
        let state = match (self.exit.get(), self.control.is_paused()) {
            (Some(_), _) => "exited",
            (None, true) => "paused",
            (None, false) => "running",
        };
        serde_json::json!({
            "state": state,
            "exit": self.exit.get(),
            "host_profile": self.profile.name(),
            "config": self.config,
            "cmdline": self.cmdline,
            "timings": timings,
            "vcpus": vcpus,
            "devices": devices,
            "unhandled_pio": self.pio.unhandled.load(Ordering::Relaxed),
            "unhandled_mmio": self.mmio.unhandled.load(Ordering::Relaxed),
            "restore": self.restore_timings,
            "uffd": lock_source().as_ref().map(|source| {
                let u = &*UFFD_STATS;
                serde_json::json!({
                    "faults": u.faults.load(Ordering::Relaxed),
                    "pages_copied": u.pages_copied.load(Ordering::Relaxed),
                    "zero_pages": u.zero_pages.load(Ordering::Relaxed),
                    "bytes_read": u.bytes_read.load(Ordering::Relaxed),
                    "handler_us": u.handler_ns.load(Ordering::Relaxed) / 1000,
                    "failed": u.failed.load(Ordering::Relaxed),
                    "prefetched_units": u.prefetched.load(Ordering::Relaxed),
                    "unit_bytes": u.unit.load(Ordering::Relaxed),
                    "touched_units": *u.touched.lock().unwrap_or_else(|p| p.into_inner()),
                    "source": source.stats(),
                })
            }),
            "rss_kib": rss_kib(),
        })
    }
}

/// This process's resident set size (VmRSS), for memory-sharing checks.
pub fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
