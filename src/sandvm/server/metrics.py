"""Prometheus metrics in the text exposition format (version 0.0.4), no dependency.

Labels come only from fixed sets (route templates, methods, status codes, outcomes),
never from request input, so a client cannot grow the series without bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {self.doc}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(f"{s}\n" for s in self.samples())


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str) -> None:
        super().__init__(name, doc)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> Iterable[str]:
        for key, v in sorted(self._values.items()):
            yield f"{self.name}{_labels(key)} {_num(v)}"


class Gauge(_Metric):
    """A value read when scraped."""

    kind = "gauge"

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        super().__init__(name, doc)
        self._read = read

    def samples(self) -> Iterable[str]:
        yield f"{self.name} {_num(self._read())}"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS
                 ) -> None:
        super().__init__(name, doc)
        self.buckets = (*sorted(buckets), math.inf)
        self._data: dict[LabelKey, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts, total = self._data.setdefault(key, ([0] * len(self.buckets), [0.0]))
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
        total[0] += value

    def samples(self) -> Iterable[str]:
        for key, (counts, total) in sorted(self._data.items()):
            for b, c in zip(self.buckets, counts, strict=True):
                yield f"{self.name}_bucket{_labels(key, (('le', _num(b)),))} {c}"
            yield f"{self.name}_sum{_labels(key)} {_num(total[0])}"
            yield f"{self.name}_count{_labels(key)} {counts[-1]}"


class Metrics:
    """The server's metrics; ``render`` is the body of ``GET /metrics``."""

    def __init__(self, *, live_sandboxes: Callable[[], float],
                 exposed_ports: Callable[[], float] = lambda: 0.0) -> None:
        self.requests = Counter("sandvm_http_requests_total",
                                "HTTP requests by method, route template and status.")
        self.request_seconds = Histogram("sandvm_http_request_duration_seconds",
                                         "Time to the response's headers, by route template.")
        self.auth_failures = Counter("sandvm_auth_failures_total",
                                     "Requests refused for a missing or invalid API key.")
        self.quota_rejections = Counter("sandvm_quota_rejections_total",
                                        "Sandbox creations refused by a tenant's quota.")
        self.sandboxes_created = Counter("sandvm_sandboxes_created_total",
                                         "Sandboxes created, by outcome (ok, error).")
        self.create_seconds = Histogram("sandvm_sandbox_create_seconds",
                                        "Time to create a sandbox (boot included).")
        self.commands = Counter("sandvm_commands_total",
                                "Commands run, by outcome (exit, error).")
        self.command_seconds = Histogram("sandvm_command_duration_seconds",
                                         "Time from a command's request to its exit.")
        self.file_bytes = Counter("sandvm_file_bytes_total",
                                  "File bytes moved, by direction (upload, download).")
        self.live = Gauge("sandvm_sandboxes_live",
                          "Sandboxes this server owns that have not ended.", live_sandboxes)
        # rate limits and exposed ports
        self.rate_limited = Counter("sandvm_rate_limited_total",
                                    "Requests refused (429) by a tenant's rate limit.")
        self.ports_exposed = Counter("sandvm_ports_exposed_total",
                                     "Guest ports exposed on request (re-opened ones not"
                                     " counted again).")
        self.ports_open = Gauge("sandvm_ports_open",
                                "Guest ports exposed now (of sandboxes not ended).",
                                exposed_ports)
        self.rate_limited.inc(0)  # shown from the start, at 0
        self.ports_exposed.inc(0)

    def render(self) -> str:
        return "".join(m.render() for m in (
            self.requests, self.request_seconds, self.auth_failures, self.quota_rejections,
            self.sandboxes_created, self.create_seconds, self.commands, self.command_seconds,
            self.file_bytes, self.live, self.rate_limited, self.ports_exposed,
            self.ports_open))
