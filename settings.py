"""Every knob of the service, in one typed place.

Each field reads the environment variable ``HIGGS_<FIELD NAME IN CAPITALS>`` (for example ``HIGGS_DEVICE``);
the README lists them all with their defaults. Nothing else in the project reads the environment.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_origin

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

log = logging.getLogger(__name__)

MIN_CONTEXT, MAX_CONTEXT = 256, 131_072  # attention lengths: room for a prompt, and Llama 3's context


class Settings(BaseSettings):
    """Service configuration; built once in ``create_app``."""

    # A number that is not finite is refused as such, before any bound is checked (a bound's message
    # for "nan" said "less than or equal to 2").
    model_config = SettingsConfigDict(env_prefix="HIGGS_", extra="ignore", allow_inf_nan=False)

    model: str = "bosonai/higgs-audio-v2-generation-3B-base"
    """Higgs Audio generation model: a Hugging Face hub id or a local folder."""

    audio_tokenizer: str = "bosonai/higgs-audio-v2-tokenizer"
    """Higgs audio tokenizer (codec): a hub id or a local folder holding config.json and model.pth."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the model runs. `auto` is CUDA when present; without CUDA the service refuses to start unless
    `cpu` is chosen explicitly (Higgs Audio on a CPU is far slower than real time)."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Model weights' dtype; `auto` is bfloat16 on CUDA and float32 on the CPU."""

    host: str = "127.0.0.1"
    """Address `make run` binds to. Use 0.0.0.0 to serve other machines."""

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port `make run` listens on."""

    api_key: SecretStr | None = None
    """When set, every request but /health and /ready needs `Authorization: Bearer <key>` (401 otherwise)."""

    cors_origins: list[str] = []
    """Origins browsers may call from (JSON list, e.g. ["https://app.example"]); empty: CORS closed."""

    max_body_mb: float = Field(default=40.0, gt=0)
    """Largest request body, counted as it arrives (413 above); base64 makes audio a third larger."""

    max_queue: int | None = Field(default=None, ge=1, le=10_000)
    """Most generation jobs running or waiting (slots included); more are answered 429 with Retry-After at
    once, its seconds estimated from the measured time of a request. Default: twice the slots. Speech
    recognition's requests have a line of their own, as long (16 when unset)."""

    max_batch_size: int | None = Field(default=None, ge=1, le=256)
    """Slots: requests decoded together in one batch. More slots give more audio per second in total and
    take KV-cache memory; each slot holds the largest of `kv_cache_lengths` tokens. Default: 16 on a GPU
    (fewer where its memory does not hold them, see `kv_cache_gb`), 8 on the CPU (where every slot is
    computed at every step)."""

    kv_cache_gb: float | None = Field(default=None, gt=0, le=4096)
    """Memory (GiB) the slots' KV cache may take; fewer slots are made when `max_batch_size` would not fit.
    Default: on a GPU what it has free once the models are loaded, less 3 GiB of headroom (prefills, CUDA
    graphs, the codec); on the CPU 16."""

    def batch_slots(self, device: str) -> int:
        """`max_batch_size`, or its default for ``device`` ("cuda" or "cpu")."""
        return self.max_batch_size or (16 if device == "cuda" else 8)

    prefill_batch: int | None = Field(default=None, ge=1, le=256)
    """Waiting requests admitted in one turn of the decoding loop when slots are free (default 8), so a burst
    of listeners starts together instead of one after another. On CUDA they are prefilled in one forward
    pass; on the CPU one prompt a pass, which keeps every answer's tokens those of the request alone (padded
    rows round differently)."""

    prefill_beside_steps: bool | None = None
    """Fill the newcomers' slots on a thread (on CUDA, a stream) of their own while the running requests go on
    stepping, so that a prefill no longer stalls every listener; false: the loop waits for each prefill.
    Default: on CUDA, not on the CPU (where the two would share the cores)."""

    attention_by_lengths: bool = True
    """On CUDA with 16-bit weights, in the length buckets of at least ``attention_by_lengths_from`` positions:
    a decoding step's attention reads each request's own keys only (FlashAttention's variable-length kernel
    over the KV cache as it is laid out) instead of all its bucket's, those beyond the request masked.
    Checked against the masked attention at start; where the two disagree, or the kernel is missing,
    attention stays masked and the log says why (a warning on CUDA in 16 bits; a CPU, or float32, has no
    such kernel)."""

    attention_by_lengths_from: int = Field(default=1024, ge=1)
    """The shortest length bucket (``kv_cache_lengths``) that attends by each row's length. On an H200 a step
    at 1,024 positions took 0.95x (16 requests) and 0.93x (1) the masked step's time, at 512 positions 1.13x
    and 1.00x (`docs/engine.md`, "Attention by each row's length")."""

    cuda_graphs: bool = True
    """On CUDA, replay each decoding step (forward pass and sampling) and each streamed piece's audio decode
    as CUDA graphs, captured at start-up per rows/length bucket; a shape whose capture fails runs eagerly."""

    prefill_graphs: bool = True
    """With ``cuda_graphs``, also replay the prefill as CUDA graphs, its prompts padded to 64, 128, 256, 512
    or 1,024 positions (one graph per length, number of prompts and whether they hold a voice reference,
    captured at start-up): a fill is then one launch instead of the layers' kernels one by one."""

    generation_timeout_seconds: float = Field(default=300.0, gt=0)
    """Wall-clock limit of one generation; it then stops with finish_reason "length"."""

    shutdown_timeout_seconds: float = Field(default=25.0, gt=0, le=3600)
    """On SIGTERM (`python app.py`): the listener closes at once, running answers may finish for this long,
    then they are cut and the process exits (a Kubernetes pod gets 30 s by default)."""

    idle_trim_seconds: float = Field(default=10.0, ge=0, le=3600)
    """After this long without a request in flight (after one that did work), the memory the process freed
    is given back to the system (glibc's malloc_trim, `memory.py`); 0 turns it off."""

    served_model_name: str = "higgs-audio-v2"
    """Model id reported by /v1/models. OpenAI's own model names are accepted as aliases of it."""

    kv_cache_lengths: list[int] = [512, 1024, 4096, 8192]
    """Attention lengths (tokens) a decoding step is bucketed to; the largest bounds prompt plus output and
    is what every slot holds."""

    stream_first_chunk_frames: int = Field(default=4, ge=1, le=250)
    """Streaming: audio frames in the first piece sent (smaller: sound starts sooner)."""

    stream_chunk_frames: int = Field(default=12, ge=1, le=250)
    """Streaming: audio frames (25 a second) decoded and sent at a time; smaller is sooner, costlier."""

    stream_context_frames: int = Field(default=4, ge=1, le=50)
    """Streaming: frames of context decoded on each side of a piece so that joins match a one-shot decode."""

    stream_crossfade_ms: float = Field(default=10.0, ge=0, le=40)
    """Streaming: crossfade at each join, in milliseconds (at most the context's length)."""

    lookahead_steps: int | None = Field(default=None, ge=1, le=4)
    """CUDA: decoding steps launched ahead of the one whose tokens the host reads; unset: 2 on CUDA (the
    host may be late by a whole step's time without the GPU waiting; a request may fill one position less
    of its slot), 1 on a CPU (where steps are not launched ahead)."""

    codec_gather_ms: float | None = Field(default=None, ge=0, le=1000)
    """Most milliseconds a stream's later piece waits for other streams' pieces to share a codec call,
    while its listener has half a second of audio in hand; unset: 40 on CUDA (a call costs about the same
    for one piece as for many), 0 on a CPU. First pieces and a finished stream's pieces never wait."""

    warmup: bool = True
    """Run one short generation (with a reference clip) at start-up, before reporting ready."""

    default_scene: str = Field(default="Audio is recorded from a quiet room.", max_length=4096)
    """Scene description put in the Higgs system prompt when the request has no system message (at most as
    long as a speech request's `instructions`: a longer one made every request a context overflow)."""

    max_audio_seconds: float = Field(default=60.0, gt=0, le=3600)
    """Ceiling on the audio generated for one piece of a text, in seconds (its token cap follows from it)."""

    seconds_per_character: float = Field(default=0.15, gt=0, le=2)
    """Without `max_tokens`, each piece's output is capped at 4 s plus this many seconds per character (a
    Chinese, Japanese or Korean one counts three: `text_split.spoken_length`)."""

    # -- long texts (longform.py) --
    max_input_characters: int = Field(default=4096, ge=1, le=1_000_000)
    """Longest text one request speaks (speech `input`, the text of an audio chat answer); 400 above."""

    piece_characters: int = Field(default=300, ge=20, le=10_000)
    """Texts longer than this are spoken in pieces of at most this many characters, cut at sentences (a third
    as many in Chinese, Japanese or Korean, whose characters are syllables: the same time spoken)."""

    context_pieces: int = Field(default=2, ge=0, le=8)
    """Previous pieces (text and generated audio) in each piece's prompt, so the voice carries on."""

    join_fade_ms: float = Field(default=10.0, ge=0, le=100)
    """Fade-out and fade-in at each join between pieces, in milliseconds."""

    temperature: float = Field(default=0.7, ge=0, le=2)
    """Sampling temperature when the request gives none."""

    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling threshold when the request gives none."""

    top_k: int = Field(default=50, ge=0)
    """Top-k sampling when the request gives none (0 disables it)."""

    ras_window: int = Field(default=7, ge=0, le=32)
    """Repetition-aware sampling window for audio codes (0 disables it)."""

    min_reference_seconds: float = Field(default=1.0, gt=0)
    """A voice reference needs at least this much non-silent speech."""

    max_reference_seconds: float = Field(default=30.0, gt=0, le=300)
    """A longer voice reference is refused with a 400 (longer clips add context without a closer voice)."""

    max_transcript_characters: int = Field(default=1000, ge=1, le=10_000)
    """Longest transcript of a voice reference (given or stored): a 30 s clip says a few hundred characters,
    and the transcript is part of every prompt that uses the voice."""

    max_upload_mb: float = Field(default=25.0, gt=0)
    """Largest audio upload (decoded bytes), as OpenAI's limit."""

    max_transcription_seconds: float = Field(default=1800.0, gt=0)
    """Longest audio accepted by /v1/audio/transcriptions and /v1/audio/translations."""

    stt_model: str = "large-v3-turbo"
    """faster-whisper model for speech recognition: a name faster-whisper knows or a CTranslate2 folder;
    empty turns speech recognition off."""

    stt_device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where speech recognition runs; `auto` follows CUDA's presence."""

    stt_compute_type: Literal[
        "auto",
        "default",
        "int8",
        "int8_float32",
        "int8_float16",
        "int8_bfloat16",
        "int16",
        "float16",
        "bfloat16",
        "float32",
    ] = "auto"
    """CTranslate2 compute type; `auto` is float16 on CUDA and int8 on the CPU."""

    stt_translation_model: str = ""
    """faster-whisper model for /v1/audio/translations when `stt_model` cannot translate (English-only `.en`
    and turbo models cannot): a multilingual name such as `large-v3`, `medium` or `small`, or a CTranslate2
    folder. Loaded on the first translation request; empty: translation only if `stt_model` can."""

    stt_vad_filter: bool = True
    """Decode only the speech that voice-activity detection (Silero) finds, so that silence and noise give
    no invented words; a voice reference without speech is then refused."""

    stt_min_speech_ms: int = Field(default=250, ge=0, le=2000)
    """With `stt_vad_filter`: stretches of speech shorter than this are dropped (Whisper makes up words
    from a fragment of a syllable)."""

    voices_dir: Path = Path("voices")
    """Folder of the voice library: NAME.wav + NAME.txt per voice (fill it by hand or through the API)."""

    shared_answers: bool = False
    """Keep each audio answer (that a later chat request may name by its id) in a file under the voices
    folder's `.answers` too, for the other processes serving the same folder: `cluster.py` turns it on for
    its replicas, where a conversation's next turn may reach any of them."""

    max_voices: int = Field(default=100, ge=1)
    """Most voices the library holds."""

    max_voice_library_mb: float = Field(default=200.0, gt=0)
    """Most audio the library holds, in MB."""

    builtin_voice_seconds: float = Field(default=12.0, ge=2, le=30)
    """Longest clip made for an OpenAI built-in voice name on its first use."""

    web_ui: bool = True
    """Serve the web page at `/` (its static files under `/web/`, public even with an API key)."""

    @field_validator("api_key")
    @classmethod
    def _a_key_or_none(cls, key: SecretStr | None) -> SecretStr | None:
        # A secret templated from nothing must not open the service, and a mounted secret's trailing
        # newline must not lock every client out (a client's key is read stripped too).
        if key is None:
            return None
        stripped = key.get_secret_value().strip()
        if not stripped:
            raise ValueError("is empty; unset it to serve without a key, or give the key")
        return SecretStr(stripped)

    @field_validator("served_model_name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("is empty; /v1/models would list a model without a name")
        return name.strip()

    @field_validator("voices_dir", mode="before")
    @classmethod
    def _a_folder(cls, folder: object) -> object:
        if isinstance(folder, str) and not folder.strip():
            raise ValueError(
                "is empty; name the voice library's folder (an empty value meant the working one)"
            )
        return folder

    @field_validator("kv_cache_lengths")
    @classmethod
    def _lengths(cls, lengths: list[int]) -> list[int]:
        if not lengths:
            raise ValueError("is empty; give at least one attention length, e.g. [1024, 4096, 8192]")
        if min(lengths) < MIN_CONTEXT or max(lengths) > MAX_CONTEXT:
            raise ValueError(
                f"each length must be {MIN_CONTEXT} to {MAX_CONTEXT} tokens (a prompt takes a few hundred)"
            )
        return sorted(set(lengths))

    @field_validator("max_reference_seconds")
    @classmethod
    def _above_the_minimum(cls, most: float, info: ValidationInfo) -> float:
        least = info.data.get("min_reference_seconds")
        if least is not None and least > most:
            raise ValueError(f"is below HIGGS_MIN_REFERENCE_SECONDS ({least}): no reference could be taken")
        return most

    @field_validator("stt_translation_model")
    @classmethod
    def _can_translate(cls, name: str) -> str:
        # Refused at start-up rather than on the first translation, minutes of loading later.
        base = Path(name.strip()).name.lower()
        if base.endswith(".en") or "turbo" in base:
            raise ValueError(
                f"{name!r} cannot translate (English-only and turbo Whisper models were not trained to); "
                "use a multilingual model such as large-v3, medium or small"
            )
        return name.strip()

    replicas: int = Field(default=0, ge=0, le=1024)
    """Ray Serve (`make cluster`): replicas of the app; 0: one per GPU in the Ray cluster (one on the CPU)."""

    max_replicas: int = Field(default=0, ge=0, le=1024)
    """Ray Serve: when above `replicas`, autoscale between the two on load."""


def _shown(value: object, most: int = 80) -> str:
    """A value as a refusal line shows it: whole when short, its ends and its length when long (a scene of
    thousands of characters filled the terminal)."""
    text = repr(value)
    if len(text) <= most:
        return text
    length = f", {len(value):,} characters" if isinstance(value, str) else ""
    return f"{text[: most // 2]}…{text[-most // 4 :]}{length}"


def from_environment() -> Settings:
    """The settings of the environment, for the service's entry points: values that do not fit exit with
    one line per setting at fault, naming its variable, instead of a traceback."""
    # A list setting that is not JSON stops pydantic-settings before any value is checked: those are found
    # here, and the others checked without them, so that every fault is named at once.
    faults, hidden = [], {}
    example = "'[\"https://a.example\"]', '[1024, 4096]'"
    for name, field in Settings.model_fields.items():
        if get_origin(field.annotation) not in (list, dict):
            continue
        for variable in [v for v in os.environ if v.upper() == f"HIGGS_{name.upper()}"]:
            try:
                json.loads(os.environ[variable])
            except ValueError:
                faults.append(f"{variable.upper()}: not valid JSON; a list is written as JSON: {example}")
                hidden[variable] = os.environ.pop(variable)
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "HIGGS_" + "_".join(str(part) for part in error["loc"][:1]).upper()
            set_here = any(v.upper() == name for v in os.environ)
            shown = _shown(error["input"])
            given = f" (given: {shown})" if set_here else f" (its default: {shown})"
            given = "" if "key" in name.lower() else given
            faults.append(f"{name}: {error['msg']}{given}")
    except SettingsError as exc:  # a value pydantic-settings could not parse otherwise
        faults.append(str(exc))
    finally:
        os.environ.update(hidden)
    if faults:
        raise SystemExit("invalid settings:\n  " + "\n  ".join(faults))
    for line in unknown_variables(os.environ):
        log.warning(line)
    return settings


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``HIGGS_`` variable that is no setting, naming the nearest one (an operator's trial:
    ``HIGGS_MAX_QEUE=4`` served with the default line and nothing said)."""
    known = {f"HIGGS_{name.upper()}" for name in Settings.model_fields}
    lines = []
    for variable in sorted(v for v in environ if v.upper().startswith("HIGGS_") and v.upper() not in known):
        near = difflib.get_close_matches(variable.upper(), known, n=1, cutoff=0.8)
        lines.append(
            f"{variable} is no setting, and is ignored" + (f": did you mean {near[0]}?" if near else "")
        )
    return lines


def resolve_device(requested: str, cuda_available: bool) -> str:
    """Turn the `device` setting into a torch device, refusing `auto` without CUDA."""
    if requested == "cpu":
        return "cpu"
    if cuda_available:
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("HIGGS_DEVICE=cuda was asked for, but torch sees no CUDA device.")
    raise RuntimeError(
        "No CUDA device found. Higgs Audio needs a GPU to run at a useful speed; "
        "set HIGGS_DEVICE=cpu to run on the CPU anyway (slow, meant for trying the API)."
    )


def check_devices(
    settings: Settings, cuda_available: bool, *, engine: bool = True, recognizer: bool = True
) -> None:
    """Refuse devices that are not there: the engine's (``resolve_device``) and speech recognition's, when
    it is on and set to `cuda`. ``engine``/``recognizer`` False skip one that was handed in."""
    if engine:
        resolve_device(settings.device, cuda_available)
    if recognizer and settings.stt_model and settings.stt_device == "cuda" and not cuda_available:
        raise RuntimeError(
            "HIGGS_STT_DEVICE=cuda was asked for, but torch sees no CUDA device "
            "(set HIGGS_STT_DEVICE=cpu or auto, or HIGGS_STT_MODEL= to turn speech recognition off)."
        )
