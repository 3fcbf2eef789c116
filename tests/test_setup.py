"""`sandvm setup`: idempotent, and each failure names its step and what to do."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

from sandvm.assets import buildkey, cpio, paths, setup
from sandvm.errors import AssetMissing, SetupError


@pytest.mark.qemu
def test_second_setup_does_nothing() -> None:
    setup.run_setup()  # brings the assets up to date if the sources changed
    results = dict(setup.run_setup())
    assert "already" in results["host packages"]
    assert "already unpacked" in results["guest kernel"]
    assert "up to date" in results["guest initramfs"]


def test_missing_tool_names_the_step() -> None:
    with pytest.raises(SetupError) as ei:
        setup._run("guest kernel", ["/nonexistent/dpkg-deb", "-x"], hint="install dpkg")
    assert ei.value.step == "guest kernel"
    assert "guest kernel" in ei.value.message and "install dpkg" in ei.value.message


def test_failing_command_reports_its_output() -> None:
    with pytest.raises(SetupError) as ei:
        setup._run("QEMU", ["sh", "-c", "echo broken >&2; exit 3"], hint="reinstall it")
    assert "exited 3" in ei.value.message and "broken" in ei.value.message


def test_cpio_writer_is_deterministic_newc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "link").symlink_to("bin/tool")
    a, b = io.BytesIO(), io.BytesIO()
    cpio.write_cpio(root, a)
    cpio.write_cpio(root, b)
    data = a.getvalue()
    assert data == b.getvalue()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert b"TRAILER!!!" in data and b"bin/tool" in data and b"echo hi" in data
    # entries are listed parents first
    assert data.index(b"bin\0") < data.index(b"bin/tool\0")


def test_module_dependencies_are_checked(tmp_path: Path) -> None:
    ko = tmp_path / "virtio_mmio.ko"
    ko.write_bytes(b"\x7fELF junk\x00license=GPL\x00depends=virtio,virtio_ring\x00intree=Y\x00")
    assert setup._modinfo_depends(ko) == ["virtio", "virtio_ring"]
    ko.write_bytes(b"\x00depends=\x00")
    assert setup._modinfo_depends(ko) == []


# ------------------------------------------------------------------ builds keyed by content


def _fake_build(home: Path, key: str) -> Path:
    """A guest build as `sandvm setup` leaves it (its manifest written by setup itself)."""
    kdir = home / "kernel" / "6.1-test"
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "vmlinuz").write_bytes(b"kernel")
    cpio_path = home / "initramfs" / key / f"{key[:4]}cpio.cpio"
    cpio_path.parent.mkdir(parents=True, exist_ok=True)
    cpio_path.write_bytes(key.encode())
    setup._write_manifest(kdir, cpio_path, "6.1-test", key)
    return cpio_path


def test_two_builds_side_by_side_each_host_selects_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDVM_HOME", str(tmp_path))
    monkeypatch.setenv("SANDVM_QEMU", sys.executable)
    ours = buildkey.build_key()
    other = "0" * 20
    mine = _fake_build(tmp_path, ours)
    theirs = _fake_build(tmp_path, other)  # the other version's setup ran last
    assert json.loads((tmp_path / "assets.json").read_text())["initramfs"] == str(theirs)
    assert paths.find_assets(tmp_path).initramfs == mine
    # the other version (another build key) finds its own, not ours
    monkeypatch.setattr(paths, "build_key", lambda: other)
    assert paths.find_assets(tmp_path).initramfs == theirs


def test_find_assets_without_this_build_says_to_run_setup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDVM_HOME", str(tmp_path))
    monkeypatch.setenv("SANDVM_QEMU", sys.executable)
    _fake_build(tmp_path, "0" * 20)  # only another version's guest is built
    with pytest.raises(AssetMissing) as ei:
        paths.find_assets(tmp_path)
    assert "sandvm setup" in ei.value.message and buildkey.build_key() in ei.value.message
    assert "other sandvm versions" in ei.value.message


def test_build_key_follows_what_the_package_ships() -> None:
    files = buildkey.guest_files()
    assert set(files) == {"init", "usr/bin/nohup", "lib/sandvm/agent.py", "lib/sandvm/wire.py"}
    assert buildkey.build_key(files) == buildkey.build_key()
    for name in files:
        changed = {**files, name: files[name] + b"\n# another version\n"}
        assert buildkey.build_key(changed) != buildkey.build_key(files), name


def test_prune_keeps_this_build_and_the_newest_others(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDVM_HOME", str(tmp_path))
    keys = [f"{i:020x}" for i in range(6)]
    for i, key in enumerate(keys):
        _fake_build(tmp_path, key)
        os.utime(tmp_path / "initramfs" / key / "assets.json", (1000 + i, 1000 + i))
    (tmp_path / "initramfs" / "legacy.cpio").write_bytes(b"an old layout's build")
    removed = setup.prune_builds(keep=2, current=keys[0], home=tmp_path)
    assert sorted(removed) == keys[1:4]
    left = sorted(p.name for p in (tmp_path / "initramfs").iterdir())
    assert left == sorted([keys[0], keys[4], keys[5], "legacy.cpio"])
