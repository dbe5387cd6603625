//! JSON <-> capnp through real messages: every `TypeInfo` kind against a
//! test schema compiled by the `capnp` tool and served by an in-process
//! echo server; the embedded schema against the generated code; bad input
//! named; streams bounded.

use super::*;
use capnp::capability::{DispatchCallResult, FromClientHook, FromServer, Promise};
use capnp::private::capability::ClientHook;
use capvisor_rpc::conn::run_local;
use capvisor_rpc::schema::capvisor_capnp::{vm, vm_factory, vm_info, Engine, VmState};
use capvisor_rpc::schema::common_capnp::{exec_spec, process};
use std::sync::OnceLock;

/// A schema with every kind of field, methods whose params and results
/// have the same layout (so an echo gives back what was sent), a
/// `Common.ByteSink` param, and an interface that extends another.
const TEST_SCHEMA: &str = r#"
@0xd2a1c3e4f5a6b7c8;
using Common = import "/common.capnp";

enum Color { red @0; green @1; blue @2; }

struct Inner {
  x @0 :Int32;
  label @1 :Text;
}

struct All {
  v @0 :Void;
  b @1 :Bool;
  i8 @2 :Int8;
  i16 @3 :Int16;
  i32 @4 :Int32;
  i64 @5 :Int64;
  u8 @6 :UInt8;
  u16 @7 :UInt16;
  u32 @8 :UInt32;
  u64 @9 :UInt64;
  f32 @10 :Float32;
  f64 @11 :Float64;
  t @12 :Text;
  d @13 :Data;
  e @14 :Color;
  s @15 :Inner;
  lb @16 :List(Bool);
  li8 @17 :List(Int8);
  lu64 @18 :List(UInt64);
  lf32 @19 :List(Float32);
  le @20 :List(Color);
  lt @21 :List(Text);
  ld @22 :List(Data);
  ls @23 :List(Inner);
  ll @24 :List(List(Int16));
  lv @25 :List(Void);
  g :union {
    none @26 :Void;
    num @27 :UInt16;
    inner @28 :Inner;
  }
  cap @29 :Echo;
  lcap @30 :List(Echo);
  any @31 :Capability;
  dInt @32 :Int32 = 42;
  dBool @33 :Bool = true;
  dColor @34 :Color = blue;
  dF64 @35 :Float64 = 1.5;
}

struct Choice {
  union {
    a @0 :Text;
    b @1 :Int64;
    c @2 :Void;
  }
  tail @3 :Bool;
}

interface Echo {
  echo @0 (all :All, choice :Choice) -> (all :All, choice :Choice);
  fail @1 (all :All, choice :Choice) -> (all :All, choice :Choice);
  pump @2 (text :Text, out :Common.ByteSink) -> (n :UInt32);
  get @3 (interfaceId :UInt64) -> (cap :Capability);
  push @4 (data :Data) -> stream;
}

interface Sub extends(Echo) {
  more @0 ();
}
"#;

fn test_schema() -> &'static Schema {
    static S: OnceLock<&'static Schema> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("all.capnp");
        std::fs::write(&file, TEST_SCHEMA).unwrap();
        let inc = concat!(env!("CARGO_MANIFEST_DIR"), "/../schema/capnp");
        let out = std::process::Command::new("capnp")
            .args(["compile", "-o-", &format!("-I{inc}"), "--src-prefix"])
            .arg(dir.path())
            .arg(&file)
            .output()
            .expect("the capnp tool (Debian package capnproto) runs");
        assert!(out.status.success(), "capnp compile: {}", String::from_utf8_lossy(&out.stderr));
        Box::leak(Box::new(Schema::parse(&out.stdout).unwrap()))
    })
}

fn iface(name: &str) -> u64 {
    test_schema().interface_by_name(name).unwrap().id
}

// An in-process server of the test schema's Echo: `echo` sends its params
// back as results, `fail` answers denied, `pump` writes `text` into `out`
// in two chunks, `get` returns an echo cap.
struct Echo;

#[derive(Clone)]
struct EchoDispatch(Rc<Echo>);

impl std::ops::Deref for EchoDispatch {
    type Target = Echo;
    fn deref(&self) -> &Echo {
        &self.0
    }
}

impl capnp::capability::Server for EchoDispatch {
    fn dispatch_call(
        self,
        _interface_id: u64,
        method_id: u16,
        params: capnp::capability::Params<any_pointer::Owned>,
        mut results: capnp::capability::Results<any_pointer::Owned>,
    ) -> DispatchCallResult {
        DispatchCallResult::new(
            Promise::from_future(async move {
                match method_id {
                    0 => results.set(params.get()?),
                    1 => Err(CvError::denied("echo says no").to_rpc()),
                    2 => {
                        let p = PtrR::of(params.get()?)?.get_struct(None)?;
                        let text =
                            any_pointer::Reader::new(p.get_pointer_field(0)).get_as::<capnp::text::Reader<'_>>()?;
                        let text = text.to_str()?.to_string();
                        let out: byte_sink::Client =
                            any_pointer::Reader::new(p.get_pointer_field(1)).get_as_capability()?;
                        let (a, b) = text.as_bytes().split_at(text.len() / 2);
                        for chunk in [a, b] {
                            let mut w = out.write_request();
                            w.get().set_data(chunk);
                            w.send().await?;
                        }
                        out.done_request().send().promise.await?;
                        let r = PtrB::of(results.get())?.init_struct(StructSize { data: 1, pointers: 0 });
                        r.set_data_field::<u32>(0, text.len() as u32);
                        Ok(())
                    }
                    4 => Ok(()),
                    _ => {
                        let r = PtrB::of(results.get())?.init_struct(StructSize { data: 0, pointers: 1 });
                        any_pointer::Builder::new(r.get_pointer_field(0)).set_as_capability(echo_hook());
                        Ok(())
                    }
                }
            }),
            false,
        )
    }

    fn as_ptr(&self) -> usize {
        Rc::as_ptr(&self.0) as usize
    }
}

struct EchoClient(Box<dyn ClientHook>);

impl FromClientHook for EchoClient {
    fn new(hook: Box<dyn ClientHook>) -> Self {
        EchoClient(hook)
    }
    fn into_client_hook(self) -> Box<dyn ClientHook> {
        self.0
    }
    fn as_client_hook(&self) -> &dyn ClientHook {
        &*self.0
    }
}

impl FromServer<Echo> for EchoClient {
    type Dispatch = EchoDispatch;
    fn from_server(s: Rc<Echo>) -> EchoDispatch {
        EchoDispatch(s)
    }
}

fn echo_hook() -> Box<dyn ClientHook> {
    capnp_rpc::new_client::<EchoClient, Echo>(Echo).0
}

fn echo() -> Held {
    Held::new(iface("Echo"), capability::Client::new(echo_hook()))
}

fn start_test(
    cap: &Held,
    method: &str,
    params: &Value,
    resolve: &dyn Fn(&str) -> Option<Held>,
) -> ClientResult<DynCall> {
    start_in(test_schema(), cap, method, params, resolve)
}

async fn call_test(cap: &Held, method: &str, params: Value) -> ClientResult<DynResults> {
    let resolve = |n: &str| (n == "thing").then(echo);
    start_test(cap, method, &params, &resolve)?.finish(Some(Duration::from_secs(5))).await
}

fn code(e: &ClientError) -> Option<ErrorCode> {
    e.code()
}

#[test]
fn every_kind_round_trips_through_a_real_message() {
    run_local(async {
        let all = json!({
            "v": null,
            "b": true,
            "i8": -128, "i16": -2, "i32": 2147483647, "i64": "-9223372036854775808",
            "u8": 255, "u16": 65535, "u32": 4294967295u64, "u64": "18446744073709551615",
            "f32": 1.5, "f64": -0.25,
            "t": "héllo", "d": "AAEC/w==", "e": "green",
            "s": {"x": -7, "label": "inner"},
            "lb": [true, false, true],
            "li8": [-1, 0, 1],
            "lu64": [0, 1, "18446744073709551615"],
            "lf32": [0.5, "inf"],
            "le": ["blue", 0],
            "lt": ["a", ""],
            "ld": [{"utf8": "hi"}, {"base64": "AA=="}],
            "ls": [{"x": 1}, {"label": "two"}],
            "ll": [[1, -2], [], [3]],
            "lv": [null, null],
            "g": {"inner": {"x": 3, "label": "g"}},
            "cap": "@thing",
            "lcap": ["thing", "@thing"],
            "any": "@thing",
            "dInt": 0,
        });
        let r = call_test(&echo(), "echo", json!({"all": all, "choice": {"b": "-5", "tail": true}})).await.unwrap();
        let got = &r.json["all"];
        let want = json!({
            "v": null, "b": true,
            "i8": -128, "i16": -2, "i32": 2147483647, "i64": i64::MIN,
            "u8": 255, "u16": 65535, "u32": 4294967295u64, "u64": u64::MAX,
            "f32": 1.5, "f64": -0.25,
            "t": "héllo", "d": "AAEC/w==", "e": "green",
            "s": {"x": -7, "label": "inner"},
            "lb": [true, false, true],
            "li8": [-1, 0, 1],
            "lu64": [0, 1, u64::MAX],
            "lf32": [0.5, "inf"],
            "le": ["blue", "red"],
            "lt": ["a", ""],
            "ld": ["aGk=", "AA=="],
            "ls": [{"x": 1, "label": ""}, {"x": 0, "label": "two"}],
            "ll": [[1, -2], [], [3]],
            "lv": [null, null],
            "g": {"inner": {"x": 3, "label": "g"}},
            "cap": {"$cap": "Echo", "field": "all.cap"},
            "lcap": [{"$cap": "Echo", "field": "all.lcap.0"}, {"$cap": "Echo", "field": "all.lcap.1"}],
            "any": {"$cap": "Capability", "field": "all.any"},
            // Explicit defaults: dInt set to 0 stays 0 (stored XOR 42); the
            // others read as their defaults.
            "dInt": 0, "dBool": true, "dColor": "blue", "dF64": 1.5,
        });
        assert_eq!(got, &want, "got {got:#}");
        assert_eq!(r.json["choice"], json!({"b": -5, "tail": true}));
        let paths: Vec<&str> = r.caps.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(paths, ["all.cap", "all.lcap.0", "all.lcap.1", "all.any"]);
        assert_eq!(r.caps[0].1.interface_id, iface("Echo"));
        assert_eq!(r.caps[3].1.interface_id, 0, "an untyped Capability");
        // The returned cap is live: it is the echo server again.
        let again = call_test(&r.caps[0].1, "echo", json!({"choice": {"c": null}})).await.unwrap();
        assert_eq!(again.json["choice"], json!({"c": null, "tail": false}));
        // A left-out struct is null; left-out fields read as their
        // defaults; an unset union as its first member.
        let none = call_test(&echo(), "echo", json!({})).await.unwrap();
        assert_eq!(none.json, json!({"all": null, "choice": null}));
        let empty = call_test(&echo(), "echo", json!({"all": {}, "choice": {}})).await.unwrap();
        assert_eq!(empty.json["all"]["dInt"], 42);
        assert_eq!(empty.json["all"]["g"], json!({"none": null}));
        assert_eq!(empty.json["all"]["i64"], 0);
        assert_eq!(empty.json["all"]["cap"], Value::Null);
        assert_eq!(empty.json["choice"], json!({"a": "", "tail": false}));
        assert!(empty.caps.is_empty());
        // Float specials and the union member with a value.
        let r =
            call_test(&echo(), "echo", json!({"all": {"f64": "NaN", "f32": "-inf", "g": {"num": 9}}})).await.unwrap();
        assert_eq!((&r.json["all"]["f64"], &r.json["all"]["f32"]), (&json!("NaN"), &json!("-inf")));
        assert_eq!(r.json["all"]["g"], json!({"num": 9}));
    });
}

#[test]
fn bad_input_is_invalid_and_names_the_field() {
    run_local(async {
        let sink = Stream::sink().0;
        let resolve = |n: &str| match n {
            "thing" => Some(echo()),
            "sink" => Some(sink.clone()),
            _ => None,
        };
        let cases: &[(Value, ErrorCode, &str)] = &[
            (json!({"all": {"i8": 200}}), ErrorCode::InvalidArgument, "all.i8: expected Int8, got 200"),
            (
                json!({"all": {"u64": -1}}),
                ErrorCode::InvalidArgument,
                "all.u64: expected UInt64 (a number, or a string",
            ),
            (json!({"all": {"i32": 1.5}}), ErrorCode::InvalidArgument, "all.i32: expected Int32"),
            (json!({"all": {"b": "yes"}}), ErrorCode::InvalidArgument, "all.b: expected Bool"),
            (json!({"all": {"f32": "x"}}), ErrorCode::InvalidArgument, "all.f32: expected Float32"),
            (
                json!({"all": {"e": "purple"}}),
                ErrorCode::InvalidArgument,
                "all.e: expected Color (one of red, green, blue)",
            ),
            (json!({"all": {"e": 3}}), ErrorCode::InvalidArgument, "all.e: expected Color"),
            (json!({"all": {"t": 1}}), ErrorCode::InvalidArgument, "all.t: expected Text (a string)"),
            (json!({"all": {"d": "not base64!"}}), ErrorCode::InvalidArgument, "all.d: expected Data: a base64 string"),
            (json!({"all": {"d": {"hex": "00"}}}), ErrorCode::InvalidArgument, "all.d: expected Data"),
            (json!({"all": {"s": [1]}}), ErrorCode::InvalidArgument, "all.s: expected an object (Inner)"),
            (
                json!({"all": {"s": {"y": 1}}}),
                ErrorCode::InvalidArgument,
                "all.s: Inner has no field \"y\"; its fields: x, label",
            ),
            (json!({"all": {"lt": ["a", 1]}}), ErrorCode::InvalidArgument, "all.lt.1: expected Text"),
            (json!({"all": {"ls": [{"x": "z"}]}}), ErrorCode::InvalidArgument, "all.ls.0.x: expected Int32"),
            (json!({"all": {"ll": [[1], [70000]]}}), ErrorCode::InvalidArgument, "all.ll.1.0: expected Int16"),
            (json!({"all": {"lb": true}}), ErrorCode::InvalidArgument, "all.lb: expected an array (List(Bool))"),
            (
                json!({"all": {"g": {"none": null, "num": 1}}}),
                ErrorCode::InvalidArgument,
                "all.g: set at most one member",
            ),
            (
                json!({"choice": {"a": "x", "b": 1}}),
                ErrorCode::InvalidArgument,
                "set at most one member of Choice's union, not a and b",
            ),
            (json!({"all": {"cap": 5}}), ErrorCode::InvalidArgument, "all.cap: expected the name of a held Echo cap"),
            (json!({"all": {"cap": "@nope"}}), ErrorCode::NotFound, "all.cap: no cap named \"nope\" is held"),
            (
                json!({"all": {"cap": "@sink"}}),
                ErrorCode::WrongInterface,
                "all.cap: wants a Echo cap, \"sink\" is a ByteSink",
            ),
            (
                json!({"nope": 1}),
                ErrorCode::InvalidArgument,
                "the parameters: Echo.echo$Params has no field \"nope\"; its fields: all, choice",
            ),
            (json!([1]), ErrorCode::InvalidArgument, "the parameters: expected an object"),
        ];
        for (params, want_code, want) in cases {
            let e = start_test(&echo(), "echo", params, &resolve).err().unwrap_or_else(|| panic!("{params} passed"));
            assert_eq!(code(&e), Some(*want_code), "{params}: {e}");
            assert!(e.to_string().contains(want), "{params}: {e}\n  wanted: {want}");
        }
    });
}

#[test]
fn methods_resolve_through_superclasses_and_unknown_ones_are_not_found() {
    let s = test_schema();
    let (id, m) = find_method_in(s, iface("Sub"), "echo").unwrap();
    assert_eq!((id, m.ordinal), (iface("Echo"), 0), "the declaring interface's id goes on the wire");
    let (id, m) = find_method_in(s, iface("Sub"), "more").unwrap();
    assert_eq!((id, m.ordinal), (iface("Sub"), 0));
    let e = find_method_in(s, iface("Sub"), "nope").err().unwrap();
    assert_eq!(code(&e), Some(ErrorCode::NotFound));
    assert!(
        e.to_string().contains("Sub has no method \"nope\"; its methods: more, echo, fail, pump, get, push"),
        "{e}"
    );
    let e = find_method(0x1234, "x").err().unwrap();
    assert_eq!(code(&e), Some(ErrorCode::Unavailable));
    // Every method of every embedded interface resolves by name.
    for i in schema().interfaces() {
        for m in &i.methods {
            assert_eq!(find_method(i.id, &m.name).unwrap().1.ordinal, m.ordinal);
        }
    }
}

#[test]
fn calls_through_a_sub_interface_reach_the_server() {
    run_local(async {
        let sub = Held::new(iface("Sub"), echo().client);
        let r = call_test(&sub, "echo", json!({"all": {"t": "via Sub"}})).await.unwrap();
        assert_eq!(r.json["all"]["t"], "via Sub");
    });
}

#[test]
fn streaming_methods_answer_an_empty_object() {
    run_local(async {
        let (_, m) = find_method_in(test_schema(), iface("Echo"), "push").unwrap();
        assert!(m.streaming);
        let r = call_test(&echo(), "push", json!({"data": {"utf8": "chunk"}})).await.unwrap();
        assert_eq!(r.json, json!({}));
    });
}

#[test]
fn server_errors_keep_their_typed_code() {
    run_local(async {
        let e = call_test(&echo(), "fail", json!({})).await.err().unwrap();
        assert_eq!(code(&e), Some(ErrorCode::Denied));
        assert!(e.to_string().contains("echo says no"), "{e}");
    });
}

#[test]
fn left_out_byte_sinks_collect_into_streams() {
    run_local(async {
        let r = call_test(&echo(), "pump", json!({"text": "hello world"})).await.unwrap();
        assert_eq!(r.json, json!({"n": 11, "$streams": {"out": "hello world"}}));
        // A sink given by name is used instead (and no stream shows).
        let (mine, st) = Stream::sink();
        let resolve = |n: &str| (n == "mine").then(|| mine.clone());
        let r = start_test(&echo(), "pump", &json!({"text": "abc", "out": "@mine"}), &resolve)
            .unwrap()
            .finish(None)
            .await
            .unwrap();
        assert_eq!(r.json, json!({"n": 3}));
        assert_eq!(st.state.borrow().kept, b"abc");
    });
}

#[test]
fn pipelined_caps_are_usable_before_the_results() {
    run_local(async {
        let resolve = |_: &str| None;
        let c = start_test(&echo(), "get", &json!({"interfaceId": iface("Echo")}), &resolve).unwrap();
        let cap = c.pipelined("cap").unwrap();
        assert_eq!(cap.interface_id, iface("Echo"), "an untyped Capability takes the interfaceId param");
        // Called before the producing call was awaited.
        let inner = call_test(&cap, "echo", json!({"all": {"u8": 7}}));
        let r = inner.await.unwrap();
        assert_eq!(r.json["all"]["u8"], 7);
        let outer = c.finish(None).await.unwrap();
        assert_eq!(outer.json["cap"]["$cap"], "Echo");
        // Fields that are not caps are refused, naming the ones that are.
        let c = start_test(&echo(), "echo", &json!({}), &resolve).unwrap();
        let e = c.pipelined("all.t").err().unwrap();
        assert_eq!(code(&e), Some(ErrorCode::InvalidArgument));
        assert!(e.to_string().contains("its capability results: all.cap, all.any"), "{e}");
        assert!(c.pipelined("all.lcap").is_err(), "lists cannot be pipelined on");
        assert_eq!(c.pipelined("all.cap").unwrap().interface_id, iface("Echo"));
    });
}

#[test]
fn streams_are_bounded_and_marked() {
    run_local(async {
        let (h, st) = Stream::sink();
        let sink: byte_sink::Client = capnp::capability::FromClientHook::new(h.client.hook);
        // 'é' is two bytes: the cut at 1 MiB + 1 falls inside one.
        let chunk = "é".repeat(32 * 1024);
        let mut sent = 0;
        while sent <= STREAM_LIMIT {
            let mut w = sink.write_request();
            w.get().set_data(chunk.as_bytes());
            w.send().await.unwrap();
            sent += chunk.len();
        }
        let mut w = sink.write_request();
        w.get().set_data(b"x");
        w.send().await.unwrap();
        sent += 1;
        sink.done_request().send().promise.await.unwrap();
        st.ended().await;
        let v = st.render(None);
        let t = v.as_str().expect("still text after a cut inside a character");
        assert!(t.starts_with("éé"));
        assert!(
            t.ends_with(&format!("[capvisor: output truncated: {sent} bytes in all, the first {STREAM_LIMIT} kept]")),
            "{}",
            &t[t.len() - 100..]
        );
        assert!(t.len() < STREAM_LIMIT + 100);

        // Binary bytes come as base64; a stream still open says so.
        let (h, st) = Stream::sink();
        let sink: byte_sink::Client = capnp::capability::FromClientHook::new(h.client.hook);
        let mut w = sink.write_request();
        w.get().set_data(&[0xff, 0x00]);
        w.send().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_millis(50), st.ended()).await;
        assert!(ended.is_err(), "not ended: the sink is still held and not done");
        let v = st.render(Some(Duration::from_secs(3)));
        assert_eq!(v["base64"], "/wA=");
        assert!(v["note"].as_str().unwrap().contains("still open after 3 s; 2 bytes so far"), "{v}");
        // Dropping the sink without done ends it, with a marker.
        drop(sink);
        st.ended().await;
        let (h, st) = Stream::sink();
        drop(h);
        st.ended().await;
        assert_eq!(st.render(None), json!("[capvisor: the writer dropped the stream without done]"));
    });
}

/// Params written from JSON, read with the generated code of the embedded
/// schema (so the layouts agree with capnpc's), and results written by the
/// generated code, read as JSON.
#[test]
fn embedded_schema_agrees_with_the_generated_code() {
    let sch = schema();
    let resolve = |_: &str| None;
    let encode = |m: &'static Method, v: Value| {
        let mut msg = capnp::message::Builder::new_default();
        let b = PtrB::of(msg.init_root::<any_pointer::Builder<'_>>())
            .unwrap()
            .init_struct(size_of(layout_of(sch, &m.params).unwrap()));
        Enc { sch, resolve: &resolve, streams: Vec::new() }.write_struct(b, &m.params, &v, "", false).unwrap();
        msg
    };
    let (_, create) = find_method(<vm_factory::Client as capnp::traits::HasTypeId>::TYPE_ID, "create").unwrap();
    let msg = encode(
        create,
        json!({"spec": {"name": "x", "image": "debian", "memoryMib": 512, "vcpus": 2, "engine": "qemu",
            "volumes": [{"volume": "data", "guestPath": "/work", "readOnly": true}]}}),
    );
    let spec = msg.get_root_as_reader::<vm_factory::create_params::Reader<'_>>().unwrap().get_spec().unwrap();
    assert_eq!(spec.get_name().unwrap().to_str().unwrap(), "x");
    assert_eq!(spec.get_image().unwrap().to_str().unwrap(), "debian");
    assert_eq!((spec.get_memory_mib(), spec.get_vcpus()), (512, 2));
    assert_eq!(spec.get_engine().unwrap(), Engine::Qemu);
    let v = spec.get_volumes().unwrap().get(0);
    assert_eq!(v.get_guest_path().unwrap().to_str().unwrap(), "/work");
    assert!(v.get_read_only());

    let (_, exec) = find_method(<vm::Client as capnp::traits::HasTypeId>::TYPE_ID, "exec").unwrap();
    let msg = encode(
        exec,
        json!({"spec": {"argv": ["echo", "hi"], "env": [{"name": "A", "value": "1"}], "cwd": "/tmp",
            "stdin": {"utf8": "in"}, "keepStdinOpen": true, "pty": {"size": {"rows": 24, "cols": 80}}, "user": "agent"}}),
    );
    let spec = msg.get_root_as_reader::<vm::exec_params::Reader<'_>>().unwrap().get_spec().unwrap();
    let argv: Vec<_> = spec.get_argv().unwrap().iter().map(|a| a.unwrap().to_str().unwrap().to_string()).collect();
    assert_eq!(argv, ["echo", "hi"]);
    assert_eq!(spec.get_env().unwrap().get(0).get_value().unwrap().to_str().unwrap(), "1");
    assert_eq!(spec.get_stdin().unwrap(), b"in");
    assert!(spec.get_keep_stdin_open());
    assert_eq!(spec.get_user().unwrap().to_str().unwrap(), "agent");
    match spec.get_pty().which().unwrap() {
        exec_spec::pty::Size(s) => {
            let s = s.unwrap();
            assert_eq!((s.get_rows(), s.get_cols()), (24, 80));
        }
        exec_spec::pty::None(()) => panic!("pty.size was set"),
    }

    // Results made by the generated code, read by layout.
    let mut msg = capnp::message::Builder::new_default();
    {
        let mut r = msg.init_root::<vm_factory::list_results::Builder<'_>>();
        let mut l = r.reborrow().init_vms(1);
        let mut i = l.reborrow().get(0);
        i.set_name("web");
        i.set_state(VmState::Crashed);
        i.set_engine(Engine::Kvm);
        i.set_boot_ms(u64::MAX);
        i.set_memory_mib(256);
        i.init_volumes(1).get(0).set_volume("v");
    }
    let (_, list) = find_method(<vm_factory::Client as capnp::traits::HasTypeId>::TYPE_ID, "list").unwrap();
    let root = msg.get_root_as_reader::<any_pointer::Reader<'_>>().unwrap();
    let mut dec = Dec { sch, caps: Vec::new(), iface_hint: None };
    let v = dec.read_struct(PtrR::of(root).unwrap().get_struct(None).unwrap(), &list.results, "").unwrap();
    let vm = &v["vms"][0];
    assert_eq!(vm["name"], "web");
    assert_eq!(vm["state"], "crashed");
    assert_eq!(vm["engine"], "kvm");
    assert_eq!(vm["bootMs"], u64::MAX);
    assert_eq!(vm["memoryMib"], 256);
    assert_eq!(vm["volumes"], json!([{"volume": "v", "guestPath": "", "readOnly": false}]));
    assert_eq!(
        vm.as_object().unwrap().len(),
        sch.struct_info(<vm_info::Builder<'_> as capnp::traits::HasTypeId>::TYPE_ID).unwrap().fields.len()
    );

    // An unnamed union in results (Process.wait: ExitStatus).
    let mut msg = capnp::message::Builder::new_default();
    msg.init_root::<process::wait_results::Builder<'_>>().init_status().set_signal(9);
    let (_, wait) = find_method(<process::Client as capnp::traits::HasTypeId>::TYPE_ID, "wait").unwrap();
    let root = msg.get_root_as_reader::<any_pointer::Reader<'_>>().unwrap();
    let v = dec.read_struct(PtrR::of(root).unwrap().get_struct(None).unwrap(), &wait.results, "").unwrap();
    assert_eq!(v, json!({"status": {"signal": 9}}));
}
