"""Confinement of one QEMU process, and its bounded logs (stdlib only: the keeper loads
this file by path).

A confined QEMU runs

- as a uid of its own (``UID_BASE`` + n, leased with an flock for as long as the VM
  lives, so one escaped QEMU cannot signal or ptrace another) with the shared group
  ``SHARED_GID`` (files it must read but does not own are given to that group), and
  ``PR_SET_NO_NEW_PRIVS``;
- in mount, network, IPC and UTS namespaces of its own: its root is an empty
  read-only tmpfs holding only ``/usr`` (read-only), a few device nodes and bind
  mounts of its own files at their usual absolute paths (so every path QEMU was
  given, and every qcow2 backing name, still resolves). It has no ``/proc``, no
  ``/etc`` beyond the loader cache, no network and no other VM's files.

This is set up between fork and exec (``enter``, a ``preexec_fn``) and before QEMU's
seccomp filter, which keeps ``elevateprivileges=deny`` (QEMU's own ``-runas`` needs
set*id calls after the filter is installed, and its ``-chroot`` would hide the paths
later opened by ``blockdev-snapshot-sync`` and ``block-commit``).

Without root the uid cannot change: a user namespace (mapping only the user's own
uid) gives the same mount and network namespaces where the kernel allows it. Modes:
``uid`` (root), ``userns`` (not root), ``none`` (``SANDVM_CONFINE=0``, or neither is
possible): see ``confinement_mode``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import stat as stat_mod
import threading
from pathlib import Path
from typing import Any

__all__ = ["LEASE_DIR", "SHARED_GID", "UID_BASE", "UID_COUNT", "BoundedLog", "enter",
           "is_confined_uid", "lease_uid", "log_tail"]

UID_BASE = 2_000_001  # per-VM uids: UID_BASE .. UID_BASE + UID_COUNT - 1
UID_COUNT = 65_536
SHARED_GID = 2_000_000  # every confined QEMU's group (files it reads but does not own)
LEASE_DIR = Path("/run/sandvm/uids")  # one flock'ed file per uid in use (machine-wide)
CONSOLE_CAP = 1 << 20  # bytes of guest console kept (the last ones)
STDERR_CAP = 256 << 10  # bytes of QEMU's own stderr kept

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = 155  # x86_64
_PR_SET_NO_NEW_PRIVS = 38
_ST_FLAGS = {1: _MS_RDONLY, 2: _MS_NOSUID, 4: _MS_NODEV, 8: _MS_NOEXEC, 1024: 1 << 10,
             2048: 1 << 11, 4096: 1 << 12}  # statvfs f_flag -> locked mount flags

_LIBC = ctypes.CDLL(None, use_errno=True)


def is_confined_uid(uid: int) -> bool:
    """Whether ``uid`` is one of the per-VM uids."""
    return UID_BASE <= uid < UID_BASE + UID_COUNT


def lease_uid(lease_dir: Path = LEASE_DIR) -> tuple[int, int]:
    """Lease a per-VM uid nobody else holds: (uid, fd of its flock'ed lease file). The
    lease lasts while that fd (or a copy inherited by a keeper) is open. Raises OSError
    if the lease dir cannot be made or every uid is taken."""
    lease_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    start = random.randrange(UID_COUNT)
    for i in range(UID_COUNT):
        uid = UID_BASE + (start + i) % UID_COUNT
        fd = os.open(lease_dir / str(uid), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    raise OSError(errno.EAGAIN, f"all {UID_COUNT} confined QEMU uids are in use")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_LIBC.mount(src.encode() if src else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {target}")


def _locked_flags(path: str) -> int:
    flags = 0
    f_flag = os.statvfs(path).f_flag
    for bit, ms in _ST_FLAGS.items():
        if f_flag & bit and ms != _MS_RDONLY:
            flags |= ms
    return flags


def _bind(root: str, src: str, *, writable: bool, noexec: bool = True) -> None:
    target = root + src
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    _mount(src, target, None, _MS_BIND)
    flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _locked_flags(target)
    if noexec:
        flags |= _MS_NOEXEC
    if not writable:
        flags |= _MS_RDONLY
    _mount(None, target, None, flags)


def enter(plan: dict[str, Any]) -> None:
    """Confine the calling process (a child between fork and exec) as ``plan`` says:
    ``mode`` (uid | userns | none), ``uid``, ``groups``, ``root`` (an empty dir for the
    new root), ``ro``/``rw`` (paths to bind at their own place), ``dev`` (device nodes).
    Raises OSError if any step fails (the child must then not exec QEMU)."""
    mode = plan.get("mode", "none")
    if mode == "none":
        return
    outer_uid, outer_gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    if mode == "userns":
        flags |= _CLONE_NEWUSER
    _check(_LIBC.unshare(flags), "unshare")
    if mode == "userns":
        for name, text in (("setgroups", "deny"), ("uid_map", f"{outer_uid} {outer_uid} 1"),
                           ("gid_map", f"{outer_gid} {outer_gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    root = str(plan["root"])
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k,nr_inodes=512")
    _bind(root, "/usr", writable=False, noexec=False)
    for name in os.listdir("/"):  # merged /usr: /lib -> usr/lib and the like
        with contextlib.suppress(OSError):
            link = os.readlink("/" + name)
            if link.startswith("usr/") or link.startswith("/usr/"):
                os.symlink(link, f"{root}/{name}")
    if os.path.exists("/etc/ld.so.cache"):
        _bind(root, "/etc/ld.so.cache", writable=False)
    for dev in plan.get("dev", ()):
        target = root + dev
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        _mount(dev, target, None, _MS_BIND)
    for path in sorted(plan.get("ro", ()), key=len):
        _bind(root, path, writable=False)
    for path in sorted(plan.get("rw", ()), key=len):
        _bind(root, path, writable=True)
    os.chdir(root)
    _check(_LIBC.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_LIBC.umount2(b".", _MNT_DETACH), "detach the old root")
    os.chdir("/")
    _mount(None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    if mode == "uid":
        uid = int(plan["uid"])
        gid = int(plan.get("gid", SHARED_GID))
        os.setgroups([gid, *(int(g) for g in plan.get("groups", ()))])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError(errno.EPERM, "could not drop to the VM's uid")
    _check(_LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


class BoundedLog:
    """A byte stream (a guest console, QEMU's stderr) kept on disk as its last ``cap``
    bytes: written to ``path`` until it holds ``cap // 2``, which then becomes
    ``path.1`` (replacing the older half). Readers use ``log_tail``. ``pump`` reads an
    fd to its end on a daemon thread."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.half = max(4096, cap // 2)
        self._f = open(path, "ab")  # noqa: SIM115 - closed at the end of the stream
        self._size = self._f.tell()
        self.total = 0

    def write(self, data: bytes) -> None:
        while data:
            n = min(len(data), self.half - self._size)
            self._f.write(data[:n])
            self._f.flush()
            self._size += n
            self.total += n
            data = data[n:]
            if self._size >= self.half:
                self._f.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self._f = open(self.path, "wb")  # noqa: SIM115
                self._size = 0

    def close(self) -> None:
        self._f.close()

    def pump(self, fd: int) -> threading.Thread:
        """Read ``fd`` until EOF into this log (then close both) on a daemon thread."""

        def run() -> None:
            try:
                while True:
                    try:
                        data = os.read(fd, 65536)
                    except InterruptedError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    try:
                        self.write(data)
                    except (OSError, ValueError):  # the runtime dir is gone: drain only
                        continue
            finally:
                os.close(fd)
                with contextlib.suppress(OSError):
                    self.close()

        t = threading.Thread(target=run, name=f"log:{self.path.name}", daemon=True)
        t.start()
        return t


def log_tail(path: Path, max_bytes: int = 8192) -> bytes:
    """The last ``max_bytes`` of a BoundedLog (its older half first), b"" if none.
    Symlinks are not followed (a runtime dir is the host's, but be strict)."""
    out = b""
    for p in (path.with_name(path.name + ".1"), path):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                continue
            size = st.st_size
            want = min(size, max_bytes)
            out += os.pread(fd, want, size - want)
        finally:
            os.close(fd)
    return out[-max_bytes:]
