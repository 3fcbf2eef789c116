"""The private-name check (`tools/check_private.py`, run by `make lint`): src/sandvm uses
no other module's `_private` names beyond its allow-list, and the checker finds what it
should and nothing it should not."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_private.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_private", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_private", module)
    spec.loader.exec_module(module)
    return module


def test_src_uses_no_unlisted_private_names() -> None:
    run = subprocess.run([sys.executable, str(TOOL), "--quiet"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def _scan(tmp_path: Path, files: dict[str, str]) -> list[str]:
    pkg = tmp_path / "src" / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return [f"{Path(f.path).name}:{f.line}:{f.name}" for f in _tool().scan(pkg, tmp_path)]


OWNER = """
    class Box:
        def __init__(self) -> None:
            self._secret = 1
            self._shared = 2

        def _helper(self) -> int:
            return self._secret

    def _free() -> None: ...
"""


def test_reach_through_into_another_module_is_found(tmp_path: Path) -> None:
    found = _scan(tmp_path, {"owner.py": OWNER, "other.py": """
        from pkg import owner
        from pkg.owner import _free, Box

        def use(box: Box) -> int:
            getattr(box, "_secret")
            owner._free()
            return box._helper() + box._secret
    """})
    assert sorted(found) == sorted([
        "other.py:3:_free", "other.py:6:_secret", "other.py:7:_free",
        "other.py:8:_helper", "other.py:8:_secret"])


def test_own_members_dunders_and_private_modules_are_fine(tmp_path: Path) -> None:
    found = _scan(tmp_path, {"owner.py": OWNER, "_impl.py": "X = 1\n", "other.py": """
        from pkg import _impl
        import pkg._impl

        class Box:
            def __init__(self, peer: "Box | None" = None) -> None:
                self._shared = 3
                self.peer = peer
                self._kids: list[Box] = []

            def __eq__(self, other: object) -> bool:
                return isinstance(other, Box) and other._shared == self._shared

            @classmethod
            def make(cls) -> "Box":
                box = cls()
                box._shared = 4
                return box

            def sum(self) -> int:
                return sum(kid._shared for kid in self._kids) + type(self)._count()

            def first(self) -> int:
                peer = self.peer
                for kid in list(self._kids):
                    return kid._shared
                return peer._shared if peer is not None else 0

            @classmethod
            async def remade(cls) -> "Box":
                box = await cls.made()
                box._shared = 5
                return box

            @classmethod
            async def made(cls) -> "Box":
                return cls()

            @classmethod
            def _count(cls) -> int:
                return super().__hash__() + pkg._impl.X + _impl.X

        def local() -> int:
            box = Box()
            return box._shared + box.__class__.__name__.count("x")
    """})
    assert found == []


def test_shared_private_name_on_unknown_receiver_counts(tmp_path: Path) -> None:
    # `_shared` is defined in both modules, so `thing._shared` may be owner.Box's
    found = _scan(tmp_path, {"owner.py": OWNER, "other.py": """
        class Local:
            def __init__(self) -> None:
                self._shared = 0

        def use(thing: object) -> object:
            return thing._shared
    """})
    assert found == ["other.py:7:_shared"]


def test_allowlist_needs_reasons_and_fails_on_stale_entries(tmp_path: Path) -> None:
    tool = _tool()
    listed = tmp_path / "allow.txt"
    listed.write_text("# comment\nsrc/a.py:_x  the VM owns it, see issue 15\n"
                      "src/b.py:_y\nsrc/c.py:_z  gone but listed here\n")
    entries, problems = tool.read_allowlist(listed)
    assert set(entries) == {"src/a.py:_x", "src/b.py:_y", "src/c.py:_z"}
    assert len(problems) == 1 and "src/b.py:_y" in problems[0]
    findings = [tool.Finding("src/a.py", 3, "_x", "v._x"),
                tool.Finding("src/d.py", 9, "_w", "v._w")]
    unlisted, stale = tool.check(findings, entries)
    assert [f.key for f in unlisted] == ["src/d.py:_w"]
    assert stale == ["src/b.py:_y", "src/c.py:_z"]


def test_prune_drops_only_stale_entries(tmp_path: Path) -> None:
    listed = tmp_path / "allow.txt"
    listed.write_text("# keep me\nsrc/a.py:_x  still used by a, see issue 15\n"
                      "src/c.py:_z  no longer used anywhere at all\n")
    _tool().prune(listed, {"src/a.py:_x"})
    assert listed.read_text() == "# keep me\nsrc/a.py:_x  still used by a, see issue 15\n"
