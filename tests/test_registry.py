"""Pulling from OCI registries: a real `docker-registry` fed by skopeo, and a fake that lies.

The real registry (Debian's docker-registry, images pushed with skopeo from layouts
built by tests/oci_build.py) covers the normal paths; the in-test fake covers what a
real registry cannot be made to do: wrong sizes and content, dropped connections,
token and Basic auth, redirects to another host.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from oci_build import Dir, File, build_layout, layer_tar
from registry_server import (
    FakeRegistry,
    RealRegistry,
    digest_of,
    missing_tools,
    oci_manifest,
)
from sandvm.errors import (
    ConfigError,
    DigestMismatch,
    ImageInvalid,
    ImageNotFound,
    ImageTooLarge,
    RegistryError,
)
from sandvm.images.blobs import BlobStore
from sandvm.images.model import MAX_MANIFEST_BYTES
from sandvm.images.registry import Reference, parse_reference, pull

# ---------------------------------------------------------------- fixtures

BASE = [Dir("etc"), File("etc/os-release", b"ID=test\n")]
BIG = random.Random(5).randbytes(300_000)  # incompressible: a sizeable gzip layer


@dataclass
class Pushed:
    """The real registry and what the tests pushed to it."""

    host: str
    layouts: dict[str, Path]
    digests: dict[str, str]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    reason = missing_tools()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"registry tests cannot run in CI: {reason}")
        pytest.skip(f"needs Debian's docker-registry and skopeo: {reason}")
    tmp = tmp_path_factory.mktemp("registry")
    images: dict[str, tuple[list[Any], dict[str, Any], tuple[str, ...]]] = {
        "app": ([BASE, [File("app/main.py", b"print(1)\n", mode=0o755)]],
                {"Env": ["PATH=/usr/bin", "GREETING=hi"], "WorkingDir": "/app",
                 "Entrypoint": ["python3"], "Cmd": ["main.py"], "User": "1000:1000"}, ()),
        "other": ([BASE, [File("srv/data", b"other\n")]], {"Env": ["X=2"]}, ()),
        "multi": ([BASE], {"Env": ["ARCH=amd64"]}, ("linux/arm64",)),
        "big": ([[File("blob.bin", BIG)]], {}, ()),
    }
    layouts, digests = {}, {}
    with RealRegistry(tmp / "server") as reg:
        for name, (layers, config, extra) in images.items():
            layout = tmp / name
            digests[name] = build_layout(layout, layers, config=config, tag="v1",
                                         extra_platforms=extra)
            reg.push(layout, "v1", f"tools/{name}:v1", all_platforms=bool(extra))
            layouts[name] = layout
        yield Pushed(reg.host, layouts, digests)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[httpx.Request, int]]:
    """Every request httpx sends during the test, with its status (0: no answer)."""
    log: list[tuple[httpx.Request, int]] = []
    original = httpx.Client.send

    def send(self: httpx.Client, request: httpx.Request, **kw: Any) -> httpx.Response:
        try:
            resp = original(self, request, **kw)
        except httpx.HTTPError:
            log.append((request, 0))
            raise
        log.append((request, resp.status_code))
        return resp

    monkeypatch.setattr(httpx.Client, "send", send)
    return log


def layout_manifest(layout: Path, digest: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((layout / "blobs" / "sha256" / digest[7:]).read_bytes())
    return doc


def assert_clean(store: BlobStore) -> None:
    """No partial download and no temporary file is left behind."""
    assert list((store.root / "partial").iterdir()) == []


def blob_paths(sent: list[tuple[httpx.Request, int]]) -> list[str]:
    return [r.url.path for r, _ in sent if "/blobs/" in r.url.path]


# ---------------------------------------------------------------- references

@pytest.mark.parametrize(("ref", "want"), [
    ("127.0.0.1:5000/tools/py:3.11", Reference("127.0.0.1:5000", "tools/py", "3.11")),
    ("localhost:5000/a/b@sha256:" + "a" * 64,
     Reference("localhost:5000", "a/b", None, "sha256:" + "a" * 64)),
    ("localhost/x", Reference("localhost", "x", "latest")),
    ("[::1]:5000/x:1", Reference("[::1]:5000", "x", "1")),
    ("registry.example.com/team/app", Reference("registry.example.com", "team/app", "latest")),
    ("debian", Reference("docker.io", "library/debian", "latest")),
    ("user/img:1.0", Reference("docker.io", "user/img", "1.0")),
    ("index.docker.io/debian:12", Reference("docker.io", "library/debian", "12")),
])
def test_parse_reference(ref: str, want: Reference) -> None:
    got = parse_reference(ref)
    assert got == want
    assert parse_reference(str(got)) == got


@pytest.mark.parametrize(("ref", "why"), [
    ("", "empty"),
    ("https://127.0.0.1:5000/a", "URL scheme"),
    ("127.0.0.1:5000/Tools/py", "lowercase"),
    ("a/b:has space", "invalid tag"),
    ("a/b:.dot", "invalid tag"),
    ("a/b@sha256:1234", "digest"),
    ("a/b@md5:" + "a" * 32, "digest"),
    ("host:99999/a", "registry host"),
    ("host:5000/a//b", "malformed"),
    ("a/" + "b" * 300, "255"),
])
def test_bad_reference(ref: str, why: str) -> None:
    with pytest.raises(ImageInvalid, match=why):
        parse_reference(ref)


# ---------------------------------------------------------------- the real registry

def test_pull_by_tag(registry: Pushed, store: BlobStore) -> None:
    calls: list[tuple[str, int, int]] = []
    img = pull(f"{registry.host}/tools/app:v1", store,
               progress=lambda what, done, total: calls.append((what, done, total)))
    want = layout_manifest(registry.layouts["app"], registry.digests["app"])
    assert img.manifest_digest == registry.digests["app"]
    assert img.config_digest == want["config"]["digest"]
    assert [layer.digest for layer in img.layers] == [d["digest"] for d in want["layers"]]
    assert [layer.size for layer in img.layers] == [d["size"] for d in want["layers"]]
    c = img.config
    assert c.env == ("PATH=/usr/bin", "GREETING=hi")
    assert (c.working_dir, c.user, c.entrypoint, c.cmd) == ("/app", "1000:1000",
                                                            ("python3",), ("main.py",))
    for d in [img.manifest_digest, img.config_digest, *(layer.digest for layer in img.layers)]:
        assert hashlib.sha256(store.path(d).read_bytes()).hexdigest() == d[7:]
    # every blob reported, and each one's last report is complete
    last = {what: (done, total) for what, done, total in calls}
    assert set(last) == {f"config {img.config_digest[7:19]}"} | {
        f"layer {layer.digest[7:19]}" for layer in img.layers}
    assert all(done == total for done, total in last.values())
    assert_clean(store)


def test_pull_by_digest(registry: Pushed, store: BlobStore) -> None:
    digest = registry.digests["app"]
    img = pull(f"{registry.host}/tools/app@{digest}", store)
    assert img.manifest_digest == digest
    assert img.config.env == ("PATH=/usr/bin", "GREETING=hi")
    absent = "sha256:" + "0" * 64
    with pytest.raises(ImageNotFound, match=absent):
        pull(f"{registry.host}/tools/app@{absent}", store)


def test_index_picks_linux_amd64(registry: Pushed, store: BlobStore,
                                 sent: list[tuple[httpx.Request, int]]) -> None:
    img = pull(f"{registry.host}/tools/multi:v1", store)
    assert img.manifest_digest == registry.digests["multi"]
    assert img.config.env == ("ARCH=amd64",)
    index = json.loads((registry.layouts["multi"] / "index.json").read_bytes())
    index_digest = index["manifests"][0]["digest"]
    assert store.has(index_digest) and store.has(img.manifest_digest)
    # the tag (an index), then the amd64 manifest by digest; never the arm64 one
    manifests = [r.url.path.rsplit("/", 1)[1] for r, _ in sent if "/manifests/" in r.url.path]
    assert manifests == ["v1", registry.digests["multi"]]


def test_missing_tag_and_repository(registry: Pushed, store: BlobStore) -> None:
    with pytest.raises(ImageNotFound, match="tag 'v9' not found"):
        pull(f"{registry.host}/tools/app:v9", store)
    with pytest.raises(ImageNotFound):
        pull(f"{registry.host}/tools/nothing:v1", store)
    assert store.digests() == []


def test_layer_cache_is_shared(registry: Pushed, store: BlobStore,
                               sent: list[tuple[httpx.Request, int]]) -> None:
    app = pull(f"{registry.host}/tools/app:v1", store)
    first = blob_paths(sent)
    assert len(first) == 3  # config + 2 layers
    sent.clear()
    other = pull(f"{registry.host}/tools/other:v1", store)
    shared = app.layers[0].digest
    assert other.layers[0].digest == shared  # same base layer in both images
    fetched = blob_paths(sent)
    assert not any(p.endswith(shared) for p in fetched)
    assert sorted(p.rsplit("/", 1)[1] for p in fetched) == sorted(
        [other.config_digest, other.layers[1].digest])
    sent.clear()
    pull(f"{registry.host}/tools/other:v1", store)  # warm: only the manifest is asked for
    assert blob_paths(sent) == []


def test_resume_partial_download(registry: Pushed, store: BlobStore,
                                 sent: list[tuple[httpx.Request, int]]) -> None:
    want = layout_manifest(registry.layouts["big"], registry.digests["big"])["layers"][0]
    blob = (registry.layouts["big"] / "blobs" / "sha256" / want["digest"][7:]).read_bytes()
    half = len(blob) // 2
    store.partial_path(want["digest"]).write_bytes(blob[:half])
    reports: list[int] = []
    pull(f"{registry.host}/tools/big:v1", store,
         progress=lambda what, done, total: reports.append(done) if what.startswith("layer")
         else None)
    [(req, status)] = [(r, s) for r, s in sent if r.url.path.endswith(want["digest"])]
    assert req.headers["range"] == f"bytes={half}-"
    assert status == 206
    assert reports[0] > half and reports[-1] == len(blob)
    assert store.path(want["digest"]).read_bytes() == blob
    assert_clean(store)


# ---------------------------------------------------------------- a fake registry

CONFIG = json.dumps({"architecture": "amd64", "os": "linux",
                     "config": {"Env": ["FAKE=1"]}}).encode()
LAYER = layer_tar([File("hello.txt", b"hello\n" * 1000)])


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with FakeRegistry() as reg:
        yield reg


def test_bearer_token_auth(fake: FakeRegistry, store: BlobStore) -> None:
    fake.auth, fake.credentials = "bearer", ("alice", "s3cret")
    digest = fake.add_image("v1", CONFIG, [LAYER])
    img = pull(f"127.0.0.1:{fake.port}/team/app:v1", store,
               username="alice", password="s3cret")
    assert img.manifest_digest == digest and img.config.env == ("FAKE=1",)
    assert store.has(digest_of(LAYER))
    # one token, fetched with the credentials for this repository, reused afterwards
    [token_req] = fake.token_requests
    assert "scope=repository%3Ateam%2Fapp%3Apull" in token_req.path
    assert token_req.headers["authorization"].startswith("Basic ")
    assert [s.headers.get("authorization") for s in fake.seen] == [
        None, "Bearer fake-token-123", "Bearer fake-token-123", "Bearer fake-token-123"]


def test_bearer_auth_refused(fake: FakeRegistry, store: BlobStore) -> None:
    fake.auth, fake.credentials = "bearer", ("alice", "s3cret")
    fake.add_image("v1", CONFIG, [LAYER])
    with pytest.raises(RegistryError, match="refused the credentials"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store, username="alice", password="nope")
    with pytest.raises(RegistryError, match="refused anonymous access"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert store.digests() == []


def test_basic_auth(fake: FakeRegistry, store: BlobStore) -> None:
    fake.auth, fake.credentials = "basic", ("bob", "pw")
    digest = fake.add_image("v1", CONFIG, [LAYER])
    with pytest.raises(RegistryError, match="requires a username and password"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert pull(f"127.0.0.1:{fake.port}/team/app:v1", store, username="bob",
                password="pw").manifest_digest == digest


def test_redirect_does_not_leak_authorization(fake: FakeRegistry, store: BlobStore) -> None:
    with FakeRegistry() as storage:
        fake.auth = "bearer"
        fake.add_image("v1", CONFIG, [LAYER])
        storage.add_image("v1", CONFIG, [LAYER])
        fake.redirect_blobs = f"http://localhost:{storage.port}"  # another origin
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
        assert len(storage.blob_requests()) == 2
        assert all("authorization" not in s.headers for s in storage.blob_requests())
        assert all(s.headers.get("authorization") for s in fake.blob_requests())
    assert store.has(digest_of(LAYER)) and store.has(digest_of(CONFIG))


@pytest.mark.parametrize("delta", [-100, +100])
def test_registry_lying_about_size(fake: FakeRegistry, store: BlobStore, delta: int) -> None:
    manifest = fake.add_image("v1", CONFIG, [LAYER], sizes=[len(LAYER) + delta])
    with pytest.raises(DigestMismatch, match="bytes"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert not store.has(digest_of(LAYER)) and not store.has(manifest)
    assert_clean(store)


def test_registry_lying_about_content(fake: FakeRegistry, store: BlobStore) -> None:
    manifest = fake.add_image("v1", CONFIG, [LAYER])
    fake.blobs[digest_of(LAYER)] = LAYER[:-1] + b"X"  # right size, wrong bytes
    with pytest.raises(DigestMismatch, match=digest_of(LAYER)):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert not store.has(digest_of(LAYER)) and not store.has(manifest)
    assert store.digests() == [digest_of(CONFIG)]  # verified before the layer failed
    assert_clean(store)


def test_manifest_digest_checked(fake: FakeRegistry, store: BlobStore) -> None:
    digest = fake.add_image("v1", CONFIG, [LAYER])
    fake.manifest_headers["Docker-Content-Digest"] = "sha256:" + "1" * 64
    with pytest.raises(DigestMismatch, match="the registry says"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    fake.manifest_headers.clear()
    fake.manifests[digest] = oci_manifest(CONFIG, [])  # other content under that digest
    with pytest.raises(DigestMismatch, match="hashes to"):
        pull(f"127.0.0.1:{fake.port}/team/app@{digest}", store)
    assert store.digests() == []


def test_unknown_media_types(fake: FakeRegistry, store: BlobStore) -> None:
    fake.add_image("weird", CONFIG, [LAYER], media_type="application/vnd.example.thing+json")
    with pytest.raises(ImageInvalid, match="unsupported manifest media type"):
        pull(f"127.0.0.1:{fake.port}/team/app:weird", store)
    fake.add_image("helm", CONFIG, [LAYER], layer_type="application/vnd.cncf.helm.chart")
    with pytest.raises(ImageInvalid, match="unsupported media type"):
        pull(f"127.0.0.1:{fake.port}/team/app:helm", store)
    assert store.digests() == []


def test_oversized_manifest(fake: FakeRegistry, store: BlobStore) -> None:
    fake.manifests["huge"] = b"{" + b" " * MAX_MANIFEST_BYTES + b"}"
    with pytest.raises(ImageTooLarge):
        pull(f"127.0.0.1:{fake.port}/team/app:huge", store)


def test_interrupted_download_resumes(fake: FakeRegistry, store: BlobStore) -> None:
    fake.add_image("v1", CONFIG, [LAYER])
    fake.truncate[digest_of(LAYER)] = 2000
    with pytest.raises(RegistryError, match="layer"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    partial = store.partial_path(digest_of(LAYER))
    assert partial.read_bytes() == LAYER[:2000]  # kept for the next try
    assert not store.has(digest_of(LAYER))
    pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert fake.blob_requests()[-1].headers["range"] == "bytes=2000-"
    assert store.path(digest_of(LAYER)).read_bytes() == LAYER
    assert_clean(store)


def test_range_ignored_and_bad_partial(fake: FakeRegistry, store: BlobStore) -> None:
    fake.add_image("v1", CONFIG, [LAYER])
    partial = store.partial_path(digest_of(LAYER))
    partial.write_bytes(LAYER[:1000])
    fake.ignore_range = True  # answers 200 with the whole blob
    pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert store.path(digest_of(LAYER)).read_bytes() == LAYER
    store.remove(digest_of(LAYER))
    fake.ignore_range = False
    partial.write_bytes(b"garbage" * 100)  # a wrong start: resumed, fails, restarts
    pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    ranges = [s.headers.get("range") for s in fake.blob_requests()
              if s.path.endswith(digest_of(LAYER))]
    assert ranges == ["bytes=1000-", "bytes=700-", None]
    assert store.path(digest_of(LAYER)).read_bytes() == LAYER
    assert_clean(store)


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names under ``.test`` resolve to 127.0.0.1 (a registry that is not loopback by
    name, reached on loopback); every other name but localhost fails to resolve."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.endswith(".test"):
            return real("127.0.0.1", port, *args, **kw)
        if name in ("localhost", "127.0.0.1", "::1"):
            return real(host, port, *args, **kw)
        raise socket.gaierror(socket.EAI_NONAME, f"{name} is not resolved in tests")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_plain_http_only_for_loopback_or_insecure(
        store: BlobStore, sent: list[tuple[httpx.Request, int]], pinned: None) -> None:
    with FakeRegistry() as fake:
        digest = fake.add_image("v1", CONFIG, [LAYER])
        ref = f"reg.test:{fake.port}/team/app:v1"
        with pytest.raises(RegistryError, match="insecure_registries"):
            pull(ref, store)  # TLS to a plain-HTTP server: refused, nothing sent in clear
        assert fake.seen == []
        assert str(sent[0][0].url).startswith(f"https://reg.test:{fake.port}/")
        assert pull(ref, store, insecure_registries=[f"reg.test:{fake.port}"]
                    ).manifest_digest == digest
        assert fake.seen


def test_remote_registry_cannot_send_the_puller_to_loopback(
        store: BlobStore, pinned: None) -> None:
    with FakeRegistry() as fake, FakeRegistry() as local:
        fake.add_image("v1", CONFIG, [LAYER])
        local.add_image("v1", CONFIG, [LAYER])
        ref, insecure = f"reg.test:{fake.port}/team/app:v1", [f"reg.test:{fake.port}"]
        fake.redirect_blobs = f"http://127.0.0.1:{local.port}"   # a local service
        with pytest.raises(RegistryError, match="refusing to follow a redirect"):
            pull(ref, store, insecure_registries=insecure)
        assert local.seen == []
        fake.redirect_blobs = None
        fake.auth, fake.token_realm = "bearer", f"http://localhost:{local.port}/token"
        with pytest.raises(RegistryError, match="token realm"):
            pull(ref, store, insecure_registries=insecure)
        assert local.token_requests == []
        # a loopback service the user lists as insecure is theirs to allow
        assert pull(ref, store, insecure_registries=[*insecure, f"localhost:{local.port}"])
        assert len(local.token_requests) == 1
    assert store.has(digest_of(LAYER))


def test_credentials_go_only_to_the_registrys_own_token_realm(
        fake: FakeRegistry, store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeRegistry() as other:   # another origin (localhost vs 127.0.0.1, another port)
        fake.auth, fake.token_realm = "bearer", f"http://localhost:{other.port}/token"
        fake.add_image("v1", CONFIG, [LAYER])
        ref = f"127.0.0.1:{fake.port}/team/app:v1"
        with pytest.raises(RegistryError, match=rf"not its own origin.*localhost:{other.port}"):
            pull(ref, store, username="alice", password="s3cret")
        assert other.token_requests == []
        # anonymous: nothing to leak, any realm the URL rules allow
        assert pull(ref, store).manifest_digest
        assert "authorization" not in other.token_requests[-1].headers
        # named by the user (option or environment): the credentials go there
        pull(ref, store, username="alice", password="s3cret",
             token_realms=[f"localhost:{other.port}"])
        assert other.token_requests[-1].headers["authorization"].startswith("Basic ")
        monkeypatch.setenv("SANDVM_REGISTRY_TOKEN_REALMS",
                           f"example.invalid, localhost:{other.port}")
        pull(ref, store, username="alice", password="s3cret")
        assert len(other.token_requests) == 3


# ---------------------------------------------------------------- declared sizes


def test_declared_blob_sizes_are_capped_before_download(
        fake: FakeRegistry, store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.add_image("v1", CONFIG, [LAYER])
    monkeypatch.setenv("SANDVM_MAX_BLOB_BYTES", str(len(LAYER) - 1))
    with pytest.raises(ImageTooLarge, match="SANDVM_MAX_BLOB_BYTES"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert fake.blob_requests() == [] and store.digests() == []
    monkeypatch.setenv("SANDVM_MAX_BLOB_BYTES", "lots")
    with pytest.raises(ConfigError, match="SANDVM_MAX_BLOB_BYTES"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    monkeypatch.delenv("SANDVM_MAX_BLOB_BYTES")
    assert pull(f"127.0.0.1:{fake.port}/team/app:v1", store).manifest_digest


def test_declared_blob_sizes_are_checked_against_free_disk(
        fake: FakeRegistry, store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.statvfs(store.root)
    free = st.f_bavail * st.f_frsize
    monkeypatch.setenv("SANDVM_MAX_BLOB_BYTES", str(1 << 62))
    fake.add_image("v1", CONFIG, [LAYER, LAYER + b"x"], sizes=[len(LAYER), free])
    with pytest.raises(ImageTooLarge, match="bytes free"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert fake.blob_requests() == [] and store.digests() == []


def test_docker_hub_default(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    urls: list[str] = []

    def offline(self: httpx.Client, request: httpx.Request, **kw: Any) -> httpx.Response:
        urls.append(str(request.url))
        raise httpx.ConnectError("no network in this test", request=request)

    monkeypatch.setattr(httpx.Client, "send", offline)
    with pytest.raises(RegistryError, match=r"docker\.io"):
        pull("alpine", store)
    assert urls == ["https://registry-1.docker.io/v2/library/alpine/manifests/latest"]


# ---------------------------------------------------------------- hostile JSON

DEEP = b"{\"a\":" + b"[" * 20_000 + b"]" * 20_000 + b"}"   # 40 kB, past any recursion limit


def test_deeply_nested_json_from_a_registry_is_invalid(fake: FakeRegistry,
                                                       store: BlobStore) -> None:
    fake.manifests["deep"] = DEEP
    with pytest.raises(ImageInvalid, match="too deeply"):
        pull(f"127.0.0.1:{fake.port}/team/app:deep", store)
    # an error body is only read for its message: a deep one is ignored
    fake.error_body = DEEP
    with pytest.raises(ImageNotFound, match="'missing' not found"):
        pull(f"127.0.0.1:{fake.port}/team/app:missing", store)
    fake.error_body = None
    fake.auth, fake.token_body = "bearer", DEEP
    fake.add_image("v1", CONFIG, [LAYER])
    with pytest.raises(RegistryError, match=r"token server .* sent garbage.*too deeply"):
        pull(f"127.0.0.1:{fake.port}/team/app:v1", store)
    assert store.digests() == []
