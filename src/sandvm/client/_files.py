"""The remote SDK's ``sandbox.files``: the local files API over HTTP (whole files and
streams both ways, entries, chown, tmpfs, directory trees as tar streams)."""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any, Literal, overload

import httpx

from sandvm.client._http import SandboxCalls, chunk_of, event_of, ndjson_lines
from sandvm.core import check_guest_path
from sandvm.errors import (
    FileTooLarge,
    InvalidPath,
    InvalidSpec,
    ServerUnreachable,
    ServiceError,
    error_from_dict,
)
from sandvm.tartree import extract_tar, tar_local_tree
from sandvm.values import (
    DEFAULT_READ_CAP,
    DEFAULT_TREE_CAP,
    DEFAULT_TREE_ENTRIES,
    DirTransfer,
    EntryInfo,
    WriteInfo,
)

__all__ = ["AsyncFiles", "entry_from_json", "transfer_from_json"]


def entry_from_json(d: object) -> EntryInfo:
    """An EntryInfo from the server's JSON. Raises ServiceError if it is malformed."""
    try:
        assert isinstance(d, dict)
        target = d.get("target")
        return EntryInfo(path=str(d["path"]), name=str(d["name"]), type=str(d["type"]),
                         size=int(d["size"]), mode=int(d["mode"]), mtime=float(d["mtime"]),
                         uid=int(d.get("uid", 0)), gid=int(d.get("gid", 0)),
                         target=None if target is None else str(target))
    except (AssertionError, KeyError, TypeError, ValueError):
        raise ServiceError("the server sent a malformed file entry") from None


def transfer_from_json(d: object) -> DirTransfer:
    """A DirTransfer from the server's JSON. Raises ServiceError if it is malformed."""
    try:
        assert isinstance(d, dict) and isinstance(d["skipped"], list)
        return DirTransfer(files=int(d["files"]), dirs=int(d["dirs"]),
                           symlinks=int(d["symlinks"]), bytes=int(d["bytes"]),
                           skipped=tuple(str(s)[:400] for s in d["skipped"][:100]))
    except (AssertionError, KeyError, TypeError, ValueError):
        raise ServiceError("the server sent a malformed transfer report") from None


class AsyncFiles:
    """``sandbox.files``: files in the remote sandbox. Paths must be absolute."""

    def __init__(self, sb: SandboxCalls) -> None:
        self._sb = sb

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
                    make_parents: bool = True) -> WriteInfo:
        """Write a whole file atomically (temp file, fsync, rename in the guest). Raises
        RequestTooLarge (over the server's cap), GuestError, InvalidPath."""
        self._sb.check_open()
        if isinstance(data, str):
            data = data.encode()
        res = await self._sb.api.call(
            "PUT", self._sb.path("/files"),
            params={"path": path, "mode": mode, "make_parents": make_parents},
            content=bytes(data), headers={"Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(60.0 + len(data) / 1e6, connect=10.0))
        try:
            return WriteInfo(path=str(res["path"]), size=int(res["size"]))
        except (KeyError, TypeError, ValueError):
            raise ServiceError("the server sent a malformed write result") from None

    async def write_stream(self, path: str, chunks: AsyncIterable[bytes], *,
                           mode: int = 0o644, make_parents: bool = True) -> WriteInfo:
        """Write a file from ``chunks`` as they come (streamed to the server, capped by
        its upload cap), atomically like ``write``. If iterating ``chunks`` raises, the
        upload is abandoned (``path`` is untouched) and that error propagates. Raises
        RequestTooLarge, GuestError, InvalidPath, InvalidSpec (a chunk that is not
        bytes)."""
        self._sb.check_open()

        async def body() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise InvalidSpec(f"write_stream takes chunks of bytes, got"
                                      f" {type(chunk).__name__}")
                if chunk:
                    yield bytes(chunk)

        res = await self._sb.api.call(
            "PUT", self._sb.path("/files"),
            params={"path": path, "mode": mode, "make_parents": make_parents},
            content=body(), headers={"Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(600.0, connect=10.0))
        try:
            return WriteInfo(path=str(res["path"]), size=int(res["size"]))
        except (KeyError, TypeError, ValueError):
            raise ServiceError("the server sent a malformed write result") from None

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
        chunks = [c async for c in self.read_stream(path, max_bytes=max_bytes)]
        data = b"".join(chunks)
        return data.decode("utf-8", "replace") if format == "text" else data

    async def read_stream(self, path: str, *, max_bytes: int = DEFAULT_READ_CAP
                          ) -> AsyncGenerator[bytes, None]:
        """Yield a file's bytes as they arrive; capped like ``read``."""
        self._sb.check_open()
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidSpec("max_bytes must be an int >= 0")
        got = 0
        async with self._sb.api.stream("GET", self._sb.path("/files"),
                                        params={"path": path, "max_bytes": max_bytes}) as resp:
            try:
                async for chunk in resp.aiter_bytes():
                    got += len(chunk)
                    if got > max_bytes:
                        raise FileTooLarge(f"{path} is larger than the cap of {max_bytes}"
                                           " bytes")
                    yield chunk
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"the download of {path} broke: {exc}") from exc

    async def list(self, path: str, *, depth: int = 1) -> builtins.list[EntryInfo]:
        """Entries under a directory, sorted by name (``depth`` levels). Raises
        GuestFileNotFound, GuestError, InvalidPath."""
        self._sb.check_open()
        res = await self._sb.api.call("GET", self._sb.path("/files/list"),
                                       params={"path": path, "depth": depth})
        items = res.get("entries") if isinstance(res, dict) else None
        if not isinstance(items, builtins.list):
            raise ServiceError("the server sent a malformed listing")
        return [entry_from_json(e) for e in items]

    async def stat(self, path: str) -> EntryInfo:
        """The entry at ``path`` (a symlink itself). Raises GuestFileNotFound, InvalidPath."""
        self._sb.check_open()
        return entry_from_json(await self._sb.api.call(
            "GET", self._sb.path("/files/stat"), params={"path": path}))

    async def exists(self, path: str) -> bool:
        self._sb.check_open()
        res = await self._sb.api.call("GET", self._sb.path("/files/exists"),
                                       params={"path": path})
        if not isinstance(res, dict) or not isinstance(res.get("exists"), bool):
            raise ServiceError("the server sent a malformed answer to exists")
        return bool(res["exists"])

    async def make_dir(self, path: str, *, mode: int = 0o755) -> bool:
        """Create a directory and its parents; False if it already existed."""
        self._sb.check_open()
        res = await self._sb.api.call("POST", self._sb.path("/files/dir"),
                                       json={"path": path, "mode": mode})
        if not isinstance(res, dict) or not isinstance(res.get("created"), bool):
            raise ServiceError("the server sent a malformed answer to make_dir")
        return bool(res["created"])

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        self._sb.check_open()
        await self._sb.api.call("DELETE", self._sb.path("/files"),
                                 params={"path": path, "recursive": recursive})

    async def rename(self, old_path: str, new_path: str, *, overwrite: bool = True
                     ) -> EntryInfo:
        self._sb.check_open()
        return entry_from_json(await self._sb.api.call(
            "POST", self._sb.path("/files/rename"),
            json={"old_path": old_path, "new_path": new_path, "overwrite": overwrite}))

    async def chown(self, path: str, *, user: str, mode: int | None = None) -> None:
        """Give ``path`` to ``user`` (a name or ``uid[:gid]`` from the image's
        /etc/passwd), and set its ``mode`` if given; a symlink is refused. Raises
        InvalidSpec, InvalidPath, GuestFileNotFound, GuestError."""
        self._sb.check_open()
        body: dict[str, Any] = {"path": path, "user": user}
        if mode is not None:
            body["mode"] = mode
        await self._sb.api.call("POST", self._sb.path("/files/chown"), json=body)

    async def mount_tmpfs(self, path: str, *, mode: int = 0o700, user: str | None = None,
                          size_bytes: int = 4 << 20) -> None:
        """Mount a private tmpfs at ``path`` (memory only: never on a disk or in a
        snapshot's disk layer), as locally. Raises InvalidSpec, InvalidPath, GuestError."""
        self._sb.check_open()
        body: dict[str, Any] = {"path": path, "mode": mode, "size_bytes": size_bytes}
        if user is not None:
            body["user"] = user
        await self._sb.api.call("POST", self._sb.path("/files/tmpfs"), json=body)

    async def upload_dir(self, local_dir: str | os.PathLike[str], guest_dir: str
                         ) -> DirTransfer:
        """Copy the local tree ``local_dir`` into ``guest_dir`` (created if missing), as
        the local ``files.upload_dir`` does: streamed to the server as a tar (capped by
        its upload cap), extracted in the guest with the same checks; skipped entries
        are named in the result. Raises InvalidPath if ``local_dir`` is not a
        directory, RequestTooLarge, GuestError (e.g. ENOSPC)."""
        self._sb.check_open()
        check_guest_path(guest_dir)
        if not Path(local_dir).is_dir():
            raise InvalidPath(f"{local_dir} is not a local directory")
        skipped: builtins.list[str] = []
        res = await self._sb.api.call(
            "PUT", self._sb.path("/files/tree"), params={"path": guest_dir},
            content=tar_local_tree(local_dir, skipped),
            headers={"Content-Type": "application/x-tar"},
            timeout=httpx.Timeout(600.0, connect=10.0))
        done = transfer_from_json(res)
        return DirTransfer(files=done.files, dirs=done.dirs, symlinks=done.symlinks,
                           bytes=done.bytes, skipped=tuple((skipped + builtins.list(
                               done.skipped))[:100]))

    async def download_dir(self, guest_dir: str, local_dir: str | os.PathLike[str], *,
                           max_bytes: int = DEFAULT_TREE_CAP,
                           max_files: int = DEFAULT_TREE_ENTRIES) -> DirTransfer:
        """Copy the guest tree ``guest_dir`` into ``local_dir`` (created if missing), as
        the local ``files.download_dir`` does: streamed from the server as a tar and
        extracted here as it arrives, treated as hostile (tarfile's ``data`` filter
        plus sandvm's checks: nothing written outside ``local_dir`` or through a
        symlink, links leading out dropped). Entries refused here and those the
        guest left out (special files) are named in the result. Raises FileTooLarge
        past ``max_bytes`` of file content or ``max_files`` entries (or the server's
        download cap), GuestFileNotFound, InvalidPath, ServerUnreachable."""
        self._sb.check_open()
        check_guest_path(guest_dir)
        for what, v in (("max_bytes", max_bytes), ("max_files", max_files)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidSpec(f"{what} must be a positive int, got {v!r}")
        guest_skipped: builtins.list[str] = []
        async with self._sb.api.stream(
                "GET", self._sb.path("/files/tree"),
                params={"path": guest_dir, "max_bytes": max_bytes, "max_files": max_files},
                timeout=httpx.Timeout(60.0, connect=10.0, read=300.0)) as resp:

            async def pieces() -> AsyncIterator[bytes]:
                ended = False
                try:
                    async for line in ndjson_lines(resp):
                        event = event_of(line)
                        kind = event.get("type")
                        if kind == "data":
                            yield chunk_of(event)
                        elif kind == "error":
                            raise error_from_dict(event)
                        elif kind == "end":
                            left = event.get("skipped")
                            if isinstance(left, builtins.list):
                                guest_skipped.extend(str(x)[:400] for x in left[:100])
                            ended = True
                except httpx.TransportError as exc:
                    raise ServerUnreachable(f"the download of {guest_dir} broke: {exc}"
                                            ) from exc
                if not ended:
                    raise ServerUnreachable(f"the server ended the download of {guest_dir}"
                                            " before the tree's end")

            got = await extract_tar(pieces(), local_dir, max_bytes=max_bytes,
                                    max_files=max_files)
        return DirTransfer(files=got.files, dirs=got.dirs, symlinks=got.symlinks,
                           bytes=got.bytes, skipped=tuple(
                               (builtins.list(got.skipped) + guest_skipped)[:100]))
