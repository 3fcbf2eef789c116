"""What the `sandvm` commands share: error exits, -e/--env and --allow-* parsing, sizes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from sandvm.errors import InvalidSpec, SandvmError

if TYPE_CHECKING:
    from sandvm.egress_policy import NetworkPolicy


def fail(exc: SandvmError) -> None:
    """Print ``exc`` as sandvm's error line and exit: 2 for a usage error (a bad spec,
    path, image or volume), 1 for the rest."""
    click.echo(f"sandvm: error [{exc.code}]: {exc.message}", err=True)
    sys.exit(2 if exc.code in ("invalid_config", "invalid_spec", "invalid_path",
                               "unknown_image", "image_not_found", "volume_not_found") else 1)


def remove_each(names: tuple[str, ...], remove: Callable[[str], None], *,
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


def parse_env(values: tuple[str, ...]) -> dict[str, str]:
    """``-e KEY=VALUE`` options as an env dict. Raises click.BadParameter."""
    env = {}
    for v in values:
        if "=" not in v or v.startswith("="):
            raise click.BadParameter(f"{v!r}: use KEY=VALUE", param_hint="-e/--env")
        k, _, val = v.partition("=")
        env[k] = val
    return env


def network_options(f: Callable[..., Any]) -> Callable[..., Any]:
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


def network_policy(hosts: tuple[str, ...], ports: tuple[int, ...], http: bool,
                   ips: tuple[str, ...], add_hosts: tuple[str, ...]) -> NetworkPolicy | None:
    """The policy the --allow-* flags describe (None: no flags, no network). Raises
    InvalidSpec."""
    from sandvm.egress_policy import NetworkPolicy

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


def human(n: int | None) -> str:
    """A byte count for people: ``512 B``, ``1.5 MiB`` (``-`` for None)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
