"""sandvm guest agent: runs inside the VM as init's child, stdlib only.

It opens the virtio-serial port named ``sandvm.agent`` and serves the framed
protocol of :mod:`wire` (copied beside this file in the initramfs): exec with
streamed stdio, signals and timeouts; file transfer and file-system calls.

It is a single-threaded event loop built on ``selectors`` (no asyncio: the
import alone costs a noticeable share of boot time under TCG). Every workload
runs in its own session/process group and, where cgroup v2 is available, in
its own cgroup so that a timeout or kill leaves no survivor. The agent is a
child subreaper, so orphaned grandchildren are reaped here.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import os
import selectors
import signal
import socket
import stat as stat_mod
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # in the guest, wire.py sits beside this file
    from sandvm import wire
else:
    import wire

AGENT_VERSION = "0.1.0"
PORT_NAME = "sandvm.agent"
CGROUP_ROOT = "/sys/fs/cgroup"
READ_CHUNK = wire.DATA_CHUNK
KILL_GRACE = 2.0


def log(msg: str) -> None:
    try:
        with open("/dev/kmsg", "w") as f:
            f.write(f"sandvm-agent: {msg}\n")
    except OSError:
        pass


# --------------------------------------------------------------------------- loop


class Loop:
    """A minimal callback loop: fd readiness, timers and SIGCHLD."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.cancelled: set[int] = set()
        self.seq = itertools.count()
        self.handlers: dict[int, list[Callable[[], None] | None]] = {}

    def _update(self, fd: int) -> None:
        r, w = self.handlers.get(fd, [None, None])
        mask = (selectors.EVENT_READ if r else 0) | (selectors.EVENT_WRITE if w else 0)
        try:
            key = self.sel.get_key(fd)
        except KeyError:
            key = None
        if mask == 0:
            if key is not None:
                self.sel.unregister(fd)
            self.handlers.pop(fd, None)
        elif key is None:
            self.sel.register(fd, mask)
        else:
            self.sel.modify(fd, mask)

    def set_reader(self, fd: int, cb: Callable[[], None] | None) -> None:
        self.handlers.setdefault(fd, [None, None])[0] = cb
        self._update(fd)

    def set_writer(self, fd: int, cb: Callable[[], None] | None) -> None:
        self.handlers.setdefault(fd, [None, None])[1] = cb
        self._update(fd)

    def call_later(self, delay: float, cb: Callable[[], None]) -> int:
        tid = next(self.seq)
        heapq.heappush(self.timers, (time.monotonic() + delay, tid, cb))
        return tid

    def cancel(self, tid: int | None) -> None:
        if tid is not None:
            self.cancelled.add(tid)

    def run(self) -> None:
        while True:
            timeout = None
            now = time.monotonic()
            while self.timers and self.timers[0][1] in self.cancelled:
                self.cancelled.discard(heapq.heappop(self.timers)[1])
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - now)
            for key, mask in self.sel.select(timeout):
                h = self.handlers.get(key.fd)
                if h is None:
                    continue
                if mask & selectors.EVENT_READ and h[0]:
                    self._safe(h[0])
                h = self.handlers.get(key.fd)
                if h and mask & selectors.EVENT_WRITE and h[1]:
                    self._safe(h[1])
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, tid, cb = heapq.heappop(self.timers)
                if tid in self.cancelled:
                    self.cancelled.discard(tid)
                    continue
                self._safe(cb)

    @staticmethod
    def _safe(cb: Callable[[], None]) -> None:
        # a bug in one handler must not take the agent (and so the VM) down
        try:
            cb()
        except Exception as exc:  # noqa: BLE001
            import traceback

            log(f"handler failed: {exc!r}: {traceback.format_exc()[-1500:]}")


# --------------------------------------------------------------------------- transport


class Transport:
    """The framed channel over the virtio-serial port (non-blocking fd)."""

    def __init__(self, loop: Loop, fd: int, on_frame: Callable[[int, int, bytes], None]) -> None:
        self.loop = loop
        self.fd = fd
        self.on_frame = on_frame
        self.decoder = wire.FrameDecoder()
        self.out: collections.deque[bytes | memoryview] = collections.deque()
        self.loop.set_reader(fd, self._readable)

    def _readable(self) -> None:
        # virtio-serial hands out at most one guest buffer (a page) per read: drain
        # everything available, then decode once
        parts: list[bytes] = []
        total = 0
        eof = False
        while total < (1 << 20):
            try:
                chunk = os.read(self.fd, 1 << 18)
            except BlockingIOError:
                break
            except OSError as exc:
                if parts:
                    break
                log(f"port read failed: {exc}")
                time.sleep(0.05)
                return
            if not chunk:
                eof = True
                break
            parts.append(chunk)
            total += len(chunk)
        if eof and not parts:
            # host side not connected (virtio-serial reports EOF): wait and retry
            self.loop.set_reader(self.fd, None)
            self.loop.call_later(0.05, lambda: self.loop.set_reader(self.fd, self._readable))
            return
        frames = []
        try:
            for part in parts:
                frames.extend(self.decoder.feed(part))
        except wire.ProtocolViolation as exc:
            log(f"protocol violation from host: {exc}; resetting decoder")
            self.decoder = wire.FrameDecoder()
            return
        for ftype, stream, payload in frames:
            try:
                self.on_frame(ftype, stream, payload)
            except Exception as exc:  # noqa: BLE001 - keep serving the other streams
                log(f"frame {ftype} on stream {stream} failed: {exc!r}")

    def send(self, frame: bytes) -> None:
        self.out.append(frame)
        self._flush()

    def send_data(self, sid: int, channel: int, data: bytes) -> None:
        """A DATA frame without copying ``data`` into it (written with writev)."""
        self.out.append(wire.data_header(sid, channel, len(data)))
        self.out.append(data)
        self._flush()

    def _flush(self) -> None:
        out = self.out
        while out:
            try:
                n = os.writev(self.fd, list(itertools.islice(out, 0, 64)))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    break
                log(f"port write failed: {exc}")
                out.clear()
                break
            while n:
                first = out[0]
                if len(first) <= n:
                    n -= len(first)
                    out.popleft()
                else:
                    out[0] = memoryview(first)[n:]
                    n = 0
        self.loop.set_writer(self.fd, self._flush if out else None)


# --------------------------------------------------------------------------- streams


def error_reply(exc: BaseException) -> dict[str, Any]:
    code = "guest_error"
    if isinstance(exc, FileNotFoundError):
        code = "file_not_found"
    elif isinstance(exc, FileExistsError):
        code = "file_exists"
    elif isinstance(exc, PermissionError):
        code = "permission_denied"
    elif isinstance(exc, GuestFail):
        code = exc.code
    msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename:
        msg = f"{msg}: {exc.filename}"
    return {"code": code, "message": msg}


class GuestFail(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stream:
    """One open stream; subclasses implement an operation."""

    def __init__(self, agent: Agent, sid: int, req: dict[str, Any]) -> None:
        self.agent = agent
        self.sid = sid
        self.req = req
        self.send_window = wire.INITIAL_WINDOW
        self.closed = False

    def start(self) -> None:
        raise NotImplementedError

    def on_data(self, channel: int, data: bytes | memoryview) -> None:
        raise wire.ProtocolViolation("this stream takes no data")

    def on_eof(self, channel: int) -> None:
        pass

    def on_ctrl(self, msg: dict[str, Any]) -> None:
        pass

    def on_window(self, inc: int) -> None:
        self.send_window += inc

    def on_reset(self) -> None:
        self.finish(None)

    def send(self, frame: bytes) -> None:
        if not self.closed:
            self.agent.transport.send(frame)

    def reply(self, obj: dict[str, Any]) -> None:
        self.send(wire.encode_json(wire.REPLY, self.sid, obj))
        self.finish(None)

    def fail(self, exc: BaseException) -> None:
        self.send(wire.encode_json(wire.RESET, self.sid, error_reply(exc)))
        self.finish(None)

    def finish(self, _: object) -> None:
        if not self.closed:
            self.closed = True
            self.agent.streams.pop(self.sid, None)
            self.cleanup()

    def cleanup(self) -> None:
        pass


class ExecStream(Stream):
    """Run one command; stream stdout/stderr; report exit."""

    def start(self) -> None:
        # everything cleanup() touches exists before anything can fail
        self.exit_status: int | None = None
        self.fds: dict[int, int] = {}  # channel -> fd
        self.in_fd = -1
        self.cgroup: str | None = None
        self.drain_timer: int | None = None
        self.timeout_timer: int | None = None
        self.kill_timer: int | None = None
        self.pending_in = bytearray()
        self.in_eof = False
        self.timed_out = False
        self.killed_by_request = False
        req = self.req
        argv = req.get("argv")
        shell = req.get("shell")
        if shell is not None:
            if not isinstance(shell, str):
                raise GuestFail("invalid_request", "shell must be a string")
            argv = ["/bin/sh", "-c", shell]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise GuestFail("invalid_request", "argv must be a non-empty list of strings")
        env = req.get("env") or {}
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                for k, v in env.items()):
            raise GuestFail("invalid_request", "env must map names to strings")
        env = {**self.agent.base_env, **env}
        cwd = req.get("cwd") or "/root"
        self.timeout = req.get("timeout")
        self.stdin_open = bool(req.get("stdin"))
        self.cgroup = self.agent.new_cgroup(self.sid)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if self.stdin_open else (os.open("/dev/null", os.O_RDONLY), -1)
        try:
            self.pid = self.agent.spawn(argv, env, cwd, in_r, out_w, err_w, self.cgroup)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                os.close(fd)
        self.pgid = self.pid
        self.started = time.monotonic()
        self.in_fd = in_w
        for ch, fd in ((wire.CH_STDOUT, out_r), (wire.CH_STDERR, err_r)):
            os.set_blocking(fd, False)
            self.fds[ch] = fd
            self._arm(ch)
        if self.in_fd >= 0:
            os.set_blocking(self.in_fd, False)
        self.agent.procs[self.pid] = self
        if isinstance(self.timeout, (int, float)) and self.timeout > 0:
            self.timeout_timer = self.agent.loop.call_later(float(self.timeout), self._on_timeout)
        self.send(wire.encode_json(wire.EVENT, self.sid, {"event": "started", "pid": self.pid}))

    # stdout/stderr -> host, paced by the send window
    def _arm(self, ch: int) -> None:
        fd = self.fds.get(ch)
        if fd is None:
            return
        if self.send_window > 0:
            self.agent.loop.set_reader(fd, lambda: self._pump(ch))
        else:
            self.agent.loop.set_reader(fd, None)

    def _pump(self, ch: int) -> None:
        fd = self.fds.get(ch)
        if fd is None:
            return
        n = min(READ_CHUNK, self.send_window)
        if n <= 0:
            self._arm(ch)
            return
        try:
            data = os.read(fd, n)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.agent.loop.set_reader(fd, None)
            os.close(fd)
            del self.fds[ch]
            self.send(wire.encode(wire.EOF, self.sid, bytes((ch,))))
            self._maybe_done()
            return
        self.send_window -= len(data)
        if not self.closed:
            self.agent.transport.send_data(self.sid, ch, data)
        if self.send_window <= 0:
            for c in list(self.fds):
                self._arm(c)

    def on_window(self, inc: int) -> None:
        was = self.send_window
        self.send_window += inc
        if was <= 0 < self.send_window:
            for c in list(self.fds):
                self._arm(c)

    # host -> stdin
    def on_data(self, channel: int, data: bytes | memoryview) -> None:
        if channel != wire.CH_STDIN or self.in_eof:
            raise wire.ProtocolViolation("stdin data after EOF or on a wrong channel")
        if self.in_fd < 0:
            # stdin closed (process exited or never opened): give the credit back, drop
            self.send(wire.encode_window(self.sid, len(data))) if data else None
            return
        self.pending_in += data
        self._write_in()

    def on_eof(self, channel: int) -> None:
        if channel == wire.CH_STDIN:
            self.in_eof = True
            self._write_in()

    def _write_in(self) -> None:
        if self.in_fd < 0:
            return
        written = 0
        while self.pending_in:
            try:
                n = os.write(self.in_fd, self.pending_in)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: the process closed stdin
                written += len(self.pending_in)
                self.pending_in.clear()
                self._close_in()
                break
            written += n
            del self.pending_in[:n]
        if written:
            self.send(wire.encode_window(self.sid, written))
        if self.in_fd >= 0:
            if self.pending_in:
                self.agent.loop.set_writer(self.in_fd, self._write_in)
            else:
                self.agent.loop.set_writer(self.in_fd, None)
                if self.in_eof:
                    self._close_in()

    def _close_in(self) -> None:
        if self.in_fd >= 0:
            self.agent.loop.set_writer(self.in_fd, None)
            os.close(self.in_fd)
            self.in_fd = -1

    # signals, timeout
    def on_ctrl(self, msg: dict[str, Any]) -> None:
        sig = msg.get("signal")
        if not isinstance(sig, int) or not 1 <= sig <= 64:
            raise wire.ProtocolViolation("CTRL needs a signal number")
        if self.exit_status is not None:
            return
        self.killed_by_request = self.killed_by_request or sig in (signal.SIGKILL, signal.SIGTERM)
        self.signal_group(sig)
        grace = msg.get("grace")
        if sig != signal.SIGKILL and isinstance(grace, (int, float)) and grace >= 0:
            self.agent.loop.cancel(self.kill_timer)
            self.kill_timer = self.agent.loop.call_later(float(grace), self.kill_all)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.pgid, sig)

    def kill_all(self) -> None:
        """SIGKILL every process of this command: its cgroup, else its group."""
        if self.cgroup:
            try:
                with open(os.path.join(self.cgroup, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:
                pass
        self.signal_group(signal.SIGKILL)

    def _on_timeout(self) -> None:
        self.timeout_timer = None
        if self.exit_status is None or self.fds:
            self.timed_out = True
            self.kill_all()

    # completion
    def on_exit(self, status: int) -> None:
        self.exit_status = status
        self._close_in()
        # the leader is gone; wait briefly for its pipes to reach EOF (a background
        # grandchild may hold them open: then stop reading after a grace period)
        if self.fds:
            self.drain_timer = self.agent.loop.call_later(1.0, self._stop_draining)
        self._maybe_done()

    def _stop_draining(self) -> None:
        self.drain_timer = None
        for ch, fd in list(self.fds.items()):
            self.agent.loop.set_reader(fd, None)
            os.close(fd)
            del self.fds[ch]
            self.send(wire.encode(wire.EOF, self.sid, bytes((ch,))))
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.exit_status is None or self.fds or self.closed:
            return
        st = self.exit_status
        res: dict[str, Any] = {"event": "exit", "timed_out": self.timed_out,
                               "duration": time.monotonic() - self.started}
        if os.WIFSIGNALED(st):
            res["signal"] = os.WTERMSIG(st)
            res["exit_code"] = 128 + os.WTERMSIG(st)
        else:
            res["exit_code"] = os.WEXITSTATUS(st)
            res["signal"] = None
        self.reply(res)

    def on_reset(self) -> None:
        # the host gave up on this command: kill it
        if self.exit_status is None:
            self.kill_all()
        self.finish(None)

    def cleanup(self) -> None:
        loop = self.agent.loop
        for t in (self.drain_timer, self.timeout_timer, self.kill_timer):
            loop.cancel(t)
        for fd in self.fds.values():
            loop.set_reader(fd, None)
            os.close(fd)
        self.fds.clear()
        self._close_in()
        if not hasattr(self, "pid"):
            self.agent.drop_cgroup(self.cgroup)  # never started
        elif self.exit_status is None:
            self.kill_all()
        else:
            self.agent.drop_cgroup(self.cgroup)


class WriteFileStream(Stream):
    """Receive a file: temp file in the same directory, fsync, rename."""

    def start(self) -> None:
        path = check_path(self.req.get("path"))
        mode = self.req.get("mode", 0o644)
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise GuestFail("invalid_request", "mode must be an int between 0 and 0o7777")
        self.path = path
        self.mode = mode
        parent = os.path.dirname(path) or "/"
        if self.req.get("make_parents"):
            os.makedirs(parent, exist_ok=True)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        name = f".{os.path.basename(path)}.sandvm-{os.getpid()}-{self.sid}"
        self.tmp = os.path.join(parent, name)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.size = 0

    def on_data(self, channel: int, data: bytes | memoryview) -> None:
        if self.fd < 0:
            return
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            self.fail(exc)
            return
        self.size += len(data)
        self.send(wire.encode_window(self.sid, len(data))) if data else None

    def on_eof(self, channel: int) -> None:
        if self.fd < 0:
            return
        try:
            os.fchmod(self.fd, self.mode)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.path)
            dfd = os.open(os.path.dirname(self.path) or "/", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            self.fail(exc)
            return
        self.reply({"size": self.size, "path": self.path})

    def cleanup(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        tmp = getattr(self, "tmp", None)
        if tmp and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class ReadFileStream(Stream):
    """Send a file, paced by the window; refuse files over the caller's cap."""

    def start(self) -> None:
        path = check_path(self.req.get("path"))
        cap = self.req.get("max_bytes")
        if not isinstance(cap, int) or cap < 0:
            raise GuestFail("invalid_request", "max_bytes must be a non-negative int")
        self.cap = cap
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        st = os.fstat(self.fd)
        if stat_mod.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if stat_mod.S_ISREG(st.st_mode) and st.st_size > cap:
            raise GuestFail("file_too_large",
                            f"{path} is {st.st_size} bytes, over the cap of {cap} bytes")
        self.sent = 0
        self.send(wire.encode_json(wire.EVENT, self.sid, {"event": "size", "size": st.st_size}))
        self.agent.loop.call_later(0, self._pump)

    def _pump(self) -> None:
        # regular files never block; read and send while the window allows
        while not self.closed and self.send_window > 0:
            n = min(READ_CHUNK, self.send_window, self.cap + 1 - self.sent)
            try:
                data = os.read(self.fd, n)
            except OSError as exc:
                self.fail(exc)
                return
            if not data:
                self.send(wire.encode(wire.EOF, self.sid, bytes((wire.CH_STDOUT,))))
                self.reply({"size": self.sent})
                return
            if self.sent + len(data) > self.cap:
                self.fail(GuestFail("file_too_large",
                                    f"file grew past the cap of {self.cap} bytes while reading"))
                return
            self.sent += len(data)
            self.send_window -= len(data)
            self.agent.transport.send_data(self.sid, wire.CH_STDOUT, data)

    def on_window(self, inc: int) -> None:
        was = self.send_window
        self.send_window += inc
        if was <= 0 < self.send_window:
            self._pump()

    def cleanup(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


def check_path(p: Any) -> str:
    if not isinstance(p, str) or not p.startswith("/") or "\x00" in p:
        raise GuestFail("invalid_path", f"path must be absolute, got {p!r}")
    return p


def stat_dict(path: str, st: os.stat_result) -> dict[str, Any]:
    kind = "other"
    if stat_mod.S_ISREG(st.st_mode):
        kind = "file"
    elif stat_mod.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat_mod.S_ISLNK(st.st_mode):
        kind = "symlink"
    d = {"path": path, "name": os.path.basename(path.rstrip("/")) or "/", "type": kind,
         "size": st.st_size, "mode": stat_mod.S_IMODE(st.st_mode), "mtime": st.st_mtime,
         "uid": st.st_uid, "gid": st.st_gid}
    if kind == "symlink":
        try:
            d["target"] = os.readlink(path)
        except OSError:
            d["target"] = None
    return d


def simple_op(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    path = check_path(req.get("path"))
    if op == "stat":
        return stat_dict(path, os.lstat(path))
    if op == "exists":
        return {"exists": os.path.lexists(path)}
    if op == "list":
        depth = req.get("depth", 1)
        if not isinstance(depth, int) or depth < 1:
            raise GuestFail("invalid_request", "depth must be a positive int")
        entries: list[dict[str, Any]] = []
        limit = 100_000

        def walk(d: str, level: int) -> None:
            with os.scandir(d) as it:
                for e in sorted(it, key=lambda e: e.name):
                    if len(entries) >= limit:
                        raise GuestFail("too_many_entries", f"more than {limit} entries")
                    entries.append(stat_dict(e.path, e.stat(follow_symlinks=False)))
                    if level < depth and e.is_dir(follow_symlinks=False):
                        walk(e.path, level + 1)

        walk(path, 1)
        return {"entries": entries}
    if op == "make_dir":
        existed = os.path.isdir(path)
        mode = req.get("mode", 0o755)
        if req.get("parents", True):
            os.makedirs(path, mode=mode, exist_ok=True)
        elif not existed:
            os.mkdir(path, mode)
        return {"created": not existed}
    if op == "remove":
        st = os.lstat(path)
        if stat_mod.S_ISDIR(st.st_mode):
            if req.get("recursive", True):
                import shutil

                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        return {}
    if op == "rename":
        dst = check_path(req.get("dst"))
        if not req.get("overwrite", True) and os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "destination exists", dst)
        os.rename(path, dst)
        return {}
    raise GuestFail("unknown_op", f"unknown operation {op!r}")


# --------------------------------------------------------------------------- agent


class Agent:
    def __init__(self, port_fd: int) -> None:
        self.loop = Loop()
        self.streams: dict[int, Stream] = {}
        self.procs: dict[int, ExecStream] = {}
        self.transport = Transport(self.loop, port_fd, self.on_frame)
        self.base_env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TERM": "xterm",
        }
        self.cgroup_ok = self._setup_cgroups()
        self.boot_id = _read("/proc/sys/kernel/random/boot_id").strip()
        # SIGCHLD → wake the loop through a socketpair; reap everything
        self.sig_r, self.sig_w = socket.socketpair()
        self.sig_r.setblocking(False)
        self.sig_w.setblocking(False)
        signal.set_wakeup_fd(self.sig_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.loop.set_reader(self.sig_r.fileno(), self._on_signal)
        self.send_hello()

    def _setup_cgroups(self) -> bool:
        try:
            if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
                return False
            self.cg_base = os.path.join(CGROUP_ROOT, "sandvm")
            os.makedirs(self.cg_base, exist_ok=True)
            # the agent's own home: a cgroup with processes cannot have children
            # with controllers enabled (cgroup v2's no-internal-process rule)
            self.cg_home = os.path.join(CGROUP_ROOT, "agent")
            os.makedirs(self.cg_home, exist_ok=True)
            self._join_cgroup(self.cg_home)
            return True
        except OSError:
            return False

    def new_cgroup(self, sid: int) -> str | None:
        if not self.cgroup_ok:
            return None
        path = os.path.join(self.cg_base, f"cmd-{sid}-{time.monotonic_ns()}")
        try:
            os.mkdir(path)
            return path
        except OSError:
            return None

    def drop_cgroup(self, path: str | None) -> None:
        if path:
            def attempt(n: int = 0) -> None:
                try:
                    os.rmdir(path)
                except OSError:
                    if n < 20:
                        self.loop.call_later(0.5, lambda: attempt(n + 1))
            attempt()

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, stdin: int, stdout: int,
              stderr: int, cgroup: str | None) -> int:
        """posix_spawn (vfork: much cheaper than fork under TCG) in a new session.

        The child inherits the cgroup and working directory of the agent at spawn
        time, so the agent steps into both for the call (it is single-threaded)
        and steps back: the child starts inside its cgroup, with no race.
        """
        exe = argv[0]
        if "/" not in exe:
            found = None
            for d in env.get("PATH", "").split(":"):
                cand = os.path.join(d or ".", exe)
                if os.path.isfile(cand) and os.access(cand, os.X_OK):
                    found = cand
                    break
            if found is None:
                raise GuestFail("command_not_found", f"command not found: {exe}")
            exe = found
        elif not os.path.exists(exe):
            raise GuestFail("command_not_found", f"command not found: {exe}")
        if not os.path.isdir(cwd):
            raise GuestFail("file_not_found", f"working directory {cwd} does not exist")
        if cgroup:
            self._join_cgroup(cgroup)
        try:
            os.chdir(cwd)
            return os.posix_spawn(
                exe, argv, env,
                file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                              (os.POSIX_SPAWN_DUP2, stderr, 2)],
                setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGCHLD, signal.SIGINT,
                                        signal.SIGTERM, signal.SIGQUIT))
        except PermissionError:
            raise GuestFail("permission_denied", f"permission denied: {argv[0]}") from None
        except OSError as exc:
            raise GuestFail("exec_failed", f"cannot run {argv[0]}: {exc.strerror}") from None
        finally:
            os.chdir("/")
            if cgroup:
                self._join_cgroup(self.cg_home)

    @staticmethod
    def _join_cgroup(path: str) -> None:
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def _on_signal(self) -> None:
        try:
            while self.sig_r.recv(512):
                pass
        except BlockingIOError:
            pass
        self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            st = self.procs.pop(pid, None)
            if st is not None:
                st.on_exit(status)

    def send_hello(self) -> None:
        self.transport.send(wire.encode_json(wire.HELLO, 0, wire.hello_payload(
            "agent", agent_version=AGENT_VERSION, boot_id=self.boot_id,
            kernel=os.uname().release, cgroups=self.cgroup_ok)))

    def on_frame(self, ftype: int, sid: int, payload: bytes) -> None:
        try:
            self._dispatch(ftype, sid, payload)
        except Exception as exc:  # noqa: BLE001 - fail that stream, keep the others
            log(f"frame {ftype} on stream {sid} failed: {exc!r}")
            st = self.streams.get(sid)
            err = GuestFail("agent_protocol_error" if isinstance(exc, wire.ProtocolViolation)
                            else "guest_error", f"agent failure: {exc!r}"[:500])
            if st is not None:
                st.fail(err)
            elif sid:
                self.transport.send(wire.encode_json(wire.RESET, sid, error_reply(err)))

    def _dispatch(self, ftype: int, sid: int, payload: bytes) -> None:
        if ftype == wire.HELLO:
            self.send_hello()
            return
        if ftype == wire.PING:
            self.transport.send(wire.encode(wire.PONG, 0, payload[:64]))
            return
        if sid == 0:
            return
        if ftype == wire.OPEN:
            self.open_stream(sid, wire.decode_json(payload))
            return
        st = self.streams.get(sid)
        if st is None:
            # a frame for a stream that already ended (races with RESET): ignore,
            # but give back DATA credit so the host's window is not lost
            return
        if ftype == wire.DATA:
            if not payload or payload[0] > wire.CH_STDERR:
                raise wire.ProtocolViolation("DATA frame without a valid channel byte")
            st.on_data(payload[0], memoryview(payload)[1:])
        elif ftype == wire.EOF:
            ch, _ = wire.split_channel(payload)
            st.on_eof(ch)
        elif ftype == wire.WINDOW:
            st.on_window(wire.decode_window(payload))
        elif ftype == wire.CTRL:
            st.on_ctrl(wire.decode_json(payload))
        elif ftype == wire.RESET:
            st.on_reset()

    def open_stream(self, sid: int, req: dict[str, Any]) -> None:
        if sid in self.streams or sid % 2 == 0:
            self.transport.send(wire.encode_json(wire.RESET, sid, {
                "code": "agent_protocol_error",
                "message": f"stream {sid} is in use or not host-owned"}))
            return
        if len(self.streams) >= wire.MAX_STREAMS:
            self.transport.send(wire.encode_json(wire.RESET, sid, {
                "code": "too_many_streams", "message": "too many concurrent operations"}))
            return
        op = req.get("op")
        cls = {"exec": ExecStream, "write_file": WriteFileStream,
               "read_file": ReadFileStream}.get(op)  # type: ignore[arg-type]
        if cls is None:
            try:
                res = simple_op(req)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the host
                self.transport.send(wire.encode_json(wire.RESET, sid, error_reply(exc)))
            else:
                self.transport.send(wire.encode_json(wire.REPLY, sid, res))
            return
        st = cls(self, sid, req)
        self.streams[sid] = st
        try:
            st.start()
        except Exception as exc:  # noqa: BLE001
            st.fail(exc)

    def run(self) -> None:
        self.loop.run()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def find_port() -> str:
    base = "/sys/class/virtio-ports"
    for _ in range(200):
        try:
            for name in os.listdir(base):
                if _read(os.path.join(base, name, "name")).strip() == PORT_NAME:
                    return os.path.join("/dev", name)
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"sandvm-agent: no virtio port named {PORT_NAME}")


def set_subreaper() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception as exc:  # noqa: BLE001
        log(f"cannot become a subreaper: {exc}")


def main() -> None:
    set_subreaper()
    path = find_port()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    agent = Agent(fd)
    log("ready")
    agent.run()


if __name__ == "__main__":
    main()
