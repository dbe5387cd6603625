//! `capvisor`: the command line client (and `capvisor serve`, the server).
//! Every command but `serve` and `login` attaches to the saved session
//! (see `capvisor_client::config`) and drives its capabilities by name.

use capvisor_client::config::{self, SavedSession};
use capvisor_client::ops::{self, ExecRequest, VmSpec};
use capvisor_client::{connect, stream};
use capvisor_client::{ClientError, ClientResult};
use capvisor_rpc::error::printable;
use capvisor_rpc::schema::capvisor_capnp::session;
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

mod audit;
mod call;
mod mcp;
mod schema;
mod secret;
mod share;

#[derive(Parser)]
#[command(
    name = "capvisor",
    version,
    about = "Linux microVMs for AI agents and operators, reachable only through Cap'n Proto capabilities",
    long_about = "capvisor runs Linux microVMs; a capability is the only way to start, reach or control one.\n\n\
Start the server with `capvisor serve`, log in with `capvisor login` (your Unix user gets the owner \
profile), then create VMs and run commands in them. Your login is kept as a resume token in \
$CAPVISOR_CONFIG_DIR/session.json (default ~/.config/capvisor) until `capvisor logout` or expiry.\n\n\
Exit codes: the guest command's own code for `vm exec` and `run` (128+N if killed by signal N); \
1 other failure, 2 usage, 10 denied, 11 not found, 12 wrong interface, 13 quota, 14 stale session, \
15 invalid argument, 16 already exists, 17 unavailable, 18 internal, 19 not running, 20 disconnected, \
21 not logged in, 22 in use (a volume another running VM holds)."
)]
struct Cli {
    /// Gateway socket [default: $XDG_RUNTIME_DIR/capvisor/gateway.sock or /tmp/capvisor-UID/gateway.sock]
    #[arg(long, global = true, env = "CAPVISOR_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the capvisor server (supervisor, gateway, broker) in the foreground until Ctrl-C / SIGTERM.
    Serve {
        /// Manifest (TOML) with profiles, bundles and images [default: the embedded manifest]
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Run as this service user (start as root): serve makes the socket, state and cache
        /// directories for it [default: /run/capvisor/gateway.sock, /var/lib/capvisor,
        /// /var/cache/capvisor, or --socket, CAPVISOR_STATE_DIR, CAPVISOR_CACHE_DIR], then drops
        /// to its uid, gid and groups before anything starts. The manifest must be readable by it.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Build (or find in the cache) every image the manifest defines, print where they are,
        /// and exit without serving: warms the cache ahead of time (the debian image's first
        /// build takes minutes and needs the Debian mirror).
        #[arg(long)]
        prepare: bool,
    },
    /// Log in and save the session's resume token. Without --user: by your Unix credentials.
    Login {
        /// Password account name
        #[arg(long, requires = "password_stdin")]
        user: Option<String>,
        /// Read the password from the first line of standard input
        #[arg(long, requires = "user")]
        password_stdin: bool,
        /// Redeem a share token (`capvisor share`) read from the first line of standard input:
        /// the session holds exactly the shared capabilities (profile `delegate`)
        #[arg(long, conflicts_with = "user")]
        token_stdin: bool,
    },
    /// End the session: its caps stop working, its VMs stop, its token is forgotten.
    Logout,
    /// Show who the saved session is.
    Whoami,
    /// List the capabilities this session holds (name, interface, what it grants).
    Caps,
    /// List the guest images this session may boot (name, kind, kernel, root image size).
    Images,
    /// Show the interfaces, methods, parameter and result types and docs of this session's
    /// caps (`schema CAP` for one in full, `--all` for the whole embedded schema, `--json`).
    #[command(long_about = schema::ABOUT)]
    Schema(schema::SchemaArgs),
    /// Call any method of any cap of this session by name, parameters and results as JSON
    /// (`call vms.list`, `call vms.create spec='{"name":"x"}' --as x`, `call x.info`).
    #[command(long_about = call::ABOUT)]
    Call(call::CallArgs),
    /// Query the audit log by time, VM, grant, principal and action (cap `audit`, owner
    /// profile: it shows every principal's records).
    #[command(long_about = audit::ABOUT)]
    Audit(audit::AuditArgs),
    /// Serve MCP (Model Context Protocol) for an AI agent over stdio, or streamable HTTP on
    /// loopback: one tool per method of this session's caps, plus vm_create, vm_exec,
    /// file_read and file_write.
    #[command(long_about = mcp::ABOUT)]
    Mcp(mcp::McpArgs),
    /// Share a narrowed VM as a grant: a token printed once (or --to a principal), ended by
    /// `revoke`, its --ttl or this session's end (cap `shares`).
    #[command(long_about = share::ABOUT)]
    Share(share::ShareArgs),
    /// List this session's grants (and the ones made through them): id, label, state, expiry,
    /// last use, calls.
    Shares {
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant (an id from `shares`) and every grant made through it: each of their
    /// caps fails with staleSession from then on, calls in flight included.
    Revoke {
        /// The grant id (g + 16 hex digits)
        id: String,
    },
    /// Create, list, use and remove VMs (cap `vms`).
    #[command(subcommand)]
    Vm(VmCmd),
    /// One shot: create a VM, run a command in it, remove the VM; exits with the command's code.
    Run {
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        exec: ExecArgs,
        /// The command and its arguments
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Manage password accounts (cap `accounts`, owner profile only).
    #[command(subcommand)]
    Account(AccountCmd),
    /// Persistent volumes (cap `volumes`): ext4 disks that outlive VMs,
    /// logouts and restarts; attach with `vm create --volume NAME:/path`.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Secrets for the egress proxy (cap `secrets`): stored encrypted by the server; guests
    /// see only the placeholder `capvisor-secret:NAME` (`--secret VAR=NAME` on `vm exec` / `run`).
    #[command(subcommand, long_about = secret::ABOUT)]
    Secret(secret::SecretCmd),
    /// Guest network egress through the session's proxy (caps `netpolicy`, `netlog`).
    #[command(subcommand)]
    Net(NetCmd),
    /// List what waits for this session's decision (cap `approvals`): guest connections its
    /// `ask` egress rules hold, and execs through caps shared with `--ask`; each waits until
    /// `capvisor approve` or the timeout (deny).
    Approvals,
    /// Decide a held connection or exec: allow it once (default), `--always` (a connection:
    /// also put an allow rule for its host and port first; an exec: that program through
    /// that cap from now on), or `--deny`.
    Approve {
        /// The id `capvisor approvals` shows
        id: u64,
        /// Allow, and allow this host and port from now on
        #[arg(long, conflicts_with = "deny")]
        always: bool,
        /// Deny instead
        #[arg(long)]
        deny: bool,
    },
}

#[derive(Subcommand)]
enum NetCmd {
    /// Show this session's egress rules (first match wins; no match is deny), or change them.
    /// Changes apply to connections opened from then on, without restarting VMs.
    Rules {
        /// Replace the rules with those of a TOML file of `[[rules]]` tables
        /// (keys as in the manifest's `[[net.rules]]`: host, port, scheme, method,
        /// path_prefix, action, no_mitm)
        #[arg(long, value_name = "FILE", conflicts_with_all = ["allow", "deny"])]
        set: Option<PathBuf>,
        #[arg(long, value_name = "HOST[:PORT]", help = "Put an allow rule for HOST[:PORT] first (repeatable)")]
        allow: Vec<String>,
        #[arg(long, value_name = "HOST[:PORT]", help = "Put a deny rule for HOST[:PORT] first (repeatable)")]
        deny: Vec<String>,
    },
    /// Recent guest network flows (decision, rule, bytes), oldest first.
    Log {
        /// Only this VM's flows
        #[arg(long)]
        vm: Option<String>,
        /// Keep printing new flows as they come (Ctrl-C ends)
        #[arg(short, long)]
        follow: bool,
    },
}

/// `capvisor net rules --set FILE`: a TOML file of `[[rules]]`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<capvisor_manifest::NetRuleConfig>,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create an empty volume (ext4) of this principal.
    Create {
        /// Name: 1-32 of [a-z0-9-]
        name: String,
        /// Size: MiB, or with a unit (512M, 10G); writes past it fail with ENOSPC in the guest
        #[arg(long, value_parser = parse_size_mib)]
        size: u64,
    },
    /// List this principal's volumes (size, host disk used, which running VMs hold them).
    List,
    /// Delete a volume and its data (refused while a running VM holds it).
    Rm { name: String },
}

/// Parses a volume size: a number of MiB, or one with a unit `M`/`MiB`,
/// `G`/`GiB` or `T`/`TiB` (binary units).
fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}: want e.g. 512M or 10G"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mib" | "mb" => 1,
        "g" | "gib" | "gb" => 1024,
        "t" | "tib" | "tb" => 1024 * 1024,
        _ => return Err(format!("bad size unit in {s:?}: use M, G or T")),
    };
    n.checked_mul(mult).filter(|v| *v > 0).ok_or_else(|| format!("bad size {s:?}"))
}

#[derive(Args, Clone)]
struct SpecArgs {
    /// Guest image
    #[arg(long, default_value = "base")]
    image: String,
    /// Guest memory in MiB [default: the profile's default]
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Number of vCPUs
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Engine: auto (kvm where /dev/kvm is hardware-backed, else qemu), qemu or kvm
    #[arg(long, default_value = "auto", value_parser = capvisor_rpc::names::parse_engine)]
    engine: capvisor_rpc::schema::capvisor_capnp::Engine,
    #[arg(
        long = "volume",
        value_name = "NAME:/PATH[:ro]",
        help = "Attach a volume: NAME:/guest/path[:ro] (repeatable, at most 4). Read-write is exclusive: \
                refused while another running VM holds the volume"
    )]
    volumes: Vec<capvisor_client::ops::VolumeMount>,
}

#[derive(Args, Clone)]
struct ExecArgs {
    /// Forward standard input (default: when stdin is not a terminal)
    #[arg(short, long)]
    interactive: bool,
    /// Environment variable NAME=VALUE (repeatable)
    #[arg(short, long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Set VAR to the placeholder `capvisor-secret:NAME` of this principal's secret NAME
    /// (repeatable; see `capvisor secret --help`): the value never enters the VM, the
    /// egress proxy puts it into HTTPS request headers for the secret's hosts only.
    /// Fails (not found) when there is no such secret.
    #[arg(long = "secret", value_name = "VAR=NAME")]
    secret: Vec<String>,
    /// Working directory in the guest (default: the user's home with
    /// --user, else /)
    #[arg(long, default_value = "")]
    cwd: String,
    /// Run as this user of the guest (name or numeric uid; default root)
    #[arg(short, long, default_value = "")]
    user: String,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a VM; returns once its guest agent answers.
    Create {
        /// Name: 1-32 of [a-z0-9-] [default: vm-N]
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// List this session's VMs.
    List,
    /// Show one VM.
    Info { name: String },
    /// Run a command in a VM, streaming its output; exits with its exit code.
    Exec {
        name: String,
        #[command(flatten)]
        exec: ExecArgs,
        /// The command and its arguments
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// An interactive shell (pseudo-terminal) in a VM.
    Shell {
        name: String,
        /// Program to run
        #[arg(long, default_value = "/bin/sh")]
        program: String,
        /// Run as this user of the guest (name or numeric uid; default root);
        /// the shell starts in that user's home
        #[arg(short, long, default_value = "")]
        user: String,
    },
    /// Copy a file between host and guest: `vm cp ./f NAME:/path` or `vm cp NAME:/path ./f`.
    Cp { src: String, dst: String },
    /// Forward TCP connections from the host's loopback to a port in the guest, each
    /// through `Vm.connect`: `vm port NAME HOSTPORT:GUESTPORT` (HOSTPORT 0: any free
    /// port; the chosen one is printed). Runs until Ctrl-C.
    Port {
        name: String,
        #[arg(value_name = "HOSTPORT:GUESTPORT")]
        ports: String,
    },
    /// Stop a VM (it stays listed until `vm rm`).
    Stop { name: String },
    /// Stop and forget a VM.
    Rm { name: String },
}

#[derive(Subcommand)]
enum AccountCmd {
    /// Add a password account; the password is read from stdin.
    Add {
        name: String,
        /// Profile the account logs in with (e.g. user)
        #[arg(long)]
        profile: String,
        /// Read the password from the first line of standard input (required)
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List password accounts.
    List,
    /// Remove a password account.
    Rm { name: String },
}

use capvisor_rpc::schema::capvisor_capnp::{ApprovalDecision, NetAction};

fn main() {
    let cli = Cli::parse();
    if let Cmd::Serve { manifest, user, prepare } = &cli.cmd {
        if *prepare {
            std::process::exit(prepare_images(manifest.as_deref()));
        }
        std::process::exit(serve(cli.socket.clone(), manifest.clone(), user.as_deref()));
    }
    let socket = cli.socket.clone().unwrap_or_else(capvisor_rpc::paths::gateway_socket);
    capvisor_rpc::conn::run_local(async {
        let code = match run(cli.cmd, &socket).await {
            Ok(code) => code,
            Err(e) => report(&e),
        };
        // Exit from inside the runtime: a stdin reader parked in tokio's
        // blocking pool (forwarding a terminal) would otherwise keep the
        // runtime's shutdown waiting for a key press.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(code)
    })
}

fn report(e: &ClientError) -> i32 {
    // Messages can quote guest output (a boot failure's console tail): no
    // terminal control character from them reaches the terminal raw.
    match e {
        ClientError::Domain(d) => eprintln!("capvisor: {} [{}]", printable(&d.message, true), d.code_name()),
        other => eprintln!("capvisor: {}", printable(&other.to_string(), true)),
    }
    e.exit_code()
}

/// One line of server- or guest-supplied text, safe for the terminal.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    printable(text, false)
}

/// `capvisor serve`: as the calling user (socket in its runtime directory
/// unless `--socket`), or with `--user` as that service user (see
/// `capvisor_supervisor::identity`).
fn serve(socket: Option<PathBuf>, manifest: Option<PathBuf>, user: Option<&str>) -> i32 {
    capvisor_rpc::init_logging("serve");
    let (socket, state_dir, cache_dir) = match user {
        None => (
            socket.unwrap_or_else(|| capvisor_rpc::paths::runtime_dir().join("gateway.sock")),
            capvisor_rpc::paths::state_dir(),
            capvisor_rpc::paths::cache_dir(),
        ),
        Some(name) => match become_service_user(name, socket, manifest.as_deref()) {
            Ok(paths) => paths,
            Err(e) => {
                eprintln!("capvisor serve: {e:#}");
                return 1;
            }
        },
    };
    let bin_dir = capvisor_rpc::paths::bin_dir();
    let guest_init = std::env::var_os("CAPVISOR_GUEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("capvisor-guest-init"));
    let opts = capvisor_supervisor::ServeOptions {
        manifest_path: manifest,
        socket,
        state_dir,
        cache_dir,
        bin_dir,
        guest_init,
    };
    match capvisor_supervisor::serve(opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("capvisor serve: {e:#}");
            1
        }
    }
}

/// `serve --prepare`: builds the manifest's images into the cache and
/// lists them; exit 0, or 1 with the error.
fn prepare_images(manifest: Option<&Path>) -> i32 {
    capvisor_rpc::init_logging("serve");
    let bin_dir = capvisor_rpc::paths::bin_dir();
    let guest_init = std::env::var_os("CAPVISOR_GUEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("capvisor-guest-init"));
    let res = capvisor_supervisor::load_manifest(manifest)
        .and_then(|(m, _)| capvisor_supervisor::build_images(&m, &capvisor_rpc::paths::cache_dir(), &guest_init));
    match res {
        Ok(images) => {
            for (name, i) in images {
                let root = i.rootfs.as_ref().map(|r| format!(", root {}", r.display())).unwrap_or_default();
                println!("{name}: kernel {} ({}){root}", i.kernel.display(), i.kernel_release);
            }
            0
        }
        Err(e) => {
            eprintln!("capvisor serve --prepare: {e:#}");
            1
        }
    }
}

/// `serve --user NAME`: the service paths, made for `name`, and this
/// process dropped to `name` (the manifest is read first for its
/// `[gateway] socket_group`).
fn become_service_user(
    name: &str,
    socket: Option<PathBuf>,
    manifest: Option<&Path>,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use capvisor_supervisor::identity;
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("--user {name} needs root: start `capvisor serve --user` as root, or leave --user out");
    }
    let (m, _) = capvisor_supervisor::load_manifest(manifest)?;
    let user = identity::ServiceUser::lookup(name)?;
    let (socket, state, cache) = identity::service_paths(socket);
    identity::become_service_user(&user, &socket, &state, &cache, m.gateway.socket_gid)?;
    eprintln!("capvisor: serving as {} (uid {}, gid {})", user.name, user.uid, user.gid);
    Ok((socket, state, cache))
}

fn read_password() -> ClientResult<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        return Err(ClientError::Usage("empty password on standard input".into()));
    }
    Ok(pw)
}

async fn session(socket: &Path) -> ClientResult<(session::Client, SavedSession)> {
    connect::attach_saved(socket).await
}

fn parse_env(env: &[String]) -> ClientResult<Vec<(String, String)>> {
    env.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(ClientError::Usage(format!("--env wants NAME=VALUE, got {kv:?}"))),
        })
        .collect()
}

fn spec_of(name: Option<String>, s: &SpecArgs) -> VmSpec {
    VmSpec {
        name: name.unwrap_or_default(),
        image: s.image.clone(),
        memory_mib: s.memory_mib.unwrap_or(0),
        vcpus: s.vcpus,
        engine: s.engine,
        volumes: s.volumes.clone(),
    }
}

async fn run(cmd: Cmd, socket: &Path) -> ClientResult<i32> {
    match cmd {
        Cmd::Serve { .. } => unreachable!("handled in main"),
        Cmd::Login { user, token_stdin, .. } => {
            let info = match user {
                _ if token_stdin => connect::redeem(socket, &share::read_token()?).await?,
                Some(u) => {
                    let pw = read_password()?;
                    connect::login_password(socket, &u, &pw).await?
                }
                None => connect::login_local(socket).await?,
            };
            let saved = SavedSession {
                socket: socket.to_path_buf(),
                token: info.token,
                principal: info.principal.to_string(),
                profile: info.profile.clone(),
                expires_at_ms: info.expires_at_ms,
            };
            config::save(&config::session_file(), &saved)?;
            eprintln!(
                "logged in as {} (profile {}); session saved in {}",
                info.principal,
                info.profile,
                config::session_file().display()
            );
            Ok(0)
        }
        Cmd::Logout => {
            let path = config::session_file();
            let r = match session(socket).await {
                Ok((s, _)) => ops::logout(&s).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    config::clear(&path)?;
                    eprintln!("logged out; the session's VMs were stopped");
                    Ok(0)
                }
                Err(ClientError::Domain(e))
                    if e.code == capvisor_rpc::schema::common_capnp::ErrorCode::StaleSession =>
                {
                    config::clear(&path)?;
                    eprintln!("the saved session had already ended; forgot it");
                    Ok(0)
                }
                Err(e) => Err(e),
            }
        }
        Cmd::Whoami => {
            let (s, _) = session(socket).await?;
            let i = ops::session_info(&s).await?;
            println!(
                "principal {}\nprofile   {}\nsession   {}\nexpires   {} (unix ms)",
                i.principal, i.profile, i.session_id, i.expires_at_ms
            );
            Ok(0)
        }
        Cmd::Caps => {
            let (s, _) = session(socket).await?;
            let caps = ops::list_caps(&ops::cap_set(&s)).await?;
            println!("{:<10} {:<10} {:<18} DESCRIPTION", "NAME", "INTERFACE", "INTERFACE ID");
            for c in caps {
                println!("{:<10} {:<10} {:#018x} {}", c.name, c.interface_name, c.interface_id, c.description);
            }
            Ok(0)
        }
        Cmd::Schema(args) => schema::run(args, socket).await,
        Cmd::Call(args) => call::run(args, socket).await,
        Cmd::Mcp(args) => mcp::run(args, socket).await,
        Cmd::Images => {
            let (s, _) = session(socket).await?;
            let images = ops::list_images(&ops::vms(&s)).await?;
            println!("{:<12} {:<7} {:<24} {:>10} {:>10}", "NAME", "KIND", "KERNEL", "ROOT IMAGE", "WRITABLE");
            for i in images {
                let mib = |m: u64| if m == 0 { "-".to_string() } else { format!("{m} MiB") };
                println!(
                    "{:<12} {:<7} {:<24} {:>10} {:>10}",
                    i.name,
                    i.kind,
                    i.kernel_release,
                    mib(i.rootfs_bytes.div_ceil(1 << 20)),
                    mib(i.writable_mib)
                );
            }
            Ok(0)
        }
        Cmd::Audit(a) => {
            let (s, _) = session(socket).await?;
            audit::run(a, &s).await
        }
        Cmd::Share(a) => {
            let (s, saved) = session(socket).await?;
            let held = share::held_vms(&s, saved.profile == DELEGATE).await?;
            share::share(&s, &held, a).await
        }
        Cmd::Shares { json } => {
            let (s, _) = session(socket).await?;
            share::list(&s, json).await
        }
        Cmd::Revoke { id } => {
            let (s, _) = session(socket).await?;
            share::revoke(&s, &id).await
        }
        Cmd::Vm(v) => vm_cmd(v, socket).await,
        Cmd::Volume(v) => volume_cmd(v, socket).await,
        Cmd::Secret(c) => {
            let (s, _) = session(socket).await?;
            secret::run(c, &s).await
        }
        Cmd::Net(n) => net_cmd(n, socket).await,
        Cmd::Approvals => {
            let (s, _) = session(socket).await?;
            let list = ops::pending_approvals(&ops::approvals(&s)).await?;
            println!(
                "{:>6} {:<12} {:<28} {:>5} {:<6} {:<7} {:>8}  PATH",
                "ID", "VM", "HOST", "PORT", "SCHEME", "METHOD", "EXPIRES"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let (net, execs): (Vec<_>, Vec<_>) = list.into_iter().partition(|a| a.kind != "exec");
            for a in net {
                println!(
                    "{:>6} {:<12} {:<28} {:>5} {:<6} {:<7} {:>7}s  {}",
                    a.id,
                    shown(&a.vm),
                    shown(&a.host),
                    a.port,
                    shown(&a.scheme),
                    shown(&a.method),
                    (a.expires_at_ms - now).max(0) / 1000,
                    shown(&a.path)
                );
            }
            if !execs.is_empty() {
                println!("\n{:>20} {:<12} {:>8}  {:<28} COMMAND", "EXEC ID", "VM", "EXPIRES", "GRANTS");
            }
            for a in execs {
                println!(
                    "{:>20} {:<12} {:>7}s  {:<28} {}",
                    a.id,
                    shown(&a.vm),
                    (a.expires_at_ms - now).max(0) / 1000,
                    shown(&a.grants),
                    shown(&a.argv.join(" "))
                );
            }
            Ok(0)
        }
        Cmd::Approve { id, always, deny } => {
            let (s, _) = session(socket).await?;
            let decision = if deny {
                ApprovalDecision::Deny
            } else if always {
                ApprovalDecision::AllowAlways
            } else {
                ApprovalDecision::AllowOnce
            };
            ops::decide(&ops::approvals(&s), id, decision).await?;
            eprintln!(
                "capvisor: connection {id} {}",
                match decision {
                    ApprovalDecision::Deny => "denied",
                    ApprovalDecision::AllowAlways if id >> 63 == 1 =>
                        "allowed, and that program through that cap from now on",
                    ApprovalDecision::AllowAlways => "allowed, and its host and port from now on",
                    ApprovalDecision::AllowOnce => "allowed once",
                }
            );
            Ok(0)
        }
        Cmd::Run { spec, exec, cmd } => {
            let (s, _) = session(socket).await?;
            let f = ops::vms(&s);
            eprintln!("capvisor: booting a {} VM ...", spec.image);
            let vm = ops::create_vm(&f, &spec_of(None, &spec));
            let info = ops::vm_info(&vm).await?;
            eprintln!("capvisor: {} up in {} ms (kernel {})", info.name, info.boot_ms, shown(&info.kernel_release));
            let res = tokio::select! {
                r = exec_streaming(&vm, &exec, cmd) => r,
                _ = tokio::signal::ctrl_c() => Ok(130),
            };
            let rm = ops::remove_vm(&f, &info.name).await;
            let code = res?;
            rm?;
            Ok(code)
        }
        Cmd::Account(a) => {
            let (s, _) = session(socket).await?;
            let acc = ops::accounts(&s);
            match a {
                AccountCmd::Add { name, profile, .. } => {
                    let pw = read_password()?;
                    ops::add_account(&acc, &name, &profile, &pw).await?;
                    eprintln!("account {name} added (profile {profile})");
                }
                AccountCmd::List => {
                    println!("{:<24} PROFILE", "NAME");
                    for (n, p) in ops::list_accounts(&acc).await? {
                        println!("{n:<24} {p}");
                    }
                }
                AccountCmd::Rm { name } => {
                    ops::remove_account(&acc, &name).await?;
                    eprintln!("account {name} removed");
                }
            }
            Ok(0)
        }
    }
}

fn print_rules(rules: &[ops::NetRule]) {
    println!("{:>3}  {:<6} {:<28} {:>5} {:<6} {:<7} PATH", "#", "ACTION", "HOST", "PORT", "SCHEME", "METHOD");
    for (i, r) in rules.iter().enumerate() {
        let port = if r.port == 0 { "*".to_string() } else { r.port.to_string() };
        let or_any = |s: &str| if s.is_empty() { "*".to_string() } else { s.to_string() };
        println!(
            "{:>3}  {:<6} {:<28} {:>5} {:<6} {:<7} {}{}",
            i,
            ops::action_name(r.action),
            r.host,
            port,
            or_any(&r.scheme),
            or_any(&r.method),
            or_any(&r.path_prefix),
            if r.no_mitm { "  (no MITM)" } else { "" }
        );
    }
    if rules.is_empty() {
        println!("  (no rules: every connection is denied)");
    }
}

fn print_flow(f: &ops::NetFlow) {
    let rule = if f.rule < 0 { "-".to_string() } else { f.rule.to_string() };
    let request = if f.method.is_empty() { "-".to_string() } else { format!("{} {}", f.method, f.path) };
    let status = if f.status == 0 { "-".to_string() } else { f.status.to_string() };
    println!(
        "{:<13} {:<12} {:<6} {:>4} {:<28} {:>5} {:<32} {:>6} {:>9} {:>9}  {}",
        f.time_ms,
        shown(&f.vm),
        ops::action_name(f.action),
        rule,
        shown(&f.host),
        f.port,
        shown(&request),
        status,
        f.bytes_up,
        f.bytes_down,
        shown(&f.detail)
    );
}

async fn net_cmd(cmd: NetCmd, socket: &Path) -> ClientResult<i32> {
    let (s, _) = session(socket).await?;
    match cmd {
        NetCmd::Rules { set, allow, deny } => {
            let p = ops::net_policy(&s);
            if let Some(file) = set {
                let text = std::fs::read_to_string(&file)?;
                let parsed: RulesFile =
                    toml::from_str(&text).map_err(|e| ClientError::Usage(format!("{}: {e}", file.display())))?;
                let rules: Vec<ops::NetRule> = parsed
                    .rules
                    .iter()
                    .map(|r| {
                        let action = match r.action.as_str() {
                            "allow" => NetAction::Allow,
                            "deny" => NetAction::Deny,
                            "ask" => NetAction::Ask,
                            other => {
                                return Err(ClientError::Usage(format!(
                                    "{}: action must be allow, deny or ask (got {other:?})",
                                    file.display()
                                )))
                            }
                        };
                        Ok(ops::NetRule {
                            host: r.host.clone(),
                            port: r.port,
                            scheme: r.scheme.clone(),
                            method: r.method.clone(),
                            path_prefix: r.path_prefix.clone(),
                            action,
                            no_mitm: r.no_mitm,
                        })
                    })
                    .collect::<ClientResult<_>>()?;
                ops::set_rules(&p, &rules).await?;
                eprintln!("capvisor: {} rules set", rules.len());
            } else if !allow.is_empty() || !deny.is_empty() {
                let mut added = Vec::new();
                for (specs, action) in [(&allow, NetAction::Allow), (&deny, NetAction::Deny)] {
                    for spec in specs {
                        added.push(ops::NetRule::parse_spec(spec, action).map_err(ClientError::Usage)?);
                    }
                }
                let mut rules = ops::get_rules(&p).await?;
                let n = added.len();
                rules.splice(0..0, added);
                ops::set_rules(&p, &rules).await?;
                eprintln!("capvisor: {n} rule(s) put first");
            }
            print_rules(&ops::get_rules(&p).await?);
            Ok(0)
        }
        NetCmd::Log { vm, follow } => {
            let l = ops::net_log(&s);
            let vm = vm.unwrap_or_default();
            println!(
                "{:<13} {:<12} {:<6} {:>4} {:<28} {:>5} {:<32} {:>6} {:>9} {:>9}  DETAIL",
                "TIME_MS", "VM", "ACTION", "RULE", "HOST", "PORT", "REQUEST", "STATUS", "UP", "DOWN"
            );
            let mut since = 0i64;
            let mut seen = std::collections::HashSet::new();
            loop {
                for f in ops::recent_flows(&l, &vm, since, 0).await? {
                    // A flow is printed once; its byte counts are final
                    // when it has ended (a later poll may show more).
                    if seen.insert((f.time_ms, f.vm.clone(), f.host.clone(), f.port)) {
                        print_flow(&f);
                    }
                    since = since.max(f.time_ms);
                }
                if !follow {
                    return Ok(0);
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

async fn volume_cmd(cmd: VolumeCmd, socket: &Path) -> ClientResult<i32> {
    let (s, _) = session(socket).await?;
    let v = ops::volumes(&s);
    match cmd {
        VolumeCmd::Create { name, size } => {
            eprintln!("capvisor: formatting {name} ({size} MiB) ...");
            let i = ops::create_volume(&v, &name, size).await?;
            eprintln!("capvisor: volume {} created ({} MiB)", i.name, i.size_mib);
            println!("{}", i.name);
            Ok(0)
        }
        VolumeCmd::List => {
            println!("{:<20} {:>10} {:>10}  ATTACHED TO", "NAME", "SIZE_MIB", "USED_MIB");
            for i in ops::list_volumes(&v).await? {
                let att: Vec<String> = i
                    .attached_to
                    .iter()
                    .map(|(vm, this, ro)| {
                        format!(
                            "{vm} ({}{})",
                            if *ro { "ro" } else { "rw" },
                            if *this { "" } else { ", another session" }
                        )
                    })
                    .collect();
                println!(
                    "{:<20} {:>10} {:>10}  {}",
                    i.name,
                    i.size_mib,
                    i.used_bytes.div_ceil(1 << 20),
                    if att.is_empty() { "-".to_string() } else { att.join(", ") }
                );
            }
            Ok(0)
        }
        VolumeCmd::Rm { name } => {
            ops::remove_volume(&v, &name).await?;
            eprintln!("capvisor: volume {name} removed (its data is deleted)");
            Ok(0)
        }
    }
}

/// The profile of a session redeemed from a share token.
const DELEGATE: &str = "delegate";

async fn vm_cmd(cmd: VmCmd, socket: &Path) -> ClientResult<i32> {
    let (s, saved) = session(socket).await?;
    let f = ops::vms(&s);
    // A delegate session holds shared VMs as CapSet entries, not a factory.
    let held = share::held_vms(&s, saved.profile == DELEGATE).await?;
    let get = |name: &str| share::vm_of(&s, &held, name);
    match cmd {
        VmCmd::Create { name, spec } => {
            eprintln!("capvisor: booting ...");
            let vm = ops::create_vm(&f, &spec_of(name, &spec));
            let i = ops::vm_info(&vm).await?;
            eprintln!(
                "capvisor: {} running ({} MiB, {} vCPU, kernel {}, up in {} ms)",
                i.name,
                i.memory_mib,
                i.vcpus,
                shown(&i.kernel_release),
                i.boot_ms
            );
            println!("{}", i.name);
            Ok(0)
        }
        VmCmd::List => {
            println!(
                "{:<16} {:<9} {:<8} {:>7} {:>5} {:<8} KERNEL",
                "NAME", "STATE", "IMAGE", "MEM_MIB", "VCPU", "ENGINE"
            );
            for i in ops::list_vms(&f).await? {
                println!(
                    "{:<16} {:<9} {:<8} {:>7} {:>5} {:<8} {}",
                    i.name,
                    ops::state_name(i.state),
                    i.image,
                    i.memory_mib,
                    i.vcpus,
                    ops::engine_name(i.engine),
                    shown(&i.kernel_release)
                );
            }
            Ok(0)
        }
        VmCmd::Info { name } => {
            let i = ops::vm_info(&get(&name)).await?;
            println!(
                "name     {}\nstate    {}\nimage    {}\nmemory   {} MiB\nvcpus    {}\nengine   {}\nkernel   {}\nboot     {} ms",
                i.name,
                ops::state_name(i.state),
                i.image,
                i.memory_mib,
                i.vcpus,
                ops::engine_name(i.engine),
                shown(&i.kernel_release),
                i.boot_ms
            );
            for m in &i.volumes {
                println!("volume   {} on {} ({})", m.volume, m.guest_path, if m.read_only { "ro" } else { "rw" });
            }
            if !i.detail.is_empty() {
                println!("detail   {}", shown(&i.detail));
            }
            Ok(0)
        }
        VmCmd::Exec { name, exec, cmd } => {
            let vm = get(&name);
            exec_streaming(&vm, &exec, cmd).await
        }
        VmCmd::Shell { name, program, user } => {
            let vm = get(&name);
            shell(&vm, program, &user).await
        }
        VmCmd::Cp { src, dst } => copy(&get, &src, &dst).await,
        VmCmd::Port { name, ports } => forward_port(&get(&name), &name, &ports).await,
        VmCmd::Stop { name } => {
            ops::stop_vm(&get(&name)).await?;
            eprintln!("capvisor: {name} stopped");
            Ok(0)
        }
        VmCmd::Rm { name } => {
            ops::remove_vm(&f, &name).await?;
            eprintln!("capvisor: {name} removed");
            Ok(0)
        }
    }
}

/// Runs `cmd` in `vm` with output streamed to our stdout/stderr and stdin
/// forwarded (when -i or not a terminal); returns the command's exit code.
/// Runs `cmd` in `vm` with output streamed to our stdout/stderr and stdin
/// forwarded (when -i or not a terminal); returns the command's exit code.
async fn exec_streaming(
    vm: &capvisor_rpc::schema::capvisor_capnp::vm::Client,
    a: &ExecArgs,
    cmd: Vec<String>,
) -> ClientResult<i32> {
    let forward = a.interactive || !std::io::stdin().is_terminal();
    let req = ExecRequest {
        argv: cmd,
        env: parse_env(&a.env)?,
        cwd: a.cwd.clone(),
        stdin: vec![],
        keep_stdin_open: forward,
        pty: None,
        user: a.user.clone(),
        secret_env: secret::parse_flags(&a.secret)?,
    };
    let stdin = forward.then(tokio::io::stdin);
    let exit = stream::exec_streaming(vm, &req, tokio::io::stdout(), tokio::io::stderr(), stdin).await?;
    Ok(exit.shell_code())
}

fn term_size() -> (u16, u16) {
    // SAFETY: winsize is plain integers; all-zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize; fd 1 may not be a tty (then we default).
    if unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
        (ws.ws_row, ws.ws_col)
    } else {
        (24, 80)
    }
}

/// Puts the terminal in raw mode until dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enable() -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        match tcgetattr(&stdin) {
            Ok(orig) => {
                let mut raw = orig.clone();
                cfmakeraw(&mut raw);
                let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
                RawMode(Some(orig))
            }
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, orig);
        }
    }
}

async fn shell(
    vm: &capvisor_rpc::schema::capvisor_capnp::vm::Client,
    program: String,
    user: &str,
) -> ClientResult<i32> {
    let (resize_tx, resizes) = tokio::sync::mpsc::unbounded_channel();
    tokio::task::spawn_local(async move {
        let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
            return;
        };
        while winch.recv().await.is_some() {
            if resize_tx.send(term_size()).is_err() {
                return;
            }
        }
    });
    let _raw = RawMode::enable();
    // Root starts in /root (the base image's passwd may not say so);
    // another user in its home from the guest's passwd.
    let cwd = if user.is_empty() { "/root" } else { "" };
    let exit = stream::pty_session_as(
        vm,
        user,
        vec![program],
        cwd,
        term_size(),
        tokio::io::stdout(),
        tokio::io::stdin(),
        resizes,
    )
    .await?;
    Ok(exit.shell_code())
}

/// `vm port`: listens on 127.0.0.1:HOSTPORT and joins each accepted
/// connection to a `Vm.connect(GUESTPORT)` stream, both directions with
/// half-close. Prints the bound port on stdout, then runs until Ctrl-C.
async fn forward_port(
    vm: &capvisor_rpc::schema::capvisor_capnp::vm::Client,
    name: &str,
    ports: &str,
) -> ClientResult<i32> {
    let usage = || ClientError::Usage(format!("want HOSTPORT:GUESTPORT (e.g. 8080:80), got {ports:?}"));
    let (h, g) = ports.split_once(':').ok_or_else(usage)?;
    let (host_port, guest_port): (u16, u16) = (h.parse().map_err(|_| usage())?, g.parse().map_err(|_| usage())?);
    // The VM must exist and run before we listen.
    ops::vm_info(vm).await?;
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, host_port)).await?;
    let bound = listener.local_addr()?.port();
    eprintln!("capvisor: forwarding 127.0.0.1:{bound} -> {name}:{guest_port} (Ctrl-C stops)");
    {
        use std::io::Write;
        println!("{bound}");
        std::io::stdout().flush()?;
    }
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => r?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let vm = vm.clone();
        tokio::task::spawn_local(async move {
            let (rd, wr) = sock.into_split();
            let (down, _done) = capvisor_rpc::sink::WriterSink::client(wr);
            match ops::connect_port(&vm, guest_port, down).await {
                Ok(up) => {
                    let _ = capvisor_rpc::sink::pump(rd, &up).await;
                }
                Err(ClientError::Domain(d)) => {
                    eprintln!("capvisor: connection from {peer}: {} [{}]", printable(&d.message, true), d.code_name())
                }
                Err(e) => eprintln!("capvisor: connection from {peer}: {}", printable(&e.to_string(), true)),
            }
        });
    }
}

/// `NAME:/path` -> (NAME, /path); a plain local path -> None.
/// `VM:/path` (or `cap:VM:/path` for a VM shared with this principal) into
/// the VM part and the guest path; `None` for a host path.
fn guest_path(s: &str) -> Option<(&str, &str)> {
    let split = |skip: usize| -> Option<(&str, &str)> {
        let (name, path) = s[skip..].split_once(':')?;
        let name = &s[..skip + name.len()];
        (name.len() > skip && !name.contains('/') && path.starts_with('/')).then_some((name, path))
    };
    s.starts_with("cap:").then(|| split(4)).flatten().or_else(|| split(0))
}

async fn copy(
    get: &dyn Fn(&str) -> capvisor_rpc::schema::capvisor_capnp::vm::Client,
    src: &str,
    dst: &str,
) -> ClientResult<i32> {
    match (guest_path(src), guest_path(dst)) {
        (None, Some((name, path))) => {
            let path = if path.ends_with('/') {
                format!("{path}{}", Path::new(src).file_name().and_then(|n| n.to_str()).unwrap_or("file"))
            } else {
                path.to_string()
            };
            let n = stream::copy_to_guest(&ops::files(&get(name)), Path::new(src), &path).await?;
            eprintln!("capvisor: {n} bytes -> {name}:{path}");
            Ok(0)
        }
        (Some((name, path)), None) => {
            let n = stream::copy_from_guest(&ops::files(&get(name)), path, Path::new(dst)).await?;
            eprintln!("capvisor: {name}:{path} -> {dst} ({n} bytes)");
            Ok(0)
        }
        _ => Err(ClientError::Usage(
            "vm cp wants exactly one side as NAME:/absolute/path and the other a local path".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn guest_paths_name_a_vm_or_a_shared_cap() {
        use super::guest_path;
        assert_eq!(guest_path("dev:/tmp/x"), Some(("dev", "/tmp/x")));
        assert_eq!(guest_path("cap:box:/work/x"), Some(("cap:box", "/work/x")));
        assert_eq!(guest_path("cap:/x"), Some(("cap", "/x")), "a VM named cap");
        assert_eq!(guest_path("./notes.txt"), None);
        assert_eq!(guest_path("cap::/x"), None);
        assert_eq!(guest_path("a/b:/x"), None);
    }
}
