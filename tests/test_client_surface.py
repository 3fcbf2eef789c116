"""The remote SDK's share of the local surface, through `sandvm serve` and the real client:
file entries, directory trees (hostile ones too), streamed writes, chown and tmpfs,
pause/resume, ping, info, command stats and raw output, pause to disk.

The server and alice's sandbox are this module's own (the fixtures of test_server: one
boot); the sandbox paused to disk is a fork of it (restored, not booted).
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from sandvm import (
    CommandExitError,
    CommandTimeout,
    FileTooLarge,
    GuestError,
    GuestFileNotFound,
    InvalidPath,
    InvalidSpec,
    RequestTooLarge,
    SandboxStateError,
)
from sandvm.client import AsyncSandbox, Sandbox
from test_server import UPLOAD_CAP, ServerProc, _auth, alice_sb, server  # noqa: F401

pytestmark = pytest.mark.qemu


def test_file_entries(alice_sb: Sandbox) -> None:  # noqa: F811
    fs = alice_sb.files
    assert fs.make_dir("/root/ent/sub", mode=0o750) is True
    assert fs.make_dir("/root/ent/sub") is False  # it existed
    fs.write("/root/ent/a.txt", "hello")
    assert fs.exists("/root/ent/a.txt") and not fs.exists("/root/ent/none")
    st = fs.stat("/root/ent/a.txt")
    assert (st.name, st.type, st.size, st.path) == ("a.txt", "file", 5, "/root/ent/a.txt")
    assert fs.stat("/root/ent/sub").mode == 0o750
    assert [(e.name, e.type) for e in fs.list("/root/ent")] == [("a.txt", "file"),
                                                                ("sub", "dir")]
    assert len(fs.list("/root/ent", depth=2)) == 2
    moved = fs.rename("/root/ent/a.txt", "/root/ent/sub/b.txt")
    assert (moved.path, moved.size) == ("/root/ent/sub/b.txt", 5)
    fs.write("/root/ent/c.txt", "c")
    with pytest.raises(GuestError):  # as locally: the destination exists
        fs.rename("/root/ent/c.txt", "/root/ent/sub/b.txt", overwrite=False)
    with pytest.raises(GuestError):  # not empty, not recursive
        fs.remove("/root/ent/sub", recursive=False)
    fs.remove("/root/ent")
    assert not fs.exists("/root/ent")
    with pytest.raises(GuestFileNotFound):
        fs.stat("/root/ent")
    with pytest.raises(GuestFileNotFound):
        fs.list("/root/ent")
    with pytest.raises(InvalidPath):
        fs.stat("relative")
    with pytest.raises(InvalidPath):
        fs.make_dir("relative/dir")


def test_tree_round_trip(alice_sb: Sandbox, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a" / "b" / "deep.txt").write_text("deep")
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(src / "run.sh", 0o755)
    (src / "blob").write_bytes(os.urandom(300_000))
    os.symlink("a/b/deep.txt", src / "link")
    os.mkfifo(src / "fifo")
    up = alice_sb.files.upload_dir(src, "/root/tree")
    assert (up.files, up.dirs, up.symlinks) == (3, 3, 1)
    assert up.skipped == ("fifo: a special file",)  # named by the client, as locally
    r = alice_sb.commands.run("cd /root/tree && ./run.sh && cat link")
    assert r.stdout == "ran\ndeep"
    down = alice_sb.files.download_dir("/root/tree", tmp_path / "back")
    back = tmp_path / "back"
    assert (down.files, down.dirs, down.symlinks, down.skipped) == (3, 3, 1, ())
    assert (back / "blob").read_bytes() == (src / "blob").read_bytes()
    assert os.readlink(back / "link") == "a/b/deep.txt" and (back / "empty").is_dir()
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o755
    with pytest.raises(FileTooLarge, match="more than 3 entries"):
        alice_sb.files.download_dir("/root/tree", tmp_path / "few", max_files=3)
    with pytest.raises(FileTooLarge):
        alice_sb.files.download_dir("/root/tree", tmp_path / "small", max_bytes=1000)
    with pytest.raises(GuestFileNotFound):
        alice_sb.files.download_dir("/root/no-tree", tmp_path / "none")
    with pytest.raises(InvalidPath):
        alice_sb.files.upload_dir(tmp_path / "no-such-dir", "/root/x")


def test_hostile_guest_tree_writes_nothing_outside(alice_sb: Sandbox,  # noqa: F811
                                                   tmp_path: Path) -> None:
    alice_sb.commands.run(
        "mkdir -p /root/evil/sub && cd /root/evil && ln -s /etc etc && ln -s ../../.. up"
        " && ln -s p/.. l && ln -s . p && mkfifo fifo && echo ok > sub/ok"
        " && printf x > suid && chmod 4755 suid")
    cage = tmp_path / "cage"
    res = alice_sb.files.download_dir("/root/evil", cage / "dest")
    dest = cage / "dest"
    assert os.listdir(cage) == ["dest"]
    assert sorted(os.listdir(dest)) == ["p", "sub", "suid"]
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    for p in dest.rglob("*"):
        assert os.path.realpath(p).startswith(str(dest.resolve()))
    assert {s.split(":")[0] for s in res.skipped} == {"etc", "up", "l", "fifo"}


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            ti.size = len(data) if ti.isreg() else 0
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, link, 0o644
    return ti


def test_hostile_tar_upload_stays_inside_and_is_capped(server: ServerProc,  # noqa: F811
                                                       alice_sb: Sandbox) -> None:  # noqa: F811
    url = f"{server.url}/v1/sandboxes/{alice_sb.sandbox_id}/files/tree"
    data = _tar([(_member("../escape.txt"), b"out"),
                 (_member("out", tarfile.SYMTYPE, "/etc"), b""),
                 (_member("ok.txt"), b"fine")])
    r = httpx.put(url, params={"path": "/root/up"}, content=data,
                  headers={**_auth(server.alice), "Content-Type": "application/x-tar"})
    assert r.status_code == 200, r.text
    assert alice_sb.files.read("/root/up/ok.txt") == "fine"
    assert not alice_sb.files.exists("/root/escape.txt")
    assert not alice_sb.files.exists("/root/up/out")
    assert len(r.json()["skipped"]) == 2

    def body() -> object:  # chunked, over the server's upload cap
        for _ in range(UPLOAD_CAP // (1 << 20) + 1):
            yield b"\0" * (1 << 20)

    r = httpx.put(url, params={"path": "/root/big"}, content=body(),  # type: ignore[arg-type]
                  headers=_auth(server.alice))
    assert r.status_code == 413 and r.json()["code"] == "request_too_large"
    big = Path(server.tmp) / "big"
    big.mkdir()
    (big / "f").write_bytes(b"x" * (UPLOAD_CAP + 1))
    with pytest.raises(RequestTooLarge):
        alice_sb.files.upload_dir(big, "/root/big")


def test_write_stream_chown_and_tmpfs(server: ServerProc,  # noqa: F811
                                      alice_sb: Sandbox) -> None:  # noqa: F811
    async def go() -> None:
        sb = await AsyncSandbox.connect(alice_sb.sandbox_id, api_key=server.alice,
                                        url=server.url)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"part{i};".encode()

        info = await sb.files.write_stream("/root/streamed", chunks(), mode=0o600)
        assert info.size == len("part0;part1;part2;")
        assert await sb.files.read("/root/streamed") == "part0;part1;part2;"

        async def broken() -> AsyncIterator[bytes]:
            yield b"half"
            raise InvalidSpec("the source broke")

        with pytest.raises(InvalidSpec, match="the source broke"):
            await sb.files.write_stream("/root/never", broken())
        assert not await sb.files.exists("/root/never")
        await sb.files.chown("/root/streamed", user="65534:65534", mode=0o640)
        st = await sb.files.stat("/root/streamed")
        assert (st.uid, st.gid, st.mode) == (65534, 65534, 0o640)
        await sb.files.mount_tmpfs("/root/secret", mode=0o700, size_bytes=1 << 20)
        r = await sb.commands.run("grep ' /root/secret tmpfs ' /proc/mounts")
        assert "nosuid" in r.stdout
        await sb.close()

    asyncio.run(go())


def test_pause_resume_ping_info_stats(alice_sb: Sandbox) -> None:  # noqa: F811
    assert 0 < alice_sb.ping() < 30
    info = alice_sb.info
    assert set(info) == {"sandbox_id", "accelerator", "image", "boot_seconds", "qemu_pid",
                         "memory_mib", "vcpus", "guest_kernel", "agent_version", "volumes"}
    assert info["sandbox_id"] == alice_sb.sandbox_id and info["accelerator"] in ("kvm", "tcg")
    assert info["memory_mib"] == 256 and info["qemu_pid"] is None
    alice_sb.get_info()  # refreshes it; the facts stay
    assert alice_sb.info["accelerator"] == info["accelerator"]
    got: list[tuple[int, bytes]] = []
    h = alice_sb.commands.start("echo out; echo err >&2; sleep 30", timeout=60,
                                on_output=lambda ch, data: got.append((ch, data)))
    assert h.pid is not None
    st = alice_sb.commands.stats(h.pid)
    assert st.running and st.processes >= 1
    alice_sb.pause()
    try:
        with pytest.raises(CommandTimeout):  # the guest stands still
            alice_sb.commands.run("true", timeout=1)
    finally:
        alice_sb.resume()
    assert alice_sb.commands.run("echo back").stdout == "back\n"
    h.kill()
    with pytest.raises(CommandExitError):  # killed: check=True raises
        h.wait()
    assert (1, b"out\n") in got and (2, b"err\n") in got and h.stdout == ""


def test_pause_to_disk_and_resume_from(server: ServerProc,  # noqa: F811
                                       alice_sb: Sandbox) -> None:  # noqa: F811
    (copy,) = alice_sb.fork(1)
    copy.files.write("/root/kept", "kept across a pause")
    snap = copy.pause(to_disk=True)
    assert snap is not None and snap.name == f"paused-{copy.sandbox_id}"
    with pytest.raises(SandboxStateError):
        copy.commands.run("true")
    back = Sandbox.resume_from(snap, api_key=server.alice, url=server.url)
    try:
        assert back.files.read("/root/kept") == "kept across a pause"
    finally:
        back.kill()
    r = httpx.get(f"{server.url}/v1/snapshots/{snap.name}", headers=_auth(server.alice))
    assert r.status_code == 404  # its snapshot was removed once restored
