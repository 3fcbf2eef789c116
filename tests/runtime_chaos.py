"""A managing process that never stops: random operations on managed sandboxes.

``python tests/runtime_chaos.py SEED [TARGET]`` creates (cold, or restored from the
snapshot named by ``$SANDVM_CHAOS_BASE``), attaches to, uses, detaches, reclaims,
extends, snapshots, forks, takes from a pool and kills managed sandboxes (at most
MAX_LIVE at once) in a random order until it is killed; with TARGET it does that
operation whenever it can (and only what TARGET needs otherwise), so that a kill
aimed at it lands soon. test_runtime_manager.py SIGKILLs it at random moments and
then checks that a fresh manager finds everything it left: every sandbox either
still runs and can be taken over, or is ended with nothing left on the host.

Each step is announced on stdout before it starts (``op NAME ID``) and after it
ended (``done NAME``); ``use`` is announced as its steps ``attach``, ``use`` and
``detach``. Reclaim tickets go to ``$SANDVM_CHAOS_TICKETS`` (one a line), so the next
process can reclaim what this one detached.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from sandvm.errors import SandvmError
from sandvm.pools import AsyncPool
from sandvm.runtime.manager import SandboxManager
from sandvm.sandbox import AsyncSandbox
from sandvm.snapshots import SnapshotStore

T = TypeVar("T")
MAX_LIVE = 3
TARGETS = ("create", "restore", "attach", "use", "detach", "reclaim", "kill", "ttl",
           "snapshot", "fork", "pool", "gc")


def say(*words: object) -> None:
    print(*words, flush=True)


class Chaos:
    def __init__(self, seed: int, target: str | None) -> None:
        self.rng = random.Random(seed)
        self.target = target
        self.m = SandboxManager()
        self.store = SnapshotStore()
        self.base = os.environ.get("SANDVM_CHAOS_BASE")
        tickets = os.environ.get("SANDVM_CHAOS_TICKETS")
        self.ticket_file = Path(tickets) if tickets else None

    # -- tickets outlive this process -----------------------------------------------

    def tickets(self) -> list[str]:
        if self.ticket_file is None or not self.ticket_file.exists():
            return []
        return [t for t in self.ticket_file.read_text().split() if t]

    def keep_ticket(self, ticket: str) -> None:
        if self.ticket_file is not None:
            with self.ticket_file.open("a") as f:
                f.write(ticket + "\n")

    def take_ticket(self) -> str:
        tickets = self.tickets()  # the newest ones: a detach makes the older ones void
        ticket = tickets.pop(self.rng.randrange(max(0, len(tickets) - MAX_LIVE), len(tickets)))
        assert self.ticket_file is not None
        self.ticket_file.write_text("".join(t + "\n" for t in tickets))
        return ticket

    # -- steps ----------------------------------------------------------------------

    async def step(self, name: str, sid: str, aw: Awaitable[T]) -> T:
        say("op", name, sid)
        t0 = time.monotonic()
        result = await aw
        say("done", name, f"{time.monotonic() - t0:.4f}")
        return result

    def sync_step(self, name: str, sid: str, fn: Callable[[], object]) -> None:
        say("op", name, sid)
        t0 = time.monotonic()
        fn()
        say("done", name, f"{time.monotonic() - t0:.4f}")

    async def mark(self, sb: AsyncSandbox) -> None:
        await sb.commands.run(f"echo {sb.sandbox_id} > /root/me")

    async def let_go(self, sb: AsyncSandbox) -> None:
        self.keep_ticket(await self.step("detach", sb.sandbox_id, self.m.detach(sb)))

    async def attach(self, sid: str) -> AsyncSandbox:
        return await self.step("attach", sid, self.m.attach(sid, wait=5.0))

    async def run(self, op: str, sid: str) -> None:
        m, rng = self.m, self.rng
        if op == "create":
            sb = await self.step("create", "-", m.create(ttl=600))
            await self.mark(sb)
            await self.let_go(sb)
        elif op == "restore":
            assert self.base is not None
            sb = await self.step("restore", "-", m.from_snapshot(self.base, ttl=600))
            await self.mark(sb)
            await self.let_go(sb)
        elif op in ("use", "attach", "detach"):
            sb = await self.attach(sid)
            await self.step("use", sid, self.use(sb))
            await self.let_go(sb)
        elif op == "kill":
            await self.step("kill", sid, m.kill(sid))
        elif op == "ttl":
            self.sync_step("ttl", sid, lambda: m.set_ttl(sid, rng.uniform(300, 900)))
        elif op == "reclaim":
            ticket = self.take_ticket()
            sb = await self.step("reclaim", "-", m.reclaim(ticket))
            if isinstance(sb, AsyncSandbox):
                await sb.commands.run("true")
                await self.let_go(sb)
        elif op == "snapshot":
            sb = await self.attach(sid)
            snap = await self.step("snapshot", sid, sb.snapshot(store=self.store))
            await self.let_go(sb)
            self.store.remove(snap.name)
        elif op == "fork":
            sb = await self.attach(sid)
            copies = await self.step("fork", sid, m.fork(sb, 1, ttl=600))
            await self.let_go(sb)
            for c in copies:
                await self.mark(c)
                await self.let_go(c)
        elif op == "pool":
            assert self.base is not None
            pool = AsyncPool(snapshot=self.base, min_size=1, max_size=2, idle_timeout=None,
                             restore=lambda snap: m.from_snapshot(snap, ttl=600))
            try:
                sb = await self.step("pool", "-", self.take(pool))
                await self.mark(sb)
                await self.let_go(sb)
            finally:
                await pool.close()
        else:
            self.sync_step("gc", "-", m.gc)

    async def use(self, sb: AsyncSandbox) -> None:
        await sb.commands.run("cat /root/me; echo x >> /root/log")
        await sb.files.write("/root/blob", self.rng.randbytes(self.rng.randrange(1, 3_000_000)))
        await sb.commands.run("seq 1 20000")

    @staticmethod
    async def take(pool: AsyncPool) -> AsyncSandbox:
        sb = await pool.acquire(timeout=120)
        pool.disown(sb)  # ours now; the pool's waiting one is killed with the pool
        return sb

    def choices(self, live: list[str], total: int) -> list[str]:
        ops = ["gc"]
        if live:
            ops += ["use", "use", "kill", "ttl", "snapshot"]
            if total < MAX_LIVE:
                ops += ["fork"]
        if self.tickets():
            ops += ["reclaim", "reclaim"]
        if total < MAX_LIVE:
            ops += ["create"]
            if self.base is not None:
                ops += ["restore", "restore", "pool", "pool"]
            if not live:
                ops += ["restore" if self.base else "create"] * 4
        return ops

    async def main(self) -> None:
        say("ready")
        while True:
            records = self.m.journal.sandboxes()
            live = [r.id for r in records if r.state == "running"]
            ops = self.choices(live, len(records))
            if len(records) > MAX_LIVE and live:  # e.g. a pool's, left by a killed process
                op = "kill"
            elif self.target in ops or (self.target in ("attach", "detach") and "use" in ops):
                op = self.target if self.rng.random() < 0.8 else self.rng.choice(ops)
            elif self.target in ("use", "attach", "detach", "kill", "ttl", "snapshot"):
                op = "restore" if "restore" in ops else self.rng.choice(ops)  # make one
            elif self.target == "fork" and live:
                op = "kill"  # make room for the copy
            elif self.target == "reclaim" and live:
                op = "use"  # leaves a ticket
            else:
                op = self.rng.choice(ops)
            sid = self.rng.choice(live) if live else "-"
            try:
                await self.run(op, sid)
            except SandvmError as exc:  # e.g. a ticket of a sandbox killed meanwhile
                say("error", op, exc.code)


if __name__ == "__main__":
    target = sys.argv[2] if len(sys.argv) > 2 else None
    if target is not None and target not in TARGETS:
        sys.exit(f"target must be one of {', '.join(TARGETS)}")
    asyncio.run(Chaos(int(sys.argv[1]), target).main())
