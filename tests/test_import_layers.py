"""The layer order is real: the import contracts hold (lint-imports, as `make lint` runs it),
and importing a low layer loads only that layer (each check in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sandvm

ROOT = Path(__file__).resolve().parent.parent
VM_STACK = ("sandvm.sandbox", "sandvm.providers", "sandvm.runtime", "sandvm.server",
            "sandvm.images", "sandvm.snapshots", "sandvm.pools")


def loaded_after(code: str) -> list[str]:
    """The sandvm modules a fresh interpreter has loaded after running ``code``."""
    probe = (f"{code}\nimport json, sys\n"
             "print(json.dumps(sorted(m for m in sys.modules"
             " if m == 'sandvm' or m.startswith('sandvm.'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return list(json.loads(out.splitlines()[-1]))


def test_import_wire_loads_only_the_protocol() -> None:
    mods = loaded_after("import sandvm.wire")
    print(f"import sandvm.wire loads {len(mods)} sandvm modules: {mods}")
    assert mods == ["sandvm", "sandvm.version", "sandvm.wire"]


def test_import_root_is_lazy() -> None:
    assert loaded_after("import sandvm; sandvm.__version__") == ["sandvm", "sandvm.version"]
    mods = loaded_after("import sandvm; sandvm.CommandResult; sandvm.InvalidSpec")
    assert not [m for m in mods if m.startswith(VM_STACK)], mods
    assert "sandvm.sandbox" in loaded_after("from sandvm import Sandbox")


def test_import_client_loads_no_vm_stack() -> None:
    mods = loaded_after("import sandvm.client")
    print(f"import sandvm.client loads {len(mods)} sandvm modules")
    assert not [m for m in mods if m.startswith(VM_STACK)], mods


def test_root_names_resolve_on_first_access() -> None:
    for name in sandvm.__all__:
        value = getattr(sandvm, name)
        if name != "__version__":  # each name is the defining module's own object
            assert getattr(sys.modules[value.__module__], name) is value, name
    assert set(sandvm.__all__) <= set(dir(sandvm))
    with pytest.raises(AttributeError, match="NoSuchName"):
        sandvm.NoSuchName  # type: ignore[attr-defined]  # noqa: B018


def test_import_contracts_hold() -> None:
    tool = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(tool), "--no-logo"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
