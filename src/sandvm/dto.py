"""What the HTTP API answers about sandboxes, commands, snapshots and pools: one definition
of each shape, shared by the server and the remote SDK.

Frozen dataclasses, and nothing of sandvm but ``errors``: the remote SDK reads the
server's JSON into them (``from_json``) without loading pydantic, the server or the VM
stack; the server derives its response models (validation, the OpenAPI document, with
its descriptions) from them in ``sandvm.server.models``, so the two cannot drift. The
field order is the documents' (a schema's ``required`` list follows it).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sandvm.errors import ServiceError

__all__ = ["CommandInfo", "PoolInfo", "SandboxInfo", "SnapshotInfo", "from_json"]

_D = TypeVar("_D")


@dataclass(frozen=True)
class SandboxInfo:
    """What the server says about a sandbox. ``accelerator``, ``boot_seconds``,
    ``guest_kernel``, ``agent_version``: what it knew of the VM (None: unknown)."""

    sandbox_id: str
    state: Literal["starting", "running", "ended"]
    image: str
    memory_mib: int
    vcpus: int
    created: float
    expires_at: float | None
    network: bool
    accelerator: str | None = None
    boot_seconds: float | None = None
    guest_kernel: str | None = None
    agent_version: str | None = None

    @classmethod
    def from_json(cls, d: object) -> SandboxInfo:
        """Raises ServiceError if ``d`` is not a sandbox description."""
        return from_json(cls, d, what="sandbox description")


@dataclass(frozen=True)
class CommandInfo:
    """What the server says about a background command: ``next_seq`` is the ``seq`` its
    next output event gets, ``first_seq`` the oldest one the server still keeps
    (``output_dropped``: older ones were dropped, its buffer being full)."""

    command_id: str
    sandbox_id: str
    cmd: str
    state: Literal["running", "exited", "failed"]
    pid: int | None
    started: float
    ended: float | None
    exit_code: int | None
    signal: int | None
    timed_out: bool | None
    error_code: str | None
    error_message: str | None
    stdin_open: bool
    first_seq: int
    next_seq: int
    output_dropped: bool

    @classmethod
    def from_json(cls, d: object) -> CommandInfo:
        """Raises ServiceError if ``d`` is not a command description."""
        return from_json(cls, d, what="command description")


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot on the server (``name`` is what restores it)."""

    name: str
    created: float
    source_id: str | None
    image: str
    memory_mib: int
    vcpus: int
    size_bytes: int

    @classmethod
    def from_json(cls, d: object) -> SnapshotInfo:
        """Raises ServiceError if ``d`` is not a snapshot description."""
        return from_json(cls, d, what="snapshot description")


@dataclass(frozen=True)
class PoolInfo:
    """A warm pool's settings and counters, as the server reports them (``hits``:
    sandboxes handed out at once; ``misses``: ones that had to wait for a restore;
    ``timeouts``: requests that got none)."""

    name: str
    snapshot: str
    min_size: int
    max_size: int
    idle_timeout: float | None
    network: bool
    created: float
    ready: int
    restoring: int
    hits: int
    misses: int
    timeouts: int
    restored: int
    restore_failures: int
    restore_ms_p50: float | None
    restore_ms_p99: float | None
    last_error: str | None

    @classmethod
    def from_json(cls, d: object) -> PoolInfo:
        """Raises ServiceError if ``d`` is not a pool description."""
        return from_json(cls, d, what="pool description")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The fields of the DTO ``cls`` and their types (annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value: object, typ: Any) -> Any:
    """``value`` (from JSON) as ``typ``; raises TypeError/ValueError if it is not one."""
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner)
    if origin is Literal:  # any string: a newer server may know more states
        if not isinstance(value, str):
            raise TypeError("not a string")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise TypeError("not a boolean")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("not an integer")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("not a number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise TypeError("not a string")
        return value
    raise TypeError(f"no conversion to {typ!r}")


def from_json(cls: type[_D], d: object, *, what: str) -> _D:
    """The DTO ``cls`` from the server's JSON object ``d``: every field without a default
    present, each of its type (unknown keys ignored: a newer server may send more).
    Raises ServiceError naming ``what`` was malformed."""
    if not isinstance(d, dict):
        raise ServiceError(f"the server sent a malformed {what}")
    klass: type = cls
    fields = {f.name: f for f in dataclasses.fields(klass)}
    values: dict[str, Any] = {}
    try:
        for name, typ in field_types(klass).items():
            if name in d:
                values[name] = _convert(d[name], typ)
            elif fields[name].default is dataclasses.MISSING:
                raise KeyError(name)
    except (KeyError, TypeError, ValueError):
        raise ServiceError(f"the server sent a malformed {what}") from None
    return cls(**values)
