"""The runtime conformance suite on FakeIsolationRuntime, plus fake-only tests:
builders, call recording, scripted reports, cleanup status and processes, and
the port's request/result validation."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from runtime_conformance import *  # noqa: F403
from sandvm.errors import ConfigError, InvalidSpec, SandboxStateError, UnknownImage, Unsupported
from sandvm.runtime import (
    MAX_IO_FRAME,
    STANDARD_CAPABILITIES,
    Capability,
    CleanupRequest,
    CleanupResult,
    CleanupStatus,
    DetachTransferRequest,
    EnvironmentPrepareRequest,
    FakeExit,
    FakeIsolationRuntime,
    FakeProcessContext,
    FakeSleep,
    FakeWrite,
    HealthStatus,
    ImageResolveRequest,
    IsolationCapabilityReport,
    IsolationRuntime,
    IsolationRuntimeRef,
    NetworkPrepareRequest,
    PreparedEnvironmentRef,
    ProcessIoFrame,
    ProcessIoRequest,
    ProcessSignal,
    ProcessSignalRequest,
    ProcessStartRequest,
    ProcessStatsRequest,
    ProcessStatsSnapshot,
    ReclaimAction,
    ReclaimRequest,
    ReclaimTicket,
    RootfsPrepareRequest,
    SecretDelivery,
    SecretPrepareRequest,
    SecretSpec,
    SecretValue,
    SessionPrepareRequest,
    shell_script,
)


@pytest.fixture(params=["default", "host_process_only"])
def runtime(request: pytest.FixtureRequest) -> FakeIsolationRuntime:
    """The conformance suite's runtime: the default fake, and a host-process-only one."""
    if request.param == "host_process_only":
        return FakeIsolationRuntime.host_process_only("fake-host")
    return FakeIsolationRuntime()


def go(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


async def ready(rt: FakeIsolationRuntime, *, secrets: tuple[SecretSpec, ...] = (),
                kind: str = "microvm") -> PreparedEnvironmentRef:
    sess = await rt.prepare_session(SessionPrepareRequest(kind=kind))
    sid = sess.session_id
    image = await rt.resolve_image(ImageResolveRequest(session_id=sid, image="base"))
    rootfs = await rt.prepare_rootfs(RootfsPrepareRequest(session_id=sid, image=image))
    plan = (await rt.prepare_secrets(SecretPrepareRequest(session_id=sid, secrets=secrets))
            if secrets else None)
    return await rt.prepare_environment(
        EnvironmentPrepareRequest(session_id=sid, rootfs=rootfs, secrets=plan))


async def output(rt: FakeIsolationRuntime, pid: str, wait: float = 1.0) -> ProcessIoFrame:
    """Drain a process; the returned frame is the finished one with all output joined."""
    out, err = b"", b""
    for _ in range(1000):
        f = await rt.stream_io(ProcessIoRequest(process_id=pid, wait_seconds=wait))
        out, err = out + f.stdout, err + f.stderr
        if f.finished:
            return dataclasses.replace(f, stdout=out[:MAX_IO_FRAME], stderr=err[:MAX_IO_FRAME])
    raise AssertionError("process did not finish")


# ----------------------------------------------------------------------------- builders


def test_fake_satisfies_the_port() -> None:
    assert isinstance(FakeIsolationRuntime(), IsolationRuntime)


def test_with_report_reports_and_obeys_it() -> None:
    caps = dict(FakeIsolationRuntime.default_report().capabilities)
    caps["detach"] = Capability.no("scripted: no detach")
    report = IsolationCapabilityReport(runtime=IsolationRuntimeRef(name="scripted"),
                                       health=HealthStatus.HEALTHY,
                                       supported_kinds=("microvm",), capabilities=caps)
    rt = FakeIsolationRuntime.with_report(report)
    assert rt.runtime_ref() == IsolationRuntimeRef(name="scripted")

    async def s() -> None:
        assert await rt.capability_report() is report
        env = await ready(rt)
        with pytest.raises(Unsupported, match="scripted: no detach"):
            await rt.detach(DetachTransferRequest(session_id=env.session_id))
        with pytest.raises(Unsupported):
            await rt.prepare_session(SessionPrepareRequest(kind="host_process"))

    go(s)


def test_unsupported_host_refuses_sessions() -> None:
    rt = FakeIsolationRuntime.unsupported_host("qemu", ["/dev/kvm", "qemu-system-x86_64"])

    async def s() -> None:
        report = await rt.capability_report()
        assert report.health is HealthStatus.UNSUPPORTED_HOST
        assert report.missing == ("/dev/kvm", "qemu-system-x86_64")
        assert report.supported_kinds == ()
        assert not any(report.supports(c) for c in STANDARD_CAPABILITIES)
        with pytest.raises(Unsupported, match="/dev/kvm"):
            await rt.prepare_session(SessionPrepareRequest())

    go(s)
    assert rt.calls() == ["capability_report", "prepare_session"]
    assert rt.runtime_ref().name == "qemu"
    with pytest.raises(InvalidSpec):  # an unsupported host says what is missing
        FakeIsolationRuntime.unsupported_host("qemu", [])


def test_host_process_only() -> None:
    rt = FakeIsolationRuntime.host_process_only("host")

    async def s() -> None:
        report = await rt.capability_report()
        assert report.health is HealthStatus.DEGRADED and report.missing
        assert report.supported_kinds == ("host_process",)
        assert not report.supports("egress_allowlist")
        assert not report.supports("secret_isolation")
        with pytest.raises(Unsupported):
            await rt.prepare_session(SessionPrepareRequest(kind="microvm"))
        sess = await rt.prepare_session(SessionPrepareRequest(kind="host_process"))
        assert sess.kind == "host_process" and sess.runtime.name == "host"
        with pytest.raises(Unsupported, match="egress_allowlist"):
            await rt.configure_network(NetworkPrepareRequest(
                session_id=sess.session_id, egress_allowlist=("10.0.0.0/8",)))

    go(s)


def test_with_cleanup_status_repair_needed() -> None:
    base = FakeIsolationRuntime()
    rt = base.with_cleanup_status(CleanupStatus.REPAIR_NEEDED)
    assert rt is not base and rt.call_count() == 0

    async def s() -> None:
        env = await ready(rt)
        pid = (await rt.start_process(ProcessStartRequest(environment=env,
                                                          argv=["sleep", "9"]))).process_id
        result = await rt.cleanup(CleanupRequest(session_id=env.session_id))
        assert result.status is CleanupStatus.REPAIR_NEEDED and result.repairs
        assert pid in result.released and env.environment_id in result.released
        assert await rt.cleanup(CleanupRequest(session_id=env.session_id)) == result
        env2 = await ready(rt)
        ticket = (await rt.detach(DetachTransferRequest(session_id=env2.session_id))).ticket
        gone = await rt.reclaim(ReclaimRequest(ticket=ticket, action=ReclaimAction.DESTROY))
        assert gone.cleanup is not None
        assert gone.cleanup.status is CleanupStatus.REPAIR_NEEDED

    go(s)


# ----------------------------------------------------------------------------- call recording


def test_calls_are_recorded_in_order() -> None:
    rt = FakeIsolationRuntime()

    async def s() -> None:
        sess = await rt.prepare_session(SessionPrepareRequest())
        early = PreparedEnvironmentRef(session_id=sess.session_id, environment_id="env-9")
        with pytest.raises(SandboxStateError):
            await rt.start_process(ProcessStartRequest(environment=early, argv=["true"]))
        assert rt.start_process_call_count() == 1
        image = await rt.resolve_image(ImageResolveRequest(session_id=sess.session_id,
                                                           image="base"))
        rootfs = await rt.prepare_rootfs(RootfsPrepareRequest(session_id=sess.session_id,
                                                              image=image))
        env = await rt.prepare_environment(EnvironmentPrepareRequest(
            session_id=sess.session_id, rootfs=rootfs))
        res = await rt.start_process(ProcessStartRequest(environment=env, argv=["true"]))
        await output(rt, res.process_id)
        await rt.cleanup(CleanupRequest(session_id=sess.session_id))

    go(s)
    rt.runtime_ref()  # pure: not recorded
    assert rt.calls() == ["prepare_session", "start_process", "resolve_image",
                          "prepare_rootfs", "prepare_environment", "start_process",
                          "stream_io", "cleanup"]
    assert rt.call_count() == 8
    assert rt.start_process_call_count() == 2


def test_only_start_process_starts_processes() -> None:
    rt = FakeIsolationRuntime()

    async def s() -> None:
        env = await ready(rt, secrets=(SecretSpec(name="k", value=SecretValue("v")),))
        assert rt.start_process_call_count() == 0
        with pytest.raises(InvalidSpec):  # no process exists before start_process
            await rt.collect_stats(ProcessStatsRequest(process_id="proc-1"))
        res = await rt.start_process(ProcessStartRequest(environment=env, argv=["true"]))
        assert res.process_id == "proc-1"  # deterministic ids

    go(s)


def test_ids_are_deterministic() -> None:
    async def s() -> list[str]:
        rt = FakeIsolationRuntime()
        env = await ready(rt)
        res = await rt.start_process(ProcessStartRequest(environment=env, argv=["true"]))
        return [env.session_id, env.environment_id, res.process_id]

    assert go(s) == go(s) == ["sess-1", "env-1", "proc-1"]


def test_sandbox_id_in_use_is_refused() -> None:
    rt = FakeIsolationRuntime()

    async def s() -> None:
        sess = await rt.prepare_session(SessionPrepareRequest(sandbox_id="mine"))
        assert sess.session_id == "mine"
        with pytest.raises(InvalidSpec, match="in use"):
            await rt.prepare_session(SessionPrepareRequest(sandbox_id="mine"))

    go(s)


def test_unknown_image() -> None:
    rt = FakeIsolationRuntime(images=["alpine"])

    async def s() -> None:
        sess = await rt.prepare_session(SessionPrepareRequest())
        with pytest.raises(UnknownImage):
            await rt.resolve_image(ImageResolveRequest(session_id=sess.session_id,
                                                       image="base"))
        res = await rt.resolve_image(ImageResolveRequest(session_id=sess.session_id,
                                                         image="alpine"))
        assert res.digest is not None and res.digest.startswith("sha256:")

    go(s)


# ----------------------------------------------------------------------------- scripted processes


def test_with_script_replaces_the_shell() -> None:
    seen: list[FakeProcessContext] = []

    def script(ctx: FakeProcessContext) -> list[Any]:
        seen.append(ctx)
        return [FakeWrite(b"scripted\n"), FakeSleep(2.0), FakeWrite(b"oops", stderr=True),
                FakeExit(7)]

    rt = FakeIsolationRuntime().with_script(script)

    async def s() -> None:
        env = await ready(rt)
        res = await rt.start_process(ProcessStartRequest(environment=env, argv=["anything"],
                                                         env={"A": "1"}))
        first = await rt.stream_io(ProcessIoRequest(process_id=res.process_id))
        assert first.stdout == b"scripted\n" and not first.finished
        blocked = await rt.stream_io(ProcessIoRequest(process_id=res.process_id,
                                                      wait_seconds=1.0))
        assert blocked.size == 0 and not blocked.finished  # 1 of 2 virtual seconds
        last = await output(rt, res.process_id)
        assert last.stderr == b"oops" and last.exit_code == 7
        stats = await rt.collect_stats(ProcessStatsRequest(process_id=res.process_id))
        assert stats.wall_time_seconds == pytest.approx(2.0)

    go(s)
    assert seen[0].argv == ("anything",) and seen[0].env["A"] == "1"


def test_shell_script_subset() -> None:
    ctx = FakeProcessContext(argv=("sh", "-c", "echo -n a; echo $X >&2\nfalse; nope; exit"),
                             env={"X": "x"}, files={})
    steps = shell_script(ctx)
    assert steps == [FakeWrite(b"a"), FakeWrite(b"x\n", stderr=True),
                     FakeWrite(b"sh: 1: nope: not found\n", stderr=True), FakeExit(127)]


def test_ignored_signal_without_grace_keeps_running() -> None:
    rt = FakeIsolationRuntime()

    async def s() -> None:
        env = await ready(rt)
        pid = (await rt.start_process(ProcessStartRequest(
            environment=env, argv=["sh", "-c", "trap '' INT TERM; sleep 5; echo done"]))).process_id
        res = await rt.signal_process(ProcessSignalRequest(
            process_id=pid, signal=ProcessSignal.INTERRUPT, grace_seconds=None))
        assert res.delivered and not res.exited
        last = await output(rt, pid)
        assert last.stdout == b"done\n" and last.exit_code == 0 and last.signal is None

    go(s)


def test_stdin_is_recorded() -> None:
    rt = FakeIsolationRuntime()

    async def s() -> None:
        env = await ready(rt)
        pid = (await rt.start_process(ProcessStartRequest(environment=env, argv=["cat"],
                                                          stdin_open=True))).process_id
        await rt.stream_io(ProcessIoRequest(process_id=pid, stdin=b"hi", close_stdin=True))
        assert rt.stdin_received(pid) == b"hi"

    go(s)


def test_secret_env_cannot_be_overridden() -> None:
    rt = FakeIsolationRuntime()

    async def s() -> None:
        env = await ready(rt, secrets=(SecretSpec(
            name="tok", value=SecretValue("s3cr3t-value"), delivery=SecretDelivery.ENV),))
        with pytest.raises(InvalidSpec, match="TOK") as ei:
            await rt.start_process(ProcessStartRequest(environment=env, argv=["true"],
                                                       env={"TOK": "x"}))
        assert "s3cr3t-value" not in str(ei.value)
        assert "s3cr3t-value" not in repr(rt)

    go(s)


def test_detached_session_refuses_everything_but_reclaim() -> None:
    rt = FakeIsolationRuntime()

    async def s() -> None:
        env = await ready(rt)
        pid = (await rt.start_process(ProcessStartRequest(environment=env,
                                                          argv=["sleep", "9"]))).process_id
        ticket = (await rt.detach(DetachTransferRequest(session_id=env.session_id))).ticket
        assert rt.session_state(env.session_id) == "detached"
        for call in (rt.stream_io(ProcessIoRequest(process_id=pid)),
                     rt.collect_stats(ProcessStatsRequest(process_id=pid)),
                     rt.cleanup(CleanupRequest(session_id=env.session_id)),
                     rt.detach(DetachTransferRequest(session_id=env.session_id))):
            with pytest.raises(SandboxStateError, match="detached"):
                await call
        kept = await rt.reclaim(ReclaimRequest(ticket=ticket))
        assert kept.action is ReclaimAction.KEEP
        stats = await rt.collect_stats(ProcessStatsRequest(process_id=pid))
        assert stats.running  # processes keep running across detach

    go(s)


# ----------------------------------------------------------------------------- port validation


def test_requests_are_frozen_and_keyword_only() -> None:
    req = SessionPrepareRequest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.kind = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        CleanupRequest("sess-1")  # type: ignore[call-arg]


@pytest.mark.parametrize("make", [
    lambda: SessionPrepareRequest(kind="Bad Kind"),
    lambda: SessionPrepareRequest(sandbox_id="../x"),
    lambda: SessionPrepareRequest(memory_mib=1),
    lambda: SessionPrepareRequest(ttl_seconds=float("nan")),
    lambda: ImageResolveRequest(session_id="s", image="has space"),
    lambda: NetworkPrepareRequest(session_id="s", egress_allowlist="example.com"),
    lambda: NetworkPrepareRequest(session_id="s", egress_allowlist=("bad host",)),
    lambda: ProcessStartRequest(environment=PreparedEnvironmentRef(
        session_id="s", environment_id="e"), argv="echo hi"),
    lambda: ProcessStartRequest(environment=PreparedEnvironmentRef(
        session_id="s", environment_id="e"), argv=[]),
    lambda: ProcessStartRequest(environment=PreparedEnvironmentRef(
        session_id="s", environment_id="e"), argv=["x"], env={"1BAD": "v"}),
    lambda: ProcessIoRequest(process_id="p", max_bytes=MAX_IO_FRAME + 1),
    lambda: ProcessIoRequest(process_id="p", stdin=b"x" * (MAX_IO_FRAME + 1)),
    lambda: ProcessIoFrame(process_id="p", sequence=0, stdout=b"x" * MAX_IO_FRAME,
                           stderr=b"y"),
    lambda: ProcessIoFrame(process_id="p", sequence=0, finished=True),
    lambda: ProcessIoFrame(process_id="p", sequence=0, exit_code=0),
    lambda: ProcessSignalRequest(process_id="p", signal="hup"),  # type: ignore[arg-type]
    lambda: ProcessSignalRequest(process_id="p", signal=ProcessSignal.KILL, grace_seconds=-1),
    lambda: ProcessStatsSnapshot(process_id="p", running=False, cpu_time_seconds=0.0,
                                 memory_bytes=0, process_count=1),
    lambda: ProcessStatsSnapshot(process_id="p", running=True, cpu_time_seconds=-1.0,
                                 memory_bytes=0, process_count=1),
    lambda: CleanupResult(session_id="s", status=CleanupStatus.REPAIR_NEEDED),
    lambda: CleanupResult(session_id="s", status="done"),  # type: ignore[arg-type]
    lambda: ReclaimTicket(sandbox_id="s", token="short"),
    lambda: ReclaimRequest(ticket="s:" + "a" * 40),  # type: ignore[arg-type]
    lambda: SecretSpec(name="k", value=SecretValue("v"), env_name="K"),
    lambda: SecretSpec(name="k", value=SecretValue("v"), delivery="env",  # type: ignore[arg-type]
                       path="/x"),
    lambda: SecretSpec(name="k", value=SecretValue("v"), path="relative"),
    lambda: SecretPrepareRequest(session_id="s", secrets=(
        SecretSpec(name="a", value=SecretValue("1")),
        SecretSpec(name="a", value=SecretValue("2")))),
    lambda: IsolationCapabilityReport(runtime=IsolationRuntimeRef(name="r"),
                                      health=HealthStatus.HEALTHY, missing=("kvm",),
                                      supported_kinds=("microvm",),
                                      capabilities=FakeIsolationRuntime.default_report()
                                      .capabilities),
    lambda: IsolationCapabilityReport(runtime=IsolationRuntimeRef(name="r"),
                                      health=HealthStatus.HEALTHY,
                                      supported_kinds=("microvm",), capabilities={}),
    lambda: Capability(supported=True, reason=""),
])
def test_invalid_values_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):  # InvalidSpec, or InvalidPath for paths
        make()


def test_enum_values_are_accepted_as_strings() -> None:
    req = ProcessSignalRequest(process_id="p", signal="terminate")  # type: ignore[arg-type]
    assert req.signal is ProcessSignal.TERMINATE and req.signal.signum == 15
    assert ReclaimRequest(ticket=ReclaimTicket(sandbox_id="s", token="t" * 32),
                          action="destroy").action is ReclaimAction.DESTROY  # type: ignore[arg-type]


def test_secret_values_never_show() -> None:
    value = "hunter2-canary"
    spec = SecretSpec(name="pw", value=value, delivery="env")  # type: ignore[arg-type]
    assert spec.env_name == "PW" and spec.value.reveal() == value.encode()
    for text in (repr(spec), str(spec), repr(spec.value), f"{spec.value}", f"{spec.value!s}"):
        assert value not in text
    with pytest.raises(TypeError):
        pickle.dumps(spec.value)
    assert spec.value == SecretValue(value)
    assert dataclasses.replace(spec).value is spec.value
    with pytest.raises(InvalidSpec) as ei:
        SecretSpec(name="pw", value=SecretValue(value + "\0"), delivery=SecretDelivery.ENV)
    assert value not in str(ei.value)
    with pytest.raises(InvalidSpec) as ei:
        SecretValue(value * 10_000)
    assert value not in str(ei.value)


def test_ticket_text_round_trip_hides_token() -> None:
    ticket = ReclaimTicket(sandbox_id="sb-1", token="A" * 43)
    assert "A" * 43 not in repr(ticket) and "A" * 43 not in str(ticket)
    assert ReclaimTicket.decode(ticket.encode()) == ticket
    with pytest.raises(AttributeError):
        ticket.token = "x"
