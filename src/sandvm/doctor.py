"""`sandvm doctor`: what this host can do, what is missing and how to fix it.

Health follows seed 003's capability report: ``healthy`` (everything present,
hardware acceleration usable), ``degraded`` (works, but e.g. TCG only) or
``unsupported`` (cannot run sandboxes until something is fixed).
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sandvm.assets.paths import find_qemu, qemu_version, read_manifest, sandvm_home
from sandvm.errors import SandvmError

HEALTHY = "healthy"
DEGRADED = "degraded"
UNSUPPORTED = "unsupported"


@dataclass
class Report:
    """The capability report, as printed by `sandvm doctor --json`."""

    health: str
    sandvm_home: str
    qemu: dict[str, Any]
    kernel: dict[str, Any]
    initramfs: dict[str, Any]
    kvm: dict[str, Any]
    accelerator: str | None
    capabilities: list[str]
    missing: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def build_report(*, refresh: bool = False) -> Report:
    """Inspect the host; run (or reuse the cached) KVM probe boot."""
    from sandvm.assets.paths import Assets
    from sandvm.providers.qemu import choose_accel

    missing: list[dict[str, str]] = []
    notes: list[str] = []
    home = sandvm_home()
    qemu_path = find_qemu()
    qemu: dict[str, Any] = {"path": str(qemu_path) if qemu_path else None, "version": None,
                            "microvm": False}
    if qemu_path is None:
        missing.append({"what": "qemu-system-x86_64",
                        "fix": "run `make setup` or `apt-get install qemu-system-x86`"})
    else:
        try:
            qemu["version"] = qemu_version(qemu_path)
            machines = subprocess.run([str(qemu_path), "-machine", "help"], capture_output=True,
                                      text=True, timeout=10, check=False).stdout
            qemu["microvm"] = "microvm" in machines
        except (OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"could not run QEMU: {exc}")
        if not qemu["microvm"]:
            missing.append({"what": "QEMU microvm machine",
                            "fix": "install Debian's qemu-system-x86 (7.2 or newer)"})
    man = read_manifest(home) or {}
    kpath = Path(man["kernel"]) if man.get("kernel") else None
    ipath = Path(man["initramfs"]) if man.get("initramfs") else None
    kernel = {"path": str(kpath) if kpath else None, "present": bool(kpath and kpath.is_file()),
              "release": man.get("kernel_release")}
    initramfs = {"path": str(ipath) if ipath else None,
                 "present": bool(ipath and ipath.is_file()),
                 "size": ipath.stat().st_size if ipath and ipath.is_file() else None}
    if not kernel["present"]:
        missing.append({"what": "guest kernel", "fix": "run `sandvm setup`"})
    if not initramfs["present"]:
        missing.append({"what": "guest initramfs", "fix": "run `sandvm setup`"})
    kvm: dict[str, Any] = {"present": Path("/dev/kvm").exists(), "usable": False, "reason": None,
                           "cached": False}
    accel: str | None = None
    if qemu_path and kernel["present"] and initramfs["present"] and qemu["microvm"]:
        assert kpath is not None and ipath is not None
        assets = Assets(kernel=kpath, initramfs=ipath,
                        kernel_release=str(man.get("kernel_release", "")), qemu=qemu_path)
        try:
            choice = await choose_accel(assets, refresh=refresh)
            kvm.update(usable=choice.kvm_usable, reason=choice.reason, cached=choice.cached)
            accel = choice.accel
        except SandvmError as exc:
            notes.append(f"KVM probe failed: {exc.message}")
            accel = "tcg"
    if missing:
        health = UNSUPPORTED
    elif accel == "kvm":
        health = HEALTHY
    else:
        health = DEGRADED
        notes.append("hardware acceleration is not usable here: VMs run under TCG"
                     " (software emulation), slower but fully isolated")
    caps = ["microvm", "agent-exec", "agent-files", "process-timeout", "process-group-kill",
            "cleanup", "no-network-device"] if health != UNSUPPORTED else []
    return Report(health=health, sandvm_home=str(home), qemu=qemu, kernel=kernel,
                  initramfs=initramfs, kvm=kvm, accelerator=accel, capabilities=caps,
                  missing=missing, notes=notes)
