"""Prometheus metrics of one app: requests, queue depth, generation latency, audio made, real-time factor,
the batching engine's slots, queue wait, steps and audio per second, and where its time goes."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from generation import STEP_GPU_WAITS, EngineWork, GenerationResult

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Without a ``_created`` gauge beside each counter and histogram (their start time: twice the series, and no
# query of these metrics needs it). Process-wide, as prometheus_client has it.
disable_created_metrics()


class Metrics:
    """The service's metrics, in a registry of their own (so that several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.labels: dict[str, str] = {}
        """Labels added to every sample (a cluster's replica names itself: ``cluster.replica_app``)."""
        self.requests = Counter(
            "higgs_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "higgs_queue_depth",
            "Generation requests counted against HIGGS_MAX_QUEUE: being prepared, waiting, decoding, or "
            "finishing their audio (higgs_finishing_requests)",
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "higgs_generation_seconds",
            "Time of one generation from its slot to its last audio sent (the codec's delay included)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "higgs_audio_generated_seconds", "Seconds of audio generated", registry=self.registry
        )
        self.realtime_factor = Histogram(
            "higgs_realtime_factor",
            "Generation time (to the last audio sent) divided by the audio's duration (below 1: faster than "
            "real time)",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 4, 8),
            registry=self.registry,
        )

        self.queue_wait = Histogram(
            "higgs_queue_wait_seconds",
            "Time a generation waited for a decoding slot",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "higgs_generation_phase_seconds",
            "A generation's time in its slot by phase: fill (its prefill and any fill before it), decode "
            "(its first token to its last), finish (its last token to its result: the codec's tail)",
            ["phase"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
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
        self.kept_slots = Gauge(
            "higgs_kept_slots",
            "Free decoding slots kept for the next piece of a long text",
            registry=self.registry,
        )
        self.finishing = Gauge(
            "higgs_finishing_requests",
            "Requests out of their slots whose audio the codec is still decoding (on a CPU, seconds after "
            "their last token); they count in higgs_queue_depth until their answer ends",
            registry=self.registry,
        )
        self.steps_per_second = Gauge(
            "higgs_decode_steps_per_second",
            "Batched decoding steps per second (over the last 10 s of decoding; 0 after 2 s without any)",
            registry=self.registry,
        )
        self.audio_per_second = Gauge(
            "higgs_audio_seconds_per_second",
            "Seconds of audio decoded (as tokens) per second, all requests together (over the last 10 s of "
            "decoding; 0 after 2 s without any); the codec's own work is higgs_codec_seconds_total",
            registry=self.registry,
        )
        self.transcription_depth = Gauge(
            "higgs_transcription_queue_depth",
            "Speech recognitions running or waiting (transcriptions, translations, chat audio heard); at "
            "HIGGS_MAX_QUEUE (16 when unset) more are refused with 429",
            registry=self.registry,
        )
        self.transcription_seconds = Histogram(
            "higgs_transcription_seconds",
            "Time of one speech recognition from its queueing to its result (its wait for the worker "
            "included)",
            ["task"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.transcribed_audio = Counter(
            "higgs_transcribed_audio_seconds", "Seconds of audio recognised", ["task"], registry=self.registry
        )
        self._work: _WorkCollector | None = None

    def track_recognizer(self, recognizer: object) -> None:
        """Read the speech recognizer's line at each scrape, and record each recognition it ends
        (recognizers without ``pending`` or ``observers`` leave these at 0)."""
        if hasattr(recognizer, "pending"):
            self.transcription_depth.set_function(lambda: recognizer.pending)
        observers = getattr(recognizer, "observers", None)
        if observers is not None and self.observe_recognition not in observers:
            observers.append(self.observe_recognition)

    def observe_recognition(self, task: str, audio_seconds: float, seconds: float) -> None:
        """Record one recognition that ended with a result (called on the recognizer's worker thread)."""
        self.transcription_seconds.labels(task=task).observe(seconds)
        self.transcribed_audio.labels(task=task).inc(audio_seconds)

    def track_engine(self, engine: object) -> None:
        """Read the engine's batching gauges at each scrape (engines without ``stats()`` leave them at 0),
        and its ``work()`` counters (engines without it show none)."""
        work = getattr(engine, "work", None)
        if self._work is not None:  # a second start of the same app
            self.registry.unregister(self._work)
            self._work = None
        if work is not None:
            self._work = _WorkCollector(work)
            self.registry.register(self._work)
        stats = getattr(engine, "stats", None)
        if stats is None:
            return
        self.slots.set_function(lambda: stats().slots)
        self.busy_slots.set_function(lambda: stats().busy_slots)
        self.waiting.set_function(lambda: stats().waiting)
        self.kept_slots.set_function(lambda: stats().kept_slots)
        self.finishing.set_function(lambda: stats().finishing)
        self.steps_per_second.set_function(lambda: stats().steps_per_second)
        self.audio_per_second.set_function(lambda: stats().audio_seconds_per_second)

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth`` at each scrape."""
        self.queue_depth.set_function(depth)

    def observe_generation(self, result: GenerationResult) -> None:
        """Record one generation, finished or left by its client (called on the engine's threads). A left
        one counts its wait for a slot and the audio it decoded, not its times: they end where its client
        left, before its audio was all decoded (its real-time factor looked better than any finished
        one's)."""
        self.queue_wait.observe(result.queue_seconds)
        if result.abandoned:
            self.audio_seconds.inc(result.audio_seconds)
            return
        self.generation_seconds.observe(result.seconds)
        if result.fill_seconds or result.decode_seconds:  # (results made by the engine's slots)
            finish = max(0.0, result.seconds - result.fill_seconds - result.decode_seconds)
            for phase, seconds in (
                ("fill", result.fill_seconds),
                ("decode", result.decode_seconds),
                ("finish", finish),
            ):
                self.phase_seconds.labels(phase=phase).observe(seconds)
        if result.audio_seconds > 0:
            self.audio_seconds.inc(result.audio_seconds)
            self.realtime_factor.observe(result.seconds / result.audio_seconds)

    def observe_request(self, route: str, status: int) -> None:
        """Record one answered HTTP request."""
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        """The text exposition format, with ``labels`` on every sample."""
        return generate_latest(_Labelled(self.registry, self.labels) if self.labels else self.registry)


class _Labelled:
    """A registry's metrics, each sample with ``labels`` added (what ``generate_latest`` reads of a
    registry is its ``collect``; each call makes its families anew)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry = registry
        self.labels = labels

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield family


class _WorkCollector(Collector):
    """The engine's ``EngineWork`` counters, read at each scrape."""

    def __init__(self, work: Callable[[], EngineWork]):
        self._read = work

    def collect(self):
        work = self._read()
        by_work = [
            ("higgs_scheduler_seconds", "Seconds the decoding loop spent, by work", work.scheduler),
            ("higgs_codec_seconds", "Seconds the audio codec's thread spent, by work", work.codec),
            ("higgs_codec_calls", "Calls of the audio codec, by work", work.codec_calls),
            (
                "higgs_step_gpu_seconds",
                "CUDA: seconds the GPU ran decoding steps (step), and waited between two in a row (between)",
                work.step_gpu,
            ),
        ]
        for name, documentation, values in by_work:
            family = CounterMetricFamily(name, documentation, labels=["work"])
            for label, value in values.items():
                family.add_metric([label], value)
            yield family
        cumulative = itertools.accumulate(work.step_gpu_waits)
        yield HistogramMetricFamily(
            "higgs_step_gpu_wait_seconds",
            "CUDA: the GPU's waits between two decoding steps in a row (a late host, or a fill)",
            buckets=[(str(b), n) for b, n in zip((*STEP_GPU_WAITS, "+Inf"), cumulative, strict=True)],
            sum_value=work.step_gpu["between"],
        )
        yield CounterMetricFamily(
            "higgs_codec_pieces", "Audio pieces decoded by the codec's piece calls", value=work.codec_pieces
        )
        yield CounterMetricFamily("higgs_prefills", "Prefill forward passes", value=work.prefills)
        yield CounterMetricFamily(
            "higgs_prefilled_requests", "Requests prefilled into slots", value=work.prefilled
        )
        yield CounterMetricFamily("higgs_decode_steps", "Batched decoding steps", value=work.steps)
