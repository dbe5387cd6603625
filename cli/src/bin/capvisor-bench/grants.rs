//! Delegation figures of `capvisor-bench` (issue 10 "Figures", README
//! "Benchmarks"): how fast a revocation reaches a holder, how many share
//! tokens the gateway redeems per second, and what one narrowing layer adds
//! to a no-op call.
//!
//! The section starts its own `capvisor serve` (default manifest, private
//! socket and state dir under the bench's work dir; stopped on every path
//! by [`super::rtt::Server`]'s drop), logs in with this process's Unix
//! credentials, creates one `base` VM `grants` and shares narrowed views of
//! it (`Vm.narrow` with exec allowed for `cat` only, then `Shares.share`,
//! ttl 10 min). A holder reaches a share as `capvisor login --token-stdin`
//! does: `Gateway.redeem` on a new gateway connection (closed right after),
//! then an attach with the returned resume token, straight to the
//! grantor's worker. Everything runs on the host's Unix sockets.
//!
//! - Revocation (`--revokes N`, default 50 runs): each run makes a grant,
//!   redeems and attaches it, starts `cat` through the holder's `box` with
//!   stdin kept open, writes one byte (so `cat` is running in the guest),
//!   leaves a `Process.wait` in flight, then calls `Shares.revoke` on the
//!   grantor's session. Measured from just before the revoke call is sent to
//!   the moment the holder's `wait` fails (it must fail with
//!   `staleSession`), and to revoke's own reply.
//! - Redeem (`--redeems N`, default 200): one grant, then N sequential
//!   `Gateway.redeem` calls, a new gateway connection each (connect,
//!   preamble, redeem; connection closed after): redeems per second over the
//!   whole loop and p50/p99 per redeem. Then N times redeem + attach +
//!   `CapSet.list` (what a holder does before its first call).
//! - Narrowing (`--narrow-calls N`, default 2000): `Vm.info` (answered by
//!   the worker, no guest round trip) and `Vm.ping` (a round trip to
//!   guest-init) N times each on the session's own `Vm`, on one narrowed
//!   `Vm` of the same session, and on a shared narrowed `Vm` held by an
//!   attached delegate session (grant-bound: the membrane of its grant
//!   checks every call); the three interleaved call by call so host drift
//!   hits all alike.

use anyhow::{bail, ensure, Context};
use capvisor_client::{connect, ops, ClientError};
use capvisor_rpc::schema::capvisor_capnp::{session, shares, vm};
use capvisor_rpc::schema::common_capnp::ErrorCode;
use capvisor_rpc::sink::CollectSink;
use std::path::Path;
use std::time::{Duration, Instant};

/// Lifetime of every grant the section makes, ms.
const TTL_MS: i64 = 600_000;
/// Longest the holder's `wait` may take to fail after a revoke.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The name each share's holder sees the VM under.
const SHARED_NAME: &str = "box";
/// Warm-up calls (each target) before the narrowing figures.
const WARMUP: usize = 50;

/// What the delegation section measured; every vector holds one entry per
/// run or call.
#[derive(Debug, Default)]
pub struct GrantFigures {
    /// From just before `Shares.revoke` is sent to the holder's in-flight
    /// `wait` failing with `staleSession`.
    pub revoke_to_failure: Vec<Duration>,
    /// From just before `Shares.revoke` is sent to its reply.
    pub revoke_reply: Vec<Duration>,
    /// One `Gateway.redeem` each, on a new gateway connection.
    pub redeem: Vec<Duration>,
    /// Wall time of the whole sequential redeem loop.
    pub redeem_wall: Duration,
    /// Redeem, attach with the resume token, `CapSet.list`, each.
    pub redeem_attach_list: Vec<Duration>,
    /// Wall time of the redeem + attach + list loop.
    pub redeem_attach_list_wall: Duration,
    /// `Vm.info` on the session's own `Vm`.
    pub info_direct: Vec<Duration>,
    /// `Vm.info` through one narrowed `Vm` of the same session.
    pub info_narrowed: Vec<Duration>,
    /// `Vm.info` through a shared narrowed `Vm` in a delegate session.
    pub info_delegate: Vec<Duration>,
    /// `Vm.ping` on the session's own `Vm`.
    pub ping_direct: Vec<Duration>,
    /// `Vm.ping` through one narrowed `Vm`.
    pub ping_narrowed: Vec<Duration>,
    /// `Vm.ping` through a shared narrowed `Vm` in a delegate session.
    pub ping_delegate: Vec<Duration>,
}

/// `v.narrow(exec allow cat)`, pipelined; everything else denied.
fn narrow_to_cat(v: &vm::Client) -> vm::Client {
    let mut req = v.narrow_request();
    req.get().init_narrowing().init_exec_allow(1).set(0, "cat");
    req.send().pipeline.get_vm()
}

/// `Shares.share` of `cap` as [`SHARED_NAME`] with a token; returns (grant id, token).
async fn share(my_shares: &shares::Client, cap: &vm::Client, label: &str) -> anyhow::Result<(String, String)> {
    let mut req = my_shares.share_request();
    {
        let mut spec = req.get().init_spec();
        let mut c = spec.reborrow().init_caps(1).get(0);
        c.set_name(SHARED_NAME);
        c.init_cap().set_as_capability(cap.client.hook.add_ref());
        spec.set_label(label);
        spec.set_ttl_ms(TTL_MS);
    }
    let resp = req.send().promise.await.map_err(ClientError::from).context("Shares.share")?;
    let r = resp.get()?;
    let id = capvisor_rpc::error::text(r.get_grant()?.get_id())?;
    let token = capvisor_rpc::error::text(r.get_token())?;
    ensure!(!token.is_empty(), "Shares.share returned no token for grant {id}");
    Ok((id, token))
}

/// `Gateway.redeem` on a new gateway connection, closed right after (as a
/// `capvisor login --token-stdin` process does by exiting); returns the
/// delegate session's resume token.
async fn redeem(socket: &Path, token: &str) -> anyhow::Result<String> {
    let login = connect::redeem(socket, token).await.context("Gateway.redeem")?;
    login.connection.abort();
    Ok(login.token)
}

/// [`redeem`], then an attach with the resume token: the holder's session.
async fn redeem_attach(socket: &Path, token: &str) -> anyhow::Result<session::Client> {
    let resume = redeem(socket, token).await?;
    connect::attach(socket, &resume).await.context("attach with the delegate resume token")
}

/// `Shares.revoke(id)`.
async fn revoke(my_shares: &shares::Client, id: &str) -> anyhow::Result<()> {
    let mut req = my_shares.revoke_request();
    req.get().set_grant_id(id);
    req.send().promise.await.map_err(ClientError::from).with_context(|| format!("Shares.revoke({id})"))?;
    Ok(())
}

/// One revocation run (module docs): returns (revoke -> holder's `wait`
/// failed, revoke -> its reply).
async fn revoke_run(
    socket: &Path,
    vm: &vm::Client,
    my_shares: &shares::Client,
    i: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let (id, token) = share(my_shares, &narrow_to_cat(vm), &format!("bench-revoke-{i}")).await?;
    let holder = redeem_attach(socket, &token).await?;
    let boxed: vm::Client = ops::get_cap(&ops::cap_set(&holder), SHARED_NAME);
    let (out, _) = CollectSink::client(1 << 16);
    let (err, _) = CollectSink::client(1 << 16);
    let req = ops::ExecRequest { argv: vec!["cat".into()], keep_stdin_open: true, ..Default::default() };
    let running = ops::exec(&boxed, &req, out, err);
    // Answered once `cat` runs in the guest (a failure to start shows here).
    ops::write_stdin(&running, b"x").await.context("holder: cat through the shared Vm")?;
    let waiting = tokio::task::spawn_local(async move {
        let r = ops::wait(&running).await;
        (r, Instant::now())
    });
    // Let the wait reach the worker and guest-init.
    tokio::time::sleep(Duration::from_millis(20)).await;
    ensure!(!waiting.is_finished(), "the holder's cat ended before the revoke");
    let t0 = Instant::now();
    revoke(my_shares, &id).await?;
    let replied = t0.elapsed();
    let (r, failed_at) = tokio::time::timeout(REVOKE_TIMEOUT, waiting)
        .await
        .with_context(|| format!("the holder's wait still runs {REVOKE_TIMEOUT:?} after revoking {id}"))??;
    match r {
        Err(ClientError::Domain(e)) if e.code == ErrorCode::StaleSession => {}
        other => bail!("the holder's wait after revoking {id}: want staleSession, got {other:?}"),
    }
    Ok((failed_at.saturating_duration_since(t0), replied))
}

/// Times `calls` of `call` on each target, interleaved call by call, after
/// [`WARMUP`] untimed rounds; returns one vector per target.
async fn interleaved<F, Fut>(targets: &[&vm::Client; 3], calls: usize, call: F) -> anyhow::Result<[Vec<Duration>; 3]>
where
    F: Fn(vm::Client) -> Fut,
    Fut: std::future::Future<Output = capvisor_client::ClientResult<()>>,
{
    let mut out: [Vec<Duration>; 3] = Default::default();
    for round in 0..WARMUP + calls {
        for (k, v) in targets.iter().enumerate() {
            let v = (*v).clone();
            let t = Instant::now();
            call(v).await?;
            if round >= WARMUP {
                out[k].push(t.elapsed());
            }
        }
    }
    Ok(out)
}

/// Runs the delegation figures with their own `capvisor serve` under
/// `work/grants`: `revokes` revocation runs, `redeems` redeems (and as many
/// redeem + attach + list), `narrow_calls` calls of each kind on each
/// target (0 skips a part).
///
/// Errors: serve does not come up, a call fails, a revoked holder's wait
/// does not fail with `staleSession` within 30 s.
pub fn figures(
    bin_dir: &Path,
    guest_init: &Path,
    work: &Path,
    revokes: usize,
    redeems: usize,
    narrow_calls: usize,
) -> anyhow::Result<GrantFigures> {
    let dir = work.join("grants");
    std::fs::create_dir_all(&dir)?;
    eprintln!("capvisor-bench: grants: starting capvisor serve ...");
    // Dropped (serve stopped) on every path out of this function.
    let (_server, socket) = super::rtt::Server::start(bin_dir, &dir, guest_init)?;
    capvisor_rpc::conn::run_local(async {
        let login = connect::login_local(&socket).await.context("login")?;
        let session = connect::attach(&socket, &login.token).await.context("attach")?;
        let vms = ops::vms(&session);
        let vm = ops::create_vm(&vms, &ops::VmSpec { name: "grants".into(), ..Default::default() });
        let out = ops::exec_collect(&vm, &["true"], b"", 1 << 10).await.context("first exec in the VM")?;
        ensure!(out.exit == ops::Exit::Code(0), "`true` in the VM: {:?}", out.exit);
        let my_shares: shares::Client = ops::get_cap(&ops::cap_set(&session), "shares");
        let mut f = GrantFigures::default();

        for i in 0..revokes {
            let (failed, replied) = revoke_run(&socket, &vm, &my_shares, i).await?;
            f.revoke_to_failure.push(failed);
            f.revoke_reply.push(replied);
            if (i + 1) % 10 == 0 {
                eprintln!("capvisor-bench: grants: {} of {revokes} revocations", i + 1);
            }
        }

        if redeems > 0 {
            let (id, token) = share(&my_shares, &narrow_to_cat(&vm), "bench-redeem").await?;
            for _ in 0..5 {
                redeem(&socket, &token).await?;
            }
            let t_all = Instant::now();
            for _ in 0..redeems {
                let t = Instant::now();
                redeem(&socket, &token).await?;
                f.redeem.push(t.elapsed());
            }
            f.redeem_wall = t_all.elapsed();
            let t_all = Instant::now();
            for _ in 0..redeems {
                let t = Instant::now();
                let holder = redeem_attach(&socket, &token).await?;
                let caps = ops::list_caps(&ops::cap_set(&holder)).await.context("holder: CapSet.list")?;
                f.redeem_attach_list.push(t.elapsed());
                ensure!(
                    caps.iter().map(|c| c.name.as_str()).collect::<Vec<_>>() == [SHARED_NAME],
                    "the holder's CapSet: want exactly {SHARED_NAME}, got {:?}",
                    caps.iter().map(|c| &c.name).collect::<Vec<_>>()
                );
            }
            f.redeem_attach_list_wall = t_all.elapsed();
            revoke(&my_shares, &id).await?;
        }

        if narrow_calls > 0 {
            let narrowed = narrow_to_cat(&vm);
            let (_, token) = share(&my_shares, &narrow_to_cat(&vm), "bench-narrow").await?;
            let holder = redeem_attach(&socket, &token).await?;
            let delegate: vm::Client = ops::get_cap(&ops::cap_set(&holder), SHARED_NAME);
            let targets = [&vm, &narrowed, &delegate];
            let [d, n, g] = interleaved(&targets, narrow_calls, |v| async move { ops::vm_info(&v).await.map(drop) })
                .await
                .context("Vm.info")?;
            (f.info_direct, f.info_narrowed, f.info_delegate) = (d, n, g);
            let [d, n, g] =
                interleaved(&targets, narrow_calls, |v| async move { ops::ping(&v).await }).await.context("Vm.ping")?;
            (f.ping_direct, f.ping_narrowed, f.ping_delegate) = (d, n, g);
        }

        ops::remove_vm(&vms, "grants").await.context("remove the VM")?;
        // Ends this session's grants too.
        ops::logout(&session).await.context("logout")?;
        Ok(f)
    })
}

/// Prints the figures as rows of the bench's table (parts with no runs are
/// left out).
pub fn print(f: &mut GrantFigures) {
    use super::{ms, pct, us};
    let n = f.revoke_to_failure.len();
    if n > 0 {
        let over = f.revoke_to_failure.iter().filter(|d| **d > Duration::from_millis(100)).count();
        let v = &mut f.revoke_to_failure;
        println!("{:<58} {:>9.1} ms", format!("grants: revoke -> holder's wait fails p50 ({n} runs)"), ms(pct(v, 50)));
        println!("{:<58} {:>9.1} ms", "grants: revoke -> holder's wait fails p99", ms(pct(v, 99)));
        println!("{:<58} {:>9.1} ms", "grants: revoke -> holder's wait fails max", ms(pct(v, 100)));
        println!("{:<58} {:>12}", "grants: runs over 100 ms", format!("{over} of {n}"));
        let v = &mut f.revoke_reply;
        println!("{:<58} {:>9.1} ms", "grants: revoke -> Shares.revoke's own reply p50", ms(pct(v, 50)));
        println!("{:<58} {:>9.1} ms", "grants: revoke -> Shares.revoke's own reply p99", ms(pct(v, 99)));
        println!("{:<58} {:>9.1} ms", "grants: revoke -> Shares.revoke's own reply max", ms(pct(v, 100)));
    }
    let n = f.redeem.len();
    if n > 0 {
        println!(
            "{:<58} {:>11.0}/s",
            format!("grants: tokens redeemed per second ({n} sequential)"),
            n as f64 / f.redeem_wall.as_secs_f64()
        );
        println!("{:<58} {:>9.2} ms", "grants: one redeem (new connection) p50", ms(pct(&mut f.redeem, 50)));
        println!("{:<58} {:>9.2} ms", "grants: one redeem (new connection) p99", ms(pct(&mut f.redeem, 99)));
        let v = &mut f.redeem_attach_list;
        println!(
            "{:<58} {:>11.0}/s",
            format!("grants: redeem + attach + CapSet.list per second ({})", v.len()),
            v.len() as f64 / f.redeem_attach_list_wall.as_secs_f64()
        );
        println!("{:<58} {:>9.2} ms", "grants: redeem + attach + CapSet.list p50", ms(pct(v, 50)));
        println!("{:<58} {:>9.2} ms", "grants: redeem + attach + CapSet.list p99", ms(pct(v, 99)));
    }
    let n = f.info_direct.len();
    if n > 0 {
        for (call, d, nr, g) in [
            ("Vm.info", &mut f.info_direct, &mut f.info_narrowed, &mut f.info_delegate),
            ("Vm.ping", &mut f.ping_direct, &mut f.ping_narrowed, &mut f.ping_delegate),
        ] {
            for (what, v) in [("own Vm", &mut *d), ("narrowed Vm", &mut *nr), ("delegate's shared Vm", &mut *g)] {
                println!("{:<58} {:>9.1} us", format!("grants: {call} on the {what} p50 ({n})"), us(pct(v, 50)));
                println!("{:<58} {:>9.1} us", format!("grants: {call} on the {what} p99"), us(pct(v, 99)));
            }
            let diff = |a: &mut Vec<Duration>, b: &mut Vec<Duration>| us(pct(a, 50)) - us(pct(b, 50));
            println!("{:<58} {:>+9.1} us", format!("grants: {call} added by one narrowing layer (p50)"), diff(nr, d));
            println!("{:<58} {:>+9.1} us", format!("grants: {call} delegate's shared Vm vs own Vm (p50)"), diff(g, d));
        }
    }
}
