@0xb169b907ac3b8a78;
# The guest protocol: guest-init (PID 1) serves Guest as its bootstrap
# capability on the agent channel (virtio-serial port "capvisor.agent").
# Errors follow the rule in common.capnp.

using Common = import "common.capnp";

struct GuestInfo {
  kernelRelease @0 :Text;   # uname -r
  uptimeMs @1 :UInt64;      # guest CLOCK_BOOTTIME when asked
  initReadyMs @2 :UInt64;   # guest CLOCK_BOOTTIME when guest-init started serving
}

interface Guest {
  hello @0 () -> (info :GuestInfo);
  exec @1 (spec :Common.ExecSpec, stdout :Common.ByteSink, stderr :Common.ByteSink)
      -> (process :Common.Process);
  files @2 () -> (files :Common.Files);
  # Syncs file systems and powers off (or reboots) the guest. May return
  # before the guest is gone, or the connection may end first.
  shutdown @3 (reboot :Bool) -> ();
  ping @4 () -> ();
}
