"""Speech to text through HTTP with the openai SDK: real recognition (faster-whisper tiny.en), offline."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import FIXTURES, TEST_AUDIO, b64, fixture_path, srt_times, transcripts, wav_b64, word_error_rate

CLIPS = ["test_audio.wav", "speech_female.wav"]
FORMATS = ["json", "text", "srt", "vtt", "verbose_json"]
CUE_TIME = re.compile(r"^\d\d:\d\d:\d\d[.,]\d{3} --> \d\d:\d\d:\d\d[.,]\d{3}$")


def text_of(result, fmt: str) -> str:
    """The words of a transcription response in any format."""
    if fmt in ("json", "verbose_json"):
        return result.text
    if fmt == "text":
        return result
    lines = [ln for ln in result.splitlines() if ln.strip() and ln != "WEBVTT" and not ln.strip().isdigit()]
    assert any(CUE_TIME.match(ln) for ln in lines), result
    return " ".join(ln for ln in lines if not CUE_TIME.match(ln))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("clip", CLIPS)
def test_transcription_in_every_format(openai_client, clip, fmt):
    with open(fixture_path(clip), "rb") as f:
        result = openai_client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
    assert word_error_rate(transcripts()[clip], text_of(result, fmt)) <= 0.3


def test_verbose_json_with_word_and_segment_timestamps(openai_client):
    duration = sf.info(str(TEST_AUDIO)).duration
    with open(TEST_AUDIO, "rb") as f:
        result = openai_client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",
        )
    assert result.language == "english"
    assert abs(result.duration - duration) < 0.05
    assert result.segments and all(0 <= s.start < s.end <= duration + 0.05 for s in result.segments)
    assert [w.word.lower().strip(".,") for w in result.words][:3] == ["we", "need", "to"]
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)


@pytest.mark.parametrize("field", ["timestamp_granularities[]", "timestamp_granularities"])
def test_words_only_when_asked(client, field):
    """As OpenAI's clients name the field, and without the brackets (a form written by hand)."""
    with open(TEST_AUDIO, "rb") as f:
        body = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", f, "audio/wav")},
            data={"model": "whisper-1", "response_format": "verbose_json", field: "word"},
        ).json()
    assert "words" in body and "segments" not in body


def test_both_spellings_of_the_granularities_are_both_taken(client):
    """A hostile-input trial: ``timestamp_granularities=word`` beside ``timestamp_granularities[]=segment``
    gave segments only, the word dropped without a word."""
    data = {"model": "whisper-1", "response_format": "verbose_json",
            "timestamp_granularities": "word", "timestamp_granularities[]": "segment"}  # fmt: skip
    body = client.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")}, data=data
    ).json()
    assert body["words"] and body["segments"], body


def test_prompt_and_other_containers(openai_client):
    """An mp3 of the clip (made with the service's own encoder) transcribes as well as the wav."""
    from audio import decode_audio, encode_audio

    mp3 = encode_audio(decode_audio(TEST_AUDIO.read_bytes()), "mp3")
    result = openai_client.audio.transcriptions.create(
        model="whisper-1", file=("clip.mp3", mp3, "audio/mpeg"), prompt="A note about a report."
    )
    assert word_error_rate(transcripts()["test_audio.wav"], result.text) <= 0.3


def test_translation_on_an_english_only_model_is_a_400(openai_client):
    with open(TEST_AUDIO, "rb") as f, pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.translations.create(model="whisper-1", file=f)
    assert info.value.body["param"] == "model"
    # It says how to get translation: a translation-capable model, loaded on first use.
    assert "cannot translate" in info.value.body["message"]
    assert "HIGGS_STT_TRANSLATION_MODEL" in info.value.body["message"]


def silent_flac(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), dtype=np.int16), 16000, format="FLAC")
    return buf.getvalue()


GRAIN = "timestamp_granularities[]"
BAD_UPLOADS = [
    ("empty file", {"file": ("a.wav", b"", "audio/wav")}, {}, 400, "file"),
    ("not audio", {"file": ("a.wav", b"this is not audio at all" * 50, "audio/wav")}, {}, 400, "file"),
    ("over-long", {"file": ("long.flac", silent_flac(31 * 60), "audio/flac")}, {}, 400, "file"),
    ("unknown format", None, {"response_format": "docx"}, 400, "response_format"),
    ("unknown language", None, {"language": "xx"}, 400, "language"),
    ("language the model lacks", None, {"language": "fr"}, 400, "language"),
    ("bad temperature", None, {"temperature": "7"}, 400, "temperature"),
    ("over-long prompt", None, {"prompt": "word " * 1000}, 400, "prompt"),
    ("unknown granularity", None, {"response_format": "verbose_json", GRAIN: "letter"}, 400, GRAIN),
    ("unknown granularity, no brackets", None, {"response_format": "verbose_json", GRAIN[:-2]: "x"}, 400,
     GRAIN[:-2]),
    ("missing file", {}, {}, 400, "file"),
    ("log probabilities", None, {"include[]": "logprobs"}, 400, "include[]"),  # were ignored: no logprobs
    ("unknown model", None, {"model": "whisper-9"}, 404, "model"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "files", "data", "status", "param"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS]
)
def test_bad_transcription_requests(client, name, files, data, status, param):
    if files is None:
        files = {"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")}
    response = client.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1", **data})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    if name in ("empty file", "not audio", "over-long"):
        assert error["code"] == "invalid_audio"  # as the same fault in chat and in the voice library
    ok = client.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
        data={"model": "whisper-1"},
    )
    assert ok.status_code == 200


@pytest.mark.parametrize("field", [GRAIN, GRAIN[:-2]])
def test_timestamps_asked_of_a_format_without_them_are_ignored(client, caplog, field):
    """The Vercel AI SDK sends ``timestamp_granularities[]`` with ``json`` for the gpt-4o models (its
    default options), which OpenAI answers; here it was a 400, and the SDK's transcription failed."""
    with caplog.at_level(logging.INFO, logger="routes.transcription"):
        response = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("audio.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
            data={
                "model": "gpt-4o-transcribe",
                "response_format": "json",
                "temperature": "0",
                field: "segment",
            },
        )
    assert response.status_code == 200, response.text
    assert response.json()["text"] and "segments" not in response.json()
    assert f"{field} ignored: only response_format verbose_json holds timestamps" in caplog.messages


def test_unknown_transcription_fields_are_logged_as_ignored(client, caplog):
    """As the JSON endpoints do (a field this server does not read was dropped without a word)."""
    with caplog.at_level(logging.INFO, logger="routes.transcription"):
        response = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
            data={"model": "whisper-1", "chunking_strategy": "auto"},
        )
        # a translation has no language to give (English is what comes out): said to be ignored too
        client.post(
            "/v1/audio/translations",
            files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
            data={"model": "whisper-1", "language": "fr"},
        )
    assert response.status_code == 200
    assert "ignored unknown request fields: chunking_strategy" in caplog.text
    assert "ignored unknown request fields: language" in caplog.text


def test_audio_in_a_text_only_chat_is_answered_with_its_transcript(openai_client):
    completion = openai_client.chat.completions.create(
        model="gpt-4o-audio-preview",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What does this say?"},  # the asker's, not the answer's
                    {
                        "type": "input_audio",
                        "input_audio": {"data": b64(FIXTURES / "speech_female.wav"), "format": "wav"},
                    },
                ],
            }
        ],
    )
    text = completion.choices[0].message.content
    assert "What does this say" not in text
    assert word_error_rate(transcripts()["speech_female.wav"], text) <= 0.3


def test_audio_in_a_speech_request_is_spoken_as_its_transcript(client, spy):
    seen = spy["generate"]
    body = {
        "model": "gpt-4o-audio-preview",
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "wav"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Repeat:"},
                    {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}},
                ],
            }
        ],
        "max_tokens": 10,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    spoken = seen[0].turns[-1].text
    assert spoken.startswith("Repeat:")
    assert word_error_rate(transcripts()["test_audio.wav"], spoken.removeprefix("Repeat:")) <= 0.3
    assert response.json()["choices"][0]["message"]["audio"]["transcript"] == spoken


def test_undecodable_audio_in_chat_is_a_400(client):
    body = {
        "model": "gpt-4o-audio-preview",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": wav_b64(np.zeros(0), 16000)}}],
            }
        ],
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[0].input_audio.data"


# ---- voice-activity filtering: no invented words, no references without speech


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def hum_around_silence(seconds_of_silence: float = 8.0) -> np.ndarray:
    """0.6 s of 100 Hz hum, silence, the hum again: loud enough for the reference checks, but no speech.

    Without voice-activity filtering tiny.en hears "You" in it.
    """
    hum = 0.2 * np.sin(2 * np.pi * 100 * np.arange(int(0.6 * 24000)) / 24000)
    return np.concatenate([hum, np.zeros(int(seconds_of_silence * 24000)), hum]).astype(np.float32)


@pytest.mark.parametrize("clip", ["10 s of silence", "0.1 s of speech"])
def test_silence_and_a_syllable_transcribe_to_nothing(openai_client, clip):
    """Whisper alone answers "You" and "Thank you." here (see test_stt.py)."""
    speech, rate = sf.read(TEST_AUDIO, dtype="float32")
    samples = np.zeros(10 * rate, np.float32) if clip.startswith("10") else speech[7200:9600]
    upload = ("clip.wav", wav_bytes(samples, rate), "audio/wav")
    result = openai_client.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="verbose_json"
    )
    assert (result.text, result.segments) == ("", [])
    assert abs(result.duration - len(samples) / rate) < 0.01


def test_a_clone_reference_without_speech_is_refused(client, spy):
    from test_voice_cloning import owner_request

    response = client.post("/v1/chat/completions", json=owner_request(wav_b64(hum_around_silence(), 24000)))
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].input_audio.data"
    assert error["code"] == "invalid_audio" and "no speech" in error["message"]
    assert spy["generate"] == [] and spy["encode"] == []
    # The same clip with its words given is the caller's choice, and used.
    given = owner_request(wav_b64(hum_around_silence(), 24000), transcript="Hmm.")
    assert client.post("/v1/chat/completions", json=given).status_code == 200


def test_a_voice_sample_without_speech_is_refused(client, spy):
    before = client.get("/v1/audio/voices").json()["data"]
    response = client.post(
        "/v1/audio/voices",
        data={"name": "hum"},
        files={"audio_sample": ("hum.wav", wav_bytes(hum_around_silence(), 24000), "audio/wav")},
    )
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "audio_sample" and "no speech" in error["message"]
    assert spy["encode"] == []
    assert client.get("/v1/audio/voices").json()["data"] == before


def test_a_transcription_whose_client_left_while_it_waited_is_never_run(client, app, recognizer, monkeypatch):
    """The real recognizer's one worker is busy; a request queued behind it hangs up: 499, and Whisper is
    never run for it (the HTTP-layer test shows the same with a gated fake)."""
    import threading

    import httpx
    from conftest import post_then_hang_up

    ran = []
    real = recognizer.transcriber.transcribe
    monkeypatch.setattr(recognizer.transcriber, "transcribe", lambda *a, **k: ran.append(1) or real(*a, **k))
    busy = threading.Event()
    recognizer._executor.submit(busy.wait, 30)  # holds the worker, as a long file would
    upload = httpx.Request(
        "POST", "http://testserver/v1/audio/transcriptions", data={"model": "whisper-1"},
        files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
    )  # fmt: skip
    headers = [(k.lower().encode(), v.encode()) for k, v in upload.headers.items() if k != "host"]
    queued = lambda: recognizer._executor._work_queue.qsize() >= 1  # noqa: E731
    sent = client.portal.call(post_then_hang_up, app, upload.url.path, headers, upload.read(), queued)
    busy.set()
    assert sent[0]["status"] == 499
    later = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                        files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")})  # fmt: skip
    assert later.status_code == 200 and later.json()["text"]
    assert len(ran) == 1  # the later request's only: the abandoned one never reached Whisper


def count_decoded(recognizer, monkeypatch) -> tuple[list[float], list[bool]]:
    """Where each segment Whisper gives ends (seconds), as it is decoded, and whether it decoded all."""
    decoded: list[float] = []
    finished: list[bool] = []
    model = recognizer.transcriber._model
    real = model.transcribe

    def transcribe(*args, **kwargs):
        segments, info = real(*args, **kwargs)

        def counted():
            for segment in segments:
                decoded.append(segment.end)
                yield segment
            finished.append(True)

        return counted(), info

    monkeypatch.setattr(model, "transcribe", transcribe)
    return decoded, finished


def long_speech() -> tuple[np.ndarray, int]:
    """136 s of speech (test_audio.wav and half a second of silence, 30 times)."""
    samples, rate = sf.read(str(TEST_AUDIO), dtype="float32")
    return np.tile(np.concatenate([samples, np.zeros(rate // 2, np.float32)]), 30), rate


def wait_until_recognizer_idle(recognizer) -> None:
    deadline = time.monotonic() + 300
    while recognizer._pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recognizer._pending == 0  # the job is over


def test_a_running_transcription_stops_when_its_client_leaves(client, app, recognizer, monkeypatch):
    """A long file's transcription is running when its client hangs up: 499, and Whisper stops after the
    segment it is decoding instead of transcribing the rest of the file (which kept the worker from the
    requests behind it)."""
    import httpx
    from conftest import post_then_hang_up

    decoded, finished = count_decoded(recognizer, monkeypatch)
    clip, rate = long_speech()
    buffer = io.BytesIO()
    sf.write(buffer, clip, rate, format="WAV")
    upload = httpx.Request(
        "POST", "http://testserver/v1/audio/transcriptions", data={"model": "whisper-1"},
        files={"file": ("long.wav", buffer.getvalue(), "audio/wav")},
    )  # fmt: skip
    headers = [(k.lower().encode(), v.encode()) for k, v in upload.headers.items() if k != "host"]
    body, began = upload.read(), lambda: bool(decoded)
    sent = client.portal.call(post_then_hang_up, app, upload.url.path, headers, body, began)
    assert sent[0]["status"] == 499
    wait_until_recognizer_idle(recognizer)
    assert not finished and max(decoded) < len(clip) / rate - 60, decoded  # two 30-s windows never decoded


def test_a_shutdown_ends_the_recognitions_running_and_waiting_with_a_503(recognizer):
    """An abuse trial's finding, seen again on a transcription: one running at SIGTERM got no answer (uvicorn
    cut it off at its grace's end) and kept the process up until its whole file was done (50 s for 3 min of
    speech on this CPU). ``end_running`` (the shutdown's, ``app._end_running``) stops the one running after
    its segment and the one waiting before it begins, each with ``TranscriberClosed`` (a 503, or a streamed
    answer's error event: ``errors.py``), and refuses new ones. (A worker of its own: this one stays open.)"""
    import asyncio

    from audio import Audio
    from errors import as_api_error
    from stt import AsyncTranscriber, TranscriberClosed

    heard = AsyncTranscriber(recognizer.transcriber)
    clip = Audio(*long_speech())

    async def shut_down_while_busy():
        running = asyncio.ensure_future(heard.transcribe(clip))
        waiting = asyncio.ensure_future(heard.transcribe(clip))
        streamed = asyncio.ensure_future(anext(heard.stream(clip)))  # (its first segment, or its end)
        await asyncio.sleep(1.5)  # the first is decoding its first windows, the others wait for the worker
        assert heard.pending == 3 and not running.done()
        started = time.monotonic()
        heard.end_running()
        results = await asyncio.gather(running, waiting, streamed, return_exceptions=True)
        return results, time.monotonic() - started

    try:
        results, took = asyncio.run(shut_down_while_busy())
        assert [type(r) for r in results] == [TranscriberClosed] * 3, results
        assert took < 10, took  # (the whole file took tens of seconds)
        error = as_api_error(results[0])
        answer = (error.status, error.body()["error"]["code"], error.headers["Retry-After"])
        assert answer == (503, "engine_closed", "5"), answer
        with pytest.raises(TranscriberClosed):
            asyncio.run(heard.transcribe(clip))
    finally:
        heard.close()


def test_a_decode_stops_when_its_client_leaves(client, app, monkeypatch):
    """A hostile-input trial: a client that gave up on a long upload (curl -m 2) left the server decoding
    it for seconds more. The decode now stops at its next block of samples."""
    import threading

    import httpx
    from conftest import post_then_hang_up

    import audio

    rate, seconds = 384_000, 600
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, 1, format="FLAC") as f:
        for _ in range(seconds):
            f.write(np.zeros(rate, np.int16))
    gathered, stopped, real = [], threading.Event(), audio._Gathered.add

    def add(self, samples, sample_rate):
        try:
            real(self, samples, sample_rate)
        except audio.DecodeStopped:
            stopped.set()
            raise
        gathered.append(self.total)

    monkeypatch.setattr(audio._Gathered, "add", add)
    upload = httpx.Request(
        "POST", "http://testserver/v1/audio/transcriptions", data={"model": "whisper-1"},
        files={"file": ("long.flac", buffer.getvalue(), "audio/flac")},
    )  # fmt: skip
    headers = [(k.lower().encode(), v.encode()) for k, v in upload.headers.items() if k != "host"]
    began = lambda: bool(gathered) and gathered[-1] > 5 * rate  # noqa: E731
    sent = client.portal.call(post_then_hang_up, app, upload.url.path, headers, upload.read(), began)
    assert sent[0]["status"] == 499
    assert stopped.wait(30) and gathered[-1] < seconds * rate / 4, gathered[-1] / rate


# ---- timestamps with the voice-activity filter, usage, streaming


def speech_pause_speech(pause: float) -> tuple[bytes, float, float]:
    """test_audio.wav, ``pause`` seconds of silence, speech_female.wav, as a 16 kHz WAV; and where the
    pause begins and ends (seconds)."""
    from audio import resample

    first, rate = sf.read(str(TEST_AUDIO), dtype="float32")
    first = resample(first, rate, 16000)
    second, rate = sf.read(str(FIXTURES / "speech_female.wav"), dtype="float32")
    assert rate == 16000
    samples = np.concatenate([first, np.zeros(int(pause * 16000), np.float32), second])
    return wav_bytes(samples, 16000), len(first) / 16000, len(first) / 16000 + pause


def test_timestamps_lie_on_the_speech_around_a_long_pause(openai_client):
    """The voice-activity filter cuts the 40 s pause out before Whisper hears the clip, and the times
    Whisper gives are mapped back: no segment may stretch over the pause (faster-whisper's own mapping
    started the second sentence at 4.0 s, 40 s before its words, and ended it past the end of the file),
    segments lie within the audio, SRT shows the same times, and each segment's ``seek`` is the offset of
    the window that holds it in the file (10 ms frames), as OpenAI's: seek/100 <= start < seek/100 + 30."""
    clip, pause_start, pause_end = speech_pause_speech(40)
    upload = ("pause.wav", clip, "audio/wav")
    result = openai_client.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="verbose_json"
    )
    spans = [(s.start, s.end, s.text) for s in result.segments]
    assert "report" in result.text and "park" in result.text, spans
    wrong = []  # (what is wrong, segment id): every fault at once
    for segment in result.segments:
        start, end, text = segment.start, segment.end, segment.text
        if ("report" in text or "morning" in text) and end > pause_start + 1:
            wrong.append(("ends where the next speech begins", segment.id))
        if ("park" in text or "favorite" in text) and not pause_end - 1 <= start <= pause_end + 1:
            wrong.append(("starts before its speech", segment.id))
        if end > pause_start + 1 and start < pause_end - 1:
            wrong.append(("covers the pause", segment.id))
        if not 0 <= start <= end <= result.duration:
            wrong.append(("outside the audio", segment.id))
        if not segment.seek / 100 <= start < segment.seek / 100 + 30:
            wrong.append(("seek is not its window's", segment.id))
    assert not wrong, (wrong, [(s.seek, s.start, s.end, s.text) for s in result.segments])
    srt = openai_client.audio.transcriptions.create(model="whisper-1", file=upload, response_format="srt")
    assert srt_times(srt) == [(round(s, 3), round(e, 3)) for s, e, _ in spans], srt


def test_segments_end_with_the_audio(openai_client):
    """Whisper puts the end of half a second of speech at 1.0 s: every format says 0.5 s."""
    speech, rate = sf.read(str(TEST_AUDIO), dtype="float32")
    upload = ("half.wav", wav_bytes(speech[rate // 4 : rate * 3 // 4], rate), "audio/wav")
    result = openai_client.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="verbose_json"
    )
    assert result.segments and result.duration == 0.5
    assert all(0 <= s.start <= s.end <= 0.5 for s in result.segments), result.segments
    srt = openai_client.audio.transcriptions.create(model="whisper-1", file=upload, response_format="srt")
    assert srt_times(srt) == [(s.start, s.end) for s in result.segments]


def test_usage_is_the_audio_duration_in_whole_seconds(openai_client):
    """As OpenAI reports whisper-1's: {"type": "duration", "seconds": 5} for 4.03 s of audio."""
    for fmt in ("json", "verbose_json"):
        with open(TEST_AUDIO, "rb") as f:
            result = openai_client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
        assert (result.usage.type, result.usage.seconds) == ("duration", 5), fmt


def test_vtt_escapes_ampersands(client):
    """With this prompt tiny.en writes "green & I"; WebVTT cue text must say &amp; (SRT keeps it)."""
    answers = {
        fmt: client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", (FIXTURES / "speech_female.wav").read_bytes(), "audio/wav")},
            data={
                "model": "whisper-1",
                "response_format": fmt,
                "prompt": "Salt & pepper, green & white, you & I.",
            },
        ).text
        for fmt in ("srt", "vtt")
    }
    assert "green & I" in answers["srt"], answers  # what the test relies on the model to hear
    assert "green &amp; I" in answers["vtt"] and not re.search(r"&(?!amp;|lt;)", answers["vtt"]), answers


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_two_files_are_a_400(client, path):
    """Not the last one transcribed without a word."""
    clip = TEST_AUDIO.read_bytes()
    response = client.post(
        path,
        files=[("file", ("a.wav", clip, "audio/wav")), ("file", ("b.wav", clip, "audio/wav"))],
        data={"model": "whisper-1"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "file" and "one file" in error["message"]


def test_streamed_transcription_through_the_sdk(openai_client, client):
    """OpenAI's transcript.text.delta events, one per segment as it is recognised, then
    transcript.text.done: the deltas joined are its text, and the unstreamed answer's."""
    clip, _, _ = speech_pause_speech(40)  # two sentences: two segments
    upload = ("pause.wav", clip, "audio/wav")
    events = list(
        openai_client.audio.transcriptions.create(model="gpt-4o-transcribe", file=upload, stream=True)
    )
    types = [e.type for e in events]
    assert types[-1] == "transcript.text.done" and types[:-1] == ["transcript.text.delta"] * (len(types) - 1)
    assert len(types) >= 3, events
    streamed = "".join(e.delta for e in events[:-1])
    assert streamed == events[-1].text
    assert streamed == openai_client.audio.transcriptions.create(model="gpt-4o-transcribe", file=upload).text
    # The text format streams the same events; whisper-1 ignores stream (as OpenAI's does).
    form = {"model": "gpt-4o-transcribe", "stream": "true", "response_format": "text"}
    text = client.post("/v1/audio/transcriptions", files={"file": upload}, data=form)
    assert text.headers["content-type"].startswith("text/event-stream")
    assert text.text.rstrip("\n").split("\n\n")[-1] == "data: " + json.dumps(
        {"type": "transcript.text.done", "text": streamed}, separators=(",", ":")
    )
    plain = client.post("/v1/audio/transcriptions", files={"file": upload},
                        data={"model": "whisper-1", "stream": "true"})  # fmt: skip
    assert plain.headers["content-type"] == "application/json" and plain.json()["text"] == streamed


def test_a_streamed_transcription_takes_text_formats_only(client):
    response = client.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
        data={"model": "gpt-4o-transcribe", "stream": "true", "response_format": "srt"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_a_streamed_transcription_stops_when_its_client_leaves(client, app, recognizer, monkeypatch):
    """The client hangs up after the first delta: Whisper stops after the segment it is decoding instead
    of transcribing the rest of the file."""
    import httpx
    from conftest import post_then_hang_up

    decoded, finished = count_decoded(recognizer, monkeypatch)
    clip, rate = long_speech()
    upload = httpx.Request(
        "POST", "http://testserver/v1/audio/transcriptions",
        data={"model": "gpt-4o-transcribe", "stream": "true"},
        files={"file": ("long.wav", wav_bytes(clip, rate), "audio/wav")},
    )  # fmt: skip
    headers = [(k.lower().encode(), v.encode()) for k, v in upload.headers.items() if k != "host"]
    sent: list = []
    delta = lambda: any(b"transcript.text.delta" in m.get("body", b"") for m in sent)  # noqa: E731
    client.portal.call(post_then_hang_up, app, upload.url.path, headers, upload.read(), delta, sent)
    assert sent[0]["status"] == 200 and delta()
    assert not any(b"transcript.text.done" in m.get("body", b"") for m in sent)
    wait_until_recognizer_idle(recognizer)
    assert not finished and max(decoded) < len(clip) / rate - 60, decoded  # two 30-s windows never decoded


def test_a_full_recognition_queue_is_a_429_before_the_upload_is_decoded(client, recognizer, monkeypatch):
    """A security review: with the recognizer's queue full, each request still read and decoded its upload
    (up to 30 minutes of audio) before the queue refused it."""
    import routes.transcription

    decoded = []
    real = routes.transcription.decode_audio
    monkeypatch.setattr(
        routes.transcription, "decode_audio", lambda *a, **k: decoded.append(1) or real(*a, **k)
    )
    monkeypatch.setattr(recognizer, "_pending", recognizer.max_pending)  # as when that many run or wait
    files = {"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")}
    busy = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files)
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full", busy.text
    assert busy.headers["retry-after"] and decoded == []
    # So is a clip sent to chat for its words.
    import voice_cloning

    monkeypatch.setattr(voice_cloning, "decode_audio", lambda *a, **k: decoded.append(2) or real(*a, **k))
    clip = {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}}
    words = {"model": "tts-1", "messages": [{"role": "user", "content": [clip]}]}
    refused = client.post("/v1/chat/completions", json=words)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full", refused.text
    assert decoded == []
    monkeypatch.setattr(recognizer, "_pending", 0)
    transcribed = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files=files)
    assert transcribed.status_code == 200
    assert client.post("/v1/chat/completions", json=words).status_code == 200
    assert decoded == [1, 2]
