"""sandvm guest agent: runs inside the VM as init's child, stdlib only.

It opens the virtio-serial port named ``sandvm.agent`` and serves the framed
protocol of :mod:`wire` (copied beside this file in the initramfs): exec with
streamed stdio, signals and timeouts; file transfer and file-system calls; TCP
tunnels to loopback ports (port exposure).

It is a single-threaded event loop built on ``selectors`` (no asyncio: the
import alone costs a noticeable share of boot time under TCG). Every workload
runs in its own session/process group and, where cgroup v2 is available, in
its own cgroup so that a timeout or kill leaves no survivor. The agent is a
child subreaper, so orphaned grandchildren are reaped here.

Workloads cannot starve the agent: it is exempt from the OOM killer (its commands
are not), each command's cgroup caps its tasks, and all commands share a parent
cgroup whose memory and task caps leave the agent a reserve.

Survival rules for a command's processes: a timeout, a host reset, SIGKILL or
an expired grace period kill every process of the command (its cgroup). When
the command's leader exits normally, processes it left in the background keep
running (like a shell's ``cmd &``); their cgroup is removed once they are gone.

Operations are served from one table, :data:`OPS` (``wire.Op`` → call or stream
handler).

One file, over 2,000 lines, on purpose. Not for the initramfs (init runs it with
``PYTHONPATH=/lib/sandvm``, where more modules could sit beside ``wire.py``), but
because it is one program around one ``Agent``: every stream and call handler takes
the Agent (its loop, transport, stream and process tables) and the Agent's dispatch
table names every handler, so modules split from it would import each other, which
the import contract refuses (TYPE_CHECKING cycles too) unless an Agent Protocol were
added only to cut them. Its parts (loop, transport, streams, tar streams, TCP tunnels,
system calls, agent) are sections marked by ``# ---`` rules.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import heapq
import itertools
import os
import selectors
import signal
import socket
import stat as stat_mod
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # in the guest, wire.py sits beside this file
    from sandvm import wire
else:
    import wire

AGENT_VERSION = "0.2.0"
PORT_NAME = "sandvm.agent"
CGROUP_ROOT = "/sys/fs/cgroup"
READ_CHUNK = wire.DATA_CHUNK
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
DRAIN_GRACE = 1.0  # after the leader exits, how long an idle pipe is still read
LIST_BATCH = 256  # directory entries per EVENT frame
LIST_LIMIT = 100_000
AGENT_RESERVE_KIB = 24 * 1024  # memory kept out of the workloads' reach
AGENT_RESERVE_TASKS = 64  # tasks (processes and threads) kept out of the workloads' reach
COMMAND_PIDS_MAX = 4096  # tasks one command may have at once (its cgroup's pids.max)
OOM_SCORE_ADJ_MIN = -1000  # the agent's: the OOM killer never picks it
SPAWN_ATTEMPTS = 3  # a spawn failing with EAGAIN or ENOMEM is retried after reaping
IMAGE_ROOT = "/run/sandvm/root"  # where an image's root filesystem is mounted
EXT4_IOC_RESIZE_FS = 0x40086610
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 1, 2, 4, 8, 4096, 16384


def log(msg: str) -> None:
    with contextlib.suppress(OSError), open("/dev/kmsg", "w") as f:
        f.write(f"sandvm-agent: {msg}\n")


# --------------------------------------------------------------------------- loop


class Timer:
    __slots__ = ("cancelled", "cb", "when")

    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when = when
        self.cb = cb
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """A minimal callback loop: fd readiness and timers."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Timer]] = []
        self.seq = itertools.count()
        self.handlers: dict[int, list[Callable[[], None] | None]] = {}
        self.masks: dict[int, int] = {}  # what each fd is registered for

    def _update(self, fd: int) -> None:
        # streams switch their interest often (flow control): touch the selector only
        # when the mask changes (its own bookkeeping is slow Python under TCG)
        r, w = self.handlers.get(fd, (None, None))
        mask = (selectors.EVENT_READ if r else 0) | (selectors.EVENT_WRITE if w else 0)
        old = self.masks.get(fd, 0)
        if mask == 0:
            self.handlers.pop(fd, None)
            if old:
                del self.masks[fd]
                self.sel.unregister(fd)
        elif mask != old:
            if old:
                self.sel.modify(fd, mask)
            else:
                self.sel.register(fd, mask)
            self.masks[fd] = mask

    def set_reader(self, fd: int, cb: Callable[[], None] | None) -> None:
        self.handlers.setdefault(fd, [None, None])[0] = cb
        self._update(fd)

    def set_writer(self, fd: int, cb: Callable[[], None] | None) -> None:
        self.handlers.setdefault(fd, [None, None])[1] = cb
        self._update(fd)

    def call_later(self, delay: float, cb: Callable[[], None]) -> Timer:
        t = Timer(time.monotonic() + delay, cb)
        heapq.heappush(self.timers, (t.when, next(self.seq), t))
        return t

    def run(self) -> None:
        while True:
            while self.timers and self.timers[0][2].cancelled:
                heapq.heappop(self.timers)
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else None
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
                t = heapq.heappop(self.timers)[2]
                if not t.cancelled:
                    t.cancelled = True  # fired: cancelling it later is a no-op
                    self._safe(t.cb)

    @staticmethod
    def _safe(cb: Callable[[], None]) -> None:
        # a bug in one handler must not take the agent (and so the VM) down
        try:
            cb()
        except Exception as exc:  # noqa: BLE001
            import traceback

            log(f"handler failed: {exc!r}: {traceback.format_exc()[-1500:]}")


def cancel(t: Timer | None) -> None:
    if t is not None:
        t.cancel()


# --------------------------------------------------------------------------- transport


class Transport:
    """The framed channel over the virtio-serial port (non-blocking fd)."""

    def __init__(self, loop: Loop, fd: int, on_frame: Callable[[int, int, bytes], None]) -> None:
        self.loop = loop
        self.fd = fd
        self.on_frame = on_frame
        self.decoder = wire.FrameDecoder()
        self.out: collections.deque[bytes | memoryview] = collections.deque()
        # reads land here: a fresh 256 KiB bytes per read (os.read) costs ~0.4 ms under TCG
        self.rview = memoryview(bytearray(1 << 20))
        self.loop.set_reader(fd, self._readable)

    def _readable(self) -> None:
        # virtio-serial hands out at most one guest buffer (a page) per read: drain
        # what is available before decoding
        view = self.rview
        total = 0
        eof = False
        while total < len(view):
            try:
                n = os.readv(self.fd, [view[total:]])
            except BlockingIOError:
                break
            except OSError as exc:
                if total:
                    break
                log(f"port read failed: {exc}")
                time.sleep(0.05)
                return
            if not n:
                eof = True
                break
            total += n
        # the decoder copies what it keeps (payloads, a partial frame): no copy here
        parts: list[bytes | memoryview] = [view[:total]] if total else []
        if eof and not parts:
            # host side not connected (virtio-serial reports EOF): wait and retry. What
            # the host that left sent last may be a torn frame: never glue it to the next
            if self.decoder.pending:
                log("host left mid-frame; dropping its partial frame")
            self.decoder = wire.FrameDecoder()
            self.loop.set_reader(self.fd, None)
            self.loop.call_later(0.05, lambda: self.loop.set_reader(self.fd, self._readable))
            return
        frames: list[tuple[int, int, bytes]] = []
        try:
            for part in parts:
                frames.extend(self.decoder.feed(part))
        except wire.ProtocolViolation as exc:
            # never allocate what a bad header announces: drop this batch and go on with
            # the next (a new host's HELLO is the first thing it writes)
            log(f"protocol violation from host: {exc}; resetting decoder")
            self.decoder = wire.FrameDecoder()
        for ftype, sid, payload in frames:
            self.on_frame(ftype, sid, payload)
        if eof:  # the host left right after this batch
            self.decoder = wire.FrameDecoder()

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


class SpawnAgain(Exception):
    """A spawn failed for want of a task or memory (EAGAIN, ENOMEM): worth a retry."""


class GuestFail(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_reply(exc: BaseException) -> dict[str, Any]:
    code = "guest_error"
    if isinstance(exc, GuestFail):
        code = exc.code
    elif isinstance(exc, FileNotFoundError):
        code = "file_not_found"
    elif isinstance(exc, FileExistsError):
        code = "file_exists"
    elif isinstance(exc, PermissionError):
        code = "permission_denied"
    elif isinstance(exc, wire.ProtocolViolation):
        code = "agent_protocol_error"
    msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename:
        msg = f"{msg}: {exc.filename}"
    return {"code": code, "message": msg[:2000]}


class Stream:
    """One open stream; subclasses implement an operation."""

    def __init__(self, agent: Agent, sid: int, req: dict[str, Any]) -> None:
        self.agent = agent
        self.sid = sid
        self.req = req
        self.send_window = wire.INITIAL_WINDOW
        self.unacked = 0
        self.closed = False

    def start(self) -> None:
        raise NotImplementedError

    def on_data(self, channel: int, data: bytes | memoryview) -> None:
        raise wire.ProtocolViolation("this stream takes no data")

    def on_eof(self, channel: int) -> None:
        pass

    def on_ctrl(self, msg: dict[str, Any]) -> None:
        raise wire.ProtocolViolation("this stream takes no control messages")

    def on_window(self, inc: int) -> None:
        was = self.send_window
        self.send_window += inc
        if was <= 0 < self.send_window:
            self.window_opened()

    def window_opened(self) -> None:
        pass

    def grant(self, n: int) -> None:
        """Return ``n`` consumed bytes of credit to the host, in batches."""
        self.unacked += n
        if self.unacked >= wire.WINDOW_BATCH:
            self.send(wire.encode_window(self.sid, self.unacked))
            self.unacked = 0

    def on_reset(self) -> None:
        self.finish()

    def detach(self) -> None:
        """The host that opened this stream is gone: say nothing more, free resources."""
        self.closed = True
        self.cleanup()

    def send(self, frame: bytes) -> None:
        if not self.closed:
            self.agent.transport.send(frame)

    def event(self, obj: dict[str, Any]) -> None:
        self.send(wire.encode_json(wire.EVENT, self.sid, obj))

    def reply(self, obj: dict[str, Any]) -> None:
        self.send(wire.encode_json(wire.REPLY, self.sid, obj))
        self.finish()

    def fail(self, exc: BaseException) -> None:
        self.send(wire.encode_json(wire.RESET, self.sid, error_reply(exc)))
        self.finish()

    def finish(self) -> None:
        if not self.closed:
            self.closed = True
            self.agent.streams.pop(self.sid, None)
            self.cleanup()

    def cleanup(self) -> None:
        pass


class ExecStream(Stream):
    """Run one command; stream stdout/stderr; report its exit."""

    def start(self) -> None:
        # everything cleanup() touches exists before anything can fail
        self.pid: int | None = None
        self.exit_status: int | None = None
        self.fds: dict[int, int] = {}  # channel -> fd
        self.in_fd = -1
        self.cgroup: str | None = None
        self.drain_timer: Timer | None = None
        self.timeout_timer: Timer | None = None
        self.kill_timer: Timer | None = None
        self.pending_in = bytearray()
        self.in_eof = False
        self.timed_out = False
        self.started = time.monotonic()
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
        if not isinstance(cwd, str):
            raise GuestFail("invalid_request", "cwd must be a string")
        timeout = req.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or
                                    not isinstance(timeout, (int, float)) or
                                    not 0 < timeout <= 7 * 24 * 3600):
            raise GuestFail("invalid_spec", f"timeout must be seconds in (0, 604800],"
                                            f" got {timeout!r}"[:200])
        stdin_open = bool(req.get("stdin"))
        user = None
        if req.get("user") not in (None, ""):
            with self.agent.in_root():
                user = resolve_user(req["user"])
            if "HOME" not in (req.get("env") or {}) and user.home:
                env["HOME"] = user.home
        self.cgroup = self.agent.new_cgroup(self.sid)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if stdin_open else (os.open("/dev/null", os.O_RDONLY), -1)
        try:
            self.pid = self.agent.spawn(argv, env, cwd, in_r, out_w, err_w, self.cgroup, user)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                os.close(fd)
        self.in_fd = in_w
        for ch, fd in ((wire.CH_STDOUT, out_r), (wire.CH_STDERR, err_r)):
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                # bigger pipes: fewer writer/agent context switches for bulk output
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            self.fds[ch] = fd
            self._arm(ch)
        if self.in_fd >= 0:
            os.set_blocking(self.in_fd, False)
        self.agent.procs[self.pid] = self
        if isinstance(timeout, (int, float)) and timeout > 0:
            self.timeout_timer = self.agent.loop.call_later(float(timeout), self._on_timeout)
        self.event({"event": "started", "pid": self.pid})

    # stdout/stderr -> host, paced by the send window
    def _arm(self, ch: int) -> None:
        fd = self.fds.get(ch)
        if fd is not None:
            self.agent.loop.set_reader(
                fd, (lambda: self._pump(ch)) if self.send_window > 0 else None)

    def _pump(self, ch: int) -> None:
        fd = self.fds.get(ch)
        if fd is None:
            return
        n = min(READ_CHUNK, self.send_window)
        if n <= 0:
            self._arm(ch)
            return
        # coalesce what the pipe holds (writers often emit 4 KiB at a time) into one frame
        parts: list[bytes] = []
        got = 0
        eof = False
        while got < n:
            try:
                chunk = os.read(fd, n - got)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
                break
            parts.append(chunk)
            got += len(chunk)
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self.send_window -= len(data)
            if not self.closed:
                self.agent.transport.send_data(self.sid, ch, data)
            if self.exit_status is not None:
                self._restart_drain_timer()
        if eof:
            self._close_channel(ch)
            self._maybe_done()
        elif self.send_window <= 0:
            cancel(self.drain_timer)  # the host is slow, not the command: keep waiting
            for c in list(self.fds):
                self._arm(c)

    def _close_channel(self, ch: int) -> None:
        fd = self.fds.pop(ch, None)
        if fd is not None:
            self.agent.loop.set_reader(fd, None)
            os.close(fd)
            self.send(wire.encode(wire.EOF, self.sid, bytes((ch,))))

    def window_opened(self) -> None:
        for c in list(self.fds):
            self._arm(c)
        if self.exit_status is not None:
            self._restart_drain_timer()

    # host -> stdin
    def on_data(self, channel: int, data: bytes | memoryview) -> None:
        if channel != wire.CH_STDIN or self.in_eof:
            raise wire.ProtocolViolation("stdin data after EOF or on a wrong channel")
        if self.in_fd < 0:
            self.grant(len(data))  # stdin is closed: drop, but keep the host's window
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
            self.grant(written)
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
        if not isinstance(sig, int) or isinstance(sig, bool) or not 1 <= sig <= 64:
            raise wire.ProtocolViolation("CTRL needs a signal number")
        self.signal_group(sig)
        grace = msg.get("grace")
        if sig != signal.SIGKILL and isinstance(grace, (int, float)) and grace >= 0:
            cancel(self.kill_timer)
            self.kill_timer = self.agent.loop.call_later(float(grace), self.kill_all)

    def signal_group(self, sig: int) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(OSError):
            os.killpg(self.pid, sig)
        if self.cgroup and self.exit_status is not None:
            # the leader is gone: reach what it left behind through its cgroup
            for pid in self.agent.cgroup_pids(self.cgroup):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)

    def kill_all(self) -> None:
        """SIGKILL every process of this command: its cgroup, and its process group."""
        if self.cgroup:
            with contextlib.suppress(OSError), \
                    open(os.path.join(self.cgroup, "cgroup.kill"), "w") as f:
                f.write("1")
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)

    def _on_timeout(self) -> None:
        if self.exit_status is None or self.fds:
            self.timed_out = True
            self.kill_all()

    # completion
    def on_exit(self, status: int) -> None:
        self.exit_status = status
        self._close_in()
        if self.closed:
            cancel(self.kill_timer)
            self.agent.drop_cgroup(self.cgroup)
            return
        self._restart_drain_timer()
        self._maybe_done()

    def _restart_drain_timer(self) -> None:
        # the leader is gone; a background grandchild may hold the pipes open. Stop
        # reading once they have been idle for DRAIN_GRACE, unless we are only
        # waiting for the host's credit (then nothing is lost by waiting)
        cancel(self.drain_timer)
        self.drain_timer = None
        if self.fds and self.send_window > 0:
            self.drain_timer = self.agent.loop.call_later(DRAIN_GRACE, self._stop_draining)

    def _stop_draining(self) -> None:
        for ch in list(self.fds):
            self._close_channel(ch)
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
        # the host gave up on this command: nothing of it may survive
        self.kill_all()
        self.finish()

    def detach(self) -> None:
        # restored into a new session: the command keeps running (a snapshot keeps
        # processes as they were); its output is read and dropped, its stdin closed
        self.closed = True
        cancel(self.timeout_timer)
        cancel(self.drain_timer)
        self._close_in()
        for ch, fd in list(self.fds.items()):
            self.agent.loop.set_reader(fd, functools.partial(self._discard, ch, fd))

    def _discard(self, ch: int, fd: int) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.agent.loop.set_reader(fd, None)
            os.close(fd)
            self.fds.pop(ch, None)

    def cleanup(self) -> None:
        for t in (self.drain_timer, self.timeout_timer):
            cancel(t)
        for fd in self.fds.values():
            self.agent.loop.set_reader(fd, None)
            os.close(fd)
        self.fds.clear()
        self._close_in()
        if self.exit_status is None or (self.kill_timer and not self.kill_timer.cancelled):
            # still running, or a grace-period kill was promised: keep the promise now
            cancel(self.kill_timer)
            self.kill_all()
        if self.exit_status is not None:
            self.agent.drop_cgroup(self.cgroup)


class SinkStream(Stream):
    """A stream whose incoming data is written to ``self.fd``, granting credit as it goes."""

    fd = -1
    size = 0

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
        self.grant(len(data))


class WriteFileStream(SinkStream):
    """Receive a file: temp file in the same directory, fsync, rename."""

    def start(self) -> None:
        self.fd = -1
        self.tmp: str | None = None
        with self.agent.in_root():
            self._open()

    def _open(self) -> None:
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

    def on_eof(self, channel: int) -> None:
        if self.fd < 0:
            return
        with self.agent.in_root():
            self._commit()

    def _commit(self) -> None:
        try:
            os.fchmod(self.fd, self.mode)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            assert self.tmp is not None
            os.rename(self.tmp, self.path)
            self.tmp = None
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            with contextlib.suppress(OSError), self.agent.in_root():
                os.unlink(self.tmp)


class ReadFileStream(Stream):
    """Send a file, paced by the window; refuse files over the caller's cap."""

    def start(self) -> None:
        self.fd = -1
        with self.agent.in_root():
            self._open()

    def _open(self) -> None:
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
        self.event({"event": "size", "size": st.st_size})
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

    def window_opened(self) -> None:
        self._pump()

    def cleanup(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ListStream(Stream):
    """List a directory tree: entries in EVENT batches (a listing may exceed one frame)."""

    def start(self) -> None:
        with self.agent.in_root():
            self._list()

    def _list(self) -> None:
        path = check_path(self.req.get("path"))
        depth = self.req.get("depth", 1)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise GuestFail("invalid_request", "depth must be a positive int")
        batch: list[dict[str, Any]] = []
        count = 0

        def walk(d: str, level: int) -> None:
            nonlocal count
            with os.scandir(d) as it:
                for e in sorted(it, key=lambda e: e.name):
                    if count >= LIST_LIMIT:
                        raise GuestFail("too_many_entries",
                                        f"{path} holds more than {LIST_LIMIT} entries:"
                                        " list a narrower directory or a smaller depth")
                    batch.append(stat_dict(e.path, e.stat(follow_symlinks=False)))
                    count += 1
                    if len(batch) >= LIST_BATCH:
                        self.event({"event": "entries", "entries": batch})
                        batch.clear()
                    if level < depth and e.is_dir(follow_symlinks=False):
                        walk(e.path, level + 1)

        walk(path, 1)
        if batch:
            self.event({"event": "entries", "entries": batch})
        self.reply({"count": count})


# --------------------------------------------------------------------------- tar streams

TAR_BLOCK = 512
SKIPPED_REPORTED = 100  # refused/unreadable entries named in a reply


def _tarfile() -> Any:
    """tarfile, imported on first use (not at boot) and outside any chroot: imports
    inside an image's root would look for modules there."""
    import copy  # noqa: F401 - safe_member's, loaded here
    import tarfile

    return tarfile


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def safe_member(ti: Any, dest: str) -> Any:
    """A copy of tar member ``ti`` that is safe to extract into ``dest``.

    The equivalent of tarfile's ``data`` filter (this guest's Python predates
    it): no absolute names, nothing outside ``dest``, no links leading out of
    it, no device files or fifos, owned by root, no set-id bits or group/other
    write. Also refuses to write through a symlink. Raises GuestFail saying why.
    """
    name = ti.name
    if not name or len(name) > 4096 or "\x00" in name or "\x00" in (ti.linkname or ""):
        raise GuestFail("unsafe_member", "bad name")
    name = name.lstrip("/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise GuestFail("unsafe_member", "'..' in its name")
    target = os.path.realpath(os.path.join(dest, *parts))
    if not _inside(target, dest):
        raise GuestFail("unsafe_member", "it would be outside the destination")
    cur = dest
    for p in parts[:-1]:
        cur = os.path.join(cur, p)
        if os.path.islink(cur):
            raise GuestFail("unsafe_member", "it would be written through a symlink")
    mode = ti.mode & 0o755
    if ti.isreg() or ti.islnk():
        if not mode & 0o100:
            mode &= ~0o111
        mode |= 0o600
    elif ti.isdir():
        mode |= 0o700
    elif not ti.issym():
        raise GuestFail("unsafe_member", "a special file")
    if ti.issym() or ti.islnk():
        link = ti.linkname
        if not link or os.path.isabs(link):
            raise GuestFail("unsafe_member", "a link to an absolute path")
        base = os.path.dirname(os.path.join(dest, *parts)) if ti.issym() else dest
        if not _inside(os.path.realpath(os.path.join(base, link)), dest):
            raise GuestFail("unsafe_member", "a link leading outside the destination")
    leaf = os.path.join(dest, *parts)
    if parts and os.path.islink(leaf) and not ti.issym():
        os.unlink(leaf)  # replace the symlink, never write through it
    import copy  # already loaded by _tarfile()

    out = copy.copy(ti)
    out.name = "/".join(parts) or "."
    out.mode = mode
    out.uid = out.gid = 0
    out.uname = out.gname = "root"
    return out


class UntarStream(SinkStream):
    """Receive a tar stream and extract it into a guest directory (created if missing).

    The agent is single-threaded: the stream is spooled into an unlinked temp
    file in the destination's file system and extracted in one go at EOF
    (other operations wait meanwhile). Members are sanitized by ``safe_member``;
    refused ones are skipped and named in the reply.
    """

    def start(self) -> None:
        self.fd = -1
        self.size = 0
        self.tarfile = _tarfile()
        self.path = check_path(self.req.get("path"))
        with self.agent.in_root():
            os.makedirs(self.path, mode=0o755, exist_ok=True)
            if not os.path.isdir(self.path):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.path)
            spool = os.path.join(self.path, f".sandvm-untar-{os.getpid()}-{self.sid}")
            self.fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.unlink(spool)

    def on_eof(self, channel: int) -> None:
        if self.fd < 0:
            return
        try:
            with self.agent.in_root():
                res = self._extract()
        except self.tarfile.TarError as exc:
            self.fail(GuestFail("invalid_archive", f"bad tar stream: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - the host gets the reason
            self.fail(exc)
            return
        self.reply(res)

    def _extract(self) -> dict[str, Any]:
        tarfile = self.tarfile
        dest = os.path.realpath(self.path)
        counts = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
        skipped: list[str] = []

        def members(tar: Any) -> Any:
            for ti in tar:
                try:
                    safe = safe_member(ti, dest)
                except GuestFail as exc:
                    if len(skipped) < SKIPPED_REPORTED:
                        skipped.append(f"{ti.name[:300]}: {exc}")
                    continue
                if safe.isdir():
                    counts["dirs"] += 1
                elif safe.issym():
                    counts["symlinks"] += 1
                else:
                    counts["files"] += 1
                    counts["bytes"] += safe.size if safe.isreg() else 0
                yield safe

        os.lseek(self.fd, 0, os.SEEK_SET)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with os.fdopen(os.dup(self.fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            tar.extractall(dest, members=members(tar), numeric_owner=True, **kw)
        return {**counts, "skipped": skipped, "received": self.size}

    def cleanup(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TarStream(Stream):
    """Send a guest directory tree as a tar stream (PAX), paced by the window.

    Regular files, directories, symlinks and hard links; other file types and
    entries that vanish or cannot be read are skipped and named in the reply.
    Refuses (file_too_large) a tree over the caller's entry or byte caps.
    """

    def start(self) -> None:
        self.tarfile = _tarfile()
        self.pending = memoryview(b"")
        path = check_path(self.req.get("path"))
        cap, max_files = self.req.get("max_bytes"), self.req.get("max_files")
        if not isinstance(cap, int) or cap < 0 or not isinstance(max_files, int) \
                or max_files < 1:
            raise GuestFail("invalid_request", "max_bytes and max_files must be positive ints")
        self.cap, self.max_files = cap, max_files
        self.counts = {"files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
        self.skipped: list[str] = []
        with self.agent.in_root():
            if not stat_mod.S_ISDIR(os.stat(path).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        self.gen = self._entries(path)
        self.agent.loop.call_later(0, self._pump)

    def _skip(self, arc: str, why: str) -> None:
        if len(self.skipped) < SKIPPED_REPORTED:
            self.skipped.append(f"{arc[:300]}: {why}")

    def _header(self, ti: Any) -> bytes:
        entries = sum(self.counts[k] for k in ("files", "dirs", "symlinks"))
        if entries >= self.max_files:
            raise GuestFail("file_too_large", f"the tree holds more than {self.max_files}"
                                              " entries: pass a larger max_files")
        return bytes(ti.tobuf(self.tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _entries(self, top: str) -> Any:
        """Tar bytes of everything under ``top``; advanced only inside in_root()."""
        tarfile = self.tarfile
        inodes: dict[tuple[int, int], str] = {}
        stack = [(top, "")]
        while stack:
            d, prefix = stack.pop()
            try:
                with os.scandir(d) as it:
                    names = sorted(e.name for e in it)
            except OSError as exc:
                self._skip(prefix or ".", exc.strerror or str(exc))
                continue
            subdirs = []
            for name in names:
                full, arc = os.path.join(d, name), prefix + name
                try:
                    st = os.lstat(full)
                except OSError:
                    continue  # gone meanwhile
                ti = tarfile.TarInfo(arc)
                ti.mode = stat_mod.S_IMODE(st.st_mode)
                ti.uid, ti.gid, ti.mtime = st.st_uid, st.st_gid, int(st.st_mtime)
                if stat_mod.S_ISDIR(st.st_mode):
                    ti.type = tarfile.DIRTYPE
                    yield self._header(ti)
                    self.counts["dirs"] += 1
                    subdirs.append((full, arc + "/"))
                elif stat_mod.S_ISLNK(st.st_mode):
                    try:
                        ti.linkname = os.readlink(full)
                    except OSError:
                        continue
                    ti.type = tarfile.SYMTYPE
                    yield self._header(ti)
                    self.counts["symlinks"] += 1
                elif stat_mod.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in inodes:
                        ti.type, ti.linkname = tarfile.LNKTYPE, inodes[key]
                        yield self._header(ti)
                        self.counts["files"] += 1
                        continue
                    if self.counts["bytes"] + st.st_size > self.cap:
                        raise GuestFail("file_too_large",
                                        f"the tree holds more than {self.cap} bytes of"
                                        " files: pass a larger max_bytes")
                    try:
                        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    except OSError as exc:
                        self._skip(arc, exc.strerror or str(exc))
                        continue
                    try:
                        ti.size = st.st_size
                        yield self._header(ti)
                        self.counts["files"] += 1
                        self.counts["bytes"] += st.st_size
                        if st.st_nlink > 1:
                            inodes[key] = arc
                        left = st.st_size
                        while left > 0:
                            data = os.read(fd, min(READ_CHUNK, left))
                            if not data:  # the file shrank: keep the archive consistent
                                data = bytes(min(READ_CHUNK, left))
                            left -= len(data)
                            yield data
                        if st.st_size % TAR_BLOCK:
                            yield bytes(TAR_BLOCK - st.st_size % TAR_BLOCK)
                    finally:
                        os.close(fd)
                else:
                    self._skip(arc, "a special file")
            stack.extend(reversed(subdirs))
        yield bytes(2 * TAR_BLOCK)

    def _pump(self) -> None:
        if self.closed:
            return
        try:
            with self.agent.in_root():
                self._fill()
        except Exception as exc:  # noqa: BLE001 - the host gets the reason
            self.fail(exc)

    def _fill(self) -> None:
        while not self.closed and self.send_window > 0:
            if not self.pending:
                try:
                    self.pending = memoryview(next(self.gen))
                except StopIteration:
                    self.send(wire.encode(wire.EOF, self.sid, bytes((wire.CH_STDOUT,))))
                    self.reply({**self.counts, "skipped": self.skipped})
                    return
                continue
            n = min(len(self.pending), READ_CHUNK, self.send_window)
            data = bytes(self.pending[:n])
            self.pending = self.pending[n:]
            self.send_window -= n
            self.agent.transport.send_data(self.sid, wire.CH_STDOUT, data)

    def window_opened(self) -> None:
        self._pump()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.gen.close()  # closes the file it was reading


# --------------------------------------------------------------------------- TCP tunnels

TCP_CONNECT_TIMEOUT = 10.0  # a loopback connect only takes this long when the backlog is full
PROC_NET_CAP = 8 << 20  # bytes of /proc/net/tcp{,6} a readiness probe reads


def tcp_target(req: dict[str, Any]) -> tuple[int, str]:
    """(port, host) of a tunnel request: a port 1..65535 on a loopback address, nothing else."""
    port = req.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise GuestFail("invalid_request", "port must be an int between 1 and 65535")
    host = req.get("host", "127.0.0.1")
    if not isinstance(host, str) or not _is_loopback(host):
        raise GuestFail("invalid_request",
                        f"host must be a loopback address (127.x.y.z or ::1), got {host!r}"[:200])
    return port, host


def _is_loopback(host: str) -> bool:
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host) == bytes(15) + b"\x01"
        return socket.inet_pton(socket.AF_INET, host)[0] == 127
    except (OSError, ValueError):
        return False


def connect_error(err: int, host: str, port: int) -> GuestFail:
    if err == errno.ECONNREFUSED:
        return GuestFail("connection_refused",
                         f"nothing listens on {host} port {port} in the guest (connection refused)")
    if err == errno.ETIMEDOUT:
        return GuestFail("connect_timeout", f"connecting to {host} port {port} timed out")
    return GuestFail("connect_failed",
                     f"cannot connect to {host} port {port}: {os.strerror(err)}")


class TcpStream(Stream):
    """A TCP connection to a loopback port of the guest, piped both ways (port exposure).

    Host → guest bytes arrive on channel 0 and go to the socket; the host's credit
    comes back only for bytes the socket took. Guest → host bytes leave on channel
    1, read only while the host's window allows. EOF either way is a half-close
    (an EOF frame / ``shutdown(SHUT_WR)``). A RESET from the host closes the socket
    abortively (RST); a reset or broken socket sends RESET ``connection_reset``.
    An EVENT says when the connection is up (unless ``notify`` is false: host
    listeners send the client's bytes at once and need no word); the REPLY comes
    once both directions are closed (it stands for the guest's EOF too if that
    came last).
    """

    scratch: memoryview | None = None  # one receive buffer for every tunnel

    def _setup(self) -> None:
        # everything cleanup() touches exists before anything can fail
        self.sock: socket.socket | None = None
        self.fd = -1
        self.connected = False
        # host bytes the socket has not taken yet: the frames' own payloads, uncopied
        self.pending: collections.deque[memoryview] = collections.deque()
        self.in_eof = False  # the host half-closed...
        self.shut_wr = False  # ...and that reached the socket
        self.out_eof = False  # the guest's side half-closed (EOF sent to the host)
        self.timer: Timer | None = None
        self.sent = self.received = 0

    def start(self) -> None:
        self._setup()
        self.port, self.host = tcp_target(self.req)
        self.notify = self.req.get("notify", True) is not False
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.fd = self.sock.fileno()
        self.sock.setblocking(False)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = self.sock.connect_ex((self.host, self.port))
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            # on loopback the handshake has usually completed by now: save a loop turn
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                try:
                    self.sock.getpeername()
                except OSError:
                    err = errno.EINPROGRESS
        if err == 0:
            self._connected()
        elif err in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            self.agent.loop.set_writer(self.fd, self._connect_done)
            self.timer = self.agent.loop.call_later(TCP_CONNECT_TIMEOUT, self._connect_timeout)
        else:
            raise connect_error(err, self.host, self.port)

    def _connect_done(self) -> None:
        if self.sock is None or self.connected:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected()
        elif err not in (errno.EINPROGRESS, errno.EALREADY):
            self.fail(connect_error(err, self.host, self.port))

    def _connect_timeout(self) -> None:
        if not self.connected and not self.closed:
            self.fail(connect_error(errno.ETIMEDOUT, self.host, self.port))

    def _connected(self) -> None:
        self.connected = True
        if self.timer is not None:
            cancel(self.timer)
            self.agent.loop.set_writer(self.fd, None)
        if self.notify:
            self.event({"event": "connected"})
        self._arm()
        if self.pending or self.in_eof:
            self._write()

    # guest -> host, paced by the send window
    def _arm(self) -> None:
        if self.sock is None:
            return
        on = self.connected and not self.out_eof and not self.closed and self.send_window > 0
        self.agent.loop.set_reader(self.fd, self._readable if on else None)

    def window_opened(self) -> None:
        self._arm()

    def _readable(self) -> None:
        n = min(READ_CHUNK, self.send_window)
        if self.sock is None or n <= 0:
            self._arm()
            return
        if TcpStream.scratch is None:
            TcpStream.scratch = memoryview(bytearray(READ_CHUNK))
        try:
            # into a reused buffer: a fresh 128 KiB object per recv is slow under TCG
            got = self.sock.recv_into(TcpStream.scratch, n)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._broken(exc)
            return
        if not got:
            self.out_eof = True
            self._arm()
            if not self.shut_wr:  # else the REPLY says it
                self.send(wire.encode(wire.EOF, self.sid, bytes((wire.CH_STDOUT,))))
            self._maybe_done()
            return
        data = bytes(TcpStream.scratch[:got])
        self.send_window -= len(data)
        self.received += len(data)
        if not self.closed:
            self.agent.transport.send_data(self.sid, wire.CH_STDOUT, data)
        if self.send_window <= 0:
            self._arm()

    # host -> guest
    def on_data(self, channel: int, data: bytes | memoryview) -> None:
        if channel != wire.CH_STDIN or self.in_eof:
            raise wire.ProtocolViolation("tunnel data after EOF or on a wrong channel")
        if self.sock is None or not data:
            return
        self.pending.append(memoryview(data))
        if self.connected and len(self.pending) == 1:  # else a write is already due
            self._write()

    def on_eof(self, channel: int) -> None:
        if channel != wire.CH_STDIN or self.in_eof:
            raise wire.ProtocolViolation("a second EOF, or one on a wrong channel")
        self.in_eof = True
        if self.connected:
            self._write()

    def _write(self) -> None:
        if self.sock is None:
            return
        pending = self.pending
        while pending:
            batch = list(itertools.islice(pending, 0, 16))
            try:
                n = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._broken(exc)
                return
            if n:
                self.sent += n
                self.grant(n)
            full = n == sum(len(b) for b in batch)
            while n:
                first = pending[0]
                if len(first) <= n:
                    n -= len(first)
                    pending.popleft()
                else:
                    pending[0] = first[n:]
                    n = 0
            if not full:  # the socket is full: wait until it drains
                self.agent.loop.set_writer(self.fd, self._write)
                return
        self.agent.loop.set_writer(self.fd, None)
        if self.in_eof and not self.shut_wr:
            self.shut_wr = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self._maybe_done()

    def _broken(self, exc: OSError) -> None:
        self.fail(GuestFail("connection_reset",
                            f"the connection to {self.host} port {self.port} in the guest"
                            f" was reset ({exc.strerror or exc})"[:300]))

    def _maybe_done(self) -> None:
        if self.out_eof and self.shut_wr and not self.closed:
            self.reply({"event": "closed", "sent": self.sent, "received": self.received})

    def _abort(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):  # close with RST, as the host's side did
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))

    def on_reset(self) -> None:
        self._abort()
        self.finish()

    def detach(self) -> None:
        self._abort()  # its host is gone (a restored snapshot): so is the connection
        super().detach()

    def cleanup(self) -> None:
        cancel(self.timer)
        if self.sock is not None:
            self.agent.loop.set_reader(self.fd, None)
            self.agent.loop.set_writer(self.fd, None)
            self.sock.close()
            self.sock = None
        self.pending.clear()


class EgressListener:
    """The guest end of the egress proxy: a listener on 127.0.0.1:<port> (what
    HTTP(S)_PROXY point at). Each connection it accepts goes to one of the host's
    waiting ``egress_accept`` streams; while none waits, connections stay in the
    backlog (the host keeps a few waiting)."""

    def __init__(self, agent: Agent, port: int) -> None:
        self.agent = agent
        self.port = port
        self.waiters: collections.deque[EgressStream] = collections.deque()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(256)
        except OSError as exc:
            sock.close()
            raise GuestFail("port_in_use", f"cannot listen on 127.0.0.1:{port} for the"
                            f" egress proxy: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()

    def want(self, st: EgressStream) -> None:
        self.waiters.append(st)
        self._accept()

    def drop(self, st: EgressStream) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(st)
        self._arm()

    def _arm(self) -> None:
        if self.sock is not None:
            self.agent.loop.set_reader(self.fd, self._accept if self.waiters else None)

    def _accept(self) -> None:
        while self.waiters and self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log(f"egress accept failed: {exc}")
                break
            self.waiters.popleft().take(conn)
        self._arm()

    def close(self) -> None:
        if self.sock is not None:
            self.agent.loop.set_reader(self.fd, None)
            self.sock.close()
            self.sock = None
        while self.waiters:
            self.waiters.popleft().fail(GuestFail("egress_off", "the egress proxy was closed"))


class EgressStream(TcpStream):
    """One guest connection to the egress listener, piped to the host (whose proxy
    applies the sandbox's policy). Opened by the host in advance: it waits for a
    connection, then says ``connected`` and behaves as a TcpStream."""

    def start(self) -> None:
        self._setup()
        self.notify = True
        self.host, self.port = "127.0.0.1", 0
        self.waiting: EgressListener | None = None
        lst = self.agent.egress
        if lst is None:
            raise GuestFail("egress_off", "this sandbox's egress proxy is not running")
        self.port = lst.port
        self.waiting = lst
        lst.want(self)

    def take(self, conn: socket.socket) -> None:
        self.waiting = None
        if self.closed:
            conn.close()
            return
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.fd = conn, conn.fileno()
        self._connected()

    def cleanup(self) -> None:
        if self.waiting is not None:
            lst, self.waiting = self.waiting, None
            lst.drop(self)
        super().cleanup()


def egress_listen(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Start (or keep) the egress listener on 127.0.0.1:<port>."""
    port = req.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GuestFail("invalid_spec", f"egress port must be 1..65535, got {port!r}"[:200])
    if agent.egress is not None and agent.egress.port != port:
        agent.egress.close()
        agent.egress = None
    if agent.egress is None:
        agent.egress = EgressListener(agent, port)
    return {"port": port}


def egress_close(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Stop the egress listener: the workload's proxy connections are refused."""
    if agent.egress is not None:
        agent.egress.close()
        agent.egress = None
    return {}


def tcp_listening(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Whether something listens where a tunnel to the request's (port, host) would
    connect. Read from /proc/net/tcp{,6}: a probe opens no connection a server sees."""
    port, host = tcp_target(req)
    if ":" in host:
        tables = [("/proc/net/tcp6", socket.AF_INET6, {"::", "::1"})]
    else:
        tables = [("/proc/net/tcp", socket.AF_INET, {"0.0.0.0", host}),
                  ("/proc/net/tcp6", socket.AF_INET6, {"::", "::ffff:" + host})]
    return {"listening": any(_proc_listening(path, fam, port, ok) for path, fam, ok in tables)}


def _proc_listening(path: str, family: int, port: int, addrs: set[str]) -> bool:
    parts: list[bytes] = []
    total = 0
    try:
        with open(path, "rb", buffering=0) as f:
            # in small reads: read(cap) would allocate the whole cap each time
            while total < PROC_NET_CAP:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
    except OSError:
        return False
    for line in b"".join(parts).splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4 or parts[3] != b"0A":  # 0A: TCP_LISTEN
            continue
        addr, _, hexport = parts[1].partition(b":")
        try:
            if int(hexport, 16) != port:
                continue
            raw = bytes.fromhex(addr.decode())
            # printed as native-endian 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            if socket.inet_ntop(family, raw) in addrs:
                return True
        except (ValueError, OSError):
            continue
    return False


def check_path(p: Any) -> str:
    if not isinstance(p, str) or not p.startswith("/") or "\x00" in p:
        raise GuestFail("invalid_path", f"path must be absolute, got {p!r}"[:300])
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


class User:
    """Ids a command runs as, resolved in the image's /etc/passwd and /etc/group."""

    def __init__(self, uid: int, gid: int, groups: tuple[int, ...], home: str) -> None:
        self.uid, self.gid, self.groups, self.home = uid, gid, groups, home


def _db(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f.read(1 << 20).splitlines()
                    if line and not line.startswith("#")]
    except OSError:
        return []


def resolve_user(spec: Any) -> User:
    """``name``, ``uid``, ``name:group`` or ``uid:gid`` as OCI's User field means them."""
    if not isinstance(spec, str) or len(spec) > 256:
        raise GuestFail("invalid_request", "user must be a string like 'name' or 'uid:gid'")
    name, _, group = spec.partition(":")
    passwd = [e for e in _db("/etc/passwd") if len(e) >= 7]
    groups = [e for e in _db("/etc/group") if len(e) >= 4]
    entry = next((e for e in passwd if e[0] == name or (name.isdigit() and e[2] == name)), None)
    if entry is not None:
        uid, gid, home, uname = int(entry[2]), int(entry[3]), entry[5], entry[0]
    elif name.isdigit():
        uid, gid, home, uname = int(name), 0, "/", ""  # as runc: no entry, group 0
    else:
        raise GuestFail("invalid_request", f"user {name!r} is not in the image's /etc/passwd")
    if group:
        g = next((e for e in groups if e[0] == group or (group.isdigit() and e[2] == group)),
                 None)
        if g is not None:
            gid = int(g[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise GuestFail("invalid_request", f"group {group!r} is not in the image's /etc/group")
    extra = tuple(sorted({int(e[2]) for e in groups if uname and uname in e[3].split(",")
                          and e[2].isdigit()} | {gid}))
    # 2**32-1 is -1 to setresuid ("unchanged"): it would leave the command root
    if not (0 <= uid < (1 << 32) - 1 and 0 <= gid < (1 << 32) - 1):
        raise GuestFail("invalid_request", f"user {spec!r} has ids out of range")
    return User(uid, gid, extra, home)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                  ctypes.c_ulong(flags), data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def find_disk(serial: str) -> str:
    """/dev/vdX of the virtio disk whose serial is ``serial``."""
    for name in sorted(os.listdir("/sys/block")):
        if _read(f"/sys/block/{name}/serial").strip() == serial:
            return f"/dev/{name}"
    raise GuestFail("file_not_found", f"no disk with serial {serial!r}")


def mount_root(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Mount the image's root filesystem (first boot only) and grow it to its disk.

    The filesystem is grown online to fill the disk (the image is built small);
    /proc, /sys and /dev are mounted inside it. Workloads then run chrooted.
    """
    if agent.root is not None:
        return {"root": agent.root, "already": True}
    serial = req.get("serial")
    if not isinstance(serial, str):
        raise GuestFail("invalid_request", "serial must be a string")
    dev = find_disk(serial)
    os.makedirs(IMAGE_ROOT, exist_ok=True)
    _mount(dev, IMAGE_ROOT, "ext4", 0, "errors=remount-ro")
    blocks = 0
    fd = os.open(IMAGE_ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        size = int(_read(f"/sys/block/{os.path.basename(dev)}/size").strip() or 0) * 512
        bsize = os.statvfs(IMAGE_ROOT).f_bsize
        blocks = size // bsize
        if blocks * bsize > os.statvfs(IMAGE_ROOT).f_blocks * bsize:
            fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("Q", blocks))
    finally:
        os.close(fd)
    for sub, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777)):
        path = os.path.join(IMAGE_ROOT, sub)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            # mounting there would follow the image's link out of its root
            raise GuestFail("image_invalid", f"/{sub} in the image is not a directory")
        if not os.path.lexists(path):
            os.mkdir(path, mode)
    _mount("proc", os.path.join(IMAGE_ROOT, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", os.path.join(IMAGE_ROOT, "sys"), "sysfs",
           MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    _mount("/dev", os.path.join(IMAGE_ROOT, "dev"), None, MS_BIND | MS_REC)
    agent.root = IMAGE_ROOT
    st = os.statvfs(IMAGE_ROOT)
    return {"root": IMAGE_ROOT, "device": dev, "size": st.f_blocks * st.f_frsize}


def mount_volume(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Mount the ext4 volume on the disk ``serial`` at ``path`` inside the root.

    The mount point is created (``mkdir -p``) and mounted while chrooted into
    the image's root, so a symlink on the way can never lead out of it. A
    read-only volume whose journal needs replaying is mounted without it.
    """
    serial = req.get("serial")
    read_only = req.get("read_only", False)
    if not isinstance(serial, str) or not isinstance(read_only, bool):
        raise GuestFail("invalid_request", "serial must be a string, read_only a bool")
    path = check_path(req.get("path"))
    if serial in agent.volumes:
        return {"path": agent.volumes[serial], "already": True}
    dev = find_disk(serial)
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    with agent.in_root():
        os.makedirs(path, mode=0o755, exist_ok=True)
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "mount point is not a directory", path)
        try:
            _mount(dev, path, "ext4", flags, "" if read_only else "errors=remount-ro")
        except OSError:
            if not read_only:
                raise
            _mount(dev, path, "ext4", flags, "noload")
        st = os.statvfs(path)
    agent.volumes[serial] = path
    return {"path": path, "device": dev, "size": st.f_blocks * st.f_frsize}


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def configure(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Identity and clone hygiene, after a cold boot and after every restore.

    Mixes host entropy into the kernel and reseeds its CRNG at once (clones of
    one snapshot would otherwise share their random state), steps the clock to
    the host's, and sets the hostname and SANDVM_SANDBOX_ID.
    """
    done: dict[str, Any] = {}
    seed = req.get("seed")
    if isinstance(seed, str) and 0 < len(seed) <= 1024:
        data = bytes.fromhex(seed)
        with open("/dev/urandom", "wb", buffering=0) as f:
            try:
                fcntl.ioctl(f, RNDADDENTROPY,
                            struct.pack("ii", len(data) * 8, len(data)) + data)
                fcntl.ioctl(f, RNDRESEEDCRNG)
                done["reseeded"] = True
            except OSError:
                f.write(data)  # not root? still mixes it in
                done["reseeded"] = False
    t = req.get("time_ns")
    if isinstance(t, int) and not isinstance(t, bool) and t > 0:
        with contextlib.suppress(OSError):
            time.clock_settime_ns(time.CLOCK_REALTIME, t)
            done["clock"] = True
    name = req.get("hostname")
    if isinstance(name, str) and 0 < len(name) <= 63:
        with contextlib.suppress(OSError):
            socket.sethostname(name)
            done["hostname"] = name
    sid = req.get("sandbox_id")
    if isinstance(sid, str) and 0 < len(sid) <= 128:
        agent.base_env["SANDVM_SANDBOX_ID"] = sid
        with contextlib.suppress(OSError):
            os.makedirs("/run/sandvm", exist_ok=True)
            with open("/run/sandvm/id", "w") as f:
                f.write(sid + "\n")
    return done


STATS_CAP = 1 << 62  # every value of a stats reply is an int in [0, STATS_CAP]


def _int_file(path: str, key: str | None = None) -> int | None:
    """An int from a cgroup file (``key``: the line ``key N`` of a flat-keyed file)."""
    text = _read(path)
    try:
        if key is None:
            return int(text.split()[0])
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (ValueError, IndexError):
        pass
    return None


def command_stats(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """CPU time, memory and process count of the running command ``pid`` (its cgroup,
    else the leader alone), as capped ints; ``running`` False once it is gone."""
    pid = req.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise GuestFail("invalid_request", "pid must be a positive int")
    st = agent.procs.get(pid)
    if st is None:
        return {"running": False, "cpu_usec": 0, "memory_bytes": 0, "processes": 0}
    cpu = mem = procs = None
    if st.cgroup:
        cpu = _int_file(os.path.join(st.cgroup, "cpu.stat"), "usage_usec")
        mem = _int_file(os.path.join(st.cgroup, "memory.current"))
        procs = _int_file(os.path.join(st.cgroup, "pids.current"))
        if procs is None:
            procs = len(agent.cgroup_pids(st.cgroup))
    if cpu is None or mem is None:
        fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
        tick = os.sysconf("SC_CLK_TCK") or 100
        with contextlib.suppress(ValueError, IndexError):
            if cpu is None:
                cpu = (int(fields[11]) + int(fields[12])) * 1_000_000 // tick
            if mem is None:
                mem = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return {"running": True, "cpu_usec": min(max(cpu or 0, 0), STATS_CAP),
            "memory_bytes": min(max(mem or 0, 0), STATS_CAP),
            "processes": min(max(procs or 1, 1), STATS_CAP)}


def mount_tmpfs(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Mount a private tmpfs (nosuid, nodev, noexec) at ``path`` inside the root, owned
    by ``user`` (a name or uid[:gid] of the image, default root) with ``mode``; a path
    already holding a tmpfs is only re-owned. For secrets: they never touch a disk."""
    path = check_path(req.get("path"))
    mode = req.get("mode", 0o700)
    size = req.get("size", 4 << 20)
    if not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise GuestFail("invalid_request", "mode must be an int between 0 and 0o777")
    if not isinstance(size, int) or not 4096 <= size <= 1 << 30:
        raise GuestFail("invalid_request", "size must be between 4 KiB and 1 GiB")
    with agent.in_root():
        user = resolve_user(req["user"]) if req.get("user") not in (None, "") else None
        os.makedirs(path, mode=0o755, exist_ok=True)
        if os.path.islink(path) or not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "mount point is not a directory", path)
        if not os.path.ismount(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   f"mode={mode:o},size={size}")
        os.chmod(path, mode)
        if user is not None:
            os.chown(path, user.uid, user.gid)
    return {"path": path, "uid": user.uid if user else 0, "gid": user.gid if user else 0}


def chown(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Give ``path`` (not following a final symlink) to ``user`` with ``mode``."""
    path = check_path(req.get("path"))
    mode = req.get("mode")
    if mode is not None and (not isinstance(mode, int) or not 0 <= mode <= 0o7777):
        raise GuestFail("invalid_request", "mode must be an int between 0 and 0o7777")
    with agent.in_root():
        user = resolve_user(req.get("user") or "0")
        if os.path.islink(path):
            raise GuestFail("invalid_request", f"{path} is a symbolic link"[:300])
        os.lchown(path, user.uid, user.gid)
        if mode is not None:
            os.chmod(path, mode)
    return {"uid": user.uid, "gid": user.gid}


def in_image_root(fn: Callable[[dict[str, Any]], dict[str, Any]]
                  ) -> Callable[[Agent, dict[str, Any]], dict[str, Any]]:
    """A file-system call run with the image's root as "/" (see Agent.in_root)."""
    @functools.wraps(fn)
    def call(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
        with agent.in_root():
            return fn(req)
    return call


@in_image_root
def op_stat(req: dict[str, Any]) -> dict[str, Any]:
    path = check_path(req.get("path"))
    return stat_dict(path, os.lstat(path))


@in_image_root
def op_exists(req: dict[str, Any]) -> dict[str, Any]:
    return {"exists": os.path.lexists(check_path(req.get("path")))}


@in_image_root
def op_make_dir(req: dict[str, Any]) -> dict[str, Any]:
    path = check_path(req.get("path"))
    existed = os.path.isdir(path)
    mode = req.get("mode", 0o755)
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise GuestFail("invalid_request", "mode must be an int between 0 and 0o7777")
    if req.get("parents", True):
        os.makedirs(path, mode=mode, exist_ok=True)
    elif not existed:
        os.mkdir(path, mode)
    return {"created": not existed}


@in_image_root
def op_remove(req: dict[str, Any]) -> dict[str, Any]:
    path = check_path(req.get("path"))
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


@in_image_root
def op_rename(req: dict[str, Any]) -> dict[str, Any]:
    path = check_path(req.get("path"))
    dst = check_path(req.get("dst"))
    if not req.get("overwrite", True) and os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "destination exists", dst)
    os.rename(path, dst)
    return {}


def op_sync(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    os.sync()  # e.g. before the host kills a VM with volumes
    return {}


CALL = "call"  # the handler returns the REPLY's object (or raises: RESET)
STREAM = "stream"  # the handler is a Stream class, started on the new stream

# The one dispatch table: op → (kind, handler). A call's handler is
# ``handler(agent, request) -> reply``; a stream's is ``Stream(agent, sid, request)``.
OPS: dict[str, tuple[str, Any]] = {
    wire.Op.STAT: (CALL, op_stat),
    wire.Op.EXISTS: (CALL, op_exists),
    wire.Op.MAKE_DIR: (CALL, op_make_dir),
    wire.Op.REMOVE: (CALL, op_remove),
    wire.Op.RENAME: (CALL, op_rename),
    wire.Op.CHOWN: (CALL, chown),
    wire.Op.MOUNT_TMPFS: (CALL, mount_tmpfs),
    wire.Op.WRITE_FILE: (STREAM, WriteFileStream),
    wire.Op.READ_FILE: (STREAM, ReadFileStream),
    wire.Op.LIST: (STREAM, ListStream),
    wire.Op.UNTAR: (STREAM, UntarStream),
    wire.Op.TAR: (STREAM, TarStream),
    wire.Op.EXEC: (STREAM, ExecStream),
    wire.Op.STATS: (CALL, command_stats),
    wire.Op.CONFIGURE: (CALL, configure),
    wire.Op.MOUNT_ROOT: (CALL, mount_root),
    wire.Op.MOUNT_VOLUME: (CALL, mount_volume),
    wire.Op.SYNC: (CALL, op_sync),
    wire.Op.TCP_CONNECT: (STREAM, TcpStream),
    wire.Op.TCP_LISTENING: (CALL, tcp_listening),
    wire.Op.EGRESS_LISTEN: (CALL, egress_listen),
    wire.Op.EGRESS_CLOSE: (CALL, egress_close),
    wire.Op.EGRESS_ACCEPT: (STREAM, EgressStream),
}


# --------------------------------------------------------------------------- agent


class Agent:
    def __init__(self, port_fd: int) -> None:
        self.loop = Loop()
        self.streams: dict[int, Stream] = {}
        self.procs: dict[int, ExecStream] = {}
        self.egress: EgressListener | None = None
        self.dead_cgroups: set[str] = set()
        self.transport = Transport(self.loop, port_fd, self.on_frame)
        self.base_env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TERM": "xterm",
        }
        # with an image: workloads and file operations see IMAGE_ROOT as "/"
        self.root: str | None = None
        self.root_depth = 0  # > 0 while inside in_root()
        self.volumes: dict[str, str] = {}  # disk serial -> where it is mounted
        self.host_root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.oom_fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self.oom_fd = -1
        self.set_oom_score_adj(OOM_SCORE_ADJ_MIN)
        self.cg_base = os.path.join(CGROUP_ROOT, "sandvm")
        self.cg_home = os.path.join(CGROUP_ROOT, "agent")
        self.cgroup_ok = self._setup_cgroups()
        self.boot_id = _read("/proc/sys/kernel/random/boot_id").strip()
        # identifies this agent process: a new one (after a restart) says HELLO anew
        self.instance = f"{os.getpid()}-{time.monotonic_ns()}"
        self.session: str | None = None
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
            os.makedirs(self.cg_base, exist_ok=True)
            # the agent's own home: cgroup v2 forbids processes in a cgroup whose
            # children have controllers enabled
            os.makedirs(self.cg_home, exist_ok=True)
            self._join_cgroup(self.cg_home)
            # per-command memory.current and pids.current (for the "stats" op)
            for ctl in ("+memory", "+pids"):
                with contextlib.suppress(OSError), \
                        open(os.path.join(self.cg_base, "cgroup.subtree_control"), "w") as f:
                    f.write(ctl)
            self._reserve_memory()
            self._reserve_tasks()
            # cgroups left by an earlier agent process (it was killed): remove them
            # once whatever still runs in them is gone
            for name in os.listdir(self.cg_base):
                if name.startswith("cmd-"):
                    self.drop_cgroup(os.path.join(self.cg_base, name))
            return True
        except OSError:
            return False

    def _reserve_memory(self) -> None:
        """Cap all workloads together (``sandvm/memory.max``) below the memory free when
        the agent starts, so their OOM kills happen among them (memcg OOM), never to
        the agent or the kernel. MemTotal would be too high: the initramfs (Python
        and its stdlib) and the kernel hold a good share of it for good."""
        try:
            info: dict[str, int] = {}
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0])
            # what workloads hold already (after an agent restart) is theirs again
            used = _int_file(os.path.join(self.cg_base, "memory.current")) or 0
            avail_kib = info.get("MemAvailable", info["MemTotal"]) + used // 1024
            limit = max(avail_kib // 2, avail_kib - AGENT_RESERVE_KIB) * 1024
            with open(os.path.join(self.cg_base, "memory.max"), "w") as f:
                f.write(str(limit))
        except (OSError, ValueError, IndexError, KeyError) as exc:
            log(f"cannot reserve memory for the agent: {exc}")

    def _reserve_tasks(self) -> None:
        """Cap the tasks of all workloads together (``sandvm/pids.max``) below the
        kernel's limits (threads-max is ~1400 in a 256 MiB guest), so a fork bomb
        meets EAGAIN while the agent can still spawn the next command."""
        try:
            kernel_max = min(int(_read("/proc/sys/kernel/threads-max") or 1 << 22),
                             int(_read("/proc/sys/kernel/pid_max") or 1 << 22))
            total = int(_read("/proc/loadavg").split()[3].partition("/")[2])  # all tasks
            theirs = _int_file(os.path.join(self.cg_base, "pids.current")) or 0
            limit = max(16, kernel_max - (total - theirs) - AGENT_RESERVE_TASKS)
            with open(os.path.join(self.cg_base, "pids.max"), "w") as f:
                f.write(str(limit))
        except (OSError, ValueError, IndexError) as exc:
            log(f"cannot reserve tasks for the agent: {exc}")

    def new_cgroup(self, sid: int) -> str | None:
        if not self.cgroup_ok:
            return None
        path = os.path.join(self.cg_base, f"cmd-{sid}-{time.monotonic_ns()}")
        try:
            os.mkdir(path)
        except OSError:
            return None
        try:
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(COMMAND_PIDS_MAX))
        except OSError as exc:
            log(f"cannot cap the tasks of {path}: {exc}")
        return path

    def drop_cgroup(self, path: str | None) -> None:
        """Remove a finished command's cgroup now, or once its leftovers are gone."""
        if not path:
            return
        try:
            os.rmdir(path)
        except OSError:
            if not self.dead_cgroups:
                self.loop.call_later(2.0, self._sweep_cgroups)
            self.dead_cgroups.add(path)

    def _sweep_cgroups(self) -> None:
        for path in list(self.dead_cgroups):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                self.dead_cgroups.discard(path)
            except OSError:
                continue
            else:
                self.dead_cgroups.discard(path)
        if self.dead_cgroups:
            self.loop.call_later(2.0, self._sweep_cgroups)

    @staticmethod
    def cgroup_pids(path: str) -> list[int]:
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return []

    @contextlib.contextmanager
    def in_root(self) -> Any:
        """Run the block with the image's root as "/" (no-op without an image).

        The agent is single-threaded: it chroots into the image for the call
        and back out through the fd it holds on its own root.
        """
        if self.root is None or self.root_depth:
            yield  # no image, or already inside (nested calls, e.g. cleanup on failure)
            return
        os.chroot(self.root)
        os.chdir("/")  # relative paths, "" and "." in PATH resolve inside the image too
        self.root_depth += 1
        try:
            yield
        finally:
            self.root_depth -= 1
            os.fchdir(self.host_root_fd)
            os.chroot(".")
            os.chdir("/")

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, stdin: int, stdout: int,
              stderr: int, cgroup: str | None, user: User | None = None) -> int:
        """posix_spawn (vfork: much cheaper than fork under TCG) in a new session.

        The child inherits the cgroup, root, working directory and ids of the agent
        at spawn time, so the agent steps into all of them for the call (it is
        single-threaded) and steps back: the child starts inside its cgroup, in
        the image's root, as ``user``, with no race.
        """
        if cgroup:
            self._join_cgroup(cgroup)
        try:
            for attempt in range(SPAWN_ATTEMPTS):
                try:
                    with self.in_root():
                        pid = self._spawn_here(argv, env, cwd, stdin, stdout, stderr, user,
                                               last=attempt == SPAWN_ATTEMPTS - 1)
                    break
                except SpawnAgain:
                    # no task or memory to spare (EAGAIN, ENOMEM): the zombies of a
                    # killed command may still count; reap them and try again
                    self.reap()
                    time.sleep(0.05 * (attempt + 1))
            else:
                raise AssertionError("unreachable")
        finally:
            if cgroup:
                self._join_cgroup(self.cg_home)
        self._unprotect(pid, cgroup)
        return pid

    def _unprotect(self, pid: int, cgroup: str | None) -> None:
        """Give a new command back the OOM killer's ordinary score it inherited as the
        agent's exemption: its leader first (what it forks from now on inherits 0),
        then whatever it forked before that. The agent never drops its own exemption,
        not even while it spawns inside the command's cgroup: a full cgroup's OOM
        killer would pick it there. (A root workload may exempt itself; the workloads'
        shared memory cap keeps that from hurting the agent.)"""
        pids = [pid]
        for _ in range(3):
            fixed = 0
            for p in pids:
                try:
                    fd = os.open(f"/proc/{p}/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
                except OSError:
                    continue  # already gone
                try:
                    if int(os.pread(fd, 16, 0) or b"0") == OOM_SCORE_ADJ_MIN:
                        os.pwrite(fd, b"0", 0)
                        fixed += 1
                except (OSError, ValueError):
                    pass
                finally:
                    os.close(fd)
            if not fixed or not cgroup:
                return
            pids = self.cgroup_pids(cgroup)

    def set_oom_score_adj(self, value: int) -> None:
        """Set the agent's own ``oom_score_adj`` (through an fd opened at start: the
        agent may be inside an image's root)."""
        if self.oom_fd < 0:
            return
        try:
            os.pwrite(self.oom_fd, str(value).encode(), 0)
        except OSError as exc:
            log(f"cannot set oom_score_adj to {value}: {exc}")

    def _spawn_here(self, argv: list[str], env: dict[str, str], cwd: str, stdin: int,
                    stdout: int, stderr: int, user: User | None, *, last: bool = True) -> int:
        exe = argv[0]
        if "/" not in exe:
            found = None
            for d in env.get("PATH", "").split(":"):
                cand = os.path.join(d or ".", exe)
                if os.path.isfile(cand) and os.access(cand, os.X_OK):
                    found = cand
                    break
            if found is None:
                raise GuestFail("command_not_found", f"command not found: {exe}"[:300])
            exe = found
        elif not os.path.exists(exe):
            raise GuestFail("command_not_found", f"command not found: {exe}"[:300])
        if not os.path.isdir(cwd):
            raise GuestFail("file_not_found", f"working directory {cwd} does not exist"[:300])
        try:
            os.chdir(cwd)
            if user is not None:
                # real and effective ids become the user's, the saved ones stay 0 so
                # the agent can step back; exec gives the child saved = effective
                os.setgroups(list(user.groups))
                os.setresgid(user.gid, user.gid, 0)
                os.setresuid(user.uid, user.uid, 0)
            return os.posix_spawn(
                exe, argv, env,
                file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                              (os.POSIX_SPAWN_DUP2, stderr, 2)],
                setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGCHLD, signal.SIGINT,
                                        signal.SIGTERM, signal.SIGQUIT))
        except PermissionError:
            raise GuestFail("permission_denied", f"permission denied: {argv[0]}") from None
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOMEM):
                raise GuestFail("exec_failed", f"cannot run {argv[0]}: {exc.strerror}") from None
            if not last:
                raise SpawnAgain from None
            raise GuestFail("exec_failed", f"cannot run {argv[0]}: the guest has no process"
                                           f" or memory to spare ({exc.strerror}): the"
                                           " commands running fill its limits") from None
        finally:
            if user is not None:
                os.setresuid(0, 0, 0)
                os.setresgid(0, 0, 0)
                os.setgroups([])
            os.chdir("/")

    @staticmethod
    def _join_cgroup(path: str) -> None:
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def _on_signal(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.sig_r.recv(512):
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
            kernel=os.uname().release, cgroups=self.cgroup_ok, instance=self.instance,
            **({"session": self.session} if self.session else {}))))

    def detach_all(self) -> None:
        """Forget every stream of the previous host session; its processes keep running."""
        for st in list(self.streams.values()):
            st.detach()
        self.streams.clear()

    def send_reset(self, sid: int, exc: BaseException) -> None:
        self.transport.send(wire.encode_json(wire.RESET, sid, error_reply(exc)))

    def on_frame(self, ftype: int, sid: int, payload: bytes) -> None:
        try:
            self._dispatch(ftype, sid, payload)
        except Exception as exc:  # noqa: BLE001 - fail that stream, keep the others
            log(f"frame {ftype} on stream {sid} failed: {exc!r}")
            st = self.streams.get(sid)
            if st is not None:
                st.fail(exc)
            elif sid:
                self.send_reset(sid, exc)

    def _dispatch(self, ftype: int, sid: int, payload: bytes) -> None:
        if ftype == wire.HELLO:
            session = wire.decode_json(payload).get("session")
            if isinstance(session, str) and session != self.session:
                # a new host session (e.g. this VM was restored from a snapshot):
                # the old session's streams have no reader any more
                if self.session is not None:
                    self.detach_all()
                self.session = session
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
            return  # a frame for a stream that already ended (races with RESET)
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
            self.send_reset(sid, GuestFail("agent_protocol_error",
                                           f"stream {sid} is in use or not host-owned"))
            return
        if len(self.streams) >= wire.MAX_STREAMS:
            self.send_reset(sid, GuestFail("too_many_streams", "too many concurrent operations"))
            return
        op = req.get("op")
        entry = OPS.get(op) if isinstance(op, str) else None
        if entry is None:
            self.send_reset(sid, GuestFail("unknown_op", f"unknown operation {op!r}"[:200]))
            return
        kind, handler = entry
        if kind == CALL:
            try:
                res = handler(self, req)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the host
                self.send_reset(sid, exc)
            else:
                self.transport.send(wire.encode_json(wire.REPLY, sid, res))
            return
        st = handler(self, sid, req)
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
    for _ in range(500):
        with contextlib.suppress(OSError):
            for name in os.listdir(base):
                if _read(os.path.join(base, name, "name")).strip() == PORT_NAME:
                    return os.path.join("/dev", name)
        time.sleep(0.01)
    raise SystemExit(f"sandvm-agent: no virtio port named {PORT_NAME}")


def harden() -> None:
    """Become a subreaper, so orphaned grandchildren of workloads are reaped here;
    tune malloc for streaming."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception as exc:  # noqa: BLE001
        log(f"cannot become a subreaper: {exc}")
        return
    # streamed data passes through 128 KiB frames: keep them on the heap and the heap's
    # top mapped (glibc would mmap them and trim the heap after each burst, and fresh
    # pages fault in at a high price under TCG). Costs at most 8 MiB of idle RSS.
    libc.mallopt(-3, 2 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD


def main() -> None:
    harden()
    path = find_port()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    agent = Agent(fd)
    log("ready")
    agent.run()


if __name__ == "__main__":
    main()
