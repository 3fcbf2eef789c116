"""The keeper of one detachable sandbox: QEMU's parent, so the VM outlives its creator.

Started by the creating process in a session of its own (``python -I -S keeper.py``,
stdlib only and small: it runs as long as the VM). It reads its job as JSON on stdin:
``{"argv", "rundir", "diskdir", "sandbox_id", "journal", "confine", "pass_fds",
"console_fd"}``, starts QEMU confined as ``confine`` says (providers/jail.py) with
the inherited fds ``pass_fds`` and PDEATHSIG (QEMU dies with its keeper), prints
``started <qemu pid> <keeper pid>`` and then (it forked away first, so it is not the
creator's child):

- keeps QEMU's console (``console_fd``) and stderr as bounded logs in the runtime dir;

- enforces the sandbox's TTL: the deadline is re-read from the journal every
  second (so it can be extended), and an expired VM is killed and recorded so;
- on SIGTERM kills QEMU;
- when QEMU is gone, for whatever reason, removes the VM's runtime and disk
  directories and records the end in the journal (the first reason recorded wins).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OWNER_FILE = "owner"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _load_journal() -> Any:
    return _load("sandvm_journal", Path(__file__).with_name("journal.py"))


def _load_jail() -> Any:
    return _load("sandvm_jail", Path(__file__).resolve().parent.parent / "providers" / "jail.py")


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[19]


def _child_setup(parent: int, jail: Any, plan: dict[str, Any]) -> None:
    try:
        jail.enter(plan)  # before PDEATHSIG: a uid change clears it
    except OSError as exc:
        os.write(2, f"sandvm: cannot confine QEMU: {exc}\n".encode())
        raise
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: QEMU dies with us
    if os.getppid() != parent:  # we died before the prctl: it would never fire
        os._exit(1)
    if os.environ.get("SANDVM_QEMU_THP", "") != "1":
        libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE, as for every sandvm QEMU


def main() -> int:
    reason: list[str] = []
    started: list[subprocess.Popen[bytes]] = []

    def on_term(*_: Any) -> None:  # installed first: a SIGTERM never finds us without it
        reason.append("killed")
        for proc in started:
            proc.kill()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the creator's Ctrl-C is not ours
    if os.fork() > 0:  # not the creator's child: reparented when the creator is gone
        os._exit(0)
    job = json.loads(sys.stdin.read())
    rundir, diskdir = Path(job["rundir"]), job.get("diskdir")
    sid = job["sandbox_id"]
    keeper_pid = os.getpid()
    me = f"{keeper_pid} {_start_time(keeper_pid)}\n"
    try:
        for d in (rundir, diskdir):
            if d:
                tmp = Path(d) / f".{OWNER_FILE}.{keeper_pid}"
                tmp.write_text(me)
                os.replace(tmp, Path(d) / OWNER_FILE)  # sweeps see us, not the creator
        jmod = _load_journal()
        journal = jmod.Journal(Path(job["journal"]))
        ended = jmod.JournalState.ENDED
        jail = _load_jail()
        plan = job.get("confine") or {"mode": "none"}
        pass_fds = tuple(int(fd) for fd in job.get("pass_fds", ()))
        err_r, err_w = os.pipe()
        try:
            qemu = subprocess.Popen(job["argv"], stdin=subprocess.DEVNULL, stdout=err_w,
                                    stderr=err_w, pass_fds=pass_fds,
                                    preexec_fn=lambda: _child_setup(keeper_pid, jail, plan))
        except BaseException:
            os.set_blocking(err_r, False)
            with contextlib.suppress(OSError):
                sys.stderr.write(os.read(err_r, 4096).decode(errors="replace"))
            raise
        finally:
            os.close(err_w)
            for fd in pass_fds:  # QEMU's now
                os.close(fd)
        started.append(qemu)
        jail.BoundedLog(rundir / "qemu.log", jail.STDERR_CAP).pump(err_r)
        if job.get("console_fd") is not None:
            jail.BoundedLog(rundir / "console.log", jail.CONSOLE_CAP).pump(int(job["console_fd"]))
        if reason:  # SIGTERM while it started
            qemu.kill()
        (rundir / "qemu.pid").write_text(f"{qemu.pid}\n")
        if reason or not journal.update(
                sid, unless_ended=True, keeper_pid=keeper_pid, keeper_start=me.split()[1],
                qemu_pid=qemu.pid, state=jmod.JournalState.RUNNING, rundir=str(rundir),
                diskdir=diskdir):
            raise SystemExit(1)  # killed, or ended (e.g. repaired) while we started
    except BaseException:
        for proc in started:
            proc.kill()
            proc.wait()
        for d in (rundir, diskdir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):  # a creator that died meanwhile reads nothing
        print(f"started {qemu.pid} {keeper_pid}", flush=True)
        sys.stdout.close()
    os.close(1)
    os.open(os.devnull, os.O_WRONLY)

    deadline: float | None = None  # the last one read: kept when the journal fails
    while True:
        try:
            code = qemu.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            pass
        try:
            rec = journal.get(sid)
        except Exception:  # noqa: BLE001 - a busy or damaged journal must not kill the VM
            rec = False
        if rec is None or (rec and rec.state == ended):
            reason.append(rec.end_reason if rec else "forgotten by the journal")
            qemu.kill()
            continue
        if rec:
            deadline = rec.deadline
        if deadline is not None and time.time() >= deadline:
            reason.append("expired: its TTL ran out")
            qemu.kill()
            qemu.wait()
            with contextlib.suppress(Exception):  # the end below records it if it can
                journal.result(journal.intent(sid, "expire", deadline=deadline), ok=True)
    for d in (rundir, diskdir):
        if d:
            shutil.rmtree(d, ignore_errors=True)
    try:
        journal.end(sid, reason[0] if reason else f"stopped (QEMU exited with status {code})")
    except Exception:  # noqa: BLE001 - nothing more to do; `sandvm gc` repairs the record
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
