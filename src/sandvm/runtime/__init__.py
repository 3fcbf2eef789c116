"""Isolation runtimes (seed 003): the ``IsolationRuntime`` port and its in-memory fake.

``sandvm.runtime.port`` holds the port, its request/result types and the
lifecycle rules; ``sandvm.runtime.fake`` the deterministic
``FakeIsolationRuntime`` the conformance suite (``tests/runtime_conformance.py``)
also runs against, and ``sandvm.runtime.fake_process`` its scripted processes.
"""

from sandvm.runtime.fake import *  # noqa: F403
from sandvm.runtime.fake import __all__ as _fake_all
from sandvm.runtime.fake_process import *  # noqa: F403
from sandvm.runtime.fake_process import __all__ as _process_all
from sandvm.runtime.port import *  # noqa: F403
from sandvm.runtime.port import __all__ as _port_all

__all__ = [*_fake_all, *_process_all, *_port_all]
