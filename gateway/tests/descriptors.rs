//! A login connection costs the gateway one descriptor: the client's
//! socket, shared by the RPC system and the login server that hands it to
//! the broker (no duplicate held per connection). Its own test binary, so
//! no other test opens descriptors in this process meanwhile.

use capvisor_gateway::{Gateway, Limits};
use capvisor_rpc::conn;
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::schema::internal_capnp::broker;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// A broker that is never called here.
struct NoBroker;
impl broker::Server for NoBroker {}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn an_idle_login_connection_holds_one_descriptor_in_the_gateway() {
    conn::run_local(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (a, _b) = fdpass::pair().unwrap();
        let gw = Gateway::new(
            capnp_rpc::new_client::<broker::Client, _>(NoBroker),
            FdChannel::new(a).unwrap(),
            vec!["local".into()],
            Limits::default(),
        );
        tokio::task::spawn_local(gw.accept_loop(listener));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = open_fds();
        let mut clients = vec![];
        for _ in 0..20 {
            let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
            s.write_all(capvisor_rpc::attach::MAGIC_RPC).await.unwrap();
            clients.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Each: our client end and the gateway's accepted end.
        assert_eq!(open_fds() - before, 2 * clients.len());
        drop(clients);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(open_fds(), before, "closed with the connections");
    });
}
