"""What a user holds: a sandbox = a VM + its agent connection.

``AsyncSandbox`` is the one implementation (asyncio). ``Sandbox`` exposes the
same surface synchronously by running it on the blocking portal's loop thread.
A test checks that both surfaces keep the same methods and signatures.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal as signal_mod
import stat as stat_mod
import tarfile
import tempfile
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from sandvm import _portal, wire
from sandvm._files import move_file, runtime_root, sparse_copy, write_owner
from sandvm.agent_client import (
    AgentConnection,
    HostStream,
    guest_bool,
    guest_float,
    guest_int,
    guest_list,
    guest_opt_int,
    guest_str,
)
from sandvm.assets.paths import qemu_version
from sandvm.core import (
    BUILTIN_IMAGES,
    ROOT_DISK,
    DiskSpec,
    VmSpec,
    check_guest_path,
    new_id,
    parse_memory,
    parse_size,
    validate_vm_id,
)
from sandvm.egress import NetworkPolicy
from sandvm.errors import (
    AgentProtocolError,
    AgentTimeout,
    CommandExitError,
    CommandTimeout,
    FileTooLarge,
    InvalidPath,
    InvalidSpec,
    SandboxStateError,
    SandvmError,
    SnapshotIncompatible,
)
from sandvm.network import AsyncNetwork, Network
from sandvm.ports import AsyncPorts, Ports
from sandvm.providers.qemu import QemuVm, QemuVmProvider, disk_root, qemu_img
from sandvm.snapshots.diff import write_diff
from sandvm.snapshots.store import Snapshot, SnapshotStore
from sandvm.volumes import VolumeAttachment, VolumeMount, VolumeStore, parse_mounts

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_READ_CAP",
    "AsyncCommandHandle",
    "AsyncSandbox",
    "CommandHandle",
    "CommandResult",
    "DirTransfer",
    "EntryInfo",
    "Sandbox",
    "VolumeMount",
    "WriteInfo",
]

DEFAULT_COMMAND_TIMEOUT = 60.0
DEFAULT_READ_CAP = 32 * 1024 * 1024
OUTPUT_CAP = 64 * 1024 * 1024  # per command and stream, kept in memory
LIST_CAP = 100_000  # entries in one listing (the guest stops there too)
_HOST_GRACE = 10.0  # the host waits this long past a command's timeout for the guest

OutputCallback = Callable[[str], Any]
#: ``(channel, data)`` for every chunk of raw output: channel 1 stdout, 2 stderr. May be
#: a coroutine function; while it awaits, no more output is read (backpressure).
RawOutputCallback = Callable[[int, bytes], Any]
StdinSource = bytes | str | Iterable[bytes] | AsyncIterable[bytes] | None
SIGNALS = {"SIGINT": signal_mod.SIGINT, "SIGTERM": signal_mod.SIGTERM,
           "SIGKILL": signal_mod.SIGKILL, "SIGHUP": signal_mod.SIGHUP,
           "SIGQUIT": signal_mod.SIGQUIT, "SIGUSR1": signal_mod.SIGUSR1,
           "SIGUSR2": signal_mod.SIGUSR2}


@dataclass(frozen=True)
class CommandResult:
    """A finished command. ``signal`` is set when a signal ended it (exit_code = 128+sig).

    ``stdout``/``stderr`` are the output decoded as UTF-8 (invalid bytes replaced),
    decoded on first use; ``stdout_bytes``/``stderr_bytes`` are the raw bytes. Each
    stream keeps at most 64 MiB in memory; ``output_truncated`` says more was dropped.
    """

    exit_code: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    output_truncated: bool = False

    @functools.cached_property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @functools.cached_property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")


@dataclass(frozen=True)
class EntryInfo:
    """A file-system entry in the guest."""

    path: str
    name: str
    type: str  # file, dir, symlink, other
    size: int
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0
    target: str | None = None


@dataclass(frozen=True)
class WriteInfo:
    path: str
    size: int


def _entry(d: dict[str, Any]) -> EntryInfo:
    """Build an EntryInfo from a guest dict, checking every field's type and range (the
    guest is hostile). Raises AgentProtocolError."""
    w = "file entry"
    e = EntryInfo(path=guest_str(d, "path", max_len=4096, what=w),
                  name=guest_str(d, "name", max_len=4096, what=w),
                  type=guest_str(d, "type", max_len=16, what=w),
                  size=guest_int(d, "size", what=w), mode=guest_int(d, "mode", hi=0o7777, what=w),
                  mtime=guest_float(d, "mtime", lo=-1e11, hi=1e11, what=w),
                  uid=guest_int(d, "uid", hi=(1 << 32) - 1, default=0, what=w),
                  gid=guest_int(d, "gid", hi=(1 << 32) - 1, default=0, what=w),
                  target=None if d.get("target") is None else guest_str(
                      d, "target", max_len=4096, what=w))
    if e.type not in ("file", "dir", "symlink", "other"):
        raise AgentProtocolError(f"guest sent an unknown entry type {e.type!r}")
    return e


def _signal_number(sig: int | str) -> int:
    if isinstance(sig, str):
        name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
        if name not in SIGNALS:
            raise InvalidSpec(f"unknown signal {sig!r}: use one of {', '.join(SIGNALS)}")
        return int(SIGNALS[name])
    if not 1 <= int(sig) <= 64:
        raise InvalidSpec(f"signal {sig} is out of range 1..64")
    return int(sig)


# --------------------------------------------------------------------------- tar trees

DEFAULT_TREE_CAP = 1 << 30  # bytes of file content download_dir accepts by default
DEFAULT_TREE_ENTRIES = 100_000
_TAR_BLOCK = 512
_SKIPPED_KEPT = 100
_LINK_HOPS = 40


@dataclass(frozen=True)
class DirTransfer:
    """What ``upload_dir``/``download_dir`` moved: entries, file bytes, what was skipped.

    ``skipped`` names entries left out, each with the reason (an unsafe path or
    link, a special file, an unreadable file); at most 100 are named.
    """

    files: int
    dirs: int
    symlinks: int
    bytes: int
    skipped: tuple[str, ...] = ()


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
        if len(self.skipped) < _SKIPPED_KEPT:
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
        if len(self.skipped) < _SKIPPED_KEPT:
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
        from sandvm.images.layers import open_untrusted_tar

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

    def result(self, guest_skipped: Any) -> DirTransfer:
        extra = [str(s)[:400] for s in guest_skipped[:_SKIPPED_KEPT]] if isinstance(
            guest_skipped, list) else []
        return DirTransfer(files=self.counts["files"], dirs=self.counts["dirs"],
                           symlinks=self.counts["symlinks"], bytes=self.counts["bytes"],
                           skipped=tuple((self.skipped + extra)[:_SKIPPED_KEPT]))


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


def _count(msg: dict[str, Any], key: str) -> int:
    return guest_int(msg, key, what="transfer report")


MAX_COMMAND_TIMEOUT = 7 * 24 * 3600.0  # a week; beyond that, no timeout (None) is meant
PID_MAX = 1 << 22  # Linux's largest pid_max
MAX_DURATION = 1e9  # seconds (31 years): a guest's "duration" beyond is a lie


class _Output:
    def __init__(self, cb: OutputCallback | None, raw: RawOutputCallback | None = None,
                 channel: int = 0) -> None:
        self.buf = bytearray()
        self.cb = cb
        self.raw = raw
        self.channel = channel
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    async def feed(self, data: bytes) -> None:
        if self.raw is not None:  # the callback keeps the output: nothing kept here
            r = self.raw(self.channel, data)
            if asyncio.iscoroutine(r):
                await r
            return
        room = OUTPUT_CAP - len(self.buf)
        if room >= len(data):
            self.buf += data
        else:
            self.buf += data[:max(room, 0)]
            self.truncated = True
        if self.cb is not None:
            text = self._decoder.decode(data)
            if text:
                r = self.cb(text)
                if asyncio.iscoroutine(r):
                    await r

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


class AsyncCommandHandle:
    """A running command. ``wait`` for its result; signal it, feed its stdin, kill it."""

    def __init__(self, stream: HostStream, *, timeout: float | None, check: bool,
                 on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                 stdin: StdinSource, stdin_open: bool,
                 raw_output: RawOutputCallback | None = None) -> None:
        self._stream = stream
        self._timeout = timeout
        self._check = check
        self._out = _Output(on_stdout, raw_output, wire.CH_STDOUT)
        self._err = _Output(on_stderr, raw_output, wire.CH_STDERR)
        self._stdin_open = stdin_open
        self._pid: int | None = None
        self._started = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._collect())
        # the outcome is read by wait(); never let asyncio report it as unretrieved
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._stdin_task: asyncio.Task[None] | None = None
        if stdin is not None:
            self._stdin_task = asyncio.get_running_loop().create_task(self._feed(stdin))

    @property
    def pid(self) -> int | None:
        """The command's process id in the guest (its process group id too)."""
        return self._pid

    @property
    def stdout(self) -> str:
        """Output so far."""
        return self._out.text()

    @property
    def stderr(self) -> str:
        return self._err.text()

    async def _feed(self, stdin: StdinSource) -> None:
        with contextlib.suppress(SandvmError):
            if isinstance(stdin, str):
                stdin = stdin.encode()
            if isinstance(stdin, (bytes, bytearray, memoryview)):
                await self._stream.send_data(bytes(stdin))
            elif isinstance(stdin, AsyncIterable):
                async for chunk in stdin:
                    await self._stream.send_data(chunk)
            elif stdin is not None:
                for chunk in stdin:
                    await self._stream.send_data(chunk)
            await self._stream.send_eof()

    async def _collect(self) -> dict[str, Any]:
        limit = None if self._timeout is None else self._timeout + _HOST_GRACE
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = await self._stream.next(remaining)
            except SandvmError as exc:
                await self._stream.reset()
                if not self._started.done():
                    self._started.set_exception(exc)
                if deadline is not None and time.monotonic() >= deadline:
                    raise CommandTimeout(
                        f"command did not finish within {self._timeout} s and the guest did"
                        " not report it") from exc
                raise
            if item.kind == "data":
                out = self._out if item.channel == wire.CH_STDOUT else self._err
                try:
                    await out.feed(item.data)
                except BaseException:
                    # a failing output callback abandons the command: kill it in the guest
                    await self._stream.reset()
                    raise
            elif item.kind == "event":
                msg = item.message or {}
                if msg.get("event") == "started":
                    self._pid = guest_int(msg, "pid", lo=1, hi=PID_MAX, what="start event")
                    if not self._started.done():
                        self._started.set_result(None)
            elif item.kind == "reply":
                if not self._started.done():
                    self._started.set_result(None)
                return item.message or {}
            elif item.kind == "error":
                assert item.error is not None
                if not self._started.done():
                    self._started.set_exception(item.error)
                    self._started.exception()
                raise item.error

    async def wait(self) -> CommandResult:
        """Wait for the command to end. Raises CommandExitError (if checking), CommandTimeout."""
        msg = await asyncio.shield(self._task)
        w = "exit report"
        code = guest_int(msg, "exit_code", hi=255, what=w)
        sig = guest_opt_int(msg, "signal", lo=1, hi=255, what=w)
        result = CommandResult(
            exit_code=code, stdout_bytes=bytes(self._out.buf), stderr_bytes=bytes(self._err.buf),
            signal=sig, timed_out=guest_bool(msg, "timed_out", what=w),
            duration=guest_float(msg, "duration", hi=MAX_DURATION, default=0.0, what=w),
            output_truncated=self._out.truncated or self._err.truncated)
        if result.timed_out:
            raise CommandTimeout(
                f"command timed out after {self._timeout} s; its processes were killed",
                result=result)
        if self._check and (code != 0 or sig is not None):
            raise CommandExitError(result)
        return result

    async def send_signal(self, sig: int | str, *, grace: float | None = None) -> None:
        """Signal the command's process group; with ``grace``, SIGKILL everything after it."""
        msg: dict[str, Any] = {"signal": _signal_number(sig)}
        if grace is not None:
            msg["grace"] = float(grace)
        await self._stream.send_ctrl(msg)

    async def kill(self) -> None:
        """SIGKILL every process of the command."""
        await self.send_signal(signal_mod.SIGKILL)

    async def send_stdin(self, data: bytes | str) -> None:
        """Write to the command's stdin (needs ``stdin=`` or ``background=True`` at start)."""
        if not self._stdin_open:
            raise SandboxStateError("this command was started without stdin")
        await self._stream.send_data(data.encode() if isinstance(data, str) else data)

    async def close_stdin(self) -> None:
        await self._stream.send_eof()


class AsyncCommands:
    """``sandbox.commands``: run commands in the guest."""

    def __init__(self, sb: AsyncSandbox) -> None:
        self._sb = sb

    @overload
    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
                  cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
                  on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
                  background: Literal[False] = ..., check: bool = ...,
            user: str | None = ...) -> CommandResult: ...

    @overload
    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
                  cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
                  on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
                  background: Literal[True], check: bool = ...,
                  user: str | None = ...) -> AsyncCommandHandle: ...

    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                  cwd: str | None = None, stdin: StdinSource = None,
                  timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
                  on_stdout: OutputCallback | None = None,
                  on_stderr: OutputCallback | None = None,
                  background: bool = False, check: bool = True, user: str | None = None
                  ) -> CommandResult | AsyncCommandHandle:
        """Run ``cmd`` (a shell string, or an argv list) and return its result.

        Allowed while the sandbox is running. ``timeout`` kills the command's
        whole process group (None: no limit). With ``background=True`` returns a
        handle at once. In an image, the image's Env, WorkingDir and User are the
        defaults; ``user`` is a name or ``uid[:gid]`` from the image's /etc/passwd.
        Raises CommandExitError on a non-zero exit unless ``check=False``,
        CommandTimeout, CommandNotFound, SandboxStateError.
        """
        return await self._run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                               on_stdout=on_stdout, on_stderr=on_stderr,
                               background=background, check=check, user=user)

    async def _run(self, cmd: str | list[str], *, env: dict[str, str] | None,
                   cwd: str | None, stdin: StdinSource, timeout: float | None,
                   on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                   background: bool, check: bool, user: str | None = None,
                   raw_output: RawOutputCallback | None = None
                   ) -> CommandResult | AsyncCommandHandle:
        """The one implementation behind AsyncCommands.run and Commands.run.

        ``raw_output`` (sandvm's isolation runtime) receives the output as bytes
        instead of the handle keeping it (then ``stdout``/``stderr`` stay empty)."""
        req: dict[str, Any] = {"op": "exec"}
        proxy = self._sb.network.env()
        if proxy:  # the workload's HTTP(S) goes through the host's egress proxy
            env = {**proxy, **(env or {})}
        image = self._sb._image
        if image is not None:
            cfg = image.get("config") or {}
            env = {**image_env(cfg.get("env") or ()), **(env or {})}
            if cwd is None:
                cwd = cfg.get("working_dir") or "/"
            if user is None and cfg.get("user"):
                user = str(cfg["user"])
        if user is not None:
            if not isinstance(user, str) or not user or len(user) > 256:
                raise InvalidSpec("user must be a name or 'uid[:gid]'")
            req["user"] = user
        if isinstance(cmd, str):
            req["shell"] = cmd
        elif isinstance(cmd, (list, tuple)) and cmd and all(isinstance(a, str) for a in cmd):
            req["argv"] = list(cmd)
        else:
            raise InvalidSpec("cmd must be a shell string or a non-empty list of strings")
        if env:
            if not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                       for k, v in env.items()):
                raise InvalidSpec("env must map variable names (no '=') to strings")
            req["env"] = dict(env)
        if cwd is not None:
            req["cwd"] = check_guest_path(cwd)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                    not 0 < timeout <= MAX_COMMAND_TIMEOUT:
                raise InvalidSpec(f"timeout must be seconds in (0, {MAX_COMMAND_TIMEOUT:.0f}]"
                                  f" or None, got {timeout!r}")
            req["timeout"] = float(timeout)
        stdin_open = stdin is not None or background
        req["stdin"] = stdin_open
        conn = self._sb._conn()
        stream = await conn.open(req)
        handle = AsyncCommandHandle(stream, timeout=timeout, check=check, on_stdout=on_stdout,
                                    on_stderr=on_stderr, stdin=stdin, stdin_open=stdin_open,
                                    raw_output=raw_output)
        if background:
            try:
                await asyncio.wait_for(asyncio.shield(handle._started), self._sb.op_timeout)
            except TimeoutError:
                await stream.reset()
                raise AgentTimeout(
                    f"the guest did not start the command within {self._sb.op_timeout} s"
                ) from None
            return handle
        try:
            return await handle.wait()
        except asyncio.CancelledError:
            await stream.reset()
            raise


class AsyncFiles:
    """``sandbox.files``: files in the guest. Paths must be absolute."""

    def __init__(self, sb: AsyncSandbox) -> None:
        self._sb = sb

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
                    make_parents: bool = True) -> WriteInfo:
        """Write a whole file atomically (temp file, fsync, rename). Raises GuestError."""
        check_guest_path(path)
        if isinstance(data, str):
            data = data.encode()
        st = await self._sb._conn().open({"op": "write_file", "path": path, "mode": mode,
                                          "make_parents": make_parents})
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
        st = await self._sb._conn().open({"op": "read_file", "path": path,
                                          "max_bytes": max_bytes})
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
        st = await self._sb._conn().open({"op": "list", "path": path, "depth": depth})
        entries: list[EntryInfo] = []
        try:
            while True:
                item = await st.next(self._sb.op_timeout)
                if item.kind == "event":
                    batch = guest_list(item.message or {}, "entries", max_len=LIST_CAP,
                                       what="listing")
                    entries.extend(_entry(e) if isinstance(e, dict) else _entry({})
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
        return _entry(await self._call({"op": "stat", "path": path}))

    async def exists(self, path: str) -> bool:
        check_guest_path(path)
        return (await self._call({"op": "exists", "path": path})).get("exists") is True

    async def make_dir(self, path: str, *, mode: int = 0o755) -> bool:
        """Create a directory and its parents; False if it already existed."""
        check_guest_path(path)
        return (await self._call({"op": "make_dir", "path": path, "mode": mode})).get(
            "created") is True

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        check_guest_path(path)
        await self._call({"op": "remove", "path": path, "recursive": recursive})

    async def rename(self, old_path: str, new_path: str, *, overwrite: bool = True) -> EntryInfo:
        check_guest_path(old_path)
        check_guest_path(new_path)
        await self._call({"op": "rename", "path": old_path, "dst": new_path,
                          "overwrite": overwrite})
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
        reader = _TarReader(top)
        st = await self._sb._conn().open({"op": "untar", "path": guest_dir})

        async def send() -> int:
            sent = 0
            while True:
                chunk = await asyncio.to_thread(reader.read, 1 << 20)
                if not chunk:
                    break
                await st.send_data(chunk)
                sent += len(chunk)
            await st.send_eof()
            return sent

        sender = asyncio.get_running_loop().create_task(send())
        item_task = asyncio.get_running_loop().create_task(st.next(None))
        try:
            await asyncio.wait({sender, item_task}, return_when=asyncio.FIRST_COMPLETED)
            if not item_task.done():
                sent = sender.result()  # a local failure raises here
                # the guest extracts once it has everything: allow it 1 MB/s
                item = await asyncio.wait_for(item_task, self._sb.op_timeout + sent / 1e6)
            else:
                item = item_task.result()
            if item.kind == "error":
                assert item.error is not None
                raise item.error
            if item.kind != "reply":
                raise AgentProtocolError(f"unexpected {item.kind} while uploading a tree")
            msg = item.message or {}
            skipped = msg.get("skipped")
            guest_skipped = [str(x)[:400] for x in skipped[:_SKIPPED_KEPT]] \
                if isinstance(skipped, list) else []
            return DirTransfer(files=_count(msg, "files"), dirs=_count(msg, "dirs"),
                               symlinks=_count(msg, "symlinks"), bytes=_count(msg, "bytes"),
                               skipped=tuple((reader.skipped + guest_skipped)[:_SKIPPED_KEPT]))
        except TimeoutError:
            raise AgentTimeout("the guest did not finish extracting the tree in time") from None
        finally:
            for t in (sender, item_task):
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
            await st.reset()  # no-op once the guest replied; otherwise it drops its spool

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
        for what, v in (("max_bytes", max_bytes), ("max_files", max_files)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidSpec(f"{what} must be a positive int, got {v!r}")
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        extractor = _TreeExtractor(dest, max_bytes=max_bytes, max_files=max_files)
        # headers and padding on top of the content: a generous bound on the stream
        stream_cap = max_bytes + max_files * 3 * _TAR_BLOCK + (1 << 20)
        st = await self._sb._conn().open({"op": "tar", "path": guest_dir,
                                          "max_bytes": max_bytes, "max_files": max_files})
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        try:
            job = asyncio.get_running_loop().create_task(asyncio.to_thread(extractor.run, rfd))
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        done = False
        try:
            got = 0
            while True:
                item = await st.next(self._sb.op_timeout)
                if item.kind == "data":
                    got += len(item.data)
                    if got > stream_cap:
                        raise FileTooLarge(f"the guest sent more than {stream_cap} bytes for"
                                           f" {guest_dir}: pass a larger max_bytes")
                    if wfd >= 0:
                        try:
                            await _pipe_write(wfd, item.data)
                        except BrokenPipeError:
                            # the extractor stopped: at the archive's end, or on an error
                            os.close(wfd)
                            wfd = -1
                            await job
                elif item.kind == "eof":
                    if wfd >= 0:
                        os.close(wfd)
                        wfd = -1
                elif item.kind == "reply":
                    done = True
                    if wfd >= 0:
                        os.close(wfd)
                        wfd = -1
                    await job
                    return extractor.result((item.message or {}).get("skipped"))
                elif item.kind == "error":
                    done = True
                    assert item.error is not None
                    raise item.error
        finally:
            if wfd >= 0:
                os.close(wfd)
            if not done:
                await st.reset()
            if not job.done():
                with contextlib.suppress(BaseException):
                    await job
            elif not job.cancelled():
                job.exception()  # retrieved: the first error is what propagates

    async def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._sb._conn().call(req, timeout=self._sb.op_timeout)


class AsyncSandbox:
    """A running microVM with its guest agent. Use ``await AsyncSandbox.create(...)``."""

    def __init__(self, *, sandbox_id: str, provider: QemuVmProvider, vm: QemuVm,
                 lifetime: float | None) -> None:
        self.sandbox_id = sandbox_id
        self._provider = provider
        self._vm = vm
        self._closed = False
        self._expiry: asyncio.Task[None] | None = None
        self.op_timeout = 30.0
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.ports = AsyncPorts(self)
        self.network = AsyncNetwork(self)
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self._snapshot_times: dict[str, float] = {}
        # the image (name, digest, config, rootfs) of a sandbox with a root disk
        self._image: dict[str, Any] | None = None
        # volumes attached (their locks are held until the VM is gone) and where
        self._volumes: list[tuple[VolumeAttachment, VolumeMount]] = []
        self._volume_watch: asyncio.Task[None] | None = None
        if lifetime is not None:
            self._lifetime_handle = asyncio.get_running_loop().call_later(
                lifetime, self._expire)

    def _expire(self) -> None:
        self._expiry = asyncio.get_running_loop().create_task(self.kill())

    @classmethod
    async def create(cls, *, image: str | None = None, memory_mib: int | str = 256, vcpus: int = 1,
                     disk_size: int | str | None = None,
                     volumes: Mapping[str, str | tuple[str, str] | VolumeMount] | None = None,
                     volume_store: VolumeStore | None = None,
                     timeout: float | None = None, boot_timeout: float = 60.0,
                     sandbox_id: str | None = None,
                     provider: QemuVmProvider | None = None,
                     keeper_job: dict[str, Any] | None = None,
                     network: NetworkPolicy | None = None) -> AsyncSandbox:
        """Boot a new sandbox and wait until its agent is ready.

        ``keeper_job`` (for sandvm's runtime manager) starts the VM under a keeper
        process so that it can be detached and outlive this process.

        ``image``: None for the default (``debian`` once `sandvm image
        build-default` built it, else ``base``; ``$SANDVM_DEFAULT_IMAGE`` wins),
        ``base`` (the built-in one, running from memory), a name from
        `sandvm image ls`, or a source such as ``oci:./layout:tag`` (imported and
        cached on first use). An image's root filesystem is a private disk of
        ``disk_size`` bytes (default 4 GiB, sparse; a full disk is ENOSPC in the
        guest). ``timeout`` is the sandbox's lifetime in seconds (None: until
        killed).

        ``volumes`` maps names of volumes (`sandvm volume create`, or
        ``VolumeStore().create``; ``volume_store`` picks another store) to where
        they are mounted: a guest path (read-write), ``(path, "ro")`` /
        ``(path, "rw")``, or a VolumeMount, e.g. ``{"data": "/data", "ref":
        ("/ref", "ro")}``. The mount point is created in the image's root. A
        volume has one writer at a time: it stays locked by this process until
        the sandbox is killed or its VM dies. Sandboxes with volumes cannot be
        snapshotted (nor forked or paused to disk).

        ``network``: a NetworkPolicy gives the sandbox egress through the host's
        proxy (see ``sandbox.network``); None (the default): no network at all.

        Raises InvalidSpec / InvalidPath / UnknownImage / ImageError for bad
        input, VolumeNotFound, VolumeInUse, AssetMissing if `sandvm setup` has
        not run, VmBootError if the VM does not come up.
        """
        if timeout is not None and timeout <= 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, got {timeout}")
        _check_network(network)
        if image is None:
            from sandvm.images.store import default_image

            image = default_image()
        mounts = parse_mounts(volumes, builtin_image=image in BUILTIN_IMAGES)
        image_info, disks = await _resolve_image(image, disk_size)
        sid = validate_vm_id(sandbox_id or new_id("sb"))
        attached = await asyncio.to_thread(_attach_volumes, volume_store, mounts, sid)
        try:
            vdisks = tuple(DiskSpec(serial=f"vol-{i}", path=str(att.volume.path),
                                    format="raw", read_only=m.read_only)
                           for i, (att, m) in enumerate(attached))
            spec = VmSpec(image=image, memory_mib=parse_memory(memory_mib), vcpus=vcpus,
                          disks=disks + vdisks)
            prov = provider or QemuVmProvider(boot_timeout=boot_timeout)
            await prov.create_vm_with_spec(sid, spec)
            if keeper_job is not None:
                if attached:
                    raise InvalidSpec("a detachable sandbox cannot have volumes yet")
                prov.make_detachable(sid, keeper_job)
            return await cls._launch(prov, sid, prov.start_vm(sid), timeout, image=image_info,
                                     volumes=attached, network=network)
        except BaseException:
            # the VM is gone (or never ran): nobody uses the volumes any more
            for att, _ in attached:
                att.release()
            raise

    @classmethod
    async def _launch(cls, prov: QemuVmProvider, sid: str, start: Awaitable[None],
                      lifetime: float | None, *, image: dict[str, Any] | None = None,
                      restored: bool = False,
                      volumes: list[tuple[VolumeAttachment, VolumeMount]] | None = None,
                      network: NetworkPolicy | None = None) -> AsyncSandbox:
        """Run ``start`` for the Created VM ``sid``, configure it, mount its volumes
        (disks ``vol-<i>``); destroy it on failure."""
        try:
            await start
            sb = cls(sandbox_id=sid, provider=prov, vm=prov.vm(sid), lifetime=lifetime)
            sb._image = image
            if image is not None and not restored:
                await sb._conn().call({"op": "mount_root", "serial": ROOT_DISK},
                                      timeout=sb.op_timeout)
            for i, (att, m) in enumerate(volumes or ()):
                try:
                    await sb._conn().call({"op": "mount_volume", "serial": f"vol-{i}",
                                           "path": m.path, "read_only": m.read_only},
                                          timeout=sb.op_timeout)
                except SandvmError as exc:
                    raise type(exc)(f"cannot mount volume {att.volume.name!r} at {m.path}:"
                                    f" {exc.message}") from exc
            if volumes:
                sb._volumes = list(volumes)
                sb._volume_watch = asyncio.get_running_loop().create_task(
                    sb._release_volumes_on_exit())
            await sb._configure()
            if network is not None:
                await sb.network._start(network)
            elif restored:  # a listener the snapshot had would take connections nobody serves
                with contextlib.suppress(SandvmError):
                    await sb._conn().call({"op": "egress_close"}, timeout=sb.op_timeout)
        except BaseException:
            with contextlib.suppress(SandvmError):
                await prov.destroy_vm(sid)
            raise
        return sb

    @classmethod
    async def from_snapshot(cls, snapshot: Snapshot | str | Path, *,
                            timeout: float | None = None, boot_timeout: float = 60.0,
                            sandbox_id: str | None = None, verify: str = "once",
                            store: SnapshotStore | None = None,
                            provider: QemuVmProvider | None = None,
                            network: NetworkPolicy | None = None,
                            keeper_job: dict[str, Any] | None = None) -> AsyncSandbox:
        """A new sandbox restored from a snapshot: files and processes as they were.

        ``snapshot`` is a Snapshot, a snapshot name in the store, or a snapshot
        directory. Its memory is shared copy-on-write with every other sandbox
        restored from it. The clone gets fresh entropy, the host's clock, and its
        own id and hostname. ``verify``: "once" checks the RAM file's sha256 once
        per process (the small state file every time), "full" every time.
        ``keeper_job`` (for sandvm's runtime manager) runs the VM under a keeper
        process, as for ``create``. The clone keeps working when the snapshot is
        removed afterwards (its RAM file stays mapped, its disk layers are linked).
        Raises SnapshotNotFound, SnapshotCorrupt, SnapshotIncompatible, VmBootError.
        """
        if verify not in ("once", "full"):
            raise InvalidSpec(f"verify must be 'once' or 'full', not {verify!r}")
        _check_network(network)
        if timeout is not None and timeout <= 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, got {timeout}")
        snap = (store or SnapshotStore()).resolve(snapshot)
        await asyncio.to_thread(SnapshotStore.verify, snap, full=verify == "full")
        prov = provider or QemuVmProvider(boot_timeout=boot_timeout)
        assets, accel = await prov._resolve()
        _check_compatible(snap, accel, await _qemu_version(assets.qemu))
        source = await asyncio.to_thread(SnapshotStore(snap.path.parent).materialize, snap)
        sid = sandbox_id or new_id("sb")
        await prov.create_vm_with_spec(sid, snap.spec)
        if keeper_job is not None:
            prov.make_detachable(sid, keeper_job)
        return await cls._launch(prov, sid, prov.restore_vm(sid, source), timeout,
                                 image=snap.image, restored=True, network=network)

    async def _release_volumes_on_exit(self) -> None:
        """Release the volumes' locks as soon as QEMU is gone, however it ended."""
        proc = self._vm.proc
        if proc is not None:
            await proc.wait()
        self._release_volumes()

    def _release_volumes(self) -> None:
        for att, _ in self._volumes:
            att.release()

    async def _configure(self) -> None:
        """Identity and clone hygiene: entropy, clock, hostname, sandbox id."""
        await self._conn().call({
            "op": "configure", "seed": secrets.token_hex(64), "time_ns": time.time_ns(),
            "hostname": self.sandbox_id[:63], "sandbox_id": self.sandbox_id,
        }, timeout=self.op_timeout)

    async def snapshot(self, name: str | None = None, *, stop: bool = False,
                       store: SnapshotStore | None = None,
                       parent: Snapshot | str | None = None) -> Snapshot:
        """Save this sandbox (memory, device state, files, processes) as a snapshot.

        Allowed while running. The VM is paused while its state and RAM are
        copied, then resumed; with ``stop=True`` it is destroyed instead. The
        pause and total time are in ``last_snapshot_times``. A sandbox that was
        itself restored from a snapshot is saved with its RAM in the state stream
        (slower; its restores do not share pages). Raises SnapshotAlreadyExists,
        SandboxStateError (also for a sandbox with volumes).
        """
        self._conn()  # raises if killed or crashed
        if self._volumes:
            names = ", ".join(f"{a.volume.name!r} at {m.path}" for a, m in self._volumes)
            raise SandboxStateError(
                f"volumes are not part of snapshots, and sandbox {self.sandbox_id} has {names}"
                " mounted: snapshots, fork and pause(to_disk=True) need a sandbox without"
                " volumes (copy what it needs into its own disk, or mount the volumes after"
                " restoring in a new sandbox)")
        store = store or SnapshotStore()
        name = name or new_id("snap")
        parent_snap = None
        if parent is not None:
            parent_snap = store.resolve(parent)
            if parent_snap.path.parent != store.root:
                raise InvalidSpec("a diff snapshot's parent must be in the same store")
            if parent_snap.ram != "file" or self._vm.private_ram:
                raise InvalidSpec("diff snapshots need a full parent snapshot and a sandbox"
                                  " that was booted, not restored")
            if parent_snap.spec.memory_mib != self._vm.spec.memory_mib:
                raise InvalidSpec("the parent snapshot has a different memory size")
        staging = store.staging(name)  # owned by us: removed if we die before commit
        # while the VM is paused, its state goes to tmpfs (fast); to the store after
        fast = Path(tempfile.mkdtemp(prefix="snap-", dir=runtime_root()))
        write_owner(fast)  # a sweep removes it if we die before removing it ourselves
        t0 = time.monotonic()
        try:
            try:
                await self._vm.save_state(fast, take_memory=stop)
            finally:
                if not stop and self._vm.failure is None and not self._closed:
                    await self._vm.resume()
                # the vCPUs ran until ``stop`` and run again once ``cont`` returns
                paused = time.monotonic() - (self._vm.stopped_at or t0)
            resumed = time.monotonic() - t0
            await self._export_disks(staging)
            if stop:
                await self.kill()
            else:
                await self._vm.merge_disks()
                await self._step_clock()
            if parent_snap is not None:
                await asyncio.to_thread(write_diff, parent_snap.path / "mem", fast / "mem",
                                        staging / "mem.diff")
                (fast / "mem").unlink()
            for fname in ("state", "mem"):
                if (fast / fname).exists():  # no mem when the RAM is in the stream
                    await asyncio.to_thread(move_file, fast / fname, staging / fname)
            qemu = await _qemu_version(self._vm.assets.qemu)
            manifest = {
                "sandvm_version": _version(), "qemu_version": qemu, "machine": "microvm",
                "accelerator": self._vm.accel, "cpu": "host" if self._vm.accel == "kvm"
                else "max", "kernel_release": self._vm.assets.kernel_release,
                "created": time.time(), "source_id": self.sandbox_id,
                "spec": {"image": self._vm.spec.image, "memory_mib": self._vm.spec.memory_mib,
                         "vcpus": self._vm.spec.vcpus,
                         "disks": [{"serial": d.serial, "overlay_size": d.overlay_size}
                                   for d in self._vm.spec.disks]},
            }
            if self._image is not None:
                manifest["image"] = self._image
            if parent_snap is not None:
                manifest["parent"] = {"name": parent_snap.name,
                                      "mem_sha256": parent_snap.files["mem"]["sha256"]}
            snap = await asyncio.to_thread(store.commit, staging, name, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(fast, ignore_errors=True)
        self._snapshot_times = {"pause_s": paused, "until_resumed_s": resumed,
                                "total_s": time.monotonic() - t0}
        return snap

    async def _export_disks(self, staging: Path) -> None:
        """Write each disk frozen by the last save into ``staging`` as a self-contained
        pair: ``image-<serial>.ext4`` (a hard link to, or copy of, the image's root
        filesystem) and ``disk-<serial>.qcow2`` (every write since, folded into one
        layer whose backing file is that image, named relatively)."""
        for serial, frozen in self._vm.frozen_disks.items():
            image = self._vm.disk_images[serial]
            pinned = staging / f"image-{serial}.ext4"
            await asyncio.to_thread(_link_or_copy, image, pinned)
            dst = staging / f"disk-{serial}.qcow2"
            await asyncio.to_thread(sparse_copy, frozen, dst)
            info = await qemu_img("info", "--output=json", "-U", str(dst))
            if json.loads(info).get("full-backing-filename") != str(image):
                # fold every layer between this one and the image into it
                await qemu_img("rebase", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw",
                               str(dst))
            # same content, now found beside it wherever the snapshot is moved
            await qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", pinned.name, "-F", "raw",
                           str(dst))

    @property
    def last_snapshot_times(self) -> dict[str, float]:
        """Seconds the last ``snapshot`` kept the VM paused, until resumed, in total."""
        return dict(self._snapshot_times)

    async def fork(self, n: int, *, timeout: float | None = None) -> list[AsyncSandbox]:
        """``n`` running copies of this sandbox (a live snapshot, restored ``n`` times).

        The snapshot lives in the runtime directory and is removed once the
        copies run (they keep sharing its memory). Each copy gets this sandbox's
        network policy (its own proxy and audit file). Raises like ``snapshot`` and
        ``from_snapshot``.
        """
        policy = self.network.policy
        return await self._fork(n, lambda snap, store: AsyncSandbox.from_snapshot(
            snap, timeout=timeout, store=store, network=policy))

    async def _fork(self, n: int,
                    restore: Callable[[Snapshot, SnapshotStore], Awaitable[AsyncSandbox]],
                    discard: Callable[[AsyncSandbox], Awaitable[None]] | None = None,
                    ) -> list[AsyncSandbox]:
        """``fork`` with how each copy is made (``restore(snapshot, store)``, ``n`` times
        at once) and how made copies are destroyed when another failed (``discard``,
        default ``kill``). Raises InvalidSpec (n out of 1..256), and what those raise."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 256:
            raise InvalidSpec(f"fork needs 1 to 256 copies, not {n!r}")
        # in the runtime dir (tmpfs), unless the sandbox has disks: their layers (and
        # the image under them) are linked from the copies, so they stay on disk
        tmp_store = SnapshotStore(fork_roots()[1 if self._vm.disk_tops else 0])
        snap = await self.snapshot(new_id("fork"), store=tmp_store)
        write_owner(snap.path)  # `sandvm gc` removes it if we die before we do
        try:
            results = await asyncio.gather(*(restore(snap, tmp_store) for _ in range(n)),
                                           return_exceptions=True)
        finally:
            await asyncio.to_thread(tmp_store.remove, snap.name)
        clones = [r for r in results if isinstance(r, AsyncSandbox)]
        errors = [r for r in results if not isinstance(r, AsyncSandbox)]
        if errors:
            await asyncio.gather(*((discard or AsyncSandbox.kill)(c) for c in clones),
                                 return_exceptions=True)
            err = errors[0]
            raise err if isinstance(err, BaseException) else RuntimeError(str(err))
        return clones

    async def pause(self, *, to_disk: bool = False,
                    store: SnapshotStore | None = None) -> Snapshot | None:
        """Freeze the VM's vCPUs (memory stays allocated), or with ``to_disk`` save it
        as snapshot ``paused-<id>`` and free it: the sandbox is then closed and
        ``resume_from`` brings it back, in this or another process. Raises
        SandboxStateError."""
        self._conn()
        if to_disk:
            return await self.snapshot(f"paused-{self.sandbox_id}", stop=True, store=store)
        await self._vm.pause()
        return None

    @classmethod
    async def resume_from(cls, paused: Snapshot | str, *, timeout: float | None = None,
                          store: SnapshotStore | None = None) -> AsyncSandbox:
        """Bring back a sandbox paused to disk, with its id; its snapshot is removed.

        ``paused`` is the Snapshot ``pause(to_disk=True)`` returned, or its name.
        Raises like ``from_snapshot``.
        """
        store = store or SnapshotStore()
        snap = store.resolve(paused)
        sb = await cls.from_snapshot(snap, timeout=timeout, sandbox_id=snap.source_id,
                                     store=store)
        await asyncio.to_thread(SnapshotStore(snap.path.parent).remove, snap.name)
        return sb

    async def resume(self) -> None:
        """Let a paused VM run again, its clock stepped to the host's (it stood still
        while paused). Raises SandboxStateError."""
        self._conn()
        await self._vm.resume()
        await self._step_clock()

    async def _step_clock(self) -> None:
        """The guest clock stood still while the VM was paused: set it to the host's."""
        await self._conn().call({"op": "configure", "time_ns": time.time_ns()},
                                timeout=self.op_timeout)

    async def _let_go(self) -> None:
        """Detach: close our connections and leave the VM running under its keeper.
        This object is unusable afterwards. Raises SandboxStateError if the sandbox
        was not created detachable."""
        self._conn()
        if self._vm.keeper_pid is None:
            raise SandboxStateError(f"sandbox {self.sandbox_id} was not created detachable:"
                                    " create it through sandvm's runtime (`sandvm create`)")
        self._detached = True
        self._closed = True
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
        await self.ports._shutdown()
        await self.network._shutdown()
        await self._vm.detach()

    def _conn(self) -> AgentConnection:
        if self._closed:
            if getattr(self, "_detached", False):
                raise SandboxStateError(f"sandbox {self.sandbox_id} was detached: reclaim it"
                                        " with its ticket")
            raise SandboxStateError(f"sandbox {self.sandbox_id} has been killed")
        if self._vm.failure is not None:
            raise self._vm.failure
        assert self._vm.agent is not None
        return self._vm.agent

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the VM: accelerator, boot time, guest kernel, agent version, QEMU pid."""
        ai = self._vm.agent_info
        return {"sandbox_id": self.sandbox_id, "accelerator": self._vm.accel,
                "image": self._vm.spec.image,
                "boot_seconds": self._vm.boot_seconds, "qemu_pid": self._vm.pid,
                "memory_mib": self._vm.spec.memory_mib, "vcpus": self._vm.spec.vcpus,
                "guest_kernel": ai.kernel if ai else None,
                "agent_version": ai.agent_version if ai else None,
                "volumes": {a.volume.name: {"path": m.path, "read_only": m.read_only}
                            for a, m in self._volumes}}

    async def is_running(self) -> bool:
        return not self._closed and self._vm.alive

    async def ping(self) -> float:
        """Agent round trip in seconds."""
        return await self._conn().ping()

    async def kill(self) -> None:
        """Destroy the VM and everything it had (its volumes' data is synced to them
        first, and they are released; its exposed ports stop listening). Idempotent."""
        if self._closed:
            return
        if any(not m.read_only for _, m in self._volumes) and self._vm.alive:
            # what the guest wrote may still be in its page cache: flush it to the volumes
            with contextlib.suppress(SandvmError):
                await self._conn().call({"op": "sync"}, timeout=min(self.op_timeout, 20.0))
        self._closed = True
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
        await self.ports._shutdown()  # no new tunnels: host listeners close first
        await self.network._shutdown()
        try:
            with contextlib.suppress(SandvmError):
                await self._provider.destroy_vm(self.sandbox_id)
            await self._vm.shutdown()
        finally:
            # once QEMU is gone (else the exit watcher does it when it is)
            if self._vm.proc is None or self._vm.proc.returncode is not None:
                self._release_volumes()
                if self._volume_watch is not None:
                    self._volume_watch.cancel()

    async def aclose(self) -> None:
        await self.kill()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


async def _qemu_version(qemu: Path) -> str:
    """`qemu-system-x86_64 --version`'s first line (cached per binary)."""
    return await asyncio.to_thread(qemu_version, qemu) or "?"


def _version() -> str:
    from sandvm import __version__

    return __version__


def _check_compatible(snap: Snapshot, accel: str, host_qemu: str) -> None:
    """Raise SnapshotIncompatible unless this host can load ``snap``'s device state."""
    if snap.accelerator and snap.accelerator != accel:
        raise SnapshotIncompatible(
            f"snapshot {snap.name} was taken under {snap.accelerator}; this host runs VMs"
            f" under {accel} (CPU state differs): set SANDVM_ACCEL={snap.accelerator}"
            " or take the snapshot here")
    if snap.qemu_version != host_qemu:
        raise SnapshotIncompatible(
            f"snapshot {snap.name} was taken with {snap.qemu_version!r}; this host has"
            f" {host_qemu!r}: take the snapshot again with this QEMU")


# --------------------------------------------------------------------------- sync surface


class CommandHandle:
    """Sync twin of AsyncCommandHandle."""

    def __init__(self, inner: AsyncCommandHandle) -> None:
        self._a = inner

    @property
    def pid(self) -> int | None:
        return self._a.pid

    @property
    def stdout(self) -> str:
        return self._a.stdout

    @property
    def stderr(self) -> str:
        return self._a.stderr

    def wait(self) -> CommandResult:
        return _portal.call(self._a.wait())

    def send_signal(self, sig: int | str, *, grace: float | None = None) -> None:
        _portal.call(self._a.send_signal(sig, grace=grace))

    def kill(self) -> None:
        _portal.call(self._a.kill())

    def send_stdin(self, data: bytes | str) -> None:
        _portal.call(self._a.send_stdin(data))

    def close_stdin(self) -> None:
        _portal.call(self._a.close_stdin())


class Commands:
    """Sync twin of AsyncCommands."""

    def __init__(self, inner: AsyncCommands) -> None:
        self._a = inner

    @overload
    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
            cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
            on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
            background: Literal[False] = ..., check: bool = ...,
            user: str | None = ...) -> CommandResult: ...

    @overload
    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
            cwd: str | None = ..., stdin: StdinSource = ..., timeout: float | None = ...,
            on_stdout: OutputCallback | None = ..., on_stderr: OutputCallback | None = ...,
            background: Literal[True], check: bool = ...,
            user: str | None = ...) -> CommandHandle: ...

    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: StdinSource = None,
            timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
            on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None,
            background: bool = False, check: bool = True,
            user: str | None = None) -> CommandResult | CommandHandle:
        """See AsyncCommands.run."""
        res = _portal.call(self._a._run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                                        on_stdout=on_stdout, on_stderr=on_stderr,
                                        background=background, check=check, user=user))
        return CommandHandle(res) if isinstance(res, AsyncCommandHandle) else res


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

    def upload_dir(self, local_dir: str | os.PathLike[str], guest_dir: str) -> DirTransfer:
        """See AsyncFiles.upload_dir."""
        return _portal.call(self._a.upload_dir(local_dir, guest_dir))

    def download_dir(self, guest_dir: str, local_dir: str | os.PathLike[str], *,
                     max_bytes: int = DEFAULT_TREE_CAP,
                     max_files: int = DEFAULT_TREE_ENTRIES) -> DirTransfer:
        """See AsyncFiles.download_dir."""
        return _portal.call(self._a.download_dir(guest_dir, local_dir, max_bytes=max_bytes,
                                                 max_files=max_files))


class Sandbox:
    """Sync twin of AsyncSandbox: ``with Sandbox.create() as sb: sb.commands.run("ls")``."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._a = inner
        self.sandbox_id = inner.sandbox_id
        self.commands = Commands(inner.commands)
        self.files = Files(inner.files)
        self.ports = Ports(inner.ports)
        self.network = Network(inner.network)

    @classmethod
    def create(cls, *, image: str | None = None, memory_mib: int | str = 256, vcpus: int = 1,
               disk_size: int | str | None = None,
               volumes: Mapping[str, str | tuple[str, str] | VolumeMount] | None = None,
               volume_store: VolumeStore | None = None,
               timeout: float | None = None, boot_timeout: float = 60.0,
               sandbox_id: str | None = None,
               provider: QemuVmProvider | None = None,
               keeper_job: dict[str, Any] | None = None,
               network: NetworkPolicy | None = None) -> Sandbox:
        """See AsyncSandbox.create."""
        return cls(_portal.call(AsyncSandbox.create(
            image=image, memory_mib=memory_mib, vcpus=vcpus, disk_size=disk_size,
            volumes=volumes, volume_store=volume_store, timeout=timeout,
            boot_timeout=boot_timeout, sandbox_id=sandbox_id, provider=provider,
            keeper_job=keeper_job, network=network)))

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot | str | Path, *,
                      timeout: float | None = None, boot_timeout: float = 60.0,
                      sandbox_id: str | None = None, verify: str = "once",
                      store: SnapshotStore | None = None,
                      provider: QemuVmProvider | None = None,
                      network: NetworkPolicy | None = None,
                      keeper_job: dict[str, Any] | None = None) -> Sandbox:
        """See AsyncSandbox.from_snapshot."""
        return cls(_portal.call(AsyncSandbox.from_snapshot(
            snapshot, timeout=timeout, boot_timeout=boot_timeout, sandbox_id=sandbox_id,
            verify=verify, store=store, provider=provider, network=network,
            keeper_job=keeper_job)))

    def snapshot(self, name: str | None = None, *, stop: bool = False,
                 store: SnapshotStore | None = None,
                 parent: Snapshot | str | None = None) -> Snapshot:
        return _portal.call(self._a.snapshot(name, stop=stop, store=store, parent=parent))

    def fork(self, n: int, *, timeout: float | None = None) -> list[Sandbox]:
        return [Sandbox(a) for a in _portal.call(self._a.fork(n, timeout=timeout))]

    def pause(self, *, to_disk: bool = False,
              store: SnapshotStore | None = None) -> Snapshot | None:
        return _portal.call(self._a.pause(to_disk=to_disk, store=store))

    @classmethod
    def resume_from(cls, paused: Snapshot | str, *, timeout: float | None = None,
                    store: SnapshotStore | None = None) -> Sandbox:
        """See AsyncSandbox.resume_from."""
        return cls(_portal.call(AsyncSandbox.resume_from(paused, timeout=timeout,
                                                         store=store)))

    def resume(self) -> None:
        _portal.call(self._a.resume())

    @property
    def last_snapshot_times(self) -> dict[str, float]:
        return self._a.last_snapshot_times

    @property
    def info(self) -> dict[str, Any]:
        return self._a.info

    def is_running(self) -> bool:
        return _portal.call(self._a.is_running())

    def ping(self) -> float:
        return _portal.call(self._a.ping())

    def kill(self) -> None:
        _portal.call(self._a.kill())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


DEFAULT_DISK_SIZE = 4 << 30


def fork_roots() -> tuple[Path, Path]:
    """Where ``fork`` keeps its temporary snapshot: in the runtime dir (tmpfs), or on
    disk for a sandbox with disks. Each carries its owner; ``gc`` sweeps the dead's."""
    return runtime_root() / "fork-snapshots", disk_root().parent / "fork-snapshots"


def _check_network(network: object) -> None:
    if network is not None and not isinstance(network, NetworkPolicy):
        raise InvalidSpec("network must be a sandvm.NetworkPolicy (or None for no network),"
                          f" got {type(network).__name__}")


def image_env(pairs: Iterable[str]) -> dict[str, str]:
    """An image config's ``Env`` (``NAME=value`` strings) as a dict; bad items skipped."""
    out = {}
    for item in pairs:
        name, eq, value = str(item).partition("=")
        if eq and name:
            out[name] = value
    return out


async def _resolve_image(image: str, disk_size: int | str | None
                         ) -> tuple[dict[str, Any] | None, tuple[DiskSpec, ...]]:
    """(image record, disks) for ``image``: none for a built-in image."""
    if image in BUILTIN_IMAGES:
        if disk_size is not None:
            raise InvalidSpec(f"the {image!r} image runs from memory and has no disk: give"
                              " disk_size only with an image (e.g. oci:./layout:tag)")
        return None, ()
    from sandvm.images.store import ImageStore

    stored = await asyncio.to_thread(ImageStore().get, image)
    size = parse_size(disk_size, what="disk_size") if disk_size is not None else max(
        DEFAULT_DISK_SIZE, stored.rootfs_bytes + (256 << 20))
    if size < stored.rootfs_bytes:
        raise InvalidSpec(f"disk_size {size} bytes is smaller than the image's root"
                          f" filesystem ({stored.rootfs_bytes} bytes)")
    cfg = stored.config
    record = {"name": image, "manifest_digest": stored.manifest_digest,
              "build_id": stored.build_id, "rootfs": str(stored.rootfs), "disk_size": size,
              "config": {"env": list(cfg.env), "working_dir": cfg.working_dir,
                         "user": cfg.user, "entrypoint": list(cfg.entrypoint),
                         "cmd": list(cfg.cmd)}}
    disk = DiskSpec(serial=ROOT_DISK, path=str(stored.rootfs), format="raw",
                    overlay_size=size)
    return record, (disk,)


def _attach_volumes(store: VolumeStore | None, mounts: list[tuple[str, VolumeMount]],
                    sandbox_id: str) -> list[tuple[VolumeAttachment, VolumeMount]]:
    """Lock every volume for ``sandbox_id`` (all or none). Raises VolumeNotFound, VolumeInUse."""
    if not mounts:
        return []
    store = store or VolumeStore()
    out: list[tuple[VolumeAttachment, VolumeMount]] = []
    try:
        for name, m in mounts:
            out.append((store.attach(name, sandbox_id=sandbox_id, read_only=m.read_only), m))
    except BaseException:
        for att, _ in out:
            att.release()
        raise
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        sparse_copy(src, dst)
