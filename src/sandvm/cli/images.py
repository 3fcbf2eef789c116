"""`sandvm image`: pull, load, list, remove, prune and build images."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

import click

from sandvm.cli.common import fail, human, remove_each
from sandvm.errors import (
    SandvmError,
)

if TYPE_CHECKING:
    pass


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
    click.echo(f"{img.name} {img.manifest_digest} (rootfs {human(img.rootfs_bytes)})")


def _image_line(img: Any) -> str:
    return (f"{img.name}  {img.manifest_digest[:19]}  layers {human(img.layers_bytes)}"
            f"  rootfs {human(img.rootfs_bytes)}")


@click.group()
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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
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

    remove_each(names, ImageStore().rm)


@image.command("prune")
def image_prune() -> None:
    """Remove blobs, root filesystems and partial downloads no image uses."""
    from sandvm.images.store import ImageStore

    try:
        freed = ImageStore().prune()
    except SandvmError as exc:
        fail(exc)
        return
    click.echo(f"freed {human(freed)}")


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
        fail(exc)
        return
    _echo_image(img)
