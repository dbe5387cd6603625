//! capvisor's manifest: which auth methods the gateway offers, which
//! profiles exist, which bundle (capability names + limits) each profile
//! gets, and which guest images exist. TOML; the embedded default is
//! `manifests/default.toml` ([`DEFAULT_TOML`]). Also the immutable
//! [`SessionContext`] the broker hands each worker at spawn.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The embedded default manifest (`manifests/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// Capability names a bundle may list, with what each one grants.
pub const KNOWN_CAPS: &[(&str, &str)] = &[
    ("vms", "VmFactory: create, list, reach and remove this session's VMs"),
    ("accounts", "Accounts: add, list and remove password accounts"),
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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self { auth: vec!["local".into(), "password".into()], session_ttl_secs: 86400 }
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
}

/// `[images.NAME]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Kernel source (see [`KNOWN_KERNELS`]): `"debian-cloud"` (Debian's
    /// linux-image-cloud-amd64 + its virtio modules) or `"minimal"`
    /// (capvisor's own build from linux-source-6.1, no modules; faster to boot).
    pub kernel: String,
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
    /// `owner` profile.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let m: Manifest = toml::from_str(text)?;
        m.validate()?;
        Ok(m)
    }

    /// The embedded default.
    pub fn default_manifest() -> Self {
        Self::parse(DEFAULT_TOML).expect("embedded default manifest is valid")
    }

    /// Checks cross references (see [`Manifest::parse`]).
    pub fn validate(&self) -> anyhow::Result<()> {
        for a in &self.gateway.auth {
            anyhow::ensure!(
                a == "local" || a == "password",
                "gateway.auth: unknown method {a:?} (known: local, password)"
            );
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
        }
        for (i, img) in &self.images {
            anyhow::ensure!(
                KNOWN_KERNELS.iter().any(|(k, _)| *k == img.kernel),
                "images.{i}.kernel: unknown kernel source {:?} (known: {})",
                img.kernel,
                KNOWN_KERNELS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(())
    }

    /// The bundle of profile `profile`, if both exist.
    pub fn bundle_for(&self, profile: &str) -> Option<&Bundle> {
        self.profiles.get(profile).and_then(|p| self.bundles.get(&p.bundle))
    }
}

/// A built guest image: files on the host the VMM boots.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuiltImage {
    /// Uncompressed ELF vmlinux (boots by its PVH note).
    pub kernel: PathBuf,
    /// Uncompressed newc cpio initramfs.
    pub initramfs: PathBuf,
    /// The kernel's release (`uname -r` in the guest).
    pub kernel_release: String,
}

/// The immutable context of one session, handed by the broker to the
/// session's worker at spawn (environment variable
/// `CAPVISOR_SESSION_CONTEXT`, JSON). Holds no secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SessionContext {
    /// Random session id (hex); not a credential.
    pub session_id: String,
    /// Who logged in, e.g. `local:alice`, `password:bob`.
    pub principal: String,
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
        let bad = DEFAULT_TOML.replace("caps = [\"vms\"]", "caps = [\"vms\", \"root\"]");
        assert!(Manifest::parse(&bad).unwrap_err().to_string().contains("root"));
        let bad = DEFAULT_TOML.replace("[gateway]", "[gateway]\nbogus = 1");
        assert!(Manifest::parse(&bad).is_err());
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
}
