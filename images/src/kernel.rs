//! Where a guest image's kernel comes from: Debian's cloud kernel package,
//! or capvisor's minimal kernel built from Debian's `linux-source-6.1` by
//! `guest/kernel/build.sh` (DESIGN.md, "Guest"; guest/kernel/README.md).
//!
//! [`ensure_minimal`] runs the build script only when it has to: the
//! script's answer (the kernel's directory) is memoised in
//! `cache_dir/kernels/minimal.json`, keyed by the script's and the config
//! fragment's contents and the state of apt's lists and dpkg's status (the
//! source package version the script picks depends on them). A hit runs no
//! external command.

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Environment variable naming the minimal kernel's build script, overriding
/// [`default_build_script`].
pub const BUILD_SCRIPT_ENV: &str = "CAPVISOR_KERNEL_BUILD";
/// The config fragment, next to the build script.
pub const FRAGMENT_NAME: &str = "capvisor.config";

/// A kernel source, as named by a manifest's `[images.NAME] kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelSource {
    /// `"debian-cloud"`: Debian's `linux-image-cloud-amd64`, with the virtio
    /// modules guest-init loads.
    DebianCloud,
    /// `"minimal"`: built from `linux-source-6.1` with `guest/kernel/capvisor.config`;
    /// everything built in, no modules.
    Minimal,
}

impl KernelSource {
    /// Every source, in the order the manifest documents them.
    pub const ALL: [KernelSource; 2] = [KernelSource::DebianCloud, KernelSource::Minimal];

    /// The manifest name (`"debian-cloud"`, `"minimal"`).
    pub fn name(self) -> &'static str {
        match self {
            KernelSource::DebianCloud => "debian-cloud",
            KernelSource::Minimal => "minimal",
        }
    }
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KernelSource {
    type Err = anyhow::Error;

    /// Parses a manifest name. Errors: an unknown name (the message lists the known ones).
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s).with_context(|| {
            format!(
                "unknown kernel source {s:?} (known: {})",
                Self::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// A built minimal kernel (`$CACHE/kernels/minimal-<key>/`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinimalKernel {
    /// The directory holding `vmlinux`, `release` and `config`; its name
    /// (`minimal-<16 hex>`) identifies the build inputs.
    pub dir: PathBuf,
    /// The uncompressed ELF kernel (boots by its PVH note).
    pub vmlinux: PathBuf,
    /// `uname -r` in the guest.
    pub release: String,
}

impl MinimalKernel {
    /// Reads the kernel in `dir`, if its files are all there.
    pub fn open(dir: &Path) -> Option<MinimalKernel> {
        let vmlinux = dir.join("vmlinux");
        let release = std::fs::read_to_string(dir.join("release")).ok()?.trim().to_string();
        let ok = std::fs::metadata(&vmlinux).map(|m| m.is_file() && m.len() > 0).unwrap_or(false)
            && dir.join("config").is_file()
            && !release.is_empty();
        ok.then(|| MinimalKernel { dir: dir.to_path_buf(), vmlinux, release })
    }

    /// The directory's name (`minimal-<16 hex>`): what image cache keys use.
    pub fn id(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// The build script in this source tree: `<workspace>/guest/kernel/build.sh`
/// (found through this crate's `CARGO_MANIFEST_DIR` at compile time).
pub fn default_build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/kernel/build.sh")
}

/// The build script to use: `$CAPVISOR_KERNEL_BUILD` if set (and not
/// empty), else [`default_build_script`].
pub fn build_script() -> PathBuf {
    match std::env::var_os(BUILD_SCRIPT_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => default_build_script(),
    }
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Memo {
    inputs: String,
    kernel: MinimalKernel,
}

/// Builds (or finds) the minimal kernel in `cache_dir/kernels/`, with
/// [`build_script`].
///
/// - A memo hit (same script, fragment, apt lists and dpkg status as when
///   the memo was written, and the kernel directory still complete) runs nothing.
/// - Otherwise the script runs with `CAPVISOR_CACHE_DIR=cache_dir`; it
///   returns at once when the kernel is already built, else builds it (some
///   minutes: downloads `linux-source-6.1`, may `apt-get install` build
///   dependencies as root). Its progress lines go to `progress`.
///
/// Errors: the script is missing (the message names [`BUILD_SCRIPT_ENV`]),
/// cannot run, fails (the error carries the tail of its stderr), or names a
/// directory without a complete kernel.
pub fn ensure_minimal(cache_dir: &Path, progress: &mut dyn FnMut(&str)) -> anyhow::Result<MinimalKernel> {
    let script = build_script();
    ensure_minimal_with(cache_dir, &script, progress)
}

/// [`ensure_minimal`] with an explicit build script.
pub fn ensure_minimal_with(
    cache_dir: &Path,
    script: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<MinimalKernel> {
    let script_text = std::fs::read(script).with_context(|| {
        format!(
            "minimal kernel build script {} not found (set {BUILD_SCRIPT_ENV} to guest/kernel/build.sh of a capvisor checkout)",
            script.display()
        )
    })?;
    let fragment = script.parent().unwrap_or(Path::new(".")).join(FRAGMENT_NAME);
    let fragment_text = std::fs::read(&fragment)
        .with_context(|| format!("reading the kernel config fragment {}", fragment.display()))?;
    let inputs = memo_inputs(script, &script_text, &fragment_text);

    let kernels = cache_dir.join("kernels");
    let memo_path = kernels.join("minimal.json");
    if let Some(m) = std::fs::read(&memo_path).ok().and_then(|b| serde_json::from_slice::<Memo>(&b).ok()) {
        if m.inputs == inputs && MinimalKernel::open(&m.kernel.dir).as_ref() == Some(&m.kernel) {
            return Ok(m.kernel);
        }
    }

    let dir = run_script(cache_dir, script, progress)?;
    let kernel = MinimalKernel::open(&dir)
        .with_context(|| format!("{} printed {}, which holds no complete kernel", script.display(), dir.display()))?;
    std::fs::create_dir_all(&kernels)?;
    let tmp = memo_path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&Memo { inputs, kernel: kernel.clone() })?)?;
    std::fs::rename(&tmp, &memo_path)?;
    Ok(kernel)
}

/// What the script's answer depends on: its path and contents, the
/// fragment, and the state of apt's lists and dpkg's database (which decide
/// the linux-source version it builds).
fn memo_inputs(script: &Path, script_text: &[u8], fragment_text: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(script.to_string_lossy().as_bytes());
    h.update(b"\0");
    h.update(Sha256::digest(script_text));
    h.update(Sha256::digest(fragment_text));
    for p in ["/var/lib/dpkg/status", "/var/lib/apt/lists"] {
        h.update(file_state(Path::new(p)).as_bytes());
    }
    if let Ok(rd) = std::fs::read_dir("/var/lib/apt/lists") {
        let mut rows: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
            .map(|e| format!("{} {}", e.file_name().to_string_lossy(), file_state(&e.path())))
            .collect();
        rows.sort();
        h.update(rows.join("\n").as_bytes());
    }
    hex::encode(h.finalize())
}

/// Size and mtime of `p` (empty when missing).
fn file_state(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| format!("{} {}.{}", m.len(), m.mtime(), m.mtime_nsec())).unwrap_or_default()
}

/// Runs the build script, forwarding its stdout lines (but the last) to
/// `progress`, and returns the directory it printed last.
fn run_script(cache_dir: &Path, script: &Path, progress: &mut dyn FnMut(&str)) -> anyhow::Result<PathBuf> {
    let mut child = Command::new("bash")
        .arg(script)
        .env("CAPVISOR_CACHE_DIR", cache_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running bash {}", script.display()))?;
    // Drain stderr on its own thread (apt and make can be chatty); keep its tail.
    let stderr = child.stderr.take().expect("piped stderr");
    let err_tail = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tail.len() == 30 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        Vec::from(tail).join("\n")
    });
    let mut last: Option<String> = None;
    for line in std::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.context("reading the kernel build script's output")?;
        if let Some(prev) = last.replace(line) {
            progress(&prev);
        }
    }
    let status = child.wait()?;
    let err = err_tail.join().unwrap_or_default();
    if !status.success() {
        if let Some(prev) = last {
            progress(&prev);
        }
        bail!("{} failed ({status}):\n{err}", script.display());
    }
    let dir = last.map(|l| l.trim().to_string()).unwrap_or_default();
    ensure!(!dir.is_empty(), "{} printed no directory", script.display());
    Ok(PathBuf::from(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_rejected() {
        for k in KernelSource::ALL {
            assert_eq!(k.name().parse::<KernelSource>().unwrap(), k);
        }
        let e = "bogus".parse::<KernelSource>().unwrap_err().to_string();
        assert!(e.contains("\"bogus\"") && e.contains("debian-cloud, minimal"), "{e}");
    }

    #[test]
    fn kernel_names_match_the_manifest() {
        let names: Vec<&str> = KernelSource::ALL.iter().map(|k| k.name()).collect();
        let known: Vec<&str> = capvisor_manifest::KNOWN_KERNELS.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, known);
    }

    /// A stand-in build script: records each run, "builds" into
    /// `$CAPVISOR_CACHE_DIR/kernels/minimal-fake/` and prints the directory last.
    fn fake_script(dir: &Path, body: &str) -> PathBuf {
        let script = dir.join("build.sh");
        std::fs::write(&script, body).unwrap();
        std::fs::write(dir.join(FRAGMENT_NAME), "CONFIG_64BIT=y\n").unwrap();
        script
    }

    const FAKE: &str = r#"set -eu
echo run >>"$CAPVISOR_CACHE_DIR/runs"
d="$CAPVISOR_CACHE_DIR/kernels/minimal-fake"
mkdir -p "$d"
echo "kernel: building"
printf 'ELF' >"$d/vmlinux"; echo 6.1.0-test >"$d/release"; echo CONFIG_64BIT=y >"$d/config"
echo "$d"
"#;

    #[test]
    fn runs_the_script_once_then_uses_the_memo() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let script = fake_script(src.path(), FAKE);
        let mut lines = Vec::new();
        let k = ensure_minimal_with(cache.path(), &script, &mut |l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines, ["kernel: building"]);
        assert_eq!(k.release, "6.1.0-test");
        assert_eq!(k.id(), "minimal-fake");
        assert_eq!(k.vmlinux, cache.path().join("kernels/minimal-fake/vmlinux"));

        let mut again = Vec::new();
        assert_eq!(ensure_minimal_with(cache.path(), &script, &mut |l| again.push(l.to_string())).unwrap(), k);
        assert!(again.is_empty());
        let runs = || std::fs::read_to_string(cache.path().join("runs")).unwrap().lines().count();
        assert_eq!(runs(), 1, "a memo hit runs nothing");

        // A changed fragment asks the script again.
        std::fs::write(src.path().join(FRAGMENT_NAME), "CONFIG_SMP=y\n").unwrap();
        ensure_minimal_with(cache.path(), &script, &mut |_| {}).unwrap();
        assert_eq!(runs(), 2);
        // So does a kernel directory that went away.
        std::fs::remove_dir_all(&k.dir).unwrap();
        ensure_minimal_with(cache.path(), &script, &mut |_| {}).unwrap();
        assert_eq!(runs(), 3);
    }

    #[test]
    fn script_failure_carries_its_stderr() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let script = fake_script(
            src.path(),
            "echo 'kernel: configuring'\necho 'kernel: error: 1 option did not take effect' >&2\nexit 1\n",
        );
        let mut lines = Vec::new();
        let e = format!(
            "{:#}",
            ensure_minimal_with(cache.path(), &script, &mut |l| lines.push(l.to_string())).unwrap_err()
        );
        assert!(e.contains("did not take effect"), "{e}");
        assert_eq!(lines, ["kernel: configuring"]);

        let missing = src.path().join("nope.sh");
        let e = format!("{:#}", ensure_minimal_with(cache.path(), &missing, &mut |_| {}).unwrap_err());
        assert!(e.contains(BUILD_SCRIPT_ENV), "{e}");
    }

    #[test]
    fn default_script_is_in_this_checkout() {
        let s = default_build_script();
        assert!(s.is_file(), "{}", s.display());
        assert!(s.with_file_name(FRAGMENT_NAME).is_file());
    }
}
