"""Pure value types (sandvm.core) and the exception tree (sandvm.errors)."""

from __future__ import annotations

import dataclasses

import pytest

from sandvm import errors
from sandvm.core import (
    BUILTIN_IMAGES,
    DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    MIN_MEMORY_MIB,
    VmSpec,
    VmState,
    check_guest_path,
    new_id,
    parse_memory,
    validate_vm_id,
)
from sandvm.errors import (
    CommandExitError,
    InvalidPath,
    InvalidSpec,
    SandvmError,
    error_class_for_code,
)
from sandvm.sandbox import CommandResult

# ------------------------------------------------------------------ parse_memory


@pytest.mark.parametrize(("value", "mib"), [
    ("512", 512),
    (512, 512),
    ("1G", 1024),
    ("1GiB", 1024),
    ("1g", 1024),
    ("1GB", 1024),
    ("256M", 256),
    ("256MiB", 256),
    ("256mb", 256),
    (" 384 M ", 384),
    ("16G", MAX_MEMORY_MIB),
    (MIN_MEMORY_MIB, MIN_MEMORY_MIB),
    (MAX_MEMORY_MIB, MAX_MEMORY_MIB),
])
def test_parse_memory_accepts(value: str | int, mib: int) -> None:
    assert parse_memory(value) == mib


@pytest.mark.parametrize("value", [
    "abc", "", "1T", "-512", "1.5G", "G", "512 K", "0x200",
    5, 0, -1, MIN_MEMORY_MIB - 1, MAX_MEMORY_MIB + 1, 99999, "17G", "99999",
    True, False,
])
def test_parse_memory_rejects(value: str | int) -> None:
    with pytest.raises(InvalidSpec):
        parse_memory(value)


def test_parse_memory_error_messages_are_helpful() -> None:
    with pytest.raises(InvalidSpec, match="'abc'"):
        parse_memory("abc")
    with pytest.raises(InvalidSpec, match=f"between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"):
        parse_memory(99999)
    with pytest.raises(InvalidSpec, match="True"):
        parse_memory(True)


# ------------------------------------------------------------------ VmSpec


def test_vmspec_defaults() -> None:
    spec = VmSpec()
    assert spec.image == "base"
    assert spec.image in BUILTIN_IMAGES
    assert spec.memory_mib == DEFAULT_MEMORY_MIB
    assert spec.vcpus == DEFAULT_VCPUS
    assert spec.kernel_args == ()


def test_vmspec_is_frozen() -> None:
    spec = VmSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.vcpus = 4  # type: ignore[misc]


def test_vmspec_accepts_valid_values() -> None:
    spec = VmSpec(memory_mib=1024, vcpus=MAX_VCPUS, kernel_args=("quiet", "console=ttyS0"))
    assert (spec.memory_mib, spec.vcpus) == (1024, MAX_VCPUS)
    assert VmSpec(vcpus=1).vcpus == 1


@pytest.mark.parametrize("image", ["ubuntu", "", "Base", "base "])
def test_vmspec_unknown_image_names_builtins(image: str) -> None:
    with pytest.raises(InvalidSpec) as ei:
        VmSpec(image=image)
    msg = str(ei.value)
    assert repr(image) in msg
    for name in BUILTIN_IMAGES:
        assert name in msg
    assert "built-in images" in msg


@pytest.mark.parametrize("vcpus", [0, -1, MAX_VCPUS + 1, 17, True, False, 1.0, "2", None])
def test_vmspec_rejects_bad_vcpus(vcpus: object) -> None:
    with pytest.raises(InvalidSpec, match="vcpus"):
        VmSpec(vcpus=vcpus)  # type: ignore[arg-type]


@pytest.mark.parametrize("memory", [True, "512", 512.0, None, 64, MAX_MEMORY_MIB + 1])
def test_vmspec_rejects_bad_memory(memory: object) -> None:
    with pytest.raises(InvalidSpec):
        VmSpec(memory_mib=memory)  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [("",), ("a b",), ("ok", "tab\there"), ("new\nline",), (1,),
                                  (None,)])
def test_vmspec_rejects_bad_kernel_args(args: tuple[object, ...]) -> None:
    with pytest.raises(InvalidSpec, match="kernel argument"):
        VmSpec(kernel_args=args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ guest paths and ids


@pytest.mark.parametrize("path", ["/", "/tmp/x", "/a b/ü", "/" + "a" * 4095])
def test_check_guest_path_accepts(path: str) -> None:
    assert check_guest_path(path) == path


@pytest.mark.parametrize("path", ["relative/x", "x", "", "./x", "~/x"])
def test_check_guest_path_rejects_relative(path: str) -> None:
    with pytest.raises(InvalidPath, match="absolute"):
        check_guest_path(path)


def test_check_guest_path_rejects_non_string() -> None:
    with pytest.raises(InvalidPath):
        check_guest_path(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidPath):
        check_guest_path(b"/tmp")  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/a\x00b", "/\x00", "/tmp/x\x00"])
def test_check_guest_path_rejects_nul(path: str) -> None:
    with pytest.raises(InvalidPath, match="NUL"):
        check_guest_path(path)


def test_check_guest_path_rejects_overlong() -> None:
    with pytest.raises(InvalidPath, match="4096"):
        check_guest_path("/" + "a" * 4096)
    # the limit is in bytes, not characters
    with pytest.raises(InvalidPath, match="4096"):
        check_guest_path("/" + "ü" * 2048)


def test_invalid_path_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError):
        check_guest_path("nope")


@pytest.mark.parametrize("vm_id", ["a", "sb-3f9a1c2d7e", "A.b_c-9", "0", "x" * 63])
def test_validate_vm_id_accepts(vm_id: str) -> None:
    assert validate_vm_id(vm_id) == vm_id


@pytest.mark.parametrize("vm_id", [
    "", "-a", ".a", "_a", "a/b", "../x", "a b", "a\x00", "x" * 64, "ü", "a:b", None, 5,
    "\n", "a\nb",
    "a\n",
])
def test_validate_vm_id_rejects(vm_id: object) -> None:
    with pytest.raises(InvalidSpec, match="invalid id"):
        validate_vm_id(vm_id)  # type: ignore[arg-type]


def test_new_id_is_valid_and_random() -> None:
    ids = {new_id() for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert i.startswith("sb-")
        assert validate_vm_id(i) == i
    assert new_id("vm").startswith("vm-")


def test_vm_states() -> None:
    assert {s.value for s in VmState} == {"created", "running", "stopped", "destroyed"}


# ------------------------------------------------------------------ errors


def _walk(cls: type[SandvmError]) -> list[type[SandvmError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_walk(sub))
    return out


ALL_ERRORS = _walk(SandvmError)


def test_error_tree_covers_every_exported_error() -> None:
    exported = {getattr(errors, name) for name in errors.__all__
                if isinstance(getattr(errors, name), type)}
    assert exported == set(ALL_ERRORS)
    assert len(ALL_ERRORS) >= 30


def test_every_error_has_a_unique_code() -> None:
    codes = [cls.code for cls in ALL_ERRORS]
    dupes = {c for c in codes if codes.count(c) > 1}
    assert not dupes, f"duplicate error codes: {dupes}"
    for cls in ALL_ERRORS:
        # declared on the class itself, not inherited from the parent
        assert "code" in vars(cls), f"{cls.__name__} inherits its code"
        assert cls.code.isascii() and cls.code == cls.code.lower()
        assert " " not in cls.code and cls.code


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_error_class_for_code_maps_back(cls: type[SandvmError]) -> None:
    assert error_class_for_code(cls.code) is cls


@pytest.mark.parametrize("code", ["", "nope", "SANDVM_ERROR", "file_not_found ", "guest"])
def test_error_class_for_unknown_code(code: str) -> None:
    assert error_class_for_code(code) is SandvmError


def test_error_to_dict() -> None:
    e = errors.GuestFileNotFound("no such file: /x", guest_code="file_not_found")
    assert e.to_dict() == {"code": "file_not_found", "message": "no such file: /x"}
    assert e.details == {"guest_code": "file_not_found"}
    assert isinstance(e, errors.GuestError)
    assert isinstance(e, errors.AgentError)


def test_command_exit_error_carries_result() -> None:
    res = CommandResult(exit_code=3, stdout_bytes=b"", stderr_bytes=b"boom")
    err = CommandExitError(res)
    assert isinstance(err, errors.CommandError)
    assert err.code == "command_exit"
    assert err.result is res
    assert err.exit_code == 3
    assert err.stdout == ""
    assert err.stderr == "boom"
    msg = str(err)
    assert "3" in msg
    assert "exited with code 3" in msg
    assert "boom" in msg
    assert err.to_dict() == {"code": "command_exit", "message": msg}


def test_command_exit_error_by_signal() -> None:
    res = CommandResult(exit_code=137, stdout_bytes=b"out", stderr_bytes=b"", signal=9)
    err = CommandExitError(res)
    assert "signal 9" in str(err)
    assert err.exit_code == 137
    assert err.stdout == "out"


def test_command_exit_error_truncates_stderr() -> None:
    res = CommandResult(exit_code=1, stdout_bytes=b"", stderr_bytes=b"A" * 5000 + b"TAIL\n\n")
    msg = str(CommandExitError(res))
    assert msg.endswith("TAIL")
    assert len(msg) < 600


def test_errors_with_custom_constructors() -> None:
    assert str(errors.SetupError("kernel", "x")) == "setup step 'kernel' failed: x"
    assert errors.VmNotFound("v1").vm_id == "v1"
    assert "'v1'" in str(errors.VmAlreadyExists("v1"))
    e = errors.InvalidTransition(VmState.DESTROYED, VmState.RUNNING, vm_id="v1")
    assert "destroyed" in str(e) and "running" in str(e) and "'v1'" in str(e)
    s = errors.SnapshotAlreadyExists("v1", "snap")
    assert (s.vm_id, s.snapshot_id) == ("v1", "snap")
    t = errors.CommandTimeout("too slow")
    assert t.result is None
