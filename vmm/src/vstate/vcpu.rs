//! vCPU threads: the KVM_RUN loop, exit dispatch to the buses, signal kicks for pause/stop.
use crate::vstate::memory::GuestMem;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::translate_gva;
use crate::devices::bus::lock;
use crate::devices::Bus;
use crate::snapshot::cpu::{readable_msrs, save_vcpu};
use crate::snapshot::VcpuState;

pub use flint_vmm_api::describe::ExitReason;

/// How long the VMM may take to shut down after its VM stopped.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

/// The first exit reason wins; the event wakes the main loop.
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    pub evt: EventFd,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { reason: Mutex::new(None), evt: EventFd::new(libc::EFD_NONBLOCK)? })
    }

    pub fn set(&self, reason: ExitReason) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            let code = reason.exit_code();
            *r = Some(reason);
            let _ = self.evt.write(1);
            // Safety net: the process exits within SHUTDOWN_GRACE of its VM stopping, even if
            // a vCPU never leaves KVM_RUN or a device never lets go (seen under heavy load on
            // emulating hosts). The normal path is much faster and exits first.
            let _ = std::thread::Builder::new().name("exit-watchdog".into()).spawn(move || {
                std::thread::sleep(SHUTDOWN_GRACE);
                eprintln!("flint-vmm: the VM stopped but the VMM did not finish shutting down within {SHUTDOWN_GRACE:?}; exiting");
                std::process::exit(code);
            });
        }
    }

    pub fn get(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    want: Want,
    /// Held by the fence (its deadline passed): parked as if paused, whatever the API asked.
    fenced: bool,
    paused: usize,
    running_threads: usize,
    /// Bumped to ask every parked vCPU to save its state into `saved`.
    save_gen: u64,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// Shared run/pause/stop control of all vCPU threads of one VM.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cv: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl VcpuControl {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(ControlState {
                want: Want::Run,
                fenced: false,
                paused: 0,
                running_threads: 0,
                save_gen: 0,
                saved: Vec::new(),
            }),
            cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            // SAFETY: `t` is a running vCPU thread: each thread removes itself from this list, under
            // this lock, before it returns, so no entry names an ended or joined thread. The
            // signal's handler only sets `immediate_exit` in that thread's kvm_run.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Stops every vCPU at an instruction boundary with pending I/O completed; returns once all
    /// running vCPU threads are parked.
    pub fn pause(&self) {
        let mut s = lock(&self.state);
        if s.want == Want::Run {
            s.want = Want::Pause;
        }
        drop(s);
        self.kick_all();
        let mut s = lock(&self.state);
        while s.want == Want::Pause && s.paused < s.running_threads {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// With all vCPUs paused, has each thread save its own vCPU's state (KVM state is read on
    /// the thread that owns the vCPU).
    pub fn save_states(&self, count: usize) -> Result<Vec<VcpuState>, String> {
        let mut s = lock(&self.state);
        if s.want != Want::Pause || s.paused < s.running_threads {
            return Err("the vCPUs are not paused".into());
        }
        if s.running_threads != count {
            return Err(format!("{} of {count} vCPU threads are running", s.running_threads));
        }
        s.saved = (0..count).map(|_| None).collect();
        s.save_gen += 1;
        self.cv.notify_all();
        while s.saved.iter().any(Option::is_none) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        std::mem::take(&mut s.saved).into_iter().map(|r| r.unwrap_or_else(|| Err("missing".into()))).collect()
    }

    pub fn resume(&self) {
        let mut s = lock(&self.state);
        if s.want == Want::Pause {
            s.want = Want::Run;
        }
        self.cv.notify_all();
    }

    /// Asks every vCPU thread to leave its loop.
    pub fn stop(&self) {
        lock(&self.state).want = Want::Stop;
        self.cv.notify_all();
        self.kick_all();
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.state).want == Want::Pause
    }

    /// Holds every vCPU (`on`: parked at once, as by [`VcpuControl::pause`]) or lets them run again if the API has
    /// not paused them meanwhile. Independent of the API's pause and resume.
    pub fn set_fenced(&self, on: bool) {
        let mut s = lock(&self.state);
        if s.fenced == on {
            return;
        }
        s.fenced = on;
        self.cv.notify_all();
        drop(s);
        if on {
            self.kick_all();
        }
    }

    pub fn is_fenced(&self) -> bool {
        lock(&self.state).fenced
    }

    fn wanted(&self) -> Want {
        let s = lock(&self.state);
        match s.want {
            Want::Run if s.fenced => Want::Pause,
            w => w,
        }
    }

    /// Parks the calling vCPU while paused (saving its state when asked); returns false when
    /// it must stop.
    fn park(&self, fd: &VcpuFd, index: usize) -> bool {
        let held = |s: &ControlState| s.want == Want::Pause || (s.want == Want::Run && s.fenced);
        let mut s = lock(&self.state);
        if held(&s) {
            s.paused += 1;
            self.cv.notify_all();
            let mut seen = s.save_gen;
            while held(&s) {
                if s.save_gen != seen {
                    seen = s.save_gen;
                    drop(s);
                    let r = save_vcpu_here(fd);
                    s = lock(&self.state);
                    if let Some(slot) = s.saved.get_mut(index) {
                        *slot = Some(r);
                    }
                    self.cv.notify_all();
                    continue;
                }
                s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.paused -= 1;
        }
        s.want != Want::Stop
    }
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own mmap'ed kvm_run, set before the first
        // KVM_RUN and cleared before the VcpuFd is dropped; a single aligned byte store.
        unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
    }
}

/// Installs the vCPU kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// Counters a vCPU thread keeps (for `describe`).
#[derive(Default)]
pub struct VcpuStats {
    pub exits: AtomicU64,
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    pub index: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<VmExit>,
    pub control: Arc<VcpuControl>,
    pub mem: GuestMem,
    pub stats: Arc<VcpuStats>,
}

/// Whether vCPU threads run as `SCHED_IDLE` ([`flint_vmm_api::LaunchSpec::vcpu_sched_idle`]).
static SCHED_IDLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets whether the vCPU threads this process starts run as `SCHED_IDLE`.
pub fn set_sched_idle(on: bool) {
    SCHED_IDLE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Starts a vCPU thread running `fd`.
pub fn spawn(mut fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<JoinHandle<VcpuFd>> {
    let control = ctx.control.clone();
    lock(&control.state).running_threads += 1;
    let handle = std::thread::Builder::new().name(format!("vcpu{}", ctx.index)).spawn(move || {
        if SCHED_IDLE.load(std::sync::atomic::Ordering::Relaxed) {
            let p = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler(2) on this thread (0) with a parameter we own; lowering a thread's
            // policy to SCHED_IDLE needs no privilege. A refusal leaves the thread as it was.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) } != 0 {
                eprintln!("flint-vmm: vcpu{}: SCHED_IDLE refused: {}", ctx.index, std::io::Error::last_os_error());
            }
        }
        // Before the first KVM_RUN: from here on the guest drives what this thread does.
        crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Vcpu);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // The thread is in the kick list exactly while it runs: it adds itself first and removes itself
        // before it returns, so a kick never targets a thread that has ended (or been joined).
        lock(&ctx.control.threads).push(me);
        KVM_RUN.with(|c| c.set(fd.get_kvm_run() as *mut kvm_run));
        run_loop(&mut fd, &ctx);
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        lock(&ctx.control.threads).retain(|t| *t != me);
        let mut s = lock(&ctx.control.state);
        s.running_threads -= 1;
        ctx.control.cv.notify_all();
        drop(s);
        fd
    });
    match handle {
        Ok(h) => Ok(h),
        Err(e) => {
            lock(&control.state).running_threads -= 1;
            Err(e)
        }
    }
}

/// Joins vCPU threads after [`VcpuControl::stop`], returning their fds.
pub fn join_all(handles: Vec<JoinHandle<VcpuFd>>) -> Vec<VcpuFd> {
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}

fn run_loop(fd: &mut VcpuFd, ctx: &VcpuContext) {
    loop {
        if ctx.control.wanted() != Want::Run {
            // Complete any pending I/O, then come back with EINTR and park or stop.
            fd.set_kvm_immediate_exit(1);
        }
        let res = fd.run();
        ctx.stats.exits.fetch_add(1, Ordering::Relaxed);
        let stop = match res {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.stats.pio.fetch_add(1, Ordering::Relaxed);
                ctx.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.stats.pio.fetch_add(1, Ordering::Relaxed);
                ctx.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(ExitReason::GuestShutdown { detail: format!("vCPU {} halted", ctx.index) }),
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Failed {
                message: format!("vCPU {} triple-faulted (KVM_EXIT_SHUTDOWN){}", ctx.index, describe_rip(fd, &ctx.mem)),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                Some(ExitReason::GuestShutdown { detail: format!("system event {kind} on vCPU {}", ctx.index) })
            }
            Ok(VcpuExit::InternalError) => Some(ExitReason::Failed { message: internal_error(fd, ctx) }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Failed {
                message: format!("KVM_EXIT_FAIL_ENTRY on vCPU {} (hardware reason {reason:#x}, cpu {cpu})", ctx.index),
            }),
            Ok(other) => {
                Some(ExitReason::Failed { message: format!("unexpected vCPU exit {other:?} on vCPU {}", ctx.index) })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                if !ctx.control.park(fd, usize::from(ctx.index)) {
                    return;
                }
                None
            }
            Err(e) => Some(ExitReason::Failed { message: format!("KVM_RUN failed on vCPU {}: {e}", ctx.index) }),
        };
        if let Some(reason) = stop {
            ctx.exit.set(reason);
            // Stay parked until the VMM stops us: the vCPU's state stays inspectable.
            let mut s = lock(&ctx.control.state);
            while s.want != Want::Stop {
                s = ctx.control.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            return;
        }
    }
}

fn describe_rip(fd: &VcpuFd, mem: &GuestMem) -> String {
    let (Ok(regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) else {
        return String::new();
    };
    let gpa = if sregs.cr0 & 0x8000_0000 != 0 { translate_gva(mem, sregs.cr3, regs.rip) } else { Some(regs.rip) };
    let bytes = gpa.and_then(|gpa| {
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(gpa)).ok().map(|_| b)
    });
    let hex = bytes
        .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unreadable".into());
    format!(
        " at RIP {:#x} (CPL {}, GPA {}) instruction bytes [{hex}]",
        regs.rip,
        sregs.cs.selector & 3,
        gpa.map(|g| format!("{g:#x}")).unwrap_or_else(|| "unmapped".into()),
    )
}

fn internal_error(fd: &mut VcpuFd, ctx: &VcpuContext) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let n = (ie.ndata as usize).min(ie.data.len());
    let data: Vec<String> = ie.data[..n].iter().map(|d| format!("{d:#x}")).collect();
    let kind = match ie.suberror {
        1 => "emulation failure: the host's instruction emulator cannot run this instruction",
        2 => "simultaneous exception",
        3 => "delivery event",
        _ => "internal error",
    };
    format!(
        "KVM_EXIT_INTERNAL_ERROR on vCPU {} ({kind}; suberror {}, data [{}]){}",
        ctx.index,
        ie.suberror,
        data.join(", "),
        describe_rip(fd, &ctx.mem)
    )
}

/// Saves the calling thread's vCPU (MSR list probed once per process).
fn save_vcpu_here(fd: &VcpuFd) -> Result<VcpuState, String> {
    static MSRS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let list = MSRS.get_or_init(|| kvm_ioctls::Kvm::new().map(|k| readable_msrs(&k, fd)).unwrap_or_default());
    save_vcpu(fd, list).map_err(|e| e.to_string())
}
