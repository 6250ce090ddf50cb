"""Long texts through HTTP on the tiny engine: spoken whole, in pieces, each after the previous pieces' audio.

The tiny model never ends its audio by itself, so every piece runs to its own cap (1 s of audio here, plus
the delay pattern's columns): the answer's length follows from the pieces the splitter makes and their caps.
"""

from __future__ import annotations

import base64
import io
import json
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from sample_texts import sentences

from generation import AudioPiece, GenerationResult
from longform import Joiner
from planner import Planner
from text_split import piece_characters, spaced, split_text, spoken_length
from voices import audio_token_cap

TEXT = sentences(200)
TEXT = TEXT[: TEXT.rfind(".", 0, 3000) + 1]
SHORT = "One short sentence is spoken here."
SAMPLES_PER_FRAME = 960  # 24 kHz audio, 25 frames a second


@pytest.fixture(scope="module")
def long_app(settings, engine):
    """The app with short piece caps (1 s of audio each) and the default piece size and context."""
    from fastapi.testclient import TestClient

    from app import create_app

    changes = {
        "stt_model": "",
        "max_audio_seconds": 1.0,
        "max_input_characters": 3500,
        "generation_timeout_seconds": 3600,  # a 5-minute answer on a busy CPU
    }
    app = create_app(settings.model_copy(update=changes), engine=engine)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def results(spy, engine, monkeypatch):
    """Every finished generation's result, in order, next to the requests ``spy`` records, and the decoding
    steps at which each stream started and gave its first audio."""
    seen = {"results": [], "steps": []}
    recorded = engine.stream

    async def stream(request):
        steps = {"start": engine.steps, "first_audio": None}
        seen["steps"].append(steps)
        async for event in recorded(request):
            if isinstance(event, AudioPiece) and steps["first_audio"] is None:
                steps["first_audio"] = engine.steps
            elif isinstance(event, GenerationResult):
                seen["results"].append(event)
            yield event

    monkeypatch.setattr(engine, "stream", stream)
    return seen


def pieces_of(client, text: str) -> list[str]:
    return split_text(text, piece_characters(text, client.app.state.settings.piece_characters))


def expected_samples(client, text: str) -> tuple[list[int], list[int]]:
    """Each piece's output cap (in columns) and its samples: the cap less the begin marker, the delay
    pattern's columns and the dropped last frame."""
    planner = client.app.state.planner
    caps = [planner.audio_token_cap(piece) for piece in pieces_of(client, text)]
    return caps, [(cap - 9) * SAMPLES_PER_FRAME for cap in caps]


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767


def speech(client, text, voice="default", **extra) -> dict:
    return {"model": "tts-1", "input": text, "voice": voice, "response_format": "pcm", "seed": 5, **extra}


def chat(text, **extra) -> dict:
    return {
        "model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "pcm16"}, "messages": [{"role": "user", "content": text}],
        "seed": 5, **extra,
    }  # fmt: skip


def assert_joins_are_smooth(signal: np.ndarray, lengths: list[int]) -> None:
    """No join between pieces jumps more than the signal does elsewhere (than its median step, even)."""
    jumps = np.abs(np.diff(signal))
    joins = np.cumsum(lengths)[:-1]
    near = np.concatenate([np.arange(j - 2, j + 1) for j in joins])
    assert jumps[near].max() <= np.median(np.delete(jumps, near))


def test_the_text_is_long_and_split_in_many_pieces(long_app):
    assert 2900 <= len(TEXT) <= 3000
    assert len(pieces_of(long_app, TEXT)) >= 10


def test_chinese_is_spoken_in_pieces_of_a_third_the_characters_and_capped_by_its_syllables(long_app, spy):
    """A trial: 300 Chinese characters (a minute of speech, at 4 to 5 a second) were one piece, as 300
    letters (20 s) are, with the cap of 300 letters: 49 s. A Chinese character is a syllable: it counts
    three letters' worth, for a piece's size and for its cap."""
    text = "今天天气很好，我们去公园散步。" * 16  # 240 characters, 16 sentences
    response = long_app.post("/v1/audio/speech", json=speech(long_app, text))
    assert response.status_code == 200, response.text
    said = [request.turns[-1].text for request in spy["stream"]]
    # 13 of each sentence's 15 characters are Chinese: a piece holds 110 characters (300 x 240 / 656), seven
    # sentences, 287 letters' worth; it held all 240 characters, one piece, before.
    assert [len(piece) for piece in said] == [105, 105, 30]
    assert [spoken_length(piece) for piece in said] == [287, 287, 82] and "".join(said) == text
    # Each piece's default cap counts its syllables three times: 4 s + 0.15 s x 287.
    planner, frames = long_app.app.state.planner, long_app.app.state.engine.frame_rate
    uncapped = planner.settings.model_copy(update={"max_audio_seconds": 300.0})
    caps = Planner(uncapped, planner.engine, None, planner.voices)
    assert caps.audio_token_cap(said[0]) == audio_token_cap(frames, 4 + 0.15 * 287) > 1000
    assert caps.audio_token_cap("a" * 105) == audio_token_cap(frames, 4 + 0.15 * 105)


def test_speech_body_speaks_every_piece_after_the_previous_ones(long_app, spy, results):
    caps, samples = expected_samples(long_app, TEXT)
    with long_app.stream("POST", "/v1/audio/speech", json=speech(long_app, TEXT, voice="alloy")) as response:
        assert response.status_code == 200, response.read()
        data = b"".join(response.iter_bytes())
    audio = pcm(data)
    assert len(audio) == sum(samples)  # every piece spoken, to its cap
    assert_joins_are_smooth(audio, samples)

    requests, made = spy["stream"], results["results"]
    pieces = pieces_of(long_app, TEXT)
    assert [r.turns[-1].text for r in requests] == pieces
    assert [r.max_new_tokens for r in requests] == caps
    reference = requests[0].turns[2]  # the stored voice's clip, in every piece's prompt
    assert reference.role == "assistant" and reference.audio is not None
    for k, request in enumerate(requests):
        assert [t.text for t in request.turns[:2]] == [t.text for t in requests[0].turns[:2]]
        assert request.turns[2].audio is reference.audio
        context = request.turns[3:-1]  # (user text, assistant codes) of the last two pieces
        assert len(context) == 2 * min(k, 2)
        for back, (said, codes) in enumerate(zip(context[::2], context[1::2], strict=True)):
            piece = k - min(k, 2) + back
            assert said.role == "user" and said.text == pieces[piece]
            assert codes.role == "assistant" and torch.equal(codes.audio.codes, made[piece].codes.codes)
            assert codes.audio.frames == caps[piece] - 9


def test_speech_sse_reports_usage_summed_and_the_cut(long_app, results):
    caps, samples = expected_samples(long_app, TEXT)
    body = speech(long_app, TEXT, stream_format="sse")
    with long_app.stream("POST", "/v1/audio/speech", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    audio = pcm(b"".join(base64.b64decode(e["audio"]) for e in deltas))
    assert len(audio) == sum(samples)
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert done["finish_reason"] == "length"  # every tiny piece ran into its cap, and the answer says so
    made = results["results"]
    assert done["usage"]["output_tokens"] == sum(caps) == sum(r.completion_tokens for r in made)
    assert done["usage"]["input_tokens"] == sum(r.prompt_tokens for r in made)


def test_chat_stream_speaks_the_whole_text(long_app, results):
    caps, samples = expected_samples(long_app, TEXT)
    body = chat(TEXT, stream=True, stream_options={"include_usage": True})
    with long_app.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [
        c["choices"][0]["delta"]["audio"]
        for c in chunks
        if c["choices"] and "audio" in c["choices"][0]["delta"]
    ]
    audio = pcm(b"".join(base64.b64decode(d["data"]) for d in deltas))
    assert len(audio) == sum(samples)
    assert_joins_are_smooth(audio, samples)
    # Each piece's transcript comes with its first audio, and together they are the text.
    offsets = np.cumsum([0] + [len(base64.b64decode(d["data"])) // 2 for d in deltas])
    said = [(int(offsets[i]), d["transcript"]) for i, d in enumerate(deltas) if "transcript" in d]
    pieces = spaced(TEXT, pieces_of(long_app, TEXT))
    assert said == list(zip(np.cumsum([0] + samples[:-1]).tolist(), pieces, strict=True))
    assert "".join(pieces) == TEXT
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens_details"]["audio_tokens"] == sum(caps)
    assert usage["prompt_tokens"] == sum(r.prompt_tokens for r in results["results"])


def test_chat_answer_speaks_the_whole_text(long_app):
    caps, samples = expected_samples(long_app, TEXT)
    assert set(samples) == {24000}  # each piece cut at HIGGS_MAX_AUDIO_SECONDS=1.0 holds 1 s of audio
    body = chat(TEXT)
    body["audio"]["format"] = "wav"
    response = long_app.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    audio, rate = sf.read(io.BytesIO(base64.b64decode(answer["choices"][0]["message"]["audio"]["data"])))
    assert rate == 24000 and len(audio) == sum(samples)  # a WAV header with the real length
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == sum(caps)


def test_max_tokens_bounds_the_whole_answer_and_says_where_it_cut(long_app, spy):
    response = long_app.post("/v1/chat/completions", json=chat(TEXT, max_tokens=60))
    answer = response.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 60
    assert len(spy["stream"]) == 1  # the budget was spent on the first piece: the rest is not spoken


@pytest.mark.parametrize("stream", [False, True])
def test_a_cut_answer_is_transcribed_as_far_as_it_was_spoken(long_app, spy, stream):
    """``max_tokens`` ran out in the first piece: the transcript names that piece, not the whole text, and a
    later request that refers to the answer has that transcript in its context."""
    body = chat(TEXT, max_tokens=60, stream=stream)
    if stream:
        with long_app.stream("POST", "/v1/chat/completions", json=body) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        deltas = [c["choices"][0]["delta"].get("audio") for c in chunks if c["choices"]]
        audio_id = next(d["id"] for d in deltas if d)
        transcript = "".join(d.get("transcript", "") for d in deltas if d)
    else:
        audio = long_app.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["audio"]
        audio_id, transcript = audio["id"], audio["transcript"]
    assert len(spy["stream"]) == 1
    assert transcript == pieces_of(long_app, TEXT)[0] != TEXT
    later = [
        {"role": "user", "content": TEXT},
        {"role": "assistant", "audio": {"id": audio_id}},
        {"role": "user", "content": SHORT},
    ]
    text_only = {"model": "tts-1", "messages": later, "max_tokens": 4}
    response = long_app.post("/v1/chat/completions", json=text_only)
    assert response.status_code == 200, response.text
    assert [t.text for t in spy["generate"][-1].turns if t.role == "assistant"] == [transcript]


def test_first_audio_of_a_long_text_comes_as_soon_as_a_short_ones(long_app, results, engine):
    """Counted in decoding steps from the request's first generation to its first audio piece."""

    def first_audio_steps(text: str) -> int:
        before = len(results["steps"])
        body = speech(long_app, text, stream_format="sse")
        with long_app.stream("POST", "/v1/audio/speech", json=body) as response:
            for line in response.iter_lines():
                if "speech.audio.delta" in line:
                    break  # first audio: leave (the rest of the long text is not generated)
        steps = results["steps"][before]
        return steps["first_audio"] - steps["start"]

    short, long = first_audio_steps(SHORT), first_audio_steps(TEXT)
    assert long <= 1.5 * short, (long, short)
    assert len(results["steps"]) == 2  # leaving stopped the long text in its first piece
    # Within the first piece, not after it. (On a CPU no step runs while a first piece is with the codec,
    # but the loop may run a few before this count is read on the event loop.)
    assert long <= expected_samples(long_app, TEXT)[0][0]


def test_speech_input_over_the_limit_is_refused_naming_it(client, long_app, spy):
    response = client.post("/v1/audio/speech", json=speech(client, "a" * 4097))
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "input" and "4096" in error["message"]
    assert "HIGGS_MAX_INPUT_CHARACTERS" in error["message"]
    assert long_app.post("/v1/audio/speech", json=speech(long_app, "b " * 1751)).status_code == 400
    response = long_app.post("/v1/chat/completions", json=chat("c" * 3501))
    error = response.json()["error"]
    assert response.status_code == 400 and "3500" in error["message"]
    assert error["param"] == "messages[0].content"
    assert spy["generate"] == []


def test_a_chat_messages_text_parts_count_without_the_line_breaks_that_join_them(long_app):
    """Two text parts of 1750 characters are 3500 sent, within a limit of 3500: the line break that joins
    them in the prompt is not counted (it was, and the 400 said 3501). One more character is over. A line
    break the client sent counts."""

    def parts(*lengths: int) -> list[dict]:
        return [{"type": "text", "text": "Say it. " + "d" * (n - 8)} for n in lengths]

    refused = long_app.post("/v1/chat/completions", json=chat(parts(1750, 1751), max_tokens=5))
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["code"] == "string_above_max_length"
    assert "3501 characters" in error["message"]
    taken = long_app.post("/v1/chat/completions", json=chat(parts(1750, 1750), max_tokens=5))
    assert taken.status_code == 200, taken.text[:300]
    # The client's own line breaks count, as they do in speech (a trial: all of them were left out, and
    # 3,490 characters and 11 line breaks were spoken by chat and refused by speech).
    for text in ("Say it. " + "e" * 3482 + "\n" * 11, "Say it." + "\n" * 11 + "e" * 3483):
        for refused in (
            long_app.post("/v1/chat/completions", json=chat(text, max_tokens=5)),
            long_app.post("/v1/chat/completions", json=chat([{"type": "text", "text": text}], max_tokens=5)),
            long_app.post("/v1/audio/speech", json=speech(long_app, text)),
        ):
            assert refused.status_code == 400 and "3501 characters" in refused.json()["error"]["message"]


def test_a_text_whose_later_piece_cannot_fit_is_refused_before_the_answer_starts(client, spy):
    """Long instructions leave room for a short first piece but not for a longer later one (the tiny
    tokenizer takes 4 tokens an emoji): a 400 naming ``instructions`` before any audio, where the answer
    used to stop after its first piece with a body that looked whole; and before the first piece is in
    the line (it was queued and prefilled first, and a request right after the 400 could find the line
    full)."""
    text = "Hello there. " + "\N{GRINNING FACE}" * 600  # pieces of 12, 1,200 and 1,200 tokens
    body = speech(client, text, instructions="\N{GRINNING FACE}" * 1750)  # 7,000 tokens of scene
    for stream_format in ("audio", "sse"):
        response = client.post("/v1/audio/speech", json={**body, "stream_format": stream_format})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "instructions", response.text[:300]
        assert error["code"] == "context_length_exceeded" and error["message"].endswith(
            "shorten the instructions"
        )
    assert spy["stream"] == []  # no piece was given to the engine
    # Instructions too long for even the first piece: the same answer (speech has no max_tokens to blame).
    response = client.post(
        "/v1/audio/speech", json=speech(client, "Hi.", instructions="\N{GRINNING FACE}" * 4096)
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "instructions"
    # Without them, the same text is spoken whole.
    assert len(pcm(client.post("/v1/audio/speech", json=speech(client, text)).content)) > 0


def test_joiner_keeps_the_length_and_fades_the_joins():
    joiner = Joiner(4)
    out = []
    for k, piece in enumerate([np.ones(10, np.float32), np.ones(3, np.float32), np.ones(6, np.float32)]):
        joiner.start(fade_in=k > 0, fade_out=k < 2)
        out.append(joiner.feed(piece[:2]))
        out.append(joiner.feed(piece[2:]))
        out.append(joiner.end(fade_out=k < 2))
    signal = np.concatenate(out)
    assert len(signal) == 19
    assert np.all(signal[:6] == 1) and signal[9] < 0.1  # the first piece fades out at its end
    assert signal[10] < 0.2 and np.all(signal[-2:] == 1)  # the next fades in; the last is not faded out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


@dataclass
class Peak:
    """How far memory rose above its level before an action, at its peak: ``arrays`` counts what Python
    and numpy allocate (exact, through tracemalloc: waveforms, encoded bytes, lists of pieces), ``resident``
    the whole process (torch's buffers too, but only coarsely: two threads' passing buffers meet at
    random moments and the allocator keeps what it freed, so it moves by tens of MB between equal runs)."""

    arrays: int
    resident: int


def peak_growth(action) -> Peak:
    tracemalloc.start()
    try:
        before, resident = tracemalloc.get_traced_memory()[0], _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
        action()
        return Peak(tracemalloc.get_traced_memory()[1] - before, _status_bytes("VmHWM") - resident)
    finally:
        tracemalloc.stop()


def test_a_five_minute_answer_is_made_in_bounded_memory(long_app):
    """Peak memory of a non-streamed 5-minute answer, against that of a 4-second one: only the encoded
    answer may grow (an mp3 of 5 minutes is a few MB, twice that as base64 in JSON; the whole waveform in
    float32 alone would be 29 MB), and nothing may decode it in one codec call (that takes gigabytes)."""

    def answer(frames: int) -> float:
        body = chat(SHORT, max_tokens=frames + 9)
        body["audio"]["format"] = "mp3"
        response = long_app.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        data = base64.b64decode(response.json()["choices"][0]["message"]["audio"]["data"])
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            return sum(f.samples for f in container.decode(stream)) / stream.rate

    seconds = {"warm-up": answer(100)}  # the first answer of a kind allocates what later ones reuse
    short = peak_growth(lambda: seconds.update(short=answer(100)))
    long = peak_growth(lambda: seconds.update(long=answer(7500)))
    assert seconds["short"] == pytest.approx(4.0, abs=0.1) and seconds["long"] == pytest.approx(300, abs=0.2)
    assert long.arrays - short.arrays < 20 * 2**20, (short, long)  # 12 MB measured
    assert long.resident - short.resident < 512 * 2**20, (short, long)


def test_other_requests_are_served_between_the_pieces(long_app, spy):
    """A short request sent while a long text is spoken is answered before the long one ends."""
    import threading

    text = TEXT[: TEXT.index(".", 1200) + 1]  # five pieces or so
    first_audio, finished = threading.Event(), threading.Event()

    def long_request() -> None:
        with long_app.stream("POST", "/v1/audio/speech", json=speech(long_app, text)) as response:
            for chunk in response.iter_bytes():
                if chunk:
                    first_audio.set()
        finished.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        assert first_audio.wait(timeout=600)
        response = long_app.post("/v1/chat/completions", json=chat(SHORT, max_tokens=10))
        assert response.status_code == 200
        served_while_long_ran = not finished.is_set()
    finally:
        worker.join(timeout=600)
    assert served_while_long_ran
    pieces = [r.turns[-1].text for r in spy["stream"]]
    assert SHORT in pieces and 0 < pieces.index(SHORT) < len(pieces) - 1  # between two pieces of the long one


@pytest.mark.parametrize("lead", [None, 0.0], ids=["little audio in hand", "enough audio in hand"])
def test_under_load_a_long_text_keeps_its_slot_from_piece_to_piece(long_app, engine, monkeypatch, lead):
    """With every slot taken and a request waiting, each piece of a long text keeps its slot for the next
    while its listener has little audio in hand (``KEEP_SLOT_LEAD``, 4 s; here at most 3.8 s were sent
    before the last piece): the pieces run back to back and the waiting request after them, and every piece
    is spoken whole. (Were the slot given to the line between two pieces, the listener would hear a gap as
    long as that request.) A listener with enough audio in hand (here a lead of 0) lets the waiting request
    go first: long texts do not hold new requests back for their whole length."""
    import threading
    import time

    import engine as engine_module
    import longform

    if lead is not None:
        monkeypatch.setattr(longform, "KEEP_SLOT_LEAD", lead)
    monkeypatch.setattr(engine, "slots", 1)
    monkeypatch.setattr(engine_module, "HOLD_SECONDS", 30.0)  # whatever the machine's speed
    text = TEXT[: TEXT.index(".", 800) + 1]
    pieces = pieces_of(long_app, text)
    assert len(pieces) == 4
    admitted: list[str] = []  # the text each admitted generation speaks, in order
    short_waits = threading.Event()
    real_start, real_complete = engine._start, engine._complete

    def start(job, slot: int) -> None:
        admitted.append(job.request.turns[-1].text)
        real_start(job, slot)

    def complete(job, reason) -> None:
        if len(admitted) == 1:  # the first piece ends only once the short request waits for a slot
            assert short_waits.wait(timeout=120)
        real_complete(job, reason)

    monkeypatch.setattr(engine, "_start", start)
    monkeypatch.setattr(engine, "_complete", complete)
    answers = {}

    def send(name: str, path: str, body: dict) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.update({name: long_app.post(path, json=body)}))
        thread.start()
        return thread

    threads = [send("long", "/v1/audio/speech", speech(long_app, text))]
    deadline = time.monotonic() + 120
    while not admitted and time.monotonic() < deadline:
        time.sleep(0.01)
    threads.append(send("short", "/v1/chat/completions", chat(SHORT, max_tokens=10)))
    while engine.stats().waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    short_waits.set()
    for thread in threads:
        thread.join(timeout=600)
    assert answers["long"].status_code == answers["short"].status_code == 200
    assert admitted == ([*pieces, SHORT] if lead is None else [pieces[0], SHORT, *pieces[1:]])
    assert len(pcm(answers["long"].content)) == sum(expected_samples(long_app, text)[1])


class _ScriptedEngine:
    """A stand-in engine for the long-form loop alone: each generation is one frame of ones; it refuses a
    prompt with more than ``max_context_pieces`` context pieces and is busy for the first ``busy`` tries of
    every later piece."""

    sample_rate = 24000

    def __init__(self, max_context_pieces: int = 8, busy: int = 0):
        self.max_context_pieces, self.busy = max_context_pieces, busy
        self.requests, self.refused = [], 0

    async def stream(self, request):
        from generation import AudioCodes, ContextLengthError, EngineBusy, Started

        context = sum(1 for t in request.turns if t.audio is not None)
        if context > self.max_context_pieces:
            raise ContextLengthError("too long")
        if len(self.requests) > 0 and self.refused < self.busy:
            self.refused += 1
            raise EngineBusy("busy")
        self.requests.append(request)
        yield Started(10, 0)
        yield AudioPiece(np.ones(960, np.float32))
        codes = AudioCodes(torch.full((8, 1), len(self.requests)))
        yield GenerationResult("", None, "stop", 10, 0, 5, 5, 0.0, 0.04, codes=codes)

    async def check_context(self, request) -> None:
        """Every piece fits when alone."""

    def release_slot(self, request) -> None:
        """No slot is kept."""


def _speak_all(engine, pieces: list[str]) -> list:
    import asyncio

    from generation import GenerationRequest, Turn
    from longform import script_for, speak

    turns = [Turn("system", "scene"), Turn("user", " ".join(pieces))]
    template = GenerationRequest(turns, True, 50, 0.7, 0.9)
    script = script_for(template, pieces, [50] * len(pieces), None, context_pieces=2)

    async def run():
        return [event async for event in speak(engine, script, join_ms=1.0)]

    return asyncio.run(run())


def test_a_later_piece_too_long_for_the_context_drops_its_oldest_context():
    engine = _ScriptedEngine(max_context_pieces=1)
    events = _speak_all(engine, ["One.", "Two.", "Three."])
    assert [len([t for t in r.turns if t.audio is not None]) for r in engine.requests] == [0, 1, 1]
    assert engine.requests[2].turns[1].text == "Two."  # the older piece went, the newer one stayed
    result = events[-1]
    assert result.finish_reason == "stop" and result.completion_tokens == 15 and result.prompt_tokens == 30
    assert sum(len(e.samples) for e in events if isinstance(e, AudioPiece)) == 3 * 960


def test_a_later_piece_waits_out_a_full_queue():
    engine = _ScriptedEngine(busy=3)
    events = _speak_all(engine, ["One.", "Two."])
    assert engine.refused == 3 and len(engine.requests) == 2
    assert events[-1].finish_reason == "stop"
