"""Batched decoding over Higgs Audio's parts: one KV-cache slot per running request, one step for all.

Upstream's ``generate`` decodes one request at a time. Here every running request owns a *slot*: a row of
fixed-size key/value buffers, its own position, attention mask, sampling settings, seed and delay-pattern
state. A request's prompt is filled into a free slot (``prefill.py``: a burst of them in one pass, ``fill``,
which may run beside the steps), it joins the steps at ``occupy``, then each ``step`` runs the decoder layers
once for rows ``0..B-1`` (B = the highest busy slot + 1, so the buffers are sliced, never gathered) and
samples each row's next token or audio column.

The model's parts are reused (embeddings, ``_embed_audio_ids``, the decoder layers' weights, ``rotary_emb``,
the heads); the attention over the slot buffers and the control flow are written here, the layers'
arithmetic in ``layers.py`` (fused projections, one-call norms, residual sums into the hidden state), and a
token's keys and values go into the cache with one copy: 13 kernels a decoder layer.

The decisions are upstream's (``modeling_higgs_audio.py``): an audio answer starts with an all-BOS column,
codebook ``c`` starts ``c`` steps late (delay pattern), the lowest codebook that samples end-of-stream ends
the audio ``7 - c`` steps later with ``<|audio_eos|>``, and repetition-aware sampling (RAS) redraws a code
from the raw distribution when it already occurs twice in the last ``ras_window`` columns.

Nothing here reads the host per row: the step's state lives on the model's device and one small tensor
(the sampled tokens) comes back per step. Sampling is one batched computation for all rows, so its cost in
kernel launches does not grow with the batch: each row's random numbers are a counter-based hash of its
seed, the position of the token being drawn, the codebook and the vocabulary index (``_gumbel``), and a draw
is ``argmax(scores + Gumbel noise)``. A row's draws therefore depend on nothing but its own seed and
position, whatever else is decoding and whenever it joined. On CUDA a whole step (forward pass, sampling,
state update) is a CUDA graph per (rows, length, mode) bucket, captured before the first request
(``capture_graphs``), so that a step is one replay and one copy to the host; a capture that fails, or whose
replay differs from the eager step, leaves that bucket eager, logged.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layers import Layers, plus, rms_norm, same_logits
from prefill import Filled, Prefiller

log = logging.getLogger(__name__)

RAS_MAX_WINDOW = 32
"""Longest repetition-aware sampling window a request may use (columns)."""
TOP_K_CANDIDATES = 64
"""While every sampling row's top_k is at most this (the default top_k is 50), top-k and top-p look at the
row's this many best tokens (``torch.topk``) instead of sorting the whole vocabulary: the same tokens kept,
the same draw. On this project's CPU the sort was half of an eager step (6.4 of 12.3 ms at 16 rows of the
tiny model; ``bench/bench_step.py --profile``). CUDA graphs sort: a graph's shapes are fixed at capture."""

BY_LENGTHS_TOLERANCE = {torch.float32: 1e-5}
"""How far attention by each row's length may be from the masked attention (``check_attention_by_lengths``):
the largest difference of one attention's output against its largest value, by dtype; 2e-2 for the 16-bit
ones (their rounding is 4e-3 of a value). A kernel that reads the positions beyond a row's length, which
the check fills with values 50 times the others, is off by 53 times the largest output on the tiny model,
in float32 and bfloat16 alike (tested with such a kernel, written out)."""

# splitmix64's constants, as signed 64-bit integers (torch has no uint64 arithmetic); products wrap.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens. ``temperature`` 0 is greedy (argmax)."""

    temperature: float
    top_p: float
    top_k: int | None
    ras_window: int
    seed: int | None


@dataclass(frozen=True)
class Admission:
    """A request entering a slot: its model inputs (a batch of one), answer kind, sampling, and its prompt's
    length in the cache (after the model merges its audio into the sequence)."""

    slot: int
    inputs: dict
    audio_output: bool
    sampling: Sampling
    tokens: int = 0


@dataclass(frozen=True)
class Launched:
    """A launched step: its tokens [rows, 1 + codebooks] on the host once ``result`` returns; on CUDA the
    timing events recorded before its first kernel (``begun``) and after its copy to the host (``ready``),
    and, for steps in a row, the ``ready`` of the step before it (``after``: set by the engine)."""

    tokens: torch.Tensor
    ready: torch.cuda.Event | None
    begun: torch.cuda.Event | None = None
    after: torch.cuda.Event | None = None

    def result(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens


def _signed64(value: int) -> int:
    """``value`` modulo 2**64 as a signed 64-bit integer (a seed as an int64 tensor holds it)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on an int64 tensor (few temporaries: a step runs it on every row,
    codebook and code). ``>>`` is arithmetic on signed integers, so each shift is masked to the logical
    shift that the 64-bit unsigned original uses."""
    x ^= (x >> 30).bitwise_and_((1 << 34) - 1)
    x.mul_(_MIX1)
    x ^= (x >> 27).bitwise_and_((1 << 37) - 1)
    x.mul_(_MIX2)
    x ^= (x >> 31).bitwise_and_((1 << 33) - 1)
    return x


def gumbel_lanes(streams: int, k: int, v: int, device: torch.device) -> torch.Tensor:
    """The per-element part of ``gumbel_noise``'s key: (stream, codebook, index) -> hash input, [streams,
    k, v]. A row has two streams of numbers, the token or column draw and the RAS redraw."""
    return (torch.arange(1, streams * k * v + 1, device=device) * _GOLDEN).view(streams, k, v)


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [rows, *lanes.shape], each element a pure function of its row's ``seed`` and
    ``position`` and its lane: one batched hash instead of a generator per row, so a row draws the same
    numbers in any batch. The 23 top bits of the hash make a uniform in (0, 1) that float32 holds
    exactly (never 0 or 1, so the noise is finite)."""
    row = _mix_(seed * _GOLDEN + position)
    bits = (_mix_(row.view(-1, *[1] * lanes.dim()) + lanes) >> 41).bitwise_and_((1 << 23) - 1)
    uniform = bits.float().add_(0.5).mul_(2.0**-23)
    return uniform.log_().neg_().log_().neg_()


def flash_by_lengths(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    used: torch.Tensor,
    length: int,
) -> torch.Tensor:
    """FlashAttention's variable-length kernel: row ``b``'s query (``q`` [rows, heads, dim]) attends to the
    ``used[b]`` keys and values from row ``cu_k[b]`` of ``keys`` and ``values`` ([rows, kv heads, dim], the
    packed views of ``packed_views``), at most ``length``. Returns [rows, heads, dim]. CUDA, 16-bit only."""
    return torch.ops.aten._flash_attention_forward(
        q, keys, values, cu_q, cu_k, 1, length, 0.0, False, False, seqused_k=used
    )[0]


def packed_views(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's cache ([slots, 2, kv heads, max_len, dim], contiguous) seen as the variable-length kernel
    reads keys and values, [rows, kv heads, dim], without a copy: a row's next row is the next position
    (stride ``dim``), a head is ``max_len`` rows on (stride ``max_len * dim``), and slot ``s``'s position
    ``p`` is row ``s * 2 * kv_heads * max_len + p`` (``slot_rows``), of the keys' view for its key and of
    the values' view (``kv_heads * max_len`` rows on) for its value. The views overlap (a slot's other
    heads, its values) but reach no further than the tensor."""
    slots, _, heads, max_len, dim = kv.shape
    rows = (slots - 1) * slot_rows(heads, max_len) + max_len
    strides = (dim, max_len * dim, 1)
    keys = kv.as_strided((rows, heads, dim), strides, kv.storage_offset())
    values = kv.as_strided((rows, heads, dim), strides, kv.storage_offset() + heads * max_len * dim)
    return keys, values


def slot_rows(kv_heads: int, max_len: int) -> int:
    """Rows of ``packed_views`` from one slot's first position to the next slot's."""
    return 2 * kv_heads * max_len


class BatchDecoder:
    """Slots of KV cache and per-row decoding state for a ``HiggsAudioModel``; not thread-safe (one owner)."""

    def __init__(
        self,
        model,
        *,
        slots: int,
        max_len: int,
        audio_out_token: int,
        audio_eos_token: int,
        suppress_in_text: list[int],
        graphs: bool = False,
        length_buckets: list[int] | None = None,
    ):
        config = model.config
        text = config.text_config
        if getattr(config, "use_audio_out_self_attention", False):
            raise NotImplementedError("audio self-attention layers are not supported by the batched decoder")
        if getattr(config, "audio_decoder_proj_num_layers", 0) > 0:
            raise NotImplementedError(
                "an audio head with its own layers is not supported by the batched decoder"
            )
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.slots = slots
        self.max_len = max_len
        self.codebooks = int(config.audio_num_codebooks)
        self.codes = int(config.audio_codebook_size) + 2
        self.bos = int(config.audio_stream_bos_id)
        self.eos = int(config.audio_stream_eos_id)
        self.audio_out_token = audio_out_token
        self.audio_eos_token = audio_eos_token
        self.vocab = int(text.vocab_size)
        self.text_head = model.audio_decoder_proj.text_lm_head
        self.audio_head = model.audio_decoder_proj.audio_lm_head
        self.layers = Layers(model)
        layers = self.layers
        self.heads, self.kv_heads, self.head_dim = layers.heads, layers.kv_heads, layers.head_dim
        dev, dt = self.device, self.dtype
        # A layer's keys and values are one tensor, [slots, 2, kv heads, max_len, dim], so that a step
        # writes a token's keys and values with one indexed copy; ``keys`` and ``values`` are its halves,
        # each laid out as attention reads it, [slots, kv heads, max_len, dim] (a head's tokens contiguous).
        self.cache = [
            torch.zeros((slots, 2, self.kv_heads, max_len, self.head_dim), device=dev, dtype=dt)
            for _ in model.layers
        ]
        self.keys = [kv[:, 0] for kv in self.cache]
        self.values = [kv[:, 1] for kv in self.cache]
        self.prefiller = Prefiller(model, layers, self.cache, max_len=max_len, graphs=graphs)
        """Fills prompts into the slots' caches (``fill``; its CUDA graphs, its check at start)."""
        self.by_lengths_from: int | None = None
        """In the length buckets of at least this many positions a step's attention reads each row's own
        keys only, with a variable-length kernel (``_varlen``, FlashAttention's on CUDA) over the cache as
        it is (``packed_views``); elsewhere (and with None, everywhere) every row reads the bucket's keys,
        those beyond its own masked. The engine sets it (``HIGGS_ATTENTION_BY_LENGTHS``) where
        ``check_attention_by_lengths`` passes; set it before graphs are captured."""
        self._varlen = flash_by_lengths
        self._packed = [packed_views(kv) for kv in self.cache]
        self._cu_q = torch.arange(slots + 1, device=dev, dtype=torch.int32)
        self._cu_k = self._cu_q * slot_rows(self.kv_heads, max_len)

        def longs(*size: int, fill: int = 0) -> torch.Tensor:
            return torch.full(size, fill, device=dev, dtype=torch.long)

        # Tokens in the slot's cache = the position of its next token; a free slot's is parked (``fill``).
        self.pos = longs(slots, fill=max_len - 1)
        self.live = torch.zeros(slots, device=dev, dtype=torch.bool)
        self.audio = torch.ones(slots, device=dev, dtype=torch.bool)  # the row decodes audio columns
        self.column = longs(slots, self.codebooks, fill=self.bos)  # last audio column (next input)
        self.token = longs(slots)  # last text token (next input)
        self.delay = longs(slots)  # codebooks released so far by the delay pattern, minus one
        self.remaining = longs(slots, fill=-1)  # steps left after end-of-stream was sampled (-1: none)
        self.history = longs(slots, self.codebooks, RAS_MAX_WINDOW, fill=-1)  # last columns, newest last
        self.window = torch.zeros(slots, RAS_MAX_WINDOW, device=dev, dtype=torch.bool)  # RAS positions used
        self.temperature = torch.ones(slots, device=dev)
        self.sampled = torch.zeros(slots, device=dev)  # 1 where the row samples, 0 where it is greedy
        self.top_p = torch.ones(slots, device=dev)
        self.top_k = longs(slots, fill=self.vocab)
        self.seed = longs(slots)
        self.suppress = torch.tensor(suppress_in_text, device=dev, dtype=torch.long)
        self.lengths = [0] * slots  # host copy of ``pos``: no device read needed to size a step
        self.text_rows: set[int] = set()
        self.busy: set[int] = set()
        self.filling: set[int] = set()  # reserved for prompts being filled (``reserve``)
        # Rows whose request filters by top-k / top-p: a step skips the (sorting) filter when none does;
        # and the sampling rows whose top_k is above TOP_K_CANDIDATES, or none: while any is busy, a step
        # sorts the whole vocabulary.
        self.top_k_rows: set[int] = set()
        self.top_p_rows: set[int] = set()
        self.wide_rows: set[int] = set()
        self._arange = torch.arange(max_len, device=dev)
        self._arange_vocab = torch.arange(max(self.vocab, self.codes), device=dev)  # ranks, for top-k
        self._codebook = torch.arange(self.codebooks, device=dev)
        self._lanes: dict[tuple[int, int, int], torch.Tensor] = {}

        self.length_buckets = sorted(b for b in (length_buckets or [max_len]) if b <= max_len) or [max_len]
        if self.length_buckets[-1] != max_len:
            self.length_buckets.append(max_len)
        self.graphs_enabled = graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_failed: set[tuple] = set()
        # The graphs whose capture failed its check, kept: freeing a graph can free the cuBLAS workspace
        # that the other graphs captured on its stream still use (pytorch/pytorch#193402).
        self._graphs_dropped: list[torch.cuda.CUDAGraph] = []
        self._graph_pool = None
        self._side_stream: torch.cuda.Stream | None = None
        self._host: list[torch.Tensor] | None = None  # pinned buffers for the steps' tokens (CUDA)
        self._flip = 0
        self.host_buffers = 2
        """Pinned buffers the steps' tokens come back to in turn (CUDA): one more than the steps launched
        before the oldest one's tokens are read (the engine's ``lookahead_steps``)."""

    # ---- slots ----------------------------------------------------------------------------------------

    def free_slots(self, n: int) -> list[int]:
        """The ``n`` lowest free slots (keeping busy rows low keeps steps small; the caller knows there are
        that many)."""
        free = [slot for slot in range(self.slots) if slot not in self.busy and slot not in self.filling][:n]
        if len(free) < n:
            raise RuntimeError(f"{n} slots asked for, {len(free)} free")
        return free

    def release(self, slot: int) -> None:
        """Free a slot at once; the next step no longer counts it."""
        self.busy.discard(slot)
        self.filling.discard(slot)
        self.text_rows.discard(slot)
        self.live[slot] = False
        self.pos[slot] = self.max_len - 1  # parked (``fill``)
        self.audio[slot] = True
        self.lengths[slot] = 0
        self.top_k_rows.discard(slot)
        self.top_p_rows.discard(slot)
        self.wide_rows.discard(slot)

    def reserve(self, slots: list[int]) -> None:
        """Keep ``slots`` for prompts being filled (``fill``): no other admission gets them, no step
        decodes them until ``occupy``."""
        self.filling.update(slots)

    @torch.inference_mode()
    def prefill(self, *, slot: int, inputs: dict, audio_output: bool, sampling: Sampling) -> torch.Tensor:
        """Run one prompt into ``slot`` and choose the first token (see ``prefill_many``)."""
        return self.prefill_many([Admission(slot, inputs, audio_output, sampling)])[0]

    @torch.inference_mode()
    def prefill_many(self, admissions: list[Admission], batch: dict | None = None) -> list[torch.Tensor]:
        """Run prompts into their slots and choose their first tokens: ``fill``, then ``occupy``."""
        return self.occupy(admissions, self.fill(admissions, batch))

    def fill(self, admissions: list[Admission], batch: dict | None = None) -> Filled:
        """Run prompts into their reserved slots' caches, in one pass (``Prefiller.fill``; it may run beside
        the steps); they decode from the step after ``occupy``."""
        return self.prefiller.fill(admissions, batch)

    def capture_prefill_graphs(self, most_rows: int, most_tokens: int) -> int:
        """The prefill's CUDA graphs (``Prefiller.capture_graphs``), while no slot is in use: a capture writes
        the first slots' caches. Returns how many were captured."""
        if self.busy or self.filling:
            return 0
        return self.prefiller.capture_graphs(most_rows, most_tokens)

    @torch.inference_mode()
    def occupy(self, admissions: list[Admission], filled: Filled) -> list[torch.Tensor]:
        """Start decoding filled slots from the next step. Returns, per admission, on the CPU,
        ``[text token, *audio column]``: for an audio answer ``<|AUDIO_OUT|>`` and the all-BOS column that
        opens the stream (nothing is sampled), for a text answer the first token."""
        logits = filled.logits
        if logits is not None and self.device.type == "cuda":
            logits.record_stream(torch.cuda.current_stream())  # made on the fill's stream, read on this one
        return [
            self._occupy(admission, length, None if logits is None else logits[row : row + 1])
            for row, (admission, length) in enumerate(zip(admissions, filled.lengths, strict=True))
        ]

    @torch.inference_mode()
    def check_attention_by_lengths(self) -> tuple[bool, str]:
        """Whether ``_varlen`` attends as the masked attention does over this decoder's cache layout
        (``packed_views``), in its dtype: on a scratch cache of 4 slots whose positions beyond each row's
        length hold large values (a kernel that reads them, as one reading the whole bucket would, answers
        far off), with all rows and with the first two in a shorter bucket. The largest difference against
        the largest output must be within ``BY_LENGTHS_TOLERANCE``. Returns the verdict and what was seen;
        a kernel that fails (not built for this GPU or dtype) fails the check."""
        tolerance = BY_LENGTHS_TOLERANCE.get(self.dtype, 2e-2)
        draw = torch.Generator(device=self.device).manual_seed(0)
        slots, max_len, dim = 4, 256, self.head_dim

        def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
            values = torch.randn(size, generator=draw, device=self.device, dtype=torch.float32)
            return (values * scale).to(self.dtype)

        cache = randn(slots, 2, self.kv_heads, max_len, dim)
        lengths = [1, 37, 200, max_len]
        for slot, used in enumerate(lengths):
            cache[slot, :, :, used:] = randn(2, self.kv_heads, max_len - used, dim, scale=50.0)
        keys, values = packed_views(cache)
        cu_q = torch.arange(slots + 1, device=self.device, dtype=torch.int32)
        cu_k = cu_q * slot_rows(self.kv_heads, max_len)
        queries = randn(slots, self.heads, dim)
        apart = 0.0
        try:
            for rows, length in ((slots, max_len), (2, 64)):
                used = torch.tensor([min(n, length) for n in lengths[:rows]], device=self.device)
                got = self._varlen(
                    queries[:rows], keys, values, cu_q[: rows + 1], cu_k[: rows + 1],
                    used.to(torch.int32), length,
                ).float()  # fmt: skip
                groups = self.heads // self.kv_heads
                q = queries[:rows].float().reshape(rows, self.kv_heads, groups, dim)
                seen = torch.arange(length, device=self.device)[None, :] < used[:, None]
                want = F.scaled_dot_product_attention(
                    q,
                    cache[:rows, 0, :, :length].float(),
                    cache[:rows, 1, :, :length].float(),
                    attn_mask=seen[:, None, None, :],
                ).reshape(rows, self.heads, dim)
                apart = max(apart, float((got - want).abs().max()) / float(want.abs().max()))
        except Exception as exc:  # its first line: a missing kernel's message lists every dispatch key
            return False, f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        return apart <= tolerance, f"{apart:.1e} of the largest output apart, {tolerance:.0e} allowed"

    def _occupy(self, admission: Admission, length: int, logits: torch.Tensor | None) -> torch.Tensor:
        """Set a prefilled slot's state; ``logits`` [1, 1, vocab] are the prompt's last position's (needed
        for a text answer only)."""
        slot, sampling, audio_output = admission.slot, admission.sampling, admission.audio_output
        self.filling.discard(slot)
        self.busy.add(slot)
        self.lengths[slot] = length
        self.pos[slot] = length
        self.live[slot] = True
        self.audio[slot] = audio_output
        greedy = sampling.temperature <= 0
        self.temperature[slot] = 1.0 if greedy else sampling.temperature
        self.sampled[slot] = 0.0 if greedy else 1.0
        # top_p 0 (OpenAI accepts it) keeps the most likely token alone, as the smallest positive one does.
        self.top_p[slot] = 1.0 if greedy else max(sampling.top_p, 1e-6)
        self.top_k[slot] = min(sampling.top_k or self.vocab, self.vocab) if not greedy else self.vocab
        if not greedy and sampling.top_k:
            self.top_k_rows.add(slot)
        if not greedy and sampling.top_p < 1:
            self.top_p_rows.add(slot)
        if not greedy and not 0 < sampling.top_k <= TOP_K_CANDIDATES:
            self.wide_rows.add(slot)
        # Greedy requests keep RAS (it stops the codes from looping) but draw it from a fixed seed, so
        # that temperature 0 is deterministic with or without a seed.
        seed = sampling.seed if sampling.seed is not None else 0 if greedy else secrets.randbits(63)
        self.seed[slot] = _signed64(seed)
        first = torch.full((1 + self.codebooks,), self.bos, dtype=torch.long)
        if audio_output:
            self.text_rows.discard(slot)
            self.column[slot] = self.bos
            self.delay[slot] = 0
            self.remaining[slot] = -1
            window = min(max(sampling.ras_window, 0), RAS_MAX_WINDOW)
            self.window[slot] = self._arange[:RAS_MAX_WINDOW] >= RAS_MAX_WINDOW - window
            # The RAS window looks back into the prompt's audio (upstream counts the voice reference's
            # last columns too), then the opening column. Written on the device, the reference's columns
            # copied without waiting: a copy from the host that waits would wait for the step in flight,
            # and the loop would launch the next one only after (its lookahead lost at every admission).
            history = self.history[slot]
            history.fill_(-1)
            prompt = admission.inputs.get("audio_out_ids")
            if prompt is not None and prompt.shape[-1] > 0:
                tail = prompt[:, -(RAS_MAX_WINDOW - 1) :].to(torch.long)
                if tail.device.type == "cpu" and self.device.type == "cuda":
                    # Pinned and contiguous: a strided source (this slice of a longer reference) or one in
                    # pageable memory goes through a pageable copy, which may wait for the stream.
                    tail = tail.contiguous().pin_memory()
                tail = tail.to(self.device, non_blocking=True)
                history[:, -1 - tail.shape[1] : -1] = tail
            history[:, -1] = self.bos
            first[0] = self.audio_out_token
        else:
            self.text_rows.add(slot)
            logits = logits.float().index_fill_(-1, self.suppress, float("-inf"))
            rows = slice(slot, slot + 1)
            noise = self._gumbel(rows, self.pos[rows], 1, 1, self.vocab)[:, 0]
            token = self._choose(logits, rows, noise, self._filters({slot}))[0, 0]
            self.token[slot] = token
            first[0] = token.item()
        return first

    # ---- the step ---------------------------------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One token or column for every busy slot. Returns [B, 1 + codebooks] on the CPU (row = slot):
        the text token (``<|AUDIO_OUT|>``, or ``<|audio_eos|>`` when the row's audio ended) and the column."""
        return self.launch().result()

    @torch.inference_mode()
    def launch(self) -> Launched:
        """Start a step (``step`` without waiting): on CUDA its output comes back to one of the pinned host
        buffers (``host_buffers``) while the caller goes on, so that the host's work on one step's tokens
        overlaps the GPU's work on the next. The slots' state on the device already holds the step's result,
        so the next step can be launched before this one's tokens are read."""
        rows, length = self._shape()
        any_text = bool(self.text_rows)
        all_text = len(self.text_rows) == len(self.busy)
        mode = "text" if all_text else ("mixed" if any_text else "audio")
        begun = None
        if self.device.type == "cuda":
            begun = torch.cuda.Event(enable_timing=True)
            begun.record()
        out = self._run(rows, length, mode)
        for slot in self.busy:
            self.lengths[slot] += 1
        if self.device.type != "cuda":
            return Launched(out, None)
        if self._host is None or len(self._host) != self.host_buffers:
            shape = (self.slots, 1 + self.codebooks)
            self._host = [
                torch.empty(shape, dtype=torch.long, pin_memory=True) for _ in range(self.host_buffers)
            ]
            self._flip = 0
        host = self._host[self._flip][:rows]
        self._flip = (self._flip + 1) % len(self._host)  # read before this buffer's next turn is launched
        host.copy_(out, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        return Launched(host, ready, begun)

    def _device_step(self, rows: int, length: int, mode: str, filters: tuple[bool, bool, int]):
        """Everything of a step on the device, with static shapes and no host read (so that it can be a
        CUDA graph): the forward pass, sampling and the rows' state update. ``filters``: see ``_choose``.
        Returns the step's output [rows, 1 + codebooks] and the logits (for the capture's check)."""
        audio_logits, text_logits = self._forward(rows, length, mode)
        live = self.live[:rows]
        is_audio = self.audio[:rows]
        out_column = self.column[:rows]
        out_token = self.token[:rows]
        if audio_logits is not None:
            column, done = self._audio_tokens(audio_logits, filters)
            moved = live & is_audio
            self.column[:rows] = torch.where(moved[:, None], column, self.column[:rows])
            shifted = torch.cat([self.history[:rows, :, 1:], column[:, :, None]], dim=2)
            self.history[:rows] = torch.where(moved[:, None, None], shifted, self.history[:rows])
            audio_token = torch.where(done, self.audio_eos_token, self.audio_out_token)
            out_column = column
            out_token = torch.where(is_audio, audio_token, out_token)
        if text_logits is not None:
            # index_fill_ takes the value as a kernel argument (an index_put of a Python float would copy
            # it from the host, which a CUDA graph cannot hold).
            logits = text_logits.index_fill_(-1, self.suppress, float("-inf"))[:, None, :]
            noise = self._gumbel(slice(0, rows), self.pos[:rows] + 1, 1, 1, self.vocab)[:, 0]
            token = self._choose(logits, slice(0, rows), noise, filters)[:, 0]
            moved = live & ~is_audio
            self.token[:rows] = torch.where(moved, token, self.token[:rows])
            out_token = torch.where(is_audio, out_token, token)
        self.pos[:rows] += live.long()
        return torch.cat([out_token[:, None], out_column], dim=1), audio_logits, text_logits

    def _choose(
        self, logits: torch.Tensor, rows: slice, noise: torch.Tensor, filters: tuple[bool, bool, int]
    ) -> torch.Tensor:
        """Pick one token per row and codebook from ``logits`` [rows, K, V] (the rows of slots ``rows``):
        temperature, then top-k, then top-p (like transformers' warpers, from one sort), then the argmax
        of the scores plus the row's Gumbel ``noise`` (a draw from the filtered softmax); greedy rows take
        the plain argmax. ``filters`` says whether any row filters (top-k or top-p), and by top-p: the
        sort is skipped when none does; and how many best tokens to look at (``TOP_K_CANDIDATES``, when
        no sampling row keeps more: the rest are removed), 0 for all. Every row is computed (cheaper than
        selecting the sampled ones); the caller keeps the rows it needs."""
        scores = logits / self.temperature[rows].view(-1, 1, 1)
        if filters[0]:
            candidates = filters[2] if 0 < filters[2] < scores.shape[-1] else scores.shape[-1]
            if candidates < scores.shape[-1]:
                descending, order = scores.topk(candidates, dim=-1)
            else:
                descending, order = scores.sort(dim=-1, descending=True, stable=True)
            remove = self._arange_vocab[:candidates] >= self.top_k[rows].view(-1, 1, 1)
            if filters[1]:
                # A token goes when the tokens ranked above it already hold top_p of the mass (never the
                # first: nothing is above it, and top_p > 0).
                probs = descending.masked_fill(remove, float("-inf")).softmax(dim=-1)
                remove = remove | (probs.cumsum(dim=-1) - probs >= self.top_p[rows].view(-1, 1, 1))
            unsorted = torch.ones_like(scores, dtype=torch.bool)  # beyond the candidates: removed
            scores = scores.masked_fill(unsorted.scatter_(-1, order, remove.expand_as(order)), float("-inf"))
        return (scores + noise * self.sampled[rows].view(-1, 1, 1)).argmax(dim=-1)

    def _gumbel(self, rows: slice, position: torch.Tensor, streams: int, k: int, v: int) -> torch.Tensor:
        """``gumbel_noise`` [rows, streams, k, v] for the slots ``rows``, with cached lanes."""
        lanes = self._lanes.get((streams, k, v))
        if lanes is None:
            lanes = self._lanes[(streams, k, v)] = gumbel_lanes(streams, k, v, self.device)
        return gumbel_noise(self.seed[rows], position, lanes)

    def _audio_tokens(
        self, logits: torch.Tensor, filters: tuple[bool, bool, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the next column of every row, with RAS, the delay pattern and the end of the stream."""
        rows = logits.shape[0]
        noise = self._gumbel(slice(0, rows), self.pos[:rows] + 1, 2, self.codebooks, self.codes)
        column = self._choose(logits, slice(0, rows), noise[:, 0], filters)
        repeats = ((self.history[:rows] == column[:, :, None]) & self.window[:rows, None, :]).sum(dim=-1)
        # Drawn for every row (rows without RAS have an empty window, so never redraw), so that no host
        # read is needed to decide; the redraw ignores temperature, top-k and top-p.
        redraw = (logits + noise[:, 1]).argmax(dim=-1)
        column = torch.where(repeats >= 2, redraw, column)

        codebook = self._codebook[None, :]
        delay = self.delay[:rows, None]
        ramping = delay + 1 < self.codebooks
        column = torch.where(ramping & (codebook > delay), self.bos, column)
        new_delay = torch.where(ramping[:, 0], self.delay[:rows] + 1, self.delay[:rows])
        remaining = self.remaining[:rows]
        ending = remaining >= 0
        column = torch.where(
            ending[:, None] & (codebook < (self.codebooks - remaining)[:, None]), self.eos, column
        )
        remaining = torch.where(ending, remaining - 1, remaining)
        is_eos = column == self.eos
        starts = is_eos.any(dim=1) & ~ending
        lowest = is_eos.long().argmax(dim=1)  # the lowest codebook that sampled end-of-stream
        column = torch.where(starts[:, None] & (codebook < lowest[:, None]), self.eos, column)
        remaining = torch.where(starts, self.codebooks - lowest - 1, remaining)
        done = (ending | starts) & (remaining <= 0)
        moved = self.live[:rows] & self.audio[:rows]
        self.delay[:rows] = torch.where(moved, new_delay, self.delay[:rows])
        self.remaining[:rows] = torch.where(moved, torch.where(done, -1, remaining), self.remaining[:rows])
        return column, done

    # ---- the forward half: embeddings -> layers -> heads ---------------------------------------------------

    def _shape(self) -> tuple[int, int]:
        """Rows and attention length of the next step, rounded up to buckets.

        Row ``r``'s numbers then depend on nothing but the bucket: matrix products round differently with
        the number of rows, attention with the number of keys. On the CPU every slot is always computed,
        so that in float32 an answer is bit-identical whatever else is decoding (while the longest running
        request stays in the same length bucket); on CUDA rows round up to a power of two (graph buckets).
        """
        busy = 1 + max(self.busy)
        rows = self.slots if self.device.type == "cpu" else min(self.slots, 1 << (busy - 1).bit_length())
        needed = 1 + max(self.lengths[s] for s in self.busy)
        return rows, next(b for b in self.length_buckets if b >= needed)

    def _run(self, rows: int, length: int, mode: str) -> torch.Tensor:
        """The step's output: a replay of the bucket's CUDA graph (captured now if ``capture_graphs`` did
        not), else the eager step, which skips the top-k / top-p sort when no running row filters."""
        if self.graphs_enabled and (rows, length, mode) not in self._graph_failed:
            graph = self._graphs.get((rows, length, mode)) or self._capture((rows, length, mode))
            if graph is not None:
                graph[0].replay()
                return graph[1]
        return self._device_step(rows, length, mode, self._filters(self.busy))[0]

    def _filters(self, slots: set[int]) -> tuple[bool, bool, int]:
        """What ``_choose`` needs to filter the rows of ``slots`` (see there): whether any filters, whether
        any by top-p, and how many candidates to look at (0: the whole vocabulary, sorted)."""
        return (
            bool(slots & (self.top_k_rows | self.top_p_rows)),
            bool(slots & self.top_p_rows),
            0 if slots & self.wide_rows else TOP_K_CANDIDATES,
        )

    def row_buckets(self) -> list[int]:
        """The row counts a CUDA step is computed for: powers of two, then every slot."""
        buckets = [1 << i for i in range(self.slots.bit_length()) if 1 << i < self.slots]
        return [*buckets, self.slots]

    @torch.inference_mode()
    def capture_graphs(self, modes: tuple[str, ...] = ("audio", "mixed", "text")) -> int:
        """Capture every bucket's CUDA graph now (before serving: a capture takes a step's time several
        times over, which a listener would otherwise hear as a stall). Returns how many were captured."""
        if not self.graphs_enabled or self.busy:
            return 0
        for mode in modes:
            for length in self.length_buckets:
                for rows in self.row_buckets():
                    if (rows, length, mode) not in self._graphs:
                        self._capture((rows, length, mode))
        return len(self._graphs)

    @torch.inference_mode()
    def _capture(self, key: tuple[int, int, str]):
        """A graph of the whole step for ``key``, filters included (they cost the GPU little; a graph per
        filter choice would multiply the captures). Warmed up and captured on the decoder's own stream (see
        ``_capture_stream``); the replay must give the eager step's logits."""
        step = (*key, (True, True, 0))
        graph = None
        try:
            stream = self._capture_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), self.state_kept():
                # Warm-up, and the reference the replay must match: same inputs, same cache writes.
                expected = [t.clone() for t in self._device_step(*step)[1:] if t is not None]
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with self.state_kept():
                with torch.cuda.graph(
                    graph, pool=self._graph_pool, stream=stream, capture_error_mode="thread_local"
                ):
                    out, *logits = self._device_step(*step)
                graph.replay()
                got = [t for t in logits if t is not None]
                if not all(same_logits(a, b) for a, b in zip(expected, got, strict=True)):
                    raise RuntimeError("the replayed graph's logits differ from the eager step's")
        except Exception:
            log.exception("CUDA graph capture failed for %s; decoding that shape eagerly", key)
            self._graph_failed.add(key)
            if graph is not None:
                self._graphs_dropped.append(graph)
            return None
        self._graphs[key] = (graph, out)
        log.debug("captured a CUDA graph for %d rows, %d tokens, %s", *key)
        return self._graphs[key]

    @contextmanager
    def state_kept(self) -> Iterator[None]:
        """Put the rows' state back as it was after the block (a capture's warm-up and check replay each
        advance it; the KV cache writes land where the restored positions put them again, with the same
        values)."""
        state = [self.pos, self.column, self.token, self.history, self.delay, self.remaining]
        saved = [t.clone() for t in state]
        try:
            yield
        finally:
            for tensor, value in zip(state, saved, strict=True):
                tensor.copy_(value)

    def _capture_stream(self) -> torch.cuda.Stream:
        """The stream every capture of the decoder warms up and is captured on: one for all, because
        PyTorch's allocator keeps the blocks freed on a stream for that stream (a stream per capture would
        hold a warm-up's memory per graph until ``torch.cuda.empty_cache``); and not the codec's, because
        graphs captured on one stream share its cuBLAS workspace, and the codec's graphs replay on another
        stream at the same time as these."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        return self._side_stream

    def _forward(self, rows: int, length: int, mode: str):
        model = self.model
        is_audio = self.audio[:rows, None, None]
        positions = self.pos[:rows]
        if mode == "audio":
            hidden = model._embed_audio_ids(self.column[:rows].T)
        elif mode == "text":
            hidden = model.embed_tokens(self.token[:rows])
        else:
            hidden = torch.where(
                self.audio[:rows, None],
                model._embed_audio_ids(self.column[:rows].T),
                model.embed_tokens(self.token[:rows]),
            )
        hidden = hidden[:, None, :].to(self.dtype)
        cos, sin = self.layers.rotation(hidden, positions[:, None])  # [rows, 1 (heads), dim]
        by_lengths = self.reads_own_keys(length)
        if by_lengths:  # the keys each row reads: its own (a parked row's: the bucket's)
            mask = (positions + 1).clamp(max=length).to(torch.int32)
        else:
            # An additive mask in the model's dtype, made once per step: given as booleans, attention
            # would turn them into this in every layer.
            mask = torch.full((rows, 1, 1, length), float("-inf"), device=self.device, dtype=self.dtype)
            mask.masked_fill_((self._arange[None, :length] <= positions[:, None])[:, None, None, :], 0.0)
        index = self._arange[:rows]

        for i, (layer, kind) in enumerate(zip(model.layers, self.layers.kinds, strict=True)):
            # The residual sums are written into ``hidden`` by the products that make them (``layers.plus``);
            # a fast-forward layer gives audio rows their input back, so it keeps a copy.
            layer_input = hidden.clone() if kind == "skip" and mode != "text" else hidden
            audio_path = kind == "dual" and mode == "audio"
            if kind == "dual" and mode == "mixed":
                x = torch.where(
                    is_audio,
                    rms_norm(layer.audio_input_layernorm, hidden),
                    rms_norm(layer.input_layernorm, hidden),
                )
            else:
                x = rms_norm(layer.audio_input_layernorm if audio_path else layer.input_layernorm, hidden)
            hidden = self._attention(
                i, layer.self_attn, x, cos, sin, mask, index, positions, length, by_lengths, hidden
            )
            if kind == "dual" and mode == "mixed":
                hidden = hidden + torch.where(
                    is_audio,
                    self.layers.mlp(layer.audio_mlp, rms_norm(layer.audio_post_attention_layernorm, hidden)),
                    self.layers.mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, hidden)),
                )
            elif audio_path:
                x = rms_norm(layer.audio_post_attention_layernorm, hidden)
                hidden = self.layers.mlp(layer.audio_mlp, x, hidden)
            else:
                hidden = self.layers.mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, hidden), hidden)
            if kind == "skip" and mode != "text":
                hidden = torch.where(is_audio, layer_input, hidden) if mode == "mixed" else layer_input
        hidden = rms_norm(model.norm, hidden)[:, 0]
        audio_logits = (
            None if mode == "text" else self.audio_head(hidden).view(rows, self.codebooks, self.codes).float()
        )
        text_logits = None if mode == "audio" else self.text_head(hidden).float()
        return audio_logits, text_logits

    def reads_own_keys(self, length: int) -> bool:
        """Whether a step in this length bucket attends by each row's length (``by_lengths_from``)."""
        return self.by_lengths_from is not None and length >= self.by_lengths_from

    def _attention(
        self, i, attn, x, cos, sin, mask, index, positions, length, by_lengths, residual
    ) -> torch.Tensor:
        """The layer's attention of ``x``, added into ``residual``. ``mask``: the additive mask of the keys
        beyond each row's position, or ``by_lengths`` how many keys each row reads."""
        rows = x.shape[0]
        qkv = F.linear(x[:, 0], *self.layers.qkv[i]).view(rows, self.heads + 2 * self.kv_heads, self.head_dim)
        # Queries and keys are rotated together, in place: keys and values are then side by side in
        # ``qkv``, as the cache holds them, and go in with one indexed copy.
        qk = qkv[:, : self.heads + self.kv_heads]
        self.layers.rotate_(qk, cos, sin)
        kv = qkv[:, self.heads :].view(rows, 2, self.kv_heads, self.head_dim)
        self.cache[i][index, :, :, positions] = kv
        if by_lengths:  # ``mask``: the keys each row reads
            keys, values = self._packed[i]
            cu_q, cu_k = self._cu_q[: rows + 1], self._cu_k[: rows + 1]
            out = self._varlen(qkv[:, : self.heads], keys, values, cu_q, cu_k, mask, length)
        else:
            # Grouped-query attention without copying the cache: the query heads that share a key/value
            # head become that head's "query positions".
            groups = self.heads // self.kv_heads
            q = qkv[:, : self.heads].reshape(rows, self.kv_heads, groups, self.head_dim)
            keys = self.keys[i][:rows, :, :length]
            values = self.values[i][:rows, :, :length]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return plus(residual, attn.o_proj, out.reshape(rows, 1, self.heads * self.head_dim))
