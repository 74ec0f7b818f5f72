//! Host profiles: what the VMM adapts to on the machine it runs on.
//!
//! - `hardware`: KVM on VT-x/AMD-V. Nothing special.
//! - `pvm-native`: KVM served by the `kvm_pvm` module in "native" mode, which runs guest
//!   kernel mode through KVM's instruction emulator. The guest kernel must avoid what that
//!   emulator lacks: XSAVE in kernel mode, a handful of CPU features (hidden with the
//!   kernel's own `clearcpuid`, since CPUID masking does not reach kernel mode there), and
//!   three spots handled by Flint's guest-kernel patches (`flint.*` boot options).
//!
//!   Guest *user* mode runs natively there, on the host's XCR0: it sees AVX/AVX2 and OSXSAVE in
//!   CPUID and may use YMM registers, while the guest kernel (booted `noxsave`, since the
//!   emulator cannot run XSAVE) saves only the legacy FXSAVE area on a context switch. The upper
//!   halves of the YMM registers are therefore shared by every guest thread: a thread preempted
//!   between an AVX load and its store writes another thread's (often zeroed) upper halves. Seen
//!   as 16-byte holes in data copied by glibc's AVX2 `memcpy` in the agent. The profile hands PID 1
//!   `GLIBC_TUNABLES` turning glibc's AVX paths off ([`PVM_NATIVE_GLIBC_TUNABLES`]); the agent
//!   passes it to every process it starts. Code that picks AVX by itself (its own CPUID/XGETBV
//!   dispatch) is not covered: see docs/security.md.
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostProfile {
    Hardware,
    PvmNative,
}

macro_rules! pvm_native_glibc_tunables {
    () => {
        "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX_Fast_Unaligned_Load,-FMA,-FMA4,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"
    };
}

/// glibc features turned off for guest user mode on `pvm-native` hosts: everything that
/// selects YMM/ZMM code paths (see the module comment).
pub const PVM_NATIVE_GLIBC_TUNABLES: &str = pvm_native_glibc_tunables!();

/// Kernel command line additions for `pvm-native` hosts. The kernel hands `NAME=value`
/// words it does not know to PID 1 as environment variables.
pub const PVM_NATIVE_CMDLINE: &str = concat!(
    "noxsave clearcpuid=smap,cx16,fsgsbase,pcid,invpcid,rdpid,popcnt,rdtscp,114 flint.noint3test flint.nofwait flint.syscall_pf",
    " GLIBC_TUNABLES=",
    pvm_native_glibc_tunables!()
);

impl HostProfile {
    /// Detects the profile of this host from sysfs.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(sys_module: &Path) -> Self {
        let pvm = sys_module.join("kvm_pvm");
        if pvm.is_dir() {
            // Non-native PVM (guest kernel in a separate address space) is not supported by
            // these quirks either way; treat any kvm_pvm as needing them.
            return HostProfile::PvmNative;
        }
        HostProfile::Hardware
    }

    pub fn name(self) -> &'static str {
        match self {
            HostProfile::Hardware => "hardware",
            HostProfile::PvmNative => "pvm-native",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hardware" => Some(HostProfile::Hardware),
            "pvm-native" => Some(HostProfile::PvmNative),
            _ => None,
        }
    }

    /// Kernel command line additions this host needs.
    pub fn cmdline_extra(self) -> &'static str {
        match self {
            HostProfile::Hardware => "",
            HostProfile::PvmNative => PVM_NATIVE_CMDLINE,
        }
    }
}

/// What is wrong with restoring a snapshot whose guest booted on `profile` with `cmdline`, if
/// anything: snapshots taken on `pvm-native` before its glibc tunables existed have guest
/// processes that may use AVX, whose state that host's guest kernel cannot preserve.
pub fn snapshot_warning(profile: HostProfile, cmdline: &str) -> Option<String> {
    (profile == HostProfile::PvmNative && !cmdline.split_whitespace().any(|w| w.starts_with("GLIBC_TUNABLES="))).then(
        || {
            "this pvm-native snapshot's guest booted without GLIBC_TUNABLES: its processes may use AVX, whose \
             register state the guest kernel there cannot preserve (data corruption); recreate the snapshot \
             with this flint-vmm"
                .to_string()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_from_sysfs_layout() {
        let d = std::env::temp_dir().join(format!("flint-host-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(HostProfile::detect_in(&d), HostProfile::Hardware);
        std::fs::create_dir_all(d.join("kvm_pvm")).unwrap();
        assert_eq!(HostProfile::detect_in(&d), HostProfile::PvmNative);
        std::fs::remove_dir_all(&d).unwrap();
        assert!(HostProfile::Hardware.cmdline_extra().is_empty());
        assert!(HostProfile::PvmNative.cmdline_extra().contains("flint.syscall_pf"));
        assert!(snapshot_warning(HostProfile::PvmNative, "console=ttyS0 noxsave").is_some());
        assert!(snapshot_warning(HostProfile::PvmNative, PVM_NATIVE_CMDLINE).is_none());
        assert!(snapshot_warning(HostProfile::Hardware, "console=ttyS0").is_none());
        assert!(HostProfile::PvmNative
            .cmdline_extra()
            .ends_with(&format!(" GLIBC_TUNABLES={PVM_NATIVE_GLIBC_TUNABLES}")));
    }
}
