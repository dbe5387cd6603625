//! Guest network egress end to end (issue 9, first slice): real guests
//! under QEMU with `[net] egress = true`; guest-init steers every TCP
//! connection and DNS query to the session's `capvisor-proxy`, which
//! decides by the rules and relays to an upstream the test runs on
//! loopback. Test names (`*.test`) resolve to 127.0.0.1 through the
//! manifest's `[net.resolve]`; nothing here leaves 127.0.0.0/8.

mod common;
use common::*;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// A loopback HTTP/1.0 upstream: answers `hello <path>` and records each
/// request line. Stops with the test process.
fn upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let seen = s2.clone();
            std::thread::spawn(move || {
                let mut c = c;
                c.set_read_timeout(Some(std::time::Duration::from_secs(20))).ok();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                let line = text.lines().next().unwrap_or("").to_string();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                seen.lock().unwrap().push(line);
                let body = format!("hello {path}\n");
                let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            });
        }
    });
    (port, seen)
}

fn manifest(port: u16) -> String {
    let base = capvisor_manifest::DEFAULT_TOML.replace("egress = false", "egress = true");
    assert!(base.contains("egress = true"), "the default manifest has [net] egress");
    format!(
        "{base}\n[[net.rules]]\nhost = \"api.test\"\nport = {port}\naction = \"allow\"\n\
         [[net.rules]]\nhost = \"*\"\naction = \"allow\"\n\
         [net.resolve]\n\"api.test\" = [\"127.0.0.1\"]\n\"other.test\" = [\"127.0.0.1\"]\n"
    )
}

#[test]
fn guest_connections_go_through_the_proxy_and_its_rules() {
    let (port, seen) = upstream();
    let s = Server::start(Some(&manifest(port)));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "n"], None, 0);
    let url = format!("http://api.test:{port}/hello");
    let o = s.cli_ok("owner", &["vm", "exec", "n", "--", "wget", "-q", "-O", "-", &url], None, 0);
    assert_eq!(stdout(&o), "hello /hello\n");
    assert_eq!(seen.lock().unwrap().as_slice(), ["GET /hello HTTP/1.1"]);

    // The catch-all `*` rule does not reach a loopback address: only a
    // rule naming the host does. The name resolves (some rule allows it),
    // the connection is refused by the proxy, and nothing reaches upstream.
    let other = format!("http://other.test:{port}/no");
    let o = s.cli("owner", &["vm", "exec", "n", "--", "wget", "-q", "-O", "-", &other], None);
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    // Link-local metadata, by literal address.
    let o = s.cli("owner", &["vm", "exec", "n", "--", "wget", "-q", "-O", "-", "http://169.254.169.254/"], None);
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(seen.lock().unwrap().len(), 1, "denied connections never reach upstream");

    // A rule change applies to the next connection, without a VM restart.
    s.cli_ok("owner", &["net", "rules", "--allow", &format!("other.test:{port}")], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "n", "--", "wget", "-q", "-O", "-", &other], None, 0);
    assert_eq!(stdout(&o), "hello /no\n");
    let o = s.cli_ok("owner", &["net", "rules"], None, 0);
    assert!(stdout(&o).lines().nth(1).unwrap_or("").contains("other.test"), "{}", stdout(&o));

    // The guest's own loopback stays the guest's: not relayed.
    let o =
        s.cli("owner", &["vm", "exec", "n", "--", "wget", "-q", "-O", "-", &format!("http://127.0.0.1:{port}/")], None);
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(seen.lock().unwrap().len(), 2);

    // NetLog: the allowed flows with their bytes, the denied ones with why.
    let o = s.cli_ok("owner", &["net", "log", "--vm", "n"], None, 0);
    let log = stdout(&o);
    let rows: Vec<&str> = log.lines().skip(1).collect();
    assert!(rows.iter().any(|r| r.contains("allow") && r.contains("api.test")), "{log}");
    assert!(rows.iter().any(|r| r.contains("deny") && r.contains("169.254.169.254")), "{log}");
    assert!(rows.iter().any(|r| r.contains("deny") && r.contains("other.test")), "{log}");
    s.cli_ok("owner", &["vm", "rm", "n"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// Programs that ignore proxy settings and a raw socket from Python go
/// through the proxy too (the `debian` image).
#[test]
fn curl_noproxy_and_a_raw_python_socket_are_relayed() {
    let (port, seen) = upstream();
    let s = Server::start(Some(&manifest(port)));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", "d"], None, 0);
    let o = s.cli_ok(
        "owner",
        &["vm", "exec", "d", "--", "curl", "-sS", "--noproxy", "*", &format!("http://api.test:{port}/curl")],
        None,
        0,
    );
    assert_eq!(stdout(&o), "hello /curl\n");
    // HTTP/1.0: the server closes after the answer; read to EOF (one recv
    // may return only the first bytes the proxy relayed).
    let py = format!(
        "import socket\ns = socket.create_connection(('api.test', {port}), timeout=20)\n\
         s.sendall(b'GET /py HTTP/1.0\\r\\n\\r\\n')\ndata = b''\nwhile True:\n    b = s.recv(4096)\n    \
         if not b:\n        break\n    data += b\nprint(data.split(b'\\r\\n\\r\\n', 1)[1].decode(), end='')"
    );
    let o = s.cli_ok("owner", &["vm", "exec", "--user", "agent", "d", "--", "python3", "-c", &py], None, 0);
    assert_eq!(stdout(&o), "hello /py\n");
    let o =
        s.cli("owner", &["vm", "exec", "d", "--", "curl", "-sS", "--max-time", "10", "http://unknown.invalid/"], None);
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(seen.lock().unwrap().len(), 2);
    s.cli_ok("owner", &["vm", "rm", "d"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// An `ask` rule holds the guest's connection until `capvisor approve`
/// (a real guest waiting in `wget`), or `approve --deny` refuses it.
#[test]
fn ask_waits_for_capvisor_approve() {
    let (port, seen) = upstream();
    let base = capvisor_manifest::DEFAULT_TOML.replace("egress = false", "egress = true");
    let manifest = format!(
        "{base}\n[[net.rules]]\nhost = \"api.test\"\nport = {port}\naction = \"ask\"\n\
         [net.resolve]\n\"api.test\" = [\"127.0.0.1\"]\n"
    );
    let s = std::sync::Arc::new(Server::start(Some(&manifest)));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "a"], None, 0);
    let url = format!("http://api.test:{port}/held");
    let pending_id = |s: &Server| -> Option<String> {
        let o = s.cli_ok("owner", &["approvals"], None, 0);
        let text = stdout(&o);
        let row = text.lines().skip(1).find(|l| l.contains("api.test"))?;
        row.split_whitespace().next().map(str::to_string)
    };
    for (decision, expect_ok) in [(None, true), (Some("--deny"), false)] {
        let (s2, url2) = (s.clone(), url.clone());
        let held = std::thread::spawn(move || {
            s2.cli("owner", &["vm", "exec", "a", "--", "wget", "-q", "-O", "-", &url2], None)
        });
        let t0 = std::time::Instant::now();
        let id = loop {
            if let Some(id) = pending_id(&s) {
                break id;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(30), "no held connection appeared");
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        assert!(!held.is_finished(), "the guest waits for the decision");
        let mut args = vec!["approve", id.as_str()];
        args.extend(decision);
        s.cli_ok("owner", &args, None, 0);
        let o = held.join().unwrap();
        assert_eq!(o.status.code() == Some(0), expect_ok, "{}", stderr(&o));
        if expect_ok {
            assert_eq!(stdout(&o), "hello /held\n");
        }
        assert!(pending_id(&s).is_none());
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "only the approved connection reached upstream");
    let o = s.cli_ok("owner", &["net", "log"], None, 0);
    assert!(stdout(&o).contains("approved once") && stdout(&o).contains("denied by an approver"), "{}", stdout(&o));
    s.cli_ok("owner", &["vm", "rm", "a"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    std::sync::Arc::try_unwrap(s).ok().expect("no other holder").stop();
}

/// `pip install` in a `debian` guest from a package index the test serves
/// on loopback (PEP 503 simple index over plain HTTP: TLS interception is
/// a later slice), reached only through an egress rule.
#[test]
fn pip_installs_from_a_loopback_index_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let whl = make_wheel(dir.path());
    let simple = dir.path().join("simple/capsum");
    std::fs::create_dir_all(&simple).unwrap();
    let name = whl.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::rename(&whl, simple.join(&name)).unwrap();
    std::fs::write(simple.join("index.html"), format!("<html><body><a href=\"{name}\">{name}</a></body></html>\n"))
        .unwrap();
    // python3 -m http.server on an ephemeral port; it prints the port.
    let mut index = std::process::Command::new("python3")
        .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 on the host");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(index.stdout.take().unwrap()), &mut line).unwrap();
    let _index = Kill(index);
    let port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("http.server said {line:?}"));
    let base = capvisor_manifest::DEFAULT_TOML.replace("egress = false", "egress = true");
    let manifest = format!(
        "{base}\n[[net.rules]]\nhost = \"pypi.test\"\nport = {port}\naction = \"allow\"\n\
         [net.resolve]\n\"pypi.test\" = [\"127.0.0.1\"]\n"
    );
    let s = Server::start(Some(&manifest));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", "p"], None, 0);
    let script = format!(
        "python3 -m venv ~/v && ~/v/bin/pip install -q --disable-pip-version-check --index-url \
         http://pypi.test:{port}/simple/ --trusted-host pypi.test capsum && cd / && \
         ~/v/bin/python -c 'import capsum; print(capsum.squares(10))'"
    );
    let o = s.cli_ok("owner", &["vm", "exec", "--user", "agent", "p", "--", "bash", "-c", &script], None, 0);
    assert_eq!(stdout(&o), "385\n", "{}", stderr(&o));
    let o = s.cli_ok("owner", &["net", "log", "--vm", "p"], None, 0);
    assert!(stdout(&o).lines().any(|l| l.contains("allow") && l.contains("pypi.test")), "{}", stdout(&o));
    s.cli_ok("owner", &["vm", "rm", "p"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// A server-sent-events stream arrives event by event through the relay:
/// the upstream sends one event, waits 3 s, then a second; the guest sees
/// the first long before the second (nothing buffers the body).
#[test]
fn a_server_sent_event_stream_arrives_incrementally() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: one\n\n");
            std::thread::sleep(std::time::Duration::from_secs(3));
            let _ = c.write_all(b"data: two\n\n");
        }
    });
    let base = capvisor_manifest::DEFAULT_TOML.replace("egress = false", "egress = true");
    let manifest = format!(
        "{base}\n[[net.rules]]\nhost = \"sse.test\"\nport = {port}\naction = \"allow\"\n\
         [net.resolve]\n\"sse.test\" = [\"127.0.0.1\"]\n"
    );
    let s = Server::start(Some(&manifest));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", "e"], None, 0);
    let script = format!(
        "import socket, time\ns = socket.create_connection(('sse.test', {port}), timeout=30)\n\
         s.sendall(b'GET /events HTTP/1.0\\r\\n\\r\\n')\nf = s.makefile('rb')\nseen = {{}}\n\
         for line in f:\n    if line.startswith(b'data: '):\n        seen[line[6:].strip().decode()] = time.monotonic()\n\
         print(f\"{{seen['two'] - seen['one']:.1f}}\")\n"
    );
    let o = s.cli_ok("owner", &["vm", "exec", "e", "--", "python3", "-c", &script], None, 0);
    let gap: f64 = stdout(&o).trim().parse().unwrap_or_else(|_| panic!("guest printed {:?}", stdout(&o)));
    assert!(gap >= 2.0, "the first event must arrive before the second is sent ({gap} s apart)");
    s.cli_ok("owner", &["vm", "rm", "e"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// The net caps follow the bundle: a `user` principal holds `netlog` but
/// not `netpolicy` or `approvals` (typed `notFound`, its rules untouched);
/// deciding a connection that does not wait is `notFound`.
#[test]
fn net_caps_are_denied_where_the_bundle_does_not_grant_them() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["account", "add", "bob", "--profile", "user", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    s.cli_ok("bob", &["login", "--user", "bob", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    for args in [&["net", "rules"][..], &["net", "rules", "--allow", "*"], &["approvals"], &["approve", "1"]] {
        let o = s.cli_ok("bob", args, None, 11);
        assert!(stderr(&o).contains("no capability named"), "{args:?}: {}", stderr(&o));
    }
    s.cli_ok("bob", &["net", "log"], None, 0);
    let o = s.cli_ok("owner", &["net", "rules"], None, 0);
    assert!(stdout(&o).contains("no rules"), "the owner's session still has no rules: {}", stdout(&o));
    let o = s.cli_ok("owner", &["approve", "999"], None, 11);
    assert!(stderr(&o).contains("no connection 999 waits"), "{}", stderr(&o));
    s.cli_ok("bob", &["logout"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
