//! `capvisor share`, `shares`, `revoke` and `login --token-stdin`:
//! delegation by grants (cap `shares`, schema `Shares`; docs/decisions.md
//! "Delegation").

use capnp::traits::HasTypeId;
use capvisor_client::ops;
use capvisor_client::{ClientError, ClientResult};
use capvisor_rpc::error::text;
use capvisor_rpc::schema::capvisor_capnp::{session, shares, vm, vm_narrowing, Engine, FilesAccess};
use clap::{Args, ValueEnum};

/// What `share --help` says.
pub const ABOUT: &str = "Hand a narrowed capability to someone else, for a bounded time, revocably.\n\n\
`capvisor share VM ...` narrows this session's VM VM to exactly what the options allow (everything else is \
denied) and makes a grant of it: a token, printed once on standard output, that `capvisor login \
--token-stdin` (or MCP `capvisor mcp --token-stdin`) redeems into a session whose capabilities are exactly \
that VM under the name --name (default: the VM's name). With --to PRINCIPAL no token is printed: the VM \
appears in that principal's CapSet (`capvisor caps`) from its next login on, and its `vm` commands reach \
it as `cap:NAME`.\n\n\
The grant is served by this session: `capvisor revoke ID` (ids in `capvisor shares`), its --ttl, or the end \
of this session ends it, and every call through it, calls in flight included, then fails with \
staleSession; processes started through it are killed. A holder given --reshare can share onward, only \
narrower and never longer; revoking a grant revokes those too.\n\n\
Examples:\n  capvisor share box --exec python3 --files ro --ttl 1h --label agent-1\n  \
capvisor share box --exec python3 --exec ls --cwd /work --files rw --write-prefix /work/out --ttl 30m \
--budget 1000 --reshare";

/// `share --engine`: qemu or kvm (auto is what a VM asks, not an engine to allow).
fn parse_listed_engine(name: &str) -> Result<Engine, String> {
    match capvisor_rpc::names::parse_engine(name)? {
        Engine::Auto => Err("list qemu and/or kvm; auto is not an engine to allow".into()),
        e => Ok(e),
    }
}

/// How `share --files` is spelled.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FilesArg {
    /// No file access
    None,
    /// Read and list anywhere
    Ro,
    /// Read and list anywhere, write under --write-prefix (anywhere without one)
    Rw,
}

/// `capvisor share` options.
#[derive(Args)]
pub struct ShareArgs {
    /// The VM to share: one of this session's VMs (or, in a delegate session given --reshare,
    /// the name of a shared VM it holds). Without it, give --factory.
    #[arg(required_unless_present = "factory", conflicts_with = "factory")]
    vm: Option<String>,
    /// Share a VM factory instead of one VM: the holder creates up to --max-vms VMs of the
    /// --image images (they belong to this session and count against its quota), sees only
    /// those, and every VM it gets is narrowed by the exec/files/... options
    #[arg(long)]
    factory: bool,
    /// With --factory: VMs the holder may hold at once
    #[arg(long, value_name = "N", default_value_t = 1, requires = "factory")]
    max_vms: u32,
    /// With --factory: an image the holder may boot (repeatable) [default: base]
    #[arg(long = "image", value_name = "NAME", requires = "factory")]
    images: Vec<String>,
    /// With --factory: most memory per VM, MiB [default: the session's bound]
    #[arg(long, value_name = "MIB", requires = "factory")]
    memory: Option<u32>,
    /// With --factory: most vCPUs per VM [default: the session's bound]
    #[arg(long, value_name = "N", requires = "factory")]
    vcpus: Option<u32>,
    /// With --factory: an engine the holder's VMs may run on, qemu or kvm (repeatable)
    /// [default: both]; a VM asking auto runs on what auto means here, and only if listed
    #[arg(long = "engine", value_name = "ENGINE", requires = "factory", value_parser = parse_listed_engine)]
    engines: Vec<Engine>,
    /// With --factory: a volume of this principal the holder's VMs may attach (repeatable)
    #[arg(long = "attach-volume", value_name = "NAME", requires = "factory")]
    attach_volumes: Vec<String>,
    /// With --factory: only read-only attachments of those volumes
    #[arg(long, requires = "factory")]
    volumes_ro: bool,
    /// With --factory: add a view of the --attach-volume volumes as "volumes" (list and get
    /// only)
    #[arg(long, requires = "factory")]
    with_volumes: bool,
    /// Any program may run (instead of --exec lists)
    #[arg(long, conflicts_with = "exec")]
    exec_any: bool,
    /// Add this session's NetLog, narrowed to the shared VM (with --factory: to the VMs the
    /// holder makes), as "netlog"
    #[arg(long)]
    with_netlog: bool,
    /// Add a read-only view of this session's egress rules as "netpolicy"
    #[arg(long)]
    with_netpolicy: bool,
    /// Every exec waits for this session's decision (`capvisor approvals`, `capvisor approve
    /// ID [--always|--deny]`); no decision in time denies it
    #[arg(long)]
    ask: bool,
    /// How long the grant lives: 30s, 10m, 2h, 7d (never past this session's end)
    #[arg(long, value_name = "DURATION")]
    ttl: String,
    /// A label shown in `shares` and the audit log (at most 128 bytes)
    #[arg(long, default_value = "")]
    label: String,
    /// The name the holder's CapSet gives the VM [default: the VM's name, or "vms" for --factory]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// A program the holder may run: `argv[0]` exactly, a name looked up in the guest's PATH
    /// or an absolute path (repeatable; none: no exec)
    #[arg(long = "exec", value_name = "PROGRAM")]
    exec: Vec<String>,
    /// Every program runs as this guest user
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Every program starts in this guest directory
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Programs may run on a pseudo-terminal (`vm shell`)
    #[arg(long)]
    pty: bool,
    /// File access
    #[arg(long, value_enum, default_value = "none")]
    files: FilesArg,
    /// With --files rw: an absolute guest path under which writing is allowed (repeatable)
    #[arg(long = "write-prefix", value_name = "PATH")]
    write_prefixes: Vec<String>,
    /// The holder may stop the VM
    #[arg(long)]
    stop: bool,
    /// A guest port the holder may connect to (`vm port`; repeatable)
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Most calls through the grant in all (0: no budget)
    #[arg(long, default_value_t = 0)]
    budget: u64,
    /// Give the grant to this principal ("alice" = local:alice, or "password:bob") instead of
    /// printing a token
    #[arg(long, value_name = "PRINCIPAL")]
    to: Option<String>,
    /// The holder may share onward (narrower and never longer)
    #[arg(long)]
    reshare: bool,
}

/// `<n><unit>` (ms, s, m, h, d, w) in milliseconds.
fn parse_ttl(t: &str) -> ClientResult<i64> {
    crate::audit::parse_duration_ms(t.trim())
        .filter(|ms| *ms > 0)
        .ok_or_else(|| ClientError::Usage(format!("--ttl {t:?}: want a duration such as 30s, 10m, 2h or 7d")))
}

/// The names of the CapSet entries of interface `Vm` of a delegate session
/// (empty for any other session: its VMs come from `vms`).
pub async fn held_vms(s: &session::Client, delegate: bool) -> ClientResult<Vec<String>> {
    if !delegate {
        return Ok(Vec::new());
    }
    let caps = ops::list_caps(&ops::cap_set(s)).await?;
    Ok(caps.into_iter().filter(|c| c.interface_id == vm::Client::TYPE_ID).map(|c| c.name).collect())
}

/// The VM named `name` as this session reaches it: `cap:NAME` is the
/// CapSet entry NAME (a VM shared with this principal by `share --to`); a
/// name in `held` (a delegate session's shared VMs, [`held_vms`]) is that
/// CapSet entry; any other name is `vms.get(name)` (the session's own
/// factory, or a shared narrowed one).
pub fn vm_of(s: &session::Client, held: &[String], name: &str) -> vm::Client {
    match name.strip_prefix("cap:") {
        Some(entry) => ops::get_cap::<vm::Client>(&ops::cap_set(s), entry),
        None if held.iter().any(|h| h == name) => ops::get_cap::<vm::Client>(&ops::cap_set(s), name),
        None => ops::get_vm(&ops::vms(s), name),
    }
}

/// Writes the exec, files, stop and port options into a `VmNarrowing`
/// (the budget is the caller's: it belongs to the shared cap as a whole).
fn vm_narrowing_of(a: &ShareArgs, mut n: vm_narrowing::Builder<'_>) {
    let mut l = n.reborrow().init_exec_allow(a.exec.len() as u32);
    for (i, p) in a.exec.iter().enumerate() {
        l.set(i as u32, p.as_str());
    }
    n.set_exec_any(a.exec_any);
    n.set_ask_exec(a.ask);
    n.set_exec_user(a.user.as_deref().unwrap_or(""));
    n.set_exec_cwd(a.cwd.as_deref().unwrap_or(""));
    n.set_allow_pty(a.pty);
    n.set_files(match a.files {
        FilesArg::None => FilesAccess::None,
        FilesArg::Ro => FilesAccess::ReadOnly,
        FilesArg::Rw => FilesAccess::ReadWrite,
    });
    let mut l = n.reborrow().init_write_prefixes(a.write_prefixes.len() as u32);
    for (i, p) in a.write_prefixes.iter().enumerate() {
        l.set(i as u32, p.as_str());
    }
    n.set_allow_stop(a.stop);
    let mut l = n.reborrow().init_ports(a.ports.len() as u32);
    for (i, p) in a.ports.iter().enumerate() {
        l.set(i as u32, *p);
    }
}

fn shares_cap(s: &session::Client) -> shares::Client {
    ops::get_cap::<shares::Client>(&ops::cap_set(s), "shares")
}

/// `capvisor share`: prints the token on stdout (nothing with --to) and
/// the grant on stderr.
pub async fn share(s: &session::Client, held: &[String], a: ShareArgs) -> ClientResult<i32> {
    let ttl_ms = parse_ttl(&a.ttl)?;
    // The narrowed cap goes into share() pipelined, before narrow() answers.
    let mut extra: Vec<(&str, capnp::capability::Client)> = Vec::new();
    let (name, narrowed) = match &a.vm {
        Some(vm_name) => {
            let mut req = vm_of(s, held, vm_name).narrow_request();
            {
                let mut n = req.get().init_narrowing();
                n.set_call_budget(a.budget);
                vm_narrowing_of(&a, n);
            }
            if a.with_netlog {
                let mut req = ops::net_log(s).narrow_request();
                req.get().init_vms(1).set(0, vm_name.as_str());
                extra.push(("netlog", req.send().pipeline.get_log().client));
            }
            (a.name.clone().unwrap_or_else(|| vm_name.clone()), req.send().pipeline.get_vm().client)
        }
        None => {
            let mut req = ops::vms(s).narrow_request();
            {
                let mut n = req.get().init_narrowing();
                n.set_max_vms(a.max_vms);
                let images = if a.images.is_empty() { vec!["base".to_string()] } else { a.images.clone() };
                let mut l = n.reborrow().init_images(images.len() as u32);
                for (i, im) in images.iter().enumerate() {
                    l.set(i as u32, im.as_str());
                }
                n.set_max_memory_mib(a.memory.unwrap_or(0));
                n.set_max_vcpus(a.vcpus.unwrap_or(0));
                n.set_call_budget(a.budget);
                let mut l = n.reborrow().init_volumes(a.attach_volumes.len() as u32);
                for (i, v) in a.attach_volumes.iter().enumerate() {
                    l.set(i as u32, v.as_str());
                }
                n.set_volumes_read_only(a.volumes_ro);
                let mut l = n.reborrow().init_engines(a.engines.len() as u32);
                for (i, e) in a.engines.iter().enumerate() {
                    l.set(i as u32, *e);
                }
                vm_narrowing_of(&a, n.init_vm_narrowing());
            }
            let factory = req.send().pipeline.get_vms();
            if a.with_netlog {
                extra.push(("netlog", factory.net_log_request().send().pipeline.get_log().client));
            }
            if a.with_volumes {
                let mut req = ops::volumes(s).narrow_request();
                let mut l = req.get().init_volume_names(a.attach_volumes.len() as u32);
                for (i, v) in a.attach_volumes.iter().enumerate() {
                    l.set(i as u32, v.as_str());
                }
                extra.push(("volumes", req.send().pipeline.get_volumes().client));
            }
            (a.name.clone().unwrap_or_else(|| "vms".into()), factory.client)
        }
    };
    if a.with_netpolicy {
        extra.push(("netpolicy", ops::net_policy(s).read_only_request().send().pipeline.get_policy().client));
    }
    let mut req = shares_cap(s).share_request();
    {
        let mut spec = req.get().init_spec();
        let mut caps = spec.reborrow().init_caps(1 + extra.len() as u32);
        let mut c = caps.reborrow().get(0);
        c.set_name(name.as_str());
        c.init_cap().set_as_capability(narrowed.hook);
        for (i, (n, cap)) in extra.into_iter().enumerate() {
            let mut c = caps.reborrow().get(1 + i as u32);
            c.set_name(n);
            c.init_cap().set_as_capability(cap.hook);
        }
        spec.set_label(a.label.as_str());
        spec.set_ttl_ms(ttl_ms);
        spec.set_to(a.to.as_deref().unwrap_or(""));
        spec.set_reshare(a.reshare);
    }
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    let g = r.get_grant()?;
    let id = text(g.get_id())?;
    let token = text(r.get_token())?;
    let to = text(g.get_to())?;
    eprintln!(
        "capvisor: grant {id} ({}) until {}{}",
        text(g.get_what())?,
        crate::audit::rfc3339(g.get_expires_at_ms()),
        if to.is_empty() { String::new() } else { format!(", for {to} at their next login") }
    );
    if !token.is_empty() {
        eprintln!("capvisor: the token below is shown once; redeem it with `capvisor login --token-stdin`");
        println!("{token}");
    }
    Ok(0)
}

/// `capvisor shares`: this session's grants, newest first.
pub async fn list(s: &session::Client, json: bool) -> ClientResult<i32> {
    let resp = shares_cap(s).list_request().send().promise.await?;
    let grants = resp.get()?.get_grants()?;
    if !json {
        println!(
            "{:<18} {:<16} {:<8} {:<20} {:<20} {:>6} {:<18} WHAT",
            "ID", "LABEL", "STATE", "EXPIRES", "LAST USE", "CALLS", "PARENT"
        );
    }
    for g in grants.iter() {
        let (id, label, what, to, parent) =
            (text(g.get_id())?, text(g.get_label())?, text(g.get_what())?, text(g.get_to())?, text(g.get_parent())?);
        let state = if g.get_revoked() { "ended" } else { "live" };
        let last = match g.get_last_used_ms() {
            0 => "never".to_string(),
            ms => crate::audit::rfc3339(ms),
        };
        if json {
            let v = serde_json::json!({
                "id": id, "label": label, "state": state, "what": what, "to": to, "parent": parent,
                "createdAtMs": g.get_created_at_ms(), "expiresAtMs": g.get_expires_at_ms(),
                "lastUsedMs": g.get_last_used_ms(), "calls": g.get_calls(), "redeemed": g.get_redeemed(),
            });
            println!("{v}");
        } else {
            let what = if to.is_empty() { what } else { format!("{what} (to {to})") };
            println!(
                "{:<18} {:<16} {:<8} {:<20} {:<20} {:>6} {:<18} {}",
                id,
                crate::shown(&label),
                state,
                crate::audit::rfc3339(g.get_expires_at_ms()),
                last,
                g.get_calls(),
                if parent.is_empty() { "-" } else { &parent },
                crate::shown(&what)
            );
        }
    }
    Ok(0)
}

/// `capvisor revoke ID`.
pub async fn revoke(s: &session::Client, id: &str) -> ClientResult<i32> {
    let mut req = shares_cap(s).revoke_request();
    req.get().set_grant_id(id);
    req.send().promise.await?;
    eprintln!("capvisor: grant {id} revoked, with every grant made through it");
    Ok(0)
}

/// Reads a share token from the first line of standard input.
pub fn read_token() -> ClientResult<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| ClientError::Usage(format!("reading the token: {e}")))?;
    let t = line.trim().to_string();
    if t.is_empty() {
        return Err(ClientError::Usage("no token on standard input".into()));
    }
    Ok(t)
}
