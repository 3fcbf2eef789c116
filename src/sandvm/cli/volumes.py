"""`sandvm volume`: named persistent volumes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from sandvm.cli.common import fail, human, remove_each
from sandvm.errors import (
    SandvmError,
)

if TYPE_CHECKING:
    pass


@click.group()
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
        fail(exc)
        return
    click.echo(f"{vol.name} ({human(vol.size)})")


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
        fail(exc)
        return
    if as_json:
        click.echo(json.dumps([_volume_dict(i) for i in infos], indent=2))
        return
    if not infos:
        click.echo("no volumes (create one with `sandvm volume create NAME --size 1G`)")
        return
    click.echo(f"{'NAME':<24} {'SIZE':>10} {'ON DISK':>10}  ATTACHED TO")
    for i in infos:
        click.echo(f"{i.volume.name:<24} {human(i.volume.size):>10}"
                   f" {human(i.disk_bytes):>10}  {_attached(i)}")


@volume.command("inspect")
@click.argument("name")
def volume_inspect(name: str) -> None:
    """Show volume NAME as JSON: size, bytes on disk, creation time, attachments."""
    from sandvm.volumes import VolumeStore

    try:
        info = VolumeStore().inspect(name)
    except SandvmError as exc:
        fail(exc)
        return
    click.echo(json.dumps(_volume_dict(info), indent=2))


@volume.command("rm")
@click.argument("names", nargs=-1, required=True)
def volume_rm(names: tuple[str, ...]) -> None:
    """Remove volumes and their data (refused while a sandbox has one attached)."""
    from sandvm.volumes import VolumeStore

    remove_each(names, VolumeStore().rm)
