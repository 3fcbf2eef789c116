"""Shared fixtures. Tests marked ``qemu`` need `make setup` (QEMU + guest assets)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from sandvm.errors import AssetMissing

# tests that do not name an image expect `base`, even where `debian` was built
os.environ.setdefault("SANDVM_DEFAULT_IMAGE", "base")

# VMs' runtime dirs in a tmpfs dir of this test session's own: tests that check that
# nothing is left behind see only their own VMs, whatever else runs on the machine
if "SANDVM_RUNTIME_DIR" not in os.environ:
    _RUNTIME = tempfile.mkdtemp(prefix="sandvm-tests-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.environ["SANDVM_RUNTIME_DIR"] = _RUNTIME
    atexit.register(shutil.rmtree, _RUNTIME, ignore_errors=True)

# tests touch only this machine: every egress proxy (in this process, and in the CLIs
# and servers it starts) refuses upstream connections and DNS lookups that could leave
# it, and notes them in this file; the autouse guard below fails the test that made one
if "SANDVM_EGRESS_LOOPBACK_ONLY" not in os.environ:
    _fd, _GUARD = tempfile.mkstemp(prefix="sandvm-egress-guard-")
    os.close(_fd)
    os.environ["SANDVM_EGRESS_LOOPBACK_ONLY"] = _GUARD
    atexit.register(lambda: os.path.exists(_GUARD) and os.unlink(_GUARD))


@pytest.fixture(autouse=True)
def _egress_stays_on_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a test whose egress proxy connected (or tried to connect, or to resolve a
    name through the system resolver) anywhere but loopback."""
    import ipaddress
    from pathlib import Path

    from sandvm import egress

    guard = Path(os.environ["SANDVM_EGRESS_LOOPBACK_ONLY"])
    before = guard.stat().st_size if guard.exists() else 0
    seen: list[str] = []
    connect = egress.open_upstream

    async def watched(address: str, port: int) -> object:
        r, w = await connect(address, port)
        peer = w.get_extra_info("peername")
        if peer and not ipaddress.ip_address(peer[0]).is_loopback:
            seen.append(f"egress connected to {peer[0]}:{peer[1]}")
        return r, w

    monkeypatch.setattr(egress, "open_upstream", watched)
    yield
    if guard.exists() and guard.stat().st_size > before:
        with guard.open() as f:
            f.seek(before)
            seen.extend(f.read().splitlines())
    if seen:
        pytest.fail("this test's egress left loopback: " + "; ".join(seen[:5]))


def require(condition: object, reason: str) -> None:
    """For a test that needs something of this machine (a tool, an address, a mirror):
    skip it when ``condition`` is false, but under CI (env ``CI`` set; `.ci/run` sets
    it) fail instead, since CI's set-up provides everything and a skip there would
    hide a broken set-up. ``reason`` says what is missing and how to get it."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI no test may skip: whatever a skip's reason (a `skipif`, an
    `importorskip`, a `pytest.skip` that does not go through ``require``), CI's set-up
    was meant to provide it, so the skip is reported as a failure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (CI={os.environ['CI']}): {why}"


def _assets_ok() -> str | None:
    from sandvm.assets import find_assets

    try:
        find_assets()
    except AssetMissing as exc:
        return exc.message
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if any("qemu" in item.keywords for item in items):
        reason = _assets_ok()
    if reason is None:
        return
    if os.environ.get("CI"):
        # in CI the guest assets are part of the set-up: missing ones are a failure
        raise pytest.UsageError(f"QEMU tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"needs `make setup`: {reason}")
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def snapshot_store(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A snapshot store private to this test session."""
    from sandvm.snapshots import SnapshotStore

    return SnapshotStore(tmp_path_factory.mktemp("snapshots"))


@pytest.fixture(scope="session")
def base_snapshot(snapshot_store: object) -> object:
    """A snapshot of a freshly booted sandbox (taken once per session)."""
    from sandvm import Sandbox

    sb = Sandbox.create()
    return sb.snapshot("base", stop=True, store=snapshot_store)  # type: ignore[arg-type]


@pytest.fixture(scope="session", params=["cold", "restored"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[object]:
    """A sandbox shared by the integration tests: cold-booted, or restored from a
    snapshot. Every test that uses it runs on both, so restore cannot drift from boot."""
    from sandvm import Sandbox

    if request.param == "cold":
        sb = Sandbox.create()
    else:
        snap = request.getfixturevalue("base_snapshot")
        store = request.getfixturevalue("snapshot_store")
        sb = Sandbox.from_snapshot(snap, store=store)
    sb.kind = request.param  # type: ignore[attr-defined]
    try:
        yield sb
    finally:
        sb.kill()


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """A self-signed certificate (and key) for the egress tests' names."""
    from egress_servers import make_cert

    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def https(cert: tuple[object, object]) -> Iterator[object]:
    """An HTTPS server on 127.0.0.1 with that certificate (it says "hello from https-1")."""
    from egress_servers import HttpServer

    with HttpServer("127.0.0.1", tls=cert, label="https-1") as s:  # type: ignore[arg-type]
        yield s


@pytest.fixture
def memory_app(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A factory of in-process servers (Starlette's TestClient, no sockets) whose
    sandboxes are in-memory VMs (``create_app(provider=InMemoryVmProvider())``), on a
    private state dir, journal and runtime dir: ``make(**ServerConfig settings)``
    returns ``(client, keys)``, the client running (lifespan) until the test ends and
    ``keys`` the API keys of tenants alice and bob. For tests of what the server
    decides, without QEMU (see tests/test_server_fake.py)."""
    import warnings
    from pathlib import Path

    from sandvm.providers.memory import InMemoryVmProvider
    from sandvm.server import ServerConfig, ServerStore, create_app

    with warnings.catch_warnings():  # it would rather have httpx2, which is not installed
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    tmp = Path(str(tmp_path))
    (tmp / "run").mkdir(mode=0o700, exist_ok=True)
    monkeypatch.setenv("SANDVM_HOME", str(tmp / "home"))
    monkeypatch.setenv("SANDVM_RUNTIME_DIR", str(tmp / "run"))
    monkeypatch.setenv("SANDVM_JOURNAL", str(tmp / "journal.db"))
    monkeypatch.delenv("SANDVM_SERVER_DIR", raising=False)
    clients: list[TestClient] = []

    def make(**settings: object) -> tuple[TestClient, dict[str, str]]:
        config = ServerConfig(state_dir=tmp / "state", **settings)  # type: ignore[arg-type]
        store = ServerStore(config.state_dir)
        keys = {t: store.create_key(f"{t}-{len(clients)}", tenant=t) for t in ("alice", "bob")}
        store.close()
        client = TestClient(create_app(config, provider=InMemoryVmProvider()),
                            base_url="http://127.0.0.1")
        client.__enter__()  # runs the app's startup (the service)
        clients.append(client)
        return client, keys

    yield make
    for c in clients:
        c.__exit__(None, None, None)
