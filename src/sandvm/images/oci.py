"""Import images from local sources into the blob store: OCI layouts and archives.

Three sources are understood:

* an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/...``);
* the same layout packed in a tar (what ``skopeo copy ... oci-archive:`` writes);
* a ``docker save`` archive (``manifest.json`` listing ``Config``/``RepoTags``/``Layers``).

Every blob is copied into the :class:`BlobStore` with its declared digest and
size, so a corrupt or truncated blob raises DigestMismatch and nothing is stored
for it. Layout directories are read through directory file descriptors with
``O_NOFOLLOW`` (a symlinked blob or ``blobs`` directory is refused); archives are
read member by member straight from the tarfile, never extracted to disk.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import re
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from sandvm.errors import DigestMismatch, ImageError, ImageInvalid, ImageNotFound, ImageTooLarge
from sandvm.images.blobs import BlobStore, parse_digest
from sandvm.images.layers import TarRefused, open_untrusted_tar
from sandvm.images.manifest import (
    Descriptor,
    choose_platform,
    load_json,
    media_type_of,
    parse_config,
    parse_index,
    parse_json,
    parse_manifest,
)
from sandvm.images.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    ImageConfig,
    ImportedImage,
    LayerRef,
)

__all__ = ["default_name", "import_archive", "import_layout"]

_CHUNK = 1 << 20
_MAX_LAYOUT_FILE = 64 << 10          # oci-layout
_MAX_ARCHIVE_MEMBERS = 100_000       # members of an archive
_MAX_ARCHIVE_NAME_BYTES = 16 << 20   # names (and link targets) kept while reading one
_MAX_LINK_HOPS = 8                   # symlinked/hardlinked members inside an archive
_MAX_INDEX_DEPTH = 3                 # index -> index -> manifest
_HEX_JSON = re.compile(r"(?:.*/)?([0-9a-f]{64})\.json")
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_BARE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class _Source(Protocol):
    """Where an import reads files from: a layout directory or a tar archive."""

    label: str

    def has(self, name: str) -> bool: ...

    def read_file(self, name: str, cap: int, what: str) -> bytes: ...

    def open_file(self, name: str) -> tuple[IO[bytes], int]: ...


# --------------------------------------------------------------------------- sources


class _DirSource:
    """Files of a layout directory, opened without following any symlink below it."""

    def __init__(self, path: Path) -> None:
        self.label = str(path)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageNotFound(f"{path} does not exist") from None
        except NotADirectoryError:
            raise ImageInvalid(f"{path} is not a directory (an OCI image layout is"
                               " a directory; load tars with import_archive)") from None

    def close(self) -> None:
        os.close(self.fd)

    def _open(self, name: str) -> int:
        parts = name.split("/")
        cur = self.fd
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                if not last:
                    flags |= os.O_DIRECTORY
                try:
                    fd = os.open(part, flags, dir_fd=cur)
                except OSError as exc:
                    where = "/".join(parts[:i + 1])
                    if exc.errno == errno.ENOENT:
                        raise ImageNotFound(f"{self.label}: {where} is missing") from None
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ImageInvalid(f"{self.label}: {where} is a symlink or not a"
                                           " directory; layout files must be real files")\
                            from None
                    raise ImageError(f"{self.label}: cannot open {where}: {exc}") from None
                if cur != self.fd:
                    os.close(cur)
                cur = fd
            if not stat.S_ISREG(os.fstat(cur).st_mode):
                raise ImageInvalid(f"{self.label}: {name} is not a regular file")
            os.set_blocking(cur, True)
            return cur
        except BaseException:
            if cur != self.fd:
                os.close(cur)
            raise

    def has(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def open_file(self, name: str) -> tuple[IO[bytes], int]:
        fd = self._open(name)
        return os.fdopen(fd, "rb"), os.fstat(fd).st_size

    def read_file(self, name: str, cap: int, what: str) -> bytes:
        f, size = self.open_file(name)
        with f:
            if size > cap:
                raise ImageTooLarge(f"{self.label}: {what} is {size} bytes, over the"
                                    f" {cap} byte cap")
            data = f.read(size + 1)   # not cap + 1: read(n) allocates n bytes at once
        if len(data) > cap:
            raise ImageTooLarge(f"{self.label}: {what} is over the {cap} byte cap")
        return data


class _TarSource:
    """Regular-file members of an archive by normalised name (nothing is extracted)."""

    def __init__(self, tf: tarfile.TarFile, label: str) -> None:
        self.tf = tf
        self.label = label
        self.members: dict[str, tarfile.TarInfo] = {}
        count = kept = 0
        while (ti := tf.next()) is not None:
            tf.members.clear()  # type: ignore[attr-defined]  # only ours are kept, slimmed
            count += 1
            if count > _MAX_ARCHIVE_MEMBERS:
                raise ImageTooLarge(f"{label}: more than {_MAX_ARCHIVE_MEMBERS} members;"
                                    " not an image archive")
            if ti.isreg() or ti.issym() or ti.islnk():
                name = _archive_name(ti.name)
                if name:
                    kept += len(ti.name) + len(ti.linkname)
                    if kept > _MAX_ARCHIVE_NAME_BYTES:
                        raise ImageTooLarge(f"{label}: member names of more than"
                                            f" {_MAX_ARCHIVE_NAME_BYTES} bytes in all;"
                                            " not an image archive")
                    ti.pax_headers = {}   # read already; nothing here needs them
                    self.members[name] = ti   # a later member of the same name wins

    def _resolve(self, name: str) -> tarfile.TarInfo:
        """The regular-file member ``name`` names, following links inside the archive."""
        want = name
        for _ in range(_MAX_LINK_HOPS):
            ti = self.members.get(want)
            if ti is None:
                raise ImageNotFound(f"{self.label}: {name} is missing from the archive")
            if ti.isreg():
                return ti
            if ti.issym():
                target = posixpath.join(posixpath.dirname(want), ti.linkname)
            else:
                target = ti.linkname
            want = _archive_name(posixpath.normpath(target))
            if not want or want.startswith("../") or want == "..":
                raise ImageInvalid(f"{self.label}: {name} links outside the archive")
        raise ImageInvalid(f"{self.label}: {name}: too many links")

    def has(self, name: str) -> bool:
        return name in self.members

    def size_of(self, name: str) -> int:
        """The size of regular-file member ``name`` (links followed). Raises ImageNotFound."""
        return self._resolve(name).size

    def open_file(self, name: str) -> tuple[IO[bytes], int]:
        ti = self._resolve(name)
        f = self.tf.extractfile(ti)
        if f is None:  # pragma: no cover - _resolve returns regular files only
            raise ImageInvalid(f"{self.label}: {name} is not a regular file")
        return f, ti.size

    def read_file(self, name: str, cap: int, what: str) -> bytes:
        ti = self._resolve(name)
        if ti.size > cap:
            raise ImageTooLarge(f"{self.label}: {what} is {ti.size} bytes, over the"
                                f" {cap} byte cap")
        f, _ = self.open_file(name)
        with f:
            return f.read(ti.size)   # size, not cap: read(n) allocates n bytes at once


def _archive_name(name: str) -> str:
    """A member name without leading ``/`` and ``./`` (``""`` for the root)."""
    while True:
        if name.startswith("/"):
            name = name[1:]
        elif name.startswith("./"):
            name = name[2:]
        else:
            break
    return "" if name in (".", "") else name.rstrip("/")


# --------------------------------------------------------------------------- blobs


def _store_blob(src: _Source, blobs: BlobStore, digest: str, size: int, what: str) -> None:
    """Copy blob ``digest`` from ``src`` into ``blobs``, verified against its digest and
    declared ``size``. Raises ImageNotFound (missing), DigestMismatch, ImageInvalid."""
    hexd = parse_digest(digest)
    if _already_stored(blobs, digest, size, what):
        return
    f, _ = src.open_file(f"blobs/sha256/{hexd}")
    with f:
        blobs.put_chunks(digest, _chunks(f), size=size)


def _already_stored(blobs: BlobStore, digest: str, size: int, what: str) -> bool:
    """Whether ``blobs`` has ``digest`` already; DigestMismatch if its size differs."""
    if not blobs.has(digest):
        return False
    have = blobs.path(digest).stat().st_size
    if have != size:
        raise DigestMismatch(f"{what} {digest} has {have} bytes, its descriptor"
                             f" declares {size}")
    return True


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while block := f.read(_CHUNK):
        yield block


def _read_blob(src: _Source, blobs: BlobStore, desc: Descriptor, cap: int, what: str) -> bytes:
    """A small blob (manifest, index, config), stored verified, then read back."""
    if desc.size > cap:
        raise ImageTooLarge(f"{what} {desc.digest} declares {desc.size} bytes, over the"
                            f" {cap} byte cap")
    _store_blob(src, blobs, desc.digest, desc.size, what)
    with blobs.open(desc.digest) as f:
        return f.read(desc.size + 1)   # stored verified: desc.size <= cap bytes


# --------------------------------------------------------------------------- OCI layouts


def _select_entry(entries: list[Descriptor], ref: str | None, label: str) -> Descriptor:
    """The index.json entry ``ref`` names (by ref.name annotation). Raises ImageNotFound."""
    if not entries:
        raise ImageNotFound(f"{label} holds no images")
    tags = sorted({d.ref_name for d in entries if d.ref_name})
    shown = ", ".join(tags[:20]) + (", ..." if len(tags) > 20 else "") if tags else "none"
    if ref is None:
        if len(entries) == 1:
            return entries[0]
        cands = [d for d in entries if d.ref_name == "latest"]
        if not cands:
            raise ImageNotFound(f"{label} holds {len(entries)} images and none is tagged"
                                f" 'latest': choose one by tag (tags: {shown})")
    else:
        cands = [d for d in entries if d.ref_name == ref]
        if not cands:
            raise ImageNotFound(f"{label} has no image tagged {ref[:200]!r}"
                                f" (tags: {shown})")
    return cands[0] if len(cands) == 1 else choose_platform(cands)


def _read_index(src: _Source) -> list[Descriptor]:
    """Check oci-layout and parse index.json. Raises ImageInvalid, ImageTooLarge."""
    if not src.has("oci-layout"):
        raise ImageInvalid(f"{src.label} is not an OCI image layout (it has no oci-layout"
                           " file)")
    layout = load_json(src.read_file("oci-layout", _MAX_LAYOUT_FILE, "oci-layout"),
                       f"{src.label}: oci-layout", cap=_MAX_LAYOUT_FILE)
    version = layout.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageInvalid(f"{src.label}: unsupported imageLayoutVersion {str(version)[:50]!r}")
    index = load_json(src.read_file("index.json", MAX_MANIFEST_BYTES, "index.json"),
                      f"{src.label}: index.json")
    return parse_index(index)


def _import_oci(src: _Source, blobs: BlobStore, ref: str | None) -> ImportedImage:
    desc = _select_entry(_read_index(src), ref, src.label)
    for _ in range(_MAX_INDEX_DEPTH):
        if desc.media_type not in INDEX_TYPES:
            break
        doc = load_json(_read_blob(src, blobs, desc, MAX_MANIFEST_BYTES, "image index"),
                        f"image index {desc.digest}")
        desc = choose_platform(parse_index(doc))
    if desc.media_type not in MANIFEST_TYPES:
        raise ImageInvalid(f"{src.label}: unsupported manifest media type"
                           f" {desc.media_type[:100]!r}")
    doc = load_json(_read_blob(src, blobs, desc, MAX_MANIFEST_BYTES, "manifest"),
                    f"manifest {desc.digest}")
    if media_type_of(doc, desc.media_type) != desc.media_type:
        raise ImageInvalid(f"manifest {desc.digest} says it is {str(doc.get('mediaType'))[:100]!r}"
                           f" but its descriptor says {desc.media_type!r}")
    manifest = parse_manifest(doc, desc.media_type)
    config_bytes = _read_blob(src, blobs, manifest.config, MAX_CONFIG_BYTES, "image config")
    config = _check_platform(parse_config(config_bytes))
    blobs.check_room([(x.digest, x.size) for x in manifest.layers], src.label)
    for layer in manifest.layers:
        _store_blob(src, blobs, layer.digest, layer.size, "layer")
    return ImportedImage(desc.digest, manifest.config.digest, config, manifest.layers)


def _check_platform(config: ImageConfig) -> ImageConfig:
    if (config.os, config.architecture) != ("linux", "amd64"):
        raise ImageNotFound(f"the image is for {config.os}/{config.architecture};"
                            " sandvm runs linux/amd64 images")
    return config


def import_layout(path: Path, blobs: BlobStore, *, ref: str | None = None) -> ImportedImage:
    """Import the image tagged ``ref`` from the OCI layout directory ``path``.

    ``ref`` matches the ``org.opencontainers.image.ref.name`` annotation; without it
    the layout's only image (or the one tagged ``latest``) is taken. An index is
    followed to its linux/amd64 manifest. Manifest, config and layers are copied
    into ``blobs``, each verified. Raises ImageNotFound (no such path, tag, platform
    or blob), ImageInvalid (malformed, unsupported media type, symlinked blob),
    ImageTooLarge (oversized documents), DigestMismatch (corrupt or mis-sized blob).
    """
    src = _DirSource(path)
    try:
        return _import_oci(src, blobs, ref)
    finally:
        src.close()


# --------------------------------------------------------------------------- archives


@contextlib.contextmanager
def _open_archive(tar_path: Path) -> Iterator[_TarSource]:
    """The archive's members, read with the caps of untrusted tars (extended headers,
    sparse members: :func:`~sandvm.images.layers.open_untrusted_tar`). Raises
    ImageNotFound, ImageInvalid (damaged, a refused member), ImageTooLarge (a cap)."""
    label = str(tar_path)
    try:
        tf = open_untrusted_tar(tar_path)
    except FileNotFoundError:
        raise ImageNotFound(f"{tar_path} does not exist") from None
    except IsADirectoryError:
        raise ImageInvalid(f"{tar_path} is a directory: import it as an OCI layout") from None
    except TarRefused as exc:
        raise exc.image_error(f"{tar_path} cannot be read") from None
    except _ARCHIVE_ERRORS as exc:
        raise ImageInvalid(f"{tar_path} is not a readable tar archive: {exc}") from None
    try:
        with tf:
            yield _TarSource(tf, label)
    except TarRefused as exc:
        raise exc.image_error(f"{tar_path} cannot be read") from None
    except _ARCHIVE_ERRORS as exc:
        raise ImageInvalid(f"{tar_path}: damaged archive: {exc}") from None


def _docker_images(src: _TarSource) -> list[dict[str, Any]]:
    """manifest.json of a docker archive, checked. Raises ImageInvalid, ImageTooLarge."""
    data = src.read_file("manifest.json", MAX_MANIFEST_BYTES, "manifest.json")
    doc = parse_json(data, f"{src.label}: manifest.json")
    if not isinstance(doc, list) or not doc:
        raise ImageInvalid(f"{src.label}: manifest.json must be a non-empty list")
    for i, item in enumerate(doc):
        ok = (isinstance(item, dict) and isinstance(item.get("Config"), str)
              and isinstance(item.get("Layers"), list)
              and all(isinstance(x, str) for x in item["Layers"])
              and (item.get("RepoTags") is None or (
                  isinstance(item["RepoTags"], list)
                  and all(isinstance(x, str) for x in item["RepoTags"]))))
        if not ok:
            raise ImageInvalid(f"{src.label}: manifest.json entry {i} needs Config (string),"
                               " Layers (strings) and RepoTags (strings or null)")
    return doc


def _with_latest(ref: str) -> str:
    return ref if ":" in ref.rsplit("/", 1)[-1] else ref + ":latest"


def _select_docker(images: list[dict[str, Any]], ref: str | None,
                   label: str) -> tuple[dict[str, Any], str | None]:
    """The archive's image ``ref`` names and the RepoTag it matched. Raises ImageNotFound."""
    tags = [t for img in images for t in (img.get("RepoTags") or [])]
    if ref is None:
        if len(images) == 1:
            own = images[0].get("RepoTags") or []
            return images[0], (own[0] if own else None)
        raise ImageNotFound(f"{label} holds {len(images)} images: choose one by tag"
                            f" (tags: {', '.join(tags[:20]) or 'none'})")
    for want in dict.fromkeys((ref, _with_latest(ref))):
        for img in images:
            if want in (img.get("RepoTags") or []):
                return img, want
    raise ImageNotFound(f"{label} has no image tagged {ref[:200]!r}"
                        f" (tags: {', '.join(tags[:20]) or 'none'})")


def _sniff(src: _TarSource, name: str) -> str:
    """The layer media type from the member's first bytes (docker layers are plain tars)."""
    f, _ = src.open_file(name)
    with f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return OCI_LAYER_GZIP
    if head == b"\x28\xb5\x2f\xfd":
        return OCI_LAYER_ZSTD
    return OCI_LAYER_TAR


def _hash_member(src: _TarSource, name: str) -> str:
    f, _ = src.open_file(name)
    h = hashlib.sha256()
    with f:
        for block in _chunks(f):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _import_docker(src: _TarSource, blobs: BlobStore, ref: str | None) -> ImportedImage:
    image, _ = _select_docker(_docker_images(src), ref, src.label)
    cfg_name = _archive_name(image["Config"])
    cfg_bytes = src.read_file(cfg_name, MAX_CONFIG_BYTES, "image config")
    cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
    named = _BLOB_NAME.fullmatch(cfg_name) or _HEX_JSON.fullmatch(cfg_name)
    if named and named.group(1) != cfg_digest[7:]:
        raise DigestMismatch(f"{src.label}: config {cfg_name} hashes to {cfg_digest}")
    config = _check_platform(parse_config(cfg_bytes))
    diff_ids = _diff_ids(cfg_bytes)
    names = [_archive_name(raw) for raw in image["Layers"]]
    blobs.check_room([(None, src.size_of(name)) for name in names], src.label)
    layers: list[LayerRef] = []
    for i, name in enumerate(names):
        size = src.size_of(name)
        media_type = _sniff(src, name)
        if m := _BLOB_NAME.fullmatch(name):
            digest = "sha256:" + m.group(1)
        elif (media_type == OCI_LAYER_TAR and len(diff_ids) == len(image["Layers"])):
            digest = diff_ids[i]      # verified against the config by put_chunks
        else:
            digest = _hash_member(src, name)
        if not _already_stored(blobs, digest, size, "layer"):
            f, _ = src.open_file(name)
            with f:
                try:
                    blobs.put_chunks(digest, _chunks(f), size=size)
                except DigestMismatch as exc:
                    raise DigestMismatch(f"{src.label}: layer {name}: {exc.message}") from None
        layers.append(LayerRef(digest, media_type, size))
    cfg_stored = blobs.put_bytes(cfg_bytes)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_stored, "size": len(cfg_bytes)},
        "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": x.size}
                   for x in layers],
    }, separators=(",", ":")).encode()
    manifest_digest = blobs.put_bytes(manifest)
    return ImportedImage(manifest_digest, cfg_stored, config, tuple(layers))


def _diff_ids(cfg_bytes: bytes) -> list[str]:
    """The config's rootfs.diff_ids if they are all well-formed digests, else []."""
    doc = load_json(cfg_bytes, "image config", cap=MAX_CONFIG_BYTES)
    rootfs = doc.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        return []
    try:
        for d in ids:
            parse_digest(d)
    except ImageInvalid:
        return []
    return list(ids)


def _is_docker(src: _TarSource) -> bool:
    if src.has("manifest.json"):
        return True
    if src.has("index.json") or src.has("oci-layout"):
        return False
    raise ImageInvalid(f"{src.label} is neither an OCI layout tar (index.json, oci-layout)"
                       " nor a docker save archive (manifest.json)")


def import_archive(tar_path: Path, blobs: BlobStore, *, ref: str | None = None) -> ImportedImage:
    """Import an image from an OCI layout tar or a ``docker save`` archive.

    A tar with ``manifest.json`` is read as a docker archive (``ref`` matches a
    RepoTag, ``name`` alone means ``name:latest``), otherwise as an OCI layout
    (``ref`` matches the ref.name annotation). Without ``ref`` the only image is
    taken. Docker archives get a synthesized OCI manifest, stored, whose digest
    becomes the manifest digest. Raises ImageNotFound, ImageInvalid, ImageTooLarge,
    DigestMismatch (as :func:`import_layout`).
    """
    with _open_archive(tar_path) as src:
        if _is_docker(src):
            return _import_docker(src, blobs, ref)
        return _import_oci(src, blobs, ref)


# --------------------------------------------------------------------------- names


def _stem(source: Path) -> str:
    name = source.resolve().name if source.name in ("", ".", "..") else source.name
    for suffix in (".tar.gz", ".tar.zst", ".tgz", ".tar"):
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
            break
    stem = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return stem or "image"


def default_name(source: Path, image: ImportedImage | None = None, *,
                 ref: str | None = None) -> str:
    """The name an image imported from ``source`` (with ``ref``) gets by default.

    A docker archive gives the RepoTag selected (``ref``, or the image's first
    tag). An OCI layout (directory or tar) gives the selected entry's ref.name: a
    full reference (``repo:tag``) is kept, a bare tag becomes ``<stem>:<tag>``
    where the stem is the layout's directory or file name. A source that names
    nothing gives ``<stem>:<12 hex of image's manifest digest>`` (or
    ``<stem>:latest`` without ``image``). Raises ImageNotFound, ImageInvalid.
    """
    stem = _stem(source)
    if source.is_dir():
        dsrc = _DirSource(source)
        try:
            found = _select_entry(_read_index(dsrc), ref, dsrc.label).ref_name
        finally:
            dsrc.close()
    else:
        with _open_archive(source) as tsrc:
            if _is_docker(tsrc):
                _, tag = _select_docker(_docker_images(tsrc), ref, tsrc.label)
                if tag:
                    return tag
                found = None
            else:
                found = _select_entry(_read_index(tsrc), ref, tsrc.label).ref_name
    if found:
        return f"{stem}:{found}" if _BARE_TAG.fullmatch(found) else found
    if image is not None:
        return f"{stem}:{image.manifest_digest[7:19]}"
    return f"{stem}:latest"
