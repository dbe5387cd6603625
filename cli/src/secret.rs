//! `capvisor secret ...`: the principal's secrets for the egress proxy
//! (cap `secrets`, schema `Secrets`). Values go in on stdin and never come
//! back out: list shows names, hosts and creation times only.

use capvisor_client::ops;
use capvisor_client::{ClientError, ClientResult};
use capvisor_rpc::schema::capvisor_capnp::{secrets, session};
use clap::Subcommand;
use std::io::Read;

/// What `--help` says of the placeholder model.
pub const ABOUT: &str = "Secrets for the egress proxy (cap `secrets`, owner profile): a value is kept encrypted \
by the server and never enters a VM.\n\n\
A guest sees only the placeholder `capvisor-secret:NAME` (`vm exec --secret VAR=NAME` or `run --secret \
VAR=NAME` put it in the variable VAR). When a guest sends an HTTPS request through the session's egress \
proxy (manifest [net] egress) whose headers hold the placeholder, the proxy replaces it with the value if \
the request's host matches one of the secret's --host globs, and leaves it (and flags the flow in `net log`) \
for any other host.";

/// `capvisor secret` subcommands.
#[derive(Subcommand)]
pub enum SecretCmd {
    /// Store a secret (replacing one of the same name); the value is read from standard
    /// input (one trailing newline dropped), never from the command line.
    Put {
        /// Name: 1-64 of [A-Za-z0-9_-]
        name: String,
        /// Host glob the value may be sent to: "*", "*.example.org" or an exact host
        /// (repeatable, 1-16)
        #[arg(long = "host", value_name = "GLOB", required = true)]
        hosts: Vec<String>,
    },
    /// List this principal's secrets: name, hosts, creation time (never values).
    List,
    /// Delete a secret.
    Rm {
        /// Its name
        name: String,
    },
}

/// The CapSet's `secrets` cap, pipelined.
pub fn cap(s: &session::Client) -> secrets::Client {
    ops::get_cap(&ops::cap_set(s), "secrets")
}

/// The value on standard input: at most 8 KiB (+ one newline), one
/// trailing `\n` (or `\r\n`) dropped. From a terminal: one line, typed
/// without echo (termios(3) `ECHO` off until it is read).
///
/// Errors: usage for an empty value.
fn read_value() -> ClientResult<Vec<u8>> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    let mut v = Vec::new();
    if stdin.is_terminal() {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        eprint!("secret value (not echoed): ");
        let orig = tcgetattr(&stdin).ok();
        if let Some(o) = &orig {
            let mut quiet = o.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
        }
        let mut line = String::new();
        let res = stdin.read_line(&mut line);
        if let Some(o) = &orig {
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, o);
        }
        eprintln!();
        res?;
        v = line.into_bytes();
    } else {
        stdin.take(capvisor_rpc::secrets::MAX_VALUE as u64 + 3).read_to_end(&mut v)?;
    }
    if v.ends_with(b"\n") {
        v.pop();
        if v.ends_with(b"\r") {
            v.pop();
        }
    }
    if v.is_empty() {
        return Err(ClientError::Usage("empty secret value on standard input".into()));
    }
    Ok(v)
}

/// Runs one `secret` subcommand on session `s`; returns the exit code.
pub async fn run(cmd: SecretCmd, s: &session::Client) -> ClientResult<i32> {
    let c = cap(s);
    match cmd {
        SecretCmd::Put { name, hosts } => {
            let value = read_value()?;
            let mut req = c.put_request();
            req.get().set_name(name.as_str());
            req.get().set_value(&value);
            let mut h = req.get().init_hosts(hosts.len() as u32);
            for (i, host) in hosts.iter().enumerate() {
                h.set(i as u32, host.as_str());
            }
            req.send().promise.await?;
            eprintln!("capvisor: secret {name} stored ({} bytes) for {}", value.len(), hosts.join(", "));
        }
        SecretCmd::List => {
            let resp = c.list_request().send().promise.await?;
            println!("{:<24} {:<15} HOSTS", "NAME", "CREATED_MS");
            for s in resp.get()?.get_secrets()?.iter() {
                let hosts: Vec<String> = s
                    .get_hosts()?
                    .iter()
                    .map(|h| Ok(String::from_utf8_lossy(h?.as_bytes()).into_owned()))
                    .collect::<ClientResult<_>>()?;
                println!(
                    "{:<24} {:<15} {}",
                    capvisor_rpc::error::printable(&String::from_utf8_lossy(s.get_name()?.as_bytes()), false),
                    s.get_created_at_ms(),
                    capvisor_rpc::error::printable(&hosts.join(","), false)
                );
            }
        }
        SecretCmd::Rm { name } => {
            let mut req = c.remove_request();
            req.get().set_name(name.as_str());
            req.send().promise.await?;
            eprintln!("capvisor: secret {name} removed");
        }
    }
    Ok(0)
}

/// Parses `--secret VAR=NAME` flags into (variable, secret name) pairs.
///
/// Errors: usage when a flag is not `VAR=NAME` with both sides non-empty.
pub fn parse_flags(flags: &[String]) -> ClientResult<Vec<(String, String)>> {
    flags
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(ClientError::Usage(format!("--secret wants VAR=SECRET_NAME, got {kv:?}"))),
        })
        .collect()
}
