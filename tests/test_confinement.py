"""QEMU confinement (its own uid and namespaces, only its own files) and bounded logs.

A guest that takes over its QEMU must reach nothing of the host: QMP ``blockdev-add``
(QEMU opening a host file on the guest's behalf, as an escaped QEMU would) of the
host's secrets, sandvm's files or another VM's RAM fails; QEMU runs as a uid of its
own, not the server's. A guest flooding its serial console keeps a bounded log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandvm.core import VmSpec
from sandvm.errors import QmpError, VmBootError
from sandvm.providers import jail
from sandvm.providers.qemu import (
    QemuVm,
    backing_chain,
    confinement,
    console_tail,
    scrub,
)


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


# ------------------------------------------------------------------ no VM needed


def _sizes(d: Path) -> list[int]:
    out = []
    for p in d.iterdir():
        with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile
            out.append(p.stat().st_size)
    return out


def test_bounded_log_keeps_only_the_last_bytes(tmp_path: Path) -> None:
    cap = 64 << 10
    log = jail.BoundedLog(tmp_path / "console.log", cap)
    a, b = socket.socketpair()
    t = log.pump(b.detach())
    chunk = bytes(range(256)) * 256  # 64 KiB
    for i in range(160):  # 10 MiB, 160x the cap
        a.sendall(chunk[:-8] + f"{i:08d}".encode())
        sizes = _sizes(tmp_path)
        assert sum(sizes) <= cap + len(chunk), sizes
    a.close()
    t.join(10)
    assert not t.is_alive()
    assert log.total == 160 * len(chunk)
    assert sum(_sizes(tmp_path)) <= cap
    assert jail.log_tail(tmp_path / "console.log", 16).endswith(b"00000159")
    assert len(jail.log_tail(tmp_path / "console.log", 1 << 20)) <= cap


def test_log_tail_does_not_follow_symlinks(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    (tmp_path / "console.log").symlink_to(secret)
    assert jail.log_tail(tmp_path / "console.log") == b""


def test_scrub_escapes_control_characters_and_hides_host_paths() -> None:
    text = "boot \x1b[2J\x07fail\u202e at /dev/shm/sandvm-0/vm-1/mem\nnext\x00"
    out = scrub(text, "/dev/shm/sandvm-0/vm-1")
    assert "\x1b" not in out and "\x07" not in out and "\x00" not in out
    assert "\u202e" not in out and "\\x1b" in out and "\\u202e" in out
    assert "/dev/shm" not in out and "\n" in out


def test_backing_chain_never_leaves_the_trusted_dirs(tmp_path: Path) -> None:
    # a qcow2 header (as a taken-over QEMU could write it) naming a host file
    evil = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
                    "/etc/passwd", str(evil), "1M"], check=True)
    assert backing_chain(evil, [tmp_path]) == []
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 4096)
    good = tmp_path / "good.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
                    "base.raw", str(good), "1M"], check=True)
    assert backing_chain(good, []) == [tmp_path / "base.raw"]


def test_confinement_needs_root_for_a_uid_and_can_be_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        assert confinement().mode == "uid"
    else:
        assert confinement().mode in ("userns", "none")
    monkeypatch.setenv("SANDVM_CONFINE", "0")
    assert confinement().mode == "none"


def test_uid_leases_are_exclusive(tmp_path: Path) -> None:
    uid1, fd1 = jail.lease_uid(tmp_path)
    uid2, fd2 = jail.lease_uid(tmp_path)
    assert uid1 != uid2 and jail.is_confined_uid(uid1) and jail.is_confined_uid(uid2)
    os.close(fd1)
    os.close(fd2)


# ------------------------------------------------------------------ real VMs

def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One booted VM and one restored from its snapshot, on one event loop thread."""
    from sandvm.sandbox import AsyncSandbox

    if os.geteuid() != 0:
        pytest.skip("confinement by uid needs root")  # the userns mode is tested by doctor
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()

    def call(coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def make() -> dict[str, Any]:
        a = await AsyncSandbox.create()
        snap = await a.snapshot()
        b = await AsyncSandbox.from_snapshot(snap)
        return {"a": a, "b": b, "snap": snap}

    state = call(make())
    state["call"] = call
    try:
        yield state
    finally:
        async def end() -> None:
            for k in ("a", "b"):
                await state[k].kill()

        call(end())
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


@pytest.mark.qemu
def test_each_qemu_runs_as_its_own_unprivileged_uid(vms: dict[str, Any]) -> None:
    a, b = vms["a"]._vm, vms["b"]._vm
    uids = []
    for vm in (a, b):
        st = _status(vm.pid)
        real, eff, saved, fs = (int(x) for x in st["Uid"].split())
        assert real == eff == saved == fs == vm.uid, st["Uid"]
        assert jail.is_confined_uid(real) and real != os.getuid()
        assert str(jail.SHARED_GID) in st["Gid"].split()
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert st["CapEff"] == "0000000000000000"
        for ns in ("mnt", "net", "ipc"):
            assert os.readlink(f"/proc/{vm.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        uids.append(real)
    assert uids[0] != uids[1]  # one escaped QEMU cannot signal or ptrace another


@pytest.mark.qemu
def test_qemu_cannot_open_host_files(vms: dict[str, Any], tmp_path: Path) -> None:
    a, b = vms["a"]._vm, vms["b"]._vm
    from sandvm.assets import sandvm_home

    mine = tmp_path / "server.db"
    mine.write_bytes(b"tenant data")
    mine.chmod(0o644)  # even a world-readable file is out of reach
    targets = ["/etc/shadow", "/etc/passwd", str(mine), str(sandvm_home() / "accel.json"),
               str(b.rundir / "mem"), str(b.rundir / "owner"), "/proc/1/environ",
               str(vms["snap"].path / "state")]
    call = vms["call"]
    for i, path in enumerate(targets):
        with pytest.raises(QmpError) as ei:
            call(a._qmp("blockdev-add", {"driver": "file", "node-name": f"x{i}",
                                         "filename": path, "read-only": True}))
        assert "No such file" in str(ei.value) or "denied" in str(ei.value), path
    # its own files are there, and the VM still works
    res = call(vms["a"].commands.run("echo still here"))
    assert res.stdout == "still here\n"


@pytest.mark.qemu
def test_a_console_flood_stays_bounded(vms: dict[str, Any]) -> None:
    sb, vm = vms["b"], vms["b"]._vm
    mib = 8  # 8x the cap: TCG's UART moves a few MiB/s
    res = vms["call"](sb.commands.run(
        f"head -c {mib << 20} /dev/zero | tr '\\0' 'x' > /dev/ttyS0; echo END-OF-FLOOD"
        " > /dev/ttyS0", timeout=600), 700)
    assert res.exit_code == 0, res
    logs = list(vm.rundir.glob("console.log*"))
    deadline = 60.0
    import time

    t0 = time.monotonic()
    while b"END-OF-FLOOD" not in console_tail(vm.rundir, 64) and \
            time.monotonic() - t0 < deadline:
        time.sleep(0.05)
    assert b"END-OF-FLOOD" in console_tail(vm.rundir, 64)
    total = sum(p.stat().st_size for p in vm.rundir.glob("console.log*"))
    assert logs and total <= jail.CONSOLE_CAP, total


@pytest.mark.qemu
def test_boot_failure_shows_the_console_tail_without_host_paths() -> None:
    from sandvm.assets import find_assets

    async def boot() -> None:
        vm = QemuVm("bootfail", VmSpec(kernel_args=("rdinit=/no-such-init", "loglevel=4")),
                    assets=find_assets(), accel="tcg")
        await vm.boot(timeout=120)

    with pytest.raises(VmBootError) as ei:
        _run(boot())
    msg = ei.value.message
    assert "last guest console lines" in msg and "panic" in msg, msg
    assert "/dev/shm" not in msg and "sandvm-" not in msg, msg
    assert not any(ord(c) < 32 and c != "\n" for c in msg), msg


@pytest.mark.qemu
def test_doctor_reports_the_confinement(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from click.testing import CliRunner

    from sandvm.cli import main

    out = CliRunner().invoke(main, ["doctor", "--json"])
    assert json.loads(out.output)["confinement"]["mode"] == confinement().mode
    monkeypatch.setenv("SANDVM_CONFINE", "0")
    out = CliRunner().invoke(main, ["doctor"])
    assert "confinement:  none: SANDVM_CONFINE=0" in out.output


def test_gc_finds_orphaned_confined_qemus(tmp_path: Path) -> None:
    """A QEMU running as a confined uid, marked by ``-name guest=sandvm:<rundir>``, whose
    runtime dir is gone, is found by ``orphaned_qemus`` (gc kills it)."""
    import time

    from sandvm.providers.qemu import orphaned_qemus

    if os.geteuid() != 0:
        pytest.skip("only root starts QEMUs as confined uids")
    uid, lease = jail.lease_uid(tmp_path / "leases")
    code = "import time; time.sleep(60)"
    python = "/usr/bin/python3"  # one the uid may run (not a venv under /root)
    p = subprocess.Popen(["bash", "-c", f'exec -a qemu-system-x86_64 {python} -c'
                          f' "{code}" -name "guest=sandvm:{tmp_path / "vm-gone"}"'],
                         user=uid, group=jail.SHARED_GID, extra_groups=[])
    try:
        deadline = time.monotonic() + 10
        found: list[tuple[int, Path]] = []
        while time.monotonic() < deadline and not found:
            found = orphaned_qemus(tmp_path)
            time.sleep(0.05)
        assert found == [(p.pid, tmp_path / "vm-gone")]
        assert os.stat(f"/proc/{p.pid}").st_uid == uid
    finally:
        p.kill()
        p.wait()
        os.close(lease)


@pytest.mark.qemu
def test_a_detachable_vm_under_its_keeper_is_confined_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keeper starts QEMU with the same confinement and keeps the console bounded;
    the journal (the server's state) is out of QEMU's reach."""
    from sandvm.runtime.manager import SandboxManager

    if os.geteuid() != 0:
        pytest.skip("confinement by uid needs root")
    journal = tmp_path / "journal.db"
    monkeypatch.setenv("SANDVM_JOURNAL", str(journal))

    async def go() -> None:
        m = SandboxManager()
        sb = await m.create(ttl=300)
        try:
            vm = sb._vm
            assert vm.keeper_pid is not None and vm.qemu_pid is not None
            st = _status(vm.qemu_pid)
            uid = int(st["Uid"].split()[0])
            assert jail.is_confined_uid(uid) and st["NoNewPrivs"] == "1"
            assert os.readlink(f"/proc/{vm.qemu_pid}/ns/mnt") != os.readlink(
                "/proc/self/ns/mnt")
            for i, path in enumerate((str(journal), "/etc/shadow")):
                with pytest.raises(QmpError, match="No such file"):
                    await vm._qmp("blockdev-add", {"driver": "file", "node-name": f"j{i}",
                                                   "filename": path, "read-only": True})
            res = await sb.commands.run(
                "head -c 3000000 /dev/zero | tr '\\0' y > /dev/ttyS0; echo KEEPER-END"
                " > /dev/ttyS0", timeout=600)
            assert res.exit_code == 0
            assert vm.rundir is not None
            import time

            t0 = time.monotonic()
            while b"KEEPER-END" not in console_tail(vm.rundir, 64) and \
                    time.monotonic() - t0 < 60:
                await asyncio.sleep(0.05)
            assert b"KEEPER-END" in console_tail(vm.rundir, 64)
            total = sum(p.stat().st_size for p in vm.rundir.glob("console.log*"))
            assert total <= jail.CONSOLE_CAP
        finally:
            await m.kill(sb.sandbox_id)

    _run(go())
