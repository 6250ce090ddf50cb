"""A fake engine for HTTP-layer tests where the model adds nothing: instant, deterministic, scriptable.

It has the engine's public face (``generation.Engine``): ``encode``, ``generate``, ``stream`` with the typed
events, ``pending``/``max_queue``/``failure``/``observers``. Its audio is a 440 Hz tone as long as the
request's token cap says; ``fail_with`` makes the next generations raise, ``fail_mid_stream`` raises after
the first audio piece.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import torch

from audio import Audio
from generation import (
    AudioCodes,
    AudioPiece,
    ContextLengthError,
    GenerationRequest,
    GenerationResult,
    Started,
    StreamEvent,
    TextPiece,
)

SAMPLE_RATE = 24_000
FRAME_RATE = 25
CODEBOOKS = 8


@dataclass
class FakeEngine:
    """Answers every generation at once with a tone; records what it was asked."""

    sample_rate: int = SAMPLE_RATE
    frame_rate: int = FRAME_RATE
    max_context: int = 8192
    max_queue: int = 16
    failure: str | None = None
    pending: int = 0
    observers: list = field(default_factory=list)
    requests: list[GenerationRequest] = field(default_factory=list)
    encoded: list[Audio] = field(default_factory=list)
    fail_with: Exception | None = None
    fail_mid_stream: bool = False
    mid_stream_error: Exception = field(
        default_factory=lambda: RuntimeError("the fake engine failed mid-stream")
    )
    silent: bool = False

    async def encode(self, audio: Audio) -> AudioCodes:
        self.encoded.append(audio)
        frames = max(1, round(audio.duration * self.frame_rate))
        return AudioCodes(torch.zeros(CODEBOOKS, frames, dtype=torch.int64))

    async def text_tokens(self, text: str, limit: int | None) -> tuple[str, int]:
        words = text.split(" ")  # a token a word
        if limit is None or len(words) <= limit:
            return text, len(words)
        return " ".join(words[:limit]), limit

    def _result(self, request: GenerationRequest) -> GenerationResult:
        audio = None
        if request.audio_output:
            seconds = min(request.max_new_tokens, 50) / self.frame_rate
            t = np.arange(int(seconds * self.sample_rate)) / self.sample_rate
            level = 0.0 if self.silent else 0.3
            audio = Audio((level * np.sin(2 * np.pi * 440 * t)).astype(np.float32), self.sample_rate)
        prompt_audio = sum(turn.audio.frames for turn in request.turns if turn.audio is not None)
        return GenerationResult(
            text="" if request.audio_output else "fake text",
            audio=audio,
            finish_reason="stop",
            prompt_tokens=10 + prompt_audio,
            prompt_audio_tokens=prompt_audio,
            completion_tokens=request.max_new_tokens,
            completion_audio_tokens=request.max_new_tokens if request.audio_output else 0,
            seconds=0.01,
            audio_seconds=audio.duration if audio else 0.0,
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        return self._result(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        result = self._result(request)
        yield Started(prompt_tokens=result.prompt_tokens, prompt_audio_tokens=result.prompt_audio_tokens)
        if result.audio is not None:
            half = len(result.audio.samples) // 2
            yield AudioPiece(result.audio.samples[:half])
            if self.fail_mid_stream:
                raise self.mid_stream_error
            yield AudioPiece(result.audio.samples[half:])
        else:
            yield TextPiece(result.text)
        yield result

    async def check_context(self, request: GenerationRequest) -> None:
        prompt = self._result(request).prompt_tokens
        if prompt + request.max_new_tokens > self.max_context:
            raise ContextLengthError(f"{prompt} + {request.max_new_tokens} tokens, {self.max_context} fit")

    def warm_up(self) -> None:
        """Nothing to warm up."""

    def release_slot(self, request: GenerationRequest) -> None:
        """No slot is kept."""

    def close(self) -> None:
        """Nothing to stop."""
