"""Shared fixtures. Tests marked ``qemu`` need `make setup` (QEMU + guest assets)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sandvm.errors import AssetMissing


def _assets_ok() -> str | None:
    from sandvm.assets import find_assets

    try:
        find_assets()
    except AssetMissing as exc:
        return exc.message
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if any("qemu" in item.keywords for item in items):
        reason = _assets_ok()
    if reason is None:
        return
    if os.environ.get("CI"):
        # in CI the guest assets are part of the set-up: missing ones are a failure
        raise pytest.UsageError(f"QEMU tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"needs `make setup`: {reason}")
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[object]:
    """One booted sandbox shared by the integration tests (booting costs seconds)."""
    from sandvm import Sandbox

    sb = Sandbox.create()
    try:
        yield sb
    finally:
        sb.kill()
