"""Choosing the accelerator: KVM when a bounded probe boot works under it, else TCG."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sandvm._files import (
    runtime_root,
)
from sandvm.assets import Assets, sandvm_home
from sandvm.core import VmSpec
from sandvm.providers import jail
from sandvm.providers.launch import (
    PROBE_TIMEOUT,
    Launch,
    build_argv,
    child_setup,
    log_tail_lines,
    prepare_launch,
)


@dataclass(frozen=True)
class AccelChoice:
    """Which accelerator `run` uses and why."""

    accel: str
    kvm_present: bool
    kvm_usable: bool
    reason: str
    cached: bool = False


def _probe_key(assets: Assets) -> str:
    st = assets.kernel.stat()
    return f"{assets.qemu}:{assets.kernel}:{st.st_size}:{os.uname().release}"


async def _probe_kvm(assets: Assets, timeout: float) -> tuple[bool, str]:
    rundir = Path(tempfile.mkdtemp(prefix="probe-", dir=runtime_root()))
    launch: Launch | None = None
    try:
        launch = await asyncio.to_thread(prepare_launch, rundir, assets=assets, spec=VmSpec(),
                                         accel="kvm")
        argv = build_argv(assets=assets, spec=VmSpec(), accel="kvm", rundir=rundir,
                          fds=launch.fds, probe=True)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, pass_fds=launch.qemu_fds(),
            preexec_fn=functools.partial(child_setup, launch.plan, os.getpid()))
        launch.close_qemu_side()
        jail.BoundedLog(rundir / "console.log", jail.CONSOLE_CAP).pump(launch.console_host)
        launch.console_host = -1  # the pump closes it
        deadline = time.monotonic() + timeout
        console = rundir / "console.log"
        try:
            while time.monotonic() < deadline:
                if "SANDVM-PROBE-OK" in log_tail_lines(console):
                    return True, "a probe boot under KVM reached the guest's init"
                if proc.returncode is not None:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.1)
            if "SANDVM-PROBE-OK" in log_tail_lines(console):
                return True, "a probe boot under KVM reached the guest's init"
            if proc.returncode is not None:
                assert proc.stderr is not None
                err = (await proc.stderr.read()).decode(errors="replace").strip()
                return False, f"QEMU failed under KVM: {err.splitlines()[-1] if err else '?'}"
            return False, (f"a probe boot under KVM did not reach the guest's init within"
                           f" {timeout:.0f} s (e.g. a PVM-only or nested host)")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        if launch is not None:
            launch.close_all()
        shutil.rmtree(rundir, ignore_errors=True)


async def choose_accel(assets: Assets, *, refresh: bool = False,
                       timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """KVM if /dev/kvm exists and a bounded probe boot works under it, else TCG.

    ``SANDVM_ACCEL=kvm|tcg`` forces a choice. The probe result is cached in
    ``$SANDVM_HOME/accel.json`` per QEMU, kernel and host kernel.
    """
    forced = os.environ.get("SANDVM_ACCEL")
    present = os.path.exists("/dev/kvm")
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, present, forced == "kvm", f"forced by SANDVM_ACCEL={forced}")
    if not present:
        return AccelChoice("tcg", False, False, "/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", True, False, "/dev/kvm is not accessible to this user")
    cache = sandvm_home() / "accel.json"
    key = _probe_key(assets)
    if not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                usable = bool(data["kvm_usable"])
                return AccelChoice("kvm" if usable else "tcg", True, usable,
                                   str(data["reason"]), cached=True)
    usable, reason = await _probe_kvm(assets, timeout)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "kvm_usable": usable, "reason": reason}))
        os.replace(tmp, cache)
    return AccelChoice("kvm" if usable else "tcg", True, usable, reason)
