"""VM providers: the seed-000 port, an in-memory fake and the QEMU backend."""

from sandvm.providers.base import VmProvider, VmQuery, VmRuntime
from sandvm.providers.memory import InMemoryVmProvider
from sandvm.providers.qemu import QemuVmProvider

__all__ = ["InMemoryVmProvider", "QemuVmProvider", "VmProvider", "VmQuery", "VmRuntime"]
