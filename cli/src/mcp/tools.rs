//! The MCP tool catalogue of a session: which tools `capvisor mcp` offers
//! for the caps a session's `CapSet` holds, with their names, descriptions
//! and input JSON Schemas. Pure: it reads the CapSet entries and the
//! embedded schema (`capvisor_schema::reflect`), sends nothing.
//!
//! - One *cap tool* per method of each entry whose interface the embedded
//!   schema knows, named `<cap>_<method>` (MCP tool names are
//!   `[A-Za-z0-9_-]{1,64}`; other characters become `_`, and a name over
//!   64 characters is cut and given a hash suffix). Its input schema is the
//!   JSON Schema of the method's parameter struct, its description the
//!   method's doc comment (first paragraph) and `Interface.method on cap
//!   "name"`.
//! - The *high-level tools* `vm_create` (needs a `VmFactory` entry) and
//!   `vm_exec`, `file_read`, `file_write` (need a `VmFactory` entry, whose
//!   VMs they reach by name, or at least one `Vm` entry, which counts as a
//!   VM by its entry name).
//!
//! A cap tool whose name equals a high-level tool's (a `Vm` entry named
//! `vm` has a method `exec`) is renamed `<cap>__<method>`: the high-level
//! tool keeps its name.

use capvisor_client::ops::CapInfo;
use capvisor_schema::reflect::{self, schema};
use serde_json::{json, Value};

/// The longest tool name MCP clients accept.
pub const MAX_TOOL_NAME: usize = 64;

/// Interface name of the VM factory (schema `VmFactory`).
pub const VM_FACTORY: &str = "VmFactory";
/// Interface name of a VM (schema `Vm`).
pub const VM: &str = "Vm";

/// What a tool does when called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolKind {
    /// `vm_create`: `VmFactory.create` on the factory entry `factory`, then
    /// `Vm.info` once it booted.
    VmCreate {
        /// CapSet name of the `VmFactory` entry.
        factory: String,
    },
    /// `vm_exec`: run a command to completion, collecting its output.
    VmExec,
    /// `file_read`: a window of a guest file.
    FileRead,
    /// `file_write`: create or replace a guest file.
    FileWrite,
    /// `<cap>_<method>`: one method of one CapSet entry, called by name
    /// through schema reflection.
    Cap {
        /// CapSet entry name.
        cap: String,
        /// Its interface id.
        interface_id: u64,
        /// Method name (lower camel case, as in the schema).
        method: String,
    },
}

/// One tool of the catalogue.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolDef {
    /// Tool name (`[A-Za-z0-9_-]{1,64}`, unique in the catalogue).
    pub name: String,
    /// What it does, for the model and the user.
    pub description: String,
    /// JSON Schema (an object schema) of its arguments.
    pub input_schema: Value,
    /// JSON Schema of its structured result (MCP `outputSchema`), for the
    /// high-level tools; cap tools have none (their results follow the
    /// method's result struct, see the description).
    pub output_schema: Option<Value>,
    /// MCP tool annotations (hints for the client), for the high-level
    /// tools; cap tools have none.
    pub hints: Option<Hints>,
    /// What calling it does.
    pub kind: ToolKind,
}

/// MCP `ToolAnnotations` hints: whether a tool only reads, may destroy
/// or overwrite, and gives the same result when repeated. None reaches
/// outside capvisor (`openWorldHint: false`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hints {
    /// Reads only (`readOnlyHint`).
    pub read_only: bool,
    /// May destroy or overwrite (`destructiveHint`).
    pub destructive: bool,
    /// Repeating it changes nothing more (`idempotentHint`).
    pub idempotent: bool,
}

/// The tools of a session, and which VMs the high-level tools can reach.
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    /// Every tool, high-level ones first, then cap tools in CapSet order.
    pub tools: Vec<ToolDef>,
    /// CapSet names of the `Vm` entries (each a VM by its entry name).
    pub vm_caps: Vec<String>,
    /// CapSet name of the `VmFactory` entry the high-level tools use (the
    /// first one), if any.
    pub factory: Option<String>,
    /// Entries whose interface this binary's schema does not know (no cap
    /// tools for them), as `name (Interface)`.
    pub unknown: Vec<String>,
    /// Every CapSet entry: (name, interface id), what a capability
    /// parameter of a cap tool may name.
    pub entries: Vec<(String, u64)>,
}

impl Catalogue {
    /// The catalogue for these CapSet entries.
    pub fn build(caps: &[CapInfo]) -> Catalogue {
        let mut c = Catalogue {
            factory: caps.iter().find(|e| e.interface_name == VM_FACTORY).map(|e| e.name.clone()),
            vm_caps: caps.iter().filter(|e| e.interface_name == VM).map(|e| e.name.clone()).collect(),
            entries: caps.iter().map(|e| (e.name.clone(), e.interface_id)).collect(),
            ..Default::default()
        };
        c.tools = high_level(c.factory.as_deref(), &c.vm_caps);
        let reserved: Vec<String> = c.tools.iter().map(|t| t.name.clone()).collect();
        for e in caps {
            let Some(iface) = schema().interface(e.interface_id) else {
                c.unknown.push(format!("{} ({})", e.name, e.interface_name));
                continue;
            };
            for m in &iface.methods {
                let mut name = tool_name(&e.name, &m.name, "_");
                if reserved.contains(&name) {
                    name = tool_name(&e.name, &m.name, "__");
                }
                if c.tools.iter().any(|t| t.name == name) {
                    // Two entries whose names sanitize alike: keep both, distinguishably.
                    name = tool_name(&format!("{}_{}", e.name, c.tools.len()), &m.name, "_");
                }
                debug_assert!(valid_tool_name(&name), "{name}");
                let mut input_schema = reflect::json_schema(m.params.id).unwrap_or_else(|| json!({"type": "object"}));
                if let Some(o) = input_schema.as_object_mut() {
                    // The method's parameters are the tool's arguments; the
                    // `$schema` keyword stays (draft 2020-12, as MCP says).
                    o.entry("type").or_insert(json!("object"));
                }
                let description = cap_tool_description(&e.name, iface, m);
                c.tools.push(ToolDef {
                    name,
                    description,
                    input_schema,
                    output_schema: None,
                    hints: None,
                    kind: ToolKind::Cap { cap: e.name.clone(), interface_id: e.interface_id, method: m.name.clone() },
                });
            }
        }
        c
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<&ToolDef> {
        self.tools.iter().find(|t| t.name == name)
    }
}

/// A cap tool's description: the method's doc comment (first paragraph),
/// then where it comes from (`Interface.method on cap "name"`, with the
/// interface's own doc line) and what it returns (result fields and their
/// schema types).
fn cap_tool_description(cap: &str, iface: &reflect::Interface, m: &reflect::Method) -> String {
    let mut d = first_paragraph(&m.doc);
    if !d.is_empty() {
        d.push_str("\n\n");
    }
    d.push_str(&format!("{}.{} on cap \"{cap}\"", iface.name, m.name));
    let idoc = reflect::first_line(&iface.doc);
    if !idoc.is_empty() {
        d.push_str(&format!(" ({})", idoc.trim_end_matches('.')));
    }
    if m.streaming {
        d.push_str(". A streaming method: it returns {}.");
    } else if m.results.fields.is_empty() {
        d.push_str(". Returns {} when done.");
    } else {
        let fields: Vec<String> = m.results.fields.iter().map(|f| format!("{}: {}", f.name, f.ty.display())).collect();
        d.push_str(&format!(". Returns JSON {{{}}}", fields.join(", ")));
        if m.results.fields.iter().any(|f| matches!(f.ty, reflect::TypeInfo::Interface { .. })) {
            d.push_str("; a capability shows as {\"$cap\": Interface}");
        }
        d.push('.');
    }
    d
}

/// The first paragraph of a doc comment, its lines joined by spaces.
pub fn first_paragraph(doc: &str) -> String {
    doc.trim()
        .split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `<cap><sep><method>` as an MCP tool name: characters outside
/// `[A-Za-z0-9_-]` become `_`; over [`MAX_TOOL_NAME`] characters the name
/// is cut and ends in `-` and 8 hex digits of a hash of the full name
/// (FNV-1a, stable across runs), so cut names stay distinct.
pub fn tool_name(cap: &str, method: &str, sep: &str) -> String {
    let full = format!("{cap}{sep}{method}");
    let clean: String =
        full.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    if clean.len() <= MAX_TOOL_NAME {
        return clean;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in full.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("{}-{h:08x}", &clean[..MAX_TOOL_NAME - 9])
}

/// Whether `name` is a valid MCP tool name.
pub fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOOL_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Where the high-level tools find VMs, for their descriptions.
fn vm_reach(factory: Option<&str>, vm_caps: &[String]) -> String {
    let caps = if vm_caps.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = vm_caps.iter().map(|n| format!("\"{n}\"")).collect();
        format!("the session's Vm caps ({})", names.join(", "))
    };
    match (factory, caps.is_empty()) {
        (Some(f), true) => format!("any VM of VmFactory cap \"{f}\", by name"),
        (Some(f), false) => format!("{caps}, or any VM of VmFactory cap \"{f}\", by name"),
        (None, _) => caps,
    }
}

/// An object schema whose properties all are required, each of a JSON
/// type (`"integer|null"`: either).
fn object(props: &[(&str, &str)]) -> Value {
    let properties: serde_json::Map<String, Value> = props
        .iter()
        .map(|(k, t)| {
            let ty = match t.split_once('|') {
                Some((a, b)) => json!([a, b]),
                None => json!(t),
            };
            (k.to_string(), json!({ "type": ty }))
        })
        .collect();
    let required: Vec<&str> = props.iter().map(|(k, _)| *k).collect();
    json!({"type": "object", "properties": properties, "required": required})
}

fn high_level(factory: Option<&str>, vm_caps: &[String]) -> Vec<ToolDef> {
    let mut out = Vec::new();
    if let Some(f) = factory {
        out.push(ToolDef {
            name: "vm_create".into(),
            description: format!(
                "Create and boot a Linux microVM (VmFactory.create on cap \"{f}\"); returns its facts once \
                 the guest answers. Then run commands in it with vm_exec."
            ),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,31}$",
                             "description": "VM name, unique in the session; empty or absent: generated"},
                    "image": {"type": "string", "description": "Image name (`base`: busybox, fast; `debian`: \
                              Debian 12 with python3, git, ...); absent: base"},
                    "memory_mib": {"type": "integer", "minimum": 0, "maximum": 4294967295u64,
                                   "description": "Guest memory in MiB; 0 or absent: the profile's default"},
                },
                "additionalProperties": false,
            }),
            output_schema: Some(object(&[
                ("name", "string"),
                ("image", "string"),
                ("memoryMib", "integer"),
                ("vcpus", "integer"),
                ("state", "string"),
                ("engine", "string"),
                ("kernelRelease", "string"),
                ("bootMs", "integer"),
            ])),
            hints: Some(Hints { read_only: false, destructive: false, idempotent: false }),
            kind: ToolKind::VmCreate { factory: f.into() },
        });
    }
    if factory.is_none() && vm_caps.is_empty() {
        return out;
    }
    let reach = vm_reach(factory, vm_caps);
    let vm = json!({"type": "string", "description": format!("The VM: {reach}")});
    out.push(ToolDef {
        name: "vm_exec".into(),
        description: format!(
            "Run a command in a VM to completion and return its stdout, stderr and exit code (Vm.exec + \
             Process.wait). VMs: {reach}. Each output stream is cut at the server's --max-output bound \
             with a marker; for long output redirect it to a file in the guest and read that with \
             file_read. Sends progress notifications with the output as it arrives when the request \
             carries a progress token."
        ),
        input_schema: json!({
            "type": "object",
            "properties": {
                "vm": vm,
                "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                         "description": "Program and arguments; argv[0] is looked up in the guest's PATH \
                                         (e.g. [\"sh\", \"-c\", \"ls /\"])"},
                "stdin": {"type": "string", "description": "Text written to the command's stdin (then closed)"},
                "timeout_secs": {"type": "number", "exclusiveMinimum": 0,
                                 "description": "Kill the command (SIGKILL) after this many seconds; default 300"},
                "cwd": {"type": "string", "description": "Working directory; default / (or the user's home)"},
                "user": {"type": "string", "description": "Guest user (name or uid); default root"},
                "env": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Extra environment variables"},
            },
            "required": ["vm", "argv"],
            "additionalProperties": false,
        }),
        output_schema: Some(object(&[
            ("exitCode", "integer|null"),
            ("signal", "integer|null"),
            ("timedOut", "boolean"),
            ("stdout", "string"),
            ("stderr", "string"),
            ("stdoutBytes", "integer"),
            ("stderrBytes", "integer"),
            ("stdoutTruncated", "boolean"),
            ("stderrTruncated", "boolean"),
        ])),
        hints: Some(Hints { read_only: false, destructive: true, idempotent: false }),
        kind: ToolKind::VmExec,
    });
    out.push(ToolDef {
        name: "file_read".into(),
        description: format!(
            "Read a guest file (Files.read): up to max_bytes from byte offset `offset`, as text (base64 \
             when not UTF-8), with the file's total size; a marker says which offset to read next. VMs: \
             {reach}."
        ),
        input_schema: json!({
            "type": "object",
            "properties": {
                "vm": vm,
                "path": {"type": "string", "description": "Absolute guest path"},
                "offset": {"type": "integer", "minimum": 0, "description": "First byte to return; default 0"},
                "max_bytes": {"type": "integer", "minimum": 1,
                              "description": "At most this many bytes; default (and at most) --max-output"},
            },
            "required": ["vm", "path"],
            "additionalProperties": false,
        }),
        output_schema: Some(object(&[
            ("path", "string"),
            ("offset", "integer"),
            ("bytes", "integer"),
            ("size", "integer"),
            ("eof", "boolean"),
            ("encoding", "string"),
            ("content", "string"),
        ])),
        hints: Some(Hints { read_only: true, destructive: false, idempotent: true }),
        kind: ToolKind::FileRead,
    });
    out.push(ToolDef {
        name: "file_write".into(),
        description: format!(
            "Create or replace a guest file with `content` (Files.write; atomic: the old file stays until \
             the new one is complete). VMs: {reach}."
        ),
        input_schema: json!({
            "type": "object",
            "properties": {
                "vm": vm,
                "path": {"type": "string", "description": "Absolute guest path"},
                "content": {"type": "string", "description": "The file's content (UTF-8 text, or base64 with \
                                                              base64: true)"},
                "base64": {"type": "boolean", "description": "content is base64; default false"},
                "mode": {"type": "integer", "minimum": 0, "maximum": 4095,
                         "description": "Permission bits (e.g. 420 = 0o644, the default; 493 = 0o755)"},
            },
            "required": ["vm", "path", "content"],
            "additionalProperties": false,
        }),
        output_schema: Some(object(&[("path", "string"), ("bytes", "integer"), ("mode", "integer")])),
        hints: Some(Hints { read_only: false, destructive: true, idempotent: true }),
        kind: ToolKind::FileWrite,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp::traits::HasTypeId;
    use capvisor_client::schema::capvisor_capnp::{vm, vm_factory};

    fn entry(name: &str, interface_name: &str, interface_id: u64) -> CapInfo {
        CapInfo { name: name.into(), interface_id, interface_name: interface_name.into(), description: String::new() }
    }

    fn names(c: &Catalogue) -> Vec<&str> {
        c.tools.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn a_single_vm_cap_gets_exec_and_files_but_no_create() {
        let c = Catalogue::build(&[entry("box", VM, vm::Client::TYPE_ID)]);
        let n = names(&c);
        assert_eq!(&n[..3], ["vm_exec", "file_read", "file_write"]);
        assert!(!n.contains(&"vm_create"));
        // One cap tool per Vm method, named box_<method>.
        let iface = schema().interface(vm::Client::TYPE_ID).unwrap();
        let want: Vec<String> = iface.methods.iter().map(|m| format!("box_{}", m.name)).collect();
        assert_eq!(n[3..], want.iter().map(String::as_str).collect::<Vec<_>>()[..]);
        assert_eq!(c.vm_caps, ["box"]);
        assert!(c.get("vm_exec").unwrap().description.contains("\"box\""));
        let exec = c.get("box_exec").unwrap();
        assert_eq!(
            exec.kind,
            ToolKind::Cap { cap: "box".into(), interface_id: vm::Client::TYPE_ID, method: "exec".into() }
        );
        assert!(exec.description.contains("Vm.exec on cap \"box\""), "{}", exec.description);
        assert!(exec.description.contains("Returns JSON {process: Process}"), "{}", exec.description);
        let info = c.get("box_info").unwrap();
        assert!(info.description.contains("(One VM for the capability's whole life)"), "{}", info.description);
        assert_eq!(exec.input_schema["type"], "object");
        assert!(exec.input_schema["properties"]["spec"].is_object(), "{}", exec.input_schema);
    }

    #[test]
    fn a_factory_gets_every_high_level_tool() {
        let c = Catalogue::build(&[entry("vms", VM_FACTORY, vm_factory::Client::TYPE_ID)]);
        let n = names(&c);
        assert_eq!(&n[..4], ["vm_create", "vm_exec", "file_read", "file_write"]);
        assert!(n.contains(&"vms_create") && n.contains(&"vms_list"), "{n:?}");
        assert_eq!(c.get("vm_create").unwrap().kind, ToolKind::VmCreate { factory: "vms".into() });
        assert!(c.get("file_read").unwrap().hints.unwrap().read_only);
        assert!(c.get("vms_list").unwrap().hints.is_none());
        // The doc comment's first paragraph is the description.
        let create = schema().interface(vm_factory::Client::TYPE_ID).unwrap().method("create").unwrap();
        let d = &c.get("vms_create").unwrap().description;
        assert!(d.starts_with(&first_paragraph(&create.doc)), "{d}");
        assert!(!first_paragraph(&create.doc).is_empty());
    }

    #[test]
    fn no_vm_caps_no_high_level_tools_and_unknown_interfaces_are_skipped() {
        let c = Catalogue::build(&[entry("mystery", "Mystery", 0x1234)]);
        assert!(c.tools.is_empty());
        assert_eq!(c.unknown, ["mystery (Mystery)"]);
    }

    #[test]
    fn a_cap_tool_never_shadows_a_high_level_tool() {
        let c = Catalogue::build(&[
            entry("vms", VM_FACTORY, vm_factory::Client::TYPE_ID),
            entry("vm", VM, vm::Client::TYPE_ID),
        ]);
        assert_eq!(c.get("vm_exec").unwrap().kind, ToolKind::VmExec);
        assert!(matches!(c.get("vm__exec").unwrap().kind, ToolKind::Cap { ref method, .. } if method == "exec"));
        let mut n = names(&c);
        let len = n.len();
        n.sort();
        n.dedup();
        assert_eq!(n.len(), len, "tool names are unique");
    }

    #[test]
    fn tool_names_are_valid_and_bounded() {
        assert_eq!(tool_name("vms", "create", "_"), "vms_create");
        assert_eq!(tool_name("my.cap", "get", "_"), "my_cap_get");
        let long = "x".repeat(80);
        let a = tool_name(&long, "list", "_");
        let b = tool_name(&long, "info", "_");
        assert_eq!(a.len(), MAX_TOOL_NAME);
        assert!(valid_tool_name(&a) && valid_tool_name(&b));
        assert_ne!(a, b);
        assert!(!valid_tool_name("a.b") && !valid_tool_name(""));
        // Every tool of every interface is valid for a plain CapSet name.
        for i in schema().interfaces() {
            for m in &i.methods {
                assert!(valid_tool_name(&tool_name("cap", &m.name, "_")), "{}", m.name);
            }
        }
    }

    #[test]
    fn first_paragraph_joins_lines_and_stops_at_a_blank_line() {
        assert_eq!(first_paragraph("One\ntwo.\n\nThree."), "One two.");
        assert_eq!(first_paragraph(""), "");
    }
}
