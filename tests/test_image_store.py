"""The local image cache: names, built root filesystems, ls/rm/prune, caps, bad input."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from oci_build import Dir, File, Symlink, build_docker_archive, build_layout
from sandvm.errors import ImageInvalid, ImageNotFound, ImageTooLarge, UnknownImage
from sandvm.images.store import ImageStore, default_image, split_source

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="building a rootfs needs root")


def _layers(tag: str) -> list[list[object]]:
    return [[Dir("etc"), File("etc/hostname", tag.encode()), Symlink("etc/link", "hostname")],
            [Dir("srv"), File("srv/data", os.urandom(64 << 10), uid=7, gid=8, mode=0o600)]]


def _debugfs(fs: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(fs)], capture_output=True,
                          text=True).stdout


@needs_root
def test_load_builds_an_ext4_with_owners_and_names_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    build_layout(tmp_path / "lay", _layers("one"), tag="3.11")  # type: ignore[arg-type]
    img = store.load(tmp_path / "lay")
    assert img.name == "lay:3.11" and img.rootfs.is_file()
    assert "Inode count" in _debugfs(img.rootfs, "stats")
    stat = _debugfs(img.rootfs, "stat /srv/data")
    assert "User:     7" in stat and "Group:     8" in stat
    assert _debugfs(img.rootfs, "cat /etc/hostname") == "one"
    # the same content again is a cache hit: same build
    again = store.get("lay:3.11")
    assert again.build_id == img.build_id
    assert [i.name for i in store.ls()] == ["lay:3.11"]


@needs_root
def test_rm_and_prune_keep_what_other_images_share(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    shared = _layers("shared")
    build_layout(tmp_path / "a", shared, tag="a")  # type: ignore[arg-type]
    build_layout(tmp_path / "b", [*shared, [File("b-only", b"b")]], tag="b")  # type: ignore[list-item]
    a = store.load(tmp_path / "a", name="img-a")
    b = store.load(tmp_path / "b", name="img-b")
    shared_digest = a.layers[0].digest
    store.rm("img-a")
    assert not a.rootfs.exists() and b.rootfs.exists()
    assert store.blobs.has(shared_digest)  # b still uses it
    with pytest.raises(UnknownImage):
        store.rm("img-a")
    store.rm("img-b")
    assert store.blobs.digests() == [] and not any((store.root / "rootfs").iterdir())
    assert store.prune() == 0


@needs_root
def test_a_bad_layer_leaves_nothing_half_written(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    build_layout(tmp_path / "evil", [[File("../escape", b"x")]])
    with pytest.raises(ImageInvalid, match=r"\.\."):
        store.load(tmp_path / "evil")
    assert not any((store.root / "tmp").iterdir())
    assert not any((store.root / "rootfs").iterdir())
    assert not (tmp_path / "escape").exists()
    assert store.ls() == []  # not named either


@needs_root
def test_docker_archive_and_cache_cap(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", cache_max=1)
    archive = build_docker_archive(tmp_path / "x.tar", _layers("docker"),  # type: ignore[arg-type]
                                   repo_tag="tools/x:1")
    first = store.load(archive)
    assert first.name == "tools/x:1" and first.rootfs.exists()
    build_layout(tmp_path / "y", _layers("other"), tag="y")  # type: ignore[arg-type]
    second = store.load(tmp_path / "y")
    # over the cap: the older rootfs was dropped (blobs a name uses are kept)...
    assert not first.rootfs.exists() and second.rootfs.exists()
    assert store.blobs.has(first.manifest_digest)
    # ...and is rebuilt from them on use
    assert store.get("tools/x:1").rootfs.exists()


def test_unknown_names_and_sources(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    with pytest.raises(UnknownImage, match="sandvm image pull"):
        store.get("nothing:here")
    with pytest.raises(ImageNotFound, match="does not exist"):
        store.get(f"oci:{tmp_path / 'missing'}:latest")
    with pytest.raises(ImageInvalid):
        store.tag("base", None, source="x")  # type: ignore[arg-type]


def test_split_source(tmp_path: Path) -> None:
    (tmp_path / "lay").mkdir()
    assert split_source(f"oci:{tmp_path / 'lay'}:v1") == ("oci", tmp_path / "lay", "v1")
    assert split_source(f"oci:{tmp_path / 'lay'}") == ("oci", tmp_path / "lay", None)
    tar = tmp_path / "a.tar"
    tar.write_bytes(b"")
    assert split_source(f"docker-archive:{tar}:repo/x:2") == ("docker-archive", tar,
                                                             "repo/x:2")
    with pytest.raises(ImageInvalid):
        split_source("oci:")


def test_default_image_is_debian_once_built(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDVM_DEFAULT_IMAGE", raising=False)
    monkeypatch.setenv("SANDVM_IMAGE_STORE", str(tmp_path))
    assert default_image() == "base"
    (tmp_path / "refs.json").write_text('{"debian": {"source": "/some/layout"}}')
    assert default_image() == "base"  # a `debian` that build-default did not make
    (tmp_path / "refs.json").write_text('{"debian": {"source": "mmdebstrap:bookworm"}}')
    assert default_image() == "debian"
    monkeypatch.setenv("SANDVM_DEFAULT_IMAGE", "tools/x:1")
    assert default_image() == "tools/x:1"


@needs_root
def test_prune_keeps_the_blobs_of_an_import_in_flight(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    build_layout(tmp_path / "lay", _layers("racing"), tag="r")  # type: ignore[arg-type]
    from sandvm.images.oci import import_layout

    other = ImageStore(tmp_path / "store")  # as another process would
    with store.importing():
        image = import_layout(tmp_path / "lay", store.blobs)  # blobs in, not yet named
        (store.blobs.partial_path(image.layers[0].digest)).write_bytes(b"half")
        other.prune()
        assert all(store.blobs.has(x.digest) for x in image.layers)
        assert store.blobs.has(image.manifest_digest)
        assert store.blobs.partial_path(image.layers[0].digest).exists()
    other.prune()  # no import any more: unnamed blobs and partials go
    assert store.blobs.digests() == []
    assert not store.blobs.partial_path(image.layers[0].digest).exists()


@needs_root
def test_built_images_are_private(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir(mode=0o755)
    root.chmod(0o755)   # an existing store made before stores were private
    store = ImageStore(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(ImageStore(tmp_path / "new").root.stat().st_mode) == 0o700
    build_layout(tmp_path / "lay", _layers("private"), tag="p")  # type: ignore[arg-type]
    img = store.load(tmp_path / "lay")
    assert stat.S_IMODE(img.rootfs.stat().st_mode) == 0o600
    img.rootfs.chmod(0o644)   # built by an older sandvm: tightened on its next use
    assert stat.S_IMODE(store.get(img.name).rootfs.stat().st_mode) == 0o600


@pytest.mark.parametrize("kind", ["layout", "docker"])
def test_declared_blob_sizes_are_capped_on_import(tmp_path: Path, kind: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(tmp_path / "store")
    layers = [[File("big", os.urandom(64 << 10))]]
    if kind == "layout":
        build_layout(tmp_path / "lay", layers, tag="t")  # type: ignore[arg-type]
        source = tmp_path / "lay"
    else:
        source = build_docker_archive(tmp_path / "d.tar", layers)  # type: ignore[arg-type]
    monkeypatch.setenv("SANDVM_MAX_BLOB_BYTES", str(32 << 10))
    with pytest.raises(ImageTooLarge, match="SANDVM_MAX_BLOB_BYTES"):
        store.load(source)
    assert not [d for d in store.blobs.digests()
                if store.blobs.path(d).stat().st_size > 32 << 10]
    assert store.ls() == []
