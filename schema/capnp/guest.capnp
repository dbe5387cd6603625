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
  shutdown @3 (reboot :Bool) -> ();
  # Syncs file systems and powers off (or reboots) the guest. May return
  # before the guest is gone, or the connection may end first.
  ping @4 () -> ();
  connect @5 (port :UInt16, down :Common.ByteSink) -> (up :Common.ByteSink);
  # Connects to 127.0.0.1:`port` in the guest (Cv.Vm.connect).
}

interface Egress {
  # The session's egress proxy (capvisor-proxy), served to one VM on that
  # VM's second virtio-serial port "capvisor.egress" (the proxy's bootstrap
  # there; guest-init is its only client, and the proxy knows which VM the
  # port belongs to: nothing here names a VM). Every TCP connection a guest
  # process opens to a non-loopback address, and every DNS query, arrive
  # here through guest-init (docs/decisions.md, "Egress"). The guest is
  # untrusted: `host` is only what it claims to want; the proxy resolves it
  # itself and judges the result.

  resolve @0 (name :Text) -> (allowed :Bool);
  # DNS: whether any rule could allow `name` (a lower-case DNS name without
  # the final dot). false: guest-init answers NXDOMAIN. true: guest-init
  # answers an address of its own (198.18.0.0/15) that it maps back to
  # `name` at connect.

  connect @1 (host :Text, port :UInt16, down :Common.ByteSink) -> (up :Common.ByteSink);
  # Opens a connection to `host` (a DNS name the guest resolved through
  # `resolve`, or a dotted IPv4 literal the guest connected to) port
  # `port`. Bytes from upstream go to `down` (done = upstream closed its
  # write side); the guest writes into `up` (done = half-close). Fails with
  # denied (policy, a private or loopback address, the name does not
  # resolve) or unavailable (upstream unreachable); the guest then resets
  # its connection.

  trust @2 () -> (caCertPem :Text);
  # The CA certificate (PEM) the proxy signs intercepted TLS with, for
  # guest-init to add to the guest's trust store at boot; "" when this
  # session does not intercept TLS.
}
