"""What an image is once imported: its manifest digest, config and layers (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field

# media types sandvm understands; anything else is refused with ImageInvalid
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP})

# caps on documents read from untrusted sources (before parsing)
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config a sandbox honours."""

    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    architecture: str = "amd64"
    os: str = "linux"


@dataclass(frozen=True)
class LayerRef:
    """One layer blob: its digest (``sha256:<hex>``), media type and size in bytes."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImportedImage:
    """An image whose blobs are all in the blob store, verified."""

    manifest_digest: str
    config_digest: str
    config: ImageConfig
    layers: tuple[LayerRef, ...] = field(default_factory=tuple)
