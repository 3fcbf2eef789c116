#!/usr/bin/env python3
"""Find uses of another module's private names in src/sandvm (run by `make lint`).

A module's ``_private`` names (functions, methods, attributes) are its own business;
other modules go through public, documented seams. This check walks every module's
AST and reports:

- ``x._name`` where ``x`` is not ``self``/``cls``/``super()``/``type(self)`` and not
  known to be an object of a class defined in the same module (see below);
- ``getattr``/``setattr``/``hasattr``/``delattr`` with a constant ``"_name"`` on such
  an ``x`` (the same reach-through, spelled as a string);
- ``from m import _name`` and ``m._name`` when ``_name`` is not a module of the package
  (private *modules* such as ``sandvm._portal`` are package-internal and fine).

Dunder names are fine, and so are the few standard-library names that are public
despite their underscore (``os._exit``, namedtuple's ``_replace`` ...).

A use counts as the module's own business, not a finding, when either
- no other module of the package defines a member of that name (classes' methods and
  attributes, ``self._x = ...``), so it can only be this module's; or
- the receiver is known to be an object of a class defined in the module, kept
  simple: a name bound in the enclosing function (or at module level) by ``x = C(...)``,
  ``x = cls(...)`` or ``x = [await] cls.make(...)``, annotated ``x: C`` /
  ``x: C | None`` (parameters too), narrowed by ``isinstance(x, C)``, assigned from
  such an attribute (``x = self._c``), or the loop variable over such a container
  (or ``list()``/``sorted()`` of it); an attribute ``self.x`` annotated or assigned so
  in the class; or the class ``C`` itself.
Anything else counts, so the check errs towards reporting.

Each finding is printed as ``file:line: <source text>`` with a total. Findings whose
``file:name`` pair is in the allow-list (``tools/private_allowlist.txt``, one
``path:name  reason`` a line) are tolerated; every entry needs a reason, and an entry
that matches nothing fails too, so the list only shrinks. Exit status 1 on any
unlisted finding, stale or reason-less entry.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "sandvm"
ALLOWLIST = Path(__file__).resolve().parent / "private_allowlist.txt"

# Standard-library names that are documented public API despite the underscore.
STDLIB_PUBLIC = frozenset({"_exit", "_replace", "_asdict", "_fields", "_make", "_field_defaults"})
SELF_NAMES = frozenset({"self", "cls", "mcs"})
ATTR_FUNCS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


@dataclass(frozen=True, order=True)
class Finding:
    """One use of a private name: where, what it was reached through, which name."""

    path: str
    line: int
    name: str
    expr: str  # the source text that uses it, e.g. ``sb._vm`` or ``from m import _x``

    @property
    def key(self) -> str:
        return f"{self.path}:{self.name}"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.expr}"


def is_private(name: str) -> bool:
    """A single-underscore name, not a dunder, not a documented stdlib exception."""
    if not name.startswith("_") or name in STDLIB_PUBLIC:
        return False
    return not (name.startswith("__") and name.endswith("__"))


def _annotation_classes(node: ast.expr | None) -> set[str]:
    """Class names an annotation mentions: ``C``, ``"C"``, ``C | None``, ``Optional[C]``."""
    names: set[str] = set()
    if node is None:
        return names
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return names
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            names |= _annotation_classes(sub)
    return names


def _constructed(value: ast.expr | None) -> str:
    """``C`` for a plain constructor call ``C(...)``; ``cls`` for an alternative
    constructor called in a classmethod (``[await] cls.make(...)``); else ``""``."""
    if isinstance(value, ast.Await):
        value = value.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
        return value.func.id
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id == "cls"
    ):
        return "cls"
    return ""


def _self_attr_names(targets: Iterable[ast.expr]) -> set[str]:
    """``x`` for each ``self.x`` among assignment targets."""
    return {t.attr for t in targets if isinstance(t, ast.Attribute) and _is_self_attr(t)}


class _Module(ast.NodeVisitor):
    """Walks one module, tracking which names hold objects of the module's own classes."""

    def __init__(
        self,
        path: str,
        tree: ast.Module,
        package_modules: frozenset[str],
        owners: dict[str, set[str]],
    ) -> None:
        self.path = path
        self.package_modules = package_modules
        self.owners = owners
        self.own_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        self.findings: list[Finding] = []
        # Scopes: a stack of sets of local names known to hold own-class objects.
        self.scopes: list[set[str]] = [self._bindings(tree.body)]
        self.class_attrs: list[set[str]] = []

    # -- what is "ours" ---------------------------------------------------------------

    def _is_own(self, names: Iterable[str]) -> bool:
        # ``cls(...)`` in a classmethod builds an object of the module's own class too
        return any(n in self.own_classes or n in SELF_NAMES for n in names)

    def _bindings(self, body: Iterable[ast.stmt]) -> set[str]:
        """Names bound to own-class objects by assignments directly in ``body`` (any depth
        of if/with/try/for, not nested functions or classes)."""
        bound: set[str] = set()
        stack = list(body)
        while stack:
            stmt = stack.pop()
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if isinstance(stmt, ast.Assign) and self._is_own([_constructed(stmt.value)]):
                bound |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
            elif (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and self._is_own(_annotation_classes(stmt.annotation))
            ):
                bound.add(stmt.target.id)
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.stmt):
                    stack.append(child)
                else:
                    bound |= self._narrowed(child)
        return bound

    def _narrowed(self, expr: ast.AST) -> set[str]:
        """Names an ``isinstance(x, C)`` test in ``expr`` narrows to an own class ``C``."""
        names: set[str] = set()
        for node in ast.walk(expr):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and len(node.args) == 2
                and isinstance(node.args[0], ast.Name)
                and self._is_own(_annotation_classes(node.args[1]))
            ):
                names.add(node.args[0].id)
        return names

    def _self_attrs(self, cls: ast.ClassDef) -> set[str]:
        """Attributes of the class annotated (or constructed) as own-class objects."""
        attrs: set[str] = set()
        for node in ast.walk(cls):
            if isinstance(node, ast.AnnAssign):
                target = node.target
                if isinstance(target, ast.Name) and node in cls.body:
                    if self._is_own(_annotation_classes(node.annotation)):
                        attrs.add(target.id)
                elif _is_self_attr(target) and self._is_own(_annotation_classes(node.annotation)):
                    assert isinstance(target, ast.Attribute)
                    attrs.add(target.attr)
            elif isinstance(node, ast.Assign) and self._is_own([_constructed(node.value)]):
                attrs |= _self_attr_names(node.targets)
        for func in cls.body:
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            params = {
                a.arg for a in [*func.args.posonlyargs, *func.args.args, *func.args.kwonlyargs]
                if self._is_own(_annotation_classes(a.annotation))
            }
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.Assign)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in params
                ):
                    attrs |= _self_attr_names(node.targets)
        return attrs

    def _receiver_is_ours(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            if node.id in SELF_NAMES or node.id in self.own_classes:
                return True
            return any(node.id in scope for scope in self.scopes)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            # super().x, type(self).x
            if node.func.id == "super":
                return True
            if node.func.id == "type" and len(node.args) == 1:
                return self._receiver_is_ours(node.args[0])
        if isinstance(node, ast.Attribute) and _is_self_attr(node) and self.class_attrs:
            return node.attr in self.class_attrs[-1]
        return False

    def _is_module(self, dotted: str) -> bool:
        return dotted in self.package_modules

    # -- visiting ---------------------------------------------------------------------

    def _report(self, node: ast.AST, name: str, expr: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), name, expr))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.class_attrs.append(self._self_attrs(node))
        self.generic_visit(node)
        self.class_attrs.pop()

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        local = self._bindings(node.body)
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None and self._is_own(_annotation_classes(arg.annotation)):
                local.add(arg.arg)
        self.scopes.append(local)
        for sub in ast.walk(node):  # ``x = self._c`` with ``_c: C``
            if (
                isinstance(sub, ast.Assign)
                and isinstance(sub.value, ast.Attribute)
                and self._receiver_is_ours(sub.value)
            ):
                local |= {t.id for t in sub.targets if isinstance(t, ast.Name)}
        for sub in ast.walk(node):  # ``for x in self._items`` with ``_items: list[C]``
            if isinstance(sub, ast.For | ast.AsyncFor | ast.comprehension):
                source = sub.iter
                if (
                    isinstance(source, ast.Call)
                    and isinstance(source.func, ast.Attribute)
                    and source.func.attr == "values"
                ):
                    source = source.func.value
                elif (  # list(self._items), sorted(...): a copy of the same items
                    isinstance(source, ast.Call)
                    and isinstance(source.func, ast.Name)
                    and source.func.id in ("list", "tuple", "sorted", "set")
                    and len(source.args) == 1
                ):
                    source = source.args[0]
                if isinstance(sub.target, ast.Name) and self._receiver_is_ours(source):
                    local.add(sub.target.id)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def _only_ours(self, name: str) -> bool:
        """No other module of the package defines a member called ``name``."""
        return self.owners.get(name) == {self.path}

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if (
            is_private(node.attr)
            and not self._only_ours(node.attr)
            and not self._receiver_is_ours(node.value)
        ):
            dotted = f"{ast.unparse(node.value)}.{node.attr}"
            if not self._is_module(dotted):
                self._report(node, node.attr, dotted)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Name)
            and func.id in ATTR_FUNCS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
            and not self._only_ours(node.args[1].value)
            and not self._receiver_is_ours(node.args[0])
        ):
            self._report(node, node.args[1].value, ast.unparse(node))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.path, node.module, node.level)
        for alias in node.names:
            if is_private(alias.name) and not self._is_module(f"{base}.{alias.name}"):
                self._report(node, alias.name, f"from {base} import {alias.name}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            parts = alias.name.split(".")
            if any(is_private(p) for p in parts) and not self._is_module(alias.name):
                self._report(node, alias.name, f"import {alias.name}")


def private_members(tree: ast.Module) -> set[str]:
    """Private member names a module's classes define: methods, class attributes and
    ``self._x = ...`` / ``self._x: T`` assignments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(item.name)
                elif isinstance(item, ast.Assign):
                    names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in ast.walk(target)
                       if isinstance(t, ast.expr)]
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        names |= _self_attr_names(targets)
    return {name for name in names if is_private(name)}


def _is_self_attr(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in SELF_NAMES
    )


def _module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    if "src" in parts:
        parts = parts[parts.index("src") + 1 :]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(path: str, module: str | None, level: int) -> str:
    """The absolute module a ``from`` import names (relative imports resolved)."""
    if level == 0:
        return module or ""
    package = _module_name(path).split(".")
    if not path.endswith("__init__.py"):
        package.pop()
    package = package[: len(package) - (level - 1)]
    return ".".join([*package, module] if module else package)


def iter_sources(root: Path) -> Iterator[Path]:
    yield from sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def scan(root: Path = SOURCE, base: Path = ROOT) -> list[Finding]:
    """Every private-name use across modules under ``root`` (paths relative to ``base``)."""
    sources = list(iter_sources(root))
    modules = frozenset(_module_name(str(p.relative_to(base))) for p in sources)
    trees = {
        str(p.relative_to(base)): ast.parse(p.read_text(), filename=str(p)) for p in sources
    }
    owners: dict[str, set[str]] = {}
    for rel, tree in trees.items():
        for name in private_members(tree):
            owners.setdefault(name, set()).add(rel)
    findings: list[Finding] = []
    for rel, tree in trees.items():
        visitor = _Module(rel, tree, modules, owners)
        visitor.visit(tree)
        findings.extend(visitor.findings)
    return sorted(findings)


def read_allowlist(path: Path) -> tuple[dict[str, str], list[str]]:
    """``{"path:name": reason}`` and the problems found reading it (missing reasons)."""
    entries: dict[str, str] = {}
    problems: list[str] = []
    if not path.exists():
        return entries, problems
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, reason = line.partition(" ")
        reason = reason.strip()
        if len(reason.split()) < 3:
            problems.append(f"{path.name}:{number}: entry {key!r} needs a reason (a few words)")
        if key in entries:
            problems.append(f"{path.name}:{number}: duplicate entry {key!r}")
        entries[key] = reason
    return entries, problems


def prune(path: Path, found: set[str]) -> None:
    """Delete the allow-list's entries that match nothing in ``found`` (comments stay)."""
    kept = []
    for raw in path.read_text().splitlines(keepends=True):
        line = raw.strip()
        if line and not line.startswith("#") and line.split()[0] not in found:
            continue
        kept.append(raw)
    path.write_text("".join(kept))


def check(findings: list[Finding], allowlist: dict[str, str]) -> tuple[list[Finding], list[str]]:
    """Findings not allowed, and allow-list entries that no longer match anything."""
    unlisted = [f for f in findings if f.key not in allowlist]
    found = {f.key for f in findings}
    stale = sorted(key for key in allowlist if key not in found)
    return unlisted, stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allowlist", type=Path, default=ALLOWLIST)
    parser.add_argument("--quiet", action="store_true", help="print only problems and counts")
    parser.add_argument("--base", type=Path, default=ROOT, help="checkout to scan (its src/sandvm)")
    parser.add_argument("--prune", action="store_true",
                        help="delete stale entries from the allow-list file first")
    parser.add_argument("--keys", action="store_true",
                        help="print each file:name with its count (allow-list keys), and stop")
    args = parser.parse_args(argv)

    findings = scan(args.base / "src" / "sandvm", args.base)
    if args.keys:
        for key, count in sorted(Counter(f.key for f in findings).items()):
            print(f"{count:4} {key}")
        return 0
    if args.prune:
        prune(args.allowlist, {f.key for f in findings})
    allowlist, problems = read_allowlist(args.allowlist)
    unlisted, stale = check(findings, allowlist)
    if not args.quiet:
        for finding in findings:
            mark = "" if finding.key in allowlist else "  <- not in the allow-list"
            print(f"{finding}{mark}")
    else:
        for finding in unlisted:
            print(f"{finding}  <- not in the allow-list")
    for key in stale:
        problems.append(f"stale allow-list entry {key!r}: no longer found; delete its line"
                        " (or run tools/check_private.py --prune)")
    for problem in problems:
        print(problem)
    print(
        f"private names used across modules: {len(findings)} "
        f"({len(findings) - len(unlisted)} allowed, {len(unlisted)} not allowed); "
        f"allow-list: {len(allowlist)} entries, {len(stale)} stale"
    )
    return 1 if unlisted or problems else 0


if __name__ == "__main__":
    sys.exit(main())
