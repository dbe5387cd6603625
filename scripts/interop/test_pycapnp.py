#!/usr/bin/env python3
"""Interop test: a pycapnp (C++ Cap'n Proto) client against a real `capvisor serve`.

The wire is a public contract. This program speaks it with another
implementation: it loads schema/capnp/*.capnp with pycapnp, starts its own
server in a temporary directory, and checks login, a fully pipelined
login -> capSet -> get -> create -> exec -> wait chain, exec with a
Python-implemented ByteSink, typed errors arriving through pipelined
chains, VM identity across remove/re-create, attach by resume token and
logout.

Usage: test_pycapnp.py [--repo DIR] [--bin-dir DIR]
Prints one line per check and ends with "N passed, M failed"; exits 1 if any
check failed. The server is always stopped (SIGTERM, SIGKILL after a
timeout) and the temporary directory removed.
"""

import argparse
import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import capnp

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Bounds on every wait (seconds).
SERVE_START_TIMEOUT = 300  # the first start may build the guest image; cached it is ~1 s
CALL_TIMEOUT = 30  # a plain RPC
BOOT_TIMEOUT = 120  # VmFactory.create under QEMU/TCG (1-3 s here)
SERVE_STOP_TIMEOUT = 60  # SIGTERM -> exit
WATCHDOG = 600  # the whole program, in case the event loop itself hangs


# ---------------------------------------------------------------------------
# Schema

def load_schemas(schema_dir):
    """Loads the schema with the C++ library's include dir for `/capnp/stream.capnp`."""
    imports = [d for d in ("/usr/include", "/usr/local/include") if os.path.exists(os.path.join(d, "capnp", "stream.capnp"))]
    # pycapnp also bundles stream.capnp in its package dir (site-packages/capnp/).
    imports.append(os.path.dirname(os.path.dirname(capnp.__file__)))
    common = capnp.load(os.path.join(schema_dir, "common.capnp"), imports=imports)
    cv = capnp.load(os.path.join(schema_dir, "capvisor.capnp"), imports=imports)
    return common, cv


# ---------------------------------------------------------------------------
# Errors: the one place that reads a capvisor error code out of an exception.

MARKER = "[capvisor:"


def error_code(exc, codes):
    """The capvisor ErrorCode name carried by `exc`, or None.

    Rule (common.capnp): find the FIRST "[capvisor:" marker in the exception's
    reason (transports may prefix text such as "remote exception: "), take the
    name up to "]"; a name that is not an ErrorCode enumerant means "internal".
    No marker: not a domain error (infrastructure failure / disconnect), None.
    """
    reason = getattr(exc, "description", None)
    if not isinstance(reason, str):
        reason = str(exc)
    i = reason.find(MARKER)
    if i < 0:
        return None
    j = reason.find("]", i + len(MARKER))
    if j < 0:
        return "internal"
    name = reason[i + len(MARKER) : j]
    return name if name in codes else "internal"


def describe(exc):
    t = getattr(exc, "type", None)
    d = getattr(exc, "description", None)
    return f"{type(exc).__name__}({t}: {d})" if d is not None else f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# The server under test

class Server:
    def __init__(self, bin_dir, guest_init):
        self.dir = tempfile.mkdtemp(prefix="capvisor-interop.")
        self.socket = os.path.join(self.dir, "run", "gateway.sock")
        self.log_path = os.path.join(self.dir, "serve.log")
        self.bin_dir = bin_dir
        self.guest_init = guest_init
        self.proc = None
        self._lock = threading.Lock()

    def start(self):
        exe = os.path.join(self.bin_dir, "capvisor")
        for b in ("capvisor", "capvisor-gateway", "capvisor-broker", "capvisor-worker", "capvisor-vmm"):
            if not os.path.exists(os.path.join(self.bin_dir, b)):
                raise RuntimeError(f"{b} is not built in {self.bin_dir}: run `cargo build --workspace` first")
        if not os.path.exists(self.guest_init):
            raise RuntimeError(f"guest-init {self.guest_init} is not built")
        env = dict(os.environ)
        env.update(
            CAPVISOR_SOCKET=self.socket,
            CAPVISOR_STATE_DIR=os.path.join(self.dir, "state"),
            CAPVISOR_BIN_DIR=self.bin_dir,
            CAPVISOR_GUEST_INIT=self.guest_init,
        )
        log = open(self.log_path, "wb")
        # Own process group: if serve ignores SIGTERM, SIGKILL reaches what it started.
        self.proc = subprocess.Popen(
            [exe, "serve"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        t0 = time.monotonic()
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError(f"capvisor serve exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() - t0 > SERVE_START_TIMEOUT:
                raise RuntimeError(f"capvisor serve did not come up in {SERVE_START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        """SIGTERM, wait; SIGKILL the process group on timeout. Returns serve's exit status."""
        with self._lock:
            p, self.proc = self.proc, None
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(SERVE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"capvisor serve did not exit within {SERVE_STOP_TIMEOUT} s of SIGTERM: killing", flush=True)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        return p.returncode

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# Connections (rpc/src/attach.rs: the gateway socket's 8-byte preamble)

MAGIC_RPC = b"CVRPC001"
MAGIC_ATTACH = b"CVATT001"


def _recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed during the attach reply")
        buf += chunk
    return buf


async def _rpc_over(sock):
    sock.setblocking(False)
    stream = await capnp.AsyncIoStream.create_unix_connection(sock=sock)
    return capnp.TwoPartyClient(stream)


async def connect_gateway(path):
    """A plain RPC connection; its bootstrap is `Gateway`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CALL_TIMEOUT)
    s.connect(path)
    s.sendall(MAGIC_RPC)
    return await _rpc_over(s)


class AttachRefused(Exception):
    def __init__(self, code, message):
        super().__init__(f"attach refused: code {code}: {message}")
        self.code = code
        self.message = message


async def connect_attach(path, token):
    """An attach connection; on OK its bootstrap is the session's `Session`."""
    tok = token.encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CALL_TIMEOUT)
    s.connect(path)
    s.sendall(MAGIC_ATTACH + struct.pack("<I", len(tok)) + tok)
    # Reply: 0 = OK; or 1, u16 LE ErrorCode, u16 LE length, UTF-8 message.
    # Read exactly the reply: the bytes after it belong to capnp-rpc.
    status = await asyncio.to_thread(_recv_exact, s, 1)
    if status == b"\x00":
        return await _rpc_over(s)
    try:
        if status != b"\x01":
            raise ConnectionError(f"bad attach reply byte {status!r}")
        code, n = struct.unpack("<HH", await asyncio.to_thread(_recv_exact, s, 4))
        msg = (await asyncio.to_thread(_recv_exact, s, n)).decode("utf-8", "replace")
    finally:
        s.close()
    raise AttachRefused(code, msg)


# ---------------------------------------------------------------------------
# The test

async def bounded(promise, timeout=CALL_TIMEOUT):
    """Awaits a pycapnp promise (or coroutine) for at most `timeout` seconds."""

    async def w():
        return await promise

    return await asyncio.wait_for(w(), timeout)


def which(u):
    w = u.which
    return w() if callable(w) else w


class Interop:
    def __init__(self, server, common, cv):
        self.server = server
        self.common = common
        self.cv = cv
        self.codes = set(common.ErrorCode.schema.enumerants.keys())
        self.vmf_id = cv.VmFactory.schema.node.id
        self.passed = 0
        self.failed = 0
        self.keep = []  # connections and caps kept alive for the whole run
        self.session = None
        self.vms = None
        self.token = None

        class ByteSink(common.ByteSink.Server):
            """A ByteSink implemented in Python: collects what the guest writes."""

            def __init__(self):
                self.data = bytearray()
                self.writes = 0
                self.is_done = False

            async def write(self, data, **kwargs):
                if self.is_done:
                    raise ValueError("write after done")
                self.data += data
                self.writes += 1

            async def done(self, **kwargs):
                self.is_done = True

        self.ByteSink = ByteSink

    # -- helpers ----------------------------------------------------------
    def code(self, exc):
        return error_code(exc, self.codes)

    async def expect_code(self, want, promise, timeout=CALL_TIMEOUT):
        """Awaits `promise`, which must fail with capvisor code `want`."""
        try:
            r = await bounded(promise, timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"expected [capvisor:{want}], got no answer in {timeout} s")
        except Exception as e:  # pycapnp raises KjException
            got = self.code(e)
            if got != want:
                raise AssertionError(f"expected [capvisor:{want}], got code {got}: {describe(e)}")
            return e
        raise AssertionError(f"expected [capvisor:{want}], the call succeeded: {r}")

    def exec_spec(self, argv, stdin=b""):
        return {"argv": argv, "stdin": stdin}

    async def run_exec(self, vm, argv, stdin=b"", timeout=CALL_TIMEOUT):
        """exec + wait (pipelined on the exec's `process`); returns (exit code, stdout, stderr)."""
        out, err = self.ByteSink(), self.ByteSink()
        st = await bounded(vm.exec(self.exec_spec(argv, stdin), out, err).process.wait(), timeout)
        status = st.status
        if which(status) != "code":
            raise AssertionError(f"{argv}: killed by signal {status.signal}")
        assert out.is_done and err.is_done, "wait returned before both sinks got done"
        return status.code, bytes(out.data), bytes(err.data)

    async def check(self, name, fn, timeout):
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(fn(), timeout)
        except Exception as e:
            self.failed += 1
            msg = "timed out after %d s" % timeout if isinstance(e, asyncio.TimeoutError) else describe(e)
            print(f"FAIL {name} ({time.monotonic() - t0:.1f} s): {msg}", flush=True)
            if not isinstance(e, (AssertionError, asyncio.TimeoutError)):
                traceback.print_exc(file=sys.stdout)
            return False
        self.passed += 1
        print(f"ok   {name} ({time.monotonic() - t0:.1f} s)", flush=True)
        return True

    # -- checks -----------------------------------------------------------
    async def login_local(self):
        client = await connect_gateway(self.server.socket)
        self.keep.append(client)
        gw = client.bootstrap().cast_as(self.cv.Gateway)
        methods = (await bounded(gw.authMethods())).methods
        assert "local" in [str(m) for m in methods], f"authMethods {list(methods)} lacks local"
        r = await bounded(gw.loginLocal())
        info = r.info
        assert info.principal.method == "local", f"principal.method is {info.principal.method}"
        assert info.principal.name, "principal.name is empty"
        assert info.resumeToken, "no resume token"
        assert info.profile == "owner", f"profile {info.profile!r} (the serving uid should be owner)"
        self.keep.append(r.session)
        # The session works: info() on it.
        si = (await bounded(r.session.info())).info
        assert si.principal.method == "local" and si.principal.name == info.principal.name, si

    async def pipelined_chain(self):
        """login -> capSet -> get -> cast -> create -> exec -> wait, in one flight.

        Not one intermediate promise is awaited: each step is called on the
        previous call's pipelined result (a promised answer), so every call
        is on the wire before the first answer (loginLocal's) comes back.
        The only await is the last call, Process.wait; the earlier promises
        are awaited afterwards only to read their other fields.
        """
        client = await connect_gateway(self.server.socket)
        self.keep.append(client)
        gw = client.bootstrap().cast_as(self.cv.Gateway)
        out, err = self.ByteSink(), self.ByteSink()

        login = gw.loginLocal()                                   # call 1, not awaited
        session = login.session                                   # a promised cap (pipeline), no I/O
        cap_set = session.capSet()                                # call 2 on the promised Session
        got = cap_set.capSet.get(capName="vms", interfaceId=self.vmf_id)              # call 3 on the promised CapSet
        vms = got.cap.cast_as(self.cv.VmFactory)                  # promised AnyPointer cap, cast locally
        created = vms.create({"name": "interop-a"})               # call 4 on the promised VmFactory
        vm = created.vm
        execd = vm.exec(self.exec_spec(["echo", "interop-ok"]), out, err)  # call 5 on the promised Vm
        waited = execd.process.wait()                             # call 6 on the promised Process: the last

        st = await bounded(waited, BOOT_TIMEOUT)                          # the first and only await of the chain
        # Everything is settled now; read the rest.
        status = st.status
        assert which(status) == "code" and status.code == 0, f"exit status {status}"
        assert out.is_done and err.is_done, "wait returned before both sinks got done"
        assert bytes(out.data) == b"interop-ok\n", f"stdout {bytes(out.data)!r}"
        assert bytes(err.data) == b"", f"stderr {bytes(err.data)!r}"
        assert out.writes >= 1
        info = (await bounded(login)).info
        assert info.principal.method == "local"
        self.token = info.resumeToken
        self.session = session
        self.vms = vms
        self.vm_a = vm
        self.keep += [login, cap_set, got, created, execd]

    async def exec_stdout_and_stdin(self):
        code, out, err = await self.run_exec(self.vm_a, ["uname", "-r"])
        assert code == 0 and out.strip() and not err, (code, out, err)
        payload = b"line one\nline two \x00\xff binary\n" * 64
        code, out, err = await self.run_exec(self.vm_a, ["cat"], stdin=payload)
        assert code == 0, f"cat exit {code}, stderr {err!r}"
        assert out == payload, f"cat returned {len(out)} bytes, not the {len(payload)} sent"
        code, out, err = await self.run_exec(self.vm_a, ["sh", "-c", "echo to-err >&2; exit 3"])
        assert (code, out, err) == (3, b"", b"to-err\n"), (code, out, err)
        lst = (await bounded(self.vms.list())).vms
        names = [v.name for v in lst]
        assert "interop-a" in names, names
        vi = (await bounded(self.vm_a.info())).info
        assert vi.name == "interop-a" and vi.state == "running", vi

    async def failing_chains(self):
        # The first call of the chain fails; the awaited last call carries its code.
        bad = self.session.capSet().capSet.get("nope", self.vmf_id).cap.cast_as(self.cv.VmFactory)
        await self.expect_code("notFound", bad.list())
        # VmFactory.get of an unknown VM, then exec on the promised Vm.
        sink_o, sink_e = self.ByteSink(), self.ByteSink()
        ghost = self.vms.get("no-such-vm").vm
        await self.expect_code("notFound", ghost.exec(self.exec_spec(["true"]), sink_o, sink_e))
        # ... and one step further: wait on the promised Process.
        await self.expect_code("notFound", ghost.exec(self.exec_spec(["true"]), sink_o, sink_e).process.wait())
        # A name that exists with another interface id: wrongInterface.
        wrong = self.session.capSet().capSet.get("vms", self.cv.Vm.schema.node.id).cap.cast_as(self.cv.Vm)
        await self.expect_code("wrongInterface", wrong.ping())
        # Bad arguments and limits, all typed: empty argv, a bad VM name, memory over the bundle's limit.
        await self.expect_code("invalidArgument", self.vm_a.exec(self.exec_spec([]), sink_o, sink_e))
        await self.expect_code("invalidArgument", self.vms.create({"name": "Bad_Name"}))
        await self.expect_code("quota", self.vms.create({"name": "huge", "memoryMib": 1 << 20}))
        # The marker parser: the first marker wins, unknown names are internal, no marker is None.
        t = [
            ("remote exception: [capvisor:quota] x [capvisor:denied] y", "quota"),
            ("[capvisor:noSuchCode] z", "internal"),
            ("plain failure", None),
        ]
        for text, want in t:
            got = self.code(Exception(text))
            assert got == want, f"error_code({text!r}) = {got}, want {want}"

    async def identity(self):
        await bounded(self.vms.remove("interop-a"))  # stay well inside the bundle's max_vms
        old = (await bounded(self.vms.create({"name": "same"}), BOOT_TIMEOUT)).vm
        code, _, _ = await self.run_exec(old, ["true"])
        assert code == 0
        await bounded(self.vms.remove("same"))
        # The old cap is dead at once ...
        await self.expect_code("notFound", old.ping())
        fresh_created = (await bounded(self.vms.create({"name": "same"}), BOOT_TIMEOUT)).vm
        await self.expect_code("alreadyExists", self.vms.create({"name": "same"}))
        # ... and stays dead after a new VM took the name: nothing runs in the new VM.
        so, se = self.ByteSink(), self.ByteSink()
        await self.expect_code("notFound", old.exec(self.exec_spec(["touch", "/tmp/old-cap-ran"]), so, se))
        await self.expect_code("notFound", old.info())
        # A freshly fetched cap reaches the new VM, where the old cap's command never ran.
        fresh = self.vms.get(vmName="same").vm  # keywords work: no parameter is called plain `name`
        code, out, _ = await self.run_exec(fresh, ["sh", "-c", "test -e /tmp/old-cap-ran && echo ran || echo clean"])
        assert (code, out) == (0, b"clean\n"), (code, out)
        code, _, _ = await self.run_exec(fresh_created, ["true"])
        assert code == 0
        self.keep += [old, fresh, fresh_created]

    async def attach(self):
        client = await connect_attach(self.server.socket, self.token)
        self.keep.append(client)
        sess = client.bootstrap().cast_as(self.cv.Session)
        # Pipelined over the attach connection too: capSet -> get -> list, one await.
        lst = await bounded(sess.capSet().capSet.get("vms", self.vmf_id).cap.cast_as(self.cv.VmFactory).list())
        names = sorted(v.name for v in lst.vms)
        assert names == ["same"], names
        info = (await bounded(sess.info())).info
        assert info.principal.method == "local", info
        self.attached = sess
        # A bad token is refused before any RPC, with a typed code.
        try:
            await connect_attach(self.server.socket, "not-a-token")
        except AttachRefused as e:
            assert e.code == self.common.ErrorCode.schema.enumerants["staleSession"], e
        else:
            raise AssertionError("attach with a bogus token was accepted")

    async def logout(self):
        held_vm = self.vms.get("same").vm
        await bounded(held_vm.ping())
        await bounded(self.session.logout())
        await self.expect_code("staleSession", self.vms.list())
        await self.expect_code("staleSession", held_vm.ping())
        await self.expect_code("staleSession", self.session.capSet().capSet.list())
        if getattr(self, "attached", None) is not None:
            await self.expect_code("staleSession", self.attached.info())
        # The resume token is revoked too.
        try:
            await connect_attach(self.server.socket, self.token)
        except AttachRefused as e:
            assert e.code == self.common.ErrorCode.schema.enumerants["staleSession"], e
        else:
            raise AssertionError("attach after logout was accepted")

    async def run(self):
        await self.check("a. loginLocal: principal.method == local, owner profile, resume token", self.login_local, 60)
        ok = await self.check(
            "b. pipelined login->capSet->get->create->exec->wait, one await", self.pipelined_chain, BOOT_TIMEOUT + 30
        )
        names = [
            ("c. exec with a Python ByteSink: stdout, stderr, exit codes, stdin via cat", self.exec_stdout_and_stdin, 90),
            ("d. pipelined chains whose first call fails carry notFound; other typed codes", self.failing_chains, 90),
            ("e. identity: a removed VM's cap stays notFound after its name is reused", self.identity, 2 * BOOT_TIMEOUT + 60),
            ("   attach by resume token: Session bootstrap, pipelined list", self.attach, 60),
            ("f. logout: held caps fail with staleSession, token revoked", self.logout, 60),
        ]
        for name, fn, timeout in names:
            if ok:
                await self.check(name, fn, timeout)
            else:
                self.failed += 1
                print(f"FAIL {name}: skipped (the pipelined chain that sets up the session failed)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=REPO)
    ap.add_argument("--bin-dir", default=None, help="default: REPO/target/debug")
    args = ap.parse_args()
    bin_dir = os.path.abspath(args.bin_dir or os.path.join(args.repo, "target", "debug"))
    guest_init = os.environ.get("CAPVISOR_GUEST_INIT") or os.path.join(bin_dir, "capvisor-guest-init")

    t_start = time.monotonic()
    server = Server(bin_dir, guest_init)

    def watchdog():
        print(f"FAIL watchdog: the test did not finish in {WATCHDOG} s; stopping", flush=True)
        try:
            server.stop()
        finally:
            server.cleanup()
            print("0 passed, 1 failed", flush=True)
            os._exit(1)

    dog = threading.Timer(WATCHDOG, watchdog)
    dog.daemon = True
    dog.start()

    passed = failed = 0
    try:
        common, cv = load_schemas(os.path.join(args.repo, "schema", "capnp"))
        server.start()
        print(f"capvisor serve is up ({time.monotonic() - t_start:.1f} s); pycapnp {capnp.__version__}", flush=True)
        t = Interop(server, common, cv)
        try:
            asyncio.run(capnp.run(t.run()))
        except Exception as e:
            t.failed += 1
            print(f"FAIL event loop: {describe(e)}", flush=True)
            traceback.print_exc(file=sys.stdout)
        passed, failed = t.passed, t.failed
    except Exception as e:
        failed += 1
        print(f"FAIL setup: {describe(e)}", flush=True)
    finally:
        rc = server.stop()
        if rc not in (0, None):
            failed += 1
            print(f"FAIL capvisor serve exited with {rc} after SIGTERM", flush=True)
        if failed:
            print("---- serve.log (last 60 lines) ----")
            print("\n".join(server.log().splitlines()[-60:]))
            print("----")
        server.cleanup()
        dog.cancel()
    print(f"time: {time.monotonic() - t_start:.1f} s", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
