"""/v1/chat/completions, /v1/models and health through HTTP, against the tiny real engine."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import Pcm, chat_audio

SPEAK = [{"role": "user", "content": "Hello world, this is a test."}]


def speak(
    openai_client, seed: int = 7, fmt: str = "wav", text: str = "Hello world, this is a test.", **extra
):
    return openai_client.chat.completions.create(
        model="gpt-4o-audio-preview",
        modalities=["text", "audio"],
        audio={"voice": "default", "format": fmt},
        messages=[{"role": "user", "content": text}],
        max_tokens=40,
        seed=seed,
        **extra,
    )


def test_sdk_chat_returns_wav_at_the_tokenizer_rate(openai_client, engine):
    completion = speak(openai_client)
    message = completion.choices[0].message
    assert completion.object == "chat.completion"
    assert message.content is None
    assert message.audio.transcript == "Hello world, this is a test."
    assert message.audio.id.startswith("audio_")
    samples, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)))
    assert rate == engine.sample_rate == 24000
    assert samples.ndim == 1 and len(samples) > rate * 0.5
    usage = completion.usage
    assert usage.completion_tokens_details.audio_tokens == usage.completion_tokens == 40
    assert usage.prompt_tokens_details.audio_tokens == 0
    # Each side split as OpenAI's audio models split it (text_tokens was left out: null in the SDK).
    assert usage.completion_tokens_details.text_tokens == 0
    assert usage.prompt_tokens_details.text_tokens == usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.choices[0].finish_reason == "length"


def test_same_seed_same_bytes_other_seed_other_audio(openai_client):
    a = speak(openai_client, seed=11).choices[0].message.audio.data
    b = speak(openai_client, seed=11).choices[0].message.audio.data
    c = speak(openai_client, seed=12).choices[0].message.audio.data
    assert a == b
    assert a != c


def test_openai_s_ranges_negative_seeds_and_top_p_0(openai_client):
    """OpenAI takes any signed 64-bit seed and a top_p of 0 (the most likely token alone, as top_k 1)."""
    negative = speak(openai_client, seed=-(2**63)).choices[0].message.audio.data
    assert negative == speak(openai_client, seed=-(2**63)).choices[0].message.audio.data
    assert negative != speak(openai_client, seed=11).choices[0].message.audio.data
    top_p_0 = speak(openai_client, seed=3, top_p=0).choices[0].message.audio.data
    assert top_p_0 == speak(openai_client, seed=3, extra_body={"top_k": 1}).choices[0].message.audio.data
    assert top_p_0 != speak(openai_client, seed=3).choices[0].message.audio.data


def test_pcm16_is_raw_samples_of_the_wav(openai_client):
    wav = base64.b64decode(speak(openai_client, seed=3).choices[0].message.audio.data)
    pcm = base64.b64decode(speak(openai_client, seed=3, fmt="pcm16").choices[0].message.audio.data)
    samples, _ = sf.read(io.BytesIO(wav), dtype="int16")
    assert np.array_equal(np.frombuffer(pcm, dtype="<i2"), samples)


def test_system_message_becomes_the_scene(openai_client, spy):
    seen = spy["generate"]
    openai_client.chat.completions.create(
        model="tts-1",
        modalities=["text", "audio"],
        audio={"voice": "default", "format": "wav"},
        messages=[{"role": "system", "content": "A windy beach."}, *SPEAK],
        max_tokens=10,
    )
    system = seen[0].turns[0]
    assert (
        system.role == "system" and "<|scene_desc_start|>\nA windy beach.\n<|scene_desc_end|>" in system.text
    )
    assert seen[0].turns[-1].text == SPEAK[0]["content"]


def test_only_an_audio_answer_names_its_voice(client):
    body = {"model": "tts-1", "messages": SPEAK, "max_tokens": 4}
    text_only = client.post("/v1/chat/completions", json=body)
    assert text_only.status_code == 200 and "x-voice" not in text_only.headers
    audio = {"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"}, "max_tokens": 4}
    spoken = client.post("/v1/chat/completions", json={**body, **audio})
    assert spoken.headers["x-voice"] == "default"


def test_text_only_returns_the_models_text(openai_client):
    completion = openai_client.chat.completions.create(
        model="higgs-audio-v2",
        messages=SPEAK,
        max_tokens=8,
        seed=1,
        temperature=0.9,
        extra_body={"top_k": 20},
    )
    message = completion.choices[0].message
    assert message.audio is None
    assert isinstance(message.content, str)
    assert completion.usage.completion_tokens_details.audio_tokens == 0
    assert completion.usage.completion_tokens_details.text_tokens == completion.usage.completion_tokens
    assert completion.usage.prompt_tokens > 10


def test_unknown_fields_are_accepted_and_logged(client, caplog):
    body = {
        "model": "gpt-4o-audio-preview",
        "messages": SPEAK,
        "max_tokens": 4,
        "a_field_from_the_future": {"x": 1},
    }
    with caplog.at_level("INFO"):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert any(
        "ignored unknown request fields: a_field_from_the_future" in r.getMessage() for r in caplog.records
    )


def test_concurrent_requests_each_equal_their_solo_run(client):
    def body(seed):
        return {
            "model": "gpt-4o-audio-preview",
            "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "wav"},
            "messages": [{"role": "user", "content": f"Request number {seed}."}],
            "max_tokens": 30,
            "seed": seed,
        }

    solo = {seed: client.post("/v1/chat/completions", json=body(seed)).json() for seed in (21, 22)}
    together: dict[int, dict] = {}

    def run(seed):
        together[seed] = client.post("/v1/chat/completions", json=body(seed)).json()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (21, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Within one step of 16-bit PCM (``Pcm`` says why), as long as alone.
    for seed in (21, 22):
        got, alone = (
            Pcm(base64.b64decode(r[seed]["choices"][0]["message"]["audio"]["data"])) for r in (together, solo)
        )
        assert got == alone


BAD_REQUESTS = [
    ("empty messages", {"model": "tts-1", "messages": []}, 400, "messages"),
    (
        "last message not the user's",
        {"model": "tts-1", "messages": [{"role": "assistant", "content": "hi"}]},
        400,
        "messages[0].role",
    ),
    (
        "unknown audio format",
        {
            "model": "tts-1",
            "modalities": ["text", "audio"],
            "messages": SPEAK,
            "audio": {"voice": "default", "format": "ogg-vorbis"},
        },
        400,
        "audio.format",
    ),
    ("wrong type", {"model": "tts-1", "messages": SPEAK, "temperature": "hot"}, 400, "temperature"),
    ("out of range", {"model": "tts-1", "messages": SPEAK, "top_p": 3}, 400, "top_p"),
    ("messages not a list", {"model": "tts-1", "messages": "hello"}, 400, "messages"),
    ("missing model", {"messages": SPEAK}, 400, "model"),
    (
        "unknown role",
        {"model": "tts-1", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "unknown part type",
        {
            "model": "tts-1",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
            ],
        },
        400,
        "messages[0].content[0]",
    ),
    (
        "text part without text",
        {"model": "tts-1", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        400,
        "messages[0].content[0].text",
    ),
    ("n above 1", {"model": "tts-1", "messages": SPEAK, "n": 2}, 400, "n"),
    ("seed beyond 64 bits", {"model": "tts-1", "messages": SPEAK, "seed": 2**63}, 400, "seed"),
    (
        "voice id not a string",
        {"model": "tts-1", "modalities": ["text", "audio"], "messages": SPEAK, "audio": {"voice": {"id": 5}}},
        400,
        "audio.voice.id",
    ),
    (
        "unknown voice",
        {
            "model": "tts-1",
            "modalities": ["text", "audio"],
            "messages": SPEAK,
            "audio": {"voice": "nobody", "format": "wav"},
        },
        400,
        "audio.voice",
    ),
    (
        "nothing to say",
        {
            "model": "tts-1",
            "modalities": ["text", "audio"],
            "messages": [{"role": "user", "content": " "}],
            "audio": {"voice": "default", "format": "wav"},
        },
        400,
        "messages[0].content",
    ),
    ("context overflow", {"model": "tts-1", "messages": SPEAK, "max_tokens": 100000}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-5", "messages": SPEAK}, 404, "model"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_the_openai_envelope(client, name, body, status, param):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if status == 404:  # and it names every name this server takes
        assert error["code"] == "model_not_found"
        settings = client.app.state.settings
        assert all(
            repr(n) in error["message"] or f" {n}," in error["message"] for n in ("tts-1", "gpt-audio")
        )
        assert "bosonai/higgs-audio-v2-generation-3B-base" in error["message"]
        # The tiny model is a local folder: its path is the server's business, not told to clients.
        assert settings.model not in error["message"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("part", "words"),
    [
        ({"text": "hi"}, "has no type"),
        ({"type": "image_url", "image_url": {"url": "http://x"}}, "unsupported"),
    ],
    ids=["without a type", "of a type not served"],
)
def test_a_content_part_of_no_known_type_is_told_the_types(client, part, words):
    """The message names the part types there are (pydantic's own words, "Unable to extract tag using
    discriminator", told a user nothing)."""
    body = {"model": "tts-1", "messages": [{"role": "user", "content": [part]}]}
    error = client.post("/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "messages[0].content[0]" and words in error["message"], error
    assert all(repr(kind) in error["message"] for kind in ("text", "input_audio", "refusal")), error


def test_invalid_json_is_a_400(client):
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in response.json()["error"]["message"]


def test_unknown_route_is_a_404_envelope(client):
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert "error" in response.json()


def test_sdk_raises_on_unknown_model(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="gpt-5", messages=SPEAK)
    assert info.value.body["code"] == "model_not_found"


def test_models_health_and_readiness(client, openai_client):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids[0] == "higgs-audio-v2" and "gpt-4o-audio-preview" in ids and "whisper-1" in ids
    assert openai_client.models.retrieve("tts-1").id == "tts-1"
    created = {m.created for m in openai_client.models.list().data}
    created.add(openai_client.models.retrieve("tts-1").created)
    time.sleep(1.1)
    created.update(m.created for m in openai_client.models.list().data)
    assert len(created) == 1  # fixed, as OpenAI's, not the time of the call
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True}
    assert client.get("/health").headers["x-request-id"]


def test_request_id_is_echoed(client):
    assert client.get("/health", headers={"X-Request-ID": "abc123"}).headers["x-request-id"] == "abc123"


def test_startup_loads_models_from_settings_and_reports_readiness(settings):
    """The production path: no engine injected, the lifespan loads and warms up from the settings."""
    from fastapi.testclient import TestClient

    from app import create_app

    changes = {
        "stt_model": "",
        "stream_first_chunk_frames": 2,
        "stream_chunk_frames": 5,
        "prefill_batch": 3,
        "prefill_beside_steps": True,
    }
    app = create_app(settings.model_copy(update=changes))
    assert TestClient(app).get("/ready").status_code == 503  # lifespan not started: not ready
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200  # at once: the models load behind the server
        deadline = time.monotonic() + 300
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/ready").json() == {"ready": True}
        body = {"model": "tts-1", "input": "Hi.", "voice": "default", "response_format": "pcm", "seed": 1}
        with client.stream("POST", "/v1/audio/speech", json=body) as response:
            sizes = [len(piece) for piece in response.iter_bytes()]
        assert sizes[:3] == [2 * 960 * 2, 5 * 960 * 2, 5 * 960 * 2]  # streaming settings reach the engine
        assert app.state.engine.prefill_batch == 3  # and HIGGS_PREFILL_BATCH
        assert app.state.engine.prefill_beside_steps  # and HIGGS_PREFILL_BESIDE_STEPS (a CPU's default: off)
        body = {
            "model": "tts-1",
            "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "wav"},
            "messages": SPEAK,
            "max_tokens": 12,
            "seed": 5,
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        sf.read(io.BytesIO(chat_audio(response.json())))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_device_without_cuda_refuses_to_start(settings):
    from fastapi.testclient import TestClient

    from app import create_app

    app = create_app(settings.model_copy(update={"device": "auto", "stt_model": ""}))
    with pytest.raises(RuntimeError, match="HIGGS_DEVICE=cpu"):
        with TestClient(app):
            pass


def test_python_app_py_without_cuda_says_why_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "HIGGS_DEVICE": "auto", "CUDA_VISIBLE_DEVICES": "", "HIGGS_PORT": "18655",
           "HIGGS_VOICES_DIR": str(tmp_path)}  # fmt: skip
    for command in (
        ["app.py"],
        ["-m", "uvicorn", "app:build", "--factory", "--port", "18655"],
        ["-m", "uvicorn", "app:app", "--port", "18655"],
    ):
        done = subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("cannot start: No CUDA device found.")


def test_speech_recognition_on_cuda_without_cuda_refuses_to_start(tmp_path, settings):
    """HIGGS_STT_DEVICE=cuda on a machine without CUDA stops the start in one line (it started, then
    failed its load: /ready said load_failed minutes later, after the Higgs model had loaded on the CPU)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from settings import check_devices

    cuda = settings.model_copy(update={"device": "cpu", "stt_device": "cuda", "stt_model": "tiny.en"})
    with pytest.raises(RuntimeError, match="HIGGS_STT_DEVICE=cuda was asked for"):
        check_devices(cuda, cuda_available=False)
    check_devices(cuda, cuda_available=True)
    check_devices(cuda.model_copy(update={"stt_model": ""}), cuda_available=False)  # recognition off
    check_devices(cuda, cuda_available=False, recognizer=False)  # a recognizer handed in
    env = {**os.environ, "HIGGS_DEVICE": "cpu", "HIGGS_STT_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "",
           "HIGGS_PORT": "18656", "HIGGS_VOICES_DIR": str(tmp_path)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("cannot start: HIGGS_STT_DEVICE=cuda")


def test_a_voices_folder_that_cannot_hold_voices_refuses_the_start_before_the_models_load(tmp_path):
    """An operator's trial: a voices folder that was a file (or not writable) was found only after the
    models had loaded, and every call then said the models could not be loaded."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from voices import check_voices_dir

    a_file = tmp_path / "voices"
    a_file.write_text("not a folder")
    with pytest.raises(RuntimeError, match="cannot hold voices"):
        check_voices_dir(a_file)
    check_voices_dir(tmp_path / "made" / "here")  # a missing one is made
    assert (tmp_path / "made" / "here").is_dir() and not list((tmp_path / "made" / "here").iterdir())
    env = {**os.environ, "HIGGS_DEVICE": "cpu", "HIGGS_STT_MODEL": "", "HIGGS_PORT": "18657",
           "HIGGS_VOICES_DIR": str(a_file), "HIGGS_MODEL": str(tmp_path / "no-model")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cannot start: HIGGS_VOICES_DIR '{a_file}' cannot hold voices"), last


def test_a_library_that_logs_its_own_request_id_is_not_refused(client, caplog):
    """Ray Serve's access log passes ``extra={"request_id": ...}``; while the app's records had an attribute
    of that name, logging refused every such line with a KeyError (a Ray trial: each request through the
    proxy was logged as failed, and left out of Ray's request metrics)."""
    import logging

    with caplog.at_level("INFO"):
        # (not Ray's own logger: once Ray is imported, it keeps its lines from the root's handlers)
        logging.getLogger("a_library").info("access line", extra={"request_id": "theirs"})
    assert [r.request_id for r in caplog.records if r.getMessage() == "access line"] == ["theirs"]


def test_log_lines_carry_the_request_id_and_no_audio(client, caplog):
    """With INFO logging on (as `make run` runs), requests succeed and each line names its request."""
    import logging

    body = {"model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
            "messages": SPEAK, "max_tokens": 8}  # fmt: skip
    with caplog.at_level(logging.INFO):
        response = client.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "req-42"})
        assert response.status_code == 200
        assert client.get("/health", headers={"X-Request-ID": "bad id\nwith newline"}).status_code == 200
    ours = [r for r in caplog.records if getattr(r, "higgs_request_id", "-") == "req-42"]
    assert any("/v1/chat/completions -> 200" in r.getMessage() for r in ours)
    assert not any("\n" in getattr(r, "higgs_request_id", "") for r in caplog.records)
    audio = response.json()["choices"][0]["message"]["audio"]["data"]
    assert not any(audio[:40] in r.getMessage() for r in caplog.records)


def test_speech_recognition_falls_back_to_the_cpu_when_cuda_libraries_are_missing(
    settings, monkeypatch, caplog
):
    import stt

    class NoCudaWhisper:
        def __init__(self, model, device, compute_type, **options):
            self.device = device

        def warm_up(self):
            if self.device != "cpu":
                raise RuntimeError("Library libcublas.so.12 is not found or cannot be loaded")

    monkeypatch.setattr(stt, "WhisperTranscriber", NoCudaWhisper)
    monkeypatch.setattr(stt, "_cuda_available", lambda: True)
    recognizer = stt.load_recognizer(settings.model_copy(update={"stt_device": "auto"}))
    assert recognizer.transcriber.device == "cpu"
    assert "libcublas.so.12" in caplog.text
    recognizer.close()
    with pytest.raises(RuntimeError, match="libcublas"):
        stt.load_recognizer(settings.model_copy(update={"stt_device": "cuda"}))


@pytest.mark.parametrize("fmt", ["mp3", "flac", "opus", "aac"])
def test_every_chat_audio_format_decodes_to_the_wav_duration(client, fmt):
    import av

    def body(f):
        return {"model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": f},
                "messages": SPEAK, "max_tokens": 40, "seed": 8}  # fmt: skip

    def data(f):
        return base64.b64decode(
            client.post("/v1/chat/completions", json=body(f)).json()["choices"][0]["message"]["audio"]["data"]
        )

    wav_seconds = sf.info(io.BytesIO(data("wav"))).duration
    with av.open(io.BytesIO(data(fmt))) as container:
        stream = container.streams.audio[0]
        seconds = sum(frame.samples for frame in container.decode(stream)) / stream.rate
    assert abs(seconds - wav_seconds) <= 0.03 * wav_seconds + 0.05


def test_too_few_tokens_for_a_frame_still_give_valid_audio(client):
    body = {"model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "mp3"},
            "messages": SPEAK, "max_tokens": 3}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert chat_audio(response.json())
