"""Build OCI image layouts (and docker-archive tars) for tests, from Python data.

    layer = [File("etc/motd", b"hi", mode=0o644), Dir("opt"), Symlink("bin/sh", "busybox")]
    digest = build_layout(tmp / "layout", [layer], config={"Env": ["A=1"]}, tag="latest")

Entries are written exactly as given (no checks): tests use this to build hostile
layers too (``../`` names, whiteouts, bombs).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import tarfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class File:
    name: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Dir:
    name: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass
class Symlink:
    name: str
    target: str


@dataclass
class Hardlink:
    name: str
    target: str


@dataclass
class Device:
    name: str
    major: int
    minor: int
    char: bool = True
    mode: int = 0o666


@dataclass
class Fifo:
    name: str
    mode: int = 0o644


Entry = File | Dir | Symlink | Hardlink | Device | Fifo


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed PAX tar of ``entries``, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mtime = 1_700_000_000
            data = None
            if isinstance(e, File):
                ti.size, ti.mode, ti.uid, ti.gid = len(e.data), e.mode, e.uid, e.gid
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
                data = io.BytesIO(e.data)
            elif isinstance(e, Dir):
                ti.type, ti.mode, ti.uid, ti.gid = tarfile.DIRTYPE, e.mode, e.uid, e.gid
            elif isinstance(e, Symlink):
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e.target, 0o777
            elif isinstance(e, Hardlink):
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
            elif isinstance(e, Fifo):
                ti.type, ti.mode = tarfile.FIFOTYPE, e.mode
            else:
                ti.type = tarfile.CHRTYPE if e.char else tarfile.BLKTYPE
                ti.devmajor, ti.devminor, ti.mode = e.major, e.minor, e.mode
            t.addfile(ti, data)
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(blobs: Path, data: bytes) -> dict[str, object]:
    d = _digest(data)
    (blobs / d.split(":")[1]).write_bytes(data)
    return {"digest": d, "size": len(data)}


def image_config(config: dict[str, object] | None, diff_ids: list[str]) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": config or {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()


def build_layout(dest: Path, layers: list[list[Entry]], *, config: dict[str, object] | None = None,
                 tag: str = "latest", gzip_layers: bool = True,
                 extra_platforms: tuple[str, ...] = ()) -> str:
    """Write an OCI image layout at ``dest``; return the image manifest's digest.

    ``extra_platforms`` (e.g. ``("linux/arm64",)``) wraps the manifest in an index
    that also lists manifests for other platforms, so tests can check the choice of
    linux/amd64. ``tag`` becomes the ``org.opencontainers.image.ref.name``.
    """
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layer_descs, diff_ids = [], []
    for entries in layers:
        raw = layer_tar(entries)
        diff_ids.append(_digest(raw))
        blob = gzip.compress(raw, mtime=0) if gzip_layers else raw
        layer_descs.append({"mediaType": LAYER_GZIP if gzip_layers else LAYER_TAR,
                            **_put(blobs, blob)})
    cfg = _put(blobs, image_config(config, diff_ids))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, **cfg},
                           "layers": layer_descs}).encode()
    mdesc = {"mediaType": OCI_MANIFEST, **_put(blobs, manifest),
             "platform": {"architecture": "amd64", "os": "linux"}}
    manifests = []
    for plat in extra_platforms:
        os_, arch = plat.split("/")
        other = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                            "config": {"mediaType": OCI_CONFIG, **cfg}, "layers": [],
                            "arch": arch}).encode()
        manifests.append({"mediaType": OCI_MANIFEST, **_put(blobs, other),
                          "platform": {"architecture": arch, "os": os_}})
    manifests.append(mdesc)
    if extra_platforms:
        index_doc = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                "manifests": manifests}).encode()
        top = {"mediaType": OCI_INDEX, **_put(blobs, index_doc)}
    else:
        top = dict(mdesc)
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                 "manifests": [top]}))
    return str(mdesc["digest"])


def layout_to_tar(layout: Path, out: Path) -> Path:
    """An OCI layout directory packed as a tar (what ``sandvm image load`` accepts)."""
    with tarfile.open(out, "w") as t:
        for p in sorted(layout.rglob("*")):
            t.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    return out


def build_docker_archive(out: Path, layers: list[list[Entry]], *,
                         config: dict[str, object] | None = None,
                         repo_tag: str = "tools/py:1") -> Path:
    """A `docker save` style archive (manifest.json, <id>.json, <layer>/layer.tar)."""
    raws = [layer_tar(e) for e in layers]
    cfg = image_config(config, [_digest(r) for r in raws])
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    with tarfile.open(out, "w") as t:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        names = []
        for raw in raws:
            name = hashlib.sha256(raw).hexdigest() + "/layer.tar"
            add(name, raw)
            names.append(name)
        add(cfg_name, cfg)
        add("manifest.json", json.dumps([{"Config": cfg_name, "RepoTags": [repo_tag],
                                          "Layers": names}]).encode())
    return out


# ------------------------------------------------------------------ hostile tars, by hand

SPARSE_FLAVOURS = ("gnu-old", "pax-0.0", "pax-0.1", "pax-1.0")
_BLOCK = 512
_END = bytes(2 * _BLOCK)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % _BLOCK)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mtime = size, kind, 1_700_000_000
    return ti.tobuf(tarfile.USTAR_FORMAT)


def pax_records(records: list[tuple[str, str]]) -> bytes:
    """PAX extended-header data: ``"<len> key=value\\n"`` records, repeats allowed."""
    out = []
    for key, value in records:
        body = f" {key}={value}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out.append(str(n).encode() + body)
    return b"".join(out)


def pax_header(records: list[tuple[str, str]], kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A PAX extended (or, with ``kind=XGLTYPE``, global) header alone."""
    pax = pax_records(records)
    return _header("././@PaxHeader", len(pax), kind) + _pad(pax)


def plain_member(name: str, data: bytes) -> bytes:
    """A ustar regular-file member (header and padded data)."""
    return _header(name, len(data)) + _pad(data)


def pax_member(records: list[tuple[str, str]], name: str, data: bytes,
               kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A PAX header with ``records`` followed by member ``name`` holding ``data``."""
    return pax_header(records, kind) + plain_member(name, data)


END_OF_ARCHIVE = _END


def sparse_tar(flavour: str, entries: int) -> bytes:
    """An uncompressed tar with one GNU sparse member whose map has about ``entries``
    (offset, size) pairs, in one of :data:`SPARSE_FLAVOURS`: ``gnu-old`` (type ``S``
    with extended header blocks), PAX ``0.0`` (repeated GNU.sparse.offset/numbytes),
    ``0.1`` (GNU.sparse.map) or ``1.0`` (the map at the start of the data). The PAX
    0.0/0.1 maps live in the PAX header, so ``entries`` should keep it under 1 MiB."""
    if flavour == "gnu-old":
        head = bytearray(_header("sparse", 0, tarfile.GNUTYPE_SPARSE))
        head[257:265] = tarfile.GNU_MAGIC
        for i in range(4):
            head[386 + 24 * i:410 + 24 * i] = _octal(1, 12) + _octal(1, 12)
        head[482] = 1
        head[483:495] = _octal(1 << 30, 12)
        blocks = [_with_checksum(head)]
        ext = b"".join(_octal(1, 12) + _octal(1, 12) for _ in range(21))
        n = max(1, (entries - 4) // 21)
        for i in range(n):
            blocks.append(ext + (b"\1" if i < n - 1 else b"\0") + bytes(7))
        return b"".join(blocks) + _END
    if flavour == "pax-0.0":
        recs = [("GNU.sparse.size", str(1 << 30)), ("GNU.sparse.numblocks", str(entries))]
        recs += [r for _ in range(entries)
                 for r in (("GNU.sparse.offset", "0"), ("GNU.sparse.numbytes", "1"))]
        return pax_member(recs, "sparse", b"") + _END
    if flavour == "pax-0.1":
        recs = [("GNU.sparse.size", str(1 << 30)), ("GNU.sparse.numblocks", str(entries)),
                ("GNU.sparse.map", ",".join(["0,1"] * entries))]
        return pax_member(recs, "sparse", b"") + _END
    if flavour == "pax-1.0":
        recs = [("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"),
                ("GNU.sparse.name", "sparse"), ("GNU.sparse.realsize", str(1 << 30))]
        data = _pad(b"%d\n" % entries + b"0\n1\n" * entries)
        return pax_member(recs, "GNUSparseFile.0/sparse", data) + _END
    raise ValueError(f"unknown sparse flavour {flavour!r}")


def pax_comment_tar(comment_bytes: int) -> bytes:
    """An uncompressed tar whose one member carries a PAX ``comment`` of that size."""
    return pax_member([("comment", "x" * comment_bytes)], "README", b"hi") + _END


@contextlib.contextmanager
def heap_peak() -> Iterator[list[int]]:
    """Trace Python allocations in the block; on leaving (even by an exception) the
    list gets the peak bytes allocated in it."""
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
