"""Turn an imported image into an ext4 root filesystem file (no root mount needed).

The layers are applied into a staging directory (ownership, modes, devices and
xattrs kept: this needs root, or ``fakeroot``), then ``mke2fs -d`` copies the tree
into a fresh ext4 image sized to the content. The guest grows the filesystem
online to its disk's size, so the image itself stays small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from sandvm.errors import ImageError
from sandvm.images.blobs import BlobStore
from sandvm.images.layers import apply_layers
from sandvm.images.model import ImportedImage

BLOCK = 4096
MIN_FS_BYTES = 64 << 20


def _tree_size(root: Path) -> tuple[int, int]:
    """(bytes in blocks, entries) of a directory tree, without following symlinks."""
    total, entries = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
            entries += 1
    return total, entries


def _mke2fs(tree: Path, out: Path, size: int, inodes: int) -> subprocess.CompletedProcess[str]:
    with open(out, "wb") as f:
        f.truncate(size)
    return subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-N", str(inodes),
         "-L", "sandvm-root", "-m", "0", "-E", "root_owner=0:0,lazy_itable_init=1",
         "-d", str(tree), str(out)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)


def build_rootfs(blobs: BlobStore, image: ImportedImage, out: Path, *,
                 work_dir: Path, max_bytes: int = 16 << 30,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Build ``out`` (an ext4 file) from ``image``'s layers; return its build record.

    The file appears atomically (temp name, rename). Raises ImageError (and its
    ImageInvalid/ImageTooLarge subclasses from the layers); nothing is left in
    ``work_dir`` afterwards.
    """
    if os.geteuid() != 0 and "FAKEROOTKEY" not in os.environ:
        raise ImageError("building an image's root filesystem keeps file owners and device"
                         " nodes, which needs root: run as root (or under `fakeroot`)")
    if shutil.which("mke2fs") is None:
        raise ImageError("mke2fs is missing: run `sandvm setup` (it installs e2fsprogs)")
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work_dir))
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tree = staging / "tree"
        tree.mkdir(mode=0o755)
        stats = apply_layers(blobs, image.layers, tree, max_bytes=max_bytes, progress=progress)
        used, entries = _tree_size(tree)
        # room for metadata and a little growth; the guest grows it to the disk
        size = max(MIN_FS_BYTES, int(used * 1.25) + entries * 512 + (32 << 20))
        size = -(-size // (1 << 20)) * (1 << 20)
        inodes = max(4096, entries * 2)
        for _ in range(3):
            res = _mke2fs(tree, tmp_out, size, inodes)
            if res.returncode == 0:
                break
            if "No space" not in res.stderr and "Could not allocate" not in res.stderr:
                raise ImageError(f"mke2fs failed: {res.stderr.strip()[-500:]}")
            size *= 2
        else:
            raise ImageError(f"mke2fs ran out of space three times: {res.stderr.strip()[-300:]}")
        os.replace(tmp_out, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        tmp_out.unlink(missing_ok=True)
    record: dict[str, object] = {
        "manifest_digest": image.manifest_digest, "build_id": uuid.uuid4().hex,
        "size": out.stat().st_size, "content_bytes": used, "entries": stats.entries,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
