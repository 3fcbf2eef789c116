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
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import secrets
import shlex
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sandvm.errors import InvalidSpec, SandboxStateError, UnknownImage
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
    expect_request,
    unknown_ref,
)

__all__ = [
    "FakeEchoStdin",
    "FakeExit",
    "FakeIgnore",
    "FakeIsolationRuntime",
    "FakeProcessContext",
    "FakeScript",
    "FakeSleep",
    "FakeStep",
    "FakeWrite",
    "shell_script",
]

_EPS = 1e-9
_HEAD_CAP = 16 << 20
_MIB = 1 << 20


# ----------------------------------------------------------------------------- scripts


@dataclass(frozen=True)
class FakeWrite:
    """Write ``data`` to stdout (or stderr)."""

    data: bytes
    stderr: bool = False


@dataclass(frozen=True)
class FakeSleep:
    """Block for ``seconds`` of virtual time."""

    seconds: float


@dataclass(frozen=True)
class FakeEchoStdin:
    """Copy stdin to stdout until stdin is closed (``cat``)."""


@dataclass(frozen=True)
class FakeIgnore:
    """Ignore these signals from now on (KILL cannot be ignored)."""

    signals: tuple[ProcessSignal, ...]

    def __post_init__(self) -> None:
        if ProcessSignal.KILL in self.signals:
            raise InvalidSpec("kill cannot be ignored")


@dataclass(frozen=True)
class FakeExit:
    """Exit with ``code`` (remaining steps do not run)."""

    code: int


FakeStep = FakeWrite | FakeSleep | FakeEchoStdin | FakeIgnore | FakeExit


@dataclass(frozen=True, kw_only=True)
class FakeProcessContext:
    """What a fake process sees: its argv, variables and files (secret files)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    files: Mapping[str, bytes] = field(repr=False)
    cwd: str | None = None


FakeScript = Callable[[FakeProcessContext], Sequence[FakeStep]]

_SIGNAL_NAMES = {"INT": ProcessSignal.INTERRUPT, "SIGINT": ProcessSignal.INTERRUPT, "2":
                 ProcessSignal.INTERRUPT, "TERM": ProcessSignal.TERMINATE,
                 "SIGTERM": ProcessSignal.TERMINATE, "15": ProcessSignal.TERMINATE}


def _split_commands(text: str) -> list[list[str]]:
    lex = shlex.shlex(text.replace("\n", ";"), posix=True, punctuation_chars=";")
    lex.whitespace_split = True
    commands: list[list[str]] = [[]]
    try:
        for tok in lex:
            if tok and set(tok) == {";"}:
                commands.append([])
            else:
                commands[-1].append(tok)
    except ValueError:  # unbalanced quotes
        return [["sh:", "syntax error"]]
    return [c for c in commands if c]


def _expand(word: str, env: Mapping[str, str]) -> str:
    if word.startswith("${") and word.endswith("}"):
        return env.get(word[2:-1], "")
    if word.startswith("$") and len(word) > 1 and (word[1:].replace("_", "a").isalnum()):
        return env.get(word[1:], "")
    return word


def _command(words: list[str], ctx: FakeProcessContext) -> tuple[list[FakeStep], int]:
    """The steps of one command and its exit status."""
    to_err = False
    if words and words[-1] in (">&2", "1>&2"):
        to_err, words = True, words[:-1]
    if not words:
        return [], 0
    name, args = words[0].rsplit("/", 1)[-1], words[1:]

    def out(data: bytes) -> FakeStep:
        return FakeWrite(data, stderr=to_err)

    def err(msg: str) -> FakeStep:
        return FakeWrite(msg.encode(), stderr=True)

    if name == "echo":
        newline = not (args and args[0] == "-n")
        text = " ".join(args[0 if newline else 1:]) + ("\n" if newline else "")
        return [out(text.encode())], 0
    if name == "cat":
        if not args:
            return [FakeEchoStdin()], 0
        steps: list[FakeStep] = []
        status = 0
        for path in args:
            if path in ctx.files:
                steps.append(out(ctx.files[path]))
            else:
                steps.append(err(f"cat: {path}: No such file or directory\n"))
                status = 1
        return steps, status
    if name == "printenv":
        if len(args) == 1 and args[0] in ctx.env:
            return [out(ctx.env[args[0]].encode() + b"\n")], 0
        return [], 1
    if name == "sleep":
        try:
            seconds = float(args[0])
        except (IndexError, ValueError):
            return [err("sleep: invalid time interval\n")], 1
        return [FakeSleep(max(0.0, seconds))], 0
    if name == "head" and len(args) == 3 and args[0] == "-c" and args[2] == "/dev/zero":
        try:
            n = min(int(args[1]), _HEAD_CAP)
        except ValueError:
            return [err("head: invalid number of bytes\n")], 1
        return [out(b"\0" * n)], 0
    if name == "trap":
        if len(args) >= 2 and args[0] == "":
            sigs = tuple(_SIGNAL_NAMES[s.upper()] for s in args[1:] if s.upper() in _SIGNAL_NAMES)
            return [FakeIgnore(sigs)], 0
        return [], 0
    if name in ("true", ":"):
        return [], 0
    if name == "false":
        return [], 1
    return [err(f"sh: 1: {words[0]}: not found\n")], 127


def shell_script(ctx: FakeProcessContext) -> list[FakeStep]:
    """The default script: a tiny ``sh -c`` subset (see the module docstring)."""
    argv = list(ctx.argv)
    shell = argv[0].rsplit("/", 1)[-1] in ("sh", "bash", "dash", "ash")
    if shell and len(argv) >= 3 and argv[1] == "-c":
        commands = [[_expand(w, ctx.env) for w in c] for c in _split_commands(argv[2])]
    else:
        commands = [argv]
    steps: list[FakeStep] = []
    status = 0
    for words in commands:
        if words[0] == "exit":
            try:
                code = int(words[1]) & 0xFF if len(words) > 1 else status
            except ValueError:
                code = 2
            steps.append(FakeExit(code))
            return steps
        more, status = _command(words, ctx)
        steps.extend(more)
    steps.append(FakeExit(status))
    return steps


# ----------------------------------------------------------------------------- processes


class _Proc:
    """A scripted process running in virtual time."""

    def __init__(self, process_id: str, session_id: str, steps: Sequence[FakeStep], *,
                 stdin_open: bool, timeout: float | None) -> None:
        self.process_id = process_id
        self.session_id = session_id
        self.steps: deque[FakeStep] = deque(steps)
        self.out = bytearray()
        self.err = bytearray()
        self.stdin = bytearray()
        self.stdin_log = bytearray()
        self.stdin_open = stdin_open
        self.started_with_stdin = stdin_open
        self.timeout = timeout
        self.kill_at: float | None = None
        self.sleep_left: float | None = None
        self.ignored: set[ProcessSignal] = set()
        self.elapsed = 0.0
        self.steps_run = 0
        self.sequence = 0
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.timed_out = False

    @property
    def exited(self) -> bool:
        return self.exit_code is not None

    def end(self, code: int, *, signal: int | None = None, timed_out: bool = False) -> None:
        if self.exited:
            return
        self.exit_code, self.signal, self.timed_out = code, signal, timed_out
        self.steps.clear()
        self.sleep_left = self.kill_at = None
        self.stdin_open = False

    def kill(self, signum: int, *, timed_out: bool = False) -> None:
        self.end(128 + signum, signal=signum, timed_out=timed_out)

    def run(self) -> None:
        """Run steps until the script blocks or ends."""
        while not self.exited:
            if not self.steps:
                self.end(0)
                return
            step = self.steps[0]
            if isinstance(step, FakeWrite):
                (self.err if step.stderr else self.out).extend(step.data)
            elif isinstance(step, FakeExit):
                self.steps_run += 1
                self.end(step.code & 0xFF)
                return
            elif isinstance(step, FakeIgnore):
                self.ignored.update(step.signals)
            elif isinstance(step, FakeSleep):
                if self.sleep_left is None:
                    self.sleep_left = step.seconds
                if self.sleep_left > _EPS:
                    return
                self.sleep_left = None
            elif isinstance(step, FakeEchoStdin):
                self.out.extend(self.stdin)
                self.stdin.clear()
                if self.stdin_open:
                    return
            self.steps.popleft()
            self.steps_run += 1

    def _deadlines(self) -> None:
        if self.timeout is not None and self.elapsed >= self.timeout - _EPS:
            self.kill(ProcessSignal.KILL.signum, timed_out=True)
        elif self.kill_at is not None and self.elapsed >= self.kill_at - _EPS:
            self.kill(ProcessSignal.KILL.signum)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass (sleeps, timeout, grace)."""
        self.run()
        while seconds > _EPS and not self.exited:
            events = [t for t in (
                self.sleep_left,
                None if self.timeout is None else self.timeout - self.elapsed,
                None if self.kill_at is None else self.kill_at - self.elapsed) if t is not None]
            step = max(0.0, min([seconds, *events]))
            self.elapsed += step
            seconds -= step
            if self.sleep_left is not None:
                self.sleep_left = max(0.0, self.sleep_left - step)
            self._deadlines()
            self.run()
            if self.out or self.err:
                break

    def frame(self, max_bytes: int) -> ProcessIoFrame:
        out = bytes(self.out[:max_bytes])
        del self.out[:len(out)]
        err = bytes(self.err[:max_bytes - len(out)])
        del self.err[:len(err)]
        finished = self.exited and not self.out and not self.err
        self.sequence += 1
        return ProcessIoFrame(
            process_id=self.process_id, sequence=self.sequence - 1, stdout=out, stderr=err,
            finished=finished, exit_code=self.exit_code if finished else None,
            signal=self.signal if finished else None, timed_out=finished and self.timed_out)


# ----------------------------------------------------------------------------- sessions


class _State(enum.Enum):
    PREPARING = "preparing"
    READY = "ready"
    DETACHED = "detached"
    CLEANED = "cleaned"


@dataclass
class _Session:
    ref: IsolationSessionRef
    state: _State = _State.PREPARING
    before_detach: _State = _State.PREPARING
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
        self._processes: dict[str, _Proc] = {}
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

    def _usable(self, session_id: str, *allowed: _State) -> _Session:
        sess = self._session(session_id)
        if sess.state in allowed:
            return sess
        if sess.state is _State.DETACHED:
            raise SandboxStateError(
                f"session {session_id!r} is detached: reclaim it with its ticket first")
        if sess.state is _State.CLEANED:
            raise SandboxStateError(f"session {session_id!r} was cleaned up")
        if sess.state is _State.READY:
            raise SandboxStateError(
                f"session {session_id!r} already has its environment: planning is over")
        raise SandboxStateError(
            f"session {session_id!r} has no environment yet: call prepare_environment first")

    def _preparing(self, session_id: str) -> _Session:
        return self._usable(session_id, _State.PREPARING)

    def _proc(self, process_id: str) -> _Proc:
        proc = self._processes.get(process_id)
        if proc is None:
            unknown_ref("process", process_id)
        self._usable(proc.session_id, _State.READY)
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
        sess.state = _State.CLEANED
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
        if request.mounts is not None and (
                sess.mounts.get(request.mounts.plan_id) != request.mounts):
            unknown_ref("mount plan", request.mounts.plan_id)
        if request.network is not None and (
                sess.networks.get(request.network.network_id) != request.network):
            unknown_ref("network", request.network.network_id)
        specs: tuple[SecretSpec, ...] = ()
        if request.secrets is not None:
            if request.secrets.plan_id not in sess.secret_plans:
                unknown_ref("secret plan", request.secrets.plan_id)
            specs = sess.secret_plans[request.secrets.plan_id]
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
        sess.state = _State.READY
        return sess.environment

    async def start_process(self, request: ProcessStartRequest) -> ProcessStartResult:
        """Start a scripted process (READY only): the only call that starts one."""
        self._calls.append("start_process")
        request = expect_request(request, ProcessStartRequest)
        sess = self._usable(request.session_id, _State.READY)
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
        proc = _Proc(pid, sess.ref.session_id, steps, stdin_open=request.stdin_open,
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
        self._usable(request.session_id, _State.PREPARING, _State.READY)
        return self._do_cleanup(sess)

    async def detach(self, request: DetachTransferRequest) -> DetachTransferResult:
        """Detach a PREPARING or READY session under a new random ticket."""
        self._calls.append("detach")
        request = expect_request(request, DetachTransferRequest)
        self._report.require("detach")
        sess = self._usable(request.session_id, _State.PREPARING, _State.READY)
        ticket = ReclaimTicket(sandbox_id=sess.ref.session_id, token=secrets.token_urlsafe(32))
        self._tickets[hashlib.sha256(ticket.token.encode()).hexdigest()] = _Ticket(
            session_id=sess.ref.session_id)
        sess.before_detach, sess.state = sess.state, _State.DETACHED
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
        sess = self._usable(entry.session_id, _State.DETACHED)
        entry.used = True
        sess.state = sess.before_detach
        if request.action is ReclaimAction.KEEP:
            return ReclaimResult(session=sess.ref, action=request.action,
                                 environment=sess.environment)
        return ReclaimResult(session=sess.ref, action=request.action,
                             environment=sess.environment, cleanup=self._do_cleanup(sess))
