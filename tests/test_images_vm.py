"""OCI images running as VMs: root disk, image config, disk limits, snapshots with disks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from oci_build import Dir, File, Symlink, build_docker_archive, build_layout
from sandvm import Sandbox
from sandvm.assets import sandvm_home
from sandvm.errors import InvalidSpec, SandvmError, SnapshotCorrupt, UnknownImage
from sandvm.images.store import ImageStore
from sandvm.snapshots import SnapshotStore

pytestmark = pytest.mark.qemu

APPLETS = ("sh", "ls", "cat", "id", "echo", "env", "pwd", "dd", "df", "rm", "sync", "touch",
           "mkdir", "stat", "head")


def busybox_bytes() -> bytes:
    """The static busybox from the Debian package `sandvm setup` downloaded."""
    debs = sorted((sandvm_home() / "debs").glob("busybox-static_*.deb"))
    if not debs:
        pytest.fail("no busybox-static package in the cache: run `make setup`")
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True,
                         check=True).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(out)) as t:
        f = t.extractfile("./bin/busybox")
        assert f is not None
        return f.read()


def tiny_layers(marker: str) -> list[list[Any]]:
    """Two layers: busybox and users, then an app dir owned by alice and a whiteout."""
    base = [Dir("bin"), File("bin/busybox", busybox_bytes(), mode=0o755),
            *[Symlink(f"bin/{a}", "busybox") for a in APPLETS],
            Dir("etc"),
            File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                               b"alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"),
            File("etc/group", b"root:x:0:\nalice:x:1000:\n"),
            Dir("home"), Dir("home/alice", uid=1000, gid=1000), Dir("root", mode=0o700),
            File("etc/old-config", b"removed by the next layer")]
    app = [Dir("app", uid=1000, gid=1000), File("app/marker", marker.encode(), uid=1000,
                                                 gid=1000),
           File("etc/.wh.old-config")]
    return [base, app]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "layout"
    build_layout(path, tiny_layers("layout-image"), config={
        "Env": ["PATH=/bin", "GREETING=hello from the image"], "WorkingDir": "/app",
        "User": "alice", "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo entry $GREETING"]})
    return path


@pytest.fixture(scope="module")
def image_sb(layout: Path) -> Any:
    sb = Sandbox.create(image=f"oci:{layout}:latest", disk_size="256M")
    yield sb
    sb.kill()


def test_image_config_is_honoured(image_sb: Any) -> None:
    r = image_sb.commands.run("echo $GREETING; pwd; id -un; cat marker")
    assert r.stdout.splitlines() == ["hello from the image", "/app", "alice", "layout-image"]
    # the caller's env, cwd and user win over the image's
    r = image_sb.commands.run("echo $GREETING; pwd; id -u", env={"GREETING": "mine"},
                              cwd="/", user="root")
    assert r.stdout.splitlines() == ["mine", "/", "0"]


def test_layers_applied_with_whiteouts_and_owners(image_sb: Any) -> None:
    assert not image_sb.files.exists("/etc/old-config")
    st = image_sb.files.stat("/app/marker")
    assert (st.uid, st.gid) == (1000, 1000)
    # the workload is chrooted into the image: the agent's initramfs is not visible
    assert not image_sb.files.exists("/lib/sandvm/agent.py")
    r = image_sb.commands.run(["/bin/ls", "/lib/sandvm"], check=False, user="root")
    assert r.exit_code != 0


def test_files_api_works_in_the_image_root(image_sb: Any) -> None:
    image_sb.files.write("/app/written.txt", "via files api")
    assert image_sb.commands.run("cat /app/written.txt").stdout == "via files api"
    assert image_sb.files.read("/etc/passwd").startswith("root:x:0:0")
    names = {e.name for e in image_sb.files.list("/app")}
    assert {"marker", "written.txt"} <= names


def test_full_disk_is_enospc_in_the_guest(image_sb: Any) -> None:
    r = image_sb.commands.run("dd if=/dev/zero of=/root/fill bs=1M count=400", user="root",
                              check=False)
    assert r.exit_code != 0 and "No space left" in r.stderr
    # the guest keeps working once space is freed; the disk has the size asked for
    image_sb.commands.run("rm /root/fill; sync", user="root")
    df = image_sb.commands.run("df -k / | tail -1", user="root").stdout.split()
    assert 200_000 < int(df[1]) <= 262_144
    assert image_sb.commands.run("echo ok").stdout == "ok\n"


def test_snapshot_keeps_the_disk_and_clones_diverge(image_sb: Any, tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps")
    image_sb.files.write("/app/state", "before")
    snap = image_sb.snapshot("with-disk", store=store)
    assert "disk-root.qcow2" in snap.files and snap.image is not None
    # a wrapped uid (-1 to setresuid) must never run as root
    with pytest.raises(SandvmError, match="out of range"):
        image_sb.commands.run("id -u", user="4294967295")
    assert image_sb.commands.run("id -u; id -g", user="4242").stdout == "4242\n0\n"
    image_sb.files.write("/app/state", "original changed")
    # the layer frozen for the snapshot was merged back: the VM stays on one overlay
    assert [p.name for p in image_sb._a._vm.diskdir.glob("root-*.qcow2")] == ["root-0.qcow2"]
    a = Sandbox.from_snapshot(snap, store=store)
    b = Sandbox.from_snapshot(snap, store=store)
    try:
        assert a.commands.run("cat /app/state; id -un").stdout == "beforealice\n"
        a.files.write("/app/state", "a")
        assert b.files.read("/app/state") == "before"
        # a snapshot of a clone is self-contained over the image (its layers folded)
        snap2 = a.snapshot("of-a-clone", store=store, stop=True)
        store.remove("with-disk")
        c = Sandbox.from_snapshot(snap2, store=store)
        assert c.files.read("/app/state") == "a" and c.files.read("/app/marker") == \
            "layout-image"
        c.kill()
    finally:
        a.kill()
        b.kill()
    assert image_sb.files.read("/app/state") == "original changed"


def test_snapshot_outlives_its_image_and_clones_outlive_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot carries the image's root filesystem (hard-linked): removing the image,
    or the snapshot under running clones, breaks nothing; a clone can be saved again."""
    monkeypatch.setenv("SANDVM_IMAGE_STORE", str(tmp_path / "images"))
    store = SnapshotStore(tmp_path / "snaps")
    layout = tmp_path / "own"
    build_layout(layout, tiny_layers("own-image"), config={"Env": ["PATH=/bin"]})
    images = ImageStore()
    images.load(layout, name="tests/own:1")
    sb = Sandbox.create(image="tests/own:1", disk_size="128M")
    try:
        sb.files.write("/app/state", "one")
        snap = sb.snapshot("first", store=store)
        assert {"disk-root.qcow2", "image-root.ext4"} <= set(snap.files)
    finally:
        sb.kill()
    images.rm("tests/own:1")  # its blobs and root filesystem are deleted
    assert not any((tmp_path / "images" / "rootfs").iterdir())
    clone = Sandbox.from_snapshot(snap, store=store)
    try:
        store.remove("first")  # the clone runs on its own links
        clone.files.write("/app/state", "two")
        again = clone.snapshot("second", store=store, stop=True)
    finally:
        clone.kill()
    last = Sandbox.from_snapshot(again, store=store)
    try:
        assert last.commands.run("cat /app/state /app/marker").stdout == "twoown-image"
    finally:
        last.kill()
    # a damaged image file inside the snapshot is refused, never restored
    with open(again.path / "image-root.ext4", "r+b") as f:
        f.seek(2048)
        f.write(b"\xff" * 16)
    with pytest.raises(SnapshotCorrupt):
        Sandbox.from_snapshot("second", store=store, verify="full")


def test_bad_image_input_is_refused_before_booting(tmp_path: Path) -> None:
    with pytest.raises(UnknownImage, match="sandvm image pull"):
        Sandbox.create(image="no-such-image:1")
    with pytest.raises(InvalidSpec, match="no disk"):
        Sandbox.create(disk_size="1G")


def test_cli_runs_an_archive_and_the_entrypoint(tmp_path: Path, layout: Path) -> None:
    sandvm = [sys.executable, "-m", "sandvm.cli"]
    r = subprocess.run([*sandvm, "run", "--image", f"oci:{layout}:latest"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "entry hello from the image\n"
    archive = build_docker_archive(tmp_path / "img.tar", tiny_layers("docker-archive"),
                                   config={"Env": ["PATH=/bin"]}, repo_tag="tests/tiny:1")
    r = subprocess.run([*sandvm, "image", "load", str(archive)], capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tests/tiny:1 sha256:")
    r = subprocess.run([*sandvm, "run", "--image", "tests/tiny:1", "--", "cat", "/app/marker"],
                       capture_output=True, text=True, timeout=240)
    assert (r.returncode, r.stdout) == (0, "docker-archive"), r.stderr
    ls = subprocess.run([*sandvm, "image", "ls", "--json"], capture_output=True, text=True,
                        timeout=60)
    entry = next(i for i in json.loads(ls.stdout) if i["name"] == "tests/tiny:1")
    assert entry["rootfs_bytes"] > 0 and entry["layers_bytes"] > 0
    r = subprocess.run([*sandvm, "image", "rm", "tests/tiny:1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    r = subprocess.run([*sandvm, "run", "--image", "tests/tiny:1", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown_image" in r.stderr


def test_cli_pulls_from_a_real_registry_and_runs_it(tmp_path: Path, layout: Path) -> None:
    from registry_server import RealRegistry, missing_tools

    reason = missing_tools()
    if reason:
        require(False, reason)
    sandvm = [sys.executable, "-m", "sandvm.cli"]
    env = {**os.environ, "SANDVM_IMAGE_STORE": str(tmp_path / "store")}
    with RealRegistry(tmp_path / "registry") as reg:
        reg.push(layout, "latest", "tests/tiny:2")
        ref = f"{reg.host}/tests/tiny:2"
        r = subprocess.run([*sandvm, "image", "pull", ref], capture_output=True, text=True,
                           timeout=240, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{ref} sha256:")
        missing = subprocess.run([*sandvm, "image", "pull", f"{reg.host}/tests/tiny:nope"],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert missing.returncode == 2 and "image_not_found" in missing.stderr
    # the registry is gone: running needs only the local cache
    r = subprocess.run([*sandvm, "run", "--image", ref, "--", "cat", "/app/marker"],
                       capture_output=True, text=True, timeout=240, env=env)
    assert (r.returncode, r.stdout) == (0, "layout-image"), r.stderr


def test_fork_of_an_image_sandbox_and_saving_a_child(image_sb: Any, tmp_path: Path) -> None:
    image_sb.files.write("/app/forked", "parent state")
    children = image_sb.fork(2)
    try:
        children[0].files.write("/app/forked", "child 0")
        assert children[1].files.read("/app/forked") == "parent state"
        # the fork's snapshot is gone; a child still saves (its layers are pinned)
        snap = children[0].snapshot("child", store=SnapshotStore(tmp_path / "s"), stop=True)
        assert "image-root.ext4" in snap.files
    finally:
        for c in children:
            c.kill()
