//! `capvisor mcp` against real MCP clients and a real guest: the PyPI `mcp`
//! SDK (stdio, and streamable HTTP with and without the bearer token), the
//! npm `@modelcontextprotocol/sdk` client, and the MCP Inspector CLI, with
//! the owner's saved session and with a narrowed share token. One server
//! and one VM serve every client.
//!
//! The clients are installed by `cli/tests/mcp/setup.sh` into the cache
//! directory (`.ci/run` runs it). Without them the end-to-end test is
//! skipped with a loud message, except under CI (`CI=true`), where it fails.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where setup.sh installed the clients: (python venv, npm dir).
fn clients() -> Option<(PathBuf, PathBuf)> {
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/setup.sh");
    let o = Command::new("bash").arg(&setup).arg("--where").output().expect("run setup.sh --where");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let get = |k: &str| {
        text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).map(PathBuf::from).expect("setup.sh prints paths")
    };
    if o.status.success() {
        return Some((get("venv"), get("npm")));
    }
    let msg = format!(
        "MCP test clients are not installed (PyPI mcp in {}, npm packages in {}): run {}",
        get("venv").display(),
        get("npm").display(),
        setup.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (under CI they must be: .ci/run installs them)");
    }
    eprintln!("\n!!!!!!!!!! SKIPPED: {msg} !!!!!!!!!!\n");
    None
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp").join(name)
}

fn capvisor() -> String {
    bin_dir().join("capvisor").display().to_string()
}

/// Runs a client command with the server's environment for `owner`; returns
/// its stdout parsed as JSON (it prints one report object), panicking with
/// its output on failure.
fn run_client(s: &Server, mut cmd: Command, what: &str) -> Value {
    cmd.env("CAPVISOR_SOCKET", &s.socket)
        .env("CAPVISOR_CONFIG_DIR", s.config_dir("owner"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}\nserve log:\n{}",
        o.status,
        stdout(&o),
        stderr(&o),
        s.log()
    );
    let out = stdout(&o);
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{what}: no JSON:\n{out}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: {e}: {line}"))
}

/// The checks every client's report must pass: tool list, exec on the
/// real guest, a missing VM as a tool error, an unknown tool as a protocol
/// error (-32602, invalid params: what the SDKs send for an unknown tool).
fn check_common(r: &Value, who: &str) {
    let tools: Vec<&str> = r["tools"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    for t in ["vm_create", "vm_exec", "file_read", "file_write", "vms_create", "vms_list", "vms_get", "vms_remove"] {
        assert!(tools.contains(&t), "{who}: no tool {t} in {tools:?}");
    }
    let exec = &r["exec"];
    assert_eq!(exec["isError"], false, "{who}: {exec}");
    let st = &exec["structured"];
    assert_eq!(st["exitCode"], 3, "{who}: {exec}");
    assert_eq!(st["stdout"], "hello-from-guest\n", "{who}: {exec}");
    assert_eq!(st["stderr"], "to-stderr\n", "{who}: {exec}");
    let text = exec["text"].as_str().unwrap();
    assert!(text.starts_with("exit code 3\n") && text.contains("hello-from-guest"), "{who}: {text}");
    let progress = r["progress"].as_array().unwrap();
    assert!(
        progress.iter().any(|p| p["message"].as_str().unwrap_or("").contains("hello-from-guest")),
        "{who}: the output arrives as progress: {progress:?}"
    );
    // A cap tool: VmFactory.list by name, its results as JSON.
    let list = &r["cap_list"];
    assert_eq!(list["isError"], false, "{who}: {list}");
    let vms = list["structured"]["vms"].as_array().unwrap_or_else(|| panic!("{who}: {list}"));
    assert!(vms.iter().any(|v| v["name"] == "box" && v["state"] == "running"), "{who}: {list}");
    let missing = &r["missing_vm"];
    assert_eq!(missing["isError"], true, "{who}: {missing}");
    assert!(missing["text"].as_str().unwrap().starts_with("[notFound]"), "{who}: {missing}");
    let unknown = &r["unknown_tool"];
    assert_eq!(unknown["raised"], true, "{who}: {unknown}");
    assert_eq!(unknown["code"], -32602, "{who}: {unknown}");
}

/// The extra checks of the Python client's report: files, a long output
/// cut with its marker, a denial with its typed code.
fn check_python(r: &Value, who: &str) {
    check_common(r, who);
    assert_eq!(r["exec_io"]["structured"]["stdout"], "from-stdin\nbar\n/tmp\n", "{who}: {}", r["exec_io"]);
    assert_eq!(r["write"]["isError"], false, "{who}: {}", r["write"]);
    let read = &r["read"]["structured"];
    assert_eq!(read["content"], "one\nline two\n", "{who}: {read}");
    assert_eq!(
        (read["offset"].as_u64(), read["size"].as_u64(), read["eof"].as_bool()),
        (Some(5), Some(18), Some(true))
    );
    let w = &r["read_window"];
    assert_eq!(w["structured"]["content"], "line", "{who}: {w}");
    assert_eq!(w["structured"]["eof"], false, "{who}: {w}");
    assert!(w["text"].as_str().unwrap().contains("call file_read with offset=4 for the rest"), "{who}: {w}");
    let t = &r["timeout"];
    assert_eq!(t["isError"], true, "{who}: {t}");
    assert_eq!(t["structured"]["timedOut"], true, "{who}: {t}");
    assert_eq!(t["structured"]["signal"], 9, "{who}: {t}");
    assert_eq!(t["structured"]["stdout"], "started\n", "{who}: output before the kill is kept: {t}");
    assert!(t["text"].as_str().unwrap().starts_with("[timeout] "), "{who}: {t}");
    let ps =
        r["after_cancel"]["structured"]["stdout"].as_str().unwrap_or_else(|| panic!("{who}: {}", r["after_cancel"]));
    assert!(ps.contains("ps"), "{who}: {ps}");
    assert!(!ps.contains("sleep 41"), "{who}: a cancelled vm_exec's command is killed:\n{ps}");
    let big = &r["big"];
    assert_eq!(big["isError"], false);
    assert_eq!(big["structured"]["stdoutBytes"], 200000, "{who}: {}", big["structured"]["stdoutBytes"]);
    assert_eq!(big["structured"]["stdoutTruncated"], true);
    assert_eq!(big["structured"]["stdout"].as_str().unwrap().len(), 64 * 1024);
    let text = big["text"].as_str().unwrap();
    assert!(
        text.contains("[capvisor: stdout truncated: the first 65536 of 200000 bytes are shown")
            && text.contains("file_read"),
        "{who}: {}",
        &text[text.len().saturating_sub(400)..]
    );
    let cap_missing = &r["cap_missing"];
    assert_eq!(cap_missing["isError"], true, "{who}: {cap_missing}");
    assert!(cap_missing["text"].as_str().unwrap().starts_with("[notFound]"), "{who}: {cap_missing}");
    let denied = &r["denied_create"];
    assert_eq!(denied["isError"], true, "{who}: {denied}");
    assert!(denied["text"].as_str().unwrap().starts_with("[denied] image \"no-such-image\""), "{who}: {denied}");
}

/// A `capvisor mcp --http 127.0.0.1:0` for `owner`, or, given a share
/// token, logged in with it (`--token-stdin`): the process, its URL and
/// the bearer token it printed.
fn start_http(s: &Server, share_token: Option<&str>) -> (std::process::Child, String, String) {
    start_http_with(s, share_token, None)
}

/// [`start_http`], with `--bearer-file` when given one (the token is then
/// not printed, and the one returned is the file's).
fn start_http_with(
    s: &Server,
    share_token: Option<&str>,
    bearer_file: Option<&Path>,
) -> (std::process::Child, String, String) {
    let mut cmd = Command::new(bin_dir().join("capvisor"));
    cmd.args(["mcp", "--http", "127.0.0.1:0"]);
    if share_token.is_some() {
        cmd.arg("--token-stdin");
    }
    let mut bearer = None;
    if let Some(f) = bearer_file {
        cmd.arg("--bearer-file").arg(f);
        bearer = Some(std::fs::read_to_string(f).unwrap().trim().to_string());
    }
    let mut child = cmd
        .env("CAPVISOR_SOCKET", &s.socket)
        .env("CAPVISOR_CONFIG_DIR", s.config_dir("owner"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(t) = share_token {
        writeln!(stdin, "{t}").unwrap();
    }
    drop(stdin);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut url = None;
    let mut seen = Vec::new();
    while url.is_none() || bearer.is_none() {
        let l = lines.next().unwrap_or_else(|| panic!("capvisor mcp --http ended early: {seen:?}")).unwrap();
        if let Some(u) = l.split("serving MCP (streamable HTTP) at ").nth(1) {
            url = Some(u.trim().to_string());
        }
        if let Some(b) = l.split("bearer token (shown once): ").nth(1) {
            assert!(bearer_file.is_none(), "a --bearer-file token is never printed: {l}");
            bearer = Some(b.trim().to_string());
        }
        seen.push(l);
    }
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (child, url.unwrap(), bearer.unwrap())
}

/// The report of the "narrowed" scenario: a share of VM "box" allowing
/// `echo` and read-only files gives exactly the tools of one Vm cap, and
/// what the share does not allow comes back as a [denied] tool error.
fn check_narrowed(r: &Value, who: &str) {
    let tools: Vec<&str> = r["tools"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let iface = capvisor_schema::reflect::schema().interface_by_name("Vm").unwrap();
    let mut want = vec!["vm_exec".to_string(), "file_read".into(), "file_write".into()];
    want.extend(iface.methods.iter().map(|m| format!("box_{}", m.name)));
    assert_eq!(tools, want, "{who}: exactly the shared VM's tools");
    assert_eq!(r["echo"]["isError"], false, "{who}: {}", r["echo"]);
    assert_eq!(r["echo"]["structured"]["stdout"], "narrowed-ok\n", "{who}: {}", r["echo"]);
    for (k, what) in [("sh", "exec of sh"), ("write", "a file write"), ("stop", "Vm.stop")] {
        assert_eq!(r[k]["isError"], true, "{who}: {what}: {}", r[k]);
        assert!(r[k]["text"].as_str().unwrap().starts_with("[denied] "), "{who}: {what}: {}", r[k]);
    }
    assert!(r["sh"]["text"].as_str().unwrap().contains("\"sh\""), "{who}: {}", r["sh"]);
    assert_eq!(r["read"]["isError"], false, "{who}: {}", r["read"]);
    assert_eq!(r["read"]["structured"]["content"], "line one\nline two\n", "{who}: {}", r["read"]);
}

/// Stops a `capvisor mcp --http` with SIGTERM, asserting it exits 0
/// within 10 s.
fn stop(mut child: std::process::Child) {
    // SAFETY: kill(2) takes plain integers; the child is not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "capvisor mcp --http on SIGTERM: {st}");
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "capvisor mcp --http did not end on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One raw HTTP/1.1 POST of an MCP initialize to `url` with an optional
/// Authorization header; returns the status code.
fn post_initialize(url: &str, auth: Option<&str>) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (hostport, path) = rest.split_once('/').unwrap();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;
    let mut c = std::net::TcpStream::connect(hostport).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(
        c,
        "POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

/// Speaks MCP over stdio by hand (newline-delimited JSON-RPC): `capvisor
/// ARGS` for `owner`, with `first_line` written before the stream when
/// given; initialize, then tools/list. Returns the tool names.
fn raw_stdio_tools(s: &Server, args: &[&str], first_line: Option<&str>) -> Vec<String> {
    let mut child = Command::new(bin_dir().join("capvisor"))
        .args(args)
        .env("CAPVISOR_SOCKET", &s.socket)
        .env("CAPVISOR_CONFIG_DIR", s.config_dir("owner"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(l) = first_line {
        writeln!(input, "{l}").unwrap();
    }
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;
    writeln!(input, "{init}").unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut answer = |id: u64| -> Value {
        loop {
            let l = out.next().expect("capvisor mcp closed stdout").unwrap();
            let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON-RPC on stdout: {e}: {l}"));
            if v["id"] == id {
                return v;
            }
        }
    };
    assert_eq!(answer(1)["result"]["serverInfo"]["name"], "capvisor");
    writeln!(input, r#"{{"jsonrpc":"2.0","method":"notifications/initialized"}}"#).unwrap();
    writeln!(input, r#"{{"jsonrpc":"2.0","id":2,"method":"tools/list"}}"#).unwrap();
    let v = answer(2);
    drop(input);
    let _ = child.wait();
    v["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn mcp_clients_list_tools_and_exec_on_a_real_guest() {
    let Some((venv, npm)) = clients() else { return };
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    let py = venv.join("bin/python");

    // PyPI mcp over stdio; it boots the test's one VM with vm_create.
    let mut c = Command::new(&py);
    c.arg(script("client.py")).args(["stdio", "--create", "--vm", "box", "--", &capvisor(), "mcp"]);
    let r = run_client(&s, c, "python stdio client");
    assert_eq!(r["server"], "capvisor");
    let create = &r["create"];
    assert_eq!(create["isError"], false, "{create}");
    assert_eq!(create["structured"]["name"], "box", "{create}");
    assert_eq!(create["structured"]["state"], "running", "{create}");
    assert!(stdout(&s.cli_ok("owner", &["vm", "list"], None, 0)).contains("box"));
    check_python(&r, "python stdio");

    // npm @modelcontextprotocol/sdk over stdio.
    let mut c = Command::new("node");
    c.env("NODE_PATH", npm.join("node_modules")).arg(script("client.cjs")).args([
        "--vm",
        "box",
        "--",
        &capvisor(),
        "mcp",
    ]);
    let r = run_client(&s, c, "node stdio client");
    assert_eq!(r["server"], "capvisor");
    check_common(&r, "node stdio");

    // MCP Inspector CLI: tools/list. It starts the server with a minimal
    // environment: -e passes ours.
    let mut c = Command::new(npm.join("node_modules/.bin/mcp-inspector"));
    c.args(["--cli", "-e"])
        .arg(format!("CAPVISOR_SOCKET={}", s.socket.display()))
        .arg("-e")
        .arg(format!("CAPVISOR_CONFIG_DIR={}", s.config_dir("owner").display()))
        .args([&capvisor(), "mcp", "--method", "tools/list"]);
    c.env("CAPVISOR_SOCKET", &s.socket);
    let o = c.env("CAPVISOR_CONFIG_DIR", s.config_dir("owner")).stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "inspector: {}\n{}", stdout(&o), stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("inspector: {e}: {}", stdout(&o)));
    let names: Vec<&str> = v["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"vm_exec") && names.contains(&"vms_list"), "{names:?}");
    for t in v["tools"].as_array().unwrap() {
        assert_eq!(t["inputSchema"]["type"], "object", "{t}");
        if t["name"] == "file_read" {
            assert_eq!(t["annotations"]["readOnlyHint"], true, "{t}");
            assert_eq!(t["outputSchema"]["required"].as_array().map(Vec::len), Some(7), "{t}");
        }
    }

    // Streamable HTTP: no bearer or a wrong one is 401 before anything MCP;
    // the printed one lets a real client in.
    let (child, url, bearer) = start_http(&s, None);
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/mcp"), "{url}");
    assert_eq!(post_initialize(&url, None), 401);
    assert_eq!(post_initialize(&url, Some("Bearer not-the-token")), 401);
    assert_eq!(post_initialize(&url, Some(&format!("Bearer {bearer}"))), 200);
    let mut c = Command::new(&py);
    c.arg(script("client.py")).args(["http", "--vm", "box", "--url", &url, "--bearer", &bearer]);
    let r = run_client(&s, c, "python http client");
    check_python(&r, "python http");
    // The PyPI client without the token fails to connect.
    let o = Command::new(&py)
        .arg(script("client.py"))
        .args(["http", "--vm", "box", "--url", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "no bearer must not connect: {}", stdout(&o));
    stop(child);
    // --bearer-file: that token, and no other, is accepted.
    let f = s.dir.path().join("bearer");
    std::fs::write(&f, "0123456789abcdef-from-a-file\n").unwrap();
    let (child, url, bearer) = start_http_with(&s, None, Some(&f));
    assert_eq!(post_initialize(&url, Some(&format!("Bearer {bearer}"))), 200);
    assert_eq!(post_initialize(&url, Some("Bearer 0123456789abcdef")), 401);
    stop(child);

    // A share token narrowed to `echo` and read-only files: the tool list
    // is exactly one Vm cap's, and the rest is denied. Over stdio with
    // --token-file, and over HTTP with --token-stdin.
    let share = ["share", "box", "--exec", "echo", "--files", "ro", "--ttl", "10m", "--label", "mcp-test"];
    let token = stdout(&s.cli_ok("owner", &share, None, 0)).trim().to_string();
    assert!(!token.is_empty());
    let file = s.dir.path().join("share-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let mut c = Command::new(&py);
    c.arg(script("client.py"))
        .args(["stdio", "--scenario", "narrowed", "--vm", "box", "--", &capvisor(), "mcp", "--token-file"])
        .arg(&file);
    check_narrowed(&run_client(&s, c, "python stdio client, share token"), "stdio share");
    // --token-stdin on stdio: the token line, then the MCP stream on the same stdin.
    let tools = raw_stdio_tools(&s, &["mcp", "--token-stdin"], Some(&token));
    assert!(tools.contains(&"box_exec".to_string()) && !tools.contains(&"vm_create".to_string()), "{tools:?}");
    let (child, url, bearer) = start_http(&s, Some(&token));
    let mut c = Command::new(&py);
    c.arg(script("client.py")).args([
        "http",
        "--scenario",
        "narrowed",
        "--vm",
        "box",
        "--url",
        &url,
        "--bearer",
        &bearer,
    ]);
    check_narrowed(&run_client(&s, c, "python http client, share token"), "http share");
    // Revoked: the running server's calls come back as a typed tool error.
    let shares = stdout(&s.cli_ok("owner", &["shares", "--json"], None, 0));
    let grant: Value = serde_json::from_str(shares.lines().find(|l| l.contains("mcp-test")).unwrap()).unwrap();
    s.cli_ok("owner", &["revoke", grant["id"].as_str().unwrap()], None, 0);
    let mut c = Command::new(&py);
    c.arg(script("client.py")).args([
        "http",
        "--scenario",
        "revoked",
        "--vm",
        "box",
        "--url",
        &url,
        "--bearer",
        &bearer,
    ]);
    let r = run_client(&s, c, "python http client, revoked share");
    assert_eq!(r["echo"]["isError"], true, "{r}");
    assert!(r["echo"]["text"].as_str().unwrap().starts_with("[staleSession] "), "{r}");
    stop(child);
    s.cli_ok("owner", &["vm", "rm", "box"], None, 0);
}

#[test]
fn mcp_refuses_other_addresses_and_needs_a_login() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin_dir().join("capvisor"))
            .args(args)
            .env("CAPVISOR_SOCKET", dir.path().join("no-server.sock"))
            .env("CAPVISOR_CONFIG_DIR", dir.path().join("config"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&["mcp", "--http", "0.0.0.0:8765"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("only a loopback address"), "{}", stderr(&o));
    let o = run(&["mcp"]);
    assert_eq!(o.status.code(), Some(21), "not logged in: {}", stderr(&o));
    assert_eq!(o.stdout, b"", "nothing but MCP on stdout");
    let short = dir.path().join("bearer");
    std::fs::write(&short, "short\n").unwrap();
    let o = run(&["mcp", "--http", "127.0.0.1:0", "--bearer-file", short.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let tok = dir.path().join("token");
    std::fs::write(&tok, "\n").unwrap();
    let o = run(&["mcp", "--token-file", tok.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "an empty share token: {}", stderr(&o));
}
