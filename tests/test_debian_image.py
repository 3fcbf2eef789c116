"""The default ``debian`` image built with mmdebstrap (the build needs root, mmdebstrap
and the host's Debian mirror; about 40 s), and the host apt configuration it reads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require
from sandvm.errors import ImageError, ImageInvalid
from sandvm.images import debian
from sandvm.images.debian import build_default, host_apt_options, host_mirrors
from sandvm.images.model import ImageConfig, ImportedImage
from sandvm.images.store import ImageStore, StoredImage

HEX = "0" * 64


def _why_no_build() -> str | None:
    if os.geteuid() != 0:
        return "building the image needs root"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (`sandvm setup` installs it)"
    if shutil.which("debugfs") is None:
        return "debugfs (e2fsprogs) is not installed"
    return None


def _why_no_mirror() -> str | None:
    uri = urllib.parse.urlsplit(host_mirrors("bookworm")[0].split()[1])
    if uri.scheme not in ("http", "https") or not uri.hostname:
        return None
    try:
        socket.create_connection((uri.hostname, uri.port or (443 if uri.scheme == "https"
                                                             else 80)), timeout=5).close()
    except OSError as exc:
        return f"the Debian mirror {uri.hostname} is unreachable: {exc}"
    return None




# ---------------------------------------------------------------------- host apt config


def test_host_mirrors_keeps_debian_sources_and_retargets_the_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb [signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/"
        "debian bookworm stable\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-updates"
        " bookworm-backports\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n"
        "Components: main\n\n"
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
        "Components: main\n")
    (tmp_path / "sources.list.d" / "x.list.disabled").write_text(
        "deb http://disabled.example/debian bookworm main\n")
    assert host_mirrors("trixie", apt_dir=tmp_path) == [
        "deb http://mirror.example/debian trixie main",
        "deb http://mirror.example/debian trixie-updates main",
        "deb http://security.example/debian-security trixie-security main",
    ]


def test_host_mirrors_falls_back_to_deb_debian_org(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb https://example.com/repo nodistro main\n")
    assert host_mirrors("bookworm", apt_dir=tmp_path) == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_host_apt_options_keeps_proxies_and_date_checks_only() -> None:
    dump = "\n".join([
        'Acquire "";', 'Acquire::http "";', 'Acquire::http::Proxy "http://proxy:3128";',
        'Acquire::http::Proxy::deb.debian.org "DIRECT";',
        'Acquire::https::Proxy "";', 'Acquire::Check-Valid-Until "false";',
        'Acquire::Check-Date "false";', 'APT::Install-Recommends "1";',
        'Acquire::Languages "none";'])
    assert host_apt_options(dump) == [
        'Acquire::http::Proxy "http://proxy:3128";',
        'Acquire::http::Proxy::deb.debian.org "DIRECT";',
        'Acquire::Check-Valid-Until "false";', 'Acquire::Check-Date "false";']


# ---------------------------------------------------------------------- errors, no build


def test_missing_mmdebstrap_says_to_run_setup(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _cmd: None)
    store = ImageStore(root=tmp_path / "images")
    with pytest.raises(ImageError, match=r"mmdebstrap.*sandvm setup"):
        build_default(store)
    assert not (store.root / "refs.json").exists()
    assert not list((store.root / "tmp").iterdir())


def test_refuses_to_replace_an_image_it_did_not_build(tmp_path: Path) -> None:
    store = ImageStore(root=tmp_path / "images")
    fake = ImportedImage(f"sha256:{HEX}", f"sha256:{HEX}", ImageConfig())
    store.tag("debian", fake, source="/somewhere/debian.tar")
    with pytest.raises(ImageError, match="already exists"):
        build_default(store)
    with pytest.raises(ImageInvalid):
        build_default(store, name="base")
    with pytest.raises(ImageInvalid):
        build_default(store, name="other", packages=("python3; rm -rf /",))


def test_unreachable_mirror_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    why = _why_no_build()
    require(why is None, why or "")
    store = ImageStore(root=tmp_path / "images")
    with pytest.raises(ImageError) as err:
        build_default(store, mirrors=["deb http://127.0.0.1:9/debian bookworm main"])
    assert "mmdebstrap failed" in err.value.message
    assert "127.0.0.1:9" in err.value.message
    assert not list((store.root / "tmp").iterdir())
    assert not store.blobs.digests()
    assert not (store.root / "refs.json").exists()


# ---------------------------------------------------------------------- a real build


@dataclass
class Built:
    store: ImageStore
    image: StoredImage
    lines: list[str]
    seconds: float


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    why = _why_no_build() or _why_no_mirror()
    require(why is None, why or "")
    store = ImageStore(root=tmp_path_factory.mktemp("debian") / "images")
    lines: list[str] = []
    t0 = time.monotonic()
    image = build_default(store, progress=lines.append)
    return Built(store, image, lines, time.monotonic() - t0)


def _debugfs(fs: Path, request: str) -> str:
    res = subprocess.run(["debugfs", "-R", request, str(fs)], capture_output=True,
                         text=True, check=True)
    return res.stdout


def test_build_names_the_image_and_builds_its_rootfs(built: Built) -> None:
    img = built.image
    refs = json.loads((built.store.root / "refs.json").read_text())
    assert refs["debian"]["source"] == "mmdebstrap:bookworm"
    assert refs["debian"]["manifest"] == img.manifest_digest
    assert img.rootfs.is_file() and img.rootfs_bytes > 0 and img.build_id
    assert len(img.layers) == 1 and img.layers[0].media_type.endswith(".tar")
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        in img.config.env
    assert "LANG=C.UTF-8" in img.config.env
    assert img.config.cmd == ("/bin/bash",) and img.config.working_dir == "/root"
    cfg = json.loads(built.store.blobs.path(
        built.store.imported(img.manifest_digest).config_digest).read_bytes())
    labels = cfg["config"]["Labels"]
    assert float(labels["org.sandvm.mmdebstrap.build-seconds"]) > 0
    assert labels["org.sandvm.mmdebstrap.packages"] == "ca-certificates python3 python3-pip"
    assert not list((built.store.root / "tmp").iterdir())
    # pip ran in the finished tree during the build (the customize hook)
    assert any(line.startswith("pip ") and "python 3" in line for line in built.lines)


def test_tree_has_python_and_pip_and_no_apt_lists(built: Built) -> None:
    fs = built.image.rootfs
    assert "Type: regular" in _debugfs(fs, "stat /usr/bin/python3.11")
    assert "python3.11" in _debugfs(fs, "stat /usr/bin/python3")   # the symlink
    assert "Type: regular" in _debugfs(fs, "stat /usr/lib/python3/dist-packages/pip/__main__.py")
    assert "pip3" in _debugfs(fs, "ls /usr/bin")
    lists = _debugfs(fs, "ls /var/lib/apt/lists").split()
    assert not [x for x in lists if x.endswith(("Packages", "InRelease", ".lz4", ".gz"))]
    assert not [x for x in _debugfs(fs, "ls /var/cache/apt/archives").split()
                if x.endswith(".deb")]
    assert _debugfs(fs, "cat /etc/hostname").strip() == "sandvm"
    assert _debugfs(fs, "cat /etc/resolv.conf").strip() == ""


def test_second_call_is_a_cache_hit(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*_args: object, **_kw: object) -> None:
        raise AssertionError("mmdebstrap ran again")

    monkeypatch.setattr(debian, "_run_mmdebstrap", no_build)
    t0 = time.monotonic()
    again = build_default(built.store)
    assert time.monotonic() - t0 < 5
    assert again.build_id == built.image.build_id
    assert again.manifest_digest == built.image.manifest_digest
    # other packages or another suite are not the cached image
    for kwargs in ({"packages": ("python3",)}, {"suite": "trixie"}):
        with pytest.raises(AssertionError, match="ran again"):
            build_default(built.store, **kwargs)
    assert not list((built.store.root / "tmp").iterdir())


@pytest.mark.qemu
def test_debian_boots_as_the_default_with_pip(built: Built,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sandvm import Sandbox

    monkeypatch.setenv("SANDVM_IMAGE_STORE", str(built.store.root))
    monkeypatch.delenv("SANDVM_DEFAULT_IMAGE", raising=False)
    sb = Sandbox.create()  # no image named: `debian`, now that it is built
    try:
        assert sb.info["image"] == "debian"
        r = sb.commands.run("cat /etc/debian_version; python3 -m pip --version; pwd")
        version, pip, cwd = r.stdout.splitlines()
        assert version.startswith("12.") and pip.startswith("pip ") and cwd == "/root"
    finally:
        sb.kill()
