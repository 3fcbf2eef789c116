"""Request and response shapes of the HTTP API (pydantic; they make /openapi.json).

Every request model forbids unknown fields and bounds every string, list and number,
so a hostile body is refused before it reaches the service.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from sandvm import dto
from sandvm.values import MAX_COMMAND_TIMEOUT

ImageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$",
                                 description="A built-in image (`base`) or one of"
                                             " `sandvm image ls` on the server.")]
def _integral(v: object) -> object:
    """JSON Schema's integer: 4.0 is one (strict mode alone would refuse it)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]
_B64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
HostPattern = Annotated[str, Field(min_length=1, max_length=253)]
EnvName = Annotated[str, Field(min_length=1, max_length=256)]
Arg = Annotated[str, Field(max_length=128 << 10)]


class _Strict(BaseModel):
    """No unknown fields, no coercion (``false`` is not a number, ``"1"`` not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NetworkPolicyBody(_Strict):
    """Egress through the server's policy proxy: deny by default, these names allowed.

    Addresses that are not public (``allow_ips``) and fixed answers (``hosts``) are
    for the server's operator, not for API clients."""

    allow: list[HostPattern] = Field(default_factory=list, max_length=256)
    # annotated_types, not Field(ge=...): inside a list or a union pydantic would write
    # "ge"/"le" (no JSON Schema keywords) into the document instead of minimum/maximum
    ports: list[Annotated[Int, Ge(1), Le(65535)]] = Field(default=[443], max_length=64)
    allow_http: bool = False
    max_bytes: Annotated[Int, Ge(0)] | None = None


class CreateSandboxRequest(_Strict):
    image: ImageName | None = Field(default=None, description="Default: the server's"
                                                              " default image.")
    memory_mib: Int = Field(default=256, ge=128, le=16384)
    vcpus: Int = Field(default=1, ge=1, le=16)
    timeout: float | None = Field(default=None, gt=0, le=MAX_COMMAND_TIMEOUT,
                                  description="Seconds the sandbox"
                                  " lives (its TTL; default: the server's). Extend it with"
                                  " POST /v1/sandboxes/{id}/timeout.")
    network: NetworkPolicyBody | None = Field(default=None, description="No network if"
                                              " absent.")
    snapshot: SnapshotName | None = Field(
        default=None, description="Restore this snapshot of the tenant's instead of"
        " booting (image, memory_mib and vcpus are then the snapshot's).")
    pool: SnapshotName | None = Field(
        default=None, description="Take a waiting sandbox from this pool of the tenant"
        " (image, memory, vcpus and network are the pool's).")
    wait: float | None = Field(default=None, gt=0, le=3600, description="With pool: the"
                               " longest to wait for a ready sandbox (capped by the"
                               " server; default its cap, 60 s).")


SnapshotName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]


class CreateSnapshotRequest(_Strict):
    name: SnapshotName | None = Field(default=None, description="Default: a new id.")


class ForkRequest(_Strict):
    n: Int = Field(default=1, ge=1, le=256, description="How many copies (the server"
                   " caps it).")
    timeout: float | None = Field(default=None, gt=0, le=MAX_COMMAND_TIMEOUT,
                                  description="Seconds each copy lives (default: the"
                                              " server's).")


class CreatePoolRequest(_Strict):
    name: SnapshotName
    snapshot: SnapshotName = Field(description="A snapshot of the tenant's.")
    min_size: Int = Field(default=1, ge=0, le=1024, description="Sandboxes kept waiting.")
    max_size: Int = Field(default=4, ge=1, le=1024, description="At most this many waiting"
                          " or being restored (the server caps it).")
    idle_timeout: float | None = Field(default=300.0, gt=0, le=MAX_COMMAND_TIMEOUT,
                                       description="Seconds after which waiting sandboxes"
                                       " beyond min_size are killed; null: never.")
    network: NetworkPolicyBody | None = Field(default=None, description="The egress of"
                                              " every sandbox it hands out; none if absent.")


class SetTimeoutRequest(_Strict):
    timeout: float = Field(gt=0, le=MAX_COMMAND_TIMEOUT,
                           description="Seconds the sandbox lives from now.")


class RunCommandRequest(_Strict):
    cmd: Annotated[str, Field(min_length=1, max_length=128 << 10)] | Annotated[
        list[Arg], Field(min_length=1, max_length=4096)] = Field(
        description="A shell command line (run by /bin/sh -c) or an argv list.")
    env: dict[EnvName, Annotated[str, Field(max_length=128 << 10)]] | None = Field(
        default=None, max_length=1024)
    cwd: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="An absolute path in the guest (else 400, code"
                                  " invalid_path, as locally).")
    user: Annotated[str, Field(max_length=256)] | None = None
    timeout: float | None = Field(default=60.0, gt=0, le=MAX_COMMAND_TIMEOUT,
                                  description="Seconds before the command's processes are"
                                  " killed; null: no limit (the sandbox's own timeout"
                                  " still ends it).")
    stdin: Annotated[str, Field(max_length=1 << 20)] | None = Field(
        default=None, description="Text fed to the command's stdin (then closed).")
    stdin_b64: Annotated[str, Field(max_length=(1 << 20) * 4 // 3 + 4, pattern=_B64)] | None = \
        Field(default=None, description="Bytes fed to stdin (then closed), base64.")


SignalName = Literal["SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1",
                     "SIGUSR2"]


class SignalRequest(_Strict):
    signal: SignalName | Annotated[Int, Ge(1), Le(64)] = Field(
        description="A signal name or number, sent to the command's process group.")
    grace: float | None = Field(default=None, ge=0, le=3600, description="Seconds after"
                                " which every process of the command gets SIGKILL.")


def model_of(cls: type, *, doc: str | None, described: dict[str, str]) -> type[BaseModel]:
    """The response model of the DTO dataclass ``cls`` (its fields, types and defaults, in
    its order), with the document's description ``doc`` and ``described`` fields'."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kw: dict[str, Any] = {}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        if f.name in described:
            kw["description"] = described[f.name]
        fields[f.name] = (dto.field_types(cls)[f.name], Field(**kw))
    model: type[BaseModel] = create_model(cls.__name__, __doc__=doc, __module__=__name__,
                                           **fields)
    return model


# the responses whose shapes sandvm.dto defines (for the server and the remote SDK): the
# models are derived from those dataclasses, with the documents' descriptions added here
if TYPE_CHECKING:  # to the type checker, the dataclasses (the same fields)
    from sandvm.dto import CommandInfo as CommandInfo
    from sandvm.dto import PoolInfo as PoolInfo
    from sandvm.dto import SandboxInfo as SandboxInfo
    from sandvm.dto import SnapshotInfo as SnapshotInfo
else:
    CommandInfo = model_of(dto.CommandInfo, doc="""A background command. ``next_seq`` is\
 the ``seq`` its next output event gets;
    ``first_seq`` the oldest one the server still keeps (``output_dropped``: older ones
    were dropped, the buffer being full).""", described={
        "cmd": "The command line (argv joined by spaces; cut at 1024).",
        "pid": "Its process id in the guest.",
        "started": "Epoch seconds.",
        "error_code": "Set when it failed (state `failed`)."})
    SandboxInfo = model_of(dto.SandboxInfo, doc=None, described={
        "created": "Epoch seconds.",
        "expires_at": "Epoch seconds when its TTL ends.",
        "network": "Whether it has an egress policy.",
        "accelerator": "`kvm` or `tcg` (null: unknown).",
        "boot_seconds": "Seconds its VM took to boot or restore (null: unknown to this"
                        " server process, e.g. after a restart).",
        "guest_kernel": "The guest's kernel release (null: unknown, as above).",
        "agent_version": "The guest agent's version (null: unknown, as above)."})
    SnapshotInfo = model_of(dto.SnapshotInfo, doc=None, described={
        "created": "Epoch seconds.",
        "source_id": "The sandbox it was taken of.",
        "size_bytes": "Bytes its files take on the server's disk."})
    PoolInfo = model_of(dto.PoolInfo, doc="""A warm pool: its settings and counters\
 (``hits``: sandboxes handed out at once;
    ``misses``: ones that had to wait for a restore; ``timeouts``: requests that got
    none).""", described={
        "ready": "Sandboxes waiting now."})


class CommandList(BaseModel):
    commands: list[CommandInfo]


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class SnapshotList(BaseModel):
    snapshots: list[SnapshotInfo]


class PoolList(BaseModel):
    pools: list[PoolInfo]


class WriteResult(BaseModel):
    path: str
    size: int


class ErrorBody(BaseModel):
    """Every error response: a stable ``code`` (see sandvm.errors) and what to change."""

    code: str
    message: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class CommandEvent(BaseModel):
    """One line of a command's NDJSON output stream.

    ``stdout``/``stderr``: a chunk of output in ``text`` (valid UTF-8) or ``b64`` (any
    bytes). ``exit``: the last line of a command that ended (``exit_code``, ``signal``,
    ``timed_out``, ``duration`` seconds). ``error``: the last line of a command that
    failed (``code``, ``message``). Events of a background command carry ``seq``
    (0, 1, ...: a jump means the server dropped output its buffer had no room for)."""

    type: Literal["stdout", "stderr", "exit", "error"]
    seq: int | None = None
    text: str | None = None
    b64: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool | None = None
    duration: float | None = None
    code: str | None = None
    message: str | None = None


# ---------------------------------------------------------------------------- ports, network

MAX_PORT_WAIT = 60.0  # seconds one wait request may take (the client waits longer in steps)


class ExposePortRequest(_Strict):
    port: Int = Field(ge=1, le=65535, description="The guest port: a TCP server listening"
                      " on 127.0.0.1 (or 0.0.0.0) in the guest.")


class WaitPortRequest(_Strict):
    timeout: float = Field(default=30.0, gt=0, le=MAX_PORT_WAIT,
                           description="Seconds to wait for a server to listen.")


class PortInfo(BaseModel):
    """A guest port exposed on the server's host: connect to ``url``."""

    port: int = Field(description="The guest port.")
    url: str = Field(description="`http://HOST:HOST_PORT`: where the server listens.")
    host: str
    host_port: int


class PortList(BaseModel):
    ports: list[PortInfo]


class ClosedPorts(BaseModel):
    closed: int = Field(description="Listeners closed (0: the port was not exposed).")


class NetworkPolicyView(BaseModel):
    """A sandbox's egress policy (the fields API clients set)."""

    allow: list[str]
    ports: list[int]
    allow_http: bool
    max_bytes: int | None


class NetworkInfo(BaseModel):
    enabled: bool = Field(description="Whether the sandbox has egress (a policy).")
    policy: NetworkPolicyView | None
    bytes_total: int = Field(description="Bytes through its egress proxy, both ways, over"
                             " its life.")
    connections: int = Field(description="Connections open through the proxy now.")


class EgressEventInfo(BaseModel):
    """One decision of the egress proxy: ``allow`` (connected), ``deny`` (refused by the
    policy), ``error`` (allowed but failed), ``close`` (a connection ended)."""

    ts: float = Field(description="Epoch seconds.")
    action: str
    method: str
    host: str
    port: int
    reason: str
    address: str | None
    bytes_out: int
    bytes_in: int
    seconds: float
    count: int = Field(default=1, ge=1, description="How many identical decisions this"
                       " record stands for (repeated refusals are coalesced).")


class EgressEventList(BaseModel):
    events: list[EgressEventInfo]


# ---------------------------------------------------------------------------- files: entries, trees

MAX_LIST_DEPTH = 1024
Mode = Annotated[Int, Field(ge=0, le=0o7777, description="Permission bits.")]
GuestPathField = Annotated[str, Field(min_length=1, max_length=4096,
                                      description="An absolute path in the guest (else"
                                                  " 400, code invalid_path, as locally).")]


class EntryInfo(BaseModel):
    """A file-system entry in the guest (as the local ``files.stat`` returns it)."""

    path: str
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int = Field(description="Permission bits.")
    mtime: float = Field(description="Epoch seconds.")
    uid: int
    gid: int
    target: str | None = Field(description="A symlink's target (null otherwise).")


class EntryList(BaseModel):
    entries: list[EntryInfo]


class Exists(BaseModel):
    exists: bool


class MakeDirRequest(_Strict):
    path: GuestPathField
    mode: Mode = 0o755


class MadeDir(BaseModel):
    created: bool = Field(description="False: the directory existed already.")


class RenameRequest(_Strict):
    old_path: GuestPathField
    new_path: GuestPathField
    overwrite: bool = True


class DirTransfer(BaseModel):
    """What an upload or download of a tree moved, and what it left out (at most 100
    entries named, each with the reason)."""

    files: int
    dirs: int
    symlinks: int
    bytes: int = Field(description="Bytes of file content.")
    skipped: list[str]


class Ping(BaseModel):
    seconds: float = Field(description="The guest agent's round trip, seen from the"
                           " server.")


class ChownRequest(_Strict):
    path: GuestPathField
    user: Annotated[str, Field(min_length=1, max_length=256, description="A name or"
                               " `uid[:gid]` from the image's /etc/passwd.")]
    mode: Mode | None = None


class TmpfsRequest(_Strict):
    path: GuestPathField
    mode: Annotated[Int, Field(ge=0, le=0o777)] = 0o700
    user: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="Its owner (default root).")
    size_bytes: Annotated[Int, Field(ge=4096, le=1 << 30)] = 4 << 20


class CommandStats(BaseModel):
    """What a running command uses now (its cgroup in the guest, else its leader alone);
    ``running`` false (and the figures 0) once it ended."""

    running: bool
    cpu_usec: int = Field(description="CPU time, microseconds.")
    memory_bytes: int
    processes: int


class TreeEvent(BaseModel):
    """One line of a tree download: ``data`` (a piece of the tar stream, ``b64``), then
    ``end`` (``skipped``: entries the guest left out, with why) or ``error`` (``code``,
    ``message``)."""

    type: Literal["data", "end", "error"]
    b64: str | None = None
    skipped: list[str] | None = None
    code: str | None = None
    message: str | None = None
