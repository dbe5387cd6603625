//! Integration tests of `capvisor_kvm::sandbox` (harness = false).
//!
//! Confinement is irreversible and Landlock (ABI < 8) only covers the
//! calling thread, so every test re-executes this binary as a child with
//! `CAPVISOR_SANDBOX_SCENARIO=<name>`: the child is single-threaded at
//! `main`, confines itself, exercises the scenario and reports through its
//! exit status (a seccomp kill shows up as SIGSYS) and stdout lines. The
//! parent never confines itself.
//!
//! `cargo test -p capvisor-kvm --test sandbox [FILTER...]`.
//! When a child unexpectedly dies of SIGSYS, the parent re-runs it with
//! `CAPVISOR_SECCOMP=trap` and prints which syscalls the filter refused.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capvisor_kvm::boot::x86_64::setup_long_mode;
use capvisor_kvm::bus::Buses;
use capvisor_kvm::devices::serial::io::register_com1;
use capvisor_kvm::devices::serial::SerialDevice;
use capvisor_kvm::devices::IrqLine;
use capvisor_kvm::hypervisor::kvm::{kvm_available, KvmHypervisor, KvmVcpu, KvmVm};
use capvisor_kvm::hypervisor::{Hypervisor, Vcpu, Vm, VmConfig};
use capvisor_kvm::memory::create_guest_memory;
use capvisor_kvm::sandbox::{self, LandlockStatus, SandboxPolicy, SeccompMode, ThreadKind};
use capvisor_kvm::vcpu::{self, VcpuRunner, VcpuStop};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SCENARIO_ENV: &str = "CAPVISOR_SANDBOX_SCENARIO";
const DIR_ENV: &str = "CAPVISOR_SANDBOX_DIR";

// ---------------------------------------------------------------- harness

type ParentTest = fn() -> Result<Outcome, String>;

enum Outcome {
    Ok,
    Skipped(String),
}

const TESTS: &[(&str, ParentTest)] = &[
    ("sandbox_landlock_limits_files_to_the_policy", t_landlock),
    ("sandbox_seccomp_kill_denies_inet_socket_allows_io", t_seccomp_kill),
    ("sandbox_seccomp_log_mode_returns_eperm", t_seccomp_log),
    ("sandbox_seccomp_trap_mode_reports_and_returns_eperm", t_seccomp_trap),
    ("sandbox_execve_is_denied", t_execve),
    ("sandbox_spawning_a_process_is_denied", t_spawn),
    ("sandbox_tokio_runtime_and_inherited_socket_work_confined", t_tokio),
    ("sandbox_kvm_tiny_guest_runs_confined", t_kvm),
    ("sandbox_kvm_setup_ioctls_are_denied_after_confine", t_kvm_setup_denied),
    ("sandbox_confine_refuses_when_threads_run", t_threads),
    ("sandbox_doc_lists_every_allowed_syscall", t_doc),
];

fn main() {
    if let Ok(s) = std::env::var(SCENARIO_ENV) {
        let code = match run_scenario(&s) {
            Ok(()) => 0,
            Err(e) => {
                println!("scenario error: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return;
    }
    let selected: Vec<_> =
        TESTS.iter().filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str()))).collect();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, f) in selected {
        match f() {
            Ok(Outcome::Ok) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Ok(Outcome::Skipped(why)) => {
                skipped += 1;
                println!("test {name} ... ok (skipped: {why})");
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED\n{e}");
            }
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {skipped} skipped\n",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(101);
    }
}

struct Child {
    out: Output,
}

impl Child {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn signal(&self) -> Option<i32> {
        self.out.status.signal()
    }
    fn describe(&self) -> String {
        format!("status {:?}\n--- stdout\n{}--- stderr\n{}", self.out.status, self.stdout(), self.stderr())
    }
    fn expect_success(&self) -> Result<(), String> {
        if self.out.status.success() {
            Ok(())
        } else {
            Err(format!("child failed: {}", self.describe()))
        }
    }
}

fn spawn_child(scenario: &str, dir: &Path, mode: &str) -> Child {
    let out = Command::new(std::env::current_exe().unwrap())
        .env(SCENARIO_ENV, scenario)
        .env(DIR_ENV, dir)
        .env(sandbox::SECCOMP_MODE_ENV, mode)
        .output()
        .expect("spawn child");
    Child { out }
}

/// Run `scenario` (it confines itself) with `CAPVISOR_SECCOMP=mode`.
fn run_child(scenario: &str, dir: &Path, mode: &str) -> Child {
    spawn_child(scenario, dir, mode)
}

/// The failure report for `c`; on an unexpected SIGSYS, re-run the scenario
/// in trap mode and append the syscalls the filter refused.
fn diagnose(scenario: &str, dir: &Path, c: &Child) -> String {
    let mut msg = format!("child failed: {}", c.describe());
    if c.signal() == Some(libc::SIGSYS) {
        let t = spawn_child(scenario, dir, "trap");
        let denied: Vec<&str> = t
            .out
            .stderr
            .split(|b| *b == b'\n')
            .filter_map(|l| std::str::from_utf8(l).ok())
            .filter(|l| l.contains("denied syscall"))
            .collect();
        msg.push_str(&format!(
            "\n--- re-run with CAPVISOR_SECCOMP=trap: {} denial(s)\n{}",
            denied.len(),
            denied.join("\n")
        ));
    }
    msg
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("capvisor-sandbox-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn check(cond: bool, what: impl Into<String>) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

// ---------------------------------------------------------------- parent side

fn t_landlock() -> Result<Outcome, String> {
    let d = tempdir("landlock");
    fs::create_dir_all(d.join("ro")).unwrap();
    fs::create_dir_all(d.join("rw")).unwrap();
    fs::write(d.join("ro/kernel"), b"kernel bytes").unwrap();
    fs::write(d.join("outside"), b"not granted").unwrap();
    let c = run_child("landlock", &d, "kill");
    let _ = fs::remove_dir_all(&d);
    c.expect_success()?;
    let out = c.stdout();
    print!("{}", out.lines().filter(|l| l.starts_with("landlock")).map(|l| format!("    {l}\n")).collect::<String>());
    if out.contains("landlock not supported") {
        return Ok(Outcome::Skipped("Landlock not supported by this kernel (status NotEnforced checked)".into()));
    }
    check(out.contains("checks passed"), format!("no pass marker: {}", c.describe()))?;
    Ok(Outcome::Ok)
}

fn seccomp_socket(mode: &str) -> Result<Child, String> {
    let d = tempdir(&format!("seccomp-{mode}"));
    let c = run_child("seccomp_socket", &d, mode);
    let _ = fs::remove_dir_all(&d);
    check(c.stdout().contains("io ok"), format!("file/eventfd I/O did not work under the filter: {}", c.describe()))?;
    Ok(c)
}

fn t_seccomp_kill() -> Result<Outcome, String> {
    let c = seccomp_socket("kill")?;
    check(c.signal() == Some(libc::SIGSYS), format!("socket(AF_INET) did not kill with SIGSYS: {}", c.describe()))?;
    check(!c.stdout().contains("socket returned"), "child went on after socket()")?;
    Ok(Outcome::Ok)
}

fn t_seccomp_log() -> Result<Outcome, String> {
    let c = seccomp_socket("log")?;
    c.expect_success()?;
    check(c.stdout().contains("socket AF_INET: EPERM") && c.stdout().contains("socket AF_INET6: EPERM"), c.describe())?;
    Ok(Outcome::Ok)
}

fn t_seccomp_trap() -> Result<Outcome, String> {
    let c = seccomp_socket("trap")?;
    c.expect_success()?;
    check(c.stdout().contains("socket AF_INET: EPERM"), c.describe())?;
    check(
        c.stderr().contains(&format!("denied syscall {} (socket) args 0x2 0x1 0x0", libc::SYS_socket)),
        format!("no trap report on stderr: {}", c.describe()),
    )?;
    Ok(Outcome::Ok)
}

fn t_execve() -> Result<Outcome, String> {
    let d = tempdir("execve");
    let c = run_child("execve", &d, "kill");
    check(c.signal() == Some(libc::SIGSYS), format!("execve did not kill with SIGSYS: {}", c.describe()))?;
    check(c.stdout().contains("confined"), c.describe())?;
    let c = run_child("execve", &d, "log");
    let _ = fs::remove_dir_all(&d);
    c.expect_success()?;
    check(c.stdout().contains("execve: EPERM"), c.describe())?;
    Ok(Outcome::Ok)
}

fn t_spawn() -> Result<Outcome, String> {
    let d = tempdir("spawn");
    let c = run_child("spawn", &d, "kill");
    let _ = fs::remove_dir_all(&d);
    // std::process::Command: clone3 -> ENOSYS, then clone(CLONE_VM|CLONE_VFORK) -> killed
    check(c.signal() == Some(libc::SIGSYS), format!("Command::spawn did not kill with SIGSYS: {}", c.describe()))?;
    Ok(Outcome::Ok)
}

fn t_tokio() -> Result<Outcome, String> {
    let d = tempdir("tokio");
    let c = run_child("tokio", &d, "kill");
    let r = if c.out.status.success() && c.stdout().contains("tokio ok") {
        Ok(Outcome::Ok)
    } else {
        Err(diagnose("tokio", &d, &c))
    };
    let _ = fs::remove_dir_all(&d);
    r
}

fn t_kvm() -> Result<Outcome, String> {
    if !kvm_available() {
        return Ok(Outcome::Skipped("/dev/kvm is absent".into()));
    }
    let d = tempdir("kvm");
    let c = run_child("kvm", &d, "kill");
    let r = if c.out.status.success() && c.stdout().contains("kvm ok") {
        Ok(Outcome::Ok)
    } else {
        Err(diagnose("kvm", &d, &c))
    };
    let _ = fs::remove_dir_all(&d);
    print!("{}", c.stdout().lines().filter(|l| l.starts_with("  ")).map(|l| format!("  {l}\n")).collect::<String>());
    r
}

fn t_kvm_setup_denied() -> Result<Outcome, String> {
    if !kvm_available() {
        return Ok(Outcome::Skipped("/dev/kvm is absent".into()));
    }
    let d = tempdir("kvm-setup");
    let c = run_child("kvm_setup", &d, "kill");
    let _ = fs::remove_dir_all(&d);
    check(c.stdout().contains("confined"), c.describe())?;
    check(c.signal() == Some(libc::SIGSYS), format!("KVM_CREATE_VM after confine did not kill: {}", c.describe()))?;
    Ok(Outcome::Ok)
}

fn t_threads() -> Result<Outcome, String> {
    let d = tempdir("threads");
    let c = run_child("threads", &d, "kill");
    let _ = fs::remove_dir_all(&d);
    c.expect_success()?;
    check(c.stdout().contains("threads ok"), c.describe())?;
    Ok(Outcome::Ok)
}

fn t_doc() -> Result<Outcome, String> {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/vmm-confinement.md");
    let doc = fs::read_to_string(&doc_path).map_err(|e| format!("{}: {e}", doc_path.display()))?;
    let mut missing = Vec::new();
    for kind in [ThreadKind::Main, ThreadKind::Vcpu] {
        for e in sandbox::allowlist(kind) {
            if !doc.contains(&format!("`{}`", e.name)) {
                missing.push(e.name);
            }
        }
    }
    check(missing.is_empty(), format!("docs/vmm-confinement.md does not mention: {missing:?}"))?;
    Ok(Outcome::Ok)
}

// ---------------------------------------------------------------- child side

fn run_scenario(name: &str) -> Result<(), String> {
    let dir = PathBuf::from(std::env::var(DIR_ENV).map_err(|_| "no dir")?);
    match name {
        "landlock" => c_landlock(&dir),
        "seccomp_socket" => c_seccomp_socket(&dir),
        "execve" => c_execve(&dir),
        "spawn" => c_spawn(&dir),
        "tokio" => c_tokio(&dir),
        "kvm" => c_kvm(&dir),
        "kvm_setup" => c_kvm_setup(&dir),
        "threads" => c_threads(&dir),
        other => Err(format!("unknown scenario {other}")),
    }
}

fn say(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn policy(dir: &Path) -> Result<SandboxPolicy, String> {
    Ok(SandboxPolicy {
        read_only: vec![],
        read_write: vec![dir.to_path_buf()],
        seccomp_mode: SeccompMode::from_env().map_err(|e| e.to_string())?,
    })
}

fn confine(p: &SandboxPolicy) -> Result<(), String> {
    let r = sandbox::confine(p).map_err(|e| e.to_string())?;
    say(&format!("confined: {r}"));
    Ok(())
}

fn c_landlock(dir: &Path) -> Result<(), String> {
    let ro = dir.join("ro");
    let rw = dir.join("rw");
    // opened before enforcement: stays usable afterwards
    let mut early = File::open("/etc/passwd").map_err(|e| e.to_string())?;
    let abi = sandbox::landlock_abi();
    let status = sandbox::apply_landlock(&SandboxPolicy {
        read_only: vec![ro.clone()],
        read_write: vec![rw.clone()],
        seccomp_mode: SeccompMode::Kill,
    })
    .map_err(|e| e.to_string())?;
    say(&format!("landlock: kernel ABI {abi}, status {status}"));
    if abi == 0 {
        check(matches!(status, LandlockStatus::NotEnforced { .. }), format!("ABI 0 but status {status:?}"))?;
        say("landlock not supported by this kernel: status NotEnforced");
        return Ok(());
    }
    check(status.is_enforced(), format!("ABI {abi} but {status:?}"))?;
    let mut s = String::new();
    File::open(ro.join("kernel")).and_then(|mut f| f.read_to_string(&mut s)).map_err(|e| format!("read in ro: {e}"))?;
    check(s == "kernel bytes", "ro content")?;
    check(fs::read_dir(&ro).is_ok(), "list ro")?;
    let eacces = Some(libc::EACCES);
    check(errno_of(OpenOptions::new().write(true).open(ro.join("kernel"))) == eacces, "write in ro not EACCES")?;
    check(errno_of(File::create(ro.join("new"))) == eacces, "create in ro not EACCES")?;
    check(errno_of(fs::remove_file(ro.join("kernel"))) == eacces, "unlink in ro not EACCES")?;
    fs::write(rw.join("console.log"), b"hello").map_err(|e| format!("write in rw: {e}"))?;
    check(fs::read(rw.join("console.log")).map_err(|e| e.to_string())? == b"hello", "rw content")?;
    fs::create_dir(rw.join("sub")).map_err(|e| format!("mkdir in rw: {e}"))?;
    fs::remove_file(rw.join("console.log")).map_err(|e| format!("unlink in rw: {e}"))?;
    check(errno_of(File::open("/etc/passwd")) == eacces, "read /etc/passwd not EACCES")?;
    check(errno_of(File::open(dir.join("outside"))) == eacces, "read next to the policy dirs not EACCES")?;
    check(errno_of(fs::read_dir("/")) == eacces, "list / not EACCES")?;
    let mut buf = [0u8; 4];
    early.read_exact(&mut buf).map_err(|e| format!("fd opened before landlock: {e}"))?;
    // TCP: no port rule, so connect is refused by Landlock (ABI >= 4) rather than by the network
    if abi >= 4 {
        let r = std::net::TcpStream::connect_timeout(&"127.0.0.1:9".parse().unwrap(), Duration::from_secs(2));
        check(errno_of(r) == eacces, "TCP connect not EACCES under landlock")?;
    }
    say("landlock checks passed");
    Ok(())
}

fn c_seccomp_socket(dir: &Path) -> Result<(), String> {
    confine(&policy(dir)?)?;
    // plain file I/O (opened after confinement, in the read-write dir)
    fs::write(dir.join("f"), b"data").map_err(|e| format!("write: {e}"))?;
    check(fs::read(dir.join("f")).map_err(|e| format!("read: {e}"))? == b"data", "file content")?;
    // eventfd
    // SAFETY: plain eventfd creation; the fd is owned below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    check(efd >= 0, "eventfd failed")?;
    // SAFETY: efd is a fresh descriptor we own.
    let mut ef = unsafe { File::from_raw_fd(efd) };
    ef.write_all(&5u64.to_ne_bytes()).map_err(|e| e.to_string())?;
    let mut v = [0u8; 8];
    ef.read_exact(&mut v).map_err(|e| e.to_string())?;
    check(u64::from_ne_bytes(v) == 5, "eventfd value")?;
    say("io ok");
    for (name, dom) in [("AF_INET", libc::AF_INET), ("AF_INET6", libc::AF_INET6)] {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(dom, libc::SOCK_STREAM, 0) };
        let err = std::io::Error::last_os_error().raw_os_error();
        say(&format!("socket returned {fd}"));
        check(fd < 0 && err == Some(libc::EPERM), format!("socket {name} not denied: fd {fd} errno {err:?}"))?;
        say(&format!("socket {name}: EPERM"));
    }
    Ok(())
}

fn c_execve(dir: &Path) -> Result<(), String> {
    confine(&policy(dir)?)?;
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: valid NUL-terminated path and NULL-terminated argv/envp arrays.
    let r = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let err = std::io::Error::last_os_error().raw_os_error();
    check(r < 0 && err == Some(libc::EPERM), format!("execve: {r} errno {err:?}"))?;
    say("execve: EPERM");
    Ok(())
}

fn c_spawn(dir: &Path) -> Result<(), String> {
    confine(&policy(dir)?)?;
    let r = Command::new("/bin/true").status();
    Err(format!("spawn returned {r:?}"))
}

fn c_tokio(dir: &Path) -> Result<(), String> {
    // Like capvisor-vmm: an inherited stream socket (here: one end of a pair
    // made before confinement), a current_thread runtime built before
    // confinement (it starts no thread), then everything else confined.
    let (mine, peer) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    confine(&policy(dir)?)?;
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        mine.set_nonblocking(true).map_err(|e| format!("set_nonblocking: {e}"))?;
        let mut a = tokio::net::UnixStream::from_std(mine).map_err(|e| format!("from_std: {e}"))?;
        // the peer side runs on a blocking-pool thread (a thread spawned after confinement)
        let echo = tokio::task::spawn_blocking(move || {
            let mut p = peer;
            let mut buf = [0u8; 5];
            p.read_exact(&mut buf)?;
            p.write_all(&buf)?;
            std::io::Result::Ok(())
        });
        a.write_all(b"hello").await.map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 5];
        a.read_exact(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        check(&buf == b"hello", "echo")?;
        echo.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        a.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        // timers
        tokio::time::sleep(Duration::from_millis(5)).await;
        // a signal registered after confinement (tokio's signal driver: socketpair + sigaction)
        let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            .map_err(|e| format!("signal: {e}"))?;
        // SAFETY: raise(3) on our own process (tgkill to our pid).
        unsafe { libc::raise(libc::SIGUSR1) };
        tokio::time::timeout(Duration::from_secs(5), usr1.recv()).await.map_err(|_| "SIGUSR1 not received")?;
        // tokio::fs goes through the blocking pool too
        tokio::fs::write(dir.join("t"), b"x").await.map_err(|e| format!("tokio::fs: {e}"))?;
        // a local task set like capvisor_rpc::conn::run_local
        let local = tokio::task::LocalSet::new();
        local.run_until(async { tokio::task::spawn_local(async { 1 }).await }).await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    })?;
    drop(rt);
    say("tokio ok");
    Ok(())
}

/// Tiny 64-bit guest: print "OK\n" on COM1, then HLT.
///   66 BA F8 03  mov dx, 0x3f8
///   B0 4F EE     mov al, 'O'; out dx, al
///   B0 4B EE     mov al, 'K'; out dx, al
///   B0 0A EE     mov al, '\n'; out dx, al
///   F4           hlt
const GUEST_OK_HLT: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4f, 0xee, 0xb0, 0x4b, 0xee, 0xb0, 0x0a, 0xee, 0xf4];
/// Tiny guest that prints "S" and spins (`jmp $`).
const GUEST_SPIN: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, 0x53, 0xee, 0xeb, 0xfe];
const ENTRY: u64 = 0x10_0000;

struct TinyVm {
    _vm: KvmVm,
    _mem: GuestMemoryMmap,
    vcpu: KvmVcpu,
    buses: Buses,
}

/// Everything that happens before confinement: /dev/kvm, VM, RAM, vCPU,
/// boot state, and the console log opened in the run dir.
fn tiny_vm(hv: &KvmHypervisor, code: &[u8], console: &Path) -> Result<TinyVm, String> {
    let vm = hv.create_vm(&VmConfig { irqchip: false }).map_err(|e| e.to_string())?;
    let mem = create_guest_memory(16 << 20).map_err(|e| e.to_string())?;
    vm.add_guest_memory(&mem).map_err(|e| e.to_string())?;
    mem.write_slice(code, GuestAddress(ENTRY)).map_err(|e| e.to_string())?;
    let state = setup_long_mode(&mem, GuestAddress(ENTRY)).map_err(|e| e.to_string())?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    vcpu.set_boot_state(&state).map_err(|e| e.to_string())?;
    let log = OpenOptions::new().create(true).append(true).open(console).map_err(|e| e.to_string())?;
    let mut buses = Buses::default();
    let serial = SerialDevice::new(IrqLine::new().map_err(|e| e.to_string())?, Box::new(log));
    register_com1(&mut buses.pio, Arc::new(Mutex::new(serial))).map_err(|e| e.to_string())?;
    Ok(TinyVm { _vm: vm, _mem: mem, vcpu, buses })
}

fn c_kvm(dir: &Path) -> Result<(), String> {
    let hv = KvmHypervisor::new().map_err(|e| e.to_string())?;
    let a = tiny_vm(&hv, GUEST_OK_HLT, &dir.join("console-a.log"))?;
    let b = tiny_vm(&hv, GUEST_SPIN, &dir.join("console-b.log"))?;
    drop(hv); // /dev/kvm itself is not needed any more
    let report = sandbox::confine(&policy(dir)?).map_err(|e| e.to_string())?;
    say(&format!("confined: {report}"));
    let filters = Arc::new(report.filters);

    // (1) a vCPU thread that narrows itself to the vCPU filter, runs to HLT
    let f = filters.clone();
    let t0 = std::time::Instant::now();
    let h = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            f.apply_to_current_thread(ThreadKind::Vcpu).map_err(|e| e.to_string())?;
            VcpuRunner::new(a.vcpu, Arc::new(a.buses)).run().map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())?;
    let stop = h.join().map_err(|_| "vCPU thread panicked")??;
    check(stop == VcpuStop::Halted, format!("stop {stop:?}"))?;
    say(&format!("  narrowed vCPU thread: {stop:?} in {:?}", t0.elapsed()));
    let console = fs::read(dir.join("console-a.log")).map_err(|e| format!("read console log: {e}"))?;
    check(console == b"OK\n", format!("console {console:?}"))?;

    // (2) the engine's own vcpu::spawn (process filter), a spinning guest
    //     stopped by the kick signal from a main thread narrowed to Main
    let h = vcpu::spawn(VcpuRunner::new(b.vcpu, Arc::new(b.buses)), "vcpu-spin").map_err(|e| e.to_string())?;
    filters.apply_to_current_thread(ThreadKind::Main).map_err(|e| e.to_string())?;
    for _ in 0..2000 {
        if fs::read(dir.join("console-b.log")).map(|c| c == b"S").unwrap_or(false) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    check(fs::read(dir.join("console-b.log")).unwrap_or_default() == b"S", "spinning guest did not print")?;
    let stop = h.stop().map_err(|e| e.to_string())?;
    check(stop == VcpuStop::Stopped, format!("stop {stop:?}"))?;
    say(&format!("  spinning guest kicked out of KVM_RUN from a narrowed main thread: {stop:?}"));
    drop(a._vm);
    drop(b._vm);
    say("kvm ok");
    Ok(())
}

fn c_kvm_setup(dir: &Path) -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| e.to_string())?;
    confine(&policy(dir)?)?;
    let r = kvm.create_vm();
    Err(format!("KVM_CREATE_VM returned {:?} under the filter", r.map(|_| ())))
}

fn c_threads(dir: &Path) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || rx.recv());
    let r = sandbox::confine(&policy(dir)?);
    let abi = sandbox::landlock_abi();
    let ok = match &r {
        Err(sandbox::SandboxError::ThreadsRunning(n)) => *n >= 2 && abi > 0 && abi < 8,
        Ok(_) => abi == 0 || abi >= 8,
        Err(_) => false,
    };
    check(ok, format!("confine with 2 threads, landlock ABI {abi}: {r:?}"))?;
    drop(tx);
    let _ = t.join();
    say("threads ok");
    Ok(())
}
