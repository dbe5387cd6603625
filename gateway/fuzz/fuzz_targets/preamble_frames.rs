//! cargo-fuzz target: arbitrary bytes on a fresh connection to a real
//! in-process gateway (connection preamble, `capvisor_rpc::attach`, then
//! capnp stream framing checked by `capvisor_gateway::guard`). See
//! `../harness.rs` for the properties checked.
#![no_main]

#[path = "../harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::fuzz_one(data);
});
