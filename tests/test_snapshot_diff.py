"""RAM diffs: pages that differ from a parent, applied back exactly, damage refused."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from sandvm.errors import SnapshotCorrupt
from sandvm.snapshots.diff import PAGE, apply_diff, write_diff


def _ram(path: Path, pages: dict[int, bytes], size: int = 64 * PAGE) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for idx, data in pages.items():
            f.seek(idx * PAGE)
            f.write(data)


def test_roundtrip_stores_only_changed_pages(tmp_path: Path) -> None:
    base, new = tmp_path / "base", tmp_path / "new"
    same = os.urandom(PAGE)
    _ram(base, {0: same, 5: os.urandom(PAGE), 40: os.urandom(PAGE)})
    _ram(new, {0: same, 5: os.urandom(PAGE), 41: os.urandom(PAGE)})  # 5 changed, 40 zeroed
    diff = tmp_path / "mem.diff"
    assert write_diff(base, new, diff) == 3  # pages 5, 40 and 41
    assert diff.stat().st_size < 4 * (PAGE + 8) + 64
    out = tmp_path / "out"
    assert apply_diff(base, diff, out) == 3
    assert out.read_bytes() == new.read_bytes()


def test_identical_memory_gives_an_empty_diff(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _ram(base, {3: os.urandom(PAGE)})
    diff = tmp_path / "d"
    assert write_diff(base, base, diff) == 0
    out = tmp_path / "out"
    assert apply_diff(base, diff, out) == 0
    assert out.read_bytes() == base.read_bytes()


def test_damaged_diffs_are_refused(tmp_path: Path) -> None:
    base, new = tmp_path / "base", tmp_path / "new"
    _ram(base, {})
    _ram(new, {1: b"x" * PAGE, 2: b"y" * PAGE})
    diff = tmp_path / "d"
    write_diff(base, new, diff)
    good = diff.read_bytes()
    head = 8 + 4 + 8
    cases = {
        "truncated": good[:-20],
        "bad magic": b"NOTADIFF" + good[8:],
        "out of order": good[:head] + struct.pack("<Q", 2) + good[head + 8:head + 8 + PAGE]
        + struct.pack("<Q", 1) + good[head + 8 + PAGE + 8:],
        "index past the end": good[:head] + struct.pack("<Q", 10**9) + good[head + 8:],
        "bad count": good[:-8] + struct.pack("<Q", 7),
        "trailing garbage": good + b"!",
    }
    for why, data in cases.items():
        diff.write_bytes(data)
        with pytest.raises(SnapshotCorrupt):
            apply_diff(base, diff, tmp_path / f"out-{why}")


def test_size_mismatch_refused(tmp_path: Path) -> None:
    base, new = tmp_path / "base", tmp_path / "new"
    _ram(base, {}, size=8 * PAGE)
    _ram(new, {}, size=16 * PAGE)
    with pytest.raises(ValueError, match="differ in size"):
        write_diff(base, new, tmp_path / "d")


def test_copy_into_a_preallocated_file_keeps_content_and_holes(tmp_path: Path) -> None:
    from sandvm._files import data_extents, preallocate_like, sparse_copy

    src, dst = tmp_path / "src", tmp_path / "dst"
    _ram(src, {1: os.urandom(PAGE), 30: os.urandom(PAGE)})
    preallocate_like(src, dst)
    # the source changes after the destination was laid out: a page is dropped (a
    # hole again) and another one appears
    _ram(src, {1: os.urandom(PAGE), 50: os.urandom(PAGE)})
    sparse_copy(src, dst, into_existing=True)
    assert dst.read_bytes() == src.read_bytes()
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert data_extents(a.fileno()) == data_extents(b.fileno())


def test_identical_diffs_over_different_parents_never_share_a_built_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tenants' stores, each a parent with its own RAM and a diff snapshot whose
    files (mem.diff, state) have the same bytes: every restore gets its own parent's
    memory, not the RAM image built first for the other one."""
    from sandvm.snapshots import SnapshotStore

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("SANDVM_RUNTIME_DIR", str(runtime))  # the host's one cache
    manifest = {"sandvm_version": "0.1.0", "qemu_version": "q", "machine": "microvm",
                "accelerator": "tcg", "cpu": "max", "kernel_release": "k", "created": 1.0,
                "source_id": "sb-x", "spec": {"image": "base", "memory_mib": 256, "vcpus": 1}}
    changed = os.urandom(PAGE)  # the one page both diffs write (page 5)
    secrets = {"a": os.urandom(PAGE), "b": os.urandom(PAGE)}  # page 0: each tenant's own
    diffs = {}
    for tenant, secret in secrets.items():
        store = SnapshotStore(tmp_path / tenant)
        staging = store.staging("base")
        (staging / "state").write_bytes(b"QEVM parent state")
        _ram(staging / "mem", {0: secret}, size=256 * PAGE)
        parent = store.commit(staging, "base", dict(manifest))
        new = tmp_path / f"new-{tenant}"
        _ram(new, {0: secret, 5: changed}, size=256 * PAGE)
        staging = store.staging("child")
        (staging / "state").write_bytes(b"QEVM child state")  # the same bytes for both
        assert write_diff(parent.path / "mem", new, staging / "mem.diff") == 1
        diffs[tenant] = store.commit(staging, "child", {**manifest, "parent": {
            "name": "base", "mem_sha256": parent.files["mem"]["sha256"]}})
    a, b = diffs["a"], diffs["b"]
    assert a.files == b.files  # byte-identical diff snapshots (same sha256s) ...
    assert a.parent_mem_sha256 != b.parent_mem_sha256  # ... over different parents
    built = {}
    for tenant, snap in diffs.items():
        store = SnapshotStore(tmp_path / tenant)
        store.verify(snap)
        built[tenant] = store.materialize(snap)
    assert built["a"] != built["b"]
    for tenant, secret in secrets.items():
        mem = (built[tenant] / "mem").read_bytes()
        assert mem[:PAGE] == secret and mem[5 * PAGE:6 * PAGE] == changed
        assert (built[tenant] / "state").read_bytes() == b"QEVM child state"
        assert built[tenant] == SnapshotStore.materialized_dir(diffs[tenant])
    # removing one tenant's diff removes its own built image only
    SnapshotStore(tmp_path / "a").remove("child")
    assert not built["a"].exists() and (built["b"] / "mem").exists()
