"""``QemuIsolationRuntime``: the isolation runtime port on sandvm's managed QEMU sandboxes.

One session is one managed sandbox (``SandboxManager``: a microVM under a keeper
process, so it can be detached and reclaimed by ticket, also from another OS
process). The sandbox is booted by ``prepare_environment``, once the image is
known; until then a session is only planning state in this process.

- Every effect is journaled in the manager's Journal (``rt.*`` ops, intent before,
  result after, ids, names and sizes only: never a secret value, argv beyond its
  first word, or an env value).
- ``start_process`` runs the command in the background; its output goes into a
  bounded per-process buffer (``buffer_bytes``). A full buffer is backpressure: the
  guest stops reading the command's pipes until ``stream_io`` drains it, so no
  output is ever dropped. A guest-side timeout ends the process with
  ``timed_out`` and SIGKILL.
- Secrets: file secrets live on a tmpfs the agent mounts at ``/run/secrets``
  (owned by the workload user, files mode 0400); they must lie under
  /run/secrets. Env secrets are kept in this process's memory only and added to
  each started process's env. A session reclaimed by *another* process therefore
  cannot start processes that need env secrets (SandboxStateError names them).
- A PREPARING session has no VM yet and cannot be detached (SandboxStateError).
  Processes started before a detach are not readable after the reclaim (their
  output stream ended with the detach; cleanup still kills them).

One file (about 850 lines): one class, the port's 16 operations over one session
table, each checking its state, journaling its effect and mapping the sandbox's
errors. The rules it shares with the fake runtime are in :mod:`sandvm.runtime.port`;
what is left is this adapter's own state machine, which split across modules would
only be harder to follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandvm.core import BUILTIN_IMAGES, new_id
from sandvm.errors import (
    AgentProtocolError,
    AssetMissing,
    InvalidSpec,
    SandboxStateError,
    SandvmError,
    Unsupported,
)
from sandvm.output import OutputPipe, exit_status, wait_outcome
from sandvm.runtime.journal import Journal, journal_path
from sandvm.runtime.manager import (
    Recovery,
    SandboxManager,
    keeper_alive,
    ticket_matches,
    ticket_sha256,
)
from sandvm.runtime.port import (
    KIND_MICROVM,
    MAX_STATS_CPU_SECONDS,
    MAX_STATS_MEMORY_BYTES,
    MAX_STATS_PROCESSES,
    MAX_TTL_SECONDS,
    Capability,
    CleanupRequest,
    CleanupResult,
    CleanupStatus,
    DetachTransferRequest,
    DetachTransferResult,
    EnvironmentPrepareRequest,
    HealthStatus,
    ImageResolution,
    ImageResolveRequest,
    IsolationCapabilityReport,
    IsolationRuntimeRef,
    IsolationSessionRef,
    MountPlan,
    MountResolveRequest,
    NetworkMode,
    NetworkNamespaceRef,
    NetworkPrepareRequest,
    PreparedEnvironmentRef,
    ProcessIoFrame,
    ProcessIoRequest,
    ProcessSignal,
    ProcessSignalRequest,
    ProcessSignalResult,
    ProcessStartRequest,
    ProcessStartResult,
    ProcessStatsRequest,
    ProcessStatsSnapshot,
    ReclaimAction,
    ReclaimRequest,
    ReclaimResult,
    ReclaimTicket,
    RootfsPrepareRequest,
    RootfsRef,
    SecretDelivery,
    SecretMaterializationPlan,
    SecretPrepareRequest,
    SecretRef,
    SecretSpec,
    SessionPrepareRequest,
    SessionState,
    check_environment_refs,
    check_session_state,
    expect_request,
    unknown_ref,
)
from sandvm.sandbox import AsyncCommandHandle, AsyncSandbox
from sandvm.values import CommandResult

__all__ = ["DEFAULT_BUFFER_BYTES", "SECRETS_DIR", "QemuIsolationRuntime"]

SECRETS_DIR = "/run/secrets"
DEFAULT_BUFFER_BYTES = 1 << 20  # output buffered per process before backpressure
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_RECORD_KEY = "isolation"  # this runtime's part of the journal's sandbox record


@dataclass
class _Session:
    ref: IsolationSessionRef
    memory_mib: int
    vcpus: int
    state: SessionState = SessionState.PREPARING
    before_detach: SessionState = SessionState.PREPARING
    images: list[ImageResolution] = field(default_factory=list)
    rootfs: dict[str, tuple[RootfsRef, ImageResolution, int | None]] = field(
        default_factory=dict)
    mounts: dict[str, MountPlan] = field(default_factory=dict)
    networks: dict[str, NetworkNamespaceRef] = field(default_factory=dict)
    secret_plans: dict[str, tuple[SecretSpec, ...]] = field(default_factory=dict)
    environment: PreparedEnvironmentRef | None = None
    sb: AsyncSandbox | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    missing_secret_env: tuple[str, ...] = ()  # names whose values this process lacks
    processes: list[str] = field(default_factory=list)
    cleanup: CleanupResult | None = None


class _Proc:
    """A started process: its handle, its bounded output pipe and how it ended."""

    def __init__(self, process_id: str, session_id: str, *, stdin_open: bool, cap: int) -> None:
        self.process_id = process_id
        self.session_id = session_id
        self.stdin_open = stdin_open
        self.stdin_closed = not stdin_open
        self.cap = cap
        # full: backpressure (the guest stops reading its pipes), so never more than cap
        self.output = OutputPipe(max_bytes=cap)
        self.handle: AsyncCommandHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.lost = False  # its stream ended with a detach
        self.error: SandvmError | None = None
        self.exit_code = 0
        self.signal: int | None = None
        self.timed_out = False
        self.sequence = 0
        self.started = time.monotonic()
        self.ended: float | None = None
        self.cpu_seconds = 0.0

    @property
    def buffered(self) -> int:
        return self.output.buffered

    @property
    def done(self) -> bool:
        return self.output.closed

    async def wait(self) -> None:
        assert self.handle is not None
        res: CommandResult | None = None
        try:
            res, self.timed_out = await wait_outcome(self.handle.wait(), need_result=False)
        except SandvmError as exc:
            self.error = exc
        finally:
            self.exit_code, self.signal = exit_status(res, timed_out=self.timed_out)
            self.ended = time.monotonic()
            self.output.close()

class QemuIsolationRuntime:
    """The IsolationRuntime port on managed QEMU microVMs (see the module docstring).

    ``journal``: a Journal, or the path of one (default ``$SANDVM_JOURNAL`` or
    ``$SANDVM_HOME/runtime/journal.db``). The constructor does no I/O.
    """

    def __init__(self, *, journal: Journal | str | os.PathLike[str] | None = None,
                 name: str = "qemu", buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 boot_timeout: float = 60.0) -> None:
        if not 64 * 1024 <= buffer_bytes <= 1 << 30:
            raise InvalidSpec("buffer_bytes must be between 64 KiB and 1 GiB")
        self._ref = IsolationRuntimeRef(name=name, version="1")
        self._journal_arg = journal
        self._manager: SandboxManager | None = None
        self._buffer = buffer_bytes
        self._boot_timeout = boot_timeout
        self._report: IsolationCapabilityReport | None = None
        self._sessions: dict[str, _Session] = {}
        self._processes: dict[str, _Proc] = {}
        self._spent: set[str] = set()  # hashes of tickets used through this runtime

    def __repr__(self) -> str:
        return f"QemuIsolationRuntime(name={self._ref.name!r}, sessions={len(self._sessions)})"

    # ------------------------------------------------------------------ helpers

    @property
    def manager(self) -> SandboxManager:
        """The sandbox manager (opens the journal on first use)."""
        if self._manager is None:
            j = self._journal_arg
            journal = j if isinstance(j, Journal) else Journal(
                Path(j) if j is not None else journal_path())
            self._manager = SandboxManager(journal)
        return self._manager

    @property
    def journal(self) -> Journal:
        return self.manager.journal

    def _session(self, session_id: str) -> _Session:
        sess = self._sessions.get(session_id)
        if sess is None:
            unknown_ref("session", session_id)
        return sess

    def _usable(self, session_id: str, *states: SessionState) -> _Session:
        sess = self._session(session_id)
        check_session_state(session_id, sess.state, states)
        return sess

    def _proc(self, process_id: str) -> _Proc:
        proc = self._processes.get(process_id)
        if proc is None:
            unknown_ref("process", process_id)
        self._usable(proc.session_id, SessionState.READY)
        if proc.lost:
            raise SandboxStateError(
                f"process {process_id!r} was started before the session was detached; its"
                " output stream ended with the detach (cleanup kills it)")
        return proc

    def _sandbox(self, sess: _Session) -> AsyncSandbox:
        assert sess.sb is not None
        return sess.sb

    async def _effect(self, sid: str, op: str, coro: Any, **detail: Any) -> Any:
        """Journal ``op`` (intent), await ``coro``, journal its result."""
        seq = await asyncio.to_thread(self.journal.intent, sid, f"rt.{op}", **detail)
        try:
            res = await coro
        except BaseException as exc:
            await asyncio.to_thread(self.journal.result, seq, ok=False,
                                    error=type(exc).__name__)
            raise
        await asyncio.to_thread(self.journal.result, seq, ok=True)
        return res

    def _save_record(self, sess: _Session, **extra: Any) -> None:
        rec = self.journal.get(sess.ref.session_id)
        if rec is None:
            return
        mine = dict(rec.record.get(_RECORD_KEY) or {})
        mine.update(extra)
        self.journal.update(sess.ref.session_id, record={**rec.record, _RECORD_KEY: mine})

    # ------------------------------------------------------------------ the port

    def runtime_ref(self) -> IsolationRuntimeRef:
        """This adapter's ref. Pure."""
        return self._ref

    async def capability_report(self) -> IsolationCapabilityReport:
        """Health from the assets and the accelerator (KVM, or TCG: degraded); computed once."""
        if self._report is None:
            self._report = await self._build_report()
        return self._report

    async def _build_report(self) -> IsolationCapabilityReport:
        from sandvm.assets import find_assets
        from sandvm.providers.qemu import choose_accel

        caps = {
            "egress_allowlist": Capability.no(
                "sandvm VMs have no network device yet: a session has no network at all,"
                " so an egress allowlist cannot be enforced"),
            "secret_isolation": Capability.yes(
                "file secrets on a guest tmpfs at /run/secrets (mode 0400, the workload"
                " user), env secrets only in started processes' env; values never reach"
                " the journal, logs or error messages"),
            "process_timeout": Capability.yes(
                "the guest agent kills the command's cgroup at the timeout"),
            "cleanup": Capability.yes(
                "cleanup kills the session's VM and keeper and removes its runtime and"
                " disk dirs; leftovers are reported as repair_needed"),
            "detach": Capability.yes(
                "a READY session's VM runs under a keeper process and is handed over by"
                " ticket (a PREPARING session has no VM yet)"),
            "reclaim": Capability.yes(
                "by ticket, once, also from another OS process of the same user (env"
                " secrets stay with the process that prepared them)"),
            "audit_log": Capability.yes(
                "every effect is journaled (intent and result) in the SQLite journal"),
            "snapshots": Capability.no(
                "the port has no snapshot operation (AsyncSandbox.snapshot is outside it)"),
            "mounts": Capability.no("managed (detachable) sandboxes cannot have volumes yet"),
            "ttl": Capability.yes(
                "the keeper kills the VM when the session's TTL expires"),
        }
        try:
            assets = find_assets()
        except AssetMissing as exc:
            missing = (f"guest assets or QEMU: {exc.message}"[:500],)
            return IsolationCapabilityReport(
                runtime=self._ref, health=HealthStatus.UNSUPPORTED_HOST, missing=missing,
                capabilities={k: Capability.no("unsupported host: " + missing[0][:400])
                              for k in caps})
        choice = await choose_accel(assets)
        if choice.accel == "kvm":
            return IsolationCapabilityReport(runtime=self._ref, health=HealthStatus.HEALTHY,
                                             supported_kinds=(KIND_MICROVM,),
                                             capabilities=caps)
        return IsolationCapabilityReport(
            runtime=self._ref, health=HealthStatus.DEGRADED,
            missing=(f"KVM ({choice.reason}): VMs run under TCG emulation, much slower"[:500],),
            supported_kinds=(KIND_MICROVM,), capabilities=caps)

    async def prepare_session(self, request: SessionPrepareRequest) -> IsolationSessionRef:
        """A new PREPARING session (no VM yet). Raises Unsupported, InvalidSpec (id in use)."""
        request = expect_request(request, SessionPrepareRequest)
        (await self.capability_report()).require_kind(request.kind)
        sid = request.sandbox_id or new_id("sb")
        if sid in self._sessions or await asyncio.to_thread(self.journal.get, sid) is not None:
            raise InvalidSpec(f"sandbox id {sid!r} is already in use: choose another")
        ref = IsolationSessionRef(session_id=sid, kind=request.kind, runtime=self._ref,
                                  ttl_seconds=request.ttl_seconds)

        async def make() -> None:
            self._sessions[sid] = _Session(ref=ref, memory_mib=request.memory_mib,
                                           vcpus=request.vcpus)

        await self._effect(sid, "prepare_session", make(), kind=request.kind,
                           ttl=request.ttl_seconds, memory_mib=request.memory_mib,
                           vcpus=request.vcpus)
        return ref

    async def resolve_image(self, request: ImageResolveRequest) -> ImageResolution:
        """``base`` or an image of the store (PREPARING). Raises UnknownImage, ImageError."""
        request = expect_request(request, ImageResolveRequest)
        sess = self._usable(request.session_id, SessionState.PREPARING)

        async def resolve() -> ImageResolution:
            if request.image in BUILTIN_IMAGES:
                return ImageResolution(session_id=sess.ref.session_id, image=request.image,
                                       resolved=f"builtin:{request.image}")
            from sandvm.images.store import ImageStore

            stored = await asyncio.to_thread(ImageStore().get, request.image)
            digest = stored.manifest_digest if isinstance(stored.manifest_digest, str) \
                and _DIGEST_RE.fullmatch(stored.manifest_digest) else None
            return ImageResolution(session_id=sess.ref.session_id, image=request.image,
                                   resolved=f"store:{request.image}"[:500], digest=digest)

        res: ImageResolution = await self._effect(sess.ref.session_id, "resolve_image",
                                                  resolve(), image=request.image[:200])
        sess.images.append(res)
        return res

    async def prepare_rootfs(self, request: RootfsPrepareRequest) -> RootfsRef:
        """Plan the root file system: a private overlay of the image, made when the VM
        boots (PREPARING). Raises InvalidSpec, Unsupported (read_only)."""
        request = expect_request(request, RootfsPrepareRequest)
        sess = self._usable(request.session_id, SessionState.PREPARING)
        if request.image not in sess.images:
            raise InvalidSpec("the image was not resolved for this session: call"
                              " resolve_image first")
        if request.read_only:
            raise Unsupported("the qemu runtime gives every session a private writable root;"
                              " read-only roots are not supported")
        if request.image.image in BUILTIN_IMAGES and request.disk_size_bytes is not None:
            raise InvalidSpec(f"the {request.image.image!r} image runs from memory and has no"
                              " disk: give disk_size_bytes only with a stored image")

        async def plan() -> RootfsRef:
            return RootfsRef(session_id=sess.ref.session_id, rootfs_id=new_id("rootfs"),
                             image=request.image.image)

        ref: RootfsRef = await self._effect(sess.ref.session_id, "prepare_rootfs", plan(),
                                            image=request.image.image[:200],
                                            disk_size=request.disk_size_bytes)
        sess.rootfs[ref.rootfs_id] = (ref, request.image, request.disk_size_bytes)
        return ref

    async def resolve_mounts(self, request: MountResolveRequest) -> MountPlan:
        """An empty mount plan (PREPARING); volumes raise Unsupported (mounts)."""
        request = expect_request(request, MountResolveRequest)
        sess = self._usable(request.session_id, SessionState.PREPARING)
        if request.mounts:
            (await self.capability_report()).require("mounts")
        plan = MountPlan(session_id=sess.ref.session_id, plan_id=new_id("mounts"))
        sess.mounts[plan.plan_id] = plan
        return plan

    async def configure_network(self, request: NetworkPrepareRequest) -> NetworkNamespaceRef:
        """No network (PREPARING). An allowlist raises Unsupported (egress_allowlist)."""
        request = expect_request(request, NetworkPrepareRequest)
        sess = self._usable(request.session_id, SessionState.PREPARING)
        if request.egress_allowlist:
            (await self.capability_report()).require("egress_allowlist")

        async def make() -> NetworkNamespaceRef:
            return NetworkNamespaceRef(session_id=sess.ref.session_id,
                                       network_id=new_id("net"), mode=NetworkMode.NONE)

        ref: NetworkNamespaceRef = await self._effect(sess.ref.session_id,
                                                      "configure_network", make(), mode="none")
        sess.networks[ref.network_id] = ref
        return ref

    async def prepare_secrets(self, request: SecretPrepareRequest) -> SecretMaterializationPlan:
        """Keep the values in memory; return references (PREPARING). File secrets must
        lie under /run/secrets (a tmpfs). Raises InvalidSpec."""
        request = expect_request(request, SecretPrepareRequest)
        sess = self._usable(request.session_id, SessionState.PREPARING)
        for spec in request.secrets:
            if spec.delivery is SecretDelivery.FILE and not (
                    spec.path or "").startswith(SECRETS_DIR + "/"):
                raise InvalidSpec(f"secret {spec.name!r}: the qemu runtime delivers file"
                                  f" secrets only under {SECRETS_DIR}/ (a tmpfs), not at"
                                  f" {spec.path}")

        async def make() -> SecretMaterializationPlan:
            return SecretMaterializationPlan(
                session_id=sess.ref.session_id, plan_id=new_id("secrets"),
                secrets=tuple(SecretRef.of(s) for s in request.secrets))

        plan: SecretMaterializationPlan = await self._effect(
            sess.ref.session_id, "prepare_secrets", make(),
            secrets=[{"name": s.name, "delivery": s.delivery.value, "path": s.path,
                      "env_name": s.env_name} for s in request.secrets])
        sess.secret_plans[plan.plan_id] = tuple(request.secrets)
        return plan

    async def prepare_environment(
        self, request: EnvironmentPrepareRequest
    ) -> PreparedEnvironmentRef:
        """Boot the session's managed sandbox and deliver its file secrets
        (PREPARING → READY). Starts no workload."""
        request = expect_request(request, EnvironmentPrepareRequest)
        sess = self._usable(request.session_id, SessionState.PREPARING)
        entry = sess.rootfs.get(request.rootfs.rootfs_id)
        if entry is None or entry[0] != request.rootfs:
            unknown_ref("rootfs", request.rootfs.rootfs_id)
        specs = check_environment_refs(request, mounts=sess.mounts, networks=sess.networks,
                                       secret_plans=sess.secret_plans)
        _, image, disk_size = entry
        sid = sess.ref.session_id
        env_id = new_id("env")
        files = [s for s in specs if s.delivery is SecretDelivery.FILE]

        async def boot() -> AsyncSandbox:
            ttl = sess.ref.ttl_seconds or MAX_TTL_SECONDS
            sb = await self.manager.create(ttl=ttl, sandbox_id=sid, image=image.image,
                                           memory_mib=sess.memory_mib, vcpus=sess.vcpus,
                                           disk_size=disk_size,
                                           boot_timeout=self._boot_timeout)
            try:
                user = request.user or self._image_user(sb)
                if files:
                    await self._deliver_files(sb, files, user)
                await asyncio.to_thread(self._save_record, sess, kind=sess.ref.kind,
                                        ttl=sess.ref.ttl_seconds, environment_id=env_id,
                                        env=dict(request.env), workdir=request.workdir,
                                        user=request.user,
                                        secret_env=[s.env_name for s in specs
                                                    if s.env_name is not None])
            except BaseException:
                with contextlib.suppress(SandvmError):
                    await sb.kill()
                with contextlib.suppress(SandvmError):
                    await self.manager.kill(sid, reason="failed to prepare")
                raise
            return sb

        sess.sb = await self._effect(
            sid, "prepare_environment", boot(), image=image.image[:200],
            environment_id=env_id, env_names=sorted(request.env)[:100],
            secrets=[s.name for s in specs])
        for spec in specs:
            if spec.delivery is SecretDelivery.ENV:
                assert spec.env_name is not None
                sess.secret_env[spec.env_name] = spec.value.reveal().decode(
                    "utf-8", "surrogateescape")
        sess.secret_plans.clear()  # delivered: no need to keep file values any more
        sess.env, sess.workdir, sess.user = dict(request.env), request.workdir, request.user
        sess.environment = PreparedEnvironmentRef(session_id=sid, environment_id=env_id)
        sess.state = SessionState.READY
        return sess.environment

    @staticmethod
    def _image_user(sb: AsyncSandbox) -> str | None:
        image = sb.image_record
        return image.user if image is not None and image.user else None

    @staticmethod
    async def _deliver_files(sb: AsyncSandbox, files: list[SecretSpec],
                             user: str | None) -> None:
        """Mount the secrets tmpfs and write each file (0400, owned by ``user``)."""
        await sb.files.mount_tmpfs(SECRETS_DIR, mode=0o500, user=user)
        for spec in files:
            assert spec.path is not None
            await sb.files.write(spec.path, spec.value.reveal(), mode=0o400)
            await sb.files.chown(spec.path, user=user or "0", mode=0o400)

    async def start_process(self, request: ProcessStartRequest) -> ProcessStartResult:
        """Start ``argv`` in the background in the session's VM (READY only)."""
        request = expect_request(request, ProcessStartRequest)
        sess = self._usable(request.session_id, SessionState.READY)
        if sess.environment != request.environment:
            unknown_ref("environment", request.environment.environment_id)
        clash = set(request.env) & (set(sess.secret_env) | set(sess.missing_secret_env))
        if clash:
            raise InvalidSpec(f"env sets {', '.join(sorted(clash))}, which a secret delivers")
        if sess.missing_secret_env:
            raise SandboxStateError(
                "this session was reclaimed from another process; the values of its env"
                f" secrets ({', '.join(sess.missing_secret_env)}) stayed with the process"
                " that prepared it")
        sb = self._sandbox(sess)
        env = {**sess.env, **request.env, **sess.secret_env}
        pid = new_id("proc")
        proc = _Proc(pid, sess.ref.session_id, stdin_open=request.stdin_open, cap=self._buffer)

        async def start() -> AsyncCommandHandle:
            handle = await sb.commands.start(
                list(request.argv), env=env, cwd=request.cwd or sess.workdir,
                timeout=request.timeout_seconds, check=False,
                user=request.user or sess.user, on_output=proc.output.put)
            if not request.stdin_open:
                await handle.close_stdin()
            return handle

        proc.handle = await self._effect(
            sess.ref.session_id, "start_process", start(), process_id=pid,
            program=request.argv[0][:200], argc=len(request.argv),
            env_names=sorted(env)[:100], timeout=request.timeout_seconds)
        proc.started = time.monotonic()
        proc.task = asyncio.get_running_loop().create_task(proc.wait())
        self._processes[pid] = proc
        sess.processes.append(pid)
        return ProcessStartResult(process_id=pid, session_id=sess.ref.session_id,
                                  environment_id=request.environment.environment_id,
                                  pid=proc.handle.pid)

    async def stream_io(self, request: ProcessIoRequest) -> ProcessIoFrame:
        """Write stdin, then return up to ``max_bytes`` of buffered output, waiting up to
        ``wait_seconds`` when there is none. Stdin for an exited process is dropped."""
        request = expect_request(request, ProcessIoRequest)
        proc = self._proc(request.process_id)
        if (request.stdin or request.close_stdin) and not proc.stdin_open:
            raise SandboxStateError(
                f"process {proc.process_id!r} was started without stdin (stdin_open=False)")
        handle = proc.handle
        assert handle is not None
        if not proc.done and not proc.stdin_closed:
            if request.stdin:
                await self._effect(proc.session_id, "stdin", self._quiet(
                    handle.send_stdin(request.stdin)), process_id=proc.process_id,
                    bytes=len(request.stdin))
            if request.close_stdin:
                proc.stdin_closed = True
                await self._effect(proc.session_id, "close_stdin",
                                   self._quiet(handle.close_stdin()),
                                   process_id=proc.process_id)
        await proc.output.wait_data(request.wait_seconds)
        out, err = proc.output.take(request.max_bytes)
        seq = proc.sequence
        proc.sequence += 1
        if proc.done and not proc.buffered:
            if proc.error is not None:
                raise proc.error
            return ProcessIoFrame(process_id=proc.process_id, sequence=seq, stdout=out,
                                  stderr=err, finished=True, exit_code=proc.exit_code,
                                  signal=proc.signal, timed_out=proc.timed_out)
        return ProcessIoFrame(process_id=proc.process_id, sequence=seq, stdout=out, stderr=err)

    @staticmethod
    async def _quiet(coro: Any) -> None:
        """Await ``coro``; a process that exited meanwhile is not an error."""
        with contextlib.suppress(SandvmError):
            await coro

    async def signal_process(self, request: ProcessSignalRequest) -> ProcessSignalResult:
        """Signal the command's process group; unless KILL, SIGKILL its whole cgroup after
        ``grace_seconds`` (None: never)."""
        request = expect_request(request, ProcessSignalRequest)
        proc = self._proc(request.process_id)
        if proc.done:
            return ProcessSignalResult(process_id=proc.process_id, signal=request.signal,
                                       delivered=False, exited=True)
        handle = proc.handle
        assert handle is not None
        grace = None if request.signal is ProcessSignal.KILL else request.grace_seconds
        delivered = True
        try:
            await self._effect(proc.session_id, "signal_process",
                               handle.send_signal(request.signal.signum, grace=grace),
                               process_id=proc.process_id, signal=request.signal.value,
                               grace=grace)
        except SandvmError:
            if not proc.done:
                raise
            delivered = False
        await proc.output.wait_data(0.05)
        return ProcessSignalResult(process_id=proc.process_id, signal=request.signal,
                                   delivered=delivered, exited=proc.done)

    async def collect_stats(self, request: ProcessStatsRequest) -> ProcessStatsSnapshot:
        """CPU time, memory and process count of the command's cgroup (capped)."""
        request = expect_request(request, ProcessStatsRequest)
        proc = self._proc(request.process_id)
        running = not proc.done
        memory = count = 0
        if running:
            sess = self._session(proc.session_id)
            sb = self._sandbox(sess)
            assert proc.handle is not None and proc.handle.pid is not None
            conn = sb.connection()
            try:  # range-checked where read: a 400-digit number never reaches float()
                stats = await sb.commands.stats(proc.handle.pid)
            except AgentProtocolError as exc:
                if exc is conn.failure:  # the channel broke: not a malformed reply
                    raise
                raise SandboxStateError(f"the guest sent malformed stats: {exc.message}"
                                        ) from None
            running = stats.running and not proc.done
            if running:
                proc.cpu_seconds = min(stats.cpu_usec / 1e6, MAX_STATS_CPU_SECONDS)
                memory = min(stats.memory_bytes, MAX_STATS_MEMORY_BYTES)
                count = max(1, min(stats.processes, MAX_STATS_PROCESSES))
        end = proc.ended if proc.ended is not None else time.monotonic()
        return ProcessStatsSnapshot(
            process_id=proc.process_id, running=running, cpu_time_seconds=proc.cpu_seconds,
            memory_bytes=memory if running else 0, process_count=count if running else 0,
            wall_time_seconds=min(max(0.0, end - proc.started), MAX_STATS_CPU_SECONDS))

    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Kill the session's VM, keeper and processes and remove its dirs (→ CLEANED);
        idempotent. REPAIR_NEEDED says what is left."""
        request = expect_request(request, CleanupRequest)
        sess = self._session(request.session_id)
        if sess.cleanup is not None:
            return sess.cleanup
        self._usable(request.session_id, SessionState.PREPARING, SessionState.READY)
        result: CleanupResult = await self._effect(sess.ref.session_id, "cleanup",
                                                   self._do_cleanup(sess))
        return result

    async def _do_cleanup(self, sess: _Session) -> CleanupResult:
        sid = sess.ref.session_id
        released: list[str] = []
        repairs: list[str] = []
        for pid in sess.processes:
            proc = self._processes[pid]
            if proc.task is not None and not proc.done:
                proc.task.cancel()  # its end closes its pipe: a waiting writer goes on
            released.append(pid)
        if sess.sb is not None:
            rec = await asyncio.to_thread(self.journal.get, sid)
            with contextlib.suppress(SandvmError):
                await sess.sb.kill()
            try:
                await self.manager.kill(sid, reason="cleanup")
            except SandvmError as exc:
                repairs.append(f"killing sandbox {sid} failed: {exc.code}")
            if rec is not None:
                repairs += await asyncio.to_thread(self._leftovers, rec)
            released.append(sid)
        released += [*sess.rootfs, *sess.mounts, *sess.networks]
        if sess.environment is not None:
            released.append(sess.environment.environment_id)
        sess.secret_plans.clear()
        sess.secret_env.clear()
        sess.sb = None
        sess.state = SessionState.CLEANED
        sess.cleanup = CleanupResult(
            session_id=sid, status=CleanupStatus.REPAIR_NEEDED if repairs
            else CleanupStatus.COMPLETED, repairs=tuple(repairs[:100]),
            released=tuple(released[:1000]))
        return sess.cleanup

    def _leftovers(self, rec: Any) -> list[str]:
        """What of a killed sandbox still exists (waits a few seconds for it to go)."""
        from sandvm._files import proc_start_time

        deadline = time.monotonic() + 10.0
        while True:
            left: list[str] = []
            if keeper_alive(rec):
                left.append(f"keeper process {rec.keeper_pid} of sandbox {rec.id} still runs")
            if rec.qemu_pid is not None and proc_start_time(rec.qemu_pid) is not None and \
                    _is_qemu(rec.qemu_pid):
                left.append(f"QEMU process {rec.qemu_pid} of sandbox {rec.id} still runs")
            for what, d in (("runtime", rec.rundir), ("disk", rec.diskdir)):
                if d and os.path.exists(d):
                    left.append(f"{what} directory {d} was not removed")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    async def detach(self, request: DetachTransferRequest) -> DetachTransferResult:
        """Hand a READY session's sandbox over under a new ticket (→ DETACHED); its
        processes keep running. A PREPARING session has no VM: SandboxStateError."""
        request = expect_request(request, DetachTransferRequest)
        (await self.capability_report()).require("detach")
        sess = self._usable(request.session_id, SessionState.PREPARING, SessionState.READY)
        if sess.sb is None:
            raise SandboxStateError(f"session {request.session_id!r} has no VM yet: call"
                                    " prepare_environment before detaching it")
        sb = sess.sb

        async def go() -> str:
            return await self.manager.detach(sb)

        token: str = await self._effect(sess.ref.session_id, "detach", go(),
                                        reason=request.reason[:200])
        for pid in sess.processes:
            proc = self._processes[pid]
            if not proc.done:
                proc.lost = True
                if proc.task is not None:
                    proc.task.cancel()
        sess.sb = None
        sess.before_detach, sess.state = sess.state, SessionState.DETACHED
        return DetachTransferResult(session_id=sess.ref.session_id,
                                    ticket=ReclaimTicket(sandbox_id=sess.ref.session_id,
                                                         token=token))

    async def reclaim(self, request: ReclaimRequest) -> ReclaimResult:
        """Take a detached sandbox back by ticket (once), from this or another process:
        KEEP (usable again) or DESTROY. Raises InvalidSpec (a ticket never issued),
        SandboxStateError (already used, or the sandbox ended)."""
        request = expect_request(request, ReclaimRequest)
        (await self.capability_report()).require("reclaim")
        ticket = request.ticket
        sid, digest = ticket.sandbox_id, ticket_sha256(ticket.token)
        rec = await asyncio.to_thread(self.journal.get, sid)
        if not ticket_matches(rec, ticket.token):
            if digest in self._spent or await asyncio.to_thread(self._was_spent, sid, digest):
                raise SandboxStateError(f"the reclaim ticket for {sid!r} was already used:"
                                        " detach again for a new one")
            raise InvalidSpec(f"this reclaim ticket was not issued for sandbox {sid!r}")
        assert rec is not None
        self._spent.add(digest)
        destroy = request.action is ReclaimAction.DESTROY

        async def take() -> AsyncSandbox | None:
            return await self.manager.reclaim(ticket.token, destroy=destroy)

        sb = await self._effect(sid, "reclaim", take(), action=request.action.value,
                                ticket_sha256=digest)
        sess = self._sessions.get(sid)
        if sess is None:
            sess = self._adopt(rec)
        sess.state = sess.before_detach
        if not destroy:
            sess.sb = sb
            return ReclaimResult(session=sess.ref, action=request.action,
                                 environment=sess.environment)
        cleanup = await self._do_cleanup(sess)
        if rec is not None:
            cleanup = await asyncio.to_thread(self._check_destroyed, cleanup, rec)
        return ReclaimResult(session=sess.ref, action=request.action,
                             environment=sess.environment, cleanup=cleanup)

    def _check_destroyed(self, cleanup: CleanupResult, rec: Any) -> CleanupResult:
        left = self._leftovers(rec)
        if not left:
            return cleanup
        result = CleanupResult(session_id=cleanup.session_id,
                               status=CleanupStatus.REPAIR_NEEDED,
                               repairs=tuple([*cleanup.repairs, *left][:100]),
                               released=cleanup.released)
        sess = self._sessions.get(cleanup.session_id)
        if sess is not None:
            sess.cleanup = result
        return result

    def _was_spent(self, sid: str, digest: str) -> bool:
        return any(e["op"] == "rt.reclaim" and e["phase"] == "intent"
                   and e["detail"].get("ticket_sha256") == digest
                   for e in self.journal.events(sid))

    def _adopt(self, rec: Any) -> _Session:
        """A session for a sandbox another process prepared and detached (from the
        journal record: no secret values there, so env secrets are missing)."""
        mine = rec.record.get(_RECORD_KEY) or {}
        spec = rec.record.get("spec") or {}
        ttl = mine.get("ttl")
        ref = IsolationSessionRef(session_id=rec.id, kind=str(mine.get("kind", KIND_MICROVM)),
                                  runtime=self._ref,
                                  ttl_seconds=float(ttl) if ttl is not None else None)
        sess = _Session(ref=ref, memory_mib=int(spec.get("memory_mib", 256)),
                        vcpus=int(spec.get("vcpus", 1)))
        env_id = mine.get("environment_id")
        if isinstance(env_id, str):
            sess.environment = PreparedEnvironmentRef(session_id=rec.id, environment_id=env_id)
            sess.before_detach = SessionState.READY
        sess.env = {str(k): str(v) for k, v in (mine.get("env") or {}).items()}
        sess.workdir = mine.get("workdir")
        sess.user = mine.get("user")
        sess.missing_secret_env = tuple(str(n) for n in mine.get("secret_env") or ())
        self._sessions[rec.id] = sess
        return sess

    async def recover(self) -> Recovery:
        """Repair after managing processes that died (run it when a service that stands
        on this runtime starts): see ``SandboxManager.recover``. Sandboxes listed as live
        still run; reclaim them by ticket, or attach to them by id."""
        return await self.manager.recover()

    async def aclose(self) -> None:
        """Clean up every session this runtime still holds (not detached ones), then
        close the journal."""
        for sess in list(self._sessions.values()):
            if sess.state in (SessionState.PREPARING, SessionState.READY):
                with contextlib.suppress(SandvmError):
                    await self.cleanup(CleanupRequest(session_id=sess.ref.session_id))
        if self._manager is not None and not isinstance(self._journal_arg, Journal):
            self._manager.journal.close()
            self._manager = None


def _is_qemu(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("qemu")
    except OSError:
        return False
