"""What a user holds: a sandbox = a VM + its agent connection.

``AsyncSandbox`` is the one implementation (asyncio). ``Sandbox`` exposes the
same surface synchronously by running it on the blocking portal's loop thread.
A test checks that both surfaces keep the same methods and signatures.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import secrets
import shutil
import signal as signal_mod
import tempfile
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from sandvm import _portal, wire
from sandvm._files import move_file, runtime_root, sparse_copy
from sandvm.agent_client import AgentConnection, HostStream
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
)
from sandvm.errors import (
    AgentProtocolError,
    AgentTimeout,
    CommandExitError,
    CommandTimeout,
    FileTooLarge,
    InvalidSpec,
    SandboxStateError,
    SandvmError,
    SnapshotIncompatible,
)
from sandvm.providers.qemu import QemuVm, QemuVmProvider, qemu_img
from sandvm.snapshots.diff import write_diff
from sandvm.snapshots.store import Snapshot, SnapshotStore

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_READ_CAP",
    "AsyncCommandHandle",
    "AsyncSandbox",
    "CommandHandle",
    "CommandResult",
    "EntryInfo",
    "Sandbox",
    "WriteInfo",
]

DEFAULT_COMMAND_TIMEOUT = 60.0
DEFAULT_READ_CAP = 32 * 1024 * 1024
OUTPUT_CAP = 64 * 1024 * 1024  # per command and stream, kept in memory
LIST_CAP = 100_000  # entries in one listing (the guest stops there too)
_HOST_GRACE = 10.0  # the host waits this long past a command's timeout for the guest

OutputCallback = Callable[[str], Any]
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
    """Build an EntryInfo from a guest dict, checking every field's type (guest is hostile)."""
    try:
        e = EntryInfo(path=str(d["path"])[:4096], name=str(d["name"])[:4096], type=str(d["type"]),
                      size=int(d["size"]), mode=int(d["mode"]), mtime=float(d["mtime"]),
                      uid=int(d.get("uid", 0)), gid=int(d.get("gid", 0)),
                      target=None if d.get("target") is None else str(d["target"])[:4096])
    except (KeyError, TypeError, ValueError) as exc:
        raise AgentProtocolError(f"guest sent a malformed file entry: {exc!r}") from None
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


class _Output:
    def __init__(self, cb: OutputCallback | None) -> None:
        self.buf = bytearray()
        self.cb = cb
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    async def feed(self, data: bytes) -> None:
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
                 stdin: StdinSource, stdin_open: bool) -> None:
        self._stream = stream
        self._timeout = timeout
        self._check = check
        self._out = _Output(on_stdout)
        self._err = _Output(on_stderr)
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
                if msg.get("event") == "started" and isinstance(msg.get("pid"), int):
                    self._pid = msg["pid"]
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
        code = msg.get("exit_code")
        sig = msg.get("signal")
        if not isinstance(code, int) or not (sig is None or isinstance(sig, int)):
            raise AgentProtocolError("guest sent a malformed exit report")
        dur = msg.get("duration")
        result = CommandResult(
            exit_code=code, stdout_bytes=bytes(self._out.buf), stderr_bytes=bytes(self._err.buf),
            signal=sig, timed_out=bool(msg.get("timed_out")),
            duration=float(dur) if isinstance(dur, (int, float)) else 0.0,
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
                   background: bool, check: bool, user: str | None = None
                   ) -> CommandResult | AsyncCommandHandle:
        """The one implementation behind AsyncCommands.run and Commands.run."""
        req: dict[str, Any] = {"op": "exec"}
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
            if timeout <= 0:
                raise InvalidSpec(f"timeout must be positive seconds or None, got {timeout}")
            req["timeout"] = float(timeout)
        stdin_open = stdin is not None or background
        req["stdin"] = stdin_open
        conn = self._sb._conn()
        stream = await conn.open(req)
        handle = AsyncCommandHandle(stream, timeout=timeout, check=check, on_stdout=on_stdout,
                                    on_stderr=on_stderr, stdin=stdin, stdin_open=stdin_open)
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
                    size = (item.message or {}).get("size")
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
                    size = (item.message or {}).get("size")
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
                    batch = (item.message or {}).get("entries")
                    if not isinstance(batch, list):
                        raise AgentProtocolError("guest sent a malformed listing")
                    entries.extend(_entry(e) if isinstance(e, dict) else _entry({})
                                   for e in batch)
                    if len(entries) > LIST_CAP:
                        raise AgentProtocolError(f"guest listed more than {LIST_CAP} entries")
                elif item.kind == "reply":
                    if (item.message or {}).get("count") != len(entries):
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
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self._snapshot_times: dict[str, float] = {}
        # the image (name, digest, config, rootfs) of a sandbox with a root disk
        self._image: dict[str, Any] | None = None
        if lifetime is not None:
            self._lifetime_handle = asyncio.get_running_loop().call_later(
                lifetime, self._expire)

    def _expire(self) -> None:
        self._expiry = asyncio.get_running_loop().create_task(self.kill())

    @classmethod
    async def create(cls, *, image: str = "base", memory_mib: int | str = 256, vcpus: int = 1,
                     disk_size: int | str | None = None,
                     timeout: float | None = None, boot_timeout: float = 60.0,
                     sandbox_id: str | None = None,
                     provider: QemuVmProvider | None = None) -> AsyncSandbox:
        """Boot a new sandbox and wait until its agent is ready.

        ``image``: ``base`` (the built-in one, running from memory), a name from
        `sandvm image ls`, or a source such as ``oci:./layout:tag`` (imported and
        cached on first use). An image's root filesystem is a private disk of
        ``disk_size`` bytes (default 4 GiB, sparse; a full disk is ENOSPC in the
        guest). ``timeout`` is the sandbox's lifetime in seconds (None: until
        killed). Raises InvalidSpec / UnknownImage / ImageError for bad input,
        AssetMissing if `sandvm setup` has not run, VmBootError if the VM does
        not come up.
        """
        if timeout is not None and timeout <= 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, got {timeout}")
        image_info, disks = await _resolve_image(image, disk_size)
        spec = VmSpec(image=image, memory_mib=parse_memory(memory_mib), vcpus=vcpus,
                      disks=disks)
        sid = sandbox_id or new_id("sb")
        prov = provider or QemuVmProvider(boot_timeout=boot_timeout)
        await prov.create_vm_with_spec(sid, spec)
        return await cls._launch(prov, sid, prov.start_vm(sid), timeout, image=image_info)

    @classmethod
    async def _launch(cls, prov: QemuVmProvider, sid: str, start: Awaitable[None],
                      lifetime: float | None, *, image: dict[str, Any] | None = None,
                      restored: bool = False) -> AsyncSandbox:
        """Run ``start`` for the Created VM ``sid``, configure it; destroy it on failure."""
        try:
            await start
            sb = cls(sandbox_id=sid, provider=prov, vm=prov.vm(sid), lifetime=lifetime)
            sb._image = image
            if image is not None and not restored:
                await sb._conn().call({"op": "mount_root", "serial": ROOT_DISK},
                                      timeout=sb.op_timeout)
            await sb._configure()
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
                            provider: QemuVmProvider | None = None) -> AsyncSandbox:
        """A new sandbox restored from a snapshot: files and processes as they were.

        ``snapshot`` is a Snapshot, a snapshot name in the store, or a snapshot
        directory. Its memory is shared copy-on-write with every other sandbox
        restored from it. The clone gets fresh entropy, the host's clock, and its
        own id and hostname. ``verify``: "once" checks the RAM file's sha256 once
        per process (the small state file every time), "full" every time.
        Raises SnapshotNotFound, SnapshotCorrupt, SnapshotIncompatible, VmBootError.
        """
        if verify not in ("once", "full"):
            raise InvalidSpec(f"verify must be 'once' or 'full', not {verify!r}")
        if timeout is not None and timeout <= 0:
            raise InvalidSpec(f"timeout must be positive seconds or None, got {timeout}")
        snap = (store or SnapshotStore()).resolve(snapshot)
        await asyncio.to_thread(SnapshotStore.verify, snap, full=verify == "full")
        prov = provider or QemuVmProvider(boot_timeout=boot_timeout)
        assets, accel = await prov._resolve()
        _check_compatible(snap, accel, await _qemu_version(assets.qemu))
        _check_image(snap)
        source = await asyncio.to_thread(SnapshotStore(snap.path.parent).materialize, snap)
        sid = sandbox_id or new_id("sb")
        await prov.create_vm_with_spec(sid, snap.spec)
        return await cls._launch(prov, sid, prov.restore_vm(sid, source), timeout,
                                 image=snap.image, restored=True)

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
        SandboxStateError.
        """
        self._conn()  # raises if killed or crashed
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
        staging = store.staging(name)
        # while the VM is paused, its state goes to tmpfs (fast); to the store after
        fast = Path(tempfile.mkdtemp(prefix="snap-", dir=runtime_root()))
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
        """Copy the disk layers frozen by the last save into ``staging``, each made
        self-contained over its image (rebased when it sits on other layers)."""
        for serial, frozen in self._vm.frozen_disks.items():
            dst = staging / f"disk-{serial}.qcow2"
            await asyncio.to_thread(sparse_copy, frozen, dst)
            base = (self._image or {}).get("rootfs")
            if serial == ROOT_DISK and base:
                info = await qemu_img("info", "--output=json", "-U", str(dst))
                if json.loads(info).get("full-backing-filename") != base:
                    # fold every layer between this one and the image into it
                    await qemu_img("rebase", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                                   str(dst))

    @property
    def last_snapshot_times(self) -> dict[str, float]:
        """Seconds the last ``snapshot`` kept the VM paused, until resumed, in total."""
        return dict(self._snapshot_times)

    async def fork(self, n: int, *, timeout: float | None = None) -> list[AsyncSandbox]:
        """``n`` running copies of this sandbox (a live snapshot, restored ``n`` times).

        The snapshot lives in the runtime directory and is removed once the
        copies run (they keep sharing its memory). Raises like ``snapshot`` and
        ``from_snapshot``.
        """
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 256:
            raise InvalidSpec(f"fork needs 1 to 256 copies, not {n!r}")
        tmp_store = SnapshotStore(runtime_root() / "fork-snapshots")
        snap = await self.snapshot(new_id("fork"), store=tmp_store)
        try:
            results = await asyncio.gather(
                *(AsyncSandbox.from_snapshot(snap, timeout=timeout, store=tmp_store)
                  for _ in range(n)), return_exceptions=True)
        finally:
            await asyncio.to_thread(tmp_store.remove, snap.name)
        clones = [r for r in results if isinstance(r, AsyncSandbox)]
        errors = [r for r in results if not isinstance(r, AsyncSandbox)]
        if errors:
            await asyncio.gather(*(c.kill() for c in clones), return_exceptions=True)
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

    def _conn(self) -> AgentConnection:
        if self._closed:
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
                "agent_version": ai.agent_version if ai else None}

    async def is_running(self) -> bool:
        return not self._closed and self._vm.alive

    async def ping(self) -> float:
        """Agent round trip in seconds."""
        return await self._conn().ping()

    async def kill(self) -> None:
        """Destroy the VM and everything it had. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
        with contextlib.suppress(SandvmError):
            await self._provider.destroy_vm(self.sandbox_id)
        await self._vm.shutdown()

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


class Files:
    """Sync twin of AsyncFiles."""

    def __init__(self, inner: AsyncFiles) -> None:
        self._a = inner

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
              make_parents: bool = True) -> WriteInfo:
        return _portal.call(self._a.write(path, data, mode=mode, make_parents=make_parents))

    @overload
    def read(self, path: str, *, format: Literal["text"] = ..., max_bytes: int = ...) -> str: ...

    @overload
    def read(self, path: str, *, format: Literal["bytes"], max_bytes: int = ...) -> bytes: ...

    def read(self, path: str, *, format: Literal["text", "bytes"] = "text",
             max_bytes: int = DEFAULT_READ_CAP) -> str | bytes:
        data = _portal.call(self._a.read(path, format="bytes", max_bytes=max_bytes))
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


class Sandbox:
    """Sync twin of AsyncSandbox: ``with Sandbox.create() as sb: sb.commands.run("ls")``."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._a = inner
        self.sandbox_id = inner.sandbox_id
        self.commands = Commands(inner.commands)
        self.files = Files(inner.files)

    @classmethod
    def create(cls, *, image: str = "base", memory_mib: int | str = 256, vcpus: int = 1,
               disk_size: int | str | None = None,
               timeout: float | None = None, boot_timeout: float = 60.0,
               sandbox_id: str | None = None,
               provider: QemuVmProvider | None = None) -> Sandbox:
        """See AsyncSandbox.create."""
        return cls(_portal.call(AsyncSandbox.create(
            image=image, memory_mib=memory_mib, vcpus=vcpus, disk_size=disk_size,
            timeout=timeout,
            boot_timeout=boot_timeout, sandbox_id=sandbox_id, provider=provider)))

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot | str | Path, *,
                      timeout: float | None = None, boot_timeout: float = 60.0,
                      sandbox_id: str | None = None, verify: str = "once",
                      store: SnapshotStore | None = None,
                      provider: QemuVmProvider | None = None) -> Sandbox:
        """See AsyncSandbox.from_snapshot."""
        return cls(_portal.call(AsyncSandbox.from_snapshot(
            snapshot, timeout=timeout, boot_timeout=boot_timeout, sandbox_id=sandbox_id,
            verify=verify, store=store, provider=provider)))

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


def _check_image(snap: Snapshot) -> None:
    """A snapshot with a disk needs the very root filesystem it was taken over."""
    if snap.image is None:
        return
    rootfs = Path(str(snap.image.get("rootfs", "")))
    try:
        record = json.loads(rootfs.with_suffix(".json").read_text())
    except (OSError, ValueError):
        record = None
    if not rootfs.is_file() or not isinstance(record, dict) or \
            record.get("build_id") != snap.image.get("build_id"):
        raise SnapshotIncompatible(
            f"snapshot {snap.name!r} was taken over image {snap.image.get('name')!r}, whose"
            f" root filesystem ({rootfs}) is gone or was rebuilt since: its disk layer cannot"
            " be used; take the snapshot again")
