"""The runtime conformance suite on QemuIsolationRuntime (real VMs), plus QEMU-only
checks: a canary secret in no artefact, file secret ownership and mode, stats of a
busy command, reclaim by a ticket from another OS process, the journal."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime_conformance import *  # noqa: F403
from runtime_conformance import Harness, run
from sandvm.errors import InvalidSpec, SandboxStateError, SandvmError
from sandvm.runtime.journal import Journal
from sandvm.runtime.port import (
    CleanupRequest,
    CleanupStatus,
    DetachTransferRequest,
    EnvironmentPrepareRequest,
    HealthStatus,
    ImageResolveRequest,
    IsolationRuntime,
    PreparedEnvironmentRef,
    ProcessStartRequest,
    ProcessStatsRequest,
    ReclaimAction,
    ReclaimRequest,
    ReclaimTicket,
    RootfsPrepareRequest,
    SecretDelivery,
    SecretPrepareRequest,
    SecretSpec,
    SecretValue,
    SessionPrepareRequest,
)
from sandvm.runtime.qemu import QemuIsolationRuntime

pytestmark = pytest.mark.qemu


@pytest.fixture
def journal_file(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def runtime(journal_file: Path) -> QemuIsolationRuntime:
    """A fresh runtime per test, on a journal of its own."""
    return QemuIsolationRuntime(journal=journal_file)


def test_satisfies_the_port(runtime: QemuIsolationRuntime) -> None:
    assert isinstance(runtime, IsolationRuntime)


def test_report_is_honest(runtime: QemuIsolationRuntime) -> None:
    async def s(h: Harness) -> None:
        report = await h.report()
        assert report.supported_kinds == ("microvm",)
        assert not report.supports("egress_allowlist")
        assert not report.supports("snapshots") and not report.supports("mounts")
        for cap in ("secret_isolation", "process_timeout", "cleanup", "detach", "reclaim",
                    "audit_log", "ttl"):
            assert report.supports(cap), cap
        # by the accelerator VMs actually get (what doctor reports: /dev/kvm may be
        # there and still unusable, e.g. PVM-only KVM), not by access to /dev/kvm
        from sandvm.doctor import build_report

        accel = (await build_report()).accelerator
        assert accel in ("kvm", "tcg"), accel
        if accel == "tcg":
            assert report.health is HealthStatus.DEGRADED
            assert "KVM" in report.missing[0]
        else:
            assert report.health is HealthStatus.HEALTHY and not report.missing

    run(runtime, "base", s)


def _artefacts(journal_file: Path, rundir: str | None) -> dict[str, bytes]:
    files = [journal_file, Path(f"{journal_file}-wal"), Path(f"{journal_file}-shm")]
    if rundir:
        files += [Path(rundir) / n for n in ("console.log", "qemu.log", "keeper.log")]
        files += [p for p in Path(rundir).glob("*.log") if p not in files]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


def test_canary_secret_reaches_only_the_workload(runtime: QemuIsolationRuntime,
                                                 journal_file: Path) -> None:
    canary = "canary-" + secrets.token_hex(12)
    env_canary = "envcanary-" + secrets.token_hex(12)
    seen: dict[str, bytes] = {}
    errors: list[str] = []

    async def s(h: Harness) -> None:
        p = await h.prepare(secrets=(
            SecretSpec(name="api_token", value=SecretValue(canary)),
            SecretSpec(name="db", value=SecretValue(env_canary), delivery=SecretDelivery.ENV,
                       env_name="DB_PASSWORD")))
        out = await h.drain(await h.start(p.environment, [
            "sh", "-c", 'cat /run/secrets/api_token; echo; echo "$DB_PASSWORD";'
            " stat -c '%a %u' /run/secrets/api_token; grep ' /run/secrets ' /proc/mounts"]))
        lines = out.stdout.decode().splitlines()
        assert lines[:3] == [canary, env_canary, "400 0"], out
        assert "tmpfs" in lines[3]
        with pytest.raises(InvalidSpec) as ei:  # an error about the secret
            await h.rt.start_process(ProcessStartRequest(
                environment=p.environment, argv=["true"], env={"DB_PASSWORD": "x"}))
        errors.append(str(ei.value))
        errors.append(repr(ei.value))
        try:  # a failing command
            await h.start(p.environment, ["no-such-program-" + canary[:4]])
        except SandvmError as exc:
            errors.append(str(exc))
        errors.append(repr(await h.rt.collect_stats(ProcessStatsRequest(
            process_id=await h.start(p.environment, ["sleep", "5"])))))
        j = Journal(journal_file)
        rec = j.get(p.sid)
        j.close()
        assert rec is not None and rec.rundir
        seen.update(_artefacts(journal_file, rec.rundir))  # while the VM runs
        errors.append(repr(h.rt))
        res = await h.rt.cleanup(CleanupRequest(session_id=p.sid))
        assert res.status is CleanupStatus.COMPLETED, res.repairs
        assert not Path(rec.rundir).exists()

    run(runtime, "base", s)
    seen.update(_artefacts(journal_file, None))
    assert any(k.endswith("journal.db") for k in seen)
    assert any(k.endswith("console.log") for k in seen), sorted(seen)
    for name, data in seen.items():
        for value in (canary, env_canary):
            assert value.encode() not in data, f"{name} holds a secret"
    for text in errors:
        assert canary not in text and env_canary not in text
    journal = Journal(journal_file)
    (rec,) = journal.sandboxes(include_ended=True)
    events = journal.events(rec.id)
    ops = [e["op"] for e in events if e["phase"] == "intent"]
    for op in ("rt.prepare_session", "rt.resolve_image", "rt.prepare_rootfs",
               "rt.prepare_secrets", "rt.prepare_environment", "rt.start_process",
               "rt.cleanup"):
        assert op in ops
    done = {e["intent_seq"] for e in events if e["phase"] == "result"}
    assert all(e["seq"] in done for e in events if e["phase"] == "intent")


def test_file_secrets_belong_to_the_workload_user(runtime: QemuIsolationRuntime) -> None:
    async def s(h: Harness) -> None:
        session = await h.session()
        sid = session.session_id
        plan = await h.rt.prepare_secrets(SecretPrepareRequest(session_id=sid, secrets=(
            SecretSpec(name="k", value=SecretValue("v1")),)))
        with pytest.raises(InvalidSpec, match="/run/secrets"):
            await h.rt.prepare_secrets(SecretPrepareRequest(session_id=sid, secrets=(
                SecretSpec(name="k2", value=SecretValue("v2"), path="/etc/k2"),)))
        image = await h.rt.resolve_image(ImageResolveRequest(session_id=sid, image="base"))
        rootfs = await h.rt.prepare_rootfs(RootfsPrepareRequest(session_id=sid, image=image))
        env = await h.rt.prepare_environment(EnvironmentPrepareRequest(
            session_id=sid, rootfs=rootfs, secrets=plan, user="1000:1000"))
        out = await h.drain(await h.start(env, [
            "sh", "-c", "id -u; stat -c '%a %u %g' /run/secrets/k; cat /run/secrets/k; echo;"
            " echo x > /run/secrets/k || echo denied"]))
        assert out.stdout.decode().split("\n")[:3] == ["1000", "400 1000 1000", "v1"], out
        assert b"denied" in out.stdout

    run(runtime, "base", s)


def test_stats_of_a_busy_command(runtime: QemuIsolationRuntime) -> None:
    async def s(h: Harness) -> None:
        p = await h.prepare()
        pid = await h.start(p.environment, [
            "sh", "-c", "sleep 30 & sleep 30 & while :; do :; done"])
        await asyncio.sleep(1.5)
        stats = await h.rt.collect_stats(ProcessStatsRequest(process_id=pid))
        assert stats.running and stats.process_count >= 3, stats
        assert stats.cpu_time_seconds > 0.1 and stats.memory_bytes > 0, stats

    run(runtime, "base", s)


def test_output_backpressure_loses_nothing(journal_file: Path) -> None:
    rt = QemuIsolationRuntime(journal=journal_file, buffer_bytes=64 * 1024)

    async def s(h: Harness) -> None:
        p = await h.prepare()
        size = 2_000_000
        pid = await h.start(p.environment, ["head", "-c", str(size), "/dev/urandom"])
        await asyncio.sleep(2.0)  # nobody reads: the buffer stays bounded
        proc = rt._processes[pid]
        assert proc.buffered <= 64 * 1024 + 65536
        out = await h.drain(pid)
        assert len(out.stdout) == size and out.last.exit_code == 0

    run(rt, "base", s)


RECLAIMER = textwrap.dedent("""
    import asyncio, sys
    from sandvm.runtime.port import *
    from sandvm.runtime.qemu import QemuIsolationRuntime

    async def main():
        rt = QemuIsolationRuntime(journal=sys.argv[1])
        s = await rt.prepare_session(SessionPrepareRequest(ttl_seconds=120))
        sid = s.session_id
        img = await rt.resolve_image(ImageResolveRequest(session_id=sid, image="base"))
        fs = await rt.prepare_rootfs(RootfsPrepareRequest(session_id=sid, image=img))
        env = await rt.prepare_environment(EnvironmentPrepareRequest(
            session_id=sid, rootfs=fs, env={"GREETING": "from-creator"}))
        res = await rt.start_process(ProcessStartRequest(
            environment=env, argv=["sh", "-c", "echo kept > /tmp/mark"]))
        while not (await rt.stream_io(ProcessIoRequest(process_id=res.process_id))).finished:
            pass
        t = await rt.detach(DetachTransferRequest(session_id=sid))
        print(t.ticket.encode(), flush=True)
        await rt.aclose()

    asyncio.run(main())
""")


def test_reclaim_keep_from_another_process(runtime: QemuIsolationRuntime,
                                           journal_file: Path) -> None:
    r = subprocess.run([sys.executable, "-c", RECLAIMER, str(journal_file)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ticket = ReclaimTicket.decode(r.stdout.strip())  # its creator has exited

    async def s(h: Harness) -> None:
        await h.kind()
        kept = await h.rt.reclaim(ReclaimRequest(ticket=ticket, action=ReclaimAction.KEEP))
        h.sessions.append(kept.session.session_id)
        assert kept.environment is not None
        out = await h.drain(await h.start(kept.environment,
                                          ["sh", "-c", 'cat /tmp/mark; echo "$GREETING"']))
        assert out.stdout == b"kept\nfrom-creator\n"
        with pytest.raises(SandboxStateError):  # spent
            await h.rt.reclaim(ReclaimRequest(ticket=ticket))
        again = await h.rt.detach(DetachTransferRequest(session_id=ticket.sandbox_id))
        gone = await h.rt.reclaim(ReclaimRequest(ticket=again.ticket,
                                                 action=ReclaimAction.DESTROY))
        assert gone.cleanup is not None
        assert gone.cleanup.status is CleanupStatus.COMPLETED, gone.cleanup.repairs

    run(runtime, "base", s)


def test_preparing_session_cannot_detach(runtime: QemuIsolationRuntime) -> None:
    async def s(h: Harness) -> None:
        session = await h.session()
        with pytest.raises(SandboxStateError, match="no VM"):
            await h.rt.detach(DetachTransferRequest(session_id=session.session_id))
        with pytest.raises(SandboxStateError):
            await h.rt.start_process(ProcessStartRequest(
                environment=PreparedEnvironmentRef(session_id=session.session_id,
                                                   environment_id="e-1"),
                argv=["true"]))
        with pytest.raises(InvalidSpec, match="in use"):
            await h.rt.prepare_session(SessionPrepareRequest(sandbox_id=session.session_id))

    run(runtime, "base", s)
