"""What a sandbox's parts (commands, files, ports, network) see of the sandbox that owns
them: a typing Protocol, so those modules never import ``sandvm.sandbox`` (not even for
type checking) and the remote SDK can reuse their sync twins without the VM stack.
``AsyncSandbox`` satisfies it.
"""

from __future__ import annotations

from typing import Protocol

from sandvm.agent_client import AgentConnection
from sandvm.core import ImageRecord
from sandvm.values import SandboxState

__all__ = ["EnvSource", "SandboxLink"]


class EnvSource(Protocol):
    """The environment a sandbox adds to every command (its egress proxy's variables)."""

    def env(self) -> dict[str, str]: ...


class SandboxLink(Protocol):
    """The sandbox as its parts use it: its id, state, per-operation timeout, the image
    its root disk holds, its network's command environment and its agent connection."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def op_timeout(self) -> float: ...

    @property
    def state(self) -> SandboxState: ...

    @property
    def network(self) -> EnvSource: ...

    @property
    def image_record(self) -> ImageRecord | None: ...

    def connection(self) -> AgentConnection:
        """The guest agent's connection. Raises SandboxStateError (killed, detached) and
        a dead VM's failure (VmCrashed, AgentProtocolError)."""
        ...
