//! Image figures of `capvisor-bench` (issue 8, README "Benchmarks"): the
//! `debian` workspace image beside the `base` fast path, in one run.
//!
//! - Cold create -> first exec result (`true`) per image, `--image-boots N`
//!   (default 5) of each, on the default engine (`auto`), base and debian
//!   alternating so drift in host load hits both series alike; median, min
//!   and max per image.
//! - Host disk used by a debian VM's writable layer right after its first
//!   exec result: `st_blocks * 512` of the VM's `writable.ext4` (stat(2)),
//!   beside its apparent size (`st_size`). The layer lives in the VM's run
//!   directory, `<state>/sessions/<session id>/<vm name>/` (the broker's
//!   per-session run dir, the worker's `WRITABLE_LAYER`); the bench's
//!   `serve` has a private state dir, so the VM name finds it.
//! - Image build time through the path `capvisor serve` (and
//!   `serve --prepare`) takes, `capvisor_supervisor::build_images` on the
//!   default manifest, against the warm cache; and with `--cold-image`, the
//!   debian root image built once into a fresh temporary cache dir
//!   (apt resolution, mmdebstrap, mkfs.ext4: minutes), removed afterwards.

use anyhow::{ensure, Context};
use capvisor_client::{connect, ops};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The images compared, in the order they alternate.
pub const IMAGES: [&str; 2] = ["base", "debian"];

/// How many warm-cache builds are timed (their median is printed).
const CACHED_BUILDS: usize = 5;

/// Host disk of one writable layer, bytes.
#[derive(Clone, Copy, Debug)]
pub struct LayerUse {
    /// `st_blocks * 512`: what the sparse file occupies on the host.
    pub allocated: u64,
    /// `st_size`: the layer's size as the guest sees it (the quota).
    pub apparent: u64,
}

/// What the boot part measured.
#[derive(Debug, Default)]
pub struct BootFigures {
    /// Per image of [`IMAGES`]: cold create -> first exec result, one per boot.
    pub cold: Vec<(String, Vec<Duration>)>,
    /// Engine that ran the VMs (`qemu`, `kvm`), as `Vm.info` reports it.
    pub engine: String,
    /// The debian writable layer of each debian boot, right after boot.
    pub layer: Vec<LayerUse>,
}

/// What the build part measured.
#[derive(Debug, Default)]
pub struct BuildFigures {
    /// `build_images(default manifest)` against the warm cache, one per run.
    pub cached: Vec<Duration>,
    /// The debian root image into a fresh cache: time and image size (bytes).
    pub cold: Option<(Duration, u64)>,
    /// The cached debian root image's size, bytes.
    pub rootfs_bytes: u64,
}

/// The writable layer of VM `vm` under the state dir `state` of a `serve`
/// whose sessions are ours alone: the first
/// `state/sessions/*/<vm>/writable.ext4`.
pub fn find_layer(state: &Path, vm: &str) -> anyhow::Result<PathBuf> {
    let sessions = state.join("sessions");
    for e in std::fs::read_dir(&sessions).with_context(|| format!("reading {}", sessions.display()))? {
        let p = e?.path().join(vm).join("writable.ext4");
        if p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!("no writable layer of VM {vm} under {}", sessions.display())
}

/// stat(2) of `path` as a [`LayerUse`].
pub fn layer_use(path: &Path) -> anyhow::Result<LayerUse> {
    let m = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(LayerUse { allocated: m.blocks() * 512, apparent: m.size() })
}

/// Boots `n` VMs of each of [`IMAGES`] through the `serve` at `socket`
/// (its state dir `state`), alternating, each timed from `Vm.create` to the
/// result of its first exec of `true`, then removed. A debian VM's layer is
/// stat-ed right after that result. Own login and logout. Must run inside
/// a `LocalSet`.
///
/// Errors: login, create, exec (or a non-zero exit), remove, or a layer
/// that cannot be found.
pub async fn boot_figures(socket: &Path, state: &Path, n: usize) -> anyhow::Result<BootFigures> {
    let login = connect::login_local(socket).await.context("login")?;
    let session = connect::attach(socket, &login.token).await.context("attach")?;
    let vms = ops::vms(&session);
    let mut figs = BootFigures { cold: IMAGES.iter().map(|i| (i.to_string(), vec![])).collect(), ..Default::default() };
    for round in 0..n {
        for (k, image) in IMAGES.iter().enumerate() {
            let name = format!("img-{image}-{round}");
            let spec = ops::VmSpec { name: name.clone(), image: image.to_string(), ..Default::default() };
            let t = Instant::now();
            let vm = ops::create_vm(&vms, &spec);
            let out =
                ops::exec_collect(&vm, &["true"], b"", 1 << 20).await.with_context(|| format!("exec in {name}"))?;
            let took = t.elapsed();
            ensure!(out.exit == ops::Exit::Code(0), "`true` in {name} ended with {:?}", out.exit);
            if image == &"debian" {
                figs.layer.push(layer_use(&find_layer(state, &name)?)?);
            }
            figs.cold[k].1.push(took);
            figs.engine = ops::engine_name(ops::vm_info(&vm).await.context("Vm.info")?.engine).to_string();
            ops::remove_vm(&vms, &name).await.with_context(|| format!("remove {name}"))?;
            eprintln!(
                "capvisor-bench: images #{}: {image}: cold create -> first exec result {:.0} ms",
                round + 1,
                crate::ms(took)
            );
        }
    }
    ops::logout(&session).await.context("logout")?;
    Ok(figs)
}

/// The default manifest's `debian` image as the images crate's spec.
fn debian_spec() -> anyhow::Result<capvisor_images::rootfs::RootfsSpec> {
    let m = capvisor_manifest::Manifest::default_manifest();
    let img = m.images.get("debian").context("the default manifest has no image `debian`")?;
    Ok(capvisor_images::rootfs::RootfsSpec {
        distribution: img.distribution().to_string(),
        packages: img.packages.clone(),
    })
}

/// Image build times: [`CACHED_BUILDS`] runs of serve's
/// `build_images(default manifest)` against the cache `cache` (warm: the
/// bench's serve has just built it), and with `cold`, one build of the
/// debian root image into a fresh temporary cache dir (deleted after).
///
/// Errors: those of `build_images` and `ensure_rootfs` (a cold build needs
/// deb.debian.org).
pub fn build_figures(cache: &Path, guest_init: &Path, cold: bool) -> anyhow::Result<BuildFigures> {
    let manifest = capvisor_manifest::Manifest::default_manifest();
    let mut figs = BuildFigures::default();
    for _ in 0..CACHED_BUILDS {
        let t = Instant::now();
        let built = capvisor_supervisor::build_images(&manifest, cache, guest_init).context("cached build")?;
        figs.cached.push(t.elapsed());
        let root = built.get("debian").and_then(|b| b.rootfs.clone()).context("no debian root image built")?;
        figs.rootfs_bytes = std::fs::metadata(&root)?.len();
    }
    if cold {
        let spec = debian_spec()?;
        let fresh = tempfile::Builder::new().prefix("capvisor-bench-cold-cache.").tempdir().context("tempdir")?;
        eprintln!("capvisor-bench: building the debian image cold into {} (minutes) ...", fresh.path().display());
        let t = Instant::now();
        let root = capvisor_images::rootfs::ensure_rootfs(fresh.path(), &spec, &mut |line| {
            eprintln!("capvisor-bench: cold: {line}")
        })
        .context("cold build of the debian image")?;
        let took = t.elapsed();
        figs.cold = Some((took, std::fs::metadata(&root)?.len()));
        fresh.close().context("removing the cold cache dir")?;
    }
    Ok(figs)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Prints the image figures in the bench's table format.
pub fn print(boots: &mut BootFigures, builds: &mut BuildFigures) {
    let mut medians = vec![];
    for (image, v) in boots.cold.iter_mut().filter(|(_, v)| !v.is_empty()) {
        let med = crate::pct(v, 50);
        medians.push(med);
        println!(
            "{:<58} {:>9.0} ms",
            format!("image {image}: cold create -> first exec result (median of {})", v.len()),
            crate::ms(med)
        );
        println!(
            "{:<58} {:>12}",
            format!("image {image}: min / max of {} (engine {})", v.len(), boots.engine),
            format!("{:.0} / {:.0} ms", crate::ms(v[0]), crate::ms(v[v.len() - 1]))
        );
    }
    if let [base, debian] = medians[..] {
        println!("{:<58} {:>10.2}x", "ratio debian / base (medians)", debian.as_secs_f64() / base.as_secs_f64());
    }
    if !boots.layer.is_empty() {
        boots.layer.sort_by_key(|l| l.allocated);
        let (lo, hi) = (boots.layer[0], boots.layer[boots.layer.len() - 1]);
        let med = boots.layer[boots.layer.len() / 2];
        println!(
            "{:<58} {:>8.1} MiB",
            format!("debian writable layer on host after boot (median of {})", boots.layer.len()),
            mib(med.allocated)
        );
        println!(
            "{:<58} {:>12}",
            "debian writable layer on host, min / max",
            format!("{:.1} / {:.1} MiB", mib(lo.allocated), mib(hi.allocated))
        );
        println!("{:<58} {:>8.0} MiB", "debian writable layer apparent size (sparse)", mib(med.apparent));
    }
    if !builds.cached.is_empty() {
        println!(
            "{:<58} {:>9.1} ms",
            format!("image build, cached: serve's build_images (median of {})", builds.cached.len()),
            crate::ms(crate::pct(&mut builds.cached, 50))
        );
        println!("{:<58} {:>8.0} MiB", "debian root image (read-only ext4, shared)", mib(builds.rootfs_bytes));
    }
    match builds.cold {
        Some((took, bytes)) => println!(
            "{:<58} {:>9.0} s",
            format!("debian image build, cold (fresh cache; {:.0} MiB)", mib(bytes)),
            took.as_secs_f64()
        ),
        None => println!("debian image build, cold: not measured (--cold-image builds it once, minutes)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn layer_use_counts_allocated_blocks_of_a_sparse_file_apart_from_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("writable.ext4");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![0xa5; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let u = layer_use(&p).unwrap();
        assert_eq!(u.apparent, 64 << 20);
        assert!(u.allocated >= 1 << 20, "allocated {} < the 1 MiB written", u.allocated);
        assert!(u.allocated < 8 << 20, "allocated {}: the hole was counted", u.allocated);
        assert!(layer_use(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn find_layer_finds_the_named_vm_in_any_session_and_nothing_else() {
        let state = tempfile::tempdir().unwrap();
        let vm_dir = state.path().join("sessions/s-other/img-base-0");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let vm_dir = state.path().join("sessions/s-ours/img-debian-0");
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::write(vm_dir.join("writable.ext4"), b"x").unwrap();
        assert_eq!(find_layer(state.path(), "img-debian-0").unwrap(), vm_dir.join("writable.ext4"));
        // A VM without a layer (base) and an unknown VM are errors, not guesses.
        assert!(find_layer(state.path(), "img-base-0").is_err());
        assert!(find_layer(state.path(), "img-debian-1").is_err());
    }
}
