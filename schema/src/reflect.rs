//! Run-time reflection over capvisor's Cap'n Proto schema: interfaces with
//! their methods, parameter and result structs, field types and the doc
//! comments of the `.capnp` files, plus JSON Schema (draft 2020-12) for a
//! struct.
//!
//! The source is [`SCHEMA_BIN`](crate::SCHEMA_BIN): the `capnp` compiler's
//! raw `CodeGeneratorRequest` (capnp's `schema.capnp`), kept by build.rs.
//! It carries what capnp-rust's generated introspection lacks: interface
//! methods (`Node.interface.methods`, `paramStructType`,
//! `resultStructType`) and doc comments (`CodeGeneratorRequest.sourceInfo`,
//! `Node.SourceInfo.docComment` and per-member `docComment`). A doc comment
//! is what the `capnp` compiler attaches to a declaration: the `#` comment
//! on the same line as it, or the comment lines right after it (for an
//! interface or struct: right after its opening `{`).
//!
//! [`schema()`] parses the request once per process into owned values
//! ([`Schema`]); lookups are by 64-bit type id or by name (`"VmFactory"`,
//! `"capvisor.capnp:VmFactory"`, `"VmFactory.create$Params"`).
//! [`Schema::struct_layout`] gives where a struct's fields sit in a message
//! (section sizes, slot offsets, the union's discriminant), for code that
//! reads and writes structs by type id (`capvisor call`).
#![warn(clippy::all, missing_docs)]

use capnp::schema_capnp::{field, node, type_};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

/// How deep [`json_schema`] and [`Schema::reachable_from_results`] follow
/// nested struct types (a struct field inside a struct
/// is one level). Deeper structs are given as a plain `"type": "object"`
/// with a description saying so. capvisor's schema nests at most 3 deep
/// (`ExecSpec.pty.size`); recursive types would otherwise never end.
pub const MAX_STRUCT_DEPTH: usize = 8;

/// A Cap'n Proto type, as a field or list element has it (schema.capnp
/// `Type`). Generic parameters are not used by capvisor and show as
/// [`TypeInfo::AnyPointer`] with kind `"parameter"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum TypeInfo {
    /// `Void`: no value (a union member that only selects).
    Void,
    /// `Bool`.
    Bool,
    /// `Int8`.
    Int8,
    /// `Int16`.
    Int16,
    /// `Int32`.
    Int32,
    /// `Int64`.
    Int64,
    /// `UInt8`.
    UInt8,
    /// `UInt16`.
    UInt16,
    /// `UInt32`.
    UInt32,
    /// `UInt64`.
    UInt64,
    /// `Float32` (IEEE 754 single).
    Float32,
    /// `Float64` (IEEE 754 double).
    Float64,
    /// `Text`: UTF-8.
    Text,
    /// `Data`: bytes.
    Data,
    /// `List(T)`.
    List {
        /// The element type.
        element: Box<TypeInfo>,
    },
    /// An enum, with its enumerant names in ordinal order.
    Enum {
        /// Type id.
        #[serde(serialize_with = "hex_id")]
        id: u64,
        /// Name without the file (`"Engine"`).
        name: String,
        /// Enumerant names, index = ordinal.
        values: Vec<String>,
    },
    /// A struct (or a group: a struct node nested in its parent), by id;
    /// [`Schema::struct_info`] gives its fields.
    Struct {
        /// Type id.
        #[serde(serialize_with = "hex_id")]
        id: u64,
        /// Name without the file (`"VmSpec"`, `"ExecSpec.pty"`).
        name: String,
    },
    /// A capability of an interface.
    Interface {
        /// Interface type id.
        #[serde(serialize_with = "hex_id")]
        id: u64,
        /// Name without the file (`"Vm"`).
        name: String,
    },
    /// `AnyPointer` and its constrained forms.
    AnyPointer {
        /// `"any"`, `"struct"`, `"list"`, `"capability"` (schema
        /// `Capability`) or `"parameter"` (a generic parameter).
        pointer: &'static str,
    },
}

impl TypeInfo {
    /// The type as the `.capnp` source spells it (`List(Text)`,
    /// `Common.ExecSpec` shows as `ExecSpec`).
    pub fn display(&self) -> String {
        match self {
            TypeInfo::Void => "Void".into(),
            TypeInfo::Bool => "Bool".into(),
            TypeInfo::Int8 => "Int8".into(),
            TypeInfo::Int16 => "Int16".into(),
            TypeInfo::Int32 => "Int32".into(),
            TypeInfo::Int64 => "Int64".into(),
            TypeInfo::UInt8 => "UInt8".into(),
            TypeInfo::UInt16 => "UInt16".into(),
            TypeInfo::UInt32 => "UInt32".into(),
            TypeInfo::UInt64 => "UInt64".into(),
            TypeInfo::Float32 => "Float32".into(),
            TypeInfo::Float64 => "Float64".into(),
            TypeInfo::Text => "Text".into(),
            TypeInfo::Data => "Data".into(),
            TypeInfo::List { element } => format!("List({})", element.display()),
            TypeInfo::Enum { name, .. } | TypeInfo::Struct { name, .. } | TypeInfo::Interface { name, .. } => {
                name.clone()
            }
            TypeInfo::AnyPointer { pointer } => match *pointer {
                "capability" => "Capability".into(),
                "struct" => "AnyStruct".into(),
                "list" => "AnyList".into(),
                "parameter" => "(generic parameter)".into(),
                _ => "AnyPointer".into(),
            },
        }
    }
}

/// One field of a struct or group (schema.capnp `Field`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldInfo {
    /// Field name as in the schema (lower camel case).
    pub name: String,
    /// Its doc comment ("" when none).
    pub doc: String,
    /// Its type; a group field is a [`TypeInfo::Struct`] of the group's node.
    pub ty: TypeInfo,
    /// Whether it is a member of the struct's (unnamed) union.
    pub in_union: bool,
    /// The union discriminant value when [`in_union`](Self::in_union).
    pub discriminant: Option<u16>,
}

/// A struct, group or method parameter/result struct (schema.capnp
/// `Node.struct`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StructInfo {
    /// Type id.
    #[serde(serialize_with = "hex_id")]
    pub id: u64,
    /// Name without the file: `"VmSpec"`, `"ExecSpec.pty"`,
    /// `"VmFactory.create$Params"`.
    pub name: String,
    /// The file it is declared in (`"capvisor.capnp"`).
    pub file: String,
    /// Its doc comment ("" when none).
    pub doc: String,
    /// Fields in the node's order (ordinal order).
    pub fields: Vec<FieldInfo>,
    /// Whether it is a group (a named union or `:group` inside a struct).
    pub is_group: bool,
}

/// One method of an interface (schema.capnp `Method`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Method {
    /// Method name (lower camel case).
    pub name: String,
    /// Its `@N` ordinal: the method id on the wire.
    pub ordinal: u16,
    /// Its doc comment ("" when none).
    pub doc: String,
    /// The parameter struct (a `$Params` struct, or a named struct type).
    pub params: StructInfo,
    /// The result struct (`$Results`, a named struct, or
    /// `stream.capnp:StreamResult` for `-> stream`).
    pub results: StructInfo,
    /// Whether the method is declared `-> stream` (flow-controlled, no result).
    pub streaming: bool,
}

/// An interface (schema.capnp `Node.interface`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Type id (what `CapEntry.interfaceId` carries).
    #[serde(serialize_with = "hex_id")]
    pub id: u64,
    /// Name without the file (`"VmFactory"`).
    pub name: String,
    /// The file it is declared in.
    pub file: String,
    /// Its doc comment ("" when none).
    pub doc: String,
    /// Methods by ordinal.
    pub methods: Vec<Method>,
    /// Ids of the interfaces it `extends`.
    #[serde(serialize_with = "hex_ids")]
    pub superclasses: Vec<u64>,
}

impl Interface {
    /// The method named `name`, if any.
    pub fn method(&self, name: &str) -> Option<&Method> {
        self.methods.iter().find(|m| m.name == name)
    }
}

/// An enum: names of its enumerants with their docs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnumInfo {
    /// Type id.
    #[serde(serialize_with = "hex_id")]
    pub id: u64,
    /// Name without the file.
    pub name: String,
    /// Its doc comment.
    pub doc: String,
    /// `(name, doc)` per enumerant, index = ordinal.
    pub values: Vec<(String, String)>,
}

/// Where a struct's fields sit in a message (schema.capnp `Node.struct`
/// and `Field.slot`): what code that reads or writes a struct by its
/// type id needs (`capvisor_client::dynamic`). Groups share their parent's
/// sections, so a group's layout has the parent's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct StructLayout {
    /// Size of the data section, 64-bit words.
    pub data_words: u16,
    /// Number of pointers in the pointer section.
    pub pointers: u16,
    /// Number of members of the struct's unnamed union (0: no union).
    pub discriminant_count: u16,
    /// Where the union's discriminant sits in the data section, in
    /// multiples of 16 bits (meaningful when `discriminant_count > 0`).
    pub discriminant_offset: u32,
    /// One entry per field, in the order of [`StructInfo::fields`].
    pub fields: Vec<FieldSlot>,
}

/// Where one field sits: a slot, or a group (whose fields have slots of
/// their own in the same struct).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldSlot {
    /// A value in the struct's data or pointer section.
    Slot {
        /// For a data field: the offset in multiples of the field's own
        /// size (bits for Bool, bytes for Int8, ...); for a pointer field
        /// (Text, Data, List, struct, interface, AnyPointer): the pointer
        /// index. Void fields have offset 0 and take no space.
        offset: u32,
        /// For a data field: the raw bits of its default value, as wide as
        /// the field (Bool 0/1, enums their ordinal, floats their IEEE
        /// bits); on the wire the field is stored XOR this value. 0 for
        /// pointer fields.
        default_bits: u64,
        /// Whether the schema gives the field an explicit default (`= ...`).
        /// Pointer defaults are not in [`default_bits`](FieldSlot::Slot::default_bits).
        explicit_default: bool,
    },
    /// A group or named union: its fields are in the group's own
    /// [`StructLayout`] (same sections as the parent).
    Group,
}

/// The parsed schema: every struct, enum and interface node of the
/// request. Built by [`Schema::parse`]; [`schema()`] holds the embedded one.
#[derive(Debug, Default)]
pub struct Schema {
    structs: HashMap<u64, StructInfo>,
    enums: HashMap<u64, EnumInfo>,
    interfaces: BTreeMap<u64, Interface>,
    layouts: HashMap<u64, StructLayout>,
    names: HashMap<String, u64>,
    /// Interface ids in (file, declaration) order of the request.
    interface_order: Vec<u64>,
}

/// Errors reading a `CodeGeneratorRequest`.
#[derive(Debug)]
pub struct ReflectError(pub String);

impl std::fmt::Display for ReflectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "schema reflection: {}", self.0)
    }
}

impl std::error::Error for ReflectError {}

impl From<capnp::Error> for ReflectError {
    fn from(e: capnp::Error) -> Self {
        ReflectError(e.to_string())
    }
}

impl From<capnp::NotInSchema> for ReflectError {
    fn from(e: capnp::NotInSchema) -> Self {
        ReflectError(e.to_string())
    }
}

impl From<std::str::Utf8Error> for ReflectError {
    fn from(e: std::str::Utf8Error) -> Self {
        ReflectError(e.to_string())
    }
}

/// The embedded schema, parsed on first use.
///
/// # Panics
/// If [`SCHEMA_BIN`](crate::SCHEMA_BIN) does not parse, which build.rs
/// rules out (it is the compiler's own output); a test checks it.
pub fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| Schema::parse(crate::SCHEMA_BIN).expect("embedded schema.bin parses"))
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, ReflectError> {
    Ok(t?.to_str()?.to_string())
}

struct Raw {
    display: String,
    prefix: usize,
    which: RawKind,
}

enum RawKind {
    Struct,
    Enum,
    Interface,
    Other,
}

impl Schema {
    /// Parses a serialized (unpacked, with segment table) schema.capnp
    /// `CodeGeneratorRequest`, as `capnp compile -o-` writes it.
    ///
    /// # Errors
    /// A malformed message, or a type id a node refers to that is not in
    /// the request.
    pub fn parse(bytes: &[u8]) -> Result<Schema, ReflectError> {
        let mut slice = bytes;
        // `read_message` copies into aligned segments: include_bytes! data
        // has no 8-byte alignment guarantee.
        let msg = capnp::serialize::read_message(&mut slice, capnp::message::ReaderOptions::new())?;
        let req: capnp::schema_capnp::code_generator_request::Reader<'_> = msg.get_root()?;

        // Doc comments by node id: (node doc, member docs).
        let mut docs: HashMap<u64, (String, Vec<String>)> = HashMap::new();
        for si in req.get_source_info()? {
            let members = si.get_members()?.iter().map(|m| text(m.get_doc_comment())).collect::<Result<_, _>>()?;
            docs.insert(si.get_id(), (clean_doc(&text(si.get_doc_comment())?), members));
        }
        let doc_of = |id: u64| docs.get(&id).map(|d| d.0.clone()).unwrap_or_default();
        let member_doc =
            |id: u64, i: usize| docs.get(&id).and_then(|d| d.1.get(i)).map(|s| clean_doc(s)).unwrap_or_default();

        // First pass: names and kinds, so types can name what they point at.
        let mut raw: HashMap<u64, Raw> = HashMap::new();
        for n in req.get_nodes()? {
            let which = match n.which()? {
                node::Struct(_) => RawKind::Struct,
                node::Enum(_) => RawKind::Enum,
                node::Interface(_) => RawKind::Interface,
                _ => RawKind::Other,
            };
            raw.insert(
                n.get_id(),
                Raw {
                    display: text(n.get_display_name())?,
                    prefix: n.get_display_name_prefix_length() as usize,
                    which,
                },
            );
        }
        // A node's name without its file: "capvisor.capnp:VmFactory.create$Params".
        let short = |id: u64| -> Result<(String, String), ReflectError> {
            let r = raw.get(&id).ok_or_else(|| ReflectError(format!("type id {id:#x} not in the request")))?;
            Ok(match r.display.split_once(':') {
                Some((file, name)) => (name.to_string(), file.rsplit('/').next().unwrap_or(file).to_string()),
                None => (r.display[r.prefix.min(r.display.len())..].to_string(), String::new()),
            })
        };

        let mut s = Schema::default();
        // Enums first: field types carry their values.
        for n in req.get_nodes()? {
            if let node::Enum(e) = n.which()? {
                let id = n.get_id();
                let values = e
                    .get_enumerants()?
                    .iter()
                    .enumerate()
                    .map(|(i, en)| Ok((text(en.get_name())?, member_doc(id, i))))
                    .collect::<Result<_, ReflectError>>()?;
                let (name, _) = short(id)?;
                s.enums.insert(id, EnumInfo { id, name, doc: doc_of(id), values });
            }
        }
        let conv = |t: type_::Reader<'_>, s: &Schema| -> Result<TypeInfo, ReflectError> { convert_type(t, s, &short) };
        for n in req.get_nodes()? {
            let id = n.get_id();
            if let node::Struct(st) = n.which()? {
                let (name, file) = short(id)?;
                let mut fields = Vec::new();
                let mut slots = Vec::new();
                for (i, f) in st.get_fields()?.iter().enumerate() {
                    let ty = match f.which()? {
                        field::Slot(slot) => {
                            slots.push(FieldSlot::Slot {
                                offset: slot.get_offset(),
                                default_bits: default_bits(slot.get_default_value()?)?,
                                explicit_default: slot.get_had_explicit_default(),
                            });
                            conv(slot.get_type()?, &s)?
                        }
                        field::Group(g) => {
                            slots.push(FieldSlot::Group);
                            let gid = g.get_type_id();
                            TypeInfo::Struct { id: gid, name: short(gid)?.0 }
                        }
                    };
                    let d = f.get_discriminant_value();
                    let in_union = d != field::NO_DISCRIMINANT;
                    fields.push(FieldInfo {
                        name: text(f.get_name())?,
                        doc: member_doc(id, i),
                        ty,
                        in_union,
                        discriminant: in_union.then_some(d),
                    });
                }
                s.layouts.insert(
                    id,
                    StructLayout {
                        data_words: st.get_data_word_count(),
                        pointers: st.get_pointer_count(),
                        discriminant_count: st.get_discriminant_count(),
                        discriminant_offset: st.get_discriminant_offset(),
                        fields: slots,
                    },
                );
                s.structs
                    .insert(id, StructInfo { id, name, file, doc: doc_of(id), fields, is_group: st.get_is_group() });
            }
        }
        for n in req.get_nodes()? {
            let id = n.get_id();
            if let node::Interface(i) = n.which()? {
                let (name, file) = short(id)?;
                let mut methods = Vec::new();
                for (k, m) in i.get_methods()?.iter().enumerate() {
                    let lookup = |sid: u64| {
                        s.structs
                            .get(&sid)
                            .cloned()
                            .ok_or_else(|| ReflectError(format!("{name}: struct {sid:#x} not in the request")))
                    };
                    let results = lookup(m.get_result_struct_type())?;
                    methods.push(Method {
                        name: text(m.get_name())?,
                        ordinal: k as u16,
                        doc: member_doc(id, k),
                        params: lookup(m.get_param_struct_type())?,
                        streaming: results.name == "StreamResult" && results.file == "stream.capnp",
                        results,
                    });
                }
                let superclasses = i.get_superclasses()?.iter().map(|c| c.get_id()).collect();
                s.interface_order.push(id);
                s.interfaces.insert(id, Interface { id, name, file, doc: doc_of(id), methods, superclasses });
            }
        }
        // Names: "file:Name" always; bare "Name" when no other file has it.
        let mut bare: HashMap<String, Vec<u64>> = HashMap::new();
        for (&id, r) in &raw {
            if matches!(r.which, RawKind::Other) {
                continue;
            }
            let (name, file) = short(id)?;
            s.names.insert(format!("{file}:{name}"), id);
            bare.entry(name).or_default().push(id);
        }
        for (name, ids) in bare {
            if let [id] = ids[..] {
                s.names.insert(name, id);
            }
        }
        // Declaration order: by file, then by display name (stable).
        let mut order = std::mem::take(&mut s.interface_order);
        order.sort_by_key(|id| {
            let i = &s.interfaces[id];
            (i.file.clone(), i.name.clone())
        });
        s.interface_order = order;
        Ok(s)
    }

    /// The interface with type id `id`.
    pub fn interface(&self, id: u64) -> Option<&Interface> {
        self.interfaces.get(&id)
    }

    /// The struct (or group, or `$Params`/`$Results`) with type id `id`.
    pub fn struct_info(&self, id: u64) -> Option<&StructInfo> {
        self.structs.get(&id)
    }

    /// The wire layout of struct (or group) `id`: section sizes, the
    /// union's discriminant and each field's slot, in the order of
    /// [`StructInfo::fields`].
    pub fn struct_layout(&self, id: u64) -> Option<&StructLayout> {
        self.layouts.get(&id)
    }

    /// The enum with type id `id`.
    pub fn enum_info(&self, id: u64) -> Option<&EnumInfo> {
        self.enums.get(&id)
    }

    /// The type id of `name`: `"file.capnp:Name"`, or a bare `"Name"`
    /// when only one file declares it (nested: `"ExecSpec.pty"`).
    pub fn id_of(&self, name: &str) -> Option<u64> {
        self.names.get(name).copied()
    }

    /// The interface called `name` (as [`id_of`](Self::id_of) takes it).
    pub fn interface_by_name(&self, name: &str) -> Option<&Interface> {
        self.id_of(name).and_then(|id| self.interface(id))
    }

    /// The struct called `name` (as [`id_of`](Self::id_of) takes it).
    pub fn struct_by_name(&self, name: &str) -> Option<&StructInfo> {
        self.id_of(name).and_then(|id| self.struct_info(id))
    }

    /// Every interface of the request (the four capvisor files and what
    /// they import), by file then name.
    pub fn interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.interface_order.iter().map(|id| &self.interfaces[id])
    }

    /// Interfaces reachable from `root`'s method results (a result field
    /// of an interface type, also inside result structs and lists), each
    /// once, in breadth-first order; `root` itself is not included.
    pub fn reachable_from_results(&self, root: u64) -> Vec<&Interface> {
        let mut seen = vec![root];
        let mut queue = std::collections::VecDeque::from([root]);
        let mut out = Vec::new();
        while let Some(id) = queue.pop_front() {
            let Some(i) = self.interface(id) else { continue };
            for m in &i.methods {
                let mut found = Vec::new();
                self.interfaces_in_struct(&m.results, 0, &mut found);
                for f in found {
                    if !seen.contains(&f) {
                        seen.push(f);
                        queue.push_back(f);
                        if let Some(x) = self.interface(f) {
                            out.push(x);
                        }
                    }
                }
            }
        }
        out
    }

    fn interfaces_in_struct(&self, s: &StructInfo, depth: usize, out: &mut Vec<u64>) {
        if depth > MAX_STRUCT_DEPTH {
            return;
        }
        for f in &s.fields {
            self.interfaces_in_type(&f.ty, depth, out);
        }
    }

    fn interfaces_in_type(&self, t: &TypeInfo, depth: usize, out: &mut Vec<u64>) {
        match t {
            TypeInfo::Interface { id, .. } => out.push(*id),
            TypeInfo::List { element } => self.interfaces_in_type(element, depth, out),
            TypeInfo::Struct { id, .. } => {
                if let Some(s) = self.struct_info(*id) {
                    self.interfaces_in_struct(s, depth + 1, out);
                }
            }
            _ => {}
        }
    }

    /// JSON Schema (draft 2020-12) of struct `id` as a JSON object value:
    /// see [`json_schema`].
    pub fn json_schema(&self, id: u64) -> Option<Value> {
        let s = self.struct_info(id)?;
        let mut v = self.struct_schema(s, 0);
        if let Value::Object(o) = &mut v {
            o.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
            o.insert("title".into(), json!(s.name));
        }
        Some(v)
    }

    fn struct_schema(&self, s: &StructInfo, depth: usize) -> Value {
        let mut props = Map::new();
        let mut union = Vec::new();
        for f in &s.fields {
            let mut v = self.type_schema(&f.ty, depth);
            let mut desc = f.doc.clone();
            if f.in_union {
                union.push(f.name.clone());
                let note = "union member: set at most one of the union's members";
                desc = if desc.is_empty() { note.to_string() } else { format!("{desc} ({note})") };
            }
            if let Value::Object(o) = &mut v {
                let inner = o.get("description").and_then(Value::as_str).unwrap_or("").to_string();
                let merged = match (desc.is_empty(), inner.is_empty()) {
                    (true, _) => inner,
                    (false, true) => desc,
                    (false, false) => format!("{desc}\n{inner}"),
                };
                if !merged.is_empty() {
                    o.insert("description".into(), json!(merged));
                }
            }
            props.insert(f.name.clone(), v);
        }
        let mut o = Map::new();
        o.insert("type".into(), json!("object"));
        if !s.doc.is_empty() {
            o.insert("description".into(), json!(s.doc));
        }
        o.insert("properties".into(), Value::Object(props));
        // Every capnp field has a default (zero, empty, the first enumerant).
        o.insert("required".into(), json!([]));
        o.insert("additionalProperties".into(), json!(false));
        if !union.is_empty() {
            // Exactly one branch holds: one member set, or none (the
            // union's default, discriminant 0).
            let mut branches: Vec<Value> = union.iter().map(|n| json!({"title": n, "required": [n]})).collect();
            let any: Vec<Value> = union.iter().map(|n| json!({"required": [n]})).collect();
            branches.push(json!({"title": "(none: the first member's default)", "not": {"anyOf": any}}));
            o.insert("oneOf".into(), Value::Array(branches));
        }
        Value::Object(o)
    }

    fn type_schema(&self, t: &TypeInfo, depth: usize) -> Value {
        fn int(min: i128, max: i128, name: &str) -> Value {
            json!({"type": "integer", "minimum": min, "maximum": max, "description": format!("{name}")})
        }
        match t {
            TypeInfo::Void => json!({"type": "null", "description": "Void: null selects this member"}),
            TypeInfo::Bool => json!({"type": "boolean"}),
            TypeInfo::Int8 => int(i8::MIN.into(), i8::MAX.into(), "Int8"),
            TypeInfo::Int16 => int(i16::MIN.into(), i16::MAX.into(), "Int16"),
            TypeInfo::Int32 => int(i32::MIN.into(), i32::MAX.into(), "Int32"),
            TypeInfo::UInt8 => int(0, u8::MAX.into(), "UInt8"),
            TypeInfo::UInt16 => int(0, u16::MAX.into(), "UInt16"),
            TypeInfo::UInt32 => int(0, u32::MAX.into(), "UInt32"),
            TypeInfo::Int64 => json!({"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX,
                "description": "Int64: exact only up to 2^53 in JSON parsers that read numbers as doubles"}),
            TypeInfo::UInt64 => json!({"type": "integer", "minimum": 0, "maximum": u64::MAX,
                "description": "UInt64: exact only up to 2^53 in JSON parsers that read numbers as doubles"}),
            TypeInfo::Float32 => json!({"type": "number", "description": "Float32"}),
            TypeInfo::Float64 => json!({"type": "number", "description": "Float64"}),
            TypeInfo::Text => json!({"type": "string"}),
            TypeInfo::Data => json!({"type": "string", "contentEncoding": "base64",
                "description": "Data: bytes as base64 (RFC 4648, with padding)"}),
            TypeInfo::List { element } => json!({"type": "array", "items": self.type_schema(element, depth)}),
            TypeInfo::Enum { name, values, .. } => json!({"type": "string", "enum": values,
                "description": format!("{name}: one of {}", values.join(", "))}),
            TypeInfo::Struct { id, name } => match self.struct_info(*id) {
                Some(s) if depth < MAX_STRUCT_DEPTH => self.struct_schema(s, depth + 1),
                _ => json!({"type": "object", "description":
                    format!("{name} (nested deeper than {MAX_STRUCT_DEPTH} levels: not expanded)")}),
            },
            TypeInfo::Interface { name, .. } => json!({"type": "string", "description":
                format!("a capability of interface {name}, given as the name of a session-local cap")}),
            TypeInfo::AnyPointer { pointer: "capability" } => json!({"type": "string", "description":
                "a capability of any interface, given as the name of a session-local cap"}),
            TypeInfo::AnyPointer { .. } => {
                json!({"description": "AnyPointer: any Cap'n Proto value; not expressible in JSON"})
            }
        }
    }
}

/// JSON Schema (draft 2020-12) of the embedded struct `struct_id` (a
/// method's `$Params` for MCP tool input), or `None` for an unknown id.
///
/// Mapping: integers with `minimum`/`maximum` of their width (Int64 and
/// UInt64 say in `description` that JSON doubles are exact only to 2^53);
/// Float32/64 `number`; Text `string`; Data base64 `string` with
/// `"contentEncoding": "base64"`; enums a string `enum` of enumerant
/// names; `List(T)` an `array`; structs and groups nested `object`s (to
/// [`MAX_STRUCT_DEPTH`]) with `description` from doc comments and
/// `additionalProperties: false`; a union a `oneOf` of "this member is
/// set" branches plus "none set"; a capability a `string` naming a
/// session-local cap; Void `null`. `required` is always empty: every
/// capnp field has a default.
pub fn json_schema(struct_id: u64) -> Option<Value> {
    schema().json_schema(struct_id)
}

fn convert_type(
    t: type_::Reader<'_>,
    s: &Schema,
    short: &dyn Fn(u64) -> Result<(String, String), ReflectError>,
) -> Result<TypeInfo, ReflectError> {
    Ok(match t.which()? {
        type_::Void(()) => TypeInfo::Void,
        type_::Bool(()) => TypeInfo::Bool,
        type_::Int8(()) => TypeInfo::Int8,
        type_::Int16(()) => TypeInfo::Int16,
        type_::Int32(()) => TypeInfo::Int32,
        type_::Int64(()) => TypeInfo::Int64,
        type_::Uint8(()) => TypeInfo::UInt8,
        type_::Uint16(()) => TypeInfo::UInt16,
        type_::Uint32(()) => TypeInfo::UInt32,
        type_::Uint64(()) => TypeInfo::UInt64,
        type_::Float32(()) => TypeInfo::Float32,
        type_::Float64(()) => TypeInfo::Float64,
        type_::Text(()) => TypeInfo::Text,
        type_::Data(()) => TypeInfo::Data,
        type_::List(l) => TypeInfo::List { element: Box::new(convert_type(l.get_element_type()?, s, short)?) },
        type_::Enum(e) => {
            let id = e.get_type_id();
            let values = s.enums.get(&id).map(|en| en.values.iter().map(|v| v.0.clone()).collect()).unwrap_or_default();
            TypeInfo::Enum { id, name: short(id)?.0, values }
        }
        type_::Struct(st) => {
            let id = st.get_type_id();
            TypeInfo::Struct { id, name: short(id)?.0 }
        }
        type_::Interface(i) => {
            let id = i.get_type_id();
            TypeInfo::Interface { id, name: short(id)?.0 }
        }
        type_::AnyPointer(a) => {
            use type_::any_pointer;
            let pointer = match a.which()? {
                any_pointer::Unconstrained(u) => match u.which()? {
                    any_pointer::unconstrained::AnyKind(()) => "any",
                    any_pointer::unconstrained::Struct(()) => "struct",
                    any_pointer::unconstrained::List(()) => "list",
                    any_pointer::unconstrained::Capability(()) => "capability",
                },
                _ => "parameter",
            };
            TypeInfo::AnyPointer { pointer }
        }
    })
}

/// The raw bits of a data field's default value (see [`FieldSlot::Slot`]);
/// 0 for pointer types and Void.
fn default_bits(v: capnp::schema_capnp::value::Reader<'_>) -> Result<u64, ReflectError> {
    use capnp::schema_capnp::value;
    Ok(match v.which()? {
        value::Bool(b) => u64::from(b),
        value::Int8(x) => u64::from(x as u8),
        value::Int16(x) => u64::from(x as u16),
        value::Int32(x) => u64::from(x as u32),
        value::Int64(x) => x as u64,
        value::Uint8(x) => u64::from(x),
        value::Uint16(x) => u64::from(x),
        value::Uint32(x) => u64::from(x),
        value::Uint64(x) => x,
        value::Float32(x) => u64::from(x.to_bits()),
        value::Float64(x) => x.to_bits(),
        value::Enum(x) => u64::from(x),
        _ => 0,
    })
}

/// A doc comment without the trailing newline the compiler leaves.
fn clean_doc(d: &str) -> String {
    d.trim_end().to_string()
}

/// The first line of a doc comment ("" for none).
pub fn first_line(doc: &str) -> &str {
    doc.lines().next().unwrap_or("").trim()
}

fn hex_id<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{id:#018x}"))
}

fn hex_ids<S: serde::Serializer>(ids: &[u64], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(ids.len()))?;
    for id in ids {
        seq.serialize_element(&format!("{id:#018x}"))?;
    }
    seq.end()
}

#[cfg(test)]
mod tests;
