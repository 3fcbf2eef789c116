"""Reading untrusted tar archives with caps: what image layers and OCI archives are read
with (``sandvm.images``) and what ``files.download_dir`` extracts a guest's tar with.

A leaf below both (it imports only ``errors``), so the file transfer code, which the
remote SDK shares, does not pull in the image store.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import IO, Any

from sandvm.errors import ImageError, ImageInvalid, ImageTooLarge

__all__ = ["TarRefused", "open_untrusted_tar"]

_MAX_HEADER_BYTES = 1 << 20      # PAX / GNU long-name headers before one member, in all
_MAX_HEADER_CHAIN = 16           # extended headers in a row before one member
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class TarRefused(tarfile.TarError):
    """What the capped TarInfo raises for a tar sandvm will not read: ``too_large`` when a
    cap was hit (ImageTooLarge to the user), else a refused format (ImageInvalid)."""

    def __init__(self, message: str, *, too_large: bool) -> None:
        super().__init__(message)
        self.message = message
        self.too_large = too_large

    def image_error(self, where: str) -> ImageError:
        """This refusal as the ImageError a user sees, prefixed by ``where``."""
        cls = ImageTooLarge if self.too_large else ImageInvalid
        return cls(f"{where}: {self.message}")


def _sparse_refused(kind: str) -> TarRefused:
    return TarRefused(f"a GNU sparse member ({kind}): sandvm does not read sparse tar"
                      " members; write the tar without --sparse (-S)", too_large=False)


def open_untrusted_tar(source: Path | IO[bytes], *, stream: bool = False) -> tarfile.TarFile:
    """Open an untrusted tar for reading with sandvm's caps (the capped TarInfo).

    A ``Path`` is opened with random access and any compression tarfile knows
    (``r:*``); a file object is read as an uncompressed stream (``r|``) if
    ``stream``, else with random access (``r:*``). Extended headers (PAX, GNU long
    names) over 1 MiB before one member, more than 16 of them in a row, global PAX
    headers over 1 MiB in all, and GNU sparse members of every flavour (old GNU
    ``S``, PAX 0.0, 0.1, 1.0) are refused with :class:`TarRefused` before tarfile
    reads them into memory. Raises what ``tarfile.open`` raises (OSError,
    tarfile.TarError) and TarRefused.
    """
    if isinstance(source, Path):
        return tarfile.open(source, "r:*", tarinfo=_CappedTarInfo)
    return tarfile.open(fileobj=source, mode="r|" if stream else "r:*",
                        tarinfo=_CappedTarInfo)


_CHAIN_BYTES = "_sandvm_chain_bytes"    # extended-header bytes before the current member
_CHAIN_COUNT = "_sandvm_chain_count"    # extended headers before the current member
_GLOBAL_BYTES = "_sandvm_global_bytes"  # global PAX header bytes read so far


class _CappedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses huge extended headers and sparse members before tarfile
    reads them into memory (tarfile keeps a member's header chain, the archive's
    global PAX headers and a sparse member's whole map in memory)."""

    def _proc_member(self, tf: Any) -> Any:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse_refused("old GNU format, type 'S'")
        if self.type in _HEADER_TYPES:
            chain = getattr(tf, _CHAIN_BYTES, 0) + self.size
            count = getattr(tf, _CHAIN_COUNT, 0) + 1
            if self.size > _MAX_HEADER_BYTES or chain > _MAX_HEADER_BYTES:
                raise TarRefused(f"an extended header of {self.size} bytes ({chain} in all"
                                 f" before one member, over the {_MAX_HEADER_BYTES} byte cap)",
                                 too_large=True)
            if count > _MAX_HEADER_CHAIN:
                raise TarRefused(f"more than {_MAX_HEADER_CHAIN} extended headers before one"
                                 " member", too_large=False)
            if self.type == tarfile.XGLTYPE:
                total = getattr(tf, _GLOBAL_BYTES, 0) + self.size
                if total > _MAX_HEADER_BYTES:
                    raise TarRefused(f"global PAX headers of {total} bytes in all (over the"
                                     f" {_MAX_HEADER_BYTES} byte cap)", too_large=True)
                setattr(tf, _GLOBAL_BYTES, total)
        else:
            chain = count = 0   # a real member ends the chain
        setattr(tf, _CHAIN_BYTES, chain)
        setattr(tf, _CHAIN_COUNT, count)
        member = super()._proc_member(tf)  # type: ignore[misc]
        if member.sparse is not None or any(k.startswith("GNU.sparse.")
                                            for k in member.pax_headers):
            raise _sparse_refused("PAX GNU.sparse.* records")
        return member

    # tarfile calls these from _proc_pax once the member after a PAX header is read,
    # before it parses the sparse map: refuse there, with nothing parsed
    def _proc_sparse(self, *args: Any) -> Any:
        raise _sparse_refused("old GNU format, type 'S'")

    def _proc_gnusparse_00(self, *args: Any) -> Any:
        raise _sparse_refused("PAX format 0.0, GNU.sparse.offset/numbytes")

    def _proc_gnusparse_01(self, *args: Any) -> Any:
        raise _sparse_refused("PAX format 0.1, GNU.sparse.map")

    def _proc_gnusparse_10(self, *args: Any) -> Any:
        raise _sparse_refused("PAX format 1.0, GNU.sparse.major=1")
