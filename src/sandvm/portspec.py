"""Port values: what ``ports.expose`` returns (``ExposedPort``), a ``sandvm run -p``
option (``PortMapping``, ``parse_publish``) and the checks of ports and addresses, apart
from the tunnels themselves (``sandvm.ports``, which also exports these names): the
server's configuration, the CLI and the remote SDK use them without the tunnel code.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from sandvm.errors import InvalidSpec

DEFAULT_BIND = "127.0.0.1"
GUEST_LOOPBACK = "127.0.0.1"
DEFAULT_WAIT = 30.0


class ExposedPort(str):
    """What ``ports.expose`` returns: the URL ``http://HOST:PORT`` of the host listener.

    It *is* that URL (a ``str``, so it goes wherever a URL goes: ``urlopen(url)``,
    ``httpx.get(url)``) and also carries ``host`` and ``port`` (where the host
    listens) and ``guest_port``. Immutable.
    """

    host: str
    port: int
    guest_port: int

    def __new__(cls, host: str, port: int, guest_port: int) -> ExposedPort:
        name = f"[{host}]" if ":" in host else host
        self = super().__new__(cls, f"http://{name}:{port}")
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "guest_port", guest_port)
        return self

    @property
    def url(self) -> str:
        """The URL as a plain ``str``."""
        return str.__str__(self)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ExposedPort is immutable")

    def __repr__(self) -> str:
        return (f"ExposedPort(host={self.host!r}, port={self.port},"
                f" guest_port={self.guest_port})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExposedPort, (self.host, self.port, self.guest_port))


@dataclass(frozen=True)
class PortMapping:
    """One ``sandvm run -p`` option: listen on ``host``:``host_port`` (0: any free
    port), tunnel to ``guest_port``."""

    guest_port: int
    host_port: int = 0
    host: str = DEFAULT_BIND


def check_port(port: object, what: str = "port", *, allow_zero: bool = False) -> int:
    """``port`` as an int in 1..65535 (0 too with ``allow_zero``). Raises InvalidSpec."""
    low = 0 if allow_zero else 1
    if not isinstance(port, int) or isinstance(port, bool) or not low <= port <= 65535:
        raise InvalidSpec(f"{what} must be an int between {low} and 65535, not {port!r}")
    return port


def check_bind_host(host: object) -> str:
    """The host address to listen on: an IP literal (``localhost`` is 127.0.0.1).
    Raises InvalidSpec."""
    if host == "localhost":
        return DEFAULT_BIND
    try:
        if not isinstance(host, str):
            raise ValueError(host)
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise InvalidSpec(f"the host address to listen on must be an IP address such as"
                          f" 127.0.0.1 (the default) or 0.0.0.0, not {host!r}") from None


def check_guest_host(host: object) -> str:
    """The guest address a tunnel connects to: loopback only. Raises InvalidSpec."""
    if host == "localhost":
        return GUEST_LOOPBACK
    try:
        addr = ipaddress.ip_address(host) if isinstance(host, str) else None
    except ValueError:
        addr = None
    if addr is None or not addr.is_loopback:
        raise InvalidSpec(f"tunnels reach loopback addresses in the guest only (127.0.0.1"
                          f" or ::1), not {host!r}: bind the guest's server to one of them"
                          " or to 0.0.0.0")
    return str(addr)


def parse_publish(spec: str) -> PortMapping:
    """Parse ``[HOST:][HOST_PORT:]GUEST_PORT[/tcp]`` (as ``sandvm run -p`` takes it).

    ``8000``: a free host port; ``8080:8000``; ``0.0.0.0:8080:8000``;
    ``127.0.0.1::8000`` or ``[::1]:8080:8000``. Raises InvalidSpec.
    """
    text = spec.strip()
    if text.endswith("/tcp"):
        text = text[:-4]
    elif "/" in text:
        raise InvalidSpec(f"only TCP ports can be published, not {spec!r}")
    host = DEFAULT_BIND
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise InvalidSpec(f"bad port spec {spec!r}: write an IPv6 host as [::1]:8080:8000")
        host, parts = text[1:end], text[end + 2:].split(":")
        if len(parts) > 2:
            raise InvalidSpec(f"bad port spec {spec!r}: expected [HOST]:HOST_PORT:GUEST_PORT")
    else:
        parts = text.rsplit(":", 2)
        if len(parts) == 3:
            host, parts = parts[0], parts[1:]
        elif len(parts) == 2 and not parts[0].isdigit() and "." in parts[0]:
            host, parts = parts[0], ["", parts[1]]  # "127.0.0.1:8000": a free host port

    def num(s: str, what: str, allow_zero: bool) -> int:
        if not s.isdigit() or len(s) > 5:
            raise InvalidSpec(f"bad port spec {spec!r}: {what} {s!r} is not a port number;"
                              " use [HOST:][HOST_PORT:]GUEST_PORT, e.g. 8080:8000")
        return check_port(int(s), what, allow_zero=allow_zero)

    guest = num(parts[-1], "guest port", False)
    host_port = num(parts[0], "host port", True) if len(parts) == 2 and parts[0] else 0
    return PortMapping(guest_port=guest, host_port=host_port, host=check_bind_host(host))
