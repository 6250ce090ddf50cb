"""The decoder layers' arithmetic over upstream's weights, shared by the prefill (``prefill.py``) and the
decoding step (``decoder.py``).

Upstream's modules hold the weights; the arithmetic is written here so that a layer takes few kernels,
because at small batches a kernel's start can cost the GPU more than its work: each layer's query, key and
value projections are one matrix product, and each FFN's gate and up projections another (``_fuse_rows``
stacks the weights once and leaves the upstream modules views of them, so nothing is stored twice and
upstream's own forward, which prefills what the decoder's layers leave to it, reads the same numbers); the
rotation is applied to queries and keys together and written back in place (its sign on the sines,
``Layers.rotation``); a norm, weight included, is one call (``rms_norm``); and the residual sums are matrix
products that add into the hidden state (``plus``). With the cache write, 13 kernels a decoder layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Layers:
    """A ``HiggsAudioModel``'s decoder layers as the batched decoder computes them: each layer's kind, its
    fused projections, the attention's head counts, and the rotation and FFN over them."""

    def __init__(self, model):
        text = model.config.text_config
        self.model = model
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
        self.qkv = [
            _fuse_rows([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
            for layer in model.layers
        ]
        """Each layer's query, key and value projections as one weight (and bias)."""
        self._gate_up: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for layer in model.layers:
            for mlp in (layer.mlp, getattr(layer, "audio_mlp", None)):
                if mlp is not None and _is_gated_mlp(mlp):
                    self._gate_up[id(mlp)] = _fuse_rows([mlp.gate_proj, mlp.up_proj])
        attn = model.layers[0].self_attn
        self.heads = int(getattr(attn, "num_heads", text.num_attention_heads))
        self.kv_heads = int(getattr(attn, "num_key_value_heads", text.num_key_value_heads))
        self.head_dim = int(getattr(attn, "head_dim", text.hidden_size // text.num_attention_heads))

    def rotation(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's cosines and sines at ``positions``, the sign of the rotation on the sines.
        Llama's rotation is x * cos + cat(-x2, x1) * sin for the halves x1, x2 of x; with the sign moved onto
        sin, once per pass, cat(-x2, x1) becomes a roll (a negation is exact: the same numbers)."""
        cos, sin = self.model.rotary_emb(hidden, positions)
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def rotate_(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate queries and keys ``qk`` (heads, then dim last) in place by ``rotation``'s cos and sin."""
        torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, dims=-1), sin, out=qk)

    def mlp(self, mlp, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN of ``x``, added into ``residual`` when one is given."""
        fused = self._gate_up.get(id(mlp))
        if fused is None:
            return mlp(x) if residual is None else residual + mlp(x)
        gate, up = F.linear(x, *fused).chunk(2, dim=-1)
        return plus(residual, mlp.down_proj, mlp.act_fn(gate) * up)


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm as one call, its weight included: the fused kernel computes in float32 inside and
    rounds once to ``x``'s dtype (upstream's module rounds the normalised values, then applies the weight
    in that dtype: the same numbers in float32, one rounding fewer in bfloat16)."""
    return F.rms_norm(x, (x.shape[-1],), weight=norm.weight, eps=norm.variance_epsilon)


def plus(residual: torch.Tensor | None, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``, written into ``residual``: one matrix product that adds (``addmm_``, beta
    1) instead of a product and an addition. Without a residual, ``linear(x)``."""
    if residual is None:
        return linear(x)
    if linear.bias is not None:
        return residual + linear(x)
    residual.view(-1, residual.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t())
    return residual


def same_logits(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether a CUDA graph's replay gave the eager pass's numbers (logits, or a cache): the same ones
    masked (-inf), the others within 1% of the largest (finite) one."""
    finite = want.isfinite()
    if not torch.equal(finite, got.isfinite()) or not finite.any():
        return bool(torch.equal(finite, got.isfinite()))
    scale = float(want[finite].abs().max())
    return bool(torch.allclose(want[finite], got[finite], rtol=1e-2, atol=1e-2 * scale))


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
