@0xe138ffd2084cb044;
# The client-facing capabilities: what a logged-in principal holds.

using Common = import "common.capnp";

struct LoginOk {
  session @0 :Session;
  resumeToken @1 :Text;    # sturdy ref: keep secret; `Gateway.resume` and attach take it
  principal @2 :Text;      # e.g. "local:alice" or "password:bob"
  profile @3 :Text;
  expiresAtMs @4 :Int64;   # Unix epoch milliseconds
}

struct LoginResult {
  union {
    ok @0 :LoginOk;
    err @1 :Common.Error;
  }
}

interface Gateway {
  # Bootstrap capability of the gateway socket.
  authMethods @0 () -> (methods :List(Text));
  # Authenticates by the connecting process's Unix credentials (SO_PEERCRED).
  loginLocal @1 () -> (result :LoginResult);
  loginPassword @2 (user :Text, password :Text) -> (result :LoginResult);
  resume @3 (token :Text) -> (result :LoginResult);
}

struct SessionInfo {
  sessionId @0 :Text;
  principal @1 :Text;
  profile @2 :Text;
  expiresAtMs @3 :Int64;
}

struct SessionInfoResult {
  union {
    info @0 :SessionInfo;
    err @1 :Common.Error;
  }
}

struct CapSetResult {
  union {
    capSet @0 :CapSet;
    err @1 :Common.Error;
  }
}

interface Session {
  info @0 () -> (result :SessionInfoResult);
  capSet @1 () -> (result :CapSetResult);
  # Ends the session: every cap of it fails with staleSession, its resume
  # token stops working, its VMs are stopped.
  logout @2 () -> (result :Common.UnitResult);
}

struct CapEntry {
  name @0 :Text;
  interfaceId @1 :UInt64;
  interfaceName @2 :Text;
  description @3 :Text;
}

struct CapListResult {
  union {
    entries @0 :List(CapEntry);
    err @1 :Common.Error;
  }
}

struct GetResult {
  union {
    cap @0 :AnyPointer;     # a capability of the requested interface
    err @1 :Common.Error;
  }
}

interface CapSet {
  list @0 () -> (result :CapListResult);
  # Returns the cap named `name` only if its interface id is `interfaceId`;
  # otherwise notFound or wrongInterface.
  get @1 (name :Text, interfaceId :UInt64) -> (result :GetResult);
}

struct VmSpec {
  name @0 :Text;          # empty: generated; [a-z0-9][a-z0-9-]{0,31}
  image @1 :Text;         # empty: "base"
  memoryMib @2 :UInt32;   # 0: the bundle's default
  vcpus @3 :UInt32;       # 0: 1
  engine @4 :Text;        # "", "auto", "qemu" or "kvm"
}

enum VmState {
  starting @0;
  running @1;
  stopped @2;
  crashed @3;
}

struct VmInfo {
  name @0 :Text;
  image @1 :Text;
  memoryMib @2 :UInt32;
  vcpus @3 :UInt32;
  state @4 :VmState;
  engine @5 :Text;
  kernelRelease @6 :Text;
  bootMs @7 :UInt64;      # create call to guest-init answering, milliseconds
}

struct VmResult {
  union {
    vm @0 :Vm;
    err @1 :Common.Error;
  }
}

struct VmListResult {
  union {
    vms @0 :List(VmInfo);
    err @1 :Common.Error;
  }
}

struct VmInfoResult {
  union {
    info @0 :VmInfo;
    err @1 :Common.Error;
  }
}

struct FilesResult {
  union {
    files @0 :Common.Files;
    err @1 :Common.Error;
  }
}

interface VmFactory {
  # Boots a VM and returns once guest-init answers.
  create @0 (spec :VmSpec) -> (result :VmResult);
  list @1 () -> (result :VmListResult);
  get @2 (name :Text) -> (result :VmResult);
  # Stops the VM if running and forgets it.
  remove @3 (name :Text) -> (result :Common.UnitResult);
}

interface Vm {
  info @0 () -> (result :VmInfoResult);
  exec @1 (spec :Common.ExecSpec, stdout :Common.ByteSink, stderr :Common.ByteSink)
      -> (result :Common.ExecResult);
  files @2 () -> (result :FilesResult);
  stop @3 () -> (result :Common.UnitResult);
  # A no-op round trip to guest-init (measures the data path).
  ping @4 () -> (result :Common.UnitResult);
}

struct AccountInfo {
  name @0 :Text;
  profile @1 :Text;
}

struct AccountListResult {
  union {
    accounts @0 :List(AccountInfo);
    err @1 :Common.Error;
  }
}

interface Accounts {
  # Password accounts in the broker's credential store (owner profile only).
  add @0 (name :Text, profile :Text, password :Text) -> (result :Common.UnitResult);
  list @1 () -> (result :AccountListResult);
  remove @2 (name :Text) -> (result :Common.UnitResult);
}
