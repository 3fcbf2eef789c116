"""Snapshots on disk: a self-describing directory per snapshot, written atomically.

Layout of ``<store>/<name>/``::

    manifest.json   format + version, sandvm/QEMU versions, machine, accelerator,
                    the VM spec, and each file's size and sha256
    state           QEMU device state (a migration stream, x-ignore-shared: no RAM)
    mem             guest RAM (sparse); restored MAP_PRIVATE, so clones share it

A snapshot of a sandbox that was itself restored keeps its RAM inside ``state``
(``"ram": "stream"``): restoring it loads the RAM into a fresh private file, so
such clones do not share pages, but the restored VM can be snapshotted again.

A snapshot of a VM that was created but never booted (the seed-000 port's
``QemuVmProvider.snapshot_vm`` on a Created VM: no QEMU ran, so there is no device
state and no RAM) holds its spec only (``"ram": "none"``, no files; its disks as the
spec names them, nothing of them copied). It loads and verifies like any snapshot,
but restoring it (``materialize``, so ``AsyncSandbox.from_snapshot``) raises
SnapshotIncompatible: create a VM with its spec instead.

A snapshot is written into ``<store>/.staging-*`` and renamed into place only
after every file and the manifest are fsynced: a crash mid-save leaves no
directory that looks like a snapshot. Loading checks the manifest (format,
version, compatibility) and every file's size; ``verify`` also checks the
sha256 of every file. Restores check small files' sha256 every time and files
over 1 MiB (the RAM) once per process (cached by inode, size and mtime), or
every time with ``verify="full"``.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm._files import OWNER_FILE, owner_alive, runtime_root, write_owner
from sandvm.assets import sandvm_home
from sandvm.core import DiskSpec, ImageRecord, VmSpec, validate_vm_id
from sandvm.errors import (
    InvalidSpec,
    QuotaExceeded,
    SnapshotAlreadyExists,
    SnapshotCorrupt,
    SnapshotIncompatible,
    SnapshotNotFound,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "Snapshot", "SnapshotStore", "sha256_file"]

FORMAT = "sandvm-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = ("state", "mem")
# "file": RAM in the mem file (restored copy-on-write, shared between clones);
# "stream": RAM inside the state stream (a snapshot of a VM that was itself restored;
# restoring it loads the RAM into a fresh private file)
# "diff": only the pages that differ from a parent "file" snapshot (mem.diff); restores
# use a full RAM file built once from parent + diff (cached in the runtime dir)
# "none": no state and no RAM (a VM never booted): the spec only, which cannot be restored
RAM_KINDS: dict[str, tuple[str, ...]] = {
    "file": ("state", "mem"), "stream": ("state",), "diff": ("state", "mem.diff"), "none": ()}
# a disk's layer: everything written to it since its image, as a qcow2 over the image
# and the image's root filesystem under it (a hard link to the image cache's file)
DISK_FILE = re.compile(r"disk-([a-z0-9][a-z0-9-]{0,19})\.qcow2|image-([a-z0-9][a-z0-9-]{0,19})"
                       r"\.ext4")
MAX_MANIFEST = 1 << 20
ONCE_THRESHOLD = 1 << 20  # files larger than this are hashed once per process by default
# the materialised RAM images' key format (part of every key: a change makes new ones)
MATERIALIZED_FORMAT = b"sandvm-materialized-1"

_verified_lock = threading.Lock()
_verified: set[tuple[int, int, int, int, str]] = set()  # (dev, ino, size, mtime_ns, sha)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 22)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """A snapshot on disk, as its manifest describes it."""

    name: str
    path: Path
    spec: VmSpec
    created: float
    accelerator: str
    qemu_version: str
    sandvm_version: str
    kernel_release: str
    source_id: str | None
    files: dict[str, dict[str, Any]]
    ram: str = "file"
    parent: str | None = None
    parent_mem_sha256: str | None = None
    image: ImageRecord | None = None  # the image of a sandbox with a root disk

    @property
    def size_bytes(self) -> int:
        """Bytes the snapshot's files occupy on disk (the RAM file is sparse)."""
        total = 0
        for name in (*self.files, MANIFEST):
            with contextlib.suppress(OSError):
                total += (self.path / name).stat().st_blocks * 512
        return total


def _fail(path: Path, why: str) -> SnapshotCorrupt:
    return SnapshotCorrupt(f"snapshot {path} is damaged: {why}; remove it and take it again")


def parse_manifest(path: Path) -> dict[str, Any]:
    """Read and validate ``path/manifest.json``. Raises SnapshotCorrupt/Incompatible."""
    mpath = path / MANIFEST
    try:
        raw = mpath.read_bytes()[:MAX_MANIFEST + 1]
    except FileNotFoundError:
        raise _fail(path, "it has no manifest.json (not a snapshot, or a partial one)") from None
    except OSError as exc:
        raise _fail(path, f"cannot read its manifest ({exc})") from None
    if len(raw) > MAX_MANIFEST:
        raise _fail(path, "its manifest is implausibly large")
    try:
        man = json.loads(raw)
    except ValueError:
        raise _fail(path, "its manifest is not valid JSON") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise SnapshotIncompatible(f"{path} is not a sandvm snapshot (format"
                                   f" {man.get('format') if isinstance(man, dict) else None!r})")
    version = man.get("format_version")
    if version != FORMAT_VERSION:
        raise SnapshotIncompatible(
            f"snapshot {path} has format version {version!r}; this sandvm reads version"
            f" {FORMAT_VERSION}: take the snapshot again with this version")
    ram = man.setdefault("ram", "file")
    if ram not in RAM_KINDS:
        raise SnapshotIncompatible(f"snapshot {path} keeps its RAM as {ram!r}, which this"
                                   " sandvm cannot restore")
    files = man.get("files")
    if not isinstance(files, dict) or {f for f in files if not DISK_FILE.fullmatch(f)} != set(
            RAM_KINDS[ram]):
        raise _fail(path, "its manifest does not list exactly the files "
                          + " and ".join(RAM_KINDS[ram]) + " (and disk layers)")
    for name, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64):
            raise _fail(path, f"its manifest entry for {name} is malformed")
    return man


def _snapshot_from(path: Path, man: dict[str, Any]) -> Snapshot:
    spec_d = man.get("spec")
    if not isinstance(spec_d, dict):
        raise _fail(path, "its manifest has no VM spec")
    try:
        # a snapshot's disks are its layer files, found beside the manifest wherever the
        # snapshot is moved: the manifest keeps only their serials and sizes (a spec-only
        # snapshot, "none", keeps its spec's disks as they were given: nothing was copied)
        disks = []
        for d in spec_d.get("disks") or []:
            if man["ram"] == "none":
                disks.append(DiskSpec.from_dict(d).to_dict())
                continue
            name = f"disk-{d['serial']}.qcow2"
            if name not in man["files"]:
                raise InvalidSpec(f"disk {d['serial']!r} has no layer file")
            disks.append(DiskSpec(serial=d["serial"], path=str(path / name), format="qcow2",
                                  overlay_size=d["overlay_size"]).to_dict())
        spec = VmSpec.from_dict({**spec_d, "disks": disks})
    except (KeyError, TypeError, InvalidSpec) as exc:
        raise _fail(path, f"its VM spec is invalid ({exc})") from None
    try:
        image = ImageRecord.from_dict(man["image"]) if man.get("image") is not None else None
    except InvalidSpec as exc:
        raise _fail(path, f"its image record is invalid ({exc})") from None

    def s(key: str) -> str:
        v = man.get(key)
        return v if isinstance(v, str) else ""

    created = man.get("created")
    source = man.get("source_id")
    parent = man.get("parent")
    if man["ram"] == "diff" and not (
            isinstance(parent, dict) and isinstance(parent.get("name"), str)
            and isinstance(parent.get("mem_sha256"), str)):
        raise _fail(path, "it is a diff snapshot without a valid parent reference")
    return Snapshot(name=path.name, path=path, spec=spec,
                    created=float(created) if isinstance(created, (int, float)) else 0.0,
                    accelerator=s("accelerator"), qemu_version=s("qemu_version"),
                    sandvm_version=s("sandvm_version"), kernel_release=s("kernel_release"),
                    source_id=source if isinstance(source, str) else None,
                    files=man["files"], ram=man["ram"],
                    parent=parent["name"] if isinstance(parent, dict) else None,
                    parent_mem_sha256=parent.get("mem_sha256")
                    if isinstance(parent, dict) else None,
                    image=image)


class SnapshotStore:
    """A directory of snapshots (default ``$SANDVM_SNAPSHOT_DIR`` or ``$SANDVM_HOME/snapshots``).

    ``max_bytes``: the disk the store may use (``bytes_used``); a ``commit`` that would
    take it over is refused (QuotaExceeded) and leaves nothing behind. None: no cap.
    """

    def __init__(self, root: Path | str | None = None, *, max_bytes: int | None = None) -> None:
        env = os.environ.get("SANDVM_SNAPSHOT_DIR")
        self.root = Path(root) if root is not None else (
            Path(env) if env else sandvm_home() / "snapshots")
        if max_bytes is not None and (isinstance(max_bytes, bool)
                                      or not isinstance(max_bytes, int) or max_bytes < 1):
            raise InvalidSpec(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        self.max_bytes = max_bytes

    def bytes_used(self, *, staged: Path | None = None) -> int:
        """Bytes the store's snapshots take on disk (blocks allocated: a sparse RAM file
        counts what it holds), with the ``staged`` directory of a save if given (not
        other saves in progress, nor deletions). A file also linked from outside them
        (a disk image's root filesystem shared with the image cache) is not the
        store's: it counts once only the store keeps it."""
        seen: dict[tuple[int, int], list[int]] = {}  # inode: [links seen, nlink, bytes]
        tops = [p for p in self.root.iterdir() if not p.name.startswith(".")] \
            if self.root.is_dir() else []
        for top in ([*tops, staged] if staged is not None else tops):
            for d, _, files in os.walk(top):
                for fname in files:
                    with contextlib.suppress(OSError):
                        st = os.lstat(os.path.join(d, fname))
                        entry = seen.setdefault((st.st_dev, st.st_ino),
                                                [0, st.st_nlink, st.st_blocks * 512])
                        entry[0] += 1
        return sum(size for links, nlink, size in seen.values() if links >= nlink)

    def _dir(self, name: str) -> Path:
        validate_vm_id(name)
        return self.root / name

    def resolve(self, ref: Snapshot | str | Path) -> Snapshot:
        """A Snapshot (re-read from disk), a name in this store, or a snapshot directory.

        Raises like ``get``.
        """
        if isinstance(ref, Snapshot):
            return self.load(ref.path)
        if isinstance(ref, Path) or "/" in ref:
            return self.load(Path(ref))
        return self.get(ref)

    def exists(self, name: str) -> bool:
        return self._dir(name).is_dir()

    def get(self, name: str) -> Snapshot:
        """Load a snapshot's manifest and check its files' sizes.

        Raises SnapshotNotFound, SnapshotCorrupt, SnapshotIncompatible.
        """
        path = self._dir(name)
        if not path.is_dir():
            raise SnapshotNotFound(f"no snapshot named {name!r} in {self.root}"
                                   " (see `sandvm snapshot ls`)")
        return self.load(path)

    @staticmethod
    def load(path: Path) -> Snapshot:
        """Load the snapshot in directory ``path`` (any location). Raises like ``get``."""
        man = parse_manifest(path)
        for fname, meta in man["files"].items():
            try:
                size = (path / fname).stat().st_size
            except FileNotFoundError:
                raise _fail(path, f"its {fname} file is missing") from None
            if size != meta["size"]:
                raise _fail(path, f"its {fname} file has {size} bytes, the manifest says"
                                  f" {meta['size']} (truncated?)")
        return _snapshot_from(path, man)

    def list(self) -> builtins.list[Snapshot]:
        """Every valid snapshot, by name (damaged ones are skipped; ``verify`` names them)."""
        out: builtins.list[Snapshot] = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            with contextlib.suppress(SnapshotCorrupt, SnapshotIncompatible, InvalidSpec):
                out.append(self.load(p))
        return out

    def remove(self, name: str) -> None:
        """Delete a snapshot. Raises SnapshotNotFound. VMs restored from it keep running."""
        path = self._dir(name)
        if not path.is_dir():
            raise SnapshotNotFound(f"no snapshot named {name!r} in {self.root}")
        with contextlib.suppress(SnapshotCorrupt, SnapshotIncompatible, InvalidSpec, OSError):
            snap = self.load(path)
            if snap.ram == "diff":  # its full RAM image, built for restores
                shutil.rmtree(self.materialized_dir(snap), ignore_errors=True)
        # rename first so a half-deleted directory never looks like a snapshot
        trash = self.root / f".trash-{name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def verify(snap: Snapshot, *, full: bool = True) -> None:
        """Check every file's sha256 (``full``), or small files every time and files over
        1 MiB once per process. Raises SnapshotCorrupt."""
        for fname in sorted(snap.files, key=lambda f: snap.files[f]["size"]):  # cheap first
            meta = snap.files[fname]
            p = snap.path / fname
            try:
                st = p.stat()
            except FileNotFoundError:
                raise _fail(snap.path, f"its {fname} file is missing") from None
            if st.st_size != meta["size"]:
                raise _fail(snap.path, f"its {fname} file has {st.st_size} bytes, the manifest"
                                       f" says {meta['size']}")
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, meta["sha256"])
            if not full and meta["size"] > ONCE_THRESHOLD:
                with _verified_lock:
                    if key in _verified:
                        continue
            if sha256_file(p) != meta["sha256"]:
                raise _fail(snap.path, f"its {fname} file does not match its sha256")
            with _verified_lock:
                _verified.add(key)
        if snap.ram == "diff":  # a diff is only as good as its parent
            store = SnapshotStore(snap.path.parent)
            store.verify(store.parent_of(snap), full=full)

    def staging(self, name: str) -> Path:
        """A fresh staging directory for snapshot ``name``, owned by this process: if it
        dies before ``commit``, the next save into this store (or ``clean_staging``,
        run by ``sandvm gc``) removes it. Raises SnapshotAlreadyExists."""
        if self._dir(name).exists():
            raise SnapshotAlreadyExists("", name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_staging()  # saves cut off by their process's death: RAM-sized
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=self.root))
        write_owner(staging)
        return staging

    def commit(self, staging: Path, name: str, manifest: dict[str, Any]) -> Snapshot:
        """Hash the staged files, write the manifest, fsync, rename into place."""
        files: dict[str, dict[str, Any]] = {}
        ram = ("file" if (staging / "mem").exists() else
               "diff" if (staging / "mem.diff").exists() else
               "stream" if (staging / "state").exists() else "none")
        disks = sorted(p.name for p in staging.iterdir() if DISK_FILE.fullmatch(p.name))
        for fname in (*RAM_KINDS[ram], *disks):
            p = staging / fname
            files[fname] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        # the small files are fsynced; the RAM file is not (flushing hundreds of MiB
        # would dominate the save): after an OS crash its sha256 no longer matches
        # and the snapshot is refused as corrupt, never restored half-way
        if ram != "none":
            _fsync(staging / "state")
        (staging / OWNER_FILE).unlink(missing_ok=True)  # not part of the snapshot
        man = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "ram": ram,
               "files": files}
        mpath = staging / MANIFEST
        mpath.write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
        _fsync(mpath)
        _fsync(staging)
        dest = self._dir(name)
        with self._quota_lock():  # measured and renamed with no other commit in between
            if dest.exists():
                shutil.rmtree(staging, ignore_errors=True)
                raise SnapshotAlreadyExists("", name)
            self._check_quota(staging, name)
            os.rename(staging, dest)
        _fsync(self.root)
        snap = _snapshot_from(dest, man)
        if ram == "file":
            st = (dest / "mem").stat()
            with _verified_lock:  # we just hashed it
                _verified.add((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                               files["mem"]["sha256"]))
        return snap

    @contextlib.contextmanager
    def _quota_lock(self) -> Iterator[None]:
        """With ``max_bytes``: an exclusive lock on the store (also against other
        processes) while a commit measures and renames."""
        if self.max_bytes is None:
            yield
            return
        fd = os.open(self.root / ".quota.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _check_quota(self, staging: Path, name: str) -> None:
        """Raises QuotaExceeded (``staging`` removed) if the store is over ``max_bytes``
        with the staged snapshot in it."""
        if self.max_bytes is None:
            return
        used = self.bytes_used(staged=staging)
        if used <= self.max_bytes:
            return
        size = sum(p.lstat().st_blocks * 512 for p in staging.iterdir())
        shutil.rmtree(staging, ignore_errors=True)
        raise QuotaExceeded(
            f"snapshot {name!r} takes {_mib(size)} on disk; with it the snapshots in"
            f" {self.root} would take {_mib(used)}, over the store's cap of"
            f" {_mib(self.max_bytes)}: remove snapshots first", size=size, used=used,
            max_bytes=self.max_bytes)

    def parent_of(self, snap: Snapshot) -> Snapshot:
        """The parent of a diff snapshot (same store), checked to be the one it was
        made against. Raises SnapshotNotFound, SnapshotCorrupt."""
        assert snap.parent is not None
        try:
            parent = self.get(snap.parent)
        except SnapshotNotFound:
            raise SnapshotNotFound(f"diff snapshot {snap.name!r} needs its parent snapshot"
                                   f" {snap.parent!r}, which is not in {self.root}") from None
        if parent.ram != "file" or parent.files["mem"]["sha256"] != snap.parent_mem_sha256:
            raise _fail(snap.path, f"its parent {snap.parent!r} is not the snapshot it was"
                                   " made against (it was replaced?)")
        return parent

    @staticmethod
    def materialized_dir(snap: Snapshot, cache_root: Path | None = None) -> Path:
        """Where ``materialize`` keeps the full RAM image of the "diff" snapshot
        ``snap``: a key over everything the built bytes depend on (the parent's RAM,
        the diff and the device state, by sha256), so that two diffs with the same
        bytes over different parents (another tenant's, say) never share one."""
        assert snap.ram == "diff" and snap.parent_mem_sha256 is not None
        h = hashlib.sha256(MATERIALIZED_FORMAT)
        for part in (snap.parent_mem_sha256, snap.files["mem.diff"]["sha256"],
                     snap.files["state"]["sha256"]):
            h.update(b"\0" + part.encode())
        return (cache_root or materialized_root()) / h.hexdigest()[:32]

    def materialize(self, snap: Snapshot, cache_root: Path | None = None) -> Path:
        """A directory with ``state`` and a full ``mem`` for restoring ``snap``.

        For a "diff" snapshot the full RAM file is built once from the parent and
        the diff, under ``cache_root`` (at ``materialized_dir``: keyed by the parent's
        RAM, the diff and the state) and reused by every later restore. Raises
        SnapshotCorrupt, SnapshotNotFound (the parent is gone), SnapshotIncompatible (a
        spec-only snapshot: nothing to restore).
        """
        if snap.ram == "none":
            raise SnapshotIncompatible(
                f"snapshot {snap.name} is of a VM that was never booted: it holds the VM's"
                " spec only (no memory, no device state), so there is nothing to restore;"
                " create a VM with its spec instead (Snapshot.spec), or snapshot the VM once"
                " it runs")
        if snap.ram != "diff":
            return snap.path
        from sandvm.snapshots.diff import apply_diff

        cache_root = cache_root or materialized_root()
        done = self.materialized_dir(snap, cache_root)
        key = done.name
        if (done / "mem").exists():
            return done
        parent = self.parent_of(snap)
        self.verify(parent, full=False)
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_root))
        try:
            apply_diff(parent.path / "mem", snap.path / "mem.diff", tmp / "mem")
            shutil.copyfile(snap.path / "state", tmp / "state")
            try:
                os.rename(tmp, done)
            except OSError:  # built concurrently by someone else: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return done

    def clean_staging(self, *, older_than: float = 3600.0) -> builtins.list[Path]:
        """Remove leftovers of interrupted saves and deletions (not those in progress):
        staging dirs whose owning process is gone, and those with no owner (a save
        cut off in ``commit``, a deletion) not touched for ``older_than`` seconds."""
        removed = []
        if self.root.is_dir():
            now = time.time()
            for p in self.root.iterdir():
                if p.name.startswith((".staging-", ".trash-")):
                    with contextlib.suppress(OSError):
                        alive = owner_alive(p)
                        if alive is False or (alive is None and
                                              now - p.stat().st_mtime >= older_than):
                            shutil.rmtree(p, ignore_errors=True)
                            removed.append(p)
        return removed


def materialized_root() -> Path:
    """Where full RAM images built from diff snapshots are cached (tmpfs)."""
    return runtime_root() / "materialized"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
