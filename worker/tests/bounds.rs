//! Bounds the guest and the client cannot push past (issue 7, "Hardening"):
//! the worker in-process, attached like a real client, each "VM" a fake
//! `Machine` and a scripted, hostile `Guest` on a socketpair.
//!
//! - a guest writing to a client's sink without waiting for its stream
//!   window is held to `GUEST_CALLS` on its agent link: the excess gets
//!   `unavailable`, nothing more queues in the worker or reaches the client;
//! - a guest message over `conn::GUEST` ends its agent link and crashes that
//!   VM only, with the reason;
//! - `CLIENT_CALLS` calls in progress on one client connection: one more is
//!   `unavailable` at once, and the connection works on.

mod common;

use capnp::capability::Rc as CapRc;
use capvisor_client::ops;
use capvisor_rpc::conn::{self, CLIENT_CALLS, GUEST_CALLS};
use capvisor_rpc::schema::capvisor_capnp::{session, vm, VmState};
use capvisor_rpc::schema::common_capnp::{byte_sink, process, ErrorCode};
use capvisor_rpc::schema::guest_capnp::guest;
use capvisor_rpc::CvError;
use common::{run, Worker};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

/// A gate calls wait at until it is opened; counts who entered.
#[derive(Default)]
struct Gate {
    open: Cell<bool>,
    entered: Cell<usize>,
    notify: tokio::sync::Notify,
}

impl Gate {
    async fn pass(&self) {
        self.entered.set(self.entered.get() + 1);
        while !self.open.get() {
            self.notify.notified().await;
        }
    }
    fn release(&self) {
        self.open.set(true);
        self.notify.notify_waiters();
    }
}

/// What the fake guests saw and did.
#[derive(Default)]
struct Guests {
    /// Guest pings wait here.
    ping: Gate,
    /// Results of the flood's writes: accepted, refused `unavailable`.
    flood_ok: Cell<usize>,
    flood_refused: Cell<usize>,
}

/// `ByteSink.write` as a plain call: no stream window, as a hostile guest
/// would send it.
fn unpaced_write(sink: &byte_sink::Client, data: &[u8]) -> capnp::capability::RemotePromise<capnp::any_pointer::Owned> {
    use capnp::traits::HasTypeId;
    let mut req = sink.client.new_call::<byte_sink::write_params::Owned, capnp::any_pointer::Owned>(
        byte_sink::Client::TYPE_ID,
        0,
        None,
    );
    req.get().set_data(data);
    req.send()
}

const FLOOD_WRITES: usize = 400;

struct FakeGuest(Rc<Guests>);
struct NoProcess;
impl process::Server for NoProcess {}

impl guest::Server for FakeGuest {
    async fn hello(self: CapRc<Self>, _: guest::HelloParams, mut r: guest::HelloResults) -> capnp::Result<()> {
        r.get().init_info().set_kernel_release("6.1-hostile");
        Ok(())
    }

    async fn ping(self: CapRc<Self>, _: guest::PingParams, _: guest::PingResults) -> capnp::Result<()> {
        self.0.ping.pass().await;
        Ok(())
    }

    /// `flood`: 400 writes of 64 KiB to stdout, none waiting for another;
    /// `huge`: one 2 MiB write (over the host's 1 MiB guest message bound).
    async fn exec(self: CapRc<Self>, p: guest::ExecParams, mut r: guest::ExecResults) -> capnp::Result<()> {
        let p = p.get()?;
        let what = p.get_spec()?.get_argv()?.get(0)?.to_string().unwrap();
        let out = p.get_stdout()?;
        match what.as_str() {
            "flood" => {
                let chunk = vec![b'x'; capvisor_rpc::CHUNK];
                let sent: Vec<_> = (0..FLOOD_WRITES).map(|_| unpaced_write(&out, &chunk).promise).collect();
                for res in futures::future::join_all(sent).await {
                    match res {
                        Ok(_) => self.0.flood_ok.set(self.0.flood_ok.get() + 1),
                        Err(e) if CvError::from_rpc(&e).is_some_and(|c| c.code == ErrorCode::Unavailable) => {
                            self.0.flood_refused.set(self.0.flood_refused.get() + 1)
                        }
                        Err(e) => panic!("unexpected write failure: {e}"),
                    }
                }
            }
            "huge" => {
                let _ = unpaced_write(&out, &vec![0u8; 2 << 20]).promise.await;
            }
            other => panic!("unknown script {other}"),
        }
        r.get().set_process(capnp_rpc::new_client(NoProcess));
        Ok(())
    }
}

/// A worker whose VMs' guests are [`FakeGuest`]s sharing one [`Guests`].
struct Env {
    w: Worker,
    guests: Rc<Guests>,
}

impl std::ops::Deref for Env {
    type Target = Worker;
    fn deref(&self) -> &Worker {
        &self.w
    }
}

impl Env {
    fn new() -> Env {
        let guests = Rc::new(Guests::default());
        let g = guests.clone();
        let w = Worker::new(
            "bounds",
            |_| {},
            move |theirs| {
                let g: guest::Client = capnp_rpc::new_client(FakeGuest(g.clone()));
                let system = conn::rpc_system(
                    theirs,
                    capnp_rpc::rpc_twoparty_capnp::Side::Server,
                    Some(g.client),
                    conn::INTERNAL,
                );
                tokio::task::spawn_local(system);
            },
        );
        Env { w, guests }
    }

    async fn vm(&self, s: &session::Client, name: &str) -> vm::Client {
        let vm = ops::create_vm(&ops::vms(s), &ops::VmSpec { name: name.into(), ..Default::default() });
        assert_eq!(ops::vm_info(&vm).await.unwrap().state, VmState::Running);
        vm
    }

    fn agent_calls(&self, name: &str) -> Rc<conn::CallGauge> {
        self.st.vms.borrow()[name].running.borrow().as_ref().expect("running").agent_calls.clone()
    }
}

async fn until(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition within 20 s");
}

/// A client sink that takes its time: writes wait at `gate`; counts bytes.
struct SlowSink {
    gate: Rc<Gate>,
    got: Rc<Cell<usize>>,
}
impl byte_sink::Server for SlowSink {
    async fn write(self: CapRc<Self>, p: byte_sink::WriteParams) -> capnp::Result<()> {
        let n = p.get()?.get_data()?.len();
        self.gate.pass().await;
        self.got.set(self.got.get() + n);
        Ok(())
    }
}

fn exec_req(script: &str) -> ops::ExecRequest {
    ops::ExecRequest { argv: vec![script.into()], ..Default::default() }
}

#[test]
fn a_guest_flooding_a_slow_clients_sink_is_held_to_the_agent_link_window() {
    run(async {
        let env = Env::new();
        let s = env.attach().await;
        let vm = env.vm(&s, "flood").await;
        env.guests.ping.release();
        let gate = Rc::new(Gate::default());
        let got = Rc::new(Cell::new(0));
        let out: byte_sink::Client = capnp_rpc::new_client(SlowSink { gate: gate.clone(), got: got.clone() });
        let (err, _) = capvisor_rpc::sink::CollectSink::client(1024);
        let p = ops::exec(&vm, &exec_req("flood"), out, err);
        let vm2 = vm.clone();
        let waiting = tokio::task::spawn_local(async move { ops::vm_info(&vm2).await });
        let calls = env.agent_calls("flood");
        // The stalled client holds the worker back, and the guest's flood
        // meets the agent link's window: the excess is refused.
        until(|| calls.refused() >= 100).await;
        assert!(calls.peak_bytes() <= GUEST_CALLS.bytes, "peak {} bytes in progress", calls.peak_bytes());
        assert!(
            calls.calls() * capvisor_rpc::CHUNK <= GUEST_CALLS.bytes as usize,
            "{} writes in progress",
            calls.calls()
        );
        assert_eq!(got.get(), 0, "the stalled client received nothing yet");
        // Other calls to the VM are not stuck behind the flood.
        assert_eq!(waiting.await.unwrap().unwrap().state, VmState::Running);

        gate.release();
        until(|| env.guests.flood_ok.get() + env.guests.flood_refused.get() == FLOOD_WRITES).await;
        // Every write was either refused, typed, or delivered: none lost,
        // none queued beyond the window.
        assert_eq!(env.guests.flood_refused.get() as u64, calls.refused());
        assert_eq!(
            got.get(),
            env.guests.flood_ok.get() * capvisor_rpc::CHUNK,
            "the client got exactly the admitted writes"
        );
        assert!(calls.peak_bytes() <= GUEST_CALLS.bytes);
        drop(p);
        assert_eq!(calls.calls(), 0);
        ops::ping(&vm).await.expect("the VM carries on");
    });
}

#[test]
fn an_oversized_guest_message_crashes_that_vm_only() {
    run(async {
        let env = Env::new();
        let s = env.attach().await;
        let big = env.vm(&s, "big").await;
        let other = env.vm(&s, "other").await;
        env.guests.ping.release();
        let (out, _) = capvisor_rpc::sink::CollectSink::client(4 << 20);
        let (err, _) = capvisor_rpc::sink::CollectSink::client(1024);
        let p = ops::exec(&big, &exec_req("huge"), out, err);
        let e = ops::wait(&p).await.expect_err("the link broke under the exec");
        assert!(matches!(e, capvisor_client::ClientError::Domain(_)), "{e:?}");
        until(|| env.st.vms.borrow()["big"].state.get() == VmState::Crashed).await;
        let info = ops::vm_info(&big).await.unwrap();
        assert_eq!(info.state, VmState::Crashed);
        assert!(info.detail.contains("agent link") && info.detail.contains("too large"), "{}", info.detail);
        assert!(env.st.vms.borrow()["big"].running.borrow().is_none(), "its handles were dropped");
        let e = ops::ping(&big).await.unwrap_err();
        assert!(matches!(&e, capvisor_client::ClientError::Domain(d) if d.code == ErrorCode::NotRunning), "{e:?}");
        // The other VM and the session carry on.
        ops::ping(&other).await.unwrap();
        assert_eq!(ops::vm_info(&other).await.unwrap().state, VmState::Running);
    });
}

#[test]
fn one_call_over_the_limit_on_a_client_connection_is_unavailable_and_the_connection_works_on() {
    run(async {
        let env = Env::new();
        let s = env.attach().await;
        let vm = env.vm(&s, "p").await;
        let held: Vec<_> = (0..CLIENT_CALLS.calls).map(|_| vm.ping_request().send().promise).collect();
        until(|| env.guests.ping.entered.get() == CLIENT_CALLS.calls).await;
        let e = vm.ping_request().send().promise.await.err().expect("one over the limit is refused");
        let c = CvError::from_rpc(&e).expect("typed");
        assert_eq!(c.code, ErrorCode::Unavailable);
        assert!(c.message.contains("too many calls in flight on this connection"), "{}", c.message);
        assert_eq!(env.guests.ping.entered.get(), CLIENT_CALLS.calls, "the refused call went nowhere");
        // Another connection of the same session is not affected.
        let s2 = env.attach().await;
        assert_eq!(ops::vm_info(&ops::get_vm(&ops::vms(&s2), "p")).await.unwrap().state, VmState::Running);
        env.guests.ping.release();
        for h in futures::future::join_all(held).await {
            h.expect("admitted calls complete");
        }
        ops::ping(&vm).await.expect("the connection works on");
    });
}
