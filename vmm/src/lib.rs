//! capvisor-vmm: one process per VM (docs/processes.md).
//!
//! - [`VmConfig`]: what the worker asks the vmm to run (schema
//!   `internal.capnp` `VmConfig`, read from the memfd at `--config-fd`;
//!   defined in `capvisor_rpc::vmconfig` so the worker needs no hypervisor crate).
//! - [`engine`]: the [`engine::Engine`] trait every engine implements
//!   (status, stop, kill, pause, resume, wait for the end, console tail),
//!   the one state machine they share ([`engine::Lifecycle`]: starting ->
//!   running <-> paused -> stopped / crashed), the console log, the
//!   [`engine::Failed`] engine for a VM that could not start, and
//!   [`engine::start`], which picks and starts the engine.
//! - [`qemu`]: the `qemu` engine ([`qemu::QemuEngine`]: QEMU `-M microvm`
//!   as a child process, driven over QMP).
//! - [`kvm_engine`]: the `kvm` engine ([`kvm_engine::KvmEngine`]:
//!   capvisor's own VMM, crate `capvisor-kvm`, inside this process,
//!   confined by Landlock + seccomp).
//! - [`machine`]: the `Machine` capability the vmm serves to its worker,
//!   over whichever engine runs the VM.
//!
//! Guest images (kernel + initramfs) are built before a VM is asked for, by
//! the crate `capvisor-images` (`images/`); the vmm only boots them.
//!
//! The `capvisor-vmm` binary (src/main.rs) ties them together:
//! `capvisor-vmm --rpc-fd 3 --agent-fd 4 --config-fd 5`.

pub mod engine;
pub mod kvm_engine;
pub mod machine;
pub mod qemu;

pub use capvisor_rpc::vmconfig::{Disk, VmConfig, MAX_DISKS};
