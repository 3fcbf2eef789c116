"""Managed sandboxes, which outlive the command that made them: `sandvm create`, `exec`,
`ls`, `logs`, `kill`, `extend`, `gc`."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import click

from sandvm.cli.common import fail, network_options, network_policy, parse_env, remove_each
from sandvm.cli.running import run_and_exit, run_command
from sandvm.core import escape_text, parse_memory
from sandvm.errors import (
    SandvmError,
    VmNotFound,
)

if TYPE_CHECKING:
    from sandvm.egress_policy import NetworkPolicy


def _manager() -> Any:
    from sandvm.runtime.manager import SandboxManager

    return SandboxManager()


@click.command("create")
@click.option("--image", default=None, help="Guest image (as for `sandvm run`).")
@click.option("--memory", default="256M", show_default=True, help="Guest memory.")
@click.option("--cpus", default=1, show_default=True, type=int, help="vCPUs.")
@click.option("--disk-size", default=None, metavar="SIZE", help="Root disk size for an image.")
@click.option("--ttl", default=300.0, show_default=True, type=float,
              help="Seconds until the sandbox is killed (extend with `sandvm extend`).")
@click.option("--ticket", "show_ticket", is_flag=True,
              help="Also print a reclaim ticket (on a second line).")
@network_options
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
        network = network_policy(allow_hosts, allow_ports, allow_http, allow_ips, add_hosts)
        sid, ticket = asyncio.run(go(network))
    except SandvmError as exc:
        fail(exc)
        return
    click.echo(sid)
    if show_ticket:
        click.echo(ticket)


@click.command("exec", context_settings={"ignore_unknown_options": True,
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
    env = parse_env(envs)
    run_and_exit(lambda: run_command(argv, image="base", memory=0, cpus=1, timeout=timeout,
                               env=env, workdir=workdir, interactive=interactive, user=user,
                               attach_id=sandbox_id, busy_wait=busy_wait))


@click.command("ls")
@click.option("--all", "show_all", is_flag=True, help="Also list ended sandboxes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(show_all: bool, as_json: bool) -> None:
    """List managed sandboxes (those made by `sandvm create`)."""
    from dataclasses import asdict

    try:
        items = _manager().ls(include_ended=show_all)
    except SandvmError as exc:
        fail(exc)
        return
    if as_json:
        click.echo(json.dumps([asdict(i) for i in items], indent=2))
        return
    for i in items:
        left = f"{i.expires_in:.0f}s left" if i.expires_in is not None else ""
        click.echo(f"{i.sandbox_id}  {i.state:8}  {i.image:20}  {left}"
                   + (f"  {i.end_reason}" if i.end_reason else ""))


@click.command("logs")
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
        fail(VmNotFound(sandbox_id))
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


@click.command("kill")
@click.argument("sandbox_ids", nargs=-1, required=True)
def kill_cmd(sandbox_ids: tuple[str, ...]) -> None:
    """Destroy managed sandboxes."""
    m = _manager()
    remove_each(sandbox_ids, lambda sid: asyncio.run(m.kill(sid)), done="killed")


@click.command("extend")
@click.argument("sandbox_id")
@click.option("--ttl", required=True, type=float, help="Seconds to live from now.")
def extend_cmd(sandbox_id: str, ttl: float) -> None:
    """Set a managed sandbox's remaining lifetime."""
    try:
        _manager().set_ttl(sandbox_id, ttl)
    except SandvmError as exc:
        fail(exc)
        return
    click.echo(f"{sandbox_id}: {ttl:.0f}s left")


@click.command("gc")
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
