//! Secrets end to end (issue 9): `capvisor secret` and `vm exec --secret`
//! through a real `capvisor serve` and a real guest under QEMU. The value
//! goes in on stdin and must show up nowhere but sealed in the broker's
//! store: not in the guest, not in the CLI's output, not in the audit log
//! or any log, not in clear in any file of the state directory.

mod common;
use common::*;
use std::path::Path;

const VALUE: &[u8] = b"sk-e2e-4f1c9a77d3b2-VERY-SECRET";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` (recursively) holding `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            out.extend(files_holding(&p, needle));
        } else if ft.is_file() {
            // Sparse volume and disk images are skipped by size: none here holds text we wrote.
            if std::fs::metadata(&p).map(|m| m.len() < 64 << 20).unwrap_or(false) {
                if let Ok(b) = std::fs::read(&p) {
                    if contains(&b, needle) {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn secrets_reach_guests_only_as_placeholders_and_persist_sealed() {
    let mut s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    let caps = stdout(&s.cli_ok("owner", &["caps"], None, 0));
    assert!(caps.lines().any(|l| l.starts_with("secrets") && l.contains("Secrets")), "{caps}");
    let mut stdin = VALUE.to_vec();
    stdin.push(b'\n');
    let o = s.cli_ok(
        "owner",
        &["secret", "put", "api", "--host", "api.example.org", "--host", "*.svc.test"],
        Some(&stdin),
        0,
    );
    assert!(!contains(&o.stdout, VALUE) && !contains(&o.stderr, VALUE), "put echoed the value");
    // An empty value and bad input are refused before or at the broker.
    s.cli_ok("owner", &["secret", "put", "empty", "--host", "a.test"], Some(b"\n"), 2);
    s.cli_ok("owner", &["secret", "put", "bad", "--host", "http://a.test"], Some(b"v\n"), 15);
    s.cli_ok("owner", &["secret", "put", "bad/name", "--host", "a.test"], Some(b"v\n"), 15);

    let o = s.cli_ok("owner", &["secret", "list"], None, 0);
    let out = stdout(&o);
    let row = out.lines().find(|l| l.starts_with("api ")).unwrap_or_else(|| panic!("no api row: {out}"));
    assert!(row.contains("api.example.org,*.svc.test"), "{row}");
    assert_eq!(out.lines().count(), 2, "header and one secret: {out}");
    assert!(!contains(&o.stdout, VALUE) && !contains(&o.stderr, VALUE));

    // The guest gets the placeholder, never the value.
    s.cli_ok("owner", &["vm", "create", "--name", "a"], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "a", "--secret", "TOKEN=api", "--", "sh", "-c", "echo $TOKEN"], None, 0);
    assert_eq!(stdout(&o), "capvisor-secret:api\n");
    // Every process's environment in the guest (this exec's included).
    let o = s.cli_ok(
        "owner",
        &["vm", "exec", "a", "--secret", "TOKEN=api", "--", "sh", "-c", "cat /proc/*/environ | tr '\\0' '\\n'"],
        None,
        0,
    );
    assert!(stdout(&o).lines().any(|l| l == "TOKEN=capvisor-secret:api"), "{}", stdout(&o));
    assert!(!contains(&o.stdout, VALUE) && !contains(&o.stderr, VALUE), "the value reached the guest");
    // A missing secret is notFound (exit 11) and runs nothing; a bad variable name is invalid.
    let o = s.cli_ok("owner", &["vm", "exec", "a", "--secret", "X=missing", "--", "touch", "/ran"], None, 11);
    assert!(stderr(&o).contains("no secret named \"missing\""), "{}", stderr(&o));
    s.cli_ok("owner", &["vm", "exec", "a", "--", "test", "!", "-e", "/ran"], None, 0);
    s.cli_ok("owner", &["vm", "exec", "a", "--secret", "=api", "--", "true"], None, 2);
    s.cli_ok("owner", &["vm", "exec", "a", "--secret", "A=B=api", "--", "true"], None, 15);
    s.cli_ok("owner", &["vm", "rm", "a"], None, 0);

    // A user-profile principal holds no secrets cap and cannot use the owner's.
    s.cli_ok("owner", &["account", "add", "bob", "--profile", "user", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    s.cli_ok("bob", &["login", "--user", "bob", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    let caps = stdout(&s.cli_ok("bob", &["caps"], None, 0));
    assert!(!caps.contains("secrets"), "{caps}");
    let o = s.cli_ok("bob", &["secret", "list"], None, 11);
    assert!(stderr(&o).contains("no capability named \"secrets\""), "{}", stderr(&o));
    s.cli_ok("bob", &["secret", "put", "api", "--host", "*"], Some(b"bob-value\n"), 11);
    let o = s.cli_ok("bob", &["run", "--secret", "T=api", "--", "true"], None, 11);
    assert!(stderr(&o).contains("no secret named \"api\""), "{}", stderr(&o));
    s.cli_ok("bob", &["logout"], None, 0);

    // The value is nowhere in clear under the state dir (the store holds it
    // sealed), nor in serve's log.
    assert_eq!(files_holding(&s.state, VALUE), Vec::<std::path::PathBuf>::new());
    assert!(!contains(s.log().as_bytes(), VALUE), "serve.log holds the value");
    let store: Vec<_> = std::fs::read_dir(s.state.join("secrets")).unwrap().flatten().collect();
    assert_eq!(store.len(), 1, "one principal's file");
    assert!(std::fs::read_to_string(store[0].path()).unwrap().contains("\"api\""));
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap();
    assert!(audit.contains("secret.put") && audit.contains("api hosts=api.example.org,*.svc.test"));

    // Survives a restart of the whole service; rm empties the list.
    s.restart();
    s.cli_ok("owner", &["login"], None, 0);
    let o = s.cli_ok("owner", &["secret", "list"], None, 0);
    assert!(stdout(&o).lines().any(|l| l.starts_with("api ")), "{}", stdout(&o));
    let o = s.cli_ok("owner", &["run", "--secret", "T=api", "--", "sh", "-c", "echo $T"], None, 0);
    assert_eq!(stdout(&o), "capvisor-secret:api\n");
    s.cli_ok("owner", &["secret", "rm", "api"], None, 0);
    s.cli_ok("owner", &["secret", "rm", "api"], None, 11);
    let o = s.cli_ok("owner", &["secret", "list"], None, 0);
    assert_eq!(stdout(&o).lines().count(), 1, "only the header: {}", stdout(&o));
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap();
    assert!(audit.contains("secret.remove"));
    assert_eq!(files_holding(&s.state, VALUE), Vec::<std::path::PathBuf>::new());
    assert!(!contains(s.log().as_bytes(), VALUE));
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
