//! Tests of the reflection over the embedded schema and of the JSON Schema
//! it generates.

use super::*;
use crate::capvisor_capnp::{vm, vm_factory};
use crate::common_capnp::exec_spec;
use capnp::traits::HasTypeId;

#[test]
fn embedded_request_parses_and_holds_the_four_files() {
    let s = Schema::parse(crate::SCHEMA_BIN).expect("parses");
    let files: std::collections::BTreeSet<_> = s.interfaces().map(|i| i.file.as_str()).collect();
    for f in ["common.capnp", "guest.capnp", "capvisor.capnp", "internal.capnp"] {
        assert!(files.contains(f), "{f} missing from {files:?}");
    }
    // Not a request at all: a typed error, no panic.
    assert!(Schema::parse(b"not a capnp message").is_err());
    assert!(Schema::parse(&[]).is_err());
}

#[test]
fn vm_factory_methods_and_param_fields() {
    let s = schema();
    let f = s.interface(vm_factory::Client::TYPE_ID).expect("VmFactory by the generated type id");
    assert_eq!(f.name, "VmFactory");
    assert_eq!(s.interface_by_name("capvisor.capnp:VmFactory").map(|i| i.id), Some(f.id));
    let names: Vec<_> = f.methods.iter().map(|m| (m.name.as_str(), m.ordinal)).collect();
    assert_eq!(
        names,
        [("create", 0), ("list", 1), ("get", 2), ("remove", 3), ("images", 4), ("narrow", 5), ("netLog", 6)]
    );

    let create = f.method("create").unwrap();
    assert_eq!(create.params.name, "VmFactory.create$Params");
    assert_eq!(create.params.fields.len(), 1);
    let spec = &create.params.fields[0];
    assert_eq!(spec.name, "spec");
    let TypeInfo::Struct { id, name } = &spec.ty else { panic!("spec is {:?}", spec.ty) };
    assert_eq!(name, "VmSpec");
    let vm_spec = s.struct_info(*id).unwrap();
    let fields: Vec<_> = vm_spec.fields.iter().map(|f| (f.name.as_str(), f.ty.display())).collect();
    assert_eq!(
        fields,
        [
            ("name", "Text".to_string()),
            ("image", "Text".into()),
            ("memoryMib", "UInt32".into()),
            ("vcpus", "UInt32".into()),
            ("engine", "Engine".into()),
            ("volumes", "List(VolumeMount)".into()),
        ]
    );
    let TypeInfo::Enum { values, .. } = &vm_spec.fields[4].ty else { panic!() };
    assert_eq!(values, &["auto", "qemu", "kvm"]);
    assert_eq!(create.results.fields[0].ty, TypeInfo::Interface { id: vm::Client::TYPE_ID, name: "Vm".into() });
    let get = f.method("get").unwrap();
    assert_eq!(get.params.fields[0].name, "vmName");
    assert_eq!(get.params.fields[0].ty, TypeInfo::Text);
}

#[test]
fn doc_comments_come_from_source_info() {
    let s = schema();
    // Trailing comments (capnp's doc-comment rule: after the declaration).
    let p = s.interface_by_name("Process").unwrap();
    assert_eq!(p.method("resize").unwrap().doc, "pty only");
    assert_eq!(p.method("write").unwrap().doc, "more stdin (keepStdinOpen) or pty input");
    assert!(p.method("write").unwrap().streaming);
    assert!(!p.method("wait").unwrap().streaming);
    let vm = s.interface_by_name("Vm").unwrap();
    assert_eq!(vm.doc, "One VM for the capability's whole life.");
    let spec = s.struct_by_name("VmSpec").unwrap();
    assert_eq!(spec.fields[0].doc, "empty: generated; [a-z0-9][a-z0-9-]{0,31}");
    // Multi-line docs keep their lines.
    let bs = s.interface_by_name("ByteSink").unwrap();
    assert_eq!(first_line(&bs.doc), "A flow-controlled byte stream (stdout, stderr, file bodies).");
    assert!(bs.doc.lines().count() >= 2);
    // Enumerant docs.
    let e = s.enum_info(s.id_of("ErrorCode").unwrap()).unwrap();
    assert_eq!(e.values[1].0, "notFound");
    assert!(e.values[1].1.starts_with("no such VM"), "{:?}", e.values[1]);
}

#[test]
fn every_method_of_every_interface_resolves() {
    let s = schema();
    let mut methods = 0;
    for i in s.interfaces() {
        for (k, m) in i.methods.iter().enumerate() {
            assert_eq!(usize::from(m.ordinal), k, "{}.{} ordinal", i.name, m.name);
            assert!(s.struct_info(m.params.id).is_some(), "{}.{} params", i.name, m.name);
            assert!(s.struct_info(m.results.id).is_some(), "{}.{} results", i.name, m.name);
            // Every named type a field uses resolves too (to any depth).
            for f in m.params.fields.iter().chain(&m.results.fields) {
                assert_type_resolves(s, &f.ty, &format!("{}.{}.{}", i.name, m.name, f.name), 0);
            }
            assert!(s.json_schema(m.params.id).is_some());
            methods += 1;
        }
    }
    // capvisor.capnp + common.capnp alone hold more than 40 methods.
    assert!(methods > 40, "{methods}");
    let cv: Vec<_> = s.interfaces().filter(|i| i.file == "capvisor.capnp").map(|i| i.name.as_str()).collect();
    for want in ["Gateway", "Session", "CapSet", "VmFactory", "Vm", "Accounts", "Volumes", "NetPolicy"] {
        assert!(cv.contains(&want), "{want} not in {cv:?}");
    }
}

fn assert_type_resolves(s: &Schema, t: &TypeInfo, at: &str, depth: usize) {
    assert!(depth < 16, "{at}: nesting does not end");
    match t {
        TypeInfo::Struct { id, .. } => {
            let st = s.struct_info(*id).unwrap_or_else(|| panic!("{at}: struct {id:#x}"));
            for f in &st.fields {
                assert_type_resolves(s, &f.ty, &format!("{at}.{}", f.name), depth + 1);
            }
        }
        TypeInfo::Interface { id, .. } => assert!(s.interface(*id).is_some(), "{at}: interface {id:#x}"),
        TypeInfo::Enum { id, values, .. } => {
            assert!(s.enum_info(*id).is_some() && !values.is_empty(), "{at}: enum {id:#x}")
        }
        TypeInfo::List { element } => assert_type_resolves(s, element, at, depth + 1),
        _ => {}
    }
}

#[test]
fn reachable_interfaces_from_results() {
    let s = schema();
    let reach: Vec<_> = s.reachable_from_results(vm_factory::Client::TYPE_ID).iter().map(|i| i.name.as_str()).collect();
    // create -> Vm; Vm.exec -> Process; Vm.files -> Files; connect/Files.write -> ByteSink.
    assert_eq!(reach[0], "Vm");
    for want in ["Process", "Files", "ByteSink"] {
        assert!(reach.contains(&want), "{want} not in {reach:?}");
    }
    let mut dedup = reach.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), reach.len(), "each once: {reach:?}");
    assert!(!reach.contains(&"VmFactory"));
}

#[test]
fn exec_spec_json_schema() {
    let v = json_schema(exec_spec::Reader::TYPE_ID).unwrap();
    assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert_eq!(v["type"], "object");
    assert_eq!(v["required"], json!([]));
    let p = &v["properties"];
    assert_eq!(p["argv"]["type"], "array");
    assert_eq!(p["argv"]["items"]["type"], "string");
    assert_eq!(p["argv"]["description"], "argv[0] is looked up in PATH; must not be empty");
    assert_eq!(p["user"]["type"], "string");
    assert_eq!(p["stdin"]["type"], "string");
    assert_eq!(p["stdin"]["contentEncoding"], "base64");
    assert_eq!(p["env"]["items"]["properties"]["name"]["type"], "string");
    let pty = &p["pty"];
    assert_eq!(pty["type"], "object");
    let one_of = pty["oneOf"].as_array().expect("pty is a oneOf");
    let titles: Vec<_> = one_of.iter().map(|b| b["title"].as_str().unwrap()).collect();
    assert_eq!(&titles[..2], ["none", "size"]);
    assert_eq!(pty["properties"]["none"]["type"], "null");
    assert_eq!(
        pty["properties"]["size"]["properties"]["rows"],
        json!({
            "type": "integer", "minimum": 0, "maximum": 65535, "description": "UInt16"
        })
    );
}

#[test]
fn json_schema_types_and_capabilities() {
    let s = schema();
    let nf = s.json_schema(s.id_of("NetFlow").unwrap()).unwrap();
    let p = &nf["properties"];
    assert_eq!(p["bytesUp"]["minimum"], 0);
    assert_eq!(p["bytesUp"]["maximum"], u64::MAX);
    assert!(p["bytesUp"]["description"].as_str().unwrap().contains("2^53"));
    assert_eq!(p["rule"]["minimum"], i32::MIN);
    assert_eq!(p["action"]["enum"], json!(["allow", "deny", "ask"]));
    // A capability parameter is a session-local cap name.
    let exec = s.interface_by_name("Vm").unwrap().method("exec").unwrap();
    let e = s.json_schema(exec.params.id).unwrap();
    assert_eq!(e["properties"]["stdout"]["type"], "string");
    assert!(e["properties"]["stdout"]["description"].as_str().unwrap().contains("session-local cap"));
    assert_eq!(e["properties"]["spec"]["properties"]["argv"]["type"], "array");
    // An unknown id has no schema.
    assert!(json_schema(0x1234).is_none());
}

/// A validator for the JSON Schema subset [`json_schema`] emits (type,
/// properties, additionalProperties, items, enum, minimum/maximum, oneOf,
/// anyOf, not, required, contentEncoding base64): enough to check that
/// instances the schema means to accept pass and others fail.
fn valid(schema: &Value, v: &Value) -> bool {
    let o = schema.as_object().unwrap();
    if let Some(t) = o.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => panic!("type {t}"),
        };
        if !ok {
            return false;
        }
    }
    if let Some(e) = o.get("enum") {
        if !e.as_array().unwrap().contains(v) {
            return false;
        }
    }
    if let Some(min) = o.get("minimum") {
        let n = v.as_i64().map(i128::from).or(v.as_u64().map(i128::from)).unwrap();
        let m = min.as_i64().map(i128::from).or(min.as_u64().map(i128::from)).unwrap();
        if n < m {
            return false;
        }
    }
    if let Some(max) = o.get("maximum") {
        let n = v.as_i64().map(i128::from).or(v.as_u64().map(i128::from)).unwrap();
        let m = max.as_i64().map(i128::from).or(max.as_u64().map(i128::from)).unwrap();
        if n > m {
            return false;
        }
    }
    if o.get("contentEncoding").and_then(Value::as_str) == Some("base64") {
        let s = v.as_str().unwrap();
        if !s.len().is_multiple_of(4) || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) {
            return false;
        }
    }
    if let Some(items) = o.get("items") {
        if !v.as_array().unwrap().iter().all(|x| valid(items, x)) {
            return false;
        }
    }
    if let Some(req) = o.get("required") {
        if !req.as_array().unwrap().iter().all(|k| v.get(k.as_str().unwrap()).is_some()) {
            return false;
        }
    }
    if let (Some(props), Some(obj)) = (o.get("properties"), v.as_object()) {
        for (k, x) in obj {
            match props.get(k) {
                Some(ps) if !valid(ps, x) => return false,
                None if o.get("additionalProperties") == Some(&json!(false)) => return false,
                _ => {}
            }
        }
    }
    if let Some(any) = o.get("anyOf") {
        if !any.as_array().unwrap().iter().any(|b| valid(b, v)) {
            return false;
        }
    }
    if let Some(one) = o.get("oneOf") {
        if one.as_array().unwrap().iter().filter(|b| valid(b, v)).count() != 1 {
            return false;
        }
    }
    if let Some(not) = o.get("not") {
        if valid(not, v) {
            return false;
        }
    }
    true
}

#[test]
fn exec_spec_schema_validates_hand_built_instances() {
    let sch = json_schema(exec_spec::Reader::TYPE_ID).unwrap();
    let good = json!({
        "argv": ["python3", "-c", "print(1)"],
        "env": [{"name": "A", "value": "b"}],
        "cwd": "/work",
        "stdin": "aGVsbG8=",
        "keepStdinOpen": false,
        "pty": {"size": {"rows": 24, "cols": 80}},
        "user": "agent",
    });
    assert!(valid(&sch, &good));
    assert!(valid(&sch, &json!({})), "every field has a default");
    assert!(valid(&sch, &json!({"pty": {"none": null}})));
    assert!(valid(&sch, &json!({"pty": {}})), "no member set: the union's default");
    let bad = [
        json!({"argv": "python3"}),                          // not an array
        json!({"argv": [1]}),                                // not strings
        json!({"pty": {"none": null, "size": {"rows": 1}}}), // two union members
        json!({"pty": {"size": {"rows": 70000}}}),           // over UInt16
        json!({"pty": {"size": {"rows": -1}}}),              // under UInt16
        json!({"stdin": "not base64!"}),                     // Data not base64
        json!({"argv": ["x"], "shell": true}),               // unknown field
        json!({"env": [{"name": "A", "value": 3}]}),         // nested type
        json!({"user": 0}),                                  // Text as number
    ];
    for b in bad {
        assert!(!valid(&sch, &b), "accepted {b}");
    }
    // Enums: only enumerant names.
    let vs = json_schema(schema().id_of("VmSpec").unwrap()).unwrap();
    assert!(valid(&vs, &json!({"name": "x", "engine": "qemu", "memoryMib": 256})));
    assert!(!valid(&vs, &json!({"engine": "xen"})));
    assert!(!valid(&vs, &json!({"memoryMib": 4294967296u64})));
}

#[test]
fn deep_nesting_is_bounded() {
    // A struct whose field is itself: built by hand, as the embedded schema
    // has no recursive type.
    let mut s = Schema::default();
    s.structs.insert(
        7,
        StructInfo {
            id: 7,
            name: "Node".into(),
            file: "t.capnp".into(),
            doc: String::new(),
            fields: vec![FieldInfo {
                name: "next".into(),
                doc: String::new(),
                ty: TypeInfo::Struct { id: 7, name: "Node".into() },
                in_union: false,
                discriminant: None,
            }],
            is_group: false,
        },
    );
    let v = s.json_schema(7).unwrap();
    let mut cur = &v;
    let mut depth = 0;
    while let Some(n) = cur["properties"].get("next") {
        cur = n;
        depth += 1;
    }
    assert_eq!(depth, MAX_STRUCT_DEPTH + 1);
    assert!(cur["description"].as_str().unwrap().contains("not expanded"));
}

/// The doc of method `m` of interface `iface`.
fn method_doc(iface: &str, m: &str) -> String {
    let i = schema().interface_by_name(iface).unwrap_or_else(|| panic!("no interface {iface}"));
    i.method(m).unwrap_or_else(|| panic!("no method {iface}.{m}")).doc.clone()
}

/// The doc of field `f` of struct `st`.
fn field_doc(st: &str, f: &str) -> String {
    let s = schema().struct_by_name(st).unwrap_or_else(|| panic!("no struct {st}"));
    s.fields.iter().find(|x| x.name == f).unwrap_or_else(|| panic!("no field {st}.{f}")).doc.clone()
}

#[test]
fn docs_sit_on_the_declaration_they_follow() {
    // capnp attaches a comment to the declaration it follows; comments
    // written above a method used to land one method early or on the
    // interface. Each check names the member that used to get it wrong.
    let s = schema();
    let starts = |got: String, want: &str, what: &str| {
        assert!(got.starts_with(want), "{what}: {got:?} does not start with {want:?}");
    };
    let vf = s.interface_by_name("VmFactory").unwrap();
    assert!(vf.doc.contains("this session's VMs") && !vf.doc.contains("Boots"), "VmFactory: {:?}", vf.doc);
    starts(method_doc("VmFactory", "create"), "Boots a VM and returns once guest-init answers.", "create");
    assert_eq!(method_doc("VmFactory", "get"), "", "get had remove's text");
    starts(method_doc("VmFactory", "remove"), "Stops the VM if running and forgets it.", "remove");
    starts(method_doc("VmFactory", "images"), "The images this session may boot", "images");
    assert_eq!(method_doc("VmFactory", "list"), "");

    assert_eq!(s.interface_by_name("Vm").unwrap().doc, "One VM for the capability's whole life.");
    assert_eq!(method_doc("Vm", "stop"), "", "stop had ping's text");
    starts(method_doc("Vm", "ping"), "A no-op round trip to guest-init", "ping");
    starts(method_doc("Vm", "connect"), "A byte stream to TCP port `port`", "connect");
    assert!(method_doc("Vm", "connect").contains("Fails with unavailable when nothing listens there."));

    assert_eq!(method_doc("CapSet", "list"), "", "list had get's text");
    starts(method_doc("CapSet", "get"), "Returns the cap named `capName`", "CapSet.get");

    let sec = s.interface_by_name("Secrets").unwrap();
    starts(sec.doc.clone(), "This principal's secrets for the egress proxy", "Secrets");
    assert!(!sec.doc.contains("put:") && sec.doc.contains("for any other host."), "Secrets: {:?}", sec.doc);
    starts(method_doc("Secrets", "put"), "put: replaces a secret of the same name.", "put");
    assert!(method_doc("Secrets", "put").contains("quota: 64"));
    assert_eq!(method_doc("Secrets", "list"), "", "list had remove's text");
    assert_eq!(method_doc("Secrets", "remove"), "notFound when there is no such secret.");

    assert_eq!(method_doc("Approvals", "pending"), "", "pending had decide's text");
    starts(method_doc("Approvals", "decide"), "notFound when `id` is not pending", "decide");

    assert_eq!(s.interface_by_name("Files").unwrap().doc, "A guest's file system. Paths are absolute guest paths.");
    starts(method_doc("Files", "read"), "Streams the file into `sink`", "Files.read");
    starts(method_doc("Files", "write"), "Creates or truncates `path`", "Files.write");
    assert_eq!(method_doc("Process", "closeStdin"), "", "closeStdin had wait's text");
    starts(method_doc("Process", "wait"), "Returns after the process exited", "wait");
    assert_eq!(method_doc("ByteSink", "write"), "", "write had done's text");
    starts(method_doc("ByteSink", "done"), "End of stream.", "done");

    // Fields: a trailing comment alone, the next field's block after it.
    assert_eq!(field_doc("ExecSpec", "user"), "name or numeric uid to run as (guest /etc/passwd); empty: root");
    starts(field_doc("ExecSpec", "secretEnv"), "Secrets as environment variables", "secretEnv");
    assert_eq!(field_doc("VmSpec", "engine"), "", "engine had volumes' text");
    starts(field_doc("VmSpec", "volumes"), "Volumes of this principal to attach", "volumes");

    // The other files follow the same rule.
    assert_eq!(method_doc("Guest", "files"), "", "files had shutdown's text");
    starts(method_doc("Guest", "shutdown"), "Syncs file systems", "shutdown");
    starts(method_doc("Egress", "resolve"), "DNS: whether any rule could allow", "resolve");
    starts(method_doc("Machine", "stop"), "Graceful (ACPI power button", "Machine.stop");
    assert_eq!(method_doc("SessionHost", "audit"), "", "audit had accounts' text");
    starts(method_doc("SessionHost", "queryAudit"), "Cv.Audit.query for this session", "queryAudit");
    starts(field_doc("ProxyConfig", "extraRootsPem"), "Extra roots upstream TLS", "extraRootsPem");
    assert_eq!(field_doc("ProxyConfig", "caKeyPem"), "");
}

#[test]
fn no_two_methods_of_an_interface_share_a_doc() {
    // A comment moved one declaration off shows up as a method with its
    // neighbour's text; two methods with the same non-empty doc is the
    // cheapest sign of that (or of a copy-pasted doc).
    let mut checked = 0;
    for i in schema().interfaces() {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for m in i.methods.iter().filter(|m| !m.doc.is_empty()) {
            if let Some(other) = seen.insert(m.doc.as_str(), m.name.as_str()) {
                panic!("{}.{} and {}.{} share the doc {:?}", i.name, other, i.name, m.name, m.doc);
            }
            assert_ne!(m.doc, i.doc, "{}.{} repeats its interface's doc", i.name, m.name);
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} documented methods");
}

#[test]
fn layouts_match_the_generated_code() {
    use crate::capvisor_capnp::{vm_info, vm_spec};
    use crate::common_capnp::{dir_entry, exit_status};
    use capnp::traits::HasStructSize;
    let s = schema();
    let size = |id: u64| {
        let l = s.struct_layout(id).unwrap();
        (l.data_words, l.pointers)
    };
    let want = |z: capnp::private::layout::StructSize| (z.data, z.pointers);
    assert_eq!(size(vm_spec::Builder::TYPE_ID), want(vm_spec::Builder::STRUCT_SIZE));
    assert_eq!(size(vm_info::Builder::TYPE_ID), want(vm_info::Builder::STRUCT_SIZE));
    assert_eq!(size(exec_spec::Builder::TYPE_ID), want(exec_spec::Builder::STRUCT_SIZE));
    assert_eq!(size(dir_entry::Builder::TYPE_ID), want(dir_entry::Builder::STRUCT_SIZE));
    // Every field has a slot or is a group, in the field order.
    for id in [vm_spec::Builder::TYPE_ID, exec_spec::Builder::TYPE_ID, vm_info::Builder::TYPE_ID] {
        assert_eq!(s.struct_layout(id).unwrap().fields.len(), s.struct_info(id).unwrap().fields.len());
    }
    // ExecSpec: argv is pointer 0, keepStdinOpen bit 0 of the data section,
    // `pty` a group with a union whose discriminant sits in the data section.
    let es = s.struct_info(exec_spec::Builder::TYPE_ID).unwrap();
    let el = s.struct_layout(es.id).unwrap();
    let at = |n: &str| el.fields[es.fields.iter().position(|f| f.name == n).unwrap()];
    assert!(matches!(at("argv"), FieldSlot::Slot { offset: 0, default_bits: 0, explicit_default: false }));
    assert!(matches!(at("keepStdinOpen"), FieldSlot::Slot { offset: 0, .. }));
    assert_eq!(at("pty"), FieldSlot::Group);
    let TypeInfo::Struct { id: pty, .. } = es.fields.iter().find(|f| f.name == "pty").unwrap().ty else { panic!() };
    let pl = s.struct_layout(pty).unwrap();
    assert_eq!(pl.discriminant_count, 2);
    assert_eq!((pl.data_words, pl.pointers), (el.data_words, el.pointers), "a group shares its parent's sections");
    assert!(u32::from(el.data_words) * 4 > pl.discriminant_offset);
    // ExitStatus: an unnamed union of two Int32s.
    let ex = s.struct_layout(exit_status::Builder::TYPE_ID).unwrap();
    assert_eq!(ex.discriminant_count, 2);
}

#[test]
fn data_defaults_come_as_raw_bits() {
    use capnp::schema_capnp::value;
    let mut m = capnp::message::Builder::new_default();
    let mut v = m.init_root::<value::Builder<'_>>();
    v.set_int16(-2);
    assert_eq!(default_bits(v.reborrow_as_reader()).unwrap(), 0xfffe);
    v.set_float32(1.5);
    assert_eq!(default_bits(v.reborrow_as_reader()).unwrap(), u64::from(1.5f32.to_bits()));
    v.set_bool(true);
    assert_eq!(default_bits(v.reborrow_as_reader()).unwrap(), 1);
    v.set_enum(3);
    assert_eq!(default_bits(v.reborrow_as_reader()).unwrap(), 3);
    v.set_text("x");
    assert_eq!(default_bits(v.reborrow_as_reader()).unwrap(), 0);
    // capvisor's schema gives no field an explicit default today; the
    // dynamic codec handles data defaults and documents pointer defaults.
    let s = schema();
    for i in s.interfaces() {
        for m in &i.methods {
            for st in [&m.params, &m.results] {
                for f in s.struct_layout(st.id).unwrap().fields.iter() {
                    assert!(!matches!(f, FieldSlot::Slot { explicit_default: true, .. }), "{}", st.name);
                }
            }
        }
    }
}
