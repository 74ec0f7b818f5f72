//! The devices of a VM: the legacy PIO devices (UART, i8042 reset line), the virtio-mmio devices in id order
//! (drives `vda`.., `net0`, `vsock0`, `rng0`, `balloon0`), their irqfds and ioeventfds, and the device event loop.
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::*;
use crate::builder::{BuildError, INIT_MARKER};
use crate::config::{mac_from_name, parse_mac, VmConfig};
use crate::devices::bus::lock;
use crate::devices::legacy::{I8042Device, SerialDevice, I8042_PORT, I8042_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN};
use crate::devices::virtio::mmio::{MmioSubscriber, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{balloon, block, net, rng, vsock, Interrupt, MmioTransport, VirtioDevice};
use crate::devices::Bus;
use crate::vstate::memory::GuestMem;
use crate::vstate::vcpu::VmExit;

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

/// The console file, capped: when it would pass half the limit it becomes `<path>.1` (replacing the previous
/// one) and a new file starts, so the two hold at most `limit` bytes and the newest output is always kept.
pub(crate) struct RotatingFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    size: u64,
    half: u64,
}

impl RotatingFile {
    pub(crate) fn open(path: &std::path::Path, limit: u64) -> std::io::Result<RotatingFile> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        let half = limit.max(flint_vmm_api::config::MIN_CONSOLE_LIMIT) / 2;
        let mut f = RotatingFile { path: path.to_path_buf(), file, size, half };
        if f.size > f.half {
            f.rotate()?;
        }
        Ok(f)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size + buf.len() as u64 > self.half && self.size > 0 {
            self.rotate()?;
        }
        // A single write larger than a half keeps only what fits (the serial port writes a byte at a time).
        let n = buf.len().min(self.half as usize);
        self.file.write_all(&buf[..n])?;
        self.size += n as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
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

/// Devices of a VM, wired to KVM and the buses.
pub(crate) struct Devices {
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) event_manager: EventManager<Box<dyn MutEventSubscriber + Send>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// Device ids, in `transports` order.
    pub(crate) ids: Vec<String>,
    pub(crate) cmdline_devices: Vec<String>,
    pub(crate) root_dev: Option<(String, bool)>,
}

pub(crate) fn setup_devices(
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
            RotatingFile::open(std::path::Path::new(path), config.console_limit_bytes)
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
        let dev = block::Block::open(&d.path, d.read_only, &format!("flint-vd{letter}"))?
            .with_limiter(d.rate_limiter.as_ref())?;
        virtio.push(Box::new(dev));
        if d.root {
            root_dev = Some((format!("/dev/vd{letter}"), d.read_only));
        }
    }
    if let Some(n) = &config.net {
        let mac = n.mac.as_deref().and_then(parse_mac).unwrap_or_else(|| mac_from_name(&n.tap));
        let dev = if let Some(fd) = n.inherited_fd() {
            let fd = fd.map_err(BuildError::DeviceIo)?;
            net::Net::new(net::tap::adopt_tap(fd, &n.tap)?, &n.tap, mac)
        } else if n.is_detached() {
            net::Net::detached(mac)?
        } else {
            net::Net::new(net::tap::open_tap(&n.tap, n.netns.as_deref())?, &n.tap, mac)
        };
        let dev = dev
            .with_limiters(n.rx_rate_limiter.as_ref(), n.tx_rate_limiter.as_ref())
            .map_err(|e| BuildError::DeviceIo(format!("net rate limiter: {e}")))?;
        virtio.push(Box::new(dev));
    }
    if let Some(v) = &config.vsock {
        virtio.push(Box::new(vsock::Vsock::new(v.guest_cid, &v.uds_path)?));
    }
    if config.rng {
        virtio.push(Box::new(rng::Rng::new()));
    }
    if config.balloon {
        virtio.push(Box::new(balloon::Balloon::new()));
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
    let ids = crate::snapshot::device_ids(config);
    debug_assert_eq!(ids.len(), transports.len());
    Ok(Devices { pio, mmio, event_manager, transports, serial, ids, cmdline_devices, root_dev })
}

/// Registers every transport with the event loop (after their state is final).
pub(crate) fn finish_devices(d: &mut Devices) {
    for t in &d.transports {
        d.event_manager.add_subscriber(Box::new(MmioSubscriber(t.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_file_rotates_within_its_limit() {
        let dir = std::env::temp_dir().join(format!("flint-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut f = RotatingFile::open(&path, 16384).unwrap();
        // A guest writing a byte at a time, far past the limit.
        for i in 0..100_000u32 {
            f.write_all(&[b'a' + (i % 26) as u8]).unwrap();
        }
        let now = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.join("console.log.1")).unwrap().len();
        assert!(now <= 8192 && old <= 8192 && now + old > 8192, "{now} + {old}");
        // The newest output is kept: the last byte written ends the current file.
        let text = std::fs::read(&path).unwrap();
        assert_eq!(*text.last().unwrap(), b'a' + (99_999 % 26) as u8);
        // Reopened (a restored VM appending to an existing file) it stays within the limit too.
        drop(f);
        let mut f = RotatingFile::open(&path, 16384).unwrap();
        f.write_all(&[b'x'; 9000]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 8192);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
