"""Locating sandvm's home and the guest assets of this sandvm build.

Each build of the guest lives in ``initramfs/<build key>/`` (the key:
:func:`sandvm.assets.buildkey.build_key`) with its own ``assets.json``; the running
sandvm reads only the one under its own key. ``$SANDVM_HOME/assets.json`` still names
the build `sandvm setup` made last, for sandvm versions from before build keys.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandvm.assets.buildkey import build_key
from sandvm.errors import AssetMissing

QEMU_BINARY = "qemu-system-x86_64"


def sandvm_home() -> Path:
    """``$SANDVM_HOME`` or ``~/.cache/sandvm``."""
    env = os.environ.get("SANDVM_HOME")
    return Path(env) if env else Path.home() / ".cache" / "sandvm"


@dataclass(frozen=True)
class Assets:
    """Paths of a built guest: kernel, initramfs and the QEMU binary."""

    kernel: Path
    initramfs: Path
    kernel_release: str
    qemu: Path


def find_qemu() -> Path | None:
    env = os.environ.get("SANDVM_QEMU")
    if env:
        return Path(env) if Path(env).exists() else None
    found = shutil.which(QEMU_BINARY)
    return Path(found) if found else None


@functools.lru_cache(maxsize=8)
def qemu_version(qemu: Path) -> str | None:
    """The first line of `qemu --version` (cached per binary), or None if it fails."""
    try:
        out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def build_dir(home: Path | None = None, key: str | None = None) -> Path:
    """Where the guest build ``key`` (default: this sandvm's) lives."""
    return (home or sandvm_home()) / "initramfs" / (key or build_key())


def _read_json(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(home: Path | None = None, key: str | None = None) -> dict[str, str] | None:
    """The manifest of the guest build ``key`` (default: the one this sandvm needs),
    or None if that build was never made."""
    return _read_json(build_dir(home, key) / "assets.json")


def find_assets(home: Path | None = None) -> Assets:
    """The guest assets built for this sandvm (by its build key), never those of another
    version sharing the home. Raises AssetMissing (saying to run `sandvm setup`)."""
    home = home or sandvm_home()
    qemu = find_qemu()
    if qemu is None:
        raise AssetMissing(
            f"{QEMU_BINARY} not found: run `sandvm setup` (or `apt-get install qemu-system-x86`)"
        )
    key = build_key()
    man = read_manifest(home, key)
    if man is None:
        other = " (it holds builds of other sandvm versions only)" if (
            _read_json(home / "assets.json") is not None) else ""
        raise AssetMissing(f"the guest assets of this sandvm build ({key}) are not built in"
                           f" {home}{other}: run `sandvm setup` (or `make setup`)")
    kernel = Path(man.get("kernel", ""))
    initramfs = Path(man.get("initramfs", ""))
    for what, p in (("guest kernel", kernel), ("guest initramfs", initramfs)):
        if not p.is_file():
            raise AssetMissing(f"{what} {p} is missing: run `sandvm setup` to rebuild it")
    return Assets(
        kernel=kernel,
        initramfs=initramfs,
        kernel_release=man.get("kernel_release", ""),
        qemu=qemu,
    )
