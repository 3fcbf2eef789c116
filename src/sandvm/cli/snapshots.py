"""`sandvm snapshot`: create, list, remove and verify snapshots."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING

import click

from sandvm.cli.common import fail, parse_env, remove_each
from sandvm.cli.running import run_command
from sandvm.core import check_guest_path, parse_memory
from sandvm.errors import (
    SandvmError,
    SnapshotAlreadyExists,
)

if TYPE_CHECKING:
    pass


@click.group()
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
        code = asyncio.run(run_command(argv or ["true"], image="base", memory=mem, cpus=cpus,
                                timeout=timeout, env=parse_env(envs), workdir=workdir,
                                interactive=False, snapshot_to=name))
    except SandvmError as exc:
        fail(exc)
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

    remove_each(names, SnapshotStore().remove)


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
