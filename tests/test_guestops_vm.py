"""The guest operations that became public (files.chown, files.mount_tmpfs,
commands.stats) on a real VM, sync API, cold-booted and restored."""

from __future__ import annotations

import secrets
import time

import pytest

from sandvm import Sandbox
from sandvm.errors import CommandExitError, GuestError, GuestFileNotFound, InvalidPath, InvalidSpec

pytestmark = pytest.mark.qemu


def test_mount_tmpfs_then_chown_a_file_in_it(sandbox: Sandbox) -> None:
    d = f"/run/t-{secrets.token_hex(4)}"
    sandbox.files.mount_tmpfs(d, mode=0o750, user="65534:65534", size_bytes=1 << 20)
    mounts = sandbox.commands.run(f"grep ' {d} ' /proc/mounts").stdout
    assert "tmpfs" in mounts and "nosuid" in mounts and "noexec" in mounts, mounts
    top = sandbox.files.stat(d)
    assert (top.type, top.mode, top.uid, top.gid) == ("dir", 0o750, 65534, 65534)
    sandbox.files.mount_tmpfs(d, mode=0o700)  # already a tmpfs: its mode changes...
    assert (sandbox.files.stat(d).mode, sandbox.files.stat(d).uid) == (0o700, 65534)
    sandbox.files.mount_tmpfs(d, mode=0o700, user="0")  # ...and its owner if given
    assert sandbox.files.stat(d).uid == 0
    sandbox.files.write(f"{d}/k", "v", mode=0o644)
    sandbox.files.chown(f"{d}/k", user="1000:1001", mode=0o400)
    e = sandbox.files.stat(f"{d}/k")
    assert (e.mode, e.uid, e.gid) == (0o400, 1000, 1001)
    sandbox.files.chown(f"{d}/k", user="0")  # mode left as it is
    assert (sandbox.files.stat(f"{d}/k").uid, sandbox.files.stat(f"{d}/k").mode) == (0, 0o400)


def test_chown_and_mount_tmpfs_refuse_bad_requests(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidPath):
        sandbox.files.chown("relative", user="0")
    with pytest.raises(InvalidSpec):
        sandbox.files.chown("/tmp", user="")
    with pytest.raises(InvalidSpec):
        sandbox.files.chown("/tmp", user="0", mode=0o17777)
    with pytest.raises(InvalidSpec):
        sandbox.files.mount_tmpfs("/run/x", size_bytes=10)
    with pytest.raises(InvalidSpec):
        sandbox.files.mount_tmpfs("/run/x", mode=0o1777)
    with pytest.raises(GuestFileNotFound):
        sandbox.files.chown(f"/no/such/{secrets.token_hex(4)}", user="0")
    with pytest.raises(GuestError, match="passwd"):
        sandbox.files.chown("/tmp", user="no-such-user")
    sandbox.files.write("/tmp/chown-target", "x")
    sandbox.commands.run("ln -sf /tmp/chown-target /tmp/chown-link")
    with pytest.raises(GuestError, match="symbolic link"):
        sandbox.files.chown("/tmp/chown-link", user="0")


def test_stats_of_a_running_command_then_of_an_ended_one(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 30 & sleep 30 & wait", background=True)
    assert h.pid is not None
    try:
        deadline = time.monotonic() + 20
        st = sandbox.commands.stats(h.pid)
        while st.processes < 3 and time.monotonic() < deadline:  # both children started
            st = sandbox.commands.stats(h.pid)
        assert st.running and st.processes >= 3 and st.memory_bytes > 0, st
    finally:
        h.kill()
    with pytest.raises(CommandExitError):  # killed
        h.wait()
    st = sandbox.commands.stats(h.pid)
    assert (st.running, st.cpu_usec, st.memory_bytes, st.processes) == (False, 0, 0, 0)
    with pytest.raises(InvalidSpec):
        sandbox.commands.stats(0)
