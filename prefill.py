"""Prompts into the batched decoder's slots: the prefill pass, which writes a prompt's keys and values into a
slot's rows of the KV cache (``decoder.py`` owns the slots and decodes from them).

A burst of prompts runs in one pass (``Prefiller.fill``), padded on the left, each row's cache taken from
behind its padding. The decoder's own layers run it (``layers.py``'s arithmetic, ``Prefiller._own``),
upstream's forward the prompts they leave to it (audio features or audio-in codes, which the service's
prompts hold none of, and references on models with fast-forward layers). A fill writes nothing but its
slots' cache rows, so it may run on another thread and CUDA stream while the decoding steps run. On CUDA
prompts are padded to one of ``PREFILL_GRAPH_LENGTHS`` and replayed from a CUDA graph of that shape
(``capture_graphs``): a prefill was mostly the host's time, launching kernels. At start the own layers are
checked against upstream's forward (``check_own``) and left off where they disagree.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from layers import Layers, plus, rms_norm, same_logits

if TYPE_CHECKING:
    from decoder import Admission

log = logging.getLogger(__name__)

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
voice reference or without (``capture_graphs``): the smallest that holds the longest prompt. A
prefill was mostly the host's time, launching the layers' kernels one by one (on an H200 with the full-size
model 12.8 ms for one prompt and 37.6 ms for eight, their GPU work a few ms), while the decoding loop's own
host work waits for the interpreter lock; a replay is one launch. The price: the GPU computes up to twice
the prompt's positions. Longer prompts run eagerly."""

OWN_PREFILL_TOLERANCE = {torch.float32: 1e-3}
"""How far the decoder's own prefill layers may be from upstream's forward at start (``Prefiller.check_own``):
the largest difference of a slot's cache against its largest value, by dtype; 1e-1 for the 16-bit ones.
The two group their products differently (fused projections, sums inside the products), so they agree to
rounding only: 2e-7 in float32 and 7e-3 in bfloat16 on the tiny model (``bench/check_cuda.py``), 3.4e-2
in bfloat16 on the full-size random-weight model on an H200 (the rounding of 28 layers), which 5e-2 left
too little room. The check is against gross faults (wrong positions left 0.86 of the largest value
apart); ``check_cuda.py`` compares the two in float32 to 1e-3."""


@dataclass(frozen=True)
class Filled:
    """Prompts run into their slots' caches (``Prefiller.fill``), not decoding yet: each prompt's length
    in its slot and, when any answers in text, the last position's text logits [rows, 1, vocab]."""

    lengths: list[int]
    logits: torch.Tensor | None


@dataclass
class _PrefillGraph:
    """A captured prefill of prompts padded to one length: its input buffers (``_padded_pass``'s arguments)
    and its logits [rows, 1, vocab]."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    logits: torch.Tensor


class Prefiller:
    """Fills prompts into slots of a batched decoder's KV cache (``cache``: a tensor per layer, [slots, 2,
    kv heads, max_len, dim]); not thread-safe (one owner)."""

    def __init__(self, model, layers: Layers, cache: list[torch.Tensor], *, max_len: int, graphs: bool):
        self.model = model
        self.layers = layers
        self.cache = cache
        self.device = model.device
        self.dtype = model.dtype
        self.slots = cache[0].shape[0]
        self.max_len = max_len
        self.codebooks = int(model.config.audio_num_codebooks)
        self.vocab = int(model.config.text_config.vocab_size)
        self.text_head = model.audio_decoder_proj.text_lm_head
        self.graphs_enabled = graphs and self.device.type == "cuda"
        self._forward_keys = set(inspect.signature(model.forward).parameters)
        self._arange = torch.arange(max_len, device=self.device)
        self.own = True
        """Prefill with the decoder's own layers (``_own``) what they can take; off, every prompt goes
        through upstream's forward (``check_own`` turns it off when the two disagree)."""
        self.padded_lengths: tuple[int, ...] = ()
        """The lengths prompts are padded to (``_padded_length``): on CUDA ``PREFILL_GRAPH_LENGTHS``, set by
        ``capture_graphs``, where a captured graph runs the pass (``graphs``); elsewhere (the tests) the
        same padded pass runs eagerly."""
        self.graphs: dict[tuple[int, int, bool], _PrefillGraph] = {}  # (rows, length, codes)
        self.failed: set[tuple[int, int, bool]] = set()  # shapes whose capture failed (eager)
        # The graphs whose capture failed its check, kept (see ``BatchDecoder._graphs_dropped``).
        self._dropped: list[torch.cuda.CUDAGraph] = []
        self._pool = None  # not the steps' pool: a fill runs beside the steps
        self._stream: torch.cuda.Stream | None = None

    @torch.inference_mode()
    def fill(self, admissions: list[Admission], batch: dict | None = None) -> Filled:
        """Run prompts through the model into their slots' caches, in one forward pass.

        One admission runs its own ``inputs``; several run ``batch``, their samples collated together and
        padded on the left (a row's real tokens keep positions ``0..tokens-1``, as when alone), and each
        row's cache is taken from behind its padding. The decoder's own layers run the pass
        (``_own``), upstream's forward the inputs they leave to it (``_own_layers``).

        Nothing but the admissions' cache rows is written, so a fill may run on another thread and CUDA
        stream while steps run: a step writes a free or reserved row's keys and values at its parked
        position, the slot's last (``BatchDecoder.release``), which a prompt never reaches (it leaves room
        for one token at least) and the slot's own step overwrites before reading it. On CUDA the caller
        orders the fill after the steps launched before the slots were freed, and the decoder's ``occupy``
        after the fill."""
        inputs = admissions[0].inputs if batch is None else batch
        with _prefill_attention(self.device):
            if self.own and _own_layers(inputs, self.layers.kinds):
                lengths, logits = self._own(inputs, admissions, batch is not None)
            else:
                lengths, logits = self._upstream(inputs, admissions, batch is not None)
        return Filled(lengths, logits)

    def check_own(self, groups: list[tuple[list[Admission], dict | None]]) -> tuple[bool, str]:
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
                    self.own = own
                    self.fill(admissions, batch)
                    filled.append([self._cached(a) for a in admissions])
                ours, theirs = filled
                scale = max(float(kv.abs().max()) for row in theirs for kv in row) or 1.0
                diff = max(
                    float((a - b).abs().max())
                    for row, their_row in zip(ours, theirs, strict=True)
                    for a, b in zip(row, their_row, strict=True)
                )
                apart = max(apart, diff / scale)
        except Exception as exc:
            self.own = False
            return False, f"failed ({type(exc).__name__}: {exc})"
        self.own = apart <= tolerance
        return self.own, f"{apart:.1e} of the largest value apart, {tolerance:.0e} allowed"

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

    def _upstream(
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

    def _own(
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
        (``_prompt_mask``). Prompts are padded further to one of ``padded_lengths`` where one holds
        them (``_padded``: on CUDA a captured graph's replay; a reference's place found on the host,
        ``_merged_layout``)."""
        model = self.model
        codes = inputs.get("audio_out_ids")
        dual = codes is not None and codes.numel() > 0
        if self.padded_lengths:
            layout = self._merged_layout(inputs) if dual else (inputs["input_ids"], None)
            rows, total = layout[0].shape
            lengths = self._lengths(admissions, total, batched)
            length = self._padded_length(rows, total, dual)
            if length is not None:
                logits = self._padded(layout, codes, lengths, admissions, length)
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
        hidden = hidden.to(self.dtype).contiguous()  # the residual sums are written into it (``plus``)
        rows, total = hidden.shape[:2]
        lengths = self._lengths(admissions, total, batched)
        pads = [total - length for length in lengths]
        ahead = torch.tensor(pads, device=self.device)
        where = torch.tensor([a.slot for a in admissions], device=self.device)
        hidden = self._prompt_pass(hidden, ahead, where, is_code, padded=any(pads))
        if all(a.audio_output for a in admissions):
            return lengths, None
        return lengths, self.text_head(rms_norm(model.norm, hidden[:, -1:]))

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
        cos, sin = self.layers.rotation(hidden, positions)  # [rows, total, dim]
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        for i, (layer, kind) in enumerate(zip(self.model.layers, self.layers.kinds, strict=True)):
            both = is_code is not None and kind == "dual"
            x = rms_norm(layer.input_layernorm, hidden)
            if both:
                x = torch.where(is_code, rms_norm(layer.audio_input_layernorm, hidden), x)
            hidden = self._prompt_attention(i, layer.self_attn, x, cos, sin, mask, hidden, where, shift)
            if both:
                hidden = hidden + torch.where(
                    is_code,
                    self.layers.mlp(layer.audio_mlp, rms_norm(layer.audio_post_attention_layernorm, hidden)),
                    self.layers.mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, hidden)),
                )
            else:
                hidden = self.layers.mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, hidden), hidden)
        return hidden

    def _padded_length(self, rows: int, total: int, codes: bool) -> int | None:
        """The length (of ``padded_lengths``) that ``rows`` prompts of ``total`` positions (with a voice
        reference's ``codes`` or not) are padded to, or None: none holds them, or on CUDA none of the
        fitting length was captured for that many rows."""
        length = next((n for n in self.padded_lengths if n >= total), None)
        if length is None or length >= self.max_len:  # (the slot's last position is the parked one)
            return None
        if self.graphs_enabled and (rows, length, codes) not in self.graphs:
            return None
        return length

    def _merged_layout(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a batch's voice references go, on the host: each position's token (``input_ids`` with each
        reference's placeholder widened to its columns, padded on the left as upstream's forward pads them)
        and the reference column it holds (-1 for a token), [rows, total] each. Upstream's own merge
        (``merge_input_ids_with_audio_features``, as ``_own`` calls it) places stand-ins: each
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

    def _padded(
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
        graph = self.graphs.get((rows, length, columns is not None))
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
        length]) and whether it holds a reference's (``is_code`` [rows, length]): ``_own``'s pass
        with every shape fixed by the inputs' and no host read, so that it can be a CUDA graph. Returns the
        last position's text logits [rows, 1, vocab]."""
        rows, length = ids.shape
        hidden = self.model.embed_tokens(ids)
        if codes is not None:
            audio = self.model._embed_audio_ids(codes).view(rows, length, -1)
            is_code = is_code[:, :, None]
            hidden = torch.where(is_code, audio, hidden)
        hidden = self._prompt_pass(hidden.to(self.dtype).contiguous(), pads, where, is_code, padded=True)
        return self.text_head(rms_norm(self.model.norm, hidden[:, -1:]))

    @torch.inference_mode()
    def capture_graphs(self, most_rows: int, most_tokens: int) -> int:
        """Capture prefill graphs, before serving (a capture writes the first slots' caches: the decoder's
        ``capture_prefill_graphs`` calls it while no slot is in use): for prompts of text alone and for
        prompts with a voice reference, for every length of ``PREFILL_GRAPH_LENGTHS`` below the slots' length
        and every number of prompts up to ``most_rows`` whose padded positions stay within ``most_tokens``
        (one prompt: any length); from then on prompts are padded to them. A capture that fails, or whose
        replay differs from the eager pass, leaves that shape eager (logged). Returns how many were
        captured."""
        if not self.graphs_enabled or not self.own:
            return 0
        references = (False, True) if "skip" not in self.layers.kinds else (False,)  # (``_own_layers``)
        with _prefill_attention(self.device):
            for codes in references:
                for rows in range(1, min(most_rows, self.slots) + 1):
                    for length in PREFILL_GRAPH_LENGTHS:
                        if length < self.max_len and (rows == 1 or rows * length <= most_tokens):
                            self._capture(rows, length, codes)
        if self.graphs:
            self.padded_lengths = PREFILL_GRAPH_LENGTHS
        return len(self.graphs)

    def _capture(self, rows: int, length: int, codes: bool) -> None:
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
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            stream = self._stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                expected = self._padded_pass(*inputs).clone()  # the warm-up, and the reference
                cached = [kv[:rows, :, :, :length].clone() for kv in self.cache]
                graph = torch.cuda.CUDAGraph()
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                with torch.cuda.graph(
                    graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"
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
            self.failed.add(key)
            if graph is not None:
                self._dropped.append(graph)
            return
        self.graphs[key] = _PrefillGraph(graph, inputs, logits)

    def _prompt_attention(self, i, attn, x, cos, sin, mask, residual, where, shift) -> torch.Tensor:
        """A layer's attention over prompts ``x`` [rows, total, hidden] (causal, or ``mask``), added into
        ``residual``; the keys and values go into the slots (``_put``)."""
        rows, total = x.shape[:2]
        heads, kv_heads, dim = self.layers.heads, self.layers.kv_heads, self.layers.head_dim
        qkv = F.linear(x, *self.layers.qkv[i]).view(rows, total, heads + 2 * kv_heads, dim)
        qk = qkv[:, :, : heads + kv_heads]
        self.layers.rotate_(qk, cos, sin)
        kv = qkv[:, :, heads:].view(rows, total, 2, kv_heads, dim).permute(0, 2, 3, 1, 4)
        self._put(i, kv, where, shift)
        groups = heads // kv_heads  # each key/value head serves this many query heads, side by side
        keys, values = (kv[:, half].repeat_interleave(groups, dim=1) for half in (0, 1))
        q = qkv[:, :, :heads].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
        return plus(residual, attn.o_proj, out.transpose(1, 2).reshape(rows, total, heads * dim))

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
            kv = kv.gather(3, shift.expand(-1, 2, self.layers.kv_heads, -1, self.layers.head_dim))
        self.cache[i][where, :, :, : kv.shape[3]] = kv


@contextmanager
def _prefill_attention(device: torch.device) -> Iterator[None]:
    """While it lasts, attention on CUDA uses the kernels of ``PREFILL_ATTENTION``."""
    if device.type != "cuda" or PREFILL_ATTENTION is None:
        yield
        return
    with sdpa_kernel(list(PREFILL_ATTENTION)):
        yield


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
    """While it lasts, ``head`` projects each row's last position only, when this thread calls it. Upstream's
    forward gives the text head every prompt position, 128,256 logits each (1 GiB for a 4,096-token prefill
    in bfloat16), where a prefill needs the last one (its rows are padded on the left, so every row's prompt
    ends there). The head is the decoding step's too, and a fill runs beside the steps: an eager step on
    the scheduler thread meanwhile gets its own positions [rows, hidden] whole."""
    filling = threading.get_ident()

    def last_only(module: torch.nn.Module, args: tuple) -> tuple | None:
        return (args[0][:, -1:], *args[1:]) if threading.get_ident() == filling else None

    handle = head.register_forward_pre_hook(last_only)
    try:
        yield
    finally:
        handle.remove()
