"""The seed-000 provider port over real QEMU processes, and the QEMU backend's names.

:class:`QemuVmProvider` puts seed 000's lifecycle on top of :class:`QemuVm` (one
supervised ``qemu-system-x86_64 -M microvm`` process, providers/qemu_vm.py): Created
(spec only, no process) → Running (QEMU booted, agent ready) ⇄ Stopped (vCPUs paused)
→ Destroyed (process gone, record kept). Its snapshots are written by the same code
as a sandbox's (providers/saving.py) into a SnapshotStore per VM.

The backend is split by job: launching and confining a QEMU (providers/launch.py),
choosing the accelerator (providers/accel.py), the process itself
(providers/qemu_vm.py), saving it (providers/saving.py). Their public names are
importable from here too (``sandvm.providers.qemu``), as before the split.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandvm._files import (
    OWNER_FILE,
    move_file,
    proc_start_time,
    runtime_root,
    write_owner,
)
from sandvm.assets import Assets, find_assets, sandvm_home
from sandvm.core import VmSpec, VmState, VmView, validate_vm_id
from sandvm.errors import (
    AgentError,
    InvalidTransition,
    SandvmError,
    SnapshotAlreadyExists,
    Unsupported,
    VmAlreadyExists,
    VmNotFound,
)
from sandvm.providers.accel import AccelChoice, choose_accel
from sandvm.providers.base import check_transition
from sandvm.providers.launch import (
    DEFAULT_BOOT_TIMEOUT,
    Confinement,
    backing_chain,
    build_argv,
    child_setup,
    confinement,
    console_tail,
    disk_root,
    host_tsc_khz,
    make_overlay,
    orphaned_qemus,
    prepare_launch,
    qcow2_backing,
    qemu_img,
    scrub,
    sweep_stale_rundirs,
)
from sandvm.providers.qemu_vm import QemuVm, QemuVmState
from sandvm.providers.saving import save_spec, save_vm
from sandvm.snapshots.store import SnapshotStore

__all__ = [
    "DEFAULT_BOOT_TIMEOUT",
    "OWNER_FILE",
    "AccelChoice",
    "Confinement",
    "QemuVm",
    "QemuVmProvider",
    "QemuVmState",
    "backing_chain",
    "build_argv",
    "child_setup",
    "choose_accel",
    "confinement",
    "console_tail",
    "disk_root",
    "host_tsc_khz",
    "make_overlay",
    "move_file",
    "orphaned_qemus",
    "prepare_launch",
    "proc_start_time",
    "qcow2_backing",
    "qemu_img",
    "runtime_root",
    "scrub",
    "sweep_stale_rundirs",
    "write_owner",
]


@dataclass
class _Entry:
    spec: VmSpec
    state: VmState = VmState.CREATED
    vm: QemuVm | None = None
    snapshots: list[str] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keeper_job: dict[str, Any] | None = None


class QemuVmProvider:
    """Seed 000's provider over real QEMU processes.

    Stop pauses the vCPUs (the VM keeps its memory); start from Stopped resumes.
    A VM whose QEMU died is reported with ``failure`` set and can only be destroyed.
    Each VM has its own lock: a slow boot of one never blocks calls on another.
    """

    def __init__(self, *, assets: Assets | None = None, accel: str | None = None,
                 snapshot_dir: Path | None = None,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        self._assets = assets
        self._accel = accel
        self._entries: dict[str, _Entry] = {}
        self._resolve_lock = asyncio.Lock()
        self._snapshot_dir = snapshot_dir
        self.boot_timeout = boot_timeout

    async def _resolve(self) -> tuple[Assets, str]:
        async with self._resolve_lock:
            if self._assets is None:
                self._assets = find_assets()
            if self._accel is None:
                self._accel = (await choose_accel(self._assets)).accel
            return self._assets, self._accel

    def _get(self, vm_id: str) -> _Entry:
        e = self._entries.get(vm_id)
        if e is None:
            raise VmNotFound(vm_id)
        return e

    def vm(self, vm_id: str) -> QemuVm:
        """The running QemuVm behind ``vm_id``. Raises VmNotFound, InvalidTransition."""
        e = self._get(vm_id)
        if e.vm is None:
            raise InvalidTransition(e.state, VmState.RUNNING, vm_id=vm_id)
        return e.vm

    async def create_vm(self, vm_id: str) -> None:
        await self.create_vm_with_spec(vm_id, VmSpec())

    async def create_vm_with_spec(self, vm_id: str, spec: VmSpec) -> None:
        validate_vm_id(vm_id)
        if vm_id in self._entries:
            raise VmAlreadyExists(vm_id)
        self._entries[vm_id] = _Entry(spec=spec)  # no await in between: atomic

    def make_detachable(self, vm_id: str, keeper_job: dict[str, Any]) -> None:
        """Start the Created VM ``vm_id`` under a keeper (``keeper_job`` names the
        journal), so it can outlive this process. Raises VmNotFound."""
        self._get(vm_id).keeper_job = dict(keeper_job)

    async def adopt_vm(self, vm_id: str, vm: QemuVm) -> None:
        """Register a VM attached from elsewhere (``QemuVm.attach``) as Running."""
        validate_vm_id(vm_id)
        if vm_id in self._entries and self._entries[vm_id].state is not VmState.DESTROYED:
            raise VmAlreadyExists(vm_id)
        self._entries[vm_id] = _Entry(spec=vm.spec, state=VmState.RUNNING, vm=vm)

    async def restore_vm(self, vm_id: str, snapshot_dir: Path) -> None:
        """Start a Created VM from a snapshot directory instead of booting it (its spec
        must be the snapshot's). Raises InvalidTransition, VmBootError."""
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.RUNNING)
            if e.state is not VmState.CREATED:
                raise InvalidTransition(e.state, VmState.RUNNING, vm_id=vm_id)
            assets, accel = await self._resolve()
            vm = QemuVm(vm_id, e.spec, assets=assets, accel=accel)
            vm.keeper_job = e.keeper_job
            await vm.boot(timeout=self.boot_timeout, restore_from=snapshot_dir)
            e.vm = vm
            e.state = VmState.RUNNING

    async def start_vm(self, vm_id: str) -> None:
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.RUNNING)
            if e.vm is not None and e.vm.failure is not None:
                raise e.vm.failure
            if e.state is VmState.STOPPED:
                assert e.vm is not None
                await e.vm.resume()
                e.state = VmState.RUNNING
                return
            assets, accel = await self._resolve()
            vm = QemuVm(vm_id, e.spec, assets=assets, accel=accel)
            vm.keeper_job = e.keeper_job
            await vm.boot(timeout=self.boot_timeout)
            e.vm = vm
            e.state = VmState.RUNNING

    async def stop_vm(self, vm_id: str) -> None:
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.STOPPED)
            assert e.vm is not None
            await e.vm.pause()
            e.state = VmState.STOPPED

    async def destroy_vm(self, vm_id: str) -> None:
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.DESTROYED)
            if e.vm is not None:
                await e.vm.shutdown()
            e.vm = None
            e.state = VmState.DESTROYED

    def snapshot_store(self, vm_id: str) -> SnapshotStore:
        """The SnapshotStore holding VM ``vm_id``'s snapshots (``snapshot_vm``):
        ``<snapshot_dir>/<vm_id>``, by default under ``$SANDVM_HOME/vm-snapshots``. Any
        id, known or not. Raises InvalidSpec for an invalid id."""
        validate_vm_id(vm_id)
        return SnapshotStore((self._snapshot_dir or (sandvm_home() / "vm-snapshots")) / vm_id)

    async def snapshot_vm(self, vm_id: str, snapshot_id: str) -> None:
        """Save the VM as snapshot ``snapshot_id`` in ``snapshot_store(vm_id)``, in the
        store's format (checksummed; ``AsyncSandbox.from_snapshot`` restores it).

        A booted VM is saved like a sandbox (``providers.saving.save_vm``: device state,
        RAM, disk layers); a Running one is paused meanwhile and resumed afterwards, also
        when saving fails; a Stopped one stays stopped. A Created VM (never booted) has
        no state: its snapshot holds its spec only (``"ram": "none"``), which cannot be
        restored. A snapshot of that name left in the store by an earlier provider is
        replaced. Raises SnapshotAlreadyExists, InvalidTransition (destroyed), QmpError.
        """
        validate_vm_id(snapshot_id)
        e = self._get(vm_id)
        async with e.lock:
            if e.state is VmState.DESTROYED:
                raise InvalidTransition(VmState.DESTROYED, VmState.DESTROYED, vm_id=vm_id)
            if snapshot_id in e.snapshots:
                raise SnapshotAlreadyExists(vm_id, snapshot_id)
            store = self.snapshot_store(vm_id)
            if store.exists(snapshot_id):  # an earlier provider's VM of the same id
                await asyncio.to_thread(store.remove, snapshot_id)
            vm = e.vm
            if vm is None:
                assets, accel = await self._resolve()
                await save_spec(store, snapshot_id, e.spec, assets=assets, accel=accel,
                                source_id=vm_id)
            else:
                was_running = e.state is VmState.RUNNING

                async def resume() -> None:
                    if was_running and vm.failure is None:
                        await vm.resume()

                await save_vm(vm, store, snapshot_id, source_id=vm_id, resume=resume,
                              after_export=vm.merge_disks)
            e.snapshots.append(snapshot_id)

    async def rename_vm(self, old_vm_id: str, new_vm_id: str) -> None:
        raise Unsupported("QemuVmProvider does not support rename_vm yet")

    async def list_vms(self) -> list[VmView]:
        return [self._view(k, v) for k, v in sorted(self._entries.items())]

    async def get_vm(self, vm_id: str) -> VmView | None:
        e = self._entries.get(vm_id)
        return None if e is None else self._view(vm_id, e)

    async def list_snapshots(self, vm_id: str) -> list[str] | None:
        e = self._entries.get(vm_id)
        return None if e is None else list(e.snapshots)

    @staticmethod
    def _view(vm_id: str, e: _Entry) -> VmView:
        failure = e.vm.failure.message if e.vm is not None and e.vm.failure else None
        return VmView(vm_id=vm_id, state=e.state, spec=e.spec, snapshots=tuple(e.snapshots),
                      failure=failure)

    async def close(self) -> None:
        """Destroy every VM still alive (records are kept)."""
        for vm_id, e in list(self._entries.items()):
            if e.state is not VmState.DESTROYED:
                with contextlib.suppress(SandvmError, AgentError):
                    await self.destroy_vm(vm_id)

    async def resolve(self) -> tuple[Assets, str]:
        """The guest assets and the accelerator this provider boots VMs with (found, and
        the accelerator probed, on first use; then kept). Raises AssetMissing,
        VmBootError (the probe)."""
        return await self._resolve()

