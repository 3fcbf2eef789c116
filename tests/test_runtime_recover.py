"""Recovery after managing processes died: unfinished intents, orphaned QEMUs, starting
keepers. Without VMs (the chaos test in test_runtime_manager.py does it with real ones)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandvm.errors import VmBootError
from sandvm.providers.qemu import OWNER_FILE, orphaned_qemus, write_owner
from sandvm.runtime.journal import Journal
from sandvm.runtime.manager import SandboxManager


def _dead_owner() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{proc.pid} 12345"


def _as_dead_process(journal: Journal) -> None:
    journal._owner = _dead_owner()  # what it writes from now on looks like a dead process's


def test_interrupted_lists_only_intents_of_dead_processes(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.add("sb-a")
    mine = j.intent("sb-a", "attach")
    done = j.intent("sb-a", "set_ttl")
    j.result(done, ok=True)
    _as_dead_process(j)
    dead = j.intent("sb-a", "detach")
    assert [e["seq"] for e in j.interrupted()] == [dead]  # ours is still being done
    j.result(dead, ok=False)
    assert j.interrupted() == []
    assert [e["seq"] for e in j.unfinished("sb-a")] == [mine]


def test_a_journal_from_before_owners_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
            sandbox_id TEXT NOT NULL, op TEXT NOT NULL, phase TEXT NOT NULL,
            intent_seq INTEGER, ok INTEGER, detail TEXT NOT NULL DEFAULT '{}');
        INSERT INTO events (ts, sandbox_id, op, phase) VALUES (1.0, 'sb-x', 'create', 'intent');
    """)
    db.commit()
    db.close()
    j = Journal(path)
    # an old intent without a result has no owner: it can only be a dead process's
    assert [(e["sandbox_id"], e["op"]) for e in j.interrupted()] == [("sb-x", "create")]
    j.intent("sb-x", "kill")
    assert len(j.interrupted()) == 1
    Journal(path).close()  # opening it again changes nothing


def test_recover_finishes_what_dead_processes_left(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    m = SandboxManager(j)
    rundir = tmp_path / "run-half"
    rundir.mkdir()
    (rundir / OWNER_FILE).write_text(_dead_owner() + "\n")
    _as_dead_process(j)
    # a creator that died mid-create: its sandbox may be half set up
    j.intent("sb-half", "create", ttl=60)
    j.add("sb-half", deadline=time.time() + 60)
    j.update("sb-half", rundir=str(rundir))
    # a process that died mid-kill: the kill is finished
    j.add("sb-dying", state="running", deadline=time.time() + 60)
    j.intent("sb-dying", "kill", reason="killed by its owner")
    # a process that died mid-set_ttl: nothing to undo
    j.add("sb-ttl", state="running", deadline=time.time() + 60)
    j.intent("sb-ttl", "set_ttl", ttl=5)
    j._owner = f"{os.getpid()} x"

    rec = asyncio.run(m.recover(starting_grace=0.0))
    assert sorted(rec.interrupted) == [("sb-dying", "kill"), ("sb-half", "create"),
                                       ("sb-ttl", "set_ttl")]
    assert rec.live == ()
    half, dying = j.get("sb-half"), j.get("sb-dying")
    assert half is not None and half.state == "ended"
    assert "creator ended before the sandbox was ready" in (half.end_reason or "")
    assert not rundir.exists()
    assert dying is not None and dying.end_reason == "killed by its owner"
    assert j.interrupted() == []
    results = [e for e in j.events("sb-ttl") if e["phase"] == "result"]
    assert results and results[0]["detail"]["interrupted"] is True
    assert asyncio.run(m.recover()).interrupted == ()  # nothing twice


def test_the_runtime_recovers_through_its_manager(tmp_path: Path) -> None:
    from sandvm.runtime.qemu import QemuIsolationRuntime

    j = Journal(tmp_path / "j.db")
    _as_dead_process(j)
    j.intent("sb-z", "create")
    rt = QemuIsolationRuntime(journal=j)
    assert asyncio.run(rt.recover()).interrupted == (("sb-z", "create"),)


def _fake_qemu(root: Path, name: str) -> subprocess.Popen[bytes]:
    """A process that looks like a sandvm QEMU of the runtime dir root/name."""
    chardev = f"socket,id=agent,path={root / name / 'agent.sock'},server=on,wait=off"
    return subprocess.Popen(["bash", "-c", f'exec -a qemu-system-x86_64 "{sys.executable}"'
                             f' -c "import time; time.sleep(60)" -chardev "{chardev}"'])


def test_orphaned_qemus_are_those_without_a_live_owner(tmp_path: Path) -> None:
    live, dead = tmp_path / "vm-live", tmp_path / "vm-dead"
    live.mkdir()
    dead.mkdir()
    write_owner(live)
    (dead / OWNER_FILE).write_text(_dead_owner() + "\n")
    (tmp_path / "vm-probe").mkdir()  # a dir with no owner file (the KVM probe's): kept
    procs = {n: _fake_qemu(tmp_path, n) for n in ("vm-live", "vm-dead", "vm-gone",
                                                   "vm-probe")}
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = dict((rundir.name, pid) for pid, rundir in orphaned_qemus(tmp_path))
            if len(found) == 2:
                break
            time.sleep(0.05)
        assert found == {"vm-dead": procs["vm-dead"].pid, "vm-gone": procs["vm-gone"].pid}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


@pytest.mark.parametrize("bad", ["", "garbage", "1"])
def test_an_unreadable_owner_file_counts_as_dead(tmp_path: Path, bad: str) -> None:
    d = tmp_path / "vm"
    d.mkdir()
    (d / OWNER_FILE).write_text(bad)
    p = _fake_qemu(tmp_path, "vm")
    try:
        deadline = time.monotonic() + 10
        while not orphaned_qemus(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid, _ in orphaned_qemus(tmp_path)] == [p.pid]
    finally:
        p.kill()
        p.wait()


def test_gc_spares_a_slow_create_whose_creator_lives(tmp_path: Path) -> None:
    """A create that takes long (an image import before the boot) is not repaired while
    its process runs; once that process is gone, it is."""
    j = Journal(tmp_path / "j.db")
    m = SandboxManager(j)
    j.intent("sb-slow", "create", ttl=60)  # by this (live) process
    j.add("sb-slow", deadline=time.time() + 60)
    assert m.gc(starting_grace=0.0) == []
    assert j.get("sb-slow").state == "starting"  # type: ignore[union-attr]
    _as_dead_process(j)
    j.intent("sb-gone", "create", ttl=60)
    j.add("sb-gone", deadline=time.time() + 60)
    assert m.gc(starting_grace=0.0) == ["sb-gone"]


class _ScriptedQmp:
    """A VM whose QMP answers query-migrate from a script (one answer a call, the last
    one repeated) and records every command."""

    def __init__(self, migrate: list[str | None], running: bool) -> None:
        self.vm_id = "sb-q"
        self.migrate = migrate
        self.running = running
        self.sent: list[str] = []
        self.resumed = False

    async def qmp_execute(self, cmd: str, args: object = None) -> object:
        self.sent.append(cmd)
        if cmd == "query-migrate":
            status = self.migrate.pop(0) if len(self.migrate) > 1 else self.migrate[0]
            return {} if status is None else {"status": status}
        if cmd == "query-status":
            return {"running": self.running, "status": "running" if self.running
                    else "postmigrate"}
        if cmd == "cont":
            self.running = True
        return {}


def test_attach_ends_a_save_its_dead_holder_left_running() -> None:
    from sandvm.runtime.manager import _end_cut_off_save

    idle = _ScriptedQmp([None], running=True)  # no save ever: nothing is touched
    asyncio.run(_end_cut_off_save(idle))  # type: ignore[arg-type]
    assert idle.sent == ["query-migrate"] and not idle.resumed
    done = _ScriptedQmp(["completed"], running=True)
    asyncio.run(_end_cut_off_save(done))  # type: ignore[arg-type]
    assert done.sent == ["query-migrate"]
    # still saving: cancelled, waited for, and the VM (stopped by the save) runs again
    cut = _ScriptedQmp(["active", "active", "cancelling", "cancelled"], running=False)
    asyncio.run(_end_cut_off_save(cut))  # type: ignore[arg-type]
    assert cut.sent[:2] == ["query-migrate", "migrate_cancel"]
    assert cut.sent[-2:] == ["query-status", "cont"] and cut.running and cut.resumed
    stuck = _ScriptedQmp(["active"], running=False)
    with pytest.raises(VmBootError, match="did not stop"):
        asyncio.run(_end_cut_off_save(stuck, timeout=0.2))  # type: ignore[arg-type]
