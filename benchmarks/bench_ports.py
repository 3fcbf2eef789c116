"""Port exposure (issue 6): throughput through an exposed port (target >= 30 MB/s under
TCG), connection setup p50/p99 (target p50 <= 5 ms), 50 concurrent tunneled connections.

A small Python server runs in the guest: an echo port (one selector loop), a sink that
reports what it received, and a source that sends what is asked. The host side talks to
the exposed ports with plain sockets, as any client would.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import threading
import time

from _util import emit, summary

from sandvm import Sandbox

SETUP_N = 200
BULK = 64 << 20
ROUNDS = 3
CONCURRENT = 50
PER_CONN = 256 << 10

SERVER = r'''
import selectors, socket, sys, threading

def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(256)
    return s

def sink(c):
    buf, n = bytearray(1 << 18), 0
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        n += k
    c.sendall(str(n).encode())
    c.close()

def source(c):
    line = b""
    while not line.endswith(b"\n"):
        line += c.recv(64)
    left, block = int(line), memoryview(bytes(range(256)) * 4096)
    while left:
        k = c.send(block[:left])
        left -= k
    c.close()

def serve(srv, fn):
    while True:
        c, _ = srv.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()

threading.Thread(target=serve, args=(listen(18002), sink), daemon=True).start()
threading.Thread(target=serve, args=(listen(18003), source), daemon=True).start()
sel = selectors.DefaultSelector()
echo = listen(18001)
echo.setblocking(False)
sel.register(echo, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is echo:
            c, _ = echo.accept()
            c.setblocking(True)
            sel.register(c, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(1 << 17)
        except OSError:
            data = b""
        if data:
            s.sendall(data)
        else:
            sel.unregister(s)
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            s.close()
'''


# the floor under the tunnel: the same connect + 1-byte echo by a client inside the guest
IN_GUEST = r'''
import json, socket, time
out = []
for _ in range(200):
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", 18001)) as s:
        s.sendall(b"x")
        s.recv(1)
        out.append(time.perf_counter() - t0)
    time.sleep(0.01)
print(json.dumps(out))
'''


def recv_all(s: socket.socket) -> bytes:
    parts = []
    while chunk := s.recv(1 << 18):
        parts.append(chunk)
    return b"".join(parts)


def setup_times(port: int, gap: float) -> list[float]:
    """connect + 1-byte echo; ``gap`` seconds between connections (0: back to back, so
    each one also overlaps the previous one's teardown in the guest)."""
    out = []
    for _ in range(SETUP_N):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            out.append(time.perf_counter() - t0)
        time.sleep(gap)
    return out


def download(port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"%d\n" % BULK)
        n = 0
        while chunk := s.recv(1 << 20):
            n += len(chunk)
    assert n == BULK, n
    return BULK / (time.perf_counter() - t0) / 1e6


def upload(port: int) -> float:
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(BULK >> 20):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)
    assert int(got) == BULK, got
    return BULK / (time.perf_counter() - t0) / 1e6


def concurrent(port: int) -> dict[str, float]:
    ok = []
    lock = threading.Lock()

    def one(i: int) -> None:
        data = hashlib.sha256(b"%d" % i).digest() * (PER_CONN // 32)
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            if recv_all(s) == data:
                with lock:
                    ok.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"connections": CONCURRENT, "succeeded": len(ok), "bytes_each_way": PER_CONN,
            "total_s": round(wall, 3)}


with Sandbox.create() as sb:
    sb.files.write("/tmp/bench_srv.py", SERVER)
    handle = sb.commands.run(["python3", "/tmp/bench_srv.py"], background=True, timeout=None)
    for p in (18001, 18002, 18003):
        sb.ports.wait(p, timeout=60)
    echo, sink, source = (sb.ports.expose(p) for p in (18001, 18002, 18003))
    setup_times(echo.port, 0)  # warm up (TCG translates the paths once)
    setup = setup_times(echo.port, 0.01)
    setup_b2b = setup_times(echo.port, 0)
    api = []
    for _ in range(SETUP_N // 2):
        t0 = time.perf_counter()
        s = sb.ports.connect(18001)
        api.append(time.perf_counter() - t0)
        s.close()
        time.sleep(0.01)
    pings = [sb.ping() for _ in range(100)]
    in_guest = json.loads(sb.commands.run(["python3", "-c", IN_GUEST]).stdout)
    down = [download(source.port) for _ in range(ROUNDS)]
    up = [upload(sink.port) for _ in range(ROUNDS)]
    conc = concurrent(echo.port)
    accel = sb.info["accelerator"]
    handle.kill()

emit({"benchmark": "ports", "accelerator": accel,
      "connection_setup_ms": summary(setup),
      "connection_setup_back_to_back_ms": summary(setup_b2b),
      "connection_setup_note": "host connect + tunnel + guest connect + 1-byte echo"
                               " by a Python server in the guest",
      "in_guest_connect_echo_ms": summary(in_guest),
      "ports_connect_ms": summary(api),
      "agent_ping_ms": summary(pings),
      "download_MBps": {"best": round(max(down), 1), "median": round(statistics.median(down), 1),
                        "bytes": BULK},
      "upload_MBps": {"best": round(max(up), 1), "median": round(statistics.median(up), 1),
                      "bytes": BULK},
      "concurrent": conc,
      "targets": {"throughput_MBps": 30, "setup_p50_ms": 5}})
