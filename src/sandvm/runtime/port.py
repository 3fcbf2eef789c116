"""The isolation runtime port (seed 003): ``IsolationRuntime`` and its request/result types.

An isolation runtime prepares an isolated environment step by step and runs
processes in it. Every operation takes one frozen, keyword-only request and
returns one frozen result; both validate themselves on construction and raise
:class:`~sandvm.errors.InvalidSpec` (or InvalidPath) for bad values.

Lifecycle of a session (every runtime keeps these rules; the conformance suite
in ``tests/runtime_conformance.py`` pins them)::

    prepare_session ──▶ PREPARING ──prepare_environment──▶ READY ──cleanup──▶ CLEANED
                        (resolve_image, prepare_rootfs,    (start_process,   (terminal)
                         resolve_mounts, configure_network, stream_io, ...)
                         prepare_secrets)
    PREPARING | READY ──detach──▶ DETACHED ──reclaim(keep)──▶ back where it was
                                           ──reclaim(destroy)──▶ CLEANED

- ``start_process`` is the only operation that starts a workload process; it
  needs a READY session (one prepared environment). No other call starts,
  signals or waits for a workload.
- The planning operations (image, rootfs, mounts, network, secrets) are allowed
  only while the session is PREPARING; ``prepare_environment`` seals the
  session (it needs a rootfs; mounts, network and secrets are optional) and
  may be called once per session.
- Refs passed in a request must belong to the request's session (InvalidSpec).
- Ids this runtime never issued (sessions, refs, processes) raise InvalidSpec;
  a known session or process in a state that does not allow the call raises
  SandboxStateError. After ``cleanup`` nothing is allowed but ``cleanup``
  again, which returns the same result (idempotent).
- A capability the runtime reports as unsupported raises Unsupported when a
  request needs it (an egress allowlist, a process timeout, detach, reclaim,
  mounts, a session kind not in ``supported_kinds``); an unsupported host
  refuses ``prepare_session`` with Unsupported naming what is missing.
- Secrets come back as references (:class:`SecretRef`): no result, repr, str,
  error message or pickle ever holds a secret value.
- ``stream_io`` returns at most ``MAX_IO_FRAME`` bytes per frame (stdout and
  stderr together); the final frame has ``finished=True`` with the exit status,
  and later calls return empty finished frames.
- Writing stdin to a process started without ``stdin_open`` raises
  SandboxStateError; stdin for a process that has exited is dropped.
- ``signal_process`` on a process that has already exited is not an error:
  ``delivered`` is False.
- A DETACHED session refuses every call (SandboxStateError) until a
  ``reclaim`` by its ticket; a ticket works once (a second use raises
  SandboxStateError), a ticket this runtime never issued raises InvalidSpec.

One file (about 1,300 lines) on purpose: it is one contract, read as a whole by
whoever implements or calls the port. Its bulk is some 35 small frozen request/result
types that validate themselves with the shared checks at the top; split by phase, each
part would still need those checks and the enums, and a reader would still need all
of it. What both implementations share of the rules (``SessionState``,
``check_session_state``, ``check_environment_refs``) is here too.
"""

from __future__ import annotations

import enum
import hmac
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn, Protocol, TypeVar, runtime_checkable

from sandvm.core import check_guest_path, validate_vm_id
from sandvm.errors import InvalidSpec, SandboxStateError, Unsupported

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_IO_WAIT_SECONDS",
    "DEFAULT_TTL_SECONDS",
    "KIND_HOST_PROCESS",
    "KIND_MICROVM",
    "MAX_GRACE_SECONDS",
    "MAX_IO_FRAME",
    "MAX_IO_WAIT_SECONDS",
    "MAX_SECRET_BYTES",
    "MAX_STATS_CPU_SECONDS",
    "MAX_STATS_MEMORY_BYTES",
    "MAX_STATS_PROCESSES",
    "STANDARD_CAPABILITIES",
    "Capability",
    "CleanupRequest",
    "CleanupResult",
    "CleanupStatus",
    "DetachTransferRequest",
    "DetachTransferResult",
    "EnvironmentPrepareRequest",
    "HealthStatus",
    "ImageResolution",
    "ImageResolveRequest",
    "IsolationCapabilityReport",
    "IsolationRuntime",
    "IsolationRuntimeRef",
    "IsolationSessionRef",
    "MountPlan",
    "MountResolveRequest",
    "MountSpec",
    "NetworkMode",
    "NetworkNamespaceRef",
    "NetworkPrepareRequest",
    "PreparedEnvironmentRef",
    "ProcessIoFrame",
    "ProcessIoRequest",
    "ProcessSignal",
    "ProcessSignalRequest",
    "ProcessSignalResult",
    "ProcessStartRequest",
    "ProcessStartResult",
    "ProcessStatsRequest",
    "ProcessStatsSnapshot",
    "ReclaimAction",
    "ReclaimRequest",
    "ReclaimResult",
    "ReclaimTicket",
    "RootfsPrepareRequest",
    "RootfsRef",
    "SecretDelivery",
    "SecretMaterializationPlan",
    "SecretPrepareRequest",
    "SecretRef",
    "SecretSpec",
    "SecretValue",
    "SessionPrepareRequest",
    "SessionState",
    "check_environment_refs",
    "check_session_state",
    "expect_request",
    "unknown_ref",
]

# ----------------------------------------------------------------------------- limits

MAX_IO_FRAME = 64 * 1024  # bytes of stdout + stderr (or stdin) in one frame
DEFAULT_IO_WAIT_SECONDS = 1.0
MAX_IO_WAIT_SECONDS = 60.0
DEFAULT_GRACE_SECONDS = 5.0
MAX_GRACE_SECONDS = 300.0
DEFAULT_TTL_SECONDS = 300.0
MAX_TTL_SECONDS = 7 * 24 * 3600.0
MAX_PROCESS_TIMEOUT_SECONDS = 7 * 24 * 3600.0
MAX_SECRET_BYTES = 64 * 1024
MAX_SECRETS = 64
MAX_MOUNTS = 32
MAX_ALLOWLIST = 256
MAX_ARGV_BYTES = 128 * 1024
MAX_ENV_BYTES = 256 * 1024
MAX_STATS_CPU_SECONDS = 1e9
MAX_STATS_MEMORY_BYTES = 1 << 40
MAX_STATS_PROCESSES = 1 << 22
MAX_TEXT = 500  # characters of a reason, a missing item, a repair note
MAX_ITEMS = 100  # entries in `missing`, `repairs`, `released`

KIND_MICROVM = "microvm"
KIND_HOST_PROCESS = "host_process"

#: Capabilities every report names, each supported or not, with a reason.
STANDARD_CAPABILITIES: tuple[str, ...] = (
    "egress_allowlist",  # configure_network with a non-empty allowlist is enforced
    "secret_isolation",  # secret values reach only the workload, never artefacts
    "process_timeout",  # start_process honours timeout_seconds
    "cleanup",  # cleanup releases every resource of a session
    "detach",  # detach hands a session over under a ticket
    "reclaim",  # reclaim takes it back (keep or destroy), also from another process
    "audit_log",  # every operation is recorded (intent and result)
    "snapshots",  # sessions can be snapshotted and restored
    "mounts",  # resolve_mounts with volumes
    "ttl",  # sessions end after ttl_seconds
)

_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")
_HOST_RE = re.compile(r"[A-Za-z0-9*._:/\[\]-]{1,253}")

E = TypeVar("E", bound=enum.Enum)


# ----------------------------------------------------------------------------- helpers


R = TypeVar("R")


def expect_request(request: object, cls: type[R]) -> R:
    """``request`` if it is a ``cls``; for implementations. Raises InvalidSpec."""
    if not isinstance(request, cls):
        raise InvalidSpec(f"expected a {cls.__name__}, got {type(request).__name__}")
    return request


def unknown_ref(what: str, ident: str) -> NoReturn:
    """Raise InvalidSpec for an id this runtime never issued; for implementations."""
    raise InvalidSpec(f"unknown {what} {ident!r}: this runtime never issued it")


def check_session_state(session_id: str, state: SessionState,
                        allowed: Iterable[SessionState]) -> None:
    """The lifecycle rule for a known session, for implementations: return if ``state``
    is one of ``allowed``, else raise SandboxStateError saying why the call is refused
    (detached, cleaned up, planning over, no environment yet)."""
    if state in allowed:
        return
    if state is SessionState.DETACHED:
        raise SandboxStateError(
            f"session {session_id!r} is detached: reclaim it with its ticket first")
    if state is SessionState.CLEANED:
        raise SandboxStateError(f"session {session_id!r} was cleaned up")
    if state is SessionState.READY:
        raise SandboxStateError(
            f"session {session_id!r} already has its environment: planning is over")
    raise SandboxStateError(
        f"session {session_id!r} has no environment yet: call prepare_environment first")


def _bad(message: str) -> NoReturn:
    raise InvalidSpec(message)


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _check_id(what: str, value: object) -> str:
    if not isinstance(value, str):
        _bad(f"{what} must be a string id, got {type(value).__name__}")
    try:
        return validate_vm_id(value)
    except InvalidSpec as exc:
        raise InvalidSpec(f"{what}: {exc.message}") from None


def _check_text(what: str, value: object, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        _bad(f"{what} must be a string, got {type(value).__name__}")
    if not empty and not value.strip():
        _bad(f"{what} must not be empty")
    if len(value) > MAX_TEXT or "\x00" in value:
        _bad(f"{what} must be at most {MAX_TEXT} characters without NUL")
    return value


def _check_texts(what: str, values: Iterable[object], *, limit: int = MAX_ITEMS
                 ) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        _bad(f"{what} must be a list of strings, not a single string")
    out = tuple(_check_text(what, v, empty=False) for v in values)
    if len(out) > limit:
        _bad(f"{what} has {len(out)} entries; at most {limit} are allowed")
    return out


def _coerce(enum_cls: type[E], value: object, what: str) -> E:
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if value == member.value:
            return member
    choices = ", ".join(repr(m.value) for m in enum_cls)
    _bad(f"{what} must be one of {choices}, got {value!r}")


def _check_number(what: str, value: object, *, low: float, high: float,
                  optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _bad(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not low <= v <= high:
        _bad(f"{what} must be between {low:g} and {high:g}, got {value!r}")
    return v


def _check_int(what: str, value: object, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(f"{what} must be an integer, got {value!r}")
    if not low <= value <= high:
        _bad(f"{what} must be between {low} and {high}, got {value}")
    return value


def _check_bool(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        _bad(f"{what} must be True or False, got {value!r}")
    return value


def _check_env(what: str, env: object) -> Mapping[str, str]:
    if not isinstance(env, Mapping):
        _bad(f"{what} must map variable names to strings")
    total = 0
    out: dict[str, str] = {}
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_RE.fullmatch(k):
            _bad(f"{what}: invalid variable name {k!r}: use letters, digits and '_'")
        if not isinstance(v, str) or "\x00" in v:
            _bad(f"{what}: the value of {k} must be a string without NUL")
        total += len(k) + len(v.encode()) + 2
        out[k] = v
    if total > MAX_ENV_BYTES:
        _bad(f"{what} is {total} bytes; at most {MAX_ENV_BYTES} are allowed")
    return MappingProxyType(out)


def _check_optional_path(what: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _bad(f"{what} must be an absolute guest path")
    return check_guest_path(value)


def _same_session(session_id: str, what: str, ref: Any) -> None:
    if ref is not None and getattr(ref, "session_id", None) != session_id:
        _bad(f"{what} belongs to session {getattr(ref, 'session_id', None)!r},"
             f" not {session_id!r}")


# ----------------------------------------------------------------------------- enums


class SessionState(enum.Enum):
    """An isolation session's state (the lifecycle above): PREPARING (images, mounts,
    networks and secrets being planned) → READY (its environment prepared) → CLEANED,
    and DETACHED (handed over by ticket; a reclaim returns it to the state it had).
    Neither SandboxState nor VmState: a session exists before it has a sandbox or a VM,
    and a detached session comes back, which neither does."""

    PREPARING = "preparing"
    READY = "ready"
    DETACHED = "detached"
    CLEANED = "cleaned"


class HealthStatus(enum.Enum):
    """How usable this host is for the runtime."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"  # runs, but something listed in ``missing`` is absent
    UNSUPPORTED_HOST = "unsupported_host"  # cannot run sessions at all


class CleanupStatus(enum.Enum):
    COMPLETED = "completed"
    REPAIR_NEEDED = "repair_needed"  # something could not be released: see ``repairs``


class ProcessSignal(enum.Enum):
    """The control signals ``signal_process`` sends (Linux numbers in ``signum``)."""

    INTERRUPT = "interrupt"
    TERMINATE = "terminate"
    KILL = "kill"

    @property
    def signum(self) -> int:
        """The Linux signal number: SIGINT 2, SIGTERM 15, SIGKILL 9."""
        return {"interrupt": 2, "terminate": 15, "kill": 9}[self.value]


class SecretDelivery(enum.Enum):
    FILE = "file"  # a read-only file (default under /run/secrets/)
    ENV = "env"  # an environment variable of processes started in the environment


class NetworkMode(enum.Enum):
    NONE = "none"  # no network at all
    ALLOWLIST = "allowlist"  # egress only to the allowlisted destinations


class ReclaimAction(enum.Enum):
    KEEP = "keep"  # take the session over and go on using it
    DESTROY = "destroy"  # clean it up


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True, kw_only=True)
class IsolationRuntimeRef:
    """Names a runtime adapter (``name`` is an id such as ``qemu`` or ``fake``)."""

    name: str
    version: str = ""

    def __post_init__(self) -> None:
        _check_id("runtime name", self.name)
        _check_text("runtime version", self.version)

    @classmethod
    def of(cls, ref: IsolationRuntimeRef | str) -> IsolationRuntimeRef:
        """``ref`` itself, or a ref named ``ref``."""
        return ref if isinstance(ref, IsolationRuntimeRef) else cls(name=ref)


@dataclass(frozen=True, kw_only=True)
class Capability:
    """Whether a capability is supported here, and why (or why not)."""

    supported: bool
    reason: str

    def __post_init__(self) -> None:
        _check_bool("supported", self.supported)
        _check_text("capability reason", self.reason, empty=False)

    @classmethod
    def yes(cls, reason: str) -> Capability:
        return cls(supported=True, reason=reason)

    @classmethod
    def no(cls, reason: str) -> Capability:
        return cls(supported=False, reason=reason)


@dataclass(frozen=True, kw_only=True)
class IsolationCapabilityReport:
    """What the runtime can do on this host, reported honestly.

    ``missing`` is empty exactly when ``health`` is HEALTHY; ``supported_kinds``
    is empty only on an unsupported host; ``capabilities`` names at least every
    entry of ``STANDARD_CAPABILITIES``.
    """

    runtime: IsolationRuntimeRef
    health: HealthStatus
    missing: tuple[str, ...] = ()
    supported_kinds: tuple[str, ...] = ()
    capabilities: Mapping[str, Capability] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.runtime, IsolationRuntimeRef):
            _bad("runtime must be an IsolationRuntimeRef")
        health = _coerce(HealthStatus, self.health, "health")
        _set(self, "health", health)
        missing = _check_texts("missing", self.missing)
        _set(self, "missing", missing)
        if (health is HealthStatus.HEALTHY) != (not missing):
            _bad("a healthy report has nothing missing; a degraded or unsupported host"
                 " says what is missing")
        kinds = tuple(self.supported_kinds)
        for kind in kinds:
            if not isinstance(kind, str) or not _NAME_RE.fullmatch(kind):
                _bad(f"invalid session kind {kind!r}: use lower-case letters, digits and '_'")
        if len(set(kinds)) != len(kinds):
            _bad("supported_kinds lists a kind twice")
        if not kinds and health is not HealthStatus.UNSUPPORTED_HOST:
            _bad("a host that is not unsupported must support at least one session kind")
        _set(self, "supported_kinds", kinds)
        caps = self.capabilities
        if not isinstance(caps, Mapping):
            _bad("capabilities must map names to Capability values")
        for name, cap in caps.items():
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                _bad(f"invalid capability name {name!r}")
            if not isinstance(cap, Capability):
                _bad(f"capability {name!r} must be a Capability, got {type(cap).__name__}")
        absent = [n for n in STANDARD_CAPABILITIES if n not in caps]
        if absent:
            _bad(f"the report must say whether these are supported: {', '.join(absent)}")
        _set(self, "capabilities", MappingProxyType(dict(caps)))

    def supports(self, capability: str) -> bool:
        """True if ``capability`` is reported as supported."""
        cap = self.capabilities.get(capability)
        return cap is not None and cap.supported

    def require(self, capability: str) -> None:
        """Raise Unsupported (with the report's reason) unless ``capability`` is supported."""
        cap = self.capabilities.get(capability)
        if cap is None or not cap.supported:
            why = cap.reason if cap is not None else "not reported"
            raise Unsupported(f"{self.runtime.name} does not support {capability}: {why}")

    def require_kind(self, kind: str) -> None:
        """Raise Unsupported unless this host can run sessions of ``kind``."""
        if self.health is HealthStatus.UNSUPPORTED_HOST:
            raise Unsupported(f"{self.runtime.name} cannot run on this host; missing: "
                              + "; ".join(self.missing))
        if kind not in self.supported_kinds:
            raise Unsupported(f"{self.runtime.name} does not run {kind!r} sessions; supported:"
                              f" {', '.join(self.supported_kinds)}")


# ----------------------------------------------------------------------------- session


@dataclass(frozen=True, kw_only=True)
class SessionPrepareRequest:
    """Ask for a new isolation session (a sandbox). ``sandbox_id`` None: the runtime picks.

    ``ttl_seconds`` is the session's lifetime (None: until cleaned up).
    """

    kind: str = KIND_MICROVM
    sandbox_id: str | None = None
    memory_mib: int = 256
    vcpus: int = 1
    ttl_seconds: float | None = DEFAULT_TTL_SECONDS

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _NAME_RE.fullmatch(self.kind):
            _bad(f"invalid session kind {self.kind!r}")
        if self.sandbox_id is not None:
            _check_id("sandbox_id", self.sandbox_id)
        _check_int("memory_mib", self.memory_mib, low=128, high=16384)
        _check_int("vcpus", self.vcpus, low=1, high=16)
        _set(self, "ttl_seconds", _check_number("ttl_seconds", self.ttl_seconds, low=1.0,
                                                high=MAX_TTL_SECONDS, optional=True))


@dataclass(frozen=True, kw_only=True)
class IsolationSessionRef:
    """A prepared session. ``session_id`` is also the sandbox id."""

    session_id: str
    kind: str
    runtime: IsolationRuntimeRef
    ttl_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        if not isinstance(self.kind, str) or not _NAME_RE.fullmatch(self.kind):
            _bad(f"invalid session kind {self.kind!r}")


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True, kw_only=True)
class ImageResolveRequest:
    """Resolve an image name (``base``, a store name, an ``oci:`` source) for a session."""

    session_id: str
    image: str

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        if (not isinstance(self.image, str) or not self.image or len(self.image) > 1024
                or any(c.isspace() or c == "\x00" for c in self.image)):
            _bad(f"invalid image name {self.image!r}")


@dataclass(frozen=True, kw_only=True)
class ImageResolution:
    """An image resolved by the adapter: ``resolved`` is its adapter reference."""

    session_id: str
    image: str
    resolved: str
    digest: str | None = None

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_text("image", self.image, empty=False)
        _check_text("resolved image", self.resolved, empty=False)
        if self.digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", self.digest):
            _bad(f"invalid image digest {self.digest!r}")


@dataclass(frozen=True, kw_only=True)
class RootfsPrepareRequest:
    """Materialise the root file system of ``image`` (a private, writable copy unless
    ``read_only``; ``disk_size_bytes`` None: the runtime's default)."""

    session_id: str
    image: ImageResolution
    read_only: bool = False
    disk_size_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        if not isinstance(self.image, ImageResolution):
            _bad("image must be the ImageResolution that resolve_image returned")
        _same_session(self.session_id, "image", self.image)
        _check_bool("read_only", self.read_only)
        if self.disk_size_bytes is not None:
            _check_int("disk_size_bytes", self.disk_size_bytes, low=1 << 20, high=1 << 42)


@dataclass(frozen=True, kw_only=True)
class RootfsRef:
    session_id: str
    rootfs_id: str
    image: str
    read_only: bool = False

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_id("rootfs_id", self.rootfs_id)


@dataclass(frozen=True, kw_only=True)
class MountSpec:
    """Mount the volume named ``volume`` at the absolute guest path ``target``."""

    volume: str
    target: str
    read_only: bool = False

    def __post_init__(self) -> None:
        _check_id("volume", self.volume)
        check_guest_path(self.target)
        if self.target.rstrip("/") == "":
            _bad("a volume cannot be mounted at /")
        _check_bool("read_only", self.read_only)


@dataclass(frozen=True, kw_only=True)
class MountResolveRequest:
    session_id: str
    mounts: Sequence[MountSpec] = ()

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        mounts = tuple(self.mounts)
        if len(mounts) > MAX_MOUNTS:
            _bad(f"at most {MAX_MOUNTS} mounts are allowed")
        if not all(isinstance(m, MountSpec) for m in mounts):
            _bad("mounts must be MountSpec values")
        targets = [m.target.rstrip("/") for m in mounts]
        if len(set(targets)) != len(targets):
            _bad("two mounts use the same target path")
        _set(self, "mounts", mounts)


@dataclass(frozen=True, kw_only=True)
class MountPlan:
    session_id: str
    plan_id: str
    mounts: tuple[MountSpec, ...] = ()

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_id("plan_id", self.plan_id)
        _set(self, "mounts", tuple(self.mounts))


@dataclass(frozen=True, kw_only=True)
class NetworkPrepareRequest:
    """Network for the session: none (empty allowlist) or egress to the allowlist only.

    Entries are host names, ``host:port``, IP addresses or CIDR ranges.
    """

    session_id: str
    egress_allowlist: Sequence[str] = ()

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        if isinstance(self.egress_allowlist, str):
            _bad("egress_allowlist must be a list of destinations, not one string")
        allow = tuple(self.egress_allowlist)
        if len(allow) > MAX_ALLOWLIST:
            _bad(f"at most {MAX_ALLOWLIST} allowlist entries are allowed")
        for entry in allow:
            if not isinstance(entry, str) or not _HOST_RE.fullmatch(entry):
                _bad(f"invalid egress allowlist entry {entry!r}")
        _set(self, "egress_allowlist", allow)

    @property
    def mode(self) -> NetworkMode:
        return NetworkMode.ALLOWLIST if self.egress_allowlist else NetworkMode.NONE


@dataclass(frozen=True, kw_only=True)
class NetworkNamespaceRef:
    session_id: str
    network_id: str
    mode: NetworkMode
    egress_allowlist: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_id("network_id", self.network_id)
        _set(self, "mode", _coerce(NetworkMode, self.mode, "mode"))
        _set(self, "egress_allowlist", tuple(self.egress_allowlist))


# ----------------------------------------------------------------------------- secrets


class SecretValue:
    """A secret's value. Its repr and str never show it; it cannot be pickled.

    Only ``reveal()`` gives the bytes, for the code that delivers them.
    """

    __slots__ = ("_value",)
    _value: bytes

    def __init__(self, value: str | bytes) -> None:
        if isinstance(value, str):
            data = value.encode()
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        else:
            raise InvalidSpec(f"a secret value must be str or bytes, not {type(value).__name__}")
        if len(data) > MAX_SECRET_BYTES:
            raise InvalidSpec(f"a secret value is larger than {MAX_SECRET_BYTES} bytes")
        object.__setattr__(self, "_value", data)

    def reveal(self) -> bytes:
        """The secret's bytes: hand them only to what delivers the secret."""
        return self._value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SecretValue is immutable")

    def __repr__(self) -> str:
        return "SecretValue(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretValue):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    __hash__ = None  # type: ignore[assignment]

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("secret values cannot be pickled (they must not reach a journal)")

    def __copy__(self) -> SecretValue:
        return self

    def __deepcopy__(self, memo: Any) -> SecretValue:
        return self


@dataclass(frozen=True, kw_only=True)
class SecretSpec:
    """One secret to deliver: as a file at ``path`` (default ``/run/secrets/NAME``, mode
    0400) or as the variable ``env_name`` (default ``NAME`` upper-cased) of processes."""

    name: str
    value: SecretValue = field(repr=False)
    delivery: SecretDelivery = SecretDelivery.FILE
    path: str | None = None
    env_name: str | None = None

    def __post_init__(self) -> None:
        _check_id("secret name", self.name)
        if not isinstance(self.value, SecretValue):
            _set(self, "value", SecretValue(self.value))
        delivery = _coerce(SecretDelivery, self.delivery, "delivery")
        _set(self, "delivery", delivery)
        if delivery is SecretDelivery.FILE:
            if self.env_name is not None:
                _bad(f"secret {self.name!r} is delivered as a file: give path, not env_name")
            path = self.path if self.path is not None else f"/run/secrets/{self.name}"
            check_guest_path(path)
            if path.endswith("/"):
                _bad(f"secret {self.name!r}: path {path!r} names a directory")
            _set(self, "path", path)
        else:
            if self.path is not None:
                _bad(f"secret {self.name!r} is delivered as env: give env_name, not path")
            env_name = self.env_name if self.env_name is not None else (
                re.sub(r"[^A-Za-z0-9_]", "_", self.name).upper())
            if not _ENV_RE.fullmatch(env_name):
                _bad(f"secret {self.name!r}: invalid env_name {env_name!r}")
            if b"\x00" in self.value.reveal():
                _bad(f"secret {self.name!r} contains a NUL byte and cannot be an env value")
            _set(self, "env_name", env_name)


@dataclass(frozen=True, kw_only=True)
class SecretPrepareRequest:
    session_id: str
    secrets: Sequence[SecretSpec] = ()

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        secrets = tuple(self.secrets)
        if len(secrets) > MAX_SECRETS:
            _bad(f"at most {MAX_SECRETS} secrets are allowed")
        if not all(isinstance(s, SecretSpec) for s in secrets):
            _bad("secrets must be SecretSpec values")
        for what, keys in (("name", [s.name for s in secrets]),
                           ("path", [s.path for s in secrets if s.path]),
                           ("env_name", [s.env_name for s in secrets if s.env_name])):
            if len(set(keys)) != len(keys):
                _bad(f"two secrets use the same {what}")
        _set(self, "secrets", secrets)


@dataclass(frozen=True, kw_only=True)
class SecretRef:
    """Where a secret is delivered. Holds no value, so it can never show one."""

    name: str
    delivery: SecretDelivery
    path: str | None = None
    env_name: str | None = None

    def __post_init__(self) -> None:
        _check_id("secret name", self.name)
        delivery = _coerce(SecretDelivery, self.delivery, "delivery")
        _set(self, "delivery", delivery)
        if (delivery is SecretDelivery.FILE) != (self.path is not None) or (
                (delivery is SecretDelivery.ENV) != (self.env_name is not None)):
            _bad(f"secret ref {self.name!r}: a file has a path, an env secret an env_name")

    @classmethod
    def of(cls, spec: SecretSpec) -> SecretRef:
        """The reference for ``spec`` (everything but its value)."""
        return cls(name=spec.name, delivery=spec.delivery, path=spec.path,
                   env_name=spec.env_name)


@dataclass(frozen=True, kw_only=True)
class SecretMaterializationPlan:
    """The secrets prepared for a session, as references only."""

    session_id: str
    plan_id: str
    secrets: tuple[SecretRef, ...] = ()

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_id("plan_id", self.plan_id)
        secrets = tuple(self.secrets)
        if not all(isinstance(s, SecretRef) for s in secrets):
            _bad("a secret plan holds SecretRef values only")
        _set(self, "secrets", secrets)


# ----------------------------------------------------------------------------- environment


@dataclass(frozen=True, kw_only=True)
class EnvironmentPrepareRequest:
    """Combine a rootfs (required) with optional mounts, network and secrets, plus the
    default ``env``, ``workdir`` and ``user`` of processes, into one environment."""

    session_id: str
    rootfs: RootfsRef
    mounts: MountPlan | None = None
    network: NetworkNamespaceRef | None = None
    secrets: SecretMaterializationPlan | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        for what, ref, cls in (("rootfs", self.rootfs, RootfsRef),
                               ("mounts", self.mounts, MountPlan),
                               ("network", self.network, NetworkNamespaceRef),
                               ("secrets", self.secrets, SecretMaterializationPlan)):
            if ref is not None and not isinstance(ref, cls):
                _bad(f"{what} must be the {cls.__name__} the runtime returned")
            _same_session(self.session_id, what, ref)
        if self.rootfs is None:
            _bad("an environment needs a rootfs: call prepare_rootfs first")
        _set(self, "env", _check_env("env", self.env))
        _set(self, "workdir", _check_optional_path("workdir", self.workdir))
        if self.user is not None:
            _check_text("user", self.user, empty=False)


@dataclass(frozen=True, kw_only=True)
class PreparedEnvironmentRef:
    session_id: str
    environment_id: str

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_id("environment_id", self.environment_id)


def check_environment_refs(request: EnvironmentPrepareRequest, *,
                           mounts: Mapping[str, MountPlan],
                           networks: Mapping[str, NetworkNamespaceRef],
                           secret_plans: Mapping[str, tuple[SecretSpec, ...]]
                           ) -> tuple[SecretSpec, ...]:
    """For implementations of ``prepare_environment``: check that the request's mount
    plan, network and secret plan (each optional) are ones issued to its session, given
    what the session was issued (by id); return the secrets of its plan (() without
    one). Raises InvalidSpec (``unknown_ref``) for one it was not issued."""
    if request.mounts is not None and mounts.get(request.mounts.plan_id) != request.mounts:
        unknown_ref("mount plan", request.mounts.plan_id)
    if request.network is not None and (
            networks.get(request.network.network_id) != request.network):
        unknown_ref("network", request.network.network_id)
    if request.secrets is None:
        return ()
    if request.secrets.plan_id not in secret_plans:
        unknown_ref("secret plan", request.secrets.plan_id)
    return secret_plans[request.secrets.plan_id]


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True, kw_only=True)
class ProcessStartRequest:
    """Start ``argv`` in a prepared environment.

    ``env`` adds to (and overrides) the environment's variables; env-delivered
    secrets are added too (a clash with them is InvalidSpec). ``timeout_seconds``
    kills the process (SIGKILL, ``timed_out``) when it runs longer. Without
    ``stdin_open`` the process's stdin is at end-of-file from the start.
    """

    environment: PreparedEnvironmentRef
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    timeout_seconds: float | None = None
    stdin_open: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.environment, PreparedEnvironmentRef):
            _bad("environment must be the PreparedEnvironmentRef prepare_environment returned")
        if isinstance(self.argv, str):
            _bad("argv must be a list of strings, e.g. ['sh', '-c', 'echo hi']")
        argv = tuple(self.argv)
        if not argv:
            _bad("argv must name a program")
        size = 0
        for arg in argv:
            if not isinstance(arg, str) or "\x00" in arg:
                _bad("every argv entry must be a string without NUL")
            size += len(arg.encode()) + 1
        if size > MAX_ARGV_BYTES:
            _bad(f"argv is {size} bytes; at most {MAX_ARGV_BYTES} are allowed")
        _set(self, "argv", argv)
        _set(self, "env", _check_env("env", self.env))
        _set(self, "cwd", _check_optional_path("cwd", self.cwd))
        if self.user is not None:
            _check_text("user", self.user, empty=False)
        _set(self, "timeout_seconds",
             _check_number("timeout_seconds", self.timeout_seconds, low=0.001,
                           high=MAX_PROCESS_TIMEOUT_SECONDS, optional=True))
        _check_bool("stdin_open", self.stdin_open)

    @property
    def session_id(self) -> str:
        return self.environment.session_id


@dataclass(frozen=True, kw_only=True)
class ProcessStartResult:
    """A started process. ``pid`` is its id inside the isolation, if known."""

    process_id: str
    session_id: str
    environment_id: str
    pid: int | None = None

    def __post_init__(self) -> None:
        _check_id("process_id", self.process_id)
        _check_id("session_id", self.session_id)
        _check_id("environment_id", self.environment_id)
        if self.pid is not None:
            _check_int("pid", self.pid, low=1, high=(1 << 31) - 1)


@dataclass(frozen=True, kw_only=True)
class ProcessIoRequest:
    """One I/O exchange: write ``stdin`` (and maybe close it), then read up to
    ``max_bytes`` of output, waiting up to ``wait_seconds`` for some to arrive."""

    process_id: str
    stdin: bytes = b""
    close_stdin: bool = False
    max_bytes: int = MAX_IO_FRAME
    wait_seconds: float = DEFAULT_IO_WAIT_SECONDS

    def __post_init__(self) -> None:
        _check_id("process_id", self.process_id)
        if not isinstance(self.stdin, (bytes, bytearray, memoryview)):
            _bad("stdin must be bytes")
        _set(self, "stdin", bytes(self.stdin))
        if len(self.stdin) > MAX_IO_FRAME:
            _bad(f"stdin frames are at most {MAX_IO_FRAME} bytes")
        _check_bool("close_stdin", self.close_stdin)
        _check_int("max_bytes", self.max_bytes, low=1, high=MAX_IO_FRAME)
        _set(self, "wait_seconds", _check_number("wait_seconds", self.wait_seconds, low=0.0,
                                                 high=MAX_IO_WAIT_SECONDS))


@dataclass(frozen=True, kw_only=True)
class ProcessIoFrame:
    """A bounded slice of a process's output (stdout + stderr <= ``MAX_IO_FRAME`` bytes).

    ``finished`` is set once the process has exited and all its output has been
    returned; then ``exit_code`` (128 + signal for a signal), ``signal`` and
    ``timed_out`` describe how it ended.
    """

    process_id: str
    sequence: int
    stdout: bytes = b""
    stderr: bytes = b""
    finished: bool = False
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False

    def __post_init__(self) -> None:
        _check_id("process_id", self.process_id)
        _check_int("sequence", self.sequence, low=0, high=1 << 62)
        if not isinstance(self.stdout, bytes) or not isinstance(self.stderr, bytes):
            _bad("frame data must be bytes")
        if len(self.stdout) + len(self.stderr) > MAX_IO_FRAME:
            _bad(f"an I/O frame carries at most {MAX_IO_FRAME} bytes")
        _check_bool("finished", self.finished)
        _check_bool("timed_out", self.timed_out)
        if self.finished:
            if self.exit_code is None:
                _bad("a finished frame carries the exit code")
            _check_int("exit_code", self.exit_code, low=0, high=255)
            if self.signal is not None:
                _check_int("signal", self.signal, low=1, high=64)
        elif self.exit_code is not None or self.signal is not None or self.timed_out:
            _bad("only a finished frame carries an exit status")

    @property
    def size(self) -> int:
        return len(self.stdout) + len(self.stderr)


@dataclass(frozen=True, kw_only=True)
class ProcessSignalRequest:
    """Send ``signal``; unless it is KILL, SIGKILL the process if it still runs
    ``grace_seconds`` later (None: never escalate)."""

    process_id: str
    signal: ProcessSignal
    grace_seconds: float | None = DEFAULT_GRACE_SECONDS

    def __post_init__(self) -> None:
        _check_id("process_id", self.process_id)
        _set(self, "signal", _coerce(ProcessSignal, self.signal, "signal"))
        _set(self, "grace_seconds", _check_number("grace_seconds", self.grace_seconds,
                                                  low=0.0, high=MAX_GRACE_SECONDS,
                                                  optional=True))


@dataclass(frozen=True, kw_only=True)
class ProcessSignalResult:
    """``delivered`` False: the process had already exited. ``exited``: it was seen
    exited when the call returned (its status comes from ``stream_io``)."""

    process_id: str
    signal: ProcessSignal
    delivered: bool
    exited: bool

    def __post_init__(self) -> None:
        _check_id("process_id", self.process_id)
        _set(self, "signal", _coerce(ProcessSignal, self.signal, "signal"))
        _check_bool("delivered", self.delivered)
        _check_bool("exited", self.exited)


@dataclass(frozen=True, kw_only=True)
class ProcessStatsRequest:
    process_id: str

    def __post_init__(self) -> None:
        _check_id("process_id", self.process_id)


@dataclass(frozen=True, kw_only=True)
class ProcessStatsSnapshot:
    """Bounded metadata about a process (never its output).

    ``process_count`` counts the process and its descendants: at least 1 while
    running, 0 once exited. ``memory_bytes`` is resident memory now.
    """

    process_id: str
    running: bool
    cpu_time_seconds: float
    memory_bytes: int
    process_count: int
    wall_time_seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_id("process_id", self.process_id)
        _check_bool("running", self.running)
        _set(self, "cpu_time_seconds", _check_number(
            "cpu_time_seconds", self.cpu_time_seconds, low=0.0, high=MAX_STATS_CPU_SECONDS))
        _set(self, "wall_time_seconds", _check_number(
            "wall_time_seconds", self.wall_time_seconds, low=0.0, high=MAX_STATS_CPU_SECONDS))
        _check_int("memory_bytes", self.memory_bytes, low=0, high=MAX_STATS_MEMORY_BYTES)
        low = 1 if self.running else 0
        high = MAX_STATS_PROCESSES if self.running else 0
        _check_int("process_count", self.process_count, low=low, high=high)


# ----------------------------------------------------------------------------- cleanup, tickets


@dataclass(frozen=True, kw_only=True)
class CleanupRequest:
    session_id: str

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)


@dataclass(frozen=True, kw_only=True)
class CleanupResult:
    """How cleanup went: COMPLETED (``repairs`` empty) or REPAIR_NEEDED (``repairs``
    says what is left to fix). ``released`` names what was released."""

    session_id: str
    status: CleanupStatus
    repairs: tuple[str, ...] = ()
    released: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        status = _coerce(CleanupStatus, self.status, "status")
        _set(self, "status", status)
        repairs = _check_texts("repairs", self.repairs)
        _set(self, "repairs", repairs)
        _set(self, "released", _check_texts("released", self.released, limit=10 * MAX_ITEMS))
        if (status is CleanupStatus.REPAIR_NEEDED) != bool(repairs):
            _bad("repair_needed says what needs repair; completed has nothing to repair")


class ReclaimTicket:
    """The bearer ticket that hands a detached session over: ``sandbox_id`` + an
    unguessable ``token``. Its repr hides the token; ``encode()`` gives the text to
    pass to another process and ``decode()`` reads it back."""

    __slots__ = ("sandbox_id", "token")
    sandbox_id: str
    token: str

    def __init__(self, *, sandbox_id: str, token: str) -> None:
        _check_id("sandbox_id", sandbox_id)
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            _bad("a reclaim ticket token is 32-128 URL-safe characters")
        object.__setattr__(self, "sandbox_id", sandbox_id)
        object.__setattr__(self, "token", token)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ReclaimTicket is immutable")

    def __repr__(self) -> str:
        return f"ReclaimTicket(sandbox_id={self.sandbox_id!r}, token=<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReclaimTicket):
            return NotImplemented
        return self.sandbox_id == other.sandbox_id and hmac.compare_digest(
            self.token, other.token)

    def __hash__(self) -> int:
        return hash((self.sandbox_id, self.token))

    def encode(self) -> str:
        """``SANDBOX_ID:TOKEN``: the ticket as text (it is a credential: keep it private)."""
        return f"{self.sandbox_id}:{self.token}"

    @classmethod
    def decode(cls, text: str) -> ReclaimTicket:
        """Parse ``encode()``'s text. Raises InvalidSpec."""
        if not isinstance(text, str) or text.count(":") != 1:
            _bad("a reclaim ticket looks like SANDBOX_ID:TOKEN")
        sandbox_id, token = text.split(":")
        return cls(sandbox_id=sandbox_id, token=token)


@dataclass(frozen=True, kw_only=True)
class DetachTransferRequest:
    """Hand the session over: it keeps running, owned by whoever holds the ticket."""

    session_id: str
    reason: str = ""

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_text("reason", self.reason)


@dataclass(frozen=True, kw_only=True)
class DetachTransferResult:
    session_id: str
    ticket: ReclaimTicket

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        if not isinstance(self.ticket, ReclaimTicket) or self.ticket.sandbox_id != self.session_id:
            _bad("a detach result carries the session's ReclaimTicket")


@dataclass(frozen=True, kw_only=True)
class ReclaimRequest:
    ticket: ReclaimTicket
    action: ReclaimAction = ReclaimAction.KEEP

    def __post_init__(self) -> None:
        if not isinstance(self.ticket, ReclaimTicket):
            _bad("ticket must be a ReclaimTicket (ReclaimTicket.decode parses its text)")
        _set(self, "action", _coerce(ReclaimAction, self.action, "action"))


@dataclass(frozen=True, kw_only=True)
class ReclaimResult:
    """The reclaimed session. KEEP: ``environment`` (if one was prepared) is usable
    again. DESTROY: ``cleanup`` says how its cleanup went."""

    session: IsolationSessionRef
    action: ReclaimAction
    environment: PreparedEnvironmentRef | None = None
    cleanup: CleanupResult | None = None

    def __post_init__(self) -> None:
        action = _coerce(ReclaimAction, self.action, "action")
        _set(self, "action", action)
        if (action is ReclaimAction.DESTROY) != (self.cleanup is not None):
            _bad("a destroy reclaim carries its cleanup result; a keep reclaim none")


# ----------------------------------------------------------------------------- the port


@runtime_checkable
class IsolationRuntime(Protocol):
    """Prepares isolated environments and runs processes in them (seed 003).

    The lifecycle rules are in this module's docstring. Every method may also
    raise other SandvmError subclasses for failures of the adapter itself
    (VmError, AgentError, AssetMissing, ...).
    """

    def runtime_ref(self) -> IsolationRuntimeRef:
        """Which adapter this is. Pure: no I/O, allowed at any time."""
        ...

    async def capability_report(self) -> IsolationCapabilityReport:
        """Health, missing pieces, session kinds and capabilities of this host.
        Allowed at any time; starts nothing."""
        ...

    async def prepare_session(self, request: SessionPrepareRequest) -> IsolationSessionRef:
        """Allocate a session (PREPARING). Starts no process. Raises Unsupported
        (unsupported host or kind), InvalidSpec (``sandbox_id`` in use)."""
        ...

    async def resolve_image(self, request: ImageResolveRequest) -> ImageResolution:
        """Resolve an image for a PREPARING session. Raises UnknownImage or
        ImageNotFound, InvalidSpec (unknown session), SandboxStateError."""
        ...

    async def prepare_rootfs(self, request: RootfsPrepareRequest) -> RootfsRef:
        """Materialise the image's root file system (PREPARING only; may touch
        host storage). Raises InvalidSpec, SandboxStateError, ImageError."""
        ...

    async def resolve_mounts(self, request: MountResolveRequest) -> MountPlan:
        """Plan volume mounts (PREPARING only). Raises Unsupported (mounts),
        VolumeNotFound, InvalidSpec, SandboxStateError."""
        ...

    async def configure_network(self, request: NetworkPrepareRequest) -> NetworkNamespaceRef:
        """Set up no network or an egress allowlist (PREPARING only). Raises
        Unsupported (egress_allowlist), InvalidSpec, SandboxStateError."""
        ...

    async def prepare_secrets(self, request: SecretPrepareRequest) -> SecretMaterializationPlan:
        """Take secret values for delivery and return references only (PREPARING
        only). Raises InvalidSpec, SandboxStateError; messages never hold a value."""
        ...

    async def prepare_environment(
        self, request: EnvironmentPrepareRequest
    ) -> PreparedEnvironmentRef:
        """Combine the prepared pieces into the session's one environment
        (PREPARING → READY). Starts no workload. Raises InvalidSpec (refs not
        issued for this session), SandboxStateError (not PREPARING)."""
        ...

    async def start_process(self, request: ProcessStartRequest) -> ProcessStartResult:
        """Start a workload process: the only operation that does (READY only).
        Raises SandboxStateError (no environment yet, detached, cleaned),
        InvalidSpec (unknown environment), Unsupported (process_timeout)."""
        ...

    async def stream_io(self, request: ProcessIoRequest) -> ProcessIoFrame:
        """Exchange one bounded I/O frame with a process (READY only). Raises
        InvalidSpec (unknown process), SandboxStateError (stdin not open, session
        detached or cleaned)."""
        ...

    async def signal_process(self, request: ProcessSignalRequest) -> ProcessSignalResult:
        """Signal a started process, escalating to SIGKILL after the grace period
        (READY only). Raises InvalidSpec (unknown process), SandboxStateError."""
        ...

    async def collect_stats(self, request: ProcessStatsRequest) -> ProcessStatsSnapshot:
        """Bounded metadata of a started process (READY only). Raises InvalidSpec
        (unknown process), SandboxStateError."""
        ...

    async def cleanup(self, request: CleanupRequest) -> CleanupResult:
        """Kill the session's processes and release everything it holds (→ CLEANED).
        Idempotent: a cleaned session returns the same result. Raises InvalidSpec
        (unknown session), SandboxStateError (detached: reclaim it instead)."""
        ...

    async def detach(self, request: DetachTransferRequest) -> DetachTransferResult:
        """Hand a PREPARING or READY session over under a new ticket (→ DETACHED);
        its processes keep running. Raises Unsupported (detach), InvalidSpec,
        SandboxStateError."""
        ...

    async def reclaim(self, request: ReclaimRequest) -> ReclaimResult:
        """Take a DETACHED session back by its ticket: KEEP (usable again) or
        DESTROY (cleaned up). Raises Unsupported (reclaim), InvalidSpec (a ticket
        never issued), SandboxStateError (a ticket already used)."""
        ...

