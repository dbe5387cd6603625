//! The `qemu` engine: `qemu-system-x86_64 -M microvm` with hardware KVM
//! where [`capvisor_rpc::host::host_kvm_usable`], TCG otherwise (DESIGN.md, "Engines" and
//! "Machines we build on").
//!
//! Descriptors handed to QEMU (through `capvisor_rpc::spawn::prepare`, so
//! QEMU also gets `PR_SET_PDEATHSIG(SIGKILL)` and dies with the vmm):
//! - [`AGENT_FD`]: the agent channel, an already-connected stream socket,
//!   used as `-chardev socket,id=ag,fd=N` behind the virtio-serial port
//!   `capvisor.agent`. QEMU 7.2 treats a `fd=` socket chardev without
//!   `server=on` as a connected client socket and carries bytes both ways
//!   (checked by experiment with `-mon` on such a chardev), so the worker's
//!   end of the socketpair talks to the guest with no relay in the vmm.
//!   The price: once the worker closes its end, the channel cannot be
//!   re-established for this VM.
//! - [`QMP_FD`]: one end of a private socketpair serving QMP
//!   (`-chardev socket,id=qmp,fd=N -mon chardev=qmp,mode=control`), so no
//!   QMP socket exists in the file system.
//!
//! - [`CONSOLE_FD`]: one end of a private socketpair behind the serial
//!   console (`-chardev socket,id=con,fd=N -serial chardev:con`): the vmm
//!   reads it into `run_dir/console.log` ([`crate::engine::CONSOLE_LOG`])
//!   through a [`crate::engine::ConsoleRing`], so a guest flooding its
//!   console cannot fill the disk (QEMU's `-serial file:` grows without
//!   bound). When the vmm falls behind, the socket fills and QEMU's UART
//!   waits for room before it takes more: the guest slows, the host does
//!   not grow.
//!
//! [`QemuEngine`] (in `engine.rs`) runs QEMU with these arguments behind
//! [`crate::engine::Engine`].
//!
//! The machine keeps its CMOS RTC (`rtc=on`, where DESIGN.md's experiments
//! used `rtc=off`): without one, Debian's 6.1 kernel spends about 1.4 s in
//! "Unable to read current time from RTC" and another 1.2 s in "rtc_cmos:
//! broken or not accessible" waiting for an update-in-progress bit that
//! never clears, which was more than half of a TCG boot here (a panic-path
//! boot fell from 4.9 s to 2.1 s wall). The guest also gets the wall-clock
//! time, which TLS in the guest needs.

pub mod engine;
pub mod qmp;

pub use engine::QemuEngine;

use capvisor_rpc::vmconfig::VmConfig;
use std::path::Path;

/// Descriptor number of the agent socket inside QEMU.
pub const AGENT_FD: i32 = 3;
/// Descriptor number of the QMP socket inside QEMU.
pub const QMP_FD: i32 = 4;
/// Descriptor number of the serial console socket inside QEMU.
pub const CONSOLE_FD: i32 = 5;
/// Descriptor number of the egress socket inside QEMU (`VmConfig.egress`):
/// behind the virtio-serial port `capvisor.egress`, like the agent's.
pub const EGRESS_FD: i32 = 6;
/// Environment variable overriding the QEMU binary (default `qemu-system-x86_64` in `PATH`).
pub const QEMU_ENV: &str = "CAPVISOR_QEMU";

/// The QEMU program to run.
pub fn qemu_binary() -> String {
    std::env::var(QEMU_ENV).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// The host's TSC rate in kHz, from the first `cpu MHz` line of
/// `/proc/cpuinfo` (x 1000, rounded). Passed to the guest as
/// `tsc_early_khz=` so a TCG guest under host load does not hang calibrating
/// its TSC against the PIT (DESIGN.md, "Machines we build on").
pub fn host_tsc_khz() -> Option<u64> {
    parse_cpu_mhz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split_once(':'))
        .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        .filter(|mhz| *mhz > 0.0)
        .map(|mhz| (mhz * 1000.0).round() as u64)
}

/// The kernel command line: serial console, reboot and panic handling
/// (`panic=-1` reboots at once, which `-no-reboot` turns into QEMU exiting),
/// `rdinit=/init` (guest-init), the TSC rate, then `cfg.extra_cmdline`.
pub fn kernel_cmdline(cfg: &VmConfig, tsc_khz: Option<u64>) -> String {
    let mut s = String::from("console=ttyS0 reboot=t panic=-1 quiet rdinit=/init");
    if let Some(k) = tsc_khz {
        s.push_str(&format!(" tsc_early_khz={k}"));
    }
    if !cfg.extra_cmdline.trim().is_empty() {
        s.push(' ');
        s.push_str(cfg.extra_cmdline.trim());
    }
    s
}

/// QEMU's TCG translation-cache size, MiB (`-accel tcg,tb-size=N`): part
/// of `capvisor_confine::cgroup::VM_OVERHEAD_MIB`.
pub const TCG_TB_SIZE_MIB: u32 = 64;

/// The `-sandbox` value every QEMU runs with.
pub const QEMU_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU's arguments (without the program) for `cfg`: hardware KVM when
/// `kvm`, else multi-threaded TCG, always under [`QEMU_SANDBOX`]. The agent
/// socket, the QMP socket and the console socket are expected at
/// [`AGENT_FD`], [`QMP_FD`] and [`CONSOLE_FD`].
pub fn args(cfg: &VmConfig, kvm: bool, tsc_khz: Option<u64>) -> Vec<String> {
    let mut a: Vec<String> = vec![
        // Names the VM in `ps` (its run dir no longer shows there: the
        // console is a descriptor, not a file QEMU opens).
        "-name".into(),
        format!("guest={}", cfg.name.replace(',', ",,")),
        "-M".into(),
        "microvm,x-option-roms=off,rtc=on".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        // QEMU's own seccomp filter (it also sets no_new_privs): no obsolete
        // system calls, no privilege changes, no fork/exec, no scheduler or
        // resource-limit changes (QEMU's -sandbox, docs/vmm-confinement.md).
        "-sandbox".into(),
        QEMU_SANDBOX.into(),
    ];
    if kvm {
        a.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]);
    } else {
        // The TCG translation cache is bounded (QEMU 7.2 reserves 1 GiB by
        // default and fills it as the guest runs new code), so QEMU's memory
        // stays within the VM cgroup's overhead (docs/bounds.md).
        a.extend(["-accel".into(), format!("tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}"), "-cpu".into(), "max".into()]);
    }
    a.extend([
        "-m".into(),
        cfg.memory_mib.to_string(),
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-kernel".into(),
        path_arg(&cfg.kernel),
        "-initrd".into(),
        path_arg(&cfg.initramfs),
        "-append".into(),
        kernel_cmdline(cfg, tsc_khz),
        "-chardev".into(),
        format!("socket,id=con,fd={CONSOLE_FD}"),
        "-serial".into(),
        "chardev:con".into(),
        "-chardev".into(),
        format!("socket,id=qmp,fd={QMP_FD}"),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("socket,id=ag,fd={AGENT_FD}"),
        "-device".into(),
        "virtserialport,chardev=ag,name=capvisor.agent".into(),
    ]);
    if cfg.egress {
        a.extend([
            "-chardev".into(),
            format!("socket,id=eg,fd={EGRESS_FD}"),
            "-device".into(),
            "virtserialport,chardev=eg,name=capvisor.egress".into(),
        ]);
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        // QEMU option values escape a comma by doubling it.
        let file = path_arg(&d.path).replace(',', ",,");
        let ro = if d.read_only { ",readonly=on" } else { "" };
        a.extend([
            "-drive".into(),
            format!("file={file},format=raw,if=none,id=disk{i}{ro}"),
            "-device".into(),
            format!("virtio-blk-device,drive=disk{i}"),
        ]);
    }
    a
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "t".into(),
            run_dir: "/run/vm".into(),
            kernel: "/img/vmlinux".into(),
            initramfs: "/img/initramfs.cpio".into(),
            memory_mib: 256,
            vcpus: 2,
            engine: capvisor_schema::capvisor_capnp::Engine::Auto,
            extra_cmdline: " loglevel=4 ".into(),
            disks: vec![],
            confine: Default::default(),
            egress: false,
        }
    }

    #[test]
    fn command_line_tcg_and_kvm() {
        let a = args(&cfg(), false, Some(2599998)).join(" ");
        assert!(a.contains("-accel tcg,thread=multi,tb-size=64 -cpu max"), "{a}");
        assert!(a.contains("-m 256 -smp 2 -kernel /img/vmlinux -initrd /img/initramfs.cpio"), "{a}");
        assert!(a.contains("-chardev socket,id=con,fd=5 -serial chardev:con"), "{a}");
        assert!(!a.contains("file:"), "QEMU writes no file of its own: {a}");
        assert!(a.starts_with("-name guest=t -M microvm"), "{a}");
        assert!(a.contains("socket,id=ag,fd=3"), "{a}");
        assert!(a.contains("virtserialport,chardev=ag,name=capvisor.agent"), "{a}");
        assert!(!a.contains("capvisor.egress"), "no egress port unless asked: {a}");
        let e = args(&VmConfig { egress: true, ..cfg() }, false, None).join(" ");
        assert!(e.contains("-chardev socket,id=eg,fd=6 -device virtserialport,chardev=eg,name=capvisor.egress"), "{e}");
        let v = args(&cfg(), false, Some(2599998));
        let append = &v[v.iter().position(|x| x == "-append").unwrap() + 1];
        assert_eq!(append, "console=ttyS0 reboot=t panic=-1 quiet rdinit=/init tsc_early_khz=2599998 loglevel=4");
        let k = args(&cfg(), true, None).join(" ");
        assert!(k.contains("-accel kvm -cpu host"), "{k}");
        assert!(!k.contains("tsc_early_khz"));
    }

    #[test]
    fn parses_cpu_mhz() {
        assert_eq!(parse_cpu_mhz("processor\t: 0\ncpu MHz\t\t: 2599.998\ncpu MHz : 1.0\n"), Some(2599998));
        assert_eq!(parse_cpu_mhz("processor\t: 0\n"), None);
    }
}
