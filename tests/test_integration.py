"""End-to-end behaviour of a real microVM through the public API (QEMU, TCG here)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from sandvm import (
    AgentTimeout,
    AsyncSandbox,
    CommandExitError,
    CommandNotFound,
    CommandTimeout,
    FileTooLarge,
    GuestFileNotFound,
    InvalidPath,
    InvalidSpec,
    Sandbox,
    SandboxStateError,
    UnknownImage,
    VmCrashed,
)
from sandvm.providers.qemu import runtime_root

pytestmark = pytest.mark.qemu


def _kernel_banner(kernel: Path) -> str:
    """The version string a bzImage carries in its setup header (``kernel_version``):
    "<release> (<builder>) #<build> ..."."""
    data = kernel.read_bytes()
    assert data[0x202:0x206] == b"HdrS", f"{kernel} is not a bzImage"
    start = struct.unpack_from("<H", data, 0x20E)[0] + 0x200
    return data[start:start + 512].split(b"\0")[0].decode()


def test_runs_in_the_guest_kernel(sandbox: Any) -> None:
    r = sandbox.commands.run('python3 -c "import platform; print(platform.release())"')
    assert r.exit_code == 0
    assert r.stdout.strip() == sandbox.info["guest_kernel"]
    assert "cloud-amd64" in r.stdout
    # the command ran under the very kernel file sandvm booted (its banner, build and
    # date included), in a boot of its own: neither can coincide with the host's, even
    # on a host that runs the same Debian cloud kernel
    version, boot_id = sandbox.commands.run(
        "cat /proc/version /proc/sys/kernel/random/boot_id").stdout.splitlines()[:2]
    release, _, rest = _kernel_banner(sandbox._a._vm.assets.kernel).partition(" ")
    builder, _, build = rest.partition(") ")
    assert version.startswith(f"Linux version {release} {builder})"), (version, release)
    assert version.endswith(build), (version, build)
    assert boot_id != Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_stdout_stderr_separate_and_exit_code(sandbox: Any) -> None:
    r = sandbox.commands.run("echo out; echo err >&2; exit 3", check=False)
    assert (r.exit_code, r.stdout, r.stderr, r.signal) == (3, "out\n", "err\n", None)


def test_nonzero_exit_raises_with_result(sandbox: Any) -> None:
    with pytest.raises(CommandExitError) as ei:
        sandbox.commands.run("echo partial; exit 42")
    assert ei.value.exit_code == 42
    assert ei.value.result.stdout == "partial\n"
    assert ei.value.code == "command_exit"


def test_argv_env_cwd(sandbox: Any) -> None:
    r = sandbox.commands.run(["sh", "-c", 'echo "$FOO:$(pwd)"'], env={"FOO": "bar baz"},
                             cwd="/tmp")
    assert r.stdout == "bar baz:/tmp\n"
    # the default environment is kept under the caller's variables
    assert "/usr/bin" in sandbox.commands.run("echo $PATH", env={"X": "1"}).stdout


def test_stdin_bytes_and_streamed(sandbox: Any) -> None:
    assert sandbox.commands.run("tr a-z A-Z", stdin=b"hello\n").stdout == "HELLO\n"
    chunks = [f"line {i}\n".encode() for i in range(200)]
    r = sandbox.commands.run("wc -l", stdin=iter(chunks))
    assert r.stdout.strip() == "200"


def test_unknown_command_and_bad_cwd(sandbox: Any) -> None:
    with pytest.raises(CommandNotFound):
        sandbox.commands.run(["definitely-not-a-command"])
    with pytest.raises(GuestFileNotFound):
        sandbox.commands.run(["true"], cwd="/no/such/dir")
    with pytest.raises(InvalidPath):
        sandbox.commands.run("true", cwd="relative")


def test_output_callbacks_stream(sandbox: Any) -> None:
    seen: list[tuple[float, str]] = []
    sandbox.commands.run("echo a; sleep 1; echo b", on_stdout=lambda t: seen.append(
        (time.monotonic(), t)))
    text = "".join(t for _, t in seen)
    assert text == "a\nb\n"
    # "a" arrived well before "b": output is streamed, not collected at the end
    assert len(seen) >= 2 and seen[-1][0] - seen[0][0] > 0.5


def test_large_output_with_flow_control(sandbox: Any) -> None:
    r = sandbox.commands.run("head -c 20000000 /dev/zero | tr '\\0' x; echo -n end >&2")
    assert len(r.stdout) == 20_000_000 and set(r.stdout) == {"x"}
    assert r.stderr == "end"


def test_absurd_timeouts_are_refused_before_the_guest(sandbox: Any) -> None:
    from sandvm.errors import InvalidSpec

    for bad in (1e10, float("inf"), float("nan"), -1, 0, True):
        with pytest.raises(InvalidSpec, match="timeout"):
            sandbox.commands.run("true", timeout=bad)
    assert sandbox.commands.run("echo ok", timeout=7 * 24 * 3600).stdout == "ok\n"


def test_timeout_kills_whole_process_group(sandbox: Any) -> None:
    # a child that ignores SIGTERM and would write a marker after the timeout
    script = ("(trap '' TERM; sleep 3; echo survived > /tmp/survivor) & "
              "echo started; sleep 120")
    sandbox.commands.run("rm -f /tmp/survivor")
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        sandbox.commands.run(script, timeout=1)
    assert time.monotonic() - t0 < 60  # the timeout ended it, not its own end
    assert ei.value.result is not None and ei.value.result.timed_out
    assert ei.value.result.stdout == "started\n"
    # the child is gone: killed with its group (it would leave the ps list only after
    # writing the marker), however long the guest takes to get there
    deadline = time.monotonic() + 30
    while "sleep 3" in (ps := sandbox.commands.run("ps -o pid,args").stdout):
        assert time.monotonic() < deadline, ps
        time.sleep(0.1)
    assert not sandbox.files.exists("/tmp/survivor")


def test_signals_and_background(sandbox: Any) -> None:
    h = sandbox.commands.run("trap 'echo got-term; exit 5' TERM; echo ready; "
                             "while true; do sleep 0.1; done", background=True)
    assert isinstance(h.pid, int)
    deadline = time.monotonic() + 10
    while "ready" not in h.stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    h.send_signal("SIGTERM")
    with pytest.raises(CommandExitError) as ei:
        h.wait()
    assert ei.value.exit_code == 5 and "got-term" in ei.value.stdout

    h = sandbox.commands.run("sleep 60", background=True)
    h.send_signal(signal.SIGKILL)
    r = None
    try:
        r = h.wait()
    except CommandExitError as exc:
        r = exc.result
    assert r.signal == signal.SIGKILL and r.exit_code == 128 + signal.SIGKILL

    # SIGTERM ignored → SIGKILL after the grace period
    h = sandbox.commands.run("trap '' TERM; echo ready; sleep 120", background=True)
    deadline = time.monotonic() + 30
    while "ready" not in h.stdout and time.monotonic() < deadline:  # its trap is set
        time.sleep(0.05)
    t0 = time.monotonic()
    h.send_signal("TERM", grace=0.5)
    with pytest.raises(CommandExitError) as ei:
        h.wait()
    assert ei.value.result.signal == signal.SIGKILL
    assert time.monotonic() - t0 < 60  # the grace kill ended it, not its own end
    with pytest.raises(InvalidSpec):
        h.send_signal("SIGNOPE")


def test_background_stdin(sandbox: Any) -> None:
    h = sandbox.commands.run("cat", background=True)
    h.send_stdin("one ")
    h.send_stdin(b"two")
    h.close_stdin()
    assert h.wait().stdout == "one two"


def test_concurrent_commands() -> None:
    async def main() -> None:
        async with await AsyncSandbox.create() as sb:
            results = await asyncio.gather(*(
                sb.commands.run(f"sleep 0.5; echo {i}") for i in range(16)))
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(16)]
            # a fast producer does not starve a small command on another stream: the
            # producer floods until told to stop, and the small command (and the one
            # that stops it) finish while it is still running and still producing
            got = [0]

            def count(text: str) -> None:
                got[0] += len(text)

            big = await sb.commands.run(
                "while [ ! -e /tmp/stop-flood ]; do head -c 1000000 /dev/zero | tr '\\0' x;"
                " done", background=True, on_stdout=count)
            deadline = time.monotonic() + 60
            while got[0] < 5_000_000:  # it is flooding the channel
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.01)
            before = got[0]
            small = await sb.commands.run("echo small")
            assert small.stdout == "small\n"
            # the producer kept going meanwhile (it cannot end before the stop file)
            assert got[0] > before
            await sb.commands.run("touch /tmp/stop-flood")
            assert (await big.wait()).exit_code == 0
            assert got[0] % 1_000_000 == 0 and got[0] > before

    asyncio.run(main())


def test_files_roundtrip(sandbox: Any) -> None:
    data = os.urandom(1 << 20) + b"\x00\xff"
    info = sandbox.files.write("/tmp/dir/a/blob.bin", data, mode=0o600)
    assert info.size == len(data)
    assert sandbox.files.read("/tmp/dir/a/blob.bin", format="bytes") == data
    st = sandbox.files.stat("/tmp/dir/a/blob.bin")
    assert (st.type, st.size, st.mode, st.name) == ("file", len(data), 0o600, "blob.bin")
    digest = sandbox.commands.run("sha256sum /tmp/dir/a/blob.bin").stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    # atomic write: no temp file left beside it
    assert [e.name for e in sandbox.files.list("/tmp/dir/a")] == ["blob.bin"]
    sandbox.files.write("/tmp/dir/t.txt", "héllo")
    assert sandbox.files.read("/tmp/dir/t.txt") == "héllo"


def test_files_ops(sandbox: Any) -> None:
    assert sandbox.files.make_dir("/tmp/ops/x/y") is True
    assert sandbox.files.make_dir("/tmp/ops/x/y") is False
    sandbox.files.write("/tmp/ops/f1", b"1")
    assert sandbox.files.exists("/tmp/ops/f1")
    moved = sandbox.files.rename("/tmp/ops/f1", "/tmp/ops/x/f2")
    assert moved.path == "/tmp/ops/x/f2"
    assert not sandbox.files.exists("/tmp/ops/f1")
    names = [e.path for e in sandbox.files.list("/tmp/ops", depth=3)]
    assert names == ["/tmp/ops/x", "/tmp/ops/x/f2", "/tmp/ops/x/y"]
    sandbox.files.remove("/tmp/ops")
    assert not sandbox.files.exists("/tmp/ops")
    with pytest.raises(GuestFileNotFound):
        sandbox.files.read("/tmp/ops/nothing")
    with pytest.raises(GuestFileNotFound):
        sandbox.files.stat("/nope")
    with pytest.raises(InvalidPath):
        sandbox.files.write("relative/path", b"x")


def test_read_cap_errors_instead_of_partial(sandbox: Any) -> None:
    sandbox.files.write("/tmp/big", b"x" * 5000)
    with pytest.raises(FileTooLarge):
        sandbox.files.read("/tmp/big", max_bytes=4999)
    assert len(sandbox.files.read("/tmp/big", max_bytes=5000)) == 5000
    # a file that grows past the cap while being read (no size known up front)
    with pytest.raises(FileTooLarge):
        sandbox.files.read("/dev/zero", max_bytes=1 << 20)


def test_bad_input_errors() -> None:
    with pytest.raises(UnknownImage) as ei:
        Sandbox.create(image="ubuntu")
    assert "base" in ei.value.message
    with pytest.raises(InvalidSpec):
        Sandbox.create(memory_mib="lots")
    with pytest.raises(InvalidSpec):
        Sandbox.create(vcpus=0)


def _rundirs() -> set[str]:
    return set(os.listdir(runtime_root()))


def test_kill_leaves_nothing_behind() -> None:
    before = _rundirs()
    sb = Sandbox.create()
    pid = sb.info["qemu_pid"]
    assert _rundirs() - before
    sb.kill()
    sb.kill()  # idempotent
    assert _rundirs() == before
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(SandboxStateError):
        sb.commands.run("true")


def test_qemu_death_is_reported_and_cleaned() -> None:
    before = _rundirs()
    sb = Sandbox.create()
    h = sb.commands.run("sleep 60", background=True)
    os.kill(sb.info["qemu_pid"], signal.SIGKILL)
    with pytest.raises(VmCrashed) as ei:
        h.wait()
    assert "exited unexpectedly" in ei.value.message
    with pytest.raises(VmCrashed):
        sb.commands.run("true")
    deadline = time.monotonic() + 5
    while _rundirs() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _rundirs() == before
    assert not sb.is_running()
    sb.kill()


def test_guest_enforces_frame_cap_before_allocating(sandbox: Any) -> None:
    """A host frame announcing 2 GiB is refused by the agent's decoder at the header."""
    from sandvm import wire

    conn = sandbox._a._conn()
    _portal_call(conn._send(wire.HEADER.pack(wire.MAGIC, wire.DATA, 1, 1 << 31)))
    # the agent drops the bad frame (and whatever arrived with it), then keeps serving
    answered = 0
    for _ in range(3):
        try:
            _portal_call(conn.ping(timeout=2))
            answered += 1
        except AgentTimeout:
            pass
    assert answered >= 2
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


def _portal_call(coro: Any) -> Any:
    from sandvm import _portal

    return _portal.call(coro)


def test_vm_is_confined(sandbox: Any) -> None:
    """QEMU runs with seccomp, no default devices, no NIC; its runtime dir is private."""
    pid = sandbox.info["qemu_pid"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    joined = b" ".join(argv)
    assert b"-nodefaults" in argv and b"-no-user-config" in argv
    sb_opt = argv[argv.index(b"-sandbox") + 1]
    for opt in (b"on", b"spawn=deny", b"elevateprivileges=deny", b"obsolete=deny",
                b"resourcecontrol=deny"):
        assert opt in sb_opt
    assert b"-netdev" not in joined and b"-nic" not in joined and b"virtio-net" not in joined
    assert b"microvm" in argv[argv.index(b"-M") + 1]
    # no huge pages for QEMU: idle clones hold translated code in 4 KiB steps
    with open(f"/proc/{pid}/status") as st:
        assert "THP_enabled:\t0" in st.read()
    rundirs = [p for p in runtime_root().iterdir() if p.name.startswith(sandbox.sandbox_id)]
    assert len(rundirs) == 1
    assert rundirs[0].stat().st_mode & 0o777 == 0o700
    assert {"qmp.sock", "agent.sock"} <= {p.name for p in rundirs[0].iterdir()}
    if sandbox.kind == "cold":
        # guest RAM in a shared file in the private dir (what snapshots are made of)
        assert b"share=on" in joined
        assert (rundirs[0] / "mem").exists()
    else:
        # restored: the snapshot's RAM file mapped copy-on-write, never written
        assert b"share=off" in joined and b"-incoming" in argv
    # and the guest sees no network interface but loopback
    ifaces = sandbox.commands.run("ls /sys/class/net").stdout.split()
    assert ifaces == ["lo"]


def test_sandbox_lifetime_timeout() -> None:
    async def main() -> None:
        sb = await AsyncSandbox.create(timeout=1.0)
        assert await sb.is_running()
        deadline = time.monotonic() + 30  # ended 1 s after its start, once that is noticed
        while await sb.is_running():
            assert time.monotonic() < deadline, "still running 30 s after its 1 s TTL"
            await asyncio.sleep(0.05)
        with pytest.raises(SandboxStateError):
            await sb.commands.run("true")

    asyncio.run(main())


def test_second_boot_refused() -> None:
    from sandvm.core import VmSpec
    from sandvm.errors import InvalidTransition
    from sandvm.providers.qemu import QemuVm

    async def main() -> None:
        from sandvm.assets import find_assets

        vm = QemuVm("twice", VmSpec(), assets=find_assets(), accel="tcg")
        await vm.boot()
        try:
            with pytest.raises(InvalidTransition):
                await vm.boot()
        finally:
            await vm.shutdown()

    asyncio.run(main())


def test_read_stream_sync_and_async(sandbox: Any) -> None:
    data = os.urandom(600_000)
    sandbox.files.write("/tmp/stream.bin", data)
    chunks = list(sandbox.files.read_stream("/tmp/stream.bin"))
    assert len(chunks) > 1 and b"".join(chunks) == data
    with pytest.raises(FileTooLarge):
        for _ in sandbox.files.read_stream("/tmp/stream.bin", max_bytes=1000):
            pass
    # stopping early is fine and leaves the sandbox usable
    for _ in sandbox.files.read_stream("/tmp/stream.bin"):
        break
    assert sandbox.commands.run("echo ok").stdout == "ok\n"


def test_owner_killed_leaves_no_vm_and_dir_is_swept() -> None:
    import subprocess
    import sys

    from sandvm.providers.qemu import sweep_stale_rundirs

    script = ("import sys, time\n"
              "from sandvm import Sandbox\n"
              "sb = Sandbox.create()\n"
              "print(sb.info['qemu_pid'], sb.sandbox_id, flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    qemu_pid_s, sb_id = proc.stdout.readline().split()
    qemu_pid = int(qemu_pid_s)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(qemu_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("QEMU outlived the process that started it")
    leftover = [p for p in runtime_root().iterdir() if p.name.startswith(sb_id.decode())]
    assert leftover  # the RAM file is still there until someone sweeps
    removed = sweep_stale_rundirs()
    assert set(leftover) <= set(removed)
    assert not any(p.exists() for p in leftover)


def _ps(sandbox: Any) -> str:
    return str(sandbox.commands.run("ps -o pid,args").stdout)


def test_cancelled_run_kills_the_command() -> None:
    async def main() -> None:
        async with await AsyncSandbox.create() as sb:
            task = asyncio.ensure_future(sb.commands.run("sleep 77", timeout=None))
            deadline = time.monotonic() + 30
            while "sleep 77" not in (await sb.commands.run("ps -o args")).stdout:
                assert time.monotonic() < deadline  # until it runs
                await asyncio.sleep(0.05)
            task.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 30  # at once, not after its 77 s
            while "sleep 77" in (ps := (await sb.commands.run("ps -o args")).stdout):
                assert time.monotonic() < t0 + 30, ps  # killed, well before its 77 s
                await asyncio.sleep(0.05)

    asyncio.run(main())


def test_grace_kill_reaches_what_the_leader_left(sandbox: Any) -> None:
    h = sandbox.commands.run(
        "(trap '' INT; exec sleep 53) & trap 'exit 0' INT; echo up; "
        "while :; do sleep 0.1; done", background=True)
    deadline = time.monotonic() + 10
    while "up" not in h.stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    h.send_signal("SIGINT", grace=1.0)
    h.wait()  # the leader exits 0 on SIGINT; its child ignores it
    # the grace kill (1 s later) reaches the child: wait for it, well short of its 53 s
    deadline = time.monotonic() + 30
    while "sleep 53" in (ps := _ps(sandbox)):
        assert time.monotonic() < deadline, ps
        time.sleep(0.1)


def test_list_large_directory(sandbox: Any) -> None:
    sandbox.commands.run("mkdir -p /tmp/many && cd /tmp/many && "
                         "for i in $(seq 1 2500); do : > file-with-a-long-name-$i; done")
    entries = sandbox.files.list("/tmp/many")
    assert len(entries) == 2500
    assert entries == sorted(entries, key=lambda e: e.name)
    sandbox.files.remove("/tmp/many")


def test_agent_restart_is_survivable() -> None:
    from sandvm import AgentError

    with Sandbox.create() as sb:
        with pytest.raises(AgentError):
            # the agent is the only child of init (PID 1)
            sb.commands.run("kill -9 $(cat /proc/1/task/1/children); sleep 5")
        deadline = time.monotonic() + 20
        while True:
            try:
                assert sb.commands.run("echo back").stdout == "back\n"
                break
            except AgentError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_oversized_command_is_refused(sandbox: Any) -> None:
    with pytest.raises(InvalidSpec, match=r"files\.write"):
        sandbox.commands.run("echo " + "x" * 300_000)
    assert sandbox.commands.run("echo fine").stdout == "fine\n"


def test_workloads_have_limits_the_agent_does_not(sandbox: Any) -> None:
    """The agent is exempt from the OOM killer and its commands are not (the score is
    inherited); each command's cgroup caps its tasks, and all commands together stay
    below the guest's memory and task limits, so the agent keeps room to answer."""
    out = sandbox.commands.run(
        "cat /proc/self/oom_score_adj /proc/$PPID/oom_score_adj"
        " /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/pids.max /sys/fs/cgroup/sandvm/pids.max"
        " /proc/sys/kernel/threads-max /sys/fs/cgroup/sandvm/memory.max"
        " && grep MemTotal /proc/meminfo").stdout.split()
    # the shell's parent is the agent (commands are spawned by it directly)
    mine, agents, cmd_pids, all_pids, threads_max, mem_max = (int(x) for x in out[:6])
    assert (mine, agents, cmd_pids) == (0, -1000, 4096), out
    assert all_pids < threads_max, out
    assert mem_max < int(out[7]) * 1024 - 24 * 1024 * 1024, out  # below MemTotal - reserve


def test_the_agent_survives_a_workload_that_eats_all_memory(base_snapshot: Any,
                                                            snapshot_store: Any) -> None:
    """A workload that takes all the guest's memory is ended by the guest's OOM killer,
    and the agent lives on: it answers the next command."""
    sb = Sandbox.from_snapshot(base_snapshot, store=snapshot_store)
    try:
        hog = "python3 -c 'x = []\nwhile True: x.append(b\"x\" * (1 << 20))'"
        r = sb.commands.run(hog, check=False, timeout=300)
        assert r.exit_code != 0 and not r.timed_out, r  # the OOM killer ended it
        assert sb.commands.run("echo alive", timeout=60).stdout == "alive\n"
    finally:
        sb.kill()


def test_the_agent_survives_a_fork_bomb(base_snapshot: Any, snapshot_store: Any) -> None:
    """A fork bomb is ended by its command's timeout (its cgroup is killed) and the
    agent lives on: it answers the next command, and nothing of the bomb is left."""
    sb = Sandbox.from_snapshot(base_snapshot, store=snapshot_store)
    try:
        with pytest.raises(CommandTimeout):
            sb.commands.run("b() { b | b & }; b; sleep 600", timeout=10)
        assert sb.commands.run("echo alive", timeout=60).stdout == "alive\n"
        # nothing of the bomb is left: only init, the agent and kernel threads
        deadline = time.monotonic() + 60
        while len(users := [ln for ln in _ps(sb).splitlines()[1:]
                            if "[" not in ln and "ps -o" not in ln]) > 2:
            assert time.monotonic() < deadline, users
            time.sleep(0.2)
    finally:
        sb.kill()
