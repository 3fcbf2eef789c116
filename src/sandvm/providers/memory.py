"""``InMemoryVmProvider``: a deterministic fake of the provider port for tests.

A Sandbox can run on it (``AsyncSandbox.create(image="base",
provider=InMemoryVmProvider())``): each started VM is an ``InMemoryVm``, no process,
whose guest is a small in-process agent speaking the real wire protocol to a real
AgentConnection. That guest answers pings and the ops that set a sandbox up or tear
it down (configure, mount_root, mount_volume, sync, egress_listen, egress_close);
``egress_accept`` streams are left waiting, as in a guest whose workload never
connects out (so a sandbox made with a NetworkPolicy runs, and no traffic ever
flows). It refuses every other op (GuestError, guest code ``unsupported``, naming the
op): enough for API-level tests of the lifecycle (the server's tenancy, quotas, TTLs,
listing, kill) without QEMU, not for commands or files. It never runs anything on
the host.

Its VMs live in this process: they cannot be detached to a keeper, snapshotted,
restored or forked (Unsupported).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from sandvm import wire
from sandvm.agent_client import AgentConnection, AgentInfo
from sandvm.core import VmSpec, VmState, VmView, validate_vm_id
from sandvm.errors import (
    InvalidTransition,
    SandvmError,
    SnapshotAlreadyExists,
    Unsupported,
    VmAlreadyExists,
    VmNotFound,
)
from sandvm.providers.base import check_transition

__all__ = ["InMemoryVm", "InMemoryVmProvider"]

# the ops the in-process guest answers (with an empty reply)
ANSWERED_OPS = frozenset({"configure", "mount_root", "mount_volume", "sync", "egress_listen",
                          "egress_close"})
# the stream ops it leaves open with no answer until the VM goes (nothing connects out)
WAITING_OPS = frozenset({"egress_accept"})


class InMemoryVm:
    """A VM of the in-memory fake a Sandbox can drive (see the module docstring).
    ``ops`` lists every op its guest got, in order. ``boot`` once; ``pause``/``resume``
    while running; ``shutdown`` any time (idempotent)."""

    def __init__(self, vm_id: str, spec: VmSpec) -> None:
        self.vm_id, self.spec = vm_id, spec
        self.agent: AgentConnection | None = None
        self.agent_info: AgentInfo | None = None
        self.failure: SandvmError | None = None
        self.accel = "memory"
        self.boot_seconds: float | None = None
        self.keeper_pid: int | None = None
        self.paused = False
        self.ops: list[str] = []
        self._guest: asyncio.Task[None] | None = None
        self._gone = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self.agent is not None and self.failure is None and not self._gone.is_set()

    @property
    def pid(self) -> int | None:
        return None

    @property
    def exited(self) -> bool:
        return self._gone.is_set()

    async def wait_exit(self) -> None:
        await self._gone.wait()

    async def boot(self) -> None:
        """Start the in-process guest and say hello to it."""
        loop = asyncio.get_running_loop()
        host_sock, guest_sock = socket.socketpair()
        t0 = loop.time()
        reader, writer = await asyncio.open_connection(sock=host_sock)
        greader, gwriter = await asyncio.open_connection(sock=guest_sock)
        self._guest = loop.create_task(self._serve(greader, gwriter))
        self.agent = AgentConnection(reader, writer)
        self.agent_info = await self.agent.handshake(timeout=10.0)
        self.boot_seconds = loop.time() - t0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = wire.FrameDecoder()
        instance = secrets.token_hex(8)
        try:
            while data := await reader.read(65536):
                for ftype, sid, payload in decoder.feed(data):
                    if ftype == wire.HELLO:
                        msg = json.loads(payload)
                        writer.write(wire.encode_json(wire.HELLO, 0, wire.hello_payload(
                            "agent", session=msg.get("session"), agent_version="in-memory",
                            kernel="in-memory", boot_id=instance, instance=instance)))
                    elif ftype == wire.PING:
                        writer.write(wire.encode(wire.PONG, 0, payload))
                    elif ftype == wire.OPEN:
                        op = str(json.loads(payload).get("op"))
                        self.ops.append(op)
                        if op in ANSWERED_OPS:
                            writer.write(wire.encode_json(wire.REPLY, sid, {}))
                        elif op in WAITING_OPS:
                            pass
                        else:
                            writer.write(wire.encode_json(wire.RESET, sid, {
                                "code": "unsupported",
                                "message": f"the in-memory fake's guest does not run {op!r}"}))
                await writer.drain()
        finally:
            writer.close()

    async def pause(self) -> None:
        self.paused = True

    async def resume(self) -> None:
        self.paused = False

    async def detach(self) -> None:
        raise Unsupported(f"VM {self.vm_id} of the in-memory fake has no keeper to detach to")

    async def shutdown(self) -> None:
        if self.agent is not None:
            await self.agent.close()
        if self._guest is not None:
            self._guest.cancel()
            with contextlib.suppress(BaseException):
                await self._guest
        self._gone.set()


@dataclass
class _Record:
    spec: VmSpec
    state: VmState = VmState.CREATED
    snapshots: list[str] = field(default_factory=list)
    vm: InMemoryVm | None = None


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
            if rec.vm is not None:  # its in-process VM follows
                if target is VmState.DESTROYED:
                    await rec.vm.shutdown()
                elif target is VmState.STOPPED:
                    await rec.vm.pause()
                else:
                    await rec.vm.resume()
            elif target is VmState.RUNNING:
                vm = InMemoryVm(vm_id, rec.spec)
                await vm.boot()
                rec.vm = vm
            rec.state = target

    async def start_vm(self, vm_id: str) -> None:
        await self._move(vm_id, VmState.RUNNING)

    async def stop_vm(self, vm_id: str) -> None:
        await self._move(vm_id, VmState.STOPPED)

    async def destroy_vm(self, vm_id: str) -> None:
        await self._move(vm_id, VmState.DESTROYED)

    def vm(self, vm_id: str) -> InMemoryVm:
        """The in-process VM behind ``vm_id`` (started once). Raises VmNotFound,
        InvalidTransition."""
        rec = self._get(vm_id)
        if rec.vm is None or rec.state is VmState.DESTROYED:
            raise InvalidTransition(rec.state, VmState.RUNNING, vm_id=vm_id)
        return rec.vm

    def make_detachable(self, vm_id: str, keeper_job: dict[str, Any]) -> None:
        """Unsupported: the fake has no keeper processes."""
        raise Unsupported("the in-memory provider cannot run detachable VMs (no keeper)")

    async def close(self) -> None:
        """Stop every in-process VM (records are kept)."""
        for rec in self._vms.values():
            if rec.vm is not None:
                await rec.vm.shutdown()

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
