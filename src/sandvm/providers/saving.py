"""Saving a QEMU VM as a snapshot in the store: the one code path for every snapshot.

``save_vm`` is what ``AsyncSandbox.snapshot`` (and so ``fork`` and ``pause(to_disk)``)
and the seed-000 port's ``QemuVmProvider.snapshot_vm`` both run: the VM's device state
and RAM go to a tmpfs dir while it is paused, the caller's ``resume`` hook lets it run
again, its disk layers are exported (``export_disks``), the caller's ``after_export``
hook runs (the sandbox kills itself or merges its disks and steps the guest clock), the
RAM is diffed against a parent if one is given, and the files are committed with their
sha256 by ``SnapshotStore.commit`` (see snapshots/store.py for the format).

``save_spec`` is the seed port's answer for a VM that was created but never booted: it
has no state and no RAM, so its snapshot holds its spec only (``"ram": "none"``); such a
snapshot verifies and loads, but restoring it raises SnapshotIncompatible.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm._files import move_file, runtime_root, sparse_copy, write_owner
from sandvm.assets import Assets
from sandvm.assets.paths import qemu_version
from sandvm.core import VmSpec
from sandvm.errors import InvalidSpec
from sandvm.providers.launch import qemu_img
from sandvm.providers.qemu_vm import QemuVm
from sandvm.snapshots.diff import write_diff
from sandvm.snapshots.store import Snapshot, SnapshotStore
from sandvm.version import __version__

__all__ = ["Saved", "export_disks", "save_spec", "save_vm"]


@dataclass(frozen=True)
class Saved:
    """A committed snapshot and how long saving it took: ``pause_s`` (vCPUs stopped),
    ``until_resumed_s`` (until the ``resume`` hook returned), ``total_s``."""

    snapshot: Snapshot
    pause_s: float
    until_resumed_s: float
    total_s: float


async def save_vm(vm: QemuVm, store: SnapshotStore, name: str, *, stop: bool = False,
                  parent: Snapshot | str | None = None, source_id: str,
                  resume: Callable[[], Awaitable[None]],
                  after_export: Callable[[], Awaitable[None]],
                  extra: Mapping[str, Any] | None = None) -> Saved:
    """Save the booted VM ``vm`` (device state, RAM, disk layers) as snapshot ``name``.

    The VM is paused while its state and RAM are copied (moved with ``stop``: the VM
    is then about to be destroyed); ``resume()`` runs right after, also when saving
    failed (it decides whether the VM runs again). ``after_export()`` runs once the
    disk layers are in the staging dir. ``parent`` (a full snapshot in ``store`` of the
    same memory size, of a VM that was booted, not restored) makes a diff snapshot.
    ``source_id`` and ``extra`` go into the manifest. Nothing is left behind on
    failure. Raises SnapshotAlreadyExists, SnapshotNotFound (the parent),
    InvalidSpec (a bad parent), QmpError, VmError, QuotaExceeded.
    """
    parent_snap = None
    if parent is not None:
        parent_snap = store.resolve(parent)
        if parent_snap.path.parent != store.root:
            raise InvalidSpec("a diff snapshot's parent must be in the same store")
        if parent_snap.ram != "file" or vm.private_ram:
            raise InvalidSpec("diff snapshots need a full parent snapshot and a sandbox"
                              " that was booted, not restored")
        if parent_snap.spec.memory_mib != vm.spec.memory_mib:
            raise InvalidSpec("the parent snapshot has a different memory size")
    staging = store.staging(name)  # owned by us: removed if we die before commit
    # while the VM is paused, its state goes to tmpfs (fast); to the store after
    fast = Path(tempfile.mkdtemp(prefix="snap-", dir=runtime_root()))
    write_owner(fast)  # a sweep removes it if we die before removing it ourselves
    t0 = time.monotonic()
    try:
        try:
            await vm.save_state(fast, take_memory=stop)
        finally:
            await resume()
            # the vCPUs ran until ``stop`` and run again once ``cont`` returns
            paused = time.monotonic() - (vm.stopped_at or t0)
        resumed = time.monotonic() - t0
        await export_disks(vm, staging)
        await after_export()
        if parent_snap is not None:
            await asyncio.to_thread(write_diff, parent_snap.path / "mem", fast / "mem",
                                    staging / "mem.diff")
            (fast / "mem").unlink()
        for fname in ("state", "mem"):
            if (fast / fname).exists():  # no mem when the RAM is in the stream
                await asyncio.to_thread(move_file, fast / fname, staging / fname)
        manifest = {
            **await _host_fields(vm.assets, vm.accel), "source_id": source_id,
            # its disks are the layer files beside it (``export_disks``): their
            # serials and sizes only, no host paths
            "spec": {**vm.spec.to_dict(),
                     "disks": [{"serial": d.serial, "overlay_size": d.overlay_size}
                               for d in vm.spec.disks]},
            **(extra or {}),
        }
        if parent_snap is not None:
            manifest["parent"] = {"name": parent_snap.name,
                                  "mem_sha256": parent_snap.files["mem"]["sha256"]}
        snap = await asyncio.to_thread(store.commit, staging, name, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(fast, ignore_errors=True)
    return Saved(snapshot=snap, pause_s=paused, until_resumed_s=resumed,
                 total_s=time.monotonic() - t0)


async def save_spec(store: SnapshotStore, name: str, spec: VmSpec, *, assets: Assets,
                    accel: str, source_id: str) -> Snapshot:
    """Snapshot ``name`` of a VM that was never booted: its spec only (``"ram":
    "none"``, no files; its disks, if any, as the spec names them). It verifies and
    loads like any snapshot; restoring it raises SnapshotIncompatible (create a VM
    with its spec instead). Raises SnapshotAlreadyExists, QuotaExceeded."""
    staging = store.staging(name)
    try:
        manifest = {**await _host_fields(assets, accel), "source_id": source_id,
                    "spec": spec.to_dict()}
        return await asyncio.to_thread(store.commit, staging, name, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


async def export_disks(vm: QemuVm, staging: Path) -> None:
    """Write each disk frozen by the last save into ``staging`` as a self-contained
    pair: ``image-<serial>.ext4`` (a hard link to, or copy of, the image's root
    filesystem) and ``disk-<serial>.qcow2`` (every write since, folded into one
    layer whose backing file is that image, named relatively). Raises VmError."""
    for serial, frozen in vm.frozen_disks.items():
        image = vm.disk_images[serial]
        pinned = staging / f"image-{serial}.ext4"
        await asyncio.to_thread(_link_or_copy, image, pinned)
        dst = staging / f"disk-{serial}.qcow2"
        await asyncio.to_thread(sparse_copy, frozen, dst)
        info = await qemu_img("info", "--output=json", "-U", str(dst))
        if json.loads(info).get("full-backing-filename") != str(image):
            # fold every layer between this one and the image into it
            await qemu_img("rebase", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw",
                           str(dst))
        # same content, now found beside it wherever the snapshot is moved
        await qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", pinned.name, "-F", "raw",
                       str(dst))


async def _host_fields(assets: Assets, accel: str) -> dict[str, Any]:
    """The manifest's record of what took the snapshot (checked before a restore)."""
    qemu = await asyncio.to_thread(qemu_version, assets.qemu) or "?"
    return {"sandvm_version": __version__, "qemu_version": qemu, "machine": "microvm",
            "accelerator": accel, "cpu": "host" if accel == "kvm" else "max",
            "kernel_release": assets.kernel_release, "created": time.time()}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        sparse_copy(src, dst)
