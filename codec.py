"""Decoding audio-code pieces with Higgs Audio's codec, batched, and on CUDA from captured graphs.

A streamed answer reaches the codec as pieces of a few fixed lengths (the first piece, then every later one
but the last: see ``AudioStream.cut``), from every stream at once. The codec's decoder is a deep stack
of small convolutions: at batch 1 a piece costs about as much as a batch of 8 (launch-bound), and every
launch holds Python's lock that the decoding loop needs too. So on CUDA each (batch bucket, piece length)
gets a CUDA graph, captured before serving: a piece is then one copy in, one replay and one copy out,
whatever else is decoding (a stream's last piece too: ``Layout.end_frames`` gives it the regular length).
Other shapes (a stream too short for that), a capture that failed its check, and the CPU decode eagerly,
and there only what the stream sends is computed (``PieceDecoder.decode_part``): a piece's context frames
are decoded for the sake of its samples' neighbours, not to be heard, so each layer computes just the part
of its activations that the samples sent depend on (``decoder_stages``). Either way the codec's weight
normalisation is folded into plain weights at load (``bake_weight_norm``), so no call recomputes its
convolution weights, and its Snake activations work on one buffer each (``snakes_in_place``); the numbers
stay upstream's.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, replace

import numpy as np
import torch

log = logging.getLogger(__name__)


def bake_weight_norm(codec: torch.nn.Module) -> int:
    """Fold each weight-normalised layer's norm and direction into a plain weight, once (the codec is only
    used for inference; otherwise every call recomputes every convolution's weight first). The numbers are
    the same: the weight is computed as before, once. Returns how many layers were folded."""
    folded = 0
    for module in codec.modules():
        if any(type(hook).__name__ == "WeightNorm" for hook in module._forward_pre_hooks.values()):
            torch.nn.utils.remove_weight_norm(module)
            folded += 1
    return folded


def snakes_in_place(codec: torch.nn.Module) -> int:
    """Make each of the codec's Snake activations (``x + sin(alpha * x) ** 2 / (alpha + 1e-9)``, DAC's) run
    the same operations in the same order on one new buffer, where upstream's makes five. At the full sample
    rate a buffer is megabytes, and on a CPU getting fresh memory for it costs more than the arithmetic: one
    64 x 7,680 activation took 1.15 ms upstream's way, 0.42 ms in place (and 0.44 ms upstream's way with
    glibc's malloc told to keep freed memory). Under autograd upstream's form runs (a backward pass needs
    the values an in-place step overwrites). Returns how many activations were changed."""
    changed = 0
    for module in codec.modules():
        if type(module).__name__ == "Snake1d" and isinstance(getattr(module, "alpha", None), torch.Tensor):
            module.forward = types.MethodType(_snake_in_place, module)
            changed += 1
    return changed


def _snake_in_place(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or x.dim() != 3:
        return type(self).forward(self, x)
    alpha = self.alpha
    y = alpha * x
    y.sin_()
    y.mul_(y)  # ``pow(2)`` squares by multiplying too
    y.mul_((alpha + 1e-9).reciprocal())
    return y.add_(x)


@dataclass(frozen=True)
class Stage:
    """One step of the codec's decoder, as ``decode_part`` cuts its input: an output sample at ``y``
    depends on the input samples within ``reach`` of ``y / upsampling``; ``margin`` is the reach, in its
    input's samples, of this stage and every one after it, and ``scale`` the decoder's output samples per
    input sample of this stage."""

    module: torch.nn.Module
    upsampling: int
    reach: int
    margin: int = 0
    scale: int = 1


def decoder_stages(decoder: torch.nn.Module) -> list[Stage] | None:
    """Higgs Audio's codec decoder (DAC's: a convolution; blocks of a Snake, a transposed convolution that
    upsamples and three dilated residual units; a Snake and a last convolution) as the flat list of its
    stages, each with its reach (``Stage``). None for a decoder of another make: it is never cut."""
    modules = getattr(decoder, "model", None)
    if not isinstance(modules, torch.nn.Sequential):
        return None
    flat: list[torch.nn.Module] = []
    for module in modules:
        block = getattr(module, "block", None) if type(module).__name__ == "DecoderBlock" else [module]
        if block is None:
            return None
        flat.extend(block)
    stages = []
    for module in flat:
        name = type(module).__name__
        if name == "Snake1d":
            stages.append(Stage(module, 1, 0))
        elif name == "ResidualUnit" and (convolutions := _convolutions(module)) is not None:
            stages.append(Stage(module, 1, sum(_reach(conv) for conv in convolutions)))
        elif isinstance(module, torch.nn.ConvTranspose1d) and module.dilation[0] == 1:
            # input i reaches the outputs i * stride - padding + k, k < kernel: output y takes the inputs
            # within kernel / stride + 1 of y / stride
            stride, kernel = module.stride[0], module.kernel_size[0]
            stages.append(Stage(module, stride, -(-kernel // stride) + 1))
        elif isinstance(module, torch.nn.Conv1d) and _same_length(module):
            stages.append(Stage(module, 1, _reach(module)))
        else:
            return None
    margin, scale = 0, 1
    for i in reversed(range(len(stages))):
        stage = stages[i]
        margin = -(-margin // stage.upsampling) + stage.reach
        scale *= stage.upsampling
        stages[i] = replace(stage, margin=margin, scale=scale)
    return stages


def _same_length(conv: torch.nn.Module) -> bool:
    """A 1-d convolution whose output is its input's length, each output aligned with its input."""
    if not isinstance(conv, torch.nn.Conv1d) or conv.stride[0] != 1 or isinstance(conv.padding, str):
        return False
    return 2 * conv.padding[0] == (conv.kernel_size[0] - 1) * conv.dilation[0]


def _reach(conv: torch.nn.Conv1d) -> int:
    """How far from an output's position its inputs lie, at most (a same-length convolution's padding)."""
    return conv.padding[0]


def _convolutions(unit: torch.nn.Module) -> list[torch.nn.Conv1d] | None:
    """A residual unit's convolutions (DAC's: a Snake, a dilated convolution, a Snake, a 1-wide one, the
    input added back), when every other step of it is a Snake and each keeps the length; else None."""
    steps = list(getattr(unit, "block", []))
    convolutions = [step for step in steps if type(step).__name__ != "Snake1d"]
    if not convolutions or not all(_same_length(conv) for conv in convolutions):
        return None
    return convolutions


class PieceDecoder:
    """Audio codes ``[batch, codebooks, frames]`` to samples ``[batch, 1, frames * samples_per_frame]``."""

    def __init__(self, codec, *, codebooks: int, codebook_size: int, graphs: bool):
        self.codec = codec
        self.codebooks = codebooks
        self.codebook_size = codebook_size
        self.device = torch.device(codec.device)
        self.graphs_enabled = graphs and self.device.type == "cuda" and codec.quantizer_type == "RVQ"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None  # not the decoding loop's pool: the two run at the same time on two streams
        self._side_stream: torch.cuda.Stream | None = None
        self._graphs_dropped: list[torch.cuda.CUDAGraph] = []
        self.failed: set[tuple[int, int]] = set()
        """The (batch, frames) shapes whose capture failed (logged): decoded eagerly for good."""
        self.eager_calls = 0
        """Calls decoded eagerly (no graph of their shape), since start."""
        self.stages = decoder_stages(codec.decoder_2) if codec.quantizer_type == "RVQ" else None
        """The decoder's stages as ``decode_part`` cuts them; None: it decodes whole pieces."""

    def graphed(self, frames: int) -> bool:
        """Whether pieces of this length have captured graphs."""
        return any(length == frames for _, length in self._graphs)

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Decode a batch of pieces of one length (on the caller's CUDA stream)."""
        batch, _, frames = codes.shape
        bucket = self._bucket(batch, frames)
        if bucket is None:
            self.eager_calls += 1
            return self.codec.decode(codes)
        graph, inputs, output = self._graphs[(bucket, frames)]
        inputs[:batch].copy_(codes)  # rows past ``batch`` keep earlier (valid) codes; their output is unread
        graph.replay()
        return output[:batch].float().cpu().numpy()

    def _bucket(self, batch: int, frames: int) -> int | None:
        """The smallest batch with a captured graph for ``batch`` pieces of ``frames`` frames, or None."""
        return next((b for b, f in sorted(self._graphs) if f == frames and b >= batch), None)

    def decode_part(self, codes: torch.Tensor, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` of each piece's decode, ``[batch, 1, stop - start]``: ``decode``'s, up
        to float rounding (a layer may sum in another order for another length). Decoded eagerly, each stage
        computes only the part of its activations within its ``margin`` of those samples: where that part
        reaches the piece's edge the stage's input is padded as the whole piece's is, and where it is cut
        the padding lies further from every wanted sample than any of them reaches. A batch with a graph of
        its shape replays it whole."""
        batch, _, frames = codes.shape
        if self.stages is None or self._bucket(batch, frames) is not None:
            return self.decode(codes)[..., start:stop]
        self.eager_calls += 1
        with torch.inference_mode():
            x = self._latent(codes.to(self.device))
            at = 0  # the input sample of the stage that ``x[..., 0]`` is
            for stage in self.stages:
                first = max(at, start // stage.scale - stage.margin)
                upto = min(at + x.shape[-1], -(-stop // stage.scale) + stage.margin)
                if first > at or upto < at + x.shape[-1]:
                    x, at = x[..., first - at : upto - at], first
                x = stage.module(x)
                at *= stage.upsampling
            return x[..., start - at : stop - at].float().cpu().numpy()

    def capture(self, frames: list[int], batches: list[int]) -> int:
        """Capture a graph per piece length and batch bucket (before serving). Returns how many there are."""
        if not self.graphs_enabled:
            return 0
        for length in sorted(set(frames)):
            for batch in sorted(set(batches)):
                if (batch, length) not in self._graphs:
                    self._capture(batch, length)
        return len(self._graphs)

    @torch.inference_mode()
    def _forward(self, codes: torch.Tensor) -> torch.Tensor:
        """The codec's decode without its host copies (the codec starts its sum from a tensor made on the
        host)."""
        return self.codec.decoder_2(self._latent(codes))

    def _latent(self, codes: torch.Tensor) -> torch.Tensor:
        """The decoder's input: code embeddings summed over the residual codebooks, projected."""
        layers = self.codec.quantizer.vq.layers
        by_codebook = codes.permute(1, 0, 2)
        quantized = layers[0].decode(by_codebook[0])
        for i in range(1, by_codebook.shape[0]):
            quantized = quantized + layers[i].decode(by_codebook[i])
        return self.codec.fc_post2(quantized.transpose(1, 2)).transpose(1, 2)

    @torch.inference_mode()
    def _capture(self, batch: int, frames: int) -> None:
        generator = torch.Generator().manual_seed(batch * 1000 + frames)
        sample = torch.randint(0, self.codebook_size, (batch, self.codebooks, frames), generator=generator)
        graph = None
        try:
            inputs = sample.to(self.device)
            expected = torch.from_numpy(self.codec.decode(sample)).to(self.device)
            if self._side_stream is None:  # one for every capture (see ``BatchDecoder._capture_stream``)
                self._side_stream = torch.cuda.Stream()
            stream = self._side_stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward(inputs)  # warm-up outside the capture (lazy initialisation, cuDNN plans)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                output = self._forward(inputs)
            graph.replay()
            torch.cuda.synchronize()
            scale = float(expected.abs().max()) or 1.0
            if not torch.allclose(output.float(), expected.float(), rtol=1e-2, atol=1e-2 * scale):
                raise RuntimeError("the replayed codec graph differs from the codec's decode")
        except Exception:
            log.exception("CUDA graph capture of the codec failed for %d pieces of %d frames", batch, frames)
            if graph is not None:  # kept: see ``BatchDecoder._graphs_dropped``
                self._graphs_dropped.append(graph)
            self.failed.add((batch, frames))
            return
        self._graphs[(batch, frames)] = (graph, inputs, output)
