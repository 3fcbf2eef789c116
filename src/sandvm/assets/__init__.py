"""Guest assets: where they live, how `sandvm setup` builds them, how to find them.

Everything lives under ``$SANDVM_HOME`` (default ``~/.cache/sandvm``)::

    debs/                       downloaded .deb files (apt-get download)
    kernel/<release>/vmlinuz    the guest kernel, unpacked with dpkg-deb -x
    kernel/<release>/modules/   the virtio modules the initramfs loads
    initramfs/<build>/<key>.cpio  busybox + modules + agent + Python; <build> is the
                                content key of what this sandvm ships (agent, wire
                                protocol, recipe: buildkey.build_key), <key> adds the
                                Debian packages and the kernel
    initramfs/<build>/assets.json which kernel and initramfs that build uses
    assets.json                 the build setup made last (for sandvm versions from
                                before build keys; this one reads only its own build)

Nothing is installed on the host except Debian's QEMU (apt-get install).
"""

from sandvm.assets.paths import Assets, find_assets, sandvm_home
from sandvm.assets.setup import SetupStep, run_setup

__all__ = ["Assets", "SetupStep", "find_assets", "run_setup", "sandvm_home"]
