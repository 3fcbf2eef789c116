"""`sandvm setup`: idempotent, and each failure names its step and what to do."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sandvm.assets import cpio, setup
from sandvm.errors import SetupError


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
