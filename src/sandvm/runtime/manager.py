"""The sandbox manager: sandboxes that outlive the process that made them.

A managed sandbox (cold-booted by ``create``, restored by ``from_snapshot``, or a
copy made by ``fork``) runs under a keeper process (``runtime/keeper.py``) and is
recorded in the journal, intent before every effect and result after. Any process
of the same user can then list it, attach to it by id, detach from it (getting a
ticket), reclaim it by ticket (once), extend its TTL or kill it. ``gc`` (also run
on every listing) finds sandboxes whose keeper died — e.g. SIGKILLed — removes
what they left behind and records them as ``repair-needed``.

States in the journal: ``JournalState`` (starting → running → ended, with a reason).

On another provider than QEMU's (``SandboxManager(provider=InMemoryVmProvider())``,
e.g. for API-level tests of the server without QEMU) a managed sandbox runs in this
process instead: it is journalled the same way (its keeper is this process, so it is
alive while this process is), a task of this manager enforces its TTL and a kill by
id, and it ends with this process (``close``). It cannot be detached, reclaimed or
attached from another process, snapshotted, restored or forked: Unsupported.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm._files import proc_start_time
from sandvm.core import ROOT_DISK, DiskSpec, ImageRecord, VmSpec, new_id, validate_vm_id
from sandvm.egress import NetworkPolicy
from sandvm.errors import (
    InvalidSpec,
    SandboxStateError,
    SandvmError,
    Unsupported,
    VmAlreadyExists,
    VmBootError,
    VmNotFound,
)
from sandvm.network import audit_dir, egress_bytes, end_audit, watch_policy
from sandvm.providers.base import SandboxProvider
from sandvm.providers.qemu import QemuVm, QemuVmProvider
from sandvm.runtime.journal import Journal, JournalState, SandboxRecord
from sandvm.sandbox import (
    Adopt,
    AsyncSandbox,
    SandboxResources,
    build_sandbox,
    fork_roots,
    fork_with,
    let_go,
    sandbox_vm,
)
from sandvm.snapshots.store import Snapshot, SnapshotStore

DEFAULT_TTL = 300.0
MAX_TTL = 7 * 24 * 3600.0
IN_PROCESS_POLL = 0.2  # seconds between an in-process sandbox's looks at the journal


def ticket_sha256(ticket: str) -> str:
    """How a reclaim ticket is stored: its sha256, never the ticket itself."""
    return hashlib.sha256(ticket.encode()).hexdigest()


def is_ticket(ticket: object) -> bool:
    """Whether ``ticket`` looks like a reclaim ticket ``detach`` issues."""
    return isinstance(ticket, str) and ticket.startswith("sbt_") and len(ticket) <= 100


def ticket_matches(rec: SandboxRecord | None, ticket: str) -> bool:
    """Whether ``rec``'s sandbox waits to be reclaimed with ``ticket`` (issued for it
    and not spent yet). Compared in constant time: the one ticket check."""
    return rec is not None and rec.ticket_sha256 is not None and is_ticket(ticket) and \
        secrets.compare_digest(rec.ticket_sha256, ticket_sha256(ticket))


def keeper_alive(rec: SandboxRecord) -> bool:
    """Whether the sandbox's keeper process still runs (pid and start time match; for a
    sandbox run in-process, the process running it)."""
    return rec.keeper_pid is not None and rec.keeper_start is not None and \
        proc_start_time(rec.keeper_pid) == rec.keeper_start


def in_process(rec: SandboxRecord) -> bool:
    """Whether ``rec``'s sandbox runs inside its manager's process (a provider but
    QEMU's): never signalled, attached from elsewhere or detached."""
    return bool(rec.record.get("in_process"))


@dataclass(frozen=True)
class Recovery:
    """What ``SandboxManager.recover`` found after a restart."""

    live: tuple[str, ...]  # sandboxes whose VM still runs: attach to them
    repaired: tuple[str, ...]  # ended now as repair-needed, their files removed
    interrupted: tuple[tuple[str, str], ...]  # (sandbox id, op) cut off mid-way
    orphans_killed: tuple[int, ...]  # QEMU pids that had no live owner


@dataclass(frozen=True)
class ManagedInfo:
    """One line of ``sandvm ls``."""

    sandbox_id: str
    state: JournalState
    image: str
    created: float
    expires_in: float | None
    qemu_pid: int | None
    end_reason: str | None = None


# QEMU migration states in which an outgoing save is still under way
_SAVING = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug",
                     "cancelling", "postcopy-active", "postcopy-paused", "postcopy-recover"})


async def _end_cut_off_save(vm: QemuVm, *, timeout: float = 30.0) -> None:
    """A holder that died in the middle of a snapshot (or fork) leaves QEMU writing the
    VM's state to a file nobody reads; once that ends QEMU stops the VM again (the guest
    would freeze under its new holder), and it refuses any other save meanwhile. Cancel
    that save, wait until it is over and let the VM run (``resumed``: its clock stood
    still). For ``attach``, before the sandbox is handed out. Raises VmBootError if the
    save does not end within ``timeout`` seconds, QmpError."""
    def saving(st: Any) -> bool:
        return isinstance(st, dict) and st.get("status") in _SAVING

    if not saving(await vm.qmp_execute("query-migrate")):
        return
    await vm.qmp_execute("migrate_cancel")
    deadline = time.monotonic() + timeout
    while saving(await vm.qmp_execute("query-migrate")):
        if time.monotonic() > deadline:
            raise VmBootError(f"sandbox {vm.vm_id}: a save its last holder left running"
                              f" did not stop within {timeout:.0f} s")
        await asyncio.sleep(0.01)
    run = await vm.qmp_execute("query-status")
    if isinstance(run, dict) and not run.get("running"):
        await vm.qmp_execute("cont")
    vm.resumed = True


def _check_ttl(ttl: float) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL:
        raise InvalidSpec(f"ttl must be seconds between 0 and {MAX_TTL:.0f}, got {ttl!r}")
    return float(ttl)


def _record_of(sb: AsyncSandbox, **extra: Any) -> dict[str, Any]:
    """What ``attach`` in another process needs to rebuild ``sb``'s QemuVm."""
    vm = sandbox_vm(sb)
    spec = vm.spec
    policy = sb.network.policy
    image = sb.image_record
    rec: dict[str, Any] = {
        "image": image.to_dict() if image is not None else None, "accelerator": vm.accel,
        # the record's layout since disks were recorded: the spec (kernel_args only when
        # set), its disks beside it
        "spec": {k: v for k, v in spec.to_dict().items()
                 if k != "disks" and (k != "kernel_args" or v)},
        "disks": [d.to_dict() for d in spec.disks],
        "network": policy.to_dict() if policy is not None else None,
        "disk_images": {serial: str(p) for serial, p in vm.disk_images.items()},
        **extra}
    if vm.restored_from is not None:
        rec.update(restored=True, restored_from=str(vm.restored_from),
                   private_ram=vm.private_ram)
    return rec


def _spec_of(record: dict[str, Any]) -> VmSpec:
    """A managed sandbox's spec as its record gives it (its disks beside it). Raises
    InvalidSpec."""
    spec_d = record.get("spec") or {}
    if not isinstance(spec_d, dict):
        return VmSpec.from_dict(spec_d)
    return VmSpec.from_dict({**spec_d, "disks": _disks_of(record)})


def _disks_of(record: dict[str, Any]) -> Any:
    """A managed sandbox's disks as its record gives them, as DiskSpec data for
    VmSpec.from_dict, which checks them (only their serials and sizes matter once it
    runs: its layers are in its disk dir)."""
    disks = record.get("disks")
    if disks is not None:
        return disks
    image = record.get("image")  # a record from before disks were recorded
    if image is None:
        return []
    return [DiskSpec(serial=ROOT_DISK, path=str(image["rootfs"]), format="raw",
                     overlay_size=int(image["disk_size"])).to_dict()]


class SandboxManager:
    """Creates, attaches to, detaches from and reaps managed sandboxes (one journal).

    ``provider``: None (QEMU: sandboxes under keeper processes, outliving this one) or
    another SandboxProvider, whose sandboxes run in this process (see the module
    docstring); ``close`` ends those."""

    def __init__(self, journal: Journal | None = None, *,
                 provider: SandboxProvider | None = None) -> None:
        self.journal = journal or Journal()
        self.provider = provider
        self._local: dict[str, tuple[AsyncSandbox, asyncio.Task[None]]] = {}

    def _qemu_only(self, what: str) -> None:
        """Raises Unsupported unless this manager runs QEMU sandboxes."""
        if self.provider is not None:
            raise Unsupported(f"{what} needs the QEMU provider; this manager runs"
                              f" sandboxes on {type(self.provider).__name__}")

    # ------------------------------------------------------------------ create / attach

    async def create(self, *, ttl: float = DEFAULT_TTL, sandbox_id: str | None = None,
                     **create_args: Any) -> AsyncSandbox:
        """A new sandbox under a keeper, alive for ``ttl`` seconds unless extended.

        ``create_args`` are AsyncSandbox.create's. Raises what it raises.
        """
        ttl = _check_ttl(ttl)
        sid = validate_vm_id(sandbox_id or new_id("sb"))
        if self.provider is not None:
            return await self._start(sid, ttl, lambda job: AsyncSandbox.create(
                sandbox_id=sid, timeout=None, provider=self.provider, **create_args))
        return await self._start(sid, ttl, lambda job: AsyncSandbox.create(
            sandbox_id=sid, timeout=None, keeper_job=job, **create_args))

    async def from_snapshot(self, snapshot: Snapshot | str | Path, *,
                            ttl: float = DEFAULT_TTL, sandbox_id: str | None = None,
                            network: NetworkPolicy | None = None,
                            store: SnapshotStore | None = None,
                            verify: str = "once") -> AsyncSandbox:
        """A new sandbox restored from ``snapshot`` (see AsyncSandbox.from_snapshot) under
        a keeper, alive for ``ttl`` seconds unless extended: attach, detach, kill etc. as
        for ``create``; it keeps running if the snapshot is removed. Raises InvalidSpec,
        SnapshotNotFound, SnapshotCorrupt, SnapshotIncompatible, VmBootError,
        Unsupported (a manager on another provider than QEMU's)."""
        self._qemu_only("restoring a snapshot")
        ttl = _check_ttl(ttl)
        sid = validate_vm_id(sandbox_id or new_id("sb"))
        return await self._restore(sid, ttl, snapshot, network=network, store=store,
                                   verify=verify)

    async def _restore(self, sid: str, ttl: float, snapshot: Snapshot | str | Path, *,
                       network: NetworkPolicy | None, store: SnapshotStore | None,
                       verify: str = "once", **detail: Any) -> AsyncSandbox:
        source = str(snapshot.path) if isinstance(snapshot, Snapshot) else str(snapshot)
        return await self._start(sid, ttl, lambda job: AsyncSandbox.from_snapshot(
            snapshot, sandbox_id=sid, timeout=None, verify=verify, store=store,
            network=network, keeper_job=job), from_snapshot=source, **detail)

    async def _start(self, sid: str, ttl: float,
                     start: Callable[[dict[str, Any]], Awaitable[AsyncSandbox]],
                     **detail: Any) -> AsyncSandbox:
        """Journal a ``create`` (also for restores: ``recover`` kills an unfinished one)
        around ``start(keeper_job)``, and record what ``attach`` needs. Raises
        VmAlreadyExists (the id is in the journal), and what ``start`` raises."""
        if self.journal.get(sid) is not None:  # an unfinished create of it would be
            raise VmAlreadyExists(sid)  # taken for the other's by recover, and killed
        seq = self.journal.intent(sid, "create", ttl=ttl, **detail)
        try:
            # provisional: covers the boot (a creator that dies meanwhile leaves no VM for
            # long); the TTL itself counts from when the sandbox is ready
            self.journal.add(sid, deadline=time.time() + ttl + 120.0)
        except BaseException as exc:
            self.journal.result(seq, ok=False, error=type(exc).__name__)
            if isinstance(exc, sqlite3.IntegrityError):  # raced by a creator of the same id
                raise VmAlreadyExists(sid) from exc
            raise
        try:
            sb = await start({"journal": str(self.journal.path)})
        except BaseException as exc:
            self.journal.end(sid, f"failed to start: {exc}")
            self.journal.result(seq, ok=False, error=type(exc).__name__)
            raise
        if self.provider is not None:
            self._run_here(sid, sb, ttl)
            self.journal.result(seq, ok=True, qemu_pid=None)
            return sb
        self.journal.update(sid, deadline=time.time() + ttl, record=_record_of(sb, **detail))
        self._keep_policy(sb)
        self.journal.result(seq, ok=True, qemu_pid=sandbox_vm(sb).pid)
        return sb

    def _run_here(self, sid: str, sb: AsyncSandbox, ttl: float) -> None:
        """Journal ``sb`` (on ``self.provider``) as running in this process, and watch
        it: its TTL, a kill by id, its VM's end."""
        me = os.getpid()
        policy = sb.network.policy
        image = sb.image_record
        info = sb.info
        self.journal.update(
            sid, state=JournalState.RUNNING, deadline=time.time() + ttl, keeper_pid=me,
            keeper_start=proc_start_time(me), record={
                "image": image.to_dict() if image is not None else None,
                "accelerator": info["accelerator"],
                "spec": {k: info[k] for k in ("image", "memory_mib", "vcpus")},
                "network": policy.to_dict() if policy is not None else None,
                "in_process": type(self.provider).__name__})
        self._keep_policy(sb)
        task = asyncio.get_running_loop().create_task(self._watch_here(sid, sb))
        self._local[sid] = (sb, task)

    async def _watch_here(self, sid: str, sb: AsyncSandbox) -> None:
        """What a keeper does, for a sandbox run in this process: end it when the journal
        says so (a kill), when its TTL runs out, or record its end when its VM goes."""
        try:
            while True:
                rec = self.journal.get(sid)
                if rec is None or rec.state is JournalState.ENDED:
                    break
                if rec.deadline is not None and time.time() >= rec.deadline:
                    if self.journal.end(sid, "expired: its TTL ran out"):
                        self.journal.result(self.journal.intent(
                            sid, "expire", deadline=rec.deadline), ok=True)
                    break
                if not await sb.is_running():
                    self.journal.end(sid, "its VM exited")
                    break
                await asyncio.sleep(IN_PROCESS_POLL)
        finally:
            with contextlib.suppress(SandvmError):
                await sb.kill()
            end_audit(sid)
            self._local.pop(sid, None)

    async def close(self) -> None:
        """End every sandbox this manager runs in this process (they cannot outlive it);
        QEMU sandboxes are left to their keepers. Never raises SandvmError."""
        for sid in list(self._local):
            self.journal.end(sid, "ended: the process running it stopped")
            await self._end_here(sid)

    async def _end_here(self, sid: str) -> None:
        """Stop watching the in-process sandbox ``sid`` and kill it (its journal record
        ended already)."""
        here = self._local.pop(sid, None)
        if here is None:
            return
        sb, task = here
        task.cancel()  # a task cancelled before it started never runs its finally
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(SandvmError):
            await sb.kill()
        end_audit(sid)

    def runs_here(self, sandbox_id: str) -> bool:
        """Whether ``sandbox_id`` runs in this process under this manager (it cannot be
        detached: kill it instead)."""
        return sandbox_id in self._local

    async def fork(self, sb: AsyncSandbox, n: int, *, ttl: float = DEFAULT_TTL,
                   sandbox_ids: Sequence[str] | None = None) -> list[AsyncSandbox]:
        """``n`` managed copies of the running sandbox ``sb`` (managed or not): a live
        snapshot restored ``n`` times (as AsyncSandbox.fork), each under a keeper with
        ``sb``'s network policy and ``ttl``, with the ids ``sandbox_ids`` if given (in
        that order). If any copy fails the others are killed. Raises InvalidSpec (n
        not in 1..256, ttl, ids), SandboxStateError (sb killed, detached or with
        volumes), Unsupported (a manager on another provider than QEMU's), and what
        ``from_snapshot`` raises."""
        self._qemu_only("forking a sandbox")
        ttl = _check_ttl(ttl)
        ids = [validate_vm_id(i) for i in sandbox_ids] if sandbox_ids is not None else None
        if ids is not None and (len(ids) != n or len(set(ids)) != len(ids)):
            raise InvalidSpec(f"fork needs {n!r} distinct sandbox ids, got {len(ids)}")
        policy = sb.network.policy
        managed = self.journal.get(sb.sandbox_id) is not None
        seq = self.journal.intent(sb.sandbox_id, "fork", n=n, ttl=ttl) if managed else None
        next_id = iter(ids or ())

        def restore(snap: Snapshot, store: SnapshotStore) -> Awaitable[AsyncSandbox]:
            return self._restore(next(next_id, None) or new_id("sb"), ttl, snap,
                                 network=policy, store=store, forked_from=sb.sandbox_id)

        async def discard(copy: AsyncSandbox) -> None:
            await self.kill(copy.sandbox_id, reason="killed: another copy of its fork failed")
            await copy.kill()  # closes our side

        try:
            copies = await fork_with(sb, n, restore=restore, discard=discard)
        except BaseException as exc:
            if seq is not None:
                self.journal.result(seq, ok=False, error=getattr(exc, "code",
                                                                 type(exc).__name__))
            raise
        if seq is not None:
            self.journal.result(seq, ok=True, copies=[c.sandbox_id for c in copies])
        return copies

    def _keep_policy(self, sb: AsyncSandbox) -> None:
        """Record every policy set on ``sb`` (the next holder restores it)."""
        def keep(policy: NetworkPolicy) -> None:
            rec = self.journal.get(sb.sandbox_id)
            if rec is not None:
                self.journal.update(sb.sandbox_id,
                                    record={**rec.record, "network": policy.to_dict()})

        watch_policy(sb.network, keep)

    def get(self, sandbox_id: str) -> SandboxRecord:
        """The live sandbox ``sandbox_id``. Raises VmNotFound (unknown or ended)."""
        rec = self.journal.get(sandbox_id)
        if rec is None:
            raise VmNotFound(sandbox_id)
        if rec.state is JournalState.ENDED or not keeper_alive(rec):
            self.gc()
            raise SandboxStateError(f"sandbox {sandbox_id} has ended"
                                    f" ({(self.journal.get(sandbox_id) or rec).end_reason})")
        return rec

    async def attach(self, sandbox_id: str, *, wait: float = 0.0) -> AsyncSandbox:
        """Take over a running managed sandbox by id (same user, same host); one process
        holds a sandbox at a time, and this waits up to ``wait`` seconds for another
        holder to let go. A sandbox left paused (its holder died while snapshotting it,
        e.g. for a fork, or paused and detached it) runs again; a save of its state
        the dead holder left running in QEMU is cancelled first. A sandbox run in this
        process (another provider) is handed out as it is. Raises VmNotFound,
        SandboxStateError (ended), SandboxBusy (still held elsewhere), VmBootError
        (does not answer), Unsupported (a sandbox run in another process)."""
        rec = self.get(sandbox_id)
        if in_process(rec):
            here = self._local.get(sandbox_id)
            if here is None:
                raise Unsupported(f"sandbox {sandbox_id} runs inside process"
                                  f" {rec.keeper_pid} ({rec.record['in_process']}): only"
                                  " that process can use it")
            return here[0]
        if rec.rundir is None or rec.keeper_pid is None or rec.qemu_pid is None:
            raise SandboxStateError(f"sandbox {sandbox_id} is still starting")
        seq = self.journal.intent(sandbox_id, "attach")
        prov = QemuVmProvider()
        assets, accel = await prov.resolve()
        spec = _spec_of(rec.record)
        image_d = rec.record.get("image")
        image = ImageRecord.from_dict(image_d) if image_d is not None else None
        restored_from = rec.record.get("restored_from")
        images = rec.record.get("disk_images") or {}
        try:
            vm = await QemuVm.attach(sandbox_id, spec, assets=assets,
                                     accel=rec.record.get("accelerator", accel),
                                     rundir=Path(rec.rundir),
                                     diskdir=Path(rec.diskdir) if rec.diskdir else None,
                                     keeper_pid=rec.keeper_pid, qemu_pid=rec.qemu_pid,
                                     wait=wait,
                                     restored_from=Path(restored_from) if restored_from
                                     else None,
                                     private_ram=bool(rec.record.get("private_ram")),
                                     disk_images={k: Path(v) for k, v in images.items()})
        except SandvmError as exc:
            self.journal.result(seq, ok=False, error=exc.code)
            raise
        try:
            await _end_cut_off_save(vm)
            net = rec.record.get("network")  # its egress, as the last holder left it
            used = rec.record.get("network_bytes")  # the byte cap is for its life
            sb = await build_sandbox(SandboxResources(
                sandbox_id=sandbox_id, spec=vm.spec, image=image,
                network=NetworkPolicy(**net) if isinstance(net, dict) else None,
                network_bytes=used if isinstance(used, int) and used > 0 else 0),
                provider=prov, origin=Adopt(vm))
        except BaseException as exc:  # never keep the sandbox held after a failed attach
            await vm.detach()
            self.journal.result(seq, ok=False, error=getattr(exc, "code", type(exc).__name__))
            raise
        self._keep_policy(sb)
        self.journal.result(seq, ok=True)
        return sb

    async def detach(self, sb: AsyncSandbox) -> str:
        """Let go of ``sb`` (it keeps running); returns the ticket that reclaims it,
        once. Raises SandboxStateError, Unsupported (a sandbox run in this process:
        it cannot outlive it)."""
        rec = self.journal.get(sb.sandbox_id)
        if sb.sandbox_id in self._local or (rec is not None and in_process(rec)):
            raise Unsupported(f"sandbox {sb.sandbox_id} runs inside the process that made"
                              " it (not under a keeper): it cannot be detached")
        ticket = f"sbt_{secrets.token_urlsafe(24)}"
        seq = self.journal.intent(sb.sandbox_id, "detach")
        rec = self.journal.get(sb.sandbox_id)
        if sb.network.policy is not None and rec is not None:  # egress bytes so far: the
            self.journal.update(sb.sandbox_id,                  # next holder's
                                record={**rec.record, "network_bytes": egress_bytes(sb.network)})
        await let_go(sb)
        self.journal.update(sb.sandbox_id, ticket_sha256=ticket_sha256(ticket))
        self.journal.result(seq, ok=True)
        return ticket

    async def reclaim(self, ticket: str, *, destroy: bool = False) -> AsyncSandbox | None:
        """Take over the sandbox a ticket was issued for (the ticket is then spent); with
        ``destroy`` kill it instead. Raises SandboxStateError for an unknown, spent or
        forged ticket or an ended sandbox."""
        if not is_ticket(ticket):
            raise SandboxStateError("not a sandvm reclaim ticket")
        match = next((r for r in self.journal.sandboxes() if ticket_matches(r, ticket)),
                     None)
        if match is None:
            raise SandboxStateError("unknown or already used reclaim ticket")
        self.journal.update(match.id, ticket_sha256=None)  # spent, whatever happens next
        if destroy:
            await self.kill(match.id)
            return None
        return await self.attach(match.id)

    # ------------------------------------------------------------------ lifetime

    def set_ttl(self, sandbox_id: str, ttl: float) -> float:
        """Let the sandbox live ``ttl`` more seconds from now; returns the new deadline."""
        ttl = _check_ttl(ttl)
        self.get(sandbox_id)
        deadline = time.time() + ttl
        seq = self.journal.intent(sandbox_id, "set_ttl", ttl=ttl)
        self.journal.update(sandbox_id, deadline=deadline)
        self.journal.result(seq, ok=True)
        return deadline

    async def kill(self, sandbox_id: str, *, reason: str = "killed") -> None:
        """Destroy a managed sandbox (idempotent for ended ones). Raises VmNotFound."""
        rec = self.journal.get(sandbox_id)
        if rec is None:
            raise VmNotFound(sandbox_id)
        if rec.state is JournalState.ENDED:
            return
        seq = self.journal.intent(sandbox_id, "kill", reason=reason)
        self.journal.end(sandbox_id, reason)  # the keeper sees it and stops QEMU
        rec = self.journal.get(sandbox_id) or rec  # a keeper may have registered meanwhile
        if sandbox_id in self._local:  # run in this process
            await self._end_here(sandbox_id)
        elif in_process(rec):
            pass  # its process's watcher sees the end (never signal that process)
        elif keeper_alive(rec):
            assert rec.keeper_pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.keeper_pid, signal.SIGTERM)
            for _ in range(100):
                if not keeper_alive(rec):
                    break
                await asyncio.sleep(0.05)
            else:  # a keeper that does not stop is killed; QEMU follows it (PDEATHSIG)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rec.keeper_pid, signal.SIGKILL)
        self._remove_dirs(rec)
        end_audit(sandbox_id)
        self.journal.result(seq, ok=True)

    # ------------------------------------------------------------------ listing, repair

    def ls(self, *, include_ended: bool = False) -> list[ManagedInfo]:
        """Managed sandboxes (after a ``gc``), oldest first."""
        self.gc()
        now = time.time()
        return [ManagedInfo(sandbox_id=r.id, state=r.state,
                            image=str((r.record.get("spec") or {}).get("image", "?")),
                            created=r.created,
                            expires_in=None if r.deadline is None or r.state is JournalState.ENDED
                            else max(0.0, r.deadline - now),
                            qemu_pid=r.qemu_pid if r.state is not JournalState.ENDED else None,
                            end_reason=r.end_reason)
                for r in self.journal.sandboxes(include_ended=include_ended)]

    async def recover(self, *, starting_grace: float = 60.0) -> Recovery:
        """What a manager does on restart (and ``sandvm gc`` on demand), for operations a
        dead process left without a result: a sandbox whose ``create`` never finished
        (a cold boot or a restore from a snapshot: both are journalled as ``create``)
        may be half set up, so it is killed and recorded repair-needed; an unfinished
        ``kill`` is finished; the others (attach, detach, reclaim, set_ttl) left the
        sandbox as it was (an interrupted ``fork`` leaves its copies to their own
        ``create``). Each is then recorded as interrupted. It also kills QEMU
        processes that no live process owns, runs ``gc`` and says which sandboxes still
        run (attach to them)."""
        from sandvm.providers.qemu import orphaned_qemus

        interrupted = []
        for e in self.journal.interrupted():
            sid, op = e["sandbox_id"], e["op"]
            rec = self.journal.get(sid)
            if rec is not None and rec.state is not JournalState.ENDED and op in ("create", "kill"):
                reason = ("repair-needed: its creator ended before the sandbox was ready"
                          if op == "create" else str(e["detail"].get("reason", "killed")))
                await self.kill(sid, reason=reason)
            self.journal.result(e["seq"], ok=False, interrupted=True,
                                error="its process ended before the operation finished")
            interrupted.append((sid, op))
        killed = []
        for pid, _rundir in orphaned_qemus():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        repaired = self.gc(starting_grace=starting_grace)
        live = tuple(r.id for r in self.journal.sandboxes() if keeper_alive(r))
        return Recovery(live=live, repaired=tuple(repaired), interrupted=tuple(interrupted),
                        orphans_killed=tuple(killed))

    def gc(self, *, starting_grace: float = 60.0) -> list[str]:
        """Find managed sandboxes whose keeper is gone (killed, crashed host process):
        remove their runtime and disk dirs and record them ``repair-needed``. Also
        ends ``starting`` records older than ``starting_grace`` seconds that never got
        a keeper (their creator died first), and removes runtime and disk dirs whose
        owner is dead, and saves into the default snapshot store cut off by their
        process's death. Returns the repaired ids."""
        from sandvm.providers.qemu import disk_root, sweep_stale_rundirs

        repaired = []
        for rec in self.journal.sandboxes():
            if keeper_alive(rec):
                continue
            if rec.state is JournalState.STARTING and rec.keeper_pid is None and (
                    time.time() - rec.created < starting_grace or
                    self.journal.being_created(rec.id)):
                continue  # still being created (e.g. a long image import before its boot)
            self._remove_dirs(rec)
            if self.journal.end(rec.id, "repair-needed: its keeper was gone; its files"
                                        " were removed"):
                repaired.append(rec.id)
        sweep_stale_rundirs()
        sweep_stale_rundirs(disk_root())
        for root in fork_roots():  # forks whose process died before removing them
            if root.is_dir():
                sweep_stale_rundirs(root)
        SnapshotStore().clean_staging()
        self._end_audits()
        return repaired

    def _end_audits(self) -> None:
        """Move aside the egress audit files of managed sandboxes that ended with no
        process holding their proxy (a TTL its keeper enforced, a kill by id, repair)."""
        adir = audit_dir()
        if not adir.is_dir():
            return
        for f in adir.glob("egress-*.jsonl"):
            sid = f.name.removeprefix("egress-").removesuffix(".jsonl")
            rec = self.journal.get(sid)
            if rec is not None and rec.state is JournalState.ENDED:
                end_audit(sid)

    @staticmethod
    def _remove_dirs(rec: SandboxRecord) -> None:
        for d in (rec.rundir, rec.diskdir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
