"""Turn an OpenAI chat-completions request into one generation for the engine.

Decides what is spoken and in which voice:

* ``audio.voice == "clone"``: the last user message's ``input_audio`` part is the voice reference and its
  text parts are what is spoken; without a reference the default voice is used and the fallback reported.
* an assistant message holding ``input_audio`` (the native Higgs pattern, as Boson's own client sends it):
  the conversation is used as it stands, whatever ``audio.voice`` says.
* otherwise the default voice speaks the last user message; ``input_audio`` parts there are transcribed
  and stand in as text.

Every check on user input happens here, before the engine is asked for anything but encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from audio import Audio, AudioError, decode_audio, decode_base64
from engine import Engine, GenerationRequest, Turn
from protocol import ChatCompletionRequest, ChatMessage, InputAudioPart, TextPart, bad_request
from settings import Settings
from stt import AsyncTranscriber
from voice_cloning import CodesCache, Reference, ReferenceLimits, clone_turns, load_reference, system_turn

log = logging.getLogger(__name__)

DEFAULT_VOICE = "default"
CLONE_VOICE = "clone"
# OpenAI's built-in voice names are accepted and, until a voice library names them, speak in the
# default voice (documented in the README).
OPENAI_VOICES = frozenset(
    {
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    }
)


@dataclass(frozen=True)
class ChatPlan:
    """A generation to run and what to tell the client about it."""

    request: GenerationRequest | None
    spoken_text: str
    voice: str
    fallback: str | None = None
    direct_answer: str | None = None
    """Set when the answer needs no generation (a text-only request that carries audio: its transcript)."""


@dataclass(frozen=True)
class _Parts:
    texts: list[str]
    audios: list[tuple[str, InputAudioPart]]  # (param path of the part, part)


def _parts(message: ChatMessage, index: int) -> _Parts:
    if message.content is None:
        return _Parts([], [])
    if isinstance(message.content, str):
        return _Parts([message.content], [])
    texts, audios = [], []
    for j, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, InputAudioPart):
            audios.append((f"messages[{index}].content[{j}]", part))
    return _Parts(texts, audios)


def _join(texts: list[str]) -> str:
    return "\n".join(t.strip() for t in texts if t.strip())


class ChatPlanner:
    """Builds ``ChatPlan``s; holds the reference-codes cache shared by all requests."""

    def __init__(self, settings: Settings, engine: Engine, recognizer: AsyncTranscriber | None):
        self.settings = settings
        self.engine = engine
        self.recognizer = recognizer
        self.codes = CodesCache()
        self.limits = ReferenceLimits(
            sample_rate=engine.sample_rate,
            min_speech_seconds=settings.min_reference_seconds,
            max_seconds=settings.max_reference_seconds,
            max_bytes=int(settings.max_upload_mb * 1024 * 1024),
        )

    # ---- helpers ----

    def _reference(self, param: str, part: InputAudioPart) -> Reference:
        audio = part.input_audio
        return load_reference(audio.data, audio.format, audio.transcript, self.limits, param)

    async def _transcribe(self, audio: Audio, param: str) -> str:
        if self.recognizer is None:
            raise bad_request(
                "speech recognition is turned off on this server; give the words spoken in "
                "input_audio.transcript",
                param,
            )
        transcript = await self.recognizer.transcribe(audio)
        return transcript.text

    async def _transcript_of(self, reference: Reference, param: str) -> str:
        if reference.transcript is not None:
            return reference.transcript
        text = await self._transcribe(reference.audio, f"{param}.input_audio.transcript")
        if not text:
            raise bad_request(
                "no words were recognised in the voice reference; send a clip of clear speech or give its "
                "words in input_audio.transcript",
                f"{param}.input_audio.data",
            )
        log.info("reference transcript recognised (%d characters)", len(text))
        return text

    async def _codes(self, reference: Reference):
        codes = self.codes.get(reference.key)
        if codes is None:
            codes = await self.engine.encode(reference.audio)
            self.codes.put(reference.key, codes)
        return codes

    def _user_audio(self, param: str, part: InputAudioPart) -> Audio:
        try:
            raw = decode_base64(part.input_audio.data, max_bytes=self.limits.max_bytes)
            return decode_audio(raw, target_rate=16000, max_seconds=self.settings.max_transcription_seconds)
        except AudioError as exc:
            raise bad_request(f"input audio: {exc}", f"{param}.input_audio.data") from None

    async def _spoken_text(self, message: ChatMessage, index: int) -> str:
        """The message's text, its ``input_audio`` parts replaced by what they say."""
        parts = _parts(message, index)
        texts = list(parts.texts)
        for param, part in parts.audios:
            given = part.input_audio.transcript
            texts.append(given if given else await self._transcribe(self._user_audio(param, part), param))
        return _join(texts)

    def _max_new_tokens(self, request: ChatCompletionRequest, text: str, audio: bool) -> int:
        asked = request.max_completion_tokens or request.max_tokens
        if asked is not None:
            return asked
        if not audio:
            return 512
        rate = self.engine.frame_rate
        seconds = min(self.settings.max_audio_seconds, 4.0 + self.settings.seconds_per_character * len(text))
        # Plus the delay pattern's extra columns and the stream's end marker.
        return int(rate * seconds) + 16

    def _generation(self, request: ChatCompletionRequest, turns: list[Turn], text: str) -> GenerationRequest:
        s = self.settings
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        temperature = s.temperature if request.temperature is None else request.temperature
        return GenerationRequest(
            turns=turns,
            audio_output=request.wants_audio,
            max_new_tokens=self._max_new_tokens(request, text, request.wants_audio),
            temperature=temperature,
            top_p=s.top_p if request.top_p is None else request.top_p,
            top_k=s.top_k if request.top_k is None else request.top_k,
            seed=request.seed,
            stop=stop,
            ras_window=s.ras_window,
        )

    # ---- the plan ----

    async def plan(self, request: ChatCompletionRequest) -> ChatPlan:
        """Validate the conversation and build the generation; raises ``APIError``/``InvalidReference``."""
        messages = request.messages
        last = len(messages) - 1
        if messages[last].role != "user":
            raise bad_request("the last message must be the user's", f"messages[{last}].role")
        scene = _join(
            [_join(_parts(m, i).texts) for i, m in enumerate(messages) if m.role in ("system", "developer")]
        )
        voice = request.audio.voice if request.audio else DEFAULT_VOICE

        if not request.wants_audio:
            return await self._plan_text(request, scene)

        native = [i for i, m in enumerate(messages) if m.role == "assistant" and _parts(m, i).audios]
        if native:
            return await self._plan_native(request, scene or self.settings.default_scene)
        scene = scene or self.settings.default_scene

        if voice == CLONE_VOICE:
            parts = _parts(messages[last], last)
            if len(parts.audios) > 1:
                raise bad_request(
                    "a clone request takes one voice reference; this message has "
                    f"{len(parts.audios)} input_audio parts",
                    parts.audios[1][0],
                )
            if parts.audios:
                return await self._plan_clone(request, scene, parts)
            log.warning("voice 'clone' without an input_audio reference: falling back to the default voice")
            fallback = "no-reference"
        elif voice == DEFAULT_VOICE or voice in OPENAI_VOICES:
            fallback = None
        else:
            names = ", ".join(["clone", "default", *sorted(OPENAI_VOICES)])
            raise bad_request(f"unknown voice {voice!r}; available voices: {names}", "audio.voice")

        text = await self._spoken_text(messages[last], last)
        if not text:
            raise bad_request(
                "there is no text to speak in the last user message", f"messages[{last}].content"
            )
        turns = [system_turn(scene), Turn("user", text)]
        return ChatPlan(self._generation(request, turns, text), text, DEFAULT_VOICE, fallback)

    async def _plan_clone(self, request: ChatCompletionRequest, scene: str, parts: _Parts) -> ChatPlan:
        last = len(request.messages) - 1
        param, part = parts.audios[0]
        text = _join(parts.texts)
        if not text:
            raise bad_request(
                "the clone request has a voice reference but no text to speak; add a text part",
                f"messages[{last}].content",
            )
        reference = self._reference(param, part)
        transcript = await self._transcript_of(reference, param)
        codes = await self._codes(reference)
        turns = clone_turns(scene, transcript, codes, text)
        return ChatPlan(self._generation(request, turns, text), text, CLONE_VOICE)

    async def _plan_native(self, request: ChatCompletionRequest, scene: str) -> ChatPlan:
        turns = [system_turn(scene)]
        for i, message in enumerate(request.messages):
            if message.role in ("system", "developer"):
                continue
            parts = _parts(message, i)
            if message.role == "assistant":
                for param, part in parts.audios:
                    reference = self._reference(param, part)
                    turns.append(Turn("assistant", audio=await self._codes(reference)))
                if parts.texts and not parts.audios:
                    turns.append(Turn("assistant", _join(parts.texts)))
            elif message.role == "user":
                turns.append(Turn("user", await self._spoken_text(message, i)))
        text = turns[-1].text
        if not text:
            last = len(request.messages) - 1
            raise bad_request(
                "there is no text to speak in the last user message", f"messages[{last}].content"
            )
        return ChatPlan(self._generation(request, turns, text), text, "native")

    async def _plan_text(self, request: ChatCompletionRequest, scene: str) -> ChatPlan:
        last = len(request.messages) - 1
        if _parts(request.messages[last], last).audios:
            # The base model is no chat model: audio in a text-only request is answered by its transcript.
            text = await self._spoken_text(request.messages[last], last)
            return ChatPlan(None, text, DEFAULT_VOICE, direct_answer=text)
        turns = [Turn("system", scene)] if scene else []
        for i, message in enumerate(request.messages):
            if message.role in ("user", "assistant"):
                turns.append(Turn(message.role, await self._spoken_text(message, i)))
        return ChatPlan(self._generation(request, turns, turns[-1].text), turns[-1].text, DEFAULT_VOICE)
