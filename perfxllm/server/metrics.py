"""Prometheus metrics, in the text exposition format, written by hand (a few counters and histograms do not
need a client library).

Per-request numbers (tokens, latencies, finish reasons) are recorded on the event loop as outputs arrive;
the engine's own state (queue, running sequences, KV cache, prefix cache, preemptions) comes from the
snapshot the engine sends after every step.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    prefix_cache_queries: int = 0  # full prompt blocks looked up
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return [*lines, f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


class Metrics:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels  # model, device, dtype, quant: exported once as perfxllm_info
        self.finished: Counter[str] = Counter()  # engine requests by finish reason
        self.rejected: Counter[int] = Counter()  # HTTP requests answered with an error, by status
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(
            "perfxllm_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
        )
        self.tpot = Histogram(
            "perfxllm_time_per_output_token_seconds",
            "Mean time between output tokens of a request, after the first.",
            (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5),
        )
        self.e2e = Histogram(
            "perfxllm_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
        )

    def render(self, stats: EngineStats) -> str:
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        info = ",".join(f'{k}="{_escape(v)}"' for k, v in self.labels.items())
        lines = [
            *_metric("perfxllm_info", "gauge", "The served model and how it runs.", [(info, 1)]),
            *_metric(
                "perfxllm_requests_total",
                "counter",
                "Finished engine requests (a choice of an API request) by finish reason.",
                [(f'finish_reason="{r}"', n) for r, n in sorted(self.finished.items())],
            ),
            *_metric(
                "perfxllm_http_errors_total",
                "counter",
                "API requests answered with an error, by HTTP status.",
                [(f'status="{s}"', n) for s, n in sorted(self.rejected.items())],
            ),
            *_metric(
                "perfxllm_prompt_tokens_total",
                "counter",
                "Prompt tokens received.",
                [("", self.prompt_tokens)],
            ),
            *_metric(
                "perfxllm_generation_tokens_total",
                "counter",
                "Tokens generated.",
                [("", self.generation_tokens)],
            ),
            *self.ttft.render(),
            *self.tpot.render(),
            *self.e2e.render(),
            *_metric("perfxllm_num_requests_waiting", "gauge", "Requests queued.", [("", stats.num_waiting)]),
            *_metric(
                "perfxllm_num_requests_running", "gauge", "Requests running.", [("", stats.num_running)]
            ),
            *_metric(
                "perfxllm_kv_cache_usage_ratio",
                "gauge",
                "Fraction of KV cache blocks in use (0 to 1).",
                [("", stats.kv_cache_usage)],
            ),
            *_metric(
                "perfxllm_prefix_cache_queries_total",
                "counter",
                "Full prompt blocks looked up in the prefix cache.",
                [("", stats.prefix_cache_queries)],
            ),
            *_metric(
                "perfxllm_prefix_cache_hits_total",
                "counter",
                "Full prompt blocks found in the prefix cache.",
                [("", stats.prefix_cache_hits)],
            ),
            *_metric(
                "perfxllm_prefix_cache_hit_rate",
                "gauge",
                "Prefix cache hits / queries so far.",
                [("", hit_rate)],
            ),
            *_metric(
                "perfxllm_num_preemptions_total",
                "counter",
                "Running requests preempted for lack of KV blocks.",
                [("", stats.num_preemptions)],
            ),
        ]
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    """`name_total` for counters, as the exposition format wants: the name above is the full sample name."""
    family = name.removesuffix("_total") if kind == "counter" else name
    return [
        f"# HELP {family} {help_text}",
        f"# TYPE {family} {kind}",
        *(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples),
    ]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
