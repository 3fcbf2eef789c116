"""Host file descriptors under guests that open many idle egress connections (issue 14).

Two hostile sandboxes (A, B) each open CONNS connections to their in-guest egress proxy
(CONNECT to an allowed loopback server that accepts and then stays silent) and hold
every one that is answered 200; a third, quiet sandbox (C) then makes one request. The
host process is the one measured: its open descriptors (``/proc/self/fd``) before and
while the connections are held, the descriptors the budget (``sandvm.fds``) accounts,
whether C's request still works and whether the process can still open a socket.

Scenarios, each in its own process:
- ``before_1024``: sandvm as it was before the budget (commit BEFORE, exported with
  ``git archive``), soft and hard RLIMIT_NOFILE 1024 (a common default);
- ``after_1024``: this tree, same limits (nothing to raise: the budget must hold);
- ``after_raised``: this tree, the machine's limits (the CLI and every sandbox raise
  the soft limit to the hard one).
Loopback only: the held server is a subprocess on 127.0.0.1, names pinned with hosts=.
Run: ``.venv/bin/python benchmarks/bench_fds.py [--conns 1000] [--only after_1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _util import emit

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "49631ba"  # main before issue 14's descriptor budget
FLOOD_DEADLINE = 240.0  # seconds the guests get to open their connections

HOLD = r'''
import socket, sys, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4096)
print(s.getsockname()[1], flush=True)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
'''

# in the guest: CONNECT through the proxy in batches; keep the answered ones open
FLOOD = r'''
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, counts = [], {}
for start in range(0, n, 50):
    batch = []
    for _ in range(min(50, n - start)):
        try:
            s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
            s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
            batch.append(s)
        except OSError as e:
            k = "connect " + type(e).__name__
            counts[k] = counts.get(k, 0) + 1
    for s in batch:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            key = " ".join(data.split(b"\r\n", 1)[0].decode(errors="replace").split()[1:2])
            key = key or "closed without an answer"
        except OSError as e:
            key = type(e).__name__
        counts[key] = counts.get(key, 0) + 1
        if key == "200":
            held.append(s)
        else:
            s.close()
print(json.dumps(counts), flush=True)
time.sleep(3600)
'''

ONE = r'''
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer")
except OSError as e:
    print(type(e).__name__, e)
'''


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def child(conns: int, nofile: int | None) -> dict[str, Any]:
    """One scenario, in this process (the host process measured)."""
    hold = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
    assert hold.stdout is not None
    port = int(hold.stdout.readline())
    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    from sandvm import NetworkPolicy, Sandbox
    from sandvm.errors import SandvmError

    out: dict[str, Any] = {}
    policy = NetworkPolicy(allow=["hold.test"], hosts={"hold.test": "127.0.0.1"},
                           ports=[port], allow_ips=["127.0.0.1/32"], max_connections=2000)
    boxes: list[Any] = []
    try:
        for _ in range(3):
            sb = Sandbox.create(network=policy)
            sb.files.write("/tmp/flood.py", FLOOD)
            sb.files.write("/tmp/one.py", ONE)
            boxes.append(sb)
        a, b, c = boxes
        out["nofile_soft"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        out["fds_idle"] = open_fds()
        t0 = time.monotonic()
        peak = [open_fds()]
        stop = threading.Event()

        def sample() -> None:  # the host's open descriptors while the guests flood
            while not stop.wait(0.1):
                peak[0] = max(peak[0], open_fds())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        floods = [x.commands.run(["python3", "/tmp/flood.py", "hold.test", str(port),
                                  str(conns)], background=True) for x in (a, b)]
        deadline = time.monotonic() + FLOOD_DEADLINE
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

        def quiet_request() -> str:  # tenant C's one request
            try:
                r = c.commands.run(["python3", "/tmp/one.py", "hold.test", str(port)],
                                   timeout=120)
                return str(r.stdout.strip())
            except (SandvmError, OSError) as exc:  # the "before" run may fail here
                return f"{type(exc).__name__}: {exc}"[:300]

        while not all(h.stdout.strip() for h in floods) and time.monotonic() < deadline:
            if "quiet_request_at_the_limit" not in out and open_fds() >= 0.95 * soft:
                out["fds_when_quiet_request"] = open_fds()  # the process is at its limit
                out["quiet_request_at_the_limit"] = quiet_request()
            time.sleep(0.5)
        out["flood_seconds"] = round(time.monotonic() - t0, 1)
        out["flood_finished"] = all(h.stdout.strip() for h in floods)
        out["guest_answers"] = {name: json.loads(h.stdout or "{}")
                                for name, h in zip("AB", floods, strict=True)}
        out["fds_held"] = open_fds()
        stop.set()
        sampler.join()
        out["fds_peak"] = peak[0]
        try:
            from sandvm.fds import BUDGET

            out["budget"] = {"limit": BUDGET.limit, "capacity": BUDGET.capacity,
                             "share": BUDGET.share, "held": BUDGET.held,
                             "held_A": BUDGET.held_by(a.sandbox_id),
                             "held_B": BUDGET.held_by(b.sandbox_id)}
        except ImportError:
            out["budget"] = None
        out["quiet_sandbox_request"] = quiet_request()
        try:
            socket.socket().close()
            out["host_can_open_a_socket"] = True
        except OSError as exc:
            out["host_can_open_a_socket"] = f"{exc}"
        for h in floods:
            try:
                h.kill()
            except (SandvmError, OSError) as exc:
                out.setdefault("kill_errors", []).append(f"{type(exc).__name__}")
    finally:
        for sb in boxes:
            try:
                sb.kill()
            except (SandvmError, OSError) as exc:
                out.setdefault("kill_errors", []).append(f"{type(exc).__name__}")
        hold.kill()
    return out


def run_scenario(name: str, conns: int, old_src: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if name.startswith("before"):
        assert old_src is not None
        env["PYTHONPATH"] = str(old_src)
    nofile = "1024" if name.endswith("1024") else "none"
    r = subprocess.run([sys.executable, __file__, "--child", nofile, "--conns", str(conns)],
                       capture_output=True, text=True, env=env, timeout=1800)
    try:
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"failed": r.returncode, "stderr": r.stderr[-1500:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--child", default=None)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    os.environ.setdefault("SANDVM_DEFAULT_IMAGE", "base")
    if args.child is not None:
        res = child(args.conns, None if args.child == "none" else int(args.child))
        sys.stdout.write(json.dumps(res) + "\n")
        return
    names = [args.only] if args.only else ["before_1024", "after_1024", "after_raised"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old_src = None
        if any(n.startswith("before") for n in names):
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "src"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            old_src = Path(tmp) / "src"
        for n in names:
            results[n] = run_scenario(n, args.conns, old_src)
    out: dict[str, Any] = {"conns_per_hostile_sandbox": args.conns, "scenarios": results}
    b, a = results.get("before_1024", {}), results.get("after_1024", {})
    if "fds_peak" in b and "fds_peak" in a:
        out["fds_peak_ratio_after_to_before"] = round(a["fds_peak"] / b["fds_peak"], 3)
    emit(out)


if __name__ == "__main__":
    main()
