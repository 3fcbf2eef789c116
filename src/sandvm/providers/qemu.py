"""The QEMU backend: microVM processes supervised from asyncio, controlled over QMP.

One :class:`QemuVm` is one ``qemu-system-x86_64 -M microvm`` child process with a
private runtime directory (mode 0700) holding its QMP and agent sockets (bound here,
passed to QEMU as fds), its bounded console log and its guest RAM file
(``memory-backend-file,share=on``, the basis for fast snapshots). QEMU runs confined
(``jail``: its own uid and namespaces, only its own files; see ``confinement``). If
QEMU dies, the VM is marked failed, every waiter on its agent gets VmCrashed, and the
runtime directory is removed.

:class:`QemuVmProvider` puts seed 000's lifecycle on top: Created (spec only,
no process) → Running (QEMU booted, agent ready) ⇄ Stopped (vCPUs paused) →
Destroyed (process gone, record kept).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import enum
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat as stat_mod
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandvm._files import (
    LIBC,
    OWNER_FILE,
    move_file,
    owner_alive,
    preallocate_like,
    proc_start_time,
    runtime_root,
    sparse_copy,
    write_owner,
)
from sandvm.agent_client import AgentConnection, AgentInfo
from sandvm.assets import Assets, find_assets, sandvm_home
from sandvm.core import DiskSpec, VmSpec, VmState, VmView, escape_text, validate_vm_id
from sandvm.errors import (
    AgentDisconnected,
    AgentError,
    InvalidTransition,
    QmpError,
    SandboxBusy,
    SandvmError,
    SnapshotAlreadyExists,
    Unsupported,
    VmAlreadyExists,
    VmBootError,
    VmCrashed,
    VmError,
    VmNotFound,
)
from sandvm.providers import jail
from sandvm.providers.base import check_transition
from sandvm.providers.qmp import QmpClient

__all__ = [
    "AccelChoice",
    "Confinement",
    "QemuVm",
    "QemuVmProvider",
    "QemuVmState",
    "choose_accel",
    "confinement",
    "host_tsc_khz",
    "move_file",
    "runtime_root",
    "sweep_stale_rundirs",
]

DEFAULT_BOOT_TIMEOUT = 60.0
# TCG's translation-block cache (MiB): it is most of QEMU's private memory per VM
DEFAULT_TB_MIB = 64
PROBE_TIMEOUT = 12.0


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz (from /proc/cpuinfo), for tsc_early_khz."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


HOLDER_FILE = "holder"  # flock'ed by the one process attached to a detachable VM


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours is gone for our purposes
    return (_proc_state(pid) or "Z") != "Z"


async def _pid_exit(pid: int) -> None:
    """Return once ``pid`` (any process, not only a child) has exited: a pidfd read by
    the event loop, no polling; polled every 0.2 s where pidfds are missing."""
    fd = None
    with contextlib.suppress(OSError, AttributeError):
        fd = os.pidfd_open(pid)
    if fd is None:
        while _pid_alive(pid):
            await asyncio.sleep(0.2)
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        if _pid_alive(pid):  # a pid reused before the pidfd was opened: never waited on
            await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


def sweep_stale_rundirs(root: Path | None = None) -> list[Path]:
    """Remove runtime dirs whose owning process is gone (e.g. it was SIGKILLed).

    Its QEMU died with it (PDEATHSIG); the guest RAM file would otherwise stay
    in /dev/shm. Dirs without an owner file are left alone. Returns what was removed.
    """
    root = root or runtime_root()
    removed = []
    for d in root.iterdir():
        if owner_alive(d) is False:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def orphaned_qemus(root: Path | None = None) -> list[tuple[int, Path]]:
    """QEMU processes of this user whose runtime dir (under ``root``) is gone or whose
    owner is dead: the window between fork and PR_SET_PDEATHSIG can leave one behind
    when its parent is SIGKILLed right then. Returns (pid, runtime dir) pairs."""
    root = root or runtime_root()
    prefix = f"path={root}/"
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            owner = entry.stat().st_uid
            # a confined QEMU runs as a uid of its own (only root starts those)
            if owner != os.getuid() and not (os.getuid() == 0 and jail.is_confined_uid(owner)):
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or "qemu-system" not in Path(argv[0]).name:
            continue
        rest = ""
        for i, a in enumerate(argv[:-1]):  # -name guest=sandvm:<rundir>
            if a == "-name" and argv[i + 1].startswith("guest=sandvm:"):
                marked = Path(argv[i + 1].removeprefix("guest=sandvm:").replace(",,", ","))
                if marked.parent == root:
                    rest = marked.name
        if not rest:  # QEMUs started before confinement named their agent socket
            chardev = next((a for a in argv if a.startswith("socket,id=agent,")), "")
            _, _, rest = chardev.partition(prefix)
        if not rest:
            continue
        rundir = root / rest.split("/", 1)[0]
        try:
            pid_s, start = (rundir / OWNER_FILE).read_text().split()
            owner_alive = proc_start_time(int(pid_s)) == start
        except FileNotFoundError:
            # no owner file: gone with its dir (orphaned), or one that never had one (the
            # KVM probe's): only the first is ours to kill
            owner_alive = rundir.exists()
        except (OSError, ValueError):
            owner_alive = False
        if not owner_alive and proc_start_time(int(entry.name)) is not None:
            out.append((int(entry.name), rundir))
    return out


def _set_pdeathsig(parent: int) -> None:
    # QEMU dies with the thread that started it: no orphaned VMs if we are killed
    LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl: it never fires
        os._exit(1)
    if os.environ.get("SANDVM_QEMU_THP", "") != "1":
        # QEMU madvises its TCG code buffer for huge pages: each clone would then
        # hold its translated code in 2 MiB steps. 4 KiB pages keep idle clones small.
        LIBC.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE


_log = logging.getLogger("sandvm.qemu")


@dataclass(frozen=True)
class Confinement:
    """How QEMU processes are confined on this host (``sandvm doctor`` shows it).

    ``mode``: ``uid`` (root: a leased uid per VM, the shared group, own mount and
    network namespaces), ``userns`` (not root: own user, mount and network
    namespaces, the user's own uid), ``none`` (``SANDVM_CONFINE=0``, or the kernel
    allows no namespace).
    """

    mode: str
    detail: str


_CONFINEMENT: Confinement | None = None


def _probe_userns() -> str | None:
    """None if this user can make user + mount namespaces, else why not."""
    try:
        subprocess.run(["true"], preexec_fn=functools.partial(
            _unshare_or_die, 0x10000000 | 0x00020000), check=True, timeout=10,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"user namespaces are not available: {exc}"
    return None


def _unshare_or_die(flags: int) -> None:
    if LIBC.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")


def confinement() -> Confinement:
    """The confinement new QEMU processes get (probed once per process)."""
    global _CONFINEMENT
    if os.environ.get("SANDVM_CONFINE", "1") == "0":
        return Confinement("none", "SANDVM_CONFINE=0: QEMU runs with this process's"
                                   " privileges and sees its whole file system")
    if _CONFINEMENT is None:
        if os.geteuid() == 0:
            _CONFINEMENT = Confinement(
                "uid", f"each QEMU runs as its own uid ({jail.UID_BASE}+, leased under"
                f" {jail.LEASE_DIR}), group {jail.SHARED_GID}, no_new_privs, in its own"
                " mount, network, IPC and UTS namespaces seeing only /usr, a few devices"
                " and its own files; seccomp sandbox on")
        elif (why := _probe_userns()) is None:
            _CONFINEMENT = Confinement(
                "userns", "not root, so QEMU keeps this user's uid (a uid of its own needs"
                " root), in its own user, mount, network, IPC and UTS namespaces seeing"
                " only /usr, a few devices and its own files; seccomp sandbox on")
        else:
            _CONFINEMENT = Confinement(
                "none", f"not root and {why}: QEMU runs with this user's privileges and"
                        " sees its whole file system (seccomp sandbox on)")
    return _CONFINEMENT


def _child_setup(plan: dict[str, Any], parent: int) -> None:
    """preexec_fn of a QEMU: confine it, then tie it to its parent (PDEATHSIG is
    cleared by the uid change, so it comes after)."""
    try:
        jail.enter(plan)
    except OSError as exc:
        os.write(2, f"sandvm: cannot confine QEMU: {exc}\n".encode())
        raise
    _set_pdeathsig(parent)


def scrub(text: str, *paths: Path | str | None) -> str:
    """``text`` (QEMU's or the guest's) fit for an error message: host paths (the given
    ones, sandvm's home and runtime dirs, any absolute path) replaced, control
    characters escaped. The full text belongs in the log only."""
    for p in (*paths, sandvm_home(), _runtime_root_name()):
        if p:
            text = text.replace(str(p), "<sandvm>")
    text = re.sub(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*", "<path>", text)
    return escape_text(text, keep="\n")


def _runtime_root_name() -> str | None:
    try:
        return str(runtime_root())
    except SandvmError:
        return None


# every booted VM until its shutdown: killed at interpreter exit whatever loop it ran on
_LIVE: set[QemuVm] = set()


@atexit.register
def _kill_live_vms() -> None:
    for vm in list(_LIVE):
        vm.kill_now()


def _kernel_cmdline(spec: VmSpec, *, probe: bool = False) -> str:
    args = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1", "reboot=t", "tsc=reliable",
            "nomodeset", "i8042.noaux", "i8042.nokbd", "8250.nr_uarts=1", "random.trust_cpu=on"]
    khz = host_tsc_khz()
    if khz:
        # under TCG with an explicit memory backend the kernel otherwise hangs
        # calibrating the TSC against the PIT (DESIGN.md)
        args.append(f"tsc_early_khz={khz}")
    if probe:
        args.append("sandvm.probe=1")
    args.extend(spec.kernel_args)
    return " ".join(args)


def _disk_args(spec: VmSpec, disk_paths: dict[str, Path]) -> list[str]:
    """-drive/-device pairs; a disk with an overlay is attached through it."""
    out = []
    for d in spec.disks:
        if d.overlay_size is not None:
            path, fmt, ro = disk_paths[d.serial], "qcow2", d.read_only
        else:
            path, fmt, ro = Path(d.path), d.format, d.read_only
        out += ["-drive", f"if=none,id=disk-{d.serial},file={path},format={fmt},"
                          f"readonly={'on' if ro else 'off'},discard=unmap,detect-zeroes=unmap",
                "-device", f"virtio-blk-device,drive=disk-{d.serial},serial={d.serial}"]
    return out


def qcow2_backing(path: Path) -> str | None:
    """The backing file name in a qcow2 header (None if it has none or is not qcow2)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:4] != b"QFI\xfb":
            return None
        offset, size = struct.unpack(">QI", head[8:20])
        if not offset or not 0 < size <= 1023:
            return None
        f.seek(offset)
        return f.read(size).decode(errors="replace")


async def qemu_img(*args: str) -> str:
    """Run ``qemu-img`` with ``args``; its stdout. Raises VmError with its message."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        _log.warning("qemu-img %s failed: %s", " ".join(args), text)
        raise VmError(f"qemu-img {args[0]} failed: {scrub(text[-400:])}")
    return out.decode()


async def make_overlay(backing: Path, backing_format: str, out: Path, size: int) -> None:
    """A qcow2 overlay of ``size`` bytes over ``backing`` (read, never written).

    Raises VmBootError if qemu-img fails (e.g. the backing file is missing).
    """
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
        "-F", backing_format, "-b", str(backing), str(out), str(size),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    msg, _ = await proc.communicate()
    if proc.returncode != 0:
        text = msg.decode(errors="replace").strip()
        _log.warning("cannot create a disk overlay over %s: %s", backing, text)
        raise VmBootError(f"cannot create a disk overlay over disk image {backing.name!r}:"
                          f" {scrub(text[-400:], backing.parent, out.parent)}")


def disk_root() -> Path:
    """Where running VMs keep their disk overlays (on disk, not tmpfs): created 0700."""
    root = sandvm_home() / "vms"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def build_argv(*, assets: Assets, spec: VmSpec, accel: str, rundir: Path,
               fds: dict[str, int], probe: bool = False, restore_from: Path | None = None,
               disk_paths: dict[str, Path] | None = None) -> list[str]:
    """The QEMU command line for one microVM (no network device, seccomp on).

    ``fds`` are the open file descriptors QEMU inherits: ``agent`` and ``qmp``
    (listening unix sockets bound by the host in ``rundir``) and ``console`` (one end
    of a socketpair whose other end feeds a bounded log): QEMU opens no socket or
    log path itself. ``-name guest=sandvm:<rundir>`` marks the process for
    ``orphaned_qemus``.

    With ``restore_from`` (a snapshot directory) guest RAM is that snapshot's
    memory file mapped copy-on-write (share=off: the file never changes, and
    every VM restored from it shares its pages) and QEMU waits for the device
    state (``-incoming defer``).
    """
    mem = f"{spec.memory_mib}M"
    if restore_from is None:
        ram = f"memory-backend-file,id=mem,size={mem},mem-path={rundir / 'mem'},share=on"
        boot = ["-kernel", str(assets.kernel), "-initrd", str(assets.initramfs),
                "-append", _kernel_cmdline(spec, probe=probe)]
    elif not (restore_from / "mem").exists():
        # the RAM arrives in the state stream: a fresh shared file, as after a cold boot
        ram = f"memory-backend-file,id=mem,size={mem},mem-path={rundir / 'mem'},share=on"
        boot = ["-incoming", "defer"]
    else:
        ram = f"memory-backend-file,id=mem,size={mem},mem-path={restore_from / 'mem'},share=off"
        # no -kernel/-initrd: loading them would write into the restored RAM
        boot = ["-incoming", "defer"]
    if accel == "kvm":
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    else:
        thread = "single" if spec.vcpus == 1 else "multi"
        tb = os.environ.get("SANDVM_TCG_TB_MIB", str(DEFAULT_TB_MIB))
        accel_args = ["-accel", f"tcg,thread={thread},tb-size={int(tb)}", "-cpu", "max"]
    return [
        str(assets.qemu),
        "-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on,pit=on,pic=on,memory-backend=mem",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        *accel_args,
        "-smp", str(spec.vcpus),
        "-m", mem,
        "-object", ram,
        *boot,
        "-name", "guest=sandvm:" + str(rundir).replace(",", ",,"),
        "-chardev", f"socket,id=console,fd={fds['console']}",
        "-serial", "chardev:console",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,fd={fds['agent']},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=sandvm.agent",
        "-device", "virtio-rng-device",
        *_disk_args(spec, disk_paths or {}),
        "-chardev", f"socket,id=qmp,fd={fds['qmp']},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-monitor", "none",
    ]


def _tail(path: Path, n: int = 15) -> str:
    """The last ``n`` lines of a bounded log (raw: for logs and checks, not messages)."""
    data = jail.log_tail(path, 8192)
    lines = data.decode("utf-8", "replace").splitlines()[-n:]
    return "\n".join(lines)


def console_tail(rundir: Path, max_bytes: int = 4096) -> bytes:
    """The last bytes a VM wrote to its console (kept bounded: ``jail.CONSOLE_CAP``)."""
    return jail.log_tail(rundir / "console.log", max_bytes)


def _under(path: Path, roots: list[Path]) -> bool:
    real = os.path.realpath(path)
    return any(real == str(r) or real.startswith(str(r).rstrip("/") + "/") for r in roots)


def _backing_chain(top: Path, trusted: list[Path]) -> list[Path]:
    """The files under a qcow2 ``top`` (its backing chain), followed only while each
    lies under ``trusted`` dirs or beside the file naming it: a header a guest's QEMU
    wrote never makes the host expose another file."""
    out: list[Path] = []
    cur = top
    for _ in range(32):
        try:
            name = qcow2_backing(cur)
        except OSError:
            break
        if not name or name.startswith("json:"):
            break
        nxt = Path(name) if name.startswith("/") else cur.parent / name
        if not nxt.is_file() or not _under(nxt, [*trusted, Path(os.path.realpath(cur.parent))]):
            break
        out.append(nxt)
        cur = nxt
    return out


def _grant(path: Path, *, write: bool) -> None:
    """Let confined QEMUs (group ``jail.SHARED_GID``) open ``path`` (read, or also write)
    if its mode does not already: only what is bound into a VM's namespace is reachable."""
    st = os.stat(path)
    need = 0o060 if write else 0o040
    if not write and st.st_mode & 0o004:
        return
    if st.st_gid == jail.SHARED_GID and st.st_mode & need == need:
        return
    os.chown(path, -1, jail.SHARED_GID)
    os.chmod(path, stat_mod.S_IMODE(st.st_mode) | need)


def _kvm_groups(uid: int | None) -> list[int]:
    """Extra groups a confined QEMU needs for /dev/kvm: its group (``kvm`` on most
    hosts). A /dev/kvm only root may open (a container's) is given to the confined
    QEMUs' group instead (never group 0)."""
    st = os.stat("/dev/kvm")
    if uid is None:
        return []  # userns: the user's own access
    if st.st_gid not in (0, jail.SHARED_GID) and st.st_mode & 0o060 == 0o060:
        return [st.st_gid]
    if st.st_gid != jail.SHARED_GID or st.st_mode & 0o060 != 0o060:
        _log.warning("/dev/kvm is only root's: giving it to group %d (confined QEMUs)",
                     jail.SHARED_GID)
        _grant(Path("/dev/kvm"), write=True)
    return []


@dataclass
class _Launch:
    """What one QEMU start needs besides its argv: the fds it inherits (``fds``), the
    host's end of its console, its confinement plan and uid lease."""

    fds: dict[str, int]
    console_host: int
    plan: dict[str, Any]
    lease_fd: int | None = None
    uid: int | None = None

    def qemu_fds(self) -> tuple[int, ...]:
        return tuple(self.fds.values())

    def close_qemu_side(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}

    def close_all(self) -> None:
        self.close_qemu_side()
        for fd in (self.console_host, self.lease_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.console_host, self.lease_fd = -1, None


def _prepare_launch(rundir: Path, *, assets: Assets, spec: VmSpec, accel: str,
                    restore_from: Path | None = None, disk_paths: dict[str, Path] | None = None,
                    diskdir: Path | None = None) -> _Launch:
    """Bind the VM's sockets, make its console pair, lease its uid and describe what its
    namespace holds (see ``jail``), giving it the files it must open. Raises OSError."""
    fds: dict[str, int] = {}
    launch = _Launch(fds=fds, console_host=-1, plan={"mode": "none"})
    try:
        for name in ("agent", "qmp"):
            sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sk.bind(str(rundir / f"{name}.sock"))
                sk.listen(16)
            except OSError:
                sk.close()
                raise
            fds[name] = sk.detach()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds["console"], launch.console_host = a.detach(), b.detach()
        conf = confinement()
        if conf.mode == "none":
            return launch
        uid = None
        if conf.mode == "uid":
            uid, launch.lease_fd = jail.lease_uid()
            launch.uid = uid

        def own(path: Path) -> None:
            if uid is not None:
                os.chown(path, uid, jail.SHARED_GID)

        root = rundir / "root"
        root.mkdir(mode=0o755)
        ro: list[Path] = []
        rw: list[Path] = []
        if restore_from is not None and (restore_from / "mem").exists():
            ram = restore_from / "mem"  # mapped privately, but QEMU 7.2 opens it O_RDWR
            if uid is not None:
                _grant(ram, write=True)
        else:
            ram = rundir / "mem"
            os.close(os.open(ram, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            own(ram)
        rw.append(ram)
        if restore_from is None:
            ro += [assets.kernel, assets.initramfs]
        trusted = [Path(os.path.realpath(sandvm_home())), Path(os.path.realpath(
            runtime_root()))]
        if diskdir is not None:
            rw.append(diskdir)
            if uid is not None:
                os.chown(diskdir, -1, jail.SHARED_GID)
                os.chmod(diskdir, 0o710)
            trusted.append(Path(os.path.realpath(diskdir)))
        for d in spec.disks:
            if d.overlay_size is not None:
                top = (disk_paths or {})[d.serial]
                own(top)
            else:
                top = Path(d.path)
                (ro if d.read_only else rw).append(top)
                if uid is not None:
                    _grant(top, write=not d.read_only)
            chain = _backing_chain(top, [*trusted, Path(os.path.realpath(Path(d.path).parent))])
            for f in chain:
                if diskdir is None or not _under(f, [diskdir]):
                    ro.append(f)
                if uid is not None and os.stat(f).st_uid != uid:
                    _grant(f, write=False)
        dev = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
        groups: list[int] = []
        if accel == "kvm":
            dev.append("/dev/kvm")
            groups += _kvm_groups(uid)
        launch.plan = {"mode": conf.mode, "uid": uid, "gid": jail.SHARED_GID,
                       "groups": groups, "root": str(root), "dev": dev,
                       "ro": sorted({str(x) for x in ro}), "rw": sorted({str(x) for x in rw})}
        return launch
    except BaseException:
        launch.close_all()
        raise


# --------------------------------------------------------------------------- accelerator


@dataclass(frozen=True)
class AccelChoice:
    """Which accelerator `run` uses and why."""

    accel: str
    kvm_present: bool
    kvm_usable: bool
    reason: str
    cached: bool = False


def _probe_key(assets: Assets) -> str:
    st = assets.kernel.stat()
    return f"{assets.qemu}:{assets.kernel}:{st.st_size}:{os.uname().release}"


async def _probe_kvm(assets: Assets, timeout: float) -> tuple[bool, str]:
    rundir = Path(tempfile.mkdtemp(prefix="probe-", dir=runtime_root()))
    launch: _Launch | None = None
    try:
        launch = await asyncio.to_thread(_prepare_launch, rundir, assets=assets, spec=VmSpec(),
                                         accel="kvm")
        argv = build_argv(assets=assets, spec=VmSpec(), accel="kvm", rundir=rundir,
                          fds=launch.fds, probe=True)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, pass_fds=launch.qemu_fds(),
            preexec_fn=functools.partial(_child_setup, launch.plan, os.getpid()))
        launch.close_qemu_side()
        jail.BoundedLog(rundir / "console.log", jail.CONSOLE_CAP).pump(launch.console_host)
        launch.console_host = -1  # the pump closes it
        deadline = time.monotonic() + timeout
        console = rundir / "console.log"
        try:
            while time.monotonic() < deadline:
                if "SANDVM-PROBE-OK" in _tail(console):
                    return True, "a probe boot under KVM reached the guest's init"
                if proc.returncode is not None:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.1)
            if "SANDVM-PROBE-OK" in _tail(console):
                return True, "a probe boot under KVM reached the guest's init"
            if proc.returncode is not None:
                assert proc.stderr is not None
                err = (await proc.stderr.read()).decode(errors="replace").strip()
                return False, f"QEMU failed under KVM: {err.splitlines()[-1] if err else '?'}"
            return False, (f"a probe boot under KVM did not reach the guest's init within"
                           f" {timeout:.0f} s (e.g. a PVM-only or nested host)")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        if launch is not None:
            launch.close_all()
        shutil.rmtree(rundir, ignore_errors=True)


async def choose_accel(assets: Assets, *, refresh: bool = False,
                       timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """KVM if /dev/kvm exists and a bounded probe boot works under it, else TCG.

    ``SANDVM_ACCEL=kvm|tcg`` forces a choice. The probe result is cached in
    ``$SANDVM_HOME/accel.json`` per QEMU, kernel and host kernel.
    """
    forced = os.environ.get("SANDVM_ACCEL")
    present = os.path.exists("/dev/kvm")
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, present, forced == "kvm", f"forced by SANDVM_ACCEL={forced}")
    if not present:
        return AccelChoice("tcg", False, False, "/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", True, False, "/dev/kvm is not accessible to this user")
    cache = sandvm_home() / "accel.json"
    key = _probe_key(assets)
    if not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                usable = bool(data["kvm_usable"])
                return AccelChoice("kvm" if usable else "tcg", True, usable,
                                   str(data["reason"]), cached=True)
    usable, reason = await _probe_kvm(assets, timeout)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "kvm_usable": usable, "reason": reason}))
        os.replace(tmp, cache)
    return AccelChoice("kvm" if usable else "tcg", True, usable, reason)


# --------------------------------------------------------------------------- one VM


class QemuVmState(enum.Enum):
    """One QEMU process's life as its QemuVm sees it (``QemuVm.state``)::

        NEW ──boot / attach──▶ BOOTING ──agent ready──▶ RUNNING
        BOOTING | RUNNING ──QEMU died──▶ FAILED (``failure`` says why)
        BOOTING | RUNNING | FAILED ──detach──▶ DETACHED (runs on under its keeper)
        any ──shutdown──▶ STOPPING ──▶ GONE (process and files gone; shutdown again: GONE)

    Not the provider's ``VmState`` (seed 000's Created/Running/Stopped/Destroyed, which
    the provider keeps per VM id): this is the process under it, with the states that
    lifecycle has no word for (booting, failed, detached, stopping).
    """

    NEW = "new"
    BOOTING = "booting"
    RUNNING = "running"
    FAILED = "failed"
    DETACHED = "detached"
    STOPPING = "stopping"
    GONE = "gone"


_Q = QemuVmState
_QEMU_NEXT: dict[QemuVmState, frozenset[QemuVmState]] = {
    _Q.NEW: frozenset({_Q.BOOTING, _Q.STOPPING}),
    _Q.BOOTING: frozenset({_Q.RUNNING, _Q.FAILED, _Q.DETACHED, _Q.STOPPING}),
    _Q.RUNNING: frozenset({_Q.FAILED, _Q.DETACHED, _Q.STOPPING}),
    _Q.FAILED: frozenset({_Q.DETACHED, _Q.STOPPING}),
    _Q.DETACHED: frozenset({_Q.STOPPING}),
    _Q.STOPPING: frozenset({_Q.GONE}),
    _Q.GONE: frozenset({_Q.STOPPING}),
}
# shut down or let go on purpose: QEMU's exit then is no crash
_LETTING_GO = frozenset({_Q.STOPPING, _Q.GONE, _Q.DETACHED})


class QemuVm:
    """One supervised QEMU process and its agent connection.

    ``boot`` is allowed once, when NEW; ``pause``/``resume`` while running;
    ``detach`` once booted (a detachable VM); ``shutdown`` in any state
    (idempotent). A dead QEMU fails every agent waiter with VmCrashed. See
    QemuVmState.
    """

    def __init__(self, vm_id: str, spec: VmSpec, *, assets: Assets, accel: str) -> None:
        self.vm_id = vm_id
        self.spec = spec
        self.assets = assets
        self.accel = accel
        self.rundir: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QmpClient | None = None
        self.agent: AgentConnection | None = None
        self.agent_info: AgentInfo | None = None
        self.failure: SandvmError | None = None
        self.boot_seconds: float | None = None
        self._state = QemuVmState.NEW
        self._monitor: asyncio.Task[None] | None = None
        self.restored_from: Path | None = None
        self.private_ram = False
        self.stopped_at = 0.0  # monotonic time of the last save_state's QMP ``stop``
        self.diskdir: Path | None = None  # this VM's disk overlays (on disk)
        self.disk_tops: dict[str, Path] = {}  # serial -> the overlay QEMU writes now
        self.frozen_disks: dict[str, Path] = {}  # serial -> layer frozen by save_state
        self.disk_images: dict[str, Path] = {}  # serial -> the raw image under its layers
        # detachable VMs: QEMU's parent is a keeper process (runtime/keeper.py), not us
        self.keeper_job: dict[str, Any] | None = None
        self.keeper_pid: int | None = None
        self.qemu_pid: int | None = None
        self.resumed = False  # attach found it paused and let it run: its clock lags
        self._holder_fd: int | None = None  # flock on rundir/holder: we are its one user
        self.uid: int | None = None  # QEMU's own uid when confined by uid
        self._lease_fd: int | None = None  # holds that uid while our child QEMU lives

    def _hold(self, *, wait: float = 0.0) -> None:
        """Become the one process that uses this detachable VM (an flock, released by
        the kernel if we die). Raises SandboxBusy if another process holds it for longer
        than ``wait`` seconds."""
        assert self.rundir is not None
        path = self.rundir / HOLDER_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise SandboxBusy(
                        f"sandbox {self.vm_id} is in use by another process"
                        f" (pid {holder or '?'}): detach it there, or retry when it is done"
                        ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._holder_fd = fd

    def _let_go_hold(self) -> None:
        if self._holder_fd is not None:
            os.close(self._holder_fd)  # closing the last fd drops the flock
            self._holder_fd = None

    @property
    def state(self) -> QemuVmState:
        """Where this QEMU process is in its life. Any state."""
        return self._state

    @property
    def detached(self) -> bool:
        """Whether this VM was let go (``detach``): it runs on, someone else's."""
        return self._state is QemuVmState.DETACHED

    def _move(self, target: QemuVmState) -> None:
        """The one place the state changes. Raises VmError for a transition QemuVmState
        does not allow (a bug, not a user's error)."""
        if target not in _QEMU_NEXT[self._state]:
            raise VmError(f"VM {self.vm_id} is {self._state.value}; it cannot become"
                          f" {target.value}")
        self._state = target

    @property
    def pid(self) -> int | None:
        """QEMU's pid."""
        if self.qemu_pid is not None:
            return self.qemu_pid
        return self.proc.pid if self.proc else None

    @property
    def exited(self) -> bool:
        """Whether no QEMU child of ours runs (never started, gone, or under a keeper):
        what only it used (its volumes) can be released."""
        return self.proc is None or self.proc.returncode is not None

    async def wait_exit(self) -> None:
        """Return once ``exited``."""
        if self.proc is not None:
            await self.proc.wait()

    @property
    def alive(self) -> bool:
        if self.proc is None and self.keeper_pid is not None:  # attached from elsewhere
            return self.failure is None and _pid_alive(self.keeper_pid)
        return self.proc is not None and self.proc.returncode is None and self.failure is None

    async def boot(self, *, timeout: float = DEFAULT_BOOT_TIMEOUT,
                   restore_from: Path | None = None) -> None:
        """Start QEMU and wait for the agent's hello. Raises VmBootError; cleans up on failure.

        With ``restore_from`` the VM resumes from that snapshot directory (its
        ``mem`` and ``state`` files) instead of booting the kernel.
        """
        if self._state is not QemuVmState.NEW:
            raise InvalidTransition(VmState.RUNNING, VmState.RUNNING, vm_id=self.vm_id)
        self._move(QemuVmState.BOOTING)
        t0 = time.monotonic()
        sweep_stale_rundirs()
        self.rundir = Path(tempfile.mkdtemp(prefix=f"{self.vm_id}-", dir=runtime_root()))
        os.chmod(self.rundir, 0o700)
        write_owner(self.rundir)
        disk_paths: dict[str, Path] = {}
        if any(d.overlay_size is not None for d in self.spec.disks):
            sweep_stale_rundirs(disk_root())
            self.diskdir = Path(tempfile.mkdtemp(prefix=f"{self.vm_id}-", dir=disk_root()))
            write_owner(self.diskdir)
            try:
                for d in self.spec.disks:
                    if d.overlay_size is not None:
                        backing = await asyncio.to_thread(self._pin, d)
                        disk_paths[d.serial] = self.diskdir / f"{d.serial}-0.qcow2"
                        await make_overlay(backing, d.format, disk_paths[d.serial],
                                           d.overlay_size)
            except BaseException:
                await self._cleanup_files()
                raise
        self.disk_tops = dict(disk_paths)
        try:
            launch = await asyncio.to_thread(
                _prepare_launch, self.rundir, assets=self.assets, spec=self.spec,
                accel=self.accel, restore_from=restore_from, disk_paths=disk_paths,
                diskdir=self.diskdir)
        except OSError as exc:
            _log.warning("VM %s: cannot prepare QEMU's confinement: %s", self.vm_id, exc)
            await self._cleanup_files()
            raise VmBootError(f"cannot prepare VM {self.vm_id}'s confinement"
                              f" ({type(exc).__name__}: {scrub(exc.strerror or '')}); set"
                              " SANDVM_CONFINE=0 to run QEMU unconfined") from exc
        self.uid = launch.uid
        argv = build_argv(assets=self.assets, spec=self.spec, accel=self.accel,
                          rundir=self.rundir, fds=launch.fds, restore_from=restore_from,
                          disk_paths=disk_paths)
        self.restored_from = restore_from
        # RAM mapped privately from a snapshot file (not a file of our own)?
        self.private_ram = restore_from is not None and (restore_from / "mem").exists()
        if self.keeper_job is not None:
            await self._start_keeper(argv, launch)
        else:
            err_r, err_w = os.pipe()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=err_w, stderr=err_w,
                    pass_fds=launch.qemu_fds(),
                    preexec_fn=functools.partial(_child_setup, launch.plan, os.getpid()))
            except (OSError, subprocess.SubprocessError) as exc:
                os.set_blocking(err_r, False)
                with contextlib.suppress(OSError):
                    exc.add_note(os.read(err_r, 4096).decode(errors="replace"))
                os.close(err_r)
                launch.close_all()
                _log.warning("VM %s: cannot start %s: %s %s", self.vm_id, argv[0], exc,
                             getattr(exc, "__notes__", ""))
                await self._cleanup_files()
                raise VmBootError(f"cannot start QEMU for VM {self.vm_id}"
                                  f" ({type(exc).__name__}); see the log") from exc
            finally:
                os.close(err_w)
            jail.BoundedLog(self.rundir / "qemu.log", jail.STDERR_CAP).pump(err_r)
            jail.BoundedLog(self.rundir / "console.log", jail.CONSOLE_CAP).pump(
                launch.console_host)
            launch.console_host = -1  # the pump closes it
            self._lease_fd, launch.lease_fd = launch.lease_fd, None  # until QEMU is gone
            launch.close_all()
        _LIVE.add(self)
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        try:
            await asyncio.wait_for(self._connect(), timeout)
        except (asyncio.CancelledError, KeyboardInterrupt):
            await asyncio.shield(self.shutdown())
            raise
        except TimeoutError:
            detail = self._diagnostics()
            await self.shutdown()
            raise VmBootError(
                f"VM {self.vm_id} did not become ready within {timeout:.0f} s"
                f" (accelerator {self.accel}).{detail}") from None
        except SandvmError as exc:
            detail = self._diagnostics()
            await self.shutdown()
            if isinstance(exc, VmBootError):
                raise
            raise VmBootError(f"VM {self.vm_id} failed to boot:"
                              f" {scrub(exc.message, self.rundir, self.diskdir)}{detail}"
                              ) from exc
        self.boot_seconds = time.monotonic() - t0
        self._move(QemuVmState.RUNNING)

    def _diagnostics(self) -> str:
        """QEMU's last words and the guest console's tail for an error message: host
        paths replaced and control characters escaped (``scrub``); the raw text goes to
        the log only."""
        if self.rundir is None:
            return ""
        parts = []
        qlog = _tail(self.rundir / "qemu.log", 5)
        console = _tail(self.rundir / "console.log", 10)
        if qlog or console:
            _log.warning("VM %s: QEMU said: %r; guest console tail: %r", self.vm_id, qlog,
                         console)
        if qlog:
            parts.append(f"\nQEMU said:\n{scrub(qlog, self.rundir, self.diskdir)}")
        if console:
            parts.append("\nlast guest console lines:\n"
                         f"{scrub(console, self.rundir, self.diskdir)}")
        return "".join(parts)

    async def _wait_socket(self, path: Path) -> None:
        while True:
            if self.proc is None and self.keeper_pid is not None:  # attached
                if not _pid_alive(self.keeper_pid):
                    raise VmBootError(f"sandbox {self.vm_id}'s keeper is gone")
            elif self.proc is None or self.proc.returncode is not None:
                raise VmBootError(f"QEMU exited with status {self.proc and self.proc.returncode}"
                                  f" before accepting connections.{self._diagnostics()}")
            if path.exists():
                return
            await asyncio.sleep(0.005)

    async def _connect(self, *, resume: bool = False) -> None:
        """Connect to the agent and QMP; load the snapshot's state (a restore), or with
        ``resume`` (an attach) let a VM that was left paused run again."""
        assert self.rundir is not None
        agent_sock, qmp_sock = self.rundir / "agent.sock", self.rundir / "qmp.sock"
        # QEMU binds a socket before it listens on it: a connect in between is
        # refused, so retry until it is accepted (the caller's wait_for bounds this)
        while True:
            await self._wait_socket(agent_sock)
            try:
                self.agent = await AgentConnection.connect(str(agent_sock),
                                                           eof_hook=self._explain_eof)
                break
            except AgentDisconnected:
                await asyncio.sleep(0.005)
        while True:
            await self._wait_socket(qmp_sock)
            qmp = QmpClient()
            try:
                await qmp.connect(str(qmp_sock))
                self.qmp = qmp
                break
            except QmpError:
                await qmp.close()
                await asyncio.sleep(0.005)
        if self.restored_from is not None:
            await self._load_state(self.restored_from / "state")
        elif resume:
            # its last holder died in a snapshot (or paused it and detached): the agent
            # cannot answer until the vCPUs run
            st = await self._qmp("query-status")
            if isinstance(st, dict) and st.get("status") in ("paused", "postmigrate"):
                await self._qmp("cont")
                self.resumed = True
        # the agent answers once the guest has booted; the outer wait_for bounds it
        self.agent_info = await self.agent.handshake(timeout=DEFAULT_BOOT_TIMEOUT * 4)

    def _crashed(self, code: int | None) -> SandvmError:
        if self.failure is None:
            status = "" if code is None else f" with status {code}"
            self.failure = VmCrashed(f"QEMU for VM {self.vm_id} exited unexpectedly{status}."
                                     f"{self._diagnostics()}")
            if self._state in (QemuVmState.BOOTING, QemuVmState.RUNNING):
                self._move(QemuVmState.FAILED)
        return self.failure

    async def _explain_eof(self) -> SandvmError | None:
        # the agent socket closes when QEMU dies: say so rather than "disconnected"
        if self._state in _LETTING_GO:
            return None
        if self.qemu_pid is not None:
            # under a keeper (ours or adopted): QEMU's own pid says, not the keeper's
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_pid_exit(self.qemu_pid), 2.0)
            if not _pid_alive(self.qemu_pid) and self._state not in _LETTING_GO:
                return self._crashed(None)
            return None
        if self.proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), 2.0)
        if self.proc.returncode is not None and self._state not in _LETTING_GO:
            return self._crashed(self.proc.returncode)
        return None

    async def _start_keeper(self, argv: list[str], launch: _Launch) -> None:
        """Start QEMU under a keeper in its own session (it outlives this process). The
        keeper inherits QEMU's fds, the console's host end (it keeps the bounded log)
        and the uid lease (held while it lives)."""
        import sys

        assert self.rundir is not None and self.keeper_job is not None
        keeper = Path(__file__).resolve().parent.parent / "runtime" / "keeper.py"
        job = {**self.keeper_job, "argv": argv, "rundir": str(self.rundir),
               "diskdir": str(self.diskdir) if self.diskdir else None,
               "sandbox_id": self.vm_id, "confine": launch.plan,
               "pass_fds": list(launch.qemu_fds()), "console_fd": launch.console_host}
        inherit = (*launch.qemu_fds(), launch.console_host,
                   *(() if launch.lease_fd is None else (launch.lease_fd,)))
        with open(self.rundir / "keeper.log", "wb") as log:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", "-S", str(keeper), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                    pass_fds=inherit)
            except OSError as exc:
                launch.close_all()
                _log.warning("VM %s: cannot start its keeper: %s", self.vm_id, exc)
                await self._cleanup_files()
                raise VmBootError(f"cannot start the keeper of VM {self.vm_id}"
                                  f" ({type(exc).__name__})") from exc
            finally:
                launch.close_all()  # the keeper has its copies
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job).encode())
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30.0)
        except TimeoutError:
            line = b""
        if not line.startswith(b"started "):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            tail = _tail(self.rundir / "keeper.log", 8)
            _log.warning("VM %s: its keeper did not start QEMU: %s", self.vm_id, tail)
            await self._cleanup_files()
            raise VmBootError(f"the keeper of VM {self.vm_id} did not start QEMU:"
                              f" {scrub(tail[-600:], self.rundir, self.diskdir) or 'no output'}")
        await self.proc.wait()  # the keeper forked away from it: watched by pid from now
        self.proc = None
        self.qemu_pid, self.keeper_pid = (int(x) for x in line.split()[1:3])
        self._hold()  # nobody else knows of it yet: never busy

    async def detach(self) -> None:
        """Let go of a detachable VM: close our connections, leave it running under its
        keeper. Allowed once booting, running or failed; the VM is then someone else's
        (``attach``). Detached, stopping or gone: does nothing. Raises InvalidTransition
        for a VM without a keeper."""
        if self.keeper_pid is None:
            raise InvalidTransition(VmState.RUNNING, VmState.RUNNING, vm_id=self.vm_id)
        if self._state in _LETTING_GO:
            return
        self._move(QemuVmState.DETACHED)
        if self._monitor is not None:
            self._monitor.cancel()
        if self.agent is not None:
            await self.agent.close()
        if self.qmp is not None:
            await self.qmp.close()
        self._let_go_hold()
        _LIVE.discard(self)

    @classmethod
    async def attach(cls, vm_id: str, spec: VmSpec, *, assets: Assets, accel: str,
                     rundir: Path, diskdir: Path | None, keeper_pid: int, qemu_pid: int,
                     timeout: float = 10.0, wait: float = 0.0,
                     restored_from: Path | None = None, private_ram: bool = False,
                     disk_images: dict[str, Path] | None = None) -> QemuVm:
        """Take over a running detachable VM (from its runtime dir), waiting up to ``wait``
        seconds for another process that holds it to let go; a VM left paused is resumed
        (``resumed``). A VM that was restored
        from a snapshot needs ``restored_from`` and ``private_ram`` as its boot set them
        (its state is not loaded again); ``disk_images`` (serial -> the raw image under
        its layers) overrides what is found in ``diskdir``. Raises VmBootError if it is
        gone or does not answer, SandboxBusy if another process still holds it."""
        vm = cls(vm_id, spec, assets=assets, accel=accel)
        vm._move(QemuVmState.BOOTING)
        vm.rundir, vm.diskdir = rundir, diskdir
        vm.keeper_pid, vm.qemu_pid = keeper_pid, qemu_pid
        vm.private_ram = private_ram  # restored_from is set once connected: _connect
        # would load the snapshot's state into the running VM
        if diskdir is not None:
            def generation(p: Path) -> tuple[str, int]:  # root-10 comes after root-9
                serial, _, n = p.stem.rpartition("-")
                return serial, int(n) if n.isdigit() else -1

            tops = sorted(diskdir.glob("*-[0-9]*.qcow2"), key=generation)
            for top in tops:
                serial = top.stem.rsplit("-", 1)[0]
                vm.disk_tops[serial] = top
            for img in diskdir.glob("*-layer.*"):  # a raw image pinned by _pin
                if img.suffix != ".qcow2":
                    vm.disk_images[img.name.split("-layer")[0]] = img
            for img in diskdir.glob("image-*.ext4"):  # the image under a pinned layer
                vm.disk_images[img.stem.removeprefix("image-")] = img
        vm.disk_images.update(disk_images or {})
        if not _pid_alive(keeper_pid):
            raise VmBootError(f"sandbox {vm_id} is gone (its keeper, pid {keeper_pid}, exited)")
        try:
            await asyncio.to_thread(vm._hold, wait=wait)
        except FileNotFoundError:
            raise VmBootError(f"sandbox {vm_id} is gone (its runtime dir was removed)") from None
        for attempt in (1, 2):
            # a second try: if the guest did not see the last holder leave, that holder's
            # torn last frame swallows our HELLO; our hang-up makes the guest start afresh
            try:
                await asyncio.wait_for(vm._connect(resume=True), timeout / 2)
                break
            except (TimeoutError, SandvmError) as exc:
                for c in (vm.agent, vm.qmp):
                    if c is not None:
                        with contextlib.suppress(Exception):
                            await c.close()
                vm.agent = vm.qmp = None
                if attempt == 2 or not _pid_alive(keeper_pid):
                    vm._let_go_hold()
                    _log.warning("cannot reattach to sandbox %s: %s", vm_id, exc)
                    raise VmBootError(f"cannot reattach to sandbox {vm_id}:"
                                      f" {scrub(str(exc), rundir, diskdir)}") from None
                await asyncio.sleep(0.1)
        vm.restored_from = restored_from
        vm._move(QemuVmState.RUNNING)
        vm._monitor = asyncio.get_running_loop().create_task(vm._watch())
        return vm

    async def _watch(self) -> None:
        if self.proc is None:  # attached: the keeper is not our child
            assert self.keeper_pid is not None
            await _pid_exit(self.keeper_pid)
            if self._state not in _LETTING_GO:
                failure = self._crashed(None)
                if self.agent is not None:
                    self.agent.fail(failure)
                await self._release()
            return
        code = await self.proc.wait()
        if self._state not in _LETTING_GO:
            failure = self._crashed(code)
            if self.agent is not None:
                self.agent.fail(failure)
            await self._release()

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``). Raises QmpError, VmCrashed."""
        await self._qmp("stop")

    async def resume(self) -> None:
        """Resume the vCPUs (QMP ``cont``). Raises QmpError, VmCrashed."""
        await self._qmp("cont")

    async def _qmp(self, cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        if self.failure is not None:
            raise self.failure
        if self.qmp is None:
            raise QmpError(f"VM {self.vm_id} has no QMP connection")
        return await self.qmp.execute(cmd, args, **kw)

    async def _load_state(self, state: Path) -> None:
        """Feed a saved device state to a QEMU started with ``-incoming defer``."""
        ram_in_file = (state.parent / "mem").exists()
        await self._qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": ram_in_file}]})
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._qmp("getfd", {"fdname": "snap"}, fds=[fd])
        finally:
            os.close(fd)
        await self._qmp("migrate-incoming", {"uri": "fd:snap"})
        while True:
            mig = await self._qmp("query-migrate")
            status = mig.get("status") if isinstance(mig, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise VmBootError("restoring the VM state failed:"
                                  f" {mig.get('error-desc', status)}")
            await asyncio.sleep(0.002)
        # the snapshot was taken with the vCPUs stopped, so QEMU stays paused
        run = await self._qmp("query-status")
        if isinstance(run, dict) and run.get("status") != "running":
            await self._qmp("cont")

    async def save_state(self, dest: Path, *, take_memory: bool = False) -> None:
        """Write device state + guest RAM into ``dest`` (a directory, best on tmpfs).

        The VM is paused for the duration and left paused (``stopped_at`` is the
        monotonic time its vCPUs stopped). The RAM file is copied,
        or with ``take_memory`` moved (instant; only for a VM about to be
        destroyed, whose RAM then no longer has a name). A VM restored from a
        file snapshot maps its RAM privately, which x-ignore-shared does not skip:
        its RAM then goes into the state stream and no ``mem`` file is written.
        Raises QmpError.
        """
        assert self.rundir is not None
        self.stopped_at = 0.0
        copy_ram = not take_memory and not self.private_ram
        if copy_ram:  # allocate the copy's pages before pausing, not during the pause
            await asyncio.to_thread(preallocate_like, self.rundir / "mem", dest / "mem")
        await self._prepare_tops()
        self.stopped_at = time.monotonic()
        await self._qmp("stop")
        await self._freeze_disks()
        # both ends must agree on x-ignore-shared: on for "file" snapshots, off when
        # the RAM travels in the stream
        await self._qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": not self.private_ram}]})
        fd = os.open(dest / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await self._qmp("getfd", {"fdname": "snap"}, fds=[fd])
        finally:
            os.close(fd)
        await self._qmp("migrate", {"uri": "fd:snap"})
        for i in range(6000):
            st = await self._qmp("query-migrate")
            status = st.get("status") if isinstance(st, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QmpError(f"saving VM state failed: {st.get('error-desc', status)}")
            await asyncio.sleep(0.001 if i < 20 else 0.005)
        else:
            raise QmpError("saving VM state did not complete in time")
        if self.private_ram:
            return  # the RAM is in the stream
        if take_memory:
            await asyncio.to_thread(move_file, self.rundir / "mem", dest / "mem")
            if os.stat(dest / "mem").st_uid != os.getuid():  # the snapshot's, not QEMU's
                os.chown(dest / "mem", os.getuid(), os.getgid())
        else:
            await asyncio.to_thread(sparse_copy, self.rundir / "mem", dest / "mem",
                                    into_existing=copy_ram)

    def _pin(self, d: DiskSpec) -> Path:
        """Hard-link a disk's read-only layers into this VM's disk dir, so the VM keeps
        working (and can be snapshotted) when the image or snapshot they came from is
        removed. Returns the path to put the overlay on; records the bottom raw image
        in ``disk_images``. Falls back to the files in place across file systems."""
        assert self.diskdir is not None
        src = Path(d.path)
        names = [(src, f"{d.serial}-layer{src.suffix}")]
        if d.format == "qcow2":
            rel = qcow2_backing(src)
            if rel and not rel.startswith("/"):
                names.append((src.parent / rel, rel))  # keeps the relative name valid
        pinned = []
        for path, name in names:
            try:
                os.link(path, self.diskdir / name)
                pinned.append(self.diskdir / name)
            except OSError:
                pinned.append(path)
        self.disk_images[d.serial] = pinned[-1] if d.format == "qcow2" else pinned[0]
        return pinned[0]

    async def _freeze_disks(self) -> None:
        """While stopped: make each overlay read-only and let QEMU write a new one on top.

        The frozen layer (in ``frozen_disks``) never changes again; the caller
        copies or moves it while the VM runs on. Its qcow2 header names its
        backing file, which may itself be an earlier frozen layer.
        """
        self.frozen_disks = {}
        assert self.diskdir is not None or not self.disk_tops
        for serial, top in list(self.disk_tops.items()):
            new = self._next_top(serial, top)
            # made by the host beforehand (``_prepare_tops``): QEMU, confined, cannot
            # create files in the disk dir
            await self._qmp("blockdev-snapshot-sync", {
                "device": f"disk-{serial}", "snapshot-file": str(new), "format": "qcow2",
                "mode": "existing"})
            self.frozen_disks[serial] = top
            self.disk_tops[serial] = new

    def _next_top(self, serial: str, top: Path) -> Path:
        assert self.diskdir is not None
        n = int(top.stem.rsplit("-", 1)[1]) + 1
        return self.diskdir / f"{serial}-{n}.qcow2"

    async def _prepare_tops(self) -> None:
        """Create the overlays ``_freeze_disks`` puts on top of each disk (before the
        pause: it costs no paused time), owned by QEMU's uid. Raises VmError."""
        import struct

        for serial, top in list(self.disk_tops.items()):
            new = self._next_top(serial, top)
            fd = os.open(top, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                head = os.pread(fd, 32, 0)
            finally:
                os.close(fd)
            if len(head) < 32 or head[:4] != b"QFI\xfb":
                raise VmError(f"disk {serial}'s top layer is not a qcow2 image")
            size = struct.unpack(">Q", head[24:32])[0]
            new.unlink(missing_ok=True)
            await qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-u",
                           "-F", "qcow2", "-b", str(top), str(new), str(size))
            if st.st_uid != os.getuid():
                os.chown(new, st.st_uid, st.st_gid)

    async def merge_disks(self, *, timeout: float = 300.0) -> None:
        """After the frozen layers were exported: fold each disk's new top back into its
        frozen layer (an active ``block-commit``, the VM running on), so every snapshot
        does not leave one more layer under the VM. Raises QmpError."""
        for serial, frozen in list(self.frozen_disks.items()):
            top, job = self.disk_tops[serial], f"merge-{serial}"
            await self._qmp("block-commit", {"job-id": job, "device": f"disk-{serial}",
                                             "base": str(frozen), "auto-dismiss": True})
            deadline = time.monotonic() + timeout
            completing = False
            while True:
                jobs = await self._qmp("query-block-jobs")
                mine = [j for j in jobs if j.get("device") == job] if isinstance(
                    jobs, list) else []
                if not mine:
                    break  # finished (and dismissed)
                if mine[0].get("ready") and not completing:
                    await self._qmp("block-job-complete", {"device": job})
                    completing = True
                if time.monotonic() > deadline:
                    await self._qmp("block-job-cancel", {"device": job, "force": True})
                    raise QmpError(f"merging disk {serial}'s layers did not finish in"
                                   f" {timeout:.0f} s")
                await asyncio.sleep(0.005)
            self.disk_tops[serial] = frozen
            del self.frozen_disks[serial]
            top.unlink(missing_ok=True)

    async def shutdown(self) -> None:
        """Kill QEMU (if running) and remove everything it had. Any state; idempotent."""
        if self._state is not QemuVmState.STOPPING:  # not already under way
            self._move(QemuVmState.STOPPING)
        if self.agent is not None:
            await self.agent.close()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit", timeout=1.0), 1.5)
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 2.0)
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                if self.qemu_pid is not None:  # its keeper is gone: QEMU follows (PDEATHSIG)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.qemu_pid, signal.SIGKILL)
                await self.proc.wait()
        elif self.proc is None and self.keeper_pid is not None:
            for _ in range(40):
                if not _pid_alive(self.keeper_pid):
                    break
                await asyncio.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.keeper_pid, signal.SIGTERM)
        if self._monitor is not None and self._monitor is not asyncio.current_task():
            with contextlib.suppress(BaseException):
                await self._monitor
        await self._release()
        if self._state is QemuVmState.STOPPING:  # a concurrent shutdown may have finished
            self._move(QemuVmState.GONE)

    def _let_go_uid(self) -> None:
        if self._lease_fd is not None:  # only once our QEMU child is gone
            os.close(self._lease_fd)
            self._lease_fd = None

    async def _release(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
        self._let_go_hold()
        if self.proc is None or self.proc.returncode is not None:
            self._let_go_uid()
        await self._cleanup_files()
        _LIVE.discard(self)

    def kill_now(self) -> None:
        """Synchronous last resort (interpreter exit): SIGKILL QEMU, remove its files."""
        for pid in (self.qemu_pid, self.proc.pid if self.proc is not None
                    and self.proc.returncode is None else None):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._let_go_hold()
        self._let_go_uid()  # SIGKILLed: it runs no more code as that uid
        for d in (self.rundir, self.diskdir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        _LIVE.discard(self)

    async def _cleanup_files(self) -> None:
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
        if self.diskdir is not None:
            shutil.rmtree(self.diskdir, ignore_errors=True)

    async def qmp_execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on this VM's QEMU and return its result (for sandvm's
        runtime manager, which ends a save a dead holder left running). Allowed while
        QEMU runs with its QMP connection. Raises the VM's failure (VmCrashed),
        QmpError."""
        return await self._qmp(cmd, args)


# --------------------------------------------------------------------------- provider


@dataclass
class _Entry:
    spec: VmSpec
    state: VmState = VmState.CREATED
    vm: QemuVm | None = None
    snapshots: list[str] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keeper_job: dict[str, Any] | None = None


class QemuVmProvider:
    """Seed 000's provider over real QEMU processes.

    Stop pauses the vCPUs (the VM keeps its memory); start from Stopped resumes.
    A VM whose QEMU died is reported with ``failure`` set and can only be destroyed.
    Each VM has its own lock: a slow boot of one never blocks calls on another.
    """

    def __init__(self, *, assets: Assets | None = None, accel: str | None = None,
                 snapshot_dir: Path | None = None,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        self._assets = assets
        self._accel = accel
        self._entries: dict[str, _Entry] = {}
        self._resolve_lock = asyncio.Lock()
        self._snapshot_dir = snapshot_dir
        self.boot_timeout = boot_timeout

    async def _resolve(self) -> tuple[Assets, str]:
        async with self._resolve_lock:
            if self._assets is None:
                self._assets = find_assets()
            if self._accel is None:
                self._accel = (await choose_accel(self._assets)).accel
            return self._assets, self._accel

    def _get(self, vm_id: str) -> _Entry:
        e = self._entries.get(vm_id)
        if e is None:
            raise VmNotFound(vm_id)
        return e

    def vm(self, vm_id: str) -> QemuVm:
        """The running QemuVm behind ``vm_id``. Raises VmNotFound, InvalidTransition."""
        e = self._get(vm_id)
        if e.vm is None:
            raise InvalidTransition(e.state, VmState.RUNNING, vm_id=vm_id)
        return e.vm

    async def create_vm(self, vm_id: str) -> None:
        await self.create_vm_with_spec(vm_id, VmSpec())

    async def create_vm_with_spec(self, vm_id: str, spec: VmSpec) -> None:
        validate_vm_id(vm_id)
        if vm_id in self._entries:
            raise VmAlreadyExists(vm_id)
        self._entries[vm_id] = _Entry(spec=spec)  # no await in between: atomic

    def make_detachable(self, vm_id: str, keeper_job: dict[str, Any]) -> None:
        """Start the Created VM ``vm_id`` under a keeper (``keeper_job`` names the
        journal), so it can outlive this process. Raises VmNotFound."""
        self._get(vm_id).keeper_job = dict(keeper_job)

    async def adopt_vm(self, vm_id: str, vm: QemuVm) -> None:
        """Register a VM attached from elsewhere (``QemuVm.attach``) as Running."""
        validate_vm_id(vm_id)
        if vm_id in self._entries and self._entries[vm_id].state is not VmState.DESTROYED:
            raise VmAlreadyExists(vm_id)
        self._entries[vm_id] = _Entry(spec=vm.spec, state=VmState.RUNNING, vm=vm)

    async def restore_vm(self, vm_id: str, snapshot_dir: Path) -> None:
        """Start a Created VM from a snapshot directory instead of booting it (its spec
        must be the snapshot's). Raises InvalidTransition, VmBootError."""
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.RUNNING)
            if e.state is not VmState.CREATED:
                raise InvalidTransition(e.state, VmState.RUNNING, vm_id=vm_id)
            assets, accel = await self._resolve()
            vm = QemuVm(vm_id, e.spec, assets=assets, accel=accel)
            vm.keeper_job = e.keeper_job
            await vm.boot(timeout=self.boot_timeout, restore_from=snapshot_dir)
            e.vm = vm
            e.state = VmState.RUNNING

    async def start_vm(self, vm_id: str) -> None:
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.RUNNING)
            if e.vm is not None and e.vm.failure is not None:
                raise e.vm.failure
            if e.state is VmState.STOPPED:
                assert e.vm is not None
                await e.vm.resume()
                e.state = VmState.RUNNING
                return
            assets, accel = await self._resolve()
            vm = QemuVm(vm_id, e.spec, assets=assets, accel=accel)
            vm.keeper_job = e.keeper_job
            await vm.boot(timeout=self.boot_timeout)
            e.vm = vm
            e.state = VmState.RUNNING

    async def stop_vm(self, vm_id: str) -> None:
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.STOPPED)
            assert e.vm is not None
            await e.vm.pause()
            e.state = VmState.STOPPED

    async def destroy_vm(self, vm_id: str) -> None:
        e = self._get(vm_id)
        async with e.lock:
            check_transition(vm_id, e.state, VmState.DESTROYED)
            if e.vm is not None:
                await e.vm.shutdown()
            e.vm = None
            e.state = VmState.DESTROYED

    async def snapshot_vm(self, vm_id: str, snapshot_id: str) -> None:
        """Save the spec, and for a booted VM its device state and RAM, under the snapshot dir.

        A running VM is paused while it is saved and resumed afterwards, also
        when saving fails.
        """
        validate_vm_id(snapshot_id)
        e = self._get(vm_id)
        async with e.lock:
            if e.state is VmState.DESTROYED:
                raise InvalidTransition(VmState.DESTROYED, VmState.DESTROYED, vm_id=vm_id)
            if snapshot_id in e.snapshots:
                raise SnapshotAlreadyExists(vm_id, snapshot_id)
            base = self._snapshot_dir or (sandvm_home() / "vm-snapshots")
            dest = base / vm_id / snapshot_id
            if dest.exists():
                shutil.rmtree(dest)
            tmp = Path(tempfile.mkdtemp(prefix=f".{snapshot_id}-", dir=_mkdirs(base / vm_id)))
            try:
                manifest: dict[str, Any] = {"format": 1, "vm_id": vm_id, "name": snapshot_id,
                                            "state": e.state.value,
                                            "spec": e.spec.to_dict()}
                if e.vm is not None:
                    try:
                        await e.vm.save_state(tmp)
                    finally:
                        if e.state is VmState.RUNNING and e.vm.failure is None:
                            await e.vm.resume()
                    manifest["memory"] = True
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            e.snapshots.append(snapshot_id)

    async def rename_vm(self, old_vm_id: str, new_vm_id: str) -> None:
        raise Unsupported("QemuVmProvider does not support rename_vm yet")

    async def list_vms(self) -> list[VmView]:
        return [self._view(k, v) for k, v in sorted(self._entries.items())]

    async def get_vm(self, vm_id: str) -> VmView | None:
        e = self._entries.get(vm_id)
        return None if e is None else self._view(vm_id, e)

    async def list_snapshots(self, vm_id: str) -> list[str] | None:
        e = self._entries.get(vm_id)
        return None if e is None else list(e.snapshots)

    @staticmethod
    def _view(vm_id: str, e: _Entry) -> VmView:
        failure = e.vm.failure.message if e.vm is not None and e.vm.failure else None
        return VmView(vm_id=vm_id, state=e.state, spec=e.spec, snapshots=tuple(e.snapshots),
                      failure=failure)

    async def close(self) -> None:
        """Destroy every VM still alive (records are kept)."""
        for vm_id, e in list(self._entries.items()):
            if e.state is not VmState.DESTROYED:
                with contextlib.suppress(SandvmError, AgentError):
                    await self.destroy_vm(vm_id)

    async def resolve(self) -> tuple[Assets, str]:
        """The guest assets and the accelerator this provider boots VMs with (found, and
        the accelerator probed, on first use; then kept). Raises AssetMissing,
        VmBootError (the probe)."""
        return await self._resolve()


def _mkdirs(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
