"""The `sandvm` command line (console entry point ``sandvm.cli:main``).

``main`` is the click group; its commands live in one module per group: ``running``
(run), ``managed`` (create, exec, ls, logs, kill, extend, gc), ``snapshots``,
``volumes``, ``images``, ``serving`` (serve, key); ``common`` holds what they share.
setup and doctor are here."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from sandvm.cli.common import fail
from sandvm.cli.images import image
from sandvm.cli.managed import create_cmd, exec_cmd, extend_cmd, gc_cmd, kill_cmd, logs_cmd, ls_cmd
from sandvm.cli.running import run
from sandvm.cli.serving import key_group, serve_cmd
from sandvm.cli.snapshots import snapshot
from sandvm.cli.volumes import volume
from sandvm.errors import SandvmError

__all__ = ["main"]


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
        fail(exc)
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


for _command in (run, snapshot, volume, image, create_cmd, exec_cmd, ls_cmd, logs_cmd,
                 kill_cmd, extend_cmd, gc_cmd, serve_cmd, key_group):
    main.add_command(_command)
