"""The Higgs Audio engine: continuous batching over the model that ``higgs.py`` loads.

Requests are served by continuous batching: one scheduler thread owns the model and a ``BatchDecoder``
(``decoder.py``) with a fixed number of slots; each loop it takes waiting requests into free slots (up to
``prefill_batch``), has the prefill thread fill their slots (on CUDA in one forward pass, on a stream of its
own, while the loop goes on stepping: ``prefill_beside_steps``), then runs one decoding step for every running
request. A request joins at the step after its fill is done and leaves when it ends, is cancelled, or hits its
token or time limit, without disturbing the others. A second thread (on CUDA with its own stream of high
priority) owns the audio codec: it turns the audio pieces that are due into samples, first pieces first, the
same-length pieces of several streams in one call, and encodes reference clips; on a CPU, where the two
threads share the cores, the loop pauses while a first piece is due.
Prompts are built, and their length checked, before a request is queued, off both threads. A non-streamed
answer is the collected stream.
It implements ``generation.Engine``: callers get the typed results of ``generation.py``, never tensors of
the model's layout.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextvars
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing, nullcontext
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import numpy as np
import torch

from audio import Audio
from audio_stream import (
    GATHER,
    AudioStream,
    CodecWork,
    Decode,
    Encode,
    End,
    Layout,
    Piece,
    codec_due_in,
    is_first,
    next_codec_work,
)
from codec import PieceDecoder
from decoder import Admission, Launched, Sampling
from detokenize import Detokenizer
from generation import (
    STEP_GPU_WAITS,
    SYSTEM_TEMPLATE,
    AudioCodes,
    AudioPiece,
    EngineBusy,
    EngineFailure,
    EngineStats,
    EngineWork,
    GenerationRequest,
    GenerationResult,
    Started,
    StreamEvent,
    StreamSettings,
    TextPiece,
    Turn,
)
from higgs import Higgs, Prompt
from prefill import Filled
from shutdown import SHUTTING_DOWN

log = logging.getLogger(__name__)

T = TypeVar("T")

GPU_HEADROOM_GB = 3.0
"""GPU memory (GiB) left free beside the KV cache when ``HIGGS_KV_CACHE_GB`` is not set: a batched
prefill's activations (``PREFILL_TOKENS`` tokens), the CUDA graphs' buffers, the codec's pieces. An
estimate: the start-up log's ``warm-up done`` line says what was left free."""
CPU_KV_CACHE_GB = 16.0
"""The KV cache's budget (GiB) on the CPU when ``HIGGS_KV_CACHE_GB`` is not set."""
PREFILL_BATCH = 8
"""Most waiting requests admitted (and prefilled together) in one turn of the loop, by default."""
PREFILL_TOKENS = 4096
"""Most tokens (rows x the longest prompt, padding included) one prefill of several requests may take: its
activations grow with it, and the requests admitted after it wait for it (where the loop waits for fills,
``prefill_beside_steps`` off, so does every running stream)."""
CPU_CODEC_FRAMES = 32
"""Most frames one codec call decodes on a CPU, same-length pieces of several streams together. Measured
with the tiny codec (the real decoder's 1,024 channels) on this project's 2-core CPU, against the same
pieces one by one: first pieces (8 frames) 2 at a time took 0.72x the time, 4 at a time 0.64x, 8 at a time
0.76x (the activations outgrow the caches); later pieces (20 frames) 2 at a time 0.97x, 4 at a time 1.11x.
So first pieces go 4 at a time, later ones alone."""
HOLD_SECONDS = 1.0
"""How long the slot of a generation with ``keep_slot`` waits for the answer's next piece once this one's
result went out. The next piece's prompt needs this piece's audio codes, which come with the result, after
its last audio is decoded; the next piece then arrives when its prompt is built (milliseconds). When the
answer knows that none will come (the client left, ``max_tokens`` ran out) it says so (``release_slot``) and
the slot goes back at once; this bounds what a next piece that never comes costs the line otherwise."""
HOLD_WHILE_DECODING = 30.0
"""The longest a kept slot waits for its generation's last audio to be decoded (the codec's backlog, on a
CPU under load seconds; a failed stream gives its slot back at once)."""
HOLD_FROM_NEWCOMERS = 2.0
"""The longest a kept slot is kept from a new request waiting for one, from the end of its piece's tokens.
On a GPU the piece's last audio, its result and the next piece's prompt come well within it. On a CPU under
load the codec can be seconds behind, and the slot sat idle that long while new requests waited (a trial: 4
long texts on 4 slots kept 3 slots idle most of the time, and short requests waited 28 to 36 s for their
first audio against 0.35 s alone). The next piece then takes the next slot that is free: continuations lead
the line."""

JOB_SECONDS = 5.0
"""A request's time from its slot to its result, assumed until results are measured (Retry-After's unit: a
429 says ``ceil(line / slots)`` of them). The warm-up's answers, a few tokens long, do not count."""


@dataclass(frozen=True)
class RateSample:
    """The decoding loop's counts at one moment: for ``decoding_rates``."""

    time: float  # monotonic
    steps: int  # batched steps
    frames: int  # audio frames decoded into tokens
    busy: float  # seconds the loop has worked since start (its scheduler counters' sum)


def decoding_rates(samples: list[RateSample], frame_rate: float) -> tuple[float, float]:
    """Batched steps and audio seconds per second of decoding, from the first of ``samples`` to the last:
    per second the loop worked, so that an idle spell between them does not dilute them (over wall time,
    a request after a pause of 4.5 s showed 41 steps per second where it ran 190)."""
    first, last = samples[0], samples[-1]
    busy = last.busy - first.busy
    if busy <= 0:
        return 0.0, 0.0
    return (last.steps - first.steps) / busy, (last.frames - first.frames) / frame_rate / busy


def _is_fatal(exc: BaseException) -> bool:
    """Errors after which CUDA (and so the engine) cannot be trusted: the process must be restarted."""
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and not isinstance(exc, torch.cuda.OutOfMemoryError)
        and ("CUDA error" in text or "device-side assert" in text or "illegal memory access" in text)
    )


def kv_slots(wanted: int, slot_bytes: int, tokens: int, budget_gb: float | None, free: int | None) -> int:
    """How many slots to make: ``wanted``, fewer where the KV cache's budget does not hold them. The budget
    is ``budget_gb`` when set (``HIGGS_KV_CACHE_GB``); else, on a GPU, the ``free`` bytes it has once the
    models are loaded less ``GPU_HEADROOM_GB``, and on the CPU ``CPU_KV_CACHE_GB``. Raises, saying what to
    change, when not one slot of ``tokens`` tokens (``slot_bytes``) fits."""
    gib = 1024**3
    if budget_gb is not None:
        budget, source = budget_gb * gib, f"HIGGS_KV_CACHE_GB={budget_gb:g}"
    elif free is not None:
        budget = free - GPU_HEADROOM_GB * gib
        source = (
            f"the GPU's {free / gib:.1f} GiB free once the models are loaded, less {GPU_HEADROOM_GB:g} GiB "
            "of headroom"
        )
    else:
        budget, source = CPU_KV_CACHE_GB * gib, f"the CPU's default budget of {CPU_KV_CACHE_GB:g} GiB"
    fit = max(0, int(budget // slot_bytes))
    if fit < 1:
        raise RuntimeError(
            f"one slot of {tokens} tokens needs {slot_bytes / gib:.2f} GiB of KV cache, more than {source}; "
            "lower HIGGS_KV_CACHE_LENGTHS (e.g. [1024, 2048] for speech without long voice references)"
            + (" or raise HIGGS_KV_CACHE_GB" if budget_gb is not None else "")
        )
    slots = min(wanted, fit)
    if fit < wanted:
        log.warning(
            "the KV cache's budget (%s) holds %d slots of %d tokens, not %d",
            source,
            fit,
            tokens,
            wanted,
        )
    if budget_gb is not None and free is not None and free - slots * slot_bytes < GPU_HEADROOM_GB * gib:
        log.warning(
            "HIGGS_KV_CACHE_GB=%g leaves %.1f GiB of the GPU free for prefills, CUDA graphs and the codec",
            budget_gb,
            (free - slots * slot_bytes) / gib,
        )
    return slots


def _free_memory(device: str) -> int | None:
    """Bytes free on the GPU (every process's use counted), or None on the CPU."""
    return torch.cuda.mem_get_info()[0] if device == "cuda" else None


@dataclass
class _Hold:
    """A slot kept for a generation's next piece: since its tokens ended, and until when at most."""

    since: float
    until: float

    def ends(self, newcomer_waiting: bool) -> float:
        """When the slot is free for anyone: at ``until``, sooner while a new request waits for it."""
        return min(self.until, self.since + HOLD_FROM_NEWCOMERS) if newcomer_waiting else self.until


class _Job:
    """One admitted request, from the waiting line to its result."""

    def __init__(self, request: GenerationRequest, prompt: Prompt, emit: Callable, cancel: threading.Event):
        self.request = request
        self.prompt = prompt
        self.emit = emit
        self.cancel = cancel
        self.context = contextvars.copy_context()  # the request id, for log lines on the worker threads
        self.queued = time.monotonic()
        self.started = 0.0  # taken into a slot (monotonic)
        self.joined = 0.0  # its first token taken (monotonic)
        self.deadline = math.inf
        self.slot = -1
        self.admission: Admission | None = None  # from when it is taken into a slot
        self.steps = 0
        self.text: Detokenizer | None = None  # a text answer's, from its first token
        self.stream: AudioStream | None = None
        self.failed = False
        self.counted = True  # counts against the engine's bound until it leaves its slot or the line
        self.finishing = False  # out of its slot, counted until the codec ends its audio


@dataclass
class _Prefill:
    """Prompts being filled into their slots on the prefill thread (``HiggsEngine._fill``). It gives back
    the groups it filled, each with its ``Filled`` or the failure that fails its requests alone, and on
    CUDA the event after its last kernel."""

    jobs: list[_Job]
    future: Future[tuple[list[tuple[list[_Job], Filled | BaseException]], torch.cuda.Event | None]]

    def ready(self) -> bool:
        """Whether the fill is done, on the GPU too (``occupy`` then waits for nothing)."""
        if not self.future.done():
            return False
        try:
            ready = self.future.result()[1]
        except BaseException:
            return True
        return ready is None or ready.query()


class HiggsEngine:
    """Higgs Audio v2 with continuous batching: a scheduler thread with ``slots`` rows, a codec thread."""

    def __init__(
        self,
        model: str,
        audio_tokenizer: str,
        device: str,
        dtype: str,
        kv_cache_lengths: list[int],
        streaming: StreamSettings | None = None,
        max_queue: int | None = None,
        max_batch_size: int = 8,
        kv_cache_gb: float | None = None,
        cuda_graphs: bool = True,
        prefill_graphs: bool = True,
        prefill_batch: int | None = None,
        prefill_beside_steps: bool | None = None,
        attention_by_lengths_from: int | None = None,
        codec_gather: float | None = None,
        lookahead_steps: int | None = None,
    ):
        started = time.perf_counter()
        self.device = device
        self.higgs = Higgs(model, audio_tokenizer, "cuda:0" if device == "cuda" else device, dtype)
        """The loaded model, tokenizers and codec (``higgs.py``)."""
        higgs = self.higgs
        self.sample_rate = higgs.sample_rate
        self.frame_rate = higgs.frame_rate
        self.num_codebooks = higgs.num_codebooks
        slot_length = max(kv_cache_lengths)
        lookahead_steps = lookahead_steps or (2 if device == "cuda" else 1)
        self.max_context = slot_length - (lookahead_steps - 1)
        """Most prompt and output tokens of a request: a slot's length, less the positions that the steps
        launched ahead (``lookahead_steps``) past a request's last token write into."""
        self.slots = kv_slots(
            max_batch_size,
            higgs.kv_bytes(slot_length),
            slot_length,
            kv_cache_gb,
            _free_memory(device),
        )
        """Requests decoded together (rows of the batch)."""
        self._decoder = higgs.decoder(
            self.slots, slot_length, graphs=cuda_graphs, length_buckets=sorted(kv_cache_lengths)
        )
        if attention_by_lengths_from is not None:
            self._attend_by_lengths(attention_by_lengths_from)
        self._check_own_prefill(together=device == "cuda" and self.slots > 1)

        self.streaming = streaming or StreamSettings()
        self._layout = Layout(
            self.streaming,
            self.num_codebooks,
            higgs.codebook_size,
            self.sample_rate,
            self.frame_rate,
        )
        self._pieces = PieceDecoder(
            higgs.codec,
            codebooks=self.num_codebooks,
            codebook_size=higgs.codebook_size,
            graphs=cuda_graphs,
        )
        if cuda_graphs and device == "cuda":
            took = time.perf_counter()
            reserved = torch.cuda.memory_reserved()
            steps = self._decoder.capture_graphs()
            fills = 0
            if prefill_graphs:
                fills = self._decoder.capture_prefill_graphs(prefill_batch or PREFILL_BATCH, PREFILL_TOKENS)
            piece = self.streaming
            lengths = [piece.first_piece_frames, piece.piece_frames]  # (``AudioStream.cut``)
            pieces = self._pieces.capture(lengths, self._decoder.row_buckets())
            if self._pieces.graphed(piece.piece_frames):  # streams' ends too, at that length
                self._layout = replace(self._layout, end_frames=piece.piece_frames)
            torch.cuda.empty_cache()  # the warm-ups' blocks; the graphs keep their own pools
            log.info(
                "captured %d CUDA graphs of the decoding step, %d of the prefill and %d of the codec in "
                "%.1f s; GPU memory reserved by PyTorch %.2f GiB before, %.2f GiB after",
                steps,
                fills,
                pieces,
                time.perf_counter() - took,
                reserved / 1024**3,
                torch.cuda.memory_reserved() / 1024**3,
            )
        self.steps = 0
        """Decoding steps run since start, counted per request (a step of 8 rows counts 8)."""
        self._work = EngineWork()
        self.max_queue = max_queue or 2 * self.slots
        """Most jobs (running or waiting) the engine takes; more are refused with ``EngineBusy``."""
        self.prefill_batch = prefill_batch or PREFILL_BATCH
        """Most waiting requests admitted in one turn of the loop: a burst starts decoding together."""
        self.prefill_in_one_pass = device == "cuda"
        """Prefill a turn's admissions in one forward pass, their prompts padded. On the CPU each prompt has
        its own pass: a padded row's cache differs from its solo prefill by rounding, and there an answer's
        tokens are those of the request alone (tested)."""
        self.prefill_beside_steps = device == "cuda" if prefill_beside_steps is None else prefill_beside_steps
        """Go on stepping the running requests while the prefill thread fills the next ones' slots (on CUDA
        on a stream of its own), and let them join when it is done. By default not on a CPU, where the loop
        waits for the fill: the two would share two cores, and a step's time is its computation's."""
        self.lookahead = device == "cuda"
        """Launch each step before taking the previous one's tokens (on the CPU a step is done when launched,
        so there it would only delay every token by a step)."""
        self.lookahead_steps = lookahead_steps
        """With ``lookahead``, the steps launched and not yet taken after each launch: 1, a step runs on the
        GPU while the host takes the one before; 2 (CUDA's default), the host may be late by up to a step's
        time without the GPU waiting (``higgs_step_gpu_seconds_total{work="between"}`` counts what it
        waits), each finished row's slot freed a step later and every token read a step later."""
        self._in_flight: deque[tuple[Launched, dict[int, _Job]]] = deque()  # launched, oldest first
        self.failure: str | None = None
        """Set when CUDA failed in a way that needs a restart; the engine refuses work from then on."""
        self.observers: list[Callable[[GenerationResult], None]] = []
        """Called on a worker thread with every finished generation (metrics)."""
        self._pending = 0
        self._finishing = 0  # of ``_pending``: out of their slots, their audio still with the codec
        self._pending_lock = threading.Lock()
        self._prompt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="higgs-prompt")
        self._prefill_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="higgs-prefill")
        self._prefill_stream = torch.cuda.Stream() if device == "cuda" else None
        self._prefilling: _Prefill | None = None  # one fill at a time (scheduler thread)
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._running: dict[int, _Job] = {}
        self._held: dict[_Job, _Hold] = {}  # the ended jobs whose slots are kept
        self._closing = False
        self._job_seconds = JOB_SECONDS  # a request's time from slot to result (moving average)
        self._rates: deque[RateSample] = deque()  # sampled while decoding, over the last 10 s
        self._frames = 0
        self._codec_queue: queue.SimpleQueue = queue.SimpleQueue()  # lists of ``CodecWork``, or None to stop
        self._handover: list[CodecWork] = []  # the scheduler's items for the codec this turn
        # High priority: the decoding loop replays its graphs back to back, and a listener waits on the codec.
        self._codec_stream = torch.cuda.Stream(priority=-1) if device == "cuda" else None
        self.yield_to_first_pieces = self._codec_stream is None
        """Pause decoding while a stream's first piece waits for the codec or is being decoded. On a CPU the
        two threads share the cores (a first piece took the tiny codec 0.097 s beside the loop, 0.059 s with
        the loop paused: ``bench/bench_batching.py``), so the codec's priority is that the loop steps aside;
        on CUDA the codec has a stream of higher priority than the loop's."""
        self.first_piece_wait = 0 if self._codec_stream is not None else 1
        """Steps a due first piece may wait for another stream's, due at the next step, so that they share a
        codec call. On a CPU the loop steps aside for each call, and 4 first pieces in one call took 0.64x
        the time of one by one (``CPU_CODEC_FRAMES``): a burst whose requests were admitted a turn apart
        is heard sooner, the earliest a step later. On CUDA the codec runs beside the loop."""
        self._first_pieces = 0  # first pieces queued for the codec or being decoded (under ``_cond``)
        self.codec_gather = (
            (GATHER if self._codec_stream is not None else 0.0) if codec_gather is None else codec_gather
        )
        """Seconds a stream's later piece may wait for other streams' to share its codec call
        (``codec_due_in``). By default ``GATHER`` on CUDA, where a call costs about the same whatever its
        batch, and none on a CPU, where later pieces are decoded one by one (``CPU_CODEC_FRAMES``)."""
        self._codec_batch = max(self._decoder.row_buckets()) if self._pieces.graphs_enabled else None
        """Most pieces in one codec call on CUDA: the largest batch its graphs replay."""
        self._scheduler = threading.Thread(target=self._schedule, name="higgs-decoder", daemon=True)
        self._codec_thread = threading.Thread(target=self._codec_work, name="higgs-codec", daemon=True)
        self._scheduler.start()
        self._codec_thread.start()
        log.info(
            "loaded %s on %s (%s) in %.1f s; %d slots of %d tokens; audio at %d Hz, %d frames/s",
            model,
            device,
            higgs.model.dtype,
            time.perf_counter() - started,
            self.slots,
            self._decoder.max_len,
            self.sample_rate,
            self.frame_rate,
        )

    # ---- the async face ------------------------------------------------------------------------------------

    @property
    def lookahead_steps(self) -> int:
        return self._decoder.host_buffers - 1

    @lookahead_steps.setter
    def lookahead_steps(self, steps: int) -> None:
        self._decoder.host_buffers = steps + 1  # (the buffers the steps in flight and the one read use)

    @property
    def pending(self) -> int:
        """Jobs holding a slot, waiting for one or being prepared, and reference encodings. A generation
        counts until its slot is free (not merely until its client left), so this is the engine's load."""
        return self._pending

    @property
    def retry_after(self) -> float:
        """Seconds after which a refused request would likely find room, from the measured rate."""
        with self._cond:
            ahead = len(self._waiting) + 1
        return float(min(120.0, max(1.0, self._job_seconds * math.ceil(ahead / self.slots))))

    def stats(self) -> EngineStats:
        """Slots in use, the waiting line, and the measured steps and audio per second (last 10 s)."""
        now = time.monotonic()
        with self._cond:
            busy, waiting = len(self._running), len(self._waiting)
            newcomer = self._newcomer_waiting()
            kept = sum(1 for hold in self._held.values() if hold.ends(newcomer) > now)
            rates = list(self._rates)
        steps_per_second = audio_per_second = 0.0
        if rates and now - rates[-1].time < 2.0:
            steps_per_second, audio_per_second = decoding_rates(rates, self.frame_rate)
        return EngineStats(
            self.slots, busy, waiting, steps_per_second, audio_per_second, kept, finishing=self._finishing
        )

    @property
    def batch_steps(self) -> int:
        """Batched steps run since start (one forward pass each, whatever the number of rows)."""
        return self._work.steps

    def work(self) -> EngineWork:
        """Where the time went since start (a copy)."""
        done = self._work
        return replace(
            done,
            scheduler=dict(done.scheduler),
            codec=dict(done.codec),
            codec_calls=dict(done.codec_calls),
            step_gpu=dict(done.step_gpu),
            step_gpu_waits=list(done.step_gpu_waits),
        )

    def _admit(self, continues: bool = False) -> None:
        if self.failure is not None:
            raise EngineFailure(f"the engine failed and needs a restart: {self.failure}", "engine_failed")
        with self._pending_lock:
            if self._pending < self.max_queue or continues:
                self._pending += 1
                return
        raise EngineBusy.full(self._pending, self.retry_after, self._finishing)

    def _release(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _let_go(self, job: _Job) -> None:
        """``job`` holds no slot and no place in the line any more: it stops counting (once)."""
        with self._pending_lock:
            if job.counted:
                job.counted = False
                self._pending -= 1
                if job.finishing:
                    job.finishing = False
                    self._finishing -= 1

    @property
    def finishing(self) -> int:
        """Of ``pending``: requests whose tokens ended and whose audio the codec is still decoding."""
        return self._finishing

    def _guarded(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn``, turning GPU failures into errors the client can be told about."""
        try:
            return fn(*args, **kwargs)
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

    async def encode(self, audio: Audio) -> AudioCodes:
        self._admit()
        try:
            future: Future[AudioCodes] = Future()
            self._codec_queue.put([Encode(audio, future, contextvars.copy_context())])
            return await asyncio.wrap_future(future)
        finally:
            self._release()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one generation: the collected stream."""
        pieces: list[np.ndarray] = []
        result: GenerationResult | None = None
        async with aclosing(self._events(request)) as events:
            async for event in events:
                if isinstance(event, AudioPiece):
                    pieces.append(event.samples)
                elif isinstance(event, GenerationResult):
                    result = event
        if result is None:  # the engine was closed under it
            raise EngineFailure("the engine stopped before the generation ended", "engine_closed")
        if not request.audio_output:
            return result
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return replace(result, audio=Audio(samples, self.sample_rate))

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        return self._events(request)

    async def check_context(self, request: GenerationRequest) -> None:
        await self._prompt(request)

    async def text_tokens(self, text: str, limit: int | None) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prompt_pool, self.higgs.text_tokens, text, limit)

    async def _prompt(self, request: GenerationRequest) -> Prompt:
        """``request``'s prompt, built off the event loop (in the caller's context, for its log lines)."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prompt_pool, context.run, self._prepare, request)

    async def _events(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self._admit(request.continues)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: StreamEvent | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the consumer's loop is gone
                cancel.set()

        job: _Job | None = None
        ended = False  # the result went out
        try:
            prompt = await self._prompt(request)
            with self._cond:
                if self._closing:
                    raise EngineFailure(SHUTTING_DOWN, "engine_closed")
                job = _Job(request, prompt, emit, cancel)
                if request.continues:  # behind the other continuations, ahead of new requests
                    at = next((i for i, j in enumerate(self._waiting) if not j.request.continues), None)
                    self._waiting.insert(len(self._waiting) if at is None else at, job)
                else:
                    self._waiting.append(job)
                self._cond.notify()
            yield Started(prompt.tokens, prompt.audio_tokens)
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                ended = isinstance(item, GenerationResult)
                yield item
                if ended:
                    return
        finally:
            # A job still in the line leaves it now; one in a slot counts until the scheduler frees the
            # slot (before its next step), one that ended already stopped counting. One left before its
            # result (its client went) has no next piece: a slot kept for that goes back now.
            cancel.set()
            if job is not None and not ended:
                self._hold_ends(job, 0.0)
            with self._cond:
                waiting = job is not None and job in self._waiting
                if waiting:
                    self._waiting.remove(job)
                self._cond.notify()
            if job is None:
                self._release()
            elif waiting:
                self._left_the_line(job)

    def release_slot(self, request: GenerationRequest) -> None:
        with self._cond:
            held = [job for job in self._held if job.request is request]
        for job in held:
            self._hold_ends(job, 0.0)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._scheduler.join(timeout=30)
        self._prefill_pool.shutdown(wait=True, cancel_futures=True)
        self._codec_queue.put(None)
        self._codec_thread.join(timeout=30)
        self._prompt_pool.shutdown(wait=True, cancel_futures=True)

    def _attend_by_lengths(self, shortest: int) -> None:
        """Let each step in the length buckets of ``shortest`` positions or more read each row's own keys
        (``BatchDecoder.by_lengths_from``) where its kernel answers as the masked attention on this device
        and dtype (``check_attention_by_lengths``); elsewhere the log says why attention stays masked (a
        warning where the kernel should be there: CUDA in 16 bits)."""
        decoder = self._decoder
        buckets = [b for b in decoder.length_buckets if b >= shortest]
        if not buckets:
            log.info(
                "attention by each row's length: no length bucket of %d positions or more (%s)",
                shortest,
                decoder.length_buckets,
            )
            return
        agree, seen = decoder.check_attention_by_lengths()
        if agree:
            decoder.by_lengths_from = shortest
            log.info("attention by each row's length: on in the length buckets %s (%s)", buckets, seen)
            return
        if self.device != "cuda" or decoder.dtype == torch.float32:  # FlashAttention has no kernel here
            log.info(
                "attention by each row's length (HIGGS_ATTENTION_BY_LENGTHS) is off on %s in %s: its kernel "
                "is CUDA's, in 16 bits; attention stays masked",
                self.device,
                decoder.dtype,
            )
            log.debug("attention by each row's length: the check found %s", seen)
            return
        log.warning(
            "attention by each row's length (HIGGS_ATTENTION_BY_LENGTHS) is off: its kernel does not answer "
            "as the masked attention on %s in %s (%s)",
            self.device,
            decoder.dtype,
            seen,
        )

    def _check_own_prefill(self, together: bool) -> None:
        """Whether the decoder's own prefill layers answer as upstream's forward on this device and dtype
        (``Prefiller.check_own``), on a default-voice prompt and one with a voice reference
        (random codes), padded together where prefills are batched (``together``). Where they do not, or
        fail, every prompt is prefilled by upstream's forward from then on, and the log says so."""
        started = time.perf_counter()
        scene = Turn("system", SYSTEM_TEMPLATE.format(scene="Audio is recorded from a quiet room."))
        draw = torch.Generator().manual_seed(0)
        codes = AudioCodes(
            torch.randint(0, self.higgs.codebook_size, (self.num_codebooks, 10), generator=draw)
        )
        requests = [
            GenerationRequest([scene, Turn("user", "Check the prefill.")], True, 8, 0.7, 0.95, 50, seed=0),
            GenerationRequest(
                [scene, Turn("user", "Say it."), Turn("assistant", audio=codes), Turn("user", "Now.")],
                True, 8, 0.7, 0.95, 50, seed=0,
            ),
        ]  # fmt: skip
        prompts = [self._prepare(r) for r in requests]
        admissions = [
            self._admission(r, p, i if together else 0)
            for i, (p, r) in enumerate(zip(prompts, requests, strict=True))
        ]
        if together:
            groups = [(admissions, self.higgs.collate([p.sample for p in prompts]))]
        else:
            groups = [([a], None) for a in admissions]
        agree, seen = self._decoder.prefiller.check_own(groups)
        if agree:
            log.info(
                "prefill: the decoder's own layers answer as upstream's forward (%s; checked in %.2f s)",
                seen,
                time.perf_counter() - started,
            )
        else:
            log.warning(
                "the decoder's own prefill layers do not answer as upstream's forward on %s (%s, %s): "
                "prompts are prefilled by upstream's forward, which is slower",
                self.device,
                self._decoder.dtype,
                seen,
            )

    # ---- prompts (off the worker threads, before admission) ------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> Prompt:
        """The model's inputs for ``request``, refused when prompt plus output do not fit the context."""
        return self.higgs.prompt(request, self.max_context)

    # ---- the scheduler thread ----------------------------------------------------------------------------

    def _schedule(self) -> None:
        spent = self._work.scheduler
        while True:
            with self._cond:
                while not self._closing and (
                    (not self._waiting and not self._running and self._prefilling is None)
                    or (self._first_pieces and self.yield_to_first_pieces)
                ):
                    pausing = bool(self._first_pieces and (self._waiting or self._running))
                    waited = time.perf_counter()
                    self._cond.wait()
                    if pausing:
                        spent["paused"] += time.perf_counter() - waited
                if self._closing:
                    break
                jobs = self._admissible() if self._prefilling is None else []
                if not jobs and not self._running and self._prefilling is None and self._held:
                    # The waiting requests wait for slots kept for continuations: until one comes, a
                    # result goes out (its hold shortens) or the earliest hold ends.
                    newcomer = self._newcomer_waiting()
                    ends = min(hold.ends(newcomer) for hold in self._held.values())
                    self._cond.wait(max(0.0, ends - time.monotonic()))
                    continue
            try:
                for running in list(self._running.values()):
                    if running.cancel.is_set():  # the client left, or its audio failed: free the slot now
                        self._abandon(running)
                for job in jobs:
                    if job.cancel.is_set():
                        self._left_the_line(job)
                jobs = [job for job in jobs if not job.cancel.is_set()]
                started = time.perf_counter()
                if jobs:
                    self._begin_prefill(jobs)
                prefill = self._prefilling
                if prefill is not None and (
                    not self._running or not self.prefill_beside_steps or prefill.ready()
                ):
                    self._end_prefill(prefill)
                    spent["prefill"] += time.perf_counter() - started
                if self._running:
                    self._step()
            except BaseException as exc:  # a bug here must not stop the engine for every later request
                log.exception("the scheduler failed; failing the requests it was decoding or admitting")
                self._in_flight.clear()
                for running in list(self._running.values()):
                    running.emit(exc)
                    self._leave(running)
                if self._prefilling is not None:  # its slots are written until the fill ends
                    concurrent.futures.wait([self._prefilling.future])
                    jobs = [*jobs, *self._prefilling.jobs]
                    self._prefilling = None
                for job in dict.fromkeys(jobs):  # taken from the line, not decoding yet
                    if job.counted:
                        if job.slot >= 0 and job.slot not in self._running:
                            self._decoder.release(job.slot)
                        job.emit(exc)
                        self._let_go(job)
            finally:
                self._hand_over()
        if self._prefilling is not None:
            concurrent.futures.wait([self._prefilling.future])
        prefilling = self._prefilling.jobs if self._prefilling is not None else []
        for job in [*self._running.values(), *prefilling, *self._waiting]:
            job.emit(EngineFailure(SHUTTING_DOWN, "engine_closed"))
            self._let_go(job)

    def _hand_over(self) -> None:
        """Give the codec thread this turn's pieces and ends in one item, so that the pieces of streams that
        stepped together are decoded together (put one by one, the codec thread would wake at the first)."""
        if self._handover:
            self._codec_queue.put(self._handover)
            self._handover = []

    def _to_codec(self, item: CodecWork) -> None:
        """Queue ``item`` for the codec with the rest of this turn's (``_hand_over``)."""
        self._handover.append(item)

    def _first_piece_cut(self) -> None:
        """A stream's first piece is queued: counted until the codec thread is done with it
        (``_codec_work``), while which a CPU's decoding loop steps aside."""
        with self._cond:
            self._first_pieces += 1

    def _admissible(self) -> list[_Job]:
        """The waiting requests to prefill now (under the lock): as many as there are free slots, at most
        ``prefill_batch``, and a batch's padded prompts within ``PREFILL_TOKENS``. A slot kept for a
        continuation (``keep_slot``) goes to the first continuation in the line (they lead it), to nobody
        else until its hold ends (``_Hold.ends``)."""
        now = time.monotonic()
        newcomer = self._newcomer_waiting()
        for ended in [ended for ended, hold in self._held.items() if hold.ends(newcomer) <= now]:
            del self._held[ended]
        jobs: list[_Job] = []
        longest = 0
        free = self.slots - len(self._running)
        while self._waiting and len(jobs) < min(free, self.prefill_batch):
            job = self._waiting[0]
            kept = bool(job.request.continues and self._held)
            if not kept and free - len(jobs) <= len(self._held):
                break  # the free slots left are kept for continuations
            longest = max(longest, job.prompt.tokens)
            if jobs and longest * (len(jobs) + 1) > PREFILL_TOKENS:
                break
            if kept:
                del self._held[min(self._held, key=lambda held: self._held[held].until)]
            jobs.append(self._waiting.popleft())
        return jobs

    def _newcomer_waiting(self) -> bool:
        """Whether the head of the line is a new request, not an answer's next piece (under the lock)."""
        return bool(self._waiting) and not self._waiting[0].request.continues

    def _sampling(self, request: GenerationRequest) -> Sampling:
        return Sampling(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            ras_window=request.ras_window,
            seed=request.seed,
        )

    def _admission(self, request: GenerationRequest, prompt: Prompt, slot: int) -> Admission:
        """``request`` (its ``prompt`` built) as the decoder takes it into ``slot``."""
        return Admission(slot, prompt.inputs, request.audio_output, self._sampling(request), prompt.tokens)

    def _start(self, job: _Job, slot: int) -> None:
        job.slot = slot
        job.started = time.monotonic()
        if job.request.time_limit is not None:
            job.deadline = job.started + job.request.time_limit

    def _begin_prefill(self, jobs: list[_Job]) -> None:
        """Take ``jobs`` into free slots and hand their prompts to the prefill thread (``_fill``)."""
        slots = self._decoder.free_slots(len(jobs))
        self._decoder.reserve(slots)
        for job, slot in zip(jobs, slots, strict=True):
            self._start(job, slot)
            job.admission = self._admission(job.request, job.prompt, slot)
        after = None
        if self._prefill_stream is not None:  # after the steps launched so far, which may write the slots
            after = torch.cuda.Event()
            after.record()
        if self.prefill_beside_steps:
            future = self._prefill_pool.submit(self._fill, jobs, after)
        else:
            # On this thread: the loop would wait for the fill anyway, and on a CPU another computing thread
            # slows every parallel operation (GNU OpenMP's workers stop spinning when they outnumber the
            # cores: `bench/RESULTS.md`, "Batching").
            future = Future()
            future.set_result(self._fill(jobs, after))
        self._prefilling = _Prefill(jobs, future)

    def _fill(
        self, jobs: list[_Job], after: torch.cuda.Event | None
    ) -> tuple[list[tuple[list[_Job], Filled | BaseException]], torch.cuda.Event | None]:
        """On the prefill thread (the loop's, where fills do not run beside the steps): fill ``jobs``' slots,
        with ``prefill_in_one_pass`` in one forward pass, their samples collated (padded on the left); when
        that fails, or without it, each alone, so that a fault fails its own request only. Returns the
        groups filled, with their ``Filled`` or failure, and on CUDA the event after the last kernel."""
        stream = self._prefill_stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if after is not None:
                stream.wait_event(after)
            groups: list[tuple[list[_Job], Filled | BaseException]] = []
            if len(jobs) > 1 and self.prefill_in_one_pass:
                try:
                    batch = self.higgs.collate([job.prompt.sample for job in jobs])
                    admissions = [job.admission for job in jobs]
                    groups.append((jobs, self._guarded(self._decoder.fill, admissions, batch)))
                except BaseException:
                    log.warning(
                        "prefilling %d requests together failed; prefilling them one by one",
                        len(jobs),
                        exc_info=True,
                    )
            if not groups:
                for job in jobs:
                    try:
                        filled = job.context.run(self._guarded, self._decoder.fill, [job.admission])
                    except BaseException as exc:
                        if not isinstance(exc, EngineFailure):
                            job.context.run(log.exception, "prefill failed")
                        filled = exc
                    groups.append(([job], filled))
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return groups, ready

    def _end_prefill(self, prefill: _Prefill) -> None:
        """The fill's requests start decoding (their first tokens taken now); a group whose fill failed
        fails its own requests. Waits for the fill when it is not done."""
        groups, ready = prefill.future.result()
        if ready is not None:
            torch.cuda.current_stream().wait_event(ready)
        self._prefilling = None
        for jobs, filled in groups:
            firsts: list[torch.Tensor] | BaseException = filled
            if isinstance(filled, Filled):
                self._work.prefills += 1
                try:
                    firsts = self._guarded(self._decoder.occupy, [job.admission for job in jobs], filled)
                except BaseException as exc:
                    log.exception("starting %d prefilled requests failed", len(jobs))
                    firsts = exc
            if isinstance(firsts, BaseException):
                for job in jobs:
                    self._decoder.release(job.slot)
                    self._let_go(job)
                    job.emit(firsts)
                continue
            self._work.prefilled += len(jobs)
            for job, first in zip(jobs, firsts, strict=True):
                job.context.run(self._joined, job, first)

    def _joined(self, job: _Job, first: torch.Tensor) -> None:
        """A prefilled job starts decoding: it runs from the next step, its first token taken now."""
        job.joined = time.monotonic()
        with self._cond:
            self._running[job.slot] = job
        if job.request.audio_output:
            job.stream = AudioStream(job, self._layout, self._to_codec, self._first_piece_cut)
        else:
            job.text = Detokenizer(self.higgs.decode_ids, job.request.stop)
        self.steps += 1
        self._advance(job, first.numpy())

    def _step(self) -> None:
        """Launch a step for every running job; with ``lookahead``, take the previous step's tokens while
        this one runs on the GPU (a job that ended or left meanwhile has its row of the newer step
        ignored)."""
        started = time.perf_counter()
        try:
            launched = self._guarded(self._decoder.launch)
        except BaseException as exc:  # the step is shared: every running request fails with it
            self._fail_running(exc)
            return
        finally:
            self._work.scheduler["launch"] += time.perf_counter() - started
        jobs = dict(self._running)
        if not self.lookahead:
            self._take(launched, jobs)
            return
        in_flight = self._in_flight
        previous = in_flight[-1] if in_flight else None
        if previous is not None and any(self._running.get(slot) is job for slot, job in previous[1].items()):
            # Launched before that one's tokens were taken, in a run of steps (after an idle spell the step
            # in flight is an old one, whose requests all left: the GPU's wait since is not the host's).
            launched = replace(launched, after=previous[0].ready)
        in_flight.append((launched, jobs))
        while len(in_flight) > self.lookahead_steps:
            self._take(*in_flight.popleft())

    def _take(self, launched: Launched, jobs: dict[int, _Job]) -> None:
        """Stream a step's tokens to the jobs it was launched for that still hold their slots."""
        spent = self._work.scheduler
        started = time.perf_counter()
        try:
            out = self._guarded(launched.result)  # a fault of the GPU's shows at this wait
        except BaseException as exc:
            self._fail_running(exc)
            return
        finally:
            spent["wait"] += (taken := time.perf_counter()) - started
        self._work.steps += 1
        self._time_on_gpu(launched)
        # Read as numpy (a view, no copy): every torch operator on a row would hand the interpreter lock to
        # another thread, which may keep it for Python's switch interval (``bench/bench_lock.py``).
        rows = out.numpy()
        for slot, job in jobs.items():
            if self._running.get(slot) is job and not job.cancel.is_set():
                self.steps += 1
                job.context.run(self._advance, job, rows[slot])
        self._cut_first_pieces()
        now = time.monotonic()
        with self._cond:
            if not self._rates or now - self._rates[-1].time >= 0.2:
                busy = sum(self._work.scheduler.values())
                self._rates.append(RateSample(now, self.batch_steps, self._frames, busy))
            while self._rates and now - self._rates[0].time > 10.0:
                self._rates.popleft()
        spent["tokens"] += time.perf_counter() - taken

    def _time_on_gpu(self, step: Launched) -> None:
        """Count a taken step's time on the GPU and, for steps in a row (``Launched.after``), the GPU's wait
        between the one before and this one (``EngineWork.step_gpu``; CUDA's timing events, done by now)."""
        if step.begun is None or step.ready is None:
            return
        gpu = self._work.step_gpu
        gpu["step"] += step.begun.elapsed_time(step.ready) / 1e3
        if step.after is not None:
            waited = max(0.0, step.after.elapsed_time(step.begun) / 1e3)
            gpu["between"] += waited
            self._work.step_gpu_waits[bisect.bisect_left(STEP_GPU_WAITS, waited)] += 1

    def _cut_first_pieces(self) -> None:
        """Queue the first pieces that are due. They may wait ``first_piece_wait`` steps while another
        stream's first piece becomes due at the next step, so that they reach the codec together."""
        waiting = [
            job.stream
            for job in self._running.values()
            if job.stream is not None and job.stream.sent == 0 and not job.cancel.is_set()
        ]
        due = [stream for stream in waiting if stream.first_due_in <= 0]
        if not due:
            return
        soon = any(stream.first_due_in == 1 for stream in waiting)
        if soon and min(stream.first_due_in for stream in due) > -self.first_piece_wait:
            return
        for stream in due:
            stream.cut_first()

    def _fail_running(self, exc: BaseException) -> None:
        log.exception("decoding step failed", exc_info=exc)
        self._in_flight.clear()
        for job in list(self._running.values()):
            job.emit(exc)
            self._leave(job)

    def _advance(self, job: _Job, row: np.ndarray) -> None:
        """Take one step's output for ``job``: stream it, and end the job when it is done."""
        job.steps += 1
        token = int(row[0])
        request = job.request
        ended = False
        try:
            if request.audio_output:
                self._frames += 1
                job.stream.add(row[1:].copy())  # (the step's buffer is reused: a view would change)
                ended = token == self.higgs.audio_eos_id
            elif token in self.higgs.end_ids:
                ended = True
            elif token not in self.higgs.placeholder_ids:
                if piece := job.text.add(token):
                    job.emit(TextPiece(piece))
                ended = job.text.stopped
        except BaseException as exc:
            log.exception("generation failed")
            job.emit(exc)
            self._leave(job)
            return
        if ended:
            self._complete(job, "stop")
        elif job.steps >= request.max_new_tokens or time.monotonic() > job.deadline:
            self._complete(job, "length")

    def _leave(self, job: _Job, audio_to_come: bool = False) -> None:
        """Free the job's slot (it ended, was cancelled or failed). It stops counting against the engine's
        bound now or, with ``audio_to_come`` (its last pieces are with the codec), when its result goes
        out: on a CPU the codec can be seconds behind the decoding, and the queue's bound, its gauge and
        ``Retry-After`` are about when answers end, not when their tokens do."""
        with self._cond:
            if self._running.get(job.slot) is job:
                del self._running[job.slot]
                self._decoder.release(job.slot)
        if not audio_to_come:
            self._let_go(job)
            return
        with self._pending_lock:
            if job.counted and not job.finishing:
                job.finishing = True
                self._finishing += 1

    def _abandon(self, job: _Job) -> None:
        """Free a cancelled job's slot; the work it did still counts for the observers (metrics)."""
        self._leave(job)
        frames = job.stream.frames if job.stream is not None else 0
        self._observe_left(job, frames / self.frame_rate, **self._phases(job, time.monotonic()))

    def _left_the_line(self, job: _Job) -> None:
        """``job``'s client left before it had a slot: it stops counting, and the observers see its wait
        (the longest waits are the ones clients give up on; a wait histogram without them looks better
        than the line was)."""
        self._let_go(job)
        self._observe_left(job, 0.0, seconds=0.0, queue_seconds=time.monotonic() - job.queued)

    def _observe_left(self, job: _Job, audio_seconds: float, **times: float) -> None:
        """The observers see what a job whose client left did: its tokens, its audio and ``times``."""
        partial = GenerationResult(
            text="",
            audio=None,
            finish_reason="length",
            prompt_tokens=job.prompt.tokens,
            prompt_audio_tokens=job.prompt.audio_tokens,
            completion_tokens=job.steps,
            completion_audio_tokens=job.steps if job.request.audio_output else 0,
            audio_seconds=audio_seconds,
            abandoned=True,
            **times,
        )
        for observe in self.observers:
            observe(partial)

    def _complete(self, job: _Job, reason: Literal["stop", "length"]) -> None:
        self._leave(job, audio_to_come=job.stream is not None)
        now = time.monotonic()
        if job.request.keep_slot and not job.cancel.is_set():  # (a client gone takes no next piece)
            with self._cond:
                self._held[job] = _Hold(since=now, until=now + HOLD_WHILE_DECODING)
        request = job.request
        text = ""
        if job.text is not None:
            if piece := job.text.finish():
                job.emit(TextPiece(piece))
            text = job.text.text
        result = GenerationResult(
            text=text,
            audio=None,
            finish_reason=reason,
            prompt_tokens=job.prompt.tokens,
            prompt_audio_tokens=job.prompt.audio_tokens,
            completion_tokens=job.steps,
            completion_audio_tokens=job.steps if request.audio_output else 0,
            **self._phases(job, now),
        )
        if job.stream is not None:  # the codec thread sends the last piece, then the result
            if job.stream.sent == 0 and job.stream.first_due_in <= 0:
                job.stream.cut_first()  # as when it ends alone
            self._handover.append(End(job.stream, result))
        else:
            self._finish(job, result)

    @staticmethod
    def _phases(job: _Job, now: float) -> dict[str, float]:
        """A result's times when its tokens end at ``now``: from its slot, and each part (a job that
        never joined spent them all in its fill)."""
        joined = job.joined or now
        return {
            "seconds": now - job.started,
            "queue_seconds": job.started - job.queued,
            "fill_seconds": joined - job.started,
            "decode_seconds": now - joined,
        }

    def _finish(self, job: _Job, result: GenerationResult) -> None:
        # A request's time from its slot to its result (its audio's last piece decoded): Retry-After's unit.
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * result.seconds
        self._let_go(job)
        for observe in self.observers:
            observe(result)
        self._hold_ends(job, HOLD_SECONDS)
        job.emit(result)

    def _hold_ends(self, job: _Job, seconds: float) -> None:
        """The slot kept for ``job``'s next piece (if any) is kept ``seconds`` more at most."""
        with self._cond:
            if job in self._held:
                hold = self._held[job]
                hold.until = min(hold.until, time.monotonic() + seconds)
                self._cond.notify()

    # ---- the codec thread --------------------------------------------------------------------------------

    def _codec_work(self) -> None:
        if self._codec_stream is not None:
            torch.cuda.set_device(self.higgs.model.device)
        pending: list[CodecWork] = []
        items: list = []
        while True:
            if not pending and not items:
                items.append(self._codec_queue.get())
            while True:
                try:
                    items.append(self._codec_queue.get_nowait())
                except queue.Empty:
                    break
            if None in items:  # closed: what the codec still owed ends with the engine
                self._end_owed([*pending, *(item for work in items if work is not None for item in work)])
                return
            for work_items in items:
                pending.extend(work_items)
            items = []
            work = self._next_codec_work(pending)
            if not work:  # they may all wait: until the first is due, or more come
                due_in = codec_due_in(pending, self.codec_gather, self._codec_batch)
                try:
                    items.append(self._codec_queue.get(timeout=due_in))
                except queue.Empty:
                    pass
                continue
            pending = [item for item in pending if item not in work]  # (by identity: ``eq=False``)
            firsts = sum(1 for item in work if is_first(item))
            # A call with pieces is a piece call (ends of their length in it too); else its items' kind.
            kinds = {item.kind for item in work}
            kind = "first_piece" if firsts else ("piece" if "piece" in kinds else work[0].kind)
            started = time.perf_counter()
            with (
                torch.inference_mode(),
                torch.cuda.stream(self._codec_stream) if self._codec_stream is not None else nullcontext(),
            ):
                try:
                    self._codec_run(work)
                except BaseException:  # a bug here must not stop every stream's audio for good
                    log.exception("the codec thread failed a batch")
                finally:
                    self._work.codec[kind] += time.perf_counter() - started
                    self._work.codec_calls[kind] += 1
                    if kind in ("first_piece", "piece"):
                        self._work.codec_pieces += sum(1 for item in work if isinstance(item, Decode))
                    if firsts:  # a decoding loop that stepped aside for them goes on
                        with self._cond:
                            self._first_pieces -= firsts
                            self._cond.notify()

    def _end_owed(self, owed: list[CodecWork]) -> None:
        """At close, the codec's work not done: each stream it owed audio to (a request whose tokens had
        ended, its last pieces still to decode; on a CPU seconds behind) fails with ``engine_closed`` and
        stops counting, and a reference to encode fails likewise. They waited for the codec's backlog, and
        the server cut them off at its grace's end with no error (an abuse trial: every SSE stream of a
        long text ended mid-body on SIGTERM)."""
        closed = EngineFailure(SHUTTING_DOWN, "engine_closed")
        for item in owed:
            if isinstance(item, Encode):
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(closed)
                continue
            job = item.stream.job
            if not job.failed:
                job.failed = True
                job.emit(closed)
            self._let_go(job)

    def _next_codec_work(self, pending: list[CodecWork]) -> list[CodecWork]:
        """``next_codec_work``; on a CPU a batch pays only while its activations fit the caches
        (``CPU_CODEC_FRAMES``), on CUDA a graph replays any batch up to the largest captured."""
        return next_codec_work(
            pending,
            None if self._codec_stream is not None else CPU_CODEC_FRAMES,
            gather=self.codec_gather,
            max_batch=self._codec_batch,
        )

    def _codec_run(self, work: list[CodecWork]) -> None:
        """Encode a reference, end a stream, or decode pieces of several streams in one codec call."""
        if isinstance(work[0], Encode):
            encode = work[0]
            if not encode.future.set_running_or_notify_cancel():
                return  # its request is gone (the client left while it waited)
            try:
                encode.future.set_result(encode.context.run(self._guarded, self.higgs.encode, encode.audio))
            except BaseException as exc:
                encode.future.set_exception(exc)
            return
        # A failed stream's items are dropped (and the slot kept for its next piece goes back), and so are
        # the pieces of one whose client left (nobody would hear them); its end item is not (it is a
        # finished request's result, for the observers).
        for item in work:
            if isinstance(item, End) and item.stream.job.failed:
                self._hold_ends(item.stream.job, 0.0)
                self._let_go(item.stream.job)  # no result follows
        live = [
            item
            for item in work
            if not item.stream.job.failed
            and not (isinstance(item, Decode) and item.stream.job.cancel.is_set())
        ]
        if not live:
            return
        try:  # a stream's last piece is what its stream has not cut yet
            pieces = [item.piece if isinstance(item, Decode) else item.stream.final() for item in live]
            cut = [(item.stream, p) for item, p in zip(live, pieces, strict=True) if p is not None]
            audio, offset = iter(()), 0
            if cut:  # pieces of one length, in one call: the samples that some piece's join reads
                spans = [stream.span(piece) for stream, piece in cut]
                offset, stop = min(span[0] for span in spans), max(span[1] for span in spans)
                codes = torch.stack([piece.codes for _, piece in cut])
                audio = iter(self._guarded(self._pieces.decode_part, codes, offset, stop))
        except BaseException as exc:
            for item in live:  # each stream's line under its own request id
                item.stream.job.context.run(log.exception, "audio decoding failed")
                self._fail_stream(item.stream, exc)
                if isinstance(item, End):  # its slot is already free, and no result follows
                    self._let_go(item.stream.job)
            return
        for item, piece in zip(live, pieces, strict=True):
            decoded = None if piece is None else next(audio)[0]
            if isinstance(item, End):
                item.stream.job.context.run(self._end_stream, item, piece, decoded, offset)
                continue
            try:
                item.stream.job.emit(item.stream.join(piece, decoded, offset))
            except BaseException as exc:
                self._fail_stream(item.stream, exc)

    def _fail_stream(self, stream: AudioStream, exc: BaseException) -> None:
        stream.job.failed = True
        stream.job.cancel.set()  # the scheduler frees its slot before its next step
        with self._cond:
            self._cond.notify()
        stream.job.emit(exc)
        self._hold_ends(stream.job, 0.0)  # no next piece follows a failed one

    def _end_stream(self, end: End, last: Piece | None, decoded: np.ndarray | None, offset: int) -> None:
        """Send an ended stream's last piece (``decoded``, from its sample ``offset``) and its result; a
        fault fails this request alone (its slot is free already, and no result follows)."""
        stream = end.stream
        try:
            if last is not None:
                stream.job.emit(stream.join(last, decoded, offset))
            seconds = time.monotonic() - stream.job.started  # to the last audio, the codec's backlog included
            audio_seconds = stream.frames / self.frame_rate
            result = replace(end.result, seconds=seconds, audio_seconds=audio_seconds, codes=stream.codes())
            self._finish(stream.job, result)
        except BaseException as exc:
            log.exception("ending the stream failed")
            self._fail_stream(stream, exc)
            self._let_go(stream.job)

    # ---- start-up ------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """A short clone generation and a text answer, so the first request pays no lazy initialisation."""
        started = time.perf_counter()
        t = np.arange(int(self.sample_rate * 1.5), dtype=np.float32) / self.sample_rate
        tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)

        async def run() -> None:
            reference = await self.encode(Audio(tone, self.sample_rate))
            turns = [
                Turn("system", SYSTEM_TEMPLATE.format(scene="Audio is recorded from a quiet room.")),
                Turn("user", "Warm up."),
                Turn("assistant", audio=reference),
                Turn("user", "Ready."),
            ]
            await self.generate(GenerationRequest(turns, True, 24, 0.7, 0.95, 50, seed=0))
            await self.generate(GenerationRequest(turns[:2], False, 4, 0.7, 0.95, 50, seed=0))

        asyncio.run(run())
        self._job_seconds = JOB_SECONDS  # (the warm-up's short answers would make a fresh server's first 429s
        # name a third of the wait: 3 s for 12 in a trial's burst of speech requests on the tiny CPU engine)
        log.info("warm-up done in %.1f s%s", time.perf_counter() - started, self._gpu_memory())

    def _gpu_memory(self) -> str:
        """On CUDA, where the GPU's memory went (for sizing the slots: README "Concurrency"); else ""."""
        if self.device != "cuda":
            return ""
        gib = 1024**3
        free, total = torch.cuda.mem_get_info()
        kv = sum(t.numel() * t.element_size() for t in self._decoder.cache)
        return (
            f"; GPU memory: {kv / gib:.2f} GiB of KV cache ({self.slots} slots) within "
            f"{torch.cuda.memory_allocated() / gib:.2f} GiB allocated by PyTorch, "
            f"{torch.cuda.memory_reserved() / gib:.2f} GiB reserved; "
            f"{free / gib:.2f} of {total / gib:.2f} GiB free"
        )


# ---- loading from the settings ----

from settings import Settings, resolve_device  # noqa: E402


def load_engine(settings: Settings) -> HiggsEngine:
    """Load Higgs Audio as the settings say (blocking; minutes for the real model)."""
    device = resolve_device(settings.device, torch.cuda.is_available())
    streaming = StreamSettings(
        first_chunk_frames=settings.stream_first_chunk_frames,
        chunk_frames=settings.stream_chunk_frames,
        context_frames=settings.stream_context_frames,
        crossfade_ms=settings.stream_crossfade_ms,
    )
    by_lengths_from = settings.attention_by_lengths_from if settings.attention_by_lengths else None
    return HiggsEngine(
        settings.model,
        settings.audio_tokenizer,
        device,
        settings.dtype,
        settings.kv_cache_lengths,
        streaming,
        max_queue=settings.max_queue,
        max_batch_size=settings.batch_slots(device),
        kv_cache_gb=settings.kv_cache_gb,
        cuda_graphs=settings.cuda_graphs,
        prefill_graphs=settings.prefill_graphs,
        prefill_batch=settings.prefill_batch,
        prefill_beside_steps=settings.prefill_beside_steps,
        attention_by_lengths_from=by_lengths_from,
        codec_gather=None if settings.codec_gather_ms is None else settings.codec_gather_ms / 1e3,
        lookahead_steps=settings.lookahead_steps,
    )
