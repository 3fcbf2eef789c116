"""`sandvm serve` (the HTTP API) and `sandvm key` (its API keys)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from sandvm.cli.common import fail, remove_each
from sandvm.core import parse_size
from sandvm.errors import (
    SandvmError,
)

if TYPE_CHECKING:
    pass


@click.command("serve")
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
        fail(exc)
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


@click.group("key")
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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
        return
    remove_each(names, store.revoke_key, done="revoked")
