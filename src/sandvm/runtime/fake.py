"""``FakeIsolationRuntime``: a deterministic, in-memory IsolationRuntime for tests.

It keeps every rule of :mod:`sandvm.runtime.port`, enforced here:

- ``prepare_session`` needs a supported host and kind (else Unsupported);
  sessions start PREPARING.
- resolve_image, prepare_rootfs, resolve_mounts, configure_network and
  prepare_secrets need a PREPARING session; prepare_rootfs needs an image this
  session resolved; refs must be ones this runtime issued for the same session
  (else InvalidSpec).
- ``prepare_environment`` needs a PREPARING session and its rootfs; it seals the
  session (→ READY) and works once.
- ``start_process`` is the only operation that starts a process, and only in a
  READY session: before ``prepare_environment`` it raises SandboxStateError.
- stream_io / signal_process / collect_stats need a known process (InvalidSpec)
  of a READY session (SandboxStateError when detached or cleaned up).
- ``cleanup`` kills the session's processes (→ CLEANED, terminal) and returns the
  configured status; again it returns the same result; any other call on the
  session raises SandboxStateError. A detached session cannot be cleaned up.
- ``detach`` (PREPARING or READY) → DETACHED with a fresh random ticket;
  ``reclaim`` works once per ticket: KEEP restores the previous state, DESTROY
  cleans up. A reused ticket raises SandboxStateError, an unknown one InvalidSpec.
- Capabilities reported unsupported are refused with Unsupported (egress
  allowlist, process timeout, detach, reclaim, mounts).

Fake specifics:

- Ids are deterministic (``sess-1``, ``rootfs-1``, ``env-1``, ``proc-1``, ...);
  only ticket tokens are random, since they must be unguessable.
- A started process runs a script: a list of :data:`FakeStep`. The default,
  :func:`shell_script`, understands a tiny subset of ``sh -c``: commands split
  on ``;`` or newlines, ``$NAME`` words expanded, ``>&2`` at the end of a
  command; ``echo [-n]``, ``cat [PATH...]`` (secret files; no path: copy stdin),
  ``printenv NAME``, ``sleep N``, ``head -c N /dev/zero``, ``trap '' INT TERM``,
  ``true``, ``false``, ``exit N``; anything else prints "not found" and sets
  status 127. Without ``sh -c`` the argv is one such command.
  ``with_script(fn)`` replaces it: ``fn(FakeProcessContext) -> steps``.
- Time is virtual: it passes for a process only while ``stream_io`` waits on it
  (``wait_seconds`` with no output ready); sleeps, timeouts and signal grace
  periods elapse in that time. A signal not ignored ends the process at once
  (exit code 128 + signal); an ignored one escalates to SIGKILL after the grace.
- Stats: cpu_time is 1 ms per script step run, memory 1 MiB and one process
  while running, nothing once exited.
- ``calls()`` lists every port operation called (not ``runtime_ref``), in
  order, failed ones included.

The scripts and the processes that run them are in :mod:`sandvm.runtime.fake_process`.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sandvm.errors import InvalidSpec, SandboxStateError, UnknownImage
from sandvm.runtime.fake_process import (
    FakeProcess,
    FakeProcessContext,
    FakeScript,
    shell_script,
)
from sandvm.runtime.port import (
    KIND_HOST_PROCESS,
    KIND_MICROVM,
    MAX_TEXT,
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

__all__ = ["FakeIsolationRuntime"]  # its scripts: sandvm.runtime.fake_process

_MIB = 1 << 20


# ----------------------------------------------------------------------------- sessions


@dataclass
class _Session:
    ref: IsolationSessionRef
    state: SessionState = SessionState.PREPARING
    before_detach: SessionState = SessionState.PREPARING
    images: list[ImageResolution] = field(default_factory=list)
    rootfs: dict[str, RootfsRef] = field(default_factory=dict)
    mounts: dict[str, MountPlan] = field(default_factory=dict)
    networks: dict[str, NetworkNamespaceRef] = field(default_factory=dict)
    secret_plans: dict[str, tuple[SecretSpec, ...]] = field(default_factory=dict, repr=False)
    environment: PreparedEnvironmentRef | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    processes: list[str] = field(default_factory=list)
    cleanup: CleanupResult | None = None


@dataclass
class _Ticket:
    session_id: str
    used: bool = False


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 3] + "..."


class FakeIsolationRuntime:
    """A deterministic in-memory :class:`~sandvm.runtime.port.IsolationRuntime`.

    Builders (``with_report``, ``unsupported_host``, ``host_process_only``,
    ``with_cleanup_status``, ``with_script``) return a new fake with a fresh,
    empty state; they do no I/O.
    """

    def __init__(self, *, runtime_ref: IsolationRuntimeRef | str = "fake",
                 report: IsolationCapabilityReport | None = None,
                 cleanup_status: CleanupStatus = CleanupStatus.COMPLETED,
                 script: FakeScript | None = None,
                 images: Iterable[str] = ("base", "debian")) -> None:
        self._report = report or self.default_report(runtime_ref)
        self._ref = self._report.runtime
        self._cleanup_status = CleanupStatus(cleanup_status)
        self._script: FakeScript = script or shell_script
        self._images = frozenset(images)
        self._calls: list[str] = []
        self._counters: dict[str, int] = {}
        self._sessions: dict[str, _Session] = {}
        self._processes: dict[str, FakeProcess] = {}
        self._tickets: dict[str, _Ticket] = {}  # sha256(token) -> ticket

    # ------------------------------------------------------------------ builders

    @staticmethod
    def default_report(runtime_ref: IsolationRuntimeRef | str = "fake"
                       ) -> IsolationCapabilityReport:
        """A healthy report: both kinds, everything simulated but snapshots and ttl."""
        yes, no = Capability.yes, Capability.no
        return IsolationCapabilityReport(
            runtime=IsolationRuntimeRef.of(runtime_ref), health=HealthStatus.HEALTHY,
            supported_kinds=(KIND_MICROVM, KIND_HOST_PROCESS),
            capabilities={
                "egress_allowlist": yes("simulated: the allowlist is recorded; no network"),
                "secret_isolation": yes("simulated: values stay in fake memory; results"
                                        " hold references only"),
                "process_timeout": yes("simulated in virtual time"),
                "cleanup": yes("releases everything the fake holds"),
                "detach": yes("simulated: random tickets kept in memory"),
                "reclaim": yes("simulated: within this fake instance only"),
                "audit_log": yes("calls() records every operation in order"),
                "snapshots": no("the fake has no snapshot operation"),
                "mounts": yes("simulated: mount plans are recorded; no volumes exist"),
                "ttl": no("the fake has no clock: sessions never expire"),
            })

    @classmethod
    def with_report(cls, report: IsolationCapabilityReport) -> FakeIsolationRuntime:
        """A fake that reports (and obeys) ``report``."""
        return cls(report=expect_request(report, IsolationCapabilityReport))

    @classmethod
    def unsupported_host(cls, adapter_ref: IsolationRuntimeRef | str,
                         missing: Iterable[str]) -> FakeIsolationRuntime:
        """A fake on a host that cannot run sessions; ``missing`` says why (non-empty)."""
        missing = tuple(missing)
        reason = _clip("unsupported host: " + "; ".join(str(m) for m in missing))
        report = IsolationCapabilityReport(
            runtime=IsolationRuntimeRef.of(adapter_ref), health=HealthStatus.UNSUPPORTED_HOST,
            missing=missing, supported_kinds=(),
            capabilities=dict.fromkeys(cls.default_report().capabilities,
                                       Capability.no(reason)))
        return cls(report=report)

    @classmethod
    def host_process_only(cls, adapter_ref: IsolationRuntimeRef | str) -> FakeIsolationRuntime:
        """A degraded fake that runs ``host_process`` sessions only (no microVMs), so
        no egress allowlist and no secret isolation."""
        caps = dict(cls.default_report().capabilities)
        caps["egress_allowlist"] = Capability.no("host processes share the host's network")
        caps["secret_isolation"] = Capability.no(
            "host processes of the same user can read each other's secrets")
        report = IsolationCapabilityReport(
            runtime=IsolationRuntimeRef.of(adapter_ref), health=HealthStatus.DEGRADED,
            missing=("microvm isolation (no usable KVM/QEMU)",),
            supported_kinds=(KIND_HOST_PROCESS,), capabilities=caps)
        return cls(report=report)

    def _replace(self, **changes: Any) -> FakeIsolationRuntime:
        config: dict[str, Any] = {"report": self._report, "cleanup_status": self._cleanup_status,
                                  "script": self._script, "images": self._images}
        config.update(changes)
        return type(self)(**config)

    def with_cleanup_status(self, cleanup_status: CleanupStatus) -> FakeIsolationRuntime:
        """A fake like this one whose ``cleanup`` returns ``cleanup_status``."""
        return self._replace(cleanup_status=CleanupStatus(cleanup_status))

    def with_script(self, script: FakeScript) -> FakeIsolationRuntime:
        """A fake like this one whose processes run ``script(context)``."""
        return self._replace(script=script)

    # ------------------------------------------------------------------ inspection

    def calls(self) -> list[str]:
        """Names of the port operations called so far, in order."""
        return list(self._calls)

    def call_count(self) -> int:
        return len(self._calls)

    def start_process_call_count(self) -> int:
        """How many times ``start_process`` was called (started or refused)."""
        return self._calls.count("start_process")

    def stdin_received(self, process_id: str) -> bytes:
        """Everything written to a process's stdin. Raises InvalidSpec if unknown."""
        proc = self._processes.get(process_id)
        if proc is None:
            unknown_ref("process", process_id)
        return bytes(proc.stdin_log)

    def session_state(self, session_id: str) -> str:
        """``preparing``, ``ready``, ``detached`` or ``cleaned``. InvalidSpec if unknown."""
        return self._session(session_id).state.value

    def __repr__(self) -> str:
        return (f"FakeIsolationRuntime(runtime={self._ref.name!r},"
                f" sessions={len(self._sessions)}, calls={len(self._calls)})")

    # ------------------------------------------------------------------ internals

    def _new_id(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = n
        return f"{prefix}-{n}"

    def _session(self, session_id: str) -> _Session:
        sess = self._sessions.get(session_id)
        if sess is None:
            unknown_ref("session", session_id)
        return sess

    def _usable(self, session_id: str, *allowed: SessionState) -> _Session:
        sess = self._session(session_id)
        check_session_state(session_id, sess.state, allowed)
        return sess

    def _preparing(self, session_id: str) -> _Session:
        return self._usable(session_id, SessionState.PREPARING)

    def _proc(self, process_id: str) -> FakeProcess:
        proc = self._processes.get(process_id)
        if proc is None:
            unknown_ref("process", process_id)
        self._usable(proc.session_id, SessionState.READY)
        return proc

    def _do_cleanup(self, sess: _Session) -> CleanupResult:
        released: list[str] = []
        for pid in sess.processes:
            proc = self._processes[pid]
            if not proc.exited:
                proc.kill(ProcessSignal.KILL.signum)
            released.append(pid)
        released += [*sess.rootfs, *sess.mounts, *sess.networks, *sess.secret_plans]
        if sess.environment is not None:
            released.append(sess.environment.environment_id)
        sess.secret_plans.clear()
        sess.env.clear()
        sess.secret_env.clear()
        sess.files.clear()
        status = self._cleanup_status
        repairs = (() if status is CleanupStatus.COMPLETED
                   else (f"fake: scripted repair for session {sess.ref.session_id}",))
        sess.state = SessionState.CLEANED
        sess.cleanup = CleanupResult(session_id=sess.ref.session_id, status=status,
                                     repairs=repairs, released=tuple(released))
        return sess.cleanup

    # ------------------------------------------------------------------ the port

    def runtime_ref(self) -> IsolationRuntimeRef:
        """This fake's adapter ref. Pure; not recorded in ``calls()``."""
        return self._ref

    async def capability_report(self) -> IsolationCapabilityReport:
        """The configured report. Allowed at any time."""
        self._calls.append("capability_report")
        return self._report

    async def prepare_session(self, request: SessionPrepareRequest) -> IsolationSessionRef:
        """A new PREPARING session. Raises Unsupported, InvalidSpec (id in use)."""
        self._calls.append("prepare_session")
        request = expect_request(request, SessionPrepareRequest)
        self._report.require_kind(request.kind)
        sid = request.sandbox_id or self._new_id("sess")
        while request.sandbox_id is None and sid in self._sessions:
            sid = self._new_id("sess")
        if sid in self._sessions:
            raise InvalidSpec(f"sandbox id {sid!r} is already in use: choose another")
        ref = IsolationSessionRef(session_id=sid, kind=request.kind, runtime=self._ref,
                                  ttl_seconds=request.ttl_seconds)
        self._sessions[sid] = _Session(ref=ref)
        return ref

    async def resolve_image(self, request: ImageResolveRequest) -> ImageResolution:
        """Resolve one of the fake's images (PREPARING). Raises UnknownImage."""
        self._calls.append("resolve_image")
        request = expect_request(request, ImageResolveRequest)
        sess = self._preparing(request.session_id)
        if request.image not in self._images:
            raise UnknownImage(f"unknown image {request.image!r}: the fake knows "
                               + ", ".join(sorted(self._images)))
        res = ImageResolution(session_id=sess.ref.session_id, image=request.image,
                              resolved=f"fake:{request.image}",
                              digest="sha256:" + hashlib.sha256(request.image.encode()).hexdigest())
        sess.images.append(res)
        return res

    async def prepare_rootfs(self, request: RootfsPrepareRequest) -> RootfsRef:
        """A rootfs for an image this session resolved (PREPARING)."""
        self._calls.append("prepare_rootfs")
        request = expect_request(request, RootfsPrepareRequest)
        sess = self._preparing(request.session_id)
        if request.image not in sess.images:
            raise InvalidSpec("the image was not resolved for this session: call"
                              " resolve_image first")
        ref = RootfsRef(session_id=sess.ref.session_id, rootfs_id=self._new_id("rootfs"),
                        image=request.image.resolved, read_only=request.read_only)
        sess.rootfs[ref.rootfs_id] = ref
        return ref

    async def resolve_mounts(self, request: MountResolveRequest) -> MountPlan:
        """Record a mount plan (PREPARING). Raises Unsupported without ``mounts``."""
        self._calls.append("resolve_mounts")
        request = expect_request(request, MountResolveRequest)
        sess = self._preparing(request.session_id)
        if request.mounts:
            self._report.require("mounts")
        plan = MountPlan(session_id=sess.ref.session_id, plan_id=self._new_id("mounts"),
                         mounts=tuple(request.mounts))
        sess.mounts[plan.plan_id] = plan
        return plan

    async def configure_network(self, request: NetworkPrepareRequest) -> NetworkNamespaceRef:
        """Record the network (PREPARING). Raises Unsupported for an allowlist
        without ``egress_allowlist``."""
        self._calls.append("configure_network")
        request = expect_request(request, NetworkPrepareRequest)
        sess = self._preparing(request.session_id)
        if request.egress_allowlist:
            self._report.require("egress_allowlist")
        ref = NetworkNamespaceRef(
            session_id=sess.ref.session_id, network_id=self._new_id("net"), mode=request.mode,
            egress_allowlist=tuple(request.egress_allowlist))
        sess.networks[ref.network_id] = ref
        return ref

    async def prepare_secrets(self, request: SecretPrepareRequest) -> SecretMaterializationPlan:
        """Keep the values privately; return references (PREPARING)."""
        self._calls.append("prepare_secrets")
        request = expect_request(request, SecretPrepareRequest)
        sess = self._preparing(request.session_id)
        plan = SecretMaterializationPlan(
            session_id=sess.ref.session_id, plan_id=self._new_id("secrets"),
            secrets=tuple(SecretRef.of(s) for s in request.secrets))
        sess.secret_plans[plan.plan_id] = tuple(request.secrets)
        return plan

    async def prepare_environment(
        self, request: EnvironmentPrepareRequest
    ) -> PreparedEnvironmentRef:
        """Seal the session into its environment (PREPARING → READY). Starts nothing."""
        self._calls.append("prepare_environment")
        request = expect_request(request, EnvironmentPrepareRequest)
        sess = self._preparing(request.session_id)
        if sess.rootfs.get(request.rootfs.rootfs_id) != request.rootfs:
            unknown_ref("rootfs", request.rootfs.rootfs_id)
        specs = check_environment_refs(request, mounts=sess.mounts, networks=sess.networks,
                                       secret_plans=sess.secret_plans)
        for spec in specs:
            value = spec.value.reveal()
            if spec.delivery is SecretDelivery.FILE:
                assert spec.path is not None
                sess.files[spec.path] = value
            else:
                assert spec.env_name is not None
                sess.secret_env[spec.env_name] = value.decode("utf-8", "surrogateescape")
        sess.env = dict(request.env)
        sess.environment = PreparedEnvironmentRef(session_id=sess.ref.session_id,
                                                  environment_id=self._new_id("env"))
        sess.state = SessionState.READY
        return sess.environment

    async def start_process(self, request: ProcessStartRequest) -> ProcessStartResult:
        """Start a scripted process (READY only): the only call that starts one."""
        self._calls.append("start_process")
        request = expect_request(request, ProcessStartRequest)
        sess = self._usable(request.session_id, SessionState.READY)
        if sess.environment != request.environment:
            unknown_ref("environment", request.environment.environment_id)
        if request.timeout_seconds is not None:
            self._report.require("process_timeout")
        clash = set(request.env) & set(sess.secret_env)
        if clash:
            raise InvalidSpec(f"env sets {', '.join(sorted(clash))}, which a secret delivers")
        env = {**sess.env, **request.env, **sess.secret_env}
        ctx = FakeProcessContext(argv=tuple(request.argv), env=MappingProxyType(env),
                                 files=MappingProxyType(dict(sess.files)), cwd=request.cwd)
        steps = list(self._script(ctx))
        pid = self._new_id("proc")
        proc = FakeProcess(pid, sess.ref.session_id, steps, stdin_open=request.stdin_open,
                     timeout=request.timeout_seconds)
        self._processes[pid] = proc
        sess.processes.append(pid)
        proc.run()
        return ProcessStartResult(process_id=pid, session_id=sess.ref.session_id,
                                  environment_id=sess.environment.environment_id,
                                  pid=len(sess.processes) + 1)

    async def stream_io(self, request: ProcessIoRequest) -> ProcessIoFrame:
        """Write stdin, then return up to ``max_bytes`` of output; with nothing ready,
        ``wait_seconds`` of virtual time pass first. Stdin for an exited process is
        dropped. Raises SandboxStateError if the process was started without stdin."""
        self._calls.append("stream_io")
        request = expect_request(request, ProcessIoRequest)
        proc = self._proc(request.process_id)
        if (request.stdin or request.close_stdin) and not proc.started_with_stdin:
            raise SandboxStateError(
                f"process {proc.process_id!r} was started without stdin (stdin_open=False)")
        if proc.stdin_open:
            proc.stdin += request.stdin
            proc.stdin_log += request.stdin
            if request.close_stdin:
                proc.stdin_open = False
        proc.run()
        if not proc.out and not proc.err and not proc.exited:
            proc.advance(request.wait_seconds)
        await asyncio.sleep(0)
        return proc.frame(request.max_bytes)

    async def signal_process(self, request: ProcessSignalRequest) -> ProcessSignalResult:
        """Signal a process: it ends at once unless it ignores the signal, which
        then escalates to SIGKILL after the grace period (virtual time)."""
        self._calls.append("signal_process")
        request = expect_request(request, ProcessSignalRequest)
        proc = self._proc(request.process_id)
        proc.run()
        if proc.exited:
            return ProcessSignalResult(process_id=proc.process_id, signal=request.signal,
                                       delivered=False, exited=True)
        if request.signal is ProcessSignal.KILL or request.signal not in proc.ignored:
            proc.kill(request.signal.signum)
        elif request.grace_seconds is not None and request.grace_seconds <= 0:
            proc.kill(ProcessSignal.KILL.signum)
        elif request.grace_seconds is not None:
            proc.kill_at = proc.elapsed + request.grace_seconds
        return ProcessSignalResult(process_id=proc.process_id, signal=request.signal,
                                   delivered=True, exited=proc.exited)

    async def collect_stats(self, request: ProcessStatsRequest) -> ProcessStatsSnapshot:
        """Deterministic bounded stats (see the module docstring)."""
        self._calls.append("collect_stats")
        request = expect_request(request, ProcessStatsRequest)
        proc = self._proc(request.process_id)
        proc.run()
        running = not proc.exited
        return ProcessStatsSnapshot(
            process_id=proc.process_id, running=running,
            cpu_time_seconds=round(proc.steps_run * 0.001, 6),
            memory_bytes=_MIB if running else 0, process_count=1 if running else 0,
            wall_time_seconds=proc.elapsed)

    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Kill and release everything of the session (→ CLEANED); idempotent.
        Raises SandboxStateError for a detached session."""
        self._calls.append("cleanup")
        request = expect_request(request, CleanupRequest)
        sess = self._session(request.session_id)
        if sess.cleanup is not None:
            return sess.cleanup
        self._usable(request.session_id, SessionState.PREPARING, SessionState.READY)
        return self._do_cleanup(sess)

    async def detach(self, request: DetachTransferRequest) -> DetachTransferResult:
        """Detach a PREPARING or READY session under a new random ticket."""
        self._calls.append("detach")
        request = expect_request(request, DetachTransferRequest)
        self._report.require("detach")
        sess = self._usable(request.session_id, SessionState.PREPARING, SessionState.READY)
        ticket = ReclaimTicket(sandbox_id=sess.ref.session_id, token=secrets.token_urlsafe(32))
        self._tickets[hashlib.sha256(ticket.token.encode()).hexdigest()] = _Ticket(
            session_id=sess.ref.session_id)
        sess.before_detach, sess.state = sess.state, SessionState.DETACHED
        return DetachTransferResult(session_id=sess.ref.session_id, ticket=ticket)

    async def reclaim(self, request: ReclaimRequest) -> ReclaimResult:
        """Take a detached session back by ticket (once): keep it or destroy it."""
        self._calls.append("reclaim")
        request = expect_request(request, ReclaimRequest)
        self._report.require("reclaim")
        key = hashlib.sha256(request.ticket.token.encode()).hexdigest()
        entry = self._tickets.get(key)
        if entry is None or entry.session_id != request.ticket.sandbox_id:
            raise InvalidSpec("this reclaim ticket was not issued by this runtime"
                              f" for sandbox {request.ticket.sandbox_id!r}")
        if entry.used:
            raise SandboxStateError(f"the reclaim ticket for {entry.session_id!r} was"
                                    " already used: detach again for a new one")
        sess = self._usable(entry.session_id, SessionState.DETACHED)
        entry.used = True
        sess.state = sess.before_detach
        if request.action is ReclaimAction.KEEP:
            return ReclaimResult(session=sess.ref, action=request.action,
                                 environment=sess.environment)
        return ReclaimResult(session=sess.ref, action=request.action,
                             environment=sess.environment, cleanup=self._do_cleanup(sess))
