"""Prometheus metrics, on a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LONG = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "charrnn_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "charrnn_request_duration_seconds",
            "End-to-end request latency",
            ["route"],
            buckets=_LONG,
            registry=r,
        )
        self.ttfc_seconds = Histogram(
            "charrnn_time_to_first_char_seconds",
            "From submission (the request accepted) to the first generated character",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_char_seconds = Histogram(
            "charrnn_inter_char_seconds",
            "Time of one batched decode step (the gap between a row's characters); a call of "
            "several steps counts its time over their number",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "charrnn_batch_size",
            "Rows advanced by one decode step",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.queue_depth = Gauge(
            "charrnn_queue_depth", "Generations waiting for a batch slot", ["model"], registry=r
        )
        self.active = Gauge(
            "charrnn_active_generations",
            "Generations in the decode batch",
            ["model"],
            registry=r,
        )
        self.priming = Gauge(
            "charrnn_priming_generations",
            "Generations admitted whose prime is being worked through, in parts",
            ["model"],
            registry=r,
        )
        self.prime_chars = Counter(
            "charrnn_prime_characters",
            "Prime positions run through the network",
            ["model"],
            registry=r,
        )
        self.decode_seconds = Counter(
            "charrnn_decode_seconds",
            "Time the decode thread spent in batched steps (network and sampling)",
            ["model"],
            registry=r,
        )
        self.generated_chars = Counter(
            "charrnn_generated_characters", "Characters generated", ["model"], registry=r
        )
        self.cutoffs = Counter(
            "charrnn_slow_client_cutoffs",
            "Streams closed because the client fell too far behind",
            ["model"],
            registry=r,
        )
        self.prime_cache = Counter(
            "charrnn_prime_cache",
            "Prime warm-ups by cache result",
            ["model", "result"],
            registry=r,
        )
