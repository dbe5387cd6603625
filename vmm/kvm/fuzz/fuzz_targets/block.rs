//! cargo-fuzz target: virtio-blk request parsing and execution (VIRTIO 1.2
//! 5.2.6) over arbitrary guest memory. See
//! `capvisor_kvm::fuzz_block::fuzz_block_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capvisor_kvm::fuzz_block::fuzz_block_request(data);
});
