"""Managed restores and forks: sandboxes restored from snapshots under a keeper, so they
outlive their creator, can be attached by id from another process, snapshotted again,
forked, expire, survive the snapshot's removal, and are repaired after a SIGKILL."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandvm import AsyncSandbox, Sandbox
from sandvm._files import sparse_copy
from sandvm.errors import InvalidSpec, VmAlreadyExists, VmBootError
from sandvm.providers.qemu import orphaned_qemus, proc_start_time
from sandvm.runtime.manager import SandboxManager, keeper_alive
from sandvm.snapshots import Snapshot, SnapshotStore
from test_runtime_manager import _gone, _wait_gone

pytestmark = pytest.mark.qemu

TICKER = ("nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/ticks; sleep 0.1;"
          " done' >/dev/null 2>&1 & echo $! > /root/ticker.pid")


@pytest.fixture
def journal_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A journal of this test's own, also for the processes it starts."""
    path = tmp_path / "journal.db"
    monkeypatch.setenv("SANDVM_JOURNAL", str(path))
    return {**os.environ, "SANDVM_JOURNAL": str(path)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """A snapshot (in a store of this module) of a sandbox with a file written and a
    process running."""
    store = SnapshotStore(tmp_path_factory.mktemp("restore-snaps"))
    sb = Sandbox.create()
    sb.files.write("/root/state.txt", "before the snapshot")
    sb.commands.run(TICKER)
    return sb.snapshot("prepared", stop=True, store=store)


def _copy_of(snap: Snapshot, root: Path) -> Snapshot:
    """A copy of ``snap`` with files of its own (not links), in a store at ``root``."""
    dest = root / snap.name
    dest.mkdir(parents=True)
    for f in snap.path.iterdir():
        sparse_copy(f, dest / f.name)
    return SnapshotStore(root).get(snap.name)


async def _ticks(sb: AsyncSandbox) -> tuple[int, int]:
    """(ticker pid, ticks): the snapshot's process is alive when ticks go up."""
    pid = int(await sb.files.read("/root/ticker.pid"))
    first = int(await sb.files.read("/tmp/ticks"))
    deadline = time.monotonic() + 30  # it ticks every 0.1 s of guest time
    while True:
        r = await sb.commands.run(f"kill -0 {pid} && cat /tmp/ticks")
        if int(r.stdout) > first or time.monotonic() > deadline:
            return pid, int(r.stdout) - first
        await asyncio.sleep(0.1)


def _mapped(pid: int | None, inode: int) -> list[str]:
    """The names of the files with ``inode`` that process ``pid`` maps."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(inode):
            out.add(fields[5])
    return sorted(out)


async def _end(m: SandboxManager, *sbs: AsyncSandbox) -> None:
    """Kill managed sandboxes (their record says why) and close our side of them."""
    for sb in sbs:
        await m.kill(sb.sandbox_id)
        await sb.kill()


def _kill_all(m: SandboxManager) -> None:
    for r in m.journal.sandboxes():
        asyncio.run(m.kill(r.id))


def _assert_left_nothing(m: SandboxManager, sid: str) -> None:
    r = m.journal.get(sid)
    assert r is not None and r.state == "ended", r
    assert _wait_gone(r.keeper_pid) and _wait_gone(r.qemu_pid), r
    for d in (r.rundir, r.diskdir):
        assert not d or not Path(d).exists(), (sid, d)


def test_managed_restore_has_the_snapshots_state(journal_env: dict[str, str],
                                                 prepared: Snapshot) -> None:
    m = SandboxManager()

    async def scenario() -> str:
        sb = await m.from_snapshot("prepared", store=SnapshotStore(prepared.path.parent),
                                   ttl=60)
        try:
            assert await sb.files.read("/root/state.txt") == "before the snapshot"
            _, ticked = await _ticks(sb)
            assert ticked > 0  # the process started before the snapshot runs on
            assert (await sb.commands.run("hostname")).stdout.strip() == sb.sandbox_id
            rec = m.journal.get(sb.sandbox_id)
            assert rec is not None and rec.state == "running" and keeper_alive(rec)
            assert rec.qemu_pid == sb._vm.pid and sb._vm.proc is None  # the keeper's child
            assert rec.record["restored"] is True and rec.record["private_ram"] is True
            assert rec.record["restored_from"] == str(prepared.path)
            assert rec.record["from_snapshot"] == "prepared"
            assert rec.record["spec"] == {"image": "base", "memory_mib": 256, "vcpus": 1}
            assert rec.record["accelerator"] == sb._vm.accel
            assert (rec.deadline or 0) - time.time() == pytest.approx(60, abs=5)
            intent, result = m.journal.events(sb.sandbox_id)[:2]
            assert (intent["op"], intent["phase"], result["ok"]) == ("create", "intent", True)
            assert intent["detail"]["from_snapshot"] == "prepared"
            # an id in use is refused, and the sandbox that has it is left alone
            with pytest.raises(VmAlreadyExists):
                await m.from_snapshot(prepared, sandbox_id=sb.sandbox_id)
            assert m.journal.unfinished(sb.sandbox_id) == []
            assert keeper_alive(m.journal.get(sb.sandbox_id))  # type: ignore[arg-type]
        finally:
            await _end(m, sb)
        return sb.sandbox_id

    sid = asyncio.run(scenario())
    _assert_left_nothing(m, sid)
    assert m.journal.get(sid).end_reason == "killed"  # type: ignore[union-attr]
    assert prepared.path.is_dir()  # the snapshot is left as it was


ATTACHER = """
import asyncio, json, sys
from sandvm import AsyncSandbox
from sandvm.runtime.manager import SandboxManager
from sandvm.snapshots import SnapshotStore
async def main():
    m = SandboxManager()
    sb = await m.attach(sys.argv[1])
    out = {"restored": sb._vm.restored_from is not None, "private_ram": sb._vm.private_ram}
    out["state"] = await sb.files.read("/root/state.txt")
    out["mine"] = (await sb.commands.run("cat /root/mine")).stdout
    await sb.files.write("/root/child", "from the attacher")
    out["echo"] = (await sb.commands.run("echo $((6 * 7))")).stdout
    store = SnapshotStore(sys.argv[2])
    snap = await sb.snapshot("of-attached", store=store)
    out["ram"] = snap.ram
    await sb.files.write("/root/child", "after the snapshot")
    grand = await AsyncSandbox.from_snapshot(snap, store=store)
    out["grand"] = await grand.files.read("/root/child")
    await grand.kill()
    out["after"] = await sb.files.read("/root/child")
    await m.detach(sb)
    print(json.dumps(out), flush=True)
asyncio.run(main())
"""


def test_detach_then_attach_from_another_process(journal_env: dict[str, str],
                                                 prepared: Snapshot, tmp_path: Path) -> None:
    """A managed restore detached here is attached by id in another process: commands
    and files work there, and so does a snapshot of it (its RAM, mapped privately from
    the first snapshot, goes into the stream), which restores; back here it has what the
    other process wrote, and can be snapshotted and restored as a managed sandbox too."""
    m = SandboxManager()
    store = SnapshotStore(prepared.path.parent)

    async def make() -> str:
        sb = await m.from_snapshot(prepared, store=store, ttl=120)
        await sb.files.write("/root/mine", "written by the creator")
        await m.detach(sb)
        return sb.sandbox_id

    try:
        sid = asyncio.run(make())
        r = subprocess.run([sys.executable, "-c", ATTACHER, sid, str(tmp_path / "snaps")],
                           capture_output=True, text=True, env=journal_env, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out == {"restored": True, "private_ram": True, "state": "before the snapshot",
                       "mine": "written by the creator", "echo": "42\n", "ram": "stream",
                       "grand": "from the attacher", "after": "after the snapshot"}

        async def again() -> None:
            sb = await m.attach(sid)
            second = None
            try:
                assert await sb.files.read("/root/child") == "after the snapshot"
                _, ticked = await _ticks(sb)
                assert ticked > 0
                snap = await sb.snapshot("again", store=SnapshotStore(tmp_path / "snaps"))
                second = await m.from_snapshot("again", store=SnapshotStore(tmp_path / "snaps"),
                                               ttl=60)
                assert await second.files.read("/root/child") == "after the snapshot"
                # a restore of a stream snapshot has RAM of its own: saved as a file again
                rec = m.journal.get(second.sandbox_id)
                assert rec is not None and rec.record["private_ram"] is False
                assert (await second.snapshot("third", store=SnapshotStore(
                    tmp_path / "snaps"))).ram == "file"
                assert snap.ram == "stream"
            finally:
                await _end(m, sb, *([second] if second else []))

        asyncio.run(again())
        _assert_left_nothing(m, sid)
    finally:
        _kill_all(m)


def test_the_keeper_ends_a_managed_restore_at_its_ttl(journal_env: dict[str, str],
                                                      prepared: Snapshot) -> None:
    m = SandboxManager()

    async def make() -> str:
        sb = await m.from_snapshot(prepared, store=SnapshotStore(prepared.path.parent),
                                   ttl=1.5)
        await m.detach(sb)
        return sb.sandbox_id

    try:
        sid = asyncio.run(make())
        rec = m.journal.get(sid)
        assert rec is not None and keeper_alive(rec)
        assert _wait_gone(rec.keeper_pid, 15) and _gone(rec.qemu_pid)
        _assert_left_nothing(m, sid)
        ended = m.journal.get(sid)
        assert ended is not None and "expired" in (ended.end_reason or "")
        assert "expire" in [e["op"] for e in m.journal.events(sid)]
    finally:
        _kill_all(m)


def test_removing_the_snapshot_does_not_break_a_managed_restore(
        journal_env: dict[str, str], prepared: Snapshot, tmp_path: Path) -> None:
    """The restore maps the snapshot's RAM file: once the snapshot is removed the mapping
    still holds it (deleted, never rewritten), and every page of it is still there."""
    m = SandboxManager()
    snap = _copy_of(prepared, tmp_path / "store")
    store = SnapshotStore(snap.path.parent)

    async def scenario() -> None:
        sb = await m.from_snapshot(snap.name, store=store, ttl=60)
        copy = None
        try:
            inode = (snap.path / "mem").stat().st_ino
            assert _mapped(sb._vm.pid, inode) == [f"{snap.path}/mem"]
            store.remove(snap.name)
            assert not snap.path.exists()
            # still mapped (the file has no name any more), never rewritten
            mapped = _mapped(sb._vm.pid, inode)
            assert len(mapped) == 1 and mapped[0].endswith("/mem (deleted)"), mapped
            await m.detach(sb)
            sb = await m.attach(sb.sandbox_id)
            assert await sb.files.read("/root/state.txt") == "before the snapshot"
            _, ticked = await _ticks(sb)
            assert ticked > 0
            # a snapshot of it reads all its RAM: pages it never touched come from the
            # removed file
            again = await sb.snapshot("after-removal", store=store)
            copy = await m.from_snapshot(again, store=store, ttl=60)
            assert await copy.files.read("/root/state.txt") == "before the snapshot"
            _, ticked = await _ticks(copy)
            assert ticked > 0
        finally:
            await _end(m, sb, *([copy] if copy else []))

    try:
        asyncio.run(scenario())
    finally:
        _kill_all(m)


def test_a_managed_restore_with_a_root_disk_outlives_its_snapshot(
        journal_env: dict[str, str], tmp_path: Path) -> None:
    """With an image's root disk: the restore hard-links the snapshot's disk layer and
    image into its disk dir, so after the snapshot is removed the guest still reads its
    disk (caches dropped), and a process that attaches can snapshot it (the image under
    its layers is found in its record) and restore that."""
    from oci_build import build_layout
    from test_images_vm import tiny_layers

    layout = tmp_path / "layout"
    build_layout(layout, tiny_layers("restore-disk"), config={"Env": ["PATH=/bin"]})
    store = SnapshotStore(tmp_path / "snaps")
    sb0 = Sandbox.create(image=f"oci:{layout}:latest", disk_size="128M")
    try:
        sb0.files.write("/app/state", "on the disk")
        snap = sb0.snapshot("disk", stop=True, store=store)
    finally:
        sb0.kill()
    m = SandboxManager()

    async def scenario() -> None:
        sb = await m.from_snapshot(snap, store=store, ttl=60)
        copy = None
        try:
            rec = m.journal.get(sb.sandbox_id)
            assert rec is not None and rec.diskdir
            assert rec.record["disk_images"] == {"root": f"{rec.diskdir}/image-root.ext4"}
            assert [d["serial"] for d in rec.record["disks"]] == ["root"]
            store.remove("disk")
            await m.detach(sb)
            sb = await m.attach(sb.sandbox_id)
            r = await sb.commands.run("sync; echo 3 > /proc/sys/vm/drop_caches;"
                                      " cat /app/marker /app/state", user="root")
            assert r.stdout == "restore-diskon the disk"
            await sb.files.write("/app/state", "changed after the removal")
            again = await sb.snapshot("again", store=store)
            assert {"disk-root.qcow2", "image-root.ext4"} <= set(again.files)
            copy = await m.from_snapshot(again, store=store, ttl=60)
            assert await copy.files.read("/app/state") == "changed after the removal"
            assert await sb.files.read("/app/marker") == "restore-disk"
        finally:
            await _end(m, sb, *([copy] if copy else []))

    try:
        asyncio.run(scenario())
    finally:
        _kill_all(m)


def test_fork_makes_managed_copies(journal_env: dict[str, str], prepared: Snapshot) -> None:
    m = SandboxManager()

    async def scenario() -> list[str]:
        sb = await m.from_snapshot(prepared, store=SnapshotStore(prepared.path.parent),
                                   ttl=120)
        copies: list[AsyncSandbox] = []
        try:
            await sb.files.write("/root/parent", "pre-fork")
            ids = [f"{sb.sandbox_id}-copy-{i}" for i in range(2)]
            copies = await m.fork(sb, 2, ttl=60, sandbox_ids=ids)
            assert [c.sandbox_id for c in copies] == ids
            for i, c in enumerate(copies):
                rec = m.journal.get(c.sandbox_id)
                assert rec is not None and rec.state == "running" and keeper_alive(rec)
                assert rec.record["forked_from"] == sb.sandbox_id
                assert rec.record["restored"] is True
                assert (rec.deadline or 0) - time.time() == pytest.approx(60, abs=5)
                await c.files.write("/root/mine", str(i))
                await m.detach(c)
            fork_ev = [e for e in m.journal.events(sb.sandbox_id) if e["op"] == "fork"]
            assert fork_ev[-1]["phase"] == "result" and fork_ev[-1]["detail"]["copies"] == ids
            copies = [await m.attach(i) for i in ids]  # each attachable by id
            for i, c in enumerate(copies):
                assert await c.files.read("/root/parent") == "pre-fork"
                assert await c.files.read("/root/mine") == str(i)
                assert (await _ticks(c))[1] > 0
            assert not await sb.files.exists("/root/mine")
            await sb.commands.run("true")  # the source runs on
        finally:
            await _end(m, sb, *copies)
        return [sb.sandbox_id, *(c.sandbox_id for c in copies)]

    try:
        for sid in asyncio.run(scenario()):
            _assert_left_nothing(m, sid)
    finally:
        _kill_all(m)


def test_a_failed_fork_leaves_nothing(journal_env: dict[str, str], prepared: Snapshot,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A count out of range is refused before anything happens; a copy that fails
    to start gets the copies already made killed, and the error raised."""
    from sandvm._files import runtime_root

    m = SandboxManager()
    real = SandboxManager._restore
    calls: list[str] = []

    async def second_fails(self: SandboxManager, sid: str, *a: Any, **kw: Any) -> AsyncSandbox:
        calls.append(sid)
        if len(calls) == 2:
            await asyncio.sleep(0.3)  # the first one is well on its way
            raise VmBootError("injected: this copy does not start")
        return await real(self, sid, *a, **kw)

    async def scenario() -> str:
        sb = await m.from_snapshot(prepared, store=SnapshotStore(prepared.path.parent),
                                   ttl=60)
        try:
            before = m.journal.sandboxes(include_ended=True)
            for n in (0, 257, True, "2"):
                with pytest.raises(InvalidSpec):
                    await m.fork(sb, n)  # type: ignore[arg-type]
            with pytest.raises(InvalidSpec):
                await m.fork(sb, 1, ttl=0)
            for ids in (["sb-a"], ["sb-a", "sb-a"], ["sb-a", "no/such"]):
                with pytest.raises(InvalidSpec):
                    await m.fork(sb, 2, sandbox_ids=ids)
            assert m.journal.sandboxes(include_ended=True) == before
            monkeypatch.setattr(SandboxManager, "_restore", second_fails)
            with pytest.raises(VmBootError, match="injected"):
                await m.fork(sb, 2)
            monkeypatch.setattr(SandboxManager, "_restore", real)
            assert len(calls) == 2
            made = m.journal.get(calls[0])
            assert made is not None and made.state == "ended"
            assert "another copy of its fork failed" in (made.end_reason or "")
            _assert_left_nothing(m, calls[0])
            assert m.journal.get(calls[1]) is None  # it never got as far as the journal
            fork_ev = [e for e in m.journal.events(sb.sandbox_id) if e["op"] == "fork"]
            assert fork_ev[-1]["phase"] == "result" and fork_ev[-1]["ok"] is False
            assert not any((runtime_root() / "fork-snapshots").iterdir())
            assert (await sb.commands.run("echo alive")).stdout == "alive\n"
        finally:
            await _end(m, sb)
        return sb.sandbox_id

    try:
        _assert_left_nothing(m, asyncio.run(scenario()))
        assert [r.id for r in m.journal.sandboxes()] == []
    finally:
        _kill_all(m)


RESTORER = """
import asyncio, sys
from sandvm.runtime.manager import SandboxManager
from sandvm.snapshots import SnapshotStore
async def main():
    m = SandboxManager()
    store = SnapshotStore(sys.argv[1])
    warm = await m.from_snapshot("prepared", store=store, ttl=60)  # caches, imports
    await m.kill(warm.sandbox_id)
    await warm.kill()
    print("ready", flush=True)
    sid = sys.argv[2]
    print("op restore", sid, flush=True)
    sb = await m.from_snapshot("prepared", store=store, ttl=120, sandbox_id=sid)
    await sb.commands.run(f"echo {sid} > /root/me")
    await m.detach(sb)
    print("done", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_recover_after_sigkill_mid_restore(journal_env: dict[str, str],
                                           prepared: Snapshot) -> None:
    """SIGKILL a process at spread-out moments inside a managed restore: afterwards
    ``recover`` leaves no QEMU without a live owner and no unfinished intent, and each
    sandbox is either ended with nothing left behind (an interrupted restore is an
    interrupted create: repair-needed) or runs and can be taken over."""
    m = SandboxManager()
    sids = []
    try:
        for i, delay in enumerate((0.02, 0.08, 0.25, 0.6, 1.5)):
            sid = f"sb-cut-{i}"
            p = subprocess.Popen([sys.executable, "-c", RESTORER, str(prepared.path.parent),
                                  sid], env=journal_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            assert p.stdout is not None
            lines = [p.stdout.readline()]  # blocking: no line waits in a buffer
            while lines[-1] not in ("", f"op restore {sid}\n"):
                lines.append(p.stdout.readline())
            assert lines[-1] == f"op restore {sid}\n", (lines, p.poll())
            time.sleep(delay)
            p.kill()
            _, err = p.communicate()
            assert "Traceback" not in err, err
            sids.append(sid)
        rec = asyncio.run(m.recover(starting_grace=0.0))
        assert m.journal.interrupted() == []
        assert orphaned_qemus() == []
        cut = [sid for sid, op in rec.interrupted if op == "create"]
        # most kills land inside the restore, mostly once its keeper started QEMU (the
        # keeper outlives its creator: recover stops it)
        assert cut, rec
        # (a kill between the intent and the row's first write leaves no row: on a
        # loaded machine the 0.02 s kill can land there, as the loop below allows)
        rows = [m.journal.get(sid) for sid in cut]
        assert any(r is not None and r.keeper_pid for r in rows), rows
        for sid in sids:
            r = m.journal.get(sid)
            if r is None:  # killed before its first journal write
                continue
            if r.state == "ended":
                _assert_left_nothing(m, sid)
                assert sid not in rec.live
                if sid in cut:
                    assert "repair-needed" in (r.end_reason or "")
                continue
            assert sid in rec.live and sid not in cut
            assert keeper_alive(r) and r.qemu_pid and proc_start_time(r.qemu_pid)
            assert asyncio.run(_take_over(m, sid)) == sid
    finally:
        _kill_all(m)
    for sid in sids:
        if m.journal.get(sid) is not None:
            _assert_left_nothing(m, sid)


async def _take_over(m: SandboxManager, sid: str) -> str:
    sb = await m.attach(sid)
    try:  # its hostname was set before its create was recorded done
        return (await sb.commands.run("hostname")).stdout.strip()
    finally:
        await _end(m, sb)


PAUSER = """
import asyncio, os, signal, sys
from sandvm.runtime.manager import SandboxManager
async def main():
    sb = await SandboxManager().attach(sys.argv[1])
    await sb._vm.pause()  # as a snapshot (e.g. for a fork) does, before it saves
    print("paused", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


def test_attach_resumes_a_sandbox_its_holder_left_paused(journal_env: dict[str, str],
                                                         prepared: Snapshot) -> None:
    """A holder that died while the VM was paused (in the middle of a snapshot, e.g.
    of a fork) does not leave the sandbox unusable: the next attach lets it run again,
    with the guest's clock set to the host's."""
    m = SandboxManager()

    async def make() -> str:
        sb = await m.from_snapshot(prepared, store=SnapshotStore(prepared.path.parent),
                                   ttl=60)
        await m.detach(sb)
        return sb.sandbox_id

    async def use(sid: str) -> tuple[str, float, float]:
        sb = await m.attach(sid)
        try:
            _, ticked = await _ticks(sb)
            assert ticked > 0
            t0 = time.time()
            r = await sb.commands.run("date +%s")
            return r.stdout.strip(), t0, time.time()
        finally:
            await _end(m, sb)

    try:
        sid = asyncio.run(make())
        r = subprocess.run([sys.executable, "-c", PAUSER, sid], capture_output=True,
                           text=True, env=journal_env, timeout=60)
        assert r.stdout == "paused\n", r.stderr
        time.sleep(2.0)  # the guest's clock stands still meanwhile
        guest, t0, t1 = asyncio.run(use(sid))
        # within 1 s of the host's clock while the command ran (in whole seconds)
        assert math.floor(t0 - 1.0) <= int(guest) <= t1 + 1.0, (t0, guest, t1)
        _assert_left_nothing(m, sid)
    finally:
        _kill_all(m)
