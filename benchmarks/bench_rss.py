"""Host memory of one idle VM against the guest memory it actually touched
(target: RSS <= 1.5x touched). Touched = allocated blocks of the guest RAM file."""

from __future__ import annotations

import os
import time

from _util import emit

from sandvm import Sandbox
from sandvm.providers.qemu import runtime_root


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


with Sandbox.create() as sb:
    sb.commands.run("true")
    time.sleep(2)
    pid = sb.info["qemu_pid"]
    rss = status_kib(pid, "VmRSS")
    rss_anon = status_kib(pid, "RssAnon")
    rss_file = status_kib(pid, "RssFile")
    rss_shmem = status_kib(pid, "RssShmem")
    mem_files = [p for p in runtime_root().glob(f"{sb.sandbox_id}-*/mem")]
    touched = os.stat(mem_files[0]).st_blocks * 512 // 1024 if mem_files else 0
    guest_mib = sb.info["memory_mib"]

emit({"benchmark": "idle_vm_host_memory", "guest_memory_mib": guest_mib,
      "guest_touched_mib": round(touched / 1024, 1), "qemu_rss_mib": round(rss / 1024, 1),
      "rss_anon_mib": round(rss_anon / 1024, 1), "rss_file_mib": round(rss_file / 1024, 1),
      "rss_shmem_mib": round(rss_shmem / 1024, 1),
      "rss_over_touched": round(rss / touched, 2) if touched else None, "target_ratio": 1.5})
