"""What a user holds: a sandbox = a VM + its agent connection.

``AsyncSandbox`` is the one implementation (asyncio). ``Sandbox`` exposes the
same surface synchronously by running it on the blocking portal's loop thread.
A test checks that both surfaces keep the same methods and signatures.

One file (about 840 lines) on purpose: ``AsyncSandbox``, its one builder
``build_sandbox`` (create, restore and attach all go through it) and the sync twin.
The builder constructs ``AsyncSandbox`` and its constructors call the builder, so
split apart they would import each other, which the import contract refuses; the
parts a sandbox is made of already live in their own modules (commands, files,
ports, network, providers.saving).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import (
    Awaitable,
    Callable,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm import _portal
from sandvm._files import runtime_root, write_owner
from sandvm.agent_client import (
    AgentConnection,
)
from sandvm.assets.paths import qemu_version
from sandvm.commands import AsyncCommandHandle, AsyncCommands, CommandHandle, Commands
from sandvm.core import (
    BUILTIN_IMAGES,
    ROOT_DISK,
    DiskSpec,
    ImageRecord,
    VmSpec,
    new_id,
    parse_memory,
    parse_size,
    validate_vm_id,
)
from sandvm.egress import NetworkPolicy
from sandvm.errors import (
    InvalidSpec,
    SandboxStateError,
    SandvmError,
    SnapshotIncompatible,
    Unsupported,
)
from sandvm.files import AsyncFiles, Files
from sandvm.guestops import GuestOps
from sandvm.network import AsyncNetwork, Network, shutdown_egress, start_egress
from sandvm.ports import AsyncPorts, Ports, shutdown_ports
from sandvm.providers.base import SandboxProvider, SandboxVm
from sandvm.providers.qemu import QemuVm, QemuVmProvider, disk_root
from sandvm.providers.saving import save_vm
from sandvm.snapshots.store import Snapshot, SnapshotStore
from sandvm.values import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_READ_CAP,
    SANDBOX_TRANSITIONS,
    CommandResult,
    DirTransfer,
    EntryInfo,
    SandboxState,
    WriteInfo,
)
from sandvm.volumes import VolumeAttachment, VolumeMount, VolumeStore, parse_mounts

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_READ_CAP",
    "Adopt",
    "AsyncCommandHandle",
    "AsyncSandbox",
    "Boot",
    "CommandHandle",
    "CommandResult",
    "DirTransfer",
    "EntryInfo",
    "Restore",
    "Sandbox",
    "SandboxResources",
    "SandboxState",
    "VolumeMount",
    "WriteInfo",
    "build_sandbox",
]


_LIVE = (SandboxState.STARTING, SandboxState.RUNNING, SandboxState.PAUSED)
_HANDED_OUT = (SandboxState.RUNNING, SandboxState.PAUSED)


class AsyncSandbox:
    """A running microVM with its guest agent. Use ``await AsyncSandbox.create(...)``."""

    def __init__(self, *, sandbox_id: str, provider: SandboxProvider, vm: SandboxVm,
                 lifetime: float | None) -> None:
        self.sandbox_id = sandbox_id
        self._provider = provider
        self._vm = vm
        self._state = SandboxState.STARTING
        self._expiry: asyncio.Task[None] | None = None
        self.op_timeout = 30.0
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.ports = AsyncPorts(self)
        self.network = AsyncNetwork(self)
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self._snapshot_times: dict[str, float] = {}
        # the image (name, digest, config, rootfs) of a sandbox with a root disk
        self._image: ImageRecord | None = None
        # volumes attached (their locks are held until the VM is gone) and where
        self._volumes: list[tuple[VolumeAttachment, VolumeMount]] = []
        self._volume_watch: asyncio.Task[None] | None = None
        if lifetime is not None:
            self._lifetime_handle = asyncio.get_running_loop().call_later(
                lifetime, self._expire)

    def _expire(self) -> None:
        self._expiry = asyncio.get_running_loop().create_task(self.kill())

    @classmethod
    async def create(cls, *, image: str | None = None, memory_mib: int | str = 256, vcpus: int = 1,
                     disk_size: int | str | None = None,
                     volumes: Mapping[str, str | tuple[str, str] | VolumeMount] | None = None,
                     volume_store: VolumeStore | None = None,
                     timeout: float | None = None, boot_timeout: float = 60.0,
                     sandbox_id: str | None = None,
                     provider: SandboxProvider | None = None,
                     keeper_job: dict[str, Any] | None = None,
                     network: NetworkPolicy | None = None) -> AsyncSandbox:
        """Boot a new sandbox and wait until its agent is ready.

        ``keeper_job`` (for sandvm's runtime manager) starts the VM under a keeper
        process so that it can be detached and outlive this process.

        ``image``: None for the default (``debian`` once `sandvm image
        build-default` built it, else ``base``; ``$SANDVM_DEFAULT_IMAGE`` wins),
        ``base`` (the built-in one, running from memory), a name from
        `sandvm image ls`, or a source such as ``oci:./layout:tag`` (imported and
        cached on first use). An image's root filesystem is a private disk of
        ``disk_size`` bytes (default 4 GiB, sparse; a full disk is ENOSPC in the
        guest). ``timeout`` is the sandbox's lifetime in seconds (None: until
        killed).

        ``volumes`` maps names of volumes (`sandvm volume create`, or
        ``VolumeStore().create``; ``volume_store`` picks another store) to where
        they are mounted: a guest path (read-write), ``(path, "ro")`` /
        ``(path, "rw")``, or a VolumeMount, e.g. ``{"data": "/data", "ref":
        ("/ref", "ro")}``. The mount point is created in the image's root. A
        volume has one writer at a time: it stays locked by this process until
        the sandbox is killed or its VM dies. Sandboxes with volumes cannot be
        snapshotted (nor forked or paused to disk).

        ``network``: a NetworkPolicy gives the sandbox egress through the host's
        proxy (see ``sandbox.network``); None (the default): no network at all.

        Builds a new sandbox (no state: it is handed out RUNNING). On a provider but
        QEMU's (``provider``: any SandboxProvider, e.g. the in-memory fake) only what
        the guest's set-up needs runs. Raises InvalidSpec / InvalidPath / UnknownImage /
        ImageError for bad
        input, VolumeNotFound, VolumeInUse, AssetMissing if `sandvm setup` has
        not run, VmBootError if the VM does not come up.
        """
        if timeout is not None and timeout <= 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, got {timeout}")
        _check_network(network)
        if image is None:
            from sandvm.images.store import default_image

            image = default_image()
        mounts = parse_mounts(volumes, builtin_image=image in BUILTIN_IMAGES)
        image_info, disks = await _resolve_image(image, disk_size)
        sid = validate_vm_id(sandbox_id or new_id("sb"))
        attached = await asyncio.to_thread(_attach_volumes, volume_store, mounts, sid)
        try:
            vdisks = tuple(DiskSpec(serial=f"vol-{i}", path=str(att.volume.path),
                                    format="raw", read_only=m.read_only)
                           for i, (att, m) in enumerate(attached))
            spec = VmSpec(image=image, memory_mib=parse_memory(memory_mib), vcpus=vcpus,
                          disks=disks + vdisks)
            return await build_sandbox(
                SandboxResources(sandbox_id=sid, spec=spec, image=image_info, lifetime=timeout,
                                 network=network, volumes=tuple(attached),
                                 keeper_job=keeper_job),
                provider=provider or QemuVmProvider(boot_timeout=boot_timeout), origin=Boot())
        except BaseException:
            # the VM is gone (or never ran): nobody uses the volumes any more
            for att, _ in attached:
                att.release()
            raise

    @classmethod
    async def from_snapshot(cls, snapshot: Snapshot | str | Path, *,
                            timeout: float | None = None, boot_timeout: float = 60.0,
                            sandbox_id: str | None = None, verify: str = "once",
                            store: SnapshotStore | None = None,
                            provider: QemuVmProvider | None = None,
                            network: NetworkPolicy | None = None,
                            keeper_job: dict[str, Any] | None = None) -> AsyncSandbox:
        """A new sandbox restored from a snapshot: files and processes as they were.

        ``snapshot`` is a Snapshot, a snapshot name in the store, or a snapshot
        directory. Its memory is shared copy-on-write with every other sandbox
        restored from it. The clone gets fresh entropy, the host's clock, and its
        own id and hostname. ``verify``: "once" checks the RAM file's sha256 once
        per process (the small state file every time), "full" every time.
        ``keeper_job`` (for sandvm's runtime manager) runs the VM under a keeper
        process, as for ``create``. The clone keeps working when the snapshot is
        removed afterwards (its RAM file stays mapped, its disk layers are linked).
        Builds a new sandbox, handed out RUNNING. Raises SnapshotNotFound,
        SnapshotCorrupt, SnapshotIncompatible, VmBootError.
        """
        if verify not in ("once", "full"):
            raise InvalidSpec(f"verify must be 'once' or 'full', not {verify!r}")
        _check_network(network)
        if timeout is not None and timeout <= 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, got {timeout}")
        snap = (store or SnapshotStore()).resolve(snapshot)
        await asyncio.to_thread(SnapshotStore.verify, snap, full=verify == "full")
        prov = provider or QemuVmProvider(boot_timeout=boot_timeout)
        assets, accel = await prov.resolve()
        _check_compatible(snap, accel, await _qemu_version(assets.qemu))
        source = await asyncio.to_thread(SnapshotStore(snap.path.parent).materialize, snap)
        return await build_sandbox(
            SandboxResources(sandbox_id=sandbox_id or new_id("sb"), spec=snap.spec,
                             image=snap.image, lifetime=timeout, network=network,
                             keeper_job=keeper_job),
            provider=prov, origin=Restore(source))

    async def _release_volumes_on_exit(self) -> None:
        """Release the volumes' locks as soon as QEMU is gone, however it ended."""
        await self._vm.wait_exit()
        self._release_volumes()

    def _release_volumes(self) -> None:
        for att, _ in self._volumes:
            att.release()

    async def _configure(self) -> None:
        """Identity and clone hygiene: entropy, clock, hostname, sandbox id."""
        await GuestOps(self._conn()).configure(
            seed=secrets.token_hex(64), time_ns=time.time_ns(), hostname=self.sandbox_id[:63],
            sandbox_id=self.sandbox_id, timeout=self.op_timeout)

    async def snapshot(self, name: str | None = None, *, stop: bool = False,
                       store: SnapshotStore | None = None,
                       parent: Snapshot | str | None = None) -> Snapshot:
        """Save this sandbox (memory, device state, files, processes) as a snapshot.

        Allowed while running. The VM is paused while its state and RAM are
        copied, then resumed; with ``stop=True`` it is destroyed instead. The
        pause and total time are in ``last_snapshot_times``. A sandbox that was
        itself restored from a snapshot is saved with its RAM in the state stream
        (slower; its restores do not share pages). Raises SnapshotAlreadyExists,
        SandboxStateError (also for a sandbox with volumes). Allowed while running or
        paused (a paused sandbox runs again afterwards).
        """
        self._require(*_HANDED_OUT)
        self._conn()  # raises if crashed
        if self._volumes:
            names = ", ".join(f"{a.volume.name!r} at {m.path}" for a, m in self._volumes)
            raise SandboxStateError(
                f"volumes are not part of snapshots, and sandbox {self.sandbox_id} has {names}"
                " mounted: snapshots, fork and pause(to_disk=True) need a sandbox without"
                " volumes (copy what it needs into its own disk, or mount the volumes after"
                " restoring in a new sandbox)")
        vm = self._qemu()
        store = store or SnapshotStore()
        name = name or new_id("snap")

        async def resume() -> None:
            if not stop and vm.failure is None and self._state in _LIVE:
                await vm.resume()
                if self._state is SandboxState.PAUSED:
                    self._move(SandboxState.RUNNING)

        async def after_export() -> None:
            if stop:
                await self.kill()
            else:
                await vm.merge_disks()
                await self._step_clock()

        saved = await save_vm(
            vm, store, name, stop=stop, parent=parent, source_id=self.sandbox_id,
            resume=resume, after_export=after_export,
            extra={"image": self._image.to_dict()} if self._image is not None else None)
        self._snapshot_times = {"pause_s": saved.pause_s,
                                "until_resumed_s": saved.until_resumed_s,
                                "total_s": saved.total_s}
        return saved.snapshot

    @property
    def last_snapshot_times(self) -> dict[str, float]:
        """Seconds the last ``snapshot`` kept the VM paused, until resumed, in total.
        Any state."""
        return dict(self._snapshot_times)

    async def fork(self, n: int, *, timeout: float | None = None) -> list[AsyncSandbox]:
        """``n`` running copies of this sandbox (a live snapshot, restored ``n`` times).

        The snapshot lives in the runtime directory and is removed once the
        copies run (they keep sharing its memory). Each copy gets this sandbox's
        network policy (its own proxy and audit file). Allowed while running or paused
        (this sandbox runs on afterwards). Raises like ``snapshot`` and ``from_snapshot``.
        """
        policy = self.network.policy
        return await self._fork(n, lambda snap, store: AsyncSandbox.from_snapshot(
            snap, timeout=timeout, store=store, network=policy))

    async def _fork(self, n: int,
                    restore: Callable[[Snapshot, SnapshotStore], Awaitable[AsyncSandbox]],
                    discard: Callable[[AsyncSandbox], Awaitable[None]] | None = None,
                    ) -> list[AsyncSandbox]:
        """``fork`` with how each copy is made (``restore(snapshot, store)``, ``n`` times
        at once) and how made copies are destroyed when another failed (``discard``,
        default ``kill``). Raises InvalidSpec (n out of 1..256), and what those raise."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 256:
            raise InvalidSpec(f"fork needs 1 to 256 copies, not {n!r}")
        # in the runtime dir (tmpfs), unless the sandbox has disks: their layers (and
        # the image under them) are linked from the copies, so they stay on disk
        tmp_store = SnapshotStore(fork_roots()[1 if self._qemu().disk_tops else 0])
        snap = await self.snapshot(new_id("fork"), store=tmp_store)
        write_owner(snap.path)  # `sandvm gc` removes it if we die before we do
        try:
            results = await asyncio.gather(*(restore(snap, tmp_store) for _ in range(n)),
                                           return_exceptions=True)
        finally:
            await asyncio.to_thread(tmp_store.remove, snap.name)
        clones = [r for r in results if isinstance(r, AsyncSandbox)]
        errors = [r for r in results if not isinstance(r, AsyncSandbox)]
        if errors:
            await asyncio.gather(*((discard or AsyncSandbox.kill)(c) for c in clones),
                                 return_exceptions=True)
            err = errors[0]
            raise err if isinstance(err, BaseException) else RuntimeError(str(err))
        return clones

    async def pause(self, *, to_disk: bool = False,
                    store: SnapshotStore | None = None) -> Snapshot | None:
        """Freeze the VM's vCPUs (memory stays allocated), or with ``to_disk`` save it
        as snapshot ``paused-<id>`` and free it: the sandbox is then closed and
        ``resume_from`` brings it back, in this or another process. Allowed while
        running or paused. Raises SandboxStateError."""
        self._require(*_HANDED_OUT)
        self._conn()
        if to_disk:
            return await self.snapshot(f"paused-{self.sandbox_id}", stop=True, store=store)
        await self._vm.pause()
        if self._state is SandboxState.RUNNING:
            self._move(SandboxState.PAUSED)
        return None

    @classmethod
    async def resume_from(cls, paused: Snapshot | str, *, timeout: float | None = None,
                          store: SnapshotStore | None = None) -> AsyncSandbox:
        """Bring back a sandbox paused to disk, with its id; its snapshot is removed.

        ``paused`` is the Snapshot ``pause(to_disk=True)`` returned, or its name.
        Builds a new sandbox, handed out RUNNING. Raises like ``from_snapshot``.
        """
        store = store or SnapshotStore()
        snap = store.resolve(paused)
        sb = await cls.from_snapshot(snap, timeout=timeout, sandbox_id=snap.source_id,
                                     store=store)
        await asyncio.to_thread(SnapshotStore(snap.path.parent).remove, snap.name)
        return sb

    async def resume(self) -> None:
        """Let a paused VM run again, its clock stepped to the host's (it stood still
        while paused). Allowed while paused or running. Raises SandboxStateError."""
        self._require(*_HANDED_OUT)
        self._conn()
        await self._vm.resume()
        if self._state is SandboxState.PAUSED:
            self._move(SandboxState.RUNNING)
        await self._step_clock()

    async def _step_clock(self) -> None:
        """The guest clock stood still while the VM was paused: set it to the host's."""
        await GuestOps(self._conn()).configure(time_ns=time.time_ns(),
                                               timeout=self.op_timeout)

    async def _let_go(self) -> None:
        """Detach: close our connections and leave the VM running under its keeper.
        This object is unusable afterwards. Raises SandboxStateError if the sandbox
        was not created detachable. Allowed while running or paused."""
        self._require(*_HANDED_OUT)
        self._conn()
        if self._vm.keeper_pid is None:
            raise SandboxStateError(f"sandbox {self.sandbox_id} was not created detachable:"
                                    " create it through sandvm's runtime (`sandvm create`)")
        self._move(SandboxState.DETACHED)
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
        await shutdown_ports(self.ports)
        await shutdown_egress(self.network)
        await self._vm.detach()

    @property
    def image_record(self) -> ImageRecord | None:
        """The image (name, digest, config, rootfs) of a sandbox with a root disk; None
        for a built-in image. Any state."""
        return self._image

    def connection(self) -> AgentConnection:
        """The guest agent's connection, for the modules that speak to the guest (commands,
        files, ports, network). Allowed while starting, running or paused; otherwise
        raises SandboxStateError (killed, detached); a dead VM raises its failure
        (VmCrashed, AgentProtocolError)."""
        return self._conn()

    @property
    def state(self) -> SandboxState:
        """Where this sandbox is in its life (see SandboxState). Any state."""
        return self._state

    def _move(self, target: SandboxState) -> None:
        """The one place the state changes. Raises SandboxStateError for a transition
        SandboxState does not allow."""
        if target not in SANDBOX_TRANSITIONS[self._state]:
            raise self._state_error((target,), doing=f"become {target.value}")
        self._state = target

    def _require(self, *allowed: SandboxState) -> None:
        """The guard of every public method: raise SandboxStateError unless the state is
        one of ``allowed``."""
        if self._state not in allowed:
            raise self._state_error(allowed)

    def _state_error(self, allowed: tuple[SandboxState, ...], *,
                     doing: str = "do this") -> SandboxStateError:
        if self._state is SandboxState.DETACHED:
            return SandboxStateError(f"sandbox {self.sandbox_id} was detached: reclaim it"
                                     " with its ticket")
        if self._state is SandboxState.KILLED:
            return SandboxStateError(f"sandbox {self.sandbox_id} has been killed")
        return SandboxStateError(
            f"sandbox {self.sandbox_id} is {self._state.value}; to {doing} it must be"
            f" {' or '.join(s.value for s in allowed)}")

    def _qemu(self) -> QemuVm:
        """The QEMU VM behind this sandbox, for what only QEMU does (snapshots, fork,
        pause to disk, records of the VM). Raises Unsupported on another provider's VM."""
        if not isinstance(self._vm, QemuVm):
            raise Unsupported(f"sandbox {self.sandbox_id} runs on {type(self._vm).__name__}:"
                              " snapshots, fork and pause(to_disk=True) need the QEMU"
                              " provider")
        return self._vm

    def _conn(self) -> AgentConnection:
        self._require(*_LIVE)
        if self._vm.failure is not None:
            raise self._vm.failure
        assert self._vm.agent is not None
        return self._vm.agent

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the VM: accelerator, boot time, guest kernel, agent version, QEMU
        pid. Any state (after a kill: as it was)."""
        ai = self._vm.agent_info
        return {"sandbox_id": self.sandbox_id, "accelerator": self._vm.accel,
                "image": self._vm.spec.image,
                "boot_seconds": self._vm.boot_seconds, "qemu_pid": self._vm.pid,
                "memory_mib": self._vm.spec.memory_mib, "vcpus": self._vm.spec.vcpus,
                "guest_kernel": ai.kernel if ai else None,
                "agent_version": ai.agent_version if ai else None,
                "volumes": {a.volume.name: {"path": m.path, "read_only": m.read_only}
                            for a, m in self._volumes}}

    async def is_running(self) -> bool:
        """Whether the VM is alive and this object may use it. Any state."""
        return self._state in _LIVE and self._vm.alive

    async def ping(self) -> float:
        """Agent round trip in seconds. Allowed while starting, running or paused (a
        paused guest answers once resumed). Raises SandboxStateError, VmCrashed."""
        return await self._conn().ping()

    async def kill(self) -> None:
        """Destroy the VM and everything it had (its volumes' data is synced to them
        first, and they are released; its exposed ports stop listening). Any state:
        a killed or detached sandbox is left as it is."""
        if self._state not in _LIVE:
            return
        if any(not m.read_only for _, m in self._volumes) and self._vm.alive:
            # what the guest wrote may still be in its page cache: flush it to the volumes
            with contextlib.suppress(SandvmError):
                await GuestOps(self._conn()).sync(timeout=min(self.op_timeout, 20.0))
        if self._state not in _LIVE:  # killed or detached while it synced
            return
        self._move(SandboxState.KILLED)
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
        await shutdown_ports(self.ports)  # no new tunnels: host listeners close first
        await shutdown_egress(self.network)
        try:
            with contextlib.suppress(SandvmError):
                await self._provider.destroy_vm(self.sandbox_id)
            await self._vm.shutdown()
        finally:
            # once QEMU is gone (else the exit watcher does it when it is)
            if self._vm.exited:
                self._release_volumes()
                if self._volume_watch is not None:
                    self._volume_watch.cancel()

    async def aclose(self) -> None:
        """``kill``. Any state."""
        await self.kill()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


# --------------------------------------------------------------------------- seams
# for sandvm's own layers that hold AsyncSandboxes (the runtime manager, pools): not on
# the user's object, and not part of the sync twin


def sandbox_vm(sb: AsyncSandbox) -> QemuVm:
    """The QEMU VM behind ``sb``, for the layers that keep records of it or watch it (the
    runtime manager's journal, pools checking for a crash). Any state. Raises
    Unsupported for a sandbox on another provider."""
    return sb._qemu()


async def fork_with(sb: AsyncSandbox, n: int, *,
                    restore: Callable[[Snapshot, SnapshotStore], Awaitable[AsyncSandbox]],
                    discard: Callable[[AsyncSandbox], Awaitable[None]] | None = None,
                    ) -> list[AsyncSandbox]:
    """``sb.fork(n)`` with how each copy is made: ``restore(snapshot, store)`` runs ``n``
    times at once on a live snapshot of ``sb`` (removed once they ran); if any fails,
    the copies made are given to ``discard`` (default: ``kill``) and the first error
    raised. For the runtime manager, whose copies are managed. Allowed while ``sb`` is
    running or paused. Raises InvalidSpec (n not in 1..256), what ``snapshot`` raises
    (SandboxStateError: killed, detached, with volumes) and what ``restore`` raises."""
    return await sb._fork(n, restore, discard)


async def let_go(sb: AsyncSandbox) -> None:
    """Detach ``sb``: close this process's connections and leave its VM running under its
    keeper; ``sb`` is DETACHED and unusable afterwards. For the runtime manager
    (``SandboxManager.detach`` journals the ticket that reclaims it: use that). Allowed
    while running or paused. Raises SandboxStateError (another state, or a sandbox not
    created detachable)."""
    await sb._let_go()


async def _qemu_version(qemu: Path) -> str:
    """`qemu-system-x86_64 --version`'s first line (cached per binary)."""
    return await asyncio.to_thread(qemu_version, qemu) or "?"


def _check_compatible(snap: Snapshot, accel: str, host_qemu: str) -> None:
    """Raise SnapshotIncompatible unless this host can load ``snap``'s device state."""
    if snap.accelerator and snap.accelerator != accel:
        raise SnapshotIncompatible(
            f"snapshot {snap.name} was taken under {snap.accelerator}; this host runs VMs"
            f" under {accel} (CPU state differs): set SANDVM_ACCEL={snap.accelerator}"
            " or take the snapshot here")
    if snap.qemu_version != host_qemu:
        raise SnapshotIncompatible(
            f"snapshot {snap.name} was taken with {snap.qemu_version!r}; this host has"
            f" {host_qemu!r}: take the snapshot again with this QEMU")


# --------------------------------------------------------------------------- the builder


@dataclass(frozen=True, kw_only=True)
class SandboxResources:
    """Everything one sandbox is made of (its desired state, as Firecracker's
    VmResources); ``build_sandbox`` makes a running AsyncSandbox of it.

    ``image`` is the image on the spec's root disk (None for a built-in image);
    ``lifetime`` seconds until it is killed (None: until killed); ``network`` its
    egress policy, with ``network_bytes`` already spent under its byte cap (a
    sandbox adopted from another process); ``volumes`` the volumes locked for it,
    on the spec's disks ``vol-<i>`` in this order; ``keeper_job`` runs the VM under
    a keeper so that it can be detached (sandvm's runtime manager).
    """

    sandbox_id: str
    spec: VmSpec
    image: ImageRecord | None = None
    lifetime: float | None = None
    network: NetworkPolicy | None = None
    network_bytes: int = 0
    volumes: tuple[tuple[VolumeAttachment, VolumeMount], ...] = ()
    keeper_job: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Boot:
    """Where a sandbox comes from: a VM booted from its spec (a fresh guest: its root
    disk and volumes are mounted, then it gets its identity)."""


@dataclass(frozen=True)
class Restore:
    """Where a sandbox comes from: a VM restored from the snapshot files in ``source``
    (a materialised snapshot; its guest gets a fresh identity)."""

    source: Path


@dataclass(frozen=True)
class Adopt:
    """Where a sandbox comes from: ``vm``, a detachable VM already running and set up,
    attached from its keeper (``QemuVm.attach``; a clock that stood still is stepped).
    On failure it is let go, not destroyed."""

    vm: QemuVm


async def build_sandbox(res: SandboxResources, *, provider: SandboxProvider,
                        origin: Boot | Restore | Adopt) -> AsyncSandbox:
    """The one way a sandbox is assembled (create, restore, attach): register ``res``'s
    VM with ``provider``, start it as ``origin`` says, set the guest up and hand the
    sandbox out RUNNING. On failure the VM is destroyed (an adopted one is let go) and
    the error raised: InvalidSpec (a detachable sandbox with volumes), VmAlreadyExists,
    VmBootError, Unsupported (a restore or an adoption by a provider but QEMU's), and
    what the guest's set-up raises."""
    sid = res.sandbox_id
    if not isinstance(origin, Boot) and not isinstance(provider, QemuVmProvider):
        raise Unsupported(f"{type(provider).__name__} can only boot sandboxes: restoring"
                          " snapshots and attaching need the QEMU provider")
    if isinstance(origin, Adopt):
        assert isinstance(provider, QemuVmProvider)
        await provider.adopt_vm(sid, origin.vm)
    else:
        if res.keeper_job is not None and res.volumes:
            raise InvalidSpec("a detachable sandbox cannot have volumes yet")
        await provider.create_vm_with_spec(sid, res.spec)
        if res.keeper_job is not None:
            provider.make_detachable(sid, dict(res.keeper_job))
    try:
        if isinstance(origin, Boot):
            await provider.start_vm(sid)
        elif isinstance(origin, Restore):
            assert isinstance(provider, QemuVmProvider)
            await provider.restore_vm(sid, origin.source)
        sb = AsyncSandbox(sandbox_id=sid, provider=provider, vm=provider.vm(sid),
                          lifetime=res.lifetime)
        sb._image = res.image
        if isinstance(origin, Boot) and res.image is not None:
            await GuestOps(sb._conn()).mount_root(serial=ROOT_DISK, timeout=sb.op_timeout)
        for i, (att, m) in enumerate(res.volumes):
            try:
                await GuestOps(sb._conn()).mount_volume(
                    serial=f"vol-{i}", path=m.path, read_only=m.read_only,
                    timeout=sb.op_timeout)
            except SandvmError as exc:
                raise type(exc)(f"cannot mount volume {att.volume.name!r} at {m.path}:"
                                f" {exc.message}") from exc
        if res.volumes:
            sb._volumes = list(res.volumes)
            sb._volume_watch = asyncio.get_running_loop().create_task(
                sb._release_volumes_on_exit())
        if isinstance(origin, Adopt):
            if origin.vm.resumed:  # it stood still since its last holder paused it
                await sb._step_clock()
        else:
            await sb._configure()
        if res.network is not None:
            await start_egress(sb.network, res.network, bytes_used=res.network_bytes)
        elif isinstance(origin, Restore):
            # a listener the snapshot had would take connections nobody serves
            with contextlib.suppress(SandvmError):
                await GuestOps(sb._conn()).egress_close(timeout=sb.op_timeout)
    except BaseException:
        if isinstance(origin, Adopt):
            await origin.vm.detach()  # never keep it held after a failed attach
        else:
            with contextlib.suppress(SandvmError):
                await provider.destroy_vm(sid)
        raise
    sb._move(SandboxState.RUNNING)
    return sb


# --------------------------------------------------------------------------- sync surface

class Sandbox:
    """Sync twin of AsyncSandbox: ``with Sandbox.create() as sb: sb.commands.run("ls")``."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._a = inner
        self.sandbox_id = inner.sandbox_id
        self.commands = Commands(inner.commands)
        self.files = Files(inner.files)
        self.ports = Ports(inner.ports)
        self.network = Network(inner.network)

    @classmethod
    def create(cls, *, image: str | None = None, memory_mib: int | str = 256, vcpus: int = 1,
               disk_size: int | str | None = None,
               volumes: Mapping[str, str | tuple[str, str] | VolumeMount] | None = None,
               volume_store: VolumeStore | None = None,
               timeout: float | None = None, boot_timeout: float = 60.0,
               sandbox_id: str | None = None,
               provider: SandboxProvider | None = None,
               keeper_job: dict[str, Any] | None = None,
               network: NetworkPolicy | None = None) -> Sandbox:
        """See AsyncSandbox.create."""
        return cls(_portal.call(AsyncSandbox.create(
            image=image, memory_mib=memory_mib, vcpus=vcpus, disk_size=disk_size,
            volumes=volumes, volume_store=volume_store, timeout=timeout,
            boot_timeout=boot_timeout, sandbox_id=sandbox_id, provider=provider,
            keeper_job=keeper_job, network=network)))

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot | str | Path, *,
                      timeout: float | None = None, boot_timeout: float = 60.0,
                      sandbox_id: str | None = None, verify: str = "once",
                      store: SnapshotStore | None = None,
                      provider: QemuVmProvider | None = None,
                      network: NetworkPolicy | None = None,
                      keeper_job: dict[str, Any] | None = None) -> Sandbox:
        """See AsyncSandbox.from_snapshot."""
        return cls(_portal.call(AsyncSandbox.from_snapshot(
            snapshot, timeout=timeout, boot_timeout=boot_timeout, sandbox_id=sandbox_id,
            verify=verify, store=store, provider=provider, network=network,
            keeper_job=keeper_job)))

    def snapshot(self, name: str | None = None, *, stop: bool = False,
                 store: SnapshotStore | None = None,
                 parent: Snapshot | str | None = None) -> Snapshot:
        return _portal.call(self._a.snapshot(name, stop=stop, store=store, parent=parent))

    def fork(self, n: int, *, timeout: float | None = None) -> list[Sandbox]:
        return [Sandbox(a) for a in _portal.call(self._a.fork(n, timeout=timeout))]

    def pause(self, *, to_disk: bool = False,
              store: SnapshotStore | None = None) -> Snapshot | None:
        return _portal.call(self._a.pause(to_disk=to_disk, store=store))

    @classmethod
    def resume_from(cls, paused: Snapshot | str, *, timeout: float | None = None,
                    store: SnapshotStore | None = None) -> Sandbox:
        """See AsyncSandbox.resume_from."""
        return cls(_portal.call(AsyncSandbox.resume_from(paused, timeout=timeout,
                                                         store=store)))

    def resume(self) -> None:
        _portal.call(self._a.resume())

    @property
    def last_snapshot_times(self) -> dict[str, float]:
        return self._a.last_snapshot_times

    @property
    def info(self) -> dict[str, Any]:
        return self._a.info

    @property
    def state(self) -> SandboxState:
        """See AsyncSandbox.state."""
        return self._a.state

    def is_running(self) -> bool:
        return _portal.call(self._a.is_running())

    def ping(self) -> float:
        return _portal.call(self._a.ping())

    def kill(self) -> None:
        _portal.call(self._a.kill())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


DEFAULT_DISK_SIZE = 4 << 30


def fork_roots() -> tuple[Path, Path]:
    """Where ``fork`` keeps its temporary snapshot: in the runtime dir (tmpfs), or on
    disk for a sandbox with disks. Each carries its owner; ``gc`` sweeps the dead's."""
    return runtime_root() / "fork-snapshots", disk_root().parent / "fork-snapshots"


def _check_network(network: object) -> None:
    if network is not None and not isinstance(network, NetworkPolicy):
        raise InvalidSpec("network must be a sandvm.NetworkPolicy (or None for no network),"
                          f" got {type(network).__name__}")

async def _resolve_image(image: str, disk_size: int | str | None
                         ) -> tuple[ImageRecord | None, tuple[DiskSpec, ...]]:
    """(image record, disks) for ``image``: none for a built-in image."""
    if image in BUILTIN_IMAGES:
        if disk_size is not None:
            raise InvalidSpec(f"the {image!r} image runs from memory and has no disk: give"
                              " disk_size only with an image (e.g. oci:./layout:tag)")
        return None, ()
    from sandvm.images.store import ImageStore

    stored = await asyncio.to_thread(ImageStore().get, image)
    size = parse_size(disk_size, what="disk_size") if disk_size is not None else max(
        DEFAULT_DISK_SIZE, stored.rootfs_bytes + (256 << 20))
    if size < stored.rootfs_bytes:
        raise InvalidSpec(f"disk_size {size} bytes is smaller than the image's root"
                          f" filesystem ({stored.rootfs_bytes} bytes)")
    cfg = stored.config
    record = ImageRecord(name=image, manifest_digest=stored.manifest_digest,
                         build_id=stored.build_id, rootfs=str(stored.rootfs), disk_size=size,
                         env=tuple(cfg.env), working_dir=cfg.working_dir, user=cfg.user,
                         entrypoint=tuple(cfg.entrypoint), cmd=tuple(cfg.cmd))
    disk = DiskSpec(serial=ROOT_DISK, path=str(stored.rootfs), format="raw",
                    overlay_size=size)
    return record, (disk,)


def _attach_volumes(store: VolumeStore | None, mounts: list[tuple[str, VolumeMount]],
                    sandbox_id: str) -> list[tuple[VolumeAttachment, VolumeMount]]:
    """Lock every volume for ``sandbox_id`` (all or none). Raises VolumeNotFound, VolumeInUse."""
    if not mounts:
        return []
    store = store or VolumeStore()
    out: list[tuple[VolumeAttachment, VolumeMount]] = []
    try:
        for name, m in mounts:
            out.append((store.attach(name, sandbox_id=sandbox_id, read_only=m.read_only), m))
    except BaseException:
        for att, _ in out:
            att.release()
        raise
    return out

