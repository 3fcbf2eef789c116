"""A managing process that never stops: random operations on managed sandboxes.

``python tests/runtime_chaos.py SEED`` creates, attaches to, uses, detaches,
reclaims, extends and kills managed sandboxes (at most MAX_LIVE at once) in a random
order until it is killed. test_runtime_manager.py SIGKILLs it at random moments and
then checks that a fresh manager finds everything it left: every sandbox either
still runs and can be taken over, or is ended with nothing left on the host.
Each operation is announced on stdout (``op NAME ID``) before it starts.
"""

from __future__ import annotations

import asyncio
import random
import sys

from sandvm.errors import SandvmError
from sandvm.runtime.manager import SandboxManager

MAX_LIVE = 3


def say(*words: object) -> None:
    print(*words, flush=True)


async def main(seed: int) -> None:
    rng = random.Random(seed)
    m = SandboxManager()
    tickets: list[str] = []
    say("ready")
    while True:
        live = [r.id for r in m.journal.sandboxes() if r.state == "running"]
        choices = ["gc"]
        if live:
            choices += ["use", "use", "use", "kill", "ttl"]
        if tickets:
            choices += ["reclaim", "reclaim"]
        if len(m.journal.sandboxes()) < MAX_LIVE:
            choices += ["create"] * (1 if live else 4)
        op = rng.choice(choices)
        sid = rng.choice(live) if live else "-"
        say("op", op, sid)
        try:
            if op == "create":
                sb = await m.create(ttl=600)
                await sb.commands.run(f"echo {sb.sandbox_id} > /root/me")
                tickets.append(await m.detach(sb))
            elif op == "use":
                sb = await m.attach(sid, wait=5.0)
                await sb.commands.run("cat /root/me; echo x >> /root/log")
                await sb.files.write("/root/blob", rng.randbytes(rng.randrange(1, 3_000_000)))
                await sb.commands.run("seq 1 20000")
                tickets.append(await m.detach(sb))
            elif op == "kill":
                await m.kill(sid)
            elif op == "ttl":
                m.set_ttl(sid, rng.uniform(300, 900))
            elif op == "reclaim":
                reclaimed = await m.reclaim(tickets.pop(rng.randrange(len(tickets))))
                if reclaimed is not None:
                    await reclaimed.commands.run("true")
                    tickets.append(await m.detach(reclaimed))
            else:
                m.gc()
        except SandvmError as exc:  # e.g. a ticket of a sandbox killed meanwhile
            say("error", op, exc.code)
        say("done", op)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
