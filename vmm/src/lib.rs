//! capvisor-vmm: one process per VM (docs/processes.md).
//!
//! - [`image`]: builds the guest base image (kernel + initramfs) from Debian
//!   packages and the guest-init binary, cached by content.
//! - [`VmConfig`]: what the worker asks the vmm to run (JSON in the
//!   environment variable [`CONFIG_ENV`]).
//! - [`qemu`]: the `qemu` engine (QEMU `-M microvm` driven over QMP).
//! - [`kvm_engine`]: the `kvm` engine (capvisor's own VMM, crate
//!   `capvisor-kvm`, inside this process, confined by Landlock + seccomp).
//! - [`machine`]: the `Machine` capability the vmm serves to its worker.
//!
//! The `capvisor-vmm` binary (src/main.rs) ties them together:
//! `capvisor-vmm --rpc-fd 3 --agent-fd 4`, config in `CAPVISOR_VMM_CONFIG`.

pub mod image;
pub mod kvm_engine;
pub mod machine;
pub mod qemu;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Environment variable carrying the JSON [`VmConfig`].
pub const CONFIG_ENV: &str = "CAPVISOR_VMM_CONFIG";

/// One VM's configuration, passed by the worker as JSON in [`CONFIG_ENV`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM name (for logs and the guest's view; not a path component the vmm trusts).
    pub name: String,
    /// The VM's private directory (created by the worker, or by the vmm if
    /// missing): `console.log` (the serial console) lives there.
    pub run_dir: PathBuf,
    /// Uncompressed ELF kernel (`BuiltImage::kernel`).
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs (`BuiltImage::initramfs`).
    pub initramfs: PathBuf,
    /// Guest memory, MiB (at least 64).
    pub memory_mib: u32,
    /// Virtual CPUs (at least 1).
    pub vcpus: u32,
    /// Engine: `"auto"` (see [`use_kvm_engine`]), `"qemu"` (QEMU microvm,
    /// KVM acceleration when [`host_kvm_usable`], else TCG), or `"kvm"`
    /// (capvisor's own VMM in this process).
    #[serde(default = "default_engine")]
    pub engine: String,
    /// Appended to the kernel command line.
    #[serde(default)]
    pub extra_cmdline: String,
    /// Raw disk images attached as virtio-blk devices, in order: the guest
    /// sees them as /dev/vda, /dev/vdb, ... (at most [`MAX_DISKS`]).
    #[serde(default)]
    pub disks: Vec<Disk>,
}

/// Most disks one VM may have.
pub const MAX_DISKS: usize = 8;

/// A raw disk image for a VM (virtio-blk, VIRTIO 1.2 section 5.2).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Absolute path of the raw image on the host.
    pub path: PathBuf,
    /// Attach read-only: guest writes fail (the device offers VIRTIO_BLK_F_RO).
    #[serde(default)]
    pub read_only: bool,
}

fn default_engine() -> String {
    "auto".into()
}

impl VmConfig {
    /// Reads the config from [`CONFIG_ENV`].
    ///
    /// Errors: the variable is missing or is not a valid `VmConfig` JSON.
    pub fn from_env() -> anyhow::Result<Self> {
        let text = std::env::var(CONFIG_ENV).map_err(|_| anyhow::anyhow!("{CONFIG_ENV} is not set"))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{CONFIG_ENV}: {e}"))
    }

    /// Checks values that do not need the file system: memory, vCPUs, engine name.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.memory_mib >= 64, "memory_mib must be at least 64 (got {})", self.memory_mib);
        anyhow::ensure!((1..=64).contains(&self.vcpus), "vcpus must be 1..=64 (got {})", self.vcpus);
        anyhow::ensure!(
            matches!(self.engine.as_str(), "auto" | "qemu" | "kvm"),
            "unknown engine {:?} (known: auto, qemu, kvm)",
            self.engine
        );
        anyhow::ensure!(!self.extra_cmdline.contains('\n'), "extra_cmdline must be one line");
        anyhow::ensure!(self.disks.len() <= MAX_DISKS, "at most {MAX_DISKS} disks (got {})", self.disks.len());
        for d in &self.disks {
            anyhow::ensure!(d.path.is_absolute(), "disk path {} must be absolute", d.path.display());
        }
        Ok(())
    }
}

/// Which engine runs a VM asking for `engine`: `"kvm"` -> ours, `"qemu"`
/// -> QEMU, `"auto"` -> ours where [`host_kvm_usable`] (hardware-backed
/// `/dev/kvm`), else QEMU with TCG. `CAPVISOR_ENGINE_AUTO=kvm|qemu`
/// overrides what `auto` means (operators, and tests of the fallback path).
pub fn use_kvm_engine(engine: &str) -> bool {
    match engine {
        "kvm" => true,
        "qemu" => false,
        _ => match std::env::var("CAPVISOR_ENGINE_AUTO").as_deref() {
            Ok("kvm") => true,
            Ok("qemu") => false,
            _ => host_kvm_usable(),
        },
    }
}

/// Whether hardware KVM is usable for booting a Linux guest here: `/dev/kvm`
/// opens read-write and the kernel module `kvm_pvm` is NOT loaded
/// (`/sys/module/kvm_pvm`). Under kvm_pvm, a paging-based nested
/// hypervisor, an unmodified Linux kernel dies early in boot with a KVM
/// emulation failure (DESIGN.md, "Machines we build on"), so TCG is used.
pub fn host_kvm_usable() -> bool {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    kvm && !std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_round_trip_and_defaults() {
        let j = r#"{"name":"vm1","run_dir":"/tmp/r","kernel":"/k","initramfs":"/i","memory_mib":256,"vcpus":1}"#;
        let c: VmConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c.engine, "auto");
        assert_eq!(c.extra_cmdline, "");
        c.validate().unwrap();
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let bad = VmConfig { engine: "xen".into(), ..c.clone() };
        assert!(bad.validate().unwrap_err().to_string().contains("xen"));
        let bad = VmConfig { memory_mib: 1, ..c };
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<VmConfig>(&j.replace("}", r#","bogus":1}"#)).is_err());
    }

    #[test]
    fn kvm_pvm_host_is_not_usable() {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            assert!(!host_kvm_usable());
        }
    }
}
