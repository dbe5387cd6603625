//! Where capvisor keeps sockets, state and caches.
//!
//! | what | variable | default |
//! |---|---|---|
//! | gateway socket | `CAPVISOR_SOCKET` | `$XDG_RUNTIME_DIR/capvisor/gateway.sock`, else `/tmp/capvisor-<uid>/gateway.sock` (dir mode 0700) |
//! | state (accounts, audit, VM run dirs) | `CAPVISOR_STATE_DIR` | `$XDG_STATE_HOME/capvisor`, else `~/.local/state/capvisor` |
//! | cache (guest kernels, images) | `CAPVISOR_CACHE_DIR` | `$XDG_CACHE_HOME/capvisor`, else `~/.cache/capvisor` |
//! | client config (resume token) | `CAPVISOR_CONFIG_DIR` | `~/.config/capvisor` |

use std::path::PathBuf;

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The gateway's Unix socket path (see the module table).
pub fn gateway_socket() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_SOCKET") {
        return p;
    }
    runtime_dir().join("gateway.sock")
}

/// A per-user runtime directory: `$XDG_RUNTIME_DIR/capvisor`, else
/// `/tmp/capvisor-<uid>`. Created with mode 0700 by [`ensure_private_dir`].
pub fn runtime_dir() -> PathBuf {
    match env_path("XDG_RUNTIME_DIR") {
        Some(p) => p.join("capvisor"),
        None => PathBuf::from(format!("/tmp/capvisor-{}", uid())),
    }
}

/// State directory (see the module table).
pub fn state_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_STATE_DIR") {
        return p;
    }
    env_path("XDG_STATE_HOME").unwrap_or_else(|| home().join(".local/state")).join("capvisor")
}

/// Cache directory (see the module table).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_CACHE_DIR") {
        return p;
    }
    env_path("XDG_CACHE_HOME").unwrap_or_else(|| home().join(".cache")).join("capvisor")
}

/// Client configuration directory (see the module table).
pub fn config_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_CONFIG_DIR") {
        return p;
    }
    env_path("XDG_CONFIG_HOME").unwrap_or_else(|| home().join(".config")).join("capvisor")
}

/// Creates `dir` (and parents) and sets it to mode 0700.
///
/// Errors: the directory exists but belongs to another user (someone
/// pre-created it to intercept our socket), or any I/O error.
pub fn ensure_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.uid() != uid() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to us (uid {})", dir.display(), meta.uid(), uid()),
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The directory holding the capvisor binaries: the directory of the
/// running executable, or `CAPVISOR_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_BIN_DIR") {
        return p;
    }
    std::env::current_exe().ok().and_then(|p| p.parent().map(|p| p.to_path_buf())).unwrap_or_else(|| PathBuf::from("."))
}

/// Path of capvisor binary `name` (e.g. `"capvisor-worker"`) beside the running one.
pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}
