//! `jail-probe`: a stand-in for a flint-vmm taken over by its guest, for the jail test (tests/tests/flintd.rs).
//! flintd's launcher starts it exactly as it starts flint-vmm (`--spec`, the same jail, cgroup and fds); it confines
//! itself the same way (`flint_vmm::jail::enter`, then the VMM's seccomp filters), then tries what an attacker
//! would. Each attempt runs in a forked child; one line per attempt goes to stdout (the VM's vmm.log):
//! `ATTEMPT <name> blocked (<how>)` or `ATTEMPT <name> ALLOWED`.
//!
//! Targets come from `<VM dir>/probe-targets.json`, read before the jail: flintd's API socket and pid, and the path
//! of another VM's memory file.
use std::io::Write;

use flint_vmm_api::spec::LaunchSpec;

#[derive(serde::Deserialize)]
struct Targets {
    flintd_socket: String,
    flintd_pid: i32,
    other_memory: String,
}

fn attempt(name: &str, f: &dyn Fn() -> bool) {
    // SAFETY: the probe is single-threaded; the child runs one attempt and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        flint_vmm::seccomp::enter_or_exit(flint_vmm::seccomp::ThreadKind::Vcpu);
        let allowed = f();
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(i32::from(allowed)) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let verdict = if libc::WIFSIGNALED(status) {
        format!("blocked (killed by signal {})", libc::WTERMSIG(status))
    } else if libc::WEXITSTATUS(status) == 0 {
        "blocked (the call failed)".to_string()
    } else {
        "ALLOWED".to_string()
    };
    println!("ATTEMPT {name} {verdict}");
    let _ = std::io::stdout().flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let spec_path = args.iter().position(|a| a == "--spec").and_then(|i| args.get(i + 1)).expect("--spec");
    let spec: LaunchSpec = serde_json::from_slice(&std::fs::read(spec_path).expect("spec")).expect("spec json");
    let jail = spec.jail.expect("the probe is started jailed");
    let targets: Targets =
        serde_json::from_slice(&std::fs::read(jail.root.join("probe-targets.json")).expect("targets")).expect("json");
    if let Err(e) = flint_vmm::jail::enter(&jail) {
        println!("JAIL FAILED {e}");
        std::process::exit(2);
    }
    // The vCPU threads' allow-list, installed in each attempt's child (the probe forks, which the list forbids).
    flint_vmm::seccomp::prepare(true).expect("seccomp");
    // SAFETY: getuid(2)/getpid(2) have no preconditions.
    println!("UID {} PID {}", unsafe { libc::getuid() }, unsafe { libc::getpid() });
    let socket = targets.flintd_socket.clone();
    let memory = targets.other_memory.clone();
    let flintd = targets.flintd_pid;
    attempt("open-/etc/shadow", &|| std::fs::File::open("/etc/shadow").is_ok());
    attempt("open-other-vm-memory", &|| {
        std::fs::File::open(&memory).is_ok() || std::fs::File::open("../other/memory").is_ok()
    });
    attempt("connect-flintd-socket", &|| std::os::unix::net::UnixStream::connect(&socket).is_ok());
    // SAFETY: a raw system call with valid arguments, in the forked child.
    attempt("execve", &|| unsafe {
        let sh = c"/bin/sh";
        let argv = [sh.as_ptr(), std::ptr::null()];
        libc::execv(sh.as_ptr(), argv.as_ptr());
        false
    });
    // SAFETY: a raw system call with valid arguments, in the forked child.
    attempt("ptrace-flintd", &|| unsafe { libc::ptrace(libc::PTRACE_ATTACH, flintd, 0, 0) == 0 });
    // SAFETY: a raw system call with valid arguments, in the forked child.
    attempt("kill-flintd", &|| unsafe { libc::kill(flintd, 0) == 0 });
    // SAFETY: a raw system call with valid arguments, in the forked child.
    attempt("socket-af-inet", &|| unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) >= 0 });
    // SAFETY: a raw system call with valid arguments, in the forked child.
    attempt("mount", &|| unsafe {
        libc::mount(c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) == 0
    });
    // SAFETY: a raw system call with valid arguments, in the forked child.
    attempt("clone-newuser", &|| unsafe {
        let r = libc::syscall(libc::SYS_clone, (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, 0, 0, 0, 0);
        if r == 0 {
            libc::_exit(1);
        }
        r > 0
    });
    // SAFETY: a raw system call with valid arguments, in the forked child.
    attempt("setuid-root", &|| unsafe { libc::setuid(0) == 0 });
    println!("DONE");
}
