"""Images: pull + convert a ~100 MB image from a registry on loopback (cold, then warm:
warm must be near zero), the cache's size, and sandbox create from a cached image vs
`base`. The registry is Debian's docker-registry, the image pushed with skopeo."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from _util import emit, summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oci_build import Dir, File, Symlink, build_layout
from registry_server import RealRegistry
from sandvm import Sandbox
from sandvm.images.registry import pull
from sandvm.images.store import ImageStore
from test_images_vm import APPLETS, busybox_bytes

PAYLOAD_MB = int(os.environ.get("IMAGE_MB", "100"))
CREATES = 5


def big_layers() -> list[list[object]]:
    base = [Dir("bin"), File("bin/busybox", busybox_bytes(), mode=0o755),
            *[Symlink(f"bin/{a}", "busybox") for a in APPLETS], Dir("etc"),
            File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")]
    # incompressible payload in 1 MiB files over 4 layers
    payload = []
    for layer in range(4):
        entries: list[object] = [Dir(f"data{layer}")]
        entries += [File(f"data{layer}/f{i}", os.urandom(1 << 20))
                    for i in range(PAYLOAD_MB // 4)]
        payload.append(entries)
    return [base, *payload]


with tempfile.TemporaryDirectory() as tmp:
    t = Path(tmp)
    layout = t / "layout"
    build_layout(layout, big_layers(), config={"Env": ["PATH=/bin"]})  # type: ignore[arg-type]
    os.environ["SANDVM_IMAGE_STORE"] = str(t / "store")
    with RealRegistry(t / "registry") as reg:
        reg.push(layout, "latest", "bench/big:1")
        ref = f"{reg.host}/bench/big:1"
        store = ImageStore()
        t0 = time.monotonic()
        img = pull(ref, store.blobs)
        cold_pull = time.monotonic() - t0
        t0 = time.monotonic()
        store.add_pulled(ref, img, source=ref)
        cold_convert = time.monotonic() - t0
        t0 = time.monotonic()
        img = pull(ref, store.blobs)
        store.add_pulled(ref, img, source=ref)
        warm = time.monotonic() - t0
    cache = store.size()
    layers_bytes = sum(x.size for x in img.layers)
    from_image, from_base = [], []
    for _ in range(CREATES):
        t0 = time.monotonic()
        sb = Sandbox.create(image=ref)
        sb.commands.run(["echo"])
        from_image.append(time.monotonic() - t0)
        sb.kill()
        t0 = time.monotonic()
        sb = Sandbox.create()
        sb.commands.run(["echo"])
        from_base.append(time.monotonic() - t0)
        sb.kill()

emit({"benchmark": "images", "accelerator": "tcg", "image_layers_mib":
      round(layers_bytes / 2**20, 1),
      "cold_pull_s": round(cold_pull, 2), "cold_convert_s": round(cold_convert, 2),
      "cold_total_s": round(cold_pull + cold_convert, 2), "warm_pull_and_convert_s":
      round(warm, 3), "cache_mib": round(cache / 2**20, 1),
      "create_to_first_command_image_ms": summary(from_image),
      "create_to_first_command_base_ms": summary(from_base)})
