//! Host-side tests of the loopback HTTPS test upstream
//! (`tests/upstream/https_upstream.py` and `common::tls_upstream`) that the
//! egress TLS interception tests use: host curl, git and a small Python
//! WebSocket client talk to it directly on 127.0.0.1 (no capvisor server,
//! no guest, no proxy), verifying its certificate against the test CA.

mod common;

use common::tls_upstream::{git, HttpsUpstream, TestCa};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A CA, a running upstream and the temporary directory holding both.
fn setup() -> (tempfile::TempDir, TestCa, HttpsUpstream) {
    let dir = tempfile::Builder::new().prefix("capvisor-tls-upstream.").tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("ca"));
    let up = HttpsUpstream::start(dir.path(), &ca);
    (dir, ca, up)
}

/// `curl -sS --cacert CA --resolve api.test:PORT:127.0.0.1 ARGS...`.
fn curl(up: &HttpsUpstream, ca: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120", "--cacert"]).arg(ca).args(["--resolve", &up.resolve()]);
    c.args(["--resolve", &format!("other.test:{}:127.0.0.1", up.port)]);
    c.args(["--resolve", &format!("nope.test:{}:127.0.0.1", up.port)]);
    c.args(args);
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("curl on the host")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A POST to `/echo` is recorded with its method, path, custom header and
/// body, and the answer is the same object; a PUT and a GET are recorded
/// after it, in order; an unknown path is 404 and not recorded.
#[test]
fn echo_records_method_path_headers_and_body() {
    let (_d, ca, up) = setup();
    let o = run(curl(
        &up,
        &ca.ca_pem,
        &[
            "-X",
            "POST",
            "-H",
            "X-Capvisor-Test: token-123",
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            "hello body \u{e9}",
            &up.url("/echo/a?q=1"),
        ],
    ));
    assert!(o.status.success(), "curl: {}", text(&o.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rec = up.recorded();
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(answer, rec[0], "the answer is the recorded object");
    assert_eq!(rec[0]["method"], "POST");
    assert_eq!(rec[0]["path"], "/echo/a?q=1");
    assert_eq!(rec[0]["body"], "hello body \u{e9}");
    assert_eq!(rec[0]["headers"]["x-capvisor-test"], "token-123");
    assert_eq!(rec[0]["headers"]["host"], format!("api.test:{}", up.port));

    // The same certificate also serves the second name.
    let put =
        curl(&up, &ca.ca_pem, &["-X", "PUT", "--data-binary", "p", &format!("https://other.test:{}/echo", up.port)]);
    assert!(run(put).status.success());
    assert!(run(curl(&up, &ca.ca_pem, &[&up.url("/echo")])).status.success());
    let rec = up.recorded();
    let methods: Vec<_> = rec.iter().map(|r| r["method"].as_str().unwrap().to_string()).collect();
    assert_eq!(methods, ["POST", "PUT", "GET"]);
    assert_eq!(rec[1]["headers"]["host"], format!("other.test:{}", up.port));
    assert_eq!(rec[1]["body"], "p");

    // A chunked request body is de-chunked, and two requests in one curl
    // run share one connection (HTTP/1.1 keep-alive): curl makes one
    // connect for the first and none for the second.
    let o = run(curl(
        &up,
        &ca.ca_pem,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "chunked body",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &up.url("/echo/c1"),
            "-o",
            "/dev/null",
            &up.url("/echo/c2"),
        ],
    ));
    assert!(o.status.success(), "curl: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "200 1\n200 0\n", "the second request reused the connection");
    let rec = up.recorded();
    assert_eq!(rec.len(), 5);
    assert_eq!(rec[3]["path"], "/echo/c1");
    assert_eq!(rec[3]["headers"]["transfer-encoding"], "chunked");
    assert_eq!(rec[3]["body"], "chunked body");
    assert_eq!(rec[4]["path"], "/echo/c2");
    assert_eq!(rec[4]["body"], "chunked body", "curl repeats the data for each URL");

    let o = run(curl(&up, &ca.ca_pem, &["-o", "/dev/null", "-w", "%{http_code}", &up.url("/nothing")]));
    assert_eq!(text(&o.stdout), "404");
    assert_eq!(up.recorded().len(), 5, "a 404 is not recorded");
}

/// A certificate from another CA is refused (curl exit 60, "peer
/// certificate cannot be authenticated"), and so is a name the leaf does not
/// carry; neither request reaches `/echo`.
#[test]
fn wrong_ca_or_name_is_refused() {
    let (d, _ca, up) = setup();
    let other = TestCa::new(&d.path().join("other-ca"));
    let o = run(curl(&up, &other.ca_pem, &["-d", "x", &up.url("/echo")]));
    assert_eq!(o.status.code(), Some(60), "wrong CA: {}", text(&o.stderr));
    let o = run(curl(&up, &_ca.ca_pem, &["-d", "x", &format!("https://nope.test:{}/echo", up.port)]));
    assert_eq!(o.status.code(), Some(60), "name not in the SANs: {}", text(&o.stderr));
    assert!(up.recorded().is_empty(), "nothing reached the upstream: {:?}", up.recorded());
    // The upstream is still serving after the failed handshakes.
    assert!(run(curl(&up, &_ca.ca_pem, &[&up.url("/echo")])).status.success());
    assert_eq!(up.recorded().len(), 1);
}

/// SHA-256 of stdin (Python's hashlib: OpenSSL, fast even in a debug
/// test build): prints `<bytes> <hex digest>`.
const HASH_STDIN: &str = "import hashlib, sys
h, n = hashlib.sha256(), 0
for b in iter(lambda: sys.stdin.buffer.read(1 << 20), b''):
    h.update(b)
    n += len(b)
print(n, h.hexdigest())
";

/// SHA-256 of `argv[1]` bytes of the pattern 0..=255 repeated (a multiple
/// of 1 MiB): prints `<bytes> <hex digest>`.
const HASH_PATTERN: &str = "import hashlib, sys
n, c, h = int(sys.argv[1]), bytes(range(256)) * 4096, hashlib.sha256()
for _ in range(n // len(c)):
    h.update(c)
print(n, h.hexdigest())
";

/// 256 MiB from `/big` arrive complete: the byte count and the SHA-256 of
/// the stream equal the pattern's (0..=255 repeated). Prints MB/s.
#[test]
fn big_download_is_complete() {
    const N: usize = 256 << 20;
    let (_d, ca, up) = setup();
    let expected = Command::new("/usr/bin/python3").args(["-c", HASH_PATTERN, &N.to_string()]).output().unwrap();
    assert!(expected.status.success(), "{}", text(&expected.stderr));

    let mut c =
        curl(&up, &ca.ca_pem, &["-o", "-", "-w", "%{stderr}%{time_total}\n", &up.url(&format!("/big?bytes={N}"))]);
    let start = Instant::now();
    let mut dl = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let hasher = Command::new("/usr/bin/python3")
        .args(["-c", HASH_STDIN])
        .stdin(Stdio::from(dl.stdout.take().unwrap()))
        .output()
        .unwrap();
    let wall = start.elapsed().as_secs_f64();
    let o = dl.wait_with_output().unwrap();
    assert!(o.status.success(), "curl: {}", text(&o.stderr));
    assert!(hasher.status.success(), "{}", text(&hasher.stderr));
    assert_eq!(text(&hasher.stdout), text(&expected.stdout), "the stream is N bytes of the pattern");
    assert!(text(&hasher.stdout).starts_with(&format!("{N} ")));
    let curl_secs: f64 = text(&o.stderr).trim().parse().unwrap();
    eprintln!(
        "big download: {} MiB, curl {:.1} MB/s ({curl_secs:.2} s), {:.1} MB/s with sha256 in the pipe ({wall:.2} s)",
        N >> 20,
        N as f64 / 1e6 / curl_secs,
        N as f64 / 1e6 / wall
    );
}

/// `/sse?n=3&gap_ms=500` arrives event by event: the first event is read
/// about a second before the third (which the upstream sends 1 s after the
/// first), so it was not held back until the end of the stream.
#[test]
fn sse_arrives_incrementally() {
    let (_d, ca, up) = setup();
    let mut c = curl(&up, &ca.ca_pem, &["-N", "-D", "-", &up.url("/sse?n=3&gap_ms=500")]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let mut headers = String::new();
    let mut events = vec![];
    let mut r = BufReader::new(child.stdout.take().unwrap());
    let mut in_headers = true;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if in_headers {
            in_headers = line != "\r\n";
            headers.push_str(&line.to_ascii_lowercase());
        } else if line.starts_with("data:") {
            events.push((line.trim_end().to_string(), start.elapsed()));
        }
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "curl: {}", text(&o.stderr));
    assert!(headers.contains("content-type: text/event-stream"), "{headers}");
    let names: Vec<_> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["data: event 1", "data: event 2", "data: event 3"]);
    let (t1, t2, t3) = (events[0].1, events[1].1, events[2].1);
    assert!(t2 - t1 >= Duration::from_millis(400), "event 2 came {:?} after event 1", t2 - t1);
    assert!(t3 - t1 >= Duration::from_millis(800), "event 3 came {:?} after event 1", t3 - t1);
}

/// An HTTP/1.0 client gets the event stream unchunked, ended by the
/// connection closing; an HTTP/1.1 client gets it chunked.
#[test]
fn sse_framing_follows_the_http_version() {
    let (_d, ca, up) = setup();
    let o = run(curl(&up, &ca.ca_pem, &["--http1.0", "-D", "-", &up.url("/sse?n=2&gap_ms=0")]));
    assert!(o.status.success(), "curl: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.contains("connection: close") && !head.contains("transfer-encoding"), "{head}");
    assert_eq!(body, "data: event 1\n\ndata: event 2\n\n");

    let o = run(curl(&up, &ca.ca_pem, &["--raw", "-D", "-", &up.url("/sse?n=1&gap_ms=0")]));
    let out = text(&o.stdout);
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(body, "f\r\ndata: event 1\n\n\r\n0\r\n\r\n", "raw chunked framing");
}

/// A rustls client (webpki verification, as the egress proxy's upstream
/// side does) trusting only the PEM certificates in `ca`, offering ALPN
/// `h2` and `http/1.1`.
fn rustls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// `GET path` to `name` on 127.0.0.1:`port` over rustls: the negotiated
/// ALPN protocol and the response body (read by Content-Length), or the
/// rustls error that failed the handshake.
fn rustls_get(
    cfg: &Arc<rustls::ClientConfig>,
    port: u16,
    name: &str,
    path: &str,
) -> Result<(Vec<u8>, String), rustls::Error> {
    use std::io::{Read, Write};
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), server)?;
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let rustls_err = |e: std::io::Error| match e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
        Some(Ok(e)) => *e,
        other => panic!("not a TLS error: {other:?}"),
    };
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n").map_err(rustls_err)?;
    tls.flush().map_err(rustls_err)?;
    let mut r = BufReader::new(tls);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(rustls_err)?;
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let alpn = r.get_ref().conn.alpn_protocol().unwrap_or_default().to_vec();
    Ok((alpn, String::from_utf8(body).unwrap()))
}

/// The test CA's chain satisfies rustls/webpki (stricter than OpenSSL),
/// for both DNS names and the IP address, with ALPN `http/1.1` chosen
/// over `h2`; another CA fails with UnknownIssuer and an unlisted name
/// with a name mismatch, and neither request is recorded.
#[test]
fn rustls_verifies_the_test_ca() {
    let (d, ca, up) = setup();
    let cfg = rustls_config(&ca.ca_pem);
    for name in ["api.test", "other.test", "127.0.0.1"] {
        let (alpn, body) = rustls_get(&cfg, up.port, name, &format!("/echo/{name}")).unwrap();
        assert_eq!(alpn, b"http/1.1");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["path"], format!("/echo/{name}"));
    }
    assert_eq!(up.recorded().len(), 3);

    let other = TestCa::new(&d.path().join("other-ca"));
    let e = rustls_get(&rustls_config(&other.ca_pem), up.port, "api.test", "/echo/no").unwrap_err();
    assert_eq!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
    let e = rustls_get(&cfg, up.port, "nope.test", "/echo/no").unwrap_err();
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{e:?}"
    );
    assert_eq!(up.recorded().len(), 3, "refused handshakes reach nothing");
}

/// 100 clients released together (each its own TLS connection) are all
/// served, each its own answer, and all recorded.
#[test]
fn hundred_concurrent_connections() {
    let (_d, ca, up) = setup();
    let cfg = rustls_config(&ca.ca_pem);
    let barrier = Arc::new(std::sync::Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let (cfg, barrier, port) = (cfg.clone(), barrier.clone(), up.port);
            std::thread::spawn(move || {
                barrier.wait();
                rustls_get(&cfg, port, "api.test", &format!("/echo/{i}")).unwrap().1
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(&t.join().unwrap()).unwrap();
        assert_eq!(v["path"], format!("/echo/{i}"));
    }
    let mut paths: Vec<_> = up.recorded().iter().map(|r| r["path"].as_str().unwrap().to_string()).collect();
    paths.sort();
    let mut want: Vec<_> = (0..100).map(|i| format!("/echo/{i}")).collect();
    want.sort();
    assert_eq!(paths, want);
}

/// A small RFC 6455 client: checks Sec-WebSocket-Accept, sends masked text
/// and binary messages with 7-, 16- and 64-bit lengths, a fragmented
/// message, a ping and a close, and prints one line per check.
const WS_CLIENT: &str = r#"
import base64, hashlib, os, socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="api.test")
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: api.test:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, key)).encode())
f = s.makefile("rb")
status = f.readline().split()[1].decode()
hdrs = {}
while True:
    line = f.readline()
    if line in (b"\r\n", b""):
        break
    k, _, v = line.decode().partition(":")
    hdrs[k.strip().lower()] = v.strip()
want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
print("status", status, "accept", hdrs.get("sec-websocket-accept") == want)
def send(op, payload, fin=True):
    n, mask = len(payload), os.urandom(4)
    head = bytes([(0x80 if fin else 0) | op])
    if n < 126: head += bytes([0x80 | n])
    elif n < 65536: head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else: head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
def recv():
    h = f.read(2)
    masked, n = h[1] & 0x80, h[1] & 0x7F
    if n == 126: n = int.from_bytes(f.read(2), "big")
    elif n == 127: n = int.from_bytes(f.read(8), "big")
    return h[0] & 0x0F, bool(h[0] & 0x80), bool(masked), f.read(n)
for name, op, p in [("text7", 1, "h\u00e9llo".encode()), ("bin16", 2, bytes(range(256)) * 3), ("bin64", 2, os.urandom(70000))]:
    send(op, p)
    rop, fin, masked, rp = recv()
    print(name, rop == op and fin and not masked and rp == p, len(rp))
send(9, b"pp")
print("pong", recv()[::3] == (10, b"pp"))
send(1, b"frag", fin=False)
send(0, b"ment")
print("fragmented", recv()[::3] == (1, b"fragment"))
send(8, (1000).to_bytes(2, "big"))
print("close", recv()[::3] == (8, (1000).to_bytes(2, "big")))
"#;

/// A WebSocket echo round trip over TLS: the handshake's accept key is
/// right, every message comes back unmasked and equal (7-, 16- and 64-bit
/// lengths, text, binary, fragmented), ping gets pong, close gets close.
#[test]
fn websocket_echo_round_trip() {
    let (_d, ca, up) = setup();
    let o = Command::new("/usr/bin/python3")
        .args(["-c", WS_CLIENT, &up.port.to_string()])
        .arg(&ca.ca_pem)
        .output()
        .unwrap();
    assert!(o.status.success(), "ws client: {}\n{}", text(&o.stderr), up.log_text());
    assert_eq!(
        text(&o.stdout),
        "status 101 accept True\ntext7 True 6\nbin16 True 768\nbin64 True 70000\npong True\nfragmented True\nclose True\n"
    );
}

/// `git` against the upstream with the test CA and a resolve override.
fn git_https(up: &HttpsUpstream, ca: &TestCa, dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .args(["-c", &format!("http.curloptResolve={}", up.resolve())])
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .env("GIT_SSL_CAINFO", &ca.ca_pem)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git on the host")
}

/// git smart HTTP over TLS: a clone gets the README; a pushed commit with a
/// 3 MiB incompressible file (more than git's 1 MiB http.postBuffer, so the
/// push is sent chunked) lands in the bare repository; a second clone
/// fetches it back intact.
#[test]
fn git_clone_and_push_over_https() {
    let (d, ca, up) = setup();
    let bare = up.bare_repo("r");
    let url = up.url("/git/r.git");
    let o = git_https(&up, &ca, d.path(), &["clone", "-q", &url, "w"]);
    assert!(o.status.success(), "clone: {}\n{}", text(&o.stderr), up.log_text());
    let w = d.path().join("w");
    assert_eq!(std::fs::read_to_string(w.join("README")).unwrap(), "hello from the upstream\n");

    // xorshift bytes: incompressible, so the pack stays over 1 MiB.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(w.join("big.bin"), &big).unwrap();
    git(&w, &["add", "big.bin"], None);
    git(&w, &["commit", "-q", "-m", "pushed over https"], None);
    let o = git_https(&up, &ca, &w, &["push", "-q", "origin", "main"]);
    assert!(o.status.success(), "push: {}\n{}", text(&o.stderr), up.log_text());
    assert_eq!(git(&bare, &["log", "--format=%s", "main"], None), "pushed over https\ninitial");
    assert!(
        up.log_text().contains("POST /git/r.git/git-receive-pack"),
        "the push went through receive-pack: {}",
        up.log_text()
    );
    assert!(
        up.log_text().contains("git http-backend /r.git/git-receive-pack body chunked=True"),
        "the 3 MiB push was sent chunked: {}",
        up.log_text()
    );

    let o = git_https(&up, &ca, d.path(), &["clone", "-q", &url, "w2"]);
    assert!(o.status.success(), "second clone: {}", text(&o.stderr));
    assert!(std::fs::read(d.path().join("w2/big.bin")).unwrap() == big, "big.bin came back intact");

    // A fetch whose request is over 1 KiB is sent gzip-encoded, and git
    // http-backend, given HTTP_CONTENT_ENCODING, still answers it. 40
    // annotated tags the fetcher lacks are 40 distinct "want" lines (50
    // bytes each) in the first request, whatever the negotiator picks as
    // "have"s (their order depends on commit dates, which tie within a
    // second: 40 local commits sometimes met a common one in the first
    // round and stayed under 1 KiB).
    let w2 = d.path().join("w2");
    git(&w, &["commit", "-q", "--allow-empty", "-m", "second push"], None);
    for i in 0..40 {
        git(&w, &["tag", "-a", "-m", &format!("tag {i}"), &format!("t{i}")], None);
    }
    let o = git_https(&up, &ca, &w, &["push", "-q", "--tags", "origin", "main"]);
    assert!(o.status.success(), "second push: {}", text(&o.stderr));
    let o = git_https(&up, &ca, &w2, &["fetch", "-q", "--tags", "origin"]);
    assert!(o.status.success(), "fetch: {}\n{}", text(&o.stderr), up.log_text());
    assert_eq!(git(&w2, &["log", "-1", "--format=%s", "origin/main"], None), "second push");
    assert_eq!(git(&w2, &["tag", "-l", "t*"], None).lines().count(), 40, "all 40 tags fetched");
    assert!(
        up.log_text().contains("git-upload-pack body chunked=False encoding=gzip"),
        "the negotiation was gzip-encoded: {}",
        up.log_text()
    );
}

/// The upstream exits by itself when its parent dies: a shell starts it in
/// the background and exits; the orphaned upstream is gone within 5 s.
#[test]
fn upstream_exits_when_its_parent_dies() {
    let dir = tempfile::Builder::new().prefix("capvisor-tls-upstream.").tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("ca"));
    std::fs::create_dir_all(dir.path().join("git")).unwrap();
    let o = Command::new("/bin/sh")
        .args(["-c", "/usr/bin/python3 \"$0\" --cert \"$1\" --key \"$2\" --record \"$3\" --git-root \"$4\" >\"$5\" 2>&1 & echo $!; \
             i=0; until grep -q PORT \"$5\" || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done"])
        .arg(common::tls_upstream::script())
        .args([&ca.leaf_pem, &ca.leaf_key])
        .args([dir.path().join("r.jsonl"), dir.path().join("git"), dir.path().join("out")])
        .output()
        .unwrap();
    assert!(o.status.success());
    let pid: u32 = text(&o.stdout).trim().parse().unwrap();
    let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
    assert!(out.starts_with("PORT "), "it was serving when its parent died: {out}");
    let alive = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // a zombie (state Z) waiting for its new parent to reap it has exited
        Ok(stat) => !stat.rsplit(')').next().unwrap().trim_start().starts_with('Z'),
        Err(_) => false,
    };
    let t = Instant::now();
    while alive() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive() {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("the orphaned upstream {pid} still runs 5 s after its parent died");
    }
}
