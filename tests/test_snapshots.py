"""Snapshots, restore, fork, pause: real VMs (QEMU), clone hygiene, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from sandvm import Sandbox
from sandvm.errors import (
    SnapshotAlreadyExists,
    SnapshotCorrupt,
    SnapshotIncompatible,
    SnapshotNotFound,
)
from sandvm.snapshots import SnapshotStore

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def prepared(snapshot_store: Any) -> Any:
    """A snapshot of a sandbox with a file written and a process running."""
    sb = Sandbox.create()
    sb.files.write("/root/state.txt", "before the snapshot")
    sb.commands.run("nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/ticks;"
                    " sleep 0.2; done' >/dev/null 2>&1 &")
    snap = sb.snapshot("prepared", store=snapshot_store)
    times = sb.last_snapshot_times
    # the pause (vCPUs stopped) is inside the time until resumed, itself inside the total
    assert 0 < times["pause_s"] <= times["until_resumed_s"] < times["total_s"]
    # the original keeps running after a live snapshot, with its state
    assert sb.commands.run("cat /root/state.txt").stdout == "before the snapshot"
    sb.files.write("/root/after.txt", "only in the original")
    yield snap
    sb.kill()


def _clone_facts(c: Sandbox) -> dict[str, str]:
    out = c.commands.run(
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
        " python3 -c 'import time, uuid; print(uuid.uuid4()); print(time.time())'; hostname;"
        " echo $SANDVM_SANDBOX_ID; cat /root/state.txt; echo;"
        " test -e /root/after.txt && echo leaked || echo clean").stdout.split("\n")
    keys = ["urandom", "uuid", "clock", "hostname", "id", "state", "after"]
    return dict(zip(keys, out, strict=False))


def test_restored_clones_are_distinct_and_current(prepared: Any, snapshot_store: Any) -> None:
    a = Sandbox.from_snapshot(prepared, store=snapshot_store)
    b = Sandbox.from_snapshot("prepared", store=snapshot_store)
    try:
        t0 = time.time()
        fa = _clone_facts(a)
        t1 = time.time()
        fb = _clone_facts(b)
        t2 = time.time()
        assert fa["state"] == fb["state"] == "before the snapshot"
        assert fa["after"] == fb["after"] == "clean"  # nothing from after the snapshot
        assert fa["urandom"] != fb["urandom"] and len(fa["urandom"]) == 32
        assert fa["uuid"] != fb["uuid"]
        # each clone's clock is within 1 s of the host's while the command ran
        assert t0 - 1.0 < float(fa["clock"]) < t1 + 1.0
        assert t1 - 1.0 < float(fb["clock"]) < t2 + 1.0
        assert fa["hostname"] == a.sandbox_id and fb["hostname"] == b.sandbox_id
        assert fa["id"] == a.sandbox_id and fb["id"] == b.sandbox_id
        # the background process kept running in each clone
        t1 = int(a.commands.run("cat /tmp/ticks").stdout)
        deadline = time.monotonic() + 30  # it ticks every 0.2 s of guest time
        while int(a.commands.run("cat /tmp/ticks").stdout) <= t1:
            assert time.monotonic() < deadline, "the clone's background process stopped"
            time.sleep(0.1)
        # clones are independent
        a.files.write("/root/a.txt", "a")
        assert not b.files.exists("/root/a.txt")
    finally:
        a.kill()
        b.kill()


def test_fork_copies_a_running_sandbox() -> None:
    with Sandbox.create() as sb:
        sb.files.write("/root/pre.txt", "pre-fork")
        clones = sb.fork(2)
        try:
            assert len({c.sandbox_id for c in clones} | {sb.sandbox_id}) == 3
            for i, c in enumerate(clones):
                assert c.files.read("/root/pre.txt") == "pre-fork"
                c.files.write("/root/mine.txt", str(i))
            assert clones[0].files.read("/root/mine.txt") == "0"
            assert clones[1].files.read("/root/mine.txt") == "1"
            assert not sb.files.exists("/root/mine.txt")
            # a clone can be snapshotted too (its RAM goes into the state stream) ...
            store = SnapshotStore(Path(tempfile.mkdtemp()))
            clones[0].files.write("/root/gen.txt", "second generation")
            snap2 = clones[0].snapshot("of-a-clone", store=store)
            assert snap2.ram == "stream" and "mem" not in snap2.files
            with Sandbox.from_snapshot(snap2, store=store) as grandchild:
                assert grandchild.files.read("/root/gen.txt") == "second generation"
                # ... and what was restored from that is a full VM again
                snap3 = grandchild.snapshot("third", store=store)
                assert snap3.ram == "file"
            shutil.rmtree(store.root)
        finally:
            for c in clones:
                c.kill()


def test_snapshot_refusals(prepared: Any, snapshot_store: Any, tmp_path: Path) -> None:
    with Sandbox.create() as sb:
        with pytest.raises(SnapshotAlreadyExists):
            sb.snapshot("prepared", store=snapshot_store)
        assert sb.commands.run("echo still-running").stdout == "still-running\n"
        snap = sb.snapshot("stopped", stop=True, store=snapshot_store)
        assert not sb.is_running()
    assert snap.path.exists()

    def damaged(name: str) -> Path:
        dst = tmp_path / name
        subprocess.run(["cp", "-r", "--sparse=always", str(prepared.path), str(dst)],
                       check=True)
        return dst

    flipped = damaged("flipped")
    with open(flipped / "state", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        Sandbox.from_snapshot(flipped)

    truncated = damaged("truncated")
    with open(truncated / "mem", "r+b") as f:
        f.truncate(1 << 20)
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        Sandbox.from_snapshot(truncated)

    foreign = damaged("foreign")
    man = json.loads((foreign / "manifest.json").read_text())
    man["qemu_version"] = "QEMU emulator version 1.0"
    (foreign / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SnapshotIncompatible, match="QEMU"):
        Sandbox.from_snapshot(foreign)

    altered_ram = damaged("altered-ram")
    with open(altered_ram / "mem", "r+b") as f:
        f.seek(4096)
        f.write(b"\x01")
    with pytest.raises(SnapshotCorrupt, match="mem"):
        Sandbox.from_snapshot(altered_ram, verify="full")
    shutil.rmtree(tmp_path)


def test_pause_and_resume(sandbox: Any) -> None:
    sandbox.files.write("/tmp/paused.txt", "kept")
    now = "python3 -c 'import time; print(time.time())'"
    t_before = float(sandbox.commands.run(now).stdout)
    sandbox.pause()
    time.sleep(1.0)
    sandbox.resume()
    assert sandbox.files.read("/tmp/paused.txt") == "kept"
    # the guest clock stood still while paused; resume steps it to the host's: within
    # 1 s of the host's clock while the command ran (python3 alone may take longer than
    # that to start here, so the host's clock is read on both sides of it)
    t0 = time.time()
    t_guest = float(sandbox.commands.run(now).stdout)
    t1 = time.time()
    assert t_guest > t_before + 1.0
    assert t0 - 1.0 < t_guest < t1 + 1.0


def test_soak_pause_resume_keeps_every_write(snapshot_store: Any) -> None:
    """50 pauses (in memory, and to disk with a resume) while the guest keeps writing."""
    import hashlib

    sb = Sandbox.create()
    sb.files.write("/root/writer.sh",
                   "i=0; while true; do i=$((i+1)); head -c 4096 /dev/urandom > /root/w/$i.tmp"
                   " && sha256sum /root/w/$i.tmp | cut -d' ' -f1 > /root/w/$i.sum"
                   " && mv /root/w/$i.tmp /root/w/$i.bin; sleep 0.05; done\n")
    sb.commands.run("mkdir -p /root/w && nohup sh /root/writer.sh >/dev/null 2>&1 &")
    host_files: dict[str, str] = {}
    try:
        for cycle in range(50):
            data = f"cycle {cycle} ".encode() * (cycle + 1)
            sb.files.write(f"/root/host/{cycle}.txt", data)
            host_files[f"/root/host/{cycle}.txt"] = hashlib.sha256(data).hexdigest()
            if cycle % 10 == 9:  # every tenth pause goes to disk and back
                paused = sb.pause(to_disk=True, store=snapshot_store)
                assert paused is not None and not sb.is_running()
                sb = Sandbox.resume_from(paused, store=snapshot_store)
                assert sb.sandbox_id == paused.source_id
                assert not snapshot_store.exists(paused.name)
            else:
                sb.pause()
                time.sleep(0.05)
                sb.resume()
        time.sleep(0.5)
        sb.commands.run("pkill -f writer.sh; true")
        report = sb.commands.run(
            "cd /root/w && n=0; bad=0; for s in *.sum; do i=${s%.sum};"
            " [ -e $i.bin ] || continue; n=$((n+1));"
            " [ \"$(sha256sum $i.bin | cut -d' ' -f1)\" = \"$(cat $s)\" ] || bad=$((bad+1));"
            " done; echo $n $bad").stdout.split()
        written, bad = int(report[0]), int(report[1])
        assert written >= 10 and bad == 0  # it kept writing through all pauses, intact
        for path, digest in host_files.items():
            assert hashlib.sha256(sb.files.read(path, format="bytes")).hexdigest() == digest
    finally:
        sb.kill()


def test_pause_to_disk_and_resume_in_another_process(tmp_path: Path) -> None:
    import os
    import sys

    store = SnapshotStore(tmp_path / "paused")
    sb = Sandbox.create()
    sb.files.write("/root/keep.txt", "survives the process")
    paused = sb.pause(to_disk=True, store=store)
    assert paused is not None and paused.name == f"paused-{sb.sandbox_id}"
    assert not sb.is_running()
    script = ("from sandvm import Sandbox\n"
              f"sb = Sandbox.resume_from({paused.name!r})\n"
              "print(sb.sandbox_id, sb.files.read('/root/keep.txt'))\n"
              "sb.kill()\n")
    env = dict(os.environ, SANDVM_SNAPSHOT_DIR=str(store.root))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"{sb.sandbox_id} survives the process"
    assert not store.exists(paused.name)  # resuming consumed the paused snapshot


def test_diff_snapshot_stores_only_changes(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store")
    with Sandbox.create() as sb:
        sb.files.write("/root/gen", "one")
        full = sb.snapshot("full", store=store)
        sb.files.write("/root/gen", "two")
        sb.files.write("/root/extra.bin", b"z" * 100_000)
        diff = sb.snapshot("diff", store=store, parent=full)
    assert diff.ram == "diff" and diff.parent == "full"
    full_mem = full.files["mem"]["size"]
    assert diff.files["mem.diff"]["size"] < full.size_bytes / 2  # only what changed
    assert full_mem == diff.spec.memory_mib * 2**20
    store.verify(diff)
    with Sandbox.from_snapshot("diff", store=store) as c:
        assert c.files.read("/root/gen") == "two"
        assert len(c.files.read("/root/extra.bin", format="bytes")) == 100_000
    with Sandbox.from_snapshot("full", store=store) as c:
        assert c.files.read("/root/gen") == "one"
    cached = store.materialized_dir(diff)
    assert (cached / "mem").exists()
    # a diff whose parent is gone is refused
    store.remove("full")
    with pytest.raises(SnapshotNotFound, match="parent"):
        Sandbox.from_snapshot("diff", store=store, verify="full")
    store.remove("diff")
    assert not cached.exists()  # its built RAM image went with it
