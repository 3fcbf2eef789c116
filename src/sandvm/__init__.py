"""sandvm: self-hosted microVM sandboxes from Python.

    from sandvm import Sandbox
    with Sandbox.create() as sb:
        print(sb.commands.run("uname -r").stdout)

The package root is lazy: each public name is imported from its module on first access
(``_LAZY`` maps names to modules), so ``import sandvm.wire`` or ``import sandvm.client``
does not load the VM stack (QEMU provider, snapshots, images). Modules inside sandvm
import from the module that defines a name, never from this root.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sandvm.version import __version__

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from sandvm.commands import AsyncCommandHandle, CommandHandle
    from sandvm.core import VmSpec, VmState, VmView
    from sandvm.egress_policy import EgressEvent, NetworkPolicy
    from sandvm.errors import (
        AgentError,
        AgentProtocolError,
        AgentTimeout,
        AgentVersionMismatch,
        AssetMissing,
        CommandError,
        CommandExitError,
        CommandNotFound,
        CommandTimeout,
        ConfigError,
        FileTooLarge,
        GuestError,
        GuestFileExists,
        GuestFileNotFound,
        GuestPermissionDenied,
        InvalidPath,
        InvalidSpec,
        InvalidTransition,
        PortError,
        PortInUse,
        PortRefused,
        PortReset,
        PortTimeout,
        QuotaExceeded,
        RateLimited,
        RequestTooLarge,
        ResourceExhausted,
        SandboxBusy,
        SandboxStateError,
        SandvmError,
        ServerUnreachable,
        ServiceError,
        SnapshotAlreadyExists,
        Unauthenticated,
        UnknownCommand,
        UnknownImage,
        Unsupported,
        VmAlreadyExists,
        VmBootError,
        VmCrashed,
        VmNotFound,
    )
    from sandvm.ports import AsyncPortStream, PortStream
    from sandvm.portspec import ExposedPort
    from sandvm.sandbox import AsyncSandbox, Sandbox
    from sandvm.values import CommandResult, DirTransfer, EntryInfo, WriteInfo
    from sandvm.volumes import VolumeMount

__all__ = [
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "AgentVersionMismatch",
    "AssetMissing",
    "AsyncCommandHandle",
    "AsyncPortStream",
    "AsyncSandbox",
    "CommandError",
    "CommandExitError",
    "CommandHandle",
    "CommandNotFound",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "DirTransfer",
    "EgressEvent",
    "EntryInfo",
    "ExposedPort",
    "FileTooLarge",
    "GuestError",
    "GuestFileExists",
    "GuestFileNotFound",
    "GuestPermissionDenied",
    "InvalidPath",
    "InvalidSpec",
    "InvalidTransition",
    "NetworkPolicy",
    "PortError",
    "PortInUse",
    "PortRefused",
    "PortReset",
    "PortStream",
    "PortTimeout",
    "QuotaExceeded",
    "RateLimited",
    "RequestTooLarge",
    "ResourceExhausted",
    "Sandbox",
    "SandboxBusy",
    "SandboxStateError",
    "SandvmError",
    "ServerUnreachable",
    "ServiceError",
    "SnapshotAlreadyExists",
    "Unauthenticated",
    "UnknownCommand",
    "UnknownImage",
    "Unsupported",
    "VmAlreadyExists",
    "VmBootError",
    "VmCrashed",
    "VmNotFound",
    "VmSpec",
    "VmState",
    "VmView",
    "VolumeMount",
    "WriteInfo",
    "__version__",
]

_ERRORS = (
    "AgentError", "AgentProtocolError", "AgentTimeout", "AgentVersionMismatch", "AssetMissing",
    "CommandError", "CommandExitError", "CommandNotFound", "CommandTimeout", "ConfigError",
    "FileTooLarge", "GuestError", "GuestFileExists", "GuestFileNotFound",
    "GuestPermissionDenied", "InvalidPath", "InvalidSpec", "InvalidTransition", "PortError",
    "PortInUse", "PortRefused", "PortReset", "PortTimeout", "QuotaExceeded", "RateLimited",
    "RequestTooLarge", "ResourceExhausted", "SandboxBusy", "SandboxStateError", "SandvmError",
    "ServerUnreachable", "ServiceError", "SnapshotAlreadyExists", "Unauthenticated",
    "UnknownCommand", "UnknownImage", "Unsupported", "VmAlreadyExists", "VmBootError",
    "VmCrashed", "VmNotFound",
)

#: public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    **dict.fromkeys(_ERRORS, "sandvm.errors"),
    **dict.fromkeys(("VmSpec", "VmState", "VmView"), "sandvm.core"),
    **dict.fromkeys(("CommandResult", "DirTransfer", "EntryInfo", "WriteInfo"),
                    "sandvm.values"),
    **dict.fromkeys(("EgressEvent", "NetworkPolicy"), "sandvm.egress_policy"),
    **dict.fromkeys(("AsyncPortStream", "PortStream"), "sandvm.ports"),
    "ExposedPort": "sandvm.portspec",
    **dict.fromkeys(("AsyncCommandHandle", "CommandHandle"), "sandvm.commands"),
    **dict.fromkeys(("AsyncSandbox", "Sandbox"), "sandvm.sandbox"),
    "VolumeMount": "sandvm.volumes",
}


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name stays an error there

    def __getattr__(name: str) -> Any:
        """Import a public name's module on first access and cache the name here.
        Raises AttributeError for a name sandvm does not export."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'sandvm' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
