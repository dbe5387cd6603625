//! End-to-end: boot a real Linux guest under QEMU (microvm, TCG) with this
//! guest-init as `/init`, talk to it over the virtio-serial agent port.
//!
//! Ignored by default (it needs QEMU, a kernel and a base initramfs, and
//! takes several seconds under TCG). Run with
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
//!     --target x86_64-unknown-linux-gnu -p capvisor-guest-init
//! CV_KERNEL=.../vmlinux CV_INITRAMFS=.../initramfs.cpio \
//! CV_GUEST_INIT=target/x86_64-unknown-linux-gnu/release/capvisor-guest-init \
//!     cargo test -p capvisor-guest-init --test vm_boot -- --ignored --nocapture
//! ```
//! `CV_INITRAMFS` is a base image (busybox, `/lib/modules/capvisor/*.ko`,
//! `order`); the test appends a second newc archive holding only `/init`
//! (the kernel unpacks both, the later entry wins).

use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::sink::CollectSink;
use capvisor_schema::common_capnp::exit_status;
use capvisor_schema::guest_capnp::guest;
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8], ino: u32) {
    let namez = format!("{name}\0");
    let hdr = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        namez.len(),
        0
    );
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(namez.as_bytes());
    while out.len() & 3 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

async fn run(g: &guest::Client, argv: &[&str], pty: bool) -> (i32, String) {
    let (o, orx) = CollectSink::client(1 << 20);
    let (e, erx) = CollectSink::client(1 << 20);
    let mut q = g.exec_request();
    {
        let mut p = q.get();
        p.set_stdout(o);
        p.set_stderr(e);
        let mut s = p.init_spec();
        let mut a = s.reborrow().init_argv(argv.len() as u32);
        for (i, x) in argv.iter().enumerate() {
            a.set(i as u32, *x);
        }
        if pty {
            let mut sz = s.init_pty().init_size();
            sz.set_rows(24);
            sz.set_cols(80);
        }
    }
    let r = q.send().promise.await.unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    let p = r.get().unwrap().get_process().unwrap();
    let code = match p.wait_request().send().promise.await {
        Ok(w) => match w.get().unwrap().get_status().unwrap().which().unwrap() {
            exit_status::Code(c) => c,
            exit_status::Signal(s) => 128 + s,
        },
        Err(_) => -1,
    };
    let mut out = orx.await.unwrap();
    out.extend(erx.await.unwrap());
    (code, String::from_utf8_lossy(&out).into_owned())
}

#[test]
#[ignore = "boots a VM under QEMU; needs CV_KERNEL, CV_INITRAMFS, CV_GUEST_INIT"]
fn boots_and_serves_guest() {
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("set {n}"));
    let (kernel, base, init) = (var("CV_KERNEL"), var("CV_INITRAMFS"), var("CV_GUEST_INIT"));
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    let mut img = std::fs::read(&base).unwrap();
    while img.len() & 3 != 0 {
        img.push(0);
    }
    let mut extra = Vec::new();
    newc_entry(&mut extra, "init", 0o100755, &std::fs::read(&init).unwrap(), 900_001);
    newc_entry(&mut extra, "TRAILER!!!", 0, b"", 0);
    img.extend(extra);
    std::fs::File::create(&initrd).unwrap().write_all(&img).unwrap();
    let console = dir.path().join("console.log");

    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.into_raw_fd();
    let tsc = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("cpu MHz")).map(|l| l.to_string()))
        .and_then(|l| l.split(':').nth(1).and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|m| format!(" tsc_early_khz={}", (m * 1000.0).round() as u64))
        .unwrap_or_default();
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,x-option-roms=off,rtc=off", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "256", "-smp", "2"])
        .args(["-kernel", &kernel, "-initrd", initrd.to_str().unwrap()])
        .args(["-append", &format!("console=ttyS0 reboot=t panic=-1 rdinit=/init{tsc}")])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(["-device", "virtio-serial-device", "-chardev", "socket,id=ag,fd=3"])
        .args(["-device", "virtserialport,chardev=ag,name=capvisor.agent"]);
    // SAFETY: dup2 is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut qemu = cmd.spawn().expect("qemu-system-x86_64");
    // SAFETY: `fd` came from `into_raw_fd` above and nothing else owns it;
    // the child has its own copy at descriptor 3.
    unsafe { libc::close(fd) };
    let _ = ours.as_raw_fd();
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conn::run_local(async {
            ours.set_nonblocking(true).unwrap();
            let s = tokio::net::UnixStream::from_std(ours).unwrap();
            let (g, _h): (guest::Client, _) = conn::connect(s, None, INTERNAL);
            let r = tokio::time::timeout(Duration::from_secs(90), g.hello_request().send().promise)
                .await
                .expect("hello within 90 s")
                .unwrap();
            let info = r.get().unwrap().get_info().unwrap();
            eprintln!(
                "hello after {:?}: kernel {} initReady {} ms uptime {} ms",
                t0.elapsed(),
                info.get_kernel_release().unwrap().to_str().unwrap(),
                info.get_init_ready_ms(),
                info.get_uptime_ms()
            );
            let (c, out) = run(&g, &["hostname"], false).await;
            assert_eq!((c, out.as_str()), (0, "capvisor\n"));
            let (c, out) = run(&g, &["tty"], true).await;
            assert_eq!(c, 0);
            assert!(out.starts_with("/dev/pts/"), "{out:?}");
            let (c, out) = run(&g, &["sh", "-c", "mount | cut -d' ' -f3 | sort | tr '\\n' ' '"], false).await;
            assert_eq!(c, 0);
            for m in ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/tmp", "/run"] {
                assert!(out.split(' ').any(|x| x == m), "{m} not mounted: {out}");
            }
            // Orphans are reaped: a double-forked sleep, then no zombies.
            let (c, _) = run(&g, &["sh", "-c", "(sleep 0.2 &) ; exit 0"], false).await;
            assert_eq!(c, 0);
            tokio::time::sleep(Duration::from_millis(800)).await;
            let (_, out) = run(&g, &["sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true"], false).await;
            assert_eq!(out, "", "zombies left");
            let (c, out) = run(&g, &["ping", "-c", "1", "-W", "1", "127.0.0.1"], false).await;
            assert_eq!(c, 0, "loopback: {out}");
            let mut q = g.shutdown_request();
            q.get().set_reboot(false);
            let _ = tokio::time::timeout(Duration::from_secs(5), q.send().promise).await;
        })
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = qemu.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!("--- console ---\n{}", log.lines().filter(|l| l.contains("guest-init")).collect::<Vec<_>>().join("\n"));
    if let Err(p) = result {
        eprintln!("full console:\n{log}");
        std::panic::resume_unwind(p);
    }
    assert!(status.is_some(), "the guest did not power off after shutdown");
}
