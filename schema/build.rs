//! Compiles `capnp/*.capnp` with the `capnp` tool (Debian package
//! `capnproto`, 0.9+) and the capnpc-rust code generator, and keeps the
//! compiler's raw `CodeGeneratorRequest` (schema.capnp) as
//! `$OUT_DIR/schema.bin`: every node of the four files and their imports
//! with its doc comments (`sourceInfo`), read at run time by
//! `capvisor_schema::reflect`.

fn main() {
    let files = ["common.capnp", "guest.capnp", "capvisor.capnp", "internal.capnp"];
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix("capnp");
    cmd.raw_code_generator_request_path(out_dir.join("schema.bin"));
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
