"""The wire: OpenAI-shaped request and response models, and the one error type.

Requests accept unknown fields (new OpenAI SDK fields must not break old servers); the HTTP layer logs
which were ignored. Nothing here touches torch or the model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """A failure reported to the client in OpenAI's error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body, exactly OpenAI's shape."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


class OpenModel(BaseModel):
    """Request models keep unknown fields (reported in ``model_extra``) instead of rejecting them."""

    model_config = ConfigDict(extra="allow")


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


ContentPart = Annotated[TextPart | InputAudioPart, Field(discriminator="type")]


class ChatMessage(OpenModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class AudioParams(OpenModel):
    voice: str = "default"
    format: Literal["wav", "mp3", "flac", "opus", "aac", "pcm16"] = "wav"


class StreamOptions(OpenModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenModel):
    model: str = Field(examples=["gpt-4o-audio-preview"])
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioParams | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @property
    def wants_audio(self) -> bool:
        """Audio output was asked for (``"audio"`` in modalities)."""
        return bool(self.modalities and "audio" in self.modalities)


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


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0
    audio_tokens: int = 0
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


class VoiceRef(OpenModel):
    id: str


class SpeechRequest(OpenModel):
    model: str = Field(examples=["tts-1"])
    input: str = Field(min_length=1)
    """At most ``max_input_characters`` (a setting, checked by the planner with a 400 naming it)."""
    voice: str | VoiceRef
    instructions: str | None = Field(default=None, max_length=MAX_INSTRUCTIONS)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    """Extension: same seed, input and voice give the same audio."""

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
