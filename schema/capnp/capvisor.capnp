@0xe138ffd2084cb044;
# The client-facing capabilities: what a logged-in principal holds.
# Errors follow the rule in common.capnp: values are returned directly and
# domain outcomes are exceptions carrying "[capvisor:<ErrorCode>]".

using Common = import "common.capnp";

enum AuthMethod {
  # How a principal proved who it is. Only append.
  local @0;      # Unix peer credentials on the gateway socket (SO_PEERCRED)
  password @1;   # a password account in the broker's credential store
  grant @2;      # a share token redeemed with Gateway.redeem; the name is the grant id
}

struct Principal {
  # Who a session belongs to. Shown to people as "<method>:<name>"
  # (e.g. "local:alice", "password:bob").
  method @0 :AuthMethod;
  name @1 :Text;     # local: the Unix user name (or "uid<N>"); password: the account name
}

struct LoginInfo {
  resumeToken @0 :Text;    # sturdy ref: keep secret; `Gateway.resume` and attach take it
  principal @1 :Principal;
  profile @2 :Text;
  expiresAtMs @3 :Int64;   # Unix epoch milliseconds
}

interface Gateway {
  # Bootstrap capability of the gateway socket. Every login returns the
  # session (pipelinable) and the facts of the login.
  authMethods @0 () -> (methods :List(AuthMethod));
  loginLocal @1 () -> (session :Session, info :LoginInfo);
  # Authenticates by the connecting process's Unix credentials (SO_PEERCRED).
  loginPassword @2 (user :Text, password :Text) -> (session :Session, info :LoginInfo);
  resume @3 (token :Text) -> (session :Session, info :LoginInfo);
  redeem @4 (token :Text) -> (session :Session, info :LoginInfo);
  # Redeems a share token (a sturdy ref `Shares.share` printed once) into a
  # delegate session on the grantor's worker: principal grant:<id>, profile
  # "delegate", a CapSet holding exactly the shared caps under their names.
  # The LoginInfo's resumeToken attaches to it like any session's. A token
  # that is unknown, expired, revoked, or whose grantor session ended gets
  # staleSession (the same answer in every case).
}

struct SessionInfo {
  sessionId @0 :Text;      # not a credential
  principal @1 :Principal;
  profile @2 :Text;
  expiresAtMs @3 :Int64;   # Unix epoch milliseconds
}

interface Session {
  info @0 () -> (info :SessionInfo);
  capSet @1 () -> (capSet :CapSet);
  logout @2 ();
  # Ends the session: every cap of it fails with staleSession, its resume
  # token stops working, its VMs are stopped.
}

struct CapEntry {
  name @0 :Text;
  interfaceId @1 :UInt64;
  interfaceName @2 :Text;
  description @3 :Text;
  kept @4 :Bool;     # kept by CapSet.keep (not from the bundle or a grant)
}

interface CapSet {
  list @0 () -> (entries :List(CapEntry));
  get @1 (capName :Text, interfaceId :UInt64) -> (cap :Capability);
  # Returns the cap named `capName` only if its interface id is
  # `interfaceId`; otherwise a cap whose every call fails with notFound or
  # wrongInterface (so a pipelined call carries the code). (Parameters are
  # never called plain `name`: pycapnp reserves that keyword.)
  keep @2 (capName :Text, interfaceId :UInt64, cap :Capability);
  # Keeps `cap` in this session under `capName` (session-local names:
  # `capvisor call ... --as NAME`), so a later connection of the same
  # session reaches it with `get` (typed as `interfaceId`, as the keeper
  # said). Replaces a kept cap of that name. invalidArgument: a name not
  # [a-z][a-z0-9_-]{0,31}; alreadyExists: the name of a bundle or grant
  # cap; quota: more than 256 kept caps. Kept caps die with the session
  # (for a delegate session, with its grant).
  drop @3 (capName :Text);
  # Forgets a kept cap. notFound when none is kept under that name.
}

enum Engine {
  auto @0;   # kvm where /dev/kvm is hardware-backed (falls back to qemu), else qemu
  qemu @1;   # qemu-system-x86_64 -M microvm (KVM acceleration when usable, else TCG)
  kvm @2;    # capvisor's own VMM inside the confined vmm process
}

enum VmState {
  starting @0;
  running @1;
  paused @2;
  stopped @3;
  crashed @4;
}

struct VmSpec {
  name @0 :Text;          # empty: generated; [a-z0-9][a-z0-9-]{0,31}
  image @1 :Text;         # empty: "base"
  memoryMib @2 :UInt32;   # 0: the bundle's default
  vcpus @3 :UInt32;       # 0: 1
  engine @4 :Engine;
  volumes @5 :List(VolumeMount);
  # Volumes of this principal to attach, each as one more virtio-blk disk
  # that guest-init mounts at `guestPath` before the VM answers (at most 4).
}

struct VolumeMount {
  volume @0 :Text;      # a volume name, as Volumes.create made it
  guestPath @1 :Text;   # absolute, [A-Za-z0-9._/-], no "..", at most 128 bytes, not "/"
  readOnly @2 :Bool;    # false: exclusive (inUse while another running VM holds it)
}

struct VmInfo {
  name @0 :Text;
  image @1 :Text;
  memoryMib @2 :UInt32;
  vcpus @3 :UInt32;
  state @4 :VmState;
  engine @5 :Engine;      # as requested until booted, then the one that runs it
  kernelRelease @6 :Text;
  bootMs @7 :UInt64;      # create call to guest-init answering, milliseconds
  detail @8 :Text;        # why it stopped or crashed (empty while it runs)
  volumes @9 :List(VolumeMount);  # as attached at create
}

interface VmFactory {
  # Creates, lists, reaches and removes this session's VMs (CapSet entry "vms").
  create @0 (spec :VmSpec) -> (vm :Vm);
  # Boots a VM and returns once guest-init answers.
  list @1 () -> (vms :List(VmInfo));
  get @2 (vmName :Text) -> (vm :Vm);
  remove @3 (vmName :Text);
  # Stops the VM if running and forgets it. Every `Vm` (and `Process`,
  # `Files`) reached for it answers notFound from then on, also if a new VM
  # later takes the same name.
  images @4 () -> (images :List(ImageInfo));
  # The images this session may boot (its bundle's list, as built).
  narrow @5 (narrowing :VmFactoryNarrowing) -> (vms :VmFactory);
  # A new VmFactory that allows only what `narrowing` allows (attenuation,
  # like Vm.narrow): it sees, reaches and removes only the VMs created
  # through it, every Vm it hands out is narrowed by
  # `narrowing.vmNarrowing`, and its VMs belong to this session (they count
  # against its quota and die with it). Narrowing it again intersects.
  netLog @6 () -> (log :NetLog);
  # The flows of the VMs this factory sees: all of the session's, or for a
  # narrowed factory only the ones made through it (also later ones).
  # Needs the session's "netlog" cap for the session's own factory.
}

struct VmFactoryNarrowing {
  # What a narrowed VmFactory (VmFactory.narrow) still allows.
  maxVms @0 :UInt32;
  # VMs it may hold at once (created through it and not removed); 0: it
  # creates none.
  images @1 :List(Text);     # images it may boot (empty: none)
  maxMemoryMib @2 :UInt32;   # per VM (0: the session's bound)
  maxVcpus @3 :UInt32;       # per VM (0: the session's bound)
  vmNarrowing @4 :VmNarrowing;
  # Every Vm it creates or gets is narrowed by this (its expiry and call
  # budget fields are ignored here: the factory's own bound them).
  expiresAtMs @5 :Int64;     # Unix epoch ms; 0: no expiry of its own
  callBudget @6 :UInt64;     # calls through it and its VMs in all; 0: no budget of its own
  volumes @7 :List(Text);
  # The principal's volumes its VMs may attach (VmSpec.volumes); empty:
  # none.
  volumesReadOnly @8 :Bool;  # only read-only attachments of them
  engines @9 :List(Engine);
  # The engines its VMs may run on, qemu and/or kvm (empty: both; `auto`
  # is not one to list: invalidArgument). A create asking `auto` is
  # checked against what `auto` means on this host (Engine) and runs on
  # that engine only: it never falls back to one not listed. Narrowing
  # again intersects (it may leave none: then it boots nothing).
}

struct ImageInfo {
  name @0 :Text;
  kind @1 :Text;           # "base" (busybox in an initramfs) or "debian" (a read-only root image)
  kernelRelease @2 :Text;
  rootfsBytes @3 :UInt64;  # the root image's size on the host, bytes (0: none)
  writableMib @4 :UInt64;  # each VM's writable layer, MiB (0: none)
}

interface Vm {
  # One VM for the capability's whole life.
  info @0 () -> (info :VmInfo);
  exec @1 (spec :Common.ExecSpec, stdout :Common.ByteSink, stderr :Common.ByteSink)
      -> (process :Common.Process);
  files @2 () -> (files :Common.Files);
  stop @3 ();
  ping @4 ();
  # A no-op round trip to guest-init (measures the data path).
  connect @5 (port :UInt16, down :Common.ByteSink) -> (up :Common.ByteSink);
  # A byte stream to TCP port `port` on the guest's loopback (127.0.0.1),
  # e.g. a server the guest runs: bytes from the guest program go to `down`
  # (done = it closed its write side); write into `up` (done = half-close).
  # Fails with unavailable when nothing listens there.
  narrow @6 (narrowing :VmNarrowing) -> (vm :Vm);
  # A new Vm cap for the same VM that allows only what `narrowing` allows
  # (attenuation: a wrapper object, never a flag on this one). Narrowing a
  # narrowed cap intersects: the result never allows more than the cap it
  # came from. A call it does not allow fails with denied; past its expiry
  # or call budget every call fails with denied. It dies with the session.
}

enum FilesAccess {
  none @0;       # Vm.files is denied
  readOnly @1;   # read and list anywhere; write denied
  readWrite @2;  # read and list anywhere; write only under writePrefixes
}

struct VmNarrowing {
  # What a narrowed Vm (Vm.narrow) still allows; everything else is denied.
  execAllow @0 :List(Text);
  # Programs exec may run: argv[0] exactly as given (a name looked up in
  # the guest's PATH, or an absolute path). Empty: no exec.
  execUser @1 :Text;
  # "": as the caller's spec says; else every exec runs as this user and a
  # spec naming another one is denied.
  execCwd @2 :Text;
  # "": as the caller's spec says; else every exec starts here and a spec
  # naming another directory is denied.
  allowPty @3 :Bool;
  # Whether exec may ask for a pseudo-terminal.
  files @4 :FilesAccess;
  writePrefixes @5 :List(Text);
  # With files = readWrite: absolute paths under which write is allowed
  # (component-wise, after removing "." and refusing ".."); empty: anywhere.
  allowStop @6 :Bool;
  ports @7 :List(UInt16);
  # Guest ports connect may reach; empty: none.
  expiresAtMs @8 :Int64;
  # Unix epoch ms after which every call is denied; 0: no expiry of its own.
  callBudget @9 :UInt64;
  # Calls this cap (and the caps narrowed from it) may make in all; 0: no
  # budget of its own.
  execAny @10 :Bool;
  # Any program may run (execAllow is then not consulted); narrowing again
  # keeps it only if the new narrowing asks for it too, else the new list
  # applies.
  askExec @11 :Bool;
  # Every exec it allows first waits for the session's decision through
  # its Approvals (kind "exec"): allowOnce, allowAlways (this program
  # through this cap from then on) or deny; no decision within the ask
  # timeout (manifest [net] ask_timeout_secs, default 60 s) denies.
  # Narrowing again can add asking, never remove it.
}

struct AccountInfo {
  name @0 :Text;
  profile @1 :Text;
}

interface Accounts {
  # Password accounts in the broker's credential store (owner profile only).
  add @0 (account :Text, profile :Text, password :Text);
  list @1 () -> (accounts :List(AccountInfo));
  remove @2 (account :Text);
}

struct VolumeAttachment {
  vm @0 :Text;          # the VM's name (in the session that attached it)
  thisSession @1 :Bool; # whether that VM belongs to the asking session
  readOnly @2 :Bool;
}

struct VolumeInfo {
  name @0 :Text;
  sizeMib @1 :UInt64;      # the file system's size: writes past it fail with ENOSPC
  usedBytes @2 :UInt64;    # host disk the volume's file occupies (allocated blocks), bytes
  createdAtMs @3 :Int64;   # Unix epoch milliseconds
  attachedTo @4 :List(VolumeAttachment);  # running VMs holding it
}

interface Volumes {
  # This principal's persistent volumes: ext4 file systems in files under
  # the broker's state directory, one per volume, kept across VM removal,
  # logout and restarts, never visible to another principal. The bundle
  # bounds their count and total size (quota).
  create @0 (name :Text, sizeMib :UInt64) -> (volume :Volume);
  list @1 () -> (volumes :List(VolumeInfo));
  get @2 (volumeName :Text) -> (volume :Volume);
  remove @3 (volumeName :Text);
  # Deletes the volume and its data. inUse while a running VM holds it.
  narrow @4 (volumeNames :List(Text), expiresAtMs :Int64, callBudget :UInt64) -> (volumes :Volumes);
  # A view of only these volumes (attenuation): `list` and `get` see only
  # them, `create` and `remove` are denied; narrowing a view again keeps
  # only names both list. Past `expiresAtMs` (Unix epoch ms; 0: none) or
  # `callBudget` calls (0: none; chained with the budgets it was narrowed
  # from) every call is denied. Shareable with Shares.share.
}

interface Volume {
  # One volume of the principal, by name. Attach it with VmSpec.volumes.
  info @0 () -> (info :VolumeInfo);
}

struct SecretInfo {
  # What Secrets.list shows of one secret: never its value.
  name @0 :Text;             # [A-Za-z0-9_-]{1,64}
  hosts @1 :List(Text);      # host globs (NetRule.host syntax) the value may be sent to
  createdAtMs @2 :Int64;     # Unix epoch milliseconds
}

interface Secrets {
  # This principal's secrets for the egress proxy (issue 9): a value is
  # stored encrypted at rest by the broker and never enters a guest, a log,
  # an error, the NetLog or the audit log. A guest sees only the
  # placeholder "capvisor-secret:NAME" (ExecSpec.secretEnv puts it in an
  # environment variable); the proxy replaces it in the headers of an
  # intercepted HTTPS request whose host matches one of `hosts`, and
  # leaves it (and flags the flow in the NetLog) for any other host.
  put @0 (name :Text, value :Data, hosts :List(Text));
  # put: replaces a secret of the same name. invalidArgument: a bad name,
  # an empty value or one over 8 KiB, a bad host glob, no hosts. quota: 64
  # secrets per principal.
  list @1 () -> (secrets :List(SecretInfo));
  remove @2 (name :Text);
  # notFound when there is no such secret.
}

enum NetAction {
  allow @0;
  deny @1;
  ask @2;     # held until a decision through the session's Approvals (timeout: deny)
}

struct NetRule {
  # One egress rule. A request matches when every non-empty field does;
  # the first matching rule decides, no match is deny.
  host @0 :Text;        # glob over the DNS name or dotted IPv4: "*" any, "*.example.org" any subdomain, exact otherwise
  port @1 :UInt16;      # 0: any
  scheme @2 :Text;      # "": any; "tcp" (no TLS / HTTP seen), "https" (TLS, judged by SNI), "http"
  method @3 :Text;      # "": any (HTTP only)
  pathPrefix @4 :Text;  # "": any (HTTP only)
  action @5 :NetAction;
  noMitm @6 :Bool;      # TLS to this host is never intercepted (only SNI is seen)
}

interface NetPolicy {
  # The session's egress rules, shared by its VMs; a set applies to
  # connections opened from then on (no VM restart).
  get @0 () -> (rules :List(NetRule));
  set @1 (rules :List(NetRule));
  readOnly @2 (expiresAtMs :Int64, callBudget :UInt64) -> (policy :NetPolicy);
  # A view of the same rules whose `set` is denied (attenuation; shareable
  # with Shares.share). Expiry and call budget as for Volumes.narrow.
}

struct NetFlow {
  timeMs @0 :Int64;       # Unix epoch ms, when the connection was asked for
  vm @1 :Text;
  host @2 :Text;          # as the guest named it
  address @3 :Text;       # the upstream address the proxy used ("" if none)
  port @4 :UInt16;
  method @5 :Text;        # HTTP only
  path @6 :Text;          # HTTP only
  status @7 :UInt16;      # HTTP only (0: none)
  bytesUp @8 :UInt64;     # guest -> upstream
  bytesDown @9 :UInt64;   # upstream -> guest
  rule @10 :Int32;        # index of the deciding rule; -1: no rule matched (default deny)
  action @11 :NetAction;
  detail @12 :Text;       # why denied / failed, never a secret
}

interface NetLog {
  # Recent flows of this session's VMs, newest last, bounded in memory.
  # `vm` "" = all VMs; `sinceMs` 0 = all kept; `limit` 0 = all kept.
  recent @0 (vm :Text, sinceMs :Int64, limit :UInt32) -> (flows :List(NetFlow));
  narrow @1 (vms :List(Text), expiresAtMs :Int64, callBudget :UInt64) -> (log :NetLog);
  # A view of only these VMs' flows (attenuation; narrowing a view again
  # keeps only VMs both name; shareable with Shares.share). Expiry and call
  # budget as for Volumes.narrow.
}

struct Approval {
  # A connection held by an `ask` rule, waiting for a decision.
  id @0 :UInt64;          # unique for the proxy's life
  timeMs @1 :Int64;       # Unix epoch ms, when it was held
  vm @2 :Text;
  host @3 :Text;          # as the guest named it
  port @4 :UInt16;
  scheme @5 :Text;        # "" when not known
  method @6 :Text;
  path @7 :Text;
  rule @8 :Int32;         # the ask rule's index
  expiresAtMs @9 :Int64;  # denied if not decided by then
  kind @10 :Text;         # "net": a held connection (host..rule); "exec": a held exec (vm, argv, grants)
  argv @11 :List(Text);   # kind "exec": the program and its arguments
  grants @12 :Text;       # kind "exec": the grants it came through, e.g. "agent (g12ab...)"; "" for none
}

enum ApprovalDecision {
  allowOnce @0;     # this connection only
  allowAlways @1;   # this connection, and an allow rule for exactly this host and port put first
                    # (kind "exec": this exec, and this program through the same cap from then on)
  deny @2;
}

interface Approvals {
  # Connections this session's `ask` rules hold, oldest first. The guest's
  # connection waits (it is not failed) until a decision or the timeout.
  pending @0 () -> (approvals :List(Approval));
  decide @1 (id :UInt64, decision :ApprovalDecision);
  # notFound when `id` is not pending (already decided, or timed out).
}

struct ShareSpec {
  # What Shares.share hands out.
  caps @0 :List(SharedCap);
  # The caps the recipient's CapSet will hold, 1 to 16. Each must be a
  # narrowed cap this worker serves (a Vm from Vm.narrow, a VmFactory from
  # VmFactory.narrow, a NetLog view from NetLog.narrow or VmFactory.netLog,
  # a NetPolicy from NetPolicy.readOnly, a Volumes view from
  # Volumes.narrow), so a share never carries more than its narrowing
  # allows.
  label @1 :Text;       # shown in `shares` and the audit chain; at most 128 bytes
  ttlMs @2 :Int64;      # lifetime, milliseconds, 1 s to the grantor session's end
  to @3 :Text;
  # "": a token (printed once); else a principal ("local:alice" or
  # "password:bob") whose CapSet holds the caps from its next login on.
  reshare @4 :Bool;     # the recipient may share onward (narrower, shorter)
}

struct SharedCap {
  name @0 :Text;        # the entry name in the recipient's CapSet, [a-z][a-z0-9_-]{0,31}
  cap @1 :Capability;
}

struct GrantInfo {
  # One grant as `Shares.list` shows it (never its token).
  id @0 :Text;             # "g" + 16 hex digits; not a credential
  label @1 :Text;
  caps @2 :List(CapEntry); # what the recipient's CapSet holds
  what @3 :Text;           # the narrowing, for people
  to @4 :Text;             # "" for a token, else the principal
  parent @5 :Text;         # the grant this one was made through; "" from the session itself
  createdAtMs @6 :Int64;   # Unix epoch milliseconds
  expiresAtMs @7 :Int64;
  lastUsedMs @8 :Int64;    # last call through it; 0 never
  calls @9 :UInt64;        # calls through it so far
  redeemed @10 :UInt32;    # times its token was redeemed
  revoked @11 :Bool;       # revoked, expired or under a revoked grant
}

interface Shares {
  # Delegation (issue 10): hand narrowed caps to someone else as a grant,
  # list this session's grants, and revoke them (CapSet entry "shares";
  # a delegate session holds it only when its grant allows resharing).
  share @0 (spec :ShareSpec) -> (grant :GrantInfo, token :Text);
  # Makes a grant and returns its token once (empty for `to` a principal).
  # The grant is served by this worker: revoking it, its expiry, or the end
  # of the grantor session fails every cap derived from it, calls in flight
  # included, with staleSession. invalidArgument: a cap that is not a
  # narrowed cap of this session, a bad name, label or ttl; denied: a cap
  # of a grant this session cannot share; quota: more than 256 live grants.
  list @1 () -> (grants :List(GrantInfo));
  # This session's grants and the ones made through them, newest first.
  revoke @2 (grantId :Text);
  # Revokes the grant and every grant made through it. notFound: not a
  # grant of this session (or made through one).
}

struct GrantRef {
  # One grant of a delegation chain (issue 10): its id and what its
  # creator called it.
  id @0 :Text;
  label @1 :Text;
}

struct AuditEntry {
  # One line of the audit log (broker state/audit.jsonl). A coalesced line
  # stands for `max(repeated, 1)` equal events from `sinceMs` to `timeMs`.
  timeMs @0 :Int64;        # Unix epoch ms (of the last event of a coalesced line)
  sinceMs @1 :Int64;       # coalesced line: the first event's time; 0 otherwise
  repeated @2 :UInt64;     # coalesced line: how many events it stands for; 0 otherwise
  principal @3 :Text;      # "<method>:<name>", or "" when unknown
  session @4 :Text;        # session id (hex) or ""
  action @5 :Text;         # e.g. "login", "vm.create", "vm.exec", "audit.query"
  cap @6 :Text;            # interface or cap name, e.g. "VmFactory"
  method @7 :Text;
  outcome @8 :Text;        # "ok" or an ErrorCode name ("denied", ...)
  detail @9 :Text;         # for people; never a secret
  peer @10 :Text;          # what the gateway saw of the peer, or ""
  vm @11 :Text;            # the VM's name in its session, or ""
  grants @12 :List(GrantRef);  # delegation chain, outermost grant first; empty when none
}

interface Audit {
  # The install's audit log, queryable (CapSet entry "audit", owner bundle
  # only). The holder is the operator: it sees every principal's records,
  # not only its own. Each query is itself audited ("audit.query"); repeats
  # of it are coalesced like any record.
  query @0 (sinceMs :Int64, untilMs :Int64, vm :Text, grant :Text, principal :Text,
            action :Text, limit :UInt32) -> (entries :List(AuditEntry));
  # The newest `limit` entries matching every filter, oldest first (newest
  # last). 0 or "" = no filter: `sinceMs`/`untilMs` bound `timeMs`
  # (inclusive, Unix epoch ms), `vm` is a VM name, `grant` a grant id
  # anywhere in the chain, `principal` and `action` match exactly. `limit`
  # 0 = 1000, more than 10000 is cut to 10000, and an answer stops at about
  # 8 MiB of entries (docs/bounds.md).
}
