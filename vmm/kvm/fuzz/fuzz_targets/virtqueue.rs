//! cargo-fuzz target: split virtqueue chain parsing (VIRTIO 1.2 2.7) over
//! arbitrary guest memory and queue configuration. See
//! `capvisor_kvm::fuzz_harness::virtqueue`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;

static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let mem = MEM.get_or_init(capvisor_kvm::fuzz_harness::fuzz_memory);
    capvisor_kvm::fuzz_harness::virtqueue(mem, data);
});
