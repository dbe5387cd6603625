//! [`ExecRequest`]: the Rust form of the schema's `ExecSpec`
//! (`common.capnp`), encoded by clients and decoded by guest-init.

use crate::{CvError, CvResult};
use capvisor_schema::common_capnp::exec_spec;

/// What to run in a guest (schema `ExecSpec`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Added to (and overriding) the guest's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; empty means `/`.
    pub cwd: String,
    /// Bytes written to stdin first.
    pub stdin: Vec<u8>,
    /// Keep stdin open after `stdin` for `Process.write`.
    pub keep_stdin_open: bool,
    /// `Some((rows, cols))`: run on a pseudo-terminal of that size.
    pub pty: Option<(u16, u16)>,
    /// User to run as: a login name or numeric uid, looked up in the
    /// guest's `/etc/passwd`; empty: root.
    pub user: String,
    /// Secrets as environment variables (`ExecSpec.secretEnv`): pairs of
    /// (variable, secret name). The worker resolves them into `env` as
    /// placeholders ([`crate::secrets::placeholder`]) and clears this
    /// before the spec reaches a guest.
    pub secret_env: Vec<(String, String)>,
}

/// Whether `name` may name an environment variable: non-empty, without
/// `=` or NUL (execve(2) takes `NAME=value` C strings; guest-init checks
/// the same).
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

impl ExecRequest {
    /// Encodes into a schema `ExecSpec` builder.
    pub fn write_to(&self, mut s: exec_spec::Builder<'_>) {
        let mut argv = s.reborrow().init_argv(self.argv.len() as u32);
        for (i, a) in self.argv.iter().enumerate() {
            argv.set(i as u32, a.as_str());
        }
        let mut env = s.reborrow().init_env(self.env.len() as u32);
        for (i, (k, v)) in self.env.iter().enumerate() {
            let mut e = env.reborrow().get(i as u32);
            e.set_name(k.as_str());
            e.set_value(v.as_str());
        }
        let mut senv = s.reborrow().init_secret_env(self.secret_env.len() as u32);
        for (i, (k, v)) in self.secret_env.iter().enumerate() {
            let mut e = senv.reborrow().get(i as u32);
            e.set_name(k.as_str());
            e.set_value(v.as_str());
        }
        s.set_cwd(self.cwd.as_str());
        s.set_stdin(&self.stdin);
        s.set_keep_stdin_open(self.keep_stdin_open);
        s.set_user(self.user.as_str());
        match self.pty {
            Some((rows, cols)) => {
                let mut sz = s.init_pty().init_size();
                sz.set_rows(rows);
                sz.set_cols(cols);
            }
            None => s.init_pty().set_none(()),
        }
    }

    /// Decodes a schema `ExecSpec`.
    ///
    /// Errors: text that is not UTF-8 -> `Ok(Err(invalidArgument))`; a
    /// malformed message -> `Err(capnp error)`.
    pub fn read_from(spec: exec_spec::Reader<'_>) -> capnp::Result<CvResult<Self>> {
        let mut req = ExecRequest::default();
        for a in spec.get_argv()?.iter() {
            match a?.to_str() {
                Ok(s) => req.argv.push(s.to_string()),
                Err(_) => return Ok(Err(CvError::invalid("argv entries must be UTF-8"))),
            }
        }
        for e in spec.get_env()?.iter() {
            match (e.get_name()?.to_str(), e.get_value()?.to_str()) {
                (Ok(n), Ok(v)) => req.env.push((n.to_string(), v.to_string())),
                _ => return Ok(Err(CvError::invalid("environment entries must be UTF-8"))),
            }
        }
        for e in spec.get_secret_env()?.iter() {
            match (e.get_name()?.to_str(), e.get_value()?.to_str()) {
                (Ok(n), Ok(v)) => req.secret_env.push((n.to_string(), v.to_string())),
                _ => return Ok(Err(CvError::invalid("secretEnv entries must be UTF-8"))),
            }
        }
        req.cwd = match spec.get_cwd()?.to_str() {
            Ok(s) => s.to_string(),
            Err(_) => return Ok(Err(CvError::invalid("cwd must be UTF-8"))),
        };
        req.stdin = spec.get_stdin()?.to_vec();
        req.keep_stdin_open = spec.get_keep_stdin_open();
        req.user = match spec.get_user()?.to_str() {
            Ok(s) => s.to_string(),
            Err(_) => return Ok(Err(CvError::invalid("user must be UTF-8"))),
        };
        req.pty = match spec.get_pty().which()? {
            exec_spec::pty::None(()) => None,
            exec_spec::pty::Size(s) => {
                let s = s?;
                Some((s.get_rows(), s.get_cols()))
            }
        };
        Ok(Ok(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let r = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "1".into())],
            cwd: "/tmp".into(),
            stdin: b"in".to_vec(),
            keep_stdin_open: true,
            pty: Some((24, 80)),
            user: "agent".into(),
            secret_env: vec![("TOKEN".into(), "api".into())],
        };
        let mut msg = capnp::message::Builder::new_default();
        r.write_to(msg.init_root::<exec_spec::Builder>());
        let back = ExecRequest::read_from(msg.get_root_as_reader::<exec_spec::Reader>().unwrap()).unwrap().unwrap();
        assert_eq!(back, r);
        let r2 = ExecRequest { argv: vec!["true".into()], ..Default::default() };
        let mut msg = capnp::message::Builder::new_default();
        r2.write_to(msg.init_root::<exec_spec::Builder>());
        assert_eq!(
            ExecRequest::read_from(msg.get_root_as_reader::<exec_spec::Reader>().unwrap()).unwrap().unwrap(),
            r2
        );
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("TOKEN"));
        assert!(valid_env_name("lower_1"));
        for bad in ["", "A=B", "A\0"] {
            assert!(!valid_env_name(bad), "{bad:?}");
        }
    }
}
