//! Calling any method of any capability by name, with parameters and
//! results as JSON, through the schema embedded in the binary
//! (`capvisor_schema::reflect`; docs/decisions.md, "Schema reflection" and
//! "Delegation": calling by name).
//!
//! capnp-rust's dynamic structs need the generated code of each struct;
//! a method's `$Params` is known here only by its type id. So parameters
//! are written, and results read, with the wire layout reflection gives
//! ([`StructLayout`]: section sizes, slot offsets, union discriminants,
//! data defaults) on capnp's struct and list accessors, and the call goes
//! out as `Client::new_call(interface_id, method_ordinal)` with an
//! `AnyPointer` root. Nothing about a method is written by hand: every
//! method of every interface in the schema is callable.
//!
//! # JSON mapping
//!
//! The one `capvisor schema --json` and the MCP tool schemas describe
//! (`reflect::json_schema`):
//!
//! - Bool: `true`/`false`. Integers: a JSON number, or a string holding
//!   one (`"18446744073709551615"`: JSON parsers that read numbers as
//!   doubles lose Int64/UInt64 above 2^53); out of the type's range is
//!   invalid. Float32/Float64: a number (`"NaN"`, `"inf"`, `"-inf"` as
//!   strings). Results print integers as exact JSON numbers.
//! - Text: a string. Data: a base64 string (RFC 4648, padded), or an
//!   object `{"utf8": "text"}` (or `{"base64": ".."}`) for bytes given as
//!   text; results show Data as base64.
//! - Enums: the enumerant's name (or its ordinal as a number).
//! - `List(T)`: an array. Structs and groups: objects, by field name;
//!   a field left out (or `null`) keeps its default. A union: at most one
//!   of its members' names as a key (a Void member: any value, e.g.
//!   `null`); results show only the member that is set.
//! - Capabilities: a parameter names a cap the caller holds, as `"name"`
//!   or `"@name"`, resolved by the caller's `resolve` function (a cap of
//!   another interface is `wrongInterface`). A top-level `Common.ByteSink`
//!   parameter left out gets a sink that collects what is written into it
//!   (at most [`STREAM_LIMIT`] bytes, then cut with a marker); its bytes
//!   show under `"$streams"` in the results, by parameter name. In results
//!   a capability shows as `{"$cap": "<Interface>", "field": "<path>"}`,
//!   and [`DynResults::caps`] holds it under that path (`vm`,
//!   `entries.0.cap`).
//! - `AnyPointer` other than a capability is not expressible: invalid in
//!   parameters, `{"$anyPointer": "not shown"}` in results.
//!
//! Limits: a pointer field with an explicit default in the schema reads as
//! its zero value when unset (capvisor's schema has none; a reflect test
//! guards that); generic parameters are not supported.
//!
//! # Errors
//! Bad JSON is [`ClientError::Domain`] with code `invalidArgument` naming
//! the field (`spec.argv.0`) and the type expected; an unknown method or
//! cap name `notFound`; a cap of the wrong interface `wrongInterface`; what
//! the server answers keeps its typed code (`denied`, `notFound`, ...).

use crate::error::{ClientError, ClientResult};
use base64::Engine as _;
use capnp::capability::{self, Response};
use capnp::private::layout::{PointerBuilder, PointerReader, StructBuilder, StructReader, StructSize};
use capnp::traits::{FromPointerBuilder, FromPointerReader, HasStructSize, IntoInternalStructReader, OwnedStruct};
use capnp::{any_pointer, any_pointer_list, data_list, primitive_list, struct_list, text_list};
use capvisor_rpc::schema::common_capnp::{byte_sink, ErrorCode};
use capvisor_rpc::CvError;
use capvisor_schema::reflect::{schema, FieldSlot, Interface, Method, Schema, StructInfo, StructLayout, TypeInfo};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// The most bytes kept of one collected stream (`"$streams"`): 1 MiB.
/// Bytes past it are counted and dropped (the writer is not failed), and
/// the shown text ends with a marker saying how many there were.
pub const STREAM_LIMIT: usize = 1 << 20;

/// How long [`call`] waits, after the results came, for collected streams
/// to end (their writer calls `done`, or drops them): 60 s. A stream still
/// open then is shown as far as it got, with a marker.
pub const STREAM_WAIT: Duration = Duration::from_secs(60);

/// A capability held by the client with the interface it was typed as.
#[derive(Clone)]
pub struct Held {
    /// The Cap'n Proto interface id the cap is used as (what `CapSet.get`
    /// was asked for, or the result field's type). 0: not known (an
    /// untyped `Capability` result); calling it by name fails.
    pub interface_id: u64,
    /// The cap (possibly a promise: calls on it are pipelined).
    pub client: capability::Client,
}

impl Held {
    /// A cap used as `interface_id`.
    pub fn new(interface_id: u64, client: capability::Client) -> Held {
        Held { interface_id, client }
    }

    /// Its interface in the embedded schema, if known.
    pub fn interface(&self) -> Option<&'static Interface> {
        schema().interface(self.interface_id)
    }
}

/// One call's answer: JSON of the result struct (caps rendered as
/// `{"$cap": "<Interface>", "field": ..}`), and the caps found in it by JSON
/// field name.
pub struct DynResults {
    /// The result struct as a JSON object, plus `"$streams"` (an object of
    /// collected stream texts by parameter name) when a `ByteSink`
    /// parameter was left out.
    pub json: Value,
    /// Every capability in the results, by field path (`vm`, or
    /// `entries.0.cap` inside lists and structs), in field order.
    pub caps: Vec<(String, Held)>,
}

/// The method `name` of interface `interface_id` (or of an interface it
/// extends), with the id of the interface that declares it: the id a call
/// of that method carries on the wire.
///
/// # Errors
/// `unavailable` when this binary's schema has no interface
/// `interface_id`; `notFound` when it has no such method (the message
/// lists the methods it has).
pub fn find_method(interface_id: u64, name: &str) -> ClientResult<(u64, &'static Method)> {
    find_method_in(schema(), interface_id, name)
}

fn find_method_in(s: &'static Schema, interface_id: u64, name: &str) -> ClientResult<(u64, &'static Method)> {
    let root = s.interface(interface_id).ok_or_else(|| {
        CvError::unavailable(format!(
            "interface {interface_id:#018x} is not in this binary's schema (a server newer than this client?)"
        ))
    })?;
    let mut queue = std::collections::VecDeque::from([root]);
    let mut seen = vec![root.id];
    let mut all = Vec::new();
    while let Some(i) = queue.pop_front() {
        if let Some(m) = i.method(name) {
            return Ok((i.id, m));
        }
        all.extend(i.methods.iter().map(|m| m.name.as_str()));
        for sup in &i.superclasses {
            if let Some(x) = s.interface(*sup) {
                if !seen.contains(&x.id) {
                    seen.push(x.id);
                    queue.push_back(x);
                }
            }
        }
    }
    Err(CvError::not_found(format!("{} has no method {name:?}; its methods: {}", root.name, all.join(", "))).into())
}

/// The capability fields of a result struct a call can be pipelined on:
/// `(path, interface id or None for an untyped Capability)`, through
/// nested structs and groups (not lists), in field order.
pub fn cap_fields(results: &StructInfo) -> Vec<(String, Option<u64>)> {
    cap_fields_in(schema(), results)
}

fn cap_fields_in(sch: &Schema, results: &StructInfo) -> Vec<(String, Option<u64>)> {
    fn walk(sch: &Schema, s: &StructInfo, prefix: &str, depth: usize, out: &mut Vec<(String, Option<u64>)>) {
        if depth > capvisor_schema::reflect::MAX_STRUCT_DEPTH {
            return;
        }
        for f in &s.fields {
            let path = join(prefix, &f.name);
            match &f.ty {
                TypeInfo::Interface { id, .. } => out.push((path, Some(*id))),
                TypeInfo::AnyPointer { pointer: "capability" } => out.push((path, None)),
                TypeInfo::Struct { id, .. } => {
                    if let Some(n) = sch.struct_info(*id) {
                        walk(sch, n, &path, depth + 1, out);
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(sch, results, "", 0, &mut out);
    out
}

/// Builds params for `method` of `cap`'s interface from a JSON object
/// (see the module's JSON mapping), calls it, and renders the results.
/// `Common.ByteSink` params left out get a collecting sink whose bytes
/// appear in [`DynResults::json`] under `"$streams"` (bounded by
/// [`STREAM_LIMIT`] each, truncated with a marker; waited for up to
/// [`STREAM_WAIT`] after the results); other cap params must name a held
/// cap (`"@name"` resolved by `resolve`).
///
/// # Errors
/// [`ClientError::Domain`] with the typed capvisor code for domain errors
/// (the server's, or `notFound` for an unknown method or cap name,
/// `wrongInterface` for a cap of another interface), `invalidArgument` for
/// bad JSON naming the field and the expected type; transport failures as
/// [`ClientError::Disconnected`] / [`ClientError::Rpc`].
pub async fn call(
    cap: &Held,
    method: &str,
    params: &Value,
    resolve: &dyn Fn(&str) -> Option<Held>,
) -> ClientResult<DynResults> {
    start(cap, method, params, resolve)?.finish(Some(STREAM_WAIT)).await
}

/// Like [`call`] but returns the result's capability field `field` (a path
/// as [`cap_fields`] gives it) as a pipelined cap at once, with no round
/// trip, and the call itself, to be finished with [`DynCall::finish`].
/// Calls made on the cap travel with the call that produces it; if that
/// call fails, they fail with its error.
///
/// # Errors
/// As [`call`] for what is checked before sending; `invalidArgument` when
/// `field` is not a capability field of the method's results.
pub fn call_pipelined(
    cap: &Held,
    method: &str,
    params: &Value,
    field: &str,
    resolve: &dyn Fn(&str) -> Option<Held>,
) -> ClientResult<(Held, DynCall)> {
    let c = start(cap, method, params, resolve)?;
    Ok((c.pipelined(field)?, c))
}

/// A call sent by [`start`]: its results to come, a pipeline on them, and
/// the streams collected for its left-out `ByteSink` params.
pub struct DynCall {
    sch: &'static Schema,
    promise: capability::Promise<Response<any_pointer::Owned>, capnp::Error>,
    pipeline: any_pointer::Pipeline,
    method: &'static Method,
    /// The `interfaceId` param, if the method has one: the interface of an
    /// untyped `Capability` result (`CapSet.get`).
    iface_hint: Option<u64>,
    streams: Vec<(String, Rc<Stream>)>,
}

/// Builds the params and sends the call of `method` on `cap` without
/// waiting: the results come with [`DynCall::finish`]; caps in them can be
/// used at once through [`DynCall::pipelined`].
///
/// # Errors
/// As [`call`], for what is checked before anything is sent.
pub fn start(
    cap: &Held,
    method: &str,
    params: &Value,
    resolve: &dyn Fn(&str) -> Option<Held>,
) -> ClientResult<DynCall> {
    start_in(schema(), cap, method, params, resolve)
}

fn start_in(
    sch: &'static Schema,
    cap: &Held,
    method: &str,
    params: &Value,
    resolve: &dyn Fn(&str) -> Option<Held>,
) -> ClientResult<DynCall> {
    let (iface, m) = find_method_in(sch, cap.interface_id, method)?;
    let layout = layout_of(sch, &m.params)?;
    let mut req = cap.client.new_call::<any_pointer::Owned, any_pointer::Owned>(iface, m.ordinal, None);
    let mut enc = Enc { sch, resolve, streams: Vec::new() };
    let root = PtrB::of(req.get())?.init_struct(size_of(layout));
    enc.write_struct(root, &m.params, params, "", true)?;
    let iface_hint = m
        .params
        .fields
        .iter()
        .any(|f| f.name == "interfaceId" && f.ty == TypeInfo::UInt64)
        .then(|| params.get("interfaceId").and_then(|v| bits_of(v, &TypeInfo::UInt64, "interfaceId").ok()))
        .flatten();
    let sent = req.send();
    Ok(DynCall { sch, promise: sent.promise, pipeline: sent.pipeline, method: m, iface_hint, streams: enc.streams })
}

impl DynCall {
    /// The method being called.
    pub fn method(&self) -> &'static Method {
        self.method
    }

    /// The capability at result field `field` (a path as [`cap_fields`]
    /// gives it: `vm`, or `a.b` through struct fields), pipelined: usable
    /// at once, before the results came.
    ///
    /// # Errors
    /// `invalidArgument` when the results have no capability field there
    /// (the message lists the ones they have).
    pub fn pipelined(&self, field: &str) -> ClientResult<Held> {
        let bad = || {
            let have: Vec<String> = cap_fields_in(self.sch, &self.method.results).into_iter().map(|c| c.0).collect();
            ClientError::from(CvError::invalid(format!(
                "{} returns no capability at {field:?}; its capability results: {}",
                self.method.name,
                if have.is_empty() { "none".to_string() } else { have.join(", ") }
            )))
        };
        let mut s: &StructInfo = &self.method.results;
        let mut p = self.pipeline.noop();
        let parts: Vec<&str> = field.split('.').collect();
        for (k, part) in parts.iter().enumerate() {
            let i = s.fields.iter().position(|f| f.name == *part).ok_or_else(bad)?;
            let f = &s.fields[i];
            let slot = layout_of(self.sch, s)?.fields[i];
            let last = k + 1 == parts.len();
            match (&f.ty, slot) {
                (TypeInfo::Struct { id, .. }, FieldSlot::Group) if !last => {
                    s = self.sch.struct_info(*id).ok_or_else(bad)?;
                }
                (TypeInfo::Struct { id, .. }, FieldSlot::Slot { offset, .. }) if !last => {
                    p = p.get_pointer_field(offset as u16);
                    s = self.sch.struct_info(*id).ok_or_else(bad)?;
                }
                (TypeInfo::Interface { id, .. }, FieldSlot::Slot { offset, .. }) if last => {
                    return Ok(Held::new(*id, capability::Client::new(p.get_pointer_field(offset as u16).as_cap())));
                }
                (TypeInfo::AnyPointer { pointer: "capability" }, FieldSlot::Slot { offset, .. }) if last => {
                    let id = self.iface_hint.unwrap_or(0);
                    return Ok(Held::new(id, capability::Client::new(p.get_pointer_field(offset as u16).as_cap())));
                }
                _ => return Err(bad()),
            }
        }
        Err(bad())
    }

    /// Waits for the results and renders them; then waits up to
    /// `stream_wait` (`None`: until they end) for the collected streams to
    /// end and adds them under `"$streams"`.
    ///
    /// # Errors
    /// The call's failure, classified as in [`ClientError`] (typed code for
    /// domain errors).
    pub async fn finish(self, stream_wait: Option<Duration>) -> ClientResult<DynResults> {
        let resp = self.promise.await?;
        let root = resp.get()?;
        let mut dec = Dec { sch: self.sch, caps: Vec::new(), iface_hint: self.iface_hint };
        let mut json = if root.is_null() {
            Value::Object(Map::new())
        } else {
            dec.read_struct(PtrR::of(root)?.get_struct(None)?, &self.method.results, "")?
        };
        if !self.streams.is_empty() {
            let all = async {
                for (_, s) in &self.streams {
                    s.ended().await;
                }
            };
            let waited = match stream_wait {
                Some(d) => tokio::time::timeout(d, all).await.is_ok(),
                None => {
                    all.await;
                    true
                }
            };
            let mut out = Map::new();
            for (name, s) in &self.streams {
                out.insert(name.clone(), s.render(if waited { None } else { stream_wait }));
            }
            if let Value::Object(o) = &mut json {
                o.insert("$streams".into(), Value::Object(out));
            }
        }
        Ok(DynResults { json, caps: dec.caps })
    }
}

// ---------------------------------------------------------------------------
// Raw access to capnp structs by layout.

/// A struct of a layout known only at run time, for capnp's struct lists.
struct RawStruct;

impl capnp::introspect::Introspect for RawStruct {
    fn introspect() -> capnp::introspect::Type {
        // Not used by anything here: dynamic values are not built from it.
        capnp::introspect::TypeVariant::AnyPointer.into()
    }
}

impl OwnedStruct for RawStruct {
    type Reader<'a> = RawReader<'a>;
    type Builder<'a> = RawBuilder<'a>;
}

struct RawReader<'a>(StructReader<'a>);

impl<'a> From<StructReader<'a>> for RawReader<'a> {
    fn from(r: StructReader<'a>) -> Self {
        RawReader(r)
    }
}

impl<'a> IntoInternalStructReader<'a> for RawReader<'a> {
    fn into_internal_struct_reader(self) -> StructReader<'a> {
        self.0
    }
}

impl capnp::traits::SetterInput<RawStruct> for RawReader<'_> {
    fn set_pointer_builder(mut builder: PointerBuilder<'_>, input: Self, canonicalize: bool) -> capnp::Result<()> {
        builder.set_struct(&input.0, canonicalize)
    }
}

struct RawBuilder<'a>(StructBuilder<'a>);

impl<'a> From<StructBuilder<'a>> for RawBuilder<'a> {
    fn from(b: StructBuilder<'a>) -> Self {
        RawBuilder(b)
    }
}

impl HasStructSize for RawBuilder<'_> {
    // Lists are made with their real element size (init_struct_list) before
    // being opened as struct_list::Builder<RawStruct>; opening never shrinks.
    const STRUCT_SIZE: StructSize = StructSize { data: 0, pointers: 0 };
}

/// The pointer under an `any_pointer::Builder`.
struct PtrB<'a>(PointerBuilder<'a>);

impl<'a> FromPointerBuilder<'a> for PtrB<'a> {
    fn init_pointer(builder: PointerBuilder<'a>, _length: u32) -> Self {
        PtrB(builder)
    }
    fn get_from_pointer(builder: PointerBuilder<'a>, _default: Option<&'a [capnp::Word]>) -> capnp::Result<Self> {
        Ok(PtrB(builder))
    }
}

impl<'a> PtrB<'a> {
    fn of(b: any_pointer::Builder<'a>) -> capnp::Result<PointerBuilder<'a>> {
        Ok(b.get_as::<PtrB<'a>>()?.0)
    }
}

/// The pointer under an `any_pointer::Reader`.
struct PtrR<'a>(PointerReader<'a>);

impl<'a> FromPointerReader<'a> for PtrR<'a> {
    fn get_from_pointer(reader: &PointerReader<'a>, _default: Option<&'a [capnp::Word]>) -> capnp::Result<Self> {
        Ok(PtrR(*reader))
    }
}

impl<'a> PtrR<'a> {
    fn of(r: any_pointer::Reader<'a>) -> capnp::Result<PointerReader<'a>> {
        Ok(r.get_as::<PtrR<'a>>()?.0)
    }
}

fn layout_of(sch: &'static Schema, s: &StructInfo) -> ClientResult<&'static StructLayout> {
    sch.struct_layout(s.id)
        .ok_or_else(|| CvError::internal(format!("no layout for struct {} in the embedded schema", s.name)).into())
}

fn struct_of(sch: &'static Schema, id: u64) -> ClientResult<&'static StructInfo> {
    sch.struct_info(id).ok_or_else(|| CvError::internal(format!("struct {id:#x} not in the embedded schema")).into())
}

fn size_of(l: &StructLayout) -> StructSize {
    StructSize { data: l.data_words, pointers: l.pointers }
}

/// Width in bits of a data type (0: Void; None: a pointer type).
fn width(t: &TypeInfo) -> Option<u32> {
    Some(match t {
        TypeInfo::Void => 0,
        TypeInfo::Bool => 1,
        TypeInfo::Int8 | TypeInfo::UInt8 => 8,
        TypeInfo::Int16 | TypeInfo::UInt16 | TypeInfo::Enum { .. } => 16,
        TypeInfo::Int32 | TypeInfo::UInt32 | TypeInfo::Float32 => 32,
        TypeInfo::Int64 | TypeInfo::UInt64 | TypeInfo::Float64 => 64,
        _ => return None,
    })
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "the parameters"
    } else {
        path
    }
}

fn invalid(path: &str, want: impl std::fmt::Display, got: &Value) -> ClientError {
    let mut g = got.to_string();
    if g.len() > 80 {
        let mut end = 77;
        while !g.is_char_boundary(end) {
            end -= 1;
        }
        g.truncate(end);
        g.push_str("...");
    }
    CvError::invalid(format!("{}: expected {want}, got {g}", shown(path))).into()
}

/// What a type is called in an error message ("UInt16", "Engine (one of
/// auto, qemu, kvm)", ...).
fn expected(t: &TypeInfo) -> String {
    match t {
        TypeInfo::Enum { name, values, .. } => format!("{name} (one of {})", values.join(", ")),
        TypeInfo::Data => "Data: a base64 string (RFC 4648, padded) or {\"utf8\": \"text\"}".into(),
        TypeInfo::Int64 | TypeInfo::UInt64 => format!("{} (a number, or a string holding one)", t.display()),
        TypeInfo::Struct { name, .. } => format!("an object ({name})"),
        TypeInfo::List { .. } => format!("an array ({})", t.display()),
        TypeInfo::Interface { name, .. } => format!("the name of a held {name} cap (\"@name\")"),
        _ => t.display(),
    }
}

/// The raw bits of a data value as wide as its type (see
/// `reflect::FieldSlot::Slot`'s `default_bits`).
fn bits_of(v: &Value, t: &TypeInfo, path: &str) -> ClientResult<u64> {
    let int = |min: i128, max: i128| -> ClientResult<i128> {
        let x = match v {
            Value::Number(n) => n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)),
            Value::String(s) => s.trim().parse::<i128>().ok(),
            _ => None,
        };
        x.filter(|x| (min..=max).contains(x)).ok_or_else(|| invalid(path, expected(t), v))
    };
    let float = || -> ClientResult<f64> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => match s.trim() {
                "NaN" | "nan" => Some(f64::NAN),
                "inf" | "Infinity" | "+inf" => Some(f64::INFINITY),
                "-inf" | "-Infinity" => Some(f64::NEG_INFINITY),
                other => other.parse().ok(),
            },
            _ => None,
        }
        .ok_or_else(|| invalid(path, expected(t), v))
    };
    Ok(match t {
        TypeInfo::Void => 0,
        TypeInfo::Bool => u64::from(v.as_bool().ok_or_else(|| invalid(path, "Bool (true or false)", v))?),
        TypeInfo::Int8 => u64::from(int(i8::MIN.into(), i8::MAX.into())? as i8 as u8),
        TypeInfo::Int16 => u64::from(int(i16::MIN.into(), i16::MAX.into())? as i16 as u16),
        TypeInfo::Int32 => u64::from(int(i32::MIN.into(), i32::MAX.into())? as i32 as u32),
        TypeInfo::Int64 => int(i64::MIN.into(), i64::MAX.into())? as i64 as u64,
        TypeInfo::UInt8 => int(0, u8::MAX.into())? as u64,
        TypeInfo::UInt16 => int(0, u16::MAX.into())? as u64,
        TypeInfo::UInt32 => int(0, u32::MAX.into())? as u64,
        TypeInfo::UInt64 => int(0, u64::MAX.into())? as u64,
        TypeInfo::Float32 => u64::from((float()? as f32).to_bits()),
        TypeInfo::Float64 => float()?.to_bits(),
        TypeInfo::Enum { values, .. } => {
            let i = match v {
                Value::String(s) => values.iter().position(|x| x == s),
                Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()).filter(|n| *n < values.len()),
                _ => None,
            };
            i.ok_or_else(|| invalid(path, expected(t), v))? as u64
        }
        _ => return Err(CvError::internal(format!("{path}: {} is not a data type", t.display())).into()),
    })
}

/// A data value's JSON from its raw bits.
fn json_of_bits(bits: u64, t: &TypeInfo) -> Value {
    let float = |f: f64| {
        serde_json::Number::from_f64(f).map(Value::Number).unwrap_or_else(|| {
            json!(if f.is_nan() {
                "NaN"
            } else if f > 0.0 {
                "inf"
            } else {
                "-inf"
            })
        })
    };
    match t {
        TypeInfo::Bool => json!(bits != 0),
        TypeInfo::Int8 => json!(bits as u8 as i8),
        TypeInfo::Int16 => json!(bits as u16 as i16),
        TypeInfo::Int32 => json!(bits as u32 as i32),
        TypeInfo::Int64 => json!(bits as i64),
        TypeInfo::UInt8 | TypeInfo::UInt16 | TypeInfo::UInt32 | TypeInfo::UInt64 => json!(bits),
        TypeInfo::Float32 => float(f64::from(f32::from_bits(bits as u32))),
        TypeInfo::Float64 => float(f64::from_bits(bits)),
        TypeInfo::Enum { values, .. } => values.get(bits as usize).map(|n| json!(n)).unwrap_or(json!(bits)),
        _ => Value::Null,
    }
}

fn data_of(v: &Value, path: &str) -> ClientResult<Vec<u8>> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s.trim()).ok();
    let bytes = match v {
        Value::String(s) => b64(s),
        Value::Object(o) if o.len() == 1 => match o.iter().next() {
            Some((k, Value::String(s))) if k == "utf8" => Some(s.as_bytes().to_vec()),
            Some((k, Value::String(s))) if k == "base64" => b64(s),
            _ => None,
        },
        _ => None,
    };
    bytes.ok_or_else(|| invalid(path, expected(&TypeInfo::Data), v))
}

fn is_byte_sink(t: &TypeInfo) -> bool {
    matches!(t, TypeInfo::Interface { id, .. } if *id == <byte_sink::Client as capnp::traits::HasTypeId>::TYPE_ID)
}

// ---------------------------------------------------------------------------
// JSON -> capnp.

struct Enc<'r> {
    sch: &'static Schema,
    resolve: &'r dyn Fn(&str) -> Option<Held>,
    streams: Vec<(String, Rc<Stream>)>,
}

impl Enc<'_> {
    /// Writes object `v` into struct (or group) `s` at `b`. `top`: the
    /// method's params (left-out ByteSinks get collecting sinks).
    fn write_struct(
        &mut self,
        mut b: StructBuilder<'_>,
        s: &'static StructInfo,
        v: &Value,
        path: &str,
        top: bool,
    ) -> ClientResult<()> {
        let l = layout_of(self.sch, s)?;
        let empty = Map::new();
        let obj = match v {
            Value::Object(o) => o,
            Value::Null => &empty,
            _ => return Err(invalid(path, format!("an object ({})", s.name), v)),
        };
        for k in obj.keys() {
            if !s.fields.iter().any(|f| &f.name == k) {
                let names: Vec<&str> = s.fields.iter().map(|f| f.name.as_str()).collect();
                return Err(CvError::invalid(format!(
                    "{}: {} has no field {k:?}; its fields: {}",
                    shown(path),
                    s.name,
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ))
                .into());
            }
        }
        let members: Vec<&str> =
            s.fields.iter().filter(|f| f.in_union && obj.contains_key(&f.name)).map(|f| f.name.as_str()).collect();
        if members.len() > 1 {
            return Err(CvError::invalid(format!(
                "{}: set at most one member of {}'s union, not {}",
                shown(path),
                s.name,
                members.join(" and ")
            ))
            .into());
        }
        for (f, slot) in s.fields.iter().zip(&l.fields) {
            let fpath = join(path, &f.name);
            let val = obj.get(&f.name);
            if f.in_union {
                let Some(d) = f.discriminant.filter(|_| val.is_some()) else { continue };
                check_data(l, l.discriminant_offset, 16, &fpath)?;
                b.set_data_field::<u16>(l.discriminant_offset as usize, d);
            }
            let val = match val {
                Some(Value::Null) | None if top && is_byte_sink(&f.ty) => {
                    let (client, stream) = Stream::sink();
                    let FieldSlot::Slot { offset, .. } = slot else { continue };
                    check_ptr(l, *offset, &fpath)?;
                    any_pointer::Builder::new(b.reborrow().get_pointer_field(*offset as usize))
                        .set_as_capability(client.client.hook);
                    self.streams.push((f.name.clone(), stream));
                    continue;
                }
                Some(Value::Null) | None => continue,
                Some(v) => v,
            };
            match (slot, &f.ty) {
                (FieldSlot::Group, TypeInfo::Struct { id, .. }) => {
                    self.write_struct(b.reborrow(), struct_of(self.sch, *id)?, val, &fpath, false)?;
                }
                (FieldSlot::Slot { offset, default_bits, .. }, t) => match width(t) {
                    Some(0) => {}
                    Some(w) => {
                        let bits = bits_of(val, t, &fpath)?;
                        check_data(l, *offset, w, &fpath)?;
                        let o = *offset as usize;
                        let d = *default_bits;
                        match w {
                            1 => b.set_bool_field(o, (bits ^ d) & 1 != 0),
                            8 => b.set_data_field::<u8>(o, (bits ^ d) as u8),
                            16 => b.set_data_field::<u16>(o, (bits ^ d) as u16),
                            32 => b.set_data_field::<u32>(o, (bits ^ d) as u32),
                            _ => b.set_data_field::<u64>(o, bits ^ d),
                        }
                    }
                    None => {
                        check_ptr(l, *offset, &fpath)?;
                        let p = any_pointer::Builder::new(b.reborrow().get_pointer_field(*offset as usize));
                        self.write_pointer(p, t, val, &fpath)?;
                    }
                },
                (FieldSlot::Group, t) => {
                    return Err(CvError::internal(format!("{fpath}: a group of type {}", t.display())).into())
                }
            }
        }
        Ok(())
    }

    /// Writes `v` of pointer type `t` at `p`.
    fn write_pointer(
        &mut self,
        mut p: any_pointer::Builder<'_>,
        t: &TypeInfo,
        v: &Value,
        path: &str,
    ) -> ClientResult<()> {
        match t {
            TypeInfo::Text => {
                let s = v.as_str().ok_or_else(|| invalid(path, "Text (a string)", v))?;
                p.set_as::<capnp::text::Owned>(s)?;
            }
            TypeInfo::Data => {
                let d = data_of(v, path)?;
                p.set_as::<capnp::data::Owned>(&d[..])?;
            }
            TypeInfo::Struct { id, .. } => {
                let s = struct_of(self.sch, *id)?;
                if !v.is_object() {
                    return Err(invalid(path, expected(t), v));
                }
                let b = PtrB::of(p)?.init_struct(size_of(layout_of(self.sch, s)?));
                self.write_struct(b, s, v, path, false)?;
            }
            TypeInfo::List { element } => self.write_list(p, element, v, path)?,
            TypeInfo::Interface { id, name } => {
                let h = self.cap_named(v, Some((*id, name)), path)?;
                p.set_as_capability(h.client.hook);
            }
            TypeInfo::AnyPointer { pointer: "capability" } => {
                let h = self.cap_named(v, None, path)?;
                p.set_as_capability(h.client.hook);
            }
            _ => {
                return Err(
                    CvError::invalid(format!("{}: a {} cannot be given in JSON", shown(path), t.display())).into()
                )
            }
        }
        Ok(())
    }

    fn write_list(&mut self, p: any_pointer::Builder<'_>, e: &TypeInfo, v: &Value, path: &str) -> ClientResult<()> {
        let arr = v.as_array().ok_or_else(|| invalid(path, format!("an array (List({}))", e.display()), v))?;
        let n = u32::try_from(arr.len()).map_err(|_| CvError::invalid(format!("{path}: list too long")))?;
        let at = |i: usize| join(path, &i.to_string());
        macro_rules! prim {
            ($t:ty) => {{
                let mut l = p.initn_as::<primitive_list::Builder<'_, $t>>(n);
                for (i, x) in arr.iter().enumerate() {
                    l.set(i as u32, bits_of(x, e, &at(i))? as $t);
                }
            }};
        }
        match (e, width(e)) {
            (_, Some(0)) => {
                p.initn_as::<primitive_list::Builder<'_, ()>>(n);
            }
            (_, Some(1)) => {
                let mut l = p.initn_as::<primitive_list::Builder<'_, bool>>(n);
                for (i, x) in arr.iter().enumerate() {
                    l.set(i as u32, bits_of(x, e, &at(i))? != 0);
                }
            }
            (_, Some(8)) => prim!(u8),
            (_, Some(16)) => prim!(u16),
            (_, Some(32)) => prim!(u32),
            (_, Some(_)) => prim!(u64),
            (TypeInfo::Text, None) => {
                let mut l = p.initn_as::<text_list::Builder<'_>>(n);
                for (i, x) in arr.iter().enumerate() {
                    l.set(i as u32, x.as_str().ok_or_else(|| invalid(&at(i), "Text (a string)", x))?);
                }
            }
            (TypeInfo::Data, None) => {
                let mut l = p.initn_as::<data_list::Builder<'_>>(n);
                for (i, x) in arr.iter().enumerate() {
                    l.set(i as u32, &data_of(x, &at(i))?);
                }
            }
            (TypeInfo::Struct { id, .. }, None) => {
                let s = struct_of(self.sch, *id)?;
                let mut pb = PtrB::of(p)?;
                pb.reborrow().init_struct_list(n, size_of(layout_of(self.sch, s)?));
                let mut l = any_pointer::Builder::new(pb).get_as::<struct_list::Builder<'_, RawStruct>>()?;
                for (i, x) in arr.iter().enumerate() {
                    if !x.is_object() {
                        return Err(invalid(&at(i), expected(e), x));
                    }
                    self.write_struct(l.reborrow().get(i as u32).0, s, x, &at(i), false)?;
                }
            }
            (_, None) => {
                let mut l = p.initn_as::<any_pointer_list::Builder<'_>>(n);
                for (i, x) in arr.iter().enumerate() {
                    self.write_pointer(l.reborrow().get(i as u32), e, x, &at(i))?;
                }
            }
        }
        Ok(())
    }

    /// The held cap `v` names (`"name"` or `"@name"`), checked against the
    /// interface the field wants.
    fn cap_named(&self, v: &Value, want: Option<(u64, &str)>, path: &str) -> ClientResult<Held> {
        let what = match want {
            Some((_, n)) => format!("the name of a held {n} cap (\"@name\")"),
            None => "the name of a held cap (\"@name\")".to_string(),
        };
        let name = v.as_str().ok_or_else(|| invalid(path, &what, v))?;
        let name = name.strip_prefix('@').unwrap_or(name);
        let h = (self.resolve)(name).ok_or_else(|| {
            ClientError::from(CvError::not_found(format!("{}: no cap named {name:?} is held", shown(path))))
        })?;
        if let Some((id, iname)) = want {
            if h.interface_id != 0 && h.interface_id != id {
                let has = self
                    .sch
                    .interface(h.interface_id)
                    .map(|i| i.name.clone())
                    .unwrap_or_else(|| format!("{:#018x}", h.interface_id));
                return Err(CvError::new(
                    ErrorCode::WrongInterface,
                    format!("{}: wants a {iname} cap, {name:?} is a {has}", shown(path)),
                )
                .into());
            }
        }
        Ok(h)
    }
}

fn check_data(l: &StructLayout, offset: u32, bits: u32, path: &str) -> ClientResult<()> {
    if (u64::from(offset) + 1) * u64::from(bits) > u64::from(l.data_words) * 64 {
        return Err(CvError::internal(format!("{path}: slot outside the struct's data section")).into());
    }
    Ok(())
}

fn check_ptr(l: &StructLayout, index: u32, path: &str) -> ClientResult<()> {
    if index >= u32::from(l.pointers) {
        return Err(CvError::internal(format!("{path}: pointer outside the struct's pointer section")).into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// capnp -> JSON.

struct Dec {
    sch: &'static Schema,
    caps: Vec<(String, Held)>,
    iface_hint: Option<u64>,
}

impl Dec {
    fn read_struct(&mut self, r: StructReader<'_>, s: &StructInfo, path: &str) -> ClientResult<Value> {
        let l = layout_of(self.sch, s)?;
        let disc = (l.discriminant_count > 0).then(|| r.get_data_field::<u16>(l.discriminant_offset as usize));
        let mut out = Map::new();
        for (f, slot) in s.fields.iter().zip(&l.fields) {
            if f.in_union && f.discriminant != disc {
                continue;
            }
            let fpath = join(path, &f.name);
            let v = match (slot, &f.ty) {
                (FieldSlot::Group, TypeInfo::Struct { id, .. }) => {
                    self.read_struct(r, struct_of(self.sch, *id)?, &fpath)?
                }
                (FieldSlot::Slot { offset, default_bits, .. }, t) => {
                    let o = *offset as usize;
                    match width(t) {
                        Some(0) => Value::Null,
                        Some(w) => {
                            let raw = match w {
                                1 => u64::from(r.get_bool_field(o)),
                                8 => u64::from(r.get_data_field::<u8>(o)),
                                16 => u64::from(r.get_data_field::<u16>(o)),
                                32 => u64::from(r.get_data_field::<u32>(o)),
                                _ => r.get_data_field::<u64>(o),
                            };
                            json_of_bits(raw ^ default_bits, t)
                        }
                        None => self.read_pointer(any_pointer::Reader::new(r.get_pointer_field(o)), t, &fpath)?,
                    }
                }
                (FieldSlot::Group, _) => Value::Null,
            };
            out.insert(f.name.clone(), v);
        }
        Ok(Value::Object(out))
    }

    fn read_pointer(&mut self, p: any_pointer::Reader<'_>, t: &TypeInfo, path: &str) -> ClientResult<Value> {
        let b64 = |d: &[u8]| json!(base64::engine::general_purpose::STANDARD.encode(d));
        if p.is_null() {
            return Ok(match t {
                TypeInfo::Text | TypeInfo::Data => json!(""),
                TypeInfo::List { .. } => json!([]),
                _ => Value::Null,
            });
        }
        Ok(match t {
            TypeInfo::Text => json!(String::from_utf8_lossy(p.get_as::<capnp::text::Reader<'_>>()?.as_bytes())),
            TypeInfo::Data => b64(p.get_as::<capnp::data::Reader<'_>>()?),
            TypeInfo::Struct { id, .. } => {
                self.read_struct(PtrR::of(p)?.get_struct(None)?, struct_of(self.sch, *id)?, path)?
            }
            TypeInfo::List { element } => self.read_list(p, element, path)?,
            TypeInfo::Interface { id, name } => {
                let client = p.get_as_capability::<capability::Client>()?;
                self.caps.push((path.to_string(), Held::new(*id, client)));
                json!({"$cap": name, "field": path})
            }
            TypeInfo::AnyPointer { pointer: "capability" } => {
                let client = p.get_as_capability::<capability::Client>()?;
                let id = self.iface_hint.unwrap_or(0);
                let name = self.sch.interface(id).map(|i| i.name.clone()).unwrap_or_else(|| "Capability".into());
                self.caps.push((path.to_string(), Held::new(id, client)));
                json!({"$cap": name, "field": path})
            }
            _ => json!({"$anyPointer": "not shown"}),
        })
    }

    fn read_list(&mut self, p: any_pointer::Reader<'_>, e: &TypeInfo, path: &str) -> ClientResult<Value> {
        let at = |i: u32| join(path, &i.to_string());
        macro_rules! prim {
            ($t:ty) => {{
                let l = p.get_as::<primitive_list::Reader<'_, $t>>()?;
                (0..l.len()).map(|i| json_of_bits(u64::from(l.get(i)), e)).collect()
            }};
        }
        let out: Vec<Value> = match (e, width(e)) {
            (_, Some(0)) => vec![Value::Null; p.get_as::<primitive_list::Reader<'_, ()>>()?.len() as usize],
            (_, Some(1)) => prim!(bool),
            (_, Some(8)) => prim!(u8),
            (_, Some(16)) => prim!(u16),
            (_, Some(32)) => prim!(u32),
            (_, Some(_)) => prim!(u64),
            (TypeInfo::Text, None) => {
                let l = p.get_as::<text_list::Reader<'_>>()?;
                let mut v = Vec::new();
                for i in 0..l.len() {
                    v.push(json!(String::from_utf8_lossy(l.get(i)?.as_bytes())));
                }
                v
            }
            (TypeInfo::Data, None) => {
                let l = p.get_as::<data_list::Reader<'_>>()?;
                let mut v = Vec::new();
                for i in 0..l.len() {
                    v.push(json!(base64::engine::general_purpose::STANDARD.encode(l.get(i)?)));
                }
                v
            }
            (TypeInfo::Struct { id, .. }, None) => {
                let s = struct_of(self.sch, *id)?;
                let l = p.get_as::<struct_list::Reader<'_, RawStruct>>()?;
                let mut v = Vec::new();
                for i in 0..l.len() {
                    v.push(self.read_struct(l.get(i).0, s, &at(i))?);
                }
                v
            }
            (_, None) => {
                let l = p.get_as::<any_pointer_list::Reader<'_>>()?;
                let mut v = Vec::new();
                for i in 0..l.len() {
                    v.push(self.read_pointer(l.get(i), e, &at(i))?);
                }
                v
            }
        };
        Ok(Value::Array(out))
    }
}

// ---------------------------------------------------------------------------
// Collected streams.

#[derive(Default)]
struct StreamState {
    kept: Vec<u8>,
    total: u64,
    done: bool,
    released: bool,
}

/// The bytes a collecting sink got, shared between the sink (a capnp
/// server) and the call that renders them.
struct Stream {
    state: RefCell<StreamState>,
    changed: tokio::sync::Notify,
}

impl Stream {
    /// A collecting sink as a cap ([`Held`] as `ByteSink`), and its bytes.
    fn sink() -> (Held, Rc<Stream>) {
        let s = Rc::new(Stream { state: RefCell::new(StreamState::default()), changed: tokio::sync::Notify::new() });
        let client: byte_sink::Client = capnp_rpc::new_client(StreamSink(s.clone()));
        (Held::new(<byte_sink::Client as capnp::traits::HasTypeId>::TYPE_ID, client.client), s)
    }

    /// Returns once the writer called `done` or dropped the sink.
    async fn ended(&self) {
        loop {
            let n = self.changed.notified();
            {
                let st = self.state.borrow();
                if st.done || st.released {
                    return;
                }
            }
            n.await;
        }
    }

    /// The stream as JSON: a string (UTF-8), or `{"base64": ..}` for other
    /// bytes, ending with a marker when cut, still open after `open_after`,
    /// or dropped without `done`.
    fn render(&self, open_after: Option<Duration>) -> Value {
        let st = self.state.borrow();
        let mut notes = Vec::new();
        let cut = st.total > st.kept.len() as u64;
        if cut {
            notes.push(format!(
                "[capvisor: output truncated: {} bytes in all, the first {} kept]",
                st.total,
                st.kept.len()
            ));
        }
        if let (false, Some(d)) = (st.done || st.released, open_after) {
            notes.push(format!(
                "[capvisor: the stream was still open after {} s; {} bytes so far]",
                d.as_secs(),
                st.total
            ));
        } else if st.released && !st.done {
            notes.push("[capvisor: the writer dropped the stream without done]".to_string());
        }
        let text = match std::str::from_utf8(&st.kept) {
            Ok(t) => Some(t),
            // A cut in the middle of a character.
            Err(e) if cut && e.error_len().is_none() => std::str::from_utf8(&st.kept[..e.valid_up_to()]).ok(),
            Err(_) => None,
        };
        match text {
            Some(t) => {
                let mut t = t.to_string();
                for n in &notes {
                    if !t.is_empty() && !t.ends_with('\n') {
                        t.push('\n');
                    }
                    t.push_str(n);
                }
                json!(t)
            }
            None => {
                let mut o = json!({"base64": base64::engine::general_purpose::STANDARD.encode(&st.kept)});
                if !notes.is_empty() {
                    o["note"] = json!(notes.join(" "));
                }
                o
            }
        }
    }
}

/// The `ByteSink` server of a [`Stream`]: keeps the first [`STREAM_LIMIT`]
/// bytes, counts the rest.
struct StreamSink(Rc<Stream>);

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.0.state.borrow_mut().released = true;
        self.0.changed.notify_one();
    }
}

impl byte_sink::Server for StreamSink {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut st = self.0.state.borrow_mut();
        let room = STREAM_LIMIT.saturating_sub(st.kept.len());
        st.kept.extend_from_slice(&data[..data.len().min(room)]);
        st.total += data.len() as u64;
        Ok(())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        self.0.state.borrow_mut().done = true;
        self.0.changed.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
