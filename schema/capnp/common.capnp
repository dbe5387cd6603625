@0xb52b1e4a3b0f2b12;
# Types shared by every capvisor interface: error codes, byte streams,
# processes and files (DESIGN.md, "Errors"; docs/decisions.md, "Errors ride
# exceptions").
#
# The error rule. Every method returns its value directly, so a method that
# returns a capability can be pipelined on (`capSet().get(..).get(..).exec(..)`
# in one round trip). A domain outcome (denied, not found, quota, ...) is a
# Cap'n Proto exception of type `failed` whose reason text begins with
#     [capvisor:<code>] <message for people>
# where <code> is the lower-camel name of an `ErrorCode` enumerant below
# (e.g. `[capvisor:notFound] this session has no VM named "web"`). Clients
# find the first `[capvisor:` marker in the reason (transports may prefix
# text such as "remote exception: "), map the name to the code, and treat an
# unknown name as `internal`. An exception without the marker is an
# infrastructure failure; type `disconnected` is transport loss. A call made
# on a pipelined capability whose producing call failed fails with that
# first failure's exception, code included.

enum ErrorCode {
  # Stable codes clients match on. Never reorder; only append.
  denied @0;          # authentication failed, or the bundle does not allow it
  notFound @1;        # no such VM, file, capability name, account (or it was removed)
  wrongInterface @2;  # CapSet.get: the name exists, the interface id differs
  quota @3;           # a bundle limit (max VMs, memory per VM, image) would be exceeded
  staleSession @4;    # the session was logged out, expired or revoked
  invalidArgument @5; # malformed input (empty argv, bad name, bad path)
  alreadyExists @6;   # a VM or account of that name exists
  unavailable @7;     # a backend failed (the VM did not boot, qemu missing)
  internal @8;        # a bug or unexpected failure on our side
  notRunning @9;      # the VM is stopped
  inUse @10;          # held by someone else: a volume attached read-write to a running VM
}

interface ByteSink {
  # A flow-controlled byte stream (stdout, stderr, file bodies).
  # Writers keep each chunk at or below 64 KiB (capvisor_rpc::CHUNK).
  write @0 (data :Data) -> stream;
  done @1 ();
  # End of stream. Returns once the receiver has consumed everything written.
}

struct EnvVar {
  name @0 :Text;
  value @1 :Text;
}

struct PtySize {
  rows @0 :UInt16;
  cols @1 :UInt16;
}

struct ExecSpec {
  argv @0 :List(Text);      # argv[0] is looked up in PATH; must not be empty
  env @1 :List(EnvVar);     # added to the guest's default environment
  cwd @2 :Text;             # empty: "/"
  stdin @3 :Data;           # bytes fed to stdin first
  keepStdinOpen @4 :Bool;   # false: stdin is closed after `stdin`; true: Process.write feeds more
  pty :union {
    none @5 :Void;          # pipes: stdout and stderr separate
    size @6 :PtySize;       # a pseudo-terminal: output (both streams) goes to stdout
  }
  user @7 :Text;            # name or numeric uid to run as (guest /etc/passwd); empty: root
  secretEnv @8 :List(EnvVar);
  # Secrets as environment variables: each entry's `name` is the variable,
  # its `value` the name of one of the principal's secrets (Cv.Secrets).
  # The worker checks the secret exists (notFound) and sets the variable to
  # the placeholder "capvisor-secret:<secret>"; the guest never gets this
  # field nor the value.
}

struct ExitStatus {
  union {
    code @0 :Int32;         # exited normally with this code
    signal @1 :Int32;       # killed by this signal number
  }
}

interface Process {
  # A running process in a guest. Its stdout and stderr flow into the
  # ByteSinks given to exec.
  write @0 (data :Data) -> stream;          # more stdin (keepStdinOpen) or pty input
  closeStdin @1 ();
  wait @2 () -> (status :ExitStatus);
  # Returns after the process exited and both output sinks got `done`.
  kill @3 (signal :Int32);
  resize @4 (size :PtySize);                # pty only
}

enum FileKind {
  file @0;
  dir @1;
  symlink @2;
  other @3;
}

struct DirEntry {
  name @0 :Text;
  kind @1 :FileKind;
  size @2 :UInt64;     # bytes
  mode @3 :UInt32;     # permission bits
}

interface Files {
  # A guest's file system. Paths are absolute guest paths.
  read @0 (path :Text, sink :ByteSink) -> (size :UInt64);
  # Streams the file into `sink` (then `done`); returns the byte count.
  write @1 (path :Text, mode :UInt32, beneath :Text) -> (sink :ByteSink);
  # Creates or truncates `path` with permission bits `mode`; the caller
  # writes the body into the returned sink and calls done, which returns
  # once the file is written and closed. `beneath` "" places no limit;
  # otherwise it is an absolute directory `path` must lie under (as a
  # string, else invalidArgument) and the guest resolves `path` from it
  # with openat2(2) RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS, so no symlink
  # or ".." in the guest leads outside it (denied); `beneath` itself is
  # opened refusing symlinks. A narrowed `Vm`'s `Files` sets it to the
  # write prefix that allowed the path.
  list @2 (path :Text) -> (entries :List(DirEntry));
}
