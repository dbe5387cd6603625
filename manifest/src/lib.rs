//! capvisor's manifest: which auth methods the gateway offers, which
//! profiles exist, which bundle (capability names + limits) each profile
//! gets, and which guest images exist. TOML; the embedded default is
//! `manifest/default.toml` ([`DEFAULT_TOML`]). Also the immutable
//! [`SessionContext`] the broker hands each worker at spawn (schema
//! `internal.capnp` `SessionContext`, in the worker's config memfd).

use capvisor_rpc::error::{path_text, text};
use capvisor_rpc::principal::Principal;
use capvisor_rpc::schema::capvisor_capnp::Engine;
use capvisor_rpc::schema::internal_capnp::{built_image, bundle, session_context};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The embedded default manifest (`manifest/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// Capability names a bundle may list, with what each one grants.
pub const KNOWN_CAPS: &[(&str, &str)] = &[
    ("vms", "VmFactory: create, list, reach and remove this session's VMs"),
    ("accounts", "Accounts: add, list and remove password accounts"),
    ("volumes", "Volumes: create, list and remove this principal's persistent volumes, attached to VMs at create"),
    ("netpolicy", "NetPolicy: read and replace this session's egress rules (manifest [net])"),
    ("netlog", "NetLog: recent guest network flows of this session's VMs"),
    ("approvals", "Approvals: decide the guest connections this session's `ask` egress rules hold"),
    (
        "secrets",
        "Secrets: put, list and remove this principal's secrets; guests see only placeholders the egress proxy \
         replaces for the secret's hosts",
    ),
    ("shares", "Shares: hand narrowed caps to someone else as grants (a token, or a principal), list and revoke them"),
    (
        "audit",
        "Audit: query the install's audit log by time, VM, grant, principal and action (the holder sees every \
         principal's records)",
    ),
];

/// Kernel sources an image may name (`[images.NAME] kernel`), with what each one is.
pub const KNOWN_KERNELS: &[(&str, &str)] = &[
    (
        "debian-cloud",
        "Debian's linux-image-cloud-amd64 package; guest-init loads its virtio modules from the initramfs",
    ),
    (
        "minimal",
        "built from Debian's linux-source-6.1 with guest/kernel/capvisor.config, everything built in; \
         the first use builds it (minutes; see guest/kernel/README.md)",
    ),
];

/// A whole manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Gateway settings.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// Local (peer-credential) auth.
    #[serde(default)]
    pub local: LocalConfig,
    /// VM settings that hold for every session.
    #[serde(default)]
    pub vms: VmsConfig,
    /// Host-wide session limits.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Which confinement layers every VM must get.
    #[serde(default)]
    pub confinement: ConfinementConfig,
    /// Guest network egress through each session's proxy.
    #[serde(default)]
    pub net: NetConfig,
    /// Guest images by name.
    pub images: BTreeMap<String, ImageConfig>,
    /// Profiles by name; a principal gets exactly one.
    pub profiles: BTreeMap<String, Profile>,
    /// Bundles by name.
    pub bundles: BTreeMap<String, Bundle>,
}

/// `[gateway]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Enabled auth methods: `"local"`, `"password"`.
    pub auth: Vec<String>,
    /// Session (and resume token) lifetime, seconds.
    pub session_ttl_secs: u64,
    /// A group that may open the gateway socket (name or gid): the
    /// socket's directory becomes 0750 and the socket 0660 with this
    /// group. Absent: only the serving uid (directory 0700, socket 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<GroupSpec>,
    /// `socket_group` resolved to a gid by [`Manifest::parse`].
    #[serde(skip)]
    pub socket_gid: Option<u32>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            auth: vec!["local".into(), "password".into()],
            session_ttl_secs: 86400,
            socket_group: None,
            socket_gid: None,
        }
    }
}

/// A Unix group named in the manifest: by name (resolved with getgrnam(3)
/// when the manifest is loaded) or by gid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum GroupSpec {
    /// A numeric gid.
    Gid(u32),
    /// A group name.
    Name(String),
}

impl GroupSpec {
    /// The gid: the number, or the name looked up in the group database.
    ///
    /// Errors: a name the group database does not know.
    pub fn resolve(&self) -> std::io::Result<u32> {
        match self {
            GroupSpec::Gid(g) => Ok(*g),
            GroupSpec::Name(n) => capvisor_rpc::principal::resolve_group(n),
        }
    }
}

/// `[local]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Uids that get the `owner` profile by peer credentials; empty means
    /// the uid running `capvisor serve`.
    #[serde(default)]
    pub owner_uids: Vec<u32>,
    /// Profiles for other local uids and groups (`[[local.map]]`): a uid
    /// in `owner_uids` gets `owner`; otherwise the first rule naming the
    /// peer's uid, else the first rule naming one of its groups (primary
    /// or supplementary); a uid matching nothing is denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map: Vec<LocalRule>,
}

/// `[[local.map]]`: one local identity rule. Exactly one of `uid` and
/// `group` is set.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalRule {
    /// The uid this rule maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The group this rule maps (name or gid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupSpec>,
    /// The profile a matching peer gets (must exist).
    pub profile: String,
    /// `group` resolved to a gid by [`Manifest::parse`].
    #[serde(skip)]
    pub gid: Option<u32>,
}

impl LocalConfig {
    /// The profile of a local peer with `uid`, primary `gid` and
    /// supplementary `groups` by the `map` rules (not `owner_uids`, which
    /// the broker checks first): the first uid rule naming `uid` wins; else
    /// the first group rule whose gid is `gid` or in `groups`; else `None`.
    pub fn profile_for(&self, uid: u32, gid: u32, groups: &[u32]) -> Option<&str> {
        let by_uid = self.map.iter().find(|r| r.uid == Some(uid));
        let by_group = || self.map.iter().find(|r| r.gid.is_some_and(|g| g == gid || groups.contains(&g)));
        by_uid.or_else(by_group).map(|r| r.profile.as_str())
    }
}

/// `[vms]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmsConfig {
    /// What engine `auto` means: `"kvm"` or `"qemu"`; absent: detect
    /// (kvm where /dev/kvm is hardware-backed, else qemu).
    #[serde(default)]
    pub auto_engine: Option<String>,
    /// Most VMs running on this host at once, every session together.
    #[serde(default = "default_max_host_vms")]
    pub max_host_vms: u32,
    /// Most guest memory of the running VMs on this host, MiB; absent:
    /// three quarters of the host's memory (`MemTotal` in /proc/meminfo).
    #[serde(default)]
    pub max_host_memory_mib: Option<u64>,
}

/// The default of [`VmsConfig::max_host_vms`].
pub const DEFAULT_MAX_HOST_VMS: u32 = 64;

fn default_max_host_vms() -> u32 {
    DEFAULT_MAX_HOST_VMS
}

impl Default for VmsConfig {
    fn default() -> Self {
        Self { auto_engine: None, max_host_vms: DEFAULT_MAX_HOST_VMS, max_host_memory_mib: None }
    }
}

impl VmsConfig {
    /// The pinned meaning of `auto` (`Engine::Auto` = detect).
    pub fn auto_engine(&self) -> Engine {
        self.auto_engine.as_deref().and_then(|n| capvisor_rpc::names::parse_engine(n).ok()).unwrap_or(Engine::Auto)
    }
}

/// `[sessions]`: host-wide session limits (docs/bounds.md).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// Most live sessions on this host; a login beyond gets `quota`.
    pub max_total: u32,
    /// Of `max_total`, how many only `owner`-profile logins may use, so a
    /// flood of other principals' sessions never locks the owner out.
    pub reserved_for_owner: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self { max_total: 256, reserved_for_owner: 16 }
    }
}

/// Confinement layer names `[confinement] required` may list (the names
/// of `capvisor_confine::Layer`).
pub const CONFINEMENT_LAYERS: &[&str] = &["cgroup", "netns", "landlock"];

/// `[confinement]`: which confinement layers every VM must get
/// (docs/vmm-confinement.md). A required layer the host cannot give stops
/// the VM from starting (`unavailable` naming the layer and why, audited);
/// a layer left out of `required` is still applied when the host offers
/// it, and its absence is audited and logged.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfinementConfig {
    /// Layers that must hold, of [`CONFINEMENT_LAYERS`]: `cgroup` (the VM's
    /// vmm and QEMU in a cgroup with memory and pids limits), `netns` (QEMU
    /// in a fresh network namespace), `landlock` (QEMU under its Landlock
    /// ruleset). Default: all three.
    #[serde(default = "default_required_layers")]
    pub required: Vec<String>,
    /// Where the cgroup file systems are mounted (only hierarchies mounted
    /// below it are used). Default `/sys/fs/cgroup`.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
}

fn default_required_layers() -> Vec<String> {
    CONFINEMENT_LAYERS.iter().map(|s| s.to_string()).collect()
}

fn default_cgroup_root() -> PathBuf {
    "/sys/fs/cgroup".into()
}

impl Default for ConfinementConfig {
    fn default() -> Self {
        Self { required: default_required_layers(), cgroup_root: default_cgroup_root() }
    }
}

impl ConfinementConfig {
    /// The requirements as a worker gets them (schema `Confinement`).
    pub fn requirements(&self) -> capvisor_rpc::vmconfig::Confinement {
        let has = |l: &str| self.required.iter().any(|r| r == l);
        capvisor_rpc::vmconfig::Confinement {
            cgroup: has("cgroup"),
            netns: has("netns"),
            landlock: has("landlock"),
            cgroup_root: self.cgroup_root.clone(),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        for r in &self.required {
            anyhow::ensure!(
                CONFINEMENT_LAYERS.contains(&r.as_str()),
                "confinement.required: unknown layer {r:?} (known: {})",
                CONFINEMENT_LAYERS.join(", ")
            );
        }
        anyhow::ensure!(
            self.cgroup_root.is_absolute(),
            "confinement.cgroup_root: must be an absolute path (got {})",
            self.cgroup_root.display()
        );
        Ok(())
    }
}

/// `[net]`: guest network egress (docs/decisions.md, "Egress"). Every VM
/// gets the virtio-serial port `capvisor.egress` to its session's egress
/// proxy (`capvisor-proxy`) when `egress` is on; the proxy decides each
/// connection by `rules` (first match wins; no match is deny).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Give guests network egress through the proxy. Off: guests have no
    /// network at all.
    #[serde(default)]
    pub egress: bool,
    /// The rules every session starts with (a session holding `netpolicy`
    /// may replace its own).
    #[serde(default)]
    pub rules: Vec<NetRuleConfig>,
    /// Names the proxy answers without DNS: name -> IP literals (local
    /// services; the tests map `*.test` names to 127.0.0.1). A rule must
    /// still name such a host explicitly to reach a private address.
    #[serde(default)]
    pub resolve: BTreeMap<String, Vec<String>>,
    /// NetLog entries each proxy keeps (default [`DEFAULT_NET_LOG`]).
    #[serde(default)]
    pub log_capacity: Option<u32>,
    /// Seconds a connection held by an `ask` rule waits for a decision
    /// through `Approvals` before it is denied (default 60).
    #[serde(default)]
    pub ask_timeout_secs: Option<u32>,
    /// Intercept guests' TLS (default true): the proxy terminates it with
    /// a leaf the install's egress CA signs (the guest trusts that CA from
    /// boot), judges and logs each HTTP request and inserts secrets. A
    /// rule's `no_mitm` exempts one host. False: TLS is relayed untouched
    /// and judged by SNI and port only.
    #[serde(default = "yes")]
    pub intercept_tls: bool,
    /// PEM files of CAs the proxy trusts for upstream TLS besides the
    /// system's roots (a private registry, the tests' local upstreams).
    /// Read by the broker at start.
    #[serde(default)]
    pub ca_certs: Vec<String>,
    /// The interception material the broker prepared at start (never in a
    /// manifest file; carried to the worker in `SessionContext.net`).
    #[serde(skip)]
    pub interception: Option<Interception>,
}

fn yes() -> bool {
    true
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            egress: false,
            rules: Vec::new(),
            resolve: BTreeMap::new(),
            log_capacity: None,
            ask_timeout_secs: None,
            intercept_tls: true,
            ca_certs: Vec::new(),
            interception: None,
        }
    }
}

/// The egress CA and extra upstream roots, PEM (schema `ProxyConfig`
/// `caCertPem`, `caKeyPem`, `extraRootsPem`).
#[derive(Clone, PartialEq, Default)]
pub struct Interception {
    /// The install's egress CA certificate.
    pub ca_cert_pem: String,
    /// Its private key (secret: never logged; `Debug` hides it).
    pub ca_key_pem: String,
    /// The manifest's `ca_certs`, concatenated.
    pub extra_roots_pem: String,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("ca_cert_pem", &self.ca_cert_pem.len())
            .field("ca_key_pem", &"<redacted>")
            .field("extra_roots_pem", &self.extra_roots_pem.len())
            .finish()
    }
}

/// The default of [`NetConfig::log_capacity`].
pub const DEFAULT_NET_LOG: u32 = 4096;

/// One `[[net.rules]]` entry (schema `NetRule`; the fields mean what the
/// schema says).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetRuleConfig {
    /// Host glob: `*`, `*.example.org`, or exact.
    pub host: String,
    /// Port; 0 or absent: any.
    #[serde(default)]
    pub port: u16,
    /// `""` (any), `"tcp"`, `"http"` or `"https"`.
    #[serde(default)]
    pub scheme: String,
    /// HTTP method; `""`: any.
    #[serde(default)]
    pub method: String,
    /// HTTP path prefix; `""`: any.
    #[serde(default)]
    pub path_prefix: String,
    /// `"allow"`, `"deny"` or `"ask"`.
    pub action: String,
    /// Never intercept TLS to this host.
    #[serde(default)]
    pub no_mitm: bool,
}

impl NetConfig {
    fn validate(&self) -> anyhow::Result<()> {
        for (i, r) in self.rules.iter().enumerate() {
            anyhow::ensure!(!r.host.is_empty(), "net.rules[{i}].host must not be empty (\"*\" means any)");
            anyhow::ensure!(
                ["allow", "deny", "ask"].contains(&r.action.as_str()),
                "net.rules[{i}].action must be allow, deny or ask (got {:?})",
                r.action
            );
            anyhow::ensure!(
                ["", "tcp", "http", "https"].contains(&r.scheme.as_str()),
                "net.rules[{i}].scheme must be tcp, http or https (got {:?})",
                r.scheme
            );
        }
        for (name, addrs) in &self.resolve {
            anyhow::ensure!(
                !name.is_empty() && *name == name.to_ascii_lowercase(),
                "net.resolve: names are lower case ({name:?})"
            );
            for a in addrs {
                anyhow::ensure!(
                    a.parse::<std::net::IpAddr>().is_ok(),
                    "net.resolve.{name}: {a:?} is not an IP address"
                );
            }
        }
        Ok(())
    }

    /// Prepares TLS interception (when `egress` and `intercept_tls` are
    /// on): `ca` is the install's egress CA (certificate, key), and every
    /// `ca_certs` file is read now (the broker calls this before it
    /// confines itself).
    ///
    /// Errors: a `ca_certs` file that cannot be read or holds no PEM
    /// certificate.
    pub fn prepare_interception(&mut self, ca: (String, String)) -> anyhow::Result<()> {
        let mut extra = String::new();
        for path in &self.ca_certs {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("[net] ca_certs: cannot read {path}: {e}"))?;
            anyhow::ensure!(
                pem.contains("-----BEGIN CERTIFICATE-----"),
                "[net] ca_certs: {path} holds no PEM certificate"
            );
            extra.push_str(&pem);
            if !pem.ends_with('\n') {
                extra.push('\n');
            }
        }
        self.interception = Some(Interception { ca_cert_pem: ca.0, ca_key_pem: ca.1, extra_roots_pem: extra });
        Ok(())
    }

    /// Whether sessions intercept TLS: egress on and `intercept_tls`.
    pub fn intercepts(&self) -> bool {
        self.egress && self.intercept_tls
    }

    /// The proxy's configuration for session `session_id` (schema `ProxyConfig`).
    pub fn write_proxy_config(
        &self,
        session_id: &str,
        mut b: capvisor_rpc::schema::internal_capnp::proxy_config::Builder<'_>,
    ) {
        use capvisor_rpc::schema::capvisor_capnp::NetAction;
        b.set_session_id(session_id);
        let mut rules = b.reborrow().init_rules(self.rules.len() as u32);
        for (i, r) in self.rules.iter().enumerate() {
            let mut o = rules.reborrow().get(i as u32);
            o.set_host(r.host.as_str());
            o.set_port(r.port);
            o.set_scheme(r.scheme.as_str());
            o.set_method(r.method.as_str());
            o.set_path_prefix(r.path_prefix.as_str());
            o.set_action(match r.action.as_str() {
                "allow" => NetAction::Allow,
                "ask" => NetAction::Ask,
                _ => NetAction::Deny,
            });
            o.set_no_mitm(r.no_mitm);
        }
        let mut res = b.reborrow().init_resolve(self.resolve.len() as u32);
        for (i, (name, addrs)) in self.resolve.iter().enumerate() {
            let mut o = res.reborrow().get(i as u32);
            o.set_name(name.as_str());
            let mut l = o.init_addresses(addrs.len() as u32);
            for (j, a) in addrs.iter().enumerate() {
                l.set(j as u32, a.as_str());
            }
        }
        b.set_log_capacity(self.log_capacity.unwrap_or(DEFAULT_NET_LOG));
        b.set_ask_timeout_secs(self.ask_timeout_secs.unwrap_or(0));
        if let Some(i) = &self.interception {
            b.set_ca_cert_pem(i.ca_cert_pem.as_str());
            b.set_ca_key_pem(i.ca_key_pem.as_str());
            b.set_extra_roots_pem(i.extra_roots_pem.as_str());
        }
    }

    /// Reads what [`NetConfig::write_proxy_config`] wrote (`egress` is
    /// carried beside it, in `SessionContext.egress`).
    ///
    /// Errors: a malformed or non-UTF-8 field, an unknown action.
    pub fn read_proxy_config(
        egress: bool,
        r: capvisor_rpc::schema::internal_capnp::proxy_config::Reader<'_>,
    ) -> capnp::Result<Self> {
        use capvisor_rpc::schema::capvisor_capnp::NetAction;
        let mut rules = Vec::new();
        for o in r.get_rules()?.iter() {
            rules.push(NetRuleConfig {
                host: text(o.get_host())?,
                port: o.get_port(),
                scheme: text(o.get_scheme())?,
                method: text(o.get_method())?,
                path_prefix: text(o.get_path_prefix())?,
                action: match o.get_action()? {
                    NetAction::Allow => "allow",
                    NetAction::Deny => "deny",
                    NetAction::Ask => "ask",
                }
                .into(),
                no_mitm: o.get_no_mitm(),
            });
        }
        let mut resolve = BTreeMap::new();
        for o in r.get_resolve()?.iter() {
            let addrs = o.get_addresses()?.iter().map(text).collect::<capnp::Result<Vec<_>>>()?;
            resolve.insert(text(o.get_name())?, addrs);
        }
        let ca_cert_pem = text(r.get_ca_cert_pem())?;
        Ok(Self {
            egress,
            rules,
            resolve,
            log_capacity: Some(r.get_log_capacity()),
            ask_timeout_secs: Some(r.get_ask_timeout_secs()).filter(|s| *s != 0),
            intercept_tls: !ca_cert_pem.is_empty(),
            ca_certs: Vec::new(),
            interception: (!ca_cert_pem.is_empty())
                .then(|| -> capnp::Result<Interception> {
                    Ok(Interception {
                        ca_cert_pem,
                        ca_key_pem: text(r.get_ca_key_pem())?,
                        extra_roots_pem: text(r.get_extra_roots_pem())?,
                    })
                })
                .transpose()?,
        })
    }
}

/// The default of [`Bundle::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: u32 = 16;

fn default_max_sessions() -> u32 {
    DEFAULT_MAX_SESSIONS
}

/// `[images.NAME]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Kernel source (see [`KNOWN_KERNELS`]): `"debian-cloud"` (Debian's
    /// linux-image-cloud-amd64 + its virtio modules) or `"minimal"`
    /// (capvisor's own build from linux-source-6.1, no modules; faster to boot).
    pub kernel: String,
    /// Debian codename of a root-image image (see [`KNOWN_DISTRIBUTIONS`]);
    /// absent: [`DEFAULT_DISTRIBUTION`]. Only with `packages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<String>,
    /// Debian packages installed on top of the `minbase` variant into a
    /// read-only ext4 root image (capvisor-images `rootfs`). Empty: the
    /// busybox-in-initramfs kind (like `base`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Each VM's writable layer over the root image, MiB
    /// ([`WRITABLE_MIB_RANGE`]); absent: [`DEFAULT_WRITABLE_MIB`]. Only with `packages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_mib: Option<u64>,
}

/// Debian distributions an image may name (`[images.NAME] distribution`).
pub const KNOWN_DISTRIBUTIONS: &[(&str, &str)] = &[("bookworm", "Debian 12")];
/// The distribution of an image with `packages` and no `distribution`.
pub const DEFAULT_DISTRIBUTION: &str = "bookworm";
/// Each VM's writable layer when `writable_mib` is absent, MiB.
pub const DEFAULT_WRITABLE_MIB: u64 = 2048;
/// Allowed `writable_mib`, MiB (64 MiB .. 1 TiB).
pub const WRITABLE_MIB_RANGE: std::ops::RangeInclusive<u64> = 64..=1 << 20;

impl ImageConfig {
    /// Whether this image has a Debian root image (it lists `packages`).
    pub fn has_rootfs(&self) -> bool {
        !self.packages.is_empty()
    }

    /// The distribution codename (default [`DEFAULT_DISTRIBUTION`]).
    pub fn distribution(&self) -> &str {
        self.distribution.as_deref().unwrap_or(DEFAULT_DISTRIBUTION)
    }

    /// Each VM's writable layer, MiB: 0 without a root image, else
    /// `writable_mib` or [`DEFAULT_WRITABLE_MIB`].
    pub fn writable_mib(&self) -> u64 {
        if self.has_rootfs() {
            self.writable_mib.unwrap_or(DEFAULT_WRITABLE_MIB)
        } else {
            0
        }
    }

    /// Checks the root-image keys of `[images.<name>]`; errors name the key.
    fn validate(&self, name: &str) -> anyhow::Result<()> {
        if !self.has_rootfs() {
            anyhow::ensure!(
                self.distribution.is_none() && self.writable_mib.is_none(),
                "images.{name}: distribution and writable_mib need a non-empty packages list"
            );
            return Ok(());
        }
        let d = self.distribution();
        anyhow::ensure!(
            KNOWN_DISTRIBUTIONS.iter().any(|(k, _)| *k == d),
            "images.{name}.distribution: unknown distribution {d:?} (known: {})",
            KNOWN_DISTRIBUTIONS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        );
        for (i, p) in self.packages.iter().enumerate() {
            // Debian policy 5.6.1: lower case letters, digits, + - . ; at
            // least two characters, starting with an alphanumeric.
            let ok = p.len() >= 2
                && p.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            anyhow::ensure!(ok, "images.{name}.packages[{i}]: {p:?} is not a Debian package name");
        }
        let w = self.writable_mib();
        anyhow::ensure!(
            WRITABLE_MIB_RANGE.contains(&w),
            "images.{name}.writable_mib: {w} is outside {}..={} MiB",
            WRITABLE_MIB_RANGE.start(),
            WRITABLE_MIB_RANGE.end()
        );
        Ok(())
    }
}

/// `[profiles.NAME]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The bundle this profile receives.
    pub bundle: String,
}

/// `[bundles.NAME]`: what a session of this bundle may hold and do.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Capability names put in the CapSet (see [`KNOWN_CAPS`]).
    pub caps: Vec<String>,
    /// Most VMs the session may have at once (running or stopped, until removed).
    pub max_vms: u32,
    /// Most guest memory per VM, MiB.
    pub max_memory_mib: u32,
    /// Guest memory when the request says 0, MiB.
    pub default_memory_mib: u32,
    /// Most vCPUs per VM.
    pub max_vcpus: u32,
    /// Image names the session may boot.
    pub images: Vec<String>,
    /// Most live sessions one principal of this bundle may hold at once; a
    /// login beyond gets `quota` (default [`DEFAULT_MAX_SESSIONS`]).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// Most VMs running at once for one principal, all its sessions
    /// together; absent: `max_sessions * max_vms` (no bound beyond the
    /// per-session ones).
    #[serde(default)]
    pub max_principal_vms: Option<u32>,
    /// Most guest memory of one principal's running VMs, all its sessions
    /// together, MiB; absent: no bound beyond the per-session ones.
    #[serde(default)]
    pub max_principal_memory_mib: Option<u64>,
    /// Most volumes one principal of this bundle may keep (with the
    /// `volumes` cap; default [`DEFAULT_MAX_VOLUMES`]); one more is `quota`.
    #[serde(default = "default_max_volumes")]
    pub max_volumes: u32,
    /// Most MiB all of one principal's volumes may total (default
    /// [`DEFAULT_MAX_VOLUME_TOTAL_MIB`]); a create beyond is `quota`.
    #[serde(default = "default_max_volume_total_mib")]
    pub max_volume_total_mib: u64,
}

/// The default of [`Bundle::max_volumes`].
pub const DEFAULT_MAX_VOLUMES: u32 = 8;
/// The default of [`Bundle::max_volume_total_mib`] (16 GiB).
pub const DEFAULT_MAX_VOLUME_TOTAL_MIB: u64 = 16 * 1024;

fn default_max_volumes() -> u32 {
    DEFAULT_MAX_VOLUMES
}

fn default_max_volume_total_mib() -> u64 {
    DEFAULT_MAX_VOLUME_TOTAL_MIB
}

impl Bundle {
    /// [`Bundle::max_principal_vms`] with its default applied.
    pub fn principal_vms(&self) -> u32 {
        self.max_principal_vms.unwrap_or(self.max_sessions.saturating_mul(self.max_vms))
    }
}

impl Bundle {
    /// Whether the bundle holds capability `name`.
    pub fn has_cap(&self, name: &str) -> bool {
        self.caps.iter().any(|c| c == name)
    }
}

impl Manifest {
    /// Parses and validates TOML.
    ///
    /// Errors: TOML syntax, unknown keys, a profile naming a missing bundle,
    /// a bundle naming an unknown cap or image, a default memory above the
    /// maximum, an unknown auth method, an unknown image kernel source, no
    /// `owner` profile, a `[[local.map]]` rule naming an unknown profile or
    /// group (or both or neither of uid and group), an unknown
    /// `gateway.socket_group`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut m: Manifest = toml::from_str(text)?;
        m.resolve_groups()?;
        m.validate()?;
        Ok(m)
    }

    /// The embedded default.
    pub fn default_manifest() -> Self {
        Self::parse(DEFAULT_TOML).expect("embedded default manifest is valid")
    }

    /// Resolves group names (`gateway.socket_group`, `local.map[i].group`)
    /// to gids from the group database (getgrnam(3)), once, at load.
    ///
    /// Errors: a group name the database does not know, naming the key.
    pub fn resolve_groups(&mut self) -> anyhow::Result<()> {
        if let Some(g) = &self.gateway.socket_group {
            self.gateway.socket_gid = Some(g.resolve().map_err(|e| anyhow::anyhow!("gateway.socket_group: {e}"))?);
        }
        for (i, r) in self.local.map.iter_mut().enumerate() {
            if let Some(g) = &r.group {
                r.gid = Some(g.resolve().map_err(|e| anyhow::anyhow!("local.map[{i}].group: {e}"))?);
            }
        }
        Ok(())
    }

    /// Checks cross references (see [`Manifest::parse`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        for (i, r) in self.local.map.iter().enumerate() {
            anyhow::ensure!(r.uid.is_some() != r.group.is_some(), "local.map[{i}]: give exactly one of uid and group");
            anyhow::ensure!(
                self.profiles.contains_key(&r.profile),
                "local.map[{i}].profile: profile {:?} is not defined",
                r.profile
            );
            anyhow::ensure!(
                r.group.is_none() || r.gid.is_some(),
                "local.map[{i}].group: not resolved (load with Manifest::parse)"
            );
        }
        anyhow::ensure!(
            self.gateway.socket_group.is_none() || self.gateway.socket_gid.is_some(),
            "gateway.socket_group: not resolved (load with Manifest::parse)"
        );
        for a in &self.gateway.auth {
            anyhow::ensure!(
                capvisor_rpc::principal::parse_method(a).is_some(),
                "gateway.auth: unknown method {a:?} (known: local, password)"
            );
        }
        if let Some(e) = &self.vms.auto_engine {
            let parsed = capvisor_rpc::names::parse_engine(e).map_err(|m| anyhow::anyhow!("vms.auto_engine: {m}"))?;
            anyhow::ensure!(parsed != Engine::Auto, "vms.auto_engine: name kvm or qemu (leave it out to detect)");
        }
        anyhow::ensure!(self.profiles.contains_key("owner"), "profiles: an `owner` profile is required");
        for (p, prof) in &self.profiles {
            anyhow::ensure!(
                self.bundles.contains_key(&prof.bundle),
                "profiles.{p}: bundle {:?} is not defined",
                prof.bundle
            );
        }
        for (b, bundle) in &self.bundles {
            for c in &bundle.caps {
                anyhow::ensure!(
                    KNOWN_CAPS.iter().any(|(k, _)| k == c),
                    "bundles.{b}.caps: unknown capability {c:?} (known: {})",
                    KNOWN_CAPS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                );
            }
            for i in &bundle.images {
                anyhow::ensure!(self.images.contains_key(i), "bundles.{b}.images: image {i:?} is not defined");
            }
            anyhow::ensure!(
                bundle.default_memory_mib <= bundle.max_memory_mib,
                "bundles.{b}: default_memory_mib exceeds max_memory_mib"
            );
            anyhow::ensure!(bundle.max_vcpus >= 1, "bundles.{b}: max_vcpus must be at least 1");
            anyhow::ensure!(bundle.max_sessions >= 1, "bundles.{b}: max_sessions must be at least 1");
        }
        self.confinement.validate()?;
        self.net.validate()?;
        anyhow::ensure!(
            self.sessions.reserved_for_owner < self.sessions.max_total,
            "sessions.reserved_for_owner must be below sessions.max_total"
        );
        for (i, img) in &self.images {
            anyhow::ensure!(
                KNOWN_KERNELS.iter().any(|(k, _)| *k == img.kernel),
                "images.{i}.kernel: unknown kernel source {:?} (known: {})",
                img.kernel,
                KNOWN_KERNELS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            );
            img.validate(i)?;
        }
        Ok(())
    }

    /// The bundle of profile `profile`, if both exist.
    pub fn bundle_for(&self, profile: &str) -> Option<&Bundle> {
        self.profiles.get(profile).and_then(|p| self.bundles.get(&p.bundle))
    }
}

/// A built guest image: files on the host the VMM boots (schema `BuiltImage`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuiltImage {
    /// Uncompressed ELF vmlinux (boots by its PVH note).
    pub kernel: PathBuf,
    /// Uncompressed newc cpio initramfs.
    pub initramfs: PathBuf,
    /// The kernel's release (`uname -r` in the guest).
    pub kernel_release: String,
    /// A read-only root file system image (ext4) shared by every VM of
    /// this image, attached as a virtio-blk disk; `None`: the initramfs
    /// is the whole root (the `base` image).
    pub rootfs: Option<PathBuf>,
    /// Size of each VM's writable layer over `rootfs`, MiB (0 without
    /// `rootfs`).
    pub writable_mib: u64,
}

impl BuiltImage {
    /// Encodes as schema `BuiltImage` named `name`.
    ///
    /// Errors: a path is not UTF-8.
    pub fn write_to(&self, name: &str, mut b: built_image::Builder<'_>) -> capnp::Result<()> {
        b.set_name(name);
        b.set_kernel(path_text(&self.kernel)?);
        b.set_initramfs(path_text(&self.initramfs)?);
        b.set_kernel_release(self.kernel_release.as_str());
        if let Some(r) = &self.rootfs {
            b.set_rootfs(path_text(r)?);
        }
        b.set_writable_mib(self.writable_mib);
        Ok(())
    }

    /// Decodes a schema `BuiltImage`: (name, image).
    ///
    /// Errors: a missing, malformed or non-UTF-8 field.
    pub fn read_from(r: built_image::Reader<'_>) -> capnp::Result<(String, Self)> {
        Ok((
            text(r.get_name())?,
            Self {
                kernel: text(r.get_kernel())?.into(),
                initramfs: text(r.get_initramfs())?.into(),
                kernel_release: text(r.get_kernel_release())?,
                rootfs: Some(text(r.get_rootfs())?).filter(|p| !p.is_empty()).map(PathBuf::from),
                writable_mib: r.get_writable_mib(),
            },
        ))
    }
}

/// Writes `images` into a schema `List(BuiltImage)` builder's owner.
///
/// Errors: a path is not UTF-8.
pub fn write_images(
    images: &BTreeMap<String, BuiltImage>,
    mut list: capnp::struct_list::Builder<'_, built_image::Owned>,
) -> capnp::Result<()> {
    for (i, (name, img)) in images.iter().enumerate() {
        img.write_to(name, list.reborrow().get(i as u32))?;
    }
    Ok(())
}

/// Reads a schema `List(BuiltImage)` into a map by name.
///
/// Errors: as [`BuiltImage::read_from`].
pub fn read_images(
    list: capnp::struct_list::Reader<'_, built_image::Owned>,
) -> capnp::Result<BTreeMap<String, BuiltImage>> {
    list.iter().map(BuiltImage::read_from).collect()
}

impl Bundle {
    /// Encodes as schema `Bundle`.
    pub fn write_to(&self, mut b: bundle::Builder<'_>) {
        let mut caps = b.reborrow().init_caps(self.caps.len() as u32);
        for (i, c) in self.caps.iter().enumerate() {
            caps.set(i as u32, c.as_str());
        }
        b.set_max_vms(self.max_vms);
        b.set_max_memory_mib(self.max_memory_mib);
        b.set_default_memory_mib(self.default_memory_mib);
        b.set_max_vcpus(self.max_vcpus);
        b.set_max_sessions(self.max_sessions);
        b.set_max_volumes(self.max_volumes);
        b.set_max_volume_total_mib(self.max_volume_total_mib);
        let mut images = b.init_images(self.images.len() as u32);
        for (i, n) in self.images.iter().enumerate() {
            images.set(i as u32, n.as_str());
        }
    }

    /// Decodes a schema `Bundle`.
    ///
    /// Errors: a missing, malformed or non-UTF-8 field.
    pub fn read_from(r: bundle::Reader<'_>) -> capnp::Result<Self> {
        let list = |l: capnp::text_list::Reader<'_>| -> capnp::Result<Vec<String>> { l.iter().map(text).collect() };
        Ok(Self {
            caps: list(r.get_caps()?)?,
            max_vms: r.get_max_vms(),
            max_memory_mib: r.get_max_memory_mib(),
            default_memory_mib: r.get_default_memory_mib(),
            max_vcpus: r.get_max_vcpus(),
            max_sessions: r.get_max_sessions(),
            max_principal_vms: None,
            max_principal_memory_mib: None,
            max_volumes: r.get_max_volumes(),
            max_volume_total_mib: r.get_max_volume_total_mib(),
            images: list(r.get_images()?)?,
        })
    }
}

/// The immutable context of one session, handed by the broker to the
/// session's worker at spawn (schema `SessionContext` in the worker's
/// config memfd). Holds no secret.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionContext {
    /// Random session id (hex); not a credential.
    pub session_id: String,
    /// Who logged in.
    pub principal: Principal,
    /// Profile name.
    pub profile: String,
    /// The profile's bundle.
    pub bundle: Bundle,
    /// Expiry, Unix epoch milliseconds.
    pub expires_at_ms: i64,
    /// Images the bundle allows, built.
    pub images: BTreeMap<String, BuiltImage>,
    /// Directory for this session's VM run dirs (created by the worker).
    pub run_dir: PathBuf,
    /// What `auto` means (`Auto`: detect); manifest `[vms] auto_engine`.
    pub auto_engine: Engine,
    /// Which confinement layers every VM must get; manifest `[confinement]`.
    pub confinement: capvisor_rpc::vmconfig::Confinement,
    /// This principal's volume files (made by the broker; the worker's
    /// Landlock domain keeps read-write access to it, QEMU gets only the
    /// files it attaches); `None` when the bundle has no `volumes` cap.
    pub volume_dir: Option<PathBuf>,
    /// Manifest `[net]`: whether VMs get egress, and the session proxy's
    /// rules, resolver overrides and log size.
    pub net: NetConfig,
}

impl SessionContext {
    /// Encodes as schema `SessionContext`.
    ///
    /// Errors: a path is not UTF-8.
    pub fn write_to(&self, mut b: session_context::Builder<'_>) -> capnp::Result<()> {
        b.set_session_id(self.session_id.as_str());
        self.principal.write_to(b.reborrow().init_principal());
        b.set_profile(self.profile.as_str());
        self.bundle.write_to(b.reborrow().init_bundle());
        b.set_expires_at_ms(self.expires_at_ms);
        write_images(&self.images, b.reborrow().init_images(self.images.len() as u32))?;
        b.set_run_dir(path_text(&self.run_dir)?);
        b.set_auto_engine(self.auto_engine);
        self.confinement.write_to(b.reborrow().init_confinement())?;
        if let Some(d) = &self.volume_dir {
            b.set_volume_dir(path_text(d)?);
        }
        b.set_egress(self.net.egress);
        self.net.write_proxy_config(&self.session_id, b.init_net());
        Ok(())
    }

    /// Decodes a schema `SessionContext`.
    ///
    /// Errors: a missing, malformed or non-UTF-8 field, an unknown enum value.
    pub fn read_from(r: session_context::Reader<'_>) -> capnp::Result<Self> {
        Ok(Self {
            session_id: text(r.get_session_id())?,
            principal: Principal::read_from(r.get_principal()?)?,
            profile: text(r.get_profile())?,
            bundle: Bundle::read_from(r.get_bundle()?)?,
            expires_at_ms: r.get_expires_at_ms(),
            images: read_images(r.get_images()?)?,
            run_dir: text(r.get_run_dir())?.into(),
            auto_engine: r.get_auto_engine()?,
            confinement: capvisor_rpc::vmconfig::Confinement::read_from(r.get_confinement()?)?,
            volume_dir: Some(text(r.get_volume_dir())?).filter(|d| !d.is_empty()).map(PathBuf::from),
            net: NetConfig::read_proxy_config(r.get_egress(), r.get_net()?)?,
        })
    }

    /// The context as a config message (see `capvisor_rpc::spawn::config_fd`).
    ///
    /// Errors: as [`SessionContext::write_to`].
    pub fn to_message(&self) -> capnp::Result<capnp::message::Builder<capnp::message::HeapAllocator>> {
        let mut m = capnp::message::Builder::new_default();
        self.write_to(m.init_root())?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_manifest_parses() {
        let m = Manifest::default_manifest();
        assert!(m.bundle_for("owner").unwrap().has_cap("accounts"));
        assert!(!m.bundle_for("user").unwrap().has_cap("accounts"));
    }

    #[test]
    fn rejects_bad_references() {
        let bad = DEFAULT_TOML.replace("bundle = \"user\"", "bundle = \"nope\"");
        assert!(Manifest::parse(&bad).unwrap_err().to_string().contains("nope"));
        let bad =
            DEFAULT_TOML.replace("caps = [\"vms\", \"volumes\", \"netlog\", \"shares\"]", "caps = [\"vms\", \"root\"]");
        assert!(Manifest::parse(&bad).unwrap_err().to_string().contains("root"));
        let bad = DEFAULT_TOML.replace("[gateway]", "[gateway]\nbogus = 1");
        assert!(Manifest::parse(&bad).is_err());
    }

    #[test]
    fn session_context_round_trips_through_the_schema() {
        let m = Manifest::default_manifest();
        let ctx = SessionContext {
            session_id: "ab12".into(),
            principal: Principal::new(capvisor_rpc::schema::capvisor_capnp::AuthMethod::Local, "alice"),
            profile: "owner".into(),
            bundle: m.bundle_for("owner").unwrap().clone(),
            expires_at_ms: 1_700_000_000_000,
            images: [(
                "base".to_string(),
                BuiltImage {
                    kernel: "/k".into(),
                    initramfs: "/i".into(),
                    kernel_release: "6.1".into(),
                    rootfs: Some("/r".into()),
                    writable_mib: 1024,
                },
            )]
            .into(),
            run_dir: "/run/s".into(),
            auto_engine: Engine::Qemu,
            confinement: capvisor_rpc::vmconfig::Confinement {
                netns: false,
                cgroup_root: "/mnt/cg".into(),
                ..Default::default()
            },
            volume_dir: Some("/state/volumes/p-1".into()),
            net: NetConfig {
                egress: true,
                rules: vec![NetRuleConfig {
                    host: "*.test".into(),
                    port: 443,
                    scheme: "https".into(),
                    method: "GET".into(),
                    path_prefix: "/v1".into(),
                    action: "ask".into(),
                    no_mitm: true,
                }],
                resolve: [("api.test".to_string(), vec!["127.0.0.1".to_string(), "::1".to_string()])].into(),
                log_capacity: Some(17),
                ask_timeout_secs: Some(5),
                intercept_tls: true,
                ca_certs: Vec::new(),
                interception: Some(Interception {
                    ca_cert_pem: "CERT".into(),
                    ca_key_pem: "KEY".into(),
                    extra_roots_pem: "ROOTS".into(),
                }),
            },
        };
        let msg = ctx.to_message().unwrap();
        assert_eq!(SessionContext::read_from(msg.get_root_as_reader().unwrap()).unwrap(), ctx);
    }

    #[test]
    fn confinement_table() {
        let all = Manifest::default_manifest().confinement.requirements();
        assert!(all.cgroup && all.netns && all.landlock, "every layer is required by default");
        assert_eq!(all.cgroup_root, std::path::Path::new("/sys/fs/cgroup"));
        let some = format!("[confinement]\nrequired = [\"landlock\"]\ncgroup_root = \"/mnt/cg\"\n{DEFAULT_TOML}");
        let r = Manifest::parse(&some).unwrap().confinement.requirements();
        assert_eq!((r.cgroup, r.netns, r.landlock), (false, false, true));
        assert_eq!(r.cgroup_root, std::path::Path::new("/mnt/cg"));
        let bad = format!("[confinement]\nrequired = [\"selinux\"]\n{DEFAULT_TOML}");
        let e = Manifest::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("confinement.required") && e.contains("selinux"), "{e}");
        let rel = format!("[confinement]\ncgroup_root = \"cg\"\n{DEFAULT_TOML}");
        assert!(Manifest::parse(&rel).unwrap_err().to_string().contains("confinement.cgroup_root"));
        let unknown = format!("[confinement]\nrequire = []\n{DEFAULT_TOML}");
        assert!(Manifest::parse(&unknown).unwrap_err().to_string().contains("require"));
    }

    #[test]
    fn net_table_is_validated_at_load() {
        let ok = format!(
            "{DEFAULT_TOML}\n[[net.rules]]\nhost = \"api.test\"\nport = 443\naction = \"allow\"\n[net.resolve]\n\"api.test\" = [\"127.0.0.1\"]\n"
        )
        .replace("egress = false", "egress = true");
        let m = Manifest::parse(&ok).unwrap();
        assert!(m.net.egress);
        assert_eq!(m.net.rules[0].port, 443);
        assert_eq!(m.net.resolve["api.test"], vec!["127.0.0.1".to_string()]);
        for (bad, key) in [
            ("[[net.rules]]\nhost = \"x\"\naction = \"permit\"\n", "net.rules[0].action"),
            ("[[net.rules]]\nhost = \"x\"\nscheme = \"ftp\"\naction = \"allow\"\n", "net.rules[0].scheme"),
            ("[[net.rules]]\nhost = \"\"\naction = \"allow\"\n", "net.rules[0].host"),
            ("[net.resolve]\n\"a.test\" = [\"not-an-ip\"]\n", "net.resolve.a.test"),
            ("[net.resolve]\n\"A.test\" = [\"127.0.0.1\"]\n", "lower case"),
        ] {
            let e = Manifest::parse(&format!("{DEFAULT_TOML}\n{bad}")).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn auto_engine_setting() {
        assert_eq!(Manifest::default_manifest().vms.auto_engine(), Engine::Auto);
        let pinned = format!("[vms]\nauto_engine = \"qemu\"\n{DEFAULT_TOML}");
        assert_eq!(Manifest::parse(&pinned).unwrap().vms.auto_engine(), Engine::Qemu);
        let bad = format!("[vms]\nauto_engine = \"xen\"\n{DEFAULT_TOML}");
        assert!(Manifest::parse(&bad).unwrap_err().to_string().contains("xen"));
        let auto = format!("[vms]\nauto_engine = \"auto\"\n{DEFAULT_TOML}");
        assert!(Manifest::parse(&auto).is_err());
    }

    #[test]
    fn local_map_rules_uid_beats_group_first_match_wins() {
        let text = DEFAULT_TOML.replace(
            "owner_uids = []",
            "owner_uids = []\n[[local.map]]\ngroup = \"root\"\nprofile = \"owner\"\n\
             [[local.map]]\nuid = 1001\nprofile = \"user\"\n\
             [[local.map]]\ngroup = 4242\nprofile = \"user\"\n\
             [[local.map]]\nuid = 1001\nprofile = \"owner\"",
        );
        let m = Manifest::parse(&text).unwrap();
        assert_eq!(m.local.map[0].gid, Some(0), "a group name is resolved at load");
        let l = &m.local;
        // A uid rule beats an earlier group rule; the first uid rule wins.
        assert_eq!(l.profile_for(1001, 0, &[]), Some("user"));
        // Group rules in order, primary or supplementary.
        assert_eq!(l.profile_for(1002, 0, &[]), Some("owner"));
        assert_eq!(l.profile_for(1002, 100, &[4242, 0]), Some("owner"));
        assert_eq!(l.profile_for(1002, 100, &[4242]), Some("user"));
        assert_eq!(l.profile_for(1002, 4242, &[]), Some("user"));
        assert_eq!(l.profile_for(1002, 100, &[5, 6]), None);
        // It survives the broker's TOML round trip.
        assert_eq!(Manifest::parse(&toml::to_string(&m).unwrap()).unwrap(), m);
    }

    #[test]
    fn local_map_and_socket_group_are_validated_at_load() {
        let with = |extra: &str| DEFAULT_TOML.replace("owner_uids = []", &format!("owner_uids = []\n{extra}"));
        let e = Manifest::parse(&with("[[local.map]]\nuid = 5\nprofile = \"admin\"")).unwrap_err().to_string();
        assert!(e.contains("local.map[0].profile") && e.contains("admin"), "{e}");
        let e = Manifest::parse(&with("[[local.map]]\nuid = 5\nprofile = \"user\"\n[[local.map]]\ngroup = \"no-such-group-q\"\nprofile = \"user\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("local.map[1].group") && e.contains("no-such-group-q"), "{e}");
        let e =
            Manifest::parse(&with("[[local.map]]\nuid = 5\ngroup = 5\nprofile = \"user\"")).unwrap_err().to_string();
        assert!(e.contains("exactly one of uid and group"), "{e}");
        let e = Manifest::parse(&with("[[local.map]]\nprofile = \"user\"")).unwrap_err().to_string();
        assert!(e.contains("exactly one of uid and group"), "{e}");
        let g = |v: &str| DEFAULT_TOML.replace("[gateway]", &format!("[gateway]\nsocket_group = {v}"));
        let e = Manifest::parse(&g("\"no-such-group-q\"")).unwrap_err().to_string();
        assert!(e.contains("gateway.socket_group") && e.contains("no-such-group-q"), "{e}");
        assert_eq!(Manifest::parse(&g("\"root\"")).unwrap().gateway.socket_gid, Some(0));
        assert_eq!(Manifest::parse(&g("77")).unwrap().gateway.socket_gid, Some(77));
        assert_eq!(Manifest::default_manifest().gateway.socket_gid, None);
    }

    #[test]
    fn image_kernel_sources() {
        assert_eq!(Manifest::default_manifest().images["base"].kernel, "minimal");
        let debian = DEFAULT_TOML.replace("kernel = \"minimal\"", "kernel = \"debian-cloud\"");
        assert_ne!(debian, DEFAULT_TOML);
        assert_eq!(Manifest::parse(&debian).unwrap().images["base"].kernel, "debian-cloud");
        let bogus = DEFAULT_TOML.replace("kernel = \"minimal\"", "kernel = \"bogus\"");
        let err = Manifest::parse(&bogus).unwrap_err().to_string();
        assert!(err.contains("images.base.kernel") && err.contains("\"bogus\""), "{err}");
        assert!(err.contains("debian-cloud, minimal"), "{err}");
    }

    #[test]
    fn debian_image_keys() {
        let m = Manifest::default_manifest();
        let d = &m.images["debian"];
        assert!(d.has_rootfs() && !m.images["base"].has_rootfs());
        assert_eq!(d.distribution(), "bookworm");
        for p in ["bash", "python3", "git", "nodejs", "npm", "e2fsprogs", "ca-certificates"] {
            assert!(d.packages.iter().any(|x| x == p), "{p}");
        }
        assert_eq!(d.writable_mib(), 2048);
        assert_eq!(m.images["base"].writable_mib(), 0);
        for b in ["owner", "user"] {
            assert!(m.bundles[b].images.contains(&"debian".to_string()), "{b}");
        }
        let with = |extra: &str| format!("{DEFAULT_TOML}\n[images.extra]\nkernel = \"minimal\"\n{extra}\n");
        let err = |extra: &str| Manifest::parse(&with(extra)).unwrap_err().to_string();
        let ok = Manifest::parse(&with("packages = [\"bash\", \"g++\", \"libc6.1\"]")).unwrap();
        assert_eq!(ok.images["extra"].writable_mib(), DEFAULT_WRITABLE_MIB);
        let e = err("packages = [\"bash\"]\ndistribution = \"sid\"");
        assert!(e.contains("images.extra.distribution") && e.contains("\"sid\""), "{e}");
        let e = err("packages = [\"bash\", \"\"]");
        assert!(e.contains("images.extra.packages[1]"), "{e}");
        let e = err("packages = [\"bash; rm -rf /\"]");
        assert!(e.contains("images.extra.packages[0]"), "{e}");
        let e = err("packages = [\"Bash\"]");
        assert!(e.contains("images.extra.packages[0]"), "{e}");
        let e = err("packages = [\"bash\"]\nwritable_mib = 8");
        assert!(e.contains("images.extra.writable_mib") && e.contains("8"), "{e}");
        let e = err("packages = [\"bash\"]\nwritable_mib = 2000000");
        assert!(e.contains("images.extra.writable_mib"), "{e}");
        let e = err("writable_mib = 512");
        assert!(e.contains("images.extra") && e.contains("packages"), "{e}");
        let e = err("packages = []\ndistribution = \"bookworm\"");
        assert!(e.contains("images.extra") && e.contains("packages"), "{e}");
    }
}
