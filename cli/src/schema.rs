//! `capvisor schema`: the interfaces, methods, parameter and result types
//! and doc comments of the capabilities a session holds, read from the
//! schema embedded in this binary (`capvisor_schema::reflect`), as text or
//! JSON (with the JSON Schema of each method's parameters).

use capvisor_client::{ops, ClientError, ClientResult};
use capvisor_rpc::error::CvError;
use capvisor_schema::reflect::{
    first_line, schema, FieldInfo, Interface, Method, StructInfo, TypeInfo, MAX_STRUCT_DEPTH,
};
use clap::Args;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

/// `--help` text of `capvisor schema`.
pub const ABOUT: &str = "Show the Cap'n Proto interfaces of the capabilities this session holds: \
their methods with parameter and result types, and the doc comments of the schema \
(schema/capnp/*.capnp, embedded in this binary at build time).\n\n\
  capvisor schema              every cap of the session's CapSet, one line per method\n\
  capvisor schema CAP          one cap (a CapSet name such as `vms`, or an interface name such as \
`Vm`, which needs no login) in full: each method's parameter and result fields with types and \
docs, nested structs expanded, and the interfaces its results return (e.g. `vms` -> `Vm` -> \
`Process`), each once\n\
  capvisor schema --all        every interface of the embedded schema, internal ones included \
(no login, no server)\n\n\
--json prints the same as JSON: interfaces, methods (name, ordinal, doc), parameter and result \
structs with typed fields, and for each method `paramsSchema`/`resultsSchema`, JSON Schema \
(draft 2020-12) of its parameters and results. In those schemas a capability is a string naming a \
session-local cap, Data is base64, enums are their enumerant names; Int64/UInt64 are exact in JSON \
only up to 2^53.\n\n\
A doc comment is what the capnp compiler attaches to a declaration: the comment on its line or on \
the lines right after it.";

/// Arguments of `capvisor schema`.
#[derive(Args)]
pub struct SchemaArgs {
    /// A CapSet name (`vms`), or an interface name of the schema (`Vm`)
    #[arg(conflicts_with = "all")]
    cap: Option<String>,
    /// Every interface of the embedded schema; needs no login
    #[arg(long)]
    all: bool,
    /// JSON instead of text
    #[arg(long)]
    json: bool,
}

/// Runs `capvisor schema`; the exit code, or an error: not logged in (21,
/// when a session is needed), notFound (11) for a name that is neither a
/// cap of the session nor an interface of the schema, unavailable (17) for
/// a cap whose interface this binary's schema does not know.
pub async fn run(args: SchemaArgs, socket: &Path) -> ClientResult<i32> {
    let s = schema();
    if args.all {
        let all: Vec<&Interface> = s.interfaces().collect();
        if args.json {
            let v: Vec<Value> = all.iter().map(|i| interface_json(i)).collect();
            emit(&json_text(&json!({ "interfaces": v })));
        } else {
            emit(&all.iter().map(|i| summary(None, i)).collect::<String>());
        }
        return Ok(0);
    }
    if let Some(name) = &args.cap {
        // An interface name needs no session.
        if let Some(i) = s.interface_by_name(name) {
            emit(&render_full(None, i, args.json));
            return Ok(0);
        }
    }
    let (session, _) = capvisor_client::connect::attach_saved(socket).await?;
    let caps = ops::list_caps(&ops::cap_set(&session)).await?;
    let unknown = |c: &ops::CapInfo| {
        ClientError::Domain(CvError::unavailable(format!(
            "cap {:?} has interface {} ({:#018x}), which this binary's schema does not have \
             (a server newer than this client?)",
            c.name, c.interface_name, c.interface_id
        )))
    };
    match args.cap {
        Some(name) => {
            let c = caps.iter().find(|c| c.name == name).ok_or_else(|| {
                let names: Vec<_> = caps.iter().map(|c| c.name.as_str()).collect();
                ClientError::Domain(CvError::not_found(format!(
                    "no cap named {name:?} in this session (it holds: {}) and no interface of that name",
                    names.join(", ")
                )))
            })?;
            let i = s.interface(c.interface_id).ok_or_else(|| unknown(c))?;
            emit(&render_full(Some(&c.name), i, args.json));
        }
        None if args.json => {
            let mut out = Vec::new();
            for c in &caps {
                let mut e = json!({
                    "name": c.name,
                    "interfaceId": format!("{:#018x}", c.interface_id),
                    "interfaceName": c.interface_name,
                    "description": c.description,
                });
                e["interface"] = s.interface(c.interface_id).map(interface_json).unwrap_or(Value::Null);
                out.push(e);
            }
            emit(&json_text(&json!({ "caps": out })));
        }
        None => {
            let mut out = String::new();
            for c in &caps {
                match s.interface(c.interface_id) {
                    Some(i) => out.push_str(&summary(Some(&c.name), i)),
                    None => {
                        let _ = writeln!(out, "{}: {} (not in this binary's schema)", c.name, c.interface_name);
                    }
                }
            }
            emit(&out);
        }
    }
    Ok(0)
}

fn json_text(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("a Value serializes") + "\n"
}

/// Writes `text` to stdout; a closed pipe (`capvisor schema | head`) is
/// not an error.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// The reflection of `i` as JSON, each method with the JSON Schema of its
/// params and results.
pub fn interface_json(i: &Interface) -> Value {
    let mut v = serde_json::to_value(i).expect("reflection serializes");
    if let Some(ms) = v["methods"].as_array_mut() {
        for (m, r) in ms.iter_mut().zip(&i.methods) {
            m["paramsSchema"] = schema().json_schema(r.params.id).unwrap_or(Value::Null);
            m["resultsSchema"] =
                if r.streaming { Value::Null } else { schema().json_schema(r.results.id).unwrap_or(Value::Null) };
        }
    }
    v
}

/// One interface in full, then every interface reachable from its
/// results, each once.
fn render_full(cap: Option<&str>, i: &Interface, as_json: bool) -> String {
    let reach = schema().reachable_from_results(i.id);
    if as_json {
        let mut v = json!({
            "interface": interface_json(i),
            "reachable": reach.iter().map(|r| interface_json(r)).collect::<Vec<_>>(),
        });
        if let Some(c) = cap {
            v["cap"] = json!(c);
        }
        return json_text(&v);
    }
    let mut out = full(cap, i);
    if !reach.is_empty() {
        let names: Vec<_> = reach.iter().map(|r| r.name.as_str()).collect();
        let _ = writeln!(out, "\nInterfaces its results return: {}", names.join(", "));
        for r in reach {
            out.push('\n');
            out.push_str(&full(None, r));
        }
    }
    out
}

/// `name: Type, ...` of a struct's fields (a union member marked `|`).
fn field_list(s: &StructInfo) -> String {
    s.fields
        .iter()
        .map(|f| format!("{}{}: {}", if f.in_union { "|" } else { "" }, f.name, f.ty.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn signature(m: &Method) -> String {
    let results = if m.streaming { "stream".to_string() } else { format!("({})", field_list(&m.results)) };
    format!("{}({}) -> {}", m.name, field_list(&m.params), results)
}

/// One line per method, after a header line per interface (also what
/// `capvisor call --list` prints).
pub(crate) fn summary(cap: Option<&str>, i: &Interface) -> String {
    let mut out = String::new();
    let head = match cap {
        Some(c) => format!("{c}: {} ({})", i.name, i.file),
        None => format!("{} ({})", i.name, i.file),
    };
    let doc = first_line(&i.doc);
    let _ = writeln!(out, "{head}{}", if doc.is_empty() { String::new() } else { format!("  # {doc}") });
    for m in &i.methods {
        let doc = first_line(&m.doc);
        let _ =
            writeln!(out, "  {}{}", signature(m), if doc.is_empty() { String::new() } else { format!("  # {doc}") });
    }
    out
}

fn doc_lines(out: &mut String, doc: &str, indent: usize) {
    for l in doc.lines() {
        let _ = writeln!(out, "{:indent$}# {l}", "");
    }
}

/// The whole interface: docs, every method with its fields and docs,
/// nested structs expanded (to `MAX_STRUCT_DEPTH`).
fn full(cap: Option<&str>, i: &Interface) -> String {
    let mut out = String::new();
    match cap {
        Some(c) => {
            let _ = writeln!(out, "{c}: interface {} ({}, id {:#018x})", i.name, i.file, i.id);
        }
        None => {
            let _ = writeln!(out, "interface {} ({}, id {:#018x})", i.name, i.file, i.id);
        }
    }
    doc_lines(&mut out, &i.doc, 2);
    for m in &i.methods {
        let _ = writeln!(out, "\n  {} @{}", signature(m), m.ordinal);
        doc_lines(&mut out, &m.doc, 4);
        for f in &m.params.fields {
            field(&mut out, "param ", f, 4, 0);
        }
        if !m.streaming {
            for f in &m.results.fields {
                field(&mut out, "result ", f, 4, 0);
            }
        }
    }
    out
}

fn field(out: &mut String, label: &str, f: &FieldInfo, indent: usize, depth: usize) {
    let union = if f.in_union { " (union member)" } else { "" };
    let doc = f.doc.lines().collect::<Vec<_>>().join(" ");
    let doc = if doc.is_empty() { String::new() } else { format!("  # {doc}") };
    let _ = writeln!(out, "{:indent$}{label}{}: {}{union}{doc}", "", f.name, f.ty.display());
    let mut ty = &f.ty;
    while let TypeInfo::List { element } = ty {
        ty = element;
    }
    if let TypeInfo::Struct { id, .. } = ty {
        if depth >= MAX_STRUCT_DEPTH {
            return;
        }
        if let Some(s) = schema().struct_info(*id) {
            for sub in &s.fields {
                field(out, "", sub, indent + 2, depth + 1);
            }
        }
    }
}
