"""The default image ``debian``: Debian + python3 + pip, built once with ``mmdebstrap``.

``build_default`` runs ``mmdebstrap --variant=minbase`` (no recommends, no docs,
man pages or locales; apt lists and caches cleaned) into a tar, stores that tar
as one uncompressed OCI layer with a synthesized config and manifest, names it
(source ``mmdebstrap:<suite>``) and builds its ext4. Later calls return the
cached image unless ``force``.

Mirrors: the build uses the host's own Debian sources, nothing else. apt reads
``/etc/apt/sources.list`` (one-line format) and ``/etc/apt/sources.list.d/*.list``
/ ``*.sources`` (deb822); of those, the entries for Debian's archive are kept
(type ``deb``, a Debian component, a Debian suite name or codename, its ``-updates`` or
``-security``, no keyring other than ``debian-archive-keyring``) and re-aimed at
the requested suite; third-party repositories are ignored. With none found,
``http://deb.debian.org/debian`` (+ ``-security``) is used. The host's apt proxy
settings (``Acquire::{http,https,ftp}::Proxy*``) and ``Check-Valid-Until`` /
``Check-Date`` (needed for snapshot mirrors) are read with ``apt-config dump``
and passed with ``--aptopt``; ``http_proxy`` and friends pass through the
environment. They are not left in the image's apt configuration.

Found on the development host (Debian 12): ``/etc/apt/sources.list.d/debian.sources``
with ``http://deb.debian.org/debian`` (bookworm, bookworm-updates) and
``http://deb.debian.org/debian-security`` (bookworm-security), component
``main``, signed by ``debian-archive-keyring.gpg``; ``deb.debian.org`` resolves
to a local mirror; no apt proxy; ``Acquire::Check-Valid-Until "false"`` and
``Acquire::Check-Date "false"`` in ``apt.conf.d/99artifact-registry``; other
sources (google-cloud-sdk, nodesource) disabled.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sandvm._files import flocked
from sandvm.core import BUILTIN_IMAGES
from sandvm.errors import ImageError, ImageInvalid, ImageNotFound
from sandvm.images.manifest import load_json
from sandvm.images.model import (
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    ImageConfig,
    ImportedImage,
    LayerRef,
)
from sandvm.images.store import SOURCE_PREFIXES, ImageStore, StoredImage

__all__ = ["DEFAULT_NAME", "SOURCE_PREFIX", "build_default", "host_apt_options",
           "host_mirrors"]

DEFAULT_NAME = "debian"
SOURCE_PREFIX = "mmdebstrap:"
DEFAULT_PACKAGES = ("python3", "python3-pip", "ca-certificates")
FALLBACK_MIRRORS = ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")
ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    # a throwaway VM: `pip install` may write to the system (PEP 668 marker)
    "PIP_BREAK_SYSTEM_PACKAGES=1",
)
LABEL = "org.sandvm.mmdebstrap"
_SUFFIXES = ("-updates", "-security")
_DEBIAN_SUITES = frozenset({
    "oldoldstable", "oldstable", "stable", "testing", "unstable", "sid", "experimental",
    "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke"})
_DEBIAN_COMPONENTS = frozenset({"main", "contrib", "non-free", "non-free-firmware"})
_APT_OPTION = re.compile(
    r'^Acquire::(?:(?:https?|ftp)::Proxy(?:-Auto-Detect)?(?:::\S+)?'
    r'|Check-Valid-Until|Check-Date) ".*";$')
_TAIL_LINES = 15
_CHATTER = re.compile(r"^(\(Reading database|Selecting previously|Preparing to unpack"
                      r"|Unpacking |Setting up |Chrooting into |Processing triggers)")
# dpkg skips these paths in every package (kept in the image for later installs too)
_DPKG_OPTS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
# merged /usr set up directly, not by the usrmerge package (which pulls in perl, ~50 MB)
_HOOK_DIRS = ("/usr/share/mmdebstrap/hooks/maybe-merged-usr",
              "/usr/share/mmdebstrap/hooks/merged-usr")
# run in the finished tree, before mmdebstrap cleans apt's lists and caches: the
# image must not carry the build host's identity, resolver or apt options
_CUSTOMIZE = r"""#!/bin/sh
set -e
pip=$(chroot "$1" python3 -m pip --version)
echo "I: $pip"
rm -f "$1/etc/hostname" "$1/etc/resolv.conf" "$1/etc/hosts" \
      "$1/etc/apt/apt.conf.d/99mmdebstrap"
printf 'sandvm\n' > "$1/etc/hostname"
printf '127.0.0.1\tlocalhost sandvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$1/etc/hosts"
: > "$1/etc/resolv.conf"
printf 'APT::Install-Recommends "false";\nAcquire::Languages "none";\n' \
    > "$1/etc/apt/apt.conf.d/90sandvm"
chmod 0644 "$1/etc/hostname" "$1/etc/hosts" "$1/etc/resolv.conf" \
    "$1/etc/apt/apt.conf.d/90sandvm"
"""


def build_default(store: ImageStore | None = None, *, name: str = DEFAULT_NAME,
                  suite: str = "bookworm", packages: Sequence[str] = DEFAULT_PACKAGES,
                  mirrors: Sequence[str] | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> StoredImage:
    """Build (or return the cached) Debian ``suite`` image with ``packages``, as ``name``.

    ``packages`` may also be one comma- or space-separated string. ``mirrors``: one-line
    apt entries (``deb URI suite main``); by default the host's
    Debian mirrors (see the module docstring). A name already used by an image not
    built here is only replaced with ``force``. Raises ImageError (mmdebstrap
    missing or failing, not root, the name taken); nothing is left behind on failure.
    """
    store = store or ImageStore()
    say = progress or (lambda _line: None)
    if isinstance(packages, str):   # "python3,python3-pip" from a command line
        packages = packages.replace(",", " ").split()
    pkgs = sorted({p.strip() for p in packages if p.strip()})
    if not pkgs or any(not re.fullmatch(r"[a-z0-9][a-z0-9+.-]*(?::[a-z0-9-]+)?", p)
                       for p in pkgs):
        raise ImageInvalid(f"invalid Debian package list {list(packages)!r}")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", suite):
        raise ImageInvalid(f"invalid Debian suite {suite!r}")
    if not name or len(name) > 255 or any(c.isspace() for c in name) \
            or name in BUILTIN_IMAGES or name.startswith(SOURCE_PREFIXES):
        raise ImageInvalid(f"invalid image name {name!r}")
    cached = _cached(store, name, suite, pkgs, force=force)
    if cached is not None:
        say(f"{name}: cached ({cached.manifest_digest[:19]}, built from {suite})")
        return cached
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise ImageError("building the default image needs mmdebstrap, which is not"
                         " installed: run `sandvm setup` (or `apt-get install mmdebstrap`)")
    if os.geteuid() != 0 and "FAKEROOTKEY" not in os.environ:
        raise ImageError("building the default image keeps file owners and device nodes,"
                         " which needs root: run as root")
    with _build_lock(store):
        cached = _cached(store, name, suite, pkgs, force=force)   # built meanwhile?
        if cached is not None and not force:
            return cached
        lines = list(mirrors) if mirrors is not None else host_mirrors(suite)
        work = Path(tempfile.mkdtemp(prefix="mmdebstrap-", dir=store.root / "tmp"))
        try:
            tar = work / "rootfs.tar"
            started = time.monotonic()
            hook = work / "customize.sh"
            hook.write_text(_CUSTOMIZE)
            hook.chmod(0o755)
            _run_mmdebstrap(mmdebstrap, suite, pkgs, lines, host_apt_options(), tar, hook, say)
            seconds = time.monotonic() - started
            say(f"storing the layer ({tar.stat().st_size / (1 << 20):.0f} MiB)")
            image = _store_image(store, tar, suite=suite, packages=pkgs, mirrors=lines,
                                 seconds=seconds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say("building the root filesystem")
        # built before it is named: a failed rebuild leaves the previous image in place
        store.ensure_rootfs(image, _percent(say))
        store.tag(name, image, source=f"{SOURCE_PREFIX}{suite}")
    store.enforce_cap()
    stored = store.get(name)
    say(f"{name}: built in {seconds:.0f} s, root filesystem"
        f" {stored.rootfs_bytes / (1 << 20):.0f} MiB")
    return stored


# ---------------------------------------------------------------------- the cache


def _cached(store: ImageStore, name: str, suite: str, packages: list[str], *,
            force: bool) -> StoredImage | None:
    """The image ``name`` if it was built here from ``suite`` with ``packages``."""
    info = next((i for i in store.ls() if i.name == name), None)
    if info is None:
        return None
    if not info.source.startswith(SOURCE_PREFIX):
        if force:
            return None
        raise ImageError(f"an image named {name!r} already exists (from {info.source}):"
                         " remove it (`sandvm image rm`), choose another name or force"
                         " the build")
    if force or info.source != f"{SOURCE_PREFIX}{suite}":
        return None
    try:
        image = store.imported(info.manifest_digest)
        with store.blobs.open(image.config_digest) as f:
            labels = load_json(f.read(), "image config").get("config", {}).get("Labels") or {}
    except (ImageNotFound, ImageInvalid, AttributeError):
        return None
    if not isinstance(labels, dict) or labels.get(f"{LABEL}.packages") != " ".join(packages):
        return None
    return store.get(name)


@contextlib.contextmanager
def _build_lock(store: ImageStore) -> Iterator[None]:
    """One mmdebstrap build per store at a time (the store's own lock stays free)."""
    with flocked(store.root / ".mmdebstrap.lock"):
        yield


# ---------------------------------------------------------------------- host apt setup


def host_mirrors(suite: str, *, apt_dir: Path = Path("/etc/apt")) -> list[str]:
    """One-line ``deb`` entries for ``suite`` (and its -updates, -security) on the host's
    Debian mirrors; Debian's public mirror if the host has none."""
    out: list[str] = []
    for uri, host_suite, components, signed_by in _host_sources(apt_dir):
        if signed_by and "debian-archive-keyring" not in signed_by:
            continue   # a third-party repository
        if not _DEBIAN_COMPONENTS.intersection(components) or "/" in host_suite:
            continue
        suffix = next((s for s in _SUFFIXES if host_suite.endswith(s)), "")
        base = host_suite[:len(host_suite) - len(suffix)]
        if base not in _DEBIAN_SUITES and base != suite:
            continue   # not Debian's archive (Ubuntu's, a vendor's "nodistro", ...)
        line = f"deb {uri.rstrip('/')} {suite}{suffix} main"
        if line not in out:
            out.append(line)
    if not any(line.split()[2] == suite for line in out):
        out = [f"deb {FALLBACK_MIRRORS[0]} {suite} main",
               f"deb {FALLBACK_MIRRORS[0]} {suite}-updates main",
               f"deb {FALLBACK_MIRRORS[1]} {suite}-security main"]
    return out


def _host_sources(apt_dir: Path) -> Iterator[tuple[str, str, list[str], str]]:
    """(URI, suite, components, signed-by) of each enabled ``deb`` source on the host."""
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for raw in path.read_text().splitlines():
                yield from _one_line(raw)
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            yield from _deb822(path.read_text())


def _one_line(raw: str) -> Iterator[tuple[str, str, list[str], str]]:
    line = raw.split("#", 1)[0].strip()
    opts: dict[str, str] = {}
    m = re.match(r"^(\S+)\s+\[([^\]]*)\]\s*(.*)$", line)
    if m:
        kind, rest = m.group(1), m.group(3)
        for opt in m.group(2).split():
            key, _, value = opt.partition("=")
            opts[key.lower()] = value
        fields = [kind, *rest.split()]
    else:
        fields = line.split()
    if len(fields) >= 4 and fields[0] == "deb":
        yield fields[1], fields[2], fields[3:], opts.get("signed-by", "")


def _deb822(text: str) -> Iterator[tuple[str, str, list[str], str]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += "\n" + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            if not sep:
                key = ""
                continue
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or \
                fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        signed_by = fields.get("signed-by", "")
        if "\n" in signed_by:
            signed_by = "inline"   # an embedded key: not Debian's keyring file
        components = fields.get("components", "").split()
        for uri in fields.get("uris", "").split():
            for s in fields.get("suites", "").split():
                yield uri, s, components, signed_by


def host_apt_options(dump: str | None = None) -> list[str]:
    """The host's apt proxy and release-date options, as ``--aptopt`` values."""
    if dump is None:
        try:
            dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True,
                                  timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            dump = ""
    return [line for line in dump.splitlines()
            if _APT_OPTION.match(line) and not line.endswith(' "";')]


# ---------------------------------------------------------------------- mmdebstrap


def _run_mmdebstrap(exe: str, suite: str, packages: list[str], mirrors: list[str],
                    apt_options: list[str], out: Path, hook: Path,
                    say: Callable[[str], None]) -> None:
    """Run mmdebstrap into the tar ``out``, ``hook`` customizing the tree. Raises
    ImageError with mmdebstrap's last lines."""
    hook_dir = next((d for d in _HOOK_DIRS if os.path.isdir(d)), None)
    cmd = [exe, "--variant=minbase", "--mode=auto", "--format=tar",
           f"--include={','.join(packages)}",
           '--aptopt=APT::Install-Recommends "false"', '--aptopt=Acquire::Languages "none"',
           *(f"--aptopt={opt}" for opt in apt_options),
           *(f"--dpkgopt={opt}" for opt in _DPKG_OPTS),
           *([f"--hook-dir={hook_dir}"] if hook_dir else []),
           f"--customize-hook={hook}",
           suite, str(out), *mirrors]
    say(f"mmdebstrap {suite} ({', '.join(packages)}) from {', '.join(_uris(mirrors))}")
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, start_new_session=True)
    except OSError as exc:
        raise ImageError(f"cannot run mmdebstrap: {exc}") from None
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.rstrip()
            if line and not _CHATTER.match(line):
                tail.append(line)
                if line[:3] in ("I: ", "W: ", "E: "):   # not apt's and dpkg's chatter
                    say(line[3:] if line[0] == "I" else line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:   # interrupted: let mmdebstrap unmount and clean up
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
    if rc != 0 or not out.is_file():
        raise ImageError(f"mmdebstrap failed (exit status {rc}) building {suite} from"
                         f" {', '.join(_uris(mirrors))}:\n" + "\n".join(tail))


def _uris(mirrors: Sequence[str]) -> list[str]:
    """The URIs of one-line entries (``deb [opts] URI suite components``)."""
    uris = (re.sub(r"\[[^\]]*\]", " ", m).split() for m in mirrors)
    return list(dict.fromkeys(f[1] for f in uris if len(f) > 1))


def _percent(say: Callable[[str], None]) -> Callable[[int, int], None]:
    """Adapt ``say`` to ``progress(done, total)``, once per 20 %."""
    last = [-1]

    def report(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        if pct // 20 > last[0]:
            last[0] = pct // 20
            say(f"root filesystem: {pct}%")
    return report


# ---------------------------------------------------------------------- the image


def _store_image(store: ImageStore, tar: Path, *, suite: str, packages: list[str],
                 mirrors: list[str], seconds: float) -> ImportedImage:
    """Store ``tar`` as a one-layer OCI image (layer, config, manifest blobs)."""
    h = hashlib.sha256()
    size = 0
    with open(tar, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    layer = LayerRef(f"sha256:{h.hexdigest()}", OCI_LAYER_TAR, size)
    store.blobs.put_file(layer.digest, tar, size=size)
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = ImageConfig(env=ENV, working_dir="/root", cmd=("/bin/bash",))
    labels = {f"{LABEL}.suite": suite, f"{LABEL}.packages": " ".join(packages),
              f"{LABEL}.mirrors": " ".join(_uris(mirrors)),
              f"{LABEL}.build-seconds": f"{seconds:.1f}"}
    config_doc: dict[str, Any] = {
        "created": created, "architecture": config.architecture, "os": config.os,
        "config": {"Env": list(config.env), "WorkingDir": config.working_dir,
                   "Cmd": list(config.cmd), "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "history": [{"created": created, "created_by":
                     f"mmdebstrap --variant=minbase {suite} --include={','.join(packages)}"}],
    }
    config_bytes = _canonical(config_doc)
    config_digest = store.blobs.put_bytes(config_bytes)
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                   "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest,
                    "size": layer.size}],
        "annotations": {"org.opencontainers.image.created": created,
                        "org.opencontainers.image.title": f"debian {suite}"},
    }
    manifest_digest = store.blobs.put_bytes(_canonical(manifest))
    return ImportedImage(manifest_digest, config_digest, config, (layer,))


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
