"""sandvm's one exception tree.

Every public error derives from :class:`SandvmError` and carries a stable
``code`` (a short snake_case string) that the CLI prints and the HTTP server
will return, so callers can match on it across versions::

    SandvmError (sandvm_error)
    ├── ConfigError (invalid_config)            bad input: what to change is in the message
    │   ├── InvalidSpec (invalid_spec)
    │   │   └── UnknownImage (unknown_image)
    │   └── InvalidPath (invalid_path)
    ├── SetupError (setup_failed)               `sandvm setup` step failed
    ├── AssetMissing (asset_missing)            kernel/initramfs/QEMU absent: run `sandvm setup`
    ├── ProviderError (provider_error)          seed 000's VM lifecycle errors
    │   ├── VmAlreadyExists (vm_already_exists)
    │   ├── VmNotFound (vm_not_found)
    │   ├── InvalidTransition (invalid_transition)
    │   ├── SnapshotAlreadyExists (snapshot_already_exists)
    │   └── Unsupported (unsupported)
    ├── VmError (vm_error)                      the hypervisor side
    │   ├── VmBootError (vm_boot_failed)
    │   ├── VmCrashed (vm_crashed)
    │   └── QmpError (qmp_error)
    ├── SnapshotError (snapshot_error)
    │   ├── SnapshotNotFound (snapshot_not_found)
    │   ├── SnapshotCorrupt (snapshot_corrupt)          truncated, altered, not a snapshot
    │   ├── SnapshotInUse (snapshot_in_use)             a pool restores from it
    │   └── SnapshotIncompatible (snapshot_incompatible) other QEMU/format/accelerator
    ├── ImageError (image_error)                images, layers, registries, volumes
    │   ├── ImageNotFound (image_not_found)     no such image, tag or blob
    │   ├── ImageInvalid (image_invalid)        a manifest, config or layer that is wrong or unsafe
    │   ├── ImageTooLarge (image_too_large)     a caps (bytes, entries) exceeded: tar bombs
    │   ├── DigestMismatch (digest_mismatch)    content does not match its digest or size
    │   ├── RegistryError (registry_error)      HTTP/auth failures talking to a registry
    │   ├── VolumeNotFound (volume_not_found)
    │   ├── VolumeExists (volume_exists)
    │   └── VolumeInUse (volume_in_use)         a second read-write attach
    ├── PoolError (pool_error)
    │   ├── PoolExhausted (pool_exhausted)      no VM became ready within the timeout
    │   ├── PoolClosed (pool_closed)
    │   ├── PoolNotFound (pool_not_found)       no pool of that name (on a server: of the tenant)
    │   └── PoolExists (pool_exists)
    ├── AgentError (agent_error)                the guest agent side
    │   ├── AgentProtocolError (agent_protocol_error)   the guest sent garbage
    │   │   └── AgentVersionMismatch (agent_version_mismatch)  another sandvm's agent
    │   ├── AgentTimeout (agent_timeout)
    │   ├── AgentDisconnected (agent_disconnected)
    │   └── GuestError (guest_error)            an operation failed inside the guest
    │       ├── GuestFileNotFound (file_not_found)
    │       ├── GuestFileExists (file_exists)
    │       ├── GuestPermissionDenied (permission_denied)
    │       └── FileTooLarge (file_too_large)
    ├── CommandError (command_error)
    │   ├── CommandExitError (command_exit)     non-zero exit; carries the result
    │   ├── CommandTimeout (command_timeout)
    │   └── CommandNotFound (command_not_found)
    ├── PortError (port_error)                  port exposure and TCP tunnels into the guest
    │   ├── PortInUse (port_in_use)             the host address is taken
    │   ├── PortRefused (port_refused)          nothing accepts on the guest port
    │   ├── PortReset (port_reset)              a tunneled connection was reset
    │   └── PortTimeout (port_timeout)          ports.wait, a connect or a read ran out of time
    ├── SandboxStateError (sandbox_state)       operation not allowed in this state
    │   └── SandboxBusy (sandbox_busy)          another process holds the managed sandbox
    ├── ResourceExhausted (resource_exhausted)  the process's open-file budget is used up (HTTP 503)
    └── ServiceError (service_error)            the HTTP server (`sandvm serve`) and its clients
        ├── Unauthenticated (unauthenticated)   no API key, or not a valid one (HTTP 401)
        ├── QuotaExceeded (quota_exceeded)      the tenant's quota is used up (HTTP 429)
        │   └── RateLimited (rate_limited)      too many requests: wait Retry-After seconds
        ├── UnknownCommand (unknown_command)    no background command of that id
        ├── RequestTooLarge (request_too_large) body or headers over the server's caps
        └── ServerUnreachable (server_unreachable)  the client cannot reach the server

PortRefused, PortReset and PortTimeout are also the builtin ConnectionRefusedError,
ConnectionResetError and TimeoutError, so code written for sockets catches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from sandvm.values import CommandResult, VmState

__all__ = [
    "AgentDisconnected",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "AgentVersionMismatch",
    "AssetMissing",
    "CommandError",
    "CommandExitError",
    "CommandNotFound",
    "CommandTimeout",
    "ConfigError",
    "DigestMismatch",
    "FileTooLarge",
    "GuestError",
    "GuestFileExists",
    "GuestFileNotFound",
    "GuestPermissionDenied",
    "ImageError",
    "ImageInvalid",
    "ImageNotFound",
    "ImageTooLarge",
    "InvalidPath",
    "InvalidSpec",
    "InvalidTransition",
    "PoolClosed",
    "PoolError",
    "PoolExhausted",
    "PoolExists",
    "PoolNotFound",
    "PortError",
    "PortInUse",
    "PortRefused",
    "PortReset",
    "PortTimeout",
    "ProviderError",
    "QmpError",
    "QuotaExceeded",
    "RateLimited",
    "RegistryError",
    "RequestTooLarge",
    "ResourceExhausted",
    "SandboxBusy",
    "SandboxStateError",
    "SandvmError",
    "ServerUnreachable",
    "ServiceError",
    "SetupError",
    "SnapshotAlreadyExists",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotInUse",
    "SnapshotIncompatible",
    "SnapshotNotFound",
    "Unauthenticated",
    "UnknownCommand",
    "UnknownImage",
    "Unsupported",
    "VmAlreadyExists",
    "VmBootError",
    "VmCrashed",
    "VmError",
    "VmNotFound",
    "VolumeExists",
    "VolumeInUse",
    "VolumeNotFound",
    "error_class_for_code",
    "error_from_dict",
]


class SandvmError(Exception):
    """Root of every sandvm error; ``code`` is stable across versions."""

    code: ClassVar[str] = "sandvm_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON object the CLI and server emit."""
        return {"code": self.code, "message": self.message}


class ConfigError(SandvmError):
    """Bad input from the caller; the message says what to change."""

    code = "invalid_config"


class InvalidSpec(ConfigError):
    code = "invalid_spec"


class InvalidPath(ConfigError):
    code = "invalid_path"


class UnknownImage(InvalidSpec):
    code = "unknown_image"


class SetupError(SandvmError):
    """A `sandvm setup` step failed; ``step`` names it."""

    code = "setup_failed"

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"setup step {step!r} failed: {message}")
        self.step = step


class AssetMissing(SandvmError):
    """A guest asset (kernel, initramfs) or QEMU itself is not installed."""

    code = "asset_missing"


class ProviderError(SandvmError):
    code = "provider_error"


class VmAlreadyExists(ProviderError):
    code = "vm_already_exists"

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"a VM with id {vm_id!r} already exists; choose another id")
        self.vm_id = vm_id


class VmNotFound(ProviderError):
    code = "vm_not_found"

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"no VM with id {vm_id!r}")
        self.vm_id = vm_id


class InvalidTransition(ProviderError):
    """A lifecycle call that the VM's current state does not allow."""

    code = "invalid_transition"

    def __init__(self, from_state: VmState, to_state: VmState, *, vm_id: str = "") -> None:
        where = f"VM {vm_id!r}: " if vm_id else ""
        super().__init__(
            f"{where}cannot go from {from_state.value} to {to_state.value}"
        )
        self.from_state = from_state
        self.to_state = to_state
        self.vm_id = vm_id


class SnapshotAlreadyExists(ProviderError):
    code = "snapshot_already_exists"

    def __init__(self, vm_id: str, snapshot_id: str) -> None:
        if vm_id:
            msg = f"VM {vm_id!r} already has a snapshot named {snapshot_id!r}; choose another name"
        else:
            msg = (f"a snapshot named {snapshot_id!r} already exists: choose another name or"
                   f" remove it (`sandvm snapshot rm {snapshot_id}`)")
        super().__init__(msg)
        self.vm_id = vm_id
        self.snapshot_id = snapshot_id


class Unsupported(ProviderError):
    code = "unsupported"


class VmError(SandvmError):
    code = "vm_error"


class VmBootError(VmError):
    code = "vm_boot_failed"


class VmCrashed(VmError):
    code = "vm_crashed"


class QmpError(VmError):
    code = "qmp_error"


class SnapshotError(SandvmError):
    code = "snapshot_error"


class SnapshotNotFound(SnapshotError):
    code = "snapshot_not_found"


class SnapshotCorrupt(SnapshotError):
    """The snapshot is damaged (sizes or checksums differ, files missing): never restored."""

    code = "snapshot_corrupt"


class SnapshotInUse(SnapshotError):
    """The snapshot cannot be removed: a pool restores from it."""

    code = "snapshot_in_use"


class SnapshotIncompatible(SnapshotError):
    """The snapshot was made by another format version, QEMU or accelerator."""

    code = "snapshot_incompatible"


class ImageError(SandvmError):
    """Images, their layers and registries, and volumes."""

    code = "image_error"


class ImageNotFound(ImageError):
    """No such image, tag, manifest or blob (locally or in the registry)."""

    code = "image_not_found"


class ImageInvalid(ImageError):
    """A manifest, config or layer that is malformed, unsupported or unsafe."""

    code = "image_invalid"


class ImageTooLarge(ImageError):
    """A size or entry-count cap was exceeded (tar bombs, oversized manifests)."""

    code = "image_too_large"


class DigestMismatch(ImageError):
    """Content does not match its declared digest or size."""

    code = "digest_mismatch"


class RegistryError(ImageError):
    """An OCI registry refused or failed a request (auth, HTTP status, transport)."""

    code = "registry_error"


class VolumeNotFound(ImageError):
    code = "volume_not_found"


class VolumeExists(ImageError):
    code = "volume_exists"


class VolumeInUse(ImageError):
    """The volume is already attached read-write to another sandbox."""

    code = "volume_in_use"


class PoolError(SandvmError):
    code = "pool_error"


class PoolExhausted(PoolError):
    code = "pool_exhausted"


class PoolClosed(PoolError):
    code = "pool_closed"


class PoolNotFound(PoolError):
    """No pool of that name (on a sandvm server: none of this key's tenant)."""

    code = "pool_not_found"


class PoolExists(PoolError):
    """A pool of that name exists already."""

    code = "pool_exists"


class AgentError(SandvmError):
    code = "agent_error"


class AgentProtocolError(AgentError):
    """The guest sent something that is not valid protocol: the channel is closed."""

    code = "agent_protocol_error"


class AgentVersionMismatch(AgentProtocolError):
    """The guest agent speaks another protocol version or lacks a feature this host needs
    (guest assets of another sandvm build, or an old snapshot): rebuild with `sandvm setup`."""

    code = "agent_version_mismatch"


class AgentTimeout(AgentError):
    code = "agent_timeout"


class AgentDisconnected(AgentError):
    code = "agent_disconnected"


class GuestError(AgentError):
    """An operation failed inside the guest (the guest's own error message)."""

    code = "guest_error"


class GuestFileNotFound(GuestError):
    code = "file_not_found"


class GuestFileExists(GuestError):
    code = "file_exists"


class GuestPermissionDenied(GuestError):
    code = "permission_denied"


class FileTooLarge(GuestError):
    code = "file_too_large"


class CommandError(SandvmError):
    code = "command_error"


class CommandExitError(CommandError):
    """The command exited non-zero (or by a signal); ``result`` holds everything."""

    code = "command_exit"

    def __init__(self, result: CommandResult) -> None:
        how = (
            f"was killed by signal {result.signal}"
            if result.signal is not None
            else f"exited with code {result.exit_code}"
        )
        tail = result.stderr.strip()[-500:]
        super().__init__(f"command {how}" + (f": {tail}" if tail else ""))
        self.result = result

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def stdout(self) -> str:
        return self.result.stdout

    @property
    def stderr(self) -> str:
        return self.result.stderr


class CommandTimeout(CommandError):
    """The command ran past its timeout; its processes were killed. ``result`` if known."""

    code = "command_timeout"

    def __init__(self, message: str, *, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class CommandNotFound(CommandError):
    code = "command_not_found"


class PortError(SandvmError):
    """Port exposure: host listeners and TCP tunnels to guest ports."""

    code = "port_error"


class PortInUse(PortError):
    """The host address and port to listen on are taken (or not allowed)."""

    code = "port_in_use"


class PortRefused(PortError, ConnectionRefusedError):
    """Nothing accepts connections on that guest port (the guest's ECONNREFUSED)."""

    code = "port_refused"


class PortReset(PortError, ConnectionResetError):
    """The tunneled connection was reset by the guest's server or the tunnel broke."""

    code = "port_reset"


class PortTimeout(PortError, TimeoutError):
    """Nothing listened in time (``ports.wait``), or a tunnel connect or read timed out."""

    code = "port_timeout"


class SandboxStateError(SandvmError):
    code = "sandbox_state"


class SandboxBusy(SandboxStateError):
    """A managed sandbox is attached by another process (one holder at a time)."""

    code = "sandbox_busy"


class ResourceExhausted(SandvmError):
    """A host resource guest-driven work takes (the process's file descriptors: egress
    connections, tunnels, listeners) is used up, process-wide or for this sandbox; the
    message says which and what to close or raise (``ulimit -n``). HTTP 503."""

    code = "resource_exhausted"
    http_status: ClassVar[int] = 503


class ServiceError(SandvmError):
    """The HTTP server (`sandvm serve`) refused a request, or could not be reached."""

    code = "service_error"


class Unauthenticated(ServiceError):
    """No API key, a malformed one, or one that is unknown or revoked (HTTP 401)."""

    code = "unauthenticated"


class QuotaExceeded(ServiceError):
    """The tenant already uses everything its quota allows (HTTP 429): kill a sandbox."""

    code = "quota_exceeded"


class RateLimited(QuotaExceeded):
    """The tenant sent more requests than the server's rate limit allows (HTTP 429 with
    a ``Retry-After`` header). ``retry_after``: the seconds the server asked the client
    to wait (None if it did not say). The client never retries on its own."""

    code = "rate_limited"
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownCommand(ServiceError):
    """No background command with that id in the sandbox (HTTP 404)."""

    code = "unknown_command"


class RequestTooLarge(ServiceError):
    """A request body or its headers are over the server's caps (HTTP 413 / 431)."""

    code = "request_too_large"


class ServerUnreachable(ServiceError):
    """The client could not reach the server, or the connection broke mid-way."""

    code = "server_unreachable"


def _all_subclasses(cls: type[SandvmError]) -> list[type[SandvmError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_class_for_code(code: str) -> type[SandvmError]:
    """The exception class for a stable ``code`` (``SandvmError`` if unknown)."""
    for cls in _all_subclasses(SandvmError):
        if cls.code == code:
            return cls
    return SandvmError


def error_from_dict(obj: object) -> SandvmError:
    """The exception a ``{"code": ..., "message": ...}`` object (the server's error body)
    stands for: the class ``error_class_for_code`` names, carrying that message. Classes
    whose constructor wants more than a message get their message only (their other
    attributes are None). Anything malformed becomes a plain SandvmError."""
    code, message = "sandvm_error", "the server sent a malformed error"
    if isinstance(obj, dict):
        if isinstance(obj.get("code"), str):
            code = obj["code"][:100]
        if isinstance(obj.get("message"), str):
            message = obj["message"][:10_000]
    cls = error_class_for_code(code)
    exc = cls.__new__(cls)
    SandvmError.__init__(exc, message)
    if cls.__init__ is not SandvmError.__init__:  # attributes its own __init__ would set
        for attr in ("vm_id", "snapshot_id", "step", "from_state", "to_state", "result"):
            setattr(exc, attr, None)
    return exc
