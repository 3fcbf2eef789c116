"""apply_layers: OCI layer semantics and refusing hostile layers (no VMs, runs as root)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from oci_build import (
    END_OF_ARCHIVE,
    SPARSE_FLAVOURS,
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Symlink,
    heap_peak,
    layer_tar,
    pax_header,
    plain_member,
    sparse_tar,
)
from sandvm.errors import ImageError, ImageInvalid, ImageTooLarge
from sandvm.images.blobs import BlobStore
from sandvm.images.layers import ApplyStats, apply_layers
from sandvm.images.model import OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD, LayerRef

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="applying layers keeps owners and device nodes: needs root")

MTIME = 1_700_000_000
Layer = list[Entry] | bytes


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "root"
    d.mkdir()
    return d


def put_layer(blobs: BlobStore, layer: Layer, compression: str = "tar") -> LayerRef:
    """Store ``layer`` (entries, or raw tar bytes) compressed as asked; its LayerRef."""
    raw = layer if isinstance(layer, bytes) else layer_tar(layer)
    if compression == "gzip":
        data, mt = gzip.compress(raw, mtime=0), OCI_LAYER_GZIP
    elif compression == "zstd":
        data = subprocess.run(["zstd", "-cq"], input=raw, capture_output=True,
                              check=True).stdout
        mt = OCI_LAYER_ZSTD
    else:
        data, mt = raw, OCI_LAYER_TAR
    return LayerRef(blobs.put_bytes(data), mt, len(data))


def apply(blobs: BlobStore, dest: Path, *layers: Layer, compression: str = "tar",
          **kw: object) -> ApplyStats:
    refs = [put_layer(blobs, layer, compression) for layer in layers]
    return apply_layers(blobs, refs, dest, **kw)  # type: ignore[arg-type]


def raw_tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A PAX tar of hand-made members (for what oci_build cannot express)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def names_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------ the basics


def test_files_dirs_owners_modes_mtimes(blobs: BlobStore, dest: Path) -> None:
    stats = apply(blobs, dest, [
        Dir("usr"), Dir("usr/bin"),
        File("usr/bin/su", b"#!su", mode=0o4755),
        File("usr/bin/wall", b"w", mode=0o2755, gid=5),
        Dir("tmp", mode=0o1777),
        Dir("home/u", mode=0o750, uid=1000, gid=1000),
        File("home/u/notes", b"private", mode=0o600, uid=1000, gid=1000),
    ])
    assert stats == ApplyStats(entries=7, bytes=len(b"#!su") + 1 + len(b"private"), layers=1)
    su = os.lstat(dest / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755 and (su.st_uid, su.st_gid) == (0, 0)
    wall = os.lstat(dest / "usr/bin/wall")
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and wall.st_gid == 5
    assert stat.S_IMODE(os.lstat(dest / "tmp").st_mode) == 0o1777
    notes = os.lstat(dest / "home/u/notes")
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1000, 1000, 0o600)
    assert (dest / "home/u/notes").read_bytes() == b"private"
    home_u = os.lstat(dest / "home/u")
    assert (home_u.st_uid, stat.S_IMODE(home_u.st_mode)) == (1000, 0o750)
    # "home" had no entry: made 0755 root; directory mtimes survive later entries
    home = os.lstat(dest / "home")
    assert (stat.S_IMODE(home.st_mode), home.st_uid) == (0o755, 0)
    assert int(os.lstat(dest / "usr/bin").st_mtime) == MTIME
    assert int(su.st_mtime) == MTIME


@pytest.mark.parametrize("compression", ["tar", "gzip", "zstd"])
def test_compressions(blobs: BlobStore, dest: Path, compression: str) -> None:
    apply(blobs, dest, [File("etc/motd", b"hello " * 1000)],
          [File("etc/issue", b"debian")], compression=compression)
    assert (dest / "etc/motd").read_bytes() == b"hello " * 1000
    assert (dest / "etc/issue").read_bytes() == b"debian"


def test_progress_reaches_total(blobs: BlobStore, dest: Path) -> None:
    seen: list[tuple[int, int]] = []
    refs = [put_layer(blobs, [File("a", b"x" * 5000)], "gzip"),
            put_layer(blobs, [File("b", b"y")], "tar")]
    apply_layers(blobs, refs, dest, progress=lambda d, t: seen.append((d, t)))
    total = sum(r.size for r in refs)
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_dest_must_be_empty(blobs: BlobStore, dest: Path) -> None:
    (dest / "x").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        apply(blobs, dest, [File("a")])


def test_not_root_is_a_clear_error(blobs: BlobStore, dest: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_: object, **__: object) -> None:
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "fchown", denied)
    with pytest.raises(ImageError, match="root"):
        apply(blobs, dest, [File("a", uid=1000)])


# ------------------------------------------------------------------ replacement, whiteouts


def test_later_layers_replace(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest,
          [File("f", b"old"), Dir("d", mode=0o700), File("d/keep", b"k"),
           Dir("tree"), File("tree/deep/x", b"x"), File("was_file", b"f"),
           Symlink("link", "f")],
          [File("f", b"new"), Dir("d", mode=0o755, uid=7), File("tree", b"now a file"),
           Dir("was_file"), File("link", b"plain")])
    assert (dest / "f").read_bytes() == b"new"
    d = os.lstat(dest / "d")
    assert (stat.S_IMODE(d.st_mode), d.st_uid) == (0o755, 7)
    assert (dest / "d/keep").read_bytes() == b"k"          # dir over dir keeps contents
    assert (dest / "tree").read_bytes() == b"now a file"   # file over dir drops the tree
    assert (dest / "was_file").is_dir()
    assert not (dest / "link").is_symlink() and (dest / "link").read_bytes() == b"plain"


def test_whiteouts_delete_from_lower_layers(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest,
          [File("etc/a", b"a"), File("etc/b/c", b"c"), File("etc/keep", b"k")],
          [File("etc/.wh.a"), File("etc/.wh.b"), File(".wh.nothing-here"),
           File("etc/new", b"n"), File("etc/.wh.new")])   # same-layer entries stay
    assert names_under(dest) == {"etc", "etc/keep", "etc/new"}


def test_opaque_directory(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest,
          [File("d/old", b"o"), File("d/sub/x", b"x"), File("other", b"o")],
          [Dir("d"), File("d/before", b"b"), Dir("d/sub"), File("d/sub/y", b"y"),
           File("d/.wh..wh..opq"), File("d/after", b"a")])
    assert names_under(dest) == {"other", "d", "d/before", "d/after", "d/sub", "d/sub/y"}


def test_opaque_keeps_same_layer_entries_without_dir_entries(blobs: BlobStore,
                                                             dest: Path) -> None:
    apply(blobs, dest,
          [File("d/sub/x", b"x"), File("d/old", b"o")],
          [File("d/sub/y", b"y"), File(".wh..wh..opq"), File("new", b"n")])
    assert names_under(dest) == {"d", "d/sub", "d/sub/y", "new"}


def test_whiteout_with_dotdot_name_is_refused(blobs: BlobStore, dest: Path) -> None:
    with pytest.raises(ImageInvalid, match="whiteout"):
        apply(blobs, dest, [File("d/x")], [File("d/.wh...")])
    assert (dest / "d/x").exists()


# ------------------------------------------------------------------ links, nodes, xattrs


def test_symlinks(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest, [File("usr/bin/python3.11", b"py"),
                        Symlink("usr/bin/python3", "/usr/bin/python3.11"),
                        Symlink("usr/bin/py", "python3"),
                        Symlink("lib", "usr/lib")])
    assert os.readlink(dest / "usr/bin/python3") == "/usr/bin/python3.11"
    assert os.readlink(dest / "usr/bin/py") == "python3"
    assert os.readlink(dest / "lib") == "usr/lib"


@pytest.mark.parametrize(("name", "target"), [
    ("a/l", "../../etc/passwd"), ("l", ".."), ("l", "/../etc"), ("a/b/l", "../x/../../../y"),
])
def test_symlink_escaping_root_is_refused(blobs: BlobStore, dest: Path,
                                          name: str, target: str) -> None:
    with pytest.raises(ImageInvalid, match="symlink escapes the root") as exc:
        apply(blobs, dest, [Symlink(name, target)])
    assert name in str(exc.value)


def test_hardlinks(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest, [File("bin/busybox", b"bb", mode=0o755)],
          [Hardlink("bin/sh", "bin/busybox"), Hardlink("/sbin/init", "./bin/busybox")])
    ino = os.lstat(dest / "bin/busybox").st_ino
    assert os.lstat(dest / "bin/sh").st_ino == ino
    assert os.lstat(dest / "sbin/init").st_ino == ino
    assert os.lstat(dest / "bin/busybox").st_nlink == 3


@pytest.mark.parametrize("layer", [
    [Hardlink("x", "../outside")],
    [Hardlink("x", "missing")],
    [Dir("d"), Hardlink("x", "d")],
    [File("f"), Symlink("s", "f"), Hardlink("x", "s")],
])
def test_bad_hardlinks_are_refused(blobs: BlobStore, dest: Path, tmp_path: Path,
                                   layer: list[Entry]) -> None:
    (tmp_path / "outside").write_text("host file")
    with pytest.raises(ImageInvalid, match="hardlink"):
        apply(blobs, dest, layer)
    assert os.lstat(tmp_path / "outside").st_nlink == 1
    assert not (dest / "x").exists()


def test_hardlink_through_symlinked_dir_is_refused(blobs: BlobStore, dest: Path,
                                                   tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("s")
    with pytest.raises(ImageInvalid, match="symlink"):
        apply(blobs, dest, [Symlink("h", str(host))], [Hardlink("x", "h/secret")])
    assert os.lstat(host / "secret").st_nlink == 1


def test_xattrs(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest, [File("f", b"x", xattrs={"user.test": "hello", "user.b": "é"})])
    assert os.getxattr(dest / "f", "user.test") == b"hello"
    assert os.getxattr(dest / "f", "user.b") == "é".encode()


def test_binary_xattrs_on_dirs_symlinks_and_nodes(blobs: BlobStore, dest: Path) -> None:
    members = []
    for name, kind in [("dir", tarfile.DIRTYPE), ("link", tarfile.SYMTYPE),
                       ("null", tarfile.CHRTYPE)]:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.devmajor, ti.devminor = kind, "dir", 1, 3
        # a non-UTF-8 value, as tarfile hands it over (surrogate-escaped)
        ti.pax_headers = {"SCHILY.xattr.trusted.k": "v\udcff"}
        members.append((ti, None))
    apply(blobs, dest, raw_tar(*members))
    for name in ("dir", "link", "null"):
        assert os.getxattr(dest / name, "trusted.k", follow_symlinks=False) == b"v\xff"
    assert os.readlink(dest / "link") == "dir"


def test_xattr_outside_known_namespaces_is_refused(blobs: BlobStore, dest: Path) -> None:
    with pytest.raises(ImageInvalid, match="xattr"):
        apply(blobs, dest, [File("f", xattrs={"bogus.name": "x"})])


def test_device_nodes_and_fifos(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest, [Device("dev/null", 1, 3, mode=0o666),
                        Device("dev/loop9", 7, 9, char=False, mode=0o660),
                        Fifo("run/initctl", mode=0o600)])
    null = os.lstat(dest / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and stat.S_IMODE(null.st_mode) == 0o666
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    loop = os.lstat(dest / "dev/loop9")
    assert stat.S_ISBLK(loop.st_mode) and os.minor(loop.st_rdev) == 9
    fifo = os.lstat(dest / "run/initctl")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o600


def test_unsupported_member_type_is_refused(blobs: BlobStore, dest: Path) -> None:
    ti = tarfile.TarInfo("vol")
    ti.type = b"M"   # GNU multi-volume continuation
    with pytest.raises(ImageInvalid, match="unsupported member type"):
        apply(blobs, dest, raw_tar((ti, b"")))


# ------------------------------------------------------------------ hostile names


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./../evil", "a/b/../../../evil"])
def test_dotdot_members_are_refused(blobs: BlobStore, dest: Path, tmp_path: Path,
                                    name: str) -> None:
    with pytest.raises(ImageInvalid, match=r"'\.\.'") as exc:
        apply(blobs, dest, [File(name, b"pwned")])
    assert "evil" in str(exc.value) and "layer sha256:" in str(exc.value)
    assert not (tmp_path / "evil").exists()


def test_absolute_member_names_are_normalised(blobs: BlobStore, dest: Path) -> None:
    apply(blobs, dest, [File("/etc/abs", b"a"), File("./etc/dot", b"d"), Dir("/")])
    assert (dest / "etc/abs").read_bytes() == b"a"
    assert (dest / "etc/dot").read_bytes() == b"d"


@pytest.mark.parametrize("split", [True, False])
def test_write_through_symlinked_parent_is_refused(blobs: BlobStore, dest: Path,
                                                   tmp_path: Path, split: bool) -> None:
    host = tmp_path / "host"
    host.mkdir()
    plant: list[Entry] = [Symlink("etc", str(host))]
    write: list[Entry] = [File("etc/x", b"pwned")]
    with pytest.raises(ImageInvalid, match="symlink") as exc:
        if split:
            apply(blobs, dest, plant, write)
        else:
            apply(blobs, dest, plant + write)
    assert "etc/x" in str(exc.value)
    assert list(host.iterdir()) == []


def test_whiteout_through_symlinked_parent_is_refused(blobs: BlobStore, dest: Path,
                                                      tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "precious").write_text("p")
    with pytest.raises(ImageInvalid, match="symlink"):
        apply(blobs, dest, [Symlink("etc", str(host))], [File("etc/.wh.precious")])
    assert (host / "precious").exists()


# ------------------------------------------------------------------ caps, broken layers


def test_entries_cap(blobs: BlobStore, dest: Path) -> None:
    with pytest.raises(ImageTooLarge, match="entries"):
        apply(blobs, dest, [File(f"f{i}") for i in range(20)], max_entries=10)


def test_entries_cap_counts_all_layers(blobs: BlobStore, dest: Path) -> None:
    layer = [File(f"f{i}") for i in range(6)]
    with pytest.raises(ImageTooLarge):
        apply(blobs, dest, layer, layer, max_entries=10)


def test_bytes_cap(blobs: BlobStore, dest: Path) -> None:
    with pytest.raises(ImageTooLarge, match="bytes"):
        apply(blobs, dest, [File("a", b"x" * 600), File("b", b"x" * 600)], max_bytes=1000)
    assert not (dest / "b").exists()


def test_zstd_bomb_is_capped(blobs: BlobStore, dest: Path) -> None:
    bomb = layer_tar([File("zeros", bytes(8 << 20))])
    stats = apply(blobs, dest, bomb, compression="zstd", max_bytes=9 << 20)
    assert stats.bytes == 8 << 20
    other = dest.parent / "other"
    other.mkdir()
    with pytest.raises(ImageTooLarge):
        apply(blobs, other, bomb, compression="zstd", max_bytes=1 << 20)


def test_huge_pax_header_is_refused(blobs: BlobStore, dest: Path) -> None:
    ti = tarfile.TarInfo("f")
    ti.pax_headers = {"comment": "x" * (2 << 20)}
    with pytest.raises(ImageTooLarge, match="extended header"):
        apply(blobs, dest, raw_tar((ti, b"")))


@pytest.mark.parametrize(("data", "compression"), [
    (b"this is not a tar archive at all" * 100, "tar"),
    (b"", "tar"),
    (b"\x1f\x8b\x08\x00garbage" * 10, "gzip"),
    (b"\x28\xb5\x2f\xfdgarbage" * 10, "zstd"),
])
def test_broken_layers_are_invalid(blobs: BlobStore, dest: Path, data: bytes,
                                   compression: str) -> None:
    mt = {"tar": OCI_LAYER_TAR, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compression]
    ref = LayerRef(blobs.put_bytes(data), mt, len(data))
    with pytest.raises(ImageInvalid) as exc:
        apply_layers(blobs, [ref], dest)
    assert ref.digest in str(exc.value)


def test_truncated_gzip_layer_is_invalid(blobs: BlobStore, dest: Path) -> None:
    data = gzip.compress(layer_tar([File("a", os.urandom(100_000))]))[:-5000]
    ref = LayerRef(blobs.put_bytes(data), OCI_LAYER_GZIP, len(data))
    with pytest.raises(ImageInvalid):
        apply_layers(blobs, [ref], dest)


def test_unknown_layer_media_type(blobs: BlobStore, dest: Path) -> None:
    data = layer_tar([File("a")])
    ref = LayerRef(blobs.put_bytes(data), "application/x-rar", len(data))
    with pytest.raises(ImageInvalid, match="media type"):
        apply_layers(blobs, [ref], dest)
    assert names_under(dest) == set()


# ------------------------------------------------------------------ tar bombs in headers

# how many (offset, size) pairs each flavour's map gets: the PAX 0.0/0.1 maps sit in the
# PAX header itself, so they stay under its 1 MiB cap; the others have no limit of their own
SPARSE_ENTRIES = {"gnu-old": 300_000, "pax-0.0": 20_000, "pax-0.1": 200_000,
                  "pax-1.0": 300_000}
PEAK_BOUND = 8 << 20   # bytes of Python heap a refused layer may take (tracemalloc)


@pytest.mark.parametrize("compression", ["tar", "gzip"])
@pytest.mark.parametrize("flavour", SPARSE_FLAVOURS)
def test_sparse_members_are_refused_before_their_map_is_read(
        blobs: BlobStore, dest: Path, flavour: str, compression: str) -> None:
    ref = put_layer(blobs, sparse_tar(flavour, SPARSE_ENTRIES[flavour]), compression)
    with heap_peak() as peak, pytest.raises(ImageInvalid, match="sparse") as exc:
        apply_layers(blobs, [ref], dest)
    assert ref.digest in str(exc.value) and "without --sparse" in str(exc.value)
    assert peak[0] < PEAK_BOUND
    assert names_under(dest) == set()


def test_sparse_records_in_a_global_header_are_refused(blobs: BlobStore, dest: Path) -> None:
    tar = (pax_header([("GNU.sparse.major", "1"), ("GNU.sparse.minor", "1")], tarfile.XGLTYPE)
           + plain_member("a", b"x") + END_OF_ARCHIVE)
    with pytest.raises(ImageInvalid, match="sparse"):
        apply(blobs, dest, tar)


def test_extended_headers_are_capped_per_member_not_only_each(
        blobs: BlobStore, tmp_path: Path) -> None:
    # tarfile keeps every header of a chain in memory until the member after them
    big = pax_header([("comment", "x" * (600 << 10))])
    (tmp_path / "a").mkdir()
    ref = put_layer(blobs, big * 2 + plain_member("f", b"") + END_OF_ARCHIVE, "gzip")
    with pytest.raises(ImageTooLarge, match="extended header"):
        apply_layers(blobs, [ref], tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(ImageInvalid, match="more than 16 extended headers"):
        apply(blobs, tmp_path / "b",
              pax_header([("comment", "y")]) * 17 + plain_member("f", b"") + END_OF_ARCHIVE)
    # one big header per member is fine, as before
    (tmp_path / "c").mkdir()
    apply(blobs, tmp_path / "c", (big + plain_member("f", b"1")) * 3 + END_OF_ARCHIVE)
    assert (tmp_path / "c/f").read_bytes() == b"1"


def test_global_headers_are_capped_in_all(blobs: BlobStore, dest: Path) -> None:
    # every global header's records stay in memory for the rest of the archive
    tar = b"".join(pax_header([(f"comment{i}", "x" * (600 << 10))], tarfile.XGLTYPE)
                   + plain_member(f"f{i}", b"") for i in range(3)) + END_OF_ARCHIVE
    with pytest.raises(ImageTooLarge, match="global PAX headers"):
        apply(blobs, dest, tar, compression="gzip")
