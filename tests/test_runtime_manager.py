"""Managed sandboxes: outliving their creator, tickets, TTLs, repair after SIGKILL, CLI."""

from __future__ import annotations

import asyncio
import contextlib
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
    # what the guest writes to its console is shown escaped: no terminal control reaches
    # the operator's terminal
    r = _cli(journal_env, "exec", sid, "--", "sh", "-c", r"printf '\033[2Jhostile\n' > /dev/ttyS0")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while "hostile" not in (logs := _cli(journal_env, "logs", sid).stdout):
        assert time.monotonic() < deadline, logs
        time.sleep(0.2)
    assert "\\x1b[2Jhostile" in logs and "\x1b" not in logs
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


def test_a_qemu_that_dies_under_its_live_keeper(journal_env: dict[str, str],
                                               base_snapshot: Any, snapshot_store: Any) -> None:
    """QEMU of a managed sandbox is SIGKILLed while its keeper lives (one sandbox held
    by this process, one detached): the keeper notices, records the end with the
    reason, removes the runtime and disk dirs and exits; the holder's next call fails
    with VmCrashed; nothing is left, and a later attach says the sandbox has ended."""
    from sandvm.errors import VmCrashed
    from sandvm.providers.qemu import orphaned_qemus

    m = SandboxManager()

    async def scenario() -> None:
        held = await m.from_snapshot(base_snapshot, store=snapshot_store, ttl=120)
        loose = await m.from_snapshot(base_snapshot, store=snapshot_store, ttl=120)
        await m.detach(loose)
        recs = [m.journal.get(sb.sandbox_id) for sb in (held, loose)]
        for r in recs:
            assert r is not None and keeper_alive(r) and r.qemu_pid
            os.kill(r.qemu_pid, signal.SIGKILL)
        with pytest.raises(VmCrashed, match="exited unexpectedly"):
            await held.commands.run("true")
        for r in recs:
            assert r is not None
            deadline = time.monotonic() + 30
            while (now := m.journal.get(r.id)) is not None and now.state != "ended":
                assert time.monotonic() < deadline, now
                await asyncio.sleep(0.05)
            assert now is not None and now.end_reason is not None
            assert "QEMU exited" in now.end_reason, now.end_reason
            assert _wait_gone(r.keeper_pid) and _wait_gone(r.qemu_pid)
            for d in (r.rundir, r.diskdir):
                assert not d or not Path(d).exists(), d
            with pytest.raises(SandboxStateError, match="has ended"):
                await m.attach(r.id)
            assert not m.journal.unfinished(r.id)
        await held.kill()  # closes our side; the sandbox is already gone
        rec = await m.recover()
        assert rec.live == () and rec.repaired == () and orphaned_qemus() == []

    asyncio.run(scenario())


SAVER = """
import asyncio, os, signal, sys
from sandvm.runtime.manager import SandboxManager
from sandvm.snapshots import SnapshotStore
async def main():
    sb = await SandboxManager().attach(sys.argv[1])
    vm = sb._vm
    migrate = vm._qmp
    async def qmp(cmd, args=None, **kw):  # die once QEMU is writing the state
        out = await migrate(cmd, args, **kw)
        if cmd == "migrate":
            print("saving", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    vm._qmp = qmp
    await sb.snapshot(store=SnapshotStore(sys.argv[2]))
asyncio.run(main())
"""


def test_attach_after_a_holder_died_while_qemu_saved_the_state(
        journal_env: dict[str, str], base_snapshot: Any, snapshot_store: Any,
        tmp_path: Path) -> None:
    """The holder died right after it started QEMU's save of the VM state (a snapshot,
    a fork): QEMU goes on writing it. The next holder must end that save before it lets
    the VM run, or QEMU stops the VM again once the save is done (the guest freezes
    under its new holder) and refuses every other save meanwhile."""
    m = SandboxManager()

    async def make() -> str:
        # restored: its RAM travels in the state stream, so the save takes a while
        sb = await m.from_snapshot(base_snapshot, store=snapshot_store, ttl=120)
        await m.detach(sb)
        return sb.sandbox_id

    sid = asyncio.run(make())
    try:
        r = subprocess.run([sys.executable, "-c", SAVER, sid, str(tmp_path / "snaps")],
                           capture_output=True, text=True, env=journal_env, timeout=120)
        assert r.stdout == "saving\n" and r.returncode == -signal.SIGKILL, r.stderr

        async def use() -> tuple[str, str]:
            sb = await m.attach(sid)
            try:
                st = await sb._vm._qmp("query-migrate")
                assert st.get("status") in (None, "cancelled", "completed", "failed"), st
                # long after any save of the dead holder would have ended
                await asyncio.sleep(3.0)
                out = (await sb.commands.run("echo ok", timeout=20)).stdout.strip()
                snap = await sb.snapshot(store=SnapshotStore(tmp_path / "again"))
                return out, snap.name
            finally:
                await m.detach(sb)

        from sandvm.snapshots import SnapshotStore

        out, name = asyncio.run(use())
        assert out == "ok" and name  # it runs, and saves again
    finally:
        asyncio.run(m.kill(sid))


FORKER = """
import asyncio, os, signal, sys
from sandvm.runtime.manager import SandboxManager
from sandvm.snapshots import store
def die(*args, **kw):  # the fork's snapshot is staged, about to be committed
    print("staged", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
store.SnapshotStore.commit = die
async def main():
    m = SandboxManager()
    await m.fork(await m.attach(sys.argv[1]), 1)
asyncio.run(main())
"""


def test_a_fork_cut_off_while_staged_leaves_nothing(journal_env: dict[str, str],
                                                    base_snapshot: Any,
                                                    snapshot_store: Any) -> None:
    """The holder died while its fork's snapshot was staged (its RAM and state already
    in the fork dir on tmpfs, not yet committed): ``recover`` removes it."""
    from sandvm.sandbox import fork_roots

    m = SandboxManager()

    async def make() -> str:
        sb = await m.from_snapshot(base_snapshot, store=snapshot_store, ttl=120)
        await m.detach(sb)
        return sb.sandbox_id

    sid = asyncio.run(make())
    try:
        r = subprocess.run([sys.executable, "-c", FORKER, sid], capture_output=True,
                           text=True, env=journal_env, timeout=120)
        assert r.stdout == "staged\n" and r.returncode == -signal.SIGKILL, r.stderr
        staged = [d for root in fork_roots() if root.is_dir() for d in root.iterdir()]
        assert staged  # what the dead holder left
        asyncio.run(m.recover())
        left = [d for root in fork_roots() if root.is_dir() for d in root.iterdir()]
        assert left == [], left
    finally:
        asyncio.run(m.kill(sid))


CHAOS = Path(__file__).with_name("runtime_chaos.py")
# the operations a kill is aimed at, in the order of runtime_chaos.TARGETS
CHAOS_TARGETS = ("create", "restore", "attach", "use", "detach", "reclaim", "kill", "ttl",
                 "snapshot", "fork", "pool", "gc")
# seconds each took here under TCG (a first guess, replaced by what a run measures)
CHAOS_GUESS = {"create": 8.0, "restore": 1.0, "attach": 0.035, "use": 0.35, "detach": 0.01,
               "reclaim": 0.05, "kill": 0.09, "ttl": 0.001, "snapshot": 1.6, "fork": 1.5,
               "pool": 0.65, "gc": 0.001}


def _chaos_rounds() -> int:
    """Rounds of the SIGKILL test: one per kind of operation by default (CI), more with
    ``SANDVM_CHAOS_ROUNDS`` (``make soak`` runs 120)."""
    raw = os.environ.get("SANDVM_CHAOS_ROUNDS", "")
    if not raw:
        return len(CHAOS_TARGETS)
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"SANDVM_CHAOS_ROUNDS must be a positive integer, not {raw!r}")
    return int(raw)


def _chaos_base(store_dir: Path) -> str:
    """A snapshot the chaos process restores from (its sandboxes say "base" until
    they are marked with their own id)."""
    from sandvm.snapshots import SnapshotStore

    async def make() -> str:
        from sandvm.sandbox import AsyncSandbox

        sb = await AsyncSandbox.create()
        await sb.commands.run("echo base > /root/me")
        snap = await sb.snapshot("chaos-base", stop=True, store=SnapshotStore(store_dir))
        return snap.name

    return asyncio.run(make())


@pytest.mark.timeout(120 + 40 * _chaos_rounds())
def test_sigkill_at_random_points_many_rounds(journal_env: dict[str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A managing process runs random operations (create, restore, attach, use, detach,
    reclaim, set_ttl, kill, snapshot, fork, a pool take, gc) and is SIGKILLed at a
    random moment inside one of them, round after round (each round aims at one kind
    of operation, the delay drawn within how long that operation took so far). After
    each kill a fresh manager's ``recover`` must leave: no unfinished operation, no
    QEMU without a live owner, no runtime, disk or fork dir of a dead owner, no
    sandbox in a state other than running or ended, every sandbox either running (its
    keeper, QEMU and dirs there, and it answers when taken over, with its own files)
    or ended with nothing left behind. ``SANDVM_CHAOS_ROUNDS`` sets the number of
    rounds (default: one per kind of operation)."""
    import json
    import random
    import select
    import statistics

    rounds = _chaos_rounds()
    store_dir = tmp_path / "snapshots"
    monkeypatch.setenv("SANDVM_SNAPSHOT_DIR", str(store_dir))
    env = {**journal_env, "SANDVM_SNAPSHOT_DIR": str(store_dir),
           "SANDVM_CHAOS_BASE": _chaos_base(store_dir),
           "SANDVM_CHAOS_TICKETS": str(tmp_path / "tickets")}
    rng = random.Random(int(os.environ.get("SANDVM_CHAOS_SEED", "2026")))
    targets = [CHAOS_TARGETS[i % len(CHAOS_TARGETS)] for i in range(rounds)]
    rng.shuffle(targets)
    took: dict[str, list[float]] = {t: [] for t in CHAOS_TARGETS}
    inside: dict[str, int] = dict.fromkeys(CHAOS_TARGETS, 0)
    tally = {"rounds": 0, "survivors": 0, "repaired": 0, "interrupted": 0,
             "orphans_killed": 0}
    m = SandboxManager()
    try:
        for round_, target in enumerate(targets):
            p = subprocess.Popen([sys.executable, str(CHAOS), str(round_), target], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert p.stdout is not None
            seen: list[str] = []
            aimed = False
            pending = b""  # read unbuffered: the line that starts the target is seen at once
            deadline = time.monotonic() + 120.0
            while not aimed and time.monotonic() < deadline and p.poll() is None:
                if not select.select([p.stdout], [], [], 0.2)[0]:
                    continue
                pending += os.read(p.stdout.fileno(), 65536)
                *lines, rest = pending.split(b"\n")
                pending = rest
                for i, raw in enumerate(lines):
                    seen.append(raw.decode())
                    if seen[-1].startswith(f"op {target} "):
                        # somewhere inside it: within what it took so far
                        so_far = took[target] or [CHAOS_GUESS[target]]
                        time.sleep(rng.uniform(0.0, 0.6 * statistics.median(so_far)))
                        aimed = True
                        pending = b"\n".join([*lines[i + 1:], pending])
                        break
            p.kill()
            out, err = p.communicate()
            assert "Traceback" not in err, err
            after = (pending.decode() + out).splitlines()
            for line in [*seen, *after]:
                words = line.split()
                if len(words) == 3 and words[0] == "done" and words[1] in took:
                    took[words[1]].append(float(words[2]))
            landed = aimed and not any(w.split()[:2] in (["done", target], ["error", target])
                                       for w in after)
            inside[target] += landed
            print(f"chaos round {round_} {target}: {'inside' if landed else 'missed'};"
                  f" last steps {[w.strip() for w in [*seen, *after][-4:]]}")
            rec = asyncio.run(_recover_and_check(m))
            tally["rounds"] += 1
            tally["survivors"] += len(rec.live)
            tally["repaired"] += len(rec.repaired) + sum(op == "create"
                                                         for _, op in rec.interrupted)
            tally["interrupted"] += len(rec.interrupted)
            tally["orphans_killed"] += len(rec.orphans_killed)
        medians = {t: round(statistics.median(v), 4) for t, v in took.items() if v}
        records = m.journal.sandboxes(include_ended=True)
        tally.update(
            sandboxes=len(records), live_at_end=sum(r.state != "ended" for r in records),
            ended_repair_needed=sum((r.end_reason or "").startswith("repair-needed")
                                    for r in records))
        # saves cut off inside commit (past their owner file) wait for the age sweep
        staging = [p for p in store_dir.glob(".staging-*")]
        tally.update(staging_left=len(staging), staging_left_bytes=sum(
            f.stat().st_size for d in staging for f in d.rglob("*") if f.is_file()))
        print("chaos", json.dumps({**tally, "killed_inside": inside, "median_s": medians}))
        # the kills did land inside the operations aimed at (not only between them)
        assert sum(inside.values()) >= rounds // 3, inside
        if rounds >= 2 * len(CHAOS_TARGETS):  # a soak: inside each of the slow ones
            for op in ("create", "restore", "attach", "detach", "kill", "snapshot", "fork",
                       "pool"):
                assert inside[op] >= 1, (op, inside)
    finally:
        for r in m.journal.sandboxes():
            asyncio.run(m.kill(r.id))


async def _recover_and_check(m: SandboxManager) -> Any:
    from sandvm._files import OWNER_FILE, proc_start_time, runtime_root
    from sandvm.providers.qemu import disk_root, orphaned_qemus
    from sandvm.sandbox import fork_roots
    from sandvm.snapshots import SnapshotStore

    rec = await m.recover(starting_grace=0.0)
    assert m.journal.interrupted() == []
    assert orphaned_qemus() == []
    records = m.journal.sandboxes(include_ended=True)
    known = {r.id for r in records} | {"base"}
    for r in records:
        assert r.state in ("running", "ended"), r  # nothing half-created is left
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
            # a copy (restored, forked, from a pool) killed before it was marked still
            # carries the mark of what it was copied from
            copy = "from_snapshot" in r.record or "forked_from" in r.record
            assert out == r.id or (copy and out in known), (r.id, out, r.record)
        finally:
            await m.detach(sb)
    for sid, _op in rec.interrupted:  # each was recorded, with its reason
        results = [e for e in m.journal.events(sid) if e["phase"] == "result"
                   and e["detail"].get("interrupted")]
        assert results
    # no runtime dir (tmpfs), disk dir or fork snapshot of a dead owner is left (and
    # nothing in the fork dirs is without an owner: no process forks any more)
    forks = fork_roots()
    for root in (runtime_root(), disk_root(), *forks):
        for d in root.iterdir() if root.is_dir() else ():
            try:
                pid, start = (d / OWNER_FILE).read_text().split()
            except (OSError, ValueError):
                assert root not in forks, f"left behind: {d}"
                continue
            assert proc_start_time(int(pid)) == start, f"left behind: {d}"
    # no save into the snapshot store cut off by its process's death is left (one cut
    # off inside commit, past its owner file, waits for the age sweep)
    store = SnapshotStore().root
    for d in store.glob(".staging-*"):
        with contextlib.suppress(FileNotFoundError):
            pid, start = (d / OWNER_FILE).read_text().split()
            assert proc_start_time(int(pid)) == start, f"left behind: {d}"
    return rec


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
