"""``SandboxManager(provider=InMemoryVmProvider())``: managed sandboxes run in this
process (no QEMU, no keeper). Journalled as managed ones (listed, TTL, kill by id),
not detachable nor attachable from another process, ended by ``close``; what needs
QEMU (restore, fork) is Unsupported."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sandvm.errors import SandboxStateError, Unsupported
from sandvm.providers.memory import InMemoryVmProvider
from sandvm.runtime.journal import Journal, JournalState
from sandvm.runtime.manager import SandboxManager, in_process, keeper_alive


async def _until(pred: object, what: str, timeout: float = 10.0) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_managed_sandboxes_in_process(tmp_path: Path) -> None:
    async def main() -> None:
        journal = Journal(tmp_path / "journal.db")
        m = SandboxManager(journal, provider=InMemoryVmProvider())
        sb = await m.create(ttl=60, image="base", memory_mib=256)
        rec = m.get(sb.sandbox_id)
        assert rec.state is JournalState.RUNNING and in_process(rec) and keeper_alive(rec)
        assert rec.record["spec"] == {"image": "base", "memory_mib": 256, "vcpus": 1}
        assert [i.sandbox_id for i in m.ls()] == [sb.sandbox_id]
        assert m.runs_here(sb.sandbox_id)
        assert await m.attach(sb.sandbox_id) is sb  # this process holds it already
        with pytest.raises(Unsupported, match="cannot be detached"):
            await m.detach(sb)
        with pytest.raises(Unsupported, match="QEMU"):
            await m.fork(sb, 1)
        with pytest.raises(Unsupported, match="QEMU"):
            await m.from_snapshot(tmp_path / "no-snapshot")
        # another manager on the same journal (as another process would) cannot take it
        other = SandboxManager(journal, provider=InMemoryVmProvider())
        with pytest.raises(Unsupported, match="only that process"):
            await other.attach(sb.sandbox_id)

        # the TTL: extended, then run out (its watcher ends it and the VM)
        short = await m.create(ttl=60, image="base")
        m.set_ttl(short.sandbox_id, 0.3)
        await _until(lambda: (journal.get(short.sandbox_id) or rec).state
                     is JournalState.ENDED, "the TTL to end it")
        assert journal.get(short.sandbox_id).end_reason == "expired: its TTL ran out"  # type: ignore[union-attr]
        await _until(lambda: not m.runs_here(short.sandbox_id), "its watcher to end")
        assert not await short.is_running()
        with pytest.raises(SandboxStateError):
            m.get(short.sandbox_id)

        # a kill by id, from another manager on the journal: never signals this process
        assert m.runs_here(sb.sandbox_id) and await sb.is_running()
        await other.kill(sb.sandbox_id)
        await _until(lambda: not m.runs_here(sb.sandbox_id), "the kill to be seen")
        assert not await sb.is_running()

        last = await m.create(ttl=60, image="base")
        await m.close()  # it cannot outlive this process
        assert not await last.is_running()
        assert journal.get(last.sandbox_id).state is JournalState.ENDED  # type: ignore[union-attr]
        assert m.ls() == []
        journal.close()

    asyncio.run(main())
