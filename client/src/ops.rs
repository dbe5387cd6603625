//! Typed helpers over the client-facing capabilities.
//!
//! Calls that return a capability are *pipelined*: [`cap_set()`], [`get_cap`],
//! [`vms`], [`accounts()`], [`create_vm`], [`get_vm`], [`exec`] and [`files()`]
//! return at once with a promise of the capability, without a round trip.
//! Calls made on such a promise travel together with the calls that produce
//! it, so `vms(&s)` -> `get_vm(..)` -> `exec(..)` -> [`wait`] costs one round
//! trip. If a call along the chain fails, the first awaited result carries
//! that first failure's typed code ([`ClientError::Domain`]), by the error
//! rule of `capvisor_rpc::error`.

use crate::error::{ClientError, ClientResult};
use capnp::capability::FromClientHook;
use capnp::traits::HasTypeId;
use capvisor_rpc::error::text;
use capvisor_rpc::principal::Principal;
use capvisor_rpc::schema::capvisor_capnp::{
    accounts, approvals, cap_set, net_log, net_policy, session, vm, vm_factory, volume, volume_info, volumes,
    ApprovalDecision, Engine, NetAction, VmState,
};
use capvisor_rpc::schema::common_capnp::{byte_sink, exit_status, files, process, FileKind};
use capvisor_rpc::sink::CollectSink;
use tokio::io::AsyncRead;

/// `Session.capSet`, pipelined.
pub fn cap_set(s: &session::Client) -> cap_set::Client {
    s.cap_set_request().send().pipeline.get_cap_set()
}

/// One `CapSet` entry.
#[derive(Clone, Debug)]
pub struct CapInfo {
    /// Name in the CapSet.
    pub name: String,
    /// Cap'n Proto interface id.
    pub interface_id: u64,
    /// Interface name, e.g. `VmFactory`.
    pub interface_name: String,
    /// What it grants.
    pub description: String,
}

/// `CapSet.list`.
pub async fn list_caps(cs: &cap_set::Client) -> ClientResult<Vec<CapInfo>> {
    let resp = cs.list_request().send().promise.await?;
    resp.get()?
        .get_entries()?
        .iter()
        .map(|e| {
            Ok(CapInfo {
                name: text(e.get_name())?,
                interface_id: e.get_interface_id(),
                interface_name: text(e.get_interface_name())?,
                description: text(e.get_description())?,
            })
        })
        .collect()
}

/// `CapSet.get(name, interfaceId)` with an explicit interface id, pipelined.
/// A miss (`notFound`, `wrongInterface`) shows on the first call made on
/// the result.
pub fn get_cap_raw(cs: &cap_set::Client, name: &str, interface_id: u64) -> capnp::capability::Client {
    let mut req = cs.get_request();
    req.get().set_cap_name(name);
    req.get().set_interface_id(interface_id);
    capnp::capability::Client::new(req.send().pipeline.get_cap().as_cap())
}

/// `CapSet.get` typed by the interface `C` asks for, pipelined.
pub fn get_cap<C: FromClientHook + HasTypeId>(cs: &cap_set::Client, name: &str) -> C {
    C::new(get_cap_raw(cs, name, C::TYPE_ID).hook)
}

/// `VmFactory` from the session's CapSet entry `vms`, pipelined.
pub fn vms(s: &session::Client) -> vm_factory::Client {
    get_cap(&cap_set(s), "vms")
}

/// `Accounts` from the session's CapSet entry `accounts`, pipelined.
pub fn accounts(s: &session::Client) -> accounts::Client {
    get_cap(&cap_set(s), "accounts")
}

/// Session facts.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// Session id (not a credential).
    pub session_id: String,
    /// Who the session belongs to (`local:<unix user>` or `password:<account>`).
    pub principal: Principal,
    /// Manifest profile the session runs under (decides its bundle).
    pub profile: String,
    /// Expiry, Unix epoch ms.
    pub expires_at_ms: i64,
}

/// `Session.info`.
pub async fn session_info(s: &session::Client) -> ClientResult<SessionInfo> {
    let resp = s.info_request().send().promise.await?;
    let i = resp.get()?.get_info()?;
    Ok(SessionInfo {
        session_id: text(i.get_session_id())?,
        principal: Principal::read_from(i.get_principal()?)?,
        profile: text(i.get_profile())?,
        expires_at_ms: i.get_expires_at_ms(),
    })
}

/// `Session.logout`.
pub async fn logout(s: &session::Client) -> ClientResult<()> {
    s.logout_request().send().promise.await?;
    Ok(())
}

/// What to create.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Empty: generated. Otherwise `[a-z0-9][a-z0-9-]{0,31}`, unique in the session.
    pub name: String,
    /// Manifest image name; empty: `base`.
    pub image: String,
    /// Guest memory in MiB; 0: the bundle's default.
    pub memory_mib: u32,
    /// Number of vCPUs; 0: 1.
    pub vcpus: u32,
    /// Which engine runs it.
    pub engine: Engine,
    /// Volumes to attach (at most 4), mounted by guest-init before the VM answers.
    pub volumes: Vec<VolumeMount>,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            image: String::new(),
            memory_mib: 0,
            vcpus: 0,
            engine: Engine::Auto,
            volumes: Vec::new(),
        }
    }
}

/// A volume to attach to a new VM (schema `VolumeMount`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMount {
    /// The volume's name (`Volumes.create`).
    pub volume: String,
    /// Absolute mount point in the guest.
    pub guest_path: String,
    /// Read-only (shared) instead of read-write (exclusive).
    pub read_only: bool,
}

impl std::str::FromStr for VolumeMount {
    type Err = String;

    /// Parses the CLI form `NAME:/guest/path[:ro|:rw]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("--volume wants NAME:/guest/path[:ro], got {s:?}");
        let (volume, rest) = s.split_once(':').ok_or_else(usage)?;
        let (guest_path, read_only) = match rest.rsplit_once(':') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some(_) => return Err(usage()),
            None => (rest, false),
        };
        if volume.is_empty() || !guest_path.starts_with('/') {
            return Err(usage());
        }
        Ok(Self { volume: volume.into(), guest_path: guest_path.into(), read_only })
    }
}

/// A VM's facts.
#[derive(Clone, Debug)]
pub struct VmInfo {
    /// Name, unique in the session while the VM exists.
    pub name: String,
    /// Manifest image name.
    pub image: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Lifecycle state.
    pub state: VmState,
    /// Engine (the one that runs it, once booted).
    pub engine: Engine,
    /// Guest `uname -r`.
    pub kernel_release: String,
    /// Create to guest-init answering, ms.
    pub boot_ms: u64,
    /// Why it stopped or crashed; empty while it runs.
    pub detail: String,
    /// Volumes attached at create.
    pub volumes: Vec<VolumeMount>,
}

fn read_info(i: capvisor_rpc::schema::capvisor_capnp::vm_info::Reader<'_>) -> ClientResult<VmInfo> {
    Ok(VmInfo {
        name: text(i.get_name())?,
        image: text(i.get_image())?,
        memory_mib: i.get_memory_mib(),
        vcpus: i.get_vcpus(),
        state: i.get_state()?,
        engine: i.get_engine()?,
        kernel_release: text(i.get_kernel_release())?,
        boot_ms: i.get_boot_ms(),
        detail: text(i.get_detail())?,
        volumes: i
            .get_volumes()?
            .iter()
            .map(|m| {
                Ok(VolumeMount {
                    volume: text(m.get_volume())?,
                    guest_path: text(m.get_guest_path())?,
                    read_only: m.get_read_only(),
                })
            })
            .collect::<ClientResult<_>>()?,
    })
}

pub use capvisor_rpc::names::{engine_name, vm_state_name as state_name};

/// `VmFactory.create`, pipelined: the VM boots on the server; calls on the
/// returned `Vm` run once guest-init answers.
pub fn create_vm(f: &vm_factory::Client, spec: &VmSpec) -> vm::Client {
    let mut req = f.create_request();
    {
        let mut s = req.get().init_spec();
        s.set_name(spec.name.as_str());
        s.set_image(spec.image.as_str());
        s.set_memory_mib(spec.memory_mib);
        s.set_vcpus(spec.vcpus);
        s.set_engine(spec.engine);
        let mut l = s.init_volumes(spec.volumes.len() as u32);
        for (i, m) in spec.volumes.iter().enumerate() {
            let mut e = l.reborrow().get(i as u32);
            e.set_volume(m.volume.as_str());
            e.set_guest_path(m.guest_path.as_str());
            e.set_read_only(m.read_only);
        }
    }
    req.send().pipeline.get_vm()
}

/// `VmFactory.get`, pipelined.
pub fn get_vm(f: &vm_factory::Client, name: &str) -> vm::Client {
    let mut req = f.get_request();
    req.get().set_vm_name(name);
    req.send().pipeline.get_vm()
}

/// `VmFactory.list`.
pub async fn list_vms(f: &vm_factory::Client) -> ClientResult<Vec<VmInfo>> {
    let resp = f.list_request().send().promise.await?;
    resp.get()?.get_vms()?.iter().map(read_info).collect()
}

/// An image the session may boot (schema `ImageInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Manifest image name (`[images.NAME]`).
    pub name: String,
    /// `"base"` (busybox in an initramfs) or `"debian"` (a read-only root image).
    pub kind: String,
    /// Guest `uname -r`.
    pub kernel_release: String,
    /// The root image's size on the host, bytes (0: none).
    pub rootfs_bytes: u64,
    /// Each VM's writable layer, MiB (0: none).
    pub writable_mib: u64,
}

/// `VmFactory.images`: the images this session may boot.
pub async fn list_images(f: &vm_factory::Client) -> ClientResult<Vec<ImageInfo>> {
    let resp = f.images_request().send().promise.await?;
    resp.get()?
        .get_images()?
        .iter()
        .map(|i| {
            Ok(ImageInfo {
                name: text(i.get_name())?,
                kind: text(i.get_kind())?,
                kernel_release: text(i.get_kernel_release())?,
                rootfs_bytes: i.get_rootfs_bytes(),
                writable_mib: i.get_writable_mib(),
            })
        })
        .collect()
}

/// `VmFactory.remove`.
pub async fn remove_vm(f: &vm_factory::Client, name: &str) -> ClientResult<()> {
    let mut req = f.remove_request();
    req.get().set_vm_name(name);
    req.send().promise.await?;
    Ok(())
}

/// `Vm.info`.
pub async fn vm_info(v: &vm::Client) -> ClientResult<VmInfo> {
    let resp = v.info_request().send().promise.await?;
    read_info(resp.get()?.get_info()?)
}

/// `Vm.stop`.
pub async fn stop_vm(v: &vm::Client) -> ClientResult<()> {
    v.stop_request().send().promise.await?;
    Ok(())
}

/// `Vm.ping`: a no-op round trip to guest-init.
pub async fn ping(v: &vm::Client) -> ClientResult<()> {
    v.ping_request().send().promise.await?;
    Ok(())
}

pub use capvisor_rpc::exec::ExecRequest;

/// `Vm.exec`, pipelined: starts a process whose output flows into the
/// sinks; a failure to start shows on the first call made on the returned
/// `Process` (usually [`wait`]).
pub fn exec(v: &vm::Client, r: &ExecRequest, stdout: byte_sink::Client, stderr: byte_sink::Client) -> process::Client {
    let mut req = v.exec_request();
    {
        let mut p = req.get();
        r.write_to(p.reborrow().init_spec());
        p.set_stdout(stdout);
        p.set_stderr(stderr);
    }
    req.send().pipeline.get_process()
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The shell convention: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// `Process.wait`: resolves after exit and after all output was delivered.
pub async fn wait(p: &process::Client) -> ClientResult<Exit> {
    let resp = p.wait_request().send().promise.await?;
    Ok(match resp.get()?.get_status()?.which()? {
        exit_status::Code(c) => Exit::Code(c),
        exit_status::Signal(s) => Exit::Signal(s),
    })
}

/// `Process.write` (stdin / pty input), in bounded chunks.
pub async fn write_stdin(p: &process::Client, data: &[u8]) -> ClientResult<()> {
    for chunk in data.chunks(capvisor_rpc::CHUNK) {
        let mut req = p.write_request();
        req.get().set_data(chunk);
        req.send().await?;
    }
    Ok(())
}

/// `Process.closeStdin`.
pub async fn close_stdin(p: &process::Client) -> ClientResult<()> {
    p.close_stdin_request().send().promise.await?;
    Ok(())
}

/// `Process.resize` (pty only).
pub async fn resize(p: &process::Client, rows: u16, cols: u16) -> ClientResult<()> {
    let mut req = p.resize_request();
    let mut s = req.get().init_size();
    s.set_rows(rows);
    s.set_cols(cols);
    req.send().promise.await?;
    Ok(())
}

/// `Process.kill`.
pub async fn kill(p: &process::Client, signal: i32) -> ClientResult<()> {
    let mut req = p.kill_request();
    req.get().set_signal(signal);
    req.send().promise.await?;
    Ok(())
}

/// A finished command's output.
#[derive(Clone, Debug)]
pub struct Output {
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub exit: Exit,
}

/// Runs `argv` to completion with `stdin`, collecting up to `limit` bytes
/// of each output stream (exec and wait pipelined: one round trip).
pub async fn exec_collect(v: &vm::Client, argv: &[&str], stdin: &[u8], limit: usize) -> ClientResult<Output> {
    let (out, out_rx) = CollectSink::client(limit);
    let (err, err_rx) = CollectSink::client(limit);
    let req =
        ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), stdin: stdin.to_vec(), ..Default::default() };
    let p = exec(v, &req, out, err);
    let exit = wait(&p).await?;
    let gone = || ClientError::Disconnected("output stream ended early".into());
    Ok(Output { stdout: out_rx.await.map_err(|_| gone())?, stderr: err_rx.await.map_err(|_| gone())?, exit })
}

/// `Vm.files`, pipelined.
pub fn files(v: &vm::Client) -> files::Client {
    v.files_request().send().pipeline.get_files()
}

/// `Files.read` into `sink`; returns the byte count.
pub async fn read_file(f: &files::Client, path: &str, sink: byte_sink::Client) -> ClientResult<u64> {
    let mut req = f.read_request();
    req.get().set_path(path);
    req.get().set_sink(sink);
    let resp = req.send().promise.await?;
    Ok(resp.get()?.get_size())
}

/// Reads a whole guest file into memory (at most `limit` bytes).
pub async fn read_file_bytes(f: &files::Client, path: &str, limit: usize) -> ClientResult<Vec<u8>> {
    let (sink, rx) = CollectSink::client(limit);
    read_file(f, path, sink).await?;
    rx.await.map_err(|_| ClientError::Disconnected("file stream ended early".into()))
}

/// `Files.write`: streams `body` into guest file `path` (created or
/// truncated, permission bits `mode`); returns bytes written once the guest
/// has the file closed and in place.
pub async fn write_file<R: AsyncRead + Unpin>(f: &files::Client, path: &str, mode: u32, body: R) -> ClientResult<u64> {
    let mut req = f.write_request();
    req.get().set_path(path);
    req.get().set_mode(mode);
    let sink = req.send().pipeline.get_sink();
    Ok(capvisor_rpc::sink::pump(body, &sink).await?)
}

/// A guest directory entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// File, directory, symlink or other (the link itself, not its target).
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// `Files.list`.
pub async fn list_dir(f: &files::Client, path: &str) -> ClientResult<Vec<DirEntry>> {
    let mut req = f.list_request();
    req.get().set_path(path);
    let resp = req.send().promise.await?;
    resp.get()?
        .get_entries()?
        .iter()
        .map(|e| {
            Ok(DirEntry { name: text(e.get_name())?, kind: e.get_kind()?, size: e.get_size(), mode: e.get_mode() })
        })
        .collect()
}

/// `Accounts.add`.
pub async fn add_account(a: &accounts::Client, name: &str, profile: &str, password: &str) -> ClientResult<()> {
    let mut req = a.add_request();
    req.get().set_account(name);
    req.get().set_profile(profile);
    req.get().set_password(password);
    req.send().promise.await?;
    Ok(())
}

/// `Accounts.list`: (name, profile) pairs.
pub async fn list_accounts(a: &accounts::Client) -> ClientResult<Vec<(String, String)>> {
    let resp = a.list_request().send().promise.await?;
    resp.get()?.get_accounts()?.iter().map(|e| Ok((text(e.get_name())?, text(e.get_profile())?))).collect()
}

/// `Accounts.remove`.
pub async fn remove_account(a: &accounts::Client, name: &str) -> ClientResult<()> {
    let mut req = a.remove_request();
    req.get().set_account(name);
    req.send().promise.await?;
    Ok(())
}

/// The CapSet's `volumes` cap, pipelined.
pub fn volumes(s: &session::Client) -> volumes::Client {
    get_cap(&cap_set(s), "volumes")
}

/// A volume's facts (schema `VolumeInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// File system size, MiB.
    pub size_mib: u64,
    /// Host disk its file occupies, bytes.
    pub used_bytes: u64,
    /// Creation time, Unix epoch ms.
    pub created_at_ms: i64,
    /// Running VMs holding it: (VM name, in this session, read-only).
    pub attached_to: Vec<(String, bool, bool)>,
}

fn read_volume(v: volume_info::Reader<'_>) -> ClientResult<VolumeInfo> {
    Ok(VolumeInfo {
        name: text(v.get_name())?,
        size_mib: v.get_size_mib(),
        used_bytes: v.get_used_bytes(),
        created_at_ms: v.get_created_at_ms(),
        attached_to: v
            .get_attached_to()?
            .iter()
            .map(|a| Ok((text(a.get_vm())?, a.get_this_session(), a.get_read_only())))
            .collect::<ClientResult<_>>()?,
    })
}

/// `Volumes.create`: a new empty ext4 volume of `size_mib` MiB.
pub async fn create_volume(v: &volumes::Client, name: &str, size_mib: u64) -> ClientResult<VolumeInfo> {
    let mut req = v.create_request();
    req.get().set_name(name);
    req.get().set_size_mib(size_mib);
    let vol = req.send().pipeline.get_volume();
    volume_info_of(&vol).await
}

/// `Volume.info`.
pub async fn volume_info_of(v: &volume::Client) -> ClientResult<VolumeInfo> {
    let resp = v.info_request().send().promise.await?;
    read_volume(resp.get()?.get_info()?)
}

/// `Volumes.get`, pipelined.
pub fn get_volume(v: &volumes::Client, name: &str) -> volume::Client {
    let mut req = v.get_request();
    req.get().set_volume_name(name);
    req.send().pipeline.get_volume()
}

/// `Volumes.list`.
pub async fn list_volumes(v: &volumes::Client) -> ClientResult<Vec<VolumeInfo>> {
    let resp = v.list_request().send().promise.await?;
    resp.get()?.get_volumes()?.iter().map(read_volume).collect()
}

/// `Volumes.remove`: deletes the volume and its data.
pub async fn remove_volume(v: &volumes::Client, name: &str) -> ClientResult<()> {
    let mut req = v.remove_request();
    req.get().set_volume_name(name);
    req.send().promise.await?;
    Ok(())
}

/// One egress rule (schema `NetRule`; the schema says what each field means).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetRule {
    /// Host glob: `*`, `*.example.org`, or exact.
    pub host: String,
    /// Port; 0: any.
    pub port: u16,
    /// `""`, `"tcp"`, `"http"` or `"https"`.
    pub scheme: String,
    /// HTTP method; `""`: any.
    pub method: String,
    /// HTTP path prefix; `""`: any.
    pub path_prefix: String,
    /// What a match decides.
    pub action: NetAction,
    /// Never intercept TLS to this host.
    pub no_mitm: bool,
}

impl NetRule {
    /// A rule deciding `action` for `HOST[:PORT]` (the CLI's `--allow` /
    /// `--deny` form; no port: any).
    ///
    /// Errors: an empty host or a bad port.
    pub fn parse_spec(spec: &str, action: NetAction) -> Result<Self, String> {
        let (host, port) = match spec.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("bad port in {spec:?}"))?),
            None => (spec, 0),
        };
        if host.is_empty() {
            return Err(format!("no host in {spec:?} (\"*\" means any)"));
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            scheme: String::new(),
            method: String::new(),
            path_prefix: String::new(),
            action,
            no_mitm: false,
        })
    }
}

/// The CapSet's `netpolicy` cap, pipelined.
pub fn net_policy(s: &session::Client) -> net_policy::Client {
    get_cap(&cap_set(s), "netpolicy")
}

/// The CapSet's `netlog` cap, pipelined.
pub fn net_log(s: &session::Client) -> net_log::Client {
    get_cap(&cap_set(s), "netlog")
}

/// `NetPolicy.get`.
pub async fn get_rules(p: &net_policy::Client) -> ClientResult<Vec<NetRule>> {
    let resp = p.get_request().send().promise.await?;
    resp.get()?
        .get_rules()?
        .iter()
        .map(|r| {
            Ok(NetRule {
                host: text(r.get_host())?,
                port: r.get_port(),
                scheme: text(r.get_scheme())?,
                method: text(r.get_method())?,
                path_prefix: text(r.get_path_prefix())?,
                action: r.get_action()?,
                no_mitm: r.get_no_mitm(),
            })
        })
        .collect()
}

/// `NetPolicy.set`: replaces the session's rules (new connections use them).
pub async fn set_rules(p: &net_policy::Client, rules: &[NetRule]) -> ClientResult<()> {
    let mut req = p.set_request();
    let mut l = req.get().init_rules(rules.len() as u32);
    for (i, r) in rules.iter().enumerate() {
        let mut o = l.reborrow().get(i as u32);
        o.set_host(r.host.as_str());
        o.set_port(r.port);
        o.set_scheme(r.scheme.as_str());
        o.set_method(r.method.as_str());
        o.set_path_prefix(r.path_prefix.as_str());
        o.set_action(r.action);
        o.set_no_mitm(r.no_mitm);
    }
    req.send().promise.await?;
    Ok(())
}

/// One guest network flow (schema `NetFlow`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetFlow {
    /// When it was asked for, Unix epoch ms.
    pub time_ms: i64,
    /// The VM.
    pub vm: String,
    /// The host as the guest named it.
    pub host: String,
    /// The upstream address used ("" if none).
    pub address: String,
    /// Port.
    pub port: u16,
    /// HTTP method, path and status (empty / 0 when not HTTP).
    pub method: String,
    /// HTTP path.
    pub path: String,
    /// HTTP status.
    pub status: u16,
    /// Bytes guest -> upstream and upstream -> guest.
    pub bytes_up: u64,
    /// Bytes upstream -> guest.
    pub bytes_down: u64,
    /// The deciding rule's index; -1: none matched.
    pub rule: i32,
    /// The decision.
    pub action: NetAction,
    /// Why denied or failed.
    pub detail: String,
}

/// `NetLog.recent`: flows of VM `vm` ("" all) since `since_ms` (0 all), at most `limit` (0 all).
pub async fn recent_flows(l: &net_log::Client, vm: &str, since_ms: i64, limit: u32) -> ClientResult<Vec<NetFlow>> {
    let mut req = l.recent_request();
    req.get().set_vm(vm);
    req.get().set_since_ms(since_ms);
    req.get().set_limit(limit);
    let resp = req.send().promise.await?;
    resp.get()?
        .get_flows()?
        .iter()
        .map(|f| {
            Ok(NetFlow {
                time_ms: f.get_time_ms(),
                vm: text(f.get_vm())?,
                host: text(f.get_host())?,
                address: text(f.get_address())?,
                port: f.get_port(),
                method: text(f.get_method())?,
                path: text(f.get_path())?,
                status: f.get_status(),
                bytes_up: f.get_bytes_up(),
                bytes_down: f.get_bytes_down(),
                rule: f.get_rule(),
                action: f.get_action()?,
                detail: text(f.get_detail())?,
            })
        })
        .collect()
}

/// The schema name of a net action (`"allow"`, `"deny"`, `"ask"`).
pub fn action_name(a: NetAction) -> &'static str {
    match a {
        NetAction::Allow => "allow",
        NetAction::Deny => "deny",
        NetAction::Ask => "ask",
    }
}

/// `Vm.connect`: a byte stream to TCP `port` on the guest's loopback.
/// Bytes from the guest go to `down`; returns the `up` sink to write into.
///
/// Errors: `unavailable` when nothing listens there; `notRunning`.
pub async fn connect_port(v: &vm::Client, port: u16, down: byte_sink::Client) -> ClientResult<byte_sink::Client> {
    let mut req = v.connect_request();
    req.get().set_port(port);
    req.get().set_down(down);
    let resp = req.send().promise.await?;
    Ok(resp.get()?.get_up()?)
}

/// The CapSet's `approvals` cap, pipelined.
pub fn approvals(s: &session::Client) -> approvals::Client {
    get_cap(&cap_set(s), "approvals")
}

/// A connection held by an `ask` rule (schema `Approval`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    /// Its id, for [`decide`].
    pub id: u64,
    /// When it was held, Unix epoch ms.
    pub time_ms: i64,
    /// The VM.
    pub vm: String,
    /// The host as the guest named it.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Scheme, method and path when known ("" otherwise).
    pub scheme: String,
    /// HTTP method.
    pub method: String,
    /// HTTP path.
    pub path: String,
    /// The ask rule's index.
    pub rule: i32,
    /// Denied if not decided by then, Unix epoch ms.
    pub expires_at_ms: i64,
    /// `"net"` (a held connection) or `"exec"` (a held exec: `vm`, `argv`, `grants`).
    pub kind: String,
    /// Kind exec: the program and its arguments.
    pub argv: Vec<String>,
    /// Kind exec: the grants it came through, for people.
    pub grants: String,
}

/// `Approvals.pending`: held connections, then held execs, oldest first.
pub async fn pending_approvals(a: &approvals::Client) -> ClientResult<Vec<Approval>> {
    let resp = a.pending_request().send().promise.await?;
    resp.get()?
        .get_approvals()?
        .iter()
        .map(|p| {
            Ok(Approval {
                id: p.get_id(),
                time_ms: p.get_time_ms(),
                vm: text(p.get_vm())?,
                host: text(p.get_host())?,
                port: p.get_port(),
                scheme: text(p.get_scheme())?,
                method: text(p.get_method())?,
                path: text(p.get_path())?,
                rule: p.get_rule(),
                expires_at_ms: p.get_expires_at_ms(),
                kind: text(p.get_kind())?,
                argv: p.get_argv()?.iter().map(text).collect::<capnp::Result<_>>()?,
                grants: text(p.get_grants())?,
            })
        })
        .collect()
}

/// `Approvals.decide`.
///
/// Errors: `notFound` when `id` no longer waits.
pub async fn decide(a: &approvals::Client, id: u64, decision: ApprovalDecision) -> ClientResult<()> {
    let mut req = a.decide_request();
    req.get().set_id(id);
    req.get().set_decision(decision);
    req.send().promise.await?;
    Ok(())
}
