//! A VM booted from a root image: the worker in-process (real `Session`,
//! `VmFactory`, `Vm`) with the real vmm launcher and QEMU, and an image
//! whose `rootfs` is a small ext4 image this test makes (busybox-static,
//! an `agent` user). The manifest has no way to name a prebuilt rootfs, so
//! the `BuiltImage` is handed to the worker's `SessionContext` directly.
//!
//! Needs `cargo build --workspace` first (capvisor-vmm beside the test
//! binary), qemu-system-x86_64, busybox-static and e2fsprogs. Prints boot
//! time to the first exec result (root image vs base) and the host disk
//! used by the writable layer right after boot.

mod common;

use capvisor_client::ops;
use capvisor_manifest::BuiltImage;
use capvisor_rpc::schema::internal_capnp::session_host;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The minimal-kernel base image with this tree's guest-init.
fn base_image() -> BuiltImage {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-q", "-p", "capvisor-guest-init", "--bin", "capvisor-guest-init"])
        .current_dir(workspace())
        .status()
        .unwrap();
    assert!(st.success());
    let init = workspace().join("target/debug/capvisor-guest-init");
    // The user's cache (kernels are built once there; the e2e harness uses it too).
    let cache = capvisor_rpc::paths::cache_dir();
    capvisor_images::ensure_image(&cache, capvisor_images::KernelSource::Minimal, &init, &mut |l| {
        eprintln!("image: {l}")
    })
    .unwrap()
}

/// An ext4 root image: busybox-static and its applet links, /etc/passwd
/// with root and agent (uid 1000), /etc/group, /root, /home/agent.
fn make_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("tree");
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home/agent", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nagent:x:1000:\nusers:x:100:agent\n").unwrap();
    let img = dir.join("root.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // /home/agent belongs to agent.
    let out =
        Command::new("debugfs").args(["-w", "-R", "set_inode_field /home/agent uid 1000"]).arg(&img).output().unwrap();
    assert!(out.status.success());
    let _ = Command::new("debugfs").args(["-w", "-R", "set_inode_field /home/agent gid 1000"]).arg(&img).output();
    img
}

async fn sh(vm: &capvisor_rpc::schema::capvisor_capnp::vm::Client, script: &str) -> (i32, String, String) {
    let out = ops::exec_collect(vm, &["sh", "-c", script], b"", 1 << 16).await.unwrap();
    let code = match out.exit {
        ops::Exit::Code(c) => c,
        other => panic!("{other:?}"),
    };
    (code, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn exec_req(
    vm: &capvisor_rpc::schema::capvisor_capnp::vm::Client,
    req: &ops::ExecRequest,
) -> Result<ops::Output, capvisor_client::ClientError> {
    let (out, out_rx) = capvisor_rpc::sink::CollectSink::client(1 << 16);
    let (err, err_rx) = capvisor_rpc::sink::CollectSink::client(1 << 16);
    let p = ops::exec(vm, req, out, err);
    let exit = ops::wait(&p).await?;
    Ok(ops::Output { stdout: out_rx.await.unwrap(), stderr: err_rx.await.unwrap(), exit })
}

#[test]
fn a_vm_boots_into_its_root_image_with_a_bounded_writable_layer() {
    // capvisor-vmm is in target/debug, one level above this test binary.
    let exe = std::env::current_exe().unwrap();
    std::env::set_var("CAPVISOR_BIN_DIR", exe.parent().unwrap().parent().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let base = base_image();
    let rootfs = make_rootfs(dir.path());
    let rooted = BuiltImage { rootfs: Some(rootfs), writable_mib: 24, ..base.clone() };
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let bundle = common::owner_bundle(|b| b.images.push("rooted".into()));
    let images = [("base".to_string(), base), ("rooted".to_string(), rooted)].into();
    let ctx = common::context("rootfs", bundle, images, run_dir.clone());
    common::run_within(Duration::from_secs(300), async move {
        let host: session_host::Client = capnp_rpc::new_client(common::FakeHost(common::Shared::default()));
        let st =
            capvisor_worker::state::SessionState::new(ctx, host, Box::new(capvisor_worker::launch::ProcessVmLauncher));
        let s = common::attach(&st).await;
        let f = ops::vms(&s);

        // Base VM: boots as before, hostname unchanged.
        let t = Instant::now();
        let plain = ops::create_vm(&f, &ops::VmSpec { name: "plain".into(), ..Default::default() });
        let (c, out, _) = sh(&plain, "hostname").await;
        let base_ms = t.elapsed().as_millis();
        assert_eq!((c, out.trim()), (0, "capvisor"));

        // Root image VM.
        let t = Instant::now();
        let vm =
            ops::create_vm(&f, &ops::VmSpec { name: "rooted-1".into(), image: "rooted".into(), ..Default::default() });
        let (c, out, err) = sh(&vm, "hostname; echo persisted > /root/note; cat /proc/mounts").await;
        let root_ms = t.elapsed().as_millis();
        assert_eq!(c, 0, "{err}");
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("rooted-1"), "hostname is the VM name");
        assert!(out.lines().any(|l| l.starts_with("overlay / overlay")), "root is the overlay: {out}");
        let layer = run_dir.join("rooted-1").join(capvisor_worker::vms::WRITABLE_LAYER);
        let du = Command::new("du").args(["-k"]).arg(&layer).output().unwrap();
        println!(
            "figures: first exec result after create: base {base_ms} ms, root image {root_ms} ms; writable layer \
                 ({} MiB apparent) uses {} KiB on the host after boot",
            24,
            String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap_or("?")
        );
        // The busybox root is what execs see (the initramfs has no /etc/group).
        let (_, out, _) = sh(&vm, "cat /root/note; cat /etc/group | head -1").await;
        assert_eq!(out, "persisted\nroot:x:0:\n", "a file in /root survives to a second exec");

        // As the unprivileged user: uid, groups, HOME and cwd from the guest's passwd/group.
        let req = ops::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "id -u; id -G; echo $HOME $USER; pwd; touch /root/x".into()],
            user: "agent".into(),
            ..Default::default()
        };
        let out = exec_req(&vm, &req).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1000\n1000 100\n/home/agent agent\n/home/agent\n");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "agent cannot write /root");
        let req = ops::ExecRequest { argv: vec!["id".into()], user: "mallory".into(), ..Default::default() };
        match exec_req(&vm, &req).await {
            Err(capvisor_client::ClientError::Domain(e)) => {
                assert_eq!(e.code, capvisor_rpc::schema::common_capnp::ErrorCode::InvalidArgument);
                assert!(e.message.contains("no user mallory in the guest"), "{}", e.message);
            }
            other => panic!("expected invalidArgument, got {other:?}"),
        }

        // ENOSPC at the writable layer's size, inside the guest only.
        let (c, _, err) = sh(&vm, "dd if=/dev/zero of=/big bs=1M count=64").await;
        assert_ne!(c, 0);
        assert!(err.contains("No space left on device"), "{err}");
        let apparent = std::fs::metadata(&layer).unwrap().len();
        assert_eq!(apparent, 24 << 20, "the layer never grows past its size");
        let (c, _, _) = sh(&vm, "rm /big && echo ok").await;
        assert_eq!(c, 0);

        // Removal deletes the writable layer.
        ops::remove_vm(&f, "rooted-1").await.unwrap();
        assert!(!layer.exists(), "{} kept after remove", layer.display());
        ops::remove_vm(&f, "plain").await.unwrap();
    });
}
