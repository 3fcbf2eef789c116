"""What a guest build is made of, and the content key naming it.

The key is derived only from what this sandvm package ships (the agent, the wire
protocol, init scripts, the builder's own version and recipe), so it names the guest
*this* sandvm needs: `sandvm setup` builds under it and `find_assets` selects by it.
Two sandvm versions sharing one ``$SANDVM_HOME`` each find their own guest, never
"whatever setup ran last".
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

BUILDER_VERSION = "3"
GUEST_PACKAGES = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libssl3",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libsqlite3-0",
    "libcrypt1",
)
# the modules the initramfs loads, in dependency order (checked against .modinfo)
GUEST_MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/char/virtio_console.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/hw_random/virtio-rng.ko",
)
# parts of the Debian Python and libc trees a sandbox never needs
PRUNE = (
    "usr/share",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/turtle.py",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/__phello__",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu",
    "etc/ld.so.conf.d",
)
PRUNE_GLOBS = ("usr/lib/python3.11/lib-dynload/_test*", "usr/lib/python3.11/lib-dynload/xx*",
               "usr/lib/python3.11/lib-dynload/_ctypes_test*")


def guest_files() -> dict[str, bytes]:
    """The sandvm files that go into the initramfs, by guest path."""
    here = Path(__file__).resolve().parent.parent
    return {
        "init": (here / "guest" / "init.sh").read_bytes(),
        "usr/bin/nohup": (here / "guest" / "nohup.sh").read_bytes(),
        "lib/sandvm/agent.py": (here / "guest" / "agent.py").read_bytes(),
        "lib/sandvm/wire.py": (here / "wire.py").read_bytes(),
    }


def build_key(files: dict[str, bytes] | None = None) -> str:
    """The content key of the guest this sandvm needs (20 hex digits): its agent and
    protocol sources plus the build recipe. The Debian packages' versions and the kernel
    are not part of it (setup picks those from apt); they key the cpio inside a build."""
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION} python {sys.version_info[:2]}\n".encode())
    for group in (GUEST_PACKAGES, GUEST_MODULES, PRUNE, PRUNE_GLOBS):
        h.update(("\n".join(group) + "\n\n").encode())
    for path, data in sorted((files if files is not None else guest_files()).items()):
        h.update(path.encode() + b"\n")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:20]
