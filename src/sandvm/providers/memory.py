"""``InMemoryVmProvider``: a deterministic fake of the provider port for tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sandvm.core import VmSpec, VmState, VmView, validate_vm_id
from sandvm.errors import (
    InvalidTransition,
    SnapshotAlreadyExists,
    Unsupported,
    VmAlreadyExists,
    VmNotFound,
)
from sandvm.providers.base import check_transition

__all__ = ["InMemoryVmProvider"]


@dataclass
class _Record:
    spec: VmSpec
    state: VmState = VmState.CREATED
    snapshots: list[str] = field(default_factory=list)


class InMemoryVmProvider:
    """Keeps VM records in a dict; no processes. Safe to share across tasks."""

    def __init__(self) -> None:
        self._vms: dict[str, _Record] = {}
        self._lock = asyncio.Lock()

    def _get(self, vm_id: str) -> _Record:
        rec = self._vms.get(vm_id)
        if rec is None:
            raise VmNotFound(vm_id)
        return rec

    async def create_vm(self, vm_id: str) -> None:
        await self.create_vm_with_spec(vm_id, VmSpec())

    async def create_vm_with_spec(self, vm_id: str, spec: VmSpec) -> None:
        validate_vm_id(vm_id)
        async with self._lock:
            if vm_id in self._vms:
                raise VmAlreadyExists(vm_id)
            self._vms[vm_id] = _Record(spec=spec)

    async def _move(self, vm_id: str, target: VmState) -> None:
        async with self._lock:
            rec = self._get(vm_id)
            check_transition(vm_id, rec.state, target)
            rec.state = target

    async def start_vm(self, vm_id: str) -> None:
        await self._move(vm_id, VmState.RUNNING)

    async def stop_vm(self, vm_id: str) -> None:
        await self._move(vm_id, VmState.STOPPED)

    async def destroy_vm(self, vm_id: str) -> None:
        await self._move(vm_id, VmState.DESTROYED)

    async def snapshot_vm(self, vm_id: str, snapshot_id: str) -> None:
        validate_vm_id(snapshot_id)
        async with self._lock:
            rec = self._get(vm_id)
            if rec.state is VmState.DESTROYED:
                raise InvalidTransition(VmState.DESTROYED, VmState.DESTROYED, vm_id=vm_id)
            if snapshot_id in rec.snapshots:
                raise SnapshotAlreadyExists(vm_id, snapshot_id)
            rec.snapshots.append(snapshot_id)

    async def rename_vm(self, old_vm_id: str, new_vm_id: str) -> None:
        raise Unsupported("InMemoryVmProvider does not support rename_vm")

    async def list_vms(self) -> list[VmView]:
        return [self._view(k, v) for k, v in sorted(self._vms.items())]

    async def get_vm(self, vm_id: str) -> VmView | None:
        rec = self._vms.get(vm_id)
        return None if rec is None else self._view(vm_id, rec)

    async def list_snapshots(self, vm_id: str) -> list[str] | None:
        rec = self._vms.get(vm_id)
        return None if rec is None else list(rec.snapshots)

    @staticmethod
    def _view(vm_id: str, rec: _Record) -> VmView:
        return VmView(vm_id=vm_id, state=rec.state, spec=rec.spec,
                      snapshots=tuple(rec.snapshots))
