"""Turn an imported image into an ext4 root filesystem file (no root mount needed).

The layers are applied into a staging directory (ownership, modes, devices and
xattrs kept), then ``mke2fs -d`` copies the tree into a fresh ext4 image sized to
the content. The guest grows the filesystem online to its disk's size, so the
image itself stays small.

Keeping owners and device nodes needs root. A non-root user needs Debian's
``fakeroot``: both steps then run in one fakeroot session (a child Python running
this module, ``python -m sandvm.images.rootfs``, which reads a JSON job on stdin
and writes JSON lines on stdout), so ``mke2fs`` sees the owners, device nodes and
xattrs the layers asked for even though the staging files on disk belong to the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from sandvm.errors import ImageError, SandvmError, error_class_for_code
from sandvm.images.blobs import BlobStore
from sandvm.images.layers import apply_layers
from sandvm.images.model import ImportedImage, LayerRef

__all__ = ["BLOCK", "MIN_FS_BYTES", "build_rootfs"]

BLOCK = 4096
MIN_FS_BYTES = 64 << 20
_SBIN = ("/usr/sbin", "/sbin")   # not on a non-root user's PATH on Debian
_STOP_GRACE = 10.0               # seconds a cancelled fakeroot child gets to clean up
NEEDS_ROOT = ("building an image's root filesystem keeps file owners and device nodes,"
              " which needs root or fakeroot: install fakeroot (`sudo apt-get install -y"
              " --no-install-recommends fakeroot`, or `sandvm setup`) or run as root")

Progress = Callable[[int, int], None]


def _tree_size(root: Path) -> tuple[int, int]:
    """(bytes in blocks, entries) of a directory tree, without following symlinks."""
    total, entries = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
            entries += 1
    return total, entries


def _find_tool(name: str) -> str | None:
    """``name`` on PATH, else in /usr/sbin or /sbin."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def _mke2fs(mke2fs: str, tree: Path, out: Path, size: int,
            inodes: int) -> subprocess.CompletedProcess[str]:
    # 0600: a built image holds whatever the image's files hold (keys, tokens)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-N", str(inodes),
         "-L", "sandvm-root", "-m", "0", "-E", "root_owner=0:0,lazy_itable_init=1",
         "-d", str(tree), str(out)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _require_mke2fs() -> str:
    mke2fs = _find_tool("mke2fs")
    if mke2fs is None:
        raise ImageError("mke2fs is missing: run `sandvm setup` (it installs e2fsprogs)")
    return mke2fs


def _tmp_out(out: Path, staging: Path) -> Path:
    """Where the ext4 is written before the rename (next to ``out``, unique per build)."""
    return out.with_name(f".{out.name}.{staging.name}.tmp")


def _cleanup(staging: Path, out: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    _tmp_out(out, staging).unlink(missing_ok=True)


def build_rootfs(blobs: BlobStore, image: ImportedImage, out: Path, *,
                 work_dir: Path, max_bytes: int = 16 << 30,
                 progress: Progress | None = None) -> dict[str, object]:
    """Build ``out`` (an ext4 file) from ``image``'s layers; return its build record.

    As root (or already under fakeroot) this runs in-process. Otherwise it needs
    the ``fakeroot`` command and runs the layer and mke2fs steps in one fakeroot
    session in a child process; ``progress(done, total)`` is then relayed from the
    child a line at a time (the same steps, about every MiB of layers, slightly late).
    Under fakeroot, xattrs of every namespace (security.*, trusted.*, user.*) are
    recorded by fakeroot and written into the ext4; a fakeroot that cannot record
    one fails the build with ImageError naming the xattr, never dropping it.

    The file appears atomically (temp name, rename). Raises ImageError (and its
    ImageInvalid/ImageTooLarge subclasses from the layers; ImageError saying to
    install fakeroot or run as root); nothing is left in ``work_dir`` afterwards.
    """
    in_process = os.geteuid() == 0 or "FAKEROOTKEY" in os.environ
    fakeroot = None if in_process else _find_tool("fakeroot")
    if not in_process and fakeroot is None:
        raise ImageError(NEEDS_ROOT)
    _require_mke2fs()
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work_dir))
    try:
        if fakeroot is None:
            return _build(blobs, image.manifest_digest, image.layers, out, staging=staging,
                          max_bytes=max_bytes, progress=progress)
        job = {"blobs": str(blobs.root), "manifest_digest": image.manifest_digest,
               "layers": [{"digest": x.digest, "media_type": x.media_type, "size": x.size}
                          for x in image.layers],
               "out": str(out), "staging": str(staging), "max_bytes": max_bytes}
        return _run_fakeroot(fakeroot, job, progress=progress)
    finally:
        _cleanup(staging, out)


def _build(blobs: BlobStore, manifest_digest: str, layers: Sequence[LayerRef], out: Path, *,
           staging: Path, max_bytes: int, progress: Progress | None) -> dict[str, object]:
    """Apply the layers into ``staging/tree``, make the ext4, rename it to ``out`` and
    write its record. The caller removes ``staging`` (and the temp file on failure)."""
    mke2fs = _require_mke2fs()
    tmp_out = _tmp_out(out, staging)
    tree = staging / "tree"
    tree.mkdir(mode=0o755)
    stats = apply_layers(blobs, layers, tree, max_bytes=max_bytes, progress=progress)
    used, entries = _tree_size(tree)
    # room for metadata and a little growth; the guest grows it to the disk
    size = max(MIN_FS_BYTES, int(used * 1.25) + entries * 512 + (32 << 20))
    size = -(-size // (1 << 20)) * (1 << 20)
    inodes = max(4096, entries * 2)
    for _ in range(3):
        res = _mke2fs(mke2fs, tree, tmp_out, size, inodes)
        if res.returncode == 0:
            break
        if "No space" not in res.stderr and "Could not allocate" not in res.stderr:
            raise ImageError(f"mke2fs failed: {res.stderr.strip()[-500:]}")
        size *= 2
    else:
        raise ImageError(f"mke2fs ran out of space three times: {res.stderr.strip()[-300:]}")
    os.replace(tmp_out, out)
    record: dict[str, object] = {
        "manifest_digest": manifest_digest, "build_id": uuid.uuid4().hex,
        "size": out.stat().st_size, "content_bytes": used, "entries": stats.entries,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------- the fakeroot child

def _run_fakeroot(fakeroot: str, job: dict[str, Any], *,
                  progress: Progress | None) -> dict[str, object]:
    """Run ``job`` in ``fakeroot -- python -m sandvm.images.rootfs``; relay progress;
    return the record or raise the child's error as its ImageError class."""
    src = str(Path(__file__).resolve().parents[2])   # the directory holding `sandvm`
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    argv = [fakeroot, "--", sys.executable, "-m", "sandvm.images.rootfs"]
    result: dict[str, Any] | None = None
    noise: list[str] = []
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, env=env, text=True, start_new_session=True)
        except OSError as exc:
            raise ImageError(f"cannot run {fakeroot}: {exc.strerror or exc}") from None
        assert proc.stdin is not None and proc.stdout is not None
        try:
            with contextlib.suppress(BrokenPipeError):   # its exit status tells why
                proc.stdin.write(json.dumps(job))
                proc.stdin.close()
            for line in proc.stdout:
                msg = _message(line)
                if msg is None:
                    noise = [*noise[-4:], line.strip()[:200]]
                elif "progress" in msg:
                    if progress is not None:
                        done, total = msg["progress"]
                        progress(int(done), int(total))
                else:
                    result = msg
            rc = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace").strip()
    if result is not None and isinstance(result.get("record"), dict) and rc == 0:
        record: dict[str, object] = result["record"]
        return record
    error = result.get("error") if result is not None else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        cls = error_class_for_code(str(error.get("code", "")))
        raise (cls if issubclass(cls, ImageError) else ImageError)(error["message"])
    tail = "; ".join(x for x in (stderr[-400:], " ".join(noise)) if x) or "no output"
    raise ImageError(f"building the root filesystem under fakeroot failed (exit status"
                     f" {rc}): {tail}")


def _message(line: str) -> dict[str, Any] | None:
    """A JSON-object line from the child, else None."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) else None


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt the fakeroot session (its shell kills ``faked``; the child cleans up),
    then kill what is left of it."""
    for sig, grace in ((signal.SIGINT, _STOP_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _child(stdin: IO[str], stdout: IO[str]) -> int:
    """The fakeroot side: read the job, build, write JSON lines (progress, then the
    record or the error's code and message). Returns the exit status."""
    def send(msg: dict[str, Any]) -> None:
        stdout.write(json.dumps(msg) + "\n")
        stdout.flush()

    job = json.load(stdin)
    out, staging = Path(job["out"]), Path(job["staging"])
    try:
        layers = tuple(LayerRef(str(x["digest"]), str(x["media_type"]), int(x["size"]))
                       for x in job["layers"])
        record = _build(BlobStore(Path(job["blobs"])), str(job["manifest_digest"]), layers,
                        out, staging=staging, max_bytes=int(job["max_bytes"]),
                        progress=lambda done, total: send({"progress": [done, total]}))
    except SandvmError as exc:
        message = exc.message
        if "xattr" in message and "needs root" in message:   # this fakeroot cannot fake it
            message = (message.removesuffix(": run as root (or under fakeroot)")
                       + ", and fakeroot cannot record it on this host: build the image as root")
        send({"error": {"code": exc.code, "message": message}})
        return 1
    except (OSError, ValueError, KeyError, TypeError) as exc:   # still an ImageError
        send({"error": {"code": ImageError.code,
                        "message": f"building the root filesystem failed: {exc}"}})
        return 1
    finally:
        _cleanup(staging, out)   # inside the session, where faked knows the files
    send({"record": record})
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.stdin, sys.stdout))
