"""Host memory of one idle VM against the guest memory it actually touched
(target: RSS <= 1.5x touched). Touched = allocated blocks of the guest RAM file."""

from __future__ import annotations

import os
import time

from _util import emit

from sandvm import Sandbox
from sandvm.providers.qemu import runtime_root


def status_kib(pid: int, field: str, path: str = "status") -> int:
    with open(f"/proc/{pid}/{path}") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mapping_rss_kib(pid: int, needle: str) -> int:
    """Resident KiB of the mappings whose path contains ``needle``."""
    total, cur = 0, ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and not parts[0].endswith(":"):
                cur = parts[5] if len(parts) > 5 else ""
            elif parts and parts[0] == "Rss:" and needle in cur:
                total += int(parts[1])
    return total


with Sandbox.create() as sb:
    sb.commands.run("true")
    time.sleep(2)
    pid = sb.info["qemu_pid"]
    rss = status_kib(pid, "VmRSS")
    rss_anon = status_kib(pid, "RssAnon")
    rss_file = status_kib(pid, "RssFile")
    rss_shmem = status_kib(pid, "RssShmem")
    pss = status_kib(pid, "Pss", "smaps_rollup")
    private = (status_kib(pid, "Private_Clean", "smaps_rollup")
               + status_kib(pid, "Private_Dirty", "smaps_rollup"))
    initrd_mapped = mapping_rss_kib(pid, "/initramfs/")
    mem_files = [p for p in runtime_root().glob(f"{sb.sandbox_id}-*/mem")]
    touched = os.stat(mem_files[0]).st_blocks * 512 // 1024 if mem_files else 0
    guest_mib = sb.info["memory_mib"]

emit({"benchmark": "idle_vm_host_memory", "guest_memory_mib": guest_mib,
      "guest_touched_mib": round(touched / 1024, 1), "qemu_rss_mib": round(rss / 1024, 1),
      "rss_anon_mib": round(rss_anon / 1024, 1), "rss_file_mib": round(rss_file / 1024, 1),
      "rss_shmem_mib": round(rss_shmem / 1024, 1), "pss_mib": round(pss / 1024, 1),
      "private_mib": round(private / 1024, 1),
      "initramfs_mapped_mib": round(initrd_mapped / 1024, 1),
      "rss_over_touched": round(rss / touched, 2) if touched else None,
      "rss_without_shared_files_over_touched":
          round((rss - rss_file) / touched, 2) if touched else None,
      "target_ratio": 1.5})
