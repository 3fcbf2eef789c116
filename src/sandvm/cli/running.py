"""`sandvm run`: boot (or restore) a microVM, run a command in it, stream its output;
the engine `run_command` also serves `sandvm exec` and `sandvm snapshot create`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import click

from sandvm.cli.common import fail, network_options, network_policy, parse_env
from sandvm.core import check_guest_path, parse_memory, parse_size
from sandvm.errors import (
    CommandNotFound,
    CommandTimeout,
    InvalidSpec,
    SandvmError,
)

if TYPE_CHECKING:
    from sandvm.egress_policy import NetworkPolicy
    from sandvm.portspec import PortMapping
    from sandvm.sandbox import AsyncSandbox


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


async def run_command(cmd: list[str], *, image: str, memory: int, cpus: int,
                      timeout: float | None, env: dict[str, str], workdir: str | None,
                      interactive: bool, source: str | None = None,
                      snapshot_to: str | None = None, disk_size: str | None = None,
                      user: str | None = None,
                      volumes: dict[str, tuple[str, str]] | None = None,
                      attach_id: str | None = None, busy_wait: float = 0.0,
                      publish: list[PortMapping] | None = None,
                      network: NetworkPolicy | None = None) -> int:
    """Run ``cmd`` (the image's Entrypoint + Cmd if empty) in a new sandbox (booted, or
    restored from ``source``), or with ``attach_id`` in that managed sandbox (left
    running after); stream its output to ours, forward stdin if ``interactive``,
    Ctrl-C as SIGINT; with ``snapshot_to``, save the sandbox under that name if the
    command succeeds. Returns the exit code (124: timed out, 130: interrupted). Raises
    SandvmError (what the sandbox raises)."""
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


@click.command(context_settings={"ignore_unknown_options": True,
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
@network_options
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
    from sandvm.portspec import parse_publish

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
        network = network_policy(allow_hosts, allow_ports, allow_http, allow_ips, add_hosts)
    except SandvmError as exc:
        fail(exc)
        return
    env = parse_env(envs)
    run_and_exit(lambda: run_command(argv, image=image, memory=mem, cpus=cpus, timeout=timeout,
                               env=env, workdir=workdir,
                               interactive=interactive, source=source,
                               disk_size=disk_size, user=user, volumes=volumes,
                               publish=publish, network=network))


def run_and_exit(make: Callable[[], Any]) -> None:
    """Run the command coroutine ``make()`` and exit with its code (127: no such
    command, 130: interrupted, 141: our reader went away, 1/2: sandvm errors)."""
    try:
        code = asyncio.run(make())
    except CommandNotFound as exc:
        click.echo(f"sandvm: error [{exc.code}]: {exc.message}", err=True)
        code = 127
    except SandvmError as exc:
        fail(exc)
        return
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # our reader went away (e.g. `sandvm run -- yes | head`): the VM is gone, be quiet
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)
