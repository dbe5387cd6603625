@0xcf319c5efef75e3c;
# Interfaces and messages between capvisor's own processes. Never reachable
# by clients. Errors follow the rule in common.capnp. The spawn-time
# configurations (BrokerConfig, SessionContext, VmConfig) are single
# messages a parent writes into a memfd that the child inherits at the
# descriptor named by its `--config-fd` flag (capvisor_rpc::spawn); children
# get no other configuration and an empty environment apart from PATH and
# CAPVISOR_LOG.

using Common = import "common.capnp";
using Cv = import "capvisor.capnp";

interface Broker {
  # The broker's face to the gateway (over the gateway<->broker socketpair).
  # The broker never takes a client's identity from the gateway's words:
  # before each call the gateway passes a duplicate of the client's
  # connected socket on its attach channel with the tag "login:<conn>"
  # (capvisor_rpc::fdpass), and names that `conn` here; the broker reads
  # the peer's uid, gid, pid and groups from that descriptor
  # (SO_PEERCRED, SO_PEERGROUPS) and closes its copy once the call is
  # decided. A `conn` the broker never received is denied.
  loginLocal @0 (conn :Text) -> (session :Cv.Session, info :Cv.LoginInfo);
  loginPassword @1 (user :Text, password :Text, conn :Text) -> (session :Cv.Session, info :Cv.LoginInfo);
  resume @2 (token :Text, conn :Text) -> (session :Cv.Session, info :Cv.LoginInfo);
  redeem @3 (token :Text, conn :Text) -> (session :Cv.Session, info :Cv.LoginInfo);
  # Cv.Gateway.redeem: a share token into a delegate session on the
  # grantor's worker (Worker.delegate).
}

struct AuditOutcome {
  union {
    ok @0 :Void;
    error @1 :Common.ErrorCode;
  }
}

struct AuditEvent {
  action @0 :Text;     # e.g. "vm.create", "capset.get"
  cap @1 :Text;        # cap name or interface
  method @2 :Text;
  outcome @3 :AuditOutcome;
  detail @4 :Text;     # never a secret
  vm @5 :Text;         # the VM the event concerns (its name in the session), "" when none
  grants @6 :List(Cv.GrantRef);
  # The delegation chain the call came through, outermost grant first;
  # empty for the session's own calls. The record's principal is then
  # grant:<innermost id>.
}

enum RevokeReason {
  logout @0;      # the session's holder called Session.logout
  expired @1;     # the session outlived its TTL
  shutdown @2;    # capvisor is stopping
  brokerGone @3;  # the worker lost its broker
  revoked @4;     # the broker revoked it (e.g. an operator action)
}

interface SessionHost {
  # The broker's face to one worker: what that session may ask of the broker.
  logout @0 () -> ();
  audit @1 (event :AuditEvent) -> ();
  accounts @2 () -> (accounts :Cv.Accounts);
  # Fails with notFound unless the session's bundle holds "accounts".
  reserveVm @3 (memoryMib :UInt32) -> (hold :VmHold);
  # Reserves room for one running VM of `memoryMib` against the budgets
  # that span sessions: the principal's and the host's (manifest [vms] and
  # [bundles.B]). Holding the returned cap keeps the room; dropping it (or
  # the worker's end) gives it back. Fails with quota when a budget would
  # be exceeded.
  createVolume @4 (name :Text, sizeMib :UInt64) -> (info :Cv.VolumeInfo);
  # The principal's volumes (Cv.Volumes semantics; the broker keeps them
  # and checks the bundle's [bundles.B] max_volumes and
  # max_volume_total_mib). notFound unless the bundle holds "volumes".
  listVolumes @5 () -> (volumes :List(Cv.VolumeInfo));
  removeVolume @6 (name :Text) -> ();
  attachVolume @7 (name :Text, readOnly :Bool, vm :Text) -> (path :Text, hold :VmHold);
  # Leases volume `name` for VM `vm` of this session: `path` is its file
  # (inside SessionContext.volumeDir). Read-write leases are exclusive,
  # read-only ones shared; a conflict is inUse. Dropping `hold` (or the
  # worker's end) ends the lease.
  putSecret @8 (name :Text, value :Data, hosts :List(Text)) -> ();
  # The principal's secrets (Cv.Secrets semantics; the broker keeps them
  # encrypted at rest). notFound unless the bundle holds "secrets".
  listSecrets @9 () -> (secrets :List(Cv.SecretInfo));
  removeSecret @10 (name :Text) -> ();
  revealSecret @11 (name :Text, host :Text) -> (found :Bool, matched :Bool, value :Data);
  # The value of secret `name` if `host` matches one of its host globs
  # (`matched`), else no value; `found` false when there is no such secret.
  # Needs no "secrets" in the bundle: the session's proxy asks through the
  # worker's SecretSource for the placeholders its guests send.
  queryAudit @12 (sinceMs :Int64, untilMs :Int64, vm :Text, grant :Text, principal :Text,
                  action :Text, limit :UInt32) -> (entries :List(Cv.AuditEntry));
  # Cv.Audit.query for this session (same parameters and answer). notFound
  # unless the bundle holds "audit"; the query itself is audited
  # ("audit.query").
  addGrant @13 (grantId :Text, label :Text, expiresAtMs :Int64, to :Text,
                chain :List(Cv.GrantRef), what :Text) -> (token :Text);
  # Registers a grant the worker made (Cv.Shares.share): the broker mints
  # its token (returned once; "" for `to` a principal) and keeps only its
  # hash, until expiry, `endGrants` or the session's end. `chain` is the
  # grant's own chain (outermost first, ending in it). Audited
  # ("grant.create"). quota: too many live grants for this session.
  endGrants @14 (grantIds :List(Text), reason :Text) -> ();
  # The worker revoked or expired these grants: their tokens and every
  # delegate session redeemed from them stop attaching. Audited
  # ("grant.revoke" / "grant.expire").
  receivedGrants @15 () -> (grants :List(ReceivedGrant));
  # The live grants made to this session's principal (Cv.ShareSpec.to),
  # each with its delegate session on the grantor's worker
  # (Worker.delegate), oldest first. Each is audited like a redemption
  # ("grant.receive").
}

struct ReceivedGrant {
  # A grant made to a principal, as its sessions see it.
  grantId @0 :Text;
  label @1 :Text;
  from @2 :Text;            # the grantor principal, e.g. "local:root"
  session @3 :Cv.Session;   # the grant's delegate session
}

interface SecretSource {
  # The worker's face to its session's proxy for secrets: the proxy asks
  # only for names it found as placeholders in an intercepted request's
  # headers, with that request's host. Same answer as
  # SessionHost.revealSecret.
  reveal @0 (name :Text, host :Text) -> (found :Bool, matched :Bool, value :Data);
}

interface VmHold {
  # A reservation made by SessionHost.reserveVm; it has no methods: it is
  # released when the last reference to it is dropped.
}

interface Worker {
  # A worker's bootstrap cap toward the broker (the broker offers its
  # SessionHost as its own bootstrap on the same connection).
  session @0 () -> (session :Cv.Session);
  revoke @1 (reason :RevokeReason) -> ();
  # Revokes the session: caps fail with staleSession, VMs stop, the
  # worker exits once its clients are gone.
  delegate @2 (grantId :Text) -> (session :Cv.Session);
  # The delegate Session of grant `grantId` (Cv.Gateway.redeem): its
  # CapSet holds the grant's caps. staleSession when the grant is revoked,
  # expired or unknown. A client attaching for it comes on the attach
  # channel tagged "grant:<grantId>".
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
  state @0 :Cv.VmState;
  detail @1 :Text;        # why it stopped or crashed
  pid @2 :UInt32;         # of the engine process (qemu, or the vmm itself for kvm) or 0
  engine @3 :Cv.Engine;   # the engine that runs it (qemu or kvm, never auto)
  boot @4 :BootTimes;
}

interface Machine {
  # Served by a vmm process (one per VM). The VM boots when the vmm starts;
  # the agent channel is a socket the worker handed the vmm at spawn.
  status @0 () -> (status :MachineStatus);
  stop @1 (graceMs :UInt32) -> (status :MachineStatus);
  # Graceful (ACPI power button / guest shutdown) for up to `graceMs`, then forced.
  pause @2 ();
  resume @3 ();
  consoleTail @4 (maxBytes :UInt32) -> (bytes :Data);
  # The last `maxBytes` bytes of the guest console (serial) log, as written
  # by the guest (not necessarily UTF-8).
  waitExit @5 () -> (status :MachineStatus);
  # Resolves when the machine leaves starting/running/paused.
}

struct Disk {
  # A raw disk image attached as virtio-blk (VIRTIO 1.2 section 5.2).
  path @0 :Text;       # absolute host path
  readOnly @1 :Bool;   # the device offers VIRTIO_BLK_F_RO
}

struct VmConfig {
  # What a worker asks its vmm to run (capvisor_rpc::vmconfig::VmConfig).
  name @0 :Text;           # for logs and the guest; never a path component the vmm trusts
  runDir @1 :Text;         # the VM's private directory: console.log lives there
  kernel @2 :Text;         # uncompressed ELF vmlinux
  initramfs @3 :Text;      # uncompressed newc cpio
  memoryMib @4 :UInt32;    # at least 64
  vcpus @5 :UInt32;        # at least 1
  engine @6 :Cv.Engine;
  extraCmdline @7 :Text;   # appended to the kernel command line
  disks @8 :List(Disk);    # /dev/vda, /dev/vdb, ... in order; at most 8
  skipNetns @9 :Bool;       # QEMU runs in the host's network namespace
  # How the vmm confines the QEMU it starts (docs/vmm-confinement.md). The
  # worker decided from the manifest's [confinement] and what the host
  # offers; the defaults (false) mean "apply", so a message without them
  # fails closed. A layer to apply that cannot be applied stops the VM.
  skipLandlock @10 :Bool;   # QEMU runs without the Landlock ruleset
  cgroup @11 :List(Text);   # the VM's cgroup directories (the vmm is in them; QEMU inherits); empty: none
  egress @12 :Bool;
  # The guest's egress channel: a second virtio-serial port "capvisor.egress"
  # on the socket the vmm inherited as --egress-fd (the session's proxy
  # holds the other end). false: no such port; the guest has no network.
}

struct Confinement {
  # Manifest [confinement]: which layers a VM must get (docs/vmm-confinement.md).
  # The defaults (false) mean "required", so a message without them fails closed.
  cgroupOptional @0 :Bool;
  netnsOptional @1 :Bool;
  landlockOptional @2 :Bool;
  cgroupRoot @3 :Text;      # where cgroup file systems are mounted; "" = /sys/fs/cgroup
}

struct BuiltImage {
  # A guest image built by the supervisor: files on the host.
  name @0 :Text;           # manifest image name
  kernel @1 :Text;         # uncompressed ELF vmlinux
  initramfs @2 :Text;      # uncompressed newc cpio
  kernelRelease @3 :Text;  # the guest's uname -r
  rootfs @4 :Text;         # read-only root file system image (ext4) on virtio-blk; "" = none (the initramfs is the root)
  writableMib @5 :UInt64;  # size of each VM's writable layer over rootfs, MiB (0 with no rootfs)
}

struct Bundle {
  # What a session may hold and do (manifest [bundles.NAME]).
  caps @0 :List(Text);          # capability names in the CapSet
  maxVms @1 :UInt32;
  maxMemoryMib @2 :UInt32;      # per VM
  defaultMemoryMib @3 :UInt32;
  maxVcpus @4 :UInt32;          # per VM
  images @5 :List(Text);        # image names the session may boot
  maxSessions @6 :UInt32;       # live sessions one principal may hold
  maxVolumes @7 :UInt32;        # volumes one principal may keep ("volumes" cap)
  maxVolumeTotalMib @8 :UInt64; # their total size, MiB
}

struct SessionContext {
  # The immutable context of one session, from the broker to its worker.
  # Holds no secret but the egress CA key in `net` (for the proxy).
  sessionId @0 :Text;           # random hex; not a credential
  principal @1 :Cv.Principal;
  profile @2 :Text;
  bundle @3 :Bundle;
  expiresAtMs @4 :Int64;        # Unix epoch milliseconds
  images @5 :List(BuiltImage);  # the images the bundle allows
  runDir @6 :Text;              # directory for this session's VM run dirs
  autoEngine @7 :Cv.Engine;     # what engine `auto` means: auto = detect (manifest [vms] auto_engine)
  confinement @8 :Confinement;  # manifest [confinement]
  volumeDir @9 :Text;           # this principal's volume files (empty: the bundle has no volumes)
  egress @10 :Bool;             # manifest [net] egress: VMs get the capvisor.egress port and a proxy
  net @11 :ProxyConfig;         # the session proxy's configuration (manifest [net])
}

struct BrokerConfig {
  # Everything the broker needs, resolved by the supervisor. Holds no secret.
  manifestToml @0 :Text;        # the validated manifest, in its own (TOML) format
  images @1 :List(BuiltImage);  # every built image
  stateDir @2 :Text;            # accounts, audit log, session run dirs (exists, 0700)
  ownerUids @3 :List(UInt32);   # uids that get the owner profile by loginLocal
  workerBin @4 :Text;           # the capvisor-worker binary
}

interface Proxy {
  # A session's egress proxy process (capvisor-proxy), bootstrap on its RPC
  # socket toward the worker that spawned it. The worker passes each VM's
  # host end of its "capvisor.egress" port on the proxy's fd channel
  # (capvisor_rpc::fdpass) tagged "vm:<name>"; the proxy serves Egress on it
  # bound to that VM, until it closes.
  policy @0 () -> (policy :Cv.NetPolicy);
  log @1 () -> (log :Cv.NetLog);
  approvals @2 () -> (approvals :Cv.Approvals);
  setSecretSource @3 (source :SecretSource) -> ();
  # Gives the proxy the session's SecretSource (the worker calls it once,
  # right after spawn). Until then placeholders go out unreplaced.
}

struct ProxyConfig {
  # The proxy's spawn configuration (config memfd).
  sessionId @0 :Text;
  rules @1 :List(Cv.NetRule);          # initial rules (manifest [net] rules)
  resolve @2 :List(ResolveOverride);   # names answered without DNS (tests, local services)
  logCapacity @3 :UInt32;              # NetLog entries kept
  askTimeoutSecs @4 :UInt32;           # how long an `ask` waits for a decision (0: the default, 60 s)
  caCertPem @5 :Text;
  # TLS interception (issue 9): the install's egress CA (broker
  # state/egress-ca), PEM. Empty: TLS is relayed, never intercepted. The
  # key is the one secret this message holds: the memfd is the proxy's.
  caKeyPem @6 :Text;
  extraRootsPem @7 :Text;
  # Extra roots upstream TLS is verified against besides the system's
  # (manifest [net] ca_certs), PEM, concatenated.
}

struct ResolveOverride {
  name @0 :Text;               # exact DNS name, lower case
  addresses @1 :List(Text);    # IPv4 / IPv6 literals
}
