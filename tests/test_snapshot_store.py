"""The snapshot format and store, without VMs: atomic commits, damage and foreign data."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandvm.errors import (
    SnapshotAlreadyExists,
    SnapshotCorrupt,
    SnapshotIncompatible,
    SnapshotNotFound,
)
from sandvm.snapshots import FORMAT, FORMAT_VERSION, SnapshotStore

MANIFEST = {
    "sandvm_version": "0.1.0", "qemu_version": "QEMU emulator version 7.2.22",
    "machine": "microvm", "accelerator": "tcg", "cpu": "max", "kernel_release": "k",
    "created": 1.0, "source_id": "sb-x",
    "spec": {"image": "base", "memory_mib": 256, "vcpus": 1},
}


def make(store: SnapshotStore, name: str = "s1", mem: bytes = b"\x00" * 8192 + b"RAM") -> Path:
    staging = store.staging(name)
    (staging / "state").write_bytes(b"QEVM device state")
    with open(staging / "mem", "wb") as f:
        f.truncate(1 << 20)  # sparse, like a guest RAM file
        f.write(mem)
    store.commit(staging, name, dict(MANIFEST))
    return store.root / name


def test_commit_then_load(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    path = make(store)
    snap = store.get("s1")
    assert snap.path == path and snap.name == "s1"
    assert snap.spec.memory_mib == 256 and snap.accelerator == "tcg"
    man = json.loads((path / "manifest.json").read_text())
    assert man["format"] == FORMAT and man["format_version"] == FORMAT_VERSION
    assert man["files"]["mem"]["size"] == 1 << 20
    assert len(man["files"]["state"]["sha256"]) == 64
    store.verify(snap)  # intact
    assert [s.name for s in store.list()] == ["s1"]
    assert snap.size_bytes < 1 << 20  # the RAM file stayed sparse


def test_duplicate_name_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    make(store)
    with pytest.raises(SnapshotAlreadyExists, match="snapshot rm s1"):
        store.staging("s1")


def test_unknown_and_invalid_names(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotNotFound, match="snapshot ls"):
        store.get("nope")
    from sandvm.errors import InvalidSpec

    with pytest.raises(InvalidSpec):
        store.get("../etc")


def test_interrupted_save_is_not_a_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    staging = store.staging("half")
    (staging / "state").write_bytes(b"partial")
    # crash here: no commit
    assert store.list() == []
    with pytest.raises(SnapshotNotFound):
        store.get("half")
    assert store.clean_staging(older_than=0) == []  # its owner (we) still runs
    (staging / "owner").write_text("999999999 0\n")  # as if we had died
    assert store.clean_staging() == [staging]
    assert not staging.exists()


def test_a_save_whose_process_died_is_swept_by_the_next_save(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    # a save in another process that was SIGKILLed before its commit
    code = ("import os, sys; from sandvm.snapshots import SnapshotStore;"
            " d = SnapshotStore(sys.argv[1]).staging('cut'); (d / 'mem').write_bytes(b'x');"
            " print(d, flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True)
    dead = Path(out.stdout.strip())
    assert out.returncode == -9 and dead.is_dir()
    mine = store.staging("live")  # ours runs: kept; the dead process's goes at once
    assert not dead.exists() and mine.is_dir()
    assert store.clean_staging() == [] and mine.is_dir()
    (mine / "state").write_bytes(b"QEVM")
    (mine / "mem").write_bytes(b"\0" * 4096)
    snap = store.commit(mine, "live", dict(MANIFEST))
    assert not (snap.path / "owner").exists()  # the owner file is not part of it
    store.verify(snap, full=True)


def test_truncated_file_is_corrupt(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    path = make(store)
    os.truncate(path / "mem", 4096)
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        store.get("s1")
    assert store.list() == []  # a damaged snapshot is not offered


def test_altered_byte_is_corrupt(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    path = make(store)
    snap = store.get("s1")
    with open(path / "mem", "r+b") as f:
        f.seek(8192)
        f.write(b"X")
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        store.verify(snap)
    with open(path / "state", "r+b") as f:
        f.write(b"Z")
    with pytest.raises(SnapshotCorrupt, match="state"):
        store.verify(snap, full=False)  # the small state file is always checked


def test_missing_files_and_manifest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    path = make(store)
    (path / "state").unlink()
    with pytest.raises(SnapshotCorrupt, match="missing"):
        store.get("s1")
    (path / "manifest.json").unlink()
    with pytest.raises(SnapshotCorrupt, match="no manifest"):
        store.get("s1")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotCorrupt, match="not valid JSON"):
        store.get("s1")


def test_foreign_and_future_formats_are_incompatible(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    path = make(store)
    man = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**man, "format": "firecracker"}))
    with pytest.raises(SnapshotIncompatible, match="not a sandvm snapshot"):
        store.get("s1")
    (path / "manifest.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(SnapshotIncompatible, match="format version 99"):
        store.get("s1")
    only_state = {"state": man["files"]["state"]}
    (path / "manifest.json").write_text(json.dumps({**man, "files": only_state}))
    with pytest.raises(SnapshotCorrupt):
        store.get("s1")


def test_remove(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    make(store, "a")
    make(store, "b")
    store.remove("a")
    assert [s.name for s in store.list()] == ["b"]
    with pytest.raises(SnapshotNotFound):
        store.remove("a")
    assert not any(p.name.startswith(".trash") for p in tmp_path.iterdir())


def _ram_snapshot(store: SnapshotStore, name: str, data_bytes: int) -> None:
    """A snapshot whose sparse 64 MiB RAM file holds ``data_bytes`` of data."""
    staging = store.staging(name)
    (staging / "state").write_bytes(b"QEVM device state")
    with open(staging / "mem", "wb") as f:
        f.truncate(64 << 20)
        f.write(os.urandom(data_bytes))
    store.commit(staging, name, dict(MANIFEST))


def test_byte_quota_counts_what_is_on_disk_and_refuses_cleanly(tmp_path: Path) -> None:
    from sandvm.errors import InvalidSpec, QuotaExceeded

    store = SnapshotStore(tmp_path, max_bytes=3 << 20)
    _ram_snapshot(store, "a", 1 << 20)
    used = store.bytes_used()
    assert (1 << 20) <= used < (1 << 20) + (64 << 10)  # the data, not the 64 MiB file
    _ram_snapshot(store, "b", 1 << 20)
    with pytest.raises(QuotaExceeded, match="over the store's cap") as ei:
        _ram_snapshot(store, "c", 1 << 20)  # 3 MiB of data + state and manifests
    assert "remove snapshots" in ei.value.message
    # nothing left of the refused save: no snapshot, no staging directory
    assert [s.name for s in store.list()] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".quota.lock", "a", "b"]
    assert store.bytes_used() < 3 << 20
    store.remove("a")
    _ram_snapshot(store, "c", 1 << 20)  # room again
    assert SnapshotStore(tmp_path).max_bytes is None  # no cap unless given
    with pytest.raises(InvalidSpec):
        SnapshotStore(tmp_path, max_bytes=0)


def test_byte_quota_leaves_out_files_shared_with_the_image_cache(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store", max_bytes=1 << 30)
    cache = tmp_path / "image.ext4"
    cache.write_bytes(os.urandom(2 << 20))  # an image's root filesystem
    _ram_snapshot(store, "a", 4096)
    before = store.bytes_used()
    os.link(cache, store.root / "a" / "image-root.ext4")  # as saving.export_disks pins it
    assert store.bytes_used() == before  # the image cache's file, not the tenant's
    cache.unlink()  # evicted from the cache: now only the snapshot keeps it
    assert store.bytes_used() >= before + (2 << 20)


def test_byte_quota_holds_against_concurrent_commits(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two saves of which one fits, each in its own thread with its own store object
    (as two processes would be): their measurements never overlap. The measurement
    waits (at most 2 s) for the other one to measure too, so that without the store's
    lock both would see the store empty and both be kept."""
    import threading

    from sandvm.errors import QuotaExceeded

    measuring = threading.Barrier(2)
    measure = SnapshotStore.bytes_used

    def slow_measure(self: SnapshotStore, *, staged: Path | None = None) -> int:
        with contextlib.suppress(threading.BrokenBarrierError):
            measuring.wait(timeout=2)
        return measure(self, staged=staged)

    monkeypatch.setattr(SnapshotStore, "bytes_used", slow_measure)
    outcomes: list[str] = []
    staged = threading.Barrier(2)

    def save(i: int) -> None:
        store = SnapshotStore(tmp_path, max_bytes=(1 << 20) + (256 << 10))  # one fits
        staging = store.staging(f"s{i}")
        (staging / "state").write_bytes(b"QEVM")
        (staging / "mem").write_bytes(os.urandom(1 << 20))
        staged.wait(timeout=30)
        try:
            store.commit(staging, f"s{i}", dict(MANIFEST))
            outcomes.append("ok")
        except QuotaExceeded:
            outcomes.append("quota")

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["ok", "quota"]
    assert len(SnapshotStore(tmp_path).list()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]


def test_spec_only_snapshot_loads_verifies_and_refuses_to_restore(tmp_path: Path) -> None:
    """A snapshot of a VM never booted ("ram": "none"): no files, its spec as given."""
    store = SnapshotStore(tmp_path)
    staging = store.staging("created")
    disk = {"serial": "data", "path": "/srv/data.raw", "format": "raw", "read_only": True}
    snap = store.commit(staging, "created", {**MANIFEST, "spec": {
        **MANIFEST["spec"], "disks": [disk]}})
    assert snap.ram == "none" and snap.files == {}
    loaded = store.get("created")
    assert loaded.ram == "none" and loaded.spec == snap.spec
    assert loaded.spec.disks[0].path == "/srv/data.raw"  # as given: nothing was copied
    store.verify(loaded)
    with pytest.raises(SnapshotIncompatible, match=r"never booted.*create a VM with its spec"):
        store.materialize(loaded)
    # a "none" manifest that lists files is damaged, not spec-only
    man = json.loads((snap.path / "manifest.json").read_text())
    man["files"] = {"state": {"size": 1, "sha256": "0" * 64}}
    (snap.path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SnapshotCorrupt):
        store.get("created")
