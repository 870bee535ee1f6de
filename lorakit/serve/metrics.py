"""The server's numbers, for `GET /metrics` in Prometheus' text format (version 0.0.4): requests,
tokens, time to first token and time per output token by adapter, and the engine's gauges (queue
depth, rows in flight, loaded adapters, tokens/s over the last 10 s).

Written by the engine thread, read by the HTTP thread: every update and the rendering hold one lock.
"""

from __future__ import annotations

import collections
import threading
import time

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WINDOW_S = 10.0


class Histogram:
    """Counts per upper bound (cumulative when rendered), a sum and a count."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(BUCKETS) if value <= b), len(BUCKETS))] += 1
        self.sum += value
        self.n += 1


class Metrics:
    """Counters and histograms labelled by adapter (the base model is `adapter=""`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (adapter, outcome) -> n
        self.prompt_tokens: collections.Counter = collections.Counter()
        self.completion_tokens: collections.Counter = collections.Counter()
        self.ttft: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.tpot: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def first_token(self, adapter: str | None, seconds: float, prompt_tokens: int) -> None:
        with self.lock:
            self.ttft[adapter or ""].observe(seconds)
            self.prompt_tokens[adapter or ""] += prompt_tokens

    def step(self, tokens: int) -> None:
        """`tokens` were generated in one forward."""
        now = time.monotonic()
        with self.lock:
            self.recent.append((now, tokens))
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()

    def finished(self, adapter: str | None, outcome: str, tokens: int, decode_s: float) -> None:
        """A request ended (`outcome`: stop, length, cancelled, error) after `tokens` tokens."""
        with self.lock:
            self.requests[adapter or "", outcome] += 1
            self.completion_tokens[adapter or ""] += tokens
            if tokens > 1:
                self.tpot[adapter or ""].observe(decode_s / (tokens - 1))

    def tokens_per_second(self) -> float:
        with self.lock:
            now = time.monotonic()
            return sum(n for t, n in self.recent if t >= now - WINDOW_S) / WINDOW_S

    def render(self, gauges: dict[str, tuple[str, float | dict[str, float]]]) -> str:
        """The text exposition: `gauges` (name -> (help, value or {adapter: value})) and the
        counters and histograms."""
        out: list[str] = []
        gauges = {
            **gauges,
            "lorakit_tokens_per_second": ("output tokens/s, last 10 s", self.tokens_per_second()),
        }
        with self.lock:
            for name, (help_, value) in gauges.items():
                _head(out, name, help_, "gauge")
                if isinstance(value, dict):
                    out += [f'{name}{{adapter="{_label(a)}"}} {v:g}' for a, v in value.items()]
                else:
                    out.append(f"{name} {value:g}")
            _head(out, "lorakit_requests_total", "finished requests", "counter")
            for (adapter, outcome), n in sorted(self.requests.items()):
                out.append(f'lorakit_requests_total{{adapter="{_label(adapter)}",outcome="{outcome}"}} {n}')
            for name, counter in (
                ("lorakit_prompt_tokens_total", self.prompt_tokens),
                ("lorakit_completion_tokens_total", self.completion_tokens),
            ):
                _head(out, name, name[8:-6].replace("_", " "), "counter")
                out += [f'{name}{{adapter="{_label(a)}"}} {n}' for a, n in sorted(counter.items())]
            for name, help_, hists in (
                ("lorakit_time_to_first_token_seconds", "request arrival to first token", self.ttft),
                ("lorakit_time_per_output_token_seconds", "mean time between output tokens", self.tpot),
            ):
                _head(out, name, help_, "histogram")
                for adapter, h in sorted(hists.items()):
                    label, total = _label(adapter), 0
                    for bound, count in zip([*map(str, BUCKETS), "+Inf"], h.counts):
                        total += count
                        out.append(f'{name}_bucket{{adapter="{label}",le="{bound}"}} {total}')
                    out.append(f'{name}_sum{{adapter="{label}"}} {h.sum:g}')
                    out.append(f'{name}_count{{adapter="{label}"}} {h.n}')
        return "\n".join(out) + "\n"


def _head(out: list[str], name: str, help_: str, kind: str) -> None:
    out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


def _label(value: str | None) -> str:
    return (value or "").replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
