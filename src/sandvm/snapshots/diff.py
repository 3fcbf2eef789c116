"""Diff snapshots: guest RAM stored as the pages that differ from a parent snapshot's.

File format of ``mem.diff``::

    magic  b"SVMDIFF1"
    u32    page size (4096)
    u64    size of the full RAM file
    records: u64 page index, then one page of data (indexes strictly increasing)
    u64    0xFFFFFFFFFFFFFFFF (end), u64 number of records

Everything is checked when applied (magic, bounds, order, count, length): a
damaged diff raises SnapshotCorrupt, never yields a half-built RAM image.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from sandvm._files import sparse_copy
from sandvm.errors import SnapshotCorrupt

MAGIC = b"SVMDIFF1"
PAGE = 4096
BLOCK = 1 << 22  # compare in 4 MiB blocks, then page by page inside differing blocks
END = 0xFFFFFFFFFFFFFFFF
_HEAD = struct.Struct("<8sIQ")
_U64 = struct.Struct("<Q")


def write_diff(base: Path, new: Path, out: Path) -> int:
    """Write the pages of ``new`` that differ from ``base`` to ``out``; return their count.

    Both files must have the same size (the same guest memory size).
    """
    size = new.stat().st_size
    if base.stat().st_size != size:
        raise ValueError(f"{base} and {new} differ in size: not the same VM memory size")
    count = 0
    with open(base, "rb") as fb, open(new, "rb") as fn, open(out, "wb") as fo:
        fo.write(_HEAD.pack(MAGIC, PAGE, size))
        off = 0
        while off < size:
            a = fb.read(BLOCK)
            b = fn.read(BLOCK)
            if a != b:
                va, vb = memoryview(a), memoryview(b)
                for p in range(0, len(b), PAGE):
                    if va[p:p + PAGE] != vb[p:p + PAGE]:
                        fo.write(_U64.pack((off + p) // PAGE))
                        fo.write(vb[p:p + PAGE])
                        count += 1
            off += len(b)
            if not b:
                break
        fo.write(_U64.pack(END))
        fo.write(_U64.pack(count))
    return count


def apply_diff(base: Path, diff: Path, out: Path) -> int:
    """Build ``out`` = ``base`` with the pages of ``diff`` written over it.

    Returns the number of pages applied. Raises SnapshotCorrupt on any damage.
    """
    dsize = diff.stat().st_size
    with open(diff, "rb") as fd:
        head = fd.read(_HEAD.size)
        if len(head) != _HEAD.size:
            raise SnapshotCorrupt(f"{diff} is truncated (no header)")
        magic, page, size = _HEAD.unpack(head)
        if magic != MAGIC or page != PAGE:
            raise SnapshotCorrupt(f"{diff} is not a sandvm RAM diff")
        if size != base.stat().st_size:
            raise SnapshotCorrupt(f"{diff} is for {size} bytes of RAM, its parent has"
                                  f" {base.stat().st_size}")
        pages = size // PAGE
        max_records = (dsize - _HEAD.size - 16) // (8 + PAGE)
        sparse_copy(base, out)
        count = 0
        last = -1
        with open(out, "r+b") as fo:
            while True:
                raw = fd.read(8)
                if len(raw) != 8:
                    raise SnapshotCorrupt(f"{diff} is truncated")
                (idx,) = _U64.unpack(raw)
                if idx == END:
                    break
                if idx <= last or idx >= pages or count >= max_records:
                    raise SnapshotCorrupt(f"{diff} has an invalid page index {idx}")
                data = fd.read(PAGE)
                if len(data) != PAGE:
                    raise SnapshotCorrupt(f"{diff} is truncated in page {idx}")
                os.pwrite(fo.fileno(), data, idx * PAGE)
                last = idx
                count += 1
            trailer = fd.read(8)
            if len(trailer) != 8 or _U64.unpack(trailer)[0] != count or fd.read(1):
                raise SnapshotCorrupt(f"{diff} has a bad trailer")
    return count
