"""What an error may tell an API client, and what only the server's log may keep.

Every error the API sends (a JSON error response, the ``error`` event that ends a
command's stream) goes through ``Redactor.public``: it removes the server's own
directories (its state, home, runtime, snapshot, image and journal dirs) from the
message, and for errors that come from below the API (the VM, the agent, snapshots,
images: anything but the caller's input, the guest's own files and the server's own
refusals) every absolute path, which on the host side names host files and in a boot
failure may be the guest's console text; it escapes control and format characters
(terminal escapes, NUL, bidi overrides: a guest writes its console) and bounds the
length. When that changed anything, the full message goes to the server's log under
the request's id, and the client's message names that id.

Each HTTP request gets an id (``X-Request-Id`` on its response) in a context
variable, so errors raised in tasks the request started carry it too.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sandvm.core import escape_text
from sandvm.errors import (
    CommandError,
    ConfigError,
    GuestError,
    SandboxStateError,
    SandvmError,
    ServiceError,
)

__all__ = ["MAX_PUBLIC_MESSAGE", "Redactor", "default_redactor", "escape_text",
           "new_request_id", "request_id", "status_for"]

log = logging.getLogger("sandvm.server")

MAX_PUBLIC_MESSAGE = 2000  # characters of an error message a client gets
MAX_LOGGED_MESSAGE = 64 << 10  # characters of one the server's log keeps
PATH_MARK = "<path>"
# errors whose messages may name paths the client knows (its own input, the guest's
# files and commands, the server's own refusals): only the server's directories go
KEEP_GUEST_PATHS: tuple[type[SandvmError], ...] = (
    ConfigError, GuestError, CommandError, SandboxStateError, ServiceError)
_STOP = r"\s'\"`,;()<>\[\]{}|"  # characters that end a path in a message
# an absolute path: a "/" that does not continue a word, a URL or another path (and
# is not one of the API's own, /v1/..., which messages name as what to do next)
_ABS_PATH = re.compile(r"(?<![\w.~:/\\-])/(?!v1/)[^" + _STOP + "]+")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sandvm_request_id", default=None)


def new_request_id() -> str:
    """A fresh request id, made the current one (of this task and those it starts)."""
    rid = "req-" + secrets.token_hex(8)
    _request_id.set(rid)
    return rid


def request_id() -> str | None:
    """The id of the request being served (None outside one)."""
    return _request_id.get()


# the first code found along the exception's class tree decides the status
_STATUS = {
    "unauthenticated": 401,
    "quota_exceeded": 429,
    "request_too_large": 413,
    "file_too_large": 413,
    "vm_not_found": 404,
    "unknown_command": 404,
    "file_not_found": 404,
    "snapshot_not_found": 404,
    "pool_not_found": 404,
    "pool_exhausted": 503,
    "pool_exists": 409,
    "pool_closed": 409,
    "pool_error": 409,
    "snapshot_in_use": 409,
    "snapshot_corrupt": 409,
    "snapshot_incompatible": 409,
    "image_not_found": 404,
    "volume_not_found": 404,
    "sandbox_state": 409,
    "file_exists": 409,
    "invalid_transition": 409,
    "vm_already_exists": 409,
    "snapshot_already_exists": 409,
    "volume_in_use": 409,
    "permission_denied": 403,
    "agent_timeout": 504,
    "command_timeout": 504,
    "rate_limited": 429,
    "port_timeout": 504,
    "port_in_use": 409,
    "asset_missing": 503,
    "unsupported": 501,  # e.g. a snapshot asked of a server on the in-memory fake
    "invalid_config": 400,
    "guest_error": 400,
    "command_error": 400,
    "port_error": 400,
}


def status_for(exc: SandvmError) -> int:
    """The HTTP status of an error response (500 for what the caller cannot fix)."""
    status = getattr(exc, "http_status", None)  # set where the class alone cannot say
    if isinstance(status, int) and 400 <= status <= 599:
        return status
    for cls in type(exc).__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in _STATUS:
            return _STATUS[code]
    return 500


def _server_dirs(extra: Iterable[Path | str]) -> list[str]:
    """The server's own directories as they may appear in messages (as given and
    resolved), longest first."""
    from sandvm.assets import sandvm_home

    dirs: list[Path] = [Path(p) for p in extra]
    with contextlib.suppress(Exception):
        dirs.append(sandvm_home())
    for var in ("SANDVM_SERVER_DIR", "SANDVM_SNAPSHOT_DIR", "SANDVM_IMAGE_STORE",
                "SANDVM_VOLUME_STORE", "SANDVM_RUNTIME_DIR", "SANDVM_AUDIT_DIR"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    if os.environ.get("SANDVM_JOURNAL"):
        dirs.append(Path(os.environ["SANDVM_JOURNAL"]).parent)
    dirs.append(Path("/dev/shm") / f"sandvm-{os.geteuid()}")  # the default runtime root
    out: set[str] = set()
    for d in dirs:
        for form in (d, d.resolve()):
            text = str(form).rstrip("/")
            if len(text) > 1:  # never "/" itself
                out.add(text)
    return sorted(out, key=len, reverse=True)


class Redactor:
    """Turns errors into what the API sends (see the module's docstring).
    ``server_dirs``: the server's directories besides those sandvm's settings name
    (its state dir)."""

    def __init__(self, server_dirs: Iterable[Path | str] = ()) -> None:
        dirs = _server_dirs(server_dirs)
        # a directory, and whatever path goes on below it (not /x/dir2 for /x/dir)
        self._dirs = re.compile("|".join(
            re.escape(d) + "(?:/[^" + _STOP + "]*|(?=[" + _STOP + "]|$))" for d in dirs)
        ) if dirs else None

    def message(self, exc: SandvmError) -> str:
        """The message a client may see: server dirs (and, for errors from below, every
        absolute path) replaced by ``<path>``, control characters escaped, bounded."""
        text = exc.message
        if self._dirs is not None:
            text = self._dirs.sub(_mark_path, text)
        if not isinstance(exc, KEEP_GUEST_PATHS):
            text = _ABS_PATH.sub(_mark_path, text)
        text = escape_text(text)
        if len(text) > MAX_PUBLIC_MESSAGE:
            text = text[:MAX_PUBLIC_MESSAGE] + "... (cut)"
        return text

    def public(self, exc: SandvmError, *, status: int = 500) -> dict[str, Any]:
        """The JSON error object for ``exc`` (``code``, ``message``). When the message
        was changed, or the error is the server's fault (``status`` >= 500), the full
        message is logged with the request id."""
        text = self.message(exc)
        original = exc.message
        rid = request_id()
        changed = text != original
        if changed or status >= 500:
            log.warning("request %s: %s (%d): %s", rid or "-", exc.code, status,
                        escape_text(original[:MAX_LOGGED_MESSAGE]),
                        exc_info=exc if status >= 500 and status != 501 and
                        exc.__traceback__ else None)
        if changed:
            text += f" (details in the server's log, request {rid or 'unknown'})"
        return {**exc.to_dict(), "message": text}


def _mark_path(m: re.Match[str]) -> str:
    """``<path>``, keeping sentence punctuation that ended the match."""
    tail = len(m.group(0)) - len(m.group(0).rstrip(".:!?"))
    return PATH_MARK + (m.group(0)[-tail:] if tail else "")


@functools.cache
def default_redactor() -> Redactor:
    """A Redactor for sandvm's own directories (from its settings), made once."""
    return Redactor()
