"""Voice cloning through /v1/chat/completions, against the tiny real engine and real speech recognition."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FIXTURES, TEST_AUDIO, b64, chat_audio, transcripts, unheard_gain, wav_b64

FEMALE = FIXTURES / "speech_female.wav"


def owner_request(reference_b64: str, text: str = "Say this in my voice: Hello world", **audio_extra) -> dict:
    """The owner's request, exactly as specified (plus the tiny engine's small max_tokens and a seed)."""
    return {
        "model": "gpt-4o-audio-preview",
        "modalities": ["text", "audio"],
        "audio": {"voice": "clone", "format": "wav"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": reference_b64, "format": "wav", **audio_extra},
                    },
                ],
            }
        ],
        "max_tokens": 30,
        "seed": 42,
    }


def audio_of(response) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(chat_audio(response.json())))


def test_owner_request_returns_decodable_wav_in_the_cloned_voice(client):
    response = client.post("/v1/chat/completions", json=owner_request(b64(TEST_AUDIO)))
    assert response.status_code == 200, response.text
    assert response.headers["x-voice"] == "clone"
    assert "x-voice-fallback" not in response.headers
    samples, rate = audio_of(response)
    assert rate == 24000 and len(samples) > 0
    assert (
        response.json()["choices"][0]["message"]["audio"]["transcript"] == "Say this in my voice: Hello world"
    )


def test_owner_request_through_the_openai_sdk(openai_client):
    body = owner_request(b64(TEST_AUDIO))
    completion = openai_client.chat.completions.create(**body)
    samples, rate = sf.read(io.BytesIO(base64.b64decode(completion.choices[0].message.audio.data)))
    assert rate == 24000 and len(samples) > 0
    raw = openai_client.chat.completions.with_raw_response.create(**body)
    assert raw.headers["x-voice"] == "clone"


def test_reference_reaches_the_model_as_about_25_tokens_a_second(client):
    info = sf.info(str(TEST_AUDIO))
    with_ref = client.post("/v1/chat/completions", json=owner_request(b64(TEST_AUDIO))).json()["usage"]
    body = owner_request(b64(TEST_AUDIO))
    body["audio"]["voice"] = "default"
    body["messages"][0]["content"] = body["messages"][0]["content"][:1]
    without = client.post("/v1/chat/completions", json=body).json()["usage"]
    audio_tokens = with_ref["prompt_tokens_details"]["audio_tokens"]
    # Leading and trailing silence is trimmed, then 25 frames a second plus the stream markers and delay.
    assert 25 * (info.duration - 1.0) <= audio_tokens <= 25 * info.duration + 12
    assert without["prompt_tokens_details"]["audio_tokens"] == 0
    assert with_ref["prompt_tokens"] >= without["prompt_tokens"] + audio_tokens
    details = with_ref["prompt_tokens_details"]
    assert details["text_tokens"] + audio_tokens == with_ref["prompt_tokens"]  # each token on one side


def test_references_change_the_audio_and_the_same_reference_repeats_it(client):
    a1, _ = audio_of(client.post("/v1/chat/completions", json=owner_request(b64(TEST_AUDIO))))
    a2, _ = audio_of(client.post("/v1/chat/completions", json=owner_request(b64(TEST_AUDIO))))
    b, _ = audio_of(client.post("/v1/chat/completions", json=owner_request(b64(FEMALE))))
    assert np.array_equal(a1, a2)
    assert not np.array_equal(a1[: len(b)], b[: len(a1)])


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_without_transcript_the_prompt_holds_the_recognised_words(client, spy):
    response = client.post("/v1/chat/completions", json=owner_request(b64(FEMALE)))
    assert response.status_code == 200
    turns = spy["generate"][0].turns
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[2].audio is not None and turns[2].audio.frames > 50
    known = words(transcripts()["speech_female.wav"])
    recognised = words(turns[1].text)
    assert len(set(known) & set(recognised)) >= 0.7 * len(set(known)), turns[1].text
    assert turns[3].text == "Say this in my voice: Hello world"


def test_a_given_transcript_is_used_as_given(client, spy):
    body = owner_request(b64(TEST_AUDIO), transcript="  Exactly   these words.  ")
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert spy["generate"][0].turns[1].text == "Exactly these words."


def test_a_repeated_reference_is_not_encoded_again(client, spy):
    body = owner_request(
        wav_b64(np.sin(np.arange(24000 * 2) / 7.0).astype(np.float32) * 0.5, 24000), transcript="a tone"
    )
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert len(spy["encode"]) == 1 and len(spy["generate"]) == 2


def test_clone_without_reference_falls_back_visibly(client, caplog):
    body = owner_request(b64(TEST_AUDIO))
    body["messages"][0]["content"] = body["messages"][0]["content"][:1]
    with caplog.at_level("WARNING"):
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-voice-fallback"].startswith("default")
    assert response.headers["x-voice"] == "default"
    assert any("falling back to the default voice" in r.message for r in caplog.records)
    assert response.json()["usage"]["prompt_tokens_details"]["audio_tokens"] == 0


def test_native_higgs_pattern_is_honoured_whatever_the_voice(client, spy):
    body = {
        "model": "higgs-audio-v2",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "messages": [
            {"role": "system", "content": "A quiet studio."},
            {"role": "user", "content": transcripts()["test_audio.wav"]},
            {
                "role": "assistant",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}}
                ],
            },
            {"role": "user", "content": "Now say this."},
        ],
        "max_tokens": 20,
        "seed": 1,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-voice"] == "native"
    turns = spy["generate"][0].turns
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert "A quiet studio." in turns[0].text and turns[2].audio is not None
    assert response.json()["usage"]["prompt_tokens_details"]["audio_tokens"] > 75


def test_a_clone_requests_other_audio_is_said_in_the_log_to_be_unused(client, spy, caplog):
    """A hostile-input trial: audio that is not base64 in an earlier assistant message was taken without a
    word when the last user message held the reference (the clone reads neither it nor its checks)."""
    body = owner_request(b64(TEST_AUDIO))
    bad = {"role": "assistant", "content": [{"type": "input_audio", "input_audio": {"data": "!!!notb64"}}]}
    body["messages"] = [{"role": "user", "content": "Hi."}, bad, *body["messages"]]
    with caplog.at_level("INFO", logger="planner"):
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["x-voice"] == "clone", response.text
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("clone: ")]
    assert said == ["clone: messages[1].content[0] not used (messages[2]'s reference is the voice)"]


def test_a_clone_reference_in_a_later_turn_is_the_voice_whatever_came_before(client, spy):
    """A conversation that already holds audio (an earlier answer by id, or Boson's assistant
    ``input_audio``): ``clone`` with a reference in the last user message clones that reference, and its
    text alone is spoken (the reference is not transcribed into it). Without a new reference, the first
    turn's reference is still the voice (it used to give way to the earlier answer's voice, with the
    reference's recognised words added to the first turn's text)."""
    first = client.post("/v1/chat/completions", json=owner_request(b64(TEST_AUDIO))).json()
    answer = {"role": "assistant", "audio": {"id": first["choices"][0]["message"]["audio"]["id"]}}
    boson = {
        "role": "assistant",
        "content": [{"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO)}}],
    }
    again = owner_request(b64(FEMALE), text="Third, cloned again.")["messages"][0]
    for earlier in (answer, boson):
        body = owner_request(b64(FEMALE))
        body["messages"] = [*owner_request(b64(TEST_AUDIO))["messages"], earlier, again]
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-voice"] == "clone" and "x-voice-fallback" not in response.headers
        assert response.json()["choices"][0]["message"]["audio"]["transcript"] == "Third, cloned again."
        turns = spy["generate"][-1].turns
        assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
        assert turns[3].text == "Third, cloned again."
        # The new reference's codes, as a request with it alone has them.
        assert client.post("/v1/chat/completions", json=owner_request(b64(FEMALE))).status_code == 200
        assert torch.equal(turns[2].audio.codes, spy["generate"][-1].turns[2].audio.codes)
    body = owner_request(b64(FEMALE))
    body["messages"] = [
        *owner_request(b64(TEST_AUDIO))["messages"],
        answer,
        {"role": "user", "content": "On."},
    ]
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["x-voice"] == "clone"
    turns = spy["generate"][-1].turns
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"] and turns[3].text == "On."
    assert turns[1].text == transcripts()["test_audio.wav"]
    assert torch.equal(turns[2].audio.codes, spy["generate"][0].turns[2].audio.codes)  # the first turn's


def test_a_reference_sent_once_is_the_voice_of_every_later_turn(client, spy, recognizer, monkeypatch):
    """A conversation sends its reference in its first user turn only (no answer ids kept, no new
    reference): ``clone`` still clones it, speaks the last user message alone, and neither recognises
    the reference again nor reads it as words. It used to fall back to the default voice."""
    first = owner_request(b64(TEST_AUDIO))
    assert client.post("/v1/chat/completions", json=first).status_code == 200
    calls = []
    real = recognizer.transcribe

    async def counting(*args, **kwargs):
        calls.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(recognizer, "transcribe", counting)
    body = {
        **first,
        "messages": [
            *first["messages"],
            {"role": "assistant", "content": "Say this in my voice: Hello world"},
            {"role": "user", "content": [{"type": "text", "text": "And now the second line."}]},
        ],
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-voice"] == "clone" and "x-voice-fallback" not in response.headers
    assert response.json()["choices"][0]["message"]["audio"]["transcript"] == "And now the second line."
    turns = spy["generate"][-1].turns
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert (turns[1].text, turns[3].text) == (transcripts()["test_audio.wav"], "And now the second line.")
    assert torch.equal(turns[2].audio.codes, spy["generate"][0].turns[2].audio.codes)
    assert calls == []  # its transcript came from the cache
    # A second reference in that earlier message is refused there, as in the last one.
    two = first["messages"][0]["content"] + first["messages"][0]["content"][1:]
    body["messages"] = [{"role": "user", "content": two}, *body["messages"][1:]]
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content[2]"


def test_a_format_name_the_api_does_not_know_says_to_leave_it_out(client):
    """An AIFF clip labelled ``aiff`` was refused with a list of names, not saying that leaving ``format``
    out works: the bytes decide, and the same clip then clones."""
    samples, rate = sf.read(TEST_AUDIO)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="AIFF")
    body = owner_request(base64.b64encode(buffer.getvalue()).decode())
    body["messages"][0]["content"][1]["input_audio"]["format"] = "aiff"
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and "leave format out" in refused.json()["error"]["message"]
    del body["messages"][0]["content"][1]["input_audio"]["format"]
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["x-voice"] == "clone"


@pytest.mark.parametrize("role", ["system", "developer"])
def test_audio_in_a_system_message_is_refused_by_name(client, spy, role):
    """A system or developer message takes text (the scene); an ``input_audio`` there was dropped without a
    word and the default voice spoke."""
    body = owner_request(b64(TEST_AUDIO))
    reference = body["messages"][0]["content"][1]
    body["messages"] = [
        {"role": role, "content": [{"type": "text", "text": "A quiet room."}, reference]},
        {"role": "user", "content": "Hello world"},
    ]
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error["param"] == "messages[0].content[1]" and f"a {role} message takes text only" in error["message"]
    )
    assert spy["generate"] == []


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(24000 * seconds), dtype=np.float32)


def tone(seconds: float) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * 200 * np.arange(int(24000 * seconds)) / 24000)).astype(np.float32)


def wav_without_a_decoder() -> str:
    """A float WAV of 16 bits: FFmpeg makes no decoder for it (a hostile-input trial: a 500 on every audio
    endpoint, with a traceback)."""
    body = b"\x10\x00" * 24000
    riff = b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, 24000, 48000, 2, 16)
    riff += b"data" + struct.pack("<I", len(body)) + body
    return base64.b64encode(b"RIFF" + struct.pack("<I", len(riff)) + riff).decode()


def header_only_wav() -> str:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, dtype=np.float32), 24000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


BAD_REFERENCES = [
    ("bad base64", "@@@not base64@@@", {}, "data", "base64"),
    (
        "not audio",
        base64.b64encode(b"hello, I am plain text and not audio at all" * 20).decode(),
        {},
        "data",
        "decoded",
    ),
    ("empty", "", {}, "data", "empty"),
    ("header only", header_only_wav(), {}, "data", ""),
    ("no decoder for its header", wav_without_a_decoder(), {}, "data", "could not be decoded as audio"),
    ("too short", wav_b64(tone(0.5), 24000), {}, "data", "too short"),
    # rounded down: 0.97 s of sound was said as "1.0 s", the least it asked for (a web page trial)
    ("just too short", wav_b64(tone(0.97), 24000), {}, "data", "too short (0.9 s of sound)"),
    ("too long", wav_b64(tone(31), 24000), {}, "data", "30"),
    ("silent", wav_b64(silence(3), 24000), {}, "data", "silent"),
    ("nan samples", wav_b64(np.full(48000, np.nan, dtype=np.float32), 24000, "FLOAT"), {}, "data", "NaN"),
    ("unknown format", wav_b64(tone(2), 24000), {"format": "midi"}, "format", "midi"),
    ("empty transcript", wav_b64(tone(2), 24000), {"transcript": "   "}, "transcript", "transcript"),
    # a trial: these were taken, the clip paired with no words
    (
        "invisible transcript",
        wav_b64(tone(2), 24000),
        {"transcript": "\u200b\u200b"},
        "transcript",
        "invisible",
    ),
    ("control transcript", wav_b64(tone(2), 24000), {"transcript": "\x01\x02"}, "transcript", "invisible"),
]


@pytest.mark.parametrize(
    ("name", "data", "extra", "field", "says"), BAD_REFERENCES, ids=[b[0] for b in BAD_REFERENCES]
)
def test_bad_references_get_a_clear_400(client, spy, name, data, extra, field, says):
    body = owner_request(data)
    body["messages"][0]["content"][1]["input_audio"].update(extra)
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == f"messages[0].content[1].input_audio.{field}"
    assert says.lower() in error["message"].lower()
    assert "/" not in error["message"].replace("a/b", "")  # no paths leak
    assert spy["generate"] == []  # refused before any generation
    ok = client.post("/v1/chat/completions", json=owner_request(b64(TEST_AUDIO), transcript="still serving"))
    assert ok.status_code == 200


def test_the_reference_limit_counts_the_sound_not_the_silence_at_its_ends(client, spy):
    """4.9 s of speech padded with silence to 32.9 s was refused as "longer than the 30 s limit": a
    recording with pauses at its ends was turned away for what trimming removes anyway. The limit is the
    sound between the silences (a clip may be twice as long in all)."""
    words = "We need to finish the report before the meeting on Friday morning."
    for sound, pad, accepted in ((25, 4, True), (31, 1, False), (20, 21, False)):
        clip = np.concatenate([silence(pad), tone(sound), silence(pad)])
        response = client.post(
            "/v1/chat/completions", json=owner_request(wav_b64(clip, 24000), transcript=words)
        )
        if accepted:
            assert response.status_code == 200, response.text
            assert spy["encode"][-1].duration == pytest.approx(sound + 0.2, abs=0.05)  # what was cloned
        else:
            assert response.status_code == 400
            message = response.json()["error"]["message"]
            trimmed = "31.2 s long once the silence at its ends is trimmed"  # 0.1 s of it kept at each end
            # Past twice the limit it is not decoded at all; the message states the limit, not that bound.
            whole = "voice reference is 62.0 s long; at most 30 s of it is taken"
            assert (trimmed in message) if sound == 31 else (whole in message), message


def test_two_references_in_one_message_are_refused(client):
    body = owner_request(b64(TEST_AUDIO))
    body["messages"][0]["content"].append(body["messages"][0]["content"][1])
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[2]"


def test_reference_without_text_to_speak_is_refused(client):
    body = owner_request(b64(TEST_AUDIO))
    body["messages"][0]["content"] = body["messages"][0]["content"][1:]
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content"


def test_data_url_and_unpadded_base64_are_accepted(client):
    data = b64(TEST_AUDIO).rstrip("=")
    body = owner_request("data:audio/wav;base64," + data, transcript="known words")
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def _hang_up_request(body: dict) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
    import httpx

    request = httpx.Request("POST", "http://testserver/v1/chat/completions", json=body)
    headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.items() if k != "host"]
    return request.url.path, headers, request.read()


def test_a_reference_whose_client_left_is_not_encoded(client, app, engine, monkeypatch):
    """The codec is busy; a clone request's reference waits for it and its client hangs up: 499, and the
    reference is never encoded (abandoned references would hold up the requests behind them)."""
    import threading

    from conftest import post_then_hang_up

    from audio import Audio, decode_audio

    blocker = Audio(np.zeros(24000, np.float32), 24000)
    busy, encoded, real = threading.Event(), [], engine.higgs.encode

    def encode(audio):
        if audio is blocker:
            busy.wait(30)  # holds the codec thread, as other streams' pieces would
        else:
            encoded.append(audio)
        return real(audio)

    monkeypatch.setattr(engine.higgs, "encode", encode)
    holding = client.portal.start_task_soon(engine.encode, blocker)
    words = transcripts()["test_audio.wav"]
    clip = decode_audio(TEST_AUDIO.read_bytes())

    def fresh() -> str:  # a reference not encoded before (codes are cached by content)
        return wav_b64(clip.samples * unheard_gain(), clip.sample_rate)

    path, headers, body = _hang_up_request(owner_request(fresh(), transcript=words))
    queued = lambda: engine._codec_queue.qsize() >= 1  # noqa: E731
    sent = client.portal.call(post_then_hang_up, app, path, headers, body, queued)
    busy.set()
    holding.result(timeout=60)
    assert sent[0]["status"] == 499
    later = client.post("/v1/chat/completions", json=owner_request(fresh(), transcript=words))
    assert later.status_code == 200
    assert len(encoded) == 1  # the later request's reference alone (the codec takes them in order)


def test_the_reference_cache_makes_a_value_once_for_callers_at_once():
    """``get_or_make``: one make for callers at the same time; a caller that is cancelled leaves the value
    to the others (and the cache), the last one stops the making; a failure is every caller's, and the
    next call tries again."""
    from voice_cloning import ReferenceCache

    async def scenario() -> None:
        cache: ReferenceCache[str] = ReferenceCache()
        made = []
        gate = asyncio.Event()

        async def make() -> str:
            made.append(1)
            await gate.wait()
            return "words"

        first = asyncio.ensure_future(cache.get_or_make("k", make))
        second = asyncio.ensure_future(cache.get_or_make("k", make))
        await asyncio.sleep(0)
        first.cancel()  # its client left
        gate.set()
        assert await second == "words" and made == [1]
        assert first.cancelled() and cache.get("k") == "words"

        gate.clear()
        alone = asyncio.ensure_future(cache.get_or_make("gone", make))
        await asyncio.sleep(0)
        alone.cancel()  # the only caller left: the making stops, nothing is kept
        await asyncio.sleep(0)
        gate.set()
        await asyncio.sleep(0)
        assert alone.cancelled() and cache.get("gone") is None and made == [1, 1]

        async def fail() -> str:
            made.append(2)
            await asyncio.sleep(0)
            raise ValueError("no speech")

        results = await asyncio.gather(
            cache.get_or_make("x", fail), cache.get_or_make("x", fail), return_exceptions=True
        )
        assert [type(r) for r in results] == [ValueError, ValueError] and made == [1, 1, 2]
        with pytest.raises(ValueError):
            await cache.get_or_make("x", fail)  # not remembered: made again
        assert made == [1, 1, 2, 2]

    asyncio.run(scenario())
