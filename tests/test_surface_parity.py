"""One surface, local and remote: ``sandvm.client`` has every public member of the local
``sandvm`` API, with the same names, parameters, kinds and defaults, sync and async.

Compared by introspection, class by class (Sandbox, Commands, Files, CommandHandle,
Ports, Network and their async twins). Every difference must be in ALLOWED, with the
reason it exists; an entry that no longer matches a difference fails too, so the list
stays the truth. A difference is named the same for a class and its async twin
(``Sandbox.pause(store): local only`` covers both).
"""

from __future__ import annotations

import inspect
from typing import Any

import sandvm.client as remote
from sandvm import commands as local_commands
from sandvm import files as local_files
from sandvm import network as local_network
from sandvm import ports as local_ports
from sandvm import sandbox as local_sandbox
from sandvm.client import _net as remote_net

PAIRS: list[tuple[str, type, type]] = [
    ("Sandbox", local_sandbox.Sandbox, remote.Sandbox),
    ("AsyncSandbox", local_sandbox.AsyncSandbox, remote.AsyncSandbox),
    ("Commands", local_commands.Commands, remote.Commands),
    ("AsyncCommands", local_commands.AsyncCommands, remote.AsyncCommands),
    ("Files", local_files.Files, remote.Files),
    ("AsyncFiles", local_files.AsyncFiles, remote.AsyncFiles),
    ("CommandHandle", local_commands.CommandHandle, remote.CommandHandle),
    ("AsyncCommandHandle", local_commands.AsyncCommandHandle, remote.AsyncCommandHandle),
    ("Ports", local_ports.Ports, remote_net.Ports),
    ("AsyncPorts", local_ports.AsyncPorts, remote_net.AsyncPorts),
    ("Network", local_network.Network, remote_net.Network),
    ("AsyncNetwork", local_network.AsyncNetwork, remote_net.AsyncNetwork),
]

_SERVER = "the server's operator sets it (`sandvm serve` options), not API clients"
_REMOTE_CONN = "remote only: which server and key (default $SANDVM_URL, $SANDVM_API_KEY)" \
               " and an injectable HTTP transport"
_HOST = "host objects the server keeps for the tenant; a client names them, it does not" \
        " hand them in"

# difference -> why it is there (the same text for a class and its async twin)
ALLOWED: dict[str, str] = {
    # -- Sandbox: making one
    "Sandbox.create(api_key): remote only": _REMOTE_CONN,
    "Sandbox.create(url): remote only": _REMOTE_CONN,
    "Sandbox.create(transport): remote only": _REMOTE_CONN,
    "Sandbox.from_snapshot(api_key): remote only": _REMOTE_CONN,
    "Sandbox.from_snapshot(url): remote only": _REMOTE_CONN,
    "Sandbox.from_snapshot(transport): remote only": _REMOTE_CONN,
    "Sandbox.resume_from(api_key): remote only": _REMOTE_CONN,
    "Sandbox.resume_from(url): remote only": _REMOTE_CONN,
    "Sandbox.resume_from(transport): remote only": _REMOTE_CONN,
    "Sandbox.create(disk_size): local only": "a server sandbox's disk is the server's"
                                             " default; " + _SERVER,
    "Sandbox.create(volumes): local only": "volumes are host directories: " + _SERVER,
    "Sandbox.create(volume_store): local only": "volumes are host directories: " + _SERVER,
    "Sandbox.create(boot_timeout): local only": _SERVER,
    "Sandbox.from_snapshot(boot_timeout): local only": _SERVER,
    "Sandbox.create(sandbox_id): local only": "the server names sandboxes (ids are"
                                              " unique across tenants)",
    "Sandbox.from_snapshot(sandbox_id): local only": "the server names sandboxes",
    "Sandbox.create(provider): local only": "the VM provider is the server's",
    "Sandbox.from_snapshot(provider): local only": "the VM provider is the server's",
    "Sandbox.create(keeper_job): local only": "every server sandbox runs under a keeper"
                                              " already (sandvm's runtime)",
    "Sandbox.from_snapshot(keeper_job): local only": "every server sandbox runs under a"
                                                     " keeper already",
    "Sandbox.from_snapshot(verify): local only": "the server verifies its snapshots",
    "Sandbox.from_snapshot(store): local only": _HOST,
    "Sandbox.snapshot(store): local only": _HOST,
    "Sandbox.snapshot(parent): local only": "diff snapshots are not served over HTTP yet",
    "Sandbox.pause(store): local only": _HOST,
    "Sandbox.resume_from(store): local only": _HOST,
    # -- Sandbox: remote-only members
    "Sandbox.connect: remote only": "a sandbox on the server outlives the client: reach"
                                    " it again by id",
    "Sandbox.list: remote only": "the tenant's sandboxes on the server",
    "Sandbox.close: remote only": "let go of the connection, leave the sandbox running",
    "Sandbox.set_timeout: remote only": "the server's TTL (locally: `timeout` at create)",
    "Sandbox.get_info: remote only": "the server's view (state, expiry); kept for the"
                                     " users of 0.1, `info` is the local one",
    # -- Sandbox: local-only members
    "Sandbox.last_snapshot_times: local only": "host-side timings of the process that"
                                               " took the snapshot (the server's metrics"
                                               " have them)",
    "Sandbox.connection: local only": "the agent connection: a seam for the modules that"
                                      " speak to the guest, in the VM's process",
    "Sandbox.image_record: local only": "the image record: a seam for the modules that"
                                        " speak to the guest, in the VM's process",
    "Sandbox.state: local only": "the local object's lifecycle state; the server's state"
                                 " is get_info().state",
    # -- Commands
    "Commands.connect: remote only": "background commands outlive the client on the"
                                     " server: reattach by command_id",
    "Commands.list: remote only": "the background commands the server keeps",
    "CommandHandle.info: remote only": "the server's record of a background command",
    # -- Ports
    "Ports.expose(host): local only": "the listener is on the server's host: " + _SERVER,
    "Ports.expose(host_port): local only": "the server picks the host port",
    "Ports.expose(guest_host): local only": "the server tunnels to the guest's loopback",
    "Ports.wait(guest_host): local only": "the server waits on the guest's loopback",
    "Ports.connect: local only": "no raw tunnel over HTTP: expose the port, connect to"
                                 " its URL",
    "Ports.tunnels: local only": "open tunnels are counted on the server's host",
    # -- Network
    "Network.policy: local only": "async remote: the policy is the server's, fetched"
                                  " with get_policy() (a property cannot await; the"
                                  " sync twin keeps the property)",
    "Network.enabled: local only": "remote: info().enabled (asks the server)",
    "Network.env: local only": "the proxy variables commands get in the VM's process",
    "Network.subscribe: local only": "a callback in the VM's process; remote: events()",
    "Network.audit_path: local only": "the audit file is on the server's disk",
    "Network.events(limit): remote only": "the server keeps the last 1000 events; a"
                                          " client asks for a page",
    "Network.events: method locally, coroutine remotely": "local events are in memory;"
                                                          " remote ones come from the"
                                                          " server",
    "Network.get_policy: remote only": "fetches the policy from the server (the local"
                                       " policy property has it at hand)",
    "Network.info: remote only": "the server's egress counters (bytes, connections)",
}


def _members(cls: type) -> dict[str, Any]:
    """Public members, own and inherited (nearest definition wins), as found on the
    class (properties and classmethods unwrapped by getattr_static)."""
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__[:-1]):
        merged.update(vars(klass))
    return {n: m for n, m in merged.items() if not n.startswith("_")
            and (callable(m) or isinstance(m, (property, classmethod, staticmethod)))}


def _kind(m: Any) -> str:
    if isinstance(m, property):
        return "property"
    if isinstance(m, classmethod):
        return "classmethod"
    if inspect.iscoroutinefunction(m):
        return "coroutine"
    if inspect.isasyncgenfunction(m):
        return "async generator"
    return "method"


def _func(m: Any) -> Any:
    return m.__func__ if isinstance(m, (classmethod, staticmethod)) else m


def differences(family: str, local: type, remote_cls: type) -> list[str]:
    """Every difference between ``local``'s and ``remote_cls``'s public surface."""
    out: list[str] = []
    lm, rm = _members(local), _members(remote_cls)
    for name in sorted(set(lm) - set(rm)):
        out.append(f"{family}.{name}: local only")
    for name in sorted(set(rm) - set(lm)):
        out.append(f"{family}.{name}: remote only")
    for name in sorted(set(lm) & set(rm)):
        lk, rk = _kind(lm[name]), _kind(rm[name])
        if lk != rk:
            # a coroutine and an async generator are both awaited per item: the same
            if {lk, rk} != {"coroutine", "async generator"}:
                out.append(f"{family}.{name}: {lk} locally, {rk} remotely")
            if "property" in (lk, rk):
                continue
        if lk == "property":
            continue
        lp = inspect.signature(_func(lm[name])).parameters
        rp = inspect.signature(_func(rm[name])).parameters
        for p in lp:
            if p not in rp:
                out.append(f"{family}.{name}({p}): local only")
        for p in rp:
            if p not in lp:
                out.append(f"{family}.{name}({p}): remote only")
        common = [p for p in lp if p in rp]
        if common != [p for p in rp if p in lp]:
            out.append(f"{family}.{name}: parameters in another order")
        for p in common:
            a, b = lp[p], rp[p]
            if a.kind != b.kind:
                out.append(f"{family}.{name}({p}): {a.kind.name} locally, {b.kind.name}"
                           " remotely")
            if a.default != b.default:
                out.append(f"{family}.{name}({p}): default {a.default!r} locally,"
                           f" {b.default!r} remotely")
    return out


def _all_differences() -> set[str]:
    found: set[str] = set()
    for name, local, remote_cls in PAIRS:
        family = name.removeprefix("Async")
        found.update(differences(family, local, remote_cls))
    return found


def test_remote_surface_is_the_local_one_but_the_allowed_differences() -> None:
    found = _all_differences()
    unexplained = sorted(found - set(ALLOWED))
    assert not unexplained, ("differences between sandvm and sandvm.client that ALLOWED"
                             " does not justify (make them equal, or add each with its"
                             f" reason): {unexplained}")


def test_every_allowed_difference_still_exists() -> None:
    stale = sorted(set(ALLOWED) - _all_differences())
    assert not stale, f"ALLOWED lists differences that are gone (remove them): {stale}"


def test_every_allowed_difference_has_a_reason() -> None:
    for diff, why in ALLOWED.items():
        assert isinstance(why, str) and len(why) > 10, diff


def test_the_comparison_sees_differences() -> None:
    """The checker itself: a missing method, a parameter, a default, a kind."""
    class Local:
        def a(self, x: int, *, y: int = 1) -> None: ...
        async def b(self) -> None: ...
        @property
        def c(self) -> int: return 1
        def d(self) -> None: ...

    class Remote:
        def a(self, x: int, *, y: int = 2, z: int = 0) -> None: ...
        def b(self) -> None: ...
        async def c(self) -> int: return 1
        def e(self) -> None: ...

    assert set(differences("T", Local, Remote)) == {
        "T.d: local only", "T.e: remote only", "T.a(z): remote only",
        "T.a(y): default 1 locally, 2 remotely", "T.b: coroutine locally, method remotely",
        "T.c: property locally, coroutine remotely"}


def test_the_new_remote_members_are_there() -> None:
    """What issue 15 found missing remotely, by name (sync and async)."""
    for cls in (remote.Files, remote.AsyncFiles):
        for name in ("list", "stat", "exists", "make_dir", "remove", "rename", "upload_dir",
                     "download_dir"):
            assert callable(getattr(cls, name, None)), (cls, name)
    for cls in (remote.Sandbox, remote.AsyncSandbox):
        for name in ("pause", "resume", "resume_from", "ping", "get_info"):
            assert callable(getattr(cls, name, None)), (cls, name)
        assert isinstance(inspect.getattr_static(cls, "info"), property), cls
