"""sandvm: self-hosted microVM sandboxes from Python.

    from sandvm import Sandbox
    with Sandbox.create() as sb:
        print(sb.commands.run("uname -r").stdout)
"""

from sandvm.core import VmSpec, VmState, VmView
from sandvm.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeout,
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
    SandboxStateError,
    SandvmError,
    SnapshotAlreadyExists,
    UnknownImage,
    Unsupported,
    VmAlreadyExists,
    VmBootError,
    VmCrashed,
    VmNotFound,
)
from sandvm.sandbox import (
    AsyncCommandHandle,
    AsyncSandbox,
    CommandHandle,
    CommandResult,
    DirTransfer,
    EntryInfo,
    Sandbox,
    WriteInfo,
)
from sandvm.volumes import VolumeMount

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "AssetMissing",
    "AsyncCommandHandle",
    "AsyncSandbox",
    "CommandError",
    "CommandExitError",
    "CommandHandle",
    "CommandNotFound",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "DirTransfer",
    "EntryInfo",
    "FileTooLarge",
    "GuestError",
    "GuestFileExists",
    "GuestFileNotFound",
    "GuestPermissionDenied",
    "InvalidPath",
    "InvalidSpec",
    "InvalidTransition",
    "Sandbox",
    "SandboxStateError",
    "SandvmError",
    "SnapshotAlreadyExists",
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
