"""Real servers on loopback for the egress tests: HTTP and HTTPS (a self-signed
certificate made with openssl for test names) and a TCP server that answers after
the client half-closes. Nothing here talks to anything but 127.0.0.0/8."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

TEST_NAMES = ("pypi.test", "files.pythonhosted.test", "a.example.test", "a.b.example.test",
              "example.test", "rebind.test", "evil.test", "other.test")


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for TEST_NAMES; skips without openssl (fails
    under CI)."""
    from conftest import require

    require(shutil.which("openssl"), "needs openssl (apt-get install openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    san = ",".join(f"DNS:{n}" for n in TEST_NAMES)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=sandvm-test", "-addext", f"subjectAltName={san}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        server: Any = self.server
        if self.path.startswith("/bytes/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * 65536
            while n > 0:
                self.wfile.write(block[:n])
                n -= len(block)
            return
        if self.path == "/headers":
            self._send(json.dumps(dict(self.headers.items())).encode(), "application/json")
            return
        self._send(f"hello from {server.label}\n".encode())

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        self._send(self.rfile.read(n))


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None
    label = ""

    def finish_request(self, request: Any, client_address: Any) -> None:
        # the TLS handshake runs in the connection's thread, never in the accept loop
        if self.tls is not None:
            request.settimeout(10)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)


class HttpServer:
    """``with HttpServer("127.0.0.1", tls=(cert, key)) as s: s.port``."""

    def __init__(self, host: str = "127.0.0.1", *, tls: tuple[Path, Path] | None = None,
                 label: str | None = None) -> None:
        self.host = host
        self.tls = tls
        self.label = label or host
        self._srv: _Server | None = None

    def __enter__(self) -> HttpServer:
        srv = _Server((self.host, 0), _Handler)
        srv.label = self.label
        if self.tls is not None:
            srv.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            srv.tls.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
        self._srv = srv
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._srv is not None
        return int(self._srv.server_address[1])

    def __exit__(self, *exc: object) -> None:
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()


class HalfCloseServer:
    """TCP: reads until the client's EOF, then answers ``got N`` and closes."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn:
            n = 0
            while chunk := conn.recv(65536):
                n += len(chunk)
            conn.sendall(f"got {n}".encode())

    def close(self) -> None:
        self.sock.close()


class BlackHole:
    """A loopback address:port where a TCP connect never completes: a listener with a
    backlog of 0 that never accepts, its one queue slot taken by a connection of its
    own, so the kernel drops every further SYN (the connector times out)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self._filler = socket.create_connection((host, self.port), timeout=5)

    def close(self) -> None:
        self._filler.close()
        self.sock.close()

    def __enter__(self) -> BlackHole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HoldServer:
    """TCP on loopback: accepts and holds every connection, silent, until closed."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()

