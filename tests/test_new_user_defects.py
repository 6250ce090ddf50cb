"""Defects found by trying the service as a new user would (issue 14), each reproduced through HTTP.

Items about speech recognition (15, 19, 23, 24) and the engine (1, 22) are tested beside their modules.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import soundfile as sf
import torch
from conftest import TEST_AUDIO, b64, transcripts, unheard_gain, wav_b64
from fastapi.testclient import TestClient
from live_server import start_process, tiny_process_settings

from app import create_app

SPEAK = [{"role": "user", "content": "Hello there."}]
CHAT = {"model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
        "messages": SPEAK, "max_tokens": 8, "seed": 1}  # fmt: skip
WAV = TEST_AUDIO.read_bytes()
WORDS = transcripts()["test_audio.wav"]


def clone_chat(text: str, data: str) -> dict:
    """A chat request that clones the base64 clip ``data`` to say ``text``."""
    reference = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, reference]}]
    return {**CHAT, "audio": {"voice": "clone", "format": "wav"}, "messages": messages}


def upload(client, name: str, transcript: str | None = WORDS):
    data = {"name": name} if transcript is None else {"name": name, "transcript": transcript}
    return client.post("/v1/audio/voices", data=data, files={"audio_sample": ("a.wav", WAV, "audio/wav")})


# ---- 500s and wrong states ----


def test_2_health_answers_while_the_model_loads_and_ready_follows(settings, monkeypatch, tmp_path):
    import app as app_module

    release = threading.Event()
    loaded = []

    def slow_engine(_settings):
        release.wait(30)
        loaded.append(True)
        raise RuntimeError("stop here: only the start-up order is under test")

    monkeypatch.setattr(app_module, "load_engine", slow_engine, raising=False)
    import engine as engine_module

    monkeypatch.setattr(engine_module, "load_engine", slow_engine, raising=False)
    app = create_app(settings.model_copy(update={"voices_dir": tmp_path / "v", "stt_model": ""}))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
        busy = client.post("/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503 and busy.headers["retry-after"]
        release.set()
        deadline = time.monotonic() + 20
        while not loaded and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        failed = client.get("/ready")
        # A load that failed is for good: not ready, and not alive either, so that an orchestrator restarts.
        assert failed.status_code == 503
        assert failed.json()["reason"].startswith("loading failed (RuntimeError)")
        # The probes answer without the API key: the error's message (a local path, say) is for the log.
        assert "stop here" not in failed.text
        assert client.get("/health").status_code == 503 and "stop here" not in client.get("/health").text
        # And the API does not say "still loading, retry" for good (an operator's trial): no retries.
        refused = client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "load_failed"
        assert "retry-after" not in refused.headers and refused.headers["x-should-retry"] == "false"


def test_3_names_that_look_like_ids_are_refused(isolated):
    with isolated() as client:
        refused = upload(client, "voice_abc")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "name"
        assert "voice_" in refused.json()["error"]["message"]


def test_4_a_full_library_is_checked_before_making_a_builtin_voice(isolated, spy):
    with isolated(max_voices=1) as client:
        assert upload(client, "first").status_code == 200
        before = len(spy["generate"])
        body = {"model": "tts-1", "input": "Hi.", "voice": "nova", "response_format": "wav"}
        full = client.post("/v1/audio/speech", json=body)
        assert full.status_code == 413, full.text
        error = full.json()["error"]
        assert error["code"] == "voice_quota_exceeded" and error["param"] == "voice"
        assert "delete" in error["message"]
        assert len(spy["generate"]) == before  # no generation was wasted


def test_hand_placed_voices_differing_only_in_case_are_one_voice_through_http(isolated):
    import shutil

    with isolated(stt_model="") as client:
        folder = client.app.state.settings.voices_dir
        for name in ("Twin", "twin"):
            shutil.copy(TEST_AUDIO, folder / f"{name}.wav")
            (folder / f"{name}.txt").write_text(f"{WORDS} ({name})")
        listed = client.get("/v1/audio/voices").json()["data"]
        assert [v["name"] for v in listed if v["name"].lower() == "twin"] == ["Twin"]
        assert client.get("/v1/audio/voices/twin").json()["transcript"].endswith("(Twin)")
        body = {"model": "tts-1", "input": "Hi.", "voice": "twin", "response_format": "pcm"}
        spoken = client.post("/v1/audio/speech", json=body)
        assert spoken.status_code == 200 and spoken.headers["x-voice"] == "Twin"


def test_5_deleting_a_hand_placed_voice_during_its_first_encoding_is_never_a_500(
    isolated, engine, monkeypatch, tmp_path
):
    with isolated() as client:
        folder = tmp_path / "voices"
        shutil.copy(TEST_AUDIO, folder / "handmade.wav")
        (folder / "handmade.txt").write_text(WORDS)
        real_encode = engine.encode

        async def encode_then_lose_the_file(audio):
            codes = await real_encode(audio)
            for path in folder.glob("handmade.*"):
                path.unlink()
            return codes

        monkeypatch.setattr(engine, "encode", encode_then_lose_the_file)
        body = {"model": "tts-1", "input": "Hi.", "voice": "handmade", "response_format": "wav"}
        answer = client.post("/v1/audio/speech", json=body)
        assert answer.status_code in (200, 404), answer.text


def test_6_unexpected_failures_carry_the_request_id_and_are_counted(client, engine, monkeypatch, caplog):
    async def explode(request):
        raise KeyError("something internal")

    def explode_stream(request):
        raise KeyError("something internal")

    monkeypatch.setattr(engine, "generate", explode)
    monkeypatch.setattr(engine, "stream", explode_stream)
    with caplog.at_level(logging.ERROR):
        answer = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "req-500-check"})
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
    assert answer.headers["x-request-id"] == "req-500-check"
    assert any(getattr(r, "higgs_request_id", None) == "req-500-check" for r in caplog.records)
    metrics = client.get("/metrics").text
    assert 'higgs_requests_total{route="/v1/chat/completions",status="500"}' in metrics


def test_7_a_text_chat_whose_user_message_has_no_content_is_a_400(client):
    body = {"model": "tts-1", "messages": [{"role": "user"}], "max_tokens": 4}
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages[0].content"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "10"), ("seed", "3"), ("temperature", "0.5"), ("stream", "true"), ("n", 1.0)],
)
def test_8_types_are_strict_as_openai_s(client, field, value):
    answer = client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == field


def test_8_integers_are_still_fine_where_a_number_is_expected(client):
    assert client.post("/v1/chat/completions", json={**CHAT, "temperature": 1, "top_p": 1}).status_code == 200


# ---- compatibility with real clients ----


def test_9_cors_preflight_of_the_openai_node_sdk_is_allowed(isolated):
    with isolated(cors_origins=["https://app.example"]) as client:
        preflight = client.options(
            "/v1/audio/speech",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-stainless-arch,"
                "x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-retry-count,"
                "x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_10_voice_list_has_the_voices_field_other_clients_read(isolated):
    with isolated() as client:
        assert upload(client, "lister").status_code == 200
        listing = client.get("/v1/audio/voices").json()
        assert [v["name"] for v in listing["data"]] == ["lister"]
        names = {v["id"]: v["name"] for v in listing["voices"]}
        assert names["lister"] == "lister"  # usable as `voice` directly
        for builtin in ("alloy", "nova", "default"):
            assert names[builtin] == builtin
        # An OpenAI name stored in another case is listed once, as stored (a trial: "Nova" and "nova").
        assert upload(client, "Nova").status_code == 200
        listed = [v["name"] for v in client.get("/v1/audio/voices").json()["voices"]]
        assert "Nova" in listed and "nova" not in listed
        unknown = client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "nobody"})
        assert (
            "Nova, " in unknown.json()["error"]["message"]
            and "nova" not in unknown.json()["error"]["message"]
        )


@pytest.mark.parametrize(
    "model",
    [
        "gpt-audio",
        "gpt-audio-mini",
        "gpt-4o-audio-preview-2025-06-03",
        "bosonai/higgs-audio-v2-generation-3B-base",
        "higgs-audio-v2-generation-3B-base",
    ],
)
def test_11_chat_model_names_in_use_today(openai_client, model):
    completion = openai_client.chat.completions.create(
        model=model, modalities=["text", "audio"], audio={"voice": "default", "format": "wav"},
        messages=SPEAK, max_tokens=8,
    )  # fmt: skip
    assert completion.choices[0].message.audio.data


@pytest.mark.parametrize(
    "model", ["gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15", "tts-1-1106", "tts-1-hd-1106"]
)
def test_11_dated_speech_models(openai_client, model):
    audio = openai_client.audio.speech.create(
        model=model, voice="default", input="Hi.", response_format="pcm"
    )
    assert len(audio.content) > 0


@pytest.mark.parametrize(
    "model", ["gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-mini-transcribe-2025-03-20"]
)
def test_11_transcription_model_names(openai_client, model):
    with open(TEST_AUDIO, "rb") as f:
        assert openai_client.audio.transcriptions.create(model=model, file=f).text


def test_11_unknown_names_are_still_404(client):
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-audio-9000x"}).status_code == 404
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "tts-9-1106"}).status_code == 404


def test_12_chat_voice_by_id(isolated):
    with isolated() as client:
        voice = upload(client, "byid").json()
        answer = client.post("/v1/chat/completions", json={**CHAT, "audio": {"voice": {"id": voice["id"]}}})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-voice"] == "byid"


def test_13_a_boson_style_system_prompt_is_used_as_it_is(client, spy):
    system = (
        "Generate audio following instruction.\n\n<|scene_desc_start|>\nA windy beach.\n<|scene_desc_end|>"
    )
    body = {**CHAT, "messages": [{"role": "system", "content": system}, *SPEAK]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    turns = spy["generate"][-1].turns
    assert turns[0].role == "system" and turns[0].text == system


def test_14_an_earlier_audio_answer_is_context_in_a_later_request(client, spy):
    longer = {**CHAT, "max_tokens": 24}
    first = client.post("/v1/chat/completions", json=longer).json()["choices"][0]["message"]["audio"]
    later = [*SPEAK, {"role": "assistant", "audio": {"id": first["id"]}}, SPEAK[0]]
    # Text: the answer's transcript stands for it.
    text_only = {"model": "tts-1", "messages": later, "max_tokens": 4}
    assert client.post("/v1/chat/completions", json=text_only).status_code == 200
    assert [t.text for t in spy["generate"][-1].turns if t.role == "assistant"] == [first["transcript"]]
    # Audio: the answer's own audio is in context (the native pattern), so the voice carries on.
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": later}).status_code == 200
    turns = spy["generate"][-1].turns
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[2].audio is not None and turns[2].audio.frames > 0


def test_14_a_named_voice_speaks_from_its_own_clip_in_a_later_turn(isolated, spy):
    """After an earlier audio answer (by id), a stored voice is that voice, not the earlier answer's: the
    same voice on every request, whatever the conversation holds."""
    with isolated() as client:
        assert upload(client, "narrator").status_code == 200
        first = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 24}).json()
        answer = {"role": "assistant", "audio": {"id": first["choices"][0]["message"]["audio"]["id"]}}
        body = {
            **CHAT,
            "audio": {"voice": "narrator", "format": "wav"},
            "messages": [*SPEAK, answer, SPEAK[0]],
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200 and response.headers["x-voice"] == "narrator"
        turns = spy["generate"][-1].turns
        alone = client.post("/v1/chat/completions", json={**body, "messages": SPEAK})
        assert alone.status_code == 200
        assert [(t.role, t.text) for t in turns] == [(t.role, t.text) for t in spy["generate"][-1].turns]


def test_14_an_unknown_audio_id_is_a_400_naming_it_unless_the_message_has_words(client, spy, caplog):
    """An id this server does not hold (forgotten, or never its own) was ignored without a word to the
    client: the answer came in the default voice, its fallback header saying there was no reference. It
    is a 400 naming the id; an assistant message that also has text is that text."""
    gone = {"role": "assistant", "audio": {"id": "audio_gone"}}
    clone = clone_chat("Hello there.", b64(TEST_AUDIO))
    (cloned,) = clone["messages"]
    for body in (
        {**CHAT, "messages": [*SPEAK, gone, SPEAK[0]]},
        {"model": "tts-1", "messages": [*SPEAK, gone, SPEAK[0]]},
        # a clone too (a trial: it was a 200, the id unchecked), its reference here or in an earlier turn
        {**clone, "messages": [*SPEAK, gone, cloned]},
        {**clone, "messages": [cloned, gone, SPEAK[0]]},
    ):
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("messages[1].audio.id", "audio_not_found")
        assert "'audio_gone'" in error["message"] and "expires_at" in error["message"]
    assert spy["generate"] == []
    worded = {**gone, "content": "Hi, how can I help?"}
    with caplog.at_level(logging.INFO):
        response = client.post("/v1/chat/completions", json={**CHAT, "messages": [*SPEAK, worded, SPEAK[0]]})
        assert response.status_code == 200 and response.headers["x-voice"] == "default"
        text = {"model": "tts-1", "messages": [*SPEAK, worded, SPEAK[0]], "max_tokens": 4}
        assert client.post("/v1/chat/completions", json=text).status_code == 200
    assert any("audio_gone" in r.getMessage() for r in caplog.records)
    assert ("assistant", "Hi, how can I help?") in [(t.role, t.text) for t in spy["generate"][-1].turns]


# ---- a cloning developer's trial (trial 31) ----


def test_an_audio_object_without_modalities_asks_for_audio(client, openai_client):
    """``audio`` with no ``modalities`` was answered with text (for a clone request, the reference's
    recognised words) and a 200; what the client means by a voice and format is audio. Modalities that
    say text only still get text."""
    body = {k: v for k, v in CHAT.items() if k != "modalities"}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["x-voice"] == "default"
    assert response.json()["choices"][0]["message"]["audio"]["data"]
    text = client.post("/v1/chat/completions", json={**body, "modalities": ["text"]})
    assert text.status_code == 200 and text.json()["choices"][0]["message"]["audio"] is None
    assert "x-voice" not in text.headers
    # The SDK, as the trial called it: no modalities, a voice and a format.
    completion = openai_client.chat.completions.create(
        model="tts-1", audio={"voice": "default", "format": "wav"}, max_tokens=8, seed=1,
        messages=[{"role": "user", "content": "Hello there."}],
    )  # fmt: skip
    assert completion.choices[0].message.audio.data and completion.choices[0].message.audio.id


def test_an_audio_answer_is_kept_until_its_expiry_and_no_longer(client, spy, monkeypatch, caplog):
    """Answers were kept as the latest 256, so a busy server forgot an id within seconds of its
    ``expires_at`` promising an hour. Now: until its expiry, as many as ``capacity`` (the oldest goes
    first, logged), and its codes come back as they were given."""
    import planner as planner_module

    answers = client.app.state.planner.answers
    clock = [1000.0]
    monkeypatch.setattr(answers, "clock", lambda: clock[0])
    monkeypatch.setattr(answers, "capacity", 2)
    first = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 12}).json()
    audio = first["choices"][0]["message"]["audio"]
    assert audio["expires_at"] - first["created"] == planner_module.AUDIO_LIFETIME_SECONDS
    later = {**CHAT, "messages": [*SPEAK, {"role": "assistant", "audio": {"id": audio["id"]}}, SPEAK[0]]}
    kept = answers.get(audio["id"]).codes.codes
    assert kept.dtype == torch.long and kept.shape[1] > 0
    clock[0] += planner_module.AUDIO_LIFETIME_SECONDS - 1
    assert client.post("/v1/chat/completions", json=later).status_code == 200
    assert torch.equal(spy["generate"][-1].turns[2].audio.codes, kept)
    clock[0] += 1
    assert client.post("/v1/chat/completions", json=later).status_code == 400  # expired
    ids = [
        client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["audio"]["id"]
        for _ in range(2)
    ]
    with caplog.at_level(logging.WARNING):
        client.post("/v1/chat/completions", json=CHAT)  # a third: the oldest unexpired goes
    assert answers.get(ids[0]) is None and answers.get(ids[1]) is not None
    assert any(ids[0] in r.getMessage() and "before its expiry" in r.getMessage() for r in caplog.records)


def test_a_voice_of_another_type_than_an_audio_sample_is_refused_by_name(isolated):
    """``type=prompt`` (the openai SDK's other kind of voice) was stored as an audio sample voice when a
    clip came along, and without one got "this field is required" for ``audio_sample`` alone."""
    with isolated() as client:
        prompt = client.post(
            "/v1/audio/voices", data={"name": "p", "type": "prompt", "prompt": "A calm voice."}
        )
        assert prompt.status_code == 400
        error = prompt.json()["error"]
        assert error["param"] == "type" and "audio sample only" in error["message"]
        files = {"audio_sample": ("a.wav", WAV, "audio/wav")}
        mixed = client.post(
            "/v1/audio/voices", data={"name": "p", "type": "prompt", "transcript": WORDS}, files=files
        )
        assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "type"
        missing = client.post("/v1/audio/voices", data={"name": "p"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "audio_sample"
        # A name left blank is named too (the web page showed "this field is required", naming nothing).
        unnamed = client.post("/v1/audio/voices", data={"name": ""}, files=files).json()["error"]
        assert unnamed["param"] == "name" and unnamed["message"] == "name is required", unnamed
        typed = client.post(
            "/v1/audio/voices", data={"name": "p", "type": "audio_sample", "transcript": WORDS}, files=files
        )
        assert typed.status_code == 200, typed.text
        assert client.get("/v1/audio/voices").json()["data"][0]["name"] == "p"


# ---- quality of service ----


def test_16_a_clone_reference_is_recognised_once(client, recognizer, monkeypatch):
    calls = []
    real = recognizer.transcribe

    async def counting(*args, **kwargs):
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(recognizer, "transcribe", counting)
    body = clone_chat("Once, twice.", b64(TEST_AUDIO))
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert len(calls) <= 1  # at most the first use (an earlier test may already have cached it)


def test_a_clone_reference_sent_twice_at_once_is_recognised_and_encoded_once(
    client, recognizer, spy, monkeypatch
):
    """A trial: two requests at the same moment with the same new clip (an app speaking a text's sentences
    in parallel) each ran Whisper and the tokenizer. The second now waits for the first's. Recognition is
    held back 2 s here, so that the two requests are surely in flight together."""
    calls = []
    real = recognizer.transcribe

    async def slow(*args, **kwargs):
        calls.append(1)
        await asyncio.sleep(2)
        return await real(*args, **kwargs)

    monkeypatch.setattr(recognizer, "transcribe", slow)
    speech, rate = sf.read(TEST_AUDIO, dtype="float32")
    body = clone_chat("At once.", wav_b64(unheard_gain() * speech, rate))
    encodes = len(spy["encode"])
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(2)))
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert len(calls) == 1 and len(spy["encode"]) == encodes + 1


def test_17_a_transcript_is_limited_at_creation(isolated):
    with isolated() as client:
        refused = upload(client, "wordy", transcript="word " * 20_000)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "transcript"
        assert client.get("/v1/audio/voices/wordy").status_code == 404


def test_18_voice_names_are_case_insensitive_everywhere(isolated):
    with isolated() as client:
        assert upload(client, "Dupe").status_code == 200
        assert upload(client, "DUPE").status_code == 409
        assert client.get("/v1/audio/voices/DUPE").json()["name"] == "Dupe"
        body = {"model": "tts-1", "input": "Hi.", "voice": "dupe", "response_format": "wav"}
        assert client.post("/v1/audio/speech", json=body).headers["x-voice"] == "Dupe"
        assert client.delete("/v1/audio/voices/dUpE").status_code == 200
        assert client.get("/v1/audio/voices/Dupe").status_code == 404


def test_33_a_voices_folder_removed_while_serving_is_made_again(isolated, tmp_path, caplog):
    """An operator's trial: with the voices folder removed (a cleanup, a remounted volume), every upload and
    built-in voice answered 500 until a restart, while /ready said 200."""
    with isolated() as client:
        assert upload(client, "first").status_code == 200
        shutil.rmtree(tmp_path / "voices")
        assert client.get("/v1/audio/voices").json()["data"] == []
        with caplog.at_level(logging.WARNING, logger="voices"):
            assert upload(client, "second").status_code == 200, "an upload"
        assert (
            f"the voices folder {tmp_path / 'voices'} is gone; making it again" in caplog.text
        )  # (not .voices)
        assert [v["name"] for v in client.get("/v1/audio/voices").json()["data"]] == ["second"]
        shutil.rmtree(tmp_path / "voices")
        speech = {"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "wav"}
        made = client.post("/v1/audio/speech", json=speech)
        assert made.status_code == 200 and made.headers["x-voice"] == "alloy", "a built-in voice"
        assert (tmp_path / "voices" / "alloy.wav").is_file()


def test_34_concurrent_uploads_of_one_name_refuse_the_others_before_encoding(isolated, engine, monkeypatch):
    """A trial: three uploads of one name at once each checked and encoded the clip (seconds on a CPU), and
    two of them answered 409 only then; now the others are refused at once, without an encode."""
    encodes, real_encode = [], engine.encode

    async def slow_encode(audio):
        encodes.append(audio)
        await asyncio.sleep(1.0)  # the first upload holds the name while it encodes
        return await real_encode(audio)

    monkeypatch.setattr(engine, "encode", slow_encode)
    answers: list = []
    with isolated() as client:
        gate = threading.Barrier(3)

        def send():
            gate.wait()
            answers.append(upload(client, "Twin"))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(a.status_code for a in answers) == [200, 409, 409]
        assert answers[-1].status_code == 200  # the refusals came first
        assert all("being created" in a.json()["error"]["message"] for a in answers[:2])
        assert len(encodes) == 1


def test_20_making_a_builtin_voice_does_not_block_the_library(isolated, engine, monkeypatch):
    with isolated() as client:
        assert upload(client, "keeper").status_code == 200
        gate = threading.Event()
        entered = threading.Event()
        real_generate = engine.generate

        async def slow_generate(request):
            entered.set()
            await asyncio.to_thread(gate.wait, 30)
            return await real_generate(request)

        monkeypatch.setattr(engine, "generate", slow_generate)
        body = {"model": "tts-1", "input": "Hi.", "voice": "shimmer", "response_format": "wav"}
        making = threading.Thread(target=lambda: client.post("/v1/audio/speech", json=body))
        making.start()
        try:
            assert entered.wait(30)
            deleted = []
            deleter = threading.Thread(
                target=lambda: deleted.append(client.delete("/v1/audio/voices/keeper"))
            )
            deleter.start()
            deleter.join(10)
            # The delete finished while the built-in voice was still being made.
            assert deleted and deleted[0].status_code == 200
        finally:
            gate.set()
            making.join(60)


def test_21_the_documented_uvicorn_start_logs_with_request_ids():
    import os
    import subprocess
    import sys

    # What `uvicorn app:build --factory` and `uvicorn app:app` take (uvicorn's own import); nothing is
    # loaded until the server starts.
    code = (
        "import logging, sys\n"
        "from fastapi import FastAPI\n"
        "from uvicorn.importer import import_from_string\n"
        "made = import_from_string(sys.argv[1])\n"
        "made = made() if sys.argv[1] == 'app:build' else made\n"
        "root = logging.getLogger()\n"
        "formats = [h.formatter._fmt for h in root.handlers if h.formatter]\n"
        "print(isinstance(made, FastAPI), root.getEffectiveLevel() <= logging.INFO,\n"
        "      any('request_id' in f for f in formats))\n"
    )
    env = {**os.environ, "HIGGS_DEVICE": "cpu"}  # (without CUDA, build() refuses at once: tested elsewhere)
    for target in ("app:build", "app:app"):
        out = subprocess.run(
            [sys.executable, "-c", code, target], capture_output=True, text=True, timeout=300,
            cwd=TEST_AUDIO.parent, env=env,
        )  # fmt: skip
        assert out.stdout.split()[-3:] == ["True", "True", "True"], target + out.stdout + out.stderr


def test_21_uvicorn_app_app_serves_and_logs_as_python_app_py(tiny_settings, tmp_path):
    """`uvicorn app:app`, the way FastAPI apps are usually started: it serves, uvicorn's own lines come in
    the service's format, and each request is logged once, with its id (no access log beside it); a
    client's text in a line is escaped (an operator's trial forged log lines with %0A in a path)."""
    import re

    import httpx

    settings = tiny_process_settings(tiny_settings, tmp_path)
    port = settings["HIGGS_PORT"]
    server = start_process(["-m", "uvicorn", "app:app", "--port", port], settings)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"model": "tts-1", "input": "Hi.", "voice": "default", "response_format": "wav"}
        spoken = httpx.post(f"{url}/v1/audio/speech", json=body, headers={"X-Request-ID": "u21"}, timeout=120)
        assert spoken.status_code == 200
        # A client's text in a log line cannot start a line of its own (a path's %0A, a field's name).
        httpx.post(f"{url}/v1/audio/speech%0A2026-01-01%2000:00:00,000%20WARNING%20voices%20FORGED1")
        forged = {**body, "zz\n2026-01-01 00:00:00,000 ERROR engine FORGED2": 1}
        assert httpx.post(f"{url}/v1/audio/speech", json=forged, timeout=120).status_code == 200
        # Nor Unicode's line separator, or C1's next line and escape (a security review's forgeries).
        httpx.get(f"{url}/x%E2%80%A82026-01-01%2000:00:00,000%20CRITICAL%20engine%20FORGED3%C2%85N%C2%9B31m")
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[1]
    started = next(line for line in log.splitlines() if "Started server process" in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO uvicorn.error \[-\] ", started), started
    assert "[u21] POST /v1/audio/speech -> 200" in log
    assert '"POST /v1/audio/speech HTTP/1.1" 200' not in log, log[-2000:]
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01")]
    assert "/v1/audio/speech\\n2026-01-01 00:00:00,000 WARNING voices FORGED1 -> 404" in log
    assert "zz\\n2026-01-01 00:00:00,000 ERROR engine FORGED2" in log
    assert "/x\\u20282026-01-01 00:00:00,000 CRITICAL engine FORGED3\\x85N\\x9b31m -> 404" in log
    # Every line is a log line, the libraries' warnings too (torch's deprecation notices came bare).
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+ \[\S+\] ")
    assert [line for line in log.splitlines() if not stamp.match(line)] == []
    # But not upstream's two deprecation notices (torch.jit.script, weight_norm: WARNING lines at every start,
    # which a new user took for a fault), that no one running the service can act on.
    assert "is deprecated" not in log, [line for line in log.splitlines() if "is deprecated" in line]


def test_22_a_setting_that_does_not_fit_stops_the_service_with_a_line_naming_it():
    import os
    import subprocess
    import sys

    def start(**settings: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIGGS_")} | settings
        out = subprocess.run(
            [sys.executable, "app.py"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=TEST_AUDIO.parent,
            env=env,
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        return out.stderr

    assert "HIGGS_CORS_ORIGINS: not valid JSON" in start(HIGGS_CORS_ORIGINS="http://app.example")
    wrong = start(HIGGS_MAX_QUEUE="many", HIGGS_STREAM_FIRST_CHUNK_FRAMES="0")
    assert "HIGGS_MAX_QUEUE: Input should be a valid integer" in wrong and "'many'" in wrong
    assert "HIGGS_STREAM_FIRST_CHUNK_FRAMES: Input should be greater than or equal to 1" in wrong


def test_31_two_processes_making_the_same_builtin_voice_both_answer(
    isolated, settings, engine, recognizer, tmp_path
):
    """Two servers share one library; both see a first use of "ash" at once. The one that stores second
    used to answer 409 "pick another name" to a speech request; it now speaks with the clip just stored."""
    shared = tmp_path / "shared"
    body = {"model": "tts-1", "input": "Hi.", "voice": "ash", "response_format": "wav"}
    with isolated(voices_dir=shared) as first, isolated(voices_dir=shared) as second:
        library = second.app.state.voices.library
        real_get, real_create = library.get, library.create
        storing = []

        def get(name):  # the second process looks before the first has stored it...
            return real_get(name) if storing else None

        def create(*args, **kwargs):  # ...and stores after
            storing.append(args[0])
            return real_create(*args, **kwargs)

        library.get, library.create = get, create
        assert first.post("/v1/audio/speech", json=body).status_code == 200
        answer = second.post("/v1/audio/speech", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-voice"] == "ash" and storing == ["ash"]
        assert [v["name"] for v in first.get("/v1/audio/voices").json()["data"]].count("ash") == 1


def test_32_sigterm_lets_answers_finish_for_the_shutdown_timeout_then_exits(tiny_settings, tmp_path):
    """An operator's trial: SIGTERM waited for every running answer however long (30 s there), past a
    Kubernetes pod's grace period. Now `python app.py` waits HIGGS_SHUTDOWN_TIMEOUT_SECONDS at most."""
    import signal

    import httpx

    settings = tiny_process_settings(tiny_settings, tmp_path)
    settings |= {
        "HIGGS_SHUTDOWN_TIMEOUT_SECONDS": "2",
        # Two minutes of audio (the tiny model never ends it by itself): far longer than the timeout.
        "HIGGS_SECONDS_PER_CHARACTER": "2", "HIGGS_MAX_AUDIO_SECONDS": "120",
    }  # fmt: skip
    server = start_process(["app.py"], settings)
    url = f"http://127.0.0.1:{settings['HIGGS_PORT']}"
    try:
        text = "Hello there, this is a rather long test sentence for you, friend."  # 4 s + 2 s a character
        body = {"model": "tts-1", "input": text, "voice": "default", "response_format": "pcm"}
        received = 0
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=120) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            received += len(next(chunks))
            server.send_signal(signal.SIGTERM)
            terminated = time.monotonic()
            try:
                for chunk in chunks:
                    received += len(chunk)
            except httpx.HTTPError:
                pass  # the answer was cut when the timeout ran out
        server.wait(timeout=60)
        took = time.monotonic() - terminated
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=60)
    assert took < 10, took  # 2 s of grace, then the engine's and the process's own shutdown
    assert received < 120 * 24000 * 2  # not the whole answer
