"""The sync surface is the async one, method for method (no drift), and exports hold."""

from __future__ import annotations

import inspect
from typing import Any

import sandvm
from sandvm import sandbox as sbmod

PAIRS = [
    (sbmod.AsyncSandbox, sbmod.Sandbox),
    (sbmod.AsyncCommands, sbmod.Commands),
    (sbmod.AsyncFiles, sbmod.Files),
    (sbmod.AsyncCommandHandle, sbmod.CommandHandle),
]
# connection and image_record are the seams the commands/files/ports/network modules
# use (the sync twin drives those through the async ones)
ASYNC_ONLY = {"aclose", "_run", "connection", "image_record"}


def _public(cls: type) -> dict[str, object]:
    # own and inherited (a sync twin may share a base class), nearest definition wins
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__[:-1]):
        merged.update(vars(klass))
    return {n: m for n, m in merged.items()
            if not n.startswith("_") and (callable(m) or isinstance(m, (property, classmethod)))}


def test_sync_and_async_surfaces_match() -> None:
    for acls, scls in PAIRS:
        a = {n for n in _public(acls) if n not in ASYNC_ONLY}
        s = set(_public(scls))
        assert a == s, f"{acls.__name__} vs {scls.__name__}: {a ^ s}"
        for name in a:
            am, sm = getattr(acls, name), getattr(scls, name)
            if isinstance(inspect.getattr_static(acls, name), property):
                continue
            asig, ssig = inspect.signature(am), inspect.signature(sm)
            assert list(asig.parameters) == list(ssig.parameters), name
            for p in asig.parameters:
                assert asig.parameters[p].kind == ssig.parameters[p].kind, (name, p)
                assert asig.parameters[p].default == ssig.parameters[p].default, (name, p)


def test_async_methods_are_coroutines() -> None:
    for acls, _ in PAIRS:
        for name, m in _public(acls).items():
            if isinstance(m, (property, classmethod)) or name in ("read_stream", "connection"):
                continue
            assert inspect.iscoroutinefunction(m), f"{acls.__name__}.{name}"


def test_options_are_keyword_only() -> None:
    sig = inspect.signature(sbmod.AsyncCommands.run)
    for name, p in sig.parameters.items():
        if name not in ("self", "cmd"):
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
    sig = inspect.signature(sbmod.AsyncSandbox.create)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sig.parameters.values())


def test_all_exports_exist() -> None:
    for name in sandvm.__all__:
        assert hasattr(sandvm, name), name
    assert sorted(sandvm.__all__) == sandvm.__all__
