"""One definition of the API's descriptions (sandvm.dto), shared by the server's response
models and the remote SDK; the SDK reads them without pydantic or the server."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import sandvm.client
from sandvm import dto
from sandvm.errors import ServiceError
from sandvm.server import models

SHARED = [dto.SandboxInfo, dto.CommandInfo, dto.SnapshotInfo, dto.PoolInfo]


def test_the_client_uses_the_shared_classes() -> None:
    for cls in SHARED:
        assert getattr(sandvm.client, cls.__name__) is cls


@pytest.mark.parametrize("cls", SHARED, ids=lambda c: c.__name__)
def test_server_models_are_derived_from_them(cls: type) -> None:
    model = getattr(models, cls.__name__)
    fields = dataclasses.fields(cls)
    assert list(model.model_fields) == [f.name for f in fields]  # same names, same order
    for f in fields:
        info = model.model_fields[f.name]
        assert info.is_required() == (f.default is dataclasses.MISSING), f.name
        assert info.annotation == dto.field_types(cls)[f.name], f.name


def test_from_json_checks_types_and_tolerates_additions() -> None:
    good = {"sandbox_id": "sb-1", "state": "running", "image": "base", "memory_mib": 256,
            "vcpus": 1, "created": 1, "expires_at": None, "network": False}
    info = dto.SandboxInfo.from_json({**good, "from_a_newer_server": 1})
    assert (info.created, info.expires_at, info.accelerator) == (1.0, None, None)
    assert isinstance(info.created, float)
    assert dto.SandboxInfo.from_json({**good, "state": "hibernating"}).state == "hibernating"
    for bad in ({**good, "memory_mib": "256"}, {**good, "memory_mib": True},
                {**good, "network": "yes"}, {k: v for k, v in good.items() if k != "image"},
                {**good, "expires_at": "soon"}, [good], None):
        with pytest.raises(ServiceError, match="malformed sandbox description"):
            dto.SandboxInfo.from_json(bad)


def test_importing_the_client_loads_no_pydantic_and_no_server() -> None:
    code = ("import sys, sandvm.client; bad = [m for m in sys.modules if m == 'pydantic' or"
            " m.startswith(('sandvm.server', 'sandvm.sandbox', 'sandvm.providers',"
            " 'sandvm.runtime'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
