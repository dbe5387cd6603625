//! TLS interception end to end (issue 9): a real `debian` guest under QEMU
//! with `[net] egress = true` (interception on by default) reaches a
//! loopback HTTPS upstream (`tests/upstream/https_upstream.py`, a test CA
//! the manifest's `[net] ca_certs` adds to the proxy's upstream roots).
//! The guest verifies only what its own trust store holds: the capvisor
//! egress CA guest-init installed at boot. curl (with and without
//! `--noproxy`), Python, Node.js and git over https go through the
//! interception; secrets are put into headers for their hosts only; a
//! refused name fails fast and shows in the NetLog. Nothing leaves
//! 127.0.0.0/8.

mod common;
use common::tls_upstream::{git, HttpsUpstream, TestCa};
use common::*;

fn manifest(port: u16, ca: &std::path::Path) -> String {
    let base = capvisor_manifest::DEFAULT_TOML.replace("egress = false", "egress = true");
    assert!(base.contains("egress = true"), "the default manifest has [net] egress");
    let base = base.replace("egress = true", &format!("egress = true\nca_certs = [\"{}\"]", ca.display()));
    format!(
        "{base}\n[[net.rules]]\nhost = \"api.test\"\nport = {port}\naction = \"allow\"\n\
         [[net.rules]]\nhost = \"other.test\"\nport = {port}\naction = \"allow\"\n\
         [net.resolve]\n\"api.test\" = [\"127.0.0.1\"]\n\"other.test\" = [\"127.0.0.1\"]\n\"denied.test\" = [\"127.0.0.1\"]\n"
    )
}

#[test]
fn https_from_a_debian_guest_goes_through_the_interception() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("ca"));
    let up = HttpsUpstream::start(&dir.path().join("up"), &ca);
    let repo = up.bare_repo("r");
    let port = up.port;
    let s = Server::start(Some(&manifest(port, &ca.ca_pem)));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["secret", "put", "api", "--host", "api.test"], Some(b"sk-live-TOPSECRET-1234\n"), 0);
    s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", "t"], None, 0);
    let exec = |args: &[&str]| {
        let mut v = vec!["vm", "exec", "--user", "agent", "t", "--"];
        v.extend_from_slice(args);
        stdout(&s.cli_ok("owner", &v, None, 0))
    };

    // curl verifies our CA from the system bundle; POST with a body.
    let out = exec(&["curl", "-sS", "--fail", &up.url("/echo/curl")]);
    assert!(out.contains("\"path\": \"/echo/curl\""), "{out}");
    let out =
        exec(&["curl", "-sS", "--fail", "--noproxy", "*", "-X", "POST", "-d", "hello-body", &up.url("/echo/post")]);
    assert!(out.contains("hello-body"), "{out}");
    // HTTP/2 from the guest (the upstream speaks HTTP/1.1: the proxy
    // translates).
    let out =
        exec(&["curl", "-sS", "--fail", "--http2", "-o", "/dev/null", "-w", "%{http_version}", &up.url("/echo/h2")]);
    assert_eq!(out, "2", "the guest spoke HTTP/2 to the proxy");
    // The leaf the guest saw was signed by the capvisor egress CA.
    let out = exec(&[
        "sh",
        "-c",
        &format!(
            "openssl s_client -connect api.test:{port} -servername api.test </dev/null 2>/dev/null | grep -m1 'i:'"
        ),
    ]);
    assert!(out.contains("capvisor egress CA"), "issuer: {out}");

    // Python (ssl default context) and Node.js (NODE_EXTRA_CA_CERTS).
    let py = format!(
        "import urllib.request\nprint(urllib.request.urlopen('{}', timeout=30).status)",
        up.url("/echo/python")
    );
    assert_eq!(exec(&["python3", "-c", &py]), "200\n");
    let js = format!(
        "require('https').get('{}', r => {{ console.log(r.statusCode); r.resume(); }}).on('error', e => {{ console.log(String(e)); process.exit(1); }})",
        up.url("/echo/node")
    );
    assert_eq!(exec(&["node", "-e", &js]), "200\n");

    // git clone and push over https.
    let out = exec(&[
        "sh",
        "-c",
        &format!(
            "cd ~ && git clone -q {url} r && cat r/README && cd r && git -c user.name=a -c user.email=a@t commit -q \
             --allow-empty -m from-the-guest && git push -q origin main && echo pushed",
            url = up.url("/git/r.git")
        ),
    ]);
    assert_eq!(out, "hello from the upstream\npushed\n");
    assert_eq!(git(&repo, &["log", "-1", "--format=%s", "main"], None), "from-the-guest");

    // A secret goes to its host only; the guest holds only the placeholder.
    let hdr = "Authorization: Bearer $TOKEN";
    for host in ["api.test", "other.test"] {
        let o = s.cli_ok(
            "owner",
            &[
                "vm",
                "exec",
                "t",
                "--secret",
                "TOKEN=api",
                "--",
                "sh",
                "-c",
                &format!("curl -sS --fail -o /dev/null -H \"{hdr}\" https://{host}:{port}/echo/secret-{host}"),
            ],
            None,
            0,
        );
        assert!(!stdout(&o).contains("TOPSECRET"));
    }
    let rec = up.recorded();
    let auth = |p: &str| {
        rec.iter()
            .find(|r| r["path"] == p)
            .and_then(|r| r["headers"]["authorization"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    assert_eq!(auth("/echo/secret-api.test"), "Bearer sk-live-TOPSECRET-1234");
    assert_eq!(auth("/echo/secret-other.test"), "Bearer capvisor-secret:api");

    // A name no rule allows fails fast in the guest and is in the NetLog.
    let t0 = std::time::Instant::now();
    let o = s.cli("owner", &["vm", "exec", "t", "--", "curl", "-sS", "--max-time", "60", "https://denied.test/"], None);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("Could not resolve host"), "{}", stderr(&o));
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "refused at DNS, not timed out");

    let log = stdout(&s.cli_ok("owner", &["net", "log", "--vm", "t"], None, 0));
    for want in ["/echo/curl", "POST", "/git/r.git", "denied.test", "not for"] {
        assert!(log.contains(want), "net log lacks {want:?}:\n{log}");
    }
    assert!(!log.contains("TOPSECRET"), "the value is in the NetLog:\n{log}");
    // The guest's own name resolves locally (/etc/hosts), never asking DNS.
    for l in log.lines().filter(|l| l.contains("name refused")) {
        assert!(l.contains("denied.test"), "another name was refused: {l}");
    }
    let get = log.lines().find(|l| l.contains("GET /echo/curl")).expect("the GET");
    assert!(get.split_whitespace().any(|w| w == "200"), "status 200: {get}");
    // The proxy loaded the system's roots too (it starts under the
    // worker's Landlock domain, which must let it read the trust store).
    let mut plog = String::new();
    for e in std::fs::read_dir(s.state.join("sessions")).unwrap().flatten() {
        plog += &std::fs::read_to_string(e.path().join("proxy.log")).unwrap_or_default();
    }
    assert!(plog.contains("intercepting TLS"), "{plog}");
    assert!(!plog.contains("Permission denied"), "the proxy could not read the system roots: {plog}");
    // The value is nowhere in the state dir but the sealed store.
    let leaked =
        std::process::Command::new("grep").args(["-rl", "TOPSECRET", s.state.to_str().unwrap()]).output().unwrap();
    assert!(stdout(&leaked).is_empty(), "the value leaked into {}", stdout(&leaked));
    s.cli_ok("owner", &["vm", "rm", "t"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
