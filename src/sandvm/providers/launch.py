"""Starting one QEMU process: its command line, its confinement and what it inherits.

Everything the host prepares before and around a ``qemu-system-x86_64 -M microvm``
process: the argv (``build_argv``), the sockets and console pair it inherits and the
plan of its confined namespace (``prepare_launch``, see ``jail``), the ``preexec_fn``
that confines it and ties it to its parent (``child_setup``), its disks' overlays and
``qemu-img``, and finding QEMUs and runtime dirs left behind by dead processes.
``QemuVm`` (providers/qemu_vm.py) drives the process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import re
import shutil
import signal
import socket
import stat as stat_mod
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm._files import (
    LIBC,
    OWNER_FILE,
    owner_alive,
    proc_start_time,
    runtime_root,
)
from sandvm.assets import Assets, sandvm_home
from sandvm.core import VmSpec, escape_text
from sandvm.errors import (
    SandvmError,
    VmBootError,
    VmError,
)
from sandvm.providers import jail

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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not; one we may not signal does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours is gone for our purposes
    return (_proc_state(pid) or "Z") != "Z"


async def pid_exit(pid: int) -> None:
    """Return once ``pid`` (any process, not only a child) has exited: a pidfd read by
    the event loop, no polling; polled every 0.2 s where pidfds are missing."""
    fd = None
    with contextlib.suppress(OSError, AttributeError):
        fd = os.pidfd_open(pid)
    if fd is None:
        while pid_alive(pid):
            await asyncio.sleep(0.2)
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        if pid_alive(pid):  # a pid reused before the pidfd was opened: never waited on
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


def child_setup(plan: dict[str, Any], parent: int) -> None:
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


def log_tail_lines(path: Path, n: int = 15) -> str:
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


def backing_chain(top: Path, trusted: list[Path]) -> list[Path]:
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
class Launch:
    """What one QEMU start needs besides its argv: the fds it inherits (``fds``), the
    host's end of its console, its confinement plan and uid lease."""

    fds: dict[str, int]
    console_host: int
    plan: dict[str, Any]
    lease_fd: int | None = None
    uid: int | None = None

    def qemu_fds(self) -> tuple[int, ...]:
        """The fds QEMU inherits."""
        return tuple(self.fds.values())

    def close_qemu_side(self) -> None:
        """Close our copies of QEMU's fds (once it has them)."""
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}

    def close_all(self) -> None:
        """Close every fd this launch holds (QEMU's side, the console's host end, the
        uid lease). Idempotent."""
        self.close_qemu_side()
        for fd in (self.console_host, self.lease_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.console_host, self.lease_fd = -1, None


def prepare_launch(rundir: Path, *, assets: Assets, spec: VmSpec, accel: str,
                    restore_from: Path | None = None, disk_paths: dict[str, Path] | None = None,
                    diskdir: Path | None = None) -> Launch:
    """Bind the VM's sockets, make its console pair, lease its uid and describe what its
    namespace holds (see ``jail``), giving it the files it must open. Raises OSError."""
    fds: dict[str, int] = {}
    launch = Launch(fds=fds, console_host=-1, plan={"mode": "none"})
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
            chain = backing_chain(top, [*trusted, Path(os.path.realpath(Path(d.path).parent))])
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
