//! Assembles a microVM from a [`VmConfig`]: KVM VM, memory, kernel, devices, vCPUs.
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
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::{self as arch, cpuid, regs, InitrdRegion};
use crate::config::{mac_from_name, parse_mac, VmConfig};
use crate::devices::bus::lock;
use crate::devices::legacy::{
    I8042Device, SerialDevice, I8042_PORT, I8042_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN,
};
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
                if self
                    .line
                    .windows(INIT_MARKER.len())
                    .any(|w| w == INIT_MARKER.as_bytes())
                {
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
    vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub exit: Arc<VmExit>,
    pub control: Arc<VcpuControl>,
    pub stats: Vec<Arc<VcpuStats>>,
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    pub timings: Arc<Mutex<BootTimings>>,
    init_seen: Arc<Mutex<Option<Instant>>>,
    first_run: Option<Instant>,
    first_run_shared: Arc<Mutex<Option<Instant>>>,
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

impl Vmm {
    /// Builds the VM; vCPUs are created but not started (see [`Vmm::start`]).
    pub fn build(
        config: VmConfig,
        profile: HostProfile,
        process_start: Instant,
    ) -> Result<Self, BuildError> {
        config.validate()?;
        let mut timings = BootTimings::default();
        vcpu::install_kick_handler()
            .map_err(|e| BuildError::Runtime(format!("signal handler: {e}")))?;

        let t = Instant::now();
        let kvm = vm::open_kvm()?;
        let vm = vm::create_vm(&kvm)?;
        timings.kvm_setup_us = elapsed_us(t);

        let t = Instant::now();
        let mem = memory::create_anonymous(config.mem_mib)?;
        vm::register_memory(&vm, &mem, 0)?;
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
        let mut pio = Bus::new();
        let serial_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::DeviceIo(e.to_string()))?;
        vm.register_irqfd(&serial_evt, SERIAL_IRQ)
            .map_err(|e| BuildError::Kvm("register the serial irqfd", e))?;
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
        let console = ConsoleOut {
            out: console_out,
            line: Vec::new(),
            init_seen: init_seen.clone(),
        };
        pio.insert(
            SERIAL_PORT,
            SERIAL_PORT_LEN,
            Arc::new(Mutex::new(SerialDevice::new(serial_evt, Box::new(console)))),
        )
        .map_err(|e| BuildError::DeviceIo(e.to_string()))?;
        pio.insert(
            I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042Device::new(exit.clone()))),
        )
        .map_err(|e| BuildError::DeviceIo(e.to_string()))?;

        // virtio devices: drives first so that they are vda, vdb, ... in config order.
        let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
        let mut root_dev = None;
        for (i, d) in config.drives.iter().enumerate() {
            virtio.push(Box::new(block::Block::open(
                &d.path,
                d.read_only,
                &format!("flint-vd{}", (b'a' + i as u8) as char),
            )?));
            if d.root {
                root_dev = Some((format!("/dev/vd{}", (b'a' + i as u8) as char), d.read_only));
            }
        }
        if let Some(n) = &config.net {
            let tap = net::tap::open_tap(&n.tap, n.netns.as_deref())?;
            let mac = n
                .mac
                .as_deref()
                .and_then(parse_mac)
                .unwrap_or_else(|| mac_from_name(&n.tap));
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
            EventManager::new()
                .map_err(|e| BuildError::Runtime(format!("event manager: {e:?}")))?;
        let mut devices = Vec::new();
        let mut cmdline_devices = Vec::new();
        for (i, dev) in virtio.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let irq_line = VIRTIO_IRQ_BASE + i as u32;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| BuildError::DeviceIo(e.to_string()))?;
            vm.register_irqfd(&irqfd, irq_line)
                .map_err(|e| BuildError::Kvm("register a virtio irqfd", e))?;
            let transport = MmioTransport::new(dev, mem.clone(), Arc::new(Interrupt::new(irqfd)))
                .map_err(|e| BuildError::DeviceIo(e.to_string()))?;
            for (q, evt) in transport.queue_evts.iter().enumerate() {
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(|e| BuildError::Kvm("register a queue ioeventfd", e))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())
                .map_err(|e| BuildError::DeviceIo(e.to_string()))?;
            event_manager.add_subscriber(Box::new(MmioSubscriber(transport.clone())));
            cmdline_devices.push(format!("virtio_mmio.device=4K@{base:#x}:{irq_line}"));
            devices.push(transport);
        }
        event_manager.add_subscriber(Box::new(ExitWatcher(exit.clone())));
        timings.devices_us = elapsed_us(t);

        // Command line: base, root, host quirks, devices, user additions.
        let mut parts: Vec<String> = vec![BASE_CMDLINE.into()];
        if let Some((dev, ro)) = &root_dev {
            parts.push(format!("root={dev} {}", if *ro { "ro" } else { "rw" }));
        }
        let quirks = profile.cmdline_extra();
        if !quirks.is_empty() {
            parts.push(quirks.into());
        }
        parts.extend(cmdline_devices);
        if !config.cmdline_extra.trim().is_empty() {
            parts.push(config.cmdline_extra.trim().into());
        }
        let cmdline_str = parts.join(" ");
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
        cmdline
            .insert_str(&cmdline_str)
            .map_err(BuildError::Cmdline)?;
        load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)
            .map_err(BuildError::CmdlineLoad)?;
        arch::configure_system(&mem, cmdline_str.len() + 1, initrd, config.vcpus)?;
        regs::write_boot_tables(&mem)?;

        let t = Instant::now();
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| BuildError::Kvm("read supported CPUID", e))?;
        let control = Arc::new(VcpuControl::new());
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut pending_vcpus = Vec::new();
        let mut stats = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(|e| BuildError::Kvm("create a vCPU", e))?;
            let mut c = supported.clone();
            cpuid::normalize(&mut c, i, config.vcpus);
            fd.set_cpuid2(&c)
                .map_err(|e| BuildError::Kvm("set CPUID", e))?;
            regs::setup_msrs(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lint(&fd)?;
            if i == 0 {
                regs::setup_boot_vcpu(&fd, entry)?;
            }
            let s = Arc::new(VcpuStats::default());
            stats.push(s.clone());
            let ctx = VcpuContext {
                index: i,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                control: control.clone(),
                mem: mem.clone(),
                stats: s,
            };
            pending_vcpus.push((fd, ctx));
        }
        timings.vcpus_us = elapsed_us(t);
        timings.process_to_first_run_us = elapsed_us(process_start);

        Ok(Vmm {
            config,
            profile,
            cmdline: cmdline_str,
            _kvm: kvm,
            vm,
            mem,
            exit,
            control,
            stats,
            devices,
            timings: Arc::new(Mutex::new(timings)),
            init_seen,
            first_run: None,
            first_run_shared: Arc::new(Mutex::new(None)),
            event_manager,
            pending_vcpus,
            vcpu_threads: Vec::new(),
            pio,
            mmio,
        })
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self, process_start: Instant) -> Result<(), BuildError> {
        lock(&self.timings).process_to_first_run_us = elapsed_us(process_start);
        self.first_run = Some(Instant::now());
        *lock(&self.first_run_shared) = self.first_run;
        for (fd, ctx) in self.pending_vcpus.drain(..) {
            let h = vcpu::spawn(fd, ctx)
                .map_err(|e| BuildError::Runtime(format!("vCPU thread: {e}")))?;
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
                self.exit.set(ExitReason::Failed {
                    message: format!("device event loop failed: {e:?}"),
                });
            }
            self.note_init();
        }
    }

    fn note_init(&self) {
        if let (Some(first), Some(init)) = (self.first_run, *lock(&self.init_seen)) {
            let mut t = lock(&self.timings);
            if t.first_run_to_init_us.is_none() {
                t.first_run_to_init_us =
                    Some(init.saturating_duration_since(first).as_micros() as u64);
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
        vcpu::join_all(&self.control, handles);
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
            first_run: self.first_run_shared.clone(),
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
        }
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }
}

fn load_kernel(mem: &GuestMemoryMmap, path: &PathBuf) -> Result<(u64, u64), BuildError> {
    let mut f = File::open(path).map_err(|e| BuildError::KernelRead(path.clone(), e))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|e| BuildError::KernelRead(path.clone(), e))?;
    if &magic != b"\x7fELF" {
        return Err(BuildError::KernelNotElf(path.clone()));
    }
    f.seek(SeekFrom::Start(0))
        .map_err(|e| BuildError::KernelRead(path.clone(), e))?;
    let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BuildError::KernelLoad(path.clone(), e))?;
    Ok((r.kernel_load.0, r.kernel_end))
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &PathBuf,
    kernel_end: u64,
) -> Result<InitrdRegion, BuildError> {
    let data = std::fs::read(path).map_err(|e| BuildError::Initramfs(path.clone(), e))?;
    let size = data.len() as u64;
    let addr = arch::initrd_load_addr(mem, size, kernel_end)
        .ok_or(BuildError::InitramfsTooBig(path.clone(), size))?;
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
}

impl VmmHandle {
    /// JSON description for the control API.
    pub fn describe(&self) -> serde_json::Value {
        let mut timings = lock(&self.timings).clone();
        if let (Some(first), Some(init)) = (*lock(&self.first_run), *lock(&self.init_seen)) {
            timings.first_run_to_init_us =
                Some(init.saturating_duration_since(first).as_micros() as u64);
        }
        let devices: Vec<serde_json::Value> =
            self.devices.iter().map(|d| lock(d).describe()).collect();
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
        })
    }
}
