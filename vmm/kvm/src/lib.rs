//! capvisor-kvm: capvisor's own KVM engine.
//!
//! The engine boots small x86_64 guests (and, where KVM is hardware-backed, a
//! Linux microVM kernel) on the rust-vmm crates: `kvm-ioctls`/`kvm-bindings`
//! for the hypervisor, `vm-memory` for guest memory, `linux-loader` for
//! kernel images and the zero page, `vm-superio` for the legacy devices.
//!
//! Module map:
//!
//! | module | what |
//! |---|---|
//! | [`acpi`] | ACPI tables (RSDP, XSDT, hardware-reduced FADT, MADT, DSDT with virtio-mmio `LNRO0005` devices) and the PM register for reset / S5 power-off |
//! | [`hypervisor`] | the small trait boundary (create VM, add memory, create vCPU, run -> [`hypervisor::VcpuExit`]) and its KVM implementation |
//! | [`memory`] | guest RAM on `GuestMemoryMmap`, split around the 32-bit MMIO gap |
//! | [`boot`] | x86_64 boot: GDT, identity page tables, 64-bit register state, zero page, kernel + initramfs loading |
//! | [`bus`] | PIO and MMIO address buses with range registration and overlap rejection |
//! | [`vcpu`] | one thread per vCPU, exit dispatch to the buses, typed stop reasons |
//! | [`vm`] | the assembled machine: [`vm::VmBuilder`] -> [`vm::Vm`] (run / wait / pause / resume / stop -> [`vm::VmExit`]), irqfd + ioeventfd wiring, boot timer figures |
//! | [`devices`] | the [`devices::Device`] trait and one folder per device: `serial`, `i8042`, `boot_timer`, `virtio` (mmio transport + split virtqueue, and the virtio devices `virtio/console` (multiport, the `capvisor.agent` port) and `virtio/block` (raw image)) |
//! | [`sandbox`] | confinement of the vmm process: Landlock paths + seccomp allowlists per thread kind (docs/vmm-confinement.md) |
//! | `fuzz_harness`, `fuzz_block` | only under `cfg(fuzzing)` (set by cargo-fuzz) or `cfg(test)`, not in a normal build: fuzz entry points (virtqueue, mmio, block requests, console control) with deterministic PRNG tests that run in every `cargo test`; the cargo-fuzz targets in `fuzz/fuzz_targets/` call them |
//!
//! Everything a guest can write (port/MMIO accesses, virtqueue contents) is
//! treated as hostile: no path in this crate panics on guest-controlled input.

#![deny(missing_docs)]
// `u64::is_multiple_of` needs Rust 1.87; the workspace declares 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod devices;
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzz_block;
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzz_harness;
pub mod hypervisor;
pub mod memory;
pub mod vcpu;
pub mod vm;

pub mod sandbox;
#[cfg(test)]
pub(crate) mod testutil;
