"""Pure value types shared by every layer: VM states, specs, ids, validation.

No I/O here.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sandvm.errors import InvalidPath, InvalidSpec, UnknownImage
from sandvm.values import SIGNALS, VmState

__all__ = [
    "BUILTIN_IMAGES",
    "DEFAULT_MEMORY_MIB",
    "DEFAULT_VCPUS",
    "MAX_MEMORY_MIB",
    "MAX_VCPUS",
    "MIN_MEMORY_MIB",
    "ROOT_DISK",
    "DiskSpec",
    "ImageRecord",
    "VmSpec",
    "VmState",
    "VmView",
    "check_guest_path",
    "escape_text",
    "new_id",
    "parse_memory",
    "parse_size",
    "signal_number",
    "validate_vm_id",
]

DEFAULT_MEMORY_MIB = 256
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 16384
DEFAULT_VCPUS = 1
MAX_VCPUS = 16
BUILTIN_IMAGES = ("base",)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SERIAL_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
ROOT_DISK = "root"  # serial of the disk a sandbox's image root filesystem is on


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NOT_PLAIN = re.compile(r"[^\x20-\x7e]")  # the only candidates: ASCII text passes fast


def escape_text(text: str, *, keep: str = "") -> str:
    """``text`` (a guest's, QEMU's, a tenant's) with every control, format, line or
    paragraph separator, surrogate, private-use and unassigned character written as a
    Python escape (``\\x1b``, ``\\u202e``), except those in ``keep`` (e.g. ``"\\n"``):
    safe to print on a terminal or to put in an error message or one log line."""

    def one(m: re.Match[str]) -> str:
        ch = m.group(0)
        if ch in keep or unicodedata.category(ch) not in _ESCAPED_CATEGORIES:
            return ch
        code = ord(ch)
        return _NAMED_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else
                                          f"\\u{code:04x}" if code < 0x10000 else
                                          f"\\U{code:08x}")

    return _NOT_PLAIN.sub(one, text)


def new_id(prefix: str = "sb") -> str:
    """A fresh random id such as ``sb-3f9a1c2d7e``."""
    return f"{prefix}-{secrets.token_hex(5)}"


def validate_vm_id(vm_id: str) -> str:
    """Return ``vm_id`` if usable as an id (and a file name); raise InvalidSpec otherwise."""
    if not isinstance(vm_id, str) or not _ID_RE.fullmatch(vm_id):
        raise InvalidSpec(
            f"invalid id {vm_id!r}: use 1-63 characters from letters, digits, '.', '_' and '-',"
            " starting with a letter or digit"
        )
    return vm_id


def parse_memory(value: str | int) -> int:
    """Parse a memory size (``512``, ``"512M"``, ``"1G"``, ``"1GiB"``) into MiB."""
    if isinstance(value, bool):
        raise InvalidSpec(
            f"invalid memory size {value!r}: give MiB as a number, e.g. 512 or '1G'")
    if isinstance(value, int):
        mib = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:([MmGg])(?:i?[Bb])?)?\s*", str(value))
        if not m:
            raise InvalidSpec(
                f"invalid memory size {value!r}: give MiB as a number,"
                " or a size like '512M' or '1G'")
        mib = int(m.group(1)) * (1024 if (m.group(2) or "").lower() == "g" else 1)
    if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
        raise InvalidSpec(
            f"memory {mib} MiB is out of range: choose between {MIN_MEMORY_MIB} and"
            f" {MAX_MEMORY_MIB} MiB"
        )
    return mib


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Parse a byte size (``1073741824``, ``"512M"``, ``"1G"``, ``"1GiB"``) into bytes."""
    if isinstance(value, bool):
        raise InvalidSpec(f"invalid {what} {value!r}: give bytes or a size like '1G'")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KkMmGgTt]?)(?:i?[Bb])?\s*", str(value))
        if not m:
            raise InvalidSpec(f"invalid {what} {value!r}: give bytes or a size like '512M'"
                              " or '1G'")
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if n <= 0:
        raise InvalidSpec(f"{what} must be positive, got {value!r}")
    return n


def check_guest_path(path: str) -> str:
    """Return ``path`` if it is an absolute guest path; raise InvalidPath otherwise."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidPath(f"guest path {path!r} is not absolute: give a path starting with '/'")
    if "\x00" in path:
        raise InvalidPath(f"guest path {path!r} contains a NUL byte")
    if len(path.encode()) > 4096:
        raise InvalidPath("guest path is longer than 4096 bytes")
    return path


def signal_number(sig: int | str) -> int:
    """A signal's number from its name (``"TERM"``, ``"SIGKILL"``: one of ``SIGNALS``) or
    number (1..64). Raises InvalidSpec."""
    if isinstance(sig, str):
        name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
        if name not in SIGNALS:
            raise InvalidSpec(f"unknown signal {sig!r}: use one of {', '.join(SIGNALS)}")
        return int(SIGNALS[name])
    if not 1 <= int(sig) <= 64:
        raise InvalidSpec(f"signal {sig} is out of range 1..64")
    return int(sig)


@dataclass(frozen=True, kw_only=True)
class DiskSpec:
    """A virtio-blk disk: a host file the guest finds by ``serial``.

    With ``overlay_size`` the VM gets a private qcow2 overlay of that many bytes
    over ``path`` (which QEMU then only reads); without, ``path`` is attached as is.
    """

    serial: str
    path: str
    format: str = "raw"
    read_only: bool = False
    overlay_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.serial, str) or not _SERIAL_RE.fullmatch(self.serial):
            raise InvalidSpec(f"disk serial {self.serial!r}: use 1-20 of a-z, 0-9 and '-'")
        if not isinstance(self.path, str) or not self.path.startswith("/") \
                or any(c in self.path for c in ",\x00\n"):
            raise InvalidSpec(f"disk path {self.path!r} must be absolute, without ',' or"
                              " newlines")
        if self.format not in ("raw", "qcow2"):
            raise InvalidSpec(f"disk format {self.format!r}: use 'raw' or 'qcow2'")
        if self.overlay_size is not None and (
                isinstance(self.overlay_size, bool) or not isinstance(self.overlay_size, int)
                or self.overlay_size < (1 << 20)):
            raise InvalidSpec("overlay_size must be an int of at least 1 MiB")

    def to_dict(self) -> dict[str, Any]:
        """This disk as JSON-ready data (``from_dict`` reads it back)."""
        return {"serial": self.serial, "path": self.path, "format": self.format,
                "read_only": self.read_only, "overlay_size": self.overlay_size}

    @classmethod
    def from_dict(cls, data: object) -> DiskSpec:
        """A DiskSpec from ``to_dict``'s data (a journal's, a snapshot's: validated as
        untrusted). Raises InvalidSpec."""
        d = _fields_of(data, "disk", required=("serial", "path"),
                       optional=("format", "read_only", "overlay_size"))
        read_only = d.get("read_only", False)
        if not isinstance(read_only, bool):
            raise InvalidSpec(f"disk read_only must be true or false, got {read_only!r}")
        return cls(serial=d["serial"], path=d["path"], format=d.get("format", "raw"),
                   read_only=read_only, overlay_size=d.get("overlay_size"))


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    """What a VM should look like; validated on construction.

    ``image`` is a built-in image, or any image name when the spec carries its
    root filesystem as the disk with serial ``root``. Raises UnknownImage for an
    unknown image, InvalidSpec for a memory size or vCPU count out of range, a
    malformed kernel argument or disks with duplicate serials.
    """

    image: str = "base"
    memory_mib: int = DEFAULT_MEMORY_MIB
    vcpus: int = DEFAULT_VCPUS
    kernel_args: tuple[str, ...] = field(default=())
    disks: tuple[DiskSpec, ...] = field(default=())

    @property
    def root_disk(self) -> DiskSpec | None:
        """The disk holding the image's root filesystem, if the image has one."""
        return next((d for d in self.disks if d.serial == ROOT_DISK), None)

    def __post_init__(self) -> None:
        if not isinstance(self.disks, tuple) or not all(
                isinstance(d, DiskSpec) for d in self.disks):
            raise InvalidSpec("disks must be a tuple of DiskSpec")
        serials = [d.serial for d in self.disks]
        if len(set(serials)) != len(serials):
            raise InvalidSpec(f"disks have duplicate serials: {serials}")
        if len(self.disks) > 16:
            raise InvalidSpec("at most 16 disks per VM")
        if not isinstance(self.image, str) or not self.image or (
                self.image not in BUILTIN_IMAGES and self.root_disk is None):
            raise UnknownImage(
                f"unknown image {self.image!r}: the built-in images are"
                f" {', '.join(BUILTIN_IMAGES)}"
            )
        if isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int):
            raise InvalidSpec(f"memory_mib must be an int, got {self.memory_mib!r}")
        parse_memory(self.memory_mib)
        if (
            isinstance(self.vcpus, bool)
            or not isinstance(self.vcpus, int)
            or not 1 <= self.vcpus <= MAX_VCPUS
        ):
            raise InvalidSpec(f"vcpus {self.vcpus!r} is out of range: choose 1 to {MAX_VCPUS}")
        if not isinstance(self.kernel_args, tuple):
            raise InvalidSpec("kernel_args must be a tuple of words")
        for arg in self.kernel_args:
            if not isinstance(arg, str) or not arg or any(c.isspace() for c in arg):
                raise InvalidSpec(f"kernel argument {arg!r} must be one word without spaces")

    def to_dict(self) -> dict[str, Any]:
        """This spec as JSON-ready data (``from_dict`` reads it back): how a journal
        record, a snapshot manifest and a provider persist a spec."""
        return {"image": self.image, "memory_mib": self.memory_mib, "vcpus": self.vcpus,
                "kernel_args": list(self.kernel_args),
                "disks": [d.to_dict() for d in self.disks]}

    @classmethod
    def from_dict(cls, data: object) -> VmSpec:
        """A VmSpec from ``to_dict``'s data, validated as untrusted; missing fields take
        their defaults (records written before they existed). Raises InvalidSpec
        (UnknownImage for an unknown built-in image)."""
        d = _fields_of(data, "VM spec", required=(),
                       optional=("image", "memory_mib", "vcpus", "kernel_args", "disks"))
        args, disks = d.get("kernel_args", []), d.get("disks", [])
        if not isinstance(args, (list, tuple)):
            raise InvalidSpec("kernel_args must be a list of words")
        if not isinstance(disks, (list, tuple)):
            raise InvalidSpec("disks must be a list")
        return cls(image=d.get("image", "base"),
                   memory_mib=d.get("memory_mib", DEFAULT_MEMORY_MIB),
                   vcpus=d.get("vcpus", DEFAULT_VCPUS), kernel_args=tuple(args),
                   disks=tuple(DiskSpec.from_dict(x) for x in disks))


def _fields_of(data: object, what: str, *, required: tuple[str, ...],
               optional: tuple[str, ...]) -> dict[str, Any]:
    """``data`` as a dict with the keys ``required`` and maybe ``optional``, nothing
    else. Raises InvalidSpec."""
    if not isinstance(data, Mapping):
        raise InvalidSpec(f"a {what} must be an object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    unknown = sorted(str(k) for k in data if k not in required and k not in optional)
    if missing or unknown:
        raise InvalidSpec(f"a {what} needs {', '.join(required) or 'no fields'}"
                          f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}"
                          f"{'; unknown fields ' + ', '.join(unknown) if unknown else ''}")
    return dict(data)


def _or_empty(value: Any) -> Any:
    """None (as old records have it) read as "" (anything else is checked as it is)."""
    return "" if value is None else value


def _words(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidSpec(f"image {what} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """The image a sandbox's root disk holds, as it was resolved when the sandbox was
    made: its name and digests, its root filesystem (the raw file under the disk's
    layers), the disk's size and the image's run config (``env``, ``working_dir``,
    ``user``, ``entrypoint``, ``cmd``: what commands run with). Persisted in journal
    records and snapshot manifests through ``to_dict``/``from_dict``.
    """

    name: str
    manifest_digest: str
    build_id: str
    rootfs: str
    disk_size: int
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("name", "manifest_digest", "build_id", "rootfs", "working_dir", "user"):
            if not isinstance(getattr(self, name), str):
                raise InvalidSpec(f"image {name} must be a string")
        if not self.name:
            raise InvalidSpec("an image record needs a name")
        if isinstance(self.disk_size, bool) or not isinstance(self.disk_size, int) \
                or self.disk_size <= 0:
            raise InvalidSpec(f"image disk_size must be a positive int, got {self.disk_size!r}")
        for name in ("env", "entrypoint", "cmd"):
            _words(getattr(self, name), name)

    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data, in the layout journals and snapshot manifests
        have always kept (the run config under ``config``)."""
        return {"name": self.name, "manifest_digest": self.manifest_digest,
                "build_id": self.build_id, "rootfs": self.rootfs, "disk_size": self.disk_size,
                "config": {"env": list(self.env), "working_dir": self.working_dir,
                           "user": self.user, "entrypoint": list(self.entrypoint),
                           "cmd": list(self.cmd)}}

    @classmethod
    def from_dict(cls, data: object) -> ImageRecord:
        """An ImageRecord from ``to_dict``'s data, validated as untrusted. Raises
        InvalidSpec."""
        d = _fields_of(data, "image record", required=("name", "rootfs", "disk_size"),
                       optional=("manifest_digest", "build_id", "config"))
        cfg = _fields_of(d.get("config") or {}, "image config", required=(),
                         optional=("env", "working_dir", "user", "entrypoint", "cmd"))
        return cls(name=d["name"], manifest_digest=d.get("manifest_digest", ""),
                   build_id=d.get("build_id", ""), rootfs=d["rootfs"],
                   disk_size=d["disk_size"], env=_words(cfg.get("env", []), "env"),
                   working_dir=_or_empty(cfg.get("working_dir")),
                   user=_or_empty(cfg.get("user")),
                   entrypoint=_words(cfg.get("entrypoint", []), "entrypoint"),
                   cmd=_words(cfg.get("cmd", []), "cmd"))


@dataclass(frozen=True)
class VmView:
    """A read-only view of one VM as a provider's ``VmQuery`` reports it."""

    vm_id: str
    state: VmState
    spec: VmSpec
    snapshots: tuple[str, ...] = ()
    failure: str | None = None
