"""Guest assets: where they live, how `sandvm setup` builds them, how to find them.

Everything lives under ``$SANDVM_HOME`` (default ``~/.cache/sandvm``)::

    debs/                       downloaded .deb files (apt-get download)
    kernel/<release>/vmlinuz    the guest kernel, unpacked with dpkg-deb -x
    kernel/<release>/modules/   the virtio modules the initramfs loads
    initramfs/<key>.cpio        busybox + modules + agent + Python, keyed by content
    assets.json                 which kernel and initramfs are current

Nothing is installed on the host except Debian's QEMU (apt-get install).
"""

from sandvm.assets.paths import Assets, find_assets, sandvm_home
from sandvm.assets.setup import SetupStep, run_setup

__all__ = ["Assets", "SetupStep", "find_assets", "run_setup", "sandvm_home"]
