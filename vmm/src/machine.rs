//! The `Machine` capability (schema `internal.capnp`) the vmm serves to
//! its worker, over whichever [`Engine`] runs the VM
//! ([`crate::engine::start`]): each method is one engine call, its
//! status written as `MachineStatus`. Domain errors (`notRunning`,
//! `unavailable`) travel as `[capvisor:<code>]` exceptions
//! ([`capvisor_rpc::CvError`]).
//!
//! Everything runs on the vmm's single-threaded `LocalSet`.

use crate::engine::Engine;
use capnp::capability::Rc as CapRc;
use capvisor_schema::internal_capnp::machine;
use std::rc::Rc;
use std::time::Duration;

/// The `Machine` server over an [`Engine`].
pub struct MachineServer {
    vm: Rc<dyn Engine>,
}

impl MachineServer {
    /// Serves `vm`.
    pub fn new(vm: Rc<dyn Engine>) -> Self {
        Self { vm }
    }

    /// `vm` as a `Machine` client.
    pub fn client(vm: Rc<dyn Engine>) -> machine::Client {
        capnp_rpc::new_client(Self::new(vm))
    }
}

impl machine::Server for MachineServer {
    async fn status(
        self: CapRc<Self>,
        _: machine::StatusParams,
        mut results: machine::StatusResults,
    ) -> capnp::Result<()> {
        self.vm.status().write(results.get().init_status());
        Ok(())
    }

    async fn stop(
        self: CapRc<Self>,
        params: machine::StopParams,
        mut results: machine::StopResults,
    ) -> capnp::Result<()> {
        let grace = Duration::from_millis(params.get()?.get_grace_ms() as u64);
        let st = self.vm.stop(grace).await;
        st.write(results.get().init_status());
        Ok(())
    }

    async fn pause(self: CapRc<Self>, _: machine::PauseParams, _: machine::PauseResults) -> capnp::Result<()> {
        Ok(self.vm.pause().await?)
    }

    async fn resume(self: CapRc<Self>, _: machine::ResumeParams, _: machine::ResumeResults) -> capnp::Result<()> {
        Ok(self.vm.resume().await?)
    }

    async fn console_tail(
        self: CapRc<Self>,
        params: machine::ConsoleTailParams,
        mut results: machine::ConsoleTailResults,
    ) -> capnp::Result<()> {
        let max = params.get()?.get_max_bytes();
        let bytes = self.vm.console_tail(max);
        results.get().set_bytes(&bytes);
        Ok(())
    }

    async fn wait_exit(
        self: CapRc<Self>,
        _: machine::WaitExitParams,
        mut results: machine::WaitExitResults,
    ) -> capnp::Result<()> {
        let st = self.vm.wait_exit().await;
        st.write(results.get().init_status());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Failed;
    use capvisor_rpc::CvError;
    use capvisor_schema::capvisor_capnp::{Engine as EngineKind, VmState};
    use capvisor_schema::common_capnp::ErrorCode;

    #[test]
    fn serves_a_failed_vm_as_crashed() {
        capvisor_rpc::conn::run_local(async {
            let m = MachineServer::client(Rc::new(Failed::new("kernel /nope: No such file".into())));
            let r = m.status_request().send().promise.await.unwrap();
            let s = r.get().unwrap().get_status().unwrap();
            assert_eq!(s.get_state().unwrap(), VmState::Crashed);
            assert_eq!(s.get_engine().unwrap(), EngineKind::Qemu);
            assert_eq!(s.get_detail().unwrap().to_str().unwrap(), "kernel /nope: No such file");
            assert_eq!(s.get_boot().unwrap().get_first_run_us(), 0);

            let r = m.wait_exit_request().send().promise.await.unwrap();
            assert_eq!(r.get().unwrap().get_status().unwrap().get_state().unwrap(), VmState::Crashed);
            let mut q = m.stop_request();
            q.get().set_grace_ms(100);
            let r = q.send().promise.await.unwrap();
            assert_eq!(r.get().unwrap().get_status().unwrap().get_state().unwrap(), VmState::Crashed);

            let e = m.pause_request().send().promise.await.map(|_| ()).unwrap_err();
            assert_eq!(CvError::from_rpc(&e).map(|c| c.code), Some(ErrorCode::NotRunning), "{e}");
            let mut q = m.console_tail_request();
            q.get().set_max_bytes(100);
            let r = q.send().promise.await.unwrap();
            assert!(r.get().unwrap().get_bytes().unwrap().is_empty());
        });
    }
}
