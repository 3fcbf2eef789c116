"""Value types and limits shared by the local API, the server and the remote SDK.

The bottom layer: it imports nothing of sandvm (``errors`` names these types in its
annotations), so the client, the server and the wire-level code can share them without
loading the VM stack. What validates and raises lives a layer up, in ``core``.
"""

from __future__ import annotations

import enum
import functools
import signal as signal_mod
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_COMMAND_TIMEOUT = 60.0
DEFAULT_READ_CAP = 32 * 1024 * 1024
OUTPUT_CAP = 64 * 1024 * 1024  # per command and stream, kept in memory
LIST_CAP = 100_000  # entries in one listing (the guest stops there too)

OutputCallback = Callable[[str], Any]
#: ``(channel, data)`` for every chunk of raw output: channel 1 stdout, 2 stderr. May be
#: a coroutine function; while it awaits, no more output is read (backpressure).
RawOutputCallback = Callable[[int, bytes], Any]
StdinSource = bytes | str | Iterable[bytes] | AsyncIterable[bytes] | None
SIGNALS = {"SIGINT": signal_mod.SIGINT, "SIGTERM": signal_mod.SIGTERM,
           "SIGKILL": signal_mod.SIGKILL, "SIGHUP": signal_mod.SIGHUP,
           "SIGQUIT": signal_mod.SIGQUIT, "SIGUSR1": signal_mod.SIGUSR1,
           "SIGUSR2": signal_mod.SIGUSR2}


class VmState(enum.Enum):
    """Seed 000's lifecycle: Created → Running ⇄ Stopped, any → Destroyed (terminal)."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DESTROYED = "destroyed"


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


DEFAULT_TREE_CAP = 1 << 30  # bytes of file content download_dir accepts by default
DEFAULT_TREE_ENTRIES = 100_000


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



MAX_COMMAND_TIMEOUT = 7 * 24 * 3600.0  # a week; beyond that, no timeout (None) is meant
PID_MAX = 1 << 22  # Linux's largest pid_max
MAX_DURATION = 1e9  # seconds (31 years): a guest's "duration" beyond is a lie


class SandboxState(enum.Enum):
    """Where an AsyncSandbox is in its life (``AsyncSandbox.state``)::

        STARTING ──▶ RUNNING ⇄ PAUSED
           │            │        │
           └────────────┴────────┴──▶ KILLED    (terminal)
                        └────────┴──▶ DETACHED  (terminal here: another process may
                                                 reclaim the VM with its ticket)

    Each public method of AsyncSandbox names the states that allow it; any other
    raises SandboxStateError naming the current state.
    """

    STARTING = "starting"  # its VM runs; being configured before it is handed out
    RUNNING = "running"
    PAUSED = "paused"  # vCPUs frozen by ``pause()``; ``resume()`` lets them run
    KILLED = "killed"
    DETACHED = "detached"


SANDBOX_TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.STARTING: frozenset({SandboxState.RUNNING, SandboxState.KILLED}),
    SandboxState.RUNNING: frozenset({SandboxState.PAUSED, SandboxState.KILLED,
                                     SandboxState.DETACHED}),
    SandboxState.PAUSED: frozenset({SandboxState.RUNNING, SandboxState.KILLED,
                                    SandboxState.DETACHED}),
    SandboxState.KILLED: frozenset(),
    SandboxState.DETACHED: frozenset(),
}


@dataclass(frozen=True)
class CommandStats:
    """What a running command uses now (its cgroup in the guest, else its leader alone):
    CPU time in microseconds, memory in bytes, processes. ``running`` is False (and the
    figures 0) once it has ended."""

    running: bool
    cpu_usec: int
    memory_bytes: int
    processes: int
