"""Typed operations on the guest agent: the one place the host builds its requests.

Every operation the agent serves (:class:`sandvm.wire.Op`) is one method of
:class:`GuestOps`, with keyword-only arguments. A *call* returns a typed result,
read from the guest's reply with the hostile-guest readers of ``agent_client``
(a malformed reply is AgentProtocolError); a *stream* op returns the opened
:class:`HostStream`, which its caller drives (DATA, EOF, EVENT, the final REPLY).

What a user passed is checked by the caller (files, commands, ports, ...) before it
gets here: these methods add nothing to the request but what they are given. Errors:
the guest's RESET as its mapped exception (GuestFileNotFound, PortRefused, ...),
AgentTimeout after a call's ``timeout``, the connection's failure once it is closed,
InvalidSpec for a request too large for one frame.
"""

from __future__ import annotations

from typing import Any

from sandvm.agent_client import (
    AgentConnection,
    HostStream,
    guest_bool,
    guest_float,
    guest_int,
    guest_str,
)
from sandvm.errors import AgentProtocolError, InvalidSpec
from sandvm.values import CommandStats, EntryInfo
from sandvm.wire import Op

__all__ = ["GuestOps", "entry_info"]


def entry_info(d: dict[str, Any]) -> EntryInfo:
    """An EntryInfo from a guest's entry (a stat reply, a listing's item), checking every
    field's type and range (the guest is hostile). Raises AgentProtocolError."""
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


class GuestOps:
    """The guest agent's operations over one connection (cheap: make one where needed).

    Usable while the connection is open; every method raises its failure once it is
    closed (VmCrashed, AgentDisconnected, ...)."""

    __slots__ = ("conn",)

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn

    async def _call(self, op: Op, timeout: float, **args: Any) -> dict[str, Any]:
        return await self.conn.call({"op": op, **args}, timeout=timeout)

    async def _open(self, op: Op, **args: Any) -> HostStream:
        return await self.conn.open({"op": op, **args})

    # ------------------------------------------------------------ file system

    async def stat(self, *, path: str, timeout: float) -> EntryInfo:
        """The entry at ``path`` (not following a final symlink)."""
        return entry_info(await self._call(Op.STAT, timeout, path=path))

    async def exists(self, *, path: str, timeout: float) -> bool:
        """Whether anything (a dangling symlink too) is at ``path``."""
        return (await self._call(Op.EXISTS, timeout, path=path)).get("exists") is True

    async def make_dir(self, *, path: str, mode: int, timeout: float) -> bool:
        """Create a directory and its parents; False if it already existed."""
        return (await self._call(Op.MAKE_DIR, timeout, path=path, mode=mode)).get(
            "created") is True

    async def remove(self, *, path: str, recursive: bool, timeout: float) -> None:
        """Remove a file, a link or a directory (``recursive``: with its contents)."""
        await self._call(Op.REMOVE, timeout, path=path, recursive=recursive)

    async def rename(self, *, path: str, dst: str, overwrite: bool, timeout: float) -> None:
        """Move ``path`` to ``dst``; unless ``overwrite``, GuestFileExists if it exists."""
        await self._call(Op.RENAME, timeout, path=path, dst=dst, overwrite=overwrite)

    async def chown(self, *, path: str, user: str, mode: int | None,
                    timeout: float) -> None:
        """Give ``path`` (not a symlink) to ``user`` (a name or ``uid[:gid]`` of the
        image), and set ``mode`` if given."""
        await self._call(Op.CHOWN, timeout, path=path, user=user, mode=mode)

    async def mount_tmpfs(self, *, path: str, mode: int, user: str | None,
                          size: int | None = None, timeout: float) -> None:
        """Mount a private tmpfs (nosuid, nodev, noexec) at ``path``, owned by ``user``
        (default root) with ``mode``, of at most ``size`` bytes (default: the guest's,
        4 MiB); a tmpfs already there only gets ``mode`` (and ``user`` if given)."""
        args: dict[str, Any] = {"path": path, "mode": mode, "user": user}
        if size is not None:
            args["size"] = size
        await self._call(Op.MOUNT_TMPFS, timeout, **args)

    # ------------------------------------------------------------ file transfer (streams)

    async def write_file(self, *, path: str, mode: int, make_parents: bool) -> HostStream:
        """Open an atomic write of ``path``: send the content (channel 0), then EOF; the
        REPLY carries ``size``. A reset before the REPLY drops the temp file."""
        return await self._open(Op.WRITE_FILE, path=path, mode=mode,
                                make_parents=make_parents)

    async def read_file(self, *, path: str, max_bytes: int) -> HostStream:
        """Open a read of ``path``: DATA chunks, then a REPLY with ``size``."""
        return await self._open(Op.READ_FILE, path=path, max_bytes=max_bytes)

    async def list_dir(self, *, path: str, depth: int) -> HostStream:
        """Open a listing: EVENTs with ``entries`` (see :func:`entry_info`), then a REPLY
        with their ``count``."""
        return await self._open(Op.LIST, path=path, depth=depth)

    async def untar(self, *, path: str) -> HostStream:
        """Open an extraction into ``path``: send a tar stream, then EOF; the REPLY
        counts what was extracted and names what was ``skipped``."""
        return await self._open(Op.UNTAR, path=path)

    async def tar(self, *, path: str, max_bytes: int, max_files: int) -> HostStream:
        """Open ``path``'s tree as a tar stream (DATA, EOF), then a REPLY naming what was
        ``skipped``."""
        return await self._open(Op.TAR, path=path, max_bytes=max_bytes, max_files=max_files)

    # ------------------------------------------------------------ commands

    async def exec(self, *, shell: str | None = None, argv: list[str] | None = None,
                   env: dict[str, str] | None = None, cwd: str | None = None,
                   timeout: float | None = None, stdin: bool, user: str | None = None
                   ) -> HostStream:
        """Start a command: ``shell`` (a shell string) or ``argv``, one of them. Its
        ``timeout`` (None: none) is enforced by the guest, which kills its whole group;
        ``stdin`` keeps channel 0 open. The stream carries a ``started`` EVENT with the
        pid, the output on channels 1 and 2, CTRL for signals, and the exit REPLY."""
        if (shell is None) == (argv is None):
            raise InvalidSpec("exec takes a shell string or an argv list, one of them")
        req: dict[str, Any] = {}
        if user is not None:
            req["user"] = user
        if shell is not None:
            req["shell"] = shell
        else:
            req["argv"] = argv
        if env:
            req["env"] = env
        if cwd is not None:
            req["cwd"] = cwd
        if timeout is not None:
            req["timeout"] = timeout
        req["stdin"] = stdin
        return await self._open(Op.EXEC, **req)

    async def stats(self, *, pid: int, timeout: float) -> CommandStats:
        """CPU time, memory and process count of the running command ``pid``; raises
        AgentProtocolError for a value out of range or of the wrong type."""
        res = await self._call(Op.STATS, timeout, pid=pid)
        ints = {k: guest_int(res, k, what="stats")
                for k in ("cpu_usec", "memory_bytes", "processes")}
        return CommandStats(running=guest_bool(res, "running", what="stats"), **ints)

    # ------------------------------------------------------------ VM set-up

    async def configure(self, *, timeout: float, seed: str | None = None,
                        time_ns: int | None = None, hostname: str | None = None,
                        sandbox_id: str | None = None) -> None:
        """Clone hygiene and identity: mix ``seed`` (hex) into the guest's entropy and
        reseed it, step its clock to ``time_ns``, set its hostname and sandbox id. Only
        what is given is done."""
        args = {k: v for k, v in (("seed", seed), ("time_ns", time_ns),
                                  ("hostname", hostname), ("sandbox_id", sandbox_id))
                if v is not None}
        await self._call(Op.CONFIGURE, timeout, **args)

    async def mount_root(self, *, serial: str, timeout: float) -> None:
        """Mount the image's root file system from the disk ``serial`` (first boot)."""
        await self._call(Op.MOUNT_ROOT, timeout, serial=serial)

    async def mount_volume(self, *, serial: str, path: str, read_only: bool,
                           timeout: float) -> None:
        """Mount the volume on the disk ``serial`` at ``path`` inside the root."""
        await self._call(Op.MOUNT_VOLUME, timeout, serial=serial, path=path,
                         read_only=read_only)

    async def sync(self, *, timeout: float) -> None:
        """Flush the guest's file systems to their disks."""
        await self._call(Op.SYNC, timeout)

    # ------------------------------------------------------------ ports and egress

    async def tcp_connect(self, *, port: int, host: str, notify: bool = True) -> HostStream:
        """Open a TCP tunnel to ``host``:``port`` in the guest: host → guest bytes on
        channel 0, guest → host on 1. With ``notify`` a ``connected`` EVENT comes first
        (without it, bytes may be sent at once: the guest holds them until connected)."""
        if notify:
            return await self._open(Op.TCP_CONNECT, port=port, host=host)
        return await self._open(Op.TCP_CONNECT, port=port, host=host, notify=False)

    async def tcp_listening(self, *, port: int, host: str, timeout: float) -> bool:
        """Whether something in the guest listens where a tunnel to (``port``, ``host``)
        would connect; opens no connection. Raises AgentProtocolError if the guest's
        answer is not a boolean."""
        listening = (await self._call(Op.TCP_LISTENING, timeout, port=port, host=host)
                     ).get("listening")
        if not isinstance(listening, bool):
            raise AgentProtocolError("guest sent a malformed readiness report")
        return listening

    async def egress_listen(self, *, port: int, timeout: float) -> None:
        """Start (or move) the guest's egress listener on 127.0.0.1:``port``."""
        await self._call(Op.EGRESS_LISTEN, timeout, port=port)

    async def egress_close(self, *, timeout: float) -> None:
        """Stop the guest's egress listener: the workload's proxy connections are refused."""
        await self._call(Op.EGRESS_CLOSE, timeout)

    async def egress_accept(self) -> HostStream:
        """Wait in the guest for one workload connection to the egress listener: a
        ``connected`` EVENT, then its bytes (guest → host on channel 1)."""
        return await self._open(Op.EGRESS_ACCEPT)
