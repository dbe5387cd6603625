//! cargo-fuzz target: guest register access sequences on a virtio-mmio
//! window (VIRTIO 1.2 4.2.2) whose device consumes its queues on notify.
//! See `capvisor_kvm::fuzz_harness::mmio`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;

static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let mem = MEM.get_or_init(capvisor_kvm::fuzz_harness::fuzz_memory);
    capvisor_kvm::fuzz_harness::mmio(mem, data);
});
