"""Prometheus metrics for /metrics (on with --enable-metrics).

Each server owns its CollectorRegistry (DESIGN.md invariant 6: no module-level state), so two servers in
one process, or a test that builds several apps, never collide on metric names.

Gauges that describe the engine (running and waiting requests, KV usage, cache hit rate) are read from
`Engine.get_server_info()` when scraped; counters and histograms are fed per request by the server as
chunks arrive. Names follow SGLang's (`sglang:num_running_reqs` -> `radixlm:num_running_reqs`).

Dashboards and autoscalers written for SGLang or vLLM key on their own names: `--metrics-prefix sglang`
(or `vllm`) also exports every metric that has a counterpart there under that name, alongside radixlm's
(`ALIASES` lists them; the values are the same series, renamed when scraped).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4, 0.8, 2, 5)


# radixlm's metric (without its prefix) -> the names another server gives the same quantity.
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "sglang": {
        "num_running_reqs": ("num_running_reqs",),
        "num_queue_reqs": ("num_queue_reqs",),
        "token_usage": ("token_usage",),
        "kv_used_tokens": ("kv_used_tokens", "num_used_tokens"),
        "cache_hit_rate": ("cache_hit_rate",),
        "prompt_tokens": ("prompt_tokens",),
        "cached_tokens": ("cached_tokens",),
        "generation_tokens": ("generation_tokens",),
        "num_requests": ("num_requests",),
        "time_to_first_token_seconds": ("time_to_first_token_seconds",),
        "inter_token_latency_seconds": ("inter_token_latency_seconds",),
        "e2e_request_latency_seconds": ("e2e_request_latency_seconds",),
    },
    "vllm": {
        "num_running_reqs": ("num_requests_running",),
        "num_queue_reqs": ("num_requests_waiting",),
        "token_usage": ("kv_cache_usage_perc",),  # a fraction in [0, 1] in vLLM too, despite its name
        "prompt_tokens": ("prompt_tokens",),
        "generation_tokens": ("generation_tokens",),
        "time_to_first_token_seconds": ("time_to_first_token_seconds",),
        "inter_token_latency_seconds": ("inter_token_latency_seconds",),
        "e2e_request_latency_seconds": ("e2e_request_latency_seconds",),
    },
}
METRICS_PREFIXES = tuple(ALIASES)


class _Renamed(Collector):
    """Another registry's metrics under other names: `radixlm:<name>` -> `<prefix>:<alias>`."""

    def __init__(self, source: CollectorRegistry, prefix: str, aliases: Mapping[str, tuple[str, ...]]):
        self._source = source
        self._prefix = prefix
        self._aliases = aliases

    def collect(self) -> Iterator[Metric]:
        for metric in self._source.collect():
            ours = metric.name.removeprefix("radixlm:")
            for alias in self._aliases.get(ours, ()):
                name = f"{self._prefix}:{alias}"
                renamed = Metric(name, metric.documentation, metric.type, metric.unit)
                renamed.samples = [
                    s._replace(name=name + s.name[len(metric.name) :]) for s in metric.samples
                ]
                yield renamed


class ServerMetrics:
    def __init__(self, model_name: str, extra_prefixes: tuple[str, ...] = ()) -> None:
        unknown = [p for p in extra_prefixes if p not in ALIASES]
        if unknown:
            raise ValueError(f"metrics prefix {unknown[0]!r} is not one of {', '.join(ALIASES)}")
        self.registry = CollectorRegistry()
        # The renamed views live in a registry of their own: collecting from the source registry inside
        # that registry's own collect would recurse.
        self._aliases = CollectorRegistry(auto_describe=False)
        for prefix in dict.fromkeys(p for p in extra_prefixes if p != "radixlm"):
            self._aliases.register(_Renamed(self.registry, prefix, ALIASES[prefix]))
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"radixlm:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"radixlm:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"radixlm:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_running = gauge("num_running_reqs", "Requests in the running batch.")
        self.num_waiting = gauge("num_queue_reqs", "Requests waiting to be scheduled.")
        self.kv_usage = gauge(
            "token_usage", "Fraction of KV pool slots in use (running requests + prefix cache)."
        )
        self.kv_used = gauge("kv_used_tokens", "KV pool slots in use.")
        self.cache_size = gauge("cache_tokens", "Tokens held by the prefix cache.")
        self.cache_hit_rate = gauge(
            "cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens."
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.cached_tokens = counter(
            "cached_tokens", "Prompt tokens of finished requests found in the prefix cache."
        )
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._requests = Counter(
            "radixlm:num_requests",
            "Finished requests by finish reason.",
            [*labels, "finish_reason"],
            registry=r,
        )
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Request arrival to its last token.", _LATENCY_BUCKETS
        )

    def refresh(self, info: dict[str, Any]) -> None:
        """Copy the engine's own counters into the gauges (called at scrape time)."""
        self.num_running.set(info.get("num_running", 0))
        self.num_waiting.set(info.get("num_waiting", 0))
        self.kv_usage.set(info.get("kv_usage", 0.0))
        self.kv_used.set(info.get("kv_used", 0))
        self.cache_size.set(info.get("cache_size", 0))
        self.cache_hit_rate.set(info.get("cache_hit_rate", 0.0))

    def on_tokens(self, n: int, first: bool, since_arrival: float, since_last: float) -> None:
        """`n` new tokens arrived in one chunk; a chunk of several tokens counts as n equal gaps."""
        if n <= 0:
            return
        self.generation_tokens.inc(n)
        if first:
            # Tokens that came with the first one have no gap of their own worth recording.
            self.ttft.observe(since_arrival)
            return
        for _ in range(n):
            self.itl.observe(since_last / n)

    def on_finish(self, meta: dict[str, Any], e2e: float) -> None:
        self.prompt_tokens.inc(meta.get("prompt_tokens", 0))
        self.cached_tokens.inc(meta.get("cached_tokens", 0))
        reason = meta.get("finish_reason") or {}
        self._requests.labels(self.model_name, str(reason.get("type", "unknown"))).inc()
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(self._aliases)
