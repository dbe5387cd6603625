//! Compiles `capnp/*.capnp` with the `capnp` tool (Debian package
//! `capnproto`, 0.9+) and the capnpc-rust code generator.

fn main() {
    let files = ["common.capnp", "guest.capnp", "capvisor.capnp", "internal.capnp"];
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix("capnp");
    for f in files {
        let path = format!("capnp/{f}");
        println!("cargo:rerun-if-changed={path}");
        cmd.file(path);
    }
    if let Err(e) = cmd.run() {
        panic!(
            "capnp schema compile failed: {e}\n\
             The `capnp` compiler must be on PATH (Debian: apt-get install capnproto)."
        );
    }
}
