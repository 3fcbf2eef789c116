"""Volume throughput: sequential write (fsync'd) and cold read of a file on a named ext4
volume on virtio-blk, measured inside the guest, and an upload/download_dir round trip."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from _util import emit

from sandvm import Sandbox
from sandvm.volumes import VolumeStore

MB = int(os.environ.get("VOLUME_MB", "256"))
ROUNDS = 3

GUEST = f"""
import os, time
buf = os.urandom(1 << 20)
t = time.monotonic()
with open('/data/f', 'wb') as f:
    for _ in range({MB}):
        f.write(buf)
    f.flush(); os.fsync(f.fileno())
w = time.monotonic() - t
open('/proc/sys/vm/drop_caches', 'w').write('3')
t = time.monotonic()
with open('/data/f', 'rb') as f:
    while f.read(1 << 20):
        pass
r = time.monotonic() - t
os.unlink('/data/f')
print(w, r)
"""

with tempfile.TemporaryDirectory() as tmp:
    store = VolumeStore(Path(tmp) / "volumes")
    store.create("bench", size=f"{MB * 2 + 256}M")
    sb = Sandbox.create(volumes={"bench": "/data"}, volume_store=store)
    writes, reads = [], []
    for _ in range(ROUNDS):
        w, r = map(float, sb.commands.run(["python3", "-c", GUEST], timeout=600).stdout.split())
        writes.append(MB / w)
        reads.append(MB / r)
    tree = Path(tmp) / "tree"
    for i in range(20):
        (tree / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 4}" / f"f{i}").write_bytes(os.urandom(1 << 20))
    t0 = time.monotonic()
    sb.files.upload_dir(tree, "/data/tree")
    up = time.monotonic() - t0
    t0 = time.monotonic()
    sb.files.download_dir("/data/tree", Path(tmp) / "back")
    down = time.monotonic() - t0
    sb.kill()

emit({"benchmark": "volumes", "accelerator": "tcg", "file_mib": MB,
      "write_fsync_mb_s": [round(x, 1) for x in writes],
      "cold_read_mb_s": [round(x, 1) for x in reads],
      "upload_dir_20_mib_s": round(up, 2), "download_dir_20_mib_s": round(down, 2)})
