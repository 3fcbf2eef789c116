"""The remote SDK's sync surface: the async one run on sandvm's blocking portal."""

from __future__ import annotations

import builtins
from typing import Any, Literal, overload

import httpx

from sandvm import _portal
from sandvm.client._async import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncSandbox,
    CommandInfo,
    SandboxInfo,
)
from sandvm.client._net import Network, Ports
from sandvm.commands import CommandHandle as _LocalCommandHandle
from sandvm.dto import SnapshotInfo
from sandvm.egress_policy import NetworkPolicy
from sandvm.files import Files as _LocalFiles
from sandvm.values import (
    DEFAULT_COMMAND_TIMEOUT,
    CommandResult,
    CommandStats,
    OutputCallback,
    RawOutputCallback,
)

__all__ = ["CommandHandle", "Commands", "Files", "Sandbox"]


class CommandHandle(_LocalCommandHandle):
    """Sync twin of the remote AsyncCommandHandle: the local CommandHandle's methods
    (pid, stdout, stderr, wait, send_signal, kill, send_stdin, close_stdin) plus
    ``command_id`` and ``info``."""

    def __init__(self, inner: AsyncCommandHandle) -> None:
        super().__init__(inner)  # type: ignore[arg-type]  # the same surface, over HTTP
        self._remote = inner
        self.command_id = inner.command_id

    def info(self) -> CommandInfo:
        """The command's state, as the server knows it."""
        return _portal.call(self._remote.info())

    def abandon(self) -> None:
        """See the remote AsyncCommandHandle.abandon."""
        _portal.call(self._remote.abandon())


class Commands:
    """Sync twin of AsyncCommands."""

    def __init__(self, inner: AsyncCommands) -> None:
        self._a = inner

    @overload
    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
            cwd: str | None = ..., stdin: bytes | str | None = ...,
            timeout: float | None = ..., on_stdout: OutputCallback | None = ...,
            on_stderr: OutputCallback | None = ..., background: Literal[False] = ...,
            check: bool = ..., user: str | None = ...,
            on_output: RawOutputCallback | None = ...) -> CommandResult: ...

    @overload
    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = ...,
            cwd: str | None = ..., stdin: bytes | str | None = ...,
            timeout: float | None = ..., on_stdout: OutputCallback | None = ...,
            on_stderr: OutputCallback | None = ..., background: Literal[True],
            check: bool = ..., user: str | None = ...,
            on_output: RawOutputCallback | None = ...) -> CommandHandle: ...

    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
            cwd: str | None = None, stdin: bytes | str | None = None,
            timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
            on_stdout: OutputCallback | None = None,
            on_stderr: OutputCallback | None = None,
            background: bool = False, check: bool = True,
            user: str | None = None, on_output: RawOutputCallback | None = None
            ) -> CommandResult | CommandHandle:
        """See AsyncCommands.run."""
        if background:
            return self.start(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                              on_stdout=on_stdout, on_stderr=on_stderr, check=check,
                              user=user, on_output=on_output)
        return _portal.call(self._a.run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                                        on_stdout=on_stdout, on_stderr=on_stderr,
                                        background=False, check=check, user=user,
                                        on_output=on_output))

    def start(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
              cwd: str | None = None, stdin: bytes | str | None = None,
              timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
              on_stdout: OutputCallback | None = None,
              on_stderr: OutputCallback | None = None,
              check: bool = True, user: str | None = None,
              on_output: RawOutputCallback | None = None) -> CommandHandle:
        """See AsyncCommands.start."""
        return CommandHandle(_portal.call(self._a.start(
            cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, on_stdout=on_stdout,
            on_stderr=on_stderr, check=check, user=user, on_output=on_output)))

    def connect(self, command_id: str, *, timeout: float | None = None,
                on_stdout: OutputCallback | None = None,
                on_stderr: OutputCallback | None = None,
                check: bool = True) -> CommandHandle:
        """See AsyncCommands.connect."""
        return CommandHandle(_portal.call(self._a.connect(
            command_id, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr,
            check=check)))

    def stats(self, pid: int) -> CommandStats:
        """See AsyncCommands.stats."""
        return _portal.call(self._a.stats(pid))

    def list(self) -> list[CommandInfo]:
        """See AsyncCommands.list."""
        return _portal.call(self._a.list())


class Files(_LocalFiles):
    """Sync twin of the remote AsyncFiles: the local Files' methods, each run on the
    portal (the remote AsyncFiles has the same surface, over HTTP)."""

    def __init__(self, inner: AsyncFiles) -> None:
        super().__init__(inner)  # type: ignore[arg-type]  # the same surface, over HTTP


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
    def create(cls, *, image: str | None = None, memory_mib: int | str = 256,
               vcpus: int = 1, timeout: float | None = None,
               network: NetworkPolicy | None = None, api_key: str | None = None,
               url: str | None = None,
               transport: httpx.AsyncBaseTransport | None = None) -> Sandbox:
        """See AsyncSandbox.create."""
        return cls(_portal.call(AsyncSandbox.create(
            image=image, memory_mib=memory_mib, vcpus=vcpus, timeout=timeout,
            network=network, api_key=api_key, url=url, transport=transport)))

    @classmethod
    def connect(cls, sandbox_id: str, *, api_key: str | None = None,
                url: str | None = None,
                transport: httpx.AsyncBaseTransport | None = None) -> Sandbox:
        """See AsyncSandbox.connect."""
        return cls(_portal.call(AsyncSandbox.connect(sandbox_id, api_key=api_key, url=url,
                                                     transport=transport)))

    @classmethod
    def list(cls, *, api_key: str | None = None, url: str | None = None,
             transport: httpx.AsyncBaseTransport | None = None) -> list[SandboxInfo]:
        """See AsyncSandbox.list."""
        return _portal.call(AsyncSandbox.list(api_key=api_key, url=url, transport=transport))

    @classmethod
    def from_snapshot(cls, snapshot: str, *, timeout: float | None = None,
                      network: NetworkPolicy | None = None, api_key: str | None = None,
                      url: str | None = None,
                      transport: httpx.AsyncBaseTransport | None = None) -> Sandbox:
        """See AsyncSandbox.from_snapshot."""
        return cls(_portal.call(AsyncSandbox.from_snapshot(
            snapshot, timeout=timeout, network=network, api_key=api_key, url=url,
            transport=transport)))

    def snapshot(self, name: str | None = None, *, stop: bool = False) -> SnapshotInfo:
        """See AsyncSandbox.snapshot."""
        return _portal.call(self._a.snapshot(name, stop=stop))

    def pause(self, *, to_disk: bool = False) -> SnapshotInfo | None:
        """See AsyncSandbox.pause."""
        return _portal.call(self._a.pause(to_disk=to_disk))

    @classmethod
    def resume_from(cls, paused: SnapshotInfo | str, *, timeout: float | None = None,
                    api_key: str | None = None, url: str | None = None,
                    transport: httpx.AsyncBaseTransport | None = None) -> Sandbox:
        """See AsyncSandbox.resume_from."""
        return cls(_portal.call(AsyncSandbox.resume_from(
            paused, timeout=timeout, api_key=api_key, url=url, transport=transport)))

    def resume(self) -> None:
        """See AsyncSandbox.resume."""
        _portal.call(self._a.resume())

    def ping(self) -> float:
        """See AsyncSandbox.ping."""
        return _portal.call(self._a.ping())

    @property
    def info(self) -> dict[str, Any]:
        """See AsyncSandbox.info."""
        return self._a.info

    def fork(self, n: int, *, timeout: float | None = None) -> builtins.list[Sandbox]:
        """See AsyncSandbox.fork."""
        return [Sandbox(c) for c in _portal.call(self._a.fork(n, timeout=timeout))]

    def get_info(self) -> SandboxInfo:
        """See AsyncSandbox.get_info."""
        return _portal.call(self._a.get_info())

    def set_timeout(self, timeout: float) -> None:
        _portal.call(self._a.set_timeout(timeout))

    def is_running(self) -> bool:
        return _portal.call(self._a.is_running())

    def kill(self) -> None:
        _portal.call(self._a.kill())

    def close(self) -> None:
        _portal.call(self._a.close())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
