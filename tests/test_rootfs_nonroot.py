"""Building an image's ext4 as a non-root user, through fakeroot (no VM).

As root, the builds run in a child switched to ``nobody`` with ``setpriv``; as a
non-root user they run in a plain child. The ext4 is then checked with debugfs.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require

sys.path.insert(0, str(Path(__file__).parent))
from oci_build import Device, Dir, Entry, Fifo, File, Hardlink, Symlink, build_layout

NOBODY = 65534
SRC = str(Path(__file__).resolve().parents[1] / "src")
USER_PATH = "/usr/local/bin:/usr/bin:/bin"   # a Debian user's PATH: no /usr/sbin
# a v2 file capability (cap_net_raw permitted + effective), as iputils' ping carries
CAP_NET_RAW = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

# runs as the unprivileged user: load argv[2] into ImageStore(argv[1]), print the outcome
CHILD = """
import json, sys
from pathlib import Path
from sandvm.errors import SandvmError
from sandvm.images.store import ImageStore
calls = []
try:
    img = ImageStore(root=Path(sys.argv[1])).load(Path(sys.argv[2]), name="t",
                                                  progress=lambda d, t: calls.append([d, t]))
except SandvmError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": exc.message}))
else:
    print(json.dumps({"rootfs": str(img.rootfs), "progress": calls}))
"""


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _require(*tools: str) -> None:
    """Skip unless the tools are installed; in CI (env CI set) fail instead."""
    missing = [t for t in tools if _tool(t) is None]
    require(not missing, f"needs {', '.join(missing)} (apt-get install {' '.join(missing)})")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A scratch directory the unprivileged user can reach and write (not pytest's
    tmp_path, whose parents are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="sandvm-nonroot-"))
    d.chmod(0o777)
    (d / "home").mkdir(mode=0o777)
    (d / "home").chmod(0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@functools.cache
def _user_python(prefix: tuple[str, ...]) -> str | None:
    """An interpreter the unprivileged user can run that imports sandvm (with
    PYTHONPATH=src): this one, unless it lives somewhere private (e.g. under /root),
    else the system's python of the same version. The probe execs through sh, which
    checks permissions the way the fakeroot script will."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (sys.executable, shutil.which(version, path="/usr/bin:/bin")):
        if cand is None:
            continue
        probe = 'exec "$0" -c "import sandvm.images.store"'
        res = subprocess.run([*prefix, "/bin/sh", "-c", probe, cand], capture_output=True,
                             env={"PYTHONPATH": SRC, "PATH": USER_PATH})
        if res.returncode == 0:
            return cand
    return None


def _open_up(root: Path) -> None:
    """Make a tree built here readable by the unprivileged user whatever the umask."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _load_as_user(base: Path, layers: list[list[Entry]], *, path: str) -> dict[str, Any]:
    """Build a layout from ``layers`` and load it as a non-root user; the child's result."""
    tools = ["fakeroot", "debugfs", "mke2fs"] if path == USER_PATH else []
    _require(*(["setpriv", *tools] if os.geteuid() == 0 else tools))
    layout = base / "layout"
    build_layout(layout, layers)
    _open_up(layout)
    prefix = ((_tool("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
               "--clear-groups") if os.geteuid() == 0 else ())
    python = _user_python(prefix)
    if python is None:
        require(False, "no Python interpreter that the unprivileged user can run imports"
                       " sandvm")
    env = {"HOME": str(base / "home"), "TMPDIR": str(base / "home"), "PATH": path,
           "LANG": "C.UTF-8", "PYTHONPATH": SRC}
    res = subprocess.run([*prefix, python, "-c", CHILD, str(base / "store"),
                          str(layout)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    assert not list((base / "store" / "tmp").iterdir())   # nothing left behind
    assert not [p for p in (base / "store" / "rootfs").iterdir() if p.name.endswith(".tmp")]
    return out


def _debugfs(fs: Path, request: str) -> str:
    """debugfs's answer (stdout and stderr: it reports a missing file on stderr)."""
    res = subprocess.run([_tool("debugfs") or "debugfs", "-R", request, str(fs)],
                         capture_output=True, text=True, check=True)
    return res.stdout + res.stderr


def test_fakeroot_build_keeps_owners_devices_and_xattrs(shared_dir: Path) -> None:
    layers: list[list[Entry]] = [
        [Dir("etc"), File("etc/owned", b"x", mode=0o4750, uid=1234, gid=4321),
         File("etc/replaced", b"old", uid=77, gid=77),
         Dir("dev"), Device("dev/ttyX", 4, 64), Device("dev/loopX", 7, 3, char=False),
         Fifo("dev/fifo"), Dir("srv", mode=0o700, uid=1234, gid=1234),
         File("srv/private", b"p", mode=0o600, uid=1234, gid=1234),
         Symlink("etc/link", "owned"), Hardlink("etc/hard", "etc/owned"),
         File("bin/ping", b"\x7fELF", mode=0o755,
              xattrs={"security.capability": CAP_NET_RAW, "trusted.sandvm": "t1",
                      "user.sandvm": "u1"})],
        [File("etc/.wh.replaced"), File("etc/new", b"n", uid=5, gid=6)],
    ]
    out = _load_as_user(shared_dir, layers, path=USER_PATH)
    assert "rootfs" in out, out
    fs = Path(out["rootfs"])
    if os.geteuid() == 0:
        assert fs.stat().st_uid == NOBODY   # really built by the unprivileged user
    assert out["progress"] and out["progress"][-1][0] == out["progress"][-1][1] > 0

    owned = _debugfs(fs, "stat /etc/owned")
    assert re.search(r"User:\s+1234\s+Group:\s+4321\b", owned), owned
    assert re.search(r"Mode:\s+04750\b", owned), owned
    assert "Links: 2" in owned
    assert re.search(r"User:\s+5\s+Group:\s+6\b", _debugfs(fs, "stat /etc/new"))
    assert "File not found" in _debugfs(fs, "stat /etc/replaced")
    tty = _debugfs(fs, "stat /dev/ttyX")
    assert "Type: character special" in tty, tty
    assert re.search(r"Device major/minor number: 04:64\b", tty), tty
    loop = _debugfs(fs, "stat /dev/loopX")
    assert "Type: block special" in loop and "major/minor number: 07:03" in loop, loop
    assert "Type: FIFO" in _debugfs(fs, "stat /dev/fifo")
    srv = _debugfs(fs, "stat /srv")
    assert re.search(r"User:\s+1234\s+Group:\s+1234\b", srv) and "Mode:  0700" in srv, srv
    assert "Type: symlink" in _debugfs(fs, "stat /etc/link")
    # fakeroot records every xattr namespace and mke2fs (same session) writes them
    eas = _debugfs(fs, "ea_list /bin/ping")
    assert 'trusted.sandvm (2) = "t1"' in eas, eas
    assert 'user.sandvm (2) = "u1"' in eas, eas
    assert "security.capability (20) = 01 00 00 02 00 20 00 00" in eas, eas
    root = _debugfs(fs, "stat /")
    assert re.search(r"User:\s+0\s+Group:\s+0\b", root), root


def test_fakeroot_build_error_keeps_its_class(shared_dir: Path) -> None:
    out = _load_as_user(shared_dir, [[File("../evil", b"x")]], path=USER_PATH)
    assert out.get("error") == "ImageInvalid", out
    assert "'..'" in out["message"], out
    assert not list((shared_dir / "store" / "rootfs").iterdir())


def test_without_fakeroot_says_install_it_or_run_as_root(shared_dir: Path) -> None:
    empty = shared_dir / "empty-bin"
    empty.mkdir()
    empty.chmod(0o755)
    out = _load_as_user(shared_dir, [[File("etc/motd", b"hi", uid=1234)]], path=str(empty))
    assert out.get("error") == "ImageError", out
    assert "install fakeroot" in out["message"] and "run as root" in out["message"], out
