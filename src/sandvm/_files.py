"""Small file-system helpers shared by the layers: the runtime dir, sparse copies."""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
from pathlib import Path

from sandvm.errors import ConfigError

__all__ = ["move_file", "runtime_root", "sparse_copy"]


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


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a mostly-empty RAM file keeping its holes (SEEK_DATA/SEEK_HOLE), in-kernel."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        ifd, ofd = fi.fileno(), fo.fileno()
        size = os.fstat(ifd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(ifd, pos, os.SEEK_DATA)
            except OSError:
                break  # only holes remain
            end = os.lseek(ifd, start, os.SEEK_HOLE)
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
            pos = end
        os.ftruncate(ofd, size)


