"""The Higgs Audio engine: the only module that imports ``boson_multimodal``.

It loads the generation model, the text tokenizer and the audio tokenizer once, and owns a single worker
thread through which every use of them passes: the upstream engine's static KV caches are shared between
calls, so two generations at once would corrupt each other, and torch must never run on the event loop.
Callers get typed results (``GenerationResult``, ``AudioCodes``), never tensors of the model's layout.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, TypeVar

import numpy as np
import torch

from audio import Audio

log = logging.getLogger(__name__)

T = TypeVar("T")

# Placed between the scene description tags of the system prompt, as Higgs Audio was trained.
SYSTEM_TEMPLATE = "Generate audio following instruction.\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"
END_TOKENS = ("<|end_of_text|>", "<|eot_id|>")


class ContextLengthError(ValueError):
    """Prompt plus requested output do not fit the model's context."""


class EngineBusy(Exception):
    """The worker's queue is full; the request was not queued."""


class EngineFailure(Exception):
    """A generation failed in a way the client should hear about (``code``: ``out_of_memory``, ...)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def _is_fatal(exc: BaseException) -> bool:
    """Errors after which CUDA (and so the engine) cannot be trusted: the process must be restarted."""
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and not isinstance(exc, torch.cuda.OutOfMemoryError)
        and ("CUDA error" in text or "device-side assert" in text or "illegal memory access" in text)
    )


@dataclass(frozen=True)
class AudioCodes:
    """A clip in the audio tokenizer's codes: ``codes`` is (codebooks, frames), int64, on the CPU."""

    codes: torch.Tensor

    @property
    def frames(self) -> int:
        """Number of frames (the tokenizer makes 25 a second)."""
        return int(self.codes.shape[1])


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
    audio_seconds: float = 0.0
    codes: AudioCodes | None = None
    """The generated audio as codes (delay pattern reverted), streamed or not: the context a next piece of a
    long text is generated after."""


@dataclass(frozen=True)
class Started:
    """Streaming: the prompt is ready and generation begins (the moment a 4xx can no longer happen)."""

    prompt_tokens: int
    prompt_audio_tokens: int


@dataclass(frozen=True)
class AudioPiece:
    """Streaming: the next samples of the answer, mono float32 at the engine's rate."""

    samples: np.ndarray


@dataclass(frozen=True)
class TextPiece:
    """Streaming: the next piece of generated text."""

    text: str


StreamEvent = Started | AudioPiece | TextPiece | GenerationResult


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

    def close(self) -> None:
        """Stop the worker."""
        ...


def _torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


class HiggsEngine:
    """Higgs Audio v2 behind one worker thread."""

    def __init__(
        self,
        model: str,
        audio_tokenizer: str,
        device: str,
        dtype: str,
        kv_cache_lengths: list[int],
        streaming: StreamSettings | None = None,
        max_queue: int = 16,
    ):
        # Imported here so that merely importing this module (for its types) stays cheap.
        from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

        started = time.perf_counter()
        self.device = device
        # Upstream captures CUDA graphs when the device is exactly "cuda", building the capture's inputs in
        # config.torch_dtype (the checkpoint's bfloat16, whatever dtype was loaded). Load as "cuda:0" so it
        # skips that, then capture here with the dtype the weights really have.
        capture = device == "cuda"
        self._serve = HiggsAudioServeEngine(
            model,
            audio_tokenizer,
            device="cuda:0" if capture else device,
            torch_dtype=_torch_dtype(dtype, device),
            kv_cache_lengths=sorted(kv_cache_lengths),
        )
        self._model = self._serve.model
        config = self._model.config
        config.torch_dtype = self._model.dtype
        if not hasattr(config, "hidden_size"):
            config.hidden_size = config.text_config.hidden_size
        if capture:
            self._model.capture_model(self._serve.kv_caches.values())
        self._tokenizer = self._serve.tokenizer
        self._codec = self._serve.audio_tokenizer
        self._config = self._model.config
        self.sample_rate = int(self._codec.sampling_rate)
        self.frame_rate = int(self._codec.tps)
        self.num_codebooks = int(self._config.audio_num_codebooks)
        self.max_context = max(kv_cache_lengths)
        self._placeholder_ids = {self._config.audio_in_token_idx, self._config.audio_out_token_idx}
        # Tokens that would start audio (or an audio placeholder with no audio behind it) in a text answer.
        self._audio_start_ids = [
            self._tokenizer.convert_tokens_to_ids("<|audio_out_bos|>"),
            self._config.audio_out_token_idx,
            self._config.audio_in_token_idx,
        ]
        self._postfix_text = self._tokenizer.encode(
            "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
        )
        self._postfix_audio = self._postfix_text + self._tokenizer.encode(
            "<|audio_out_bos|>", add_special_tokens=False
        )
        self.streaming = streaming or StreamSettings()
        self.steps = 0
        """Decoding steps run since start (all requests, finished or stopped early)."""
        self.max_queue = max_queue
        """Most jobs (running or waiting) the worker takes; more are refused with ``EngineBusy``."""
        self.failure: str | None = None
        """Set when CUDA failed in a way that needs a restart; the engine refuses work from then on."""
        self.observers: list[Callable[[GenerationResult], None]] = []
        """Called on the worker with every finished generation (metrics)."""
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="higgs-worker")
        log.info(
            "loaded %s on %s (%s) in %.1f s; audio at %d Hz, %d frames/s",
            model,
            device,
            self._model.dtype,
            time.perf_counter() - started,
            self.sample_rate,
            self.frame_rate,
        )

    # ---- the async face: everything goes through the single worker -------------------------------------

    @property
    def pending(self) -> int:
        """Jobs running or waiting on the worker."""
        return self._pending

    def _admit(self) -> None:
        if self.failure is not None:
            raise EngineFailure(f"the engine failed and needs a restart: {self.failure}", "engine_failed")
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise EngineBusy(f"the server is busy ({self._pending} requests queued); retry shortly")
            self._pending += 1

    def _release(self, *_: object) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _guarded(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn`` on the worker, turning GPU failures into errors the client can be told about."""
        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError:
            log.exception("out of GPU memory")
            torch.cuda.empty_cache()
            raise EngineFailure(
                "the GPU ran out of memory for this request; try a shorter input or output", "out_of_memory"
            ) from None
        except Exception as exc:
            if _is_fatal(exc):
                self.failure = type(exc).__name__
                log.critical("engine failed, restart the service: %s", exc)
            raise

    async def _run(self, fn: Callable[..., T], *args) -> T:
        self._admit()
        # Carry the caller's context (its request id) into the worker's log lines.
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(
            self._worker, context.run, self._guarded, fn, *args
        )
        future.add_done_callback(self._release)
        return await future

    async def encode(self, audio: Audio) -> AudioCodes:
        return await self._run(self.encode_sync, audio)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self._run(self.generate_sync, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: StreamEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def work() -> None:
            if cancel.is_set():  # the client left while this waited for the worker
                return
            try:
                emit(self._guarded(self.generate_sync, request, emit, cancel))
            except BaseException as exc:  # the consumer re-raises it; the worker thread must survive
                emit(exc)

        self._admit()
        context = contextvars.copy_context()
        loop.run_in_executor(self._worker, context.run, work).add_done_callback(self._release)
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            cancel.set()

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    # ---- the worker's side ------------------------------------------------------------------------------

    def encode_sync(self, audio: Audio) -> AudioCodes:
        """Encode a clip with the audio tokenizer (resampling to its rate first)."""
        samples = audio.samples.astype(np.float32, copy=False)
        with torch.inference_mode():
            codes = self._codec.encode(samples, audio.sample_rate)
        return AudioCodes(codes.detach().to("cpu", torch.long))

    def _prompt(self, request: GenerationRequest) -> tuple[dict, int, int]:
        from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

        messages, clips = [], []
        for turn in request.turns:
            content: list = []
            if turn.text:
                content.append(TextContent(text=turn.text))
            if turn.audio is not None:
                content.append(AudioContent(audio_url=""))
                clips.append(turn.audio.codes)
            messages.append(Message(role=turn.role, content=content))
        tokens, _, _, _ = prepare_chatml_sample(ChatMLSample(messages=messages), self._tokenizer)
        if tokens is None:
            raise ValueError("the conversation could not be turned into a Higgs Audio prompt")
        tokens = tokens + (self._postfix_audio if request.audio_output else self._postfix_text)

        if clips:
            lengths = [c.shape[1] for c in clips]
            starts = torch.tensor(np.cumsum([0, *lengths[:-1]]), dtype=torch.long)
            concat = torch.cat(clips, dim=1)
        else:
            starts, concat = None, None
        sample = ChatMLDatasetSample(
            input_ids=torch.LongTensor(tokens),
            label_ids=None,
            audio_ids_concat=concat,
            audio_ids_start=starts,
            audio_waveforms_concat=None,
            audio_waveforms_start=None,
            audio_sample_rate=None,
            audio_speaker_indices=None,
        )
        inputs = {
            k: (v.to(self._model.device) if isinstance(v, torch.Tensor) else v)
            for k, v in asdict(self._serve.collator([sample])).items()
        }
        # The model replaces each audio placeholder by the clip's columns (frames plus the stream's
        # begin/end markers and the codebook delay), so that is what the context really holds.
        audio_columns = sum(
            int(inputs[key].shape[1])
            for key in ("audio_in_ids", "audio_out_ids")
            if inputs.get(key) is not None
        )
        placeholders = sum(1 for t in tokens if t in self._placeholder_ids)
        return inputs, len(tokens) - placeholders + audio_columns, audio_columns

    def generate_sync(
        self,
        request: GenerationRequest,
        listener: Callable[[StreamEvent], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Run one generation on the calling thread (the worker).

        With a ``listener``, ``Started`` and the audio/text pieces are passed to it as they are made, and
        the result carries no audio (it was all streamed). ``cancel`` stops the generation at the next step.
        """
        from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
        from transformers import StoppingCriteriaList

        started = time.perf_counter()
        inputs, prompt_tokens, prompt_audio = self._prompt(request)
        if prompt_tokens + request.max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"the prompt takes {prompt_tokens} tokens and {request.max_new_tokens} more were asked for, "
                f"but the context holds {self.max_context}; shorten the input or lower max_tokens"
            )
        prompt_len = int(inputs["input_ids"].shape[1])
        if listener is not None:
            listener(Started(prompt_tokens, prompt_audio))
        streamer = _IncrementalDecoder(self, listener, request.audio_output) if listener is not None else None
        guard = _Guard(self, cancel, request.time_limit)
        for cache in self._serve.kv_caches.values():
            cache.reset()
        with torch.inference_mode():
            sequences, audio_sequences = self._model.generate(
                **inputs,
                max_new_tokens=request.max_new_tokens,
                use_cache=True,
                # One audio answer per request: stop when its stream ends instead of sampling on.
                stop_strings=[
                    *END_TOKENS,
                    *(["<|audio_eos|>"] if request.audio_output else []),
                    *request.stop,
                ],
                tokenizer=self._tokenizer,
                do_sample=request.temperature > 0,
                temperature=request.temperature if request.temperature > 0 else None,
                top_k=request.top_k or None,
                top_p=request.top_p if request.temperature > 0 else None,
                past_key_values_buckets=self._serve.kv_caches,
                ras_win_len=request.ras_window or None,
                ras_win_max_num_repeat=2,
                seed=request.seed,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([guard]),
                # A text answer must not switch into audio mode half-way.
                suppress_tokens=None if request.audio_output else self._audio_start_ids,
            )
        new_text_ids = sequences[0, prompt_len:].tolist()
        text_ids = [t for t in new_text_ids if t not in self._placeholder_ids]
        text = self._tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        audio_columns = sum(int(seq.shape[1]) for seq in audio_sequences)

        audio, heard = None, []
        if request.audio_output:
            for seq in audio_sequences:
                codes = revert_delay_pattern(seq).clip(0, self._config.audio_codebook_size - 1)[:, 1:-1]
                if codes.shape[1] > 0:
                    heard.append(codes)
        if request.audio_output and audio_sequences and streamer is None:
            pieces = []
            for codes in heard:
                with torch.inference_mode():  # no autograd graph: it would hold the decoder's activations
                    pieces.append(self._codec.decode(codes.unsqueeze(0))[0, 0])
            samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
            audio = Audio(np.clip(samples, -1.0, 1.0).astype(np.float32), self.sample_rate)

        ended = bool(new_text_ids) and self._tokenizer.decode(new_text_ids[-1:]) in END_TOKENS
        if request.audio_output:
            ended = ended or any(
                bool((seq[:, -1] == self._config.audio_stream_eos_id).all()) for seq in audio_sequences[-1:]
            )
        completion = len(text_ids) + audio_columns
        stopped = guard.timed_out or not (ended or completion < request.max_new_tokens)
        # Frames heard: the columns less the begin marker, the codebook delay and the dropped last frame.
        frames = sum(max(0, int(seq.shape[1]) - self.num_codebooks - 1) for seq in audio_sequences)
        result = GenerationResult(
            text=text,
            audio=audio,
            finish_reason="length" if stopped else "stop",
            prompt_tokens=prompt_tokens,
            prompt_audio_tokens=prompt_audio,
            completion_tokens=completion,
            completion_audio_tokens=audio_columns,
            seconds=time.perf_counter() - started,
            audio_seconds=frames / self.frame_rate if request.audio_output else 0.0,
            codes=AudioCodes(torch.cat(heard, dim=1).to("cpu", torch.long)) if heard else None,
        )
        for observe in self.observers:
            observe(result)
        return result

    def warm_up(self) -> None:
        """One short clone generation, so the first request does not pay for lazy initialisation."""
        started = time.perf_counter()
        t = np.arange(int(self.sample_rate * 1.5), dtype=np.float32) / self.sample_rate
        tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
        reference = self.encode_sync(Audio(tone, self.sample_rate))
        turns = [
            Turn("system", SYSTEM_TEMPLATE.format(scene="Audio is recorded from a quiet room.")),
            Turn("user", "Warm up."),
            Turn("assistant", audio=reference),
            Turn("user", "Ready."),
        ]
        self.generate_sync(GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=0))
        self.generate_sync(GenerationRequest(turns[:2], False, 4, 0.7, 0.95, 50, seed=0))
        log.info("warm-up done in %.1f s", time.perf_counter() - started)


class _Guard:
    """Stopping criterion run after every decoding step: counts steps, honours cancellation and the
    wall-clock limit (``timed_out`` tells which stopped it)."""

    def __init__(self, engine: HiggsEngine, cancel: threading.Event | None, time_limit: float | None):
        self.engine = engine
        self.cancel = cancel
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.timed_out = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        self.engine.steps += 1
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
        stop = self.timed_out or (self.cancel is not None and self.cancel.is_set())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _IncrementalDecoder:
    """A transformers streamer that turns delay-pattern audio columns into audio pieces as they arrive.

    The model emits one column of codes per step; codebook ``c`` of column ``j`` belongs to frame ``j - c``,
    so a frame is complete once the column ``num_codebooks - 1`` steps later exists. The first column is the
    stream's begin marker; like the one-shot decode, the last frame is dropped at the end.
    """

    def __init__(self, engine: HiggsEngine, listener: Callable[[StreamEvent], None], audio_output: bool):
        from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

        self.engine = engine
        self.listener = listener
        self.audio_output = audio_output
        self.revert = revert_delay_pattern
        self.settings = engine.streaming
        self.codebooks = engine.num_codebooks
        self.samples_per_frame = engine.sample_rate // engine.frame_rate
        held = self.settings.context_frames * self.samples_per_frame
        self.crossfade = min(held, int(engine.sample_rate * self.settings.crossfade_ms / 1000))
        self.columns: list[torch.Tensor] = []
        self.text_ids: list[int] = []
        self.text_sent = 0  # characters of text sent
        self.prompt_seen = False
        self.sent = 0  # frames sent
        self.tail: np.ndarray | None = None  # the previous decode of the samples the next piece starts with

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # transformers passes the prompt first
            self.prompt_seen = True
            return
        value = value.reshape(-1)
        if value.numel() == self.codebooks:
            if not self.audio_output:
                return
            self.columns.append(value)
            ready = len(self.columns) - self.codebooks  # complete frames after the begin marker
            hold = self.settings.context_frames
            chunk = self.settings.first_chunk_frames if self.sent == 0 else self.settings.chunk_frames
            if ready - hold - self.sent >= chunk:
                self._send(ready - hold, ready)
        elif not self.audio_output:
            self.text_ids.extend(t for t in value.tolist() if t not in self.engine._placeholder_ids)
            self._send_text(final=False)

    def _send_text(self, final: bool) -> None:
        text = self.engine._tokenizer.decode(self.text_ids, skip_special_tokens=True)
        # A token may end inside a multi-byte character: wait for the rest of it.
        if len(text) > self.text_sent and (final or not text.endswith("\ufffd")):
            self.listener(TextPiece(text[self.text_sent :]))
            self.text_sent = len(text)

    def end(self) -> None:
        final = len(self.columns) - self.codebooks - 1
        if final > self.sent:
            self._send(final, final)
        if self.text_ids:
            self._send_text(final=True)

    def _send(self, upto: int, available: int) -> None:
        """Send frames [sent, upto), decoding [sent - context, available)."""
        first = max(0, self.sent - self.settings.context_frames)
        codes = self.revert(torch.stack(self.columns, dim=1))[:, 1 + first : 1 + available]
        codes = codes.clip(0, self.engine._config.audio_codebook_size - 1)
        with torch.inference_mode():
            decoded = self.engine._codec.decode(codes.unsqueeze(0))[0, 0]
        spf = self.samples_per_frame
        start, stop = (self.sent - first) * spf, (upto - first) * spf
        piece = np.array(decoded[start:stop], dtype=np.float32)
        if self.tail is not None:
            n = min(len(self.tail), len(piece))
            fade = np.linspace(0.0, 1.0, n, dtype=np.float32)
            piece[:n] = self.tail[:n] * (1.0 - fade) + piece[:n] * fade
        self.tail = np.array(decoded[stop : stop + self.crossfade], dtype=np.float32)
        self.sent = upto
        self.listener(AudioPiece(np.clip(piece, -1.0, 1.0)))
