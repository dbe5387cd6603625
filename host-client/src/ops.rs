//! Typed helpers over the client-facing capabilities. Each turns the
//! schema's result unions into `ClientResult`, so callers match on
//! [`ClientError::Domain`] codes rather than text.

use crate::error::{ClientError, ClientResult};
use capnp::capability::FromClientHook;
use capnp::traits::HasTypeId;
use capvisor_rpc::schema::capvisor_capnp::{accounts, cap_set, session, vm, vm_factory, VmState};
use capvisor_rpc::schema::common_capnp::{byte_sink, exit_status, files, process, FileKind};
use capvisor_rpc::sink::CollectSink;
use capvisor_rpc::CvError;
use tokio::io::AsyncRead;

/// Reads a result union whose members are `$ok` and `err`.
macro_rules! take {
    ($r:expr, $m:ident :: $ok:ident) => {{
        match $r.which()? {
            $m::Which::$ok(v) => Ok(v),
            $m::Which::Err(e) => Err(ClientError::from(CvError::read_from(e?)?)),
        }
    }};
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> ClientResult<String> {
    Ok(t?.to_string().map_err(|e| capnp::Error::failed(e.to_string()))?)
}

fn unit(r: capvisor_rpc::schema::common_capnp::unit_result::Reader<'_>) -> ClientResult<()> {
    use capvisor_rpc::schema::common_capnp::unit_result;
    take!(r, unit_result::Ok).map(|()| ())
}

/// `Session.capSet`.
pub async fn cap_set(s: &session::Client) -> ClientResult<cap_set::Client> {
    use capvisor_rpc::schema::capvisor_capnp::cap_set_result;
    let resp = s.cap_set_request().send().promise.await?;
    Ok(take!(resp.get()?.get_result()?, cap_set_result::CapSet)??)
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
    use capvisor_rpc::schema::capvisor_capnp::cap_list_result;
    let resp = cs.list_request().send().promise.await?;
    let list = take!(resp.get()?.get_result()?, cap_list_result::Entries)??;
    list.iter()
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

/// `CapSet.get(name, interfaceId)` with an explicit interface id.
///
/// Errors: `Domain(notFound)` or `Domain(wrongInterface)`.
pub async fn get_cap_raw(
    cs: &cap_set::Client,
    name: &str,
    interface_id: u64,
) -> ClientResult<capnp::capability::Client> {
    use capvisor_rpc::schema::capvisor_capnp::get_result;
    let mut req = cs.get_request();
    req.get().set_name(name);
    req.get().set_interface_id(interface_id);
    let resp = req.send().promise.await?;
    let ptr = take!(resp.get()?.get_result()?, get_result::Cap)?;
    Ok(ptr.get_as_capability::<capnp::capability::Client>()?)
}

/// `CapSet.get` typed by the interface `C` asks for.
pub async fn get_cap<C: FromClientHook + HasTypeId>(cs: &cap_set::Client, name: &str) -> ClientResult<C> {
    let c = get_cap_raw(cs, name, C::TYPE_ID).await?;
    Ok(C::new(c.hook))
}

/// `VmFactory` from the session's CapSet entry `vms`.
pub async fn vms(s: &session::Client) -> ClientResult<vm_factory::Client> {
    get_cap(&cap_set(s).await?, "vms").await
}

/// `Accounts` from the session's CapSet entry `accounts`.
pub async fn accounts(s: &session::Client) -> ClientResult<accounts::Client> {
    get_cap(&cap_set(s).await?, "accounts").await
}

/// Session facts.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// Session id (not a credential).
    pub session_id: String,
    /// Who.
    pub principal: String,
    /// Profile.
    pub profile: String,
    /// Expiry, Unix epoch ms.
    pub expires_at_ms: i64,
}

/// `Session.info`.
pub async fn session_info(s: &session::Client) -> ClientResult<SessionInfo> {
    use capvisor_rpc::schema::capvisor_capnp::session_info_result;
    let resp = s.info_request().send().promise.await?;
    let i = take!(resp.get()?.get_result()?, session_info_result::Info)??;
    Ok(SessionInfo {
        session_id: text(i.get_session_id())?,
        principal: text(i.get_principal())?,
        profile: text(i.get_profile())?,
        expires_at_ms: i.get_expires_at_ms(),
    })
}

/// `Session.logout`.
pub async fn logout(s: &session::Client) -> ClientResult<()> {
    let resp = s.logout_request().send().promise.await?;
    unit(resp.get()?.get_result()?)
}

/// What to create.
#[derive(Clone, Debug, Default)]
pub struct VmSpec {
    /// Empty: generated.
    pub name: String,
    /// Empty: `base`.
    pub image: String,
    /// 0: the bundle's default.
    pub memory_mib: u32,
    /// 0: 1.
    pub vcpus: u32,
    /// "", "auto", "qemu", "kvm".
    pub engine: String,
}

/// A VM's facts.
#[derive(Clone, Debug)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// Image.
    pub image: String,
    /// MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// State.
    pub state: VmState,
    /// Engine.
    pub engine: String,
    /// Guest `uname -r`.
    pub kernel_release: String,
    /// Create to guest-init answering, ms.
    pub boot_ms: u64,
}

fn read_info(i: capvisor_rpc::schema::capvisor_capnp::vm_info::Reader<'_>) -> ClientResult<VmInfo> {
    Ok(VmInfo {
        name: text(i.get_name())?,
        image: text(i.get_image())?,
        memory_mib: i.get_memory_mib(),
        vcpus: i.get_vcpus(),
        state: i.get_state()?,
        engine: text(i.get_engine())?,
        kernel_release: text(i.get_kernel_release())?,
        boot_ms: i.get_boot_ms(),
    })
}

/// The schema name of a VM state.
pub fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Stopped => "stopped",
        VmState::Crashed => "crashed",
    }
}

/// `VmFactory.create`: boots a VM, returns once guest-init answers.
pub async fn create_vm(f: &vm_factory::Client, spec: &VmSpec) -> ClientResult<vm::Client> {
    use capvisor_rpc::schema::capvisor_capnp::vm_result;
    let mut req = f.create_request();
    {
        let mut s = req.get().init_spec();
        s.set_name(spec.name.as_str());
        s.set_image(spec.image.as_str());
        s.set_memory_mib(spec.memory_mib);
        s.set_vcpus(spec.vcpus);
        s.set_engine(spec.engine.as_str());
    }
    let resp = req.send().promise.await?;
    Ok(take!(resp.get()?.get_result()?, vm_result::Vm)??)
}

/// `VmFactory.get`.
pub async fn get_vm(f: &vm_factory::Client, name: &str) -> ClientResult<vm::Client> {
    use capvisor_rpc::schema::capvisor_capnp::vm_result;
    let mut req = f.get_request();
    req.get().set_name(name);
    let resp = req.send().promise.await?;
    Ok(take!(resp.get()?.get_result()?, vm_result::Vm)??)
}

/// `VmFactory.list`.
pub async fn list_vms(f: &vm_factory::Client) -> ClientResult<Vec<VmInfo>> {
    use capvisor_rpc::schema::capvisor_capnp::vm_list_result;
    let resp = f.list_request().send().promise.await?;
    let list = take!(resp.get()?.get_result()?, vm_list_result::Vms)??;
    list.iter().map(read_info).collect()
}

/// `VmFactory.remove`.
pub async fn remove_vm(f: &vm_factory::Client, name: &str) -> ClientResult<()> {
    let mut req = f.remove_request();
    req.get().set_name(name);
    let resp = req.send().promise.await?;
    unit(resp.get()?.get_result()?)
}

/// `Vm.info`.
pub async fn vm_info(v: &vm::Client) -> ClientResult<VmInfo> {
    use capvisor_rpc::schema::capvisor_capnp::vm_info_result;
    let resp = v.info_request().send().promise.await?;
    read_info(take!(resp.get()?.get_result()?, vm_info_result::Info)??)
}

/// `Vm.stop`.
pub async fn stop_vm(v: &vm::Client) -> ClientResult<()> {
    let resp = v.stop_request().send().promise.await?;
    unit(resp.get()?.get_result()?)
}

/// `Vm.ping`: a no-op round trip to guest-init.
pub async fn ping(v: &vm::Client) -> ClientResult<()> {
    let resp = v.ping_request().send().promise.await?;
    unit(resp.get()?.get_result()?)
}

pub use capvisor_rpc::exec::ExecRequest;

/// `Vm.exec`: starts a process; output flows into the sinks.
pub async fn exec(
    v: &vm::Client,
    r: &ExecRequest,
    stdout: byte_sink::Client,
    stderr: byte_sink::Client,
) -> ClientResult<process::Client> {
    use capvisor_rpc::schema::common_capnp::exec_result;
    let mut req = v.exec_request();
    {
        let mut p = req.get();
        r.write_to(p.reborrow().init_spec());
        p.set_stdout(stdout);
        p.set_stderr(stderr);
    }
    let resp = req.send().promise.await?;
    Ok(take!(resp.get()?.get_result()?, exec_result::Process)??)
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
    use capvisor_rpc::schema::common_capnp::wait_result;
    let resp = p.wait_request().send().promise.await?;
    let st = take!(resp.get()?.get_result()?, wait_result::Status)??;
    Ok(match st.which()? {
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
    let resp = p.close_stdin_request().send().promise.await?;
    unit(resp.get()?.get_result()?)
}

/// `Process.resize` (pty only).
pub async fn resize(p: &process::Client, rows: u16, cols: u16) -> ClientResult<()> {
    let mut req = p.resize_request();
    let mut s = req.get().init_size();
    s.set_rows(rows);
    s.set_cols(cols);
    let resp = req.send().promise.await?;
    unit(resp.get()?.get_result()?)
}

/// `Process.kill`.
pub async fn kill(p: &process::Client, signal: i32) -> ClientResult<()> {
    let mut req = p.kill_request();
    req.get().set_signal(signal);
    let resp = req.send().promise.await?;
    unit(resp.get()?.get_result()?)
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
/// of each output stream.
pub async fn exec_collect(v: &vm::Client, argv: &[&str], stdin: &[u8], limit: usize) -> ClientResult<Output> {
    let (out, out_rx) = CollectSink::client(limit);
    let (err, err_rx) = CollectSink::client(limit);
    let req =
        ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), stdin: stdin.to_vec(), ..Default::default() };
    let p = exec(v, &req, out, err).await?;
    let exit = wait(&p).await?;
    let gone = || ClientError::Disconnected("output stream ended early".into());
    Ok(Output { stdout: out_rx.await.map_err(|_| gone())?, stderr: err_rx.await.map_err(|_| gone())?, exit })
}

/// `Vm.files`.
pub async fn files(v: &vm::Client) -> ClientResult<files::Client> {
    use capvisor_rpc::schema::capvisor_capnp::files_result;
    let resp = v.files_request().send().promise.await?;
    Ok(take!(resp.get()?.get_result()?, files_result::Files)??)
}

/// `Files.read` into `sink`; returns the byte count.
pub async fn read_file(f: &files::Client, path: &str, sink: byte_sink::Client) -> ClientResult<u64> {
    use capvisor_rpc::schema::common_capnp::read_result;
    let mut req = f.read_request();
    req.get().set_path(path);
    req.get().set_sink(sink);
    let resp = req.send().promise.await?;
    take!(resp.get()?.get_result()?, read_result::Size)
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
    use capvisor_rpc::schema::common_capnp::sink_result;
    let mut req = f.write_request();
    req.get().set_path(path);
    req.get().set_mode(mode);
    let resp = req.send().promise.await?;
    let sink = take!(resp.get()?.get_result()?, sink_result::Sink)??;
    Ok(capvisor_rpc::sink::pump(body, &sink).await?)
}

/// A guest directory entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// Kind.
    pub kind: FileKind,
    /// Bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// `Files.list`.
pub async fn list_dir(f: &files::Client, path: &str) -> ClientResult<Vec<DirEntry>> {
    use capvisor_rpc::schema::common_capnp::list_result;
    let mut req = f.list_request();
    req.get().set_path(path);
    let resp = req.send().promise.await?;
    let list = take!(resp.get()?.get_result()?, list_result::Entries)??;
    list.iter()
        .map(|e| {
            Ok(DirEntry { name: text(e.get_name())?, kind: e.get_kind()?, size: e.get_size(), mode: e.get_mode() })
        })
        .collect()
}

/// `Accounts.add`.
pub async fn add_account(a: &accounts::Client, name: &str, profile: &str, password: &str) -> ClientResult<()> {
    let mut req = a.add_request();
    req.get().set_name(name);
    req.get().set_profile(profile);
    req.get().set_password(password);
    let resp = req.send().promise.await?;
    unit(resp.get()?.get_result()?)
}

/// `Accounts.list`: (name, profile) pairs.
pub async fn list_accounts(a: &accounts::Client) -> ClientResult<Vec<(String, String)>> {
    use capvisor_rpc::schema::capvisor_capnp::account_list_result;
    let resp = a.list_request().send().promise.await?;
    let list = take!(resp.get()?.get_result()?, account_list_result::Accounts)??;
    list.iter().map(|e| Ok((text(e.get_name())?, text(e.get_profile())?))).collect()
}

/// `Accounts.remove`.
pub async fn remove_account(a: &accounts::Client, name: &str) -> ClientResult<()> {
    let mut req = a.remove_request();
    req.get().set_name(name);
    let resp = req.send().promise.await?;
    unit(resp.get()?.get_result()?)
}
