"""VmSpec/DiskSpec/ImageRecord persist through to_dict/from_dict, and from_dict treats
its input as untrusted (a journal's or a snapshot manifest's)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandvm.core import ROOT_DISK, DiskSpec, ImageRecord, VmSpec
from sandvm.errors import InvalidSpec, UnknownImage

DISK = DiskSpec(serial=ROOT_DISK, path="/images/a.ext4", overlay_size=1 << 30)
IMAGE = ImageRecord(name="app", manifest_digest="sha256:" + "a" * 64, build_id="b1",
                    rootfs="/images/a.ext4", disk_size=1 << 30, env=("A=1",),
                    working_dir="/srv", user="app", entrypoint=("/bin/app",), cmd=("run",))


def test_spec_round_trips_through_json() -> None:
    spec = VmSpec(image="app", memory_mib=512, vcpus=2, kernel_args=("quiet",),
                  disks=(DISK, DiskSpec(serial="vol-0", path="/v/d", read_only=True)))
    assert VmSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert VmSpec.from_dict({}) == VmSpec()  # a record from before the fields existed
    assert VmSpec.from_dict({"image": "base", "memory_mib": 256, "vcpus": 1}) == VmSpec()


def test_image_record_round_trips_in_the_persisted_layout() -> None:
    d = IMAGE.to_dict()
    assert d["config"] == {"env": ["A=1"], "working_dir": "/srv", "user": "app",
                           "entrypoint": ["/bin/app"], "cmd": ["run"]}
    assert ImageRecord.from_dict(json.loads(json.dumps(d))) == IMAGE
    # an old record without digests or config still reads
    old = ImageRecord.from_dict({"name": "app", "rootfs": "/r", "disk_size": 4096})
    assert old.env == () and old.user == ""


@pytest.mark.parametrize("bad", [
    None, [], "spec", {"memory_mib": "lots"}, {"vcpus": 99}, {"disks": "root"},
    {"disks": [{"serial": "root"}]}, {"disks": [{"serial": "root", "path": "rel"}]},
    {"disks": [{"serial": "x", "path": "/a", "read_only": "yes"}]},
    {"kernel_args": ["two words"]}, {"kernel_args": "quiet"}, {"surprise": 1},
])
def test_bad_spec_data_is_invalid_spec(bad: Any) -> None:
    with pytest.raises(InvalidSpec):
        VmSpec.from_dict(bad)


def test_unknown_image_without_root_disk() -> None:
    with pytest.raises(UnknownImage):
        VmSpec.from_dict({"image": "nope"})


@pytest.mark.parametrize("bad", [
    None, {"name": "a", "rootfs": "/r"}, {"name": "a", "rootfs": "/r", "disk_size": -1},
    {"name": "a", "rootfs": "/r", "disk_size": True},
    {"name": "a", "rootfs": 5, "disk_size": 1},
    {"name": "a", "rootfs": "/r", "disk_size": 1, "config": {"env": "A=1"}},
    {"name": "a", "rootfs": "/r", "disk_size": 1, "config": {"user": 0}},
    {"name": "a", "rootfs": "/r", "disk_size": 1, "config": {"env": [1]}},
    {"name": "a", "rootfs": "/r", "disk_size": 1, "extra": 1},
])
def test_bad_image_data_is_invalid_spec(bad: Any) -> None:
    with pytest.raises(InvalidSpec):
        ImageRecord.from_dict(bad)
