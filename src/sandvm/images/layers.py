"""Apply image layers into a directory: the merged root filesystem, without any mount.

Layers (tar, tar+gzip, tar+zstd) are streamed bottom first and applied with OCI
semantics: ``.wh.<name>`` deletes ``<name>`` from lower layers, ``.wh..wh..opq``
empties a directory of what lower layers put there, and a later entry replaces
an earlier one. Ownership, modes (setuid/setgid/sticky too), mtimes, symlinks,
hardlinks, xattrs, device nodes and fifos are kept, which needs root (or fakeroot).

Layers are untrusted. Everything happens relative to directory file descriptors
opened with ``O_NOFOLLOW``: no path is ever resolved through a symlink, so
nothing is written outside ``dest``; ``..`` components, symlinks whose target
climbs above the root, hardlinks to anything but a regular file already in
``dest`` and unusual member types are refused (ImageInvalid); caps on bytes and
entries stop tar bombs (ImageTooLarge).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import gzip
import os
import shutil
import stat
import subprocess
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, BinaryIO, cast

from sandvm.errors import ImageError, ImageInvalid, ImageTooLarge
from sandvm.images.blobs import BlobStore
from sandvm.images.model import (
    DOCKER_LAYER_GZIP,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    LayerRef,
)
from sandvm.tarsafe import TarRefused, open_untrusted_tar

__all__ = ["MAX_DEPTH", "MAX_PATH_BYTES", "ApplyStats", "TarRefused", "apply_layers",
           "open_untrusted_tar"]

MAX_PATH_BYTES = 4096            # longest member name (or hardlink target) accepted
MAX_DEPTH = 256                  # most path components in a member name
_MAX_TRAILING_BYTES = 16 << 20   # data after the tar's end-of-archive marker
_CHUNK = 1 << 20
_PROGRESS_STEP = 1 << 20
_OPAQUE = ".wh..wh..opq"
_WHITEOUT = ".wh."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_NAMESPACES = ("user.", "trusted.", "security.", "system.")
_COMPRESSION = {
    OCI_LAYER_TAR: "tar",
    OCI_LAYER_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
}
# what a damaged or non-tar stream raises while it is read
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, RecursionError)


@dataclass(frozen=True)
class ApplyStats:
    """What :func:`apply_layers` did: tar members read, regular-file bytes, layers."""

    entries: int
    bytes: int
    layers: int


def apply_layers(blobs: BlobStore, layers: Sequence[LayerRef], dest: Path, *,
                 max_bytes: int = 16 << 30, max_entries: int = 1_000_000,
                 progress: Callable[[int, int], None] | None = None) -> ApplyStats:
    """Apply ``layers`` (bottom first) from ``blobs`` into the empty directory ``dest``.

    ``progress(done, total)`` is called as layer blob bytes are consumed (``total``
    is the sum of the layers' sizes). Raises ImageInvalid (an unsafe or malformed
    layer, naming the layer digest and member; unsupported media type),
    ImageTooLarge (more than ``max_bytes`` of file data or ``max_entries`` tar
    members), ImageNotFound (a blob missing from the store), ImageError (not root,
    host I/O errors, zstd missing) and ValueError if ``dest`` is not empty. On
    error ``dest`` is left half-populated: the caller deletes it. Nothing is ever
    written outside ``dest``.
    """
    for layer in layers:
        if layer.media_type not in _COMPRESSION:
            raise ImageInvalid(f"layer {layer.digest}: unsupported media type"
                               f" {layer.media_type[:100]!r}")
    try:
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot open {dest}: {exc.strerror or exc}") from None
    applier = _Applier(root_fd, max_bytes=max_bytes, max_entries=max_entries,
                       progress=progress, total=sum(x.size for x in layers))
    try:
        if os.listdir(root_fd):
            raise ValueError(f"{dest} must be an empty directory")
        for layer in layers:
            applier.apply(blobs, layer)
        applier.finish()
    finally:
        applier.close()
        os.close(root_fd)
    return ApplyStats(entries=applier.entries, bytes=applier.bytes, layers=len(layers))


def _escapes(base: tuple[str, ...], target: str) -> bool:
    """Whether ``target``, resolved lexically from directory ``base``, climbs above /."""
    stack = [] if target.startswith("/") else list(base)
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                return True
            stack.pop()
        else:
            stack.append(comp)
    return False


def _ns(mtime: float) -> int:
    return int(mtime * 1_000_000_000)


class _Applier:
    """State while applying layers: the root fd, counters, per-layer created paths."""

    def __init__(self, root_fd: int, *, max_bytes: int, max_entries: int,
                 progress: Callable[[int, int], None] | None, total: int) -> None:
        self.root_fd = root_fd
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.progress = progress
        self.total = total
        self.done = 0              # blob bytes of the layers already applied
        self.reported = -1
        self.entries = 0
        self.bytes = 0
        self.layer = ""
        self.member = ""
        self.created: set[str] = set()   # paths the current layer created or touched
        self.dir_mtimes: dict[tuple[str, ...], int] = {}
        self._cache: tuple[tuple[str, ...], int] | None = None  # last directory opened

    # ---------------------------------------------------------------- errors, helpers

    def _bad(self, reason: str) -> ImageInvalid:
        return ImageInvalid(f"layer {self.layer}: member {self.member[:200]!r}: {reason}")

    def _root_needed(self, what: str) -> ImageError:
        return ImageError(f"layer {self.layer}: member {self.member[:200]!r}: {what} needs"
                          " root: run as root (or under fakeroot)")

    def _normalise(self, name: str, what: str = "name") -> tuple[str, ...]:
        """A member name as path components (no leading / or ./). Raises ImageInvalid."""
        if "\0" in name:
            raise self._bad(f"a NUL byte in the {what}")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise self._bad(f"the {what} is longer than {MAX_PATH_BYTES} bytes")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise self._bad(f"'..' in the {what} {name[:200]!r}")
        if len(parts) > MAX_DEPTH:
            raise self._bad(f"the {what} has more than {MAX_DEPTH} components")
        return parts

    def close(self) -> None:
        self._drop_cache()

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def _chown(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except PermissionError:
            raise self._root_needed("setting file owners") from None

    def _open_dir(self, parts: tuple[str, ...], *, create: bool) -> int | None:
        """A new fd for directory ``parts`` (caller closes), walked without following
        symlinks; missing directories are made (0755 root) if ``create``, else None.
        Raises ImageInvalid if a component is a symlink or not a directory."""
        if self._cache is not None and self._cache[0] == parts:
            return os.dup(self._cache[1])
        cur = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nxt = os.open(comp, _DIR_FLAGS, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        os.close(cur)
                        return None
                    os.mkdir(comp, 0o755, dir_fd=cur)
                    nxt = os.open(comp, _DIR_FLAGS, dir_fd=cur)
                    try:
                        self._chown(partial(os.fchown, nxt, 0, 0))
                        os.fchmod(nxt, 0o755)
                    except BaseException:
                        os.close(nxt)
                        raise
                    self.created.add("/".join(parts[:i + 1]))
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise self._bad(f"its parent {'/'.join(parts[:i + 1])!r} is {kind}"
                                    " (nothing is written through symlinks)") from None
                os.close(cur)
                cur = nxt
        except BaseException:
            os.close(cur)
            raise
        self._drop_cache()
        self._cache = (parts, os.dup(cur))
        return cur

    def _rmtree(self, pfd: int, name: str) -> None:
        """Delete directory ``name`` in ``pfd`` and everything below it (no symlink followed)."""
        self._drop_cache()
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            with os.scandir(fd) as it:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for child, is_dir in children:
                if is_dir:
                    self._rmtree(fd, child)
                else:
                    os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=pfd)

    def _remove(self, pfd: int, name: str) -> None:
        """Delete ``name`` in ``pfd`` whatever it is (a directory with its contents)."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._rmtree(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)

    def _clear_for(self, pfd: int, name: str, *, is_dir: bool) -> bool:
        """Make room for a new entry ``name``: True if a directory stays (dir over dir)."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if is_dir:
                return True
            self._rmtree(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)
        return False

    # ---------------------------------------------------------------- metadata

    def _xattrs(self, ti: tarfile.TarInfo) -> dict[str, bytes]:
        """Extended attributes from PAX ``SCHILY.xattr.*`` (and libarchive's) headers."""
        out: dict[str, bytes] = {}
        for key, value in ti.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                name = key[len("SCHILY.xattr."):]
                data = value.encode("utf-8", "surrogateescape")
            elif key.startswith("LIBARCHIVE.xattr."):
                name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
                try:
                    data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
                except (binascii.Error, ValueError):
                    raise self._bad(f"xattr {name[:100]!r} is not valid base64") from None
            else:
                continue
            if not name.startswith(_XATTR_NAMESPACES) or "\0" in name:
                raise self._bad(f"unsupported xattr {name[:100]!r}")
            out[name] = data
        return out

    def _set_xattrs(self, target: int | str, xattrs: dict[str, bytes]) -> None:
        for name, value in xattrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except PermissionError:
                raise self._root_needed(f"setting xattr {name[:100]!r}") from None
            except OSError as exc:
                raise ImageError(f"layer {self.layer}: member {self.member[:200]!r}: cannot"
                                 f" set xattr {name[:100]!r}: {exc.strerror or exc}") from None

    def _meta_fd(self, fd: int, ti: tarfile.TarInfo) -> None:
        """Owner, mode, xattrs of an open file or directory (in that order: chown clears
        setuid bits and file capabilities)."""
        self._chown(lambda: os.fchown(fd, ti.uid, ti.gid))
        os.fchmod(fd, ti.mode & 0o7777)
        self._set_xattrs(fd, self._xattrs(ti))

    def _meta_at(self, pfd: int, name: str, ti: tarfile.TarInfo, *, chmod: bool) -> None:
        """Owner, mode, xattrs, mtime of ``name`` in ``pfd`` (symlinks not followed)."""
        self._chown(lambda: os.chown(name, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False))
        if chmod:  # the node was just made by us and is no symlink
            os.chmod(name, ti.mode & 0o7777, dir_fd=pfd)
        xattrs = self._xattrs(ti)
        if xattrs:
            self._set_xattrs(f"/proc/self/fd/{pfd}/{name}", xattrs)
        os.utime(name, ns=(_ns(ti.mtime), _ns(ti.mtime)), dir_fd=pfd, follow_symlinks=False)

    # ---------------------------------------------------------------- members

    def _entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        self.member = ti.name
        self.entries += 1
        if self.entries > self.max_entries:
            raise ImageTooLarge(f"layer {self.layer}: more than {self.max_entries} entries"
                                " in the image (a tar bomb?)")
        parts = self._normalise(ti.name)
        if parts and parts[-1].startswith(_WHITEOUT):
            self._whiteout(parts)
            return
        if ti.isdir():
            self._dir(parts, ti)
        elif not parts:
            raise self._bad("only a directory can name the root")
        elif ti.isreg():
            self._file(tf, parts, ti)
        elif ti.issym():
            self._symlink(parts, ti)
        elif ti.islnk():
            self._hardlink(parts, ti)
        elif ti.ischr() or ti.isblk() or ti.isfifo():
            self._node(parts, ti)
        else:
            raise self._bad(f"unsupported member type {ti.type!r}")
        self._mark(parts)

    def _mark(self, parts: tuple[str, ...]) -> None:
        """Record ``parts`` and its ancestors as the current layer's (for whiteouts)."""
        for i in range(len(parts), 0, -1):
            path = "/".join(parts[:i])
            if path in self.created:
                break
            self.created.add(path)

    def _dir(self, parts: tuple[str, ...], ti: tarfile.TarInfo) -> None:
        if not parts:
            fd = os.dup(self.root_fd)
        else:
            pfd = self._open_dir(parts[:-1], create=True)
            assert pfd is not None
            try:
                if not self._clear_for(pfd, parts[-1], is_dir=True):
                    os.mkdir(parts[-1], 0o700, dir_fd=pfd)
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=pfd)
            finally:
                os.close(pfd)
        try:
            self._meta_fd(fd, ti)
        finally:
            os.close(fd)
        self.dir_mtimes[parts] = _ns(ti.mtime)   # set at the end: later entries touch it

    def _file(self, tf: tarfile.TarFile, parts: tuple[str, ...], ti: tarfile.TarInfo) -> None:
        if self.bytes + ti.size > self.max_bytes:
            raise ImageTooLarge(f"layer {self.layer}: more than {self.max_bytes} bytes of"
                                " files in the image (a tar bomb?)")
        pfd = self._open_dir(parts[:-1], create=True)
        assert pfd is not None
        try:
            self._clear_for(pfd, parts[-1], is_dir=False)
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            src = tf.extractfile(ti)
            if src is not None:
                with open(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            self.bytes += ti.size
            self._meta_fd(fd, ti)
            os.utime(fd, ns=(_ns(ti.mtime), _ns(ti.mtime)))
        finally:
            os.close(fd)

    def _symlink(self, parts: tuple[str, ...], ti: tarfile.TarInfo) -> None:
        target = ti.linkname
        if not target or "\0" in target:
            raise self._bad("a symlink with an empty or NUL target")
        if _escapes(parts[:-1], target):
            raise self._bad(f"symlink escapes the root (-> {target[:200]!r})")
        pfd = self._open_dir(parts[:-1], create=True)
        assert pfd is not None
        try:
            self._clear_for(pfd, parts[-1], is_dir=False)
            os.symlink(target, parts[-1], dir_fd=pfd)
            self._meta_at(pfd, parts[-1], ti, chmod=False)
        finally:
            os.close(pfd)

    def _hardlink(self, parts: tuple[str, ...], ti: tarfile.TarInfo) -> None:
        tparts = self._normalise(ti.linkname, "hardlink target")
        if not tparts:
            raise self._bad("a hardlink to the root")
        if tparts == parts:
            return  # a link to itself: nothing to do
        missing = self._bad(f"hardlink target {ti.linkname[:200]!r} is not a regular file"
                            " in the image")
        tpfd = self._open_dir(tparts[:-1], create=False)
        if tpfd is None:
            raise missing
        try:
            try:
                st = os.stat(tparts[-1], dir_fd=tpfd, follow_symlinks=False)
            except FileNotFoundError:
                raise missing from None
            if not stat.S_ISREG(st.st_mode):
                raise missing
            pfd = self._open_dir(parts[:-1], create=True)
            assert pfd is not None
            try:
                self._clear_for(pfd, parts[-1], is_dir=False)
                try:
                    os.link(tparts[-1], parts[-1], src_dir_fd=tpfd, dst_dir_fd=pfd,
                            follow_symlinks=False)
                except FileNotFoundError:   # the replaced entry held the target
                    raise missing from None
            finally:
                os.close(pfd)
        finally:
            os.close(tpfd)

    def _node(self, parts: tuple[str, ...], ti: tarfile.TarInfo) -> None:
        pfd = self._open_dir(parts[:-1], create=True)
        assert pfd is not None
        try:
            self._clear_for(pfd, parts[-1], is_dir=False)
            mode = ti.mode & 0o7777
            if ti.isfifo():
                os.mkfifo(parts[-1], mode, dir_fd=pfd)
            else:
                kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
                try:
                    os.mknod(parts[-1], kind | mode, os.makedev(ti.devmajor, ti.devminor),
                             dir_fd=pfd)
                except PermissionError:
                    raise self._root_needed("making device nodes") from None
            self._meta_at(pfd, parts[-1], ti, chmod=True)
        finally:
            os.close(pfd)

    def _whiteout(self, parts: tuple[str, ...]) -> None:
        """``.wh.<name>`` removes name, ``.wh..wh..opq`` empties its directory; both only
        of what lower layers made."""
        dparts, base = parts[:-1], parts[-1]
        if base == _OPAQUE:
            dfd = self._open_dir(dparts, create=True)
            assert dfd is not None
            try:
                self._opaque(dfd, dparts)
            finally:
                os.close(dfd)
            return
        name = base[len(_WHITEOUT):]
        if name in ("", ".", ".."):
            raise self._bad("a whiteout without a valid name")
        if "/".join((*dparts, name)) in self.created:
            return   # whiteouts hide lower layers only
        dfd = self._open_dir(dparts, create=False)
        if dfd is None:
            return
        try:
            self._remove(dfd, name)
        finally:
            os.close(dfd)

    def _opaque(self, dfd: int, dparts: tuple[str, ...]) -> None:
        """Delete what is below ``dparts`` except what the current layer created."""
        with os.scandir(dfd) as it:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for name, is_dir in children:
            path = "/".join((*dparts, name))
            if path not in self.created:
                self._remove(dfd, name)
            elif is_dir:
                cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self._opaque(cfd, (*dparts, name))
                finally:
                    os.close(cfd)

    # ---------------------------------------------------------------- layers

    def _report(self, raw: BinaryIO, size: int, *, final: bool = False) -> None:
        if self.progress is None:
            return
        pos = size if final else min(size, os.lseek(raw.fileno(), 0, os.SEEK_CUR))
        done = self.done + pos
        if final or done - self.reported >= _PROGRESS_STEP:
            self.reported = done
            self.progress(done, self.total)

    def apply(self, blobs: BlobStore, layer: LayerRef) -> None:
        """Apply one layer. Raises ImageInvalid, ImageTooLarge, ImageError."""
        self.layer, self.member, self.created = layer.digest, "", set()
        with blobs.open(layer.digest) as raw:
            try:
                with _decompressed(raw, layer) as stream:
                    self._apply_tar(stream, raw, layer)
            except TarRefused as exc:
                where = f" after member {self.member[:200]!r}" if self.member else ""
                raise exc.image_error(f"layer {layer.digest}{where}") from None
            except _STREAM_ERRORS as exc:
                where = f" at member {self.member[:200]!r}" if self.member else ""
                raise ImageInvalid(f"layer {layer.digest} ({layer.media_type}) is not a"
                                   f" valid tar stream{where}: {exc}") from None
            self._report(raw, layer.size, final=True)
        self.done += layer.size

    def _apply_tar(self, stream: IO[bytes], raw: BinaryIO, layer: LayerRef) -> None:
        with open_untrusted_tar(stream, stream=True) as tf:
            while (ti := tf.next()) is not None:
                tf.members.clear()  # type: ignore[attr-defined]  # r| keeps every header
                try:
                    self._entry(tf, ti)
                except (ImageError, *_STREAM_ERRORS):
                    raise
                except OSError as exc:
                    raise ImageError(f"layer {self.layer}: member {self.member[:200]!r}:"
                                     f" {exc.strerror or exc}") from None
                except (ValueError, OverflowError) as exc:
                    raise self._bad(str(exc)) from None
                self._report(raw, layer.size)
        left = _MAX_TRAILING_BYTES   # read to the end: gzip checks its CRC, zstd exits
        while block := stream.read(_CHUNK):
            left -= len(block)
            if left < 0:
                raise ImageInvalid(f"layer {layer.digest}: more than {_MAX_TRAILING_BYTES}"
                                   " bytes after the end of the tar")

    def finish(self) -> None:
        """Set directory mtimes (deepest first), now that nothing changes them."""
        self.member = ""
        for parts in sorted(self.dir_mtimes, key=len, reverse=True):
            ns = self.dir_mtimes[parts]
            if not parts:
                os.utime(self.root_fd, ns=(ns, ns))
                continue
            try:
                pfd = self._open_dir(parts[:-1], create=False)
            except ImageInvalid:
                continue   # a later layer replaced a parent with a symlink
            if pfd is None:
                continue
            try:
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.utime(parts[-1], ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            finally:
                os.close(pfd)


@contextlib.contextmanager
def _decompressed(raw: BinaryIO, layer: LayerRef) -> Iterator[IO[bytes]]:
    """The layer's tar stream: ``raw`` itself, gunzipped, or piped through ``zstd -dcq``."""
    kind = _COMPRESSION[layer.media_type]
    if kind == "tar":
        yield raw
        return
    if kind == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            yield cast(IO[bytes], gz)
        return
    try:
        proc = subprocess.Popen(["zstd", "-dcq"], stdin=raw, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ImageError("zstd-compressed layers need the zstd command: install zstd") from None
    assert proc.stdout is not None and proc.stderr is not None
    try:
        try:
            yield proc.stdout
        except (tarfile.TarError, EOFError):
            # a truncated stream: blame zstd if it failed, with what it said
            with contextlib.suppress(subprocess.TimeoutExpired):
                if proc.wait(timeout=2) != 0:
                    raise ImageInvalid(f"layer {layer.digest}: zstd cannot decompress it:"
                                       f" {_tail(proc.stderr.read())}") from None
            raise
        rc = proc.wait()
        if rc != 0:
            raise ImageInvalid(f"layer {layer.digest}: zstd cannot decompress it:"
                               f" {_tail(proc.stderr.read())}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _tail(err: bytes) -> str:
    return err.decode("utf-8", "replace").strip()[-300:] or "no message"
