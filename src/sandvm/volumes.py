"""Named persistent volumes: sparse ext4 files attached to sandboxes as virtio-blk disks.

Layout under ``$SANDVM_VOLUME_STORE`` (default ``$SANDVM_HOME/volumes``)::

    <name>/volume.img       the raw ext4 file system (sparse)
    <name>/volume.json      size and creation time
    <name>/lock             flock'ed by every process that has the volume attached
    <name>/holders/<id>     who holds it (sandbox id, pid, read-only or not)
    .tmp-*                  a volume being created (renamed into place when complete)

One writer at a time: a read-write attach takes ``LOCK_EX`` on ``lock``, a
read-only one ``LOCK_SH``; the lock is held by the process that owns the
sandbox for the sandbox's life and released when it is killed, when its QEMU
dies, or when the process exits. So a second read-write attach, a read-only
attach next to a read-write one, a read-write attach next to read-only ones, and
``rm`` of an attached volume are all refused with VolumeInUse.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm.assets import sandvm_home
from sandvm.core import check_guest_path, parse_size, validate_vm_id
from sandvm.errors import (
    ImageError,
    InvalidPath,
    InvalidSpec,
    VolumeExists,
    VolumeInUse,
    VolumeNotFound,
)

__all__ = [
    "MAX_VOLUME_SIZE",
    "MIN_VOLUME_SIZE",
    "Attachment",
    "Volume",
    "VolumeAttachment",
    "VolumeInfo",
    "VolumeMount",
    "VolumeStore",
    "parse_mounts",
    "validate_volume_name",
]

MIN_VOLUME_SIZE = 16 << 20
MAX_VOLUME_SIZE = 16 << 40
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
IMAGE_FILE = "volume.img"
RECORD_FILE = "volume.json"
LOCK_FILE = "lock"
HOLDERS_DIR = "holders"
# guest paths a volume may never cover: the kernel's file systems
_RESERVED = ("/proc", "/sys", "/dev")
# and, in the built-in image (the agent's own initramfs is "/"), what the agent runs from
_RESERVED_BASE = ("/bin", "/sbin", "/lib", "/lib64", "/usr", "/run", "/etc", "/init")


def validate_volume_name(name: str) -> str:
    """Return ``name`` if it is a valid volume name; raise InvalidSpec otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidSpec(f"invalid volume name {name!r}: use 1-63 characters from a-z, 0-9,"
                          " '_', '.' and '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Volume:
    """A volume in the store: its ext4 file, its size in bytes, its creation time."""

    name: str
    path: Path
    size: int
    created: float


@dataclass(frozen=True)
class Attachment:
    """One sandbox that has a volume attached (``pid`` is the process holding the lock)."""

    sandbox_id: str
    pid: int
    read_only: bool
    since: float


@dataclass(frozen=True)
class VolumeInfo:
    """``inspect``'s answer: the volume, the bytes its file occupies, who has it attached."""

    volume: Volume
    disk_bytes: int
    attachments: tuple[Attachment, ...]

    @property
    def in_use(self) -> bool:
        return bool(self.attachments)


@dataclass(frozen=True)
class VolumeMount:
    """Where a sandbox mounts a volume: an absolute guest path, read-only or not.

    ``Sandbox.create(volumes=...)`` maps volume names to a path string
    (read-write), a ``(path, "ro" | "rw")`` tuple, or a VolumeMount.
    """

    path: str
    read_only: bool = False


def _as_mount(name: str, value: Any) -> VolumeMount:
    if isinstance(value, VolumeMount):
        return value
    if isinstance(value, str):
        return VolumeMount(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and value[1] in ("ro", "rw"):
        return VolumeMount(value[0], read_only=value[1] == "ro")
    raise InvalidSpec(f"volume {name!r}: give a guest path ('/data'), a tuple ('/data', 'ro')"
                      f" or a VolumeMount, not {value!r}")


def _covers(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def parse_mounts(volumes: Mapping[str, str | tuple[str, str] | VolumeMount] | None, *,
                 builtin_image: bool) -> list[tuple[str, VolumeMount]]:
    """Validate ``Sandbox.create``'s ``volumes``: (name, mount) pairs, parents first.

    Raises InvalidSpec for a bad name or value, InvalidPath for a path that is
    not absolute and normalized, is ``/``, lies in /proc, /sys or /dev, (in the
    built-in image) would hide what the agent runs from, or is used twice.
    """
    if not volumes:
        return []
    if not isinstance(volumes, Mapping):
        raise InvalidSpec("volumes must map volume names to guest paths, e.g."
                          " {'data': '/data'}")
    if len(volumes) > 15:
        raise InvalidSpec("at most 15 volumes per sandbox")
    out: list[tuple[str, VolumeMount]] = []
    seen: dict[str, str] = {}
    for name, value in volumes.items():
        validate_volume_name(name)
        m = _as_mount(name, value)
        path = check_guest_path(m.path)
        if posixpath.normpath(path) != path or path.startswith("//"):
            raise InvalidPath(f"volume {name!r}: mount path {path!r} is not normalized:"
                              f" use {posixpath.normpath(path)!r}")
        reserved = _RESERVED + (_RESERVED_BASE if builtin_image else ())
        bad = next((r for r in reserved if _covers(path, r)), None)
        if path == "/" or bad:
            where = " in the built-in image (the agent runs from it)" if bad in \
                _RESERVED_BASE else ""
            raise InvalidPath(f"volume {name!r} cannot be mounted at {path}{where}: mount it"
                              " at a path of its own, e.g. /data or /mnt/" + name)
        if path in seen:
            raise InvalidPath(f"volumes {seen[path]!r} and {name!r} are both mounted at {path}")
        seen[path] = name
        out.append((name, VolumeMount(path, read_only=bool(m.read_only))))
    # a volume mounted inside another one's mount point goes after it
    out.sort(key=lambda nm: nm[1].path.count("/"))
    return out


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class VolumeAttachment:
    """A volume attached to one sandbox: holds its lock until ``release``.

    Created by ``VolumeStore.attach``; ``release`` is idempotent. The lock is an
    flock on an open file, so it also goes away when this process exits.
    """

    def __init__(self, volume: Volume, *, sandbox_id: str, read_only: bool, fd: int,
                 holder: Path) -> None:
        self.volume = volume
        self.sandbox_id = sandbox_id
        self.read_only = read_only
        self._fd = fd
        self._holder = holder

    @property
    def released(self) -> bool:
        return self._fd < 0

    def release(self) -> None:
        """Drop the lock (the VM must no longer use the volume). Idempotent."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self._holder.unlink()
        fd, self._fd = self._fd, -1
        os.close(fd)  # releases the flock

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<VolumeAttachment {self.volume.name} {mode} to {self.sandbox_id}>"


class VolumeStore:
    """Named volumes under ``root`` (default ``$SANDVM_VOLUME_STORE`` or $SANDVM_HOME/volumes)."""

    def __init__(self, root: Path | None = None) -> None:
        env_root = os.environ.get("SANDVM_VOLUME_STORE")
        self.root = Path(root) if root is not None else (
            Path(env_root) if env_root else sandvm_home() / "volumes")

    def _dir(self, name: str) -> Path:
        return self.root / validate_volume_name(name)

    # ------------------------------------------------------------------ create, list

    def create(self, name: str, *, size: int | str) -> Volume:
        """Create volume ``name``: a sparse ext4 file of ``size`` bytes (e.g. "1G").

        Atomic: built under a temporary name, renamed into place. Raises
        InvalidSpec for a bad name or size, VolumeExists if it exists,
        ImageError if mke2fs fails or is missing.
        """
        validate_volume_name(name)
        nbytes = parse_size(size, what="volume size")
        if not MIN_VOLUME_SIZE <= nbytes <= MAX_VOLUME_SIZE:
            raise InvalidSpec(f"volume size {nbytes} bytes is out of range: choose between"
                              f" {MIN_VOLUME_SIZE >> 20} MiB and {MAX_VOLUME_SIZE >> 40} TiB")
        final = self._dir(name)
        if final.exists():
            raise VolumeExists(f"volume {name!r} already exists: choose another name, or"
                               f" remove it first (`sandvm volume rm {name}`)")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.root / f".tmp-{name}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        try:
            img = tmp / IMAGE_FILE
            with open(img, "wb") as f:
                f.truncate(nbytes)
            _mkfs(img, label=name[:16])
            created = time.time()
            (tmp / RECORD_FILE).write_text(json.dumps(
                {"format": 1, "name": name, "size": nbytes, "created": created}))
            (tmp / LOCK_FILE).touch()
            (tmp / HOLDERS_DIR).mkdir()
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if final.exists():
                    raise VolumeExists(f"volume {name!r} was created by someone else"
                                       " meanwhile") from exc
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Volume(name=name, path=final / IMAGE_FILE, size=nbytes, created=created)

    def _load(self, d: Path) -> Volume | None:
        try:
            rec = json.loads((d / RECORD_FILE).read_text())
            return Volume(name=d.name, path=d / IMAGE_FILE, size=int(rec["size"]),
                          created=float(rec["created"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ls(self) -> list[Volume]:
        """Every volume, sorted by name (half-created or damaged ones are left out)."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            v = self._load(d)
            if v is not None:
                out.append(v)
        return out

    def get(self, name: str) -> Volume:
        """The volume ``name``. Raises VolumeNotFound (listing those that exist)."""
        v = self._load(self._dir(name))
        if v is None or not v.path.is_file():
            names = [x.name for x in self.ls()]
            have = f"the volumes are: {', '.join(names)}" if names else "there are no volumes"
            raise VolumeNotFound(f"no volume named {name!r} ({have}): create it with"
                                 f" `sandvm volume create {name} --size 1G`")
        return v

    # ------------------------------------------------------------------ who holds it

    def _holders(self, d: Path) -> list[Attachment]:
        """Live holders recorded for the volume in ``d`` (records of dead ones removed)."""
        out = []
        hdir = d / HOLDERS_DIR
        try:
            entries = sorted(hdir.iterdir())
        except OSError:
            return []
        for p in entries:
            try:
                rec = json.loads(p.read_text())
                pid = int(rec["pid"])
                alive = _start_time(pid) == rec["start"]
                att = Attachment(sandbox_id=str(rec["sandbox_id"]), pid=pid,
                                 read_only=bool(rec["read_only"]), since=float(rec["since"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if alive:
                out.append(att)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        return out

    def _in_use(self, name: str, d: Path, *, wanted: str) -> VolumeInUse:
        holders = self._holders(d)
        if not holders:
            who = "another sandbox (it is starting or stopping)"
        else:
            who = ", ".join(
                f"sandbox {h.sandbox_id} ({'read-only' if h.read_only else 'read-write'},"
                f" pid {h.pid})" for h in holders)
        rw = any(not h.read_only for h in holders)
        if wanted == "rm":
            fix = "kill the sandbox first"
        elif wanted == "ro":
            fix = "kill that sandbox first (read-only attaches wait for the writer to go)"
        elif rw or not holders:
            fix = "only one sandbox may write to a volume: kill that sandbox first, or attach" \
                  " this one read-only once no writer is left"
        else:
            fix = "a read-write attach needs the volume to itself: kill those sandboxes first," \
                  " or attach this one read-only too"
        return VolumeInUse(f"volume {name!r} is attached to {who}: {fix}", volume=name,
                           holders=[h.sandbox_id for h in holders])

    # ------------------------------------------------------------------ attach, rm

    def attach(self, name: str, *, sandbox_id: str, read_only: bool = False) -> VolumeAttachment:
        """Lock volume ``name`` for sandbox ``sandbox_id`` (exclusive for read-write).

        The caller keeps the returned attachment for the sandbox's life and calls
        ``release`` when the VM is gone. Raises VolumeNotFound, VolumeInUse.
        """
        validate_vm_id(sandbox_id)
        vol = self.get(name)
        d = self._dir(name)
        try:
            fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VolumeNotFound(f"volume {name!r} was removed meanwhile") from None
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(name, d, wanted="ro" if read_only else "rw") from None
            # ``rm`` renames the directory away while holding the lock: check we locked
            # the volume that is still there
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(d / LOCK_FILE))
            except OSError:
                same = False
            if not same:
                raise VolumeNotFound(f"volume {name!r} was removed meanwhile")
            holder = d / HOLDERS_DIR / sandbox_id
            holder.write_text(json.dumps({
                "sandbox_id": sandbox_id, "pid": os.getpid(), "start": _start_time(os.getpid()),
                "read_only": read_only, "since": time.time()}))
        except BaseException:
            os.close(fd)
            raise
        return VolumeAttachment(vol, sandbox_id=sandbox_id, read_only=read_only, fd=fd,
                                holder=holder)

    def inspect(self, name: str) -> VolumeInfo:
        """Size, bytes on disk, creation time and current attachments of ``name``.

        Raises VolumeNotFound.
        """
        vol = self.get(name)
        d = self._dir(name)
        try:
            disk_bytes = os.stat(vol.path).st_blocks * 512
        except OSError:
            disk_bytes = 0
        attachments: tuple[Attachment, ...] = ()
        with _open_lock(d) as fd:
            # a shared probe: it never makes a starting read-write attach fail
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # a writer holds it
                attachments = tuple(self._holders(d))
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                attachments = tuple(self._holders(d))
        return VolumeInfo(volume=vol, disk_bytes=disk_bytes, attachments=attachments)

    def rm(self, name: str) -> None:
        """Remove volume ``name`` and its data. Raises VolumeNotFound, VolumeInUse."""
        self.get(name)
        d = self._dir(name)
        with _open_lock(d) as fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(name, d, wanted="rm") from None
            trash = self.root / f".rm-{name}-{secrets.token_hex(4)}"
            os.rename(d, trash)
            shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _open_lock(d: Path) -> Any:
    try:
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VolumeNotFound(f"volume {d.name!r} was removed meanwhile") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _mkfs(img: Path, *, label: str) -> None:
    """Format ``img`` as ext4, owned by root, no reserved blocks, sparse."""
    argv = ["mke2fs", "-F", "-q", "-t", "ext4", "-m", "0", "-L", label,
            "-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1", str(img)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError("mke2fs is not installed: install e2fsprogs (`sandvm setup` does)"
                         ) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-400:]
        raise ImageError(f"mke2fs failed to format the volume: {tail}")
