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

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

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

/// The compiled deny-list for this architecture.
pub fn deny_list() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    let arch = std::env::consts::ARCH.try_into().map_err(|e| SeccompError::Build(seccompiler::Error::Backend(e)))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::KillProcess, arch)
        .map_err(|e| SeccompError::Build(seccompiler::Error::Backend(e)))?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Installs the deny-list on every thread of this process (and so on every thread it starts
/// later). Sets `no_new_privs`.
pub fn install() -> Result<usize, SeccompError> {
    let prog = deny_list()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(SeccompError::Install)?;
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
