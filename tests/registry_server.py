"""Registries for tests: the real one (Debian's `docker-registry`) and a scriptable fake.

    with RealRegistry(tmp) as reg:                  # docker-registry on 127.0.0.1:<port>
        reg.push(layout, "v1", "tools/py:v1")       # skopeo copy oci:... docker://...
    with FakeRegistry({"v1": manifest}, blobs) as fake:   # http.server that can lie
        fake.auth = "bearer"; fake.truncate = {digest: 100}

The fake speaks just enough of the distribution API (manifests, blobs with Range,
401 challenges and a token endpoint, redirects) to exercise what a real registry
cannot be made to do: lie about sizes and content, drop connections, demand auth.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
TOKEN = "fake-token-123"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_tools() -> str | None:
    """Why the real-registry tests cannot run here, or None."""
    missing = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


class RealRegistry:
    """`docker-registry serve` on 127.0.0.1:<free port>, storage under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RealRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n")
        log = open(self.root / "registry.log", "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        self.__exit__(None, None, None)
        tail = (self.root / "registry.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"docker-registry did not answer on {self.host}: {tail}")

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def push(self, layout: Path, tag: str, dest: str, *, all_platforms: bool = False) -> None:
        """``skopeo copy`` the image tagged ``tag`` in ``layout`` to ``<host>/<dest>``."""
        cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
        if all_platforms:
            cmd.append("--all")
        cmd += [f"oci:{layout}:{tag}", f"docker://{self.host}/{dest}"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60,
                       env={**os.environ, "HOME": str(self.root)})


def oci_manifest(config: bytes, layers: list[bytes], *, sizes: list[int] | None = None,
                 layer_type: str = LAYER_TAR, media_type: str = OCI_MANIFEST) -> bytes:
    """A manifest for ``config`` and ``layers``; ``sizes`` overrides the declared sizes."""
    declared = sizes if sizes is not None else [len(b) for b in layers]
    return json.dumps({
        "schemaVersion": 2, "mediaType": media_type,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": digest_of(b), "size": n}
                   for b, n in zip(layers, declared, strict=True)],
    }).encode()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # dropped connections and TLS hellos on a plain port are part of the tests


@dataclass
class Seen:
    """One request the fake received."""

    path: str
    headers: dict[str, str]


@dataclass
class FakeRegistry:
    """A v2 registry in a thread; every attribute may be changed between pulls.

    ``manifests`` maps a tag or digest to the body served; ``blobs`` maps a digest to
    the body served (which may not match it). ``auth`` is None, "bearer" or "basic";
    ``credentials`` are what the token endpoint (or Basic) accepts (None: anyone).
    ``truncate[digest] = n`` sends only n bytes of that blob once, then drops the
    connection; ``ignore_range`` answers Range requests with the whole blob;
    ``redirect_blobs`` sends blob GETs there (a base URL); ``manifest_headers`` are
    added to manifest answers. ``token_body`` and ``error_body`` replace the token
    endpoint's and the error answers' bodies; ``token_realm`` replaces the realm the
    Bearer challenge names (default: this server's ``/token``).
    """

    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    bind: str = "127.0.0.1"
    auth: str | None = None
    credentials: tuple[str, str] | None = None
    truncate: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    redirect_blobs: str | None = None
    manifest_headers: dict[str, str] = field(default_factory=dict)
    token_body: bytes | None = None
    error_body: bytes | None = None
    token_realm: str | None = None
    seen: list[Seen] = field(default_factory=list)
    token_requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = _QuietServer((self.bind, 0), _handler(self))
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    def __enter__(self) -> FakeRegistry:
        self.thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_image(self, tag: str, config: bytes, layers: list[bytes], **kw: Any) -> str:
        """Serve an image under ``tag`` (and its digest); return the manifest digest."""
        manifest = oci_manifest(config, layers, **kw)
        d = digest_of(manifest)
        self.manifests[tag] = self.manifests[d] = manifest
        self.blobs[digest_of(config)] = config
        for b in layers:
            self.blobs[digest_of(b)] = b
        return d

    def blob_requests(self) -> list[Seen]:
        return [s for s in self.seen if "/blobs/" in s.path]


def _handler(reg: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    def basic() -> str | None:
        if reg.credentials is None:
            return None
        return "Basic " + base64.b64encode(":".join(reg.credentials).encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  length: int | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            body = reg.error_body if reg.error_body is not None else json.dumps(
                {"errors": [{"code": code, "message": code}]}).encode()
            self._send(status, body, {"Content-Type": "application/json"})

        def _authorized(self, repo: str) -> bool:
            given = self.headers.get("Authorization")
            accepted = {"bearer": f"Bearer {TOKEN}", "basic": basic()}.get(reg.auth or "")
            if reg.auth is None or (given is not None and given == accepted):
                return True
            if reg.auth == "bearer":
                realm = reg.token_realm or f"{reg.url}/token"
                challenge = (f'Bearer realm="{realm}",service="fake",'
                             f'scope="repository:{repo}:pull"')
            else:
                challenge = 'Basic realm="fake"'
            self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                       {"WWW-Authenticate": challenge})
            return False

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            seen = Seen(self.path, {k.lower(): v for k, v in self.headers.items()})
            if url.path == "/token":
                reg.token_requests.append(seen)
                ok = basic() is None or self.headers.get("Authorization") == basic()
                scope = parse_qs(url.query).get("scope", [""])[0]
                if ok and scope.endswith(":pull"):
                    self._send(200, reg.token_body if reg.token_body is not None
                               else json.dumps({"token": TOKEN}).encode())
                else:
                    self._send(401, b"{}")
                return
            reg.seen.append(seen)
            m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", url.path)
            if url.path == "/v2/":
                if self._authorized(""):
                    self._send(200, b"{}")
                return
            if m is None:
                self._error(404, "NOT_FOUND")
                return
            repo, kind, ref = m.groups()
            if not self._authorized(repo):
                return
            if kind == "manifests":
                body = reg.manifests.get(ref)
                if body is None:
                    self._error(404, "MANIFEST_UNKNOWN")
                    return
                try:
                    mt = json.loads(body).get("mediaType", OCI_MANIFEST)
                except (ValueError, RecursionError, AttributeError):
                    mt = OCI_MANIFEST
                self._send(200, body, {"Content-Type": mt, **reg.manifest_headers})
                return
            self._blob(repo, ref)

        def _blob(self, repo: str, digest: str) -> None:
            if reg.redirect_blobs:
                self._send(307, b"", {"Location": f"{reg.redirect_blobs}/v2/{repo}/blobs/{digest}"})
                return
            body = reg.blobs.get(digest)
            if body is None:
                self._error(404, "BLOB_UNKNOWN")
                return
            if digest in reg.truncate:  # promise everything, send a part, hang up
                cut = reg.truncate.pop(digest)
                self._send(200, body[:cut], length=len(body))
                self.close_connection = True
                return
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng and not reg.ignore_range:
                start = int(rng.group(1))
                if start >= len(body):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                    return
                self._send(206, body[start:], {
                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
                return
            self._send(200, body)

    return Handler
