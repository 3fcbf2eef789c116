"""The VM provider port (seed 000): ``VmProvider`` for lifecycle, ``VmQuery`` for reads.

States and transitions::

    create_vm ──▶ Created ──start_vm──▶ Running ──stop_vm──▶ Stopped
                                           ▲                    │
                                           └──────start_vm──────┘
    destroy_vm: Created | Running | Stopped ──▶ Destroyed (terminal; the record is kept)

Rules every provider keeps (the conformance suite pins them):

- ``create_vm``/``create_vm_with_spec`` raise VmAlreadyExists for an id in use,
  including the id of a destroyed VM (its record is kept).
- ``start_vm`` from Running or Destroyed raises InvalidTransition(from, RUNNING).
- ``stop_vm`` from anything but Running raises InvalidTransition(from, STOPPED).
- ``destroy_vm`` of a destroyed VM raises InvalidTransition(DESTROYED, DESTROYED).
- ``snapshot_vm`` is allowed in Created, Running and Stopped; on a destroyed VM it
  raises InvalidTransition(DESTROYED, DESTROYED); a name already used raises
  SnapshotAlreadyExists. A provider that writes snapshots writes them in the one
  snapshot format (``SnapshotStore``, checksummed; QemuVmProvider: through
  ``providers.saving``, the code a sandbox's snapshot runs). A snapshot of a Created
  VM (never booted: no state, no RAM) holds its spec only; it loads and verifies, but
  restoring it raises SnapshotIncompatible (create a VM with its spec instead).
- ``rename_vm`` raises Unsupported unless a provider supports warm-pool handoff.
- Lifecycle calls on an unknown id raise VmNotFound; queries return None instead.
- ``list_vms`` is sorted by id.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from sandvm.agent_client import AgentConnection, AgentInfo
from sandvm.core import VmSpec, VmState, VmView
from sandvm.errors import InvalidTransition, SandvmError

__all__ = ["SandboxProvider", "SandboxVm", "VmProvider", "VmQuery", "VmRuntime",
           "check_transition"]

_ALLOWED: dict[VmState, frozenset[VmState]] = {
    VmState.CREATED: frozenset({VmState.RUNNING, VmState.DESTROYED}),
    VmState.RUNNING: frozenset({VmState.STOPPED, VmState.DESTROYED}),
    VmState.STOPPED: frozenset({VmState.RUNNING, VmState.DESTROYED}),
    VmState.DESTROYED: frozenset(),
}


def check_transition(vm_id: str, current: VmState, target: VmState) -> None:
    """Raise InvalidTransition unless seed 000 allows ``current`` → ``target``."""
    if target not in _ALLOWED[current]:
        raise InvalidTransition(current, target, vm_id=vm_id)


@runtime_checkable
class VmProvider(Protocol):
    """VM lifecycle. Every method raises VmNotFound for an unknown id."""

    async def create_vm(self, vm_id: str) -> None:
        """Provision a VM with default spec. Raises VmAlreadyExists, InvalidSpec."""

    async def create_vm_with_spec(self, vm_id: str, spec: VmSpec) -> None:
        """Provision a VM with ``spec``. Raises VmAlreadyExists, InvalidSpec."""

    async def start_vm(self, vm_id: str) -> None:
        """Start a Created or Stopped VM. Raises InvalidTransition otherwise."""

    async def stop_vm(self, vm_id: str) -> None:
        """Stop a Running VM. Raises InvalidTransition otherwise."""

    async def snapshot_vm(self, vm_id: str, snapshot_id: str) -> None:
        """Capture a named snapshot. Raises SnapshotAlreadyExists, InvalidTransition."""

    async def destroy_vm(self, vm_id: str) -> None:
        """Tear the VM down for good (terminal). Raises InvalidTransition if destroyed."""

    async def rename_vm(self, old_vm_id: str, new_vm_id: str) -> None:
        """Move a VM to a new id (warm-pool handoff). Raises Unsupported by default."""


@runtime_checkable
class VmQuery(Protocol):
    """Read-only queries; unknown ids give None, never an error."""

    async def list_vms(self) -> list[VmView]:
        """All known VMs (destroyed ones included), sorted by id."""

    async def get_vm(self, vm_id: str) -> VmView | None:
        """One VM, or None."""

    async def list_snapshots(self, vm_id: str) -> list[str] | None:
        """The VM's snapshot names in creation order, or None for an unknown id."""


class VmRuntime(VmProvider, VmQuery, Protocol):
    """Both halves: what sandboxes use."""


class SandboxVm(Protocol):
    """What a sandbox drives of one running VM: its guest agent's connection and its
    process's lifecycle (QemuVm; the in-memory fake's InMemoryVm). Snapshots, fork
    and detaching need more (QemuVm's own methods)."""

    spec: VmSpec
    agent: AgentConnection | None  # None until booted
    agent_info: AgentInfo | None
    failure: SandvmError | None  # why the VM died, once it did
    accel: str
    boot_seconds: float | None
    keeper_pid: int | None  # a detachable VM's keeper process

    @property
    def alive(self) -> bool:
        """Whether the VM runs and has not failed."""

    @property
    def pid(self) -> int | None:
        """Its process's pid, if it has one."""

    @property
    def exited(self) -> bool:
        """Whether nothing of ours runs it any more (what it held can be released)."""

    async def wait_exit(self) -> None:
        """Return once ``exited``."""

    async def pause(self) -> None:
        """Freeze its vCPUs."""

    async def resume(self) -> None:
        """Let its vCPUs run again."""

    async def detach(self) -> None:
        """Leave it running under its keeper. Raises InvalidTransition or Unsupported
        without one."""

    async def shutdown(self) -> None:
        """Stop it and release what it had. Idempotent."""


@runtime_checkable
class SandboxProvider(VmProvider, Protocol):
    """A VmProvider a Sandbox can run on (``AsyncSandbox.create(provider=...)``): it
    hands out the running VM behind an id. QemuVmProvider; InMemoryVmProvider (no
    QEMU: for API-level tests)."""

    def vm(self, vm_id: str) -> SandboxVm:
        """The running VM behind ``vm_id``. Raises VmNotFound, InvalidTransition."""

    def make_detachable(self, vm_id: str, keeper_job: dict[str, Any]) -> None:
        """Start the Created VM ``vm_id`` under a keeper so that it can outlive this
        process. Raises VmNotFound, Unsupported."""
