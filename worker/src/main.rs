//! `capvisor-worker --rpc-fd 3 --attach-fd 4 --config-fd 5`: one session's
//! worker (see `capvisor_worker::serve`). Spawned by the broker only (see
//! docs/processes.md); not for people.

use capvisor_manifest::SessionContext;
use capvisor_rpc::conn;
use capvisor_rpc::fdpass::FdChannel;
use clap::Parser;

#[derive(Parser)]
#[command(about = "capvisor per-session worker (spawned by capvisor-broker; not run by hand)")]
struct Args {
    /// Inherited stream socket to the broker.
    #[arg(long)]
    rpc_fd: i32,
    /// Inherited SOCK_SEQPACKET fd channel on which attached client sockets arrive.
    #[arg(long)]
    attach_fd: i32,
    /// Inherited memfd holding the schema `SessionContext` message.
    #[arg(long)]
    config_fd: i32,
}

/// Narrows the broker's Landlock domain to this session before any thread
/// exists: writes only below the session's run directory and the cgroup
/// file systems (`capvisor_confine::service`). The worker does not start
/// unconfined unless the manifest's `[confinement] required` leaves out
/// `landlock`.
fn confine(ctx: &SessionContext) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&ctx.run_dir).with_context(|| format!("creating {}", ctx.run_dir.display()))?;
    let images: Vec<&std::path::Path> = ctx
        .images
        .values()
        .flat_map(|i| [i.kernel.as_path(), i.initramfs.as_path()].into_iter().chain(i.rootfs.as_deref()))
        .collect();
    let mut policy = capvisor_confine::service::service_policy(
        &ctx.run_dir,
        &capvisor_rpc::paths::bin_dir(),
        &images,
        "qemu-system-x86_64",
        &ctx.confinement.cgroup_root,
    )?;
    // The principal's volume files (the broker made the directory): their
    // VMs' QEMU opens them read-write under this domain.
    if let Some(dir) = &ctx.volume_dir {
        policy.read_write.push(dir.canonicalize().with_context(|| format!("volume directory {}", dir.display()))?);
    }
    match capvisor_confine::service::confine_self(&policy) {
        Ok(status) => tracing::info!("confined: landlock {status}"),
        Err(e) if ctx.confinement.landlock => {
            anyhow::bail!("cannot confine the worker: {e} (the manifest's [confinement] required names landlock)")
        }
        Err(e) => tracing::warn!("NOT confined by Landlock ([confinement] required allows it): {e}"),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    capvisor_rpc::init_logging("worker");
    let args = Args::parse();
    let msg = capvisor_rpc::spawn::read_config(args.config_fd)?;
    let ctx = SessionContext::read_from(msg.get_root()?)?;
    confine(&ctx)?;
    conn::run_local(async move {
        // SAFETY: the broker handed us these descriptors at these numbers.
        let broker = unsafe { conn::stream_from_fd(args.rpc_fd)? };
        // SAFETY: as above.
        let attach = unsafe { FdChannel::from_raw(args.attach_fd)? };
        capvisor_worker::serve::run(broker, attach, ctx).await
    })
}
