"""Volumes (store, locks, mounts in base and image sandboxes, CLI) and directory transfers.

The store and lock tests and the hostile-tar tests need no VM; the rest share a
few sandboxes (each boot costs seconds under TCG).
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oci_build import SPARSE_FLAVOURS, build_layout, heap_peak, pax_comment_tar, sparse_tar
from sandvm import Sandbox
from sandvm.errors import (
    AgentProtocolError,
    CommandExitError,
    FileTooLarge,
    InvalidPath,
    InvalidSpec,
    SandboxStateError,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)
from sandvm.tartree import _TreeExtractor
from sandvm.volumes import VolumeMount, VolumeStore, parse_mounts
from test_images_vm import tiny_layers

SANDVM = str(Path(sys.executable).parent / "sandvm")


@pytest.fixture
def store(tmp_path: Path) -> VolumeStore:
    return VolumeStore(tmp_path / "volumes")


# --------------------------------------------------------------------------- store, no VM


def test_create_ls_inspect_rm(store: VolumeStore) -> None:
    t0 = time.time()
    v = store.create("data", size="64M")
    assert (v.name, v.size) == ("data", 64 << 20) and v.created >= t0 - 1
    store.create("ref.v1", size=32 << 20)
    assert [x.name for x in store.ls()] == ["data", "ref.v1"]
    info = store.inspect("data")
    assert info.volume == v and info.attachments == () and not info.in_use
    assert 0 < info.disk_bytes < 8 << 20  # sparse: the ext4 metadata only
    out = subprocess.run(["dumpe2fs", "-h", str(v.path)], capture_output=True, text=True)
    assert "Filesystem volume name:   data" in out.stdout
    with pytest.raises(VolumeExists, match="already exists"):
        store.create("data", size="64M")
    store.rm("data")
    assert [x.name for x in store.ls()] == ["ref.v1"]
    with pytest.raises(VolumeNotFound, match=r"no volume named 'data' \(the volumes are: ref.v1"):
        store.get("data")
    with pytest.raises(VolumeNotFound):
        store.rm("data")
    # nothing half-made is left behind
    assert sorted(p.name for p in store.root.iterdir()) == ["ref.v1"]


@pytest.mark.parametrize("name", ["", "Data", "-x", ".x", "a/b", "a b", "x" * 64, "ä"])
def test_bad_names_refused(store: VolumeStore, name: str) -> None:
    with pytest.raises(InvalidSpec, match="invalid volume name"):
        store.create(name, size="64M")


@pytest.mark.parametrize("size", ["1K", "0", "abc", "-5", "100T", True])
def test_bad_sizes_refused(store: VolumeStore, size: Any) -> None:
    with pytest.raises(InvalidSpec):
        store.create("data", size=size)
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_one_writer_at_a_time(store: VolumeStore) -> None:
    store.create("data", size="32M")
    rw = store.attach("data", sandbox_id="sb-first")
    with pytest.raises(VolumeInUse, match=r"sb-first \(read-write, pid \d+\).*only one sandbox"):
        store.attach("data", sandbox_id="sb-second")
    with pytest.raises(VolumeInUse, match="sb-first"):
        store.attach("data", sandbox_id="sb-reader", read_only=True)
    with pytest.raises(VolumeInUse, match="kill the sandbox first"):
        store.rm("data")
    info = store.inspect("data")
    assert [(a.sandbox_id, a.read_only, a.pid) for a in info.attachments] == [
        ("sb-first", False, os.getpid())]
    rw.release()
    rw.release()  # idempotent
    readers = [store.attach("data", sandbox_id=f"sb-r{i}", read_only=True) for i in range(2)]
    with pytest.raises(VolumeInUse, match=r"sb-r0 \(read-only.*sb-r1 \(read-only"):
        store.attach("data", sandbox_id="sb-writer")
    assert len(store.inspect("data").attachments) == 2
    for r in readers:
        r.release()
    store.attach("data", sandbox_id="sb-writer").release()
    store.rm("data")


def test_lock_dies_with_its_process(store: VolumeStore) -> None:
    store.create("data", size="32M")
    code = ("import sys, time; from pathlib import Path; from sandvm.volumes import VolumeStore;"
            f"VolumeStore(Path({str(store.root)!r})).attach('data', sandbox_id='sb-other');"
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        with pytest.raises(VolumeInUse, match=rf"sb-other \(read-write, pid {proc.pid}\)"):
            store.attach("data", sandbox_id="sb-mine")
    finally:
        proc.kill()
        proc.wait()
    store.attach("data", sandbox_id="sb-mine").release()
    assert store.inspect("data").attachments == ()  # the dead holder's record is gone


def test_mount_specs() -> None:
    mounts = parse_mounts({"b": "/data/sub", "a": ("/data", "ro"),
                           "c": VolumeMount("/mnt/c", read_only=True)}, builtin_image=True)
    # parents are mounted before what lies inside them
    assert mounts == [("a", VolumeMount("/data", True)), ("b", VolumeMount("/data/sub", False)),
                      ("c", VolumeMount("/mnt/c", True))]
    assert parse_mounts({"a": "/usr/local/data"}, builtin_image=False)
    assert parse_mounts(None, builtin_image=True) == []
    bad: list[tuple[Any, type[Exception], str]] = [
        ({"a": "data"}, InvalidPath, "not absolute"),
        ({"a": "/"}, InvalidPath, "path of its own"),
        ({"a": "/proc/x"}, InvalidPath, "path of its own"),
        ({"a": "/usr/local/data"}, InvalidPath, "agent runs from it"),
        ({"a": "/data/../etc"}, InvalidPath, "not normalized"),
        ({"a": "/data", "b": "/data"}, InvalidPath, "both mounted at /data"),
        ({"a": ("/data", "rx")}, InvalidSpec, "tuple"),
        ({"Bad": "/data"}, InvalidSpec, "invalid volume name"),
        (["a"], InvalidSpec, "must map"),
    ]
    for spec, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            parse_mounts(spec, builtin_image=True)


# --------------------------------------------------------------------------- hostile tars, no VM


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            ti.size = len(data) if ti.isreg() else 0
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
           mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, link, mode
    return ti


def _extract(tmp_path: Path, data: bytes, **caps: int) -> tuple[_TreeExtractor, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "stream.tar"
    src.write_bytes(data)
    dest = tmp_path / "cage" / "dest"
    dest.mkdir(parents=True)
    ex = _TreeExtractor(dest, max_bytes=caps.get("max_bytes", 1 << 20),
                        max_files=caps.get("max_files", 100))
    ex.run(os.open(src, os.O_RDONLY))
    return ex, dest


def test_hostile_tar_stays_inside(tmp_path: Path) -> None:
    data = _tar([
        (_entry("../escape.txt"), b"out"),
        (_entry("/abs.txt"), b"abs"),  # a leading / is stripped: lands inside
        (_entry("etc", tarfile.SYMTYPE, "/etc"), b""),
        (_entry("etc/pwned"), b"x"),  # etc is no symlink now: an ordinary dir
        (_entry("l", tarfile.SYMTYPE, "p/.."), b""),  # harmless... until p -> "."
        (_entry("p", tarfile.SYMTYPE, "."), b""),
        (_entry("dir", tarfile.DIRTYPE, mode=0o755), b""),
        (_entry("d", tarfile.SYMTYPE, "dir"), b""),
        (_entry("d/through"), b"x"),  # d is not yet a symlink: a dir; d is then refused
        (_entry("up", tarfile.SYMTYPE, "dir/../.."), b""),
        (_entry("h", tarfile.LNKTYPE, "../../etc/passwd"), b""),
        (_entry("h2", tarfile.LNKTYPE, "d/x"), b""),
        (_entry("dev", tarfile.CHRTYPE), b""),
        (_entry("fifo", tarfile.FIFOTYPE), b""),
        (_entry("suid", mode=0o4777), b"#!/bin/sh\n"),
        (_entry("dir/ok"), b"fine"),
    ])
    ex, dest = _extract(tmp_path, data)
    assert sorted(os.listdir(tmp_path / "cage")) == ["dest"]
    assert sorted(os.listdir(dest)) == ["abs.txt", "d", "dir", "etc", "p", "suid"]
    assert (dest / "etc").is_dir() and not (dest / "etc").is_symlink()
    assert (dest / "dir" / "ok").read_text() == "fine"
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    for p in dest.rglob("*"):
        assert os.path.realpath(p).startswith(str(dest.resolve())), p
    reasons = "\n".join(ex.skipped)
    for name in ("../escape.txt", "d: a symlink over a directory", "up", "h:", "h2", "dev",
                 "fifo"):
        assert name in reasons
    assert (dest / "d" / "through").read_text() == "x" and not (dest / "d").is_symlink()
    assert "l: a symlink leading outside" in reasons  # removed once p made it escape
    r = ex.result(["guest-side: special"])
    assert (r.files, r.symlinks) == (5, 1) and r.skipped[-1] == "guest-side: special"


def test_tar_caps(tmp_path: Path) -> None:
    many = _tar([(_entry(f"f{i}"), b"") for i in range(11)])
    with pytest.raises(FileTooLarge, match="more than 10 entries"):
        _extract(tmp_path / "a", many, max_files=10)
    big = _tar([(_entry("big"), b"x" * 100)])
    with pytest.raises(FileTooLarge, match="more than 50 bytes"):
        _extract(tmp_path / "b", big, max_bytes=50)


@pytest.mark.parametrize("flavour", SPARSE_FLAVOURS)
def test_guest_archive_with_sparse_members_is_refused(tmp_path: Path, flavour: str) -> None:
    # download_dir reads a tar the guest writes: its sparse maps and huge extended
    # headers are refused before tarfile reads them, as for image layers
    for name, data in (("sparse", sparse_tar(flavour, 20_000)),
                       ("comment", pax_comment_tar(32 << 20))):
        with heap_peak() as peak, pytest.raises(AgentProtocolError, match="bad archive"):
            _extract(tmp_path / name, data)
        assert peak[0] < 8 << 20, name


# --------------------------------------------------------------------------- in VMs


@pytest.fixture(scope="module")
def vstore(tmp_path_factory: pytest.TempPathFactory) -> VolumeStore:
    s = VolumeStore(tmp_path_factory.mktemp("vols"))
    s.create("data", size="64M")
    s.create("scratch", size="32M")
    return s


@pytest.fixture(scope="module")
def writer(vstore: VolumeStore) -> Iterator[Sandbox]:
    """A base sandbox with ``data`` read-write at /data."""
    sb = Sandbox.create(volumes={"data": "/data"}, volume_store=vstore)
    yield sb
    sb.kill()


@pytest.mark.qemu
def test_volume_is_refused_while_written_then_survives(vstore: VolumeStore,
                                                       writer: Sandbox) -> None:
    writer.commands.run("echo persisted > /data/f; mkdir -p /data/dir; sync")
    assert writer.info["volumes"] == {"data": {"path": "/data", "read_only": False}}
    rid = writer.sandbox_id
    # refused before booting anything
    with pytest.raises(VolumeInUse, match=rf"{rid} \(read-write"):
        Sandbox.create(volumes={"data": "/data"}, volume_store=vstore)
    with pytest.raises(VolumeInUse, match=rid):
        Sandbox.create(volumes={"data": ("/data", "ro")}, volume_store=vstore)
    with pytest.raises(VolumeInUse, match=rid):
        vstore.rm("data")
    with pytest.raises(VolumeNotFound, match="sandvm volume create nope"):
        Sandbox.create(volumes={"nope": "/x"}, volume_store=vstore)
    with pytest.raises(InvalidPath, match="agent runs from it"):
        Sandbox.create(volumes={"data": "/usr/data"}, volume_store=vstore)
    assert [a.sandbox_id for a in vstore.inspect("data").attachments] == [rid]
    with pytest.raises(SandboxStateError, match="volumes are not part of snapshots"):
        writer.snapshot("with-volume")
    with pytest.raises(SandboxStateError, match="volumes are not part of snapshots"):
        writer.fork(1)


@pytest.mark.qemu
def test_upload_and_download_round_trip(writer: Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a" / "b" / "c" / "deep.txt").write_text("deep")
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(src / "run.sh", 0o755)
    (src / "secret").write_bytes(os.urandom(300_000))
    os.chmod(src / "secret", 0o600)
    os.symlink("a/b/c/deep.txt", src / "link")
    os.link(src / "run.sh", src / "hard")
    os.mkfifo(src / "fifo")
    up = writer.files.upload_dir(src, "/data/tree")
    assert (up.files, up.dirs, up.symlinks) == (4, 4, 1)
    assert up.bytes == 300_000 + 4 + len("#!/bin/sh\necho ran\n")  # a hard link: no data
    assert up.skipped == ("fifo: a special file",)
    r = writer.commands.run("cd /data/tree && ./run.sh && cat link && stat -c '%a %h' secret hard")
    assert r.stdout == "ran\ndeep600 1\n755 2\n"
    down = writer.files.download_dir("/data/tree", tmp_path / "back")
    back = tmp_path / "back"
    assert (down.files, down.dirs, down.symlinks, down.skipped) == (4, 4, 1, ())
    assert (back / "secret").read_bytes() == (src / "secret").read_bytes()
    assert os.readlink(back / "link") == "a/b/c/deep.txt"
    assert (back / "link").read_text() == "deep" and (back / "empty").is_dir()
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((back / "secret").stat().st_mode) == 0o600
    assert (back / "hard").stat().st_ino == (back / "run.sh").stat().st_ino
    with pytest.raises(FileTooLarge, match="more than 3 entries"):
        writer.files.download_dir("/data/tree", tmp_path / "few", max_files=3)
    with pytest.raises(FileTooLarge, match="max_bytes"):
        writer.files.download_dir("/data/tree", tmp_path / "small", max_bytes=1000)


@pytest.mark.qemu
def test_download_of_a_hostile_tree_writes_nothing_outside(writer: Sandbox,
                                                           tmp_path: Path) -> None:
    writer.commands.run(
        "mkdir -p /data/evil/sub && cd /data/evil && ln -s /etc etc && ln -s ../../.. up"
        " && ln -s p/.. l && ln -s . p && mkfifo fifo && echo ok > sub/ok"
        " && printf x > suid && chmod 4755 suid")
    cage = tmp_path / "cage"
    res = writer.files.download_dir("/data/evil", cage / "dest")
    dest = cage / "dest"
    assert os.listdir(cage) == ["dest"]
    assert sorted(os.listdir(dest)) == ["p", "sub", "suid"]
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    for p in dest.rglob("*"):
        assert os.path.realpath(p).startswith(str(dest.resolve()))
    assert {s.split(":")[0] for s in res.skipped} == {"etc", "up", "l", "fifo"}


@pytest.mark.qemu
def test_volume_in_an_image_sandbox(vstore: VolumeStore, writer: Sandbox,
                                    tmp_path: Path) -> None:
    writer.commands.run("echo unsynced > /data/late")  # kill() syncs it to the volume
    writer.kill()  # its volume is free again once its QEMU is gone
    assert vstore.inspect("data").attachments == ()
    layout = tmp_path / "layout"
    build_layout(layout, tiny_layers("volumes"), config={"Env": ["PATH=/bin"]})
    sb = Sandbox.create(image=f"oci:{layout}:latest", disk_size="64M", volume_store=vstore,
                        volumes={"data": ("/mnt/data", "ro"), "scratch": "/scratch"})
    try:
        # the mount points were created in the image's root
        assert sb.commands.run("cat /mnt/data/late").stdout == "unsynced\n"
        df = sb.commands.run("df -k /mnt/data /scratch").stdout.splitlines()[1:]
        assert [line.split()[-1] for line in df] == ["/mnt/data", "/scratch"]
        with pytest.raises(CommandExitError, match="Read-only file system"):
            sb.commands.run("touch /mnt/data/new")
        sb.files.write("/scratch/from-api", "api")
        assert sb.commands.run("cat /scratch/from-api").stdout == "api"
        up = sb.files.upload_dir(tmp_path / "layout", "/scratch/layout")
        assert up.files >= 3 and sb.files.exists("/scratch/layout/index.json")
        # readers may share it, a writer may not join them
        vstore.attach("data", sandbox_id="sb-reader", read_only=True).release()
        with pytest.raises(VolumeInUse, match=rf"{sb.sandbox_id} \(read-only"):
            vstore.attach("data", sandbox_id="sb-writer")
        # QEMU dying releases the locks (not only kill())
        os.kill(sb.info["qemu_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while vstore.inspect("scratch").attachments and time.monotonic() < deadline:
            time.sleep(0.05)
        vstore.attach("data", sandbox_id="sb-writer").release()
        vstore.attach("scratch", sandbox_id="sb-writer").release()
    finally:
        sb.kill()


@pytest.mark.qemu
def test_cli_volume_commands_and_run(tmp_path: Path) -> None:
    env = {**os.environ, "SANDVM_VOLUME_STORE": str(tmp_path / "vols")}

    def sandvm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SANDVM, *args], capture_output=True, text=True, env=env,
                              timeout=240, check=False)

    r = sandvm("volume", "create", "clidata", "--size", "32M")
    assert (r.returncode, r.stdout) == (0, "clidata (32.0 MiB)\n"), r.stderr
    r = sandvm("volume", "create", "Bad", "--size", "32M")
    assert r.returncode == 2 and "invalid volume name" in r.stderr
    r = sandvm("run", "--volume", "clidata:/data", "--", "sh", "-c", "echo x > /data/f")
    assert r.returncode == 0, r.stderr
    r = sandvm("run", "--volume", "clidata:/data:ro", "--", "sh", "-c",
               "cat /data/f; touch /data/g")
    assert r.stdout == "x\n" and r.returncode == 1 and "Read-only" in r.stderr
    r = sandvm("run", "--volume", "nope:/data", "--", "true")
    assert r.returncode == 2 and "volume_not_found" in r.stderr
    r = sandvm("run", "--volume", "clidata", "--", "true")
    assert r.returncode == 2 and "NAME:PATH" in r.stderr
    r = sandvm("volume", "ls")
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[0] == "clidata"
    r = sandvm("volume", "ls", "--json")
    assert [v["name"] for v in json.loads(r.stdout)] == ["clidata"]
    r = sandvm("volume", "inspect", "clidata")
    info = json.loads(r.stdout)
    assert info["size"] == 32 << 20 and info["attachments"] == [] and info["disk_bytes"] > 0
    r = sandvm("volume", "rm", "clidata", "nope")
    assert r.returncode == 1 and "removed clidata" in r.stdout and "nope" in r.stderr


def test_links_are_made_last_so_a_broken_stream_leaves_none(tmp_path: Path) -> None:
    """A tar that plants a link which only escapes once later links exist, then breaks
    off (here: the entry cap), leaves no symlink at all."""
    data = _tar([(_entry("x", tarfile.DIRTYPE, mode=0o755), b""),
                 (_entry("x/esc", tarfile.SYMTYPE, "d/../d/../.."), b""),
                 (_entry("x/d", tarfile.SYMTYPE, "."), b""),
                 (_entry("d", tarfile.SYMTYPE, "."), b""),
                 *[(_entry(f"f{i}"), b"") for i in range(20)]])
    with pytest.raises(FileTooLarge):
        _extract(tmp_path, data, max_files=10)
    assert not [p for p in (tmp_path / "cage").rglob("*") if p.is_symlink()]
