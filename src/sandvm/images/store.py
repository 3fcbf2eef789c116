"""The local image cache: named images, their blobs and their built root filesystems.

Layout under ``$SANDVM_IMAGE_STORE`` (default ``$SANDVM_HOME/images``)::

    blobs/sha256/<hex>        every manifest, config and layer, verified (shared)
    blobs/partial/<hex>       resumable downloads
    rootfs/<hex>.ext4 (.json) the ext4 built from a manifest, and its build record
    refs.json                 name -> manifest digest, config digest, source
    tmp/                      staging for builds (emptied on failure)

Writers hold ``lock`` (flock), so concurrent pulls/loads/prunes never see each
other's half-done work. Image names: ``base`` (built in, no disk), any name
given by ``load``/``pull``, or a source ``oci:<dir>[:tag]``,
``oci-archive:<tar>[:tag]``, ``docker-archive:<tar>[:repo:tag]`` imported on use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandvm._files import flocked
from sandvm.assets import sandvm_home
from sandvm.core import BUILTIN_IMAGES
from sandvm.errors import ImageInvalid, ImageNotFound, UnknownImage
from sandvm.images.blobs import BlobStore, parse_digest
from sandvm.images.manifest import load_json, parse_config, parse_manifest
from sandvm.images.model import ImageConfig, ImportedImage, LayerRef

SOURCE_PREFIXES = ("oci:", "oci-archive:", "docker-archive:")
DEFAULT_IMAGE = "debian"  # the default once `sandvm image build-default` has built it
DEFAULT_CACHE_MAX = 20 << 30
IMPORT_GRACE = 3600.0  # while imports run, unnamed files younger than this are kept


@dataclass(frozen=True)
class StoredImage:
    """A named image whose root filesystem is built and ready to attach."""

    name: str
    manifest_digest: str
    config: ImageConfig
    rootfs: Path
    build_id: str
    rootfs_bytes: int
    layers: tuple[LayerRef, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ImageInfo:
    """One line of ``sandvm image ls``."""

    name: str
    manifest_digest: str
    layers_bytes: int
    rootfs_bytes: int | None
    added: float
    source: str


def split_source(image: str) -> tuple[str, Path, str | None]:
    """``oci:./dir:tag`` -> ("oci", Path("./dir"), "tag"); the tag is optional."""
    kind, _, rest = image.partition(":")
    path, ref = rest, None
    if not Path(rest).exists() and ":" in rest:
        head, _, tail = rest.rpartition(":") if kind != "docker-archive" else _docker_split(rest)
        path, ref = head, tail or None
    if not path:
        raise ImageInvalid(f"{image!r}: give a path after '{kind}:'")
    return kind, Path(path), ref


def _docker_split(rest: str) -> tuple[str, str, str]:
    # docker-archive:<tar>:<repo>:<tag>: the path ends at the first ':' after a file
    for i, ch in enumerate(rest):
        if ch == ":" and Path(rest[:i]).is_file():
            return rest[:i], ":", rest[i + 1:]
    return rest, "", ""


class ImageStore:
    """Named images and their built root filesystems under ``root``."""

    def __init__(self, root: Path | None = None, *, cache_max: int | None = None) -> None:
        env_root = os.environ.get("SANDVM_IMAGE_STORE")
        self.root = root or (Path(env_root) if env_root else sandvm_home() / "images")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owner_only(self.root, 0o700)   # images may hold secrets: the store is ours alone
        self.blobs = BlobStore(self.root / "blobs")
        (self.root / "rootfs").mkdir(exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        env_max = os.environ.get("SANDVM_IMAGE_CACHE_MAX")
        self.cache_max = cache_max if cache_max is not None else (
            int(env_max) if env_max and env_max.isdigit() else DEFAULT_CACHE_MAX)

    # ------------------------------------------------------------------ locking, refs

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for anything that writes refs, rootfs or removes blobs."""
        with flocked(self.root / ".lock"):
            yield

    @contextlib.contextmanager
    def importing(self) -> Iterator[None]:
        """Held (shared, any number at once) while an image's blobs are written before
        it has a name: a prune meanwhile, in any process, keeps recent unnamed blobs,
        partial downloads and builds instead of deleting them under the import."""
        with flocked(self.root / ".imports", shared=True):
            yield

    def _imports_in_flight(self) -> bool:
        with open(self.root / ".imports", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def _refs(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads((self.root / "refs.json").read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, RecursionError) as exc:
            raise ImageInvalid(f"{self.root / 'refs.json'} is damaged ({exc}): remove it and"
                               " load or pull your images again") from None
        return doc if isinstance(doc, dict) else {}

    def _write_refs(self, refs: dict[str, dict[str, Any]]) -> None:
        tmp = self.root / f".refs.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(refs, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.root / "refs.json")

    def tag(self, name: str, image: ImportedImage, *, source: str) -> None:
        """Name ``image`` (replacing what the name meant before)."""
        if not name or len(name) > 255 or any(c.isspace() for c in name) or name in \
                BUILTIN_IMAGES or name.startswith(SOURCE_PREFIXES):
            raise ImageInvalid(f"invalid image name {name!r}")
        with self.lock():
            refs = self._refs()
            refs[name] = {"manifest": image.manifest_digest, "config": image.config_digest,
                          "source": source, "added": time.time()}
            self._write_refs(refs)

    # ------------------------------------------------------------------ reading images

    def imported(self, manifest_digest: str) -> ImportedImage:
        """The image whose manifest is in the blob store. Raises ImageNotFound."""
        with self.blobs.open(manifest_digest) as f:
            doc = load_json(f.read(), "manifest")
        mt = doc.get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
        man = parse_manifest(doc, str(mt))
        with self.blobs.open(man.config.digest) as f:
            config = parse_config(f.read())
        return ImportedImage(manifest_digest, man.config.digest, config, man.layers)

    def rootfs_path(self, manifest_digest: str) -> Path:
        return self.root / "rootfs" / f"{parse_digest(manifest_digest)}.ext4"

    def ensure_rootfs(self, image: ImportedImage,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Build the image's ext4 unless cached; return its build record. Raises ImageError."""
        from sandvm.images.rootfs import build_rootfs

        out = self.rootfs_path(image.manifest_digest)
        rec = out.with_suffix(".json")
        with contextlib.suppress(OSError, ValueError):  # cached: no lock, no waiting
            if out.exists():
                cached: dict[str, Any] = json.loads(rec.read_text())
                os.utime(rec)
                _owner_only(out, 0o600)   # built before images were made 0600
                return cached
        with self.lock():
            if out.exists() and rec.exists():
                with contextlib.suppress(ValueError):
                    record: dict[str, Any] = json.loads(rec.read_text())
                    os.utime(rec)  # last use, for the cache cap
                    return record
            return build_rootfs(self.blobs, image, out, work_dir=self.root / "tmp",
                                progress=progress)

    def get(self, name: str) -> StoredImage:
        """A named or source image, its rootfs built. Raises UnknownImage, ImageError."""
        if name.startswith(SOURCE_PREFIXES):
            with self.importing():
                image = self.import_source(name)
                record = self.ensure_rootfs(image)
        else:
            ref = self._refs().get(name)
            if ref is None:
                raise UnknownImage(
                    f"unknown image {name!r}: the images here are "
                    f"{', '.join([*BUILTIN_IMAGES, *sorted(self._refs())])}; add one with"
                    " `sandvm image pull` or `sandvm image load`, or name a source such as"
                    " oci:./layout:tag")
            image = self.imported(ref["manifest"])
            record = self.ensure_rootfs(image)
        return StoredImage(name=name, manifest_digest=image.manifest_digest,
                           config=image.config, rootfs=self.rootfs_path(image.manifest_digest),
                           build_id=str(record.get("build_id", "")),
                           rootfs_bytes=int(record.get("size", 0)), layers=image.layers)

    # ------------------------------------------------------------------ adding images

    def import_source(self, source: str) -> ImportedImage:
        """Import ``oci:``/``oci-archive:``/``docker-archive:`` sources (verified)."""
        from sandvm.images.oci import import_archive, import_layout

        kind, path, ref = split_source(source)
        if not path.exists():
            raise ImageNotFound(f"{path} does not exist")
        if kind == "oci":
            if not path.is_dir():
                raise ImageInvalid(f"{path} is not a directory: use oci-archive: for a tar")
            return import_layout(path, self.blobs, ref=ref)
        return import_archive(path, self.blobs, ref=ref)

    def load(self, path: Path, *, name: str | None = None, ref: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> StoredImage:
        """Import a layout dir or an archive (``ref`` picks one of several images in it),
        name it, build its rootfs. Raises ImageError."""
        from sandvm.images.oci import default_name, import_archive, import_layout

        if not path.exists():
            raise ImageNotFound(f"{path} does not exist")
        with self.importing():
            image = (import_layout(path, self.blobs, ref=ref) if path.is_dir()
                     else import_archive(path, self.blobs, ref=ref))
            name = name or default_name(path, image, ref=ref)
            self.ensure_rootfs(image, progress)  # a bad layer fails here: nothing is named
            self.tag(name, image, source=str(path.resolve()))
        self.enforce_cap()
        return self.get(name)

    def add_pulled(self, name: str, image: ImportedImage, *, source: str,
                   progress: Callable[[int, int], None] | None = None) -> StoredImage:
        """Name a pulled image and build its rootfs (call it inside ``importing()``,
        with the pull)."""
        with self.importing():
            self.ensure_rootfs(image, progress)
            self.tag(name, image, source=source)
        self.enforce_cap()
        return self.get(name)

    def pull(self, ref: str, *, insecure_registries: Sequence[str] = (),
             username: str | None = None, password: str | None = None,
             token_realms: Sequence[str] = (),
             progress: Callable[[str, int, int], None] | None = None,
             build_progress: Callable[[int, int], None] | None = None) -> StoredImage:
        """Pull ``ref`` from its registry (options as :func:`sandvm.images.registry.pull`),
        build its rootfs and name it ``ref`` (normalised). Raises ImageError and its
        subclasses, RegistryError, ConfigError."""
        from sandvm.images.registry import parse_reference
        from sandvm.images.registry import pull as registry_pull

        name = str(parse_reference(ref))
        with self.importing():
            imported = registry_pull(ref, self.blobs, insecure_registries=insecure_registries,
                                     username=username, password=password,
                                     token_realms=token_realms, progress=progress)
            return self.add_pulled(name, imported, source=f"registry:{name}",
                                   progress=build_progress)

    # ------------------------------------------------------------------ listing, removal

    def ls(self) -> list[ImageInfo]:
        """Every named image with the bytes of its layers and its built rootfs."""
        out = []
        for name, ref in sorted(self._refs().items()):
            try:
                image = self.imported(ref["manifest"])
                layers = sum(x.size for x in image.layers)
            except (ImageNotFound, ImageInvalid):
                layers = 0
            rootfs = self.rootfs_path(ref["manifest"])
            out.append(ImageInfo(name=name, manifest_digest=ref["manifest"],
                                 layers_bytes=layers,
                                 rootfs_bytes=_allocated(rootfs) if rootfs.exists() else None,
                                 added=float(ref.get("added", 0)),
                                 source=str(ref.get("source", ""))))
        return out

    def rm(self, name: str) -> None:
        """Forget a name, then drop what no other name uses. Raises UnknownImage."""
        with self.lock():
            refs = self._refs()
            if name not in refs:
                raise UnknownImage(f"no image named {name!r} (see `sandvm image ls`)")
            del refs[name]
            self._write_refs(refs)
        self.prune()

    def _referenced(self) -> tuple[set[str], set[str]]:
        """(blob digests, manifest digests) some name still needs."""
        blobs, manifests = set(), set()
        for ref in self._refs().values():
            manifests.add(ref["manifest"])
            blobs.update({ref["manifest"], ref.get("config", "")})
            with contextlib.suppress(ImageNotFound, ImageInvalid):
                blobs.update(x.digest for x in self.imported(ref["manifest"]).layers)
        return blobs, manifests

    def prune(self) -> int:
        """Remove blobs, root filesystems and partial downloads no name uses; return bytes."""
        freed = 0
        with self.lock():
            # imports in flight (here or elsewhere): their unnamed files are kept
            busy = self._imports_in_flight()
            recent = time.time() - IMPORT_GRACE

            def unused(p: Path) -> bool:
                return not busy or _mtime(p) < recent

            keep_blobs, keep_manifests = self._referenced()
            for digest in self.blobs.digests():
                if digest not in keep_blobs and unused(self.blobs.path(digest)):
                    freed += _allocated(self.blobs.path(digest))
                    self.blobs.remove(digest)
            keep_fs = {parse_digest(m) for m in keep_manifests}
            for p in (self.root / "rootfs").iterdir():
                if p.name.split(".")[0] not in keep_fs and unused(p):
                    freed += _allocated(p)
                    p.unlink(missing_ok=True)
            for d in (self.blobs.root / "partial", self.root / "tmp"):
                for p in d.iterdir():
                    if not busy:
                        freed += _allocated(p)
                        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return freed

    def size(self) -> int:
        """Bytes the cache takes on disk."""
        return sum(_allocated(p) for p in self.root.rglob("*") if p.is_file())

    def enforce_cap(self) -> int:
        """Keep the cache under ``cache_max``: prune, then drop least recently used root
        filesystems (they are rebuilt from the blobs on next use). Returns bytes freed."""
        if self.size() <= self.cache_max:
            return 0
        freed = self.prune()
        with self.lock():
            built = sorted((self.root / "rootfs").glob("*.json"), key=lambda p: p.stat().st_mtime)
            for rec in built:
                if self.size() <= self.cache_max:
                    break
                fs = rec.with_suffix(".ext4")
                freed += _allocated(fs)
                fs.unlink(missing_ok=True)
                rec.unlink(missing_ok=True)
        return freed


def _owner_only(p: Path, mode: int) -> None:
    """Take other users' access to ``p`` away if it is ours: ``mode`` if it is open to
    others; group bits stay when the group is not our own (a group a confined QEMU
    was deliberately given read access through)."""
    with contextlib.suppress(OSError):
        st = os.stat(p)
        if st.st_uid != os.geteuid() or not st.st_mode & 0o007:
            return
        keep = 0 if st.st_gid == os.getegid() else st.st_mode & 0o070
        os.chmod(p, mode | keep)


def _mtime(p: Path) -> float:
    try:
        return os.lstat(p).st_mtime
    except OSError:
        return 0.0


def _allocated(p: Path) -> int:
    try:
        return os.lstat(p).st_blocks * 512
    except OSError:
        return 0


def default_image() -> str:
    """The image a sandbox gets when none is named: ``$SANDVM_DEFAULT_IMAGE``, else
    ``debian`` once `sandvm image build-default` built it, else ``base``."""
    env = os.environ.get("SANDVM_DEFAULT_IMAGE")
    if env:
        return env
    refs_file = (Path(os.environ["SANDVM_IMAGE_STORE"]) if os.environ.get(
        "SANDVM_IMAGE_STORE") else sandvm_home() / "images") / "refs.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        ref = json.loads(refs_file.read_text()).get(DEFAULT_IMAGE)
        if isinstance(ref, dict) and str(ref.get("source", "")).startswith("mmdebstrap:"):
            return DEFAULT_IMAGE
    return BUILTIN_IMAGES[0]
