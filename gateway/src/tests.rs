//! The gateway against an in-process fake broker, over a real Unix socket.

use super::*;
use capvisor_rpc::attach::{write_attach, MAGIC_RPC};
use capvisor_rpc::fdpass;
use capvisor_rpc::schema::common_capnp::ErrorCode;
use std::cell::RefCell;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Seen {
    local: Vec<(u32, u32)>,
    password: Vec<(String, String)>,
    /// The `conn` ids the calls named.
    conns: Vec<String>,
    /// Byte lengths of the passwords that reached the broker.
    password_lens: Vec<usize>,
}

/// Records what it saw and denies everything: a method not in `auth` with
/// "… login is disabled", others with the uid or the usual message;
/// `loginPassword` for user "slow" takes 2 s.
struct FakeBroker {
    seen: Rc<RefCell<Seen>>,
    auth: Vec<String>,
    /// The broker's end of the attach channel, where client sockets for
    /// login calls arrive.
    ch: Rc<FdChannel>,
}

impl FakeBroker {
    /// Like the real broker: the client socket the call's `conn` names
    /// (it arrived just before the call), and its peer's credentials.
    async fn peer_of(&self, conn: &str) -> capnp::Result<capvisor_rpc::principal::PeerCred> {
        let (tag, fd) = self.ch.recv().await?;
        assert_eq!(
            String::from_utf8_lossy(&tag),
            format!("{}{conn}", capvisor_rpc::principal::LOGIN_SOCKET_TAG),
            "the call names the socket just passed"
        );
        assert_eq!(conn.len(), 32, "a 128-bit id");
        self.seen.borrow_mut().conns.push(conn.to_string());
        Ok(capvisor_rpc::principal::PeerCred::of_socket(&fd)?)
    }
}

impl broker::Server for FakeBroker {
    async fn login_local(
        self: CapRc<Self>,
        p: broker::LoginLocalParams,
        _: broker::LoginLocalResults,
    ) -> capnp::Result<()> {
        let p = self.peer_of(p.get()?.get_conn()?.to_str()?).await?;
        self.seen.borrow_mut().local.push((p.uid, p.pid));
        let msg = if self.auth.iter().any(|a| a == "local") {
            format!("uid {}", p.uid)
        } else {
            "local login is disabled".into()
        };
        Err(CvError::denied(msg).into())
    }
    async fn login_password(
        self: CapRc<Self>,
        p: broker::LoginPasswordParams,
        _: broker::LoginPasswordResults,
    ) -> capnp::Result<()> {
        let p = p.get()?;
        let user = String::from_utf8_lossy(p.get_user()?.as_bytes()).into_owned();
        let peer = self.peer_of(p.get_conn()?.to_str()?).await?.to_string();
        self.seen.borrow_mut().password.push((user.clone(), peer));
        self.seen.borrow_mut().password_lens.push(p.get_password()?.as_bytes().len());
        if user == "slow" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let msg = if self.auth.iter().any(|a| a == "password") {
            "invalid user name or password"
        } else {
            "password login is disabled"
        };
        Err(CvError::denied(msg).into())
    }
}

struct Env {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    seen: Rc<RefCell<Seen>>,
    broker_side: Rc<FdChannel>,
}

fn start(auth: &[&str], max: usize) -> Env {
    start_with(auth, Limits { max_connections: max, ..Limits::default() })
}

fn start_with(auth: &[&str], limits: Limits) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Rc::new(RefCell::new(Seen::default()));
    let auth_list: Vec<String> = auth.iter().map(|s| s.to_string()).collect();
    let (a, b) = fdpass::pair().unwrap();
    let broker_side = Rc::new(FdChannel::new(b).unwrap());
    let broker: broker::Client =
        capnp_rpc::new_client(FakeBroker { seen: seen.clone(), auth: auth_list, ch: broker_side.clone() });
    let gw = Gateway::new(broker, FdChannel::new(a).unwrap(), auth.iter().map(|s| s.to_string()).collect(), limits);
    tokio::task::spawn_local(gw.accept_loop(listener));
    Env { _dir: dir, path, seen, broker_side }
}

async fn rpc_client(path: &std::path::Path) -> gateway::Client {
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(MAGIC_RPC).await.unwrap();
    conn::connect::<gateway::Client>(s, None, conn::INTERNAL).0
}

async fn methods(gw: &gateway::Client) -> Vec<String> {
    let resp = gw.auth_methods_request().send().promise.await.unwrap();
    resp.get()
        .unwrap()
        .get_methods()
        .unwrap()
        .iter()
        .map(|m| capvisor_rpc::principal::method_name(m.unwrap()).to_string())
        .collect()
}

/// Reads until EOF or a reset (the gateway hung up without a word);
/// fails if it takes over 5 s or anything arrives.
async fn expect_closed(s: &mut UnixStream) {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("not closed").ok();
    assert!(buf.is_empty(), "unexpected reply of {} bytes", buf.len());
}

fn err_code<T>(r: capnp::Result<T>) -> (ErrorCode, String) {
    match r {
        Err(e) => {
            let e = CvError::from_rpc(&e).unwrap_or_else(|| panic!("not a domain error: {e}"));
            (e.code, e.message)
        }
        Ok(_) => panic!("unexpected ok"),
    }
}

#[test]
fn garbage_and_oversized_end_only_that_connection() {
    conn::run_local(async {
        let env = start(&["local", "password"], 16);
        let good = rpc_client(&env.path).await;
        assert_eq!(methods(&good).await, vec!["local", "password"]);

        // Garbage preamble.
        let mut bad = UnixStream::connect(&env.path).await.unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        expect_closed(&mut bad).await;

        // Attach with an absurd token length.
        let mut bad = UnixStream::connect(&env.path).await.unwrap();
        bad.write_all(capvisor_rpc::attach::MAGIC_ATTACH).await.unwrap();
        bad.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        expect_closed(&mut bad).await;

        // A capnp frame announcing 4 Mi words (32 MiB), above UNTRUSTED's 2 Mi.
        let mut big = UnixStream::connect(&env.path).await.unwrap();
        big.write_all(MAGIC_RPC).await.unwrap();
        big.write_all(&0u32.to_le_bytes()).await.unwrap(); // one segment
        big.write_all(&(4u32 * 1024 * 1024).to_le_bytes()).await.unwrap();
        let _ = big.write_all(&[0u8; 4096]).await;
        expect_closed(&mut big).await;

        // A peer that connects and hangs up at once.
        drop(UnixStream::connect(&env.path).await.unwrap());

        // The first client and a new one are still served.
        assert_eq!(methods(&good).await, vec!["local", "password"]);
        let other = rpc_client(&env.path).await;
        assert_eq!(methods(&other).await, vec!["local", "password"]);
    });
}

#[test]
fn client_disconnecting_mid_call_harms_nobody() {
    conn::run_local(async {
        let env = start(&["local", "password"], 16);
        {
            let gw = rpc_client(&env.path).await;
            let mut req = gw.login_password_request();
            req.get().set_user("slow");
            req.get().set_password("whatever1");
            let pending = req.send().promise;
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(pending);
            drop(gw);
        }
        let gw = rpc_client(&env.path).await;
        assert_eq!(methods(&gw).await.len(), 2);
        assert_eq!(env.seen.borrow().password.len(), 1);
    });
}

#[test]
fn logins_hand_the_clients_socket_to_the_broker_and_disabled_methods_are_denied() {
    conn::run_local(async {
        let me = nix::unistd::getuid().as_raw();
        let peer = format!("unix:uid={me} pid={}", std::process::id());
        let env = start(&["local"], 16);
        let gw = rpc_client(&env.path).await;
        assert_eq!(methods(&gw).await, vec!["local"]);

        let (code, msg) = err_code(gw.login_local_request().send().promise.await);
        assert_eq!(code, ErrorCode::Denied);
        assert_eq!(msg, format!("uid {me}"));
        assert_eq!(
            env.seen.borrow().local,
            vec![(me, std::process::id())],
            "the broker reads the client's own socket (SO_PEERCRED of the descriptor passed)"
        );

        // A disabled method: typed denial, decided (and audited) by the broker.
        let mut req = gw.login_password_request();
        req.get().set_user("bob");
        req.get().set_password("hunter22");
        assert_eq!(err_code(req.send().promise.await), (ErrorCode::Denied, "password login is disabled".into()));
        assert_eq!(env.seen.borrow().password, vec![("bob".into(), peer.clone())]);
        let conns = env.seen.borrow().conns.clone();
        assert_eq!(conns.len(), 2);
        assert_ne!(conns[0], conns[1], "every call hands over its own descriptor under a fresh id");

        let env = start(&["password"], 16);
        let gw = rpc_client(&env.path).await;
        assert_eq!(methods(&gw).await, vec!["password"]);
        assert_eq!(
            err_code(gw.login_local_request().send().promise.await),
            (ErrorCode::Denied, "local login is disabled".into())
        );

        // resume forwards too; an over-long token is stale without a broker round trip.
        let mut req = gw.resume_request();
        req.get().set_token("x".repeat(300).as_str());
        assert_eq!(err_code(req.send().promise.await).0, ErrorCode::StaleSession);
    });
}

#[test]
fn attach_hands_the_socket_to_the_broker() {
    conn::run_local(async {
        let env = start(&["local"], 16);
        let mut c = UnixStream::connect(&env.path).await.unwrap();
        write_attach(&mut c, "tok-123").await.unwrap();
        let (tag, fd) = env.broker_side.recv().await.unwrap();
        assert_eq!(tag, b"tok-123");
        let mut s = capvisor_rpc::spawn::into_tokio(fd).unwrap();
        s.write_all(b"\0hello").await.unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\0hello");
        drop(s);
        // The gateway kept no copy: the client sees EOF once the broker closes.
        expect_closed(&mut c).await;

        // A token in the login-socket namespace is refused by the gateway
        // (stale) and never reaches the broker's channel.
        let mut c = UnixStream::connect(&env.path).await.unwrap();
        write_attach(&mut c, "login:0123456789abcdef0123456789abcdef").await.unwrap();
        assert_eq!(capvisor_rpc::attach::read_reply(&mut c).await.unwrap().unwrap_err().code, ErrorCode::StaleSession);
        let mut c = UnixStream::connect(&env.path).await.unwrap();
        write_attach(&mut c, "tok-456").await.unwrap();
        let (tag, _fd) = env.broker_side.recv().await.unwrap();
        assert_eq!(tag, b"tok-456", "the next message on the channel is the next real attach");
    });
}

#[test]
fn connection_limit_refuses_extra_connections() {
    conn::run_local(async {
        let env = start(&["local"], 2);
        let _a = UnixStream::connect(&env.path).await.unwrap();
        let _b = UnixStream::connect(&env.path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = UnixStream::connect(&env.path).await.unwrap();
        expect_closed(&mut c).await;
        drop(_a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let gw = rpc_client(&env.path).await;
        assert_eq!(methods(&gw).await, vec!["local"]);
    });
}

#[test]
fn auth_parsing() {
    assert_eq!(parse_auth(&["local".into(), "password".into()]).unwrap().len(), 2);
    assert!(parse_auth(&["".into()]).unwrap().is_empty());
    assert!(parse_auth(&["kerberos".into()]).is_err());
    assert_eq!(Peer { uid: 1, pid: 2 }.to_string(), "unix:uid=1 pid=2");
}

#[test]
fn over_long_login_fields_are_not_forwarded_whole() {
    conn::run_local(async {
        let env = start(&["local", "password"], 16);
        let gw = rpc_client(&env.path).await;
        let mut req = gw.login_password_request();
        req.get().set_user("u".repeat(10_000).as_str());
        req.get().set_password("p".repeat(200_000).as_str());
        assert_eq!(err_code(req.send().promise.await).0, ErrorCode::Denied);
        let mut req = gw.login_password_request();
        req.get().set_user("bob");
        req.get().set_password("p".repeat(MAX_PASSWORD).as_str());
        assert_eq!(err_code(req.send().promise.await).0, ErrorCode::Denied);
        let seen = env.seen.borrow();
        assert_eq!(seen.password[0].0.len(), MAX_USER, "the user name is cut");
        assert_eq!(
            seen.password_lens,
            vec![0, MAX_PASSWORD],
            "an over-long password arrives empty; a maximal one whole"
        );
    });
}

#[test]
fn idle_login_connections_are_bounded_per_uid_and_closed_at_the_deadline() {
    conn::run_local(async {
        let limits = Limits { max_connections: 512, max_rpc_per_uid: 3, login_deadline: Duration::from_millis(400) };
        let env = start_with(&["local", "password"], limits);
        // Idle login connections: a uid gets three ...
        let mut idle = vec![];
        for _ in 0..3 {
            let mut s = UnixStream::connect(&env.path).await.unwrap();
            s.write_all(MAGIC_RPC).await.unwrap();
            idle.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ... a fourth is closed right after its preamble ...
        let mut fourth = UnixStream::connect(&env.path).await.unwrap();
        fourth.write_all(MAGIC_RPC).await.unwrap();
        let t = std::time::Instant::now();
        expect_closed(&mut fourth).await;
        assert!(t.elapsed() < Duration::from_millis(300), "closed at once, not at the deadline");
        // ... while an attach still goes through at once.
        let mut s = UnixStream::connect(&env.path).await.unwrap();
        write_attach(&mut s, "some-token").await.unwrap();
        let (tag, _fd) = tokio::time::timeout(Duration::from_secs(2), env.broker_side.recv()).await.unwrap().unwrap();
        assert_eq!(tag, b"some-token");
        // The idle ones are closed once the login deadline passed, which
        // frees the uid's slots.
        for s in idle.iter_mut() {
            expect_closed(s).await;
        }
        let gw = rpc_client(&env.path).await;
        assert_eq!(methods(&gw).await, vec!["local", "password"]);
    });
}
