//! A loopback HTTPS upstream for the egress (TLS interception) tests: a test
//! CA ([`TestCa`]) and `tests/upstream/https_upstream.py` run as a child
//! ([`HttpsUpstream`]) serving `/echo` (recorded), `/big`, `/sse`, `/ws` and
//! git smart HTTP under `/git/` on 127.0.0.1 only.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The names the test leaf certificate is valid for (subject alternative
/// names: two DNS names and one IP address).
pub const LEAF_NAMES: [&str; 3] = ["api.test", "other.test", "127.0.0.1"];

/// A test certificate authority and one leaf it signed for [`LEAF_NAMES`],
/// written as PEM files: `ca.pem` (the CA certificate), `leaf.pem` (the leaf
/// certificate followed by the CA's, a full chain) and `leaf.key` (the leaf's
/// PKCS#8 ECDSA P-256 private key).
pub struct TestCa {
    /// `dir/ca.pem`: the CA certificate to trust.
    pub ca_pem: PathBuf,
    /// `dir/leaf.pem`: the server's certificate chain.
    pub leaf_pem: PathBuf,
    /// `dir/leaf.key`: the server's private key.
    pub leaf_key: PathBuf,
}

impl TestCa {
    /// Makes a fresh CA (basicConstraints CA, keyCertSign, a common name
    /// unique to this CA) and a leaf
    /// (serverAuth) with rcgen and writes the three PEM files into `dir`
    /// (created if missing). Panics on failure (test helper).
    pub fn new(dir: &Path) -> TestCa {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        // A distinct subject per CA, so that another test CA is another
        // issuer to verifiers rather than a same-named one with a bad key.
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        ca.distinguished_name
            .push(DnType::CommonName, format!("capvisor test upstream CA {}-{nonce}", std::process::id()));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).unwrap();

        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(LEAF_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "api.test");
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

        let t = TestCa { ca_pem: dir.join("ca.pem"), leaf_pem: dir.join("leaf.pem"), leaf_key: dir.join("leaf.key") };
        std::fs::write(&t.ca_pem, ca_cert.pem()).unwrap();
        std::fs::write(&t.leaf_pem, format!("{}{}", leaf_cert.pem(), ca_cert.pem())).unwrap();
        std::fs::write(&t.leaf_key, leaf_key.serialize_pem()).unwrap();
        t
    }
}

/// The upstream script, `cli/tests/upstream/https_upstream.py`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/upstream/https_upstream.py")
}

/// A running `https_upstream.py` on 127.0.0.1:`port`. Dropping it kills the
/// process and waits for it.
pub struct HttpsUpstream {
    /// The TCP port it listens on (127.0.0.1 only).
    pub port: u16,
    /// `dir/record.jsonl`: one JSON object per `/echo` request.
    pub record: PathBuf,
    /// `dir/git`: `GIT_PROJECT_ROOT`, where [`HttpsUpstream::bare_repo`] makes repositories.
    pub git_root: PathBuf,
    /// `dir/upstream.log`: the script's stderr (one line per request).
    pub log: PathBuf,
    child: Child,
}

impl HttpsUpstream {
    /// Runs the script with `ca`'s leaf certificate and waits (10 s at most)
    /// for its `PORT <n>` line. Panics if it does not come.
    pub fn start(dir: &Path, ca: &TestCa) -> HttpsUpstream {
        let record = dir.join("record.jsonl");
        let git_root = dir.join("git");
        let log = dir.join("upstream.log");
        std::fs::create_dir_all(&git_root).unwrap();
        let mut child = Command::new("/usr/bin/python3")
            .arg(script())
            .arg("--cert")
            .arg(&ca.leaf_pem)
            .arg("--key")
            .arg(&ca.leaf_key)
            .arg("--record")
            .arg(&record)
            .arg("--git-root")
            .arg(&git_root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("/usr/bin/python3 on the host");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no PORT line from the upstream in 10 s: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        let port = match line.trim().strip_prefix("PORT ").and_then(|p| p.parse().ok()) {
            Some(p) => p,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("bad first line {line:?}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        HttpsUpstream { port, record, git_root, log, child }
    }

    /// `https://api.test:PORT` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("https://api.test:{}{}", self.port, path)
    }

    /// `api.test:PORT:127.0.0.1`, for `curl --resolve` and git's `http.curloptResolve`.
    pub fn resolve(&self) -> String {
        format!("api.test:{}:127.0.0.1", self.port)
    }

    /// Every `/echo` request so far, oldest first: objects with `method`,
    /// `path` (with query), `headers` (lower-case names) and `body` (text).
    pub fn recorded(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// The script's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates `git_root/NAME.git`, a bare repository served at
    /// `/git/NAME.git`, with one commit on `main` holding `README` =
    /// "hello from the upstream\n", and `http.receivepack` enabled so
    /// pushes are accepted. Returns its path.
    pub fn bare_repo(&self, name: &str) -> PathBuf {
        let repo = self.git_root.join(format!("{name}.git"));
        git(&self.git_root, &["init", "-q", "--bare", "-b", "main", repo.to_str().unwrap()], None);
        let blob = git(&repo, &["hash-object", "-w", "--stdin"], Some(b"hello from the upstream\n"));
        let tree = git(&repo, &["mktree"], Some(format!("100644 blob {blob}\tREADME\n").as_bytes()));
        let commit = git(&repo, &["commit-tree", &tree, "-m", "initial"], None);
        git(&repo, &["update-ref", "refs/heads/main", &commit], None);
        git(&repo, &["config", "http.receivepack", "true"], None);
        repo
    }
}

/// Runs `git` in `dir` with a fixed identity and no user or system config,
/// feeding `stdin`; panics unless it succeeds; returns trimmed stdout.
pub fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    use std::io::Write;
    let mut c = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("git on the host");
    let mut input = c.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

impl Drop for HttpsUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
