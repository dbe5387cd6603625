//! `capvisor mcp`: a Model Context Protocol server (rmcp) whose tools are
//! the capabilities one capvisor session holds: one tool per method of each
//! `CapSet` entry, plus high-level `vm_create`, `vm_exec`, `file_read` and
//! `file_write` (see [`tools`]). Serves MCP over stdio (the default), or
//! over streamable HTTP on a loopback address with a bearer token of its
//! own (`--http 127.0.0.1:PORT`, endpoint `/mcp`).
//!
//! Threading: rmcp runs handlers as `Send` tasks; capnp-rpc clients are not
//! `Send`. Both run on the CLI's one thread (`run_local`): the handlers
//! pass each request to the [`backend`] task over a channel.

mod backend;
mod tools;

use backend::{Backend, Job, Progress, ToolOutput};
use capvisor_client::{ClientError, ClientResult};
use clap::Args;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// `--help` text of `capvisor mcp`.
pub const ABOUT: &str = "Serve the Model Context Protocol (MCP) for an AI agent: its tools are the \
capabilities this capvisor session holds, and nothing more.\n\n\
Tools:\n  \
<cap>_<method>   one per method of each cap in the session's CapSet (e.g. vms_list, box_info); \
input schema from the Cap'n Proto schema, description from its doc comments\n  \
vm_create        boot a VM (when the session holds a VmFactory)\n  \
vm_exec          run a command in a VM: stdout, stderr, exit code (progress notifications carry \
the output as it arrives when the client sends a progress token)\n  \
file_read        read a guest file, from an offset, up to a byte count\n  \
file_write       create or replace a guest file\n\n\
vm_exec, file_read and file_write take a VM by name: a Vm cap of the CapSet (by its entry name), \
or a VM of the session's VmFactory. Outputs over --max-output bytes are cut with a marker saying \
how to read the rest. A capvisor denial is a tool error (isError) whose text starts with the typed \
code: \"[denied] ...\", \"[notFound] ...\".\n\n\
Transports:\n  \
capvisor mcp                              stdio (what MCP clients launch); logs go to stderr\n  \
capvisor mcp --http 127.0.0.1:8765        streamable HTTP at http://127.0.0.1:8765/mcp; loopback \
addresses only; every request needs `Authorization: Bearer TOKEN`, a token generated at start and \
printed once to stderr (or read from --bearer-file); port 0 picks a free port (printed)\n\n\
Login: the saved session of `capvisor login` (CAPVISOR_CONFIG_DIR), or a share token of \
`capvisor share` (--token-file, or --token-stdin: the first line of stdin, then the MCP stream): \
the tools are then exactly those of the shared caps (a shared VM \"box\" gives vm_exec, file_read, \
file_write for \"box\" and box_<method>), and what the share does not allow is a [denied] tool error.\n\n\
Client configuration (Claude Desktop and others): {\"mcpServers\": {\"capvisor\": {\"command\": \
\"capvisor\", \"args\": [\"mcp\"]}}}; MCP Inspector: `npx @modelcontextprotocol/inspector --cli capvisor mcp \
--method tools/list`.";

/// Default bound of each output stream and file read, bytes.
pub const DEFAULT_MAX_OUTPUT: u64 = 64 * 1024;

/// Arguments of `capvisor mcp`.
#[derive(Args)]
pub struct McpArgs {
    /// Serve streamable HTTP on this loopback address instead of stdio (e.g. 127.0.0.1:8765; IPv6 as `[::1]:0`)
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<SocketAddr>,
    /// With --http: the bearer token clients must send, read from this file (first line, at least
    /// 16 characters) [default: a random token, printed once to stderr]
    #[arg(long, value_name = "FILE", requires = "http")]
    bearer_file: Option<PathBuf>,
    /// Cut each command output stream and each file_read at this many bytes
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_OUTPUT,
          value_parser = clap::value_parser!(u64).range(1..=(64 << 20)))]
    max_output: u64,
    /// Log in with a share token (`capvisor share`) read from the first line of stdin; on stdio
    /// the MCP stream follows that line. The tools are then exactly those of the shared caps
    #[arg(long, conflicts_with = "token_file")]
    token_stdin: bool,
    /// Log in with a share token read from this file (first line): for MCP clients that launch
    /// `capvisor mcp` themselves
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

/// Runs `capvisor mcp` until the client disconnects (stdio) or SIGINT /
/// SIGTERM (HTTP). Errors: not logged in (21), a refused
/// address, bearer file or empty share token (usage, 2), a share token
/// that does not redeem (denied, 10), and login errors as every command
/// has them.
pub async fn run(args: McpArgs, socket: &Path) -> ClientResult<i32> {
    capvisor_rpc::init_logging("mcp");
    if let Some(addr) = args.http {
        check_loopback(addr)?;
    }
    let bearer = match (&args.http, &args.bearer_file) {
        (Some(_), Some(f)) => Some(read_bearer(f)?),
        (Some(_), None) => Some(random_token()),
        _ => None,
    };
    let token = if args.token_stdin {
        Some(read_stdin_line()?)
    } else if let Some(f) = &args.token_file {
        let text = std::fs::read_to_string(f).map_err(|e| ClientError::Usage(format!("{}: {e}", f.display())))?;
        Some(text.lines().next().unwrap_or("").trim().to_string())
    } else {
        None
    };
    let session = match token {
        Some(t) => login_with_share_token(socket, &t).await?,
        None => capvisor_client::connect::attach_saved(socket).await?.0,
    };
    let backend = Backend::new(&session, args.max_output as usize);
    // Fail early (stale session, no caps) rather than at the client's first request.
    let cat = backend.refresh().await?;
    eprintln!("capvisor mcp: {} tools for this session", cat.tools.len());
    let (jobs, rx) = mpsc::unbounded_channel();
    tokio::task::spawn_local(backend.serve(rx));
    let handler = Handler { jobs };
    // A session redeemed from a share token is the grant itself: it ends
    // with the grant (revoke, expiry), not with this server.
    match (args.http, bearer) {
        (Some(addr), Some(bearer)) => serve_http(handler, addr, bearer, args.bearer_file.is_none()).await,
        _ => match handler.serve(rmcp::transport::stdio_pipes()).await {
            Ok(running) => {
                let _ = running.waiting().await;
                Ok(0)
            }
            Err(e) => Err(ClientError::Disconnected(format!("MCP initialization failed: {e}"))),
        },
    }
}

/// Redeems a share token (`capvisor share`) into a delegate session
/// (`connect::redeem`) and attaches to it: its CapSet holds exactly the
/// shared caps, so the tool list is exactly theirs. The login connection
/// is closed once attached (it counts against the gateway's per-uid
/// limit).
///
/// Errors: `usage` for an empty token; as `connect::redeem` (`denied` for
/// an unknown, expired or revoked token) and `connect::attach`.
async fn login_with_share_token(
    socket: &Path,
    token: &str,
) -> ClientResult<capvisor_client::schema::capvisor_capnp::session::Client> {
    if token.is_empty() {
        return Err(ClientError::Usage("the share token is empty".into()));
    }
    let info = capvisor_client::connect::redeem(socket, token).await?;
    let session = capvisor_client::connect::attach(socket, &info.token).await?;
    info.connection.abort();
    eprintln!("capvisor mcp: logged in with a share token as {} (profile {})", info.principal, info.profile);
    Ok(session)
}

/// The first line of standard input, read one byte at a time so that
/// nothing after it is buffered away from the MCP stream that follows on
/// stdio.
fn read_stdin_line() -> ClientResult<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(0, &mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= 4096 => {
                return Err(ClientError::Usage("--token-stdin: no newline in the first 4 KiB of stdin".into()))
            }
            Ok(_) => line.push(b[0]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ClientError::Io(e.into())),
        }
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// Refuses a non-loopback address: the MCP endpoint drives VMs.
fn check_loopback(addr: SocketAddr) -> ClientResult<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(ClientError::Usage(format!(
            "--http {addr}: only a loopback address (127.0.0.0/8 or ::1) may serve MCP; \
             reach it from elsewhere through an SSH tunnel"
        )))
    }
}

/// The bearer token of `--bearer-file`: its first line, trimmed, at least
/// 16 characters of visible ASCII.
fn read_bearer(f: &Path) -> ClientResult<String> {
    let text = std::fs::read_to_string(f).map_err(|e| ClientError::Usage(format!("{}: {e}", f.display())))?;
    let t = text.lines().next().unwrap_or("").trim().to_string();
    if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::Usage(format!(
            "{}: the bearer token must be at least 16 visible ASCII characters on the first line",
            f.display()
        )));
    }
    Ok(t)
}

/// 32 random bytes, hex.
fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The MCP handler: `Send`, so rmcp may run it anywhere; it forwards to
/// the backend.
#[derive(Clone)]
struct Handler {
    jobs: mpsc::UnboundedSender<Job>,
}

fn gone() -> McpError {
    McpError::internal_error("the capvisor session backend has stopped", None)
}

fn to_result(o: ToolOutput) -> CallToolResult {
    let mut r = if o.is_error {
        CallToolResult::error(vec![ContentBlock::text(o.text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(o.text)])
    };
    r.structured_content = o.structured;
    r
}

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("capvisor", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "capvisor: Linux microVMs reached only through capabilities. Use vm_exec to run commands \
                 in a VM, file_read / file_write for its files, vm_create to boot one (when offered). \
                 Other tools call one method of one capability of this session. An error text starts \
                 with its capvisor code in brackets, e.g. [denied].",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let (reply, rx) = oneshot::channel();
        self.jobs.send(Job::List { reply }).map_err(|_| gone())?;
        let defs =
            rx.await.map_err(|_| gone())?.map_err(|e| McpError::internal_error(backend::error_text(&e), None))?;
        let tools = defs
            .into_iter()
            .map(|d| {
                let schema = match d.input_schema {
                    serde_json::Value::Object(m) => m,
                    _ => serde_json::Map::new(),
                };
                let mut t = Tool::new(d.name, d.description, Arc::new(schema));
                if let Some(serde_json::Value::Object(o)) = d.output_schema {
                    t.output_schema = Some(Arc::new(o));
                }
                if let Some(h) = d.hints {
                    t.annotations = Some(
                        ToolAnnotations::new()
                            .read_only(h.read_only)
                            .destructive(h.destructive)
                            .idempotent(h.idempotent)
                            .open_world(false),
                    );
                }
                t
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let token =
            context.meta.get_progress_token().or_else(|| request.meta.as_ref().and_then(|m| m.get_progress_token()));
        let (ptx, mut prx) = mpsc::unbounded_channel::<Progress>();
        let (reply, mut rx) = oneshot::channel();
        let name = request.name.to_string();
        self.jobs
            .send(Job::Call {
                name: name.clone(),
                args: request.arguments.unwrap_or_default(),
                progress: token.is_some().then_some(ptx),
                reply,
            })
            .map_err(|_| gone())?;
        let notify = |p: Progress| {
            let peer = context.peer.clone();
            let token = token.clone();
            async move {
                if let Some(t) = token {
                    let n = ProgressNotificationParam::new(t, p.progress).with_message(p.message);
                    let _ = peer.notify_progress(n).await;
                }
            }
        };
        let out = loop {
            tokio::select! {
                // Progress first: every notification goes out before the result.
                biased;
                Some(p) = prx.recv() => notify(p).await,
                r = &mut rx => break r.map_err(|_| gone())?,
                () = context.ct.cancelled() => {
                    // Dropping `rx` tells the backend: a running command is killed.
                    return Err(McpError::internal_error("cancelled by the client", None));
                }
            }
        };
        while let Ok(p) = prx.try_recv() {
            notify(p).await;
        }
        match out {
            Some(o) => Ok(to_result(o).into()),
            // The Python SDK and others expect -32602 for an unknown tool.
            None => Err(McpError::invalid_params(format!("unknown tool {name:?}: see tools/list"), None)),
        }
    }
}

/// Streamable HTTP on `addr` (loopback), endpoint `/mcp`, each request
/// checked for `Authorization: Bearer <bearer>` first (401 otherwise),
/// until SIGINT or SIGTERM (then 0).
async fn serve_http(handler: Handler, addr: SocketAddr, bearer: String, print_token: bool) -> ClientResult<i32> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let config = StreamableHttpServerConfig::default().with_allowed_hosts(["127.0.0.1", "localhost", "::1", "[::1]"]);
    let service =
        StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(LocalSessionManager::default()), config);
    eprintln!("capvisor mcp: serving MCP (streamable HTTP) at http://{local}/mcp");
    if print_token {
        eprintln!("capvisor mcp: bearer token (shown once): {bearer}");
    }
    let bearer = Arc::new(bearer);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => r?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
            _ = term.recv() => return Ok(0),
        };
        let service = service.clone();
        let bearer = bearer.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut service = service.clone();
                let bearer = bearer.clone();
                async move {
                    use tower_service::Service;
                    if req.uri().path() != "/mcp" {
                        return Ok(plain(hyper::StatusCode::NOT_FOUND, "not found: the MCP endpoint is /mcp"));
                    }
                    if !authorized(req.headers(), &bearer) {
                        let mut r = plain(hyper::StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                        r.headers_mut().insert(
                            hyper::header::WWW_AUTHENTICATE,
                            hyper::header::HeaderValue::from_static("Bearer realm=\"capvisor mcp\""),
                        );
                        return Ok(r);
                    }
                    service.call(req).await
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                eprintln!("capvisor mcp: http connection: {e}");
            }
        });
    }
}

type Body = http_body_util::combinators::BoxBody<hyper::body::Bytes, std::convert::Infallible>;

fn plain(status: hyper::StatusCode, text: &'static str) -> hyper::Response<Body> {
    use http_body_util::BodyExt;
    let mut r = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(text)).boxed());
    *r.status_mut() = status;
    r
}

/// Whether `headers` carry `Authorization: Bearer <bearer>` (compared in
/// constant time).
fn authorized(headers: &hyper::HeaderMap, bearer: &str) -> bool {
    use subtle::ConstantTimeEq;
    let Some(v) = headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, token)) = v.trim().split_once(' ') else { return false };
    scheme.eq_ignore_ascii_case("bearer") && bool::from(token.trim().as_bytes().ct_eq(bearer.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_serve() {
        assert!(check_loopback("127.0.0.1:0".parse().unwrap()).is_ok());
        assert!(check_loopback("[::1]:8765".parse().unwrap()).is_ok());
        for a in ["0.0.0.0:8765", "192.168.1.2:80", "[::]:1"] {
            assert!(matches!(check_loopback(a.parse().unwrap()), Err(ClientError::Usage(_))), "{a}");
        }
    }

    #[test]
    fn bearer_check() {
        let mut h = hyper::HeaderMap::new();
        assert!(!authorized(&h, "s3cret-s3cret-s3cret"));
        h.insert(hyper::header::AUTHORIZATION, "Bearer s3cret-s3cret-s3cret".parse().unwrap());
        assert!(authorized(&h, "s3cret-s3cret-s3cret"));
        assert!(!authorized(&h, "s3cret-s3cret-s3creT"));
        h.insert(hyper::header::AUTHORIZATION, "Basic s3cret-s3cret-s3cret".parse().unwrap());
        assert!(!authorized(&h, "s3cret-s3cret-s3cret"));
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }
}
