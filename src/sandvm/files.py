"""Files in a sandbox: read, write, list, stat, move, and whole directory trees as tar.

``AsyncFiles`` is the implementation; ``Files`` its sync twin (via the blocking portal).
Directory trees move as tar streams: ``untar_to_guest`` and ``tar_from_guest`` are the
guest's end (used by ``upload_dir``/``download_dir`` and by the server, which moves
the streams over HTTP); ``sandvm.tartree`` is the local end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from sandvm import _portal
from sandvm.agent_client import HostStream, guest_int, guest_list
from sandvm.core import check_guest_path
from sandvm.errors import (
    AgentProtocolError,
    AgentTimeout,
    FileTooLarge,
    InvalidPath,
    InvalidSpec,
    SandvmError,
)
from sandvm.guestops import GuestOps, entry_info
from sandvm.tartree import (
    SKIPPED_KEPT,
    check_caps,
    extract_tar,
    guest_skipped,
    tar_local_tree,
    tar_stream_cap,
)
from sandvm.values import (
    DEFAULT_READ_CAP,
    DEFAULT_TREE_CAP,
    DEFAULT_TREE_ENTRIES,
    LIST_CAP,
    DirTransfer,
    EntryInfo,
    WriteInfo,
)

if TYPE_CHECKING:
    from sandvm.link import SandboxLink


async def _in_thread(chunks: Iterable[bytes]) -> AsyncGenerator[bytes, None]:
    """``chunks`` as an async iterable, each item fetched in a worker thread."""
    it = iter(chunks)
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, it, done)
        if chunk is done:
            return
        yield chunk  # type: ignore[misc]  # checked by write_stream


def _count(msg: dict[str, Any], key: str) -> int:
    return guest_int(msg, key, what="transfer report")


class AsyncFiles:
    """``sandbox.files``: files in the guest. Paths must be absolute."""

    def __init__(self, sb: SandboxLink) -> None:
        self._sb = sb

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
                    make_parents: bool = True) -> WriteInfo:
        """Write a whole file atomically (temp file, fsync, rename). Raises GuestError."""
        check_guest_path(path)
        if isinstance(data, str):
            data = data.encode()
        st = await self._ops().write_file(path=path, mode=mode, make_parents=make_parents)
        sender = asyncio.get_running_loop().create_task(self._send(st, data))
        try:
            while True:
                item = await st.next(self._sb.op_timeout + len(data) / 1e6)
                if item.kind == "reply":
                    size = guest_int(item.message or {}, "size", what="write report")
                    if size != len(data):
                        raise AgentProtocolError(f"guest reports {size!r} bytes, sent {len(data)}")
                    return WriteInfo(path=path, size=len(data))
                if item.kind == "error":
                    assert item.error is not None
                    raise item.error
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            await st.reset()  # no-op once the guest replied; otherwise it drops the temp file

    @staticmethod
    async def _send(st: HostStream, data: bytes) -> None:
        with contextlib.suppress(SandvmError):
            await st.send_data(data)
            await st.send_eof()

    async def write_stream(self, path: str, chunks: AsyncIterable[bytes], *,
                           mode: int = 0o644, make_parents: bool = True) -> WriteInfo:
        """Write a file from ``chunks`` as they come, atomically like ``write`` (temp
        file, fsync, rename once the last chunk is in): for content too large to hold
        at once, or arriving over a network. Sending is paced by the channel's flow
        control. If iterating ``chunks`` raises, the write is abandoned (the guest
        drops its temp file, ``path`` is untouched) and that error propagates.
        Allowed while the sandbox is running. Raises GuestError (e.g. ENOSPC, a
        missing parent without ``make_parents``), InvalidPath, InvalidSpec (a chunk
        that is not bytes), AgentTimeout,
        AgentProtocolError, SandboxStateError."""
        check_guest_path(path)
        st = await self._ops().write_file(path=path, mode=mode, make_parents=make_parents)
        sent = 0
        try:
            async for chunk in chunks:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise InvalidSpec(f"write_stream takes chunks of bytes, got"
                                      f" {type(chunk).__name__}")
                if not chunk:
                    continue
                try:
                    await st.send_data(bytes(chunk))
                except SandvmError:
                    if not st.closed:
                        raise
                    break  # the guest refused: its error is in the stream
                sent += len(chunk)
            else:
                await st.send_eof()
            while True:  # the guest fsyncs before it replies: allow it 1 MB/s
                item = await st.next(self._sb.op_timeout + sent / 1e6)
                if item.kind == "reply":
                    size = guest_int(item.message or {}, "size", what="write report")
                    if size != sent:
                        raise AgentProtocolError(f"guest reports {size!r} bytes, sent {sent}")
                    return WriteInfo(path=path, size=sent)
                if item.kind == "error":
                    assert item.error is not None
                    raise item.error
        finally:
            await st.reset()  # no-op once the guest replied; otherwise it drops the temp file

    @overload
    async def read(self, path: str, *, format: Literal["text"] = ...,
                   max_bytes: int = ...) -> str: ...

    @overload
    async def read(self, path: str, *, format: Literal["bytes"],
                   max_bytes: int = ...) -> bytes: ...

    async def read(self, path: str, *, format: Literal["text", "bytes"] = "text",
                   max_bytes: int = DEFAULT_READ_CAP) -> str | bytes:
        """Read a whole file (as text or bytes). A file over ``max_bytes`` raises
        FileTooLarge rather than returning part of it. Raises GuestFileNotFound."""
        chunks: list[bytes] = []
        async for chunk in self.read_stream(path, max_bytes=max_bytes):
            chunks.append(chunk)
        data = b"".join(chunks)
        return data.decode("utf-8", "replace") if format == "text" else data

    async def read_stream(self, path: str, *, max_bytes: int = DEFAULT_READ_CAP
                          ) -> AsyncGenerator[bytes, None]:
        """Yield a file's bytes chunk by chunk, paced by flow control; capped like ``read``."""
        check_guest_path(path)
        if max_bytes < 0:
            raise InvalidSpec("max_bytes must be >= 0")
        st = await self._ops().read_file(path=path, max_bytes=max_bytes)
        got = 0
        done = False
        try:
            while True:
                item = await st.next(self._sb.op_timeout)
                if item.kind == "data":
                    got += len(item.data)
                    if got > max_bytes:
                        raise FileTooLarge(f"{path} is larger than the cap of {max_bytes} bytes")
                    yield item.data
                elif item.kind == "reply":
                    size = guest_int(item.message or {}, "size", what="read report")
                    if size != got:
                        raise AgentProtocolError(f"guest reports {size!r} bytes, sent {got}")
                    done = True
                    return
                elif item.kind == "error":
                    assert item.error is not None
                    done = True
                    raise item.error
        finally:
            if not done:
                await st.reset()

    async def list(self, path: str, *, depth: int = 1) -> list[EntryInfo]:
        """Entries under a directory, sorted by name (``depth`` levels)."""
        check_guest_path(path)
        st = await self._ops().list_dir(path=path, depth=depth)
        entries: list[EntryInfo] = []
        try:
            while True:
                item = await st.next(self._sb.op_timeout)
                if item.kind == "event":
                    batch = guest_list(item.message or {}, "entries", max_len=LIST_CAP,
                                       what="listing")
                    entries.extend(entry_info(e) if isinstance(e, dict) else entry_info({})
                                   for e in batch)
                    if len(entries) > LIST_CAP:
                        raise AgentProtocolError(f"guest listed more than {LIST_CAP} entries")
                elif item.kind == "reply":
                    if guest_int(item.message or {}, "count", what="listing") != len(entries):
                        raise AgentProtocolError("guest's listing count does not match")
                    return entries
                elif item.kind == "error":
                    assert item.error is not None
                    raise item.error
                else:
                    raise AgentProtocolError(f"unexpected {item.kind} in a listing")
        finally:
            await st.reset()

    async def stat(self, path: str) -> EntryInfo:
        check_guest_path(path)
        return await self._ops().stat(path=path, timeout=self._sb.op_timeout)

    async def exists(self, path: str) -> bool:
        check_guest_path(path)
        return await self._ops().exists(path=path, timeout=self._sb.op_timeout)

    async def make_dir(self, path: str, *, mode: int = 0o755) -> bool:
        """Create a directory and its parents; False if it already existed."""
        check_guest_path(path)
        return await self._ops().make_dir(path=path, mode=mode, timeout=self._sb.op_timeout)

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        check_guest_path(path)
        await self._ops().remove(path=path, recursive=recursive, timeout=self._sb.op_timeout)

    async def rename(self, old_path: str, new_path: str, *, overwrite: bool = True) -> EntryInfo:
        check_guest_path(old_path)
        check_guest_path(new_path)
        await self._ops().rename(path=old_path, dst=new_path, overwrite=overwrite,
                                timeout=self._sb.op_timeout)
        return await self.stat(new_path)

    async def upload_dir(self, local_dir: str | os.PathLike[str], guest_dir: str
                         ) -> DirTransfer:
        """Copy the local tree ``local_dir`` into ``guest_dir`` (created if missing).

        Moved as a tar stream; files keep their modes (minus set-id bits and
        group/other write) and mtimes and belong to root in the guest. The guest
        spools the stream to an unlinked temp file in ``guest_dir``'s file system
        and extracts it when it is complete (so it briefly needs twice the
        space), refusing absolute or escaping paths and links that lead out of
        ``guest_dir``: those, special files and unreadable files are skipped and
        named in the result. Raises InvalidPath if ``local_dir`` is not a
        directory, GuestError (e.g. ENOSPC) if extracting fails in the guest.
        """
        check_guest_path(guest_dir)
        top = Path(local_dir)
        if not top.is_dir():
            raise InvalidPath(f"{top} is not a local directory")
        local_skipped: list[str] = []
        async with contextlib.aclosing(tar_local_tree(top, local_skipped)) as chunks:
            got = await untar_to_guest(self._sb, guest_dir, chunks)
        return dataclasses.replace(
            got, skipped=tuple((local_skipped + list(got.skipped))[:SKIPPED_KEPT]))

    async def download_dir(self, guest_dir: str, local_dir: str | os.PathLike[str], *,
                           max_bytes: int = DEFAULT_TREE_CAP,
                           max_files: int = DEFAULT_TREE_ENTRIES) -> DirTransfer:
        """Copy the guest tree ``guest_dir`` into ``local_dir`` (created if missing).

        Moved as a tar stream and extracted as it arrives, treating it as
        hostile: tarfile's ``data`` filter plus checks of our own (nothing is
        written outside ``local_dir`` or through a symlink, links leading out are
        dropped, no special files, no set-id bits, files belong to you). Refused
        entries are skipped and named in the result. Raises FileTooLarge past
        ``max_bytes`` of file content or ``max_files`` entries (what was
        extracted so far stays), GuestFileNotFound if ``guest_dir`` is missing.
        """
        check_guest_path(guest_dir)
        check_caps(max_bytes, max_files)
        reported: list[str] = []
        async with contextlib.aclosing(tar_from_guest(self._sb, guest_dir, reported,
                                                      max_bytes=max_bytes,
                                                      max_files=max_files)) as chunks:
            got = await extract_tar(chunks, local_dir, max_bytes=max_bytes,
                                    max_files=max_files)
        return dataclasses.replace(
            got, skipped=tuple((list(got.skipped) + reported)[:SKIPPED_KEPT]))

    async def chown(self, path: str, *, user: str, mode: int | None = None) -> None:
        """Give ``path`` to ``user`` (a name or ``uid[:gid]`` from the image's
        /etc/passwd), and set its ``mode`` if given. A symbolic link is refused, not
        followed. Allowed while the sandbox runs. Raises InvalidSpec, InvalidPath,
        GuestFileNotFound, GuestError (an unknown user, a link), SandboxStateError."""
        check_guest_path(path)
        if not isinstance(user, str) or not user or len(user) > 256:
            raise InvalidSpec("user must be a name or 'uid[:gid]'")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int)
                                 or not 0 <= mode <= 0o7777):
            raise InvalidSpec(f"mode must be 0..0o7777 or None, got {mode!r}")
        await self._ops().chown(path=path, user=user, mode=mode, timeout=self._sb.op_timeout)

    async def mount_tmpfs(self, path: str, *, mode: int = 0o700, user: str | None = None,
                          size_bytes: int = 4 << 20) -> None:
        """Mount a private tmpfs at ``path`` (created if missing): memory only, so what is
        written there never reaches the guest's disks (for secrets; a snapshot's memory
        holds it, though); nosuid, nodev, noexec; at most ``size_bytes``; owned by
        ``user`` (default root) with ``mode``. A tmpfs already mounted there is not
        mounted again: it only gets ``mode`` (and ``user``, if given). Allowed while the
        sandbox runs. Raises InvalidSpec, InvalidPath, GuestError (e.g. the path is not a
        directory, an unknown user), SandboxStateError."""
        check_guest_path(path)
        if user is not None and (not isinstance(user, str) or len(user) > 256):
            raise InvalidSpec("user must be a name or 'uid[:gid]'")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise InvalidSpec(f"mode must be 0..0o777, got {mode!r}")
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or \
                not 4096 <= size_bytes <= 1 << 30:
            raise InvalidSpec(f"size_bytes must be between 4 KiB and 1 GiB, got {size_bytes!r}")
        await self._ops().mount_tmpfs(path=path, mode=mode, user=user, size=size_bytes,
                                      timeout=self._sb.op_timeout)

    def _ops(self) -> GuestOps:
        """The guest's operations (raises like ``AsyncSandbox.connection``)."""
        return GuestOps(self._sb.connection())

class FileTransfer:
    """Sync write/read/read_stream over any async twin that has them (the local
    AsyncFiles, or the remote SDK's)."""

    def __init__(self, inner: Any) -> None:
        self._a = inner

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
              make_parents: bool = True) -> WriteInfo:
        """See AsyncFiles.write."""
        info: WriteInfo = _portal.call(self._a.write(path, data, mode=mode,
                                                     make_parents=make_parents))
        return info

    @overload
    def read(self, path: str, *, format: Literal["text"] = ..., max_bytes: int = ...) -> str: ...

    @overload
    def read(self, path: str, *, format: Literal["bytes"], max_bytes: int = ...) -> bytes: ...

    def read(self, path: str, *, format: Literal["text", "bytes"] = "text",
             max_bytes: int = DEFAULT_READ_CAP) -> str | bytes:
        data: bytes = _portal.call(self._a.read(path, format="bytes", max_bytes=max_bytes))
        return data.decode("utf-8", "replace") if format == "text" else data

    def read_stream(self, path: str, *, max_bytes: int = DEFAULT_READ_CAP) -> Iterator[bytes]:
        """Yield a file's bytes chunk by chunk (see AsyncFiles.read_stream)."""
        agen = self._a.read_stream(path, max_bytes=max_bytes)
        try:
            while True:
                try:
                    yield _portal.call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            _portal.call(agen.aclose())


class Files(FileTransfer):
    """Sync twin of AsyncFiles."""

    def __init__(self, inner: AsyncFiles) -> None:
        super().__init__(inner)
        self._a: AsyncFiles = inner

    def write_stream(self, path: str, chunks: Iterable[bytes], *, mode: int = 0o644,
                     make_parents: bool = True) -> WriteInfo:
        """See AsyncFiles.write_stream; ``chunks`` is iterated in a worker thread (it may
        block, e.g. reading a file)."""
        return _portal.call(self._a.write_stream(path, _in_thread(chunks), mode=mode,
                                                 make_parents=make_parents))

    def list(self, path: str, *, depth: int = 1) -> list[EntryInfo]:
        return _portal.call(self._a.list(path, depth=depth))

    def stat(self, path: str) -> EntryInfo:
        return _portal.call(self._a.stat(path))

    def exists(self, path: str) -> bool:
        return _portal.call(self._a.exists(path))

    def make_dir(self, path: str, *, mode: int = 0o755) -> bool:
        return _portal.call(self._a.make_dir(path, mode=mode))

    def remove(self, path: str, *, recursive: bool = True) -> None:
        _portal.call(self._a.remove(path, recursive=recursive))

    def rename(self, old_path: str, new_path: str, *, overwrite: bool = True) -> EntryInfo:
        return _portal.call(self._a.rename(old_path, new_path, overwrite=overwrite))

    def chown(self, path: str, *, user: str, mode: int | None = None) -> None:
        """See AsyncFiles.chown."""
        _portal.call(self._a.chown(path, user=user, mode=mode))

    def mount_tmpfs(self, path: str, *, mode: int = 0o700, user: str | None = None,
                    size_bytes: int = 4 << 20) -> None:
        """See AsyncFiles.mount_tmpfs."""
        _portal.call(self._a.mount_tmpfs(path, mode=mode, user=user, size_bytes=size_bytes))

    def upload_dir(self, local_dir: str | os.PathLike[str], guest_dir: str) -> DirTransfer:
        """See AsyncFiles.upload_dir."""
        return _portal.call(self._a.upload_dir(local_dir, guest_dir))

    def download_dir(self, guest_dir: str, local_dir: str | os.PathLike[str], *,
                     max_bytes: int = DEFAULT_TREE_CAP,
                     max_files: int = DEFAULT_TREE_ENTRIES) -> DirTransfer:
        """See AsyncFiles.download_dir."""
        return _portal.call(self._a.download_dir(guest_dir, local_dir, max_bytes=max_bytes,
                                                 max_files=max_files))


async def untar_to_guest(sb: SandboxLink, guest_dir: str, chunks: AsyncIterable[bytes]
                         ) -> DirTransfer:
    """Extract the tar stream ``chunks`` into ``guest_dir`` of sandbox ``sb`` (created
    if missing): ``AsyncFiles.upload_dir`` sends a local tree through it, the server a
    tar it receives over HTTP. The guest spools it and refuses escaping paths
    and links (skipped and named in the result). Raises GuestError (e.g. ENOSPC),
    AgentTimeout, and what iterating ``chunks`` raises (the upload is then abandoned)."""
    check_guest_path(guest_dir)
    st = await GuestOps(sb.connection()).untar(path=guest_dir)

    async def send() -> int:
        sent = 0
        async for chunk in chunks:
            if chunk:
                await st.send_data(chunk)
                sent += len(chunk)
        await st.send_eof()
        return sent

    sender = asyncio.get_running_loop().create_task(send())
    item_task = asyncio.get_running_loop().create_task(st.next(None))
    try:
        await asyncio.wait({sender, item_task}, return_when=asyncio.FIRST_COMPLETED)
        if not item_task.done():
            sent = sender.result()  # a failure of the source raises here
            # the guest extracts once it has everything: allow it 1 MB/s
            item = await asyncio.wait_for(item_task, sb.op_timeout + sent / 1e6)
        else:
            item = item_task.result()
        if item.kind == "error":
            assert item.error is not None
            raise item.error
        if item.kind != "reply":
            raise AgentProtocolError(f"unexpected {item.kind} while uploading a tree")
        msg = item.message or {}
        return DirTransfer(files=_count(msg, "files"), dirs=_count(msg, "dirs"),
                           symlinks=_count(msg, "symlinks"), bytes=_count(msg, "bytes"),
                           skipped=tuple(guest_skipped(msg.get("skipped"))))
    except TimeoutError:
        raise AgentTimeout("the guest did not finish extracting the tree in time") from None
    finally:
        for t in (sender, item_task):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        await st.reset()  # no-op once the guest replied; otherwise it drops its spool

async def tar_from_guest(sb: SandboxLink, guest_dir: str, skipped: list[str], *,
                         max_bytes: int = DEFAULT_TREE_CAP,
                         max_files: int = DEFAULT_TREE_ENTRIES) -> AsyncGenerator[bytes, None]:
    """The tree ``guest_dir`` of sandbox ``sb`` as a tar stream, not extracted: what
    ``AsyncFiles.download_dir`` feeds to ``extract_tar``, and what the server sends over
    HTTP (the SDK's ``extract_tar`` unpacks it on the other side). Capped by
    ``max_bytes`` of file content and ``max_files`` entries. The entries the guest
    left out are appended to ``skipped``, with why, as the stream ends. Raises
    GuestFileNotFound, FileTooLarge, InvalidSpec, GuestError."""
    check_guest_path(guest_dir)
    check_caps(max_bytes, max_files)
    stream_cap = tar_stream_cap(max_bytes, max_files)
    st = await GuestOps(sb.connection()).tar(path=guest_dir, max_bytes=max_bytes,
                                             max_files=max_files)
    done = False
    try:
        got = 0
        while True:
            item = await st.next(sb.op_timeout)
            if item.kind == "data":
                got += len(item.data)
                if got > stream_cap:
                    raise FileTooLarge(f"the guest sent more than {stream_cap} bytes for"
                                       f" {guest_dir}: pass a larger max_bytes")
                yield item.data
            elif item.kind == "reply":
                done = True
                skipped.extend(guest_skipped((item.message or {}).get("skipped")))
                return
            elif item.kind == "error":
                done = True
                assert item.error is not None
                raise item.error
    finally:
        if not done:
            await st.reset()
