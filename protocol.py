"""The wire: OpenAI-shaped request and response models, and the error a request is refused with.

Requests accept unknown fields (new OpenAI SDK fields must not break old servers); the HTTP layer logs
which were ignored. Nothing here touches torch or the model; ``errors.py`` turns ``InvalidRequest`` into
OpenAI's error envelope.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator, model_validator

# OpenAI's request types are strict: "10" is not an integer, 1.0 not a count, "true" not a boolean.
# (A float field still takes an integer: 1 is a fine temperature.)
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]
StrictBool = Annotated[bool, Strict()]


class InvalidRequest(ValueError):
    """A request that cannot be served as sent (a 400); ``param`` names the field to fix."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class OpenModel(BaseModel):
    """Request models keep unknown fields (reported in ``model_extra``) instead of rejecting them, take
    ``null`` for an optional field as not given (the ``openai`` SDK sends ``null`` for an argument passed as
    ``None``: ``speed=None`` is speed 1), and take only text that is Unicode: JSON may spell half a
    surrogate pair (``"\\ud800"``), which no tokenizer or encoder takes. Text is taken composed (Unicode's
    NFC), before any limit counts it: a letter and its accents typed apart (NFD, as macOS's file names and
    some keyboards give them) are one character, as a reader counts them and as the model's tokenizer saw
    its text (a trial: the same Vietnamese was 4,059 characters composed and 5,599 apart, and only the first
    was taken)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _as_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: composed(v)
            for k, v in data.items()
            if not (v is None and k in fields and not fields[k].is_required())
        }

    @field_validator("*")
    @classmethod
    def _whole_characters(cls, value: Any) -> Any:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and (half := half_surrogate(text)):
                raise ValueError(half)
        return value


def composed(value: Any) -> Any:
    """``value`` with its text in Unicode's composed form (NFC): a string, or the strings of a list (the
    stop strings); anything else as it is (a nested model composes its own)."""
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value) if not value.isascii() else value
    if isinstance(value, list) and any(isinstance(v, str) for v in value):
        return [composed(v) if isinstance(v, str) else v for v in value]
    return value


def half_surrogate(text: str) -> str | None:
    """What is wrong with ``text`` when it holds half of a surrogate pair (JSON may escape one; no tokenizer
    or encoder takes it), else None. (A field with a length bound is refused by pydantic before any
    validator of ours: ``errors.py`` says this for it too.)"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"the text holds half of a surrogate pair ({text[exc.start]!r} at character {exc.start}); "
            "send whole characters"
        )
    return None


# ---- chat completions: request ---------------------------------------------------------------------------


class TextPart(OpenModel):
    type: Literal["text"]
    text: str


class InputAudio(OpenModel):
    data: str
    """Base64 audio; a ``data:audio/...;base64,`` prefix and missing padding are tolerated."""
    format: str = "wav"
    transcript: str | None = None
    """Extension: what the clip says. Given on a voice reference, it is used instead of recognising it."""


class InputAudioPart(OpenModel):
    type: Literal["input_audio"]
    input_audio: InputAudio

    @field_validator("input_audio", mode="before")
    @classmethod
    def _base64_alone(cls, value: Any) -> Any:
        """The base64 alone, as Mistral's chat API takes it (Open WebUI sends its recordings so to a
        Mistral-style server): the clip, its format found from its bytes as always."""
        return {"data": value} if isinstance(value, str) else value


class RefusalPart(OpenModel):
    """An assistant's refusal, as OpenAI's answers hold them (a conversation sent back keeps them): its
    words are the assistant's."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | InputAudioPart | RefusalPart, Field(discriminator="type")]
#: The ``type`` of each kind of content part: what a part without one is told to give.
CONTENT_PART_TYPES = [
    get_args(part.model_fields["type"].annotation)[0] for part in (TextPart, InputAudioPart, RefusalPart)
]


class AudioRef(OpenModel):
    id: str
    """An earlier answer's ``message.audio.id`` (OpenAI's multi-turn pattern)."""


class ChatMessage(OpenModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    """``tool`` and ``function`` (OpenAI's older form) messages are a conversation's record of tool calls:
    accepted, and not part of what is spoken."""
    content: str | list[ContentPart] | None = None
    name: str | None = None
    audio: AudioRef | None = None
    """On an assistant message: the audio answer it was."""

    @field_validator("content")
    @classmethod
    def _refusals_are_the_assistants(cls, content: Any, info: ValidationInfo) -> Any:
        if isinstance(content, list) and info.data.get("role", "assistant") != "assistant":
            if any(isinstance(part, RefusalPart) for part in content):
                raise ValueError("a refusal part belongs to an assistant message")
        return content

    @field_validator("audio")
    @classmethod
    def _answers_are_the_assistants(cls, audio: AudioRef | None, info: ValidationInfo) -> AudioRef | None:
        if audio is not None and info.data.get("role", "assistant") != "assistant":
            raise ValueError(
                "audio names an earlier answer of this server, so it belongs to an assistant message; "
                "send a user's audio as an input_audio content part"
            )
        return audio


class VoiceRef(OpenModel):
    id: str


class _OneVoice(OpenModel):
    """A request model with a ``voice``."""

    @field_validator("voice", mode="before", check_fields=False)
    @classmethod
    def _one_voice(cls, voice: Any) -> Any:
        """The voice without the spaces around a name (clients that split a typed list "alloy, echo" at its
        commas send " echo"); a list of voices (mixed, as some TTS servers do) refused in words rather than
        as "not a valid string"."""
        if isinstance(voice, str):
            return voice.strip()
        if isinstance(voice, list):
            raise ValueError('voice is one voice: a name, or {"id": ...}; voices cannot be mixed here')
        return voice


class AudioParams(_OneVoice):
    voice: str | VoiceRef = "default"
    format: Literal["wav", "mp3", "flac", "opus", "aac", "pcm16"] = "wav"

    @property
    def format_given(self) -> str | None:
        """``format`` as the client sent it, None when left out."""
        return self.format if "format" in self.model_fields_set else None

    @property
    def voice_name(self) -> str:
        """The voice's name or id, whichever form was sent."""
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


# Chat fields this server cannot honour, refused unless they ask for nothing: what it does not do, and the
# value that asks for nothing.
_NOT_APPLIED = {
    "logprobs": ("return log probabilities", "false"),
    "top_logprobs": ("return log probabilities", "0"),
    "logit_bias": ("apply logit_bias", "{}"),
    "presence_penalty": ("apply presence_penalty", "0"),
    "frequency_penalty": ("apply frequency_penalty", "0"),
}


class StreamOptions(OpenModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(OpenModel):
    model: str = Field(examples=["gpt-4o-audio-preview"])
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioParams | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(default=None, ge=0)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=1)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    # OpenAI fields whose promise this server cannot keep (Higgs Audio v2 is a speech model): checked for
    # OpenAI's bounds, then refused unless they ask for nothing, so that no client trusts an answer that
    # ignored them. Other unknown fields are accepted and logged as ignored.
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    """OpenAI's older ``tool_choice`` (its ``functions`` are accepted and ignored, as ``tools`` are)."""
    response_format: dict[str, Any] | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streamed(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true, as OpenAI's")
        return options

    @field_validator(*_NOT_APPLIED)
    @classmethod
    def _asks_for_nothing(cls, value: object, info: ValidationInfo) -> object:
        if value:  # true, above 0, not empty
            what, neutral = _NOT_APPLIED[info.field_name]
            raise ValueError(f"this server does not {what}; leave {info.field_name} out or send {neutral}")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_forced_tool(
        cls, choice: str | dict[str, Any] | None, info: ValidationInfo
    ) -> str | dict[str, Any] | None:
        field = info.field_name
        allowed = ("none", "auto", "required") if field == "tool_choice" else ("none", "auto")
        if isinstance(choice, str) and choice not in allowed:
            raise ValueError(
                f"{field} is {', '.join(allowed)} or an object naming a function, not {choice!r}; this model "
                "calls none, so send none or auto"
            )
        if choice is not None and choice not in ("none", "auto"):
            raise ValueError(
                f"this model does not call tools, so it cannot be made to; send {field} none or auto"
            )
        return choice

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ValueError(
                f"this model cannot hold its answer to {fmt.get('type')!r}; send response_format "
                '{"type": "text"} or leave it out'
            )
        return fmt

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"stop takes at most 4 sequences, as OpenAI's does; {len(stop)} were given")
        return stop

    @property
    def wants_audio(self) -> bool:
        """Audio output was asked for: ``"audio"`` in modalities, or, without modalities, an ``audio``
        object (its voice and format say what the client wants; a text answer would ignore them)."""
        if self.modalities is None:
            return self.audio is not None
        return "audio" in self.modalities

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (it may be one string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        """The token limit the client set: ``max_completion_tokens``, which wins, or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


# ---- chat completions: response --------------------------------------------------------------------------


class AudioOut(BaseModel):
    id: str
    data: str
    expires_at: int
    transcript: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    audio: AudioOut | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    audio_tokens: int = 0
    text_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0
    audio_tokens: int = 0
    text_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


# ---- speech ----

MAX_INSTRUCTIONS = 4096


class SpeechRequest(_OneVoice):
    model: str = Field(examples=["tts-1"])
    input: str = Field(min_length=1)
    """At most ``max_input_characters`` (a setting, checked by the planner with a 400 naming it)."""
    voice: str | VoiceRef
    instructions: str | None = Field(default=None, max_length=MAX_INSTRUCTIONS)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: StrictFloat = Field(default=1.0, ge=0.25, le=4.0, allow_inf_nan=False)
    stream_format: Literal["audio", "sse"] = "audio"
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**63)
    """Extension: same seed, input and voice give the same audio."""
    sample_rate: StrictInt | None = None
    """Some servers' extension (speaches): the audio's rate. Only the model's own is made here (the speech
    route refuses another, rather than send 24 kHz to a client that would play it at its own rate)."""

    @property
    def voice_name(self) -> str:
        """The voice's name or id, whichever form was sent."""
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


# ---- models ------------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "boson-ai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- speech to text (multipart form fields; the file is a separate part) -----------------------------------


class TranslationForm(BaseModel):
    """The form fields of ``/v1/audio/translations``."""

    model: str
    prompt: str | None = Field(None, max_length=4096)  # (Whisper reads its last 224 tokens; a review found
    # no bound but the form's 1 MB a field)
    response_format: str = "json"
    temperature: float = 0.0


class TranscriptionForm(TranslationForm):
    """The form fields of ``/v1/audio/transcriptions``."""

    language: str | None = Field(None, max_length=64)  # (a name or a code; it was said back whole)
    timestamp_granularities: list[str] = Field(default_factory=list, alias="timestamp_granularities[]")
    stream: bool = False
