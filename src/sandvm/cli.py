"""The `sandvm` command line: setup, doctor, run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sandvm.egress import NetworkPolicy
    from sandvm.ports import PortMapping
    from sandvm.sandbox import AsyncSandbox

from sandvm.core import check_guest_path, escape_text, parse_memory, parse_size
from sandvm.errors import (
    CommandNotFound,
    CommandTimeout,
    InvalidSpec,
    SandvmError,
    SnapshotAlreadyExists,
    VmNotFound,
)


def _fail(exc: SandvmError) -> None:
    click.echo(f"sandvm: error [{exc.code}]: {exc.message}", err=True)
    sys.exit(2 if exc.code in ("invalid_config", "invalid_spec", "invalid_path",
                               "unknown_image", "image_not_found", "volume_not_found") else 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sandvm")
def main() -> None:
    """sandvm: run untrusted code in real microVMs."""
    from sandvm.fds import raise_nofile_limit

    raise_nofile_limit()  # guests drive host connections: the full descriptor limit


@main.command()
def setup() -> None:
    """Install QEMU, fetch the guest kernel and build the guest initramfs (idempotent)."""
    from rich.console import Console

    from sandvm.assets import run_setup

    console = Console(stderr=True)
    tty = console.is_terminal
    try:
        if tty:
            with console.status("setting up") as status:
                def progress(step: str, msg: str) -> None:
                    status.update(f"[bold]{step}[/bold]: {msg}")
                results = run_setup(progress)
        else:
            results = run_setup()
    except SandvmError as exc:
        _fail(exc)
        return
    for step, outcome in results:
        click.echo(f"{step}: {outcome}")
    click.echo("setup complete")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--refresh", is_flag=True, help="Re-run the KVM probe instead of using its cache.")
def doctor(as_json: bool, refresh: bool) -> None:
    """Report what this host can do: QEMU, guest assets, KVM usability, accelerator."""
    from sandvm.doctor import UNSUPPORTED, build_report
    from sandvm.providers.qemu import confinement

    report = asyncio.run(build_report(refresh=refresh))
    conf = confinement()  # how each QEMU is confined (README "Confinement")
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "confinement": {
            "mode": conf.mode, "detail": conf.detail}}, indent=2))
    else:
        click.echo(f"health:       {report.health}")
        q = report.qemu
        click.echo(f"qemu:         {q['version'] or 'missing'} ({q['path'] or '-'})")
        click.echo(f"kernel:       {'present' if report.kernel['present'] else 'missing'}"
                   f" {report.kernel['release'] or ''}")
        click.echo(f"initramfs:    {'present' if report.initramfs['present'] else 'missing'}")
        k = report.kvm
        click.echo(f"/dev/kvm:     {'present' if k['present'] else 'absent'},"
                   f" {'usable' if k['usable'] else 'not usable'}"
                   + (f" ({k['reason']})" if k["reason"] else ""))
        click.echo(f"accelerator:  {report.accelerator or '-'}")
        click.echo(f"confinement:  {conf.mode}: {conf.detail}")
        for m in report.missing:
            click.echo(f"missing:      {m['what']}: {m['fix']}")
        for n in report.notes:
            click.echo(f"note:         {n}")
    sys.exit(1 if report.health == UNSUPPORTED else 0)


def _remove_each(names: tuple[str, ...], remove: Callable[[str], None], *,
                 done: str = "removed") -> None:
    """``remove`` every name, reporting each; exit 1 if any failed."""
    code = 0
    for n in names:
        try:
            remove(n)
            click.echo(f"{done} {n}")
        except SandvmError as exc:
            click.echo(f"sandvm: error [{exc.code}]: {exc.message}", err=True)
            code = 1
    sys.exit(code)


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for v in values:
        if "=" not in v or v.startswith("="):
            raise click.BadParameter(f"{v!r}: use KEY=VALUE", param_hint="-e/--env")
        k, _, val = v.partition("=")
        env[k] = val
    return env


def _parse_volumes(specs: tuple[str, ...], *, image: str) -> dict[str, tuple[str, str]]:
    """``--volume NAME:PATH[:ro|rw]`` values as Sandbox.create's ``volumes``."""
    from sandvm.core import BUILTIN_IMAGES
    from sandvm.volumes import VolumeStore, parse_mounts

    out: dict[str, tuple[str, str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        path, mode = rest, "rw"
        head, _, tail = rest.rpartition(":")
        if tail in ("ro", "rw") and head:
            path, mode = head, tail
        if not sep or not name or not path:
            raise click.BadParameter(f"{spec!r}: use NAME:PATH or NAME:PATH:ro, e.g."
                                     " data:/data", param_hint="--volume")
        if name in out:
            raise click.BadParameter(f"volume {name!r} is given twice", param_hint="--volume")
        out[name] = (path, mode)
    parse_mounts(out, builtin_image=image in BUILTIN_IMAGES)  # before booting anything
    store = VolumeStore()
    for name in out:
        store.get(name)
    return out


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """Our stdin, read by a daemon thread (an executor thread would block exit)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
    fd = sys.stdin.fileno()

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):
                return  # the loop is gone
            if not data:
                return

    threading.Thread(target=reader, name="sandvm-stdin", daemon=True).start()
    while True:
        data = await queue.get()
        if not data:
            return
        yield data


async def _start(*, image: str, memory: int, cpus: int, source: str | None,
                 disk_size: str | None = None,
                 volumes: dict[str, tuple[str, str]] | None = None,
                 network: NetworkPolicy | None = None) -> AsyncSandbox:
    """A new sandbox: booted, or restored from snapshot ``source``."""
    from sandvm.sandbox import AsyncSandbox

    if source is not None and volumes:
        raise InvalidSpec("--volume cannot be used with --from: volumes are not part of"
                          " snapshots (boot a new sandbox to mount them)")
    if source is not None:
        if sys.stderr.isatty():
            click.echo(f"sandvm: restoring microVM from {source}…", err=True)
        return await AsyncSandbox.from_snapshot(source, network=network)
    if sys.stderr.isatty():
        click.echo("sandvm: booting microVM…", err=True)
    return await AsyncSandbox.create(image=image, memory_mib=memory, vcpus=cpus,
                                     disk_size=disk_size, volumes=volumes or None,
                                     network=network)


async def _run(cmd: list[str], *, image: str, memory: int, cpus: int, timeout: float | None,
               env: dict[str, str], workdir: str | None, interactive: bool,
               source: str | None = None, snapshot_to: str | None = None,
               disk_size: str | None = None, user: str | None = None,
               volumes: dict[str, tuple[str, str]] | None = None,
               attach_id: str | None = None, busy_wait: float = 0.0,
               publish: list[PortMapping] | None = None,
               network: NetworkPolicy | None = None) -> int:
    manager = None
    if attach_id is not None:  # `sandvm exec`: a managed sandbox, left running after
        from sandvm.runtime.manager import SandboxManager

        manager = SandboxManager()
        sb = await manager.attach(attach_id, wait=busy_wait)
    else:
        sb = await _start(image=image, memory=memory, cpus=cpus, source=source,
                          disk_size=disk_size, volumes=volumes, network=network)
    loop = asyncio.get_running_loop()
    if not cmd:  # the image's Entrypoint + Cmd
        rec = sb.image_record
        cmd = [*rec.entrypoint, *rec.cmd] if rec is not None else []
        if not cmd:
            await sb.kill()
            raise InvalidSpec(f"image {image!r} has no Entrypoint or Cmd: give a command"
                              " after --, e.g. sandvm run -- uname -a")
    interrupted = 0
    try:
        def out(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        def err(text: str) -> None:
            sys.stderr.write(text)
            sys.stderr.flush()

        if sb.network.audit_path is not None and sys.stderr.isatty():
            click.echo(f"sandvm: egress decisions are logged to {sb.network.audit_path}",
                       err=True)
        for m in publish or ():  # listening before the command starts
            url = await sb.ports.expose(m.guest_port, host=m.host, host_port=m.host_port)
            click.echo(f"sandvm: guest port {m.guest_port} is at {url}", err=True)
        stdin: Any = _stdin_chunks() if interactive else None
        handle = await sb.commands.run(cmd, env=env or None, cwd=workdir, timeout=timeout,
                                       on_stdout=out, on_stderr=err, stdin=stdin,
                                       background=True, check=False, user=user)
        if not interactive:
            await handle.close_stdin()
        done = asyncio.Event()
        pending: set[asyncio.Future[None]] = set()

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted += 1
            if interrupted == 1:
                fut = asyncio.ensure_future(handle.send_signal(signal.SIGINT, grace=2.0))
                pending.add(fut)
                fut.add_done_callback(pending.discard)
                loop.call_later(3.0, done.set)
            else:
                done.set()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigint)
        waiter = asyncio.ensure_future(handle.wait())
        stopper = asyncio.ensure_future(done.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            stopper.cancel()
            try:
                res = waiter.result()
            except CommandTimeout as exc:
                click.echo(f"sandvm: {exc.message}", err=True)
                return 124
            if interrupted:
                return 130
            if snapshot_to is not None:
                if res.exit_code != 0:
                    click.echo(f"sandvm: the command exited {res.exit_code}: no snapshot taken",
                               err=True)
                    return res.exit_code
                snap = await sb.snapshot(snapshot_to, stop=True)
                t = sb.last_snapshot_times
                click.echo(f"snapshot {snap.name}: {snap.size_bytes / 2**20:.1f} MiB on disk"
                           f" in {snap.path} (VM paused {t['pause_s'] * 1000:.0f} ms,"
                           f" saved in {t['total_s'] * 1000:.0f} ms)", err=True)
            return res.exit_code
        waiter.cancel()
        return 130
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
        if manager is not None:
            with contextlib.suppress(SandvmError):
                await manager.detach(sb)
        else:
            await sb.kill()


def _network_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The --allow-* egress options of `run` and `create`."""
    for opt in reversed([
        click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
                     help="Let the workload reach NAME (or *.DOMAIN) through the host's"
                          " egress proxy, HTTPS on port 443 unless --allow-port says"
                          " otherwise. Repeatable; without any --allow-* the sandbox has"
                          " no network at all."),
        click.option("--allow-port", "allow_ports", multiple=True, type=int, metavar="PORT",
                     help="Destination ports the allowed hosts may be reached on (443)."),
        click.option("--allow-http", is_flag=True,
                     help="Also allow plain HTTP (list its port)."),
        click.option("--allow-ip", "allow_ips", multiple=True, metavar="CIDR",
                     help="Allow these non-public addresses (private, loopback...)."),
        click.option("--add-host", "add_hosts", multiple=True, metavar="NAME=IP",
                     help="Resolve NAME to IP in the egress proxy, like /etc/hosts."),
    ]):
        f = opt(f)
    return f


@main.command(context_settings={"ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@click.option("--image", default=None,
              help="Guest image: base, a name from `sandvm image ls`, or oci:DIR[:TAG]"
                   " (default: debian once built by `sandvm image build-default`, else base).")
@click.option("--memory", default="256M", show_default=True, help="Guest memory, e.g. 512M, 1G.")
@click.option("--cpus", default=1, show_default=True, type=int, help="vCPUs.")
@click.option("--timeout", type=float, default=None, help="Kill the command after N seconds.")
@click.option("-e", "--env", "envs", multiple=True, metavar="KEY=VAL", help="Set a variable.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("--from", "source", default=None, metavar="SNAPSHOT",
              help="Restore from this snapshot instead of booting.")
@click.option("--disk-size", default=None, metavar="SIZE",
              help="Root disk size for an image, e.g. 2G (default 4G, sparse).")
@click.option("-u", "--user", default=None, metavar="USER[:GROUP]",
              help="Run as this user of the image (default: the image's User).")
@click.option("-v", "--volume", "volume_specs", multiple=True, metavar="NAME:PATH[:ro]",
              help="Mount volume NAME at PATH (read-write, or read-only with :ro). Repeatable.")
@click.option("-p", "--publish", "publish_specs", multiple=True,
              metavar="[HOST:][HOST_PORT:]GUEST_PORT",
              help="Expose a guest TCP port on the host (127.0.0.1 unless HOST is given;"
                   " no HOST_PORT: a free one), e.g. -p 8080:8000. Repeatable.")
@_network_options
@click.argument("cmd", nargs=-1, required=False, type=click.UNPROCESSED)
def run(image: str | None, memory: str, cpus: int, timeout: float | None,
        envs: tuple[str, ...],
        workdir: str | None, interactive: bool, source: str | None, disk_size: str | None,
        user: str | None, volume_specs: tuple[str, ...], publish_specs: tuple[str, ...],
        allow_hosts: tuple[str, ...], allow_ports: tuple[int, ...], allow_http: bool,
        allow_ips: tuple[str, ...], add_hosts: tuple[str, ...],
        cmd: tuple[str, ...]) -> None:
    """Boot a microVM (or restore one --from a snapshot), run CMD in it, stream its
    output, exit with its exit code. Without CMD, an image's Entrypoint and Cmd run.

    Examples: sandvm run -- python3 -c "print(1)";
    sandvm run --image oci:./layout:latest -- env;
    sandvm run --volume data:/data -- sh -c 'echo x > /data/f';
    sandvm run -p 8080:8000 -- python3 -m http.server 8000;
    sandvm run --allow-host pypi.org --allow-host '*.pythonhosted.org' -- pip download x
    """
    from sandvm.images.store import default_image
    from sandvm.ports import parse_publish

    image = image or default_image()
    argv = list(cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv and image == "base" and source is None:
        raise click.UsageError("give a command after --, e.g. sandvm run -- uname -a")
    try:
        mem = parse_memory(memory)
        if workdir is not None:
            check_guest_path(workdir)  # before booting anything
        if disk_size is not None:
            parse_size(disk_size, what="--disk-size")
        volumes = _parse_volumes(volume_specs, image=image)
        publish = [parse_publish(spec) for spec in publish_specs]
        network = _network_policy(allow_hosts, allow_ports, allow_http, allow_ips, add_hosts)
    except SandvmError as exc:
        _fail(exc)
        return
    env = _parse_env(envs)
    _run_and_exit(lambda: _run(argv, image=image, memory=mem, cpus=cpus, timeout=timeout,
                               env=env, workdir=workdir,
                               interactive=interactive, source=source,
                               disk_size=disk_size, user=user, volumes=volumes,
                               publish=publish, network=network))


def _network_policy(hosts: tuple[str, ...], ports: tuple[int, ...], http: bool,
                    ips: tuple[str, ...], add_hosts: tuple[str, ...]) -> NetworkPolicy | None:
    """The policy the --allow-* flags describe (None: no flags, no network)."""
    from sandvm.egress import NetworkPolicy

    if not (hosts or ports or http or ips or add_hosts):
        return None
    if not hosts:
        raise InvalidSpec("the --allow-port/--allow-http/--allow-ip/--add-host flags need"
                          " --allow-host NAME: nothing is reachable without one")
    pins = []
    for item in add_hosts:
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise InvalidSpec(f"--add-host takes NAME=IP, got {item!r}")
        pins.append((name, (addr,)))
    return NetworkPolicy(allow=hosts, ports=ports or (443,), allow_http=http, allow_ips=ips,
                         hosts=tuple(pins))


def _run_and_exit(make: Callable[[], Any]) -> None:
    """Run the command coroutine ``make()`` and exit with its code (127: no such
    command, 130: interrupted, 141: our reader went away, 1/2: sandvm errors)."""
    try:
        code = asyncio.run(make())
    except CommandNotFound as exc:
        click.echo(f"sandvm: error [{exc.code}]: {exc.message}", err=True)
        code = 127
    except SandvmError as exc:
        _fail(exc)
        return
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # our reader went away (e.g. `sandvm run -- yes | head`): the VM is gone, be quiet
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)



# --------------------------------------------------------------------------- snapshots


@main.group()
def snapshot() -> None:
    """Create, list, remove and verify snapshots ($SANDVM_HOME/snapshots)."""


@snapshot.command("create", context_settings={"ignore_unknown_options": True,
                                              "allow_interspersed_args": False})
@click.argument("name")
@click.option("--memory", default="256M", show_default=True, help="Guest memory.")
@click.option("--cpus", default=1, show_default=True, type=int, help="vCPUs.")
@click.option("--timeout", type=float, default=None, help="Kill the command after N seconds.")
@click.option("-e", "--env", "envs", multiple=True, metavar="KEY=VAL", help="Set a variable.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def snapshot_create(name: str, memory: str, cpus: int, timeout: float | None,
                    envs: tuple[str, ...], workdir: str | None, cmd: tuple[str, ...]) -> None:
    """Boot a microVM, run CMD in it (if given), and save it as snapshot NAME.

    Example: sandvm snapshot create with-numpy -- pip install numpy
    Nothing is saved if CMD fails.
    """
    from sandvm.core import validate_vm_id
    from sandvm.snapshots import SnapshotStore

    argv = list(cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        validate_vm_id(name)
        if SnapshotStore().exists(name):
            raise SnapshotAlreadyExists("", name)
        mem = parse_memory(memory)
        if workdir is not None:
            check_guest_path(workdir)
        code = asyncio.run(_run(argv or ["true"], image="base", memory=mem, cpus=cpus,
                                timeout=timeout, env=_parse_env(envs), workdir=workdir,
                                interactive=False, snapshot_to=name))
    except SandvmError as exc:
        _fail(exc)
        return
    if code == 0:
        click.echo(name)
    sys.exit(code)


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def snapshot_ls(as_json: bool) -> None:
    """List snapshots with their size on disk."""
    import datetime

    from sandvm.snapshots import SnapshotStore

    snaps = SnapshotStore().list()
    if as_json:
        click.echo(json.dumps([{
            "name": s.name, "path": str(s.path), "created": s.created,
            "memory_mib": s.spec.memory_mib, "vcpus": s.spec.vcpus,
            "size_bytes": s.size_bytes, "accelerator": s.accelerator,
            "source_id": s.source_id} for s in snaps], indent=2))
        return
    if not snaps:
        click.echo("no snapshots (create one with `sandvm snapshot create NAME -- CMD`)")
        return
    click.echo(f"{'NAME':<28} {'CREATED':<20} {'MEMORY':>8} {'ON DISK':>10}")
    for s in snaps:
        created = datetime.datetime.fromtimestamp(s.created).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{s.name:<28} {created:<20} {s.spec.memory_mib:>5} MiB"
                   f" {s.size_bytes / 2**20:>6.1f} MiB")


@snapshot.command("rm")
@click.argument("names", nargs=-1, required=True)
def snapshot_rm(names: tuple[str, ...]) -> None:
    """Remove snapshots (sandboxes restored from them keep running)."""
    from sandvm.snapshots import SnapshotStore

    _remove_each(names, SnapshotStore().remove)


@snapshot.command("verify")
@click.argument("names", nargs=-1)
def snapshot_verify(names: tuple[str, ...]) -> None:
    """Check every file of the snapshots (all if none named) against its sha256."""
    from sandvm.snapshots import SnapshotStore

    store = SnapshotStore()
    targets = list(names) or [p.name for p in sorted(store.root.iterdir())
                              if p.is_dir() and not p.name.startswith(".")] \
        if store.root.is_dir() else list(names)
    bad = 0
    for n in targets:
        try:
            store.verify(store.get(n), full=True)
            click.echo(f"{n}: ok")
        except SandvmError as exc:
            click.echo(f"{n}: {exc.code}: {exc.message}")
            bad += 1
    sys.exit(1 if bad else 0)


# --------------------------------------------------------------------------- volumes


@main.group()
def volume() -> None:
    """Named persistent volumes: create, list, inspect, remove ($SANDVM_HOME/volumes)."""


@volume.command("create")
@click.argument("name")
@click.option("--size", required=True, metavar="SIZE", help="Size, e.g. 512M or 1G (sparse).")
def volume_create(name: str, size: str) -> None:
    """Create volume NAME: an empty ext4 file system of SIZE bytes."""
    from sandvm.volumes import VolumeStore

    try:
        vol = VolumeStore().create(name, size=size)
    except SandvmError as exc:
        _fail(exc)
        return
    click.echo(f"{vol.name} ({_human(vol.size)})")


def _volume_dict(info: Any) -> dict[str, Any]:
    v = info.volume
    return {"name": v.name, "path": str(v.path), "size": v.size, "created": v.created,
            "disk_bytes": info.disk_bytes,
            "attachments": [{"sandbox_id": a.sandbox_id, "pid": a.pid,
                             "read_only": a.read_only, "since": a.since}
                            for a in info.attachments]}


def _attached(info: Any) -> str:
    return ", ".join(f"{a.sandbox_id} ({'ro' if a.read_only else 'rw'})"
                     for a in info.attachments) or "-"


@volume.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def volume_ls(as_json: bool) -> None:
    """List volumes: size, space used on disk, who has them attached."""
    from sandvm.volumes import VolumeStore

    store = VolumeStore()
    try:
        infos = [store.inspect(v.name) for v in store.ls()]
    except SandvmError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([_volume_dict(i) for i in infos], indent=2))
        return
    if not infos:
        click.echo("no volumes (create one with `sandvm volume create NAME --size 1G`)")
        return
    click.echo(f"{'NAME':<24} {'SIZE':>10} {'ON DISK':>10}  ATTACHED TO")
    for i in infos:
        click.echo(f"{i.volume.name:<24} {_human(i.volume.size):>10}"
                   f" {_human(i.disk_bytes):>10}  {_attached(i)}")


@volume.command("inspect")
@click.argument("name")
def volume_inspect(name: str) -> None:
    """Show volume NAME as JSON: size, bytes on disk, creation time, attachments."""
    from sandvm.volumes import VolumeStore

    try:
        info = VolumeStore().inspect(name)
    except SandvmError as exc:
        _fail(exc)
        return
    click.echo(json.dumps(_volume_dict(info), indent=2))


@volume.command("rm")
@click.argument("names", nargs=-1, required=True)
def volume_rm(names: tuple[str, ...]) -> None:
    """Remove volumes and their data (refused while a sandbox has one attached)."""
    from sandvm.volumes import VolumeStore

    _remove_each(names, VolumeStore().rm)


# --------------------------------------------------------------------------- images


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@contextlib.contextmanager
def _progress(label: str) -> Any:
    """A rich progress bar on a TTY (``update(done, total)``), silence otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), transient=True) as prog:
        tasks: dict[str, Any] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = prog.add_task(f"{label} {what[:40]}", total=total or None)
            prog.update(tasks[what], completed=done, total=total or None)
        yield update


@contextlib.contextmanager
def _build_progress() -> Any:
    """Progress of a root filesystem build as ``(done, total)``; None off a TTY."""
    with _progress("build") as prog:
        yield (lambda done, total: prog("rootfs", done, total)) if prog else None


def _echo_image(img: Any) -> None:
    click.echo(f"{img.name} {img.manifest_digest} (rootfs {_human(img.rootfs_bytes)})")


def _image_line(img: Any) -> str:
    return (f"{img.name}  {img.manifest_digest[:19]}  layers {_human(img.layers_bytes)}"
            f"  rootfs {_human(img.rootfs_bytes)}")


@main.group()
def image() -> None:
    """Images: pull from a registry, load archives and layouts, list, remove, prune."""


@image.command("pull")
@click.argument("ref")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP to this registry (loopback ones always are).")
@click.option("--username", default=None, envvar="SANDVM_REGISTRY_USER")
@click.option("--password", default=None, envvar="SANDVM_REGISTRY_PASSWORD")
def image_pull(ref: str, insecure: tuple[str, ...], username: str | None,
               password: str | None) -> None:
    """Pull REF (e.g. 127.0.0.1:5000/tools/py:3.11) and build its root filesystem."""
    from sandvm.images.store import ImageStore

    try:
        with _progress("pull") as prog:  # one live display for the pull and the build
            img = ImageStore().pull(
                ref, insecure_registries=insecure, username=username, password=password,
                progress=prog, build_progress=(lambda d, t: prog("rootfs", d, t)) if prog
                else None)
    except SandvmError as exc:
        _fail(exc)
        return
    _echo_image(img)


@image.command("load")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", default=None, help="Name for the image (default: its tag).")
@click.option("--ref", default=None, help="Which image of the archive (its tag or RepoTag).")
def image_load(path: str, name: str | None, ref: str | None) -> None:
    """Load a `docker save` archive, an OCI layout tar or an OCI layout directory."""
    from pathlib import Path

    from sandvm.images.store import ImageStore

    try:
        with _build_progress() as prog:
            img = ImageStore().load(Path(path), name=name, ref=ref, progress=prog)
    except SandvmError as exc:
        _fail(exc)
        return
    _echo_image(img)


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def image_ls(as_json: bool) -> None:
    """List images with the size of their layers and of their built root filesystem."""
    from dataclasses import asdict

    from sandvm.images.store import ImageStore

    try:
        images = ImageStore().ls()
    except SandvmError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([asdict(i) for i in images], indent=2))
        return
    click.echo("base  (built in: runs from memory)")
    for img in images:
        click.echo(_image_line(img))


@image.command("rm")
@click.argument("names", nargs=-1, required=True)
def image_rm(names: tuple[str, ...]) -> None:
    """Remove images by name (blobs other images share are kept)."""
    from sandvm.images.store import ImageStore

    _remove_each(names, ImageStore().rm)


@image.command("prune")
def image_prune() -> None:
    """Remove blobs, root filesystems and partial downloads no image uses."""
    from sandvm.images.store import ImageStore

    try:
        freed = ImageStore().prune()
    except SandvmError as exc:
        _fail(exc)
        return
    click.echo(f"freed {_human(freed)}")



@image.command("build-default")
@click.option("--name", default="debian", show_default=True, help="Name of the image.")
@click.option("--suite", default="bookworm", show_default=True, help="Debian suite.")
@click.option("--packages", default="python3,python3-pip,ca-certificates", show_default=True,
              help="Comma-separated packages to install.")
@click.option("--force", is_flag=True, help="Build again even if it exists.")
def image_build_default(name: str, suite: str, packages: str, force: bool) -> None:
    """Build the `debian` image (bookworm + python3 + pip) with mmdebstrap, once."""
    from sandvm.images.debian import build_default

    console_tty = sys.stderr.isatty()
    try:
        if console_tty:
            from rich.console import Console

            with Console(stderr=True).status("building") as status:
                img = build_default(name=name, suite=suite, packages=packages, force=force,
                                    progress=lambda msg: status.update(msg))
        else:
            img = build_default(name=name, suite=suite, packages=packages, force=force)
    except SandvmError as exc:
        _fail(exc)
        return
    _echo_image(img)



# --------------------------------------------------------------------------- managed sandboxes


def _manager() -> Any:
    from sandvm.runtime.manager import SandboxManager

    return SandboxManager()


@main.command("create")
@click.option("--image", default=None, help="Guest image (as for `sandvm run`).")
@click.option("--memory", default="256M", show_default=True, help="Guest memory.")
@click.option("--cpus", default=1, show_default=True, type=int, help="vCPUs.")
@click.option("--disk-size", default=None, metavar="SIZE", help="Root disk size for an image.")
@click.option("--ttl", default=300.0, show_default=True, type=float,
              help="Seconds until the sandbox is killed (extend with `sandvm extend`).")
@click.option("--ticket", "show_ticket", is_flag=True,
              help="Also print a reclaim ticket (on a second line).")
@_network_options
def create_cmd(image: str | None, memory: str, cpus: int, disk_size: str | None, ttl: float,
               show_ticket: bool, allow_hosts: tuple[str, ...], allow_ports: tuple[int, ...],
               allow_http: bool, allow_ips: tuple[str, ...], add_hosts: tuple[str, ...]
               ) -> None:
    """Start a sandbox that outlives this command; print its id.

    Use it with `sandvm exec ID -- CMD`, `sandvm ls`, `sandvm logs ID`, `sandvm kill ID`.
    """
    from sandvm.images.store import default_image

    async def go(network: NetworkPolicy | None) -> tuple[str, str]:
        m = _manager()
        sb = await m.create(ttl=ttl, image=image or default_image(),
                            memory_mib=parse_memory(memory), vcpus=cpus, disk_size=disk_size,
                            network=network)
        return sb.sandbox_id, await m.detach(sb)

    try:
        network = _network_policy(allow_hosts, allow_ports, allow_http, allow_ips, add_hosts)
        sid, ticket = asyncio.run(go(network))
    except SandvmError as exc:
        _fail(exc)
        return
    click.echo(sid)
    if show_ticket:
        click.echo(ticket)


@main.command("exec", context_settings={"ignore_unknown_options": True,
                                        "allow_interspersed_args": False})
@click.argument("sandbox_id")
@click.option("--timeout", type=float, default=None, help="Kill the command after N seconds.")
@click.option("-e", "--env", "envs", multiple=True, metavar="KEY=VAL", help="Set a variable.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-u", "--user", default=None, metavar="USER[:GROUP]", help="Run as this user.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("--busy-wait", type=click.FloatRange(min=0), default=30.0, show_default=True,
              metavar="SECONDS",
              help="How long to wait while another process uses the sandbox.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(sandbox_id: str, timeout: float | None, envs: tuple[str, ...],
             workdir: str | None, user: str | None, interactive: bool, busy_wait: float,
             cmd: tuple[str, ...]) -> None:
    """Run CMD in the managed sandbox SANDBOX_ID (it keeps running afterwards)."""
    argv = list(cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("give a command after --, e.g. sandvm exec ID -- uname -a")
    env = _parse_env(envs)
    _run_and_exit(lambda: _run(argv, image="base", memory=0, cpus=1, timeout=timeout,
                               env=env, workdir=workdir, interactive=interactive, user=user,
                               attach_id=sandbox_id, busy_wait=busy_wait))


@main.command("ls")
@click.option("--all", "show_all", is_flag=True, help="Also list ended sandboxes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(show_all: bool, as_json: bool) -> None:
    """List managed sandboxes (those made by `sandvm create`)."""
    from dataclasses import asdict

    try:
        items = _manager().ls(include_ended=show_all)
    except SandvmError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([asdict(i) for i in items], indent=2))
        return
    for i in items:
        left = f"{i.expires_in:.0f}s left" if i.expires_in is not None else ""
        click.echo(f"{i.sandbox_id}  {i.state:8}  {i.image:20}  {left}"
                   + (f"  {i.end_reason}" if i.end_reason else ""))


@main.command("logs")
@click.argument("sandbox_id")
def logs_cmd(sandbox_id: str) -> None:
    """Show a managed sandbox's journal (every operation and its result) and the
    tail of its guest console."""
    from datetime import datetime
    from pathlib import Path

    from sandvm.runtime.journal import JournalState

    m = _manager()
    rec = m.journal.get(sandbox_id)
    if rec is None:
        _fail(VmNotFound(sandbox_id))
        return
    for e in m.journal.events(sandbox_id):
        when = datetime.fromtimestamp(e["ts"]).strftime("%H:%M:%S.%f")[:-3]
        status = "" if e["phase"] == "intent" else (" ok" if e["ok"] else " failed")
        detail = f" {json.dumps(e['detail'])}" if e["detail"] else ""
        click.echo(f"{when}  {e['op']:8} {e['phase']}{status}{detail}")
    if rec.state is JournalState.ENDED:
        click.echo(f"ended: {rec.end_reason}")
    elif rec.rundir:
        from sandvm.providers.qemu import console_tail

        # the guest wrote it: escape what a terminal would act on
        tail = escape_text(console_tail(Path(rec.rundir)).decode(errors="replace"), keep="\n")
        click.echo("--- guest console ---")
        click.echo(tail.rstrip("\n"))


@main.command("kill")
@click.argument("sandbox_ids", nargs=-1, required=True)
def kill_cmd(sandbox_ids: tuple[str, ...]) -> None:
    """Destroy managed sandboxes."""
    m = _manager()
    _remove_each(sandbox_ids, lambda sid: asyncio.run(m.kill(sid)), done="killed")


@main.command("extend")
@click.argument("sandbox_id")
@click.option("--ttl", required=True, type=float, help="Seconds to live from now.")
def extend_cmd(sandbox_id: str, ttl: float) -> None:
    """Set a managed sandbox's remaining lifetime."""
    try:
        _manager().set_ttl(sandbox_id, ttl)
    except SandvmError as exc:
        _fail(exc)
        return
    click.echo(f"{sandbox_id}: {ttl:.0f}s left")


@main.command("gc")
def gc_cmd() -> None:
    """Repair after processes that died mid-way (e.g. SIGKILLed): close their unfinished
    operations, kill QEMUs nobody owns, clean up sandboxes whose keeper is gone."""
    from sandvm.providers.qemu import disk_root, sweep_stale_rundirs

    rec = asyncio.run(_manager().recover())
    swept = sweep_stale_rundirs() + sweep_stale_rundirs(disk_root())
    for sid, op in rec.interrupted:
        click.echo(f"interrupted {op} of {sid} (its process ended mid-way)")
    for pid in rec.orphans_killed:
        click.echo(f"killed orphaned QEMU pid {pid}")
    for sid in rec.repaired:
        click.echo(f"repaired {sid} (repair-needed: its keeper was gone)")
    click.echo(f"{len(rec.repaired)} sandboxes repaired, {len(rec.live)} still running,"
               f" {len(swept)} stale directories removed")


# --------------------------------------------------------------------------- server


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; put TLS in front).")
@click.option("--port", default=7070, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: a free one, printed at start).")
@click.option("--max-sandboxes", default=10, show_default=True, type=click.IntRange(min=1),
              help="Live sandboxes per tenant.")
@click.option("--default-ttl", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds a sandbox lives unless its creator says otherwise.")
@click.option("--max-ttl", default=86400.0, show_default=True, type=click.FloatRange(min=1),
              help="Longest lifetime (seconds) a client may ask for.")
@click.option("--max-upload", default="1G", show_default=True, metavar="SIZE",
              help="Largest file upload.")
@click.option("--max-tenant-memory", default=None, metavar="SIZE",
              help="Memory of a tenant's live sandboxes together, e.g. 8G (a number: MiB;"
                   " default: no cap beyond --max-sandboxes).")
@click.option("--max-ports", default=16, show_default=True, type=click.IntRange(0, 4096),
              help="Guest ports a tenant keeps exposed at once.")
@click.option("--port-host", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address exposed guest ports listen on (0.0.0.0: every interface).")
@click.option("--rate-limit", default=None, type=click.FloatRange(min=0, min_open=True),
              metavar="N", help="Requests per second per tenant (429 with Retry-After"
                                " beyond; default: no limit).")
@click.option("--rate-burst", default=None, type=click.IntRange(min=1), metavar="N",
              help="Requests a tenant may send at once within --rate-limit (default: one"
                   " second's worth).")
@click.option("--max-snapshots", default=20, show_default=True, type=click.IntRange(0, 4096),
              help="Snapshots a tenant keeps on the server.")
@click.option("--max-snapshot-bytes", default="16G", show_default=True, metavar="SIZE",
              help="Disk a tenant's snapshots take together (RAM, state, disk layers), e.g."
                   " 50G; a save that would go over it is refused (429), 'none': no cap.")
@click.option("--max-pools", default=4, show_default=True, type=click.IntRange(0, 4096),
              help="Warm pools per tenant.")
@click.option("--max-pool-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Sandboxes a tenant's pools keep waiting or restoring, all together"
                   " (their max_size summed).")
@click.option("--max-fork", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Copies one fork request makes.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--provider", default="qemu", show_default=True,
              type=click.Choice(["qemu", "memory"]),
              help="memory: the in-memory fake, for tests of the API without QEMU (no VMs:"
                   " sandboxes are created, listed, timed out and killed, and end with the"
                   " server; commands, files, snapshots, forks and pools are refused).")
def serve_cmd(host: str, port: int, max_sandboxes: int, default_ttl: float, max_ttl: float,
              max_upload: str, max_tenant_memory: str | None, max_ports: int,
              port_host: str, rate_limit: float | None, rate_burst: int | None,
              max_snapshots: int, max_snapshot_bytes: str, max_pools: int,
              max_pool_size: int, max_fork: int, log_level: str, provider: str) -> None:
    """Serve the HTTP API (keys from `sandvm key create`; state in $SANDVM_SERVER_DIR,
    default $SANDVM_HOME/server). Stopping it (SIGTERM, Ctrl-C) detaches its sandboxes:
    they keep running, and the next `sandvm serve` takes them over."""
    import logging
    import socket

    import uvicorn

    from sandvm.server import ServerConfig, ServerStore, create_app

    try:
        config = ServerConfig(max_sandboxes=max_sandboxes, default_ttl=min(default_ttl, max_ttl),
                              max_ttl=max_ttl,
                              max_upload_bytes=parse_size(max_upload, what="--max-upload"),
                              max_tenant_memory_mib=_tenant_memory(max_tenant_memory),
                              max_tenant_ports=max_ports, port_host=port_host,
                              rate_limit=rate_limit, rate_burst=rate_burst,
                              max_snapshots=max_snapshots,
                              max_snapshot_bytes=None if max_snapshot_bytes.strip().lower()
                              == "none" else parse_size(max_snapshot_bytes,
                                                        what="--max-snapshot-bytes"),
                              max_pools=max_pools,
                              max_pool_size=max_pool_size, max_fork=max_fork)
        store = ServerStore(config.state_dir)
        if not store.keys():
            click.echo("sandvm: no API keys yet: every request will be refused; create one"
                       " with `sandvm key create NAME`", err=True)
        store.close()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except SandvmError as exc:
        _fail(exc)
        return
    except OSError as exc:
        raise click.BadParameter(f"{host}: {exc}", param_hint="--host") from None
    family, socktype, proto, _, addr = infos[0]
    # with its proto (IPPROTO_TCP), asyncio sets TCP_NODELAY on accepted connections:
    # without it every keep-alive response waits for the client's delayed ACK (40 ms)
    sock = socket.socket(family, socktype, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        click.echo(f"sandvm: error: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        sys.exit(1)
    sock.listen(512)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    click.echo(f"sandvm: serving on http://{shown}:{bound[1]}", err=True)
    server = uvicorn.Server(uvicorn.Config(
        create_app(config, provider=_serve_provider(provider)), log_level=log_level,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=max(64 << 10, config.max_header_bytes * 2),
        access_log=False, server_header=False))
    server.run(sockets=[sock])


def _serve_provider(name: str) -> Any:
    """``--provider``: None for QEMU (the server's default), else the in-memory fake."""
    if name == "qemu":
        return None
    from sandvm.providers.memory import InMemoryVmProvider

    return InMemoryVmProvider()


def _tenant_memory(value: str | None) -> int | None:
    """``--max-tenant-memory``: MiB as a number, or a size such as 8G."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return int(text)
    return max(1, parse_size(text, what="--max-tenant-memory") >> 20)


@main.group("key")
def key_group() -> None:
    """API keys of `sandvm serve` (stored hashed in $SANDVM_SERVER_DIR)."""


def _key_store() -> Any:
    from sandvm.server import ServerConfig, ServerStore

    return ServerStore(ServerConfig().state_dir)


@key_group.command("create")
@click.argument("name")
@click.option("--tenant", default=None, help="The tenant whose sandboxes the key reaches"
                                             " (default: NAME).")
def key_create(name: str, tenant: str | None) -> None:
    """Create an API key; the key is printed once, on the last line."""
    try:
        store = _key_store()
        key = store.create_key(name, tenant=tenant)
    except SandvmError as exc:
        _fail(exc)
        return
    click.echo(f"created key {name} for tenant {tenant or name}; it is shown only now:")
    click.echo(key)


@key_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def key_ls(as_json: bool) -> None:
    """List API keys (names and tenants; never the keys)."""
    from dataclasses import asdict
    from datetime import datetime

    try:
        keys = _key_store().keys()
    except SandvmError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([asdict(k) for k in keys], indent=2))
        return
    for k in keys:
        when = datetime.fromtimestamp(k.created).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{k.name:24}  {k.tenant:24}  {when}")


@key_group.command("revoke")
@click.argument("names", nargs=-1, required=True)
def key_revoke(names: tuple[str, ...]) -> None:
    """Revoke API keys: requests with them are refused from now on."""
    try:
        store = _key_store()
    except SandvmError as exc:
        _fail(exc)
        return
    _remove_each(names, store.revoke_key, done="revoked")


if __name__ == "__main__":
    main()
