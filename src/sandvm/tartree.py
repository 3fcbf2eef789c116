"""Local directory trees as tar streams, both ways: the host's end of ``upload_dir``
and ``download_dir``, for the local sandbox (``sandvm.files``) and the remote SDK
(``sandvm.client``), which moves the same streams over HTTP.

``tar_local_tree`` reads a local tree into a tar stream; ``extract_tar`` extracts a
hostile one (from a guest, or a server speaking for one) into a local directory,
member by member through ``sandvm.tarsafe`` and checks of its own.
Nothing here talks to a guest: ``sandvm.files`` does that.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import stat as stat_mod
import tarfile
from collections.abc import AsyncGenerator, AsyncIterable, Iterator
from pathlib import Path
from typing import Any

from sandvm.errors import AgentProtocolError, FileTooLarge, InvalidPath, InvalidSpec, SandvmError
from sandvm.values import DEFAULT_TREE_CAP, DEFAULT_TREE_ENTRIES, DirTransfer

SKIPPED_KEPT = 100
"""How many skipped entries a transfer names at the most (the local side's and the
guest's together)."""

_TAR_BLOCK = 512
_LINK_HOPS = 40


def check_caps(max_bytes: int, max_files: int) -> None:
    """Raise InvalidSpec unless ``max_bytes`` and ``max_files`` are positive ints."""
    for what, v in (("max_bytes", max_bytes), ("max_files", max_files)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidSpec(f"{what} must be a positive int, got {v!r}")


def guest_skipped(skipped: Any) -> list[str]:
    """The entries a guest's transfer report says it left out (its ``skipped``), as
    at most ``SKIPPED_KEPT`` strings of at most 400 characters; [] if it is no list."""
    if not isinstance(skipped, list):
        return []
    return [str(x)[:400] for x in skipped[:SKIPPED_KEPT]]


class _TarReader:
    """A local directory tree as a tar stream (PAX), read in pieces with ``read``.

    Regular files, directories, symlinks and hard links; special files and
    unreadable entries are skipped (named in ``skipped``). Blocking: call it
    from a worker thread.
    """

    def __init__(self, top: Path) -> None:
        self.top = top
        self.skipped: list[str] = []
        self.sent_files = 0
        self._gen = self._pieces()
        self._buf = bytearray()
        self._done = False

    def _skip(self, arc: str, why: str) -> None:
        if len(self.skipped) < SKIPPED_KEPT:
            self.skipped.append(f"{arc}: {why}")

    def _pieces(self) -> Iterator[bytes]:
        inodes: dict[tuple[int, int], str] = {}
        stack: list[tuple[Path, str]] = [(self.top, "")]
        while stack:
            d, prefix = stack.pop()
            try:
                names = sorted(os.listdir(d))
            except OSError as exc:
                self._skip(prefix or ".", exc.strerror or str(exc))
                continue
            subdirs = []
            for name in names:
                full, arc = d / name, prefix + name
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                ti = tarfile.TarInfo(arc)
                ti.mode = stat_mod.S_IMODE(st.st_mode)
                ti.mtime = int(st.st_mtime)
                if stat_mod.S_ISDIR(st.st_mode):
                    ti.type = tarfile.DIRTYPE
                    subdirs.append((full, arc + "/"))
                elif stat_mod.S_ISLNK(st.st_mode):
                    try:
                        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(full)
                    except OSError:
                        continue  # gone meanwhile
                elif stat_mod.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in inodes:
                        ti.type, ti.linkname = tarfile.LNKTYPE, inodes[key]
                    else:
                        try:
                            f = open(full, "rb")  # noqa: SIM115 - closed below
                        except OSError as exc:
                            self._skip(arc, exc.strerror or str(exc))
                            continue
                        with f:
                            ti.size = st.st_size
                            yield ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                            self.sent_files += 1
                            if st.st_nlink > 1:
                                inodes[key] = arc
                            left = st.st_size
                            while left > 0:
                                data = f.read(min(1 << 20, left))
                                if not data:
                                    raise SandvmError(
                                        f"{full} shrank while it was uploaded: upload a tree"
                                        " that does not change meanwhile")
                                left -= len(data)
                                yield data
                            if st.st_size % _TAR_BLOCK:
                                yield bytes(_TAR_BLOCK - st.st_size % _TAR_BLOCK)
                        continue
                else:
                    self._skip(arc, "a special file")
                    continue
                yield ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            stack.extend(reversed(subdirs))
        yield bytes(2 * _TAR_BLOCK)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the stream; b"" at its end."""
        while len(self._buf) < n and not self._done:
            try:
                self._buf += next(self._gen)
            except StopIteration:
                self._done = True
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _confined(dest: Path, start: list[str], target: str) -> bool:
    """Whether ``target`` (a link's text, relative to ``dest/start``) stays inside ``dest``.

    Resolved component by component against what is on disk under ``dest``,
    following symlinks found there (at most 40) without ever looking outside.
    """
    if target.startswith("/"):
        return False
    stack = list(start)
    todo = collections.deque(target.split("/"))
    hops = 0
    while todo:
        c = todo.popleft()
        if c in ("", "."):
            continue
        if c == "..":
            if not stack:
                return False
            stack.pop()
            continue
        p = dest.joinpath(*stack, c)
        if p.is_symlink():
            hops += 1
            link = os.readlink(p)
            if hops > _LINK_HOPS or link.startswith("/"):
                return False
            todo.extendleft(reversed(link.split("/")))
            continue
        stack.append(c)
    return True


class _TreeExtractor:
    """Extract a hostile tar stream into ``dest`` (blocking: run it in a worker thread).

    Every member goes through tarfile's ``data`` filter and, before it, through
    checks that do not rely on it alone: no ``..``, nothing written through a
    symlink, links resolved step by step inside ``dest``; once done, every
    symlink extracted is checked again against the final tree (a later member
    may change where an earlier link leads) and removed if it leads out.
    Refused members are skipped and named. More than ``max_files`` entries or
    ``max_bytes`` of file content raise FileTooLarge.
    """

    def __init__(self, dest: Path, *, max_bytes: int, max_files: int) -> None:
        self.dest = Path(os.path.realpath(dest))
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.entries = 0
        self.announced = 0
        self.counts = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
        self.skipped: list[str] = []
        self.links: list[tuple[list[str], str]] = []

    def _skip(self, name: str, why: str) -> None:
        if len(self.skipped) < SKIPPED_KEPT:
            self.skipped.append(f"{name[:300]}: {why}")

    def _members(self, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        for m in tar:
            self.entries += 1
            if self.entries > self.max_files:
                raise FileTooLarge(f"the guest's tree holds more than {self.max_files}"
                                   " entries: pass a larger max_files")
            if m.isreg():
                self.announced += m.size
                if self.announced > self.max_bytes:
                    raise FileTooLarge(f"the guest's tree holds more than {self.max_bytes}"
                                       " bytes: pass a larger max_bytes")
            yield m

    def _check(self, m: tarfile.TarInfo) -> tuple[list[str], str | None]:
        name = m.name
        if len(name) > 4096 or len(m.linkname) > 4096:
            return [], "name too long"
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            return parts, "'..' in its name"
        for i in range(len(parts) - 1):
            if self.dest.joinpath(*parts[:i + 1]).is_symlink():
                return parts, "it would be written through a symlink"
        if m.issym() and not _confined(self.dest, parts[:-1], m.linkname):
            return parts, "a symlink leading outside the destination"
        if m.islnk():
            lparts = [p for p in m.linkname.split("/") if p not in ("", ".")]
            target = self.dest.joinpath(*lparts)
            if m.linkname.startswith("/") or ".." in lparts or not lparts or any(
                    self.dest.joinpath(*lparts[:i + 1]).is_symlink()
                    for i in range(len(lparts))) or not target.is_file():
                return parts, "a hard link to something that is not a file of the tree"
        return parts, None

    def _filter(self, m: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        parts, why = self._check(m)
        if why is None:
            try:
                safe = tarfile.data_filter(m, dest)
            except tarfile.FilterError as exc:
                why = str(exc)
        if why is not None:
            self._skip(m.name, why)
            return None
        leaf = self.dest.joinpath(*parts)
        if parts and (leaf.is_symlink() or (leaf.exists() and not leaf.is_dir())):
            # replace it, never write through it (nor into a file hard-linked elsewhere)
            leaf.unlink()
        if safe.isdir():
            self.counts["dirs"] += 1
        elif safe.issym():
            # symlinks are made once every file is written: nothing is ever written
            # through one, and a stream that breaks off leaves none behind
            self.links.append((parts, safe.linkname))
            return None
        else:
            self.counts["files"] += 1
            self.counts["bytes"] += safe.size if safe.isreg() else 0
        return safe

    def run(self, fd: int) -> None:
        """Read the stream from pipe ``fd`` (closed when done) and extract it. Raises
        FileTooLarge, AgentProtocolError (the guest's archive is malformed or refused:
        huge extended headers, sparse members)."""
        from sandvm.tarsafe import open_untrusted_tar

        try:
            with os.fdopen(fd, "rb") as f, open_untrusted_tar(f, stream=True) as tar:
                tar.extractall(self.dest, members=self._members(tar), filter=self._filter)
        except (tarfile.TarError, EOFError) as exc:
            raise AgentProtocolError(f"the guest sent a bad archive: {exc}") from None
        made = []
        for parts, target in self.links:
            leaf = self.dest.joinpath(*parts)
            if any(self.dest.joinpath(*parts[:i + 1]).is_symlink()
                   for i in range(len(parts) - 1)) or not _confined(self.dest, parts[:-1],
                                                                    target):
                self._skip("/".join(parts), "a symlink leading outside the destination")
                continue
            with contextlib.suppress(FileNotFoundError):
                if leaf.is_dir() and not leaf.is_symlink():
                    self._skip("/".join(parts), "a symlink over a directory")
                    continue
                leaf.unlink()
            os.symlink(target, leaf)
            made.append(parts)
        # links made later can change where earlier ones lead (l -> p/.., then p -> .):
        # check every one against the final tree until nothing changes
        root = os.path.realpath(self.dest)
        changed = True
        while changed:
            changed = False
            for parts in list(made):
                real = os.path.realpath(self.dest.joinpath(*parts))
                if real != root and not real.startswith(root + os.sep):
                    self.dest.joinpath(*parts).unlink()
                    made.remove(parts)
                    self._skip("/".join(parts), "a symlink leading outside the destination")
                    changed = True
        self.counts["symlinks"] += len(made)

    def result(self, reported: Any) -> DirTransfer:
        """What was extracted; ``reported`` is the guest's ``skipped`` (or None)."""
        extra = guest_skipped(reported)
        return DirTransfer(files=self.counts["files"], dirs=self.counts["dirs"],
                           symlinks=self.counts["symlinks"], bytes=self.counts["bytes"],
                           skipped=tuple((self.skipped + extra)[:SKIPPED_KEPT]))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _pipe_write(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking pipe ``fd``, waiting on the loop for room.

    Raises BrokenPipeError once the reading end is closed.
    """
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _wake, fut)
            try:
                await fut
            finally:
                loop.remove_writer(fd)


def tar_stream_cap(max_bytes: int, max_files: int) -> int:
    """The most bytes a tar stream of ``max_files`` entries and ``max_bytes`` of file
    content may take: headers and padding on top of the content, generously."""
    return max_bytes + max_files * 3 * _TAR_BLOCK + (1 << 20)


async def extract_tar(chunks: AsyncIterable[bytes], local_dir: str | os.PathLike[str], *,
                      max_bytes: int = DEFAULT_TREE_CAP,
                      max_files: int = DEFAULT_TREE_ENTRIES) -> DirTransfer:
    """Extract the hostile tar stream ``chunks`` into ``local_dir`` (created if missing)
    with ``download_dir``'s checks (tarfile's ``data`` filter and ours: nothing written
    outside ``local_dir`` or through a symlink, links leading out dropped), as it
    arrives: for ``download_dir``, and the remote SDK, which gets the tree over HTTP.
    The result's ``skipped`` names the entries refused here. Raises FileTooLarge past
    ``max_bytes`` of file content, ``max_files`` entries or their stream's cap (what was
    extracted so far stays), AgentProtocolError for a malformed archive, InvalidSpec."""
    check_caps(max_bytes, max_files)
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)
    extractor = _TreeExtractor(dest, max_bytes=max_bytes, max_files=max_files)
    stream_cap = tar_stream_cap(max_bytes, max_files)
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    try:
        job = asyncio.get_running_loop().create_task(asyncio.to_thread(extractor.run, rfd))
    except BaseException:
        os.close(rfd)
        os.close(wfd)
        raise
    try:
        got = 0
        async for chunk in chunks:
            got += len(chunk)
            if got > stream_cap:
                raise FileTooLarge(f"the tree's stream is over {stream_cap} bytes: pass a"
                                   " larger max_bytes")
            if wfd < 0:
                continue  # the archive ended: the rest is padding
            try:
                await _pipe_write(wfd, chunk)
            except BrokenPipeError:
                # the extractor stopped: at the archive's end, or on an error
                os.close(wfd)
                wfd = -1
                await job
        if wfd >= 0:
            os.close(wfd)
            wfd = -1
        await job
        return extractor.result(None)
    finally:
        if wfd >= 0:
            os.close(wfd)
        if not job.done():
            with contextlib.suppress(BaseException):
                await job
        elif not job.cancelled():
            job.exception()  # retrieved: the first error is what propagates


async def tar_local_tree(local_dir: str | os.PathLike[str], skipped: list[str]
                         ) -> AsyncGenerator[bytes, None]:
    """The local tree ``local_dir`` as a tar stream (PAX; regular files, directories,
    symlinks, hard links), read in a worker thread: for ``upload_dir``, and the remote
    SDK, which sends it over HTTP. Entries left out (special or unreadable files) are
    appended to ``skipped``, with why, as the stream ends. Raises InvalidPath if
    ``local_dir`` is not a directory, SandvmError if a file shrinks while read."""
    top = Path(local_dir)
    if not top.is_dir():
        raise InvalidPath(f"{top} is not a local directory")
    reader = _TarReader(top)
    while True:
        chunk = await asyncio.to_thread(reader.read, 1 << 20)
        if not chunk:
            break
        yield chunk
    skipped.extend(reader.skipped)
