"""Parse OCI/Docker indexes, manifests and configs from untrusted bytes (pure).

Every function checks sizes and types before trusting a field and raises
ImageInvalid with what is wrong; nothing here does I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sandvm.errors import ImageInvalid, ImageNotFound, ImageTooLarge
from sandvm.images.blobs import parse_digest
from sandvm.images.model import (
    CONFIG_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    ImageConfig,
    LayerRef,
)

REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: media type, digest, size, and optional platform/annotations."""

    media_type: str
    digest: str
    size: int
    platform: tuple[str, str] | None = None  # (os, architecture)
    ref_name: str | None = None


@dataclass(frozen=True)
class Manifest:
    """An image manifest: its config descriptor and layers, bottom first."""

    config: Descriptor
    layers: tuple[LayerRef, ...]


def parse_json(data: bytes, what: str, *, cap: int = MAX_MANIFEST_BYTES) -> Any:
    """``data`` as any JSON value, after a size check: the one way image and registry
    JSON is decoded. Raises ImageTooLarge, ImageInvalid (not JSON, nested too deep)."""
    if len(data) > cap:
        raise ImageTooLarge(f"{what} is {len(data)} bytes, over the {cap} byte cap")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageInvalid(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ImageInvalid(f"{what} nests JSON arrays or objects too deeply") from None


def load_json(data: bytes, what: str, *, cap: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    """``data`` as a JSON object, after a size check. Raises ImageTooLarge, ImageInvalid."""
    doc = parse_json(data, what, cap=cap)
    if not isinstance(doc, dict):
        raise ImageInvalid(f"{what} must be a JSON object")
    return doc


def descriptor(obj: Any, what: str) -> Descriptor:
    """Validate one descriptor object. Raises ImageInvalid."""
    if not isinstance(obj, dict):
        raise ImageInvalid(f"{what}: a descriptor must be an object")
    mt, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(mt, str) or not mt:
        raise ImageInvalid(f"{what}: descriptor without a mediaType")
    if not isinstance(digest, str):
        raise ImageInvalid(f"{what}: descriptor without a digest")
    parse_digest(digest)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageInvalid(f"{what}: descriptor size must be a non-negative integer")
    plat = obj.get("platform")
    platform = None
    if isinstance(plat, dict) and isinstance(plat.get("os"), str) \
            and isinstance(plat.get("architecture"), str):
        platform = (plat["os"], plat["architecture"])
    ann = obj.get("annotations")
    ref = ann.get(REF_NAME) if isinstance(ann, dict) else None
    return Descriptor(mt, digest, size, platform, ref if isinstance(ref, str) else None)


def media_type_of(doc: dict[str, Any], fallback: str | None = None) -> str:
    """A document's media type: its own field, else ``fallback`` (e.g. Content-Type)."""
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if fallback:
        return fallback.split(";")[0].strip()
    if "manifests" in doc:
        return next(iter(INDEX_TYPES))
    if "layers" in doc:
        return next(iter(MANIFEST_TYPES))
    raise ImageInvalid("a manifest without a mediaType that is neither an index nor a manifest")


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def parse_index(doc: dict[str, Any]) -> list[Descriptor]:
    """The manifests an index lists. Raises ImageInvalid."""
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise ImageInvalid("image index without a manifests list")
    return [descriptor(m, f"index entry {i}") for i, m in enumerate(items)]


def choose_platform(entries: list[Descriptor], *, os: str = "linux",
                    arch: str = "amd64") -> Descriptor:
    """The index entry for ``os/arch``. Raises ImageNotFound listing what there is."""
    for d in entries:
        if d.platform == (os, arch):
            return d
    have = sorted({f"{p[0]}/{p[1]}" for d in entries if (p := d.platform)})
    raise ImageNotFound(f"the image has no {os}/{arch} variant"
                        + (f" (it has {', '.join(have)})" if have else ""))


def parse_manifest(doc: dict[str, Any], media_type: str) -> Manifest:
    """An image manifest's config and layers. Raises ImageInvalid (unknown media types)."""
    if media_type not in MANIFEST_TYPES:
        raise ImageInvalid(f"unsupported manifest media type {media_type[:100]!r}")
    config = descriptor(doc.get("config"), "manifest config")
    if config.media_type not in CONFIG_TYPES:
        raise ImageInvalid(f"unsupported config media type {config.media_type[:100]!r}")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageInvalid("manifest without a layers list")
    layers = []
    for i, item in enumerate(raw_layers):
        d = descriptor(item, f"layer {i}")
        if d.media_type not in LAYER_TYPES:
            raise ImageInvalid(f"layer {i} has unsupported media type {d.media_type[:100]!r}")
        layers.append(LayerRef(d.digest, d.media_type, d.size))
    return Manifest(config, tuple(layers))


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageInvalid(f"image config {what} must be a list of strings")
    return tuple(value)


def parse_config(data: bytes) -> ImageConfig:
    """The runtime parts of an image config blob. Raises ImageInvalid, ImageTooLarge."""
    doc = load_json(data, "image config", cap=MAX_CONFIG_BYTES)
    cfg = doc.get("config") or doc.get("container_config") or {}
    if not isinstance(cfg, dict):
        raise ImageInvalid("image config 'config' must be an object")
    wd, user = cfg.get("WorkingDir") or "", cfg.get("User") or ""
    if not isinstance(wd, str) or not isinstance(user, str):
        raise ImageInvalid("image config WorkingDir and User must be strings")
    arch, os_ = doc.get("architecture", "amd64"), doc.get("os", "linux")
    if not isinstance(arch, str) or not isinstance(os_, str):
        raise ImageInvalid("image config architecture and os must be strings")
    return ImageConfig(env=_str_list(cfg.get("Env"), "Env"), working_dir=wd, user=user,
                       entrypoint=_str_list(cfg.get("Entrypoint"), "Entrypoint"),
                       cmd=_str_list(cfg.get("Cmd"), "Cmd"), architecture=arch, os=os_)
