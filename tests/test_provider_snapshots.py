"""The seed-000 provider's snapshots are the store's format (one format, one code path).

``QemuVmProvider.snapshot_vm`` saves through ``providers.saving`` like
``AsyncSandbox.snapshot``: checksummed files that ``SnapshotStore.load``/``verify``
read and ``AsyncSandbox.from_snapshot`` restores. A Created VM's snapshot holds its
spec only and is refused on restore.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from sandvm import AsyncSandbox
from sandvm.core import VmSpec, VmState
from sandvm.errors import SnapshotCorrupt, SnapshotIncompatible
from sandvm.guestops import GuestOps
from sandvm.providers import QemuVmProvider
from sandvm.snapshots import SnapshotStore

SRC = Path(__file__).resolve().parent.parent / "src" / "sandvm"


def test_no_second_snapshot_format_is_written() -> None:
    """The seed port's own manifest (``{"format": 1, ...}``) is gone from the code that
    writes snapshots (volumes.py's record has a format 1 of its own: not a snapshot)."""
    pattern = re.compile(r"""["']format["']\s*:\s*1\b""")
    files = [*(SRC / "providers").rglob("*.py"), *(SRC / "snapshots").rglob("*.py"),
             SRC / "sandbox.py"]
    writers = [f"{p.relative_to(SRC)}:{n}" for p in sorted(files)
               for n, line in enumerate(p.read_text().splitlines(), 1)
               if pattern.search(line)]
    assert writers == []
    assert "vm-snapshots" not in (SRC / "providers" / "saving.py").read_text()


@pytest.mark.qemu
def test_provider_snapshot_is_in_the_store_format_and_restores(tmp_path: Path) -> None:
    async def main() -> None:
        p = QemuVmProvider(snapshot_dir=tmp_path)
        try:
            await p.create_vm_with_spec("vm-a", VmSpec(memory_mib=256))
            await p.snapshot_vm("vm-a", "created")
            await p.start_vm("vm-a")
            vm = p.vm("vm-a")
            assert vm.agent is not None
            await GuestOps(vm.agent).make_dir(path="/root/kept", mode=0o755, timeout=30)
            await p.snapshot_vm("vm-a", "live")
            # still running, agent answers
            assert (await p.get_vm("vm-a")).state is VmState.RUNNING  # type: ignore[union-attr]
            assert await vm.agent.ping() < 5
            await p.stop_vm("vm-a")
            await p.snapshot_vm("vm-a", "stopped")
            assert (await p.get_vm("vm-a")).state is VmState.STOPPED  # type: ignore[union-attr]
            assert await p.list_snapshots("vm-a") == ["created", "live", "stopped"]
        finally:
            await p.close()

        store = p.snapshot_store("vm-a")
        assert store.root == tmp_path / "vm-a"
        assert [s.name for s in store.list()] == ["created", "live", "stopped"]
        for name in ("live", "stopped"):
            snap = SnapshotStore.load(store.root / name)
            assert snap.ram == "file" and set(snap.files) == {"state", "mem"}
            assert snap.source_id == "vm-a" and snap.spec.memory_mib == 256
            SnapshotStore.verify(snap)

        # a VM never booted: its spec only, which loads and verifies but is no VM
        created = store.get("created")
        assert created.ram == "none" and created.files == {}
        assert created.spec == VmSpec(memory_mib=256)
        SnapshotStore.verify(created)
        with pytest.raises(SnapshotIncompatible, match="never booted"):
            await AsyncSandbox.from_snapshot(created.path)

        # a booted VM's snapshot restores into a sandbox, with its files
        sb = await AsyncSandbox.from_snapshot(store.root / "live")
        try:
            assert await sb.files.exists("/root/kept")
        finally:
            await sb.kill()

        # one flipped byte and it no longer verifies
        live = store.get("live")
        with open(live.path / "state", "r+b") as f:
            b = f.read(1)
            f.seek(0)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(SnapshotCorrupt, match="sha256"):
            SnapshotStore.verify(live)

    asyncio.run(main())
