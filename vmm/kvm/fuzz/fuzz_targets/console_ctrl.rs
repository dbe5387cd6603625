//! cargo-fuzz target: virtio-console control messages and port queues
//! (VIRTIO 1.2 5.3.6) driven by an arbitrary program over arbitrary guest
//! memory. See `capvisor_kvm::fuzz_block::fuzz_console_control`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capvisor_kvm::fuzz_block::fuzz_console_control(data);
});
