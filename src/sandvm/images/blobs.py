"""Content-addressed blob store shared by every image: ``<root>/sha256/<hex>``.

A blob is written to a temporary file in the store, hashed while written, and
renamed into place only when its digest and size match: a crash or a lie leaves
nothing that looks valid. Partial downloads stay under ``<root>/partial`` so a
pull can resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from sandvm.errors import ConfigError, DigestMismatch, ImageInvalid, ImageNotFound, ImageTooLarge

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_CHUNK = 1 << 20
MAX_BLOB_ENV = "SANDVM_MAX_BLOB_BYTES"
DEFAULT_MAX_BLOB_BYTES = 16 << 30   # no layer over this could be applied anyway (16 GiB of files)
DISK_RESERVE = 256 << 20            # free space a download leaves on the store's file system


def max_blob_bytes() -> int:
    """The largest blob an image may declare: ``$SANDVM_MAX_BLOB_BYTES`` (bytes), else
    16 GiB. Raises ConfigError if the variable is not a positive integer."""
    raw = os.environ.get(MAX_BLOB_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BLOB_BYTES
    if not raw.isdigit() or int(raw) <= 0:
        raise ConfigError(f"{MAX_BLOB_ENV} must be a positive number of bytes, got {raw[:50]!r}")
    return int(raw)


def parse_digest(digest: str) -> str:
    """The hex part of a ``sha256:<64 hex>`` digest. Raises ImageInvalid otherwise."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise ImageInvalid(f"unsupported or malformed digest {str(digest)[:100]!r}"
                           " (sandvm accepts sha256:<64 hex digits>)")
    return m.group(1)


class BlobStore:
    """Blobs by digest under ``root``; every write is verified before it is visible."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "partial").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob lives (it may not exist)."""
        return self.root / "sha256" / parse_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def open(self, digest: str) -> BinaryIO:
        """Open a stored blob for reading. Raises ImageNotFound."""
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise ImageNotFound(f"blob {digest} is not in the local cache") from None

    def check_room(self, blobs: Iterable[tuple[str | None, int]], what: str) -> None:
        """Refuse blobs (digest or None if not known yet, declared size) before any is
        fetched: each must be at most :func:`max_blob_bytes`, and those not stored yet
        (less what partial downloads hold) must fit in the store's free disk space with
        256 MiB to spare. Raises ImageTooLarge (saying what to change), ConfigError."""
        cap = max_blob_bytes()
        need, seen = 0, set()
        for digest, size in blobs:
            if size > cap:
                raise ImageTooLarge(f"{what}: a blob of {size} bytes ({digest or 'a layer'}) is"
                                    f" over the {cap} byte cap; raise {MAX_BLOB_ENV} if the"
                                    " image is really that large")
            if digest is not None:
                if digest in seen or self.has(digest):
                    continue
                seen.add(digest)
                with contextlib.suppress(OSError):
                    size -= min(size, self.partial_path(digest).stat().st_size)
            need += size
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if need + DISK_RESERVE > free:
            raise ImageTooLarge(f"{what} needs {need} bytes of blobs and the image store's file"
                                f" system has {free} bytes free (keeping {DISK_RESERVE} spare):"
                                " free some"
                                " space (`sandvm image prune`) or use another image store"
                                " ($SANDVM_IMAGE_STORE)")

    def partial_path(self, digest: str) -> Path:
        """Where a resumable download of ``digest`` accumulates."""
        return self.root / "partial" / parse_digest(digest)

    def put_chunks(self, digest: str, chunks: Iterable[bytes], *, size: int | None = None,
                   prefix: Path | None = None) -> Path:
        """Store ``chunks`` as blob ``digest``; verify size (if given) and sha256.

        ``prefix`` is an already-downloaded start of the blob (a partial file, which
        is consumed). Reading stops as soon as more than ``size`` bytes arrive.
        Raises DigestMismatch (nothing is stored then).
        """
        want = parse_digest(digest)
        h = hashlib.sha256()
        total = 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "partial", prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                if prefix is not None and prefix.exists():
                    with open(prefix, "rb") as f:
                        while block := f.read(_CHUNK):
                            h.update(block)
                            out.write(block)
                            total += len(block)
                for block in chunks:
                    total += len(block)
                    if size is not None and total > size:
                        raise DigestMismatch(f"blob {digest} is larger than the {size} bytes"
                                             " its descriptor declares")
                    h.update(block)
                    out.write(block)
            if size is not None and total != size:
                raise DigestMismatch(f"blob {digest} has {total} bytes, its descriptor"
                                     f" declares {size}")
            if h.hexdigest() != want:
                raise DigestMismatch(f"blob content hashes to sha256:{h.hexdigest()},"
                                     f" not {digest}")
            os.replace(tmp, self.path(digest))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if prefix is not None:
            with contextlib.suppress(FileNotFoundError):
                prefix.unlink()
        return self.path(digest)

    def put_file(self, digest: str, src: Path, *, size: int | None = None) -> Path:
        """Store a copy of ``src`` as blob ``digest`` (verified). Raises DigestMismatch."""
        if self.has(digest):
            return self.path(digest)

        def chunks() -> Iterable[bytes]:
            with open(src, "rb") as f:
                while block := f.read(_CHUNK):
                    yield block
        return self.put_chunks(digest, chunks(), size=size)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            self.put_chunks(digest, [data], size=len(data))
        return digest

    def remove(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def digests(self) -> list[str]:
        """Every stored blob's digest."""
        return sorted("sha256:" + p.name for p in (self.root / "sha256").iterdir()
                      if _DIGEST.fullmatch("sha256:" + p.name))
