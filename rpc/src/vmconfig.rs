//! [`VmConfig`]: what a worker asks its vmm to run, the Rust form of
//! internal.capnp's `VmConfig`. It lives here, not in the vmm crate, so the
//! worker builds one without linking a hypervisor; the worker writes it
//! into the vmm's config memfd ([`crate::spawn::config_fd`]) and the vmm
//! reads it back ([`VmConfig::read_from`]).

use crate::error::path_text;
use capvisor_schema::capvisor_capnp::Engine;
use capvisor_schema::internal_capnp::vm_config;
use std::path::PathBuf;

/// Most disks one VM may have.
pub const MAX_DISKS: usize = 8;

/// A raw disk image for a VM (virtio-blk, VIRTIO 1.2 section 5.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Absolute path of the raw image on the host.
    pub path: PathBuf,
    /// Attach read-only: guest writes fail (the device offers VIRTIO_BLK_F_RO).
    pub read_only: bool,
}

/// One VM's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// VM name (for logs and the guest's view; not a path component the vmm trusts).
    pub name: String,
    /// The VM's private directory (created by the worker, or by the vmm if
    /// missing): `console.log` (the serial console) lives there.
    pub run_dir: PathBuf,
    /// Uncompressed ELF kernel.
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs.
    pub initramfs: PathBuf,
    /// Guest memory, MiB (at least 64).
    pub memory_mib: u32,
    /// Virtual CPUs (1 to 64).
    pub vcpus: u32,
    /// Engine: `Auto` (see [`crate::host::resolve_engine`]), `Qemu` (QEMU
    /// microvm, KVM acceleration when usable, else TCG), or `Kvm`
    /// (capvisor's own VMM in the vmm process).
    pub engine: Engine,
    /// Appended to the kernel command line (one line).
    pub extra_cmdline: String,
    /// Raw disk images attached as virtio-blk devices, in order: the guest
    /// sees them as /dev/vda, /dev/vdb, ... (at most [`MAX_DISKS`]).
    pub disks: Vec<Disk>,
    /// How the vmm confines the QEMU it starts (engine `qemu`; the `kvm`
    /// engine confines itself). Default: every layer.
    pub confine: QemuConfinement,
    /// Give the guest the virtio-serial port `capvisor.egress` on the
    /// socket the vmm inherits as `--egress-fd` (the session's egress
    /// proxy holds the other end). false: no network at all.
    pub egress: bool,
}

/// The confinement layers the vmm applies to QEMU (docs/vmm-confinement.md),
/// as the worker decided them from the manifest's `[confinement]` and what
/// the host offers. A layer to apply that cannot be applied stops the VM
/// (it is `crashed` with the reason). Schema: `VmConfig.skipNetns`,
/// `skipLandlock` (inverted, so a message without them fails closed), `cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfinement {
    /// Start QEMU in a fresh network namespace.
    pub netns: bool,
    /// Start QEMU under the Landlock ruleset for its VM.
    pub landlock: bool,
    /// The VM's cgroup directories (the worker put the vmm there; QEMU
    /// inherits them), for the report; empty when the VM has none.
    pub cgroup: Vec<PathBuf>,
}

impl Default for QemuConfinement {
    fn default() -> Self {
        Self { netns: true, landlock: true, cgroup: Vec::new() }
    }
}

/// Manifest `[confinement]` as the broker hands it to a worker (schema
/// `Confinement` in `SessionContext`): which layers every VM must get.
/// Default: all required, cgroups under `/sys/fs/cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confinement {
    /// A VM must be in a cgroup with memory and pids limits.
    pub cgroup: bool,
    /// QEMU must run in a fresh network namespace.
    pub netns: bool,
    /// QEMU must run under Landlock.
    pub landlock: bool,
    /// Where cgroup file systems are mounted (`[confinement] cgroup_root`).
    pub cgroup_root: PathBuf,
}

impl Default for Confinement {
    fn default() -> Self {
        Self { cgroup: true, netns: true, landlock: true, cgroup_root: "/sys/fs/cgroup".into() }
    }
}

impl Confinement {
    /// Encodes into a schema `Confinement`.
    ///
    /// Errors: the root is not UTF-8.
    pub fn write_to(&self, mut b: capvisor_schema::internal_capnp::confinement::Builder<'_>) -> capnp::Result<()> {
        b.set_cgroup_optional(!self.cgroup);
        b.set_netns_optional(!self.netns);
        b.set_landlock_optional(!self.landlock);
        b.set_cgroup_root(path_text(&self.cgroup_root)?);
        Ok(())
    }

    /// Decodes a schema `Confinement` (an empty root means the default).
    ///
    /// Errors: non-UTF-8 text.
    pub fn read_from(r: capvisor_schema::internal_capnp::confinement::Reader<'_>) -> capnp::Result<Self> {
        let root = crate::error::text(r.get_cgroup_root())?;
        Ok(Self {
            cgroup: !r.get_cgroup_optional(),
            netns: !r.get_netns_optional(),
            landlock: !r.get_landlock_optional(),
            cgroup_root: if root.is_empty() { Self::default().cgroup_root } else { root.into() },
        })
    }
}

fn path(t: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<PathBuf> {
    Ok(PathBuf::from(crate::error::text(t)?))
}

impl VmConfig {
    /// Encodes into a schema `VmConfig`.
    ///
    /// Errors: a path is not UTF-8.
    pub fn write_to(&self, mut b: vm_config::Builder<'_>) -> capnp::Result<()> {
        b.set_name(self.name.as_str());
        b.set_run_dir(path_text(&self.run_dir)?);
        b.set_kernel(path_text(&self.kernel)?);
        b.set_initramfs(path_text(&self.initramfs)?);
        b.set_memory_mib(self.memory_mib);
        b.set_vcpus(self.vcpus);
        b.set_engine(self.engine);
        b.set_extra_cmdline(self.extra_cmdline.as_str());
        let mut disks = b.reborrow().init_disks(self.disks.len() as u32);
        for (i, d) in self.disks.iter().enumerate() {
            let mut e = disks.reborrow().get(i as u32);
            e.set_path(path_text(&d.path)?);
            e.set_read_only(d.read_only);
        }
        b.set_skip_netns(!self.confine.netns);
        b.set_skip_landlock(!self.confine.landlock);
        b.set_egress(self.egress);
        let mut cg = b.init_cgroup(self.confine.cgroup.len() as u32);
        for (i, d) in self.confine.cgroup.iter().enumerate() {
            cg.set(i as u32, path_text(d)?);
        }
        Ok(())
    }

    /// Decodes a schema `VmConfig` (then call [`VmConfig::validate`]).
    ///
    /// Errors: a missing or malformed field, non-UTF-8 text, an unknown engine.
    pub fn read_from(r: vm_config::Reader<'_>) -> capnp::Result<Self> {
        let mut disks = Vec::new();
        for d in r.get_disks()?.iter() {
            disks.push(Disk { path: path(d.get_path())?, read_only: d.get_read_only() });
        }
        let mut cgroup = Vec::new();
        for d in r.get_cgroup()?.iter() {
            cgroup.push(path(d)?);
        }
        Ok(Self {
            name: crate::error::text(r.get_name())?,
            run_dir: path(r.get_run_dir())?,
            kernel: path(r.get_kernel())?,
            initramfs: path(r.get_initramfs())?,
            memory_mib: r.get_memory_mib(),
            vcpus: r.get_vcpus(),
            engine: r.get_engine()?,
            extra_cmdline: crate::error::text(r.get_extra_cmdline())?,
            disks,
            confine: QemuConfinement { netns: !r.get_skip_netns(), landlock: !r.get_skip_landlock(), cgroup },
            egress: r.get_egress(),
        })
    }

    /// A config message, for [`crate::spawn::config_fd`].
    ///
    /// Errors: as [`VmConfig::write_to`].
    pub fn to_message(&self) -> capnp::Result<capnp::message::Builder<capnp::message::HeapAllocator>> {
        let mut m = capnp::message::Builder::new_default();
        self.write_to(m.init_root())?;
        Ok(m)
    }

    /// Checks values that do not need the file system: memory, vCPUs,
    /// command line, disks.
    ///
    /// Errors: the first value out of range, named.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.memory_mib >= 64, "memory_mib must be at least 64 (got {})", self.memory_mib);
        anyhow::ensure!((1..=64).contains(&self.vcpus), "vcpus must be 1..=64 (got {})", self.vcpus);
        anyhow::ensure!(!self.extra_cmdline.contains('\n'), "extra_cmdline must be one line");
        anyhow::ensure!(self.disks.len() <= MAX_DISKS, "at most {MAX_DISKS} disks (got {})", self.disks.len());
        for d in &self.disks {
            anyhow::ensure!(d.path.is_absolute(), "disk path {} must be absolute", d.path.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmConfig {
        VmConfig {
            name: "vm1".into(),
            run_dir: "/tmp/r".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            memory_mib: 256,
            vcpus: 1,
            engine: Engine::Qemu,
            extra_cmdline: "quiet".into(),
            disks: vec![Disk { path: "/d".into(), read_only: true }],
            confine: QemuConfinement { netns: false, landlock: true, cgroup: vec!["/sys/fs/cgroup/x/vm-1".into()] },
            egress: true,
        }
    }

    #[test]
    fn schema_round_trip() {
        let c = sample();
        let m = c.to_message().unwrap();
        let back = VmConfig::read_from(m.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(back, c);
        back.validate().unwrap();
        let relaxed = Confinement { netns: false, cgroup_root: "/elsewhere".into(), ..Default::default() };
        let mut m = capnp::message::Builder::new_default();
        relaxed.write_to(m.init_root()).unwrap();
        assert_eq!(Confinement::read_from(m.get_root_as_reader().unwrap()).unwrap(), relaxed);
    }

    /// A message that says nothing about confinement asks for all of it.
    #[test]
    fn missing_confinement_fields_fail_closed() {
        let mut m = capnp::message::Builder::new_default();
        m.init_root::<vm_config::Builder>().set_name("x");
        let c = VmConfig::read_from(m.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(c.confine, QemuConfinement::default());
        assert!(c.confine.netns && c.confine.landlock);
        let mut m = capnp::message::Builder::new_default();
        m.init_root::<capvisor_schema::internal_capnp::confinement::Builder>();
        assert_eq!(Confinement::read_from(m.get_root_as_reader().unwrap()).unwrap(), Confinement::default());
    }

    #[test]
    fn validation() {
        assert!(VmConfig { memory_mib: 1, ..sample() }.validate().is_err());
        assert!(VmConfig { vcpus: 0, ..sample() }.validate().is_err());
        assert!(VmConfig { extra_cmdline: "a\nb".into(), ..sample() }.validate().is_err());
        let rel = VmConfig { disks: vec![Disk { path: "rel".into(), read_only: false }], ..sample() };
        assert!(rel.validate().unwrap_err().to_string().contains("absolute"));
    }
}
