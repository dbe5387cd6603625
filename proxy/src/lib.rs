//! `capvisor-proxy`: one session's egress proxy (docs/processes.md,
//! "capvisor-proxy"; issue 9). Every TCP connection and DNS query a guest
//! makes arrives here through guest-init as `Egress` calls on the VM's
//! "capvisor.egress" port; the proxy judges it by the session's rules,
//! resolves names itself, refuses non-public addresses unless a rule names
//! the host, relays the bytes and logs each decision.
//!
//! - [`policy`]: rules, matching, `NetPolicy` (live `get`/`set`);
//! - [`resolve`]: resolution (overrides, system resolver) and the
//!   non-public address check;
//! - [`relay`]: the `Egress` server, TCP relay with flow control;
//! - [`peek`]: what a connection's first bytes show (TLS SNI, HTTP
//!   request line), for rules on scheme, method and path;
//! - [`log`]: the bounded NetLog ring and its server;
//! - [`approvals`]: connections `ask` rules hold for a decision, and the
//!   `Approvals` server;
//! - [`sandbox`]: the process's own Landlock domain.
//!
//! The binary (`src/main.rs`) is a thin shell over [`run`]; tests drive
//! [`ProxyState`], [`serve_vm`] and [`ProxyServer`] in-process.
//!
//! Shaped for the later slices: a decision is made on a
//! [`policy::Request`] with scheme, method and path (today filled from
//! the first bytes by [`peek`]; later by an HTTP/TLS interception layer
//! between [`relay`]'s `up` sink and the upstream socket), and `ask` has
//! its own [`policy::Action`].

pub mod approvals;
pub mod ca;
pub mod log;
pub mod mitm;
pub mod peek;
pub mod policy;
pub mod relay;
pub mod resolve;
pub mod sandbox;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capvisor_rpc::conn::{self, GUEST, GUEST_CALLS, INTERNAL};
use capvisor_rpc::fdpass::FdChannel;
use capvisor_rpc::{CvError, CvResult};
use capvisor_schema::capvisor_capnp::{approvals as approvals_cap, net_log, net_policy};
use capvisor_schema::internal_capnp::{proxy, proxy_config, secret_source};
use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;

/// Egress connections open (or being opened) at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Per VM.
    pub per_vm: usize,
    /// Per proxy (all the session's VMs).
    pub total: usize,
}

/// Default [`Limits`]: 256 per VM, 1024 per proxy. Each open connection
/// holds a TCP socket and a 64 KiB pump buffer here (about 16 MiB at the
/// total bound besides kernel socket buffers).
pub const LIMITS: Limits = Limits { per_vm: 256, total: 1024 };

/// Ports of protocols where the server speaks first (FTP, SSH, SMTP and
/// submission, POP3, IMAP, MySQL, VNC): never peeked for TLS to
/// intercept, since their clients send nothing until the server's banner
/// (a peek would hold them for the whole peek wait). Other server-first
/// services wait [`peek::PEEK_WAIT`] once per connection unless a
/// `noMitm` rule names them. A guest's TLS was measured to start up to
/// seconds after `connect` under TCG (GnuTLS loading the CA bundle), so a
/// shorter wait would let TLS through unintercepted.
pub const SERVER_FIRST_PORTS: &[u16] = &[21, 22, 25, 110, 143, 587, 3306, 5900];

/// The tag prefix of a VM socket on the fd channel: `vm:<name>`.
pub const VM_TAG: &str = "vm:";

/// The proxy's spawn configuration in Rust form (schema `ProxyConfig`).
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The session's id (for logs).
    pub session_id: String,
    /// Initial rules.
    pub rules: Vec<policy::Rule>,
    /// Names answered without DNS.
    pub resolve: Vec<(String, Vec<IpAddr>)>,
    /// NetLog entries kept (0: [`log::DEFAULT_CAPACITY`]).
    pub log_capacity: u32,
    /// TLS interception: the install's CA (None: TLS is relayed).
    pub ca: Option<ca::CaPem>,
    /// Roots upstream TLS is verified against besides the system's, PEM.
    pub extra_roots_pem: String,
    /// Whether the system's roots are loaded too (the process: yes; tests
    /// that trust only their own CA: no).
    pub system_roots: bool,
}

impl Config {
    /// Reads and validates the schema message.
    ///
    /// Errors: a bad rule (index and field), an override that is not a DNS
    /// name or whose address is not an IP literal, text that is not UTF-8.
    pub fn read_from(r: proxy_config::Reader<'_>) -> anyhow::Result<Self> {
        let rules = policy::read_rules(r.get_rules()?).map_err(|e| anyhow::anyhow!("rules: {}", e.message))?;
        let mut resolve = Vec::new();
        for o in r.get_resolve()? {
            let name = o.get_name()?.to_str()?.to_string();
            let mut addrs = Vec::new();
            for a in o.get_addresses()? {
                let a = a?.to_str()?;
                addrs.push(a.parse().map_err(|_| anyhow::anyhow!("resolve {name:?}: {a:?} is not an IP address"))?);
            }
            resolve.push((name, addrs));
        }
        let cert = r.get_ca_cert_pem()?.to_str()?.to_string();
        let key = r.get_ca_key_pem()?.to_str()?.to_string();
        anyhow::ensure!(cert.is_empty() == key.is_empty(), "caCertPem and caKeyPem come together");
        Ok(Self {
            session_id: r.get_session_id()?.to_str()?.to_string(),
            rules,
            resolve,
            log_capacity: r.get_log_capacity(),
            ca: (!cert.is_empty()).then_some(ca::CaPem { cert, key }),
            extra_roots_pem: r.get_extra_roots_pem()?.to_str()?.to_string(),
            system_roots: true,
        })
    }

    /// Writes the schema message (for whoever spawns the proxy).
    pub fn write(&self, mut b: proxy_config::Builder<'_>) {
        b.set_session_id(&self.session_id);
        let mut rules = b.reborrow().init_rules(self.rules.len() as u32);
        for (i, r) in self.rules.iter().enumerate() {
            r.write(rules.reborrow().get(i as u32));
        }
        let mut res = b.reborrow().init_resolve(self.resolve.len() as u32);
        for (i, (name, addrs)) in self.resolve.iter().enumerate() {
            let mut o = res.reborrow().get(i as u32);
            o.set_name(name);
            let mut l = o.init_addresses(addrs.len() as u32);
            for (j, a) in addrs.iter().enumerate() {
                l.set(j as u32, a.to_string());
            }
        }
        b.set_log_capacity(self.log_capacity);
        if let Some(ca) = &self.ca {
            b.set_ca_cert_pem(&ca.cert);
            b.set_ca_key_pem(&ca.key);
        }
        b.set_extra_roots_pem(&self.extra_roots_pem);
    }
}

/// What every VM of the session and the `Proxy` caps share.
pub struct ProxyState {
    /// The live rules.
    pub policy: policy::SharedPolicy,
    /// Recent flows.
    pub log: log::SharedLog,
    /// Upstream name resolution.
    pub resolver: resolve::Resolver,
    /// Connection bounds.
    pub limits: Limits,
    /// Bounds of the wait for a connection's first bytes.
    pub peek: peek::PeekLimits,
    /// Connections `ask` rules hold for a decision.
    pub approvals: Rc<approvals::Approvals>,
    /// TLS interception (None: TLS is relayed untouched).
    pub mitm: Option<mitm::Mitm>,
    /// Where secrets for placeholders come from (`Proxy.setSecretSource`).
    pub secrets: RefCell<Option<secret_source::Client>>,
    open: Cell<usize>,
}

impl ProxyState {
    /// The state `cfg` describes, with [`LIMITS`].
    ///
    /// Errors: invalid rules or overrides (see [`Config::read_from`]).
    pub fn new(cfg: Config) -> anyhow::Result<Rc<Self>> {
        Self::with_limits(cfg, LIMITS)
    }

    /// [`ProxyState::new`] with other connection bounds (tests).
    ///
    /// Errors: as [`ProxyState::new`].
    pub fn with_limits(cfg: Config, limits: Limits) -> anyhow::Result<Rc<Self>> {
        Self::with_bounds(cfg, limits, peek::PEEK)
    }

    /// [`ProxyState::with_limits`] with other peek bounds (tests: a short
    /// wait).
    ///
    /// Errors: as [`ProxyState::new`].
    pub fn with_bounds(cfg: Config, limits: Limits, peek: peek::PeekLimits) -> anyhow::Result<Rc<Self>> {
        let policy = policy::Policy::new(cfg.rules).map_err(|e| anyhow::anyhow!("rules: {}", e.message))?;
        let mitm = match &cfg.ca {
            Some(pem) => Some(mitm::Mitm {
                ca: ca::Authority::new(pem)?,
                upstream: ca::Upstream::new(cfg.system_roots, &cfg.extra_roots_pem)?,
            }),
            None => None,
        };
        Ok(Rc::new(Self {
            policy: Rc::new(RefCell::new(policy)),
            log: Rc::new(RefCell::new(log::FlowLog::new(cfg.log_capacity))),
            resolver: resolve::Resolver::new(cfg.resolve)?,
            limits,
            peek,
            approvals: approvals::Approvals::new(approvals::DEFAULT_ASK_TIMEOUT),
            mitm,
            secrets: RefCell::new(None),
            open: Cell::new(0),
        }))
    }

    /// Whether a connection to `host`:`port` may be intercepted (and so is
    /// peeked for a TLS ClientHello): the proxy has a CA, the port is not
    /// one of [`SERVER_FIRST_PORTS`], the first rule for the host and port
    /// does not say `noMitm`, and the connection is
    /// not denied outright (some rule on method or path may allow a
    /// request, or the policy does not deny `https` to it).
    pub fn may_intercept(&self, host: &str, port: u16) -> bool {
        if self.mitm.is_none() || SERVER_FIRST_PORTS.contains(&port) {
            return false;
        }
        let p = self.policy.borrow();
        if p.no_mitm(host, port) {
            return false;
        }
        let tls = policy::Request { host, port, scheme: policy::Scheme::Https, method: None, path: None };
        p.needs_peek(host, port) || p.decide(&tls).action != policy::Action::Deny
    }

    /// Egress connections open or being opened, all VMs.
    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Appends a decision to the NetLog (and, at debug level, the process
    /// log: the guest decides how many connections it opens, so an info line
    /// each would let it grow `proxy.log` without bound); returns its
    /// sequence number.
    pub fn record(&self, flow: log::Flow) -> u64 {
        tracing::debug!(
            vm = %flow.vm,
            host = %log::bounded(&flow.host),
            port = flow.port,
            address = %flow.address,
            rule = flow.rule,
            action = flow.action.name(),
            detail = %flow.detail,
            "egress"
        );
        self.log.borrow_mut().push(flow)
    }
}

/// Serves `Egress` for VM `vm` on `stream` (the host end of its
/// "capvisor.egress" port; this end is `Side::Server`, guest-init dials as
/// `Side::Client`), with the guest reader limits and call limits
/// ([`GUEST`], [`GUEST_CALLS`]: the guest is untrusted). The returned task
/// ends when the connection does, after closing the VM's flows.
///
/// Must be called inside a `LocalSet`. Errors: `invalidArgument` when
/// `vm` is not a valid VM name (`capvisor_rpc::names::valid_name`).
pub fn serve_vm(
    state: &Rc<ProxyState>,
    vm: &str,
    stream: tokio::net::UnixStream,
) -> CvResult<tokio::task::JoinHandle<()>> {
    if !capvisor_rpc::names::valid_name(vm) {
        return Err(CvError::invalid(format!("{vm:?} is not a VM name")));
    }
    let flows = relay::VmFlows::new(vm);
    let client = relay::EgressServer::client(state.clone(), flows.clone());
    let (system, _gauge) = conn::rpc_system_limited(stream, Side::Server, Some(client.client), GUEST, GUEST_CALLS);
    Ok(tokio::task::spawn_local(async move {
        if let Err(e) = system.await {
            tracing::debug!(vm = %flows.name(), "egress connection ended: {e}");
        }
        flows.close_all();
        tracing::info!(vm = %flows.name(), "egress port closed");
    }))
}

/// The `Proxy` bootstrap the worker gets.
pub struct ProxyServer {
    state: Rc<ProxyState>,
    policy: net_policy::Client,
    log: net_log::Client,
    approvals: approvals_cap::Client,
}

impl ProxyServer {
    /// A `Proxy` client over `state` (its `policy` and `log` are one
    /// object each for the proxy's life).
    pub fn client(state: &Rc<ProxyState>) -> proxy::Client {
        capnp_rpc::new_client(Self {
            state: state.clone(),
            policy: policy::NetPolicyServer::client(state.policy.clone()),
            log: log::NetLogServer::client(state.log.clone()),
            approvals: approvals::ApprovalsServer::client(state.approvals.clone(), state.policy.clone()),
        })
    }
}

impl proxy::Server for ProxyServer {
    /// Keeps the session's `SecretSource` (replacing an earlier one).
    async fn set_secret_source(
        self: capnp::capability::Rc<Self>,
        params: proxy::SetSecretSourceParams,
        _: proxy::SetSecretSourceResults,
    ) -> capnp::Result<()> {
        *self.state.secrets.borrow_mut() = Some(params.get()?.get_source()?);
        Ok(())
    }

    /// The session's `Approvals`.
    async fn approvals(
        self: capnp::capability::Rc<Self>,
        _: proxy::ApprovalsParams,
        mut results: proxy::ApprovalsResults,
    ) -> capnp::Result<()> {
        results.get().set_approvals(self.approvals.clone());
        Ok(())
    }

    /// The session's `NetPolicy`.
    async fn policy(
        self: capnp::capability::Rc<Self>,
        _: proxy::PolicyParams,
        mut results: proxy::PolicyResults,
    ) -> capnp::Result<()> {
        results.get().set_policy(self.policy.clone());
        Ok(())
    }

    /// The session's `NetLog`.
    async fn log(
        self: capnp::capability::Rc<Self>,
        _: proxy::LogParams,
        mut results: proxy::LogResults,
    ) -> capnp::Result<()> {
        results.get().set_log(self.log.clone());
        Ok(())
    }
}

/// The VM name in an fd-channel tag `vm:<name>`, if it is one.
pub fn vm_from_tag(tag: &[u8]) -> Option<&str> {
    let name = std::str::from_utf8(tag).ok()?.strip_prefix(VM_TAG)?;
    capvisor_rpc::names::valid_name(name).then_some(name)
}

/// The process's main loop: serves `Proxy` on `rpc` (toward the worker,
/// [`INTERNAL`] limits) and `Egress` on each VM socket arriving on `vms`
/// tagged `vm:<name>`; returns when the worker's connection ends. A
/// message with another tag is logged and its descriptor closed; the fd
/// channel closing stops only the arrival of new VMs.
///
/// Must be called inside a `LocalSet`.
pub async fn run(rpc: tokio::net::UnixStream, vms: FdChannel, state: Rc<ProxyState>) -> anyhow::Result<()> {
    let (_worker, mut conn_done) =
        conn::serve::<capnp::capability::Client>(rpc, ProxyServer::client(&state).client, INTERNAL);
    let mut vms = Some(vms);
    loop {
        let next = async {
            match &vms {
                Some(ch) => ch.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut conn_done => {
                tracing::info!("worker connection ended ({:?}): exiting", r.ok().and_then(Result::err));
                return Ok(());
            }
            m = next => match m {
                Ok((tag, fd)) => match vm_from_tag(&tag) {
                    Some(vm) => {
                        let stream = capvisor_rpc::spawn::into_tokio(fd)?;
                        serve_vm(&state, vm, stream)?;
                        tracing::info!(vm, "serving egress");
                    }
                    None => tracing::warn!("fd channel: ignoring a descriptor tagged {:?}", String::from_utf8_lossy(&tag)),
                },
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::info!("fd channel closed: no more VMs");
                    vms = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => tracing::warn!("fd channel: {e}"),
                Err(e) => {
                    tracing::warn!("fd channel failed, no more VMs: {e}");
                    vms = None;
                }
            }
        }
    }
}

/// A current-thread runtime with a `LocalSet` for unit tests.
#[cfg(test)]
pub(crate) fn test_runtime<F: std::future::Future>(f: F) -> F::Output {
    conn::run_local(f)
}
