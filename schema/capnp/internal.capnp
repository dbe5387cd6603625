@0xcf319c5efef75e3c;
# Interfaces between capvisor's own processes. Never reachable by clients.

using Common = import "common.capnp";
using Cv = import "capvisor.capnp";

interface Broker {
  # The broker's face to the gateway (over the gateway<->broker socketpair).
  # Login calls carry what the gateway saw of the peer.
  loginLocal @0 (uid :UInt32, pid :UInt32) -> (result :Cv.LoginResult);
  loginPassword @1 (user :Text, password :Text, peer :Text) -> (result :Cv.LoginResult);
  resume @2 (token :Text, peer :Text) -> (result :Cv.LoginResult);
}

struct AuditEvent {
  action @0 :Text;     # e.g. "vm.create", "capset.get"
  cap @1 :Text;        # cap name or interface
  method @2 :Text;
  outcome @3 :Text;    # "ok" or an ErrorCode name
  detail @4 :Text;     # never a secret
}

interface SessionHost {
  # The broker's face to one worker: what that session may ask of the broker.
  logout @0 () -> ();
  audit @1 (event :AuditEvent) -> ();
  # Null unless the session's bundle holds "accounts".
  accounts @2 () -> (accounts :Cv.Accounts);
}

interface Worker {
  # A worker's bootstrap cap toward the broker (the broker offers its
  # SessionHost as its own bootstrap on the same connection).
  session @0 () -> (session :Cv.Session);
  # Revokes the session: caps fail with staleSession, VMs stop, the
  # worker exits once its clients are gone.
  revoke @1 (reason :Text) -> ();
}

enum MachineState {
  starting @0;
  running @1;
  paused @2;
  stopped @3;
  crashed @4;
}

struct BootTimes {
  # Boot milestones measured inside the vmm (engine kvm), microseconds since
  # the vmm process started; 0 = not reached or not measured (engine qemu).
  vmBuiltUs @0 :UInt64;      # guest memory, devices, tables, vCPUs ready
  firstRunUs @1 :UInt64;     # first KVM_RUN: the first guest instruction
  firstExitUs @2 :UInt64;    # first exit back to the vmm
  firstSerialUs @3 :UInt64;  # first byte on the serial console (kernel entry)
  initReadyUs @4 :UInt64;    # guest-init's marker on the boot-timer port 0x440
}

struct MachineStatus {
  state @0 :MachineState;
  detail @1 :Text;        # why it stopped or crashed
  pid @2 :UInt32;         # of the engine process (qemu, or the vmm itself for kvm) or 0
  engine @3 :Text;        # "qemu" or "kvm"
  boot @4 :BootTimes;
}

interface Machine {
  # Served by a vmm process (one per VM). The VM boots when the vmm starts;
  # the agent channel is a socket the worker handed the vmm at spawn.
  status @0 () -> (status :MachineStatus);
  # Graceful (ACPI power button / guest shutdown) for up to `graceMs`, then forced.
  stop @1 (graceMs :UInt32) -> (status :MachineStatus);
  pause @2 () -> (result :Common.UnitResult);
  resume @3 () -> (result :Common.UnitResult);
  # The last `maxBytes` of the guest console (serial) log.
  consoleTail @4 (maxBytes :UInt32) -> (text :Text);
  # Resolves when the machine leaves starting/running/paused.
  waitExit @5 () -> (status :MachineStatus);
}
