"""What a speech engine takes and gives: requests, the events of a stream, results, errors, the ``Engine``
protocol and its statistics.

The HTTP layer, the planner, long texts and streaming speak to an engine only in these types; ``engine.py``
is the Higgs Audio implementation, and the tests' fakes (``tests/fakes.py``) another. Callers get typed
results (``GenerationResult``, ``AudioCodes``), never tensors of the model's layout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from audio import Audio

# Placed between the scene description tags of the system prompt, as Higgs Audio was trained.
SYSTEM_TEMPLATE = "Generate audio following instruction.\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"


# What else mends a prompt that alone fills the context (the context is the largest KV-cache length).
LONGER_CONTEXT = "serve a longer context (a larger last HIGGS_KV_CACHE_LENGTHS)"


class ContextLengthError(ValueError):
    """Prompt plus requested output do not fit the model's context: ``detail`` says by how much, ``advice``
    what to change, ``param`` which request field (``max_tokens`` unless the caller knows better).
    ``prompt_alone``: the prompt leaves no room for a single token, so no output length would fit (the
    input is what to change, never ``max_tokens``); ``audio_bound``: then its audio (a voice's reference
    clip, audio in the messages) takes half the context or more, so shortening its text cannot help."""

    def __init__(
        self,
        detail: str,
        advice: str = "shorten the input or lower max_tokens",
        param: str = "max_tokens",
        prompt_alone: bool = False,
        audio_bound: bool = False,
    ):
        super().__init__(f"{detail}; {advice}")
        self.detail = detail
        self.advice = advice
        self.param = param
        self.prompt_alone = prompt_alone
        self.audio_bound = audio_bound

    def naming(self, param: str, advice: str) -> ContextLengthError:
        """The same overflow, blamed on ``param`` (an endpoint without ``max_tokens``)."""
        return ContextLengthError(self.detail, advice, param, self.prompt_alone, self.audio_bound)


class EngineBusy(Exception):
    """Every slot and the waiting line are full; the request was not queued.

    ``retry_after`` is the number of seconds after which a slot is likely free, from the measured rate.
    """

    def __init__(self, message: str, retry_after: float = 2.0):
        super().__init__(message)
        self.retry_after = retry_after

    @classmethod
    def full(cls, pending: int, retry_after: float, finishing: int = 0) -> EngineBusy:
        """The engine's bound reached, with ``pending`` requests running or waiting, ``finishing`` of which
        have all their tokens and wait for the codec to end their audio (on a CPU, seconds after their
        slots went idle: said, so that an idle ``higgs_batch_occupancy`` beside a 429 is no puzzle)."""
        requests = "1 request" if pending == 1 else f"{pending} requests"
        tail = f", {finishing} of them finishing their audio" if finishing else ""
        return cls(f"the server is busy ({requests} running or waiting{tail}); retry shortly", retry_after)


class EngineFailure(Exception):
    """A generation failed in a way the client should hear about (``code``: ``out_of_memory``, ...)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AudioCodes:
    """A clip in the audio tokenizer's codes: ``codes`` is (codebooks, frames), int64, on the CPU."""

    codes: torch.Tensor

    @property
    def frames(self) -> int:
        """Number of frames (the tokenizer makes 25 a second)."""
        return int(self.codes.shape[1])

    @staticmethod
    def joined(parts: list[AudioCodes]) -> AudioCodes | None:
        """Consecutive clips as one (None for none)."""
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else AudioCodes(torch.cat([p.codes for p in parts], dim=1))


@dataclass(frozen=True)
class Turn:
    """One ChatML turn: text, or (for the assistant) a clip of audio the model "said"."""

    role: Literal["system", "user", "assistant"]
    text: str = ""
    audio: AudioCodes | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs; built by the HTTP layer's helpers, consumed by the worker."""

    turns: list[Turn]
    audio_output: bool
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ras_window: int = 7
    time_limit: float | None = None
    """Wall-clock seconds after which generation stops with ``finish_reason`` ``length``."""
    keep_slot: bool = False
    """More of the same answer follows (a long text's next piece): when this generation ends, its slot is
    kept for the next piece (until ``engine.HOLD_SECONDS`` after its result went out, or
    ``release_slot``) rather than given to the waiting line."""
    continues: bool = False
    """This generation continues an answer already under way: the queue bound does not refuse it, and it
    takes a kept slot, or else the first free one, ahead of new requests."""


@dataclass(frozen=True)
class GenerationResult:
    """What the model produced and what it consumed, in tokens as the model counts them."""

    text: str
    audio: Audio | None
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    prompt_audio_tokens: int
    completion_tokens: int
    completion_audio_tokens: int
    seconds: float
    """From the slot to the end: for audio, until its last piece was decoded and sent (the codec's delay
    included, as a listener experiences it)."""
    audio_seconds: float = 0.0
    codes: AudioCodes | None = None
    """The answer's audio frames as heard (delay pattern reverted), (codebooks, frames) on the CPU."""
    queue_seconds: float = 0.0
    """Time the request waited for a slot."""
    fill_seconds: float = 0.0
    """From its slot to its first token: its prompt's prefill, and the wait for a fill before it."""
    decode_seconds: float = 0.0
    """From its first token to its last (``seconds`` less this and ``fill_seconds``: the codec's tail)."""
    abandoned: bool = False
    """Its client left before its end: its times end there, and ``audio_seconds`` counts the audio decoded
    into tokens by then (more than was sent)."""


@dataclass(frozen=True)
class Started:
    """Streaming: the prompt is ready and generation begins (the moment a 4xx can no longer happen)."""

    prompt_tokens: int
    prompt_audio_tokens: int


@dataclass(frozen=True)
class AudioPiece:
    """Streaming: the next samples of the answer, mono float32 at the engine's rate."""

    samples: np.ndarray
    codes: AudioCodes | None = None
    """The frames these samples were decoded from (the engine's pieces), so that an answer cut short can
    still be kept by what was sent."""


@dataclass(frozen=True)
class TextPiece:
    """Streaming: the next piece of generated text."""

    text: str


@dataclass(frozen=True)
class TranscriptPiece:
    """Streaming: what the audio that follows says (``longform.speak`` sends one per piece as it starts; the
    engine itself sends none)."""

    text: str


StreamEvent = Started | AudioPiece | TextPiece | TranscriptPiece | GenerationResult


@dataclass(frozen=True)
class StreamSettings:
    """How audio is decoded while it is generated.

    Every ``chunk_frames`` frames (25 a second; ``first_chunk_frames`` for the first piece, so that sound
    starts sooner) the codec decodes the new frames with ``context_frames`` of
    already-sent frames on their left, and holds back the last ``context_frames`` until their right-hand
    neighbours exist; each piece starts with a crossfade of ``crossfade_ms`` over the previous decode of the
    same samples, so the joins are inaudible and the whole stream matches a one-shot decode closely.
    """

    first_chunk_frames: int = 4
    chunk_frames: int = 12
    context_frames: int = 4
    crossfade_ms: float = 10.0

    @property
    def first_piece_frames(self) -> int:
        """Frames the codec decodes for a stream's first piece, its context on the right included."""
        return self.first_chunk_frames + self.context_frames

    @property
    def piece_frames(self) -> int:
        """Frames the codec decodes for a later piece (all but the last), its context on both sides."""
        return self.context_frames + self.chunk_frames + self.context_frames


class Engine(Protocol):
    """What the HTTP layer needs from a speech engine."""

    sample_rate: int
    frame_rate: int
    max_context: int
    max_queue: int
    failure: str | None
    observers: list[Callable[[GenerationResult], None]]

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        ...

    async def encode(self, audio: Audio) -> AudioCodes:
        """Turn a reference clip (any rate, mono) into audio codes."""
        ...

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one generation."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Run one generation, yielding ``Started``, then pieces, then the ``GenerationResult``.

        Leaving the iteration early (a client gone) stops the generation within one decoding step.
        """
        ...

    async def check_context(self, request: GenerationRequest) -> None:
        """Raise ``ContextLengthError`` when ``request``'s prompt and ``max_new_tokens`` do not fit the
        context (its prompt is built as ``stream`` would; nothing is queued)."""
        ...

    async def text_tokens(self, text: str, limit: int | None) -> tuple[str, int]:
        """``text`` as an answer of at most ``limit`` of the model's text tokens (all of it for ``None``):
        its first ``limit`` tokens, and how many tokens those are. For answers the model does not write."""
        ...

    def release_slot(self, request: GenerationRequest) -> None:
        """No piece follows ``request`` (a ``keep_slot`` generation that ended): the slot kept for the next
        one goes back now rather than when its hold ends."""
        ...

    def close(self) -> None:
        """Stop the worker."""
        ...


@dataclass(frozen=True)
class EngineStats:
    """What the scheduler is doing now (read by /metrics)."""

    slots: int
    busy_slots: int
    waiting: int
    steps_per_second: float
    audio_seconds_per_second: float
    kept_slots: int = 0
    """Free slots kept for the next piece of a long text (``GenerationRequest.keep_slot``)."""
    finishing: int = 0
    """Requests out of their slots whose audio the codec is still decoding (they count against the bound)."""


SCHEDULER_WORK = ("prefill", "launch", "wait", "tokens", "paused")
CODEC_WORK = ("first_piece", "piece", "end", "encode")
STEP_GPU = ("step", "between")
STEP_GPU_WAITS = (0.0001, 0.0005, 0.001, 0.002, 0.004, 0.006, 0.01, 0.05)
"""Upper bounds (seconds) of the histogram of the GPU's waits between steps in a row (``EngineWork``): a
host late by a thread's turn at the interpreter lock would show near Python's switch interval, 5 ms."""


@dataclass
class EngineWork:
    """Where the engine's time went since it started (read by /metrics; each field written by one thread).

    ``scheduler``: the decoding loop's seconds by work: ``prefill`` (prompts into slots: ``prefills`` forward
    passes for ``prefilled`` requests; where fills run beside the steps, only the loop's wait for a fill when
    nothing else runs, and starting the filled requests); for ``steps`` batched steps ``launch`` (starting
    them: on a CPU the whole computation, on CUDA a graph replay), ``wait`` (blocked until a step's tokens are
    on the host: on CUDA the GPU's time the host did not cover; on a CPU nothing) and ``tokens`` (streaming
    them, cutting audio pieces, stop strings: the host's own work per step); and ``paused`` (on a CPU,
    stepping aside while a first piece is with the codec). On CUDA a ``wait`` near zero means the GPU waits
    for the host. ``codec`` and ``codec_calls``: the codec thread's seconds and calls by work: ``first_piece``
    and ``piece`` (``codec_pieces`` pieces in all: more than one a call is a batch of several streams'
    pieces; with them, ends of their length), ``end`` (streams' last pieces alone: of those that end
    together, in one call) and ``encode`` (a voice reference). ``step_gpu`` (CUDA, from events around each
    step on the GPU's own clock): ``step``, the seconds from a step's first kernel starting to its last
    ending (its own work, slowed by whatever else runs on the GPU meanwhile: the codec, fills), and
    ``between``, from a step's end to the next one's start for steps in a row (the next launched before
    this one's tokens were taken: the loop's lookahead): the GPU waiting for the host, or for a fill the
    next step must follow; ``step_gpu_waits`` counts those waits by the bounds of ``STEP_GPU_WAITS`` (the
    last count: longer than all of them).
    """

    scheduler: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCHEDULER_WORK, 0.0))
    prefills: int = 0
    prefilled: int = 0
    steps: int = 0
    codec: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CODEC_WORK, 0.0))
    codec_calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CODEC_WORK, 0))
    codec_pieces: int = 0
    step_gpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_GPU, 0.0))
    step_gpu_waits: list[int] = field(default_factory=lambda: [0] * (len(STEP_GPU_WAITS) + 1))
