"""Stale runtime dirs (owner process gone) are swept; live ones are kept."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sandvm.providers.qemu import OWNER_FILE, sweep_stale_rundirs, write_owner


def test_sweep_removes_only_dead_owners(tmp_path: Path) -> None:
    live = tmp_path / "vm-live"
    live.mkdir()
    write_owner(live)
    (live / "mem").write_bytes(b"x")

    dead = tmp_path / "vm-dead"
    dead.mkdir()
    proc = subprocess.Popen(["true"])
    proc.wait()
    start = "12345"  # any start time: the pid is gone
    (dead / OWNER_FILE).write_text(f"{proc.pid} {start}\n")
    (dead / "mem").write_bytes(b"x" * 100)

    reused = tmp_path / "vm-reused"  # pid alive but a different process (pid reuse)
    reused.mkdir()
    (reused / OWNER_FILE).write_text("1 999999999\n")

    unknown = tmp_path / "not-ours"
    unknown.mkdir()

    removed = sweep_stale_rundirs(tmp_path)
    assert sorted(p.name for p in removed) == ["vm-dead", "vm-reused"]
    assert live.exists() and unknown.exists()
    assert not dead.exists() and not reused.exists()


def test_runtime_root_refuses_an_unsafe_directory(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from sandvm.errors import ConfigError
    from sandvm.providers.qemu import runtime_root

    monkeypatch.setenv("SANDVM_RUNTIME_DIR", str(tmp_path))
    root = runtime_root()
    assert root.stat().st_mode & 0o777 == 0o700
    root.chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        runtime_root()
    root.rmdir()
    os.symlink(tmp_path, root)
    with pytest.raises(ConfigError, match="not a directory"):
        runtime_root()


def test_gc_sweeps_fork_snapshots_of_dead_processes(tmp_path: Path) -> None:
    from sandvm.runtime.journal import Journal
    from sandvm.runtime.manager import SandboxManager
    from sandvm.sandbox import fork_roots

    tmpfs_root, disk_side = fork_roots()
    mine = tmpfs_root / "fork-mine"
    mine.mkdir(parents=True, exist_ok=True)
    write_owner(mine)  # a fork in progress here: kept
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = []
    for root in (tmpfs_root, disk_side):  # both places a fork puts its snapshot
        d = root / f"fork-of-{proc.pid}"
        d.mkdir(parents=True, exist_ok=True)
        (d / OWNER_FILE).write_text(f"{proc.pid} 12345\n")
        (d / "mem").write_bytes(b"x" * 4096)
        dead.append(d)
    m = SandboxManager(Journal(tmp_path / "journal.db"))
    try:
        m.gc()
    finally:
        m.journal.close()
    assert not any(d.exists() for d in dead)
    assert mine.exists()
    (mine / OWNER_FILE).unlink()
    mine.rmdir()
