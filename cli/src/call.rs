//! `capvisor call CAP.METHOD [key=value ...] [--json JSON] [--as NAME]`:
//! any method of any capability the session holds, by name, with
//! parameters and results as JSON, through the schema embedded in this
//! binary (`capvisor_client::dynamic`). A returned capability can be kept
//! in the session under a name (`CapSet.keep`) and called by later
//! `capvisor call`s, from other processes too.

use capvisor_client::dynamic::{self, Held};
use capvisor_client::{ops, ClientError, ClientResult};
use capvisor_rpc::error::CvError;
use capvisor_schema::reflect::{schema, Interface};
use clap::Args;
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Duration;

/// `--help` text of `capvisor call`.
pub const ABOUT: &str = "Call any method of any capability this session holds, by name, with the \
parameters as JSON; the results print as JSON. The methods and their parameter and result types are \
those `capvisor schema CAP` shows (the Cap'n Proto schema embedded in this binary).\n\n\
CAP is a name of the session's CapSet (`capvisor caps`: vms, volumes, netlog, ...) or a name kept \
earlier with --as. Parameters: `key=value` sets parameter `key` (a dotted key such as spec.name=x sets \
a field inside one); the value is read as JSON when it parses (42, true, [\"a\"], {\"argv\": [\"ls\"]}), \
else as a string. --json '{...}' gives them all at once (key=value pairs then override).\n\n\
JSON mapping: integers as numbers (Int64/UInt64 may also be strings), enums by name, Data as base64 or \
{\"utf8\": \"text\"}, lists as arrays, structs as objects, a union by its member's name. A capability \
parameter names a cap this session holds (\"@x\"); a ByteSink parameter left out (exec's stdout and \
stderr, Files.read's sink) collects what is written into it, shown under \"$streams\" in the results \
(at most 1 MiB each, cut with a marker; waited for up to --stream-wait seconds after the results). A \
capability in the results shows as {\"$cap\": \"<Interface>\", \"field\": \"<name>\"}.\n\n\
--as NAME keeps the capability the call returns (the only one, or --field F) in this session under \
NAME (CapSet.keep): later calls, from any process attached to this session, use it as NAME. The keep \
is pipelined on the call: it is sent at once, without waiting for the call to finish. Kept names \
end with the session; `capvisor call --drop NAME` forgets one.\n\n\
Examples:\n\
\x20 capvisor call vms.list\n\
\x20 capvisor call vms.create spec='{\"name\":\"x\"}' --as x\n\
\x20 capvisor call x.exec spec='{\"argv\":[\"echo\",\"hi\"]}' --as p\n\
\x20 capvisor call p.wait\n\
\x20 capvisor call x.info\n\
\x20 capvisor call x.files --as fx && capvisor call fx.list path=/etc\n\
\x20 capvisor call --list           (the methods of every cap of the session; --list CAP: of one)\n\n\
Exit codes: 0 when the call succeeded; a failure exits with its typed code (10 denied, 11 not found \
(also an unknown cap or method, after printing the methods), 15 invalid argument (bad JSON, naming the \
field and the type expected), ...; see `capvisor --help`).";

/// Arguments of `capvisor call`.
#[derive(Args)]
pub struct CallArgs {
    /// CAP.METHOD: a cap of the session (or a name kept with --as) and one of its methods
    #[arg(value_name = "CAP.METHOD", required_unless_present_any = ["list", "drop"])]
    target: Option<String>,
    /// Parameters as key=value (value: JSON if it parses, else a string); dotted keys reach inside structs
    #[arg(value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// All parameters as one JSON object (key=value pairs override its keys)
    #[arg(long, value_name = "JSON")]
    json: Option<String>,
    /// Keep the returned capability in this session under NAME (`[a-z][a-z0-9_-]{0,31}`)
    #[arg(long = "as", value_name = "NAME")]
    keep_as: Option<String>,
    /// With --as: which capability of the results to keep, when there are several
    #[arg(long, value_name = "FIELD", requires = "keep_as")]
    field: Option<String>,
    /// Seconds to wait after the results for collected streams (left-out ByteSinks) to end
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    stream_wait: u64,
    /// Print the methods of every cap of the session, or of the cap named by CAP.METHOD
    #[arg(long, conflicts_with_all = ["json", "keep_as", "drop"])]
    list: bool,
    /// Forget the capability kept under NAME (CapSet.drop)
    #[arg(long, value_name = "NAME", conflicts_with_all = ["json", "keep_as"])]
    drop: Option<String>,
}

fn usage(msg: impl Into<String>) -> ClientError {
    ClientError::Usage(msg.into())
}

/// The parameters from `--json` and `key=value` pairs: one JSON object.
pub fn params_of(json: Option<&str>, pairs: &[String]) -> ClientResult<Value> {
    let mut root = match json {
        None => Map::new(),
        Some(j) => match serde_json::from_str::<Value>(j) {
            Ok(Value::Object(o)) => o,
            Ok(other) => return Err(usage(format!("--json wants a JSON object, got {other}"))),
            Err(e) => return Err(usage(format!("--json: not JSON: {e}"))),
        },
    };
    for kv in pairs {
        let Some((key, raw)) = kv.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(usage(format!("parameters are KEY=VALUE, got {kv:?}")));
        };
        let value = serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(usage(format!("bad parameter name {key:?}")));
        }
        let mut obj = &mut root;
        for (i, p) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                obj.insert(p.to_string(), value.clone());
                break;
            }
            let slot = obj.entry(p.to_string()).or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                return Err(usage(format!("{key}: {p} is already set to a value that is not an object")));
            }
            obj = slot.as_object_mut().expect("checked: an object");
        }
    }
    Ok(Value::Object(root))
}

fn methods_text(cap: &str, i: &Interface) -> String {
    crate::schema::summary(Some(cap), i)
}

/// Runs `capvisor call`; the exit code (0), or the call's error (typed
/// exit code), `Usage` for a bad command line, notFound for an unknown cap
/// or method (after printing the methods to stderr).
pub async fn run(args: CallArgs, socket: &Path) -> ClientResult<i32> {
    let (session, _) = capvisor_client::connect::attach_saved(socket).await?;
    let cs = ops::cap_set(&session);
    if let Some(name) = &args.drop {
        let mut req = cs.drop_request();
        req.get().set_cap_name(name);
        req.send().promise.await?;
        eprintln!("forgot the capability kept as {name}");
        return Ok(0);
    }
    let caps = ops::list_caps(&cs).await?;
    let s = schema();
    let names = || caps.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
    let (cap_name, method) = match args.target.as_deref() {
        Some(t) => match t.split_once('.') {
            Some((c, m)) => (Some(c), Some(m)),
            None => (Some(t), None),
        },
        None => (None, None),
    };
    let entry = match cap_name {
        Some(n) => Some(caps.iter().find(|c| c.name == n).ok_or_else(|| {
            ClientError::from(CvError::not_found(format!("no cap named {n:?} in this session (it holds: {})", names())))
        })?),
        None => None,
    };
    let iface_of = |c: &ops::CapInfo| {
        s.interface(c.interface_id).ok_or_else(|| {
            ClientError::from(CvError::unavailable(format!(
                "cap {:?} has interface {} ({:#018x}), which this binary's schema does not have",
                c.name, c.interface_name, c.interface_id
            )))
        })
    };
    if args.list {
        let mut out = String::new();
        for c in caps.iter().filter(|c| entry.is_none_or(|e| e.name == c.name)) {
            match s.interface(c.interface_id) {
                Some(i) => out.push_str(&methods_text(&c.name, i)),
                None => out.push_str(&format!("{}: {} (not in this binary's schema)\n", c.name, c.interface_name)),
            }
        }
        print!("{out}");
        return Ok(0);
    }
    let entry = entry.expect("clap: CAP.METHOD is required without --list or --drop");
    let iface = iface_of(entry)?;
    let method = match method {
        Some(m) if !m.is_empty() => m,
        _ => {
            eprint!("{}", methods_text(&entry.name, iface));
            return Err(usage(format!("name a method: {}.METHOD (listed above)", entry.name)));
        }
    };
    let m = match dynamic::find_method(entry.interface_id, method) {
        Ok((_, m)) => m,
        Err(e) => {
            eprint!("{}", methods_text(&entry.name, iface));
            return Err(e);
        }
    };
    let params = params_of(args.json.as_deref(), &args.params)?;
    let cap = Held::new(entry.interface_id, ops::get_cap_raw(&cs, &entry.name, entry.interface_id));
    let resolve = |n: &str| {
        caps.iter()
            .find(|c| c.name == n)
            .map(|c| Held::new(c.interface_id, ops::get_cap_raw(&cs, &c.name, c.interface_id)))
    };
    let wait = Some(Duration::from_secs(args.stream_wait));
    let results = match &args.keep_as {
        None => dynamic::start(&cap, method, &params, &resolve)?.finish(wait).await?,
        Some(name) => {
            let field = match &args.field {
                Some(f) => f.clone(),
                None => {
                    let fields = dynamic::cap_fields(&m.results);
                    match &fields[..] {
                        [(f, _)] => f.clone(),
                        [] => return Err(usage(format!("{}.{} returns no capability to keep", entry.name, m.name))),
                        more => {
                            let names: Vec<&str> = more.iter().map(|f| f.0.as_str()).collect();
                            return Err(usage(format!(
                                "{}.{} returns several capabilities ({}): pick one with --field",
                                entry.name,
                                m.name,
                                names.join(", ")
                            )));
                        }
                    }
                }
            };
            let call = dynamic::start(&cap, method, &params, &resolve)?;
            let held = call.pipelined(&field)?;
            let iname = match held.interface() {
                Some(i) => i.name.clone(),
                None => {
                    return Err(usage(format!(
                        "the interface of {}.{}'s {field} is not known, so it cannot be kept by name",
                        entry.name, m.name
                    )))
                }
            };
            // Pipelined: keep travels with the call that makes the cap.
            let mut req = cs.keep_request();
            req.get().set_cap_name(name);
            req.get().set_interface_id(held.interface_id);
            req.get().init_cap().set_as_capability(held.client.hook);
            let kept = req.send().promise;
            let (results, kept) = futures::join!(call.finish(wait), kept);
            let results = match results {
                Ok(r) => r,
                Err(e) => {
                    // The call failed: do not leave its broken promise kept.
                    if kept.is_ok() {
                        let mut d = cs.drop_request();
                        d.get().set_cap_name(name);
                        let _ = d.send().promise.await;
                    }
                    return Err(e);
                }
            };
            kept?;
            eprintln!("kept the {iname} of {field} as {name} (capvisor call {name}.METHOD)");
            results
        }
    };
    let text = serde_json::to_string_pretty(&results.json).expect("a Value serializes");
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}").and_then(|()| out.flush());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_from_pairs_and_json() {
        let p = |j: Option<&str>, kv: &[&str]| params_of(j, &kv.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            p(None, &["spec={\"argv\":[\"echo\",\"hi\"]}", "n=42", "s=hello", "t=true", "q=\"7\""]).unwrap(),
            json!({"spec": {"argv": ["echo", "hi"]}, "n": 42, "s": "hello", "t": true, "q": "7"})
        );
        assert_eq!(
            p(Some(r#"{"spec": {"name": "a", "vcpus": 2}}"#), &["spec.name=x", "spec.engine=qemu"]).unwrap(),
            json!({"spec": {"name": "x", "vcpus": 2, "engine": "qemu"}})
        );
        assert_eq!(p(None, &["a.b.c=1"]).unwrap(), json!({"a": {"b": {"c": 1}}}));
        // A value that is not JSON is a string, even with spaces and braces.
        assert_eq!(p(None, &["path=/tmp/a b{"]).unwrap(), json!({"path": "/tmp/a b{"}));
        for (j, kv, want) in [
            (None, &["novalue"][..], "KEY=VALUE"),
            (None, &["=1"], "KEY=VALUE"),
            (None, &["a..b=1"], "bad parameter name"),
            (None, &["a=1", "a.b=2"], "not an object"),
            (Some("[1]"), &[], "--json wants a JSON object"),
            (Some("{"), &[], "--json: not JSON"),
        ] {
            let e = p(j, kv).unwrap_err();
            assert!(matches!(e, ClientError::Usage(_)), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
    }
}
