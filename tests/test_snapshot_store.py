"""The snapshot format and store, without VMs: atomic commits, damage and foreign data."""

from __future__ import annotations

import json
import os
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
    assert store.clean_staging(older_than=0) == [staging]
    assert not staging.exists()


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
