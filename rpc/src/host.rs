//! Facts about the host that several processes need, without linking a
//! hypervisor crate: whether hardware KVM can boot a Linux guest here, and
//! so which engine `auto` means.

use capvisor_schema::capvisor_capnp::Engine;

/// Whether hardware KVM is usable for booting a Linux guest here: `/dev/kvm`
/// opens read-write and the kernel module `kvm_pvm` is NOT loaded
/// (`/sys/module/kvm_pvm`). Under kvm_pvm, a paging-based nested
/// hypervisor, an unmodified Linux kernel dies early in boot with a KVM
/// emulation failure (DESIGN.md, "Machines we build on"), so TCG is used.
pub fn host_kvm_usable() -> bool {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    kvm && !kvm_pvm()
}

/// Whether `/dev/kvm` is kvm_pvm's nested, paging-based hypervisor.
pub fn kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The engine that runs a VM asking for `engine`: `Kvm` and `Qemu` as
/// asked; `Auto` -> `auto_means` when the operator pinned it (manifest
/// `[vms] auto_engine`, anything but `Auto`), else `Kvm` where
/// [`host_kvm_usable`] and `Qemu` (TCG) elsewhere.
pub fn resolve_engine(engine: Engine, auto_means: Engine) -> Engine {
    match (engine, auto_means) {
        (Engine::Auto, Engine::Auto) if host_kvm_usable() => Engine::Kvm,
        (Engine::Auto, Engine::Auto) => Engine::Qemu,
        (Engine::Auto, pinned) => pinned,
        (asked, _) => asked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution() {
        assert_eq!(resolve_engine(Engine::Qemu, Engine::Kvm), Engine::Qemu);
        assert_eq!(resolve_engine(Engine::Kvm, Engine::Qemu), Engine::Kvm);
        assert_eq!(resolve_engine(Engine::Auto, Engine::Kvm), Engine::Kvm);
        assert_eq!(resolve_engine(Engine::Auto, Engine::Qemu), Engine::Qemu);
        let detected = resolve_engine(Engine::Auto, Engine::Auto);
        assert_eq!(detected == Engine::Kvm, host_kvm_usable());
        if kvm_pvm() {
            assert_eq!(detected, Engine::Qemu);
        }
    }
}
