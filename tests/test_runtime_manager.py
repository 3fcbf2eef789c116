"""Managed sandboxes: outliving their creator, tickets, TTLs, repair after SIGKILL, CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandvm.errors import SandboxStateError
from sandvm.runtime.journal import Journal
from sandvm.runtime.manager import SandboxManager, keeper_alive

pytestmark = pytest.mark.qemu
SANDVM = [sys.executable, "-m", "sandvm.cli"]


@pytest.fixture
def journal_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    path = tmp_path / "journal.db"
    monkeypatch.setenv("SANDVM_JOURNAL", str(path))
    return {**os.environ, "SANDVM_JOURNAL": str(path)}


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SANDVM, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _gone(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "Z"


def _wait_gone(pid: int | None, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_cli_sandbox_lives_across_invocations(journal_env: dict[str, str]) -> None:
    r = _cli(journal_env, "create", "--ttl", "120")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    assert sid.startswith("sb-")
    assert _cli(journal_env, "exec", sid, "--", "sh", "-c", "echo kept > /root/f").returncode == 0
    r = _cli(journal_env, "exec", sid, "--", "cat", "/root/f")
    assert (r.returncode, r.stdout) == (0, "kept\n"), r.stderr
    r = _cli(journal_env, "exec", sid, "--", "sh", "-c", "exit 7")
    assert r.returncode == 7
    ls = _cli(journal_env, "ls")
    assert sid in ls.stdout and "running" in ls.stdout
    logs = _cli(journal_env, "logs", sid).stdout
    for op in ("create", "attach", "detach"):
        assert op in logs
    rec = Journal().get(sid)
    assert rec is not None and rec.rundir and Path(rec.rundir).is_dir()
    r = _cli(journal_env, "kill", sid)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(rec.qemu_pid) and _wait_gone(rec.keeper_pid)
    assert not Path(rec.rundir).exists()
    ended = _cli(journal_env, "ls", "--all").stdout
    assert sid in ended and "killed" in ended
    r = _cli(journal_env, "exec", sid, "--", "true")
    assert r.returncode != 0 and "ended" in r.stderr


def test_ticket_reclaims_once_in_another_process(journal_env: dict[str, str]) -> None:
    async def make() -> tuple[str, str]:
        m = SandboxManager()
        sb = await m.create(ttl=120)
        await sb.files.write("/root/mine", "from the creator")
        with pytest.raises(SandboxStateError, match="not created detachable"):
            # a plain sandbox cannot be detached
            from sandvm import AsyncSandbox

            plain = await AsyncSandbox.create()
            try:
                await m.detach(plain)
            finally:
                await plain.kill()
        ticket = await m.detach(sb)
        with pytest.raises(SandboxStateError, match="detached"):
            await sb.commands.run("true")
        return sb.sandbox_id, ticket

    sid, ticket = asyncio.run(make())
    code = ("import asyncio, sys\n"
            "from sandvm.runtime.manager import SandboxManager\n"
            "async def main():\n"
            "    sb = await SandboxManager().reclaim(sys.argv[1])\n"
            "    print((await sb.files.read('/root/mine')), sb.sandbox_id)\n"
            "    await SandboxManager().detach(sb)\n"
            "asyncio.run(main())\n")
    r = subprocess.run([sys.executable, "-c", code, ticket], capture_output=True, text=True,
                       env=journal_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["from", "the", "creator", sid]
    m = SandboxManager()
    for bad in (ticket, "sbt_forged-ticket", "not-a-ticket"):
        with pytest.raises(SandboxStateError, match="ticket"):
            asyncio.run(m.reclaim(bad))
    rec = m.journal.get(sid)
    assert rec is not None and rec.state == "running"
    asyncio.run(m.kill(sid))
    assert _wait_gone(rec.keeper_pid)


def test_ttl_expires_and_can_be_extended(journal_env: dict[str, str]) -> None:
    m = SandboxManager()

    async def make(ttl: float) -> str:
        sb = await m.create(ttl=ttl)
        await m.detach(sb)
        return sb.sandbox_id

    short, extended = asyncio.run(make(2.0)), asyncio.run(make(2.0))
    m.set_ttl(extended, 120)
    rec = m.journal.get(short)
    assert rec is not None
    assert _wait_gone(rec.keeper_pid, 15) and _gone(rec.qemu_pid)
    ended = m.journal.get(short)
    assert ended is not None and ended.state == "ended" and "expired" in (ended.end_reason or "")
    assert rec.rundir and not Path(rec.rundir).exists()
    ops = [e["op"] for e in m.journal.events(short)]
    assert "expire" in ops
    alive = m.journal.get(extended)
    assert alive is not None and alive.state == "running" and keeper_alive(alive)
    asyncio.run(m.kill(extended))


def test_gc_repairs_a_sandbox_whose_keeper_was_killed(journal_env: dict[str, str]) -> None:
    m = SandboxManager()

    async def make() -> str:
        sb = await m.create(ttl=120)
        await m.detach(sb)
        return sb.sandbox_id

    sid = asyncio.run(make())
    rec = m.journal.get(sid)
    assert rec is not None and rec.keeper_pid is not None
    os.kill(rec.keeper_pid, signal.SIGKILL)
    assert _wait_gone(rec.keeper_pid) and _wait_gone(rec.qemu_pid)  # PDEATHSIG
    r = _cli(journal_env, "gc")
    assert r.returncode == 0 and f"repaired {sid}" in r.stdout
    fixed = m.journal.get(sid)
    assert fixed is not None and fixed.state == "ended"
    assert "repair-needed" in (fixed.end_reason or "")
    assert rec.rundir and not Path(rec.rundir).exists()
    assert m.gc() == []  # nothing twice


CREATOR = """
import asyncio, sys
from sandvm.runtime.manager import SandboxManager
async def main():
    m = SandboxManager()
    sb = await m.create(ttl=120)
    await sb.commands.run("echo hi > /root/f")
    print(sb.sandbox_id, await m.detach(sb), flush=True)
    await asyncio.sleep(30)
print("ready", flush=True)
asyncio.run(main())
"""


def test_killing_the_managing_process_anywhere_leaks_nothing(
        journal_env: dict[str, str]) -> None:
    """SIGKILL the process that creates a sandbox at spread-out points (before the
    keeper exists, while the VM boots, while it runs a command, after it detached):
    afterwards every sandbox is either reattachable and works, or repaired with
    nothing left behind — no QEMU, no runtime or disk dir."""
    import random

    rng = random.Random(7)
    try:
        _kill_creators(journal_env, rng)
    finally:  # whatever fails below, no VM outlives the test
        cleanup = SandboxManager()
        for r in cleanup.journal.sandboxes():
            asyncio.run(cleanup.kill(r.id))


def _kill_creators(journal_env: dict[str, str], rng: Any) -> None:
    from sandvm.providers.qemu import disk_root
    from sandvm.providers.qemu import runtime_root as rt_root

    for delay in (0.0, 0.4, 1.5, rng.uniform(2.5, 4.0), 9.0):  # after its imports
        p = subprocess.Popen([sys.executable, "-c", CREATOR], env=journal_env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        time.sleep(delay)
        p.kill()
        p.wait()
    time.sleep(1.0)  # let keepers that were mid-start settle
    m = SandboxManager()
    m.gc(starting_grace=0.0)
    records = m.journal.sandboxes(include_ended=True)
    assert 4 <= len(records) <= 5  # one killed before its first write leaves none
    live = [r for r in records if r.state != "ended"]
    for r in records:
        if r.state == "ended":
            assert not keeper_alive(r) and _gone(r.qemu_pid)
            for d in (r.rundir, r.diskdir):
                assert not d or not Path(d).exists(), d
    for r in live:  # the VM outlived its creator: take it over, use it, end it
        assert keeper_alive(r)
        sb = asyncio.run(_use_and_kill(m, r.id))
        assert sb == "ok"
    # nothing of ours is left on the host
    owners = [d for d in rt_root().iterdir() if (d / "owner").exists()] + \
        [d for d in disk_root().iterdir() if (d / "owner").exists()]
    mine = {Path(r.rundir).name for r in records if r.rundir} | \
        {Path(r.diskdir).name for r in records if r.diskdir}
    assert not [d for d in owners if d.name in mine]
    for r in m.journal.sandboxes(include_ended=True):
        assert r.state == "ended" and _wait_gone(r.qemu_pid) and _wait_gone(r.keeper_pid)


async def _use_and_kill(m: SandboxManager, sid: str) -> str:
    sb = await m.attach(sid)
    try:
        out = (await sb.commands.run("echo ok")).stdout.strip()
    finally:
        await m.detach(sb)
        await m.kill(sid)
    return out
