"""One supervised QEMU process (``QemuVm``) and its life (``QemuVmState``).

One :class:`QemuVm` is one ``qemu-system-x86_64 -M microvm`` child process with a
private runtime directory (mode 0700) holding its QMP and agent sockets, its bounded
console log and its guest RAM file (``memory-backend-file,share=on``, the basis for
fast snapshots). If QEMU dies, the VM is marked failed, every waiter on its agent gets
VmCrashed, and the runtime directory is removed. Launching (argv, confinement) is
providers/launch.py; saving a snapshot of it is providers/saving.py.

This file stays one (~840 lines): it is one class whose boot, attach, keeper, save and
shutdown paths share the same state machine and process handles; splitting them
would spread that state across modules.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sandvm._files import (
    move_file,
    preallocate_like,
    runtime_root,
    sparse_copy,
    write_owner,
)
from sandvm.agent_client import AgentConnection, AgentInfo
from sandvm.assets import Assets
from sandvm.core import DiskSpec, VmSpec, VmState
from sandvm.errors import (
    AgentDisconnected,
    InvalidTransition,
    QmpError,
    SandboxBusy,
    SandvmError,
    VmBootError,
    VmCrashed,
    VmError,
)
from sandvm.providers import jail
from sandvm.providers.launch import (
    DEFAULT_BOOT_TIMEOUT,
    HOLDER_FILE,
    Launch,
    build_argv,
    child_setup,
    disk_root,
    log_tail_lines,
    make_overlay,
    pid_alive,
    pid_exit,
    prepare_launch,
    qcow2_backing,
    qemu_img,
    scrub,
    sweep_stale_rundirs,
)
from sandvm.providers.qmp import QmpClient

_log = logging.getLogger("sandvm.qemu")

# every booted VM until its shutdown: killed at interpreter exit whatever loop it ran on
_LIVE: set[QemuVm] = set()


@atexit.register
def _kill_live_vms() -> None:
    for vm in list(_LIVE):
        vm.kill_now()


class QemuVmState(enum.Enum):
    """One QEMU process's life as its QemuVm sees it (``QemuVm.state``)::

        NEW ──boot / attach──▶ BOOTING ──agent ready──▶ RUNNING
        BOOTING | RUNNING ──QEMU died──▶ FAILED (``failure`` says why)
        BOOTING | RUNNING | FAILED ──detach──▶ DETACHED (runs on under its keeper)
        any ──shutdown──▶ STOPPING ──▶ GONE (process and files gone; shutdown again: GONE)

    Not the provider's ``VmState`` (seed 000's Created/Running/Stopped/Destroyed, which
    the provider keeps per VM id): this is the process under it, with the states that
    lifecycle has no word for (booting, failed, detached, stopping).
    """

    NEW = "new"
    BOOTING = "booting"
    RUNNING = "running"
    FAILED = "failed"
    DETACHED = "detached"
    STOPPING = "stopping"
    GONE = "gone"


_Q = QemuVmState
_QEMU_NEXT: dict[QemuVmState, frozenset[QemuVmState]] = {
    _Q.NEW: frozenset({_Q.BOOTING, _Q.STOPPING}),
    _Q.BOOTING: frozenset({_Q.RUNNING, _Q.FAILED, _Q.DETACHED, _Q.STOPPING}),
    _Q.RUNNING: frozenset({_Q.FAILED, _Q.DETACHED, _Q.STOPPING}),
    _Q.FAILED: frozenset({_Q.DETACHED, _Q.STOPPING}),
    _Q.DETACHED: frozenset({_Q.STOPPING}),
    _Q.STOPPING: frozenset({_Q.GONE}),
    _Q.GONE: frozenset({_Q.STOPPING}),
}
# shut down or let go on purpose: QEMU's exit then is no crash
_LETTING_GO = frozenset({_Q.STOPPING, _Q.GONE, _Q.DETACHED})


class QemuVm:
    """One supervised QEMU process and its agent connection.

    ``boot`` is allowed once, when NEW; ``pause``/``resume`` while running;
    ``detach`` once booted (a detachable VM); ``shutdown`` in any state
    (idempotent). A dead QEMU fails every agent waiter with VmCrashed. See
    QemuVmState.
    """

    def __init__(self, vm_id: str, spec: VmSpec, *, assets: Assets, accel: str) -> None:
        self.vm_id = vm_id
        self.spec = spec
        self.assets = assets
        self.accel = accel
        self.rundir: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QmpClient | None = None
        self.agent: AgentConnection | None = None
        self.agent_info: AgentInfo | None = None
        self.failure: SandvmError | None = None
        self.boot_seconds: float | None = None
        self._state = QemuVmState.NEW
        self._monitor: asyncio.Task[None] | None = None
        self.restored_from: Path | None = None
        self.private_ram = False
        self.stopped_at = 0.0  # monotonic time of the last save_state's QMP ``stop``
        self.diskdir: Path | None = None  # this VM's disk overlays (on disk)
        self.disk_tops: dict[str, Path] = {}  # serial -> the overlay QEMU writes now
        self.frozen_disks: dict[str, Path] = {}  # serial -> layer frozen by save_state
        self.disk_images: dict[str, Path] = {}  # serial -> the raw image under its layers
        # detachable VMs: QEMU's parent is a keeper process (runtime/keeper.py), not us
        self.keeper_job: dict[str, Any] | None = None
        self.keeper_pid: int | None = None
        self.qemu_pid: int | None = None
        self.resumed = False  # attach found it paused and let it run: its clock lags
        self._holder_fd: int | None = None  # flock on rundir/holder: we are its one user
        self.uid: int | None = None  # QEMU's own uid when confined by uid
        self._lease_fd: int | None = None  # holds that uid while our child QEMU lives

    def _hold(self, *, wait: float = 0.0) -> None:
        """Become the one process that uses this detachable VM (an flock, released by
        the kernel if we die). Raises SandboxBusy if another process holds it for longer
        than ``wait`` seconds."""
        assert self.rundir is not None
        path = self.rundir / HOLDER_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise SandboxBusy(
                        f"sandbox {self.vm_id} is in use by another process"
                        f" (pid {holder or '?'}): detach it there, or retry when it is done"
                        ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._holder_fd = fd

    def _let_go_hold(self) -> None:
        if self._holder_fd is not None:
            os.close(self._holder_fd)  # closing the last fd drops the flock
            self._holder_fd = None

    @property
    def state(self) -> QemuVmState:
        """Where this QEMU process is in its life. Any state."""
        return self._state

    @property
    def detached(self) -> bool:
        """Whether this VM was let go (``detach``): it runs on, someone else's."""
        return self._state is QemuVmState.DETACHED

    def _move(self, target: QemuVmState) -> None:
        """The one place the state changes. Raises VmError for a transition QemuVmState
        does not allow (a bug, not a user's error)."""
        if target not in _QEMU_NEXT[self._state]:
            raise VmError(f"VM {self.vm_id} is {self._state.value}; it cannot become"
                          f" {target.value}")
        self._state = target

    @property
    def pid(self) -> int | None:
        """QEMU's pid."""
        if self.qemu_pid is not None:
            return self.qemu_pid
        return self.proc.pid if self.proc else None

    @property
    def exited(self) -> bool:
        """Whether no QEMU child of ours runs (never started, gone, or under a keeper):
        what only it used (its volumes) can be released."""
        return self.proc is None or self.proc.returncode is not None

    async def wait_exit(self) -> None:
        """Return once ``exited``."""
        if self.proc is not None:
            await self.proc.wait()

    @property
    def alive(self) -> bool:
        if self.proc is None and self.keeper_pid is not None:  # attached from elsewhere
            return self.failure is None and pid_alive(self.keeper_pid)
        return self.proc is not None and self.proc.returncode is None and self.failure is None

    async def boot(self, *, timeout: float = DEFAULT_BOOT_TIMEOUT,
                   restore_from: Path | None = None) -> None:
        """Start QEMU and wait for the agent's hello. Raises VmBootError; cleans up on failure.

        With ``restore_from`` the VM resumes from that snapshot directory (its
        ``mem`` and ``state`` files) instead of booting the kernel.
        """
        if self._state is not QemuVmState.NEW:
            raise InvalidTransition(VmState.RUNNING, VmState.RUNNING, vm_id=self.vm_id)
        self._move(QemuVmState.BOOTING)
        t0 = time.monotonic()
        sweep_stale_rundirs()
        self.rundir = Path(tempfile.mkdtemp(prefix=f"{self.vm_id}-", dir=runtime_root()))
        os.chmod(self.rundir, 0o700)
        write_owner(self.rundir)
        disk_paths: dict[str, Path] = {}
        if any(d.overlay_size is not None for d in self.spec.disks):
            sweep_stale_rundirs(disk_root())
            self.diskdir = Path(tempfile.mkdtemp(prefix=f"{self.vm_id}-", dir=disk_root()))
            write_owner(self.diskdir)
            try:
                for d in self.spec.disks:
                    if d.overlay_size is not None:
                        backing = await asyncio.to_thread(self._pin, d)
                        disk_paths[d.serial] = self.diskdir / f"{d.serial}-0.qcow2"
                        await make_overlay(backing, d.format, disk_paths[d.serial],
                                           d.overlay_size)
            except BaseException:
                await self._cleanup_files()
                raise
        self.disk_tops = dict(disk_paths)
        try:
            launch = await asyncio.to_thread(
                prepare_launch, self.rundir, assets=self.assets, spec=self.spec,
                accel=self.accel, restore_from=restore_from, disk_paths=disk_paths,
                diskdir=self.diskdir)
        except OSError as exc:
            _log.warning("VM %s: cannot prepare QEMU's confinement: %s", self.vm_id, exc)
            await self._cleanup_files()
            raise VmBootError(f"cannot prepare VM {self.vm_id}'s confinement"
                              f" ({type(exc).__name__}: {scrub(exc.strerror or '')}); set"
                              " SANDVM_CONFINE=0 to run QEMU unconfined") from exc
        self.uid = launch.uid
        argv = build_argv(assets=self.assets, spec=self.spec, accel=self.accel,
                          rundir=self.rundir, fds=launch.fds, restore_from=restore_from,
                          disk_paths=disk_paths)
        self.restored_from = restore_from
        # RAM mapped privately from a snapshot file (not a file of our own)?
        self.private_ram = restore_from is not None and (restore_from / "mem").exists()
        if self.keeper_job is not None:
            await self._start_keeper(argv, launch)
        else:
            err_r, err_w = os.pipe()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=err_w, stderr=err_w,
                    pass_fds=launch.qemu_fds(),
                    preexec_fn=functools.partial(child_setup, launch.plan, os.getpid()))
            except (OSError, subprocess.SubprocessError) as exc:
                os.set_blocking(err_r, False)
                with contextlib.suppress(OSError):
                    exc.add_note(os.read(err_r, 4096).decode(errors="replace"))
                os.close(err_r)
                launch.close_all()
                _log.warning("VM %s: cannot start %s: %s %s", self.vm_id, argv[0], exc,
                             getattr(exc, "__notes__", ""))
                await self._cleanup_files()
                raise VmBootError(f"cannot start QEMU for VM {self.vm_id}"
                                  f" ({type(exc).__name__}); see the log") from exc
            finally:
                os.close(err_w)
            jail.BoundedLog(self.rundir / "qemu.log", jail.STDERR_CAP).pump(err_r)
            jail.BoundedLog(self.rundir / "console.log", jail.CONSOLE_CAP).pump(
                launch.console_host)
            launch.console_host = -1  # the pump closes it
            self._lease_fd, launch.lease_fd = launch.lease_fd, None  # until QEMU is gone
            launch.close_all()
        _LIVE.add(self)
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        try:
            await asyncio.wait_for(self._connect(), timeout)
        except (asyncio.CancelledError, KeyboardInterrupt):
            await asyncio.shield(self.shutdown())
            raise
        except TimeoutError:
            detail = self._diagnostics()
            await self.shutdown()
            raise VmBootError(
                f"VM {self.vm_id} did not become ready within {timeout:.0f} s"
                f" (accelerator {self.accel}).{detail}") from None
        except SandvmError as exc:
            detail = self._diagnostics()
            await self.shutdown()
            if isinstance(exc, VmBootError):
                raise
            raise VmBootError(f"VM {self.vm_id} failed to boot:"
                              f" {scrub(exc.message, self.rundir, self.diskdir)}{detail}"
                              ) from exc
        self.boot_seconds = time.monotonic() - t0
        self._move(QemuVmState.RUNNING)

    def _diagnostics(self) -> str:
        """QEMU's last words and the guest console's tail for an error message: host
        paths replaced and control characters escaped (``scrub``); the raw text goes to
        the log only."""
        if self.rundir is None:
            return ""
        parts = []
        qlog = log_tail_lines(self.rundir / "qemu.log", 5)
        console = log_tail_lines(self.rundir / "console.log", 10)
        if qlog or console:
            _log.warning("VM %s: QEMU said: %r; guest console tail: %r", self.vm_id, qlog,
                         console)
        if qlog:
            parts.append(f"\nQEMU said:\n{scrub(qlog, self.rundir, self.diskdir)}")
        if console:
            parts.append("\nlast guest console lines:\n"
                         f"{scrub(console, self.rundir, self.diskdir)}")
        return "".join(parts)

    async def _wait_socket(self, path: Path) -> None:
        while True:
            if self.proc is None and self.keeper_pid is not None:  # attached
                if not pid_alive(self.keeper_pid):
                    raise VmBootError(f"sandbox {self.vm_id}'s keeper is gone")
            elif self.proc is None or self.proc.returncode is not None:
                raise VmBootError(f"QEMU exited with status {self.proc and self.proc.returncode}"
                                  f" before accepting connections.{self._diagnostics()}")
            if path.exists():
                return
            await asyncio.sleep(0.005)

    async def _connect(self, *, resume: bool = False) -> None:
        """Connect to the agent and QMP; load the snapshot's state (a restore), or with
        ``resume`` (an attach) let a VM that was left paused run again."""
        assert self.rundir is not None
        agent_sock, qmp_sock = self.rundir / "agent.sock", self.rundir / "qmp.sock"
        # QEMU binds a socket before it listens on it: a connect in between is
        # refused, so retry until it is accepted (the caller's wait_for bounds this)
        while True:
            await self._wait_socket(agent_sock)
            try:
                self.agent = await AgentConnection.connect(str(agent_sock),
                                                           eof_hook=self._explain_eof)
                break
            except AgentDisconnected:
                await asyncio.sleep(0.005)
        while True:
            await self._wait_socket(qmp_sock)
            qmp = QmpClient()
            try:
                await qmp.connect(str(qmp_sock))
                self.qmp = qmp
                break
            except QmpError:
                await qmp.close()
                await asyncio.sleep(0.005)
        if self.restored_from is not None:
            await self._load_state(self.restored_from / "state")
        elif resume:
            # its last holder died in a snapshot (or paused it and detached): the agent
            # cannot answer until the vCPUs run
            st = await self._qmp("query-status")
            if isinstance(st, dict) and st.get("status") in ("paused", "postmigrate"):
                await self._qmp("cont")
                self.resumed = True
        # the agent answers once the guest has booted; the outer wait_for bounds it
        self.agent_info = await self.agent.handshake(timeout=DEFAULT_BOOT_TIMEOUT * 4)

    def _crashed(self, code: int | None) -> SandvmError:
        if self.failure is None:
            status = "" if code is None else f" with status {code}"
            self.failure = VmCrashed(f"QEMU for VM {self.vm_id} exited unexpectedly{status}."
                                     f"{self._diagnostics()}")
            if self._state in (QemuVmState.BOOTING, QemuVmState.RUNNING):
                self._move(QemuVmState.FAILED)
        return self.failure

    async def _explain_eof(self) -> SandvmError | None:
        # the agent socket closes when QEMU dies: say so rather than "disconnected"
        if self._state in _LETTING_GO:
            return None
        if self.qemu_pid is not None:
            # under a keeper (ours or adopted): QEMU's own pid says, not the keeper's
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pid_exit(self.qemu_pid), 2.0)
            if not pid_alive(self.qemu_pid) and self._state not in _LETTING_GO:
                return self._crashed(None)
            return None
        if self.proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), 2.0)
        if self.proc.returncode is not None and self._state not in _LETTING_GO:
            return self._crashed(self.proc.returncode)
        return None

    async def _start_keeper(self, argv: list[str], launch: Launch) -> None:
        """Start QEMU under a keeper in its own session (it outlives this process). The
        keeper inherits QEMU's fds, the console's host end (it keeps the bounded log)
        and the uid lease (held while it lives)."""
        import sys

        assert self.rundir is not None and self.keeper_job is not None
        keeper = Path(__file__).resolve().parent.parent / "runtime" / "keeper.py"
        job = {**self.keeper_job, "argv": argv, "rundir": str(self.rundir),
               "diskdir": str(self.diskdir) if self.diskdir else None,
               "sandbox_id": self.vm_id, "confine": launch.plan,
               "pass_fds": list(launch.qemu_fds()), "console_fd": launch.console_host}
        inherit = (*launch.qemu_fds(), launch.console_host,
                   *(() if launch.lease_fd is None else (launch.lease_fd,)))
        with open(self.rundir / "keeper.log", "wb") as log:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", "-S", str(keeper), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                    pass_fds=inherit)
            except OSError as exc:
                launch.close_all()
                _log.warning("VM %s: cannot start its keeper: %s", self.vm_id, exc)
                await self._cleanup_files()
                raise VmBootError(f"cannot start the keeper of VM {self.vm_id}"
                                  f" ({type(exc).__name__})") from exc
            finally:
                launch.close_all()  # the keeper has its copies
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job).encode())
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30.0)
        except TimeoutError:
            line = b""
        if not line.startswith(b"started "):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            tail = log_tail_lines(self.rundir / "keeper.log", 8)
            _log.warning("VM %s: its keeper did not start QEMU: %s", self.vm_id, tail)
            await self._cleanup_files()
            raise VmBootError(f"the keeper of VM {self.vm_id} did not start QEMU:"
                              f" {scrub(tail[-600:], self.rundir, self.diskdir) or 'no output'}")
        await self.proc.wait()  # the keeper forked away from it: watched by pid from now
        self.proc = None
        self.qemu_pid, self.keeper_pid = (int(x) for x in line.split()[1:3])
        self._hold()  # nobody else knows of it yet: never busy

    async def detach(self) -> None:
        """Let go of a detachable VM: close our connections, leave it running under its
        keeper. Allowed once booting, running or failed; the VM is then someone else's
        (``attach``). Detached, stopping or gone: does nothing. Raises InvalidTransition
        for a VM without a keeper."""
        if self.keeper_pid is None:
            raise InvalidTransition(VmState.RUNNING, VmState.RUNNING, vm_id=self.vm_id)
        if self._state in _LETTING_GO:
            return
        self._move(QemuVmState.DETACHED)
        if self._monitor is not None:
            self._monitor.cancel()
        if self.agent is not None:
            await self.agent.close()
        if self.qmp is not None:
            await self.qmp.close()
        self._let_go_hold()
        _LIVE.discard(self)

    @classmethod
    async def attach(cls, vm_id: str, spec: VmSpec, *, assets: Assets, accel: str,
                     rundir: Path, diskdir: Path | None, keeper_pid: int, qemu_pid: int,
                     timeout: float = 10.0, wait: float = 0.0,
                     restored_from: Path | None = None, private_ram: bool = False,
                     disk_images: dict[str, Path] | None = None) -> QemuVm:
        """Take over a running detachable VM (from its runtime dir), waiting up to ``wait``
        seconds for another process that holds it to let go; a VM left paused is resumed
        (``resumed``). A VM that was restored
        from a snapshot needs ``restored_from`` and ``private_ram`` as its boot set them
        (its state is not loaded again); ``disk_images`` (serial -> the raw image under
        its layers) overrides what is found in ``diskdir``. Raises VmBootError if it is
        gone or does not answer, SandboxBusy if another process still holds it."""
        vm = cls(vm_id, spec, assets=assets, accel=accel)
        vm._move(QemuVmState.BOOTING)
        vm.rundir, vm.diskdir = rundir, diskdir
        vm.keeper_pid, vm.qemu_pid = keeper_pid, qemu_pid
        vm.private_ram = private_ram  # restored_from is set once connected: _connect
        # would load the snapshot's state into the running VM
        if diskdir is not None:
            def generation(p: Path) -> tuple[str, int]:  # root-10 comes after root-9
                serial, _, n = p.stem.rpartition("-")
                return serial, int(n) if n.isdigit() else -1

            tops = sorted(diskdir.glob("*-[0-9]*.qcow2"), key=generation)
            for top in tops:
                serial = top.stem.rsplit("-", 1)[0]
                vm.disk_tops[serial] = top
            for img in diskdir.glob("*-layer.*"):  # a raw image pinned by _pin
                if img.suffix != ".qcow2":
                    vm.disk_images[img.name.split("-layer")[0]] = img
            for img in diskdir.glob("image-*.ext4"):  # the image under a pinned layer
                vm.disk_images[img.stem.removeprefix("image-")] = img
        vm.disk_images.update(disk_images or {})
        if not pid_alive(keeper_pid):
            raise VmBootError(f"sandbox {vm_id} is gone (its keeper, pid {keeper_pid}, exited)")
        try:
            await asyncio.to_thread(vm._hold, wait=wait)
        except FileNotFoundError:
            raise VmBootError(f"sandbox {vm_id} is gone (its runtime dir was removed)") from None
        for attempt in (1, 2):
            # a second try: if the guest did not see the last holder leave, that holder's
            # torn last frame swallows our HELLO; our hang-up makes the guest start afresh
            try:
                await asyncio.wait_for(vm._connect(resume=True), timeout / 2)
                break
            except (TimeoutError, SandvmError) as exc:
                for c in (vm.agent, vm.qmp):
                    if c is not None:
                        with contextlib.suppress(Exception):
                            await c.close()
                vm.agent = vm.qmp = None
                if attempt == 2 or not pid_alive(keeper_pid):
                    vm._let_go_hold()
                    _log.warning("cannot reattach to sandbox %s: %s", vm_id, exc)
                    raise VmBootError(f"cannot reattach to sandbox {vm_id}:"
                                      f" {scrub(str(exc), rundir, diskdir)}") from None
                await asyncio.sleep(0.1)
        vm.restored_from = restored_from
        vm._move(QemuVmState.RUNNING)
        vm._monitor = asyncio.get_running_loop().create_task(vm._watch())
        return vm

    async def _watch(self) -> None:
        if self.proc is None:  # attached: the keeper is not our child
            assert self.keeper_pid is not None
            await pid_exit(self.keeper_pid)
            if self._state not in _LETTING_GO:
                failure = self._crashed(None)
                if self.agent is not None:
                    self.agent.fail(failure)
                await self._release()
            return
        code = await self.proc.wait()
        if self._state not in _LETTING_GO:
            failure = self._crashed(code)
            if self.agent is not None:
                self.agent.fail(failure)
            await self._release()

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``). Raises QmpError, VmCrashed."""
        await self._qmp("stop")

    async def resume(self) -> None:
        """Resume the vCPUs (QMP ``cont``). Raises QmpError, VmCrashed."""
        await self._qmp("cont")

    async def _qmp(self, cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        if self.failure is not None:
            raise self.failure
        if self.qmp is None:
            raise QmpError(f"VM {self.vm_id} has no QMP connection")
        return await self.qmp.execute(cmd, args, **kw)

    async def _load_state(self, state: Path) -> None:
        """Feed a saved device state to a QEMU started with ``-incoming defer``."""
        ram_in_file = (state.parent / "mem").exists()
        await self._qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": ram_in_file}]})
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._qmp("getfd", {"fdname": "snap"}, fds=[fd])
        finally:
            os.close(fd)
        await self._qmp("migrate-incoming", {"uri": "fd:snap"})
        while True:
            mig = await self._qmp("query-migrate")
            status = mig.get("status") if isinstance(mig, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise VmBootError("restoring the VM state failed:"
                                  f" {mig.get('error-desc', status)}")
            await asyncio.sleep(0.002)
        # the snapshot was taken with the vCPUs stopped, so QEMU stays paused
        run = await self._qmp("query-status")
        if isinstance(run, dict) and run.get("status") != "running":
            await self._qmp("cont")

    async def save_state(self, dest: Path, *, take_memory: bool = False) -> None:
        """Write device state + guest RAM into ``dest`` (a directory, best on tmpfs).

        The VM is paused for the duration and left paused (``stopped_at`` is the
        monotonic time its vCPUs stopped). The RAM file is copied,
        or with ``take_memory`` moved (instant; only for a VM about to be
        destroyed, whose RAM then no longer has a name). A VM restored from a
        file snapshot maps its RAM privately, which x-ignore-shared does not skip:
        its RAM then goes into the state stream and no ``mem`` file is written.
        Raises QmpError.
        """
        assert self.rundir is not None
        self.stopped_at = 0.0
        copy_ram = not take_memory and not self.private_ram
        if copy_ram:  # allocate the copy's pages before pausing, not during the pause
            await asyncio.to_thread(preallocate_like, self.rundir / "mem", dest / "mem")
        await self._prepare_tops()
        self.stopped_at = time.monotonic()
        await self._qmp("stop")
        await self._freeze_disks()
        # both ends must agree on x-ignore-shared: on for "file" snapshots, off when
        # the RAM travels in the stream
        await self._qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": not self.private_ram}]})
        fd = os.open(dest / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await self._qmp("getfd", {"fdname": "snap"}, fds=[fd])
        finally:
            os.close(fd)
        await self._qmp("migrate", {"uri": "fd:snap"})
        for i in range(6000):
            st = await self._qmp("query-migrate")
            status = st.get("status") if isinstance(st, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QmpError(f"saving VM state failed: {st.get('error-desc', status)}")
            await asyncio.sleep(0.001 if i < 20 else 0.005)
        else:
            raise QmpError("saving VM state did not complete in time")
        if self.private_ram:
            return  # the RAM is in the stream
        if take_memory:
            await asyncio.to_thread(move_file, self.rundir / "mem", dest / "mem")
            if os.stat(dest / "mem").st_uid != os.getuid():  # the snapshot's, not QEMU's
                os.chown(dest / "mem", os.getuid(), os.getgid())
        else:
            await asyncio.to_thread(sparse_copy, self.rundir / "mem", dest / "mem",
                                    into_existing=copy_ram)

    def _pin(self, d: DiskSpec) -> Path:
        """Hard-link a disk's read-only layers into this VM's disk dir, so the VM keeps
        working (and can be snapshotted) when the image or snapshot they came from is
        removed. Returns the path to put the overlay on; records the bottom raw image
        in ``disk_images``. Falls back to the files in place across file systems."""
        assert self.diskdir is not None
        src = Path(d.path)
        names = [(src, f"{d.serial}-layer{src.suffix}")]
        if d.format == "qcow2":
            rel = qcow2_backing(src)
            if rel and not rel.startswith("/"):
                names.append((src.parent / rel, rel))  # keeps the relative name valid
        pinned = []
        for path, name in names:
            try:
                os.link(path, self.diskdir / name)
                pinned.append(self.diskdir / name)
            except OSError:
                pinned.append(path)
        self.disk_images[d.serial] = pinned[-1] if d.format == "qcow2" else pinned[0]
        return pinned[0]

    async def _freeze_disks(self) -> None:
        """While stopped: make each overlay read-only and let QEMU write a new one on top.

        The frozen layer (in ``frozen_disks``) never changes again; the caller
        copies or moves it while the VM runs on. Its qcow2 header names its
        backing file, which may itself be an earlier frozen layer.
        """
        self.frozen_disks = {}
        assert self.diskdir is not None or not self.disk_tops
        for serial, top in list(self.disk_tops.items()):
            new = self._next_top(serial, top)
            # made by the host beforehand (``_prepare_tops``): QEMU, confined, cannot
            # create files in the disk dir
            await self._qmp("blockdev-snapshot-sync", {
                "device": f"disk-{serial}", "snapshot-file": str(new), "format": "qcow2",
                "mode": "existing"})
            self.frozen_disks[serial] = top
            self.disk_tops[serial] = new

    def _next_top(self, serial: str, top: Path) -> Path:
        assert self.diskdir is not None
        n = int(top.stem.rsplit("-", 1)[1]) + 1
        return self.diskdir / f"{serial}-{n}.qcow2"

    async def _prepare_tops(self) -> None:
        """Create the overlays ``_freeze_disks`` puts on top of each disk (before the
        pause: it costs no paused time), owned by QEMU's uid. Raises VmError."""
        import struct

        for serial, top in list(self.disk_tops.items()):
            new = self._next_top(serial, top)
            fd = os.open(top, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                head = os.pread(fd, 32, 0)
            finally:
                os.close(fd)
            if len(head) < 32 or head[:4] != b"QFI\xfb":
                raise VmError(f"disk {serial}'s top layer is not a qcow2 image")
            size = struct.unpack(">Q", head[24:32])[0]
            new.unlink(missing_ok=True)
            await qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-u",
                           "-F", "qcow2", "-b", str(top), str(new), str(size))
            if st.st_uid != os.getuid():
                os.chown(new, st.st_uid, st.st_gid)

    async def merge_disks(self, *, timeout: float = 300.0) -> None:
        """After the frozen layers were exported: fold each disk's new top back into its
        frozen layer (an active ``block-commit``, the VM running on), so every snapshot
        does not leave one more layer under the VM. Raises QmpError."""
        for serial, frozen in list(self.frozen_disks.items()):
            top, job = self.disk_tops[serial], f"merge-{serial}"
            await self._qmp("block-commit", {"job-id": job, "device": f"disk-{serial}",
                                             "base": str(frozen), "auto-dismiss": True})
            deadline = time.monotonic() + timeout
            completing = False
            while True:
                jobs = await self._qmp("query-block-jobs")
                mine = [j for j in jobs if j.get("device") == job] if isinstance(
                    jobs, list) else []
                if not mine:
                    break  # finished (and dismissed)
                if mine[0].get("ready") and not completing:
                    await self._qmp("block-job-complete", {"device": job})
                    completing = True
                if time.monotonic() > deadline:
                    await self._qmp("block-job-cancel", {"device": job, "force": True})
                    raise QmpError(f"merging disk {serial}'s layers did not finish in"
                                   f" {timeout:.0f} s")
                await asyncio.sleep(0.005)
            self.disk_tops[serial] = frozen
            del self.frozen_disks[serial]
            top.unlink(missing_ok=True)

    async def shutdown(self) -> None:
        """Kill QEMU (if running) and remove everything it had. Any state; idempotent."""
        if self._state is not QemuVmState.STOPPING:  # not already under way
            self._move(QemuVmState.STOPPING)
        if self.agent is not None:
            await self.agent.close()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit", timeout=1.0), 1.5)
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 2.0)
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                if self.qemu_pid is not None:  # its keeper is gone: QEMU follows (PDEATHSIG)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.qemu_pid, signal.SIGKILL)
                await self.proc.wait()
        elif self.proc is None and self.keeper_pid is not None:
            for _ in range(40):
                if not pid_alive(self.keeper_pid):
                    break
                await asyncio.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.keeper_pid, signal.SIGTERM)
        if self._monitor is not None and self._monitor is not asyncio.current_task():
            with contextlib.suppress(BaseException):
                await self._monitor
        await self._release()
        if self._state is QemuVmState.STOPPING:  # a concurrent shutdown may have finished
            self._move(QemuVmState.GONE)

    def _let_go_uid(self) -> None:
        if self._lease_fd is not None:  # only once our QEMU child is gone
            os.close(self._lease_fd)
            self._lease_fd = None

    async def _release(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
        self._let_go_hold()
        if self.proc is None or self.proc.returncode is not None:
            self._let_go_uid()
        await self._cleanup_files()
        _LIVE.discard(self)

    def kill_now(self) -> None:
        """Synchronous last resort (interpreter exit): SIGKILL QEMU, remove its files."""
        for pid in (self.qemu_pid, self.proc.pid if self.proc is not None
                    and self.proc.returncode is None else None):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._let_go_hold()
        self._let_go_uid()  # SIGKILLed: it runs no more code as that uid
        for d in (self.rundir, self.diskdir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        _LIVE.discard(self)

    async def _cleanup_files(self) -> None:
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
        if self.diskdir is not None:
            shutil.rmtree(self.diskdir, ignore_errors=True)

    async def qmp_execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on this VM's QEMU and return its result (for sandvm's
        runtime manager, which ends a save a dead holder left running). Allowed while
        QEMU runs with its QMP connection. Raises the VM's failure (VmCrashed),
        QmpError."""
        return await self._qmp(cmd, args)
