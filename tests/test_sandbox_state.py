"""AsyncSandbox's state machine and its one builder, on a stub VM (no QEMU).

Each test records every state change (``AsyncSandbox._move``, the one place the state
changes) and asserts their exact order, as qemu.qmp's tests do with a null protocol.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sandvm.core import ImageRecord, VmSpec
from sandvm.errors import AgentError, SandboxStateError
from sandvm.providers.qemu import QemuVmProvider
from sandvm.sandbox import (
    Adopt,
    AsyncSandbox,
    Boot,
    Restore,
    SandboxResources,
    SandboxState,
    build_sandbox,
)

S = SandboxState


class StubAgent:
    """Answers every op with {} and records it; ``fail`` makes one op raise."""

    def __init__(self, log: list[str], fail: str | None = None) -> None:
        self.log, self.fail = log, fail

    async def call(self, req: dict[str, Any], *, timeout: float | None = None) -> Any:
        op = str(req.get("op"))
        self.log.append(f"op:{op}")
        if op == self.fail:
            raise AgentError(f"{op} failed")
        return {}

    async def ping(self) -> float:
        return 0.0


class StubVm:
    """The parts of a QemuVm a sandbox uses."""

    def __init__(self, log: list[str], *, keeper: bool = False, fail: str | None = None,
                 resumed: bool = False) -> None:
        self.log = log
        self.spec = VmSpec()
        self.agent = StubAgent(log, fail)
        self.agent_info = None
        self.failure = None
        self.alive = True
        self.proc = None
        self.keeper_pid = 4242 if keeper else None
        self.resumed = resumed
        self.accel, self.boot_seconds, self.pid = "tcg", 0.0, None

    async def pause(self) -> None:
        self.log.append("vm:pause")

    async def resume(self) -> None:
        self.log.append("vm:resume")

    async def detach(self) -> None:
        self.log.append("vm:detach")

    async def shutdown(self) -> None:
        self.log.append("vm:shutdown")
        self.alive = False

    @property
    def exited(self) -> bool:
        return not self.alive

    async def wait_exit(self) -> None:
        pass


class StubProvider(QemuVmProvider):
    """A QemuVmProvider (restores and adoptions need one) whose every method the builder
    uses is a stub: no QEMU."""

    def __init__(self, vm: StubVm) -> None:
        super().__init__()
        self._vm, self.log = vm, vm.log

    async def create_vm_with_spec(self, vm_id: str, spec: VmSpec) -> None:
        self.log.append("prov:create")

    def make_detachable(self, vm_id: str, job: dict[str, Any]) -> None:
        self.log.append("prov:detachable")

    async def start_vm(self, vm_id: str) -> None:
        self.log.append("prov:start")

    async def restore_vm(self, vm_id: str, source: Path) -> None:
        self.log.append("prov:restore")

    async def adopt_vm(self, vm_id: str, vm: Any) -> None:
        self.log.append("prov:adopt")

    def vm(self, vm_id: str) -> StubVm:  # type: ignore[override]
        return self._vm

    async def destroy_vm(self, vm_id: str) -> None:
        self.log.append("prov:destroy")


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[SandboxState, SandboxState]]:
    """Every state change, (from, to), in order."""
    seen: list[tuple[SandboxState, SandboxState]] = []
    real = AsyncSandbox._move

    def spy(self: AsyncSandbox, target: SandboxState) -> None:
        before = self.state
        real(self, target)
        seen.append((before, target))

    monkeypatch.setattr(AsyncSandbox, "_move", spy)
    return seen


def _image() -> ImageRecord:
    return ImageRecord(name="img", manifest_digest="sha256:" + "0" * 64, build_id="b",
                       rootfs="/images/img.ext4", disk_size=1 << 30, user="app")


async def _build(vm: StubVm, origin: Boot | Restore | Adopt, *,
                 image: ImageRecord | None = None) -> AsyncSandbox:
    res = SandboxResources(sandbox_id="sb-test", spec=vm.spec, image=image)
    return await build_sandbox(res, provider=StubProvider(vm),  # type: ignore[arg-type]
                               origin=origin)


def test_boot_pause_resume_kill_in_order(moves: list[Any]) -> None:
    async def go() -> None:
        log: list[str] = []
        vm = StubVm(log)
        sb = await _build(vm, Boot(), image=_image())
        assert sb.state is S.RUNNING and sb.image_record == _image()
        assert log == ["prov:create", "prov:start", "op:mount_root", "op:configure"]
        await sb.pause()
        assert sb.state is S.PAUSED
        await sb.pause()  # already paused: stays so
        await sb.resume()
        await sb.kill()
        await sb.kill()  # idempotent
        assert moves == [(S.STARTING, S.RUNNING), (S.RUNNING, S.PAUSED),
                         (S.PAUSED, S.RUNNING), (S.RUNNING, S.KILLED)]
        assert log.count("prov:destroy") == 1
        assert not await sb.is_running()
        for call in (sb.ping(), sb.pause(), sb.resume()):
            with pytest.raises(SandboxStateError, match="sb-test has been killed"):
                await call
        with pytest.raises(SandboxStateError, match="has been killed"):
            sb.connection()

    asyncio.run(go())


def test_detach_ends_use_but_not_the_vm(moves: list[Any]) -> None:
    async def go() -> None:
        log: list[str] = []
        sb = await _build(StubVm(log, keeper=True), Restore(Path("/snap")))
        assert log == ["prov:create", "prov:restore", "op:configure", "op:egress_close"]
        await sb._let_go()
        assert sb.state is S.DETACHED
        with pytest.raises(SandboxStateError,
                           match="was detached: reclaim it with its ticket"):
            sb.connection()
        await sb.kill()  # the VM is someone else's now: left alone
        assert "prov:destroy" not in log and "vm:shutdown" not in log
        assert moves == [(S.STARTING, S.RUNNING), (S.RUNNING, S.DETACHED)]

    asyncio.run(go())


def test_a_sandbox_not_detachable_stays_running(moves: list[Any]) -> None:
    async def go() -> None:
        sb = await _build(StubVm([]), Boot())
        with pytest.raises(SandboxStateError, match="not created detachable"):
            await sb._let_go()
        assert sb.state is S.RUNNING
        await sb.kill()
        assert moves == [(S.STARTING, S.RUNNING), (S.RUNNING, S.KILLED)]

    asyncio.run(go())


def test_failed_setup_destroys_a_booted_vm_and_lets_go_of_an_adopted_one(
        moves: list[Any]) -> None:
    async def go() -> None:
        log: list[str] = []
        with pytest.raises(AgentError, match="configure failed"):
            await _build(StubVm(log, fail="configure"), Boot())
        assert log[-1] == "prov:destroy"
        log.clear()
        vm = StubVm(log, keeper=True, resumed=True, fail="configure")
        with pytest.raises(AgentError):
            await _build(vm, Adopt(vm))  # type: ignore[arg-type]
        # adopted: its clock is stepped (a configure op), and on failure it is let go
        assert log == ["prov:adopt", "op:configure", "vm:detach"]
        assert moves == []  # never handed out

    asyncio.run(go())


def test_adopted_vm_is_not_set_up_again(moves: list[Any]) -> None:
    async def go() -> None:
        log: list[str] = []
        vm = StubVm(log, keeper=True)
        sb = await _build(vm, Adopt(vm), image=_image())  # type: ignore[arg-type]
        assert log == ["prov:adopt"]  # no mount_root, no new identity
        assert sb.state is S.RUNNING and moves == [(S.STARTING, S.RUNNING)]

    asyncio.run(go())


def test_illegal_transition_names_both_states() -> None:
    async def go() -> None:
        sb = await _build(StubVm([]), Boot())
        with pytest.raises(SandboxStateError, match="is running; to become starting"):
            sb._move(S.STARTING)
        await sb.kill()

    asyncio.run(go())


# ------------------------------------------------------------------ on the in-memory fake


def test_a_sandbox_runs_on_the_in_memory_fake() -> None:
    """The public Sandbox surface on InMemoryVmProvider: no QEMU, a real agent
    connection to an in-process guest that answers the lifecycle's ops."""
    from sandvm.errors import GuestError, Unsupported
    from sandvm.providers.memory import InMemoryVmProvider
    from sandvm.sandbox import Sandbox

    prov = InMemoryVmProvider()
    with Sandbox.create(image="base", provider=prov) as sb:
        assert sb.state is S.RUNNING and sb.is_running()
        assert sb.ping() >= 0.0
        assert sb.info["accelerator"] == "memory" and sb.info["image"] == "base"
        sb.pause()
        assert sb.state is S.PAUSED
        sb.resume()
        with pytest.raises(Unsupported, match="need the QEMU provider"):
            sb.snapshot()
        with pytest.raises(GuestError, match="does not run 'exec'"):
            sb.commands.run("true")
        vm = prov.vm(sb.sandbox_id)
        assert vm.ops == ["configure", "configure", "exec"]  # identity, clock step, exec
    assert sb.state is S.KILLED and not vm.alive
    with pytest.raises(SandboxStateError, match="has been killed"):
        sb.ping()


def test_the_in_memory_fake_refuses_what_needs_qemu() -> None:
    from sandvm.errors import Unsupported
    from sandvm.providers.memory import InMemoryVmProvider

    async def go() -> None:
        prov = InMemoryVmProvider()
        with pytest.raises(Unsupported, match="keeper"):
            await AsyncSandbox.create(image="base", provider=prov, keeper_job={"journal": "x"})
        with pytest.raises(Unsupported, match="only boot"):
            await build_sandbox(SandboxResources(sandbox_id="sb-r", spec=VmSpec()),
                                provider=prov, origin=Restore(Path("/snap")))
        await prov.close()

    asyncio.run(go())
