"""The blocking portal: one background event-loop thread that runs the async core.

The sync API (``Sandbox``) submits coroutines here and waits for their result,
so sync and async share one implementation, and the caller's own event loop
(if any) is never re-entered. (VMs still running at interpreter exit are
killed by the QEMU backend's own atexit hook, whichever loop they ran on.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _ensure_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="sandvm-portal", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


async def _await(aw: Awaitable[T]) -> T:
    return await aw


def call(aw: Awaitable[T], *, timeout: float | None = None) -> T:
    """Run ``aw`` on the portal loop and return its result (its exception re-raised)."""
    loop = _ensure_loop()
    coro: Coroutine[Any, Any, T] = aw if asyncio.iscoroutine(aw) else _await(aw)
    if _in_portal():
        coro.close()
        raise RuntimeError("sandvm's sync API cannot be called from its own callbacks;"
                           " use AsyncSandbox there")
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result(timeout)
    except KeyboardInterrupt:
        fut.cancel()
        raise
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise


def _in_portal() -> bool:
    return _thread is not None and threading.current_thread() is _thread
