"""Importing OCI layouts, layout tars and docker archives into the blob store (no VMs)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from oci_build import (
    Dir,
    File,
    Symlink,
    build_docker_archive,
    build_layout,
    heap_peak,
    layer_tar,
    layout_to_tar,
    pax_comment_tar,
    sparse_tar,
)
from sandvm.errors import DigestMismatch, ImageInvalid, ImageNotFound, ImageTooLarge
from sandvm.images.blobs import BlobStore
from sandvm.images.manifest import load_json
from sandvm.images.model import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    ImportedImage,
)
from sandvm.images.oci import default_name, import_archive, import_layout

LAYERS = [[Dir("etc"), File("etc/motd", b"hello")], [Symlink("bin", "usr/bin")]]
CONFIG = {"Env": ["PATH=/usr/bin", "A=1"], "Cmd": ["sh"], "WorkingDir": "/srv"}


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_file(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def edit_manifest(layout: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """Rewrite the (single, unindexed) manifest of ``layout`` through ``edit``; its digest."""
    index = read_json(layout / "index.json")
    entry = index["manifests"][0]
    doc = read_json(blob_file(layout, entry["digest"]))
    edit(doc)
    data = json.dumps(doc).encode()
    blob_file(layout, sha(data)).write_bytes(data)
    entry.update(digest=sha(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    return sha(data)


def add_tag(layout: Path, layers: list[Any], tag: str, **kw: Any) -> str:
    """Add another image tagged ``tag`` to an existing layout; its manifest digest."""
    old = read_json(layout / "index.json")["manifests"]
    digest = build_layout(layout, layers, tag=tag, **kw)
    index = read_json(layout / "index.json")
    index["manifests"] = old + index["manifests"]
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def assert_stored(blobs: BlobStore, image: ImportedImage) -> None:
    for digest in (image.manifest_digest, image.config_digest, *(x.digest for x in image.layers)):
        assert blobs.has(digest)
        assert sha(blobs.path(digest).read_bytes()) == digest


def no_partials(blobs: BlobStore) -> bool:
    return list((blobs.root / "partial").iterdir()) == []


# ------------------------------------------------------------------ OCI layout directories


def test_import_layout(tmp_path: Path, blobs: BlobStore) -> None:
    layout = tmp_path / "layout"
    digest = build_layout(layout, LAYERS, config=CONFIG)
    image = import_layout(layout, blobs)
    assert image.manifest_digest == digest
    assert image.config.env == ("PATH=/usr/bin", "A=1")
    assert image.config.cmd == ("sh",) and image.config.working_dir == "/srv"
    assert [x.media_type for x in image.layers] == [OCI_LAYER_GZIP, OCI_LAYER_GZIP]
    assert_stored(blobs, image)
    for layer in image.layers:
        assert blobs.path(layer.digest).read_bytes() == blob_file(layout, layer.digest).read_bytes()
        assert layer.size == blob_file(layout, layer.digest).stat().st_size
    # a second import finds everything stored and gives the same image
    assert import_layout(layout, blobs) == image


def test_uncompressed_layout(tmp_path: Path, blobs: BlobStore) -> None:
    image = import_layout(_layout(tmp_path, gzip_layers=False), blobs)
    assert [x.media_type for x in image.layers] == [OCI_LAYER_TAR, OCI_LAYER_TAR]
    assert blobs.path(image.layers[0].digest).read_bytes() == layer_tar(LAYERS[0])


def _layout(tmp_path: Path, **kw: Any) -> Path:
    layout = tmp_path / "layout"
    build_layout(layout, LAYERS, config=CONFIG, **kw)
    return layout


def test_ref_selection(tmp_path: Path, blobs: BlobStore) -> None:
    layout = tmp_path / "layout"
    first = build_layout(layout, LAYERS, tag="3.11")
    second = add_tag(layout, [[File("only-in-3.12")]], "3.12")
    assert import_layout(layout, blobs, ref="3.11").manifest_digest == first
    assert import_layout(layout, blobs, ref="3.12").manifest_digest == second
    with pytest.raises(ImageNotFound, match=r"none is tagged 'latest'.*3\.11, 3\.12"):
        import_layout(layout, blobs)
    latest = add_tag(layout, [[File("latest")]], "latest")
    assert import_layout(layout, blobs).manifest_digest == latest


def test_missing_tag_lists_tags(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path, tag="stable")
    with pytest.raises(ImageNotFound) as exc:
        import_layout(layout, blobs, ref="nightly")
    assert "'nightly'" in str(exc.value) and "stable" in str(exc.value)
    assert blobs.digests() == []


def test_index_chooses_linux_amd64(tmp_path: Path, blobs: BlobStore) -> None:
    layout = tmp_path / "layout"
    digest = build_layout(layout, LAYERS, extra_platforms=("linux/arm64", "windows/amd64"))
    index = read_json(layout / "index.json")
    inner = read_json(blob_file(layout, index["manifests"][0]["digest"]))
    others = [m["digest"] for m in inner["manifests"] if m["digest"] != digest]
    assert len(others) == 2
    image = import_layout(layout, blobs)
    assert image.manifest_digest == digest
    assert_stored(blobs, image)
    assert not any(blobs.has(d) for d in others)


def test_index_without_amd64(tmp_path: Path, blobs: BlobStore) -> None:
    layout = tmp_path / "layout"
    build_layout(layout, LAYERS, extra_platforms=("linux/arm64",))
    index_digest = read_json(layout / "index.json")["manifests"][0]["digest"]
    doc = read_json(blob_file(layout, index_digest))
    doc["manifests"] = [m for m in doc["manifests"] if m["platform"]["architecture"] != "amd64"]
    data = json.dumps(doc).encode()
    blob_file(layout, sha(data)).write_bytes(data)
    top = read_json(layout / "index.json")
    top["manifests"][0].update(digest=sha(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(top))
    with pytest.raises(ImageNotFound, match="linux/arm64"):
        import_layout(layout, blobs)


def test_corrupt_layer_blob(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    manifest = read_json(blob_file(layout, read_json(layout / "index.json")
                                   ["manifests"][0]["digest"]))
    bad = manifest["layers"][1]["digest"]
    path = blob_file(layout, bad)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                     # same size, other content
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=bad):
        import_layout(layout, blobs)
    assert not blobs.has(bad)
    assert no_partials(blobs)


def test_corrupt_manifest_blob(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    digest = read_json(layout / "index.json")["manifests"][0]["digest"]
    blob_file(layout, digest).write_bytes(blob_file(layout, digest).read_bytes().replace(
        b"schemaVersion", b"schemaVersioN"))
    with pytest.raises(DigestMismatch):
        import_layout(layout, blobs)
    assert blobs.digests() == []


@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_size_in_descriptor(tmp_path: Path, blobs: BlobStore, delta: int) -> None:
    layout = _layout(tmp_path)
    holder: dict[str, Any] = {}

    def lie(doc: dict[str, Any]) -> None:
        doc["layers"][0]["size"] += delta
        holder.update(doc["layers"][0])
    edit_manifest(layout, lie)
    with pytest.raises(DigestMismatch, match="declares"):
        import_layout(layout, blobs)
    assert not blobs.has(holder["digest"])
    assert no_partials(blobs)


def test_unknown_layer_media_type(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)

    def rar(doc: dict[str, Any]) -> None:
        doc["layers"][0]["mediaType"] = "application/x-rar"
    edit_manifest(layout, rar)
    with pytest.raises(ImageInvalid, match="application/x-rar"):
        import_layout(layout, blobs)
    manifest = read_json(blob_file(layout, read_json(layout / "index.json")
                                   ["manifests"][0]["digest"]))
    assert not any(blobs.has(x["digest"]) for x in manifest["layers"])


def test_oversized_index_json(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    index = read_json(layout / "index.json")
    index["annotations"] = {"padding": "x" * (5 << 20)}
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageTooLarge, match=r"index\.json"):
        import_layout(layout, blobs)


def test_oversized_manifest_descriptor(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    index = read_json(layout / "index.json")
    index["manifests"][0]["size"] = 1 << 30
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageTooLarge):
        import_layout(layout, blobs)
    assert blobs.digests() == []


def test_missing_blob(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    image = import_layout(layout, BlobStore(tmp_path / "elsewhere"))
    blob_file(layout, image.layers[0].digest).unlink()
    with pytest.raises(ImageNotFound, match="missing"):
        import_layout(layout, blobs)


def test_symlinked_blob_is_refused(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    image = import_layout(layout, BlobStore(tmp_path / "elsewhere"))
    path = blob_file(layout, image.config_digest)
    outside = tmp_path / "outside-config"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(ImageInvalid, match="symlink"):
        import_layout(layout, blobs)
    assert not blobs.has(image.config_digest)


def test_symlinked_blobs_dir_is_refused(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    (layout / "blobs").rename(tmp_path / "real-blobs")
    (layout / "blobs").symlink_to(tmp_path / "real-blobs")
    with pytest.raises(ImageInvalid, match="symlink"):
        import_layout(layout, blobs)


def test_not_a_layout(tmp_path: Path, blobs: BlobStore) -> None:
    with pytest.raises(ImageNotFound):
        import_layout(tmp_path / "nope", blobs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageInvalid, match="oci-layout"):
        import_layout(tmp_path / "empty", blobs)


def test_foreign_architecture_config(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    cfg = json.dumps({"architecture": "arm64", "os": "linux", "config": {}}).encode()
    blob_file(layout, sha(cfg)).write_bytes(cfg)

    def arm(doc: dict[str, Any]) -> None:
        doc["config"].update(digest=sha(cfg), size=len(cfg))
    edit_manifest(layout, arm)
    with pytest.raises(ImageNotFound, match="linux/arm64"):
        import_layout(layout, blobs)


# ------------------------------------------------------------------ OCI layout tars


def test_import_layout_tar(tmp_path: Path, blobs: BlobStore) -> None:
    layout = tmp_path / "layout"
    digest = build_layout(layout, LAYERS, config=CONFIG, tag="v1")
    tar = layout_to_tar(layout, tmp_path / "image.tar")
    image = import_archive(tar, blobs)
    assert image.manifest_digest == digest
    assert image.config.env == ("PATH=/usr/bin", "A=1")
    assert_stored(blobs, image)
    assert import_archive(tar, blobs, ref="v1") == image
    with pytest.raises(ImageNotFound, match="v1"):
        import_archive(tar, blobs, ref="v2")


def test_layout_tar_with_index_and_dot_slash_names(tmp_path: Path, blobs: BlobStore) -> None:
    layout = tmp_path / "layout"
    digest = build_layout(layout, LAYERS, extra_platforms=("linux/arm64",))
    tar = tmp_path / "image.tar"
    with tarfile.open(tar, "w") as t:
        t.add(layout, arcname=".")
    assert import_archive(tar, blobs).manifest_digest == digest


def test_layout_tar_corrupt_blob(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    image = import_layout(layout, BlobStore(tmp_path / "elsewhere"))
    path = blob_file(layout, image.layers[0].digest)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    tar = layout_to_tar(layout, tmp_path / "image.tar")
    with pytest.raises(DigestMismatch):
        import_archive(tar, blobs)
    assert not blobs.has(image.layers[0].digest)


def test_not_an_image_archive(tmp_path: Path, blobs: BlobStore) -> None:
    tar = tmp_path / "x.tar"
    with tarfile.open(tar, "w") as t:
        ti = tarfile.TarInfo("README")
        t.addfile(ti, io.BytesIO(b""))
    with pytest.raises(ImageInvalid, match="neither"):
        import_archive(tar, blobs)
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    with pytest.raises(ImageInvalid):
        import_archive(tmp_path / "junk.tar", blobs)
    with pytest.raises(ImageNotFound):
        import_archive(tmp_path / "missing.tar", blobs)


# ------------------------------------------------------------------ docker archives


def test_import_docker_archive(tmp_path: Path, blobs: BlobStore) -> None:
    tar = build_docker_archive(tmp_path / "d.tar", LAYERS, config=CONFIG, repo_tag="tools/py:1")
    image = import_archive(tar, blobs)
    assert_stored(blobs, image)
    assert image.config.env == ("PATH=/usr/bin", "A=1")
    raws = [layer_tar(x) for x in LAYERS]
    assert [x.digest for x in image.layers] == [sha(r) for r in raws]
    assert [x.size for x in image.layers] == [len(r) for r in raws]
    manifest = json.loads(blobs.path(image.manifest_digest).read_bytes())
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert manifest["config"]["digest"] == image.config_digest
    assert [x["mediaType"] for x in manifest["layers"]] == [OCI_LAYER_TAR, OCI_LAYER_TAR]
    assert import_archive(tar, blobs, ref="tools/py:1") == image   # deterministic


def test_docker_archive_ref(tmp_path: Path, blobs: BlobStore) -> None:
    tar = build_docker_archive(tmp_path / "d.tar", LAYERS, repo_tag="tools/py:latest")
    assert import_archive(tar, blobs, ref="tools/py").layers   # name alone means :latest
    with pytest.raises(ImageNotFound) as exc:
        import_archive(tar, blobs, ref="tools/py:2")
    assert "tools/py:latest" in str(exc.value)


def test_docker_archive_several_images(tmp_path: Path, blobs: BlobStore) -> None:
    tar = _two_image_archive(tmp_path)
    with pytest.raises(ImageNotFound, match=r"a:1.*b:2"):
        import_archive(tar, blobs)
    image = import_archive(tar, blobs, ref="b:2")
    assert [x.digest for x in image.layers] == [sha(layer_tar([File("b")]))]
    assert default_name(tar, ref="a:1") == "a:1"


def _two_image_archive(tmp_path: Path) -> Path:
    """Merge two docker archives into one with two manifest.json entries."""
    a = build_docker_archive(tmp_path / "a.tar", [[File("a")]], repo_tag="a:1")
    b = build_docker_archive(tmp_path / "b.tar", [[File("b")]], repo_tag="b:2")
    out = tmp_path / "both.tar"
    entries = []
    with tarfile.open(out, "w") as t:
        for src in (a, b):
            with tarfile.open(src) as s:
                for ti in s.getmembers():
                    f = s.extractfile(ti)
                    assert f is not None
                    data = f.read()
                    if ti.name == "manifest.json":
                        entries += json.loads(data)
                    else:
                        t.addfile(ti, io.BytesIO(data))
        data = json.dumps(entries).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    return out


def _rewrite_member(src: Path, out: Path, pick: Callable[[str], bool],
                    change: Callable[[bytes], bytes]) -> Path:
    with tarfile.open(src) as s, tarfile.open(out, "w") as t:
        for ti in s.getmembers():
            f = s.extractfile(ti)
            assert f is not None
            data = f.read()
            if pick(ti.name):
                data = change(data)
                ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return out


def test_docker_archive_corrupt_layer(tmp_path: Path, blobs: BlobStore) -> None:
    tar = build_docker_archive(tmp_path / "d.tar", LAYERS)
    bad = _rewrite_member(tar, tmp_path / "bad.tar", lambda n: n.endswith("layer.tar"),
                          lambda d: d.replace(b"hello", b"HELLO"))
    with pytest.raises(DigestMismatch, match=r"layer\.tar"):
        import_archive(bad, blobs)
    assert not blobs.has(sha(layer_tar(LAYERS[0])))
    assert no_partials(blobs)


def test_docker_archive_corrupt_config(tmp_path: Path, blobs: BlobStore) -> None:
    tar = build_docker_archive(tmp_path / "d.tar", LAYERS)
    bad = _rewrite_member(tar, tmp_path / "bad.tar", lambda n: n.endswith(".json")
                          and n != "manifest.json", lambda d: d.replace(b"amd64", b"AMD64"))
    with pytest.raises(DigestMismatch, match="config"):
        import_archive(bad, blobs)
    assert blobs.digests() == []


def test_docker_archive_paths_stay_inside(tmp_path: Path, blobs: BlobStore) -> None:
    (tmp_path / "host.json").write_text(json.dumps({"architecture": "amd64", "os": "linux"}))
    tar = build_docker_archive(tmp_path / "d.tar", LAYERS)

    def escape(data: bytes) -> bytes:
        doc = json.loads(data)
        doc[0]["Config"] = "../host.json"
        return json.dumps(doc).encode()
    bad = _rewrite_member(tar, tmp_path / "bad.tar", lambda n: n == "manifest.json", escape)
    with pytest.raises(ImageNotFound, match=r"host\.json"):
        import_archive(bad, blobs)


def test_docker_archive_oversized_manifest(tmp_path: Path, blobs: BlobStore) -> None:
    tar = build_docker_archive(tmp_path / "d.tar", LAYERS)
    bad = _rewrite_member(tar, tmp_path / "bad.tar", lambda n: n == "manifest.json",
                          lambda d: d + b" " * (5 << 20))
    with pytest.raises(ImageTooLarge, match=r"manifest\.json"):
        import_archive(bad, blobs)


# ------------------------------------------------------------------ hostile archives

HEAP_BOUND = 8 << 20   # bytes of Python heap reading a hostile archive may take


def test_archive_with_a_huge_pax_header_is_refused_in_bounded_memory(
        tmp_path: Path, blobs: BlobStore) -> None:
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(pax_comment_tar(32 << 20)))
    assert bomb.stat().st_size < 64 << 10
    with heap_peak() as peak, pytest.raises(ImageTooLarge, match="extended header") as exc:
        import_archive(bomb, blobs)
    assert str(bomb) in str(exc.value)
    assert peak[0] < HEAP_BOUND
    with pytest.raises(ImageTooLarge):
        default_name(bomb)


def test_archive_with_a_sparse_member_is_refused(tmp_path: Path, blobs: BlobStore) -> None:
    bomb = tmp_path / "sparse.tar.gz"
    bomb.write_bytes(gzip.compress(sparse_tar("gnu-old", 300_000)))
    with heap_peak() as peak, pytest.raises(ImageInvalid, match="sparse"):
        import_archive(bomb, blobs)
    assert peak[0] < HEAP_BOUND


def test_archive_headers_are_not_kept_for_every_member(tmp_path: Path,
                                                       blobs: BlobStore) -> None:
    # each member's PAX header is under the cap; kept together they were not
    layout = _layout(tmp_path)
    tar = tmp_path / "padded.tar.gz"
    with tarfile.open(tar, "w:gz", format=tarfile.PAX_FORMAT) as t:
        for p in sorted(layout.rglob("*")):
            ti = t.gettarinfo(p, arcname=str(p.relative_to(layout)))
            ti.pax_headers = {"comment": "x" * (900 << 10)}
            with open(p, "rb") if p.is_file() else contextlib.nullcontext() as f:
                t.addfile(ti, f)
        for i in range(12):
            ti = tarfile.TarInfo(f"padding/{i}")
            ti.pax_headers = {"comment": "x" * (900 << 10)}
            t.addfile(ti, io.BytesIO(b""))
    with heap_peak() as peak:
        image = import_archive(tar, blobs)
    assert_stored(blobs, image)
    assert peak[0] < HEAP_BOUND


def test_archive_member_names_are_capped_in_all(tmp_path: Path, blobs: BlobStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sandvm.images.oci._MAX_ARCHIVE_NAME_BYTES", 2000)
    tar = tmp_path / "names.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for i in range(3):
            t.addfile(tarfile.TarInfo(f"{i}" + "n" * 900), io.BytesIO(b""))
    with pytest.raises(ImageTooLarge, match="member names"):
        import_archive(tar, blobs)


# ------------------------------------------------------------------ default names


def test_default_names(tmp_path: Path, blobs: BlobStore) -> None:
    layout = tmp_path / "My Layout"
    build_layout(layout, LAYERS, tag="3.11")
    assert default_name(layout) == "my-layout:3.11"
    add_tag(layout, LAYERS, "registry.local/tools/py:3.12")
    assert default_name(layout, ref="registry.local/tools/py:3.12") == \
        "registry.local/tools/py:3.12"
    tar = layout_to_tar(tmp_path / "My Layout", tmp_path / "py-image.tar")
    assert default_name(tar, ref="3.11") == "py-image:3.11"
    docker = build_docker_archive(tmp_path / "d.tar", LAYERS, repo_tag="tools/py:1")
    assert default_name(docker) == "tools/py:1"
    with pytest.raises(ImageNotFound):
        default_name(layout, ref="nope")


def test_default_name_without_a_tag(tmp_path: Path, blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    index = read_json(layout / "index.json")
    del index["manifests"][0]["annotations"]
    (layout / "index.json").write_text(json.dumps(index))
    image = import_layout(layout, blobs)
    assert default_name(layout) == "layout:latest"
    assert default_name(layout, image) == f"layout:{image.manifest_digest[7:19]}"


# ------------------------------------------------------------------ hostile JSON

DEEP = b"{\"a\":" + b"[" * 20_000 + b"]" * 20_000 + b"}"


@pytest.mark.parametrize("name", ["oci-layout", "index.json"])
def test_deeply_nested_layout_json_is_invalid(tmp_path: Path, blobs: BlobStore,
                                              name: str) -> None:
    layout = _layout(tmp_path)
    (layout / name).write_bytes(DEEP)
    with pytest.raises(ImageInvalid, match="too deeply"):
        import_layout(layout, blobs)


def test_deeply_nested_manifest_and_config_are_invalid(tmp_path: Path,
                                                       blobs: BlobStore) -> None:
    layout = _layout(tmp_path)
    blob_file(layout, sha(DEEP)).write_bytes(DEEP)   # under its own digest: it verifies
    config = tmp_path / "config"
    shutil.copytree(layout, config)
    edit_manifest(config, lambda doc: doc["config"].update(digest=sha(DEEP), size=len(DEEP)))
    with pytest.raises(ImageInvalid, match="too deeply"):
        import_layout(config, blobs)
    index = read_json(layout / "index.json")
    index["manifests"][0].update(digest=sha(DEEP), size=len(DEEP))
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageInvalid, match="too deeply"):
        import_layout(layout, blobs)
    with pytest.raises(ImageInvalid, match="too deeply"):
        load_json(DEEP, "a document")


def test_deeply_nested_docker_manifest_is_invalid(tmp_path: Path, blobs: BlobStore) -> None:
    tar = build_docker_archive(tmp_path / "d.tar", LAYERS)
    bad = _rewrite_member(tar, tmp_path / "bad.tar", lambda n: n == "manifest.json",
                          lambda d: DEEP)
    with pytest.raises(ImageInvalid, match="too deeply"):
        import_archive(bad, blobs)
