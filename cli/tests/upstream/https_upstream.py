#!/usr/bin/python3
"""A loopback HTTPS test upstream for capvisor's egress (TLS interception) tests.

Usage:
    https_upstream.py --cert C --key K --record FILE --git-root DIR [--port 0]

Binds 127.0.0.1 only (port 0 = an ephemeral port), prints ``PORT <n>`` as its
first stdout line, and serves HTTP/1.1 with keep-alive over TLS (ALPN
``http/1.1``) with the PEM certificate chain C and PEM private key K.
Python 3.11 standard library only.

Endpoints:
  GET|POST|PUT /echo...   appends one JSON line ``{"method","path","headers",
                          "body"}`` to FILE (header names lower-case, repeated
                          headers joined by ", ", body as UTF-8, lossy) and
                          answers 200 with the same JSON object.
  GET /big?bytes=N        N bytes of the pattern 0,1,..,255,0,1,.. with
                          Content-Length, written in 64 KiB chunks.
  GET /sse?n=K&gap_ms=G   text/event-stream (chunked; for an HTTP/1.0
                          client, ended by close): K events
                          ``data: event i\\n\\n`` (i = 1..K), each flushed,
                          G ms apart.
  GET /ws                 WebSocket (RFC 6455): echoes text and binary
                          messages, answers ping with pong and close with close.
  /git/...                git smart HTTP (push and fetch) through
                          ``git http-backend`` run as a CGI (RFC 3875) with
                          GIT_PROJECT_ROOT=DIR.
  anything else           404.

Each request is logged to stderr as one line. The process exits when its
parent dies (the parent pid changes), so a crashed test leaves nothing behind.
"""

import argparse
import base64
import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# RFC 6455 section 1.3: the GUID appended to Sec-WebSocket-Key.
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Largest reassembled WebSocket message (bytes) and echo request body (bytes).
WS_MAX_MESSAGE = 16 << 20
ECHO_MAX_BODY = 64 << 20
# Largest /big download (bytes) and SSE stream (events).
BIG_MAX = 16 << 30
SSE_MAX_EVENTS = 10000
CHUNK = 64 << 10
PATTERN = bytes(range(256)) * (CHUNK // 256)

RECORD_LOCK = threading.Lock()


class BodyTooLarge(Exception):
    pass


def iter_body(handler, limit=None):
    """Yields the request body in pieces: Content-Length or chunked
    (RFC 9112 section 7.1, trailers discarded)."""
    te = handler.headers.get("Transfer-Encoding", "")
    if "chunked" in te.lower():
        total = 0
        while True:
            line = handler.rfile.readline(65537)
            if not line:
                raise ConnectionError("eof in chunk size")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # trailer section up to the empty line
                while True:
                    t = handler.rfile.readline(65537)
                    if t in (b"\r\n", b"\n", b""):
                        return
            total += size
            if limit is not None and total > limit:
                raise BodyTooLarge()
            left = size
            while left:
                piece = handler.rfile.read(min(left, CHUNK))
                if not piece:
                    raise ConnectionError("eof in chunk")
                left -= len(piece)
                yield piece
            handler.rfile.readline(3)  # CRLF after the chunk data
    else:
        left = int(handler.headers.get("Content-Length", "0") or "0")
        if limit is not None and left > limit:
            raise BodyTooLarge()
        while left > 0:
            piece = handler.rfile.read(min(left, CHUNK))
            if not piece:
                raise ConnectionError("eof in body")
            left -= len(piece)
            yield piece


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without TCP_NODELAY, Nagle's
    # algorithm and the client's delayed ACK add ~40 ms to every small
    # answer (seen in capvisor-bench's HTTPS latency figure).
    disable_nagle_algorithm = True
    server_version = "capvisor-test-upstream/1"
    timeout = 120

    def log_message(self, fmt, *args):
        sys.stderr.write("upstream: %s %s\n" % (self.address_string(), fmt % args))
        sys.stderr.flush()

    def route(self):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        query = urllib.parse.parse_qs(url.query)
        try:
            if path.startswith("/echo") and self.command in ("GET", "POST", "PUT"):
                return self.echo()
            if path == "/big" and self.command == "GET":
                return self.big(query)
            if path == "/sse" and self.command == "GET":
                return self.sse(query)
            if path == "/ws" and self.command == "GET":
                return self.ws()
            if path.startswith("/git/"):
                return self.git(url)
        except (BrokenPipeError, ConnectionError, ssl.SSLError, OSError) as e:
            self.log_message("connection ended: %r", e)
            self.close_connection = True
            return
        self.drain_body()
        self.reply(404, "text/plain", b"not found\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = route

    def do_HEAD(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def reply(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream_start(self):
        """Ends the headers of a body of unknown length: chunked for an
        HTTP/1.1 client, else the body ends when the connection closes
        (RFC 9112 section 6.3)."""
        self.stream_chunked = self.request_version != "HTTP/1.0"
        if self.stream_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def stream_write(self, piece):
        """Sends one piece of the body now (flushed)."""
        if not piece:
            return
        if self.stream_chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        else:
            self.wfile.write(piece)
        self.wfile.flush()

    def stream_end(self):
        if self.stream_chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drain_body(self):
        try:
            for _ in iter_body(self, ECHO_MAX_BODY):
                pass
        except (BodyTooLarge, ValueError, ConnectionError):
            self.close_connection = True

    def bad(self, msg):
        self.close_connection = True
        self.reply(400, "text/plain", msg.encode() + b"\n")

    # ---- /echo ---------------------------------------------------------
    def echo(self):
        try:
            body = b"".join(iter_body(self, ECHO_MAX_BODY))
        except BodyTooLarge:
            self.close_connection = True
            return self.reply(413, "text/plain", b"body too large\n")
        headers = {}
        for name, value in self.headers.items():
            k = name.lower()
            headers[k] = headers[k] + ", " + value if k in headers else value
        obj = {
            "method": self.command,
            "path": self.path,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
        }
        line = json.dumps(obj)
        with RECORD_LOCK:
            with open(self.server.record, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        self.reply(200, "application/json", line.encode())

    # ---- /big ----------------------------------------------------------
    def big(self, query):
        try:
            n = int(query.get("bytes", ["0"])[0])
        except ValueError:
            return self.bad("bytes must be an integer")
        if n < 0 or n > BIG_MAX:
            return self.bad("bytes out of range")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        # CHUNK is a multiple of 256, so every chunk starts the pattern at 0.
        view = memoryview(PATTERN)
        while n > 0:
            k = min(n, CHUNK)
            self.wfile.write(view[:k])
            n -= k

    # ---- /sse ----------------------------------------------------------
    def sse(self, query):
        try:
            k = int(query.get("n", ["3"])[0])
            gap = int(query.get("gap_ms", ["0"])[0])
        except ValueError:
            return self.bad("n and gap_ms must be integers")
        if not (0 <= k <= SSE_MAX_EVENTS) or not (0 <= gap <= 60000):
            return self.bad("n or gap_ms out of range")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.stream_start()
        for i in range(1, k + 1):
            if i > 1 and gap:
                time.sleep(gap / 1000.0)
            self.stream_write(("data: event %d\n\n" % i).encode())
        self.stream_end()

    # ---- /ws -----------------------------------------------------------
    def ws(self):
        key = self.headers.get("Sec-WebSocket-Key")
        upgrade = self.headers.get("Upgrade", "").lower()
        if upgrade != "websocket" or not key:
            return self.bad("not a websocket upgrade")
        accept = base64.b64encode(hashlib.sha1((key.strip() + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        message, msg_op = [], None
        while True:
            frame = self.ws_read()
            if frame is None:
                return
            fin, op, payload = frame
            if op == 0x8:  # close: echo the status code back (RFC 6455 5.5.1)
                self.ws_send(0x8, payload[:2])
                return
            if op == 0x9:  # ping
                self.ws_send(0xA, payload)
                continue
            if op == 0xA:  # unsolicited pong
                continue
            if op in (0x1, 0x2):
                if msg_op is not None:
                    return self.ws_fail(1002)
                msg_op, message = op, [payload]
            elif op == 0x0:
                if msg_op is None:
                    return self.ws_fail(1002)
                message.append(payload)
            else:
                return self.ws_fail(1002)
            if sum(len(p) for p in message) > WS_MAX_MESSAGE:
                return self.ws_fail(1009)
            if fin:
                self.ws_send(msg_op, b"".join(message))
                message, msg_op = [], None

    def ws_read(self):
        """One frame: (fin, opcode, unmasked payload), or None at EOF or on
        a protocol error (after sending close)."""
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        fin = bool(head[0] & 0x80)
        op = head[0] & 0x0F
        masked = bool(head[1] & 0x80)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(self.rfile.read(2), "big")
        elif n == 127:
            n = int.from_bytes(self.rfile.read(8), "big")
        if not masked:  # RFC 6455 5.1: clients must mask
            self.ws_fail(1002)
            return None
        if n > WS_MAX_MESSAGE:
            self.ws_fail(1009)
            return None
        mask = self.rfile.read(4)
        data = self.rfile.read(n)
        if len(mask) < 4 or len(data) < n:
            return None
        # XOR with the 4-byte key, done on integers for speed.
        key = (mask * (n // 4 + 1))[:n]
        payload = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
        return fin, op, payload

    def ws_send(self, op, payload):
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | op, n])
        elif n < 65536:
            head = bytes([0x80 | op, 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | op, 127]) + n.to_bytes(8, "big")
        self.wfile.write(head + payload)
        self.wfile.flush()

    def ws_fail(self, code):
        try:
            self.ws_send(0x8, code.to_bytes(2, "big"))
        except OSError:
            pass

    # ---- /git ----------------------------------------------------------
    def git(self, url):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.server.git_root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "SERVER_SOFTWARE": self.server_version,
            "REQUEST_METHOD": self.command,
            "PATH_INFO": urllib.parse.unquote(url.path[len("/git"):]),
            "QUERY_STRING": url.query,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
        }
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if not chunked and self.headers.get("Content-Length"):
            env["CONTENT_LENGTH"] = self.headers["Content-Length"]
        # RFC 3875 4.1.18: every other request header as HTTP_*; this
        # carries Git-Protocol (protocol v2) and Content-Encoding (gzip).
        for name, value in self.headers.items():
            k = "HTTP_" + name.upper().replace("-", "_")
            if name.lower() in ("content-type", "content-length", "authorization"):
                continue
            env[k] = env[k] + ", " + value if k in env else value
        self.log_message(
            "git http-backend %s body chunked=%s encoding=%s",
            env["PATH_INFO"],
            chunked,
            self.headers.get("Content-Encoding", "identity"),
        )
        backend = os.path.join(
            subprocess.check_output(["git", "--exec-path"], text=True).strip(), "git-http-backend"
        )
        proc = subprocess.Popen([backend], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        body_error = []

        def feed():
            try:
                for piece in iter_body(self):
                    proc.stdin.write(piece)
            except (BrokenPipeError, ConnectionError, ValueError, OSError) as e:
                body_error.append(e)
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            self.cgi_reply(proc)
        finally:
            feeder.join(timeout=60)
            proc.stdout.close()
            proc.wait()
        if body_error:
            self.close_connection = True

    def cgi_reply(self, proc):
        status, headers = 200, []
        reason = None
        while True:
            line = proc.stdout.readline(65537)
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            value = value.strip()
            if name.lower() == "status":
                code, _, reason = value.partition(" ")
                status = int(code)
            else:
                headers.append((name, value))
        self.send_response(status, reason or None)
        has_length = any(n.lower() == "content-length" for n, _ in headers)
        for n, v in headers:
            self.send_header(n, v)
        if has_length:
            self.end_headers()
            self.stream_chunked = False
        else:
            self.stream_start()
        while True:
            piece = proc.stdout.read1(CHUNK)
            if not piece:
                break
            self.stream_write(piece)
        self.stream_end()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # listen() backlog: room for a burst of 100+ connections (the default 5
    # would drop SYNs and stall clients for a retransmit second).
    request_queue_size = 256

    def __init__(self, addr, ctx, record, git_root):
        self.ctx = ctx
        self.record = record
        self.git_root = git_root
        super().__init__(addr, Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        # The handshake runs in the connection's thread (finish_request),
        # so one slow or bad client cannot stall accept().
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request, client_address):
        try:
            request.settimeout(30)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLError, OSError) as e:
            sys.stderr.write("upstream: %s TLS handshake failed: %s\n" % (client_address[0], e))
            sys.stderr.flush()
            return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        sys.stderr.write("upstream: %s connection error: %r\n" % (client_address[0], e))
        sys.stderr.flush()


def watch_parent(parent):
    """Exits the process once `parent` is no longer its parent (it died
    and the process was reparented)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main():
    parent = os.getppid()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--record", required=True)
    ap.add_argument("--git-root", required=True)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["http/1.1"])
    srv = Server(("127.0.0.1", a.port), ctx, os.path.abspath(a.record), os.path.abspath(a.git_root))
    sys.stdout.write("PORT %d\n" % srv.server_address[1])
    sys.stdout.flush()
    srv.serve_forever()


if __name__ == "__main__":
    main()
