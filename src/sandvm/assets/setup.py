"""`sandvm setup`: install QEMU, fetch the guest kernel, build the initramfs.

Each step is idempotent and keyed by content: a second run finds everything in
place and does nothing. Every failure is a SetupError naming the step and what
to do about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandvm.assets.buildkey import (
    BUILDER_VERSION,
    GUEST_MODULES,
    GUEST_PACKAGES,
    PRUNE,
    PRUNE_GLOBS,
    build_key,
    guest_files,
)
from sandvm.assets.cpio import write_cpio
from sandvm.assets.paths import build_dir, find_qemu, read_manifest, sandvm_home
from sandvm.errors import SetupError

# qemu-utils: qcow2 overlays; e2fsprogs: `mke2fs -d <dir>` builds an image's ext4
# rootfs; fakeroot: that build as a non-root user; zstd: zstd layers; mmdebstrap: the
# `debian` image; skopeo + docker-registry: the loopback registry tests; openssl: the
# egress tests' self-signed certificate
HOST_PACKAGES = ("qemu-system-x86", "qemu-utils", "e2fsprogs", "fakeroot", "zstd",
                 "mmdebstrap", "skopeo", "docker-registry", "openssl")
KERNEL_META = "linux-image-cloud-amd64"
KEEP_OTHER_BUILDS = 4  # guest builds of other sandvm versions kept (newest first)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SetupStep:
    """One step of `sandvm setup`: a name users see and the function that does it."""

    name: str
    run: Callable[[Progress], str]


def _run(step: str, argv: list[str], *, cwd: Path | None = None, hint: str = "") -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SetupError(step, f"{argv[0]} is not installed. {hint}".strip()) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SetupError(
            step, f"`{' '.join(argv)}` exited {proc.returncode}: {' / '.join(tail)}. {hint}".strip()
        )
    return proc.stdout


def _is_root() -> bool:
    return os.geteuid() == 0


def _pkg_installed(name: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True,
                       text=True, check=False)
    return r.returncode == 0 and "install ok installed" in r.stdout


_apt_updated = False


def _apt_update(step: str, progress: Progress) -> None:
    global _apt_updated
    if _apt_updated:
        return
    if not _is_root():
        raise SetupError(step, "the apt package lists need `apt-get update`: run it as root")
    progress("apt-get update")
    _run(step, ["apt-get", "update", "-q"], hint="check that Debian's mirrors are reachable")
    _apt_updated = True


def install_host_packages(progress: Progress) -> str:
    step = "host packages"
    missing = [p for p in HOST_PACKAGES if not _pkg_installed(p)]
    if not missing:
        return "already installed: " + ", ".join(HOST_PACKAGES)
    if not _is_root():
        raise SetupError(step, f"missing {', '.join(missing)}: run `sudo apt-get install -y"
                               f" --no-install-recommends {' '.join(missing)}` and run setup again")
    _apt_update(step, progress)
    progress(f"apt-get install {' '.join(missing)}")
    env_argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                "--no-install-recommends", *missing]
    _run(step, env_argv, hint="see the apt error above")
    return "installed " + ", ".join(missing)


def kernel_package(step: str, progress: Progress) -> str:
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True,
                             text=True, check=False).stdout
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*)", out)
        if m:
            return m.group(1)
        if attempt == 0:
            _apt_update(step, progress)
    raise SetupError(step, f"cannot resolve {KERNEL_META}: run `apt-get update`")


def _find_deb(debs: Path, name: str, version: str) -> Path | None:
    # Debian names some debs with arch "all"; the epoch colon is quoted as %3a
    found = sorted(debs.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
    return found[0] if found else None


def _candidates(step: str, names: list[str], progress: Progress) -> dict[str, str]:
    """The candidate version apt would download for each name (one apt-cache call)."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True,
                             check=False).stdout
        found: dict[str, str] = {}
        current = None
        for line in out.splitlines():
            if line and not line[0].isspace() and line.endswith(":"):
                current = line[:-1].split(":")[0]
            m = re.match(r"\s+Candidate:\s*(\S+)", line)
            if m and current in names and m.group(1) != "(none)":
                found[current] = m.group(1)
        missing = [n for n in names if n not in found]
        if not missing:
            return found
        if attempt == 0:
            _apt_update(step, progress)
    raise SetupError(step, f"apt knows no package {', '.join(missing)}: run `apt-get update`"
                           " and check the apt sources")


def download_debs(names: list[str], step: str, progress: Progress) -> list[Path]:
    """`apt-get download` each package into $SANDVM_HOME/debs (cached by name and version)."""
    debs = sandvm_home() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    versions = _candidates(step, names, progress)
    want = [f"{n}={v}" for n, v in versions.items() if _find_deb(debs, n, v) is None]
    if want:
        progress(f"apt-get download {len(want)} packages")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            os.chmod(tmp, 0o755)  # apt drops privileges to _apt for the download
            _run(step, ["apt-get", "download", "-q", *want], cwd=Path(tmp),
                 hint="check that Debian's mirrors are reachable")
            for f in Path(tmp).glob("*.deb"):
                os.replace(f, debs / f.name)
    paths = []
    for n, v in versions.items():
        p = _find_deb(debs, n, v)
        if p is None:
            raise SetupError(step, f"apt-get download did not produce {n} {v}")
        paths.append(p)
    return paths


def _extract(step: str, deb: Path, dest: Path) -> None:
    _run(step, ["dpkg-deb", "-x", str(deb), str(dest)],
         hint="is the .deb complete? delete it from $SANDVM_HOME/debs and run setup again")


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def fetch_kernel(progress: Progress) -> str:
    step = "guest kernel"
    pkg = kernel_package(step, progress)
    release = pkg.removeprefix("linux-image-")
    kdir = sandvm_home() / "kernel" / release
    done = kdir / ".complete"
    if done.exists():
        return f"kernel {release} already unpacked"
    (deb,) = download_debs([pkg], step, progress)
    progress(f"unpacking {deb.name}")
    with tempfile.TemporaryDirectory(dir=sandvm_home()) as tmp:
        _extract(step, deb, Path(tmp))
        boot = Path(tmp) / "boot"
        vmlinuz = next(boot.glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise SetupError(step, f"{deb.name} holds no vmlinuz")
        moddir = Path(tmp) / "lib" / "modules" / release / "kernel"
        staged = Path(tmp) / "staged"
        (staged / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz, staged / "vmlinuz")
        order: list[str] = []
        loaded: set[str] = set()
        for rel in GUEST_MODULES:
            ko = moddir / rel
            if not ko.exists():
                raise SetupError(step, f"{deb.name} lacks module {rel}")
            name = ko.stem.replace("-", "_")
            for dep in _modinfo_depends(ko):
                if dep.replace("-", "_") not in loaded:
                    raise SetupError(step, f"module {name} needs {dep} loaded first")
            loaded.add(name)
            shutil.copy2(ko, staged / "modules" / ko.name)
            order.append(ko.name)
        (staged / "modules.order").write_text("\n".join(order) + "\n")
        (staged / ".complete").write_text(release)
        if kdir.exists():
            shutil.rmtree(kdir)
        kdir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, kdir)
    return f"kernel {release} unpacked"


def _initramfs_key(debs: list[Path], kdir: Path, build: str) -> str:
    """The key of one cpio of build ``build``: the Debian packages and the kernel too."""
    h = hashlib.sha256()
    h.update(BUILDER_VERSION.encode())
    h.update(build.encode())
    for d in debs:
        h.update(d.name.encode())
    h.update((kdir / "modules.order").read_bytes())
    h.update(kdir.name.encode())
    return h.hexdigest()[:20]


def _prune(root: Path) -> None:
    for rel in PRUNE:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for pattern in PRUNE_GLOBS:
        for p in root.glob(pattern):
            p.unlink()


def _precompile(root: Path) -> int:
    """Replace the stdlib's .py files with unchecked-hash .pyc files (sourceless).

    The guest then imports without compiling (slow under TCG) and without
    writing. Needs the host Python to share the guest's bytecode version (3.11).
    """
    if sys.version_info[:2] != (3, 11):
        return 0
    lib = root / "usr" / "lib" / "python3.11"
    count = 0
    for src in sorted(lib.rglob("*.py")):
        guest_path = "/" + str(src.relative_to(root))
        try:
            py_compile.compile(
                str(src), cfile=str(src) + "c", dfile=guest_path, doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError:
            continue
        src.unlink()
        count += 1
    return count


def build_initramfs(progress: Progress) -> str:
    """Build (or find) the initramfs of this sandvm's build key under
    ``initramfs/<build key>/``; builds of other sandvm versions are left in place."""
    step = "guest initramfs"
    build = build_key()
    files = guest_files()
    man = read_manifest(None, build) or {}
    kpkg = kernel_package(step, progress)
    release = kpkg.removeprefix("linux-image-")
    kdir = sandvm_home() / "kernel" / release
    if not (kdir / ".complete").exists():
        raise SetupError(step, "the guest kernel is not unpacked: run `sandvm setup` again")
    debs = download_debs(list(GUEST_PACKAGES), step, progress)
    key = _initramfs_key(debs, kdir, build)
    out_dir = build_dir(None, build)
    out = out_dir / f"{key}.cpio"
    if out.exists():
        _write_manifest(kdir, out, release, build)
        if man.get("initramfs") == str(out):
            return f"initramfs {build}/{key} up to date"
        return f"initramfs {build}/{key} selected"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sandvm_home()) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        for deb in debs:
            progress(f"unpacking {deb.name}")
            _extract(step, deb, root)
        _prune(root)
        progress("compiling the Python standard library")
        _precompile(root)
        (root / "bin").mkdir(exist_ok=True)
        bb = root / "bin" / "busybox"
        if not bb.exists():
            raise SetupError(step, "busybox-static did not provide /bin/busybox")
        py = root / "usr" / "bin" / "python3"
        if not py.exists():
            py.symlink_to("python3.11")
        for rel, data in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        os.chmod(root / "init", 0o755)
        os.chmod(root / "usr" / "bin" / "nohup", 0o755)
        # the agent's modules as unchecked .pyc in __pycache__ (sources stay for tracebacks)
        if sys.version_info[:2] == (3, 11):
            for mod in ("agent", "wire"):
                src = root / "lib" / "sandvm" / f"{mod}.py"
                py_compile.compile(
                    str(src), cfile=str(root / "lib" / "sandvm" / "__pycache__"
                                        / f"{mod}.cpython-311.pyc"),
                    dfile=f"/lib/sandvm/{mod}.py", doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )
        mdir = root / "lib" / "sandvm" / "modules"
        mdir.mkdir(parents=True)
        order = []
        for name in (kdir / "modules.order").read_text().split():
            shutil.copy2(kdir / "modules" / name, mdir / name)
            order.append(f"/lib/sandvm/modules/{name}")
        (root / "lib" / "sandvm" / "modules.order").write_text("\n".join(order) + "\n")
        for d in ("proc", "sys", "dev", "tmp", "run", "root", "etc", "sbin", "usr/sbin", "mnt"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                             "nobody:x:65534:65534:nobody:/:/bin/false\n")
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (root / "etc" / "hostname").write_text("sandvm\n")
        (root / "etc" / "hosts").write_text("127.0.0.1 localhost sandvm\n::1 localhost\n")
        progress("writing the cpio archive")
        tmp_out = out_dir / f".{key}.cpio.tmp"
        with open(tmp_out, "wb") as f:
            write_cpio(root, f)
        os.replace(tmp_out, out)
    _write_manifest(kdir, out, release, build)
    # drop this build's older cpios (other packages or kernel), and builds of other
    # sandvm versions beyond the newest KEEP_OTHER_BUILDS
    for old in out_dir.glob("*.cpio"):
        if old != out:
            old.unlink()
    prune_builds(keep=KEEP_OTHER_BUILDS, current=build)
    size_mib = out.stat().st_size / (1 << 20)
    return f"initramfs {build}/{key} built ({size_mib:.1f} MiB)"


def prune_builds(*, keep: int, current: str, home: Path | None = None) -> list[str]:
    """Remove guest builds of other sandvm versions but the ``keep`` newest (by when
    their manifest was written); ``current`` is never removed. Returns the removed keys."""
    root = (home or sandvm_home()) / "initramfs"
    others = []
    for d in root.iterdir() if root.is_dir() else ():
        if d.is_dir() and not d.is_symlink() and d.name != current and re.fullmatch(
                r"[0-9a-f]{20}", d.name):
            try:
                others.append(((d / "assets.json").stat().st_mtime, d))
            except OSError:
                others.append((0.0, d))  # a build cut off before its manifest
    others.sort(reverse=True)
    removed = []
    for _, d in others[keep:]:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed


def _write_manifest(kdir: Path, initramfs: Path, release: str, build: str) -> None:
    """Write the build's own manifest, and the legacy ``$SANDVM_HOME/assets.json``
    (read by sandvm versions from before build keys: the last setup wins there)."""
    data = {"kernel": str(kdir / "vmlinuz"), "initramfs": str(initramfs),
            "kernel_release": release, "modules": str(kdir / "modules"), "build": build}
    for path in (build_dir(None, build) / "assets.json", sandvm_home() / "assets.json"):
        try:
            if json.loads(path.read_text()) == data:
                continue
        except (OSError, ValueError):
            pass
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)


def check_qemu(progress: Progress) -> str:
    step = "QEMU"
    qemu = find_qemu()
    if qemu is None:
        raise SetupError(step, "qemu-system-x86_64 is not on PATH: apt-get install qemu-system-x86")
    out = _run(step, [str(qemu), "-machine", "help"])
    if "microvm" not in out:
        raise SetupError(step, f"{qemu} has no microvm machine: install Debian's qemu-system-x86")
    ver = _run(step, [str(qemu), "--version"]).splitlines()[0]
    return ver


STEPS: tuple[SetupStep, ...] = (
    SetupStep("host packages", install_host_packages),
    SetupStep("QEMU", check_qemu),
    SetupStep("guest kernel", fetch_kernel),
    SetupStep("guest initramfs", build_initramfs),
)


def run_setup(progress: Callable[[str, str], None] | None = None) -> list[tuple[str, str]]:
    """Run every setup step; return (step, outcome) pairs. Raises SetupError."""
    home = sandvm_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError("home", f"cannot create {home}: {exc}; set SANDVM_HOME") from None
    results = []
    for s in STEPS:
        def note(msg: str, _name: str = s.name) -> None:
            if progress:
                progress(_name, msg)
        note("starting")
        try:
            outcome = s.run(note)
        except OSError as exc:
            raise SetupError(s.name, f"{exc}; check free space and permissions under"
                                     f" {home} (or set SANDVM_HOME)") from exc
        note(outcome)
        results.append((s.name, outcome))
    return results
