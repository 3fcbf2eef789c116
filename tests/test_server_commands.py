"""Background commands over HTTP, through `sandvm serve` and the real client: start by
id, stream from any offset, reconnect, stdin, signals, status, tenancy.

The server and alice's sandbox are this module's own (the fixtures of test_server).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from sandvm import (
    CommandExitError,
    CommandTimeout,
    InvalidSpec,
    SandboxStateError,
    ServiceError,
    VmNotFound,
)
from sandvm.client import CommandHandle, Sandbox
from test_server import ServerProc, _auth, alice_sb, server, until  # noqa: F401

pytestmark = pytest.mark.qemu



def test_background_run_wait_and_status(alice_sb: Sandbox) -> None:  # noqa: F811
    seen: list[str] = []
    h = alice_sb.commands.run("for i in 1 2 3; do echo $i; sleep 0.3; done; echo e >&2",
                              background=True, on_stdout=seen.append)
    assert isinstance(h, CommandHandle) and h.command_id.startswith("cmd-")
    assert isinstance(h.pid, int) and h.pid > 0
    assert h.info().state == "running"
    until(lambda: "1\n" in h.stdout, "the first line")  # streamed while it runs
    r = h.wait()
    assert (r.exit_code, r.stdout, r.stderr) == (0, "1\n2\n3\n", "e\n")
    assert "".join(seen) == "1\n2\n3\n"
    info = h.info()
    assert (info.state, info.exit_code, info.stdin_open) == ("exited", 0, False)
    assert h.command_id in [c.command_id for c in alice_sb.commands.list()]
    bad = alice_sb.commands.run("echo no >&2; exit 5", background=True)
    with pytest.raises(CommandExitError) as ei:
        bad.wait()
    assert ei.value.exit_code == 5 and ei.value.stderr == "no\n"
    late = alice_sb.commands.run("sleep 30", background=True, timeout=1, check=False)
    with pytest.raises(CommandTimeout) as ti:
        late.wait()
    assert ti.value.result is not None and ti.value.result.timed_out
    h.kill()  # ended: a no-op, as locally
    h.send_signal("SIGTERM")


def test_stdin_chunks_and_close(alice_sb: Sandbox) -> None:  # noqa: F811
    h = alice_sb.commands.run("cat; echo done", background=True)
    h.send_stdin("hello ")
    h.send_stdin(b"\x00\xffworld")
    h.send_stdin(b"z" * (700 << 10))  # over one request's chunk: sent in pieces
    until(lambda: "hello" in h.stdout, "the echoed input")
    h.close_stdin()
    r = h.wait()
    assert r.stdout_bytes == b"hello \x00\xffworld" + b"z" * (700 << 10) + b"done\n"
    with pytest.raises(SandboxStateError):  # it ended
        h.send_stdin("late")
    h.close_stdin()  # a no-op
    fed = alice_sb.commands.run("cat", background=True, stdin=b"given")
    assert fed.wait().stdout == "given"  # stdin= is the whole input, closed after it
    assert not fed.info().stdin_open
    shut = alice_sb.commands.run("cat; echo eof; sleep 30", background=True, check=False)
    shut.close_stdin()
    until(lambda: shut.stdout == "eof\n", "cat to end")
    with pytest.raises(SandboxStateError, match="closed"):  # running, its stdin closed
        shut.send_stdin("x")
    shut.kill()
    assert shut.wait().stdout == "eof\n"


def test_signals_interrupt_terminate_kill(alice_sb: Sandbox) -> None:  # noqa: F811
    trap = "trap 'echo got-$S; exit 7' %s; echo ready; while :; do sleep 0.1; done"
    for sig, name in (("SIGINT", "INT"), ("SIGTERM", "TERM"), (1, "HUP")):
        h = alice_sb.commands.run(f"S={name}; " + trap % name, background=True,
                                  check=False)
        until(lambda h=h: "ready" in h.stdout, "ready")  # type: ignore[misc]
        h.send_signal(sig)
        r = h.wait()
        assert (r.exit_code, r.stdout) == (7, f"ready\ngot-{name}\n"), sig
    h = alice_sb.commands.run("echo $$; sleep 60", background=True)
    until(lambda: h.stdout, "the pid")
    h.kill()
    with pytest.raises(CommandExitError) as ei:
        h.wait()
    assert ei.value.result.signal == 9
    stubborn = alice_sb.commands.run("trap '' TERM; echo ready; sleep 60", background=True,
                                     check=False)
    until(lambda: "ready" in stubborn.stdout, "ready")
    stubborn.send_signal("SIGTERM", grace=0.5)  # ignored, then SIGKILL after the grace
    assert stubborn.wait().signal == 9
    with pytest.raises(InvalidSpec, match="unknown signal"):
        stubborn.send_signal("SIGNOPE")


def test_reconnect_after_dropping_the_client(server: ServerProc,  # noqa: F811
                                             alice_sb: Sandbox) -> None:  # noqa: F811
    sb = Sandbox.connect(alice_sb.sandbox_id, api_key=server.alice, url=server.url)
    h = sb.commands.run("echo start; sleep 1.5; echo end; cat", background=True)
    cid = h.command_id
    until(lambda: h.stdout == "start\n", "start")
    sb.close()  # the client goes away; the command runs on
    with pytest.raises(SandboxStateError, match="closed"):
        h.wait()
    again = Sandbox.connect(alice_sb.sandbox_id, api_key=server.alice, url=server.url)
    h2 = again.commands.connect(cid)
    assert h2.pid == h.pid
    until(lambda: "end" in h2.stdout, "end")
    h2.send_stdin("more")  # its stdin is still open
    h2.close_stdin()
    r = h2.wait()
    assert r.stdout == "start\nend\nmore"  # everything, from the first byte
    again.close()
    # over raw HTTP: from any offset, without following, as often as wanted
    url = f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/commands/{cid}/output"
    lines = [json.loads(x) for x in httpx.get(url, headers=_auth(server.alice)).text.split()]
    assert [e["seq"] for e in lines] == list(range(len(lines)))
    assert lines[-1]["type"] == "exit" and lines[-1]["exit_code"] == 0
    tail = httpx.get(url, params={"offset": len(lines) - 1}, headers=_auth(server.alice))
    assert [json.loads(x) for x in tail.text.split()] == lines[-1:]


def test_a_dropped_output_stream_leaves_the_command_running(
        server: ServerProc, alice_sb: Sandbox) -> None:  # noqa: F811
    h = alice_sb.commands.run("echo go; sleep 2; echo still", background=True)
    url = (f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/commands/{h.command_id}"
           "/output")
    with httpx.stream("GET", url, headers=_auth(server.alice)) as r:
        first = json.loads(next(r.iter_lines()))
        assert first == {"seq": 0, "type": "stdout", "text": "go\n"}
    assert h.wait().stdout == "go\nstill\n"
    live = httpx.get(url, params={"follow": "false"}, headers=_auth(server.alice))
    assert live.status_code == 200 and live.text.count("\n") == 3


def test_output_buffer_is_bounded(alice_sb: Sandbox) -> None:  # noqa: F811
    h = alice_sb.commands.run("head -c 3000000 /dev/zero | tr '\\0' a; echo", background=True)
    r = h.wait()  # followed as it ran: all of it
    assert len(r.stdout) == 3_000_001 and not r.output_truncated
    late = alice_sb.commands.connect(h.command_id)  # the server kept only the last MiB
    r = late.wait()
    assert r.output_truncated and 0 < len(r.stdout) <= (1 << 20) + (64 << 10)
    assert r.stdout.endswith("a\n")
    info = late.info()
    assert info.next_seq > 0


def test_commands_belong_to_their_tenant(server: ServerProc,  # noqa: F811
                                         alice_sb: Sandbox) -> None:  # noqa: F811
    h = alice_sb.commands.run("sleep 30", background=True)
    base = f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/commands"
    with httpx.Client(timeout=30) as c:
        for method, suffix, kw in (
                ("GET", "", {}), ("GET", "/output", {}), ("POST", "/stdin", {"content": b"x"}),
                ("POST", "/stdin/close", {}), ("POST", "/signal", {"json": {"signal": 9}})):
            r = c.request(method, f"{base}/{h.command_id}{suffix}",
                          headers=_auth(server.bob), **kw)
            assert (r.status_code, r.json()["code"]) == (404, "vm_not_found"), suffix
            r = c.request(method, f"{base}/cmd-0000000000{suffix}",
                          headers=_auth(server.alice), **kw)
            assert (r.status_code, r.json()["code"]) == (404, "unknown_command"), suffix
            assert "no command" in r.json()["message"]
        r = c.get(base, headers=_auth(server.bob))
        assert r.status_code == 404
    assert h.info().state == "running"  # bob's signal never reached it
    with pytest.raises(ServiceError, match="no command"):
        alice_sb.commands.connect("cmd-0000000000")
    with pytest.raises(VmNotFound):
        Sandbox.connect(alice_sb.sandbox_id, api_key=server.bob, url=server.url)
    h.kill()
    with pytest.raises(CommandExitError):
        h.wait()
    assert h.info().state == "exited"


def test_a_sandbox_ending_mid_request_is_409_never_500(server: ServerProc,  # noqa: F811
                                                       alice_sb: Sandbox) -> None:  # noqa: F811
    """Found by schemathesis: a command racing the sandbox's TTL got 500
    agent_disconnected (the channel breaks before the journal says the VM ended)."""
    short = Sandbox.create(api_key=server.alice, url=server.url, timeout=3)
    bg = short.commands.run("sleep 60", background=True)
    h = _auth(server.alice)
    base = f"{server.url}/v1/sandboxes/{short.sandbox_id}"
    statuses: set[int] = set()
    errors: set[str] = set()
    with httpx.Client(timeout=30, headers=h) as c:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 409 not in statuses:
            for path in ("/commands/start", "/commands"):
                r = c.post(base + path, json={"cmd": "sleep 0.05"})
                statuses.add(r.status_code)
                if r.status_code == 200:
                    last = json.loads(r.text.strip().splitlines()[-1])
                    if last["type"] == "error":
                        errors.add(last["code"])
                elif r.status_code >= 400:
                    errors.add(r.json()["code"])
    assert 409 in statuses and max(statuses) < 500, statuses
    assert errors <= {"sandbox_state"}, errors
    with pytest.raises(SandboxStateError):  # the background command ended with it
        bg.wait()
    short.close()


def test_a_sandbox_keeps_at_most_32_commands(alice_sb: Sandbox) -> None:  # noqa: F811
    from sandvm import QuotaExceeded

    running = [c for c in alice_sb.commands.list() if c.state == "running"]
    handles = [alice_sb.commands.run("sleep 60", background=True, check=False)
               for _ in range(32 - len(running))]
    with pytest.raises(QuotaExceeded):  # 32 running: the server's cap
        alice_sb.commands.run("true", background=True)
    for h in handles:
        h.kill()
    for h in handles:
        assert h.wait().signal == 9
    again = alice_sb.commands.run("echo room", background=True)  # ended ones make room
    assert again.wait().stdout == "room\n"
    assert len(alice_sb.commands.list()) <= 32
