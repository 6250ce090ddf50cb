"""Higgs Audio v2 as loaded for serving: the only module that imports ``boson_multimodal``.

``Higgs`` holds the generation model, its text tokenizer, the audio codec (weight norm folded, Snake
activations in place: ``codec.py``) and the ChatML collator, loaded once from a hub id or a local folder.
It turns a ``GenerationRequest``'s turns into the model's inputs (``prompt``), knows the special tokens the
decoding loop reads, and encodes reference clips. It does not schedule anything: ``engine.py`` does.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch

from audio import Audio
from codec import bake_weight_norm, snakes_in_place
from decoder import BatchDecoder
from detokenize import ids_decoder
from generation import AudioCodes, ContextLengthError, GenerationRequest

END_TOKENS = ("<|end_of_text|>", "<|eot_id|>")
SCENE_MARKERS = ("<|scene_desc_start|>", "<|scene_desc_end|>")
"""The control tokens a system turn's text may hold (the scene description's bounds)."""


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The settings' ``dtype`` name as a torch dtype ("auto": bfloat16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


@dataclass(frozen=True)
class Prompt:
    inputs: dict  # the model's inputs for this prompt alone
    sample: object  # its ChatMLDatasetSample, to collate with others for a prefill together
    tokens: int
    audio_tokens: int


class Higgs:
    """The loaded model, tokenizers and codec, and what the rest of the service needs to know of them."""

    def __init__(self, model: str, audio_tokenizer: str, device: str, dtype: str):
        # Imported here so that merely importing this module (for its types) stays cheap.
        from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer
        from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
        from boson_multimodal.model.higgs_audio import HiggsAudioModel
        from transformers import AutoProcessor, AutoTokenizer

        self.model = HiggsAudioModel.from_pretrained(model, torch_dtype=torch_dtype(dtype, device))
        # Inference only: no parameter asks for gradients, so that no code path (a CUDA graph's capture
        # runs outside ``inference_mode`` unless told) can meet autograd, which refuses the decoder's
        # in-place products (``addcmul(out=...)``) and would have failed every capture.
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model.set_audio_special_tokens(self.tokenizer)
        self.decode_ids = ids_decoder(self.tokenizer)  # for the scheduler thread alone
        self.codec = load_higgs_audio_tokenizer(audio_tokenizer, device=device)
        bake_weight_norm(self.codec)
        snakes_in_place(self.codec)
        self.codec.requires_grad_(False)  # (after the folding, whose new weights would ask for them)
        config = self.config = self.model.config
        whisper = (
            AutoProcessor.from_pretrained("openai/whisper-large-v3-turbo", trust_remote=True, device=device)
            if config.encode_whisper_embed
            else None
        )
        self._collator = HiggsAudioSampleCollator(
            whisper_processor=whisper,
            encode_whisper_embed=config.encode_whisper_embed,
            audio_in_token_id=config.audio_in_token_idx,
            audio_out_token_id=config.audio_out_token_idx,
            audio_stream_bos_id=config.audio_stream_bos_id,
            audio_stream_eos_id=config.audio_stream_eos_id,
            pad_token_id=config.pad_token_id,
            return_audio_in_tokens=False,
            use_delay_pattern=config.use_delay_pattern,
            audio_num_codebooks=config.audio_num_codebooks,
            round_to=1,
            pad_left=True,
        )
        self._tokenizer_lock = threading.Lock()  # prompts are built on a pool thread, text cut on another
        controls = [t for t in self.tokenizer.get_added_vocab() if t.startswith("<|") and t.endswith("|>")]
        controls.sort(key=len, reverse=True)  # (the longest first, where one starts another)
        self._controls = re.compile("|".join(map(re.escape, controls)) or "(?!)")  # (``as_text``)

        self.sample_rate = int(self.codec.sampling_rate)
        self.frame_rate = int(self.codec.tps)
        self.num_codebooks = int(config.audio_num_codebooks)
        self.codebook_size = int(config.audio_codebook_size)
        self.placeholder_ids = {config.audio_in_token_idx, config.audio_out_token_idx}
        token = self.tokenizer.convert_tokens_to_ids
        self.end_ids = {token(t) for t in END_TOKENS}
        self.audio_eos_id = token("<|audio_eos|>")
        # Tokens that would start audio (or an audio placeholder with no audio behind it) in a text answer.
        self.audio_start_ids = [
            token("<|audio_out_bos|>"),
            config.audio_out_token_idx,
            config.audio_in_token_idx,
        ]
        self._postfix_text = self.tokenizer.encode(
            "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
        )
        self._postfix_audio = self._postfix_text + self.tokenizer.encode(
            "<|audio_out_bos|>", add_special_tokens=False
        )

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of KV cache one row of ``tokens`` tokens takes (every layer's keys and values)."""
        text = self.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_token = 2 * text.num_key_value_heads * head_dim * self.model.dtype.itemsize  # a key and a value
        return len(self.model.layers) * per_token * tokens

    def decoder(self, slots: int, max_len: int, **options) -> BatchDecoder:
        """A ``BatchDecoder`` of ``slots`` rows of ``max_len`` tokens over this model (``options``: its
        keyword arguments, graphs and length buckets)."""
        return BatchDecoder(
            self.model,
            slots=slots,
            max_len=max_len,
            audio_out_token=self.config.audio_out_token_idx,
            audio_eos_token=self.audio_eos_id,
            suppress_in_text=self.audio_start_ids,
            **options,
        )

    def text_tokens(self, text: str, limit: int | None) -> tuple[str, int]:
        """``text`` cut to its first ``limit`` tokens (None: whole), and how many tokens that is."""
        with self._tokenizer_lock:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if limit is None or len(ids) <= limit:
                return text, len(ids)
            return self.tokenizer.decode(ids[:limit]), limit

    def as_text(self, text: str, role: str) -> str:
        """``text`` with each of the tokenizer's control tokens (``<|eot_id|>``, ``<|AUDIO_OUT|>``, ...)
        broken by a zero-width space after its ``<``, so that the tokenizer reads it as text. A client's
        ``<|AUDIO_OUT|>`` was an audio placeholder with no audio behind it (upstream's prompt building
        failed: a 500), and its ``<|eot_id|>`` ended a turn (a client could write the conversation's
        structure). A system turn keeps its scene markers (``SCENE_MARKERS``): a Higgs system prompt written
        out in full is taken as it is (``voice_cloning.system_turn``)."""

        def broken(match: re.Match) -> str:
            token = match.group(0)
            return token if role == "system" and token in SCENE_MARKERS else f"<\u200b{token[1:]}"

        return self._controls.sub(broken, text)

    def prompt(self, request: GenerationRequest, max_context: int) -> Prompt:
        """The model's inputs for ``request`` (on the CPU), refused when prompt plus output do not fit in
        ``max_context`` tokens."""
        from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

        messages, clips = [], []
        for turn in request.turns:
            content: list = []
            if turn.text:
                content.append(TextContent(text=self.as_text(turn.text, turn.role)))
            if turn.audio is not None:
                content.append(AudioContent(audio_url=""))
                clips.append(turn.audio.codes)
            messages.append(Message(role=turn.role, content=content))
        with self._tokenizer_lock:
            tokens, _, _, _ = prepare_chatml_sample(ChatMLSample(messages=messages), self.tokenizer)
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
        inputs = self.collate([sample])
        # The model replaces each audio placeholder by the clip's columns (frames plus the stream's
        # begin/end markers and the codebook delay), so that is what the context really holds.
        audio_columns = sum(
            int(inputs[key].shape[1])
            for key in ("audio_in_ids", "audio_out_ids")
            if inputs.get(key) is not None
        )
        placeholders = sum(1 for t in tokens if t in self.placeholder_ids)
        prompt_tokens = len(tokens) - placeholders + audio_columns
        if prompt_tokens >= max_context:  # no max_tokens would fit: the input is what to change
            audio = f" ({audio_columns} of them audio)" if audio_columns else ""
            raise ContextLengthError(
                f"the prompt alone takes {prompt_tokens} tokens{audio}, and the context holds {max_context}",
                "shorten the input",
                prompt_alone=True,
                audio_bound=2 * audio_columns >= max_context,
            )
        if prompt_tokens + request.max_new_tokens > max_context:
            raise ContextLengthError(
                f"the prompt takes {prompt_tokens} tokens and {request.max_new_tokens} more were asked for, "
                f"but the context holds {max_context}"
            )
        return Prompt(inputs, sample, prompt_tokens, audio_columns)

    def collate(self, samples: list) -> dict:
        """The model's inputs for prompts' samples together (padded on the left)."""
        return asdict(self._collator(samples))

    def encode(self, audio: Audio) -> AudioCodes:
        """A reference clip's codes (on the codec's thread)."""
        samples = audio.samples.astype(np.float32, copy=False)
        codes = self.codec.encode(samples, audio.sample_rate)
        return AudioCodes(codes.detach().to("cpu", torch.long))
