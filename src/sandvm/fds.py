"""The process's file descriptors: the soft limit raised once, and a budget for what guests drive.

A guest (or a client of an exposed port) decides how many host connections sandvm opens
for it: each connection to the in-guest egress proxy holds a socket pair on the host,
each upstream connection one socket, each accepted connection of an exposed port one.
Without a bound, two busy sandboxes exhaust the process's limit and every tenant's
requests fail. So:

- :func:`raise_nofile_limit` raises ``RLIMIT_NOFILE``'s soft limit to the hard one (the
  CLI entry point, the server's start and every sandbox call it; it acts once);
- :data:`BUDGET` (a :class:`FdBudget`) holds the descriptors of guest-driven
  connections: the soft limit minus a reserve for the process's own work (its HTTP
  clients, QEMU's sockets, journals), and no sandbox may hold more than a share of it.
  What does not fit is refused at once, with a reason the caller reports (an HTTP
  error to the guest's client, an audit event, a reset connection) instead of letting
  the process run out.
"""

from __future__ import annotations

import contextlib
import resource
import threading

MIN_RESERVE = 256  # descriptors never handed to guest-driven connections...
RESERVE_FRACTION = 0.25  # ...or this part of the limit, whichever is larger
SHARE_FRACTION = 0.25  # one sandbox holds at most this part of the budget
_raised: tuple[int, int] | None = None
_lock = threading.Lock()


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, once per process (later calls
    only report); returns (soft, hard). Never raises: a limit that cannot be changed
    stays as it is."""
    global _raised
    with _lock:
        if _raised is None:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if hard == resource.RLIM_INFINITY or hard > soft:
                target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            _raised = resource.getrlimit(resource.RLIMIT_NOFILE)
        return _raised


def soft_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` in force now."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class FdBudget:
    """Descriptors that guest-driven connections may hold, process-wide.

    ``limit``: the descriptor limit to plan for (None: the soft ``RLIMIT_NOFILE``, read
    at each acquire). The budget is the limit minus the reserve (``MIN_RESERVE`` or
    ``RESERVE_FRACTION`` of it, the larger); one owner (a sandbox id) holds at most
    ``SHARE_FRACTION`` of the budget. Thread-safe; used from any event loop."""

    def __init__(self, *, limit: int | None = None) -> None:
        self._limit = limit
        self._held: dict[str, int] = {}
        self._total = 0
        self.refused = 0  # acquires refused so far
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit if self._limit is not None else soft_limit()

    @property
    def capacity(self) -> int:
        """Descriptors guest-driven connections may hold together."""
        limit = self.limit
        return max(0, limit - max(MIN_RESERVE, int(limit * RESERVE_FRACTION)))

    @property
    def share(self) -> int:
        """Descriptors one owner may hold."""
        return max(1, int(self.capacity * SHARE_FRACTION))

    @property
    def held(self) -> int:
        return self._total

    def held_by(self, owner: str) -> int:
        return self._held.get(owner, 0)

    def acquire(self, owner: str, n: int = 1) -> str | None:
        """Take ``n`` descriptors for ``owner``: None if granted (give them back with
        ``release``), else why not (nothing is taken)."""
        with self._lock:
            mine = self._held.get(owner, 0)
            capacity, share = self.capacity, self.share
            why = None
            if self._total + n > capacity:
                why = (f"the sandvm process is near its open-file limit ({self.limit};"
                       f" {self._total} descriptors held by guest connections of the"
                       f" {capacity} they may use): connection refused; close"
                       " connections, or raise the limit (ulimit -n)")
            elif mine + n > share:
                why = (f"this sandbox holds its share of the process's descriptors ({mine}"
                       f" of {share}): connection refused; close some of its connections")
            if why is not None:
                self.refused += 1
                return why
            self._held[owner] = mine + n
            self._total += n
            return None

    def release(self, owner: str, n: int = 1) -> None:
        """Give back ``n`` descriptors ``owner`` acquired."""
        with self._lock:
            left = self._held.get(owner, 0) - n
            if left > 0:
                self._held[owner] = left
            else:
                self._held.pop(owner, None)
            self._total = max(0, self._total - n)


BUDGET = FdBudget()
