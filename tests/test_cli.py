"""The `sandvm` command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require

SANDVM = str(Path(sys.executable).parent / "sandvm")


def sandvm(*args: str, input: bytes | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SANDVM, *args], input=input, capture_output=True, timeout=timeout,
                          check=False)


def test_help_lists_commands() -> None:
    r = sandvm("--help")
    assert r.returncode == 0
    for cmd in (b"setup", b"doctor", b"run"):
        assert cmd in r.stdout


def test_run_usage_errors() -> None:
    r = sandvm("run", "--memory", "tiny", "--", "true")
    assert r.returncode == 2
    assert b"invalid memory size" in r.stderr
    r = sandvm("run", "-e", "NOEQUALS", "--", "true")
    assert r.returncode == 2 and b"KEY=VALUE" in r.stderr
    r = sandvm("run", "--image", "nope", "--", "true")
    assert r.returncode == 2 and b"unknown image" in r.stderr


@pytest.mark.qemu
def test_run_prints_guest_kernel_and_propagates_exit() -> None:
    r = sandvm("run", "--", "python3", "-c", "import platform; print(platform.release())")
    assert r.returncode == 0, r.stderr
    assert b"cloud-amd64" in r.stdout
    r = sandvm("run", "-e", "A=1", "-w", "/tmp", "--", "sh", "-c", 'echo $A $(pwd) >&2; exit 7')
    assert r.returncode == 7
    assert r.stderr.strip().endswith(b"1 /tmp")


@pytest.mark.qemu
def test_run_forwards_stdin_and_reports_missing_command() -> None:
    r = sandvm("run", "-i", "--", "tr", "a-z", "A-Z", input=b"shout\n")
    assert (r.returncode, r.stdout) == (0, b"SHOUT\n")
    r = sandvm("run", "--", "no-such-binary")
    assert r.returncode == 127 and b"command not found" in r.stderr


@pytest.mark.qemu
def test_run_ctrl_c_forwards_sigint_and_tears_down() -> None:
    from sandvm.providers.qemu import runtime_root

    before = set(os.listdir(runtime_root()))
    proc = subprocess.Popen([SANDVM, "run", "--", "sh", "-c",
                             "trap 'echo got-int; exit 3' INT; echo ready; "
                             "while true; do sleep 0.1; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"ready\n"
    # its VM's runtime dir: the one, new since we started, that this process owns
    def owner(d: str) -> str:
        try:
            return (runtime_root() / d / "owner").read_text().split()[0]
        except (OSError, IndexError):
            return ""

    mine = [d for d in set(os.listdir(runtime_root())) - before if owner(d) == str(proc.pid)]
    assert len(mine) == 1
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert b"got-int" in out
    assert proc.returncode == 130
    deadline = time.monotonic() + 5
    while (runtime_root() / mine[0]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (runtime_root() / mine[0]).exists()  # (other processes' VMs may come and go)


@pytest.mark.qemu
def test_doctor_json() -> None:
    r = sandvm("doctor", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["health"] in ("healthy", "degraded")
    assert rep["accelerator"] in ("kvm", "tcg")
    assert rep["health"] == ("healthy" if rep["accelerator"] == "kvm" else "degraded")
    assert rep["qemu"]["microvm"] is True and rep["qemu"]["version"].startswith("QEMU")
    assert rep["kernel"]["present"] and rep["initramfs"]["present"]
    assert rep["kvm"]["present"] == os.path.exists("/dev/kvm")
    assert rep["missing"] == []


def test_doctor_reports_missing_assets(tmp_path: Path) -> None:
    env = dict(os.environ, SANDVM_HOME=str(tmp_path / "empty"))
    r = subprocess.run([SANDVM, "doctor", "--json"], capture_output=True, env=env, check=False,
                       timeout=60)
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["health"] == "unsupported"
    whats = {m["what"] for m in rep["missing"]}
    assert {"guest kernel", "guest initramfs"} <= whats
    assert all("sandvm setup" in m["fix"] for m in rep["missing"] if m["what"].startswith("guest"))


def test_run_without_assets_says_what_to_do(tmp_path: Path) -> None:
    require(shutil.which("qemu-system-x86_64"),
            "needs QEMU (`make setup`, or apt-get install qemu-system-x86)")
    env = dict(os.environ, SANDVM_HOME=str(tmp_path / "empty"))
    r = subprocess.run([SANDVM, "run", "--", "true"], capture_output=True, env=env, check=False,
                       timeout=60)
    assert r.returncode == 1
    assert b"asset_missing" in r.stderr and b"sandvm setup" in r.stderr


@pytest.mark.qemu
def test_run_into_a_closed_pipe_is_quiet() -> None:
    p = subprocess.run(f"{SANDVM} run -- sh -c 'yes | head -c 50000000' | head -c 10",
                       shell=True, capture_output=True, timeout=120, check=False)
    assert p.stdout == b"y\ny\ny\ny\ny\n"
    assert b"Traceback" not in p.stderr


@pytest.mark.qemu
def test_snapshot_commands(tmp_path: Path) -> None:
    env = dict(os.environ, SANDVM_SNAPSHOT_DIR=str(tmp_path / "snaps"))

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([SANDVM, *args], capture_output=True, env=env, timeout=180,
                              check=False)

    r = cli("snapshot", "create", "with-file", "--", "sh", "-c", "echo hi > /root/f")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == b"with-file"
    assert b"VM paused" in r.stderr
    r = cli("snapshot", "create", "with-file", "--", "true")
    assert r.returncode == 1 and b"already exists" in r.stderr
    r = cli("snapshot", "create", "broken", "--", "sh", "-c", "exit 3")
    assert r.returncode == 3 and b"no snapshot taken" in r.stderr
    listed = json.loads(cli("snapshot", "ls", "--json").stdout)
    assert [s["name"] for s in listed] == ["with-file"]
    assert listed[0]["memory_mib"] == 256 and listed[0]["size_bytes"] > 0
    r = cli("run", "--from", "with-file", "--", "cat", "/root/f")
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr
    assert cli("snapshot", "verify", "with-file").stdout == b"with-file: ok\n"
    with open(tmp_path / "snaps" / "with-file" / "state", "r+b") as f:
        f.write(b"\0\0\0\0")
    r = cli("snapshot", "verify")
    assert r.returncode == 1 and b"snapshot_corrupt" in r.stdout
    r = cli("run", "--from", "with-file", "--", "true")
    assert r.returncode == 1 and b"snapshot_corrupt" in r.stderr
    assert cli("snapshot", "rm", "with-file").returncode == 0
    assert cli("snapshot", "rm", "with-file").returncode == 1
    assert b"no snapshots" in cli("snapshot", "ls").stdout
