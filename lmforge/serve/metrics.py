"""Prometheus metrics of one server, in a registry of its own (two apps in one process never mix counts).

Latencies come from the engine's own per-request timings (`RequestMetrics`): TTFT is arrival → first
sampled token, TPOT the mean gap between later tokens. Gauges (queue length, running, KV blocks, prefix
hit rate) read the snapshot the engine thread publishes after each step, so a scrape never touches the
engine itself.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from ..infer.request import RequestOutput
from .async_engine import EngineSnapshot

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                    5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 0.75, 1.0, 2.5)


class ServerMetrics:
    """The server's Prometheus collectors; `observe_finished` is the engine's on_finished hook."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Request arrival to first generated token",
                              labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds", "Mean time per output token after the first",
                              labels, buckets=_TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("lmforge_e2e_request_latency_seconds", "Request arrival to its last token",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of finished requests",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Generated tokens of finished requests",
                                         labels, registry=r).labels(model_name)
        self.request_success = Counter("lmforge_request_success",
                                       "Finished sequences (each of a request's n samples) by finish reason",
                                       labels + ["finished_reason"], registry=r)
        self.http_errors = Counter("lmforge_http_errors", "Requests answered with an error status",
                                   labels + ["status"], registry=r)
        self.model_name = model_name
        self._snapshot = snapshot
        gauges = {
            "lmforge_num_requests_waiting": ("Sequences queued for the engine", lambda s: s.num_waiting),
            "lmforge_num_requests_running": ("Sequences in the running batch", lambda s: s.num_running),
            "lmforge_kv_blocks_used": ("KV-cache blocks held by sequences", lambda s: s.num_used_blocks),
            "lmforge_kv_blocks_total": ("KV-cache blocks in the pool", lambda s: s.num_blocks),
            "lmforge_kv_cache_usage_ratio": ("Share of KV blocks held by sequences",
                                             lambda s: s.num_used_blocks / s.num_blocks if s.num_blocks else 0.0),
            "lmforge_prefix_cache_hit_rate": ("Share of prompt tokens served from the prefix cache",
                                              lambda s: s.prefix_hit_rate),
            "lmforge_num_preemptions": ("Sequences preempted since start", lambda s: s.num_preemptions),
        }
        for name, (doc, read) in gauges.items():
            gauge = Gauge(name, doc, labels, registry=r).labels(model_name)
            gauge.set_function(lambda read=read: float(read(self._snapshot())))

    def observe_finished(self, output: RequestOutput) -> None:
        """Record one finished (or aborted) request; runs in the engine thread."""
        m = output.metrics
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
        if m.last_token_time is not None:
            self.e2e.observe(m.last_token_time - m.arrival_time)
        for completion in output.outputs:
            self.request_success.labels(self.model_name, completion.finish_reason or "abort").inc()

    def observe_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
