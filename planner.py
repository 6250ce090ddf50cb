"""Turn an OpenAI request (chat completions or speech) into one generation for the engine.

Decides what is spoken and in which voice. A voice is ``default`` (Higgs' own, unconditioned), a stored
voice (``voices.py``: by name or id; OpenAI's built-in names are made once and stored), or, in chat,
``clone``. In chat:

* ``audio.voice == "clone"``: the last user message's ``input_audio`` part is the voice reference and its
  text parts are what is spoken, whatever audio came earlier in the conversation; without one there, the
  latest earlier user message's reference still is (a conversation sends its reference once: it is the
  voice of every later turn, as a stored voice's clip is, and never read as words); without any, the
  default voice is used and the fallback reported (unless the case below applies).
* an assistant message holding ``input_audio`` (the native Higgs pattern, as Boson's own client sends it):
  the conversation is used as it stands, whatever ``audio.voice`` says (but for a ``clone`` reference in
  the last user message); so is one naming an earlier audio answer of this server, for the ``default``
  voice and ``clone`` without any user reference (the earlier answer's voice carries on). A stored or built-in
  voice speaks from its own reference clip in every turn.
* otherwise the default voice speaks the last user message; ``input_audio`` parts there are transcribed
  and stand in as text.

Every check on user input happens here, before the engine is asked for anything but encoding (and, the
first time a built-in voice is used, making that voice). Failures are ``InvalidRequest``/``InvalidAudio``,
which ``errors.py`` answers as 400s.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from answers import AUDIO_LIFETIME_SECONDS, Answer, Answers
from audio import Audio, decoding
from detokenize import first_stop
from generation import AudioCodes, Engine, GenerationRequest, GenerationResult, Turn
from longform import Script, script_for
from protocol import (
    ChatCompletionRequest,
    ChatMessage,
    InputAudioPart,
    InvalidRequest,
    RefusalPart,
    SpeechRequest,
    TextPart,
)
from settings import Settings
from stt import AsyncTranscriber
from text_split import piece_characters, speakable, split_text, spoken_length
from voice_cloning import (
    InvalidReference,
    Reference,
    ReferenceCache,
    ReferenceLimits,
    clone_turns,
    decode_input_audio,
    load_reference,
    recognised_words,
    system_turn,
)
from voices import CLONE_VOICE, DEFAULT_VOICE, VoicePrompt, Voices, audio_token_cap, canonical_voice

log = logging.getLogger(__name__)

# The output cap of a text answer when the request gives none.
TEXT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Plan:
    """A generation to run and what to tell the client about it."""

    request: GenerationRequest | None
    spoken_text: str
    voice: str
    fallback: str | None = None
    direct_answer: GenerationResult | None = None
    """Set when the answer needs no generation (a text-only request that carries audio: its transcript, cut
    by the request's stop strings and token limit as a generated answer would be)."""
    script: Script | None = None
    """Every audio answer: ``request``'s text as pieces, spoken one after another (``longform.speak``)."""
    spoken_joins: int = 0
    """The line breaks in ``spoken_text`` that join the last message's parts (``_join``): not counted
    toward the input limit."""


@dataclass(frozen=True)
class _Parts:
    texts: list[str]
    audios: list[tuple[str, InputAudioPart]]  # (param path of the part, part)
    after: tuple[int, ...] = ()
    """For each audio part, how many text parts come before it (where what it says goes)."""


def _parts(message: ChatMessage, index: int) -> _Parts:
    if message.content is None:
        return _Parts([], [])
    if isinstance(message.content, str):
        return _Parts([message.content], [])
    texts, audios, after = [], [], []
    for j, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):  # (an assistant's: the protocol refuses them elsewhere)
            texts.append(part.refusal)
        elif isinstance(part, InputAudioPart):
            audios.append((f"messages[{index}].content[{j}]", part))
            after.append(len(texts))
    return _Parts(texts, audios, tuple(after))


def _nothing_to_speak(message: ChatMessage, index: int) -> InvalidRequest:
    """The 400 for a last user message with nothing to speak: for one holding audio alone, whose speech
    was not recognised (noise, a cough), a ``no_speech`` naming the clip, so that a voice agent can ask
    its user again."""
    parts = _parts(message, index)
    if parts.audios and not speakable(_join(parts.texts)):
        return InvalidRequest(
            "no speech was recognised in the last user message's audio, so there is nothing to speak; "
            "send a clip of clear speech, or the words as text",
            f"{parts.audios[0][0]}.input_audio.data",
            code="no_speech",
        )
    return InvalidRequest("there is no text to speak in the last user message", f"messages[{index}].content")


def _join(texts: list[str]) -> str:
    return "\n".join(t.strip() for t in texts if t.strip())


def _joins(texts: list[str]) -> int:
    """The line breaks ``_join`` puts between ``texts``."""
    return max(0, sum(1 for t in texts if t.strip()) - 1)


class Planner:
    """Builds ``Plan``s; holds the reference-codes cache shared by all requests."""

    def __init__(
        self, settings: Settings, engine: Engine, recognizer: AsyncTranscriber | None, voices: Voices
    ):
        self.settings = settings
        self.engine = engine
        self.recognizer = recognizer
        self.voices = voices
        self.codes: ReferenceCache[AudioCodes] = ReferenceCache()
        self.transcripts: ReferenceCache[str] = ReferenceCache()
        self.answers = Answers(folder=settings.voices_dir / ".answers" if settings.shared_answers else None)
        self.limits = ReferenceLimits.from_settings(settings, engine.sample_rate)

    # ---- helpers ----

    async def _reference(self, param: str, part: InputAudioPart) -> Reference:
        audio = part.input_audio
        return await decoding(load_reference, audio.data, audio.format, audio.transcript, self.limits, param)

    async def _transcript_of(self, reference: Reference, param: str) -> str:
        if reference.transcript is not None:
            return reference.transcript

        async def recognise() -> str:
            text = await recognised_words(self.recognizer, reference.audio, f"{param}.input_audio.transcript")
            if not text:  # with voice-activity filtering, also a clip of noise, hum or a lone syllable
                raise InvalidReference(
                    "no speech was found in the voice reference; send a clip of clear speech or give its "
                    "words in input_audio.transcript",
                    f"{param}.input_audio.data",
                )
            log.info("reference transcript recognised (%d characters)", len(text))
            return text

        return await self.transcripts.get_or_make(reference.key, recognise)

    async def _codes(self, reference: Reference) -> AudioCodes:
        return await self.codes.get_or_make(reference.key, lambda: self.engine.encode(reference.audio))

    async def _user_audio(self, param: str, part: InputAudioPart) -> Audio:
        audio = part.input_audio
        return await decoding(
            decode_input_audio,
            audio.data,
            audio.format,
            param,
            sample_rate=self.limits.sample_rate,
            max_seconds=self.settings.max_transcription_seconds,
            max_bytes=self.limits.max_bytes,
        )

    async def remember_answer(self, audio_id: str, transcript: str, codes: AudioCodes | None) -> None:
        """Keep an audio answer, so that a later request can hold it as an assistant message by its id;
        shared with other processes (``HIGGS_SHARED_ANSWERS``), its file is written when this returns."""
        written = self.answers.put(audio_id, transcript, codes)
        if written is not None:
            await asyncio.wrap_future(written)

    async def _answer_of(self, message: ChatMessage, index: int) -> Answer | None:
        """The earlier answer an assistant message refers to by ``audio.id``. An id this server does not
        hold is a 400, unless the message's own text can stand for the answer (then the id is ignored)."""
        if message.role != "assistant" or message.audio is None:
            return None
        answer = await self.answers.find(message.audio.id)
        if answer is None:
            if _join(_parts(message, index).texts):
                log.info(
                    "assistant audio %r is not held here: its message's text stands for it", message.audio.id
                )
                return None
            kept = "" if self.answers.folder else " in memory"
            forgets = "" if self.answers.folder else ", and a restart forgets it"
            raise InvalidRequest(
                f"no audio answer with id {message.audio.id!r} is held by this server: an answer's audio "
                f"is kept{kept} until its expires_at ({AUDIO_LIFETIME_SECONDS} s){forgets}; send the "
                "answer's words as the assistant message's content instead",
                f"messages[{index}].audio.id",
                code="audio_not_found",
            )
        return answer

    async def _spoken_text(self, message: ChatMessage, index: int) -> str:
        """The message's text, each ``input_audio`` part replaced by what it says, where it stands."""
        return _join(await self._spoken_parts(message, index))

    async def _spoken_parts(self, message: ChatMessage, index: int) -> list[str]:
        """The message's text parts, with what each ``input_audio`` part says where it stands."""
        parts = _parts(message, index)
        spoken = list(parts.texts)
        for at, words in reversed(list(zip(parts.after, await self._heard(parts), strict=True))):
            spoken.insert(at, words)
        return spoken

    async def _heard(self, parts: _Parts) -> list[str]:
        """What each ``input_audio`` part says: its ``transcript`` when given, else recognised."""
        heard = []
        for param, part in parts.audios:
            given = part.input_audio.transcript
            if not given:
                if self.recognizer is not None:  # (a full line refuses it before the clip is decoded)
                    self.recognizer.check_room()
                given = await recognised_words(self.recognizer, await self._user_audio(param, part), param)
                if not given.strip():
                    log.info("no speech was recognised in %s: it adds nothing to the words", param)
            heard.append(given)
        return heard

    def audio_token_cap(self, text: str) -> int:
        """Default output cap for speaking ``text``: 4 s plus ``seconds_per_character`` a letter's worth of
        speech (``spoken_length``: a Chinese character counts three), bounded."""
        spoken = self.settings.seconds_per_character * spoken_length(text)
        return audio_token_cap(self.engine.frame_rate, min(self.settings.max_audio_seconds, 4.0 + spoken))

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
        stop: list[str] | None = None,
    ) -> GenerationRequest:
        s = self.settings
        if max_tokens is None:
            max_tokens = self.audio_token_cap(text) if audio else TEXT_MAX_TOKENS
        return GenerationRequest(
            turns=turns,
            audio_output=audio,
            max_new_tokens=max_tokens,
            temperature=s.temperature if temperature is None else temperature,
            top_p=s.top_p if top_p is None else top_p,
            top_k=s.top_k if top_k is None else top_k,
            seed=seed,  # any signed 64-bit integer, as OpenAI's: each its own draws
            stop=stop or [],
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
            request.token_limit,
            request.temperature,
            request.top_p,
            request.top_k,
            request.seed,
            request.stop_strings,
        )

    # ---- long texts (longform.py) ----

    def _check_length(self, characters: int, param: str) -> None:
        """400 when a text of ``characters`` is longer than one request may speak. A chat message's are the
        characters sent in its text parts, as speech counts its ``input``: the line breaks that join the
        parts in the prompt (``_join``) do not count (two parts of 2048 characters are 4096 characters
        sent, as the limit reads); the client's own do, and whitespace at the parts' ends, though the
        prompt leaves it out."""
        limit = self.settings.max_input_characters
        if characters > limit:
            raise InvalidRequest(
                f"the text to speak has {characters} characters; this server speaks at most {limit} per "
                "request (HIGGS_MAX_INPUT_CHARACTERS): split it over several requests",
                param,
                code="string_above_max_length",
            )

    def _script(self, request: GenerationRequest, text: str, max_tokens: int | None) -> Script:
        """``request`` (whose last turn is ``text``) as pieces; each piece capped by its own length, or all
        of them together by the client's ``max_tokens``."""
        pieces = split_text(text, piece_characters(text, self.settings.piece_characters)) or [text]
        if len(pieces) > 1:  # (where a long text was cut: a trial found no word of it but in the transcripts)
            log.info("a text of %d characters, spoken in %d pieces of %s", len(text), len(pieces),
                     ", ".join(str(len(piece)) for piece in pieces))  # fmt: skip
        caps = [self.audio_token_cap(piece) for piece in pieces]
        return script_for(request, pieces, caps, max_tokens, self.settings.context_pieces)

    # ---- the plan ----

    async def plan(self, request: ChatCompletionRequest) -> Plan:
        """Validate the conversation and build the generation; raises ``InvalidRequest``/``InvalidAudio``.

        An audio answer also gets its ``script``: the spoken text in pieces (at most
        ``max_input_characters``, checked before any work on the text parts and again on the text spoken).
        """
        last = len(request.messages) - 1
        param = f"messages[{last}].content"
        if request.wants_audio:
            self._check_length(sum(map(len, _parts(request.messages[last], last).texts)), param)
        plan = await self._plan_chat(request)
        if plan.request is None or not plan.request.audio_output:
            return plan
        self._check_length(len(plan.spoken_text) - plan.spoken_joins, param)  # with the words of its audio
        max_tokens = request.token_limit
        return replace(plan, script=self._script(plan.request, plan.spoken_text, max_tokens))

    async def _plan_chat(self, request: ChatCompletionRequest) -> Plan:
        messages = request.messages
        last = len(messages) - 1
        if messages[last].role != "user":
            raise InvalidRequest("the last message must be the user's", f"messages[{last}].role")
        instructions = [
            (i, _parts(m, i)) for i, m in enumerate(messages) if m.role in ("system", "developer")
        ]
        for i, parts in instructions:
            if parts.audios:
                raise InvalidRequest(
                    f"a {messages[i].role} message takes text only; put a voice reference (with "
                    'audio.voice "clone") or audio to transcribe in a user message',
                    parts.audios[0][0],
                )
        scene = _join([_join(parts.texts) for _, parts in instructions])
        voice = canonical_voice(request.audio.voice_name) if request.audio else DEFAULT_VOICE

        if not request.wants_audio:
            return await self._plan_text(request, scene)

        # Every assistant message's audio id is checked, whatever the voice (a clone answered one that is
        # not held with a 200, where every other voice answered 400).
        answers = {i: await self._answer_of(m, i) for i, m in enumerate(messages) if m.role == "assistant"}
        if voice == CLONE_VOICE:
            # The last user message's reference, else the latest earlier one: the voice asked for, whatever
            # other audio the conversation holds.
            for i in range(last, -1, -1):
                parts = _parts(messages[i], i)
                if messages[i].role != "user" or not parts.audios:
                    continue
                if len(parts.audios) > 1:
                    raise InvalidRequest(
                        "a clone request takes one voice reference; this message has "
                        f"{len(parts.audios)} input_audio parts",
                        parts.audios[1][0],
                    )
                # The conversation's other audio is neither read nor checked: said in the log (a hostile-input
                # trial found bad audio there taken without a word).
                if unused := [p for j, m in enumerate(messages) if j != i for p, _ in _parts(m, j).audios]:
                    log.info(
                        "clone: %s not used (messages[%d]'s reference is the voice)", ", ".join(unused), i
                    )
                return await self._plan_clone(request, scene or self.settings.default_scene, parts.audios[0])

        kept_audio = any(a is not None and a.codes is not None and a.codes.frames for a in answers.values())
        sent_audio = any(_parts(m, i).audios for i, m in enumerate(messages) if m.role == "assistant")
        named = voice not in (DEFAULT_VOICE, CLONE_VOICE)  # its own reference: the same voice every time
        if sent_audio or (kept_audio and not named):
            return await self._plan_native(request, scene or self.settings.default_scene, answers)
        scene = scene or self.settings.default_scene
        if voice == CLONE_VOICE:
            log.warning("voice 'clone' without an input_audio reference: falling back to the default voice")

        spoken = await self._spoken_parts(messages[last], last)
        text = _join(spoken)
        if not speakable(text):
            raise _nothing_to_speak(messages[last], last)
        # Resolved last: a built-in voice's first use is a generation of its own (make_builtin).
        if voice == CLONE_VOICE:
            fallback, prompt = "no-reference", VoicePrompt(DEFAULT_VOICE)
        else:
            fallback, prompt = None, await self.voices.resolve_or_make(voice, "audio.voice")
        turns = prompt.turns(scene, text)
        return Plan(
            self._chat_generation(request, turns, text),
            text,
            prompt.name,
            fallback,
            spoken_joins=_joins(spoken),
        )

    async def _plan_clone(
        self, request: ChatCompletionRequest, scene: str, reference_part: tuple[str, InputAudioPart]
    ) -> Plan:
        """Speak the last user message's text in the voice of ``reference_part`` (its own, or an earlier
        user message's)."""
        last = len(request.messages) - 1
        param, part = reference_part
        texts = _parts(request.messages[last], last).texts
        text = _join(texts)
        if not speakable(text):
            raise InvalidRequest(
                "the clone request has a voice reference but no text to speak; add a text part",
                f"messages[{last}].content",
            )
        reference = await self._reference(param, part)
        transcript = await self._transcript_of(reference, param)
        codes = await self._codes(reference)
        turns = clone_turns(scene, transcript, codes, text)
        return Plan(
            self._chat_generation(request, turns, text), text, CLONE_VOICE, spoken_joins=_joins(texts)
        )

    async def _plan_native(
        self, request: ChatCompletionRequest, scene: str, answers: dict[int, Answer | None]
    ) -> Plan:
        """The conversation as it stands: assistant audio (sent, or an earlier answer by id) in context."""
        turns = [system_turn(scene)]
        joins = 0  # (the last message's: it is the user's)
        for i, message in enumerate(request.messages):
            if message.role in ("system", "developer"):
                continue
            parts = _parts(message, i)
            if message.role == "assistant":
                for param, part in parts.audios:
                    reference = await self._reference(param, part)
                    turns.append(Turn("assistant", audio=await self._codes(reference)))
                answer = answers.get(i)
                if answer is not None and answer.codes is not None and answer.codes.frames:
                    turns.append(Turn("assistant", audio=answer.codes))
                elif parts.texts and not parts.audios:
                    turns.append(Turn("assistant", _join(parts.texts)))
                elif answer is not None and answer.transcript:  # cut before any of its audio was sent
                    turns.append(Turn("assistant", answer.transcript))
            elif message.role == "user":
                spoken = await self._spoken_parts(message, i)
                joins = _joins(spoken)
                turns.append(Turn("user", _join(spoken)))
        text = turns[-1].text
        if not speakable(text):
            last = len(request.messages) - 1
            raise _nothing_to_speak(request.messages[last], last)
        return Plan(self._chat_generation(request, turns, text), text, "native", spoken_joins=joins)

    async def _plan_text(self, request: ChatCompletionRequest, scene: str) -> Plan:
        last = len(request.messages) - 1
        parts = _parts(request.messages[last], last)
        if parts.audios:
            # The base model is no chat model: audio in a text-only request is answered by its transcript
            # (the text beside it is the asker's, "What does this say?", not part of the answer).
            text = _join(await self._heard(parts))
            return Plan(None, text, DEFAULT_VOICE, direct_answer=await self._direct_answer(request, text))
        turns = [Turn("system", scene)] if scene else []
        for i, message in enumerate(request.messages):
            if message.role in ("user", "assistant"):
                answer = await self._answer_of(message, i)
                text = answer.transcript if answer else await self._spoken_text(message, i)
                turns.append(Turn(message.role, text))
        if not turns[-1].text:
            raise InvalidRequest("the last user message has no content", f"messages[{last}].content")
        return Plan(self._chat_generation(request, turns, turns[-1].text), turns[-1].text, DEFAULT_VOICE)

    async def _direct_answer(self, request: ChatCompletionRequest, text: str) -> GenerationResult:
        """``text`` as the answer to ``request``: up to its first stop string, at most its ``max_tokens``
        (then finished by ``length``), its tokens counted as the usage's completion tokens."""
        cut = first_stop(text, request.stop_strings) if text else -1
        text = text if cut < 0 else text[:cut]
        answer, tokens = await self.engine.text_tokens(text, request.token_limit) if text else ("", 0)
        return GenerationResult(
            text=answer,
            audio=None,
            finish_reason="length" if answer != text else "stop",
            prompt_tokens=0,
            prompt_audio_tokens=0,
            completion_tokens=tokens,
            completion_audio_tokens=0,
            seconds=0.0,
        )

    async def plan_speech(self, request: SpeechRequest) -> Plan:
        """The generation for /v1/audio/speech: ``input`` in ``voice``, ``instructions`` as the scene."""
        text = " ".join(request.input.split())
        if not speakable(text):
            shown = "no letter, digit, punctuation or symbol"
            what = "empty" if not text else f"only invisible characters ({shown})"
            raise InvalidRequest(f"input is {what}; give the text to speak", "input")
        self._check_length(len(request.input), "input")
        instructions = (request.instructions or "").strip()  # (invisible ones are none: a trial's bidi marks)
        scene = instructions if speakable(instructions) else self.settings.default_scene
        prompt = await self.voices.resolve_or_make(request.voice_name, "voice")
        generation = self._generation(prompt.turns(scene, text), text, True, seed=request.seed)
        return Plan(generation, text, prompt.name, script=self._script(generation, text, None))
