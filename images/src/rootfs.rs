//! Debian root file system images (`[images.NAME] packages`, issue 8): a
//! read-only ext4 file (`rootfs.ext4`, label `capvisor-root`) that every VM
//! of the image attaches as its first virtio-blk disk; guest-init (PID 1 from
//! the base initramfs) mounts it under an overlay with a per-VM writable layer.
//!
//! Built by `mmdebstrap(1)` (variant `minbase` plus the listed packages, no
//! Recommends; `--mode=root` as root, `--mode=unshare` otherwise) into a
//! directory, with customize hooks that add the unprivileged user `agent`
//! (uid/gid 1000, `/home/agent`, `/bin/bash`), write an `/etc/hostname`
//! placeholder and drop apt's caches and lists; documentation, man pages and
//! translations are never unpacked (dpkg `path-exclude`). `mkfs.ext4 -d`
//! (e2fsprogs, `mke2fs(8)`) then turns the directory into the image, which
//! `resize2fs -M` shrinks to its content (it is mounted read-only, so it needs
//! no free space).
//!
//! Cached as `cache_dir/images/debian-<16 hex>/rootfs.ext4`; the key
//! ([`cache_key`]) is a SHA-256 over [`ROOTFS_BUILDER_VERSION`], the
//! distribution, the sorted package list, the mirror and the exact versions
//! apt on the host would install for those packages from scratch
//! ([`resolve_versions`]). A new point release or security update changes a
//! version and so the key; a hit runs only that resolution.

use anyhow::{bail, ensure, Context};
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Bumped whenever the root image's layout or build recipe changes.
pub const ROOTFS_BUILDER_VERSION: &str = "capvisor-debian-rootfs-v1";
/// The Debian mirror the image is built from.
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// The Debian security mirror (its `<dist>-security` suite).
pub const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// The root image's file name inside its cache directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// The ext4 volume label of the root image (`mkfs.ext4 -L`).
pub const ROOTFS_LABEL: &str = "capvisor-root";
/// The unprivileged user the image carries: name, uid = gid, home.
pub const AGENT_USER: (&str, u32, &str) = ("agent", 1000, "/home/agent");

/// What to build: a Debian distribution (codename) plus packages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsSpec {
    /// Debian codename, e.g. `"bookworm"` (Debian 12).
    pub distribution: String,
    /// Binary package names installed on top of `minbase`.
    pub packages: Vec<String>,
}

impl RootfsSpec {
    /// The package list sorted and without duplicates (the key and
    /// mmdebstrap's `--include` use this).
    pub fn sorted_packages(&self) -> Vec<String> {
        let mut p = self.packages.clone();
        p.sort();
        p.dedup();
        p
    }

    /// The `deb` source lines mmdebstrap gets: main, updates and security
    /// suites of [`DEBIAN_MIRROR`] / [`SECURITY_MIRROR`].
    pub fn sources(&self) -> Vec<String> {
        let d = &self.distribution;
        vec![
            format!("deb {DEBIAN_MIRROR} {d} main"),
            format!("deb {DEBIAN_MIRROR} {d}-updates main"),
            format!("deb {SECURITY_MIRROR} {d}-security main"),
        ]
    }
}

/// The cache key (hex SHA-256) of a root image: builder version,
/// distribution, sorted packages, sources and resolved `(package, version)`
/// pairs (sorted here, so their order does not matter).
pub fn cache_key(spec: &RootfsSpec, resolved: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    let mut line = |s: &str| {
        h.update(s.as_bytes());
        h.update(b"\n");
    };
    line(ROOTFS_BUILDER_VERSION);
    line(&spec.distribution);
    for p in spec.sorted_packages() {
        line(&format!("pkg {p}"));
    }
    for s in spec.sources() {
        line(&s);
    }
    let mut r = resolved.to_vec();
    r.sort();
    for (p, v) in r {
        line(&format!("inst {p} {v}"));
    }
    hex::encode(h.finalize())
}

/// Parses `apt-get --simulate` output: `Inst pkg (version ...)` lines into
/// `(pkg, version)` pairs (an upgrade line `Inst pkg [old] (new ...)` gives
/// the new version). Other lines are ignored.
pub fn parse_simulate(out: &str) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for l in out.lines() {
        let Some(rest) = l.strip_prefix("Inst ") else { continue };
        let Some((pkg, tail)) = rest.split_once(' ') else { continue };
        let Some(open) = tail.find('(') else { continue };
        let ver = tail[open + 1..].split_whitespace().next().unwrap_or("");
        if !ver.is_empty() {
            v.push((pkg.to_string(), ver.to_string()));
        }
    }
    v
}

/// The versions apt on the host would install for `spec`'s packages on an
/// empty system (`apt-get install --simulate --no-install-recommends` with
/// an empty dpkg status file, so packages installed on the host count too),
/// from the host's apt lists. The host must run the same distribution
/// (`VERSION_CODENAME` in `/etc/os-release`), since its lists are what is
/// resolved against.
///
/// Errors: another distribution on the host, apt fails (e.g. an unknown
/// package: apt's message is included), or nothing would be installed (empty
/// lists: run `apt-get update`).
pub fn resolve_versions(spec: &RootfsSpec) -> anyhow::Result<Vec<(String, String)>> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let host = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_default();
    ensure!(
        host == spec.distribution,
        "resolving the {} image's package versions needs a {} host with apt lists (this host is {:?})",
        spec.distribution,
        spec.distribution,
        host
    );
    let tmp = tempfile::tempdir()?;
    let status = tmp.path().join("status");
    std::fs::write(&status, b"")?;
    let out = Command::new("apt-get")
        .arg("-o")
        .arg(format!("Dir::State::status={}", status.display()))
        .args(["-q", "--simulate", "--no-install-recommends", "install"])
        .args(spec.sorted_packages())
        .env("LC_ALL", "C")
        .output()
        .context("running apt-get --simulate")?;
    ensure!(
        out.status.success(),
        "apt-get cannot resolve the packages: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let resolved = parse_simulate(&String::from_utf8_lossy(&out.stdout));
    ensure!(!resolved.is_empty(), "apt-get would install nothing: are apt's lists empty? (run `apt-get update`)");
    Ok(resolved)
}

/// Where apt keeps its package lists (their names, sizes and mtimes
/// fingerprint the host's view of the archive).
pub const APT_LISTS: &str = "/var/lib/apt/lists";

/// [`resolve_versions`], memoised in `cache_dir/hashes/apt-<16 hex>.txt` by
/// the spec and the names, sizes and mtimes of the files in
/// [`APT_LISTS`]: an `apt-get update` that changes anything resolves anew,
/// otherwise a cache hit costs a directory listing instead of seconds of
/// apt's solver.
///
/// Errors: [`resolve_versions`]'s; an unreadable memo is ignored.
pub fn resolve_versions_memo(cache_dir: &Path, spec: &RootfsSpec) -> anyhow::Result<Vec<(String, String)>> {
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    h.update(cache_key(spec, &[]).as_bytes());
    let mut files: Vec<_> = std::fs::read_dir(APT_LISTS).map(|rd| rd.flatten().collect()).unwrap_or_default();
    files.sort_by_key(|e| e.file_name());
    for e in files {
        if let Ok(m) = e.metadata() {
            h.update(format!("{:?} {} {}.{}\n", e.file_name(), m.len(), m.mtime(), m.mtime_nsec()).as_bytes());
        }
    }
    let memo = cache_dir.join("hashes").join(format!("apt-{}.txt", &hex::encode(h.finalize())[..16]));
    if let Ok(text) = std::fs::read_to_string(&memo) {
        let r: Vec<(String, String)> =
            text.lines().filter_map(|l| l.split_once(' ').map(|(p, v)| (p.to_string(), v.to_string()))).collect();
        if !r.is_empty() {
            return Ok(r);
        }
    }
    let r = resolve_versions(spec)?;
    let text: String = r.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
    if std::fs::create_dir_all(memo.parent().expect("has a parent")).is_ok() {
        let tmp = memo.with_extension(format!("tmp.{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &memo);
        }
    }
    Ok(r)
}

/// The cached root image of `spec` in `dir`, if complete.
fn complete(dir: &Path) -> Option<PathBuf> {
    let p = dir.join(ROOTFS_FILE);
    (dir.join("done").is_file() && p.is_file()).then_some(p)
}

/// Builds (or finds in the cache) the root image of `spec` and returns its
/// path (`cache_dir/images/debian-<16 hex>/rootfs.ext4`).
///
/// Blocking. A miss checks that [`DEBIAN_MIRROR`] answers, runs
/// mmdebstrap (minutes; its `I:` lines go to `progress`), then `mkfs.ext4 -d`
/// and `resize2fs -M`, all in a temporary directory beside the target that is
/// renamed into place at the end, so a crash never leaves a complete-looking
/// half image. Concurrent callers are safe (the loser of the rename uses the
/// winner's image).
///
/// Errors: [`resolve_versions`]'s; the mirror cannot be reached;
/// `mmdebstrap`, `mkfs.ext4` or `resize2fs` missing or failing (their last
/// output lines are included); I/O errors.
pub fn ensure_rootfs(cache_dir: &Path, spec: &RootfsSpec, progress: &mut dyn FnMut(&str)) -> anyhow::Result<PathBuf> {
    let t0 = Instant::now();
    progress(&format!(
        "debian image: resolving {} packages for {} ...",
        spec.sorted_packages().len(),
        spec.distribution
    ));
    let resolved = resolve_versions_memo(cache_dir, spec)?;
    let key = cache_key(spec, &resolved);
    let images = cache_dir.join("images");
    let dir = images.join(format!("debian-{}", &key[..16]));
    if let Some(p) = complete(&dir) {
        crate::touch(&dir);
        crate::prune(&images, &dir, "debian", crate::KEEP_ROOT_IMAGES);
        progress(&format!("debian image: cached at {} ({} packages)", p.display(), resolved.len()));
        return Ok(p);
    }
    check_mirror(&spec.distribution)?;
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let tmp = tempfile::Builder::new().prefix(".build-debian-").tempdir_in(&images)?;
    let root = tmp.path().join("root");
    progress(&format!(
        "debian image: building with mmdebstrap ({} packages to install; takes minutes the first time) ...",
        resolved.len()
    ));
    mmdebstrap(spec, &root, progress)?;
    let img = tmp.path().join(ROOTFS_FILE);
    progress("debian image: mkfs.ext4 -d ...");
    make_ext4(&root, &img)?;
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    std::fs::write(tmp.path().join("packages"), {
        let mut s = String::new();
        for (p, v) in &resolved {
            s.push_str(&format!("{p} {v}\n"));
        }
        s
    })?;
    std::fs::write(tmp.path().join("done"), b"")?;
    match std::fs::rename(tmp.path(), &dir) {
        Ok(()) => {
            let _ = tmp.keep();
        }
        Err(e) if complete(&dir).is_none() => {
            return Err(e).with_context(|| format!("renaming the new image to {}", dir.display()))
        }
        Err(_) => {}
    }
    let p = complete(&dir).with_context(|| format!("root image {} is incomplete after building", dir.display()))?;
    crate::touch(&dir);
    crate::prune(&images, &dir, "debian", crate::KEEP_ROOT_IMAGES);
    let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    progress(&format!(
        "debian image: ready: {} ({:.0} MiB, took {:.0} s)",
        p.display(),
        size as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    ));
    Ok(p)
}

/// Fails with a clear message when [`DEBIAN_MIRROR`] does not serve
/// `dists/<distribution>/InRelease`
/// (`curl`, 20 s). Without `curl` on the host the check is skipped and
/// mmdebstrap reports the failure.
fn check_mirror(distribution: &str) -> anyhow::Result<()> {
    let out = match Command::new("curl")
        .args(["-fsS", "--max-time", "20", "-o", "/dev/null"])
        .arg(format!("{DEBIAN_MIRROR}/dists/{distribution}/InRelease"))
        .output()
    {
        Ok(o) => o,
        Err(_) => return Ok(()),
    };
    if !out.status.success() {
        bail!(
            "cannot reach the Debian mirror {DEBIAN_MIRROR}: {} (the debian image needs it once; the base image does not)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs mmdebstrap into `root`, forwarding its progress lines.
fn mmdebstrap(spec: &RootfsSpec, root: &Path, progress: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let (user, id, home) = AGENT_USER;
    let mode = if nix_is_root() { "--mode=root" } else { "--mode=unshare" };
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", mode, "--verbose"])
        .arg(format!("--include={}", spec.sorted_packages().join(",")))
        .args(["--aptopt=Acquire::Languages \"none\""])
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            "--dpkgopt=path-exclude=/usr/share/lintian/*",
        ])
        .arg(format!("--customize-hook=chroot \"$1\" groupadd -g {id} {user}"))
        .arg(format!("--customize-hook=chroot \"$1\" useradd -u {id} -g {id} -m -d {home} -s /bin/bash {user}"))
        .arg("--customize-hook=echo capvisor > \"$1/etc/hostname\"")
        .arg("--customize-hook=rm -rf \"$1\"/var/cache/apt/* \"$1\"/var/lib/apt/lists/* \"$1\"/var/log/apt/* \"$1\"/var/cache/debconf/*-old")
        .arg(&spec.distribution)
        .arg(root)
        .arg(spec.sources().join("\n"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C.UTF-8");
    let mut child = cmd.spawn().context("running mmdebstrap (install it: apt-get install mmdebstrap)")?;
    let stdout = child.stdout.take().expect("piped");
    // stdout is drained on a thread so neither pipe can fill and stall mmdebstrap.
    let out_thread = std::thread::spawn(move || {
        let mut tail = Vec::new();
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            tail.push(l);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        tail
    });
    let mut tail: Vec<String> = Vec::new();
    let stderr = child.stderr.take().expect("piped");
    for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
        // `I:` lines are mmdebstrap's own steps; apt's and dpkg's chatter is kept for errors only.
        if let Some(step) = l.strip_prefix("I: ") {
            progress(&format!("debian image: {step}"));
        }
        tail.push(l);
        if tail.len() > 30 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    let mut out_tail = out_thread.join().unwrap_or_default();
    tail.append(&mut out_tail);
    if !status.success() {
        let text = tail.join("\n");
        if text.contains("Could not resolve") || text.contains("Failed to fetch") || text.contains("Temporary failure")
        {
            bail!(
                "cannot reach the Debian mirror {DEBIAN_MIRROR} (the debian image needs it once; the base image does not); mmdebstrap said:\n{text}"
            );
        }
        bail!("mmdebstrap failed ({status}); its last lines:\n{text}");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Bytes (block-rounded, 4 KiB) and inodes under `root`, hard links counted once.
fn usage(root: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Runs `cmd`, failing with its stderr.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what} (install e2fsprogs)"))?;
    ensure!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `mkfs.ext4 -d root` into `img` (no journal, no reserved blocks, label
/// [`ROOTFS_LABEL`]), then `resize2fs -M` and a truncate to the file
/// system's size, so the file holds the content plus ext4's own metadata.
fn make_ext4(root: &Path, img: &Path) -> anyhow::Result<()> {
    let (bytes, inodes) = usage(root)?;
    // Room for ext4's metadata (inode tables, bitmaps, directories' blocks);
    // resize2fs -M takes the excess back afterwards.
    let size = bytes + bytes / 4 + (64 << 20);
    let f = std::fs::File::create(img)?;
    f.set_len(size)?;
    drop(f);
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", ROOTFS_LABEL, "-m", "0", "-O", "^has_journal", "-b", "4096"])
            .arg("-N")
            .arg((inodes + inodes / 10 + 1024).to_string())
            .arg("-E")
            .arg("root_owner=0:0")
            .arg("-d")
            .arg(root)
            .arg(img),
        "mkfs.ext4",
    )?;
    run(Command::new("e2fsck").args(["-f", "-y"]).arg(img), "e2fsck")?;
    run(Command::new("resize2fs").args(["-M"]).arg(img), "resize2fs -M")?;
    let info = run(Command::new("dumpe2fs").arg("-h").arg(img), "dumpe2fs -h")?;
    let field = |name: &str| -> Option<u64> {
        info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok())
    };
    let (count, bsize) = (field("Block count:"), field("Block size:"));
    if let (Some(c), Some(b)) = (count, bsize) {
        std::fs::OpenOptions::new().write(true).open(img)?.set_len(c * b)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pkgs: &[&str]) -> RootfsSpec {
        RootfsSpec { distribution: "bookworm".into(), packages: pkgs.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn cache_key_follows_packages_and_versions() {
        let r = vec![("bash".to_string(), "5.2.15-2+b7".to_string()), ("git".into(), "1:2.39.5-0+deb12u2".into())];
        let a = cache_key(&spec(&["git", "bash"]), &r);
        // Same inputs, any order: same key.
        assert_eq!(a, cache_key(&spec(&["bash", "git", "bash"]), &r.iter().rev().cloned().collect::<Vec<_>>()));
        // Another package list or another resolved version: another key.
        assert_ne!(a, cache_key(&spec(&["git", "bash", "curl"]), &r));
        let mut r2 = r.clone();
        r2[1].1 = "1:2.39.5-0+deb12u3".into();
        assert_ne!(a, cache_key(&spec(&["git", "bash"]), &r2));
        let mut other = spec(&["git", "bash"]);
        other.distribution = "trixie".into();
        assert_ne!(a, cache_key(&other, &r));
    }

    #[test]
    fn parse_simulate_lines() {
        let out = "Reading package lists...\n\
                   Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []\n\
                   Inst git [1:2.39.2-1] (1:2.39.5-0+deb12u2 Debian-Security:12/oldstable-security [amd64])\n\
                   Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])\n";
        assert_eq!(
            parse_simulate(out),
            vec![("libc6".into(), "2.36-9+deb12u14".into()), ("git".into(), "1:2.39.5-0+deb12u2".into())]
        );
    }

    #[test]
    fn resolve_versions_on_this_host() {
        let s = spec(&["bash", "git"]);
        let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        if !os.contains("VERSION_CODENAME=bookworm") {
            let e = resolve_versions(&s).unwrap_err().to_string();
            assert!(e.contains("needs a bookworm host"), "{e}");
            return;
        }
        let r = resolve_versions(&s).unwrap();
        // Empty status: bash and git come with their dependencies, even if the host has them.
        assert!(r.iter().any(|(p, _)| p == "bash") && r.iter().any(|(p, _)| p == "git"), "{r:?}");
        assert!(r.iter().any(|(p, _)| p == "libc6"), "{r:?}");
        let e = resolve_versions(&spec(&["no-such-package-capvisor"])).unwrap_err().to_string();
        assert!(e.contains("no-such-package-capvisor"), "{e}");
        // The memo gives the same answer, from its file the second time.
        let cache = tempfile::tempdir().unwrap();
        assert_eq!(resolve_versions_memo(cache.path(), &s).unwrap(), r);
        let memos: Vec<_> = std::fs::read_dir(cache.path().join("hashes")).unwrap().flatten().collect();
        assert_eq!(memos.len(), 1);
        std::fs::write(memos[0].path(), "bash 9.9-memo\n").unwrap();
        assert_eq!(resolve_versions_memo(cache.path(), &s).unwrap(), vec![("bash".into(), "9.9-memo".into())]);
        // Another package list is another memo.
        let r2 = resolve_versions_memo(cache.path(), &spec(&["bash"])).unwrap();
        assert!(r2.iter().any(|(p, _)| p == "bash") && !r2.iter().any(|(p, _)| p == "git"), "{r2:?}");
    }
}
