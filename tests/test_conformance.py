"""Seed 000's provider semantics, run against every provider.

The same scenarios run against ``InMemoryVmProvider`` and against
``QemuVmProvider`` with real QEMU processes (marked ``qemu``).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sandvm.core import VmSpec, VmState
from sandvm.errors import (
    InvalidSpec,
    InvalidTransition,
    SnapshotAlreadyExists,
    Unsupported,
    VmAlreadyExists,
    VmNotFound,
)
from sandvm.providers import InMemoryVmProvider, QemuVmProvider, VmProvider, VmQuery

PROVIDERS = [
    pytest.param("memory", id="memory"),
    pytest.param("qemu", id="qemu", marks=pytest.mark.qemu),
]

Scenario = Callable[[Any], Awaitable[None]]


def run(kind: str, scenario: Scenario) -> None:
    """Run ``scenario(provider)`` on a fresh provider in its own event loop."""

    async def main(snapdir: Path) -> None:
        provider: Any = (InMemoryVmProvider() if kind == "memory"
                         else QemuVmProvider(snapshot_dir=snapdir))
        assert isinstance(provider, VmProvider)
        assert isinstance(provider, VmQuery)
        try:
            await scenario(provider)
        finally:
            if isinstance(provider, QemuVmProvider):
                await provider.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp)))


@pytest.fixture(params=PROVIDERS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_create_then_query(kind: str) -> None:
    async def s(p: Any) -> None:
        await p.create_vm("vm-a")
        view = await p.get_vm("vm-a")
        assert view is not None
        assert view.vm_id == "vm-a"
        assert view.state is VmState.CREATED
        assert view.spec == VmSpec()
        assert await p.list_snapshots("vm-a") == []

    run(kind, s)


def test_create_with_spec_keeps_spec(kind: str) -> None:
    async def s(p: Any) -> None:
        spec = VmSpec(memory_mib=512, vcpus=2)
        await p.create_vm_with_spec("vm-s", spec)
        view = await p.get_vm("vm-s")
        assert view.spec == spec

    run(kind, s)


def test_duplicate_id_refused(kind: str) -> None:
    async def s(p: Any) -> None:
        await p.create_vm("dup")
        with pytest.raises(VmAlreadyExists) as ei:
            await p.create_vm("dup")
        assert ei.value.code == "vm_already_exists"
        with pytest.raises(VmAlreadyExists):
            await p.create_vm_with_spec("dup", VmSpec())

    run(kind, s)


def test_unknown_ids(kind: str) -> None:
    async def s(p: Any) -> None:
        assert await p.get_vm("nope") is None
        assert await p.list_snapshots("nope") is None
        for call in (p.start_vm("nope"), p.stop_vm("nope"), p.destroy_vm("nope"),
                     p.snapshot_vm("nope", "s1")):
            with pytest.raises(VmNotFound):
                await call

    run(kind, s)


def test_invalid_id_refused(kind: str) -> None:
    async def s(p: Any) -> None:
        for bad in ("", "../x", "a b", "-lead", "x" * 64):
            with pytest.raises(InvalidSpec):
                await p.create_vm(bad)

    run(kind, s)


def test_listing_is_sorted(kind: str) -> None:
    async def s(p: Any) -> None:
        for vm_id in ("charlie", "alpha", "bravo"):
            await p.create_vm(vm_id)
        views = await p.list_vms()
        assert [v.vm_id for v in views] == ["alpha", "bravo", "charlie"]

    run(kind, s)


def test_stop_requires_running(kind: str) -> None:
    async def s(p: Any) -> None:
        await p.create_vm("vm-c")
        with pytest.raises(InvalidTransition) as ei:
            await p.stop_vm("vm-c")
        assert (ei.value.from_state, ei.value.to_state) == (VmState.CREATED, VmState.STOPPED)
        assert (await p.get_vm("vm-c")).state is VmState.CREATED

    run(kind, s)


def test_destroyed_is_terminal_and_kept(kind: str) -> None:
    async def s(p: Any) -> None:
        await p.create_vm("vm-d")
        await p.snapshot_vm("vm-d", "before")
        await p.destroy_vm("vm-d")
        view = await p.get_vm("vm-d")
        assert view is not None and view.state is VmState.DESTROYED
        assert await p.list_snapshots("vm-d") == ["before"]
        assert [v.vm_id for v in await p.list_vms()] == ["vm-d"]
        with pytest.raises(InvalidTransition) as ei:
            await p.start_vm("vm-d")
        assert (ei.value.from_state, ei.value.to_state) == (VmState.DESTROYED, VmState.RUNNING)
        with pytest.raises(InvalidTransition):
            await p.stop_vm("vm-d")
        with pytest.raises(InvalidTransition) as ei:
            await p.destroy_vm("vm-d")
        assert ei.value.from_state is VmState.DESTROYED
        with pytest.raises(InvalidTransition):
            await p.snapshot_vm("vm-d", "after")
        with pytest.raises(VmAlreadyExists):
            await p.create_vm("vm-d")

    run(kind, s)


def test_snapshot_names_unique_and_ordered(kind: str) -> None:
    async def s(p: Any) -> None:
        await p.create_vm("vm-e")
        await p.snapshot_vm("vm-e", "s2")
        await p.snapshot_vm("vm-e", "s1")
        with pytest.raises(SnapshotAlreadyExists) as ei:
            await p.snapshot_vm("vm-e", "s2")
        assert ei.value.code == "snapshot_already_exists"
        assert await p.list_snapshots("vm-e") == ["s2", "s1"]

    run(kind, s)


def test_rename_unsupported(kind: str) -> None:
    async def s(p: Any) -> None:
        await p.create_vm("vm-r")
        with pytest.raises(Unsupported):
            await p.rename_vm("vm-r", "vm-r2")
        assert await p.get_vm("vm-r2") is None

    run(kind, s)


def test_full_lifecycle(kind: str) -> None:
    """Created → Running → Stopped → Running → Destroyed, with the refusals on the way."""

    async def s(p: Any) -> None:
        await p.create_vm("vm-l")
        await p.start_vm("vm-l")
        assert (await p.get_vm("vm-l")).state is VmState.RUNNING
        with pytest.raises(InvalidTransition) as ei:
            await p.start_vm("vm-l")
        assert (ei.value.from_state, ei.value.to_state) == (VmState.RUNNING, VmState.RUNNING)
        await p.snapshot_vm("vm-l", "live")
        assert (await p.get_vm("vm-l")).state is VmState.RUNNING
        await p.stop_vm("vm-l")
        assert (await p.get_vm("vm-l")).state is VmState.STOPPED
        with pytest.raises(InvalidTransition) as ei:
            await p.stop_vm("vm-l")
        assert (ei.value.from_state, ei.value.to_state) == (VmState.STOPPED, VmState.STOPPED)
        await p.snapshot_vm("vm-l", "stopped")
        await p.start_vm("vm-l")
        assert (await p.get_vm("vm-l")).state is VmState.RUNNING
        if isinstance(p, QemuVmProvider):
            # really running again: the agent answers
            vm = p.vm("vm-l")
            assert vm.agent is not None
            assert await vm.agent.ping() < 5
        assert await p.list_snapshots("vm-l") == ["live", "stopped"]
        await p.destroy_vm("vm-l")
        assert (await p.get_vm("vm-l")).state is VmState.DESTROYED

    run(kind, s)
