"""Batched decoding over Higgs Audio's parts: one KV-cache slot per running request, one step for all.

Upstream's ``generate`` decodes one request at a time. Here every running request owns a *slot*: a row of
fixed-size key/value buffers, its own position, attention mask, sampling settings, seed and delay-pattern
state. A request is prefilled into a free slot by the decoder's own layers (a burst of them in one pass:
``fill``, which may run beside the steps, then ``occupy``), then each ``step`` runs the decoder layers once
for rows ``0..B-1`` (B = the highest busy slot + 1, so the buffers are sliced, never gathered) and samples
each row's next token or audio column.

The model's parts are reused (embeddings, ``_embed_audio_ids``, the decoder layers' weights, ``rotary_emb``,
the heads); the attention over the slot buffers, the norms and the FFNs' arithmetic and the control flow are
written here. A step's kernels are kept few, because at small batches a kernel's start can cost the GPU more
than its work: each layer's query, key and value projections are one matrix product, and each FFN's gate and
up projections another (``_fuse_rows`` stacks the weights once and leaves the upstream modules views of
them, so nothing is stored twice and upstream's own forward, which prefills what the decoder's layers
leave to it, reads the same numbers); the
rotation is applied to queries and keys together and written back in place; a norm, weight included, is one
call; a token's keys and values go into the cache with one copy; and the residual sums are matrix products
that add into the hidden state (``_plus``): 13 kernels a decoder layer.

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

import inspect
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

RAS_MAX_WINDOW = 32
"""Longest repetition-aware sampling window a request may use (columns)."""
TOP_K_CANDIDATES = 64
"""While every sampling row's top_k is at most this (the default top_k is 50), top-k and top-p look at the
row's this many best tokens (``torch.topk``) instead of sorting the whole vocabulary: the same tokens kept,
the same draw. On this project's CPU the sort was half of an eager step (6.4 of 12.3 ms at 16 rows of the
tiny model; ``bench/bench_step.py --profile``). CUDA graphs sort: a graph's shapes are fixed at capture."""

PREFILL_ATTENTION: tuple[SDPBackend, ...] | None = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
"""The attention kernels a prefill may use on CUDA (None: PyTorch's choice). cuDNN's, which PyTorch prefers
on recent GPUs, builds a plan for every sequence length it has not seen, and prompts' lengths rarely repeat:
on an H200 (full-size model, bfloat16) one prompt of a length not seen before took 92 ms with cuDNN allowed,
38 ms without (``bench/bench_prefill.py``, side by side). The step graphs keep it (fixed shapes)."""

PREFILL_GRAPH_LENGTHS = (64, 128, 256, 512, 1024)
"""The lengths a prefill's prompts are padded to on CUDA, each a CUDA graph per number of prompts, with a
voice reference or without (``capture_prefill_graphs``): the smallest that holds the longest prompt. A
prefill was mostly the host's time, launching the layers' kernels one by one (on an H200 with the full-size
model 12.8 ms for one prompt and 37.6 ms for eight, their GPU work a few ms), while the decoding loop's own
host work waits for the interpreter lock; a replay is one launch. The price: the GPU computes up to twice
the prompt's positions. Longer prompts run eagerly."""

BY_LENGTHS_TOLERANCE = {torch.float32: 1e-5}
"""How far attention by each row's length may be from the masked attention (``check_attention_by_lengths``):
the largest difference of one attention's output against its largest value, by dtype; 2e-2 for the 16-bit
ones (their rounding is 4e-3 of a value). A kernel that reads the positions beyond a row's length, which
the check fills with values 50 times the others, is off by 53 times the largest output on the tiny model,
in float32 and bfloat16 alike (tested with such a kernel, written out)."""

OWN_PREFILL_TOLERANCE = {torch.float32: 1e-3}
"""How far the decoder's own prefill layers may be from upstream's forward at start (``check_own_prefill``):
the largest difference of a slot's cache against its largest value, by dtype; 1e-1 for the 16-bit ones.
The two group their products differently (fused projections, sums inside the products), so they agree to
rounding only: 2e-7 in float32 and 7e-3 in bfloat16 on the tiny model (``bench/check_cuda.py``), 3.4e-2
in bfloat16 on the full-size random-weight model on an H200 (the rounding of 28 layers), which 5e-2 left
too little room. The check is against gross faults (wrong positions left 0.86 of the largest value
apart); ``check_cuda.py`` compares the two in float32 to 1e-3."""

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
class Filled:
    """Prompts run into their slots' caches (``BatchDecoder.fill``), not decoding yet: each prompt's length
    in its slot and, when any answers in text, the last position's text logits [rows, 1, vocab]."""

    lengths: list[int]
    logits: torch.Tensor | None


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


@dataclass
class _PrefillGraph:
    """A captured prefill of prompts padded to one length: its input buffers (``_padded_pass``'s arguments)
    and its logits [rows, 1, vocab]."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    logits: torch.Tensor


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


@contextmanager
def _prefill_attention(device: torch.device) -> Iterator[None]:
    """While it lasts, attention on CUDA uses the kernels of ``PREFILL_ATTENTION``."""
    if device.type != "cuda" or PREFILL_ATTENTION is None:
        yield
        return
    with sdpa_kernel(list(PREFILL_ATTENTION)):
        yield


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


def _own_layers(inputs: dict, kinds: list[str]) -> bool:
    """Whether the decoder's own layers can prefill these model inputs (a prompt's, or a batch's): text
    tokens, and audio codes out (a voice reference) on a model whose layers are dual or plain. Audio
    features, audio-in codes and fast-forward layers with audio in the prompt are left to upstream's forward
    (the service's prompts hold none of the first two; Higgs Audio v2's layers are all dual)."""
    if any(inputs.get(key) is not None and inputs[key].numel() for key in ("audio_features", "audio_in_ids")):
        return False
    codes = inputs.get("audio_out_ids")
    return codes is None or codes.numel() == 0 or "skip" not in kinds


@contextmanager
def _last_position_only(head: torch.nn.Linear) -> Iterator[None]:
    """While it lasts, ``head`` projects each row's last position only. Upstream's forward gives the text
    head every prompt position, 128,256 logits each (1 GiB for a 4,096-token prefill in bfloat16), where a
    prefill needs the last one (its rows are padded on the left, so every row's prompt ends there)."""
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _fuse_rows(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) stacking the rows of ``linears``, whose own weights become views of it; made
    once per model (another decoder over the same model reuses it)."""
    key = tuple(id(linear) for linear in linears)
    made = getattr(linears[0], "_fused_rows", None)
    if made is not None and made[0] == key:
        return made[1], made[2]
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = [linear.bias is not None for linear in linears]
    bias = torch.cat([linear.bias.detach() for linear in linears]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise NotImplementedError("projections with and without bias in one layer")
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    linears[0]._fused_rows = (key, weight, bias)
    return weight, bias


def _is_gated_mlp(mlp) -> bool:
    """Llama's FFN, ``down(act(gate(x)) * up(x))``, in one piece (not split for tensor parallelism)."""
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    split = getattr(getattr(mlp, "config", None), "pretraining_tp", 1)
    return all(hasattr(mlp, n) for n in names) and split == 1


def same_logits(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether a graph's replay gave the eager step's logits: the same ones masked (-inf), the others
    within 1% of the largest (finite) logit."""
    finite = want.isfinite()
    if not torch.equal(finite, got.isfinite()) or not finite.any():
        return bool(torch.equal(finite, got.isfinite()))
    scale = float(want[finite].abs().max())
    return bool(torch.allclose(want[finite], got[finite], rtol=1e-2, atol=1e-2 * scale))


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm as one call, its weight included: the fused kernel computes in float32 inside and
    rounds once to ``x``'s dtype (upstream's module rounds the normalised values, then applies the weight
    in that dtype: the same numbers in float32, one rounding fewer in bfloat16)."""
    return F.rms_norm(x, (x.shape[-1],), weight=norm.weight, eps=norm.variance_epsilon)


def _plus(residual: torch.Tensor | None, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``, written into ``residual``: one matrix product that adds (``addmm_``, beta
    1) instead of a product and an addition. Without a residual, ``linear(x)``."""
    if residual is None:
        return linear(x)
    if linear.bias is not None:
        return residual + linear(x)
    residual.view(-1, residual.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t())
    return residual


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
        self._forward_keys = set(inspect.signature(model.forward).parameters)
        self.own_prefill = True
        """Prefill with the decoder's own layers (``_prefill_own``) what they can take; off, every prompt
        goes through upstream's forward (``check_own_prefill`` turns it off when the two disagree)."""
        self.prefill_lengths: tuple[int, ...] = ()
        """The lengths prompts are padded to (``_padded_length``): on CUDA
        ``PREFILL_GRAPH_LENGTHS``, set by ``capture_prefill_graphs``, where a captured graph runs the pass
        (``_prefill_graphs``); elsewhere (the tests) the same padded pass runs eagerly."""
        self._prefill_graphs: dict[tuple[int, int, bool], _PrefillGraph] = {}  # (rows, length, codes)
        self._prefill_failed: set[tuple[int, int, bool]] = set()  # shapes whose capture failed (eager)
        self._prefill_pool = None  # not the steps' pool: a fill runs beside the steps
        self._prefill_capture: torch.cuda.Stream | None = None

        # Each layer is "dual" (audio tokens take their own norms and FFN), "skip" (fast-forward: audio
        # tokens keep their input hidden state) or "plain" (one path for every token).
        self.kinds: list[str] = []
        for layer in model.layers:
            if hasattr(layer, "audio_mlp") and not getattr(layer, "fast_forward", False):
                self.kinds.append("dual")
            elif getattr(layer, "fast_forward", False):
                self.kinds.append("skip")
            else:
                self.kinds.append("plain")
        self._qkv = [
            _fuse_rows([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
            for layer in model.layers
        ]
        self._gate_up: dict[int, tuple[torch.Tensor, torch.Tensor | None] | None] = {}
        for layer in model.layers:
            for mlp in (layer.mlp, getattr(layer, "audio_mlp", None)):
                if mlp is not None and _is_gated_mlp(mlp):
                    self._gate_up[id(mlp)] = _fuse_rows([mlp.gate_proj, mlp.up_proj])
        attn = model.layers[0].self_attn
        self.heads = int(getattr(attn, "num_heads", text.num_attention_heads))
        self.kv_heads = int(getattr(attn, "num_key_value_heads", text.num_key_value_heads))
        self.head_dim = int(getattr(attn, "head_dim", text.hidden_size // text.num_attention_heads))
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

    @torch.inference_mode()
    def fill(self, admissions: list[Admission], batch: dict | None = None) -> Filled:
        """Run prompts through the model into their slots' caches, in one forward pass.

        One admission runs its own ``inputs``; several run ``batch``, their samples collated together and
        padded on the left (a row's real tokens keep positions ``0..tokens-1``, as when alone), and each
        row's cache is taken from behind its padding. The decoder's own layers run the pass
        (``_prefill_own``), upstream's forward the inputs they leave to it (``_own_layers``).

        Nothing but the admissions' cache rows is written, so a fill may run on another thread and CUDA
        stream while steps run: a step writes a free or reserved row's keys and values at its parked
        position, the slot's last (``release``), which a prompt never reaches (it leaves room for one
        token at least) and the slot's own step overwrites before reading it. On CUDA the caller orders
        the fill after the steps launched before the slots were freed, and ``occupy`` after the fill."""
        inputs = admissions[0].inputs if batch is None else batch
        with _prefill_attention(self.device):
            if self.own_prefill and _own_layers(inputs, self.kinds):
                lengths, logits = self._prefill_own(inputs, admissions, batch is not None)
            else:
                lengths, logits = self._prefill_upstream(inputs, admissions, batch is not None)
        return Filled(lengths, logits)

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

    def check_own_prefill(self, groups: list[tuple[list[Admission], dict | None]]) -> tuple[bool, str]:
        """Prefill each group of admissions (collated in its batch when several) by the decoder's own layers
        and by upstream's forward, and compare the slots' caches (the largest difference against the
        largest value). The own layers stay on where they agree within the dtype's rounding
        (``OWN_PREFILL_TOLERANCE``), and are turned off where they do not or fail: a fault of this
        device's kernels costs speed, never answers. Returns whether they agree and what was seen."""
        tolerance = OWN_PREFILL_TOLERANCE.get(self.dtype, 1e-1)
        apart = 0.0
        try:
            for admissions, batch in groups:
                filled = []
                for own in (True, False):
                    self.own_prefill = own
                    try:
                        self.prefill_many(admissions, batch)
                        filled.append([self._cached(a) for a in admissions])
                    finally:
                        for a in admissions:
                            self.release(a.slot)
                ours, theirs = filled
                scale = max(float(kv.abs().max()) for row in theirs for kv in row) or 1.0
                diff = max(
                    float((a - b).abs().max())
                    for row, their_row in zip(ours, theirs, strict=True)
                    for a, b in zip(row, their_row, strict=True)
                )
                apart = max(apart, diff / scale)
        except Exception as exc:
            self.own_prefill = False
            return False, f"failed ({type(exc).__name__}: {exc})"
        self.own_prefill = apart <= tolerance
        return self.own_prefill, f"{apart:.1e} of the largest value apart, {tolerance:.0e} allowed"

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

    def _cached(self, admission: Admission) -> list[torch.Tensor]:
        """A float32 copy of each layer's keys and values of ``admission``'s prompt in its slot."""
        return [
            kv[admission.slot, :, :, : admission.tokens].to(torch.float32, copy=True) for kv in self.cache
        ]

    def _lengths(self, admissions: list[Admission], total: int, batched: bool) -> list[int]:
        """The prompts' own lengths in a pass of ``total`` positions, refused when a slot cannot hold them."""
        lengths = [a.tokens for a in admissions] if batched else [total]
        if batched and max(lengths) != total:
            raise ValueError(f"prompts of {lengths} tokens made a batch of {total}, not {max(lengths)}")
        if max(lengths) > self.max_len:
            longest = max(lengths)
            raise ValueError(f"the prompt takes {longest} tokens, more than the slots hold ({self.max_len})")
        return lengths

    def _prefill_upstream(
        self, inputs: dict, admissions: list[Admission], batched: bool
    ) -> tuple[list[int], torch.Tensor]:
        """Upstream's forward over the inputs the decoder's own layers leave to it (``_own_layers``); the
        cache into the admissions' slots. Returns the prompts' lengths and the last position's text
        logits [rows, 1, vocab]."""
        from transformers import DynamicCache

        args = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        args = {k: v for k, v in args.items() if k in self._forward_keys}
        cache = DynamicCache()
        with _last_position_only(self.text_head):
            out = self.model(**args, past_key_values=cache, use_cache=True, return_dict=True)
        total = cache.get_seq_length()
        lengths = self._lengths(admissions, total, batched)
        where, shift = self._placement(admissions, [total - n for n in lengths], total)
        for i, layer in enumerate(self.model.layers):
            index = layer.self_attn.layer_idx
            kv = torch.stack([cache.key_cache[index], cache.value_cache[index]], dim=1)
            self._put(i, kv, where, shift)
        return lengths, out.logits

    def _prefill_own(
        self, inputs: dict, admissions: list[Admission], batched: bool
    ) -> tuple[list[int], torch.Tensor | None]:
        """Prompts through the decoder's own layers (``_own_layers``), their keys and values written into
        the admissions' slots layer by layer. Returns the prompts' lengths and, when any admission answers
        in text, the last position's text logits [rows, 1, vocab].

        A voice reference's codes are embedded and put in place of their placeholder by upstream's own
        functions (``_embed_audio_ids``, ``merge_input_ids_with_audio_features``, as its forward does);
        then each dual layer gives a code position its audio norms and FFN and a text position the text
        ones (both computed for every position, kept by ``torch.where``, as a mixed decoding step does),
        and a prompt of text alone takes the text path only. The step's fused projections and one-call
        norms do the work: upstream's forward launched about 1,270 kernels for one 112-token prompt of
        Higgs Audio v2 (most of its 38 ms on an H200 was the host's), and its layers synced with the GPU
        six times each to pick text and audio rows; this pass syncs only inside upstream's merge (with a
        reference), never in the layers. A padded row's positions count from its first real token
        (``_prompt_mask``). Prompts are padded further to one of ``prefill_lengths`` where one holds
        them (``_prefill_padded``: on CUDA a captured graph's replay; a reference's place found on the host,
        ``_merged_layout``)."""
        model = self.model
        codes = inputs.get("audio_out_ids")
        dual = codes is not None and codes.numel() > 0
        if self.prefill_lengths:
            layout = self._merged_layout(inputs) if dual else (inputs["input_ids"], None)
            rows, total = layout[0].shape
            lengths = self._lengths(admissions, total, batched)
            length = self._padded_length(rows, total, dual)
            if length is not None:
                logits = self._prefill_padded(layout, codes, lengths, admissions, length)
                return lengths, None if all(a.audio_output for a in admissions) else logits
        ids = inputs["input_ids"].to(self.device)
        hidden = model.embed_tokens(ids)
        is_code = None
        if dual:
            from boson_multimodal.model.higgs_audio.utils import merge_input_ids_with_audio_features

            merged = merge_input_ids_with_audio_features(
                None, None, None, None,
                model._embed_audio_ids(codes.to(self.device)), inputs["audio_out_ids_start"].to(self.device),
                model.audio_in_token_idx, model.audio_out_token_idx, hidden, ids,
                inputs["attention_mask"].to(self.device), None,
                pad_token_id=model.padding_idx, round_to=1, left_padding=True,
            )  # fmt: skip
            hidden, is_code = merged[0], merged[7][:, :, None]  # the audio-out positions, [rows, total, 1]
        hidden = hidden.to(self.dtype).contiguous()  # the residual sums are written into it (``_plus``)
        rows, total = hidden.shape[:2]
        lengths = self._lengths(admissions, total, batched)
        pads = [total - length for length in lengths]
        ahead = torch.tensor(pads, device=self.device)
        where = torch.tensor([a.slot for a in admissions], device=self.device)
        hidden = self._prompt_pass(hidden, ahead, where, is_code, padded=any(pads))
        if all(a.audio_output for a in admissions):
            return lengths, None
        return lengths, self.text_head(_rms_norm(model.norm, hidden[:, -1:]))

    def _prompt_pass(self, hidden, ahead, where, is_code, padded: bool) -> torch.Tensor:
        """The layers over prompts ``hidden`` [rows, total, hidden] padded on the left by ``ahead`` [rows]
        positions (``padded``: whether any is; else the attention is causal and nothing moves), into the
        slots ``where`` [rows] (``_prompt_layers``). Returns the last layer's hidden states."""
        total = hidden.shape[1]
        positions = (self._arange[None, :total] - ahead[:, None]).clamp_(min=0)
        mask = self._prompt_mask(ahead, total) if padded else None
        shift = self._shift(ahead, total) if padded else None
        return self._prompt_layers(hidden, positions, mask, where, shift, is_code)

    def _prompt_mask(self, ahead: torch.Tensor, total: int) -> torch.Tensor:
        """The additive attention mask of prompts padded on the left by ``ahead`` [rows] positions: causal
        among each row's own tokens; a padding position attends to itself alone (a row of nothing but
        masked keys would make NaNs, which the values' product would carry into real rows)."""
        query, key = self._arange[:total, None], self._arange[None, :total]
        allowed = (key <= query) & ((key[None] >= ahead[:, None, None]) | (key == query)[None])
        mask = torch.zeros((len(ahead), 1, total, total), device=self.device, dtype=self.dtype)
        return mask.masked_fill_(~allowed[:, None], float("-inf"))

    def _prompt_layers(self, hidden, positions, mask, where, shift, is_code) -> torch.Tensor:
        """The layers over prompts ``hidden`` [rows, total, hidden] at ``positions`` (``mask`` or causal),
        their keys and values into the slots ``where`` (``_put``); ``is_code`` [rows, total, 1] marks a
        voice reference's positions (None: text alone). Returns the last layer's hidden states."""
        cos, sin = self._rotation(hidden, positions)  # [rows, total, dim]
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        for i, (layer, kind) in enumerate(zip(self.model.layers, self.kinds, strict=True)):
            both = is_code is not None and kind == "dual"
            x = _rms_norm(layer.input_layernorm, hidden)
            if both:
                x = torch.where(is_code, _rms_norm(layer.audio_input_layernorm, hidden), x)
            hidden = self._prompt_attention(i, layer.self_attn, x, cos, sin, mask, hidden, where, shift)
            if both:
                hidden = hidden + torch.where(
                    is_code,
                    self._mlp(layer.audio_mlp, _rms_norm(layer.audio_post_attention_layernorm, hidden)),
                    self._mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden)),
                )
            else:
                hidden = self._mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden), hidden)
        return hidden

    def _padded_length(self, rows: int, total: int, codes: bool) -> int | None:
        """The length (of ``prefill_lengths``) that ``rows`` prompts of ``total`` positions (with a voice
        reference's ``codes`` or not) are padded to, or None: none holds them, or on CUDA none of the
        fitting length was captured for that many rows."""
        length = next((n for n in self.prefill_lengths if n >= total), None)
        if length is None or length >= self.max_len:  # (the slot's last position is the parked one)
            return None
        if self.graphs_enabled and (rows, length, codes) not in self._prefill_graphs:
            return None
        return length

    def _merged_layout(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a batch's voice references go, on the host: each position's token (``input_ids`` with each
        reference's placeholder widened to its columns, padded on the left as upstream's forward pads them)
        and the reference column it holds (-1 for a token), [rows, total] each. Upstream's own merge
        (``merge_input_ids_with_audio_features``, as ``_prefill_own`` calls it) places stand-ins: each
        token's embedding is its index plus one, each column's minus its index less one."""
        from boson_multimodal.model.higgs_audio.utils import merge_input_ids_with_audio_features

        ids = inputs["input_ids"].to("cpu")
        columns = inputs["audio_out_ids"].shape[1]
        tokens = torch.arange(1, ids.numel() + 1, dtype=torch.float64).view(*ids.shape, 1)
        merged = merge_input_ids_with_audio_features(
            None, None, None, None,
            -torch.arange(1, columns + 1, dtype=torch.float64)[:, None],
            inputs["audio_out_ids_start"].to("cpu"),
            self.model.audio_in_token_idx, self.model.audio_out_token_idx, tokens, ids,
            inputs["attention_mask"].to("cpu"), None,
            pad_token_id=self.model.padding_idx, round_to=1, left_padding=True,
        )  # fmt: skip
        placed = merged[0][..., 0].long()
        return merged[4], torch.where(placed < 0, -placed - 1, -1)

    def _prefill_padded(
        self,
        layout: tuple[torch.Tensor, torch.Tensor | None],
        codes: torch.Tensor | None,
        lengths: list[int],
        admissions: list[Admission],
        length: int,
    ) -> torch.Tensor:
        """Prompts (``layout``: their tokens [rows, total], padded on the left to their longest, and where
        their voice references' ``codes`` go, or None: ``_merged_layout``), padded on the left to
        ``length`` and filled into their slots by ``_padded_pass``: a captured graph's replay where there is
        one. Returns the last position's text logits [rows, 1, vocab]."""
        ids, columns = layout
        rows, total = ids.shape
        padded = torch.zeros((rows, length), dtype=torch.long)
        padded[:, length - total :] = ids.to("cpu")
        pads, slots = torch.tensor([length - n for n in lengths]), torch.tensor([a.slot for a in admissions])
        inputs = [padded, pads, slots]
        if columns is not None:  # each position's reference column, a token's the first (its codes unused)
            at = torch.full((rows, length), -1, dtype=torch.long)
            at[:, length - total :] = columns
            inputs += [codes.to("cpu", torch.long)[:, at.clamp(min=0).flatten()], at >= 0]
        graph = self._prefill_graphs.get((rows, length, columns is not None))
        if graph is None:
            return self._padded_pass(*(t.to(self.device) for t in inputs))
        for buffer, value in zip(graph.inputs, inputs, strict=True):
            buffer.copy_(value.pin_memory(), non_blocking=True)  # (a copy that waits waits for the steps)
        graph.graph.replay()
        return graph.logits.clone()  # (the next replay writes over the graph's own)

    def _padded_pass(
        self,
        ids: torch.Tensor,
        pads: torch.Tensor,
        where: torch.Tensor,
        codes: torch.Tensor | None = None,
        is_code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompts, ``ids`` [rows, length] each padded on the left by ``pads`` [rows], into the slots
        ``where`` [rows]; with voice references, each position's codes (``codes`` [codebooks, rows x
        length]) and whether it holds a reference's (``is_code`` [rows, length]): ``_prefill_own``'s pass
        with every shape fixed by the inputs' and no host read, so that it can be a CUDA graph. Returns the
        last position's text logits [rows, 1, vocab]."""
        rows, length = ids.shape
        hidden = self.model.embed_tokens(ids)
        if codes is not None:
            audio = self.model._embed_audio_ids(codes).view(rows, length, -1)
            is_code = is_code[:, :, None]
            hidden = torch.where(is_code, audio, hidden)
        hidden = self._prompt_pass(hidden.to(self.dtype).contiguous(), pads, where, is_code, padded=True)
        return self.text_head(_rms_norm(self.model.norm, hidden[:, -1:]))

    @torch.inference_mode()
    def capture_prefill_graphs(self, most_rows: int, most_tokens: int) -> int:
        """Capture prefill graphs, before serving: for prompts of text alone and for prompts with a voice
        reference, for every length of ``PREFILL_GRAPH_LENGTHS`` below the slots' length and every number
        of prompts up to ``most_rows`` whose padded positions stay within ``most_tokens`` (one prompt: any
        length); from then on prompts are padded to them. A capture that fails, or whose replay differs from
        the eager pass, leaves that shape eager (logged). Returns how many were captured."""
        if not self.graphs_enabled or self.busy or not self.own_prefill:
            return 0
        references = (False, True) if "skip" not in self.kinds else (False,)  # (``_own_layers``)
        with _prefill_attention(self.device):
            for codes in references:
                for rows in range(1, min(most_rows, self.slots) + 1):
                    for length in PREFILL_GRAPH_LENGTHS:
                        if length < self.max_len and (rows == 1 or rows * length <= most_tokens):
                            self._capture_prefill(rows, length, codes)
        if self._prefill_graphs:
            self.prefill_lengths = PREFILL_GRAPH_LENGTHS
        return len(self._prefill_graphs)

    def _capture_prefill(self, rows: int, length: int, codes: bool) -> None:
        """Capture the padded pass of ``rows`` prompts of ``length`` positions (with a voice reference's
        ``codes`` in the middle of each, or none) on a stream of its own (its graphs replay beside the
        steps': they must not share their cuBLAS workspace, nor their pool). The replay must give the eager
        pass's logits and caches (the slots' first rows, free at start)."""
        generator = torch.Generator().manual_seed(rows * 100_000 + length * 2 + codes)
        inputs = [
            torch.randint(0, self.vocab, (rows, length), generator=generator),
            torch.tensor([length * row // (2 * rows) for row in range(rows)]),
            torch.arange(rows),
        ]
        if codes:
            size = self.model.audio_codebook_size
            inputs.append(torch.randint(0, size, (self.codebooks, rows * length), generator=generator))
            inputs.append((torch.arange(length) >= length // 2) & (torch.arange(length) < 3 * length // 4))
            inputs[-1] = inputs[-1].expand(rows, length).contiguous()
        inputs = [t.to(self.device) for t in inputs]
        key = (rows, length, codes)
        graph = None
        try:
            if self._prefill_capture is None:
                self._prefill_capture = torch.cuda.Stream()
            stream = self._prefill_capture
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                expected = self._padded_pass(*inputs).clone()  # the warm-up, and the reference
                cached = [kv[:rows, :, :, :length].clone() for kv in self.cache]
                graph = torch.cuda.CUDAGraph()
                if self._prefill_pool is None:
                    self._prefill_pool = torch.cuda.graph_pool_handle()
                with torch.cuda.graph(
                    graph, pool=self._prefill_pool, stream=stream, capture_error_mode="thread_local"
                ):
                    logits = self._padded_pass(*inputs)
                for kv in self.cache:
                    kv[:rows, :, :, :length].zero_()
                graph.replay()
                written = [kv[:rows, :, :, :length] for kv in self.cache]
                if not same_logits(expected, logits) or not all(
                    same_logits(a, b) for a, b in zip(cached, written, strict=True)
                ):
                    raise RuntimeError("the replayed prefill differs from the eager one")
            torch.cuda.current_stream().wait_stream(stream)
        except Exception:
            log.exception("CUDA graph capture failed for a prefill of %s; it runs eagerly", key)
            self._prefill_failed.add(key)
            if graph is not None:
                self._graphs_dropped.append(graph)
            return
        self._prefill_graphs[key] = _PrefillGraph(graph, inputs, logits)

    def _prompt_attention(self, i, attn, x, cos, sin, mask, residual, where, shift) -> torch.Tensor:
        """A layer's attention over prompts ``x`` [rows, total, hidden] (causal, or ``mask``), added into
        ``residual``; the keys and values go into the slots (``_put``)."""
        rows, total = x.shape[:2]
        heads, kv_heads = self.heads, self.kv_heads
        qkv = F.linear(x, *self._qkv[i]).view(rows, total, heads + 2 * kv_heads, self.head_dim)
        qk = qkv[:, :, : heads + kv_heads]
        torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, dims=-1), sin, out=qk)
        kv = qkv[:, :, heads:].view(rows, total, 2, kv_heads, self.head_dim).permute(0, 2, 3, 1, 4)
        self._put(i, kv, where, shift)
        groups = heads // kv_heads  # each key/value head serves this many query heads, side by side
        keys, values = (kv[:, half].repeat_interleave(groups, dim=1) for half in (0, 1))
        q = qkv[:, :, :heads].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
        return _plus(residual, attn.o_proj, out.transpose(1, 2).reshape(rows, total, heads * self.head_dim))

    def _placement(self, admissions: list[Admission], pads: list[int], total: int):
        """Where a prefill's rows go (the admissions' slots, as a tensor) and, when any row is padded on
        the left, the index that moves each row's tokens in front of its padding (``_put``)."""
        where = torch.tensor([a.slot for a in admissions], device=self.device)
        if not any(pads):
            return where, None
        return where, self._shift(torch.tensor(pads, device=self.device), total)

    def _shift(self, ahead: torch.Tensor, total: int) -> torch.Tensor:
        """The index that moves each row's tokens in front of its ``ahead`` [rows] positions of padding
        (``_put``), [rows, 1, 1, total, 1]."""
        return (self._arange[None, :total] + ahead[:, None]).clamp_(max=total - 1)[:, None, None, :, None]

    def _put(self, i: int, kv: torch.Tensor, where: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Layer ``i``'s keys and values of a prefill, ``kv`` [rows, 2, kv heads, total, dim], into the first
        positions of the slots ``where``: one gather that moves each row's tokens in front of its padding
        (when any row has some) and one indexed copy, where a copy per row and layer for keys and for values
        made 448 copies for eight prompts of Higgs Audio v2. A row's positions past its length get copies of
        its last token; they are never read (a step attends to a slot's first ``lengths`` positions and
        writes the next one)."""
        if shift is not None:
            kv = kv.gather(3, shift.expand(-1, 2, self.kv_heads, -1, self.head_dim))
        self.cache[i][where, :, :, : kv.shape[3]] = kv

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
                tail = prompt[:, -(RAS_MAX_WINDOW - 1) :]
                if tail.device.type == "cpu" and self.device.type == "cuda":
                    tail = tail.pin_memory()  # (from pageable memory, CUDA's copy may wait for the stream)
                tail = tail.to(self.device, torch.long, non_blocking=True)
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
        cos, sin = self._rotation(hidden, positions[:, None])  # [rows, 1 (heads), dim]
        by_lengths = self.reads_own_keys(length)
        if by_lengths:  # the keys each row reads: its own (a parked row's: the bucket's)
            mask = (positions + 1).clamp(max=length).to(torch.int32)
        else:
            # An additive mask in the model's dtype, made once per step: given as booleans, attention
            # would turn them into this in every layer.
            mask = torch.full((rows, 1, 1, length), float("-inf"), device=self.device, dtype=self.dtype)
            mask.masked_fill_((self._arange[None, :length] <= positions[:, None])[:, None, None, :], 0.0)
        index = self._arange[:rows]

        for i, (layer, kind) in enumerate(zip(model.layers, self.kinds, strict=True)):
            # The residual sums are written into ``hidden`` by the products that make them (``_plus``);
            # a fast-forward layer gives audio rows their input back, so it keeps a copy.
            layer_input = hidden.clone() if kind == "skip" and mode != "text" else hidden
            audio_path = kind == "dual" and mode == "audio"
            if kind == "dual" and mode == "mixed":
                x = torch.where(
                    is_audio,
                    _rms_norm(layer.audio_input_layernorm, hidden),
                    _rms_norm(layer.input_layernorm, hidden),
                )
            else:
                x = _rms_norm(layer.audio_input_layernorm if audio_path else layer.input_layernorm, hidden)
            hidden = self._attention(
                i, layer.self_attn, x, cos, sin, mask, index, positions, length, by_lengths, hidden
            )
            if kind == "dual" and mode == "mixed":
                hidden = hidden + torch.where(
                    is_audio,
                    self._mlp(layer.audio_mlp, _rms_norm(layer.audio_post_attention_layernorm, hidden)),
                    self._mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden)),
                )
            elif audio_path:
                x = _rms_norm(layer.audio_post_attention_layernorm, hidden)
                hidden = self._mlp(layer.audio_mlp, x, hidden)
            else:
                hidden = self._mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden), hidden)
            if kind == "skip" and mode != "text":
                hidden = torch.where(is_audio, layer_input, hidden) if mode == "mixed" else layer_input
        hidden = _rms_norm(model.norm, hidden)[:, 0]
        audio_logits = (
            None if mode == "text" else self.audio_head(hidden).view(rows, self.codebooks, self.codes).float()
        )
        text_logits = None if mode == "audio" else self.text_head(hidden).float()
        return audio_logits, text_logits

    def _rotation(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's cosines and sines at ``positions``, the sign of the rotation on the sines.
        Llama's rotation is x * cos + cat(-x2, x1) * sin for the halves x1, x2 of x; with the sign moved onto
        sin, once per pass, cat(-x2, x1) becomes a roll (a negation is exact: the same numbers)."""
        cos, sin = self.model.rotary_emb(hidden, positions)
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _mlp(self, mlp, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN of ``x``, added into ``residual`` when one is given."""
        fused = self._gate_up.get(id(mlp))
        if fused is None:
            return mlp(x) if residual is None else residual + mlp(x)
        gate, up = F.linear(x, *fused).chunk(2, dim=-1)
        return _plus(residual, mlp.down_proj, mlp.act_fn(gate) * up)

    def reads_own_keys(self, length: int) -> bool:
        """Whether a step in this length bucket attends by each row's length (``by_lengths_from``)."""
        return self.by_lengths_from is not None and length >= self.by_lengths_from

    def _attention(
        self, i, attn, x, cos, sin, mask, index, positions, length, by_lengths, residual
    ) -> torch.Tensor:
        """The layer's attention of ``x``, added into ``residual``. ``mask``: the additive mask of the keys
        beyond each row's position, or ``by_lengths`` how many keys each row reads."""
        rows = x.shape[0]
        qkv = F.linear(x[:, 0], *self._qkv[i]).view(rows, self.heads + 2 * self.kv_heads, self.head_dim)
        # Queries and keys are rotated together, in place: keys and values are then side by side in
        # ``qkv``, as the cache holds them, and go in with one indexed copy.
        qk = qkv[:, : self.heads + self.kv_heads]
        torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, dims=-1), sin, out=qk)
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
        return _plus(residual, attn.o_proj, out.reshape(rows, 1, self.heads * self.head_dim))
