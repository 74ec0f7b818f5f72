//! The VMM's seccomp filter: once the VM is built, system calls a VMM never needs (running
//! programs, tracing or reading other processes, mounts and namespaces, kernel modules, BPF,
//! io_uring, clock and host settings, device nodes, raw port I/O) kill the whole process.
//!
//! It is a deny-list, installed on every thread (TSYNC) before the first vCPU runs: it takes
//! away what a guest that compromised the VMM would reach for first, without the risk an
//! allow-list carries of killing a healthy VM on a rarely used path. A per-thread allow-list
//! (Firecracker's model) and a jail (chroot, namespaces, its own uid) are the next steps; see
//! docs/security.md.
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

/// System calls that end the VMM. Everything that sets a VM up (opening files, taps in other
/// network namespaces, KVM, userfaultfd) happens before the filter is installed.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("execve", libc::SYS_execve),
    ("execveat", libc::SYS_execveat),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("mknod", libc::SYS_mknod),
    ("mknodat", libc::SYS_mknodat),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("vhangup", libc::SYS_vhangup),
    ("uselib", libc::SYS_uselib),
];

/// Namespace flags that end the VMM when `clone` asks for them (a new user namespace is where privilege
/// escalations start; the VMM never makes namespaces once it runs).
const CLONE_NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

fn build(e: seccompiler::BackendError) -> SeccompError {
    SeccompError::Build(seccompiler::Error::Backend(e))
}

/// Calls the VMM makes, with arguments that end it: `socket` of any family but AF_UNIX (its sockets are the API,
/// vsock and pager sockets; no network, netlink or packet sockets), `clone` with a namespace flag.
fn argument_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, SeccompError> {
    let not_unix =
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64).map_err(build)?;
    let mut clone_rules = Vec::new();
    for &flag in CLONE_NAMESPACE_FLAGS {
        let c = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag as u64), flag as u64)
            .map_err(build)?;
        clone_rules.push(SeccompRule::new(vec![c]).map_err(build)?);
    }
    Ok(vec![(libc::SYS_socket, vec![SeccompRule::new(vec![not_unix]).map_err(build)?]), (libc::SYS_clone, clone_rules)])
}

fn arch() -> Result<seccompiler::TargetArch, SeccompError> {
    std::env::consts::ARCH.try_into().map_err(build)
}

/// The compiled deny-list for this architecture: [`DENIED`] whatever the arguments, and the argument rules.
pub fn deny_list() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    rules.extend(argument_rules()?);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::KillProcess, arch()?).map_err(build)?;
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

/// Installs the filters on every thread of this process (and so on every thread it starts later). Sets
/// `no_new_privs`. Returns how many calls are denied outright.
pub fn install() -> Result<usize, SeccompError> {
    for prog in [clone3_filter()?, deny_list()?] {
        seccompiler::apply_filter_all_threads(&prog).map_err(SeccompError::Install)?;
    }
    Ok(DENIED.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_calls_kill_the_process_and_the_rest_work() {
        let prog = deny_list().unwrap();
        // SAFETY: the child only installs the prepared filter (prctl + seccomp) and makes raw
        // system calls before it exits; nothing in it allocates or takes locks.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: raw system calls in the forked child, on valid arguments; it never returns.
            unsafe {
                if seccompiler::apply_filter(&prog).is_err() {
                    libc::_exit(3);
                }
                // Allowed: the calls a VMM makes all the time.
                if libc::getpid() <= 0 || libc::close(libc::dup(2)) != 0 {
                    libc::_exit(4);
                }
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                libc::execv(path.as_ptr(), argv.as_ptr());
                libc::_exit(5);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "the child should die of SIGSYS at execve, status {status:#x} (exit {})",
            libc::WEXITSTATUS(status)
        );
    }

    /// Runs `attempt` in a forked child under both filters; returns its wait status.
    fn under_filters(attempt: fn() -> i32) -> i32 {
        let progs = [clone3_filter().unwrap(), deny_list().unwrap()];
        // SAFETY: the child only installs the prepared filters and makes raw system calls before it exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
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

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn argument_rules_allow_unix_sockets_and_threads_only() {
        // SAFETY: raw system calls with valid arguments, in the forked child.
        let unix = under_filters(|| unsafe { i32::from(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) < 0) });
        assert!(libc::WIFEXITED(unix) && libc::WEXITSTATUS(unix) == 0, "AF_UNIX sockets work: {unix:#x}");
        // SAFETY: raw system calls with valid arguments, in the forked child.
        let inet = under_filters(|| unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).min(0) + 10 });
        assert!(killed_by_sigsys(inet), "socket(AF_INET) ends the process: {inet:#x}");
        // SAFETY: raw system calls with valid arguments, in the forked child.
        let netlink = under_filters(|| unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0).min(0) + 10 });
        assert!(killed_by_sigsys(netlink), "netlink sockets end the process: {netlink:#x}");
        // SAFETY: raw system calls with valid arguments, in the forked child.
        let userns = under_filters(|| unsafe {
            libc::syscall(libc::SYS_clone, (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, 0, 0, 0, 0) as i32
        });
        assert!(killed_by_sigsys(userns), "clone(CLONE_NEWUSER) ends the process: {userns:#x}");
        // clone3 says ENOSYS (glibc falls back to clone for threads).
        // SAFETY: raw system calls with valid arguments, in the forked child.
        let clone3 = under_filters(|| unsafe {
            let r = libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize);
            i32::from(!(r == -1 && *libc::__errno_location() == libc::ENOSYS))
        });
        assert!(libc::WIFEXITED(clone3) && libc::WEXITSTATUS(clone3) == 0, "clone3 is ENOSYS: {clone3:#x}");
    }

    #[test]
    fn every_denied_call_is_in_the_program() {
        // One comparison per denied call plus the architecture check and the two returns.
        assert!(deny_list().unwrap().len() > DENIED.len());
        let mut names: Vec<&str> = DENIED.iter().map(|d| d.0).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DENIED.len());
    }
}
