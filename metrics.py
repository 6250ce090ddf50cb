"""Prometheus metrics of one app: requests, queue depth, generation latency, audio made, real-time factor,
and the batching engine's slots, queue wait, steps and audio per second."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine import GenerationResult

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metrics, in a registry of their own (so that several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "higgs_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "higgs_queue_depth", "Generation jobs running or waiting on the worker", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "higgs_generation_seconds",
            "Time of one generation on the worker",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "higgs_audio_generated_seconds", "Seconds of audio generated", registry=self.registry
        )
        self.realtime_factor = Histogram(
            "higgs_realtime_factor",
            "Generation time divided by the duration of the audio generated (below 1: faster than real time)",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 4, 8),
            registry=self.registry,
        )

        self.queue_wait = Histogram(
            "higgs_queue_wait_seconds",
            "Time a generation waited for a decoding slot",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
            registry=self.registry,
        )
        self.slots = Gauge(
            "higgs_batch_slots", "Decoding slots (most requests decoded together)", registry=self.registry
        )
        self.busy_slots = Gauge(
            "higgs_batch_occupancy", "Decoding slots in use (requests decoding now)", registry=self.registry
        )
        self.waiting = Gauge(
            "higgs_waiting_requests", "Requests waiting for a decoding slot", registry=self.registry
        )
        self.steps_per_second = Gauge(
            "higgs_decode_steps_per_second",
            "Batched decoding steps per second (last 10 s)",
            registry=self.registry,
        )
        self.audio_per_second = Gauge(
            "higgs_audio_seconds_per_second",
            "Seconds of audio generated per second, all requests together (last 10 s)",
            registry=self.registry,
        )

    def track_engine(self, engine: object) -> None:
        """Read the engine's batching gauges at each scrape (engines without ``stats()`` leave them at 0)."""
        stats = getattr(engine, "stats", None)
        if stats is None:
            return
        self.slots.set_function(lambda: stats().slots)
        self.busy_slots.set_function(lambda: stats().busy_slots)
        self.waiting.set_function(lambda: stats().waiting)
        self.steps_per_second.set_function(lambda: stats().steps_per_second)
        self.audio_per_second.set_function(lambda: stats().audio_seconds_per_second)

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth`` at each scrape."""
        self.queue_depth.set_function(depth)

    def observe_generation(self, result: GenerationResult) -> None:
        """Record one generation, finished or stopped early (called on the engine's threads)."""
        self.generation_seconds.observe(result.seconds)
        self.queue_wait.observe(result.queue_seconds)
        if result.audio_seconds > 0:
            self.audio_seconds.inc(result.audio_seconds)
            self.realtime_factor.observe(result.seconds / result.audio_seconds)

    def observe_request(self, route: str, status: int) -> None:
        """Record one answered HTTP request."""
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
