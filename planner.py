"""Turn an OpenAI request (chat completions or speech) into one generation for the engine.

Decides what is spoken and in which voice. A voice is ``default`` (Higgs' own, unconditioned), a stored
voice of the library (by name or id; OpenAI's built-in names are made once and stored, see
``BUILTIN_VOICES``), or, in chat, ``clone``. In chat:

* ``audio.voice == "clone"``: the last user message's ``input_audio`` part is the voice reference and its
  text parts are what is spoken; without a reference the default voice is used and the fallback reported.
* an assistant message holding ``input_audio`` (the native Higgs pattern, as Boson's own client sends it):
  the conversation is used as it stands, whatever ``audio.voice`` says.
* otherwise the default voice speaks the last user message; ``input_audio`` parts there are transcribed
  and stand in as text.

Every check on user input happens here, before the engine is asked for anything but encoding (and, the
first time a built-in voice is used, making that voice).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, replace

from audio import Audio, AudioError, active_speech_seconds, decode_audio, decode_base64, trim_silence
from engine import AudioCodes, Engine, GenerationRequest, Turn
from longform import Script, script_for
from protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    InputAudioPart,
    SpeechRequest,
    TextPart,
    bad_request,
)
from settings import Settings
from stt import AsyncTranscriber
from text_split import split_text
from voice_cloning import (
    CodesCache,
    InvalidReference,
    Reference,
    ReferenceLimits,
    Voice,
    VoiceExists,
    VoiceLibrary,
    VoiceQuotaExceeded,
    check_voice_name,
    clone_turns,
    load_reference,
    reference_from_bytes,
    system_turn,
)

log = logging.getLogger(__name__)

DEFAULT_VOICE = "default"
CLONE_VOICE = "clone"

# OpenAI's built-in voice names. Each is a stored voice: the library's voice of that name when there is
# one; otherwise, on first use, the model speaks BUILTIN_SENTENCE with this speaker description and a seed
# derived from the name, and the clip is stored (marked built-in) and cloned from ever after, so the voice
# is the same on every request. A description alone would give a new timbre for every text.
BUILTIN_VOICES: dict[str, str] = {
    "alloy": "a calm adult voice, neutral and balanced, clear diction",
    "ash": "a male voice, relaxed and slightly husky",
    "ballad": "a male voice, soft and warm, like a storyteller",
    "coral": "a female voice, bright and friendly",
    "echo": "a male voice, deep and resonant",
    "fable": "a male voice with a British accent, expressive",
    "nova": "a young female voice, energetic and clear",
    "onyx": "a male voice, low and authoritative",
    "sage": "a female voice, calm and thoughtful",
    "shimmer": "a female voice, light and gentle",
    "verse": "a male voice, lively and articulate",
    "marin": "a female voice, smooth and professional",
    "cedar": "a male voice, warm and grounded",
}
BUILTIN_SENTENCE = (
    "Hello, it is nice to meet you. I will read your text in this voice, clearly and at an even pace."
)


def builtin_seed(name: str) -> int:
    """The fixed seed a built-in voice is made with."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


@dataclass(frozen=True)
class VoicePrompt:
    """What a voice adds to the prompt: a reference (transcript and codes), or nothing (default voice)."""

    name: str
    transcript: str | None = None
    codes: AudioCodes | None = None

    def turns(self, scene: str, text: str) -> list[Turn]:
        """The prompt that speaks ``text`` in this voice."""
        if self.codes is None or self.transcript is None:
            return [system_turn(scene), Turn("user", text)]
        return clone_turns(scene, self.transcript, self.codes, text)


@dataclass(frozen=True)
class Plan:
    """A generation to run and what to tell the client about it."""

    request: GenerationRequest | None
    spoken_text: str
    voice: str
    fallback: str | None = None
    direct_answer: str | None = None
    """Set when the answer needs no generation (a text-only request that carries audio: its transcript)."""
    script: Script | None = None
    """Long-form: ``request``'s text as pieces, spoken one after another (``longform.speak``); set for
    every audio answer."""


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


class Planner:
    """Builds ``Plan``s; holds the voice library and the reference-codes cache shared by all requests."""

    def __init__(
        self, settings: Settings, engine: Engine, recognizer: AsyncTranscriber | None, library: VoiceLibrary
    ):
        self.settings = settings
        self.engine = engine
        self.recognizer = recognizer
        self.library = library
        self.codes = CodesCache()
        self._library_lock = asyncio.Lock()
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

    def audio_token_cap(self, text: str) -> int:
        """Default output cap for speaking ``text``: 4 s plus ``seconds_per_character`` (bounded)."""
        seconds = min(self.settings.max_audio_seconds, 4.0 + self.settings.seconds_per_character * len(text))
        # Plus the delay pattern's extra columns and the stream's end marker.
        return int(self.engine.frame_rate * seconds) + 16

    def _generation(
        self,
        turns: list[Turn],
        text: str,
        audio: bool,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> GenerationRequest:
        s = self.settings
        if max_tokens is None:
            max_tokens = self.audio_token_cap(text) if audio else 512
        return GenerationRequest(
            turns=turns,
            audio_output=audio,
            max_new_tokens=max_tokens,
            temperature=s.temperature if temperature is None else temperature,
            top_p=s.top_p if top_p is None else top_p,
            top_k=s.top_k if top_k is None else top_k,
            seed=seed,
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            ras_window=s.ras_window,
            time_limit=s.generation_timeout_seconds,
        )

    def _chat_generation(
        self, request: ChatCompletionRequest, turns: list[Turn], text: str
    ) -> GenerationRequest:
        return self._generation(
            turns,
            text,
            request.wants_audio,
            request.max_completion_tokens or request.max_tokens,
            request.temperature,
            request.top_p,
            request.top_k,
            request.seed,
            request.stop,
        )

    # ---- long texts (longform.py) ----

    def _check_length(self, text: str, param: str) -> None:
        """400 when ``text`` is longer than one request may speak."""
        limit = self.settings.max_input_characters
        if len(text) > limit:
            raise bad_request(
                f"the text to speak has {len(text)} characters; this server speaks at most {limit} per "
                "request (HIGGS_MAX_INPUT_CHARACTERS): split it over several requests",
                param,
                code="string_above_max_length",
            )

    def _script(self, request: GenerationRequest, text: str, max_tokens: int | None) -> Script:
        """``request`` (whose last turn is ``text``) as pieces; each piece capped by its own length, or all
        of them together by the client's ``max_tokens``."""
        pieces = split_text(text, self.settings.piece_characters) or [text]
        caps = [self.audio_token_cap(piece) for piece in pieces]
        return script_for(request, pieces, caps, max_tokens, self.settings.context_pieces)

    # ---- the plan ----

    async def plan(self, request: ChatCompletionRequest) -> Plan:
        """Validate the conversation and build the generation; raises ``APIError``/``InvalidReference``.

        An audio answer also gets its ``script``: the spoken text in pieces (at most
        ``max_input_characters``, checked before any work on the text parts and again on the text spoken).
        """
        last = len(request.messages) - 1
        param = f"messages[{last}].content"
        if request.wants_audio:
            self._check_length(_join(_parts(request.messages[last], last).texts), param)
        plan = await self._plan_chat(request)
        if plan.request is None or not plan.request.audio_output:
            return plan
        self._check_length(plan.spoken_text, param)
        max_tokens = request.max_completion_tokens or request.max_tokens
        return replace(plan, script=self._script(plan.request, plan.spoken_text, max_tokens))

    async def _plan_chat(self, request: ChatCompletionRequest) -> Plan:
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

        text = await self._spoken_text(messages[last], last)
        if not text:
            raise bad_request(
                "there is no text to speak in the last user message", f"messages[{last}].content"
            )
        # Resolved last: a built-in voice's first use is a generation of its own.
        if voice == CLONE_VOICE:
            fallback, prompt = "no-reference", VoicePrompt(DEFAULT_VOICE)
        else:
            fallback, prompt = None, await self.voice(voice, "audio.voice")
        turns = prompt.turns(scene, text)
        return Plan(self._chat_generation(request, turns, text), text, prompt.name, fallback)

    async def _plan_clone(self, request: ChatCompletionRequest, scene: str, parts: _Parts) -> Plan:
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
        return Plan(self._chat_generation(request, turns, text), text, CLONE_VOICE)

    async def _plan_native(self, request: ChatCompletionRequest, scene: str) -> Plan:
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
        return Plan(self._chat_generation(request, turns, text), text, "native")

    async def _plan_text(self, request: ChatCompletionRequest, scene: str) -> Plan:
        last = len(request.messages) - 1
        if _parts(request.messages[last], last).audios:
            # The base model is no chat model: audio in a text-only request is answered by its transcript.
            text = await self._spoken_text(request.messages[last], last)
            return Plan(None, text, DEFAULT_VOICE, direct_answer=text)
        turns = [Turn("system", scene)] if scene else []
        for i, message in enumerate(request.messages):
            if message.role in ("user", "assistant"):
                turns.append(Turn(message.role, await self._spoken_text(message, i)))
        return Plan(self._chat_generation(request, turns, turns[-1].text), turns[-1].text, DEFAULT_VOICE)

    async def plan_speech(self, request: SpeechRequest) -> Plan:
        """The generation for /v1/audio/speech: ``input`` in ``voice``, ``instructions`` as the scene."""
        text = " ".join(request.input.split())
        if not text:
            raise bad_request("input is empty; give the text to speak", "input")
        self._check_length(request.input, "input")
        scene = (request.instructions or "").strip() or self.settings.default_scene
        prompt = await self.voice(request.voice_name, "voice")
        generation = self._generation(prompt.turns(scene, text), text, True, seed=request.seed)
        return Plan(generation, text, prompt.name, script=self._script(generation, text, None))

    # ---- voices ----

    def voice_names(self) -> list[str]:
        """Every voice name a request may use."""
        stored = [v.name for v in self.library.list()]
        return sorted({DEFAULT_VOICE, *stored, *BUILTIN_VOICES})

    async def voice(self, name: str, param: str) -> VoicePrompt:
        """Resolve a voice name or id to what it adds to the prompt; 400 naming the voices if unknown."""
        if name == DEFAULT_VOICE:
            return VoicePrompt(DEFAULT_VOICE)
        stored = await asyncio.to_thread(self.library.get, name)
        if stored is None and name in BUILTIN_VOICES:
            stored = await self._make_builtin(name)
        if stored is None:
            names = ", ".join(["clone (chat only)", *self.voice_names()])
            raise bad_request(f"unknown voice {name!r}; available voices: {names}", param)
        return VoicePrompt(stored.name, stored.transcript, await self._stored_codes(stored))

    async def _stored_codes(self, voice: Voice) -> AudioCodes:
        """A stored voice's codes: from disk when cached there, else encoded once and cached."""
        codes = await asyncio.to_thread(self.library.codes, voice)
        if codes is None:
            audio = await asyncio.to_thread(self.library.audio, voice)
            codes = await self.engine.encode(audio)
            await asyncio.to_thread(self.library.save_codes, voice, codes)
        return codes

    async def _make_builtin(self, name: str) -> Voice:
        async with self._library_lock:
            stored = await asyncio.to_thread(self.library.get, name)
            if stored is not None:
                return stored
            log.info("making built-in voice %r (first use)", name)
            scene = f"{self.settings.default_scene}\n\nSPEAKER0: {BUILTIN_VOICES[name]}"
            cap = int(self.engine.frame_rate * self.settings.builtin_voice_seconds) + 16
            request = self._generation(
                [system_turn(scene), Turn("user", BUILTIN_SENTENCE)],
                BUILTIN_SENTENCE,
                True,
                max_tokens=cap,
                seed=builtin_seed(name),
            )
            result = await self.engine.generate(request)
            if (
                result.audio is None
                or active_speech_seconds(result.audio) < self.settings.min_reference_seconds
            ):
                raise APIError(
                    500, f"the model did not produce a usable clip for voice {name!r}", type="server_error"
                )
            audio = trim_silence(result.audio)
            codes = await self.engine.encode(audio)
            return await asyncio.to_thread(self.library.create, name, audio, BUILTIN_SENTENCE, codes, True)

    async def create_voice(self, name: str, data: bytes, transcript: str | None) -> Voice:
        """Store an uploaded voice: validated, transcribed when no transcript is given, and encoded, all
        before anything is written."""
        try:
            check_voice_name(name)
        except ValueError as exc:
            raise bad_request(str(exc), "name") from None
        if await asyncio.to_thread(self.library.get, name) is not None:
            raise APIError(409, f"a voice named {name!r} already exists", param="name", code="voice_exists")
        reference = await asyncio.to_thread(
            reference_from_bytes, data, transcript, self.limits, "audio_sample", "transcript"
        )
        if reference.transcript is None:
            text = await self._transcribe(reference.audio, "transcript")
            if not text:
                raise InvalidReference(
                    "no words were recognised in the sample; send clear speech or give its transcript",
                    "audio_sample",
                )
            reference = Reference(reference.audio, reference.key, text)
        codes = await self.engine.encode(reference.audio)
        async with self._library_lock:
            try:
                return await asyncio.to_thread(
                    self.library.create, name, reference.audio, reference.transcript, codes
                )
            except VoiceExists as exc:
                raise APIError(409, str(exc), param="name", code="voice_exists") from None
            except VoiceQuotaExceeded as exc:
                raise APIError(413, str(exc), param="audio_sample", code="voice_quota_exceeded") from None

    async def delete_voice(self, name_or_id: str) -> Voice:
        """Remove a stored voice; 404 when there is none."""
        async with self._library_lock:
            voice = await asyncio.to_thread(self.library.get, name_or_id)
            if voice is None or not await asyncio.to_thread(self.library.delete, voice.name):
                raise APIError(404, f"no voice {name_or_id!r}", param="voice_id", code="voice_not_found")
        return voice
