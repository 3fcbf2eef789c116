"""The remote SDK: sandboxes on a sandvm server (`sandvm serve`), same surface as local.

    # SANDVM_URL=http://127.0.0.1:7070 SANDVM_API_KEY=sandvm_...
    from sandvm.client import Sandbox
    with Sandbox.create() as sb:
        print(sb.commands.run("uname -r").stdout)

``AsyncSandbox`` is the one implementation (httpx, asyncio); ``Sandbox`` runs it on
sandvm's blocking portal. Errors are those of ``sandvm.errors``.
"""

from sandvm.client._async import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncSandbox,
    CommandInfo,
    SandboxInfo,
)
from sandvm.client._library import (
    AsyncPool,
    AsyncSnapshotStore,
    Pool,
    PoolInfo,
    SnapshotInfo,
    SnapshotStore,
)
from sandvm.client._net import AsyncNetwork, AsyncPorts, Network, NetworkInfo, Ports
from sandvm.client._sync import CommandHandle, Commands, Files, Sandbox
from sandvm.values import CommandResult, WriteInfo

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncNetwork",
    "AsyncPool",
    "AsyncPorts",
    "AsyncSandbox",
    "AsyncSnapshotStore",
    "CommandHandle",
    "CommandInfo",
    "CommandResult",
    "Commands",
    "Files",
    "Network",
    "NetworkInfo",
    "Pool",
    "PoolInfo",
    "Ports",
    "Sandbox",
    "SandboxInfo",
    "SnapshotInfo",
    "SnapshotStore",
    "WriteInfo",
]
