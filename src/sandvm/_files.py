"""Small file-system helpers shared by the layers: the runtime dir, sparse copies."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat as stat_mod
from collections.abc import Iterator
from pathlib import Path

from sandvm.errors import ConfigError

__all__ = ["LIBC", "OWNER_FILE", "data_extents", "move_file", "owner_alive", "preallocate_like",
           "proc_start_time", "runtime_root", "sparse_copy", "write_owner"]


OWNER_FILE = "owner"


def proc_start_time(pid: int) -> str | None:
    """The start time (clock ticks since boot) of ``pid``; None if it is gone or a
    zombie (dead, not reaped: an orphan's new parent may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # field 22; the command name (field 2) may contain spaces, so split after ')'
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


def write_owner(d: Path) -> None:
    """Record that this process owns dir ``d`` (pid and start time, robust to pid
    reuse): sweeps remove the dir once that process is gone."""
    tmp = d / f".{OWNER_FILE}.{os.getpid()}"
    tmp.write_text(f"{os.getpid()} {proc_start_time(os.getpid())}\n")
    os.replace(tmp, d / OWNER_FILE)  # atomic: a sweep never reads half an owner


def owner_alive(d: Path) -> bool | None:
    """Whether the process recorded by ``write_owner`` in ``d`` still runs; None if
    ``d`` has no readable owner file."""
    try:
        pid_s, start = (d / OWNER_FILE).read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return proc_start_time(pid) == start


def runtime_root() -> Path:
    """Where per-VM runtime dirs live: tmpfs (/dev/shm) so guest RAM files cost no disk.

    ``$SANDVM_RUNTIME_DIR`` overrides the base. The directory must be a real
    directory owned by this user with mode 0700; raises ConfigError otherwise
    (someone else could reach the QMP sockets through it).
    """
    base = Path(os.environ.get("SANDVM_RUNTIME_DIR", "/dev/shm"))
    root = base / f"sandvm-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    st = os.lstat(root)
    if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(f"{root} is not a directory owned by uid {os.geteuid()}: remove it,"
                          " or set SANDVM_RUNTIME_DIR to a private directory")
    if stat_mod.S_IMODE(st.st_mode) != 0o700:
        raise ConfigError(f"{root} has mode {stat_mod.S_IMODE(st.st_mode):o}, not 700:"
                          f" run `chmod 700 {root}` or remove it")
    return root


def move_file(src: Path, dst: Path) -> None:
    """Rename, or (across file systems) copy sparsely and unlink."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        sparse_copy(src, dst)
        os.unlink(src)


def data_extents(fd: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of a file that hold data (not holes)."""
    size = os.fstat(fd).st_size
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # only holes remain
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def preallocate_like(src: Path, dst: Path) -> None:
    """Create ``dst`` with ``src``'s size and its data ranges already allocated.

    A later ``sparse_copy(src, dst, into_existing=True)`` then writes into pages
    that exist: on tmpfs that is several times faster than allocating them
    during the copy (which matters while a VM is paused for a snapshot).
    """
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        os.ftruncate(fo.fileno(), os.fstat(fi.fileno()).st_size)
        for start, end in data_extents(fi.fileno()):
            os.posix_fallocate(fo.fileno(), start, end - start)


_FALLOC_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


LIBC = ctypes.CDLL(None, use_errno=True)  # resolved once (never in a forked child)


def _punch_hole(fd: int, start: int, length: int) -> None:
    if LIBC.fallocate(fd, _FALLOC_PUNCH_HOLE, ctypes.c_long(start), ctypes.c_long(length)):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sparse_copy(src: Path, dst: Path, *, into_existing: bool = False) -> None:
    """Copy a mostly-empty RAM file keeping its holes (SEEK_DATA/SEEK_HOLE), in-kernel.

    With ``into_existing`` the copy goes into ``dst`` as it is (prepared by
    ``preallocate_like``), and ranges that are holes in ``src`` are punched in
    ``dst`` afterwards, so the result has the same content and holes.
    """
    with open(src, "rb") as fi, open(dst, "r+b" if into_existing else "wb") as fo:
        ifd, ofd = fi.fileno(), fo.fileno()
        size = os.fstat(ifd).st_size
        extents = data_extents(ifd)
        for start, end in extents:
            off = start
            while off < end:
                try:
                    n = os.copy_file_range(ifd, ofd, end - off, off, off)
                except OSError:
                    os.lseek(ofd, off, os.SEEK_SET)
                    n = os.sendfile(ofd, ifd, off, end - off)
                if n <= 0:
                    raise OSError(f"short copy of {src} at offset {off}")
                off += n
        os.ftruncate(ofd, size)
        if into_existing:
            covered = 0
            for start, end in [*extents, (size, size)]:
                if start > covered:
                    _punch_hole(ofd, covered, start - covered)
                covered = max(covered, end)


@contextlib.contextmanager
def flocked(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a blocking flock on ``path`` (created if missing) for the block: exclusive,
    or ``shared``. Released on exit, and by the kernel if this process dies."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
