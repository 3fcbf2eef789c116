"""Request and response shapes of the HTTP API (pydantic; they make /openapi.json).

Every request model forbids unknown fields and bounds every string, list and number,
so a hostile body is refused before it reaches the service.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandvm.sandbox import MAX_COMMAND_TIMEOUT

ImageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$",
                                 description="A built-in image (`base`) or one of"
                                             " `sandvm image ls` on the server.")]
HostPattern = Annotated[str, Field(min_length=1, max_length=253)]
EnvName = Annotated[str, Field(min_length=1, max_length=256)]
Arg = Annotated[str, Field(max_length=128 << 10)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkPolicyBody(_Strict):
    """Egress through the server's policy proxy: deny by default, these names allowed.

    Addresses that are not public (``allow_ips``) and fixed answers (``hosts``) are
    for the server's operator, not for API clients."""

    allow: list[HostPattern] = Field(default_factory=list, max_length=256)
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default=[443], max_length=64)
    allow_http: bool = False
    max_bytes: Annotated[int, Field(ge=0)] | None = None


class CreateSandboxRequest(_Strict):
    image: ImageName | None = Field(default=None, description="Default: the server's"
                                                              " default image.")
    memory_mib: int = Field(default=256, ge=128, le=16384)
    vcpus: int = Field(default=1, ge=1, le=16)
    timeout: float | None = Field(default=None, gt=0, le=MAX_COMMAND_TIMEOUT,
                                  description="Seconds the sandbox"
                                  " lives (its TTL; default: the server's). Extend it with"
                                  " POST /v1/sandboxes/{id}/timeout.")
    network: NetworkPolicyBody | None = Field(default=None, description="No network if"
                                              " absent.")


class SetTimeoutRequest(_Strict):
    timeout: float = Field(gt=0, le=MAX_COMMAND_TIMEOUT,
                           description="Seconds the sandbox lives from now.")


class RunCommandRequest(_Strict):
    cmd: Annotated[str, Field(min_length=1, max_length=128 << 10)] | Annotated[
        list[Arg], Field(min_length=1, max_length=4096)] = Field(
        description="A shell command line (run by /bin/sh -c) or an argv list.")
    env: dict[EnvName, Annotated[str, Field(max_length=128 << 10)]] | None = Field(
        default=None, max_length=1024)
    cwd: Annotated[str, Field(max_length=4096)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    timeout: float | None = Field(default=60.0, gt=0, le=MAX_COMMAND_TIMEOUT,
                                  description="Seconds before the command's processes are"
                                  " killed; null: no limit (the sandbox's own timeout"
                                  " still ends it).")
    stdin: str | None = Field(default=None, description="Text fed to the command's stdin.")
    stdin_b64: str | None = Field(default=None, description="Bytes fed to stdin, base64.")


class SandboxInfo(BaseModel):
    sandbox_id: str
    state: Literal["starting", "running", "ended"]
    image: str
    memory_mib: int
    vcpus: int
    created: float = Field(description="Epoch seconds.")
    expires_at: float | None = Field(description="Epoch seconds when its TTL ends.")
    network: bool = Field(description="Whether it has an egress policy.")


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class WriteResult(BaseModel):
    path: str
    size: int


class ErrorBody(BaseModel):
    """Every error response: a stable ``code`` (see sandvm.errors) and what to change."""

    code: str
    message: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class CommandEvent(BaseModel):
    """One line of a command's NDJSON output stream.

    ``stdout``/``stderr``: a chunk of output in ``text`` (valid UTF-8) or ``b64`` (any
    bytes). ``exit``: the last line of a command that ended (``exit_code``, ``signal``,
    ``timed_out``, ``duration`` seconds). ``error``: the last line of a command that
    failed (``code``, ``message``)."""

    type: Literal["stdout", "stderr", "exit", "error"]
    text: str | None = None
    b64: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool | None = None
    duration: float | None = None
    code: str | None = None
    message: str | None = None
