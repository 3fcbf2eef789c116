"""Schemathesis against the committed OpenAPI document, on a live `sandvm serve`.

Bounded: 12 examples per operation (``SANDVM_FUZZ_EXAMPLES`` for more), derandomized,
no shrinking; about 25 s. The fuzzing tenant's quota is one sandbox and that one
exists before the run, so a generated ``POST /v1/sandboxes`` never boots a VM (it is
refused: 429, or 4xx for bad input). Three cases in four name that sandbox instead of
a random id (and half of those a real background command), so the sandbox routes run
for real (commands, files, background commands) and not only their 404s; DELETE and a
short TTL never do. Every response must be under 500, have a documented status and
content type, and match its schema.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_server import ServerProc

pytestmark = pytest.mark.qemu
schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis import checks as st_checks  # noqa: E402

from sandvm.client import Sandbox  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("SANDVM_FUZZ_EXAMPLES", "12"))  # per operation; more: longer
# a tree upload's body is a tar stream: bytes, as the octet-stream uploads
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")
schema = schemathesis.openapi.from_path(REPO / "docs" / "openapi.json")
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance,
          st_checks.content_type_conformance, st_checks.response_schema_conformance,
          st_checks.response_headers_conformance]


class Target:
    def __init__(self, srv: ServerProc, sandbox_id: str, command_id: str) -> None:
        self.srv = srv
        self.sandbox_id = sandbox_id
        self.command_id = command_id


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    srv = ServerProc(tmp_path_factory.mktemp("fuzz"), max_sandboxes=1)
    r = srv.cli("key", "create", "fuzz")
    assert r.returncode == 0, r.stderr
    srv.alice = r.stdout.strip().splitlines()[-1]
    srv.start()
    sb = Sandbox.create(api_key=srv.alice, url=srv.url, timeout=600)
    cat = sb.commands.run("cat", background=True, timeout=600)  # stdin open, for stdin ops
    try:
        yield Target(srv, sb.sandbox_id, cat.command_id)
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
        srv.kill_sandboxes()


# operations that would stop the fuzzing sandbox answering (paused) or take its files
# away (a random path may be "/"): they get random ids, their real runs are tested
# in test_client_surface
STOPS_IT = ("/pause", "/files/rename", "/files/tmpfs", "/files/chown", "/files/tree")


def _keeps_it_alive(case: schemathesis.Case) -> bool:
    """Not a TTL that would end the fuzzing sandbox (its end would free the quota), nor
    an operation of STOPS_IT."""
    if case.path.endswith(STOPS_IT):
        return False
    if not case.path.endswith("/timeout"):
        return True
    t = case.body.get("timeout") if isinstance(case.body, dict) else None
    return not isinstance(t, (int, float)) or isinstance(t, bool) or t >= 300


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck),
                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
def test_api_conforms(case: schemathesis.Case, target: Target) -> None:
    params = case.path_parameters or {}
    coin = zlib.crc32(repr((params, case.body, case.query)).encode()) % 4
    if "sandbox_id" in params and case.method != "DELETE" and coin and _keeps_it_alive(case):
        params["sandbox_id"] = target.sandbox_id
        if "command_id" in params and coin > 1:
            params["command_id"] = target.command_id
            if case.path.endswith("/output"):  # `cat` runs on: what is buffered, no more
                case.query = {**(case.query or {}), "follow": "false"}
    checks = CHECKS
    if case.path.endswith("/wait"):  # ports/{port}/wait: 0.2 s, not up to 60
        if isinstance(case.body, dict):
            t = case.body.get("timeout", 30.0)  # absent: the default, 30 s
            if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0.2:
                case.body["timeout"] = 0.2
        # nothing listening in time is its documented 504 (port_timeout), no failure
        checks = [c for c in CHECKS if c is not st_checks.not_a_server_error]
    resp = case.call_and_validate(base_url=target.srv.url, checks=checks, timeout=30,
                                  headers={"Authorization": f"Bearer {target.srv.alice}"})
    assert resp.status_code < 500 or (case.path.endswith("/wait") and
                                      resp.status_code == 504), resp.text
    SEEN[(case.method, case.path, resp.status_code)] += 1


SEEN: Counter[tuple[str, str, int]] = Counter()


def test_the_run_reached_the_sandbox() -> None:
    """Not only 404s and 422s: the real sandbox answered (runs after the fuzzing)."""
    if not SEEN:
        pytest.skip("the fuzzing did not run")
    ok = {(m, p) for (m, p, status), n in SEEN.items() if status < 300}
    assert ("POST", "/v1/sandboxes/{sandbox_id}/commands") in ok, SEEN
    assert ("POST", "/v1/sandboxes/{sandbox_id}/commands/start") in ok, SEEN
