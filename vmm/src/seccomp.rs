//! The VMM's seccomp filters: an **allow-list per thread kind**, default action kill (Firecracker's model). Every
//! thread installs the list of its kind itself, before it handles anything a guest or caller controls: vCPU threads
//! before their first KVM_RUN, the API thread before its first accept, the userfaultfd and pager-link threads when
//! they start, the main thread (the device event loop) once the vCPUs run. Threads a filtered thread starts (API
//! connections, snapshot writers, the exit watchdog) inherit its filter. Besides the lists, by argument: `socket`
//! only for AF_UNIX, `clone` only for threads (CLONE_THREAD, no namespace flag), `prctl` only PR_SET_NAME, `tgkill`
//! only inside this process; `clone3` fails with ENOSYS (its flags are in memory a filter cannot read; glibc falls
//! back to `clone`). The lists are documented call by call below and in docs/security.md.
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::Error),
    #[error("cannot compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// The kinds of VMM threads, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the device event loop (vsock, net, rate-limiter timers, exits).
    EventLoop,
    /// A vCPU: KVM_RUN and the port/MMIO exits it dispatches (serial, virtio notifications served inline).
    Vcpu,
    /// The control API: its accept thread and the connection threads it starts (pause, snapshot, describe).
    Api,
    /// The userfaultfd fault handler and fetch workers, and the link to flintd's page server.
    Pager,
}

/// What every thread does: memory, locks, signals used to kick vCPUs, time, exiting, its own stdio/log writes,
/// and starting threads (the argument rules restrict `clone`, `prctl` and `tgkill`).
const BASE: &[(&str, libc::c_long)] = &[
    ("read", libc::SYS_read),   // eventfds, sockets, files
    ("write", libc::SYS_write), // eventfds, sockets, the log and console
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("close", libc::SYS_close),
    ("fcntl", libc::SYS_fcntl), // std: dup with CLOEXEC, nonblocking
    ("futex", libc::SYS_futex), // mutexes, condvars, joins
    ("mmap", libc::SYS_mmap),   // allocator, thread stacks
    ("munmap", libc::SYS_munmap),
    ("mprotect", libc::SYS_mprotect), // stack guard pages
    ("madvise", libc::SYS_madvise),   // allocator trims, thread exit
    ("mremap", libc::SYS_mremap),     // allocator
    ("brk", libc::SYS_brk),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask), // thread start, kicks
    ("rt_sigreturn", libc::SYS_rt_sigreturn),     // after the vCPU kick handler
    ("sigaltstack", libc::SYS_sigaltstack),       // std's stack-overflow guard at thread start/exit
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("clock_gettime", libc::SYS_clock_gettime),     // when the vDSO falls back
    ("clock_nanosleep", libc::SYS_clock_nanosleep), // sleeps (exit watchdog, retries)
    ("nanosleep", libc::SYS_nanosleep),
    ("sched_yield", libc::SYS_sched_yield),
    ("sched_getaffinity", libc::SYS_sched_getaffinity), // std at thread start
    ("exit", libc::SYS_exit),                           // a thread ends
    ("exit_group", libc::SYS_exit_group),               // the process ends
    ("set_robust_list", libc::SYS_set_robust_list),     // thread start
    ("rseq", libc::SYS_rseq),                           // thread start (glibc)
    ("getrandom", libc::SYS_getrandom),                 // hash seeds
    ("lseek", libc::SYS_lseek),
    ("fstat", libc::SYS_fstat),
    ("newfstatat", libc::SYS_newfstatat),
    ("statx", libc::SYS_statx),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("clone3", libc::SYS_clone3), // answered ENOSYS by the second filter
];

/// AF_UNIX socket traffic (vsock host sockets, the API, the page server) once a socket exists.
const SOCKET_IO: &[(&str, libc::c_long)] = &[
    ("sendto", libc::SYS_sendto),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendmsg", libc::SYS_sendmsg), // fd passing to the page server
    ("recvmsg", libc::SYS_recvmsg),
    ("shutdown", libc::SYS_shutdown),
    ("setsockopt", libc::SYS_setsockopt),
    ("getsockopt", libc::SYS_getsockopt),
];

/// Positioned file I/O and syncs (drives, memory and state files).
const FILE_IO: &[(&str, libc::c_long)] = &[
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
];

/// What a vCPU adds to the base, socket and file I/O: KVM ioctls, and what the exits it serves inline do (the
/// console file and its rotation, rate-limiter timers, epoll changes for device fds, a guest's vsock connection).
const VCPU: &[(&str, libc::c_long)] = &[
    ("ioctl", libc::SYS_ioctl),
    ("openat", libc::SYS_openat), // console rotation reopens its file
    ("rename", libc::SYS_rename), // console rotation
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("timerfd_settime", libc::SYS_timerfd_settime),
    ("connect", libc::SYS_connect), // a guest's vsock connection to a host port
];

/// What the event loop adds to the base, socket and file I/O: waiting on and changing its epoll set, host vsock
/// connections, device I/O, stopping vCPUs at exit.
const EVENT_LOOP: &[(&str, libc::c_long)] = &[
    ("epoll_wait", libc::SYS_epoll_wait),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("ioctl", libc::SYS_ioctl),     // tap, FIONBIO
    ("accept4", libc::SYS_accept4), // host connections to the vsock socket
    ("connect", libc::SYS_connect),
    ("openat", libc::SYS_openat),
    ("rename", libc::SYS_rename),
    ("unlink", libc::SYS_unlink), // the API socket at exit
    ("timerfd_settime", libc::SYS_timerfd_settime),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("tgkill", libc::SYS_tgkill), // stopping vCPUs at exit
];

/// What the API adds to the base, socket and file I/O: serving connections, pausing (kicking vCPUs), describing,
/// and writing snapshots (state and memory files: create, size, write, sync, rename into place).
const API: &[(&str, libc::c_long)] = &[
    ("accept4", libc::SYS_accept4),
    ("poll", libc::SYS_poll),
    ("ioctl", libc::SYS_ioctl),   // KVM state and dirty log of a paused VM
    ("tgkill", libc::SYS_tgkill), // kicking vCPUs out of KVM_RUN
    ("openat", libc::SYS_openat),
    ("ftruncate", libc::SYS_ftruncate),
    ("fallocate", libc::SYS_fallocate),
    ("rename", libc::SYS_rename),
    ("renameat", libc::SYS_renameat),
    ("unlink", libc::SYS_unlink),
    ("unlinkat", libc::SYS_unlinkat),
    ("chmod", libc::SYS_chmod),
    ("fchmod", libc::SYS_fchmod),
    ("epoll_ctl", libc::SYS_epoll_ctl),
];

/// What the userfaultfd handler, its workers and the pager link add to the base, socket and file I/O: reading
/// fault messages and installing pages (UFFDIO_* ioctls), and reconnecting to the page server.
const PAGER: &[(&str, libc::c_long)] = &[
    ("ioctl", libc::SYS_ioctl),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("connect", libc::SYS_connect),
    ("tgkill", libc::SYS_tgkill),
];

/// The calls of `kind`: the base plus its own.
pub fn allowed(kind: ThreadKind) -> Vec<(&'static str, libc::c_long)> {
    let extra = match kind {
        ThreadKind::EventLoop => EVENT_LOOP,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Api => API,
        ThreadKind::Pager => PAGER,
    };
    let mut v: Vec<_> = BASE.iter().chain(SOCKET_IO).chain(FILE_IO).chain(extra).copied().collect();
    v.sort_by_key(|c| c.1);
    v.dedup_by_key(|c| c.1);
    v
}

/// Calls a VMM thread never makes once it runs (kept as documentation and for tests: each kind's list must not
/// contain them).
pub const NEVER: &[(&str, libc::c_long)] = &[
    ("execve", libc::SYS_execve),
    ("execveat", libc::SYS_execveat),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("keyctl", libc::SYS_keyctl),
    ("setuid", libc::SYS_setuid),
    ("setresuid", libc::SYS_setresuid),
    ("kill", libc::SYS_kill),
    ("fork", libc::SYS_fork),
    ("vfork", libc::SYS_vfork),
    ("mknod", libc::SYS_mknod),
    ("mknodat", libc::SYS_mknodat),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("seccomp", libc::SYS_seccomp),
];

fn build(e: seccompiler::BackendError) -> SeccompError {
    SeccompError::Build(seccompiler::Error::Backend(e))
}

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, len, op, value).map_err(build)
}

const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

/// The rules of calls allowed only with some arguments.
fn argument_rules(pid: u32) -> Result<Vec<(i64, Vec<SeccompRule>)>, SeccompError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let unix = cond(0, Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?;
    let thread = cond(0, Qword, SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64), libc::CLONE_THREAD as u64)?;
    let no_ns = cond(0, Qword, SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS), 0)?;
    let set_name = cond(0, Dword, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?;
    let own = cond(0, Dword, SeccompCmpOp::Eq, u64::from(pid))?;
    let rule = |c: Vec<SeccompCondition>| SeccompRule::new(c).map_err(build);
    Ok(vec![
        (libc::SYS_socket, vec![rule(vec![unix])?]),
        (libc::SYS_clone, vec![rule(vec![thread, no_ns])?]),
        (libc::SYS_prctl, vec![rule(vec![set_name])?]),
        (libc::SYS_tgkill, vec![rule(vec![own])?]),
    ])
}

fn arch() -> Result<seccompiler::TargetArch, SeccompError> {
    std::env::consts::ARCH.try_into().map_err(build)
}

/// The compiled allow-list of `kind` (default: kill the process). `pid` is this process's (tgkill's target).
pub fn allow_list(kind: ThreadKind, pid: u32) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind).iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    for (nr, r) in argument_rules(pid)? {
        // tgkill is in some lists unconditionally: the argument rule narrows it everywhere.
        rules.insert(nr, r);
    }
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, arch()?).map_err(build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// `clone3` fails with ENOSYS: its flags are in memory a filter cannot read, so it cannot be checked like `clone`;
/// glibc then creates threads with `clone`.
pub fn clone3_filter() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch()?)
        .map_err(build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Compiled filters of every kind, prepared once by the main thread before it starts any thread.
struct Prepared {
    clone3: BpfProgram,
    kinds: Vec<(ThreadKind, BpfProgram)>,
}

static PREPARED: std::sync::OnceLock<Option<Prepared>> = std::sync::OnceLock::new();

/// Compiles every kind's filter (`enabled`), or records that there are none (`--no-seccomp`). Call once, before
/// the first thread starts.
pub fn prepare(enabled: bool) -> Result<(), SeccompError> {
    let prepared = if enabled {
        let pid = std::process::id();
        let mut kinds = Vec::new();
        for k in [ThreadKind::EventLoop, ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Pager] {
            kinds.push((k, allow_list(k, pid)?));
        }
        Some(Prepared { clone3: clone3_filter()?, kinds })
    } else {
        None
    };
    let _ = PREPARED.set(prepared);
    Ok(())
}

/// Installs `kind`'s filters on the calling thread (no-op when seccomp is off or [`prepare`] was not called).
/// Sets `no_new_privs`. Threads the caller starts afterwards inherit them.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(Some(p)) = PREPARED.get() else { return Ok(()) };
    let prog = p.kinds.iter().find(|(k, _)| *k == kind).map(|(_, prog)| prog).expect("every kind is prepared");
    for prog in [&p.clone3, prog] {
        seccompiler::apply_filter(prog).map_err(SeccompError::Install)?;
    }
    Ok(())
}

/// [`enter`] for a thread that cannot report an error: a thread that would run unfiltered ends the process.
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        eprintln!("flint-vmm: cannot install the {kind:?} seccomp filter: {e}");
        std::process::exit(1);
    }
}

/// The userfaultfd serving threads' start hook.
pub fn enter_pager() {
    enter_or_exit(ThreadKind::Pager);
}

/// How many calls `kind` may make (for the log line).
pub fn allowed_count(kind: ThreadKind) -> usize {
    allowed(kind).len() + 2 // socket and prctl, by argument
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `attempt` in a forked child under `kind`'s filters; returns its wait status.
    fn under(kind: ThreadKind, attempt: fn() -> i32) -> i32 {
        // The child's pid is what tgkill may target: build the lists there (fork first, then compile, then install).
        // SAFETY: the child builds and installs filters and makes raw system calls, then exits; it is a fork of a
        // test thread, and allocating in it is fine in practice for these short single-threaded children.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let progs = [clone3_filter().unwrap(), allow_list(kind, std::process::id()).unwrap()];
            for p in &progs {
                if seccompiler::apply_filter(p).is_err() {
                    // SAFETY: leaving the forked child.
                    unsafe { libc::_exit(3) };
                }
            }
            // SAFETY: leaving the forked child with the attempt's result.
            unsafe { libc::_exit(attempt()) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn killed(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exited_ok(status: i32) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    #[test]
    fn every_kind_allows_its_work_and_kills_the_rest() {
        for kind in [ThreadKind::EventLoop, ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Pager] {
            // A call in no list (the VMM makes its pipes before it runs) kills.
            // SAFETY: raw system calls with valid arguments, in the forked child.
            let ok = under(kind, || unsafe {
                let mut fds = [0i32; 2];
                if libc::syscall(libc::SYS_pipe2, fds.as_mut_ptr(), 0) != 0 {
                    // pipe2 is not in the lists: this branch only runs if it were allowed and failed.
                    return 9;
                }
                0
            });
            assert!(killed(ok), "{kind:?}: pipe2 should kill: {ok:#x}");
            // SAFETY: as above.
            let unix = under(kind, || unsafe { i32::from(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) < 0) });
            assert!(exited_ok(unix), "{kind:?}: AF_UNIX sockets work: {unix:#x}");
            // SAFETY: as above.
            let inet = under(kind, || unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).min(0) + 10 });
            assert!(killed(inet), "{kind:?}: socket(AF_INET) kills: {inet:#x}");
            // SAFETY: as above.
            let exec = under(kind, || unsafe {
                let sh = c"/bin/true";
                let argv = [sh.as_ptr(), std::ptr::null()];
                libc::execv(sh.as_ptr(), argv.as_ptr());
                0
            });
            assert!(killed(exec), "{kind:?}: execve kills: {exec:#x}");
            // SAFETY: as above.
            let fork = under(kind, || unsafe {
                let r = libc::syscall(libc::SYS_clone, libc::SIGCHLD as u64, 0, 0, 0, 0);
                if r == 0 {
                    libc::_exit(0);
                }
                0
            });
            assert!(killed(fork), "{kind:?}: a clone that is not a thread (fork) kills: {fork:#x}");
            // SAFETY: as above.
            let userns = under(kind, || unsafe {
                libc::syscall(libc::SYS_clone, (libc::CLONE_THREAD | libc::CLONE_NEWUSER) as u64, 0, 0, 0, 0) as i32
            });
            assert!(killed(userns), "{kind:?}: clone(CLONE_NEWUSER) kills: {userns:#x}");
            // SAFETY: as above.
            let dumpable = under(kind, || unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) });
            assert!(killed(dumpable), "{kind:?}: prctl other than PR_SET_NAME kills: {dumpable:#x}");
            // SAFETY: as above.
            let name = under(kind, || unsafe { libc::prctl(libc::PR_SET_NAME, c"x".as_ptr(), 0, 0, 0) });
            assert!(exited_ok(name), "{kind:?}: PR_SET_NAME works: {name:#x}");
            // SAFETY: as above.
            let clone3 = under(kind, || unsafe {
                let r = libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize);
                i32::from(!(r == -1 && *libc::__errno_location() == libc::ENOSYS))
            });
            assert!(exited_ok(clone3), "{kind:?}: clone3 is ENOSYS: {clone3:#x}");
            // A real thread starts and joins (clone with CLONE_THREAD through glibc's fallback).
            let thread = under(kind, || i32::from(std::thread::spawn(|| 7).join().ok() != Some(7)));
            assert!(exited_ok(thread), "{kind:?}: threads start: {thread:#x}");
        }
        // tgkill only inside this process: another pid kills.
        // SAFETY: as above.
        let other = under(ThreadKind::Vcpu, || unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) as i32 });
        assert!(killed(other), "tgkill of another process kills: {other:#x}");
    }

    #[test]
    fn no_list_holds_a_call_the_vmm_never_makes() {
        for kind in [ThreadKind::EventLoop, ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Pager] {
            let list = allowed(kind);
            for (name, nr) in NEVER {
                assert!(!list.iter().any(|c| c.1 == *nr), "{kind:?} allows {name}");
            }
            assert!(allow_list(kind, 1).unwrap().len() > list.len());
        }
        // vCPUs cannot accept connections or write snapshots' renames outside the console; the API cannot wait on
        // the event loop.
        assert!(!allowed(ThreadKind::Vcpu).iter().any(|c| c.1 == libc::SYS_accept4));
        assert!(!allowed(ThreadKind::Api).iter().any(|c| c.1 == libc::SYS_epoll_wait));
        assert!(!allowed(ThreadKind::Pager).iter().any(|c| c.1 == libc::SYS_openat));
    }
}
