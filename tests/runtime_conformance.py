"""Seed 003's IsolationRuntime conformance suite, shared by every runtime.

Use it from a test file that defines a ``runtime`` fixture::

    from runtime_conformance import *  # noqa: F403

    @pytest.fixture
    def runtime() -> IsolationRuntime:
        return MyRuntime(...)

Fixture contract:

- ``runtime`` gives a fresh runtime per test, built outside any event loop
  (its constructor does no I/O). Each test drives it from ONE event loop
  (``asyncio.run``); at the end, still in that loop, the suite cleans up the
  sessions the test prepared and awaits ``runtime.aclose()`` if it exists.
- ``runtime_image`` (default ``"base"``; override the fixture to change it)
  names an image with ``sh``, ``echo``, ``cat``, ``sleep``, ``head`` and
  ``trap`` (busybox will do).
- Session kind: ``microvm`` if supported, else the first supported kind. On an
  unsupported host the process tests skip; capability tests still run.

Tests only look at observable behaviour through the port, so a real QEMU
runtime and the in-memory fake both pass; runtime-specific checks (the fake's
call log, a real VM's artefacts) belong in the runtime's own test file.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import require
from sandvm.errors import (
    ConfigError,
    ImageNotFound,
    InvalidSpec,
    SandboxStateError,
    SandvmError,
    UnknownImage,
    Unsupported,
)
from sandvm.runtime.port import (
    KIND_MICROVM,
    MAX_IO_FRAME,
    MAX_STATS_CPU_SECONDS,
    MAX_STATS_MEMORY_BYTES,
    MAX_STATS_PROCESSES,
    STANDARD_CAPABILITIES,
    CleanupRequest,
    CleanupResult,
    CleanupStatus,
    DetachTransferRequest,
    EnvironmentPrepareRequest,
    HealthStatus,
    ImageResolveRequest,
    IsolationCapabilityReport,
    IsolationRuntime,
    IsolationSessionRef,
    NetworkPrepareRequest,
    PreparedEnvironmentRef,
    ProcessIoFrame,
    ProcessIoRequest,
    ProcessSignal,
    ProcessSignalRequest,
    ProcessStartRequest,
    ProcessStatsRequest,
    ReclaimAction,
    ReclaimRequest,
    ReclaimTicket,
    RootfsPrepareRequest,
    RootfsRef,
    SecretDelivery,
    SecretPrepareRequest,
    SecretSpec,
    SecretValue,
    SessionPrepareRequest,
)

__all__ = [
    "Harness",
    "run",
    "runtime_image",
    "test_capability_report_is_well_formed",
    "test_cleanup_is_idempotent_and_final",
    "test_cleanup_kills_running_processes",
    "test_detach_reclaim_keep_then_destroy",
    "test_environment_needs_session_and_own_rootfs",
    "test_frames_never_exceed_the_cap",
    "test_full_flow",
    "test_ignored_terminate_escalates_to_kill_after_grace",
    "test_planning_is_sealed_by_the_environment",
    "test_process_timeout",
    "test_reclaim_refuses_wrong_and_reused_tickets",
    "test_secrets_are_references",
    "test_signal_after_exit_is_not_delivered",
    "test_signal_ends_a_sleeping_process",
    "test_start_only_after_prepare_environment",
    "test_stats_are_bounded",
    "test_stdin_round_trip",
    "test_unknown_ids_are_refused",
    "test_unknown_image_is_refused",
    "test_unsupported_capabilities_are_refused",
]

HELLO = ["sh", "-c", "echo hello; echo err >&2; exit 3"]
SLEEP = ["sleep", "30"]
WAIT = 0.5  # seconds each stream_io may wait
BUDGET = 60.0  # seconds (real or, for a fake, summed waits) a process may take to end


@pytest.fixture
def runtime_image() -> str:
    """The image the suite runs in; override in the test file to change it."""
    return "base"


@dataclass
class Prepared:
    session: IsolationSessionRef
    rootfs: RootfsRef
    environment: PreparedEnvironmentRef

    @property
    def sid(self) -> str:
        return self.session.session_id


@dataclass
class Output:
    stdout: bytes
    stderr: bytes
    frames: list[ProcessIoFrame]

    @property
    def last(self) -> ProcessIoFrame:
        return self.frames[-1]


@dataclass
class Harness:
    """What a scenario gets: the runtime plus helpers that remember what to clean up."""

    rt: Any
    image: str
    sessions: list[str] = field(default_factory=list)
    _report: IsolationCapabilityReport | None = None

    async def report(self) -> IsolationCapabilityReport:
        if self._report is None:
            self._report = await self.rt.capability_report()
        return self._report

    async def kind(self) -> str:
        """The kind to test with; skips the test on an unsupported host."""
        report = await self.report()
        require(report.health is not HealthStatus.UNSUPPORTED_HOST,
                f"unsupported host: {'; '.join(report.missing)}")
        kinds = report.supported_kinds
        return KIND_MICROVM if KIND_MICROVM in kinds else kinds[0]

    async def session(self) -> IsolationSessionRef:
        ref: IsolationSessionRef = await self.rt.prepare_session(
            SessionPrepareRequest(kind=await self.kind()))
        self.sessions.append(ref.session_id)
        return ref

    async def rootfs(self, sid: str) -> RootfsRef:
        image = await self.rt.resolve_image(ImageResolveRequest(session_id=sid, image=self.image))
        ref: RootfsRef = await self.rt.prepare_rootfs(
            RootfsPrepareRequest(session_id=sid, image=image))
        return ref

    async def prepare(self, *, secrets: tuple[SecretSpec, ...] = (),
                      env: dict[str, str] | None = None) -> Prepared:
        """session → image → rootfs → network (none) → secrets → environment."""
        session = await self.session()
        sid = session.session_id
        rootfs = await self.rootfs(sid)
        network = await self.rt.configure_network(NetworkPrepareRequest(session_id=sid))
        plan = None
        if secrets:
            plan = await self.rt.prepare_secrets(
                SecretPrepareRequest(session_id=sid, secrets=secrets))
        envref = await self.rt.prepare_environment(EnvironmentPrepareRequest(
            session_id=sid, rootfs=rootfs, network=network, secrets=plan, env=env or {}))
        assert isinstance(envref, PreparedEnvironmentRef)
        assert envref.session_id == sid
        return Prepared(session=session, rootfs=rootfs, environment=envref)

    async def start(self, env: PreparedEnvironmentRef, argv: list[str], **kw: Any) -> str:
        res = await self.rt.start_process(ProcessStartRequest(environment=env, argv=argv, **kw))
        assert res.session_id == env.session_id
        assert res.environment_id == env.environment_id
        return str(res.process_id)

    async def drain(self, process_id: str, *, max_bytes: int = MAX_IO_FRAME) -> Output:
        """stream_io until the finished frame; fail if it takes longer than BUDGET."""
        out, err, frames = bytearray(), bytearray(), []
        deadline = time.monotonic() + BUDGET
        waited = 0.0
        while True:
            frame = await self.rt.stream_io(ProcessIoRequest(
                process_id=process_id, max_bytes=max_bytes, wait_seconds=WAIT))
            assert isinstance(frame, ProcessIoFrame)
            assert frame.process_id == process_id
            assert frame.size <= max_bytes <= MAX_IO_FRAME
            frames.append(frame)
            out += frame.stdout
            err += frame.stderr
            if frame.finished:
                return Output(bytes(out), bytes(err), frames)
            if not frame.size:
                waited += WAIT
            assert waited < BUDGET and time.monotonic() < deadline, "process did not end"

    async def close(self) -> None:
        for sid in self.sessions:
            # already gone, or detached (and destroyed) by the test
            with contextlib.suppress(SandvmError):
                await self.rt.cleanup(CleanupRequest(session_id=sid))


Scenario = Callable[[Harness], Awaitable[None]]


def run(runtime: Any, image: str, scenario: Scenario) -> None:
    """Run ``scenario`` on ``runtime`` in one event loop, then clean up in that loop."""

    async def main() -> None:
        assert isinstance(runtime, IsolationRuntime)
        h = Harness(rt=runtime, image=image)
        try:
            await scenario(h)
        finally:
            await h.close()
            aclose = getattr(runtime, "aclose", None)
            if aclose is not None:
                await aclose()

    asyncio.run(main())


# ----------------------------------------------------------------------------- report


def test_capability_report_is_well_formed(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        report = await h.rt.capability_report()
        assert isinstance(report, IsolationCapabilityReport)
        assert report.runtime == h.rt.runtime_ref()
        assert isinstance(report.health, HealthStatus)
        assert (report.health is HealthStatus.HEALTHY) == (not report.missing)
        assert set(STANDARD_CAPABILITIES) <= set(report.capabilities)
        assert all(cap.reason.strip() for cap in report.capabilities.values())
        if report.health is HealthStatus.UNSUPPORTED_HOST:
            with pytest.raises(Unsupported):
                await h.rt.prepare_session(SessionPrepareRequest())
        else:
            assert report.supported_kinds
        assert await h.rt.capability_report() == report  # stable

    run(runtime, runtime_image, s)


def test_unsupported_capabilities_are_refused(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        report = await h.report()
        with pytest.raises(Unsupported):
            await h.rt.prepare_session(SessionPrepareRequest(kind="no_such_kind"))
        p = await h.prepare()
        sid = p.sid
        if not report.supports("detach"):
            with pytest.raises(Unsupported):
                await h.rt.detach(DetachTransferRequest(session_id=sid))
        if not report.supports("process_timeout"):
            with pytest.raises(Unsupported):
                await h.start(p.environment, SLEEP, timeout_seconds=1.0)
        if not report.supports("egress_allowlist"):
            other = await h.session()
            with pytest.raises(Unsupported):
                await h.rt.configure_network(NetworkPrepareRequest(
                    session_id=other.session_id, egress_allowlist=("example.com:443",)))

    run(runtime, runtime_image, s)


# ----------------------------------------------------------------------------- the flow


def test_full_flow(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, HELLO)
        out = await h.drain(pid)
        assert out.stdout == b"hello\n"
        assert out.stderr == b"err\n"
        assert out.last.exit_code == 3
        assert out.last.signal is None
        assert not out.last.timed_out
        again = await h.rt.stream_io(ProcessIoRequest(process_id=pid, wait_seconds=0))
        assert again.finished and again.size == 0 and again.exit_code == 3
        stats = await h.rt.collect_stats(ProcessStatsRequest(process_id=pid))
        assert not stats.running and stats.process_count == 0
        result = await h.rt.cleanup(CleanupRequest(session_id=p.sid))
        assert isinstance(result, CleanupResult)
        assert result.session_id == p.sid
        assert result.status is CleanupStatus.COMPLETED, result.repairs

    run(runtime, runtime_image, s)


def test_start_only_after_prepare_environment(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        session = await h.session()
        await h.rootfs(session.session_id)
        early = PreparedEnvironmentRef(session_id=session.session_id, environment_id="env-early")
        with pytest.raises(SandboxStateError):
            await h.start(early, HELLO)

    run(runtime, runtime_image, s)


def test_environment_needs_session_and_own_rootfs(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        a = await h.session()
        b = await h.session()
        rootfs_a = await h.rootfs(a.session_id)
        with pytest.raises(InvalidSpec):  # a session the runtime never issued
            await h.rt.prepare_environment(EnvironmentPrepareRequest(
                session_id="no-such-session",
                rootfs=RootfsRef(session_id="no-such-session", rootfs_id=rootfs_a.rootfs_id,
                                 image=rootfs_a.image)))
        with pytest.raises(InvalidSpec):  # a rootfs of another session
            await h.rt.prepare_environment(EnvironmentPrepareRequest(
                session_id=b.session_id,
                rootfs=RootfsRef(session_id=b.session_id, rootfs_id=rootfs_a.rootfs_id,
                                 image=rootfs_a.image)))
        with pytest.raises(InvalidSpec):  # refs must belong to the request's session
            EnvironmentPrepareRequest(session_id=b.session_id, rootfs=rootfs_a)

    run(runtime, runtime_image, s)


def test_planning_is_sealed_by_the_environment(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        with pytest.raises(SandboxStateError):
            await h.rt.resolve_image(ImageResolveRequest(session_id=p.sid, image=h.image))
        with pytest.raises(SandboxStateError):
            await h.rt.prepare_environment(
                EnvironmentPrepareRequest(session_id=p.sid, rootfs=p.rootfs))

    run(runtime, runtime_image, s)


def test_unknown_image_is_refused(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        session = await h.session()
        with pytest.raises((UnknownImage, ImageNotFound)):
            await h.rt.resolve_image(ImageResolveRequest(
                session_id=session.session_id, image="sandvm-conformance-no-such-image"))

    run(runtime, runtime_image, s)


def test_unknown_ids_are_refused(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        await h.kind()
        calls = [
            h.rt.stream_io(ProcessIoRequest(process_id="proc-nope", wait_seconds=0)),
            h.rt.signal_process(ProcessSignalRequest(process_id="proc-nope",
                                                     signal=ProcessSignal.KILL)),
            h.rt.collect_stats(ProcessStatsRequest(process_id="proc-nope")),
            h.rt.cleanup(CleanupRequest(session_id="sess-nope")),
            h.rt.resolve_image(ImageResolveRequest(session_id="sess-nope", image=h.image)),
        ]
        for call in calls:
            with pytest.raises(ConfigError):
                await call

    run(runtime, runtime_image, s)


# ----------------------------------------------------------------------------- signals, stats


@pytest.mark.parametrize("sig", list(ProcessSignal), ids=lambda s: s.value)
def test_signal_ends_a_sleeping_process(runtime: Any, runtime_image: str,
                                        sig: ProcessSignal) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, SLEEP)
        frame = await h.rt.stream_io(ProcessIoRequest(process_id=pid, wait_seconds=0.2))
        assert not frame.finished
        res = await h.rt.signal_process(ProcessSignalRequest(process_id=pid, signal=sig,
                                                             grace_seconds=5.0))
        assert res.delivered and res.signal is sig
        out = await h.drain(pid)
        assert out.last.signal == sig.signum
        assert out.last.exit_code == 128 + sig.signum

    run(runtime, runtime_image, s)


def test_ignored_terminate_escalates_to_kill_after_grace(runtime: Any,
                                                        runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, ["sh", "-c", "trap '' TERM; sleep 30"])
        await h.rt.stream_io(ProcessIoRequest(process_id=pid, wait_seconds=0.2))
        res = await h.rt.signal_process(ProcessSignalRequest(
            process_id=pid, signal=ProcessSignal.TERMINATE, grace_seconds=0.5))
        assert res.delivered
        out = await h.drain(pid)
        assert out.last.signal == ProcessSignal.KILL.signum

    run(runtime, runtime_image, s)


def test_signal_after_exit_is_not_delivered(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, HELLO)
        await h.drain(pid)
        res = await h.rt.signal_process(ProcessSignalRequest(process_id=pid,
                                                             signal=ProcessSignal.KILL))
        assert not res.delivered and res.exited

    run(runtime, runtime_image, s)


def test_process_timeout(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        if not (await h.report()).supports("process_timeout"):
            pytest.skip("process_timeout is not supported")
        p = await h.prepare()
        pid = await h.start(p.environment, SLEEP, timeout_seconds=1.0)
        out = await h.drain(pid)
        assert out.last.timed_out
        assert out.last.signal == ProcessSignal.KILL.signum

    run(runtime, runtime_image, s)


def test_stats_are_bounded(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, SLEEP)
        stats = await h.rt.collect_stats(ProcessStatsRequest(process_id=pid))
        assert stats.process_id == pid and stats.running
        assert 1 <= stats.process_count <= MAX_STATS_PROCESSES
        assert 0 <= stats.memory_bytes <= MAX_STATS_MEMORY_BYTES
        assert 0.0 <= stats.cpu_time_seconds <= MAX_STATS_CPU_SECONDS
        await h.rt.signal_process(ProcessSignalRequest(process_id=pid, signal=ProcessSignal.KILL))
        await h.drain(pid)
        after = await h.rt.collect_stats(ProcessStatsRequest(process_id=pid))
        assert not after.running and after.process_count == 0
        assert after.cpu_time_seconds >= 0.0

    run(runtime, runtime_image, s)


# ----------------------------------------------------------------------------- I/O


def test_frames_never_exceed_the_cap(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        small = await h.drain(await h.start(p.environment, HELLO), max_bytes=4)
        assert small.stdout == b"hello\n" and small.stderr == b"err\n"
        assert all(f.size <= 4 for f in small.frames)
        size = 3 * MAX_IO_FRAME + 17
        big = await h.drain(await h.start(p.environment,
                                          ["head", "-c", str(size), "/dev/zero"]))
        assert big.stdout == b"\0" * size
        assert all(f.size <= MAX_IO_FRAME for f in big.frames)
        assert len(big.frames) >= 4

    run(runtime, runtime_image, s)


def test_stdin_round_trip(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, ["cat"], stdin_open=True)
        got = bytearray()
        for chunk, close in ((b"abc", False), (b"def", True)):
            frame = await h.rt.stream_io(ProcessIoRequest(
                process_id=pid, stdin=chunk, close_stdin=close, wait_seconds=0))
            got += frame.stdout
        out = await h.drain(pid)
        assert bytes(got + out.stdout) == b"abcdef"
        assert out.last.exit_code == 0
        closed = await h.start(p.environment, HELLO)  # started without stdin
        with pytest.raises(SandboxStateError):
            await h.rt.stream_io(ProcessIoRequest(process_id=closed, stdin=b"x"))

    run(runtime, runtime_image, s)


def test_secrets_are_references(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        file_value = "canary-file-" + secrets.token_hex(8)
        env_value = "canary-env-" + secrets.token_hex(8)
        specs = (SecretSpec(name="api_token", value=SecretValue(file_value)),
                 SecretSpec(name="db_password", value=SecretValue(env_value),
                            delivery=SecretDelivery.ENV, env_name="DB_PASSWORD"))
        for spec in specs:
            for text in (repr(spec), str(spec), repr(spec.value), f"{spec.value}"):
                assert file_value not in text and env_value not in text
            with pytest.raises(TypeError):
                pickle.dumps(spec)
        session = await h.session()
        sid = session.session_id
        plan = await h.rt.prepare_secrets(SecretPrepareRequest(session_id=sid, secrets=specs))
        for text in (repr(plan), str(plan)):
            assert file_value not in text and env_value not in text
        assert [(r.name, r.delivery, r.path, r.env_name) for r in plan.secrets] == [
            ("api_token", SecretDelivery.FILE, "/run/secrets/api_token", None),
            ("db_password", SecretDelivery.ENV, None, "DB_PASSWORD")]
        rootfs = await h.rootfs(sid)
        env = await h.rt.prepare_environment(EnvironmentPrepareRequest(
            session_id=sid, rootfs=rootfs, secrets=plan))
        pid = await h.start(env, ["sh", "-c",
                                  'cat /run/secrets/api_token; echo; echo "$DB_PASSWORD"'])
        out = await h.drain(pid)
        assert out.stdout == f"{file_value}\n{env_value}\n".encode()
        assert out.last.exit_code == 0

    run(runtime, runtime_image, s)


# ----------------------------------------------------------------------------- cleanup


def test_cleanup_is_idempotent_and_final(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, HELLO)
        first = await h.rt.cleanup(CleanupRequest(session_id=p.sid))
        second = await h.rt.cleanup(CleanupRequest(session_id=p.sid))
        assert first.status is second.status
        assert first.session_id == second.session_id == p.sid
        with pytest.raises(SandboxStateError):
            await h.start(p.environment, HELLO)
        with pytest.raises(SandboxStateError):
            await h.rt.stream_io(ProcessIoRequest(process_id=pid, wait_seconds=0))
        with pytest.raises(SandboxStateError):
            await h.rt.resolve_image(ImageResolveRequest(session_id=p.sid, image=h.image))

    run(runtime, runtime_image, s)


def test_cleanup_kills_running_processes(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        await h.start(p.environment, SLEEP)
        result = await h.rt.cleanup(CleanupRequest(session_id=p.sid))
        assert result.status is CleanupStatus.COMPLETED, result.repairs

    run(runtime, runtime_image, s)


async def _detach(h: Harness, sid: str) -> ReclaimTicket:
    res = await h.rt.detach(DetachTransferRequest(session_id=sid, reason="conformance"))
    assert res.session_id == sid
    assert res.ticket.sandbox_id == sid
    assert res.ticket.token not in repr(res.ticket) and res.ticket.token not in repr(res)
    ticket: ReclaimTicket = res.ticket
    return ticket


def test_detach_reclaim_keep_then_destroy(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        report = await h.report()
        if not (report.supports("detach") and report.supports("reclaim")):
            pytest.skip("detach/reclaim not supported")
        p = await h.prepare()
        ticket = await _detach(h, p.sid)
        with pytest.raises(SandboxStateError):  # detached: not ours any more
            await h.start(p.environment, HELLO)
        text = ticket.encode()
        kept = await h.rt.reclaim(ReclaimRequest(ticket=ReclaimTicket.decode(text),
                                                 action=ReclaimAction.KEEP))
        assert kept.session.session_id == p.sid and kept.cleanup is None
        assert kept.environment is not None
        out = await h.drain(await h.start(kept.environment, HELLO))  # still usable
        assert out.stdout == b"hello\n" and out.last.exit_code == 3
        ticket2 = await _detach(h, p.sid)
        assert ticket2 != ticket
        gone = await h.rt.reclaim(ReclaimRequest(ticket=ticket2, action=ReclaimAction.DESTROY))
        assert gone.cleanup is not None and gone.cleanup.session_id == p.sid
        assert gone.cleanup.status is CleanupStatus.COMPLETED, gone.cleanup.repairs
        with pytest.raises(SandboxStateError):
            await h.start(kept.environment, HELLO)

    run(runtime, runtime_image, s)


def test_reclaim_refuses_wrong_and_reused_tickets(runtime: Any, runtime_image: str) -> None:
    async def s(h: Harness) -> None:
        report = await h.report()
        if not (report.supports("detach") and report.supports("reclaim")):
            pytest.skip("detach/reclaim not supported")
        p = await h.prepare()
        ticket = await _detach(h, p.sid)
        forged = ReclaimTicket(sandbox_id=p.sid, token=secrets.token_urlsafe(32))
        with pytest.raises(InvalidSpec):
            await h.rt.reclaim(ReclaimRequest(ticket=forged))
        with pytest.raises(InvalidSpec):  # right token, wrong sandbox
            await h.rt.reclaim(ReclaimRequest(
                ticket=ReclaimTicket(sandbox_id="sess-other", token=ticket.token)))
        await h.rt.reclaim(ReclaimRequest(ticket=ticket, action=ReclaimAction.KEEP))
        with pytest.raises(SandboxStateError):
            await h.rt.reclaim(ReclaimRequest(ticket=ticket, action=ReclaimAction.DESTROY))
        with pytest.raises(InvalidSpec):
            ReclaimTicket.decode("not a ticket")

    run(runtime, runtime_image, s)
