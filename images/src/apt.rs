//! Finding, downloading and unpacking the Debian packages a base image is
//! made of, through the ordinary apt tools (`apt-cache`, `apt-get
//! download`, `dpkg -x`; none needs root).
//!
//! Resolution (which version, which `.deb`, its SHA-256) only reads the
//! local apt lists, and its answer is memoised in `cache_dir/apt-resolution.json`
//! keyed by the state (names, sizes, mtimes) of `/var/lib/apt/lists`, so a
//! repeated build does not even run `apt-cache` until `apt-get update`
//! changes the lists. Downloads go to `cache_dir/debs/` under the name
//! `apt-get download` gives them and are skipped when that file is present
//! with the size apt expects.

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding apt's package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// One binary package version as apt knows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DebInfo {
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Debian version, possibly with an epoch (`1:1.35.0-4`).
    pub version: String,
    /// Architecture, e.g. `amd64`.
    pub arch: String,
    /// Size of the `.deb`, bytes.
    pub size: u64,
    /// SHA-256 of the `.deb` (hex), from the archive's Packages index.
    pub sha256: String,
}

impl DebInfo {
    /// The file name `apt-get download` writes (`:` in the version becomes `%3a`).
    pub fn file_name(&self) -> String {
        format!("{}_{}_{}.deb", self.package, self.version.replace(':', "%3a"), self.arch)
    }
}

/// What the two packages of a base image resolve to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resolution {
    /// The real kernel package behind the metapackage.
    pub kernel: DebInfo,
    /// `busybox-static`.
    pub busybox: DebInfo,
}

#[derive(Serialize, Deserialize)]
struct Memo {
    lists: String,
    meta: String,
    busybox: String,
    resolution: Resolution,
}

/// Resolves `kernel_meta` (a metapackage such as `linux-image-cloud-amd64`)
/// to the kernel package it depends on, and `busybox` to its candidate,
/// using the memo in `cache_dir` when apt's lists did not change.
///
/// Errors: apt has no package lists (the message says to run `apt-get
/// update`), a package is unknown, the metapackage has no `linux-image-*`
/// dependency, `apt-cache` is missing.
pub fn resolve(cache_dir: &Path, kernel_meta: &str, busybox: &str) -> anyhow::Result<Resolution> {
    let lists = lists_state()?;
    let memo_path = cache_dir.join("apt-resolution.json");
    if let Ok(text) = std::fs::read_to_string(&memo_path) {
        if let Ok(m) = serde_json::from_str::<Memo>(&text) {
            if m.lists == lists && m.meta == kernel_meta && m.busybox == busybox {
                return Ok(m.resolution);
            }
        }
    }
    let cand = candidates(&[kernel_meta, busybox])?;
    let stanzas = show(&[&format!("{kernel_meta}={}", cand[0]), &format!("{busybox}={}", cand[1])])?;
    let meta = stanzas
        .iter()
        .find(|s| field(s, "Package") == Some(kernel_meta))
        .context("apt-cache show lost the kernel metapackage")?;
    let depends = field(meta, "Depends").unwrap_or_default();
    let (kpkg, kver) = depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .map(str::trim)
        .find(|d| d.starts_with("linux-image-"))
        .map(|d| {
            let name = d.split_whitespace().next().unwrap_or(d).to_string();
            // "(= 6.1.192-2)" pins the version when present.
            let ver = d.split_once("(=").map(|(_, v)| v.trim().trim_end_matches(')').trim().to_string());
            (name, ver)
        })
        .with_context(|| format!("{kernel_meta} {} has no linux-image-* dependency (Depends: {depends})", cand[0]))?;
    let kver = match kver {
        Some(v) => v,
        None => candidates(&[&kpkg])?.remove(0),
    };
    let kstanza = show(&[&format!("{kpkg}={kver}")])?;
    let bstanza =
        stanzas.iter().find(|s| field(s, "Package") == Some(busybox)).context("apt-cache show lost busybox")?;
    let resolution = Resolution { kernel: info(&kstanza[0])?, busybox: info(bstanza)? };
    let memo = Memo { lists, meta: kernel_meta.into(), busybox: busybox.into(), resolution: resolution.clone() };
    let tmp = memo_path.with_extension(format!("json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&memo)?)?;
    std::fs::rename(&tmp, &memo_path)?;
    Ok(resolution)
}

/// Makes sure `info`'s `.deb` is in `debs_dir` and returns its path.
/// Present with the expected size: nothing is run. Otherwise `apt-get
/// download` fetches it into a private temporary directory, its size and
/// SHA-256 are checked against apt's index, and it is renamed into place
/// (so concurrent builders never see a half-written file).
///
/// Errors: the download fails (network, unknown version), or the file does
/// not match apt's size / SHA-256.
pub fn fetch(info: &DebInfo, debs_dir: &Path, progress: &mut dyn FnMut(&str)) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(debs_dir).with_context(|| format!("creating {}", debs_dir.display()))?;
    let dest = debs_dir.join(info.file_name());
    if std::fs::metadata(&dest).map(|m| m.len() == info.size).unwrap_or(false) {
        return Ok(dest);
    }
    progress(&format!("downloading {} {} ({:.1} MiB) ...", info.package, info.version, info.size as f64 / 1048576.0));
    let tmp = tempfile::Builder::new().prefix(".download-").tempdir_in(debs_dir)?;
    // apt-get drops to the `_apt` user for downloading when run as root;
    // a private 0700 temp dir would make it warn, so open it up.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755));
    let out = Command::new("apt-get")
        .args(["download", "-q", &format!("{}={}", info.package, info.version)])
        .current_dir(tmp.path())
        .output()
        .context("running apt-get (is apt installed?)")?;
    ensure!(
        out.status.success(),
        "apt-get download {}={} failed: {}",
        info.package,
        info.version,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let got = tmp.path().join(info.file_name());
    ensure!(got.exists(), "apt-get download did not produce {}", info.file_name());
    let bytes = std::fs::read(&got)?;
    ensure!(bytes.len() as u64 == info.size, "{}: {} bytes, apt expects {}", info.file_name(), bytes.len(), info.size);
    let sum = hex::encode(Sha256::digest(&bytes));
    ensure!(sum == info.sha256, "{}: SHA-256 {sum} does not match apt's {}", info.file_name(), info.sha256);
    std::fs::rename(&got, &dest)?;
    Ok(dest)
}

/// Unpacks `deb` into `dest` with `dpkg -x`.
pub fn unpack(deb: &Path, dest: &Path) -> anyhow::Result<()> {
    let out =
        Command::new("dpkg").arg("-x").arg(deb).arg(dest).output().context("running dpkg (is dpkg installed?)")?;
    ensure!(out.status.success(), "dpkg -x {} failed: {}", deb.display(), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// A fingerprint of apt's lists: file names, sizes and mtimes.
///
/// Errors: no list files at all (`apt-get update` was never run).
fn lists_state() -> anyhow::Result<String> {
    let mut rows = Vec::new();
    if let Ok(rd) = std::fs::read_dir(APT_LISTS) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with("_Packages") && !name.contains("_Packages.") && !name.ends_with("Release") {
                continue;
            }
            if let Ok(m) = e.metadata() {
                use std::os::unix::fs::MetadataExt;
                rows.push(format!("{name} {} {}.{}", m.len(), m.mtime(), m.mtime_nsec()));
            }
        }
    }
    ensure!(
        rows.iter().any(|r| r.contains("_Packages")),
        "apt has no package lists in {APT_LISTS}: run `apt-get update` first (the guest kernel and busybox come from Debian packages)"
    );
    rows.sort();
    Ok(hex::encode(Sha256::digest(rows.join("\n").as_bytes())))
}

/// Candidate versions of `pkgs` (`apt-cache policy`), in order.
fn candidates(pkgs: &[&str]) -> anyhow::Result<Vec<String>> {
    let text = apt_cache("policy", pkgs)?;
    let mut out = Vec::new();
    for p in pkgs {
        let section = text
            .split_once(&format!("{p}:\n"))
            .map(|(_, rest)| rest)
            .with_context(|| format!("apt does not know package {p}: run `apt-get update` first"))?;
        let cand = section.lines().find_map(|l| l.trim().strip_prefix("Candidate:")).map(str::trim).unwrap_or("(none)");
        if cand == "(none)" {
            bail!("apt has no installable version of {p}: run `apt-get update` first");
        }
        out.push(cand.to_string());
    }
    Ok(out)
}

/// `apt-cache show` stanzas for `specs` (`pkg=version`).
fn show(specs: &[&str]) -> anyhow::Result<Vec<String>> {
    let text = apt_cache("show", specs)?;
    let stanzas: Vec<String> = text.split("\n\n").map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    ensure!(!stanzas.is_empty(), "apt-cache show {} printed nothing: run `apt-get update` first", specs.join(" "));
    Ok(stanzas)
}

fn apt_cache(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .arg(cmd)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .context("running apt-cache (is apt installed?)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "apt-cache {cmd} {} failed: {} (if apt's lists are empty, run `apt-get update`)",
        args.join(" "),
        stderr.trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of `name` in a deb822 stanza (first line only).
fn field<'a>(stanza: &'a str, name: &str) -> Option<&'a str> {
    stanza.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')).map(str::trim))
}

fn info(stanza: &str) -> anyhow::Result<DebInfo> {
    let get = |n: &str| field(stanza, n).map(String::from).with_context(|| format!("apt stanza lacks {n}:\n{stanza}"));
    Ok(DebInfo {
        package: get("Package")?,
        version: get("Version")?,
        arch: get("Architecture")?,
        size: get("Size")?.parse().context("apt Size field")?,
        sha256: get("SHA256")?.to_lowercase(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stanzas_and_file_names() {
        let s = "Package: busybox-static\nSource: busybox\nVersion: 1:1.35.0-4+deb12u1+b1\nArchitecture: amd64\nSize: 907324\nSHA256: ABCDEF\nDescription: x\n multi";
        let i = info(s).unwrap();
        assert_eq!(i.version, "1:1.35.0-4+deb12u1+b1");
        assert_eq!(i.sha256, "abcdef");
        assert_eq!(i.file_name(), "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb");
        assert_eq!(field(s, "Source"), Some("busybox"));
        assert_eq!(field(s, "Sourc"), None);
    }
}
