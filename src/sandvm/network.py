"""``sandbox.network``: a sandbox's egress, policed on the host.

The VM has no network device. With a policy, the guest agent listens on
127.0.0.1:3128 in the guest and every command gets ``HTTP_PROXY``/``HTTPS_PROXY``
pointing there. Each connection to it travels over the agent channel (one stream
each, with flow control) to this sandbox's :class:`~sandvm.egress.EgressProxy` on the
host, which applies the policy, makes the connection itself and records every
decision. The host keeps a few ``egress_accept`` streams waiting in the guest, so a
new connection costs no extra round trip.

Each guest connection served holds a socket pair on the host (a bridge). A new one is
refused, with an HTTP error the guest's client shows and an audit event, when the
proxy has no room (``max_connections``, counting connections still sending their
request head), MAX_BRIDGES are open, or the process's descriptor budget
(:mod:`sandvm.fds`) does not cover it: a refusal holds no host descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandvm import _portal, wire
from sandvm.agent_client import AgentConnection, HostStream, require_feature
from sandvm.egress import AuditLog, EgressEvent, EgressProxy, NetworkPolicy, Resolver, proxy_env
from sandvm.errors import InvalidSpec, SandvmError, Unsupported
from sandvm.fds import BUDGET, raise_nofile_limit
from sandvm.guestops import GuestOps
from sandvm.ports import pump_from_guest, pump_to_guest
from sandvm.values import SandboxState

if TYPE_CHECKING:
    from sandvm.link import SandboxLink

GUEST_PROXY_PORT = 3128
WAITING = 4  # egress_accept streams kept waiting in the guest
MAX_BRIDGES = 256  # guest connections served at once (the proxy's own caps come after)
BRIDGE_GRACE = 2.0  # seconds a guest connection may linger after the proxy is done
BRIDGE_FDS = 3  # host descriptors a bridge holds: its socket pair, the upstream connection
_CHUNK = 64 * 1024


def audit_dir() -> Path:
    """Where egress audit files live: ``$SANDVM_AUDIT_DIR`` or ``$SANDVM_HOME/audit``."""
    env = os.environ.get("SANDVM_AUDIT_DIR")
    if env:
        return Path(env)
    from sandvm.assets import sandvm_home

    return sandvm_home() / "audit"


def audit_file(sandbox_id: str) -> Path:
    """Where a sandbox's egress decisions are appended (JSON lines, mode 0600), one
    file per sandbox in ``audit_dir()``."""
    return audit_dir() / f"egress-{sandbox_id}.jsonl"


def end_audit(sandbox_id: str) -> Path | None:
    """The sandbox ended while no process held its proxy (a managed sandbox killed by
    id): move its audit file aside as its proxy would have (see AuditLog.end). Returns
    the new path (None: there was no file). Never raises."""
    path = audit_file(sandbox_id)
    if not path.exists():
        return None
    try:
        return AuditLog(path).end()
    except OSError:
        return None


class AsyncNetwork:
    """The sandbox's egress policy, its audit events, and the plumbing behind them."""

    def __init__(self, sb: SandboxLink) -> None:
        raise_nofile_limit()  # once per process: every sandbox gets here
        self._sb = sb
        self._proxy: EgressProxy | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bridges: set[asyncio.Task[Any]] = set()  # guest connections being served
        self._refusing = 0  # guest connections being told why they were refused
        self._start_lock = asyncio.Lock()
        self._ended = False
        self.guest_port = GUEST_PROXY_PORT
        # told of every policy set (sandvm's runtime keeps a managed sandbox's in its journal)
        self._on_policy: Callable[[NetworkPolicy], None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether the sandbox has egress (a policy, even one that allows nothing)."""
        return self._proxy is not None and not self._ended

    @property
    def policy(self) -> NetworkPolicy | None:
        """The policy in force (None: no egress at all, not even the proxy)."""
        return self._proxy.policy if self._proxy is not None else None

    def env(self) -> dict[str, str]:
        """The variables that send a workload's HTTP(S) through the proxy ({} if off)."""
        return proxy_env(self.guest_port) if self.enabled else {}

    def _conn(self) -> AgentConnection:
        # raises if the sandbox is gone
        return require_feature(self._sb.connection(), "egress", "egress proxy", Unsupported)

    async def set_policy(self, policy: NetworkPolicy) -> None:
        """Replace the policy, atomically (see EgressProxy.set_policy); on a sandbox
        created without one, this starts its egress. Allowed while the sandbox runs.
        Raises InvalidSpec, Unsupported (an old guest agent), SandboxStateError."""
        if not isinstance(policy, NetworkPolicy):
            raise InvalidSpec(f"expected a NetworkPolicy, got {type(policy).__name__}")
        async with self._start_lock:  # two first calls must not start two proxies
            if self._proxy is None:
                await self._start(policy)
            else:
                self._sb.connection()
                self._proxy.set_policy(policy)
        if self._on_policy is not None:
            self._on_policy(policy)

    def events(self) -> list[EgressEvent]:
        """The proxy's recent decisions and connection ends, oldest first."""
        return self._proxy.audit.events() if self._proxy is not None else []

    def subscribe(self, fn: Callable[[EgressEvent], None]) -> Callable[[], None]:
        """Call ``fn`` (on the sandbox's event loop) with every egress event from now on;
        returns what unsubscribes it. Raises SandboxStateError without egress."""
        if self._proxy is None:
            from sandvm.errors import SandboxStateError

            raise SandboxStateError("this sandbox has no network policy: give one with"
                                    " network=NetworkPolicy(...) or set_policy")
        return self._proxy.audit.subscribe(fn)

    @property
    def audit_path(self) -> Path | None:
        """The JSON-lines audit file, if the events are also written to one."""
        return self._proxy.audit.path if self._proxy is not None else None

    async def _start(self, policy: NetworkPolicy, *, resolver: Resolver | None = None,
                     audit_path: Path | None = None, bytes_used: int = 0) -> None:
        # see start_egress
        if self._proxy is not None:
            from sandvm.errors import SandboxStateError

            raise SandboxStateError("this sandbox's egress is already on: change it with"
                                    " set_policy")
        await GuestOps(self._conn()).egress_listen(port=self.guest_port,
                                                   timeout=self._sb.op_timeout)
        self._proxy = EgressProxy(policy, sandbox_id=self._sb.sandbox_id, resolver=resolver,
                                  audit=AuditLog(audit_path or audit_file(self._sb.sandbox_id)))
        if bytes_used > 0:
            self._proxy.bytes_total = bytes_used
        for _ in range(WAITING):
            self._spawn(self._acceptor())

    def _spawn(self, coro: Any, *, bridge: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if bridge:  # its descriptors go back however it ends (even cancelled unstarted)
            sid = self._sb.sandbox_id
            self._bridges.add(task)
            task.add_done_callback(self._bridges.discard)
            task.add_done_callback(lambda _: BUDGET.release(sid, BRIDGE_FDS))

    async def _acceptor(self) -> None:
        """Keep one egress_accept stream waiting in the guest, again and again."""
        pause = 0.05
        while not self._ended:
            try:
                conn = self._conn()
            except SandvmError:
                return  # the sandbox is gone
            item = None
            try:
                st = await GuestOps(conn).egress_accept()
                item = await st.next(None)
            except SandvmError:
                if conn.failure is not None:
                    return  # the agent connection is gone (a new holder starts anew)
            if item is not None and item.kind == "event" and \
                    (item.message or {}).get("event") == "connected":
                why = self._admit()
                if why is None:
                    self._spawn(self._bridge(st), bridge=True)
                elif self._refusing < MAX_BRIDGES:
                    self._refusing += 1
                    self._spawn(self._refuse(st, *why))
                else:
                    await st.reset()
                pause = 0.05
                continue
            if item is not None:
                await st.reset()
                err = item.error
                if item.kind == "error" and err is not None and \
                        err.details.get("guest_code") == "egress_off":
                    return
            await asyncio.sleep(pause)  # busy (too many streams) or misbehaving: back off
            pause = min(pause * 2, 2.0)

    def _admit(self) -> tuple[int, str] | None:
        """Whether a new guest connection gets a bridge: None (yes; its descriptors are
        taken from the budget), else the HTTP status and reason of its refusal."""
        assert self._proxy is not None
        why = self._proxy.room()
        if why is not None:
            return 429, why
        if len(self._bridges) >= MAX_BRIDGES:
            return 429, f"too many connections open ({MAX_BRIDGES} guest connections)"
        why = BUDGET.acquire(self._sb.sandbox_id, BRIDGE_FDS)
        if why is not None:
            return 503, why
        return None

    async def _refuse(self, st: HostStream, status: int, reason: str) -> None:
        """Answer a guest connection that gets no bridge straight over its stream (an
        HTTP error with the reason; no host descriptor), audit it, end it."""
        try:
            assert self._proxy is not None
            await st.send_data(self._proxy.refuse(status, reason), channel=wire.CH_STDIN,
                               timeout=BRIDGE_GRACE)
            await st.send_eof(wire.CH_STDIN)
            async with asyncio.timeout(BRIDGE_GRACE):  # the guest's client reads, closes
                while (await st.next(None)).kind not in ("reply", "error"):
                    pass
        except (SandvmError, TimeoutError):
            pass
        finally:
            self._refusing -= 1
            await st.reset()

    async def _bridge(self, st: HostStream) -> None:
        """One guest connection ↔ the proxy, through a socket pair (the proxy speaks
        asyncio streams; the pair gives both sides flow control). Once the proxy is done
        with it, the guest's side gets BRIDGE_GRACE seconds to finish, then is reset:
        a silent client cannot hold a stream. Its BRIDGE_FDS descriptors were taken
        from the budget (``_admit``); ``_spawn`` gives them back when it ends."""
        assert self._proxy is not None
        try:
            a, b = socket.socketpair()
        except OSError:
            await st.reset()
            return
        try:
            pr, pw = await asyncio.open_connection(sock=a, limit=_CHUNK)
            cr, cw = await asyncio.open_connection(sock=b, limit=_CHUNK)
        except OSError:
            a.close()
            b.close()
            await st.reset()
            return
        loop = asyncio.get_running_loop()
        handler = loop.create_task(self._proxy.handle(cr, cw, upstream_reserved=True))
        up = loop.create_task(pump_to_guest(pr, st))
        down = loop.create_task(pump_from_guest(st, pw))
        clean = False
        try:
            await asyncio.wait([handler, down], return_when=asyncio.FIRST_COMPLETED)
            if not down.done():  # the proxy is done: let the last bytes through, briefly
                await asyncio.wait([down], timeout=BRIDGE_GRACE)
            if down.done() and not down.cancelled() and down.exception() is None:
                clean = down.result()
        finally:
            for t in (up, down):
                t.cancel()
            if not clean:
                await st.reset()
                with contextlib.suppress(Exception):
                    pw.transport.abort()
            else:
                pw.close()
            if not handler.done():
                with contextlib.suppress(Exception):
                    cw.transport.abort()
                await asyncio.wait([handler], timeout=5.0)

    async def _shutdown(self) -> None:
        # see shutdown_egress
        self._ended = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if self._proxy is not None:
            with contextlib.suppress(Exception):
                await self._proxy.aclose()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._proxy is not None and self._sb.state is not SandboxState.DETACHED:
            with contextlib.suppress(Exception):
                self._proxy.audit.end()


class Network:
    """Sync twin of AsyncNetwork (``sandbox.network``)."""

    def __init__(self, inner: AsyncNetwork) -> None:
        self._a = inner

    @property
    def enabled(self) -> bool:
        return self._a.enabled

    @property
    def policy(self) -> NetworkPolicy | None:
        return self._a.policy

    @property
    def audit_path(self) -> Path | None:
        return self._a.audit_path

    def env(self) -> dict[str, str]:
        return self._a.env()

    def set_policy(self, policy: NetworkPolicy) -> None:
        _portal.call(self._a.set_policy(policy))

    def events(self) -> list[EgressEvent]:
        return self._a.events()

    def subscribe(self, fn: Callable[[EgressEvent], None]) -> Callable[[], None]:
        return self._a.subscribe(fn)


# --------------------------------------------------------------------------- seams
# for sandvm's own layers (the sandbox builder, the runtime manager, the server): not on
# the user's ``sandbox.network``


async def start_egress(net: AsyncNetwork, policy: NetworkPolicy, *,
                       resolver: Resolver | None = None, audit_path: Path | None = None,
                       bytes_used: int = 0) -> None:
    """Turn ``net``'s egress on under ``policy``: the guest's proxy port starts listening
    and the host's proxy serves it (``set_policy`` does this on first use; the sandbox
    builder, for a sandbox made with a policy). ``resolver`` replaces the proxy's DNS
    resolver, ``audit_path`` its audit file; ``bytes_used`` were spent under the
    policy's byte cap by earlier holders (the cap is for the sandbox's life). Allowed
    once, while the sandbox is starting or running. Raises SandboxStateError (egress
    already on, or the sandbox gone), Unsupported (an old guest agent), AgentError."""
    await net._start(policy, resolver=resolver, audit_path=audit_path,
                     bytes_used=bytes_used)


async def shutdown_egress(net: AsyncNetwork) -> None:
    """Turn ``net``'s egress off for good, as its sandbox ends (kill) or is detached:
    close the proxy and every connection. The audit file is moved aside when the
    sandbox ended, and left for the next holder when it was detached. Any state; never
    raises."""
    await net._shutdown()


def watch_policy(net: AsyncNetwork, fn: Callable[[NetworkPolicy], None] | None) -> None:
    """Call ``fn`` with every policy ``net.set_policy`` puts in force from now on (one
    watcher: the runtime manager, which journals a managed sandbox's policy for its next
    holder; None removes it). Any state."""
    net._on_policy = fn


def egress_bytes(net: AsyncNetwork) -> int:
    """Bytes ``net``'s egress proxy has carried, counted against the policy's
    ``max_bytes`` (for the sandbox's whole life: earlier holders' too); 0 without
    egress. Any state."""
    return net._proxy.bytes_total if net._proxy is not None else 0


def egress_connections(net: AsyncNetwork) -> int:
    """Connections open through ``net``'s egress proxy now; 0 without egress. Any
    state."""
    return net._proxy.active if net._proxy is not None else 0
