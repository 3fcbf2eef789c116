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


CHAOS = Path(__file__).with_name("runtime_chaos.py")


def test_sigkill_at_random_points_many_rounds(journal_env: dict[str, str]) -> None:
    """A managing process runs random operations (create, attach+use+detach, reclaim,
    set_ttl, kill, gc) and is SIGKILLed at a random moment inside one of them, round
    after round (each round aims at one kind of operation). After each kill a fresh
    manager's ``recover`` must leave: no unfinished operation, no QEMU without a live
    owner, every sandbox either running (its keeper, QEMU and dirs there, and it
    answers when taken over) or ended with nothing left behind."""
    import random
    import select

    rng = random.Random(2026)
    m = SandboxManager()
    cut: list[str] = []
    try:
        for round_, target in enumerate(["use", "create", "reclaim", "kill", "use", "ttl",
                                         "use", "reclaim", "create", "use"]):
            p = subprocess.Popen([sys.executable, str(CHAOS), str(round_)], env=journal_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert p.stdout is not None
            deadline = time.monotonic() + 25.0
            while time.monotonic() < deadline:
                if not select.select([p.stdout], [], [], 0.2)[0]:
                    continue
                line = p.stdout.readline()
                if line.startswith(f"op {target} "):
                    time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside it
                    cut.append(target)
                    break
            p.kill()
            _, err = p.communicate()
            assert "Traceback" not in err, err
            asyncio.run(_recover_and_check(m))
        assert len(cut) >= 8, cut  # the kills did land inside the operations aimed at
    finally:
        for r in m.journal.sandboxes():
            asyncio.run(m.kill(r.id))


async def _recover_and_check(m: SandboxManager) -> None:
    from sandvm.providers.qemu import orphaned_qemus, proc_start_time

    rec = await m.recover(starting_grace=0.0)
    assert m.journal.interrupted() == []
    assert orphaned_qemus() == []
    for r in m.journal.sandboxes(include_ended=True):
        if r.state == "ended":
            assert _wait_gone(r.keeper_pid) and _wait_gone(r.qemu_pid), r
            for d in (r.rundir, r.diskdir):
                assert not d or not Path(d).exists(), (r.id, d)
            assert r.id not in rec.live
            continue
        assert r.id in rec.live
        assert keeper_alive(r) and r.qemu_pid and proc_start_time(r.qemu_pid), r
        assert r.rundir and Path(r.rundir).is_dir()
        assert not m.journal.unfinished(r.id)
        sb = await m.attach(r.id)  # not busy: the holder died with its process
        try:
            out = (await sb.commands.run("cat /root/me")).stdout.strip()
            assert out == r.id
        finally:
            await m.detach(sb)
    for sid, _op in rec.interrupted:  # each was recorded, with its reason
        results = [e for e in m.journal.events(sid) if e["phase"] == "result"
                   and e["detail"].get("interrupted")]
        assert results


TORN = """
import asyncio, os, signal, sys
from sandvm import wire
from sandvm.runtime.manager import SandboxManager
async def main():
    sb = await SandboxManager().attach(sys.argv[1])
    # the guest is busy sending us lots of output when we die ...
    await sb.commands.run("head -c 200000000 /dev/zero", background=True,
                          on_stdout=lambda _: None)
    await asyncio.sleep(0.5)
    # ... and the last thing we sent is half a frame
    w = sb._vm.agent._writer
    w.write(wire.HEADER.pack(wire.MAGIC, wire.DATA, 1, 100_000) + b"x" * 777)
    await w.drain()
    print("torn", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


def test_reattach_after_a_holder_died_mid_frame(journal_env: dict[str, str]) -> None:
    """A process that held the sandbox died after sending half a frame, while the
    guest was streaming output to it: the next holder skips whatever the dead one left
    in the channel (both ways) and the sandbox works as before."""
    m = SandboxManager()

    async def make() -> str:
        sb = await m.create(ttl=120)
        await sb.files.write("/root/kept", "still here")
        await m.detach(sb)
        return sb.sandbox_id

    sid = asyncio.run(make())
    try:
        r = subprocess.run([sys.executable, "-c", TORN, sid], capture_output=True, text=True,
                           env=journal_env, timeout=120)
        assert r.stdout == "torn\n" and r.returncode == -signal.SIGKILL, r.stderr

        async def use() -> tuple[str, str]:
            sb = await m.attach(sid, wait=5.0)
            try:
                echo = (await sb.commands.run("echo ok")).stdout
                return echo, await sb.files.read("/root/kept")
            finally:
                await m.detach(sb)

        assert asyncio.run(use()) == ("ok\n", "still here")
        assert asyncio.run(use()) == ("ok\n", "still here")  # and again, cleanly
        rec = asyncio.run(m.recover())  # the dead holder had finished its attach
        assert rec.interrupted == () and sid in rec.live
    finally:
        asyncio.run(m.kill(sid))


def test_one_holder_at_a_time(journal_env: dict[str, str]) -> None:
    """A second process cannot take a sandbox another one holds: it gets SandboxBusy
    at once, or after waiting; the CLI waits (--busy-wait) and then goes ahead."""
    from sandvm.errors import SandboxBusy

    m = SandboxManager()

    async def scenario() -> str:
        sb = await m.create(ttl=120)
        sid = sb.sandbox_id
        with pytest.raises(SandboxBusy, match="in use by another process"):
            await m.attach(sid)
        t0 = time.monotonic()
        with pytest.raises(SandboxBusy):
            await m.attach(sid, wait=0.5)
        assert time.monotonic() - t0 >= 0.5
        r = await asyncio.to_thread(_cli, journal_env, "exec", "--busy-wait", "0", sid,
                                    "--", "true")
        assert r.returncode != 0 and "in use by another process" in r.stderr
        # a CLI exec that waits gets it once we let go
        cli = asyncio.create_task(asyncio.to_thread(
            _cli, journal_env, "exec", "--busy-wait", "60", sid, "--", "cat", "/root/me"))
        await sb.files.write("/root/me", "second holder")
        await asyncio.sleep(1.0)
        await m.detach(sb)
        r = await cli
        assert (r.returncode, r.stdout) == (0, "second holder"), r.stderr
        return sid

    sid = asyncio.run(scenario())
    asyncio.run(m.kill(sid))
