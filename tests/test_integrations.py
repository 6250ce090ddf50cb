"""Requests that popular third-party apps send, replayed through HTTP on the tiny engine (a trial read the
apps' source: SillyTavern, speaches- and Kokoro-style clients, the Vercel AI SDK; the last is in
``test_transcriptions.py``)."""

from __future__ import annotations

import pytest

SPEECH = {"model": "tts-1", "input": "Hi.", "response_format": "pcm", "seed": 1}


def test_a_voice_name_with_spaces_around_it_is_that_voice(client, engine):
    """SillyTavern splits a typed voice list "alloy, echo" at the commas and sends " echo": a 400 for an
    unknown voice."""
    response = client.post("/v1/audio/speech", json={**SPEECH, "voice": " default "})
    assert response.status_code == 200, response.text
    assert response.headers["x-voice"] == "default"
    audio = {"voice": "default\t", "format": "wav"}
    chat = {"model": "tts-1", "modalities": ["text", "audio"], "audio": audio,
            "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 8}  # fmt: skip
    response = client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200 and response.headers["x-voice"] == "default"


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/chat/completions"])
def test_a_list_of_voices_is_refused_in_words(client, path):
    """Kokoro-style clients mix voices as a list; the answer was "Input should be a valid string", though an
    object with an id is a voice too."""
    if path == "/v1/audio/speech":
        body, param = {**SPEECH, "voice": ["alloy", "echo"]}, "voice"
    else:
        body = {"model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": ["alloy", "echo"]},
                "messages": [{"role": "user", "content": "Hi."}]}  # fmt: skip
        param = "audio.voice"
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "voice is one voice" in error["message"], error


def test_a_sample_rate_other_than_the_models_is_refused(client, engine):
    """speaches' clients ask for ``sample_rate`` 16000 with pcm and play the body at that rate: the 24 kHz
    body played 1.5 times slow. The model's own rate is served; another is a 400 naming the field."""
    response = client.post("/v1/audio/speech", json={**SPEECH, "voice": "default", "sample_rate": 16000})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "sample_rate" and str(engine.sample_rate) in error["message"]
    same = {**SPEECH, "voice": "default", "sample_rate": engine.sample_rate}
    assert client.post("/v1/audio/speech", json=same).status_code == 200


def test_open_webui_finds_the_speech_models_where_it_looks_for_them(client, settings):
    """Open WebUI asks a custom speech server for ``{base}/audio/models`` and reads ``models``: a 404 left
    it logging an error and offering tts-1 and tts-1-hd alone (a trial of apps' requests)."""
    listed = client.get("/v1/audio/models")
    assert listed.status_code == 200
    body = listed.json()
    names = [settings.served_model_name, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    assert [model["id"] for model in body["models"]] == names  # (Open WebUI's shape)
    assert [model["id"] for model in body["data"]] == names and body["object"] == "list"  # (OpenAI's)
    for name in names:  # each one speaks
        speech = {**SPEECH, "model": name, "voice": "default", "input": "Hi."}
        assert client.post("/v1/audio/speech", json=speech).status_code == 200


def test_open_webuis_mistral_transcription_sends_the_clip_as_a_bare_base64_string(client):
    """Open WebUI's Mistral speech-to-text (chat completions) sends ``input_audio`` as the base64 alone,
    Mistral's shape: a 400 "must be an object". Taken as the clip, its format read from its bytes."""
    from conftest import TEST_AUDIO, b64, transcripts

    body = {
        "model": "higgs-audio-v2",
        "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": b64(TEST_AUDIO)},
            {"type": "text", "text": "Transcribe this audio."},
        ]}],
    }  # fmt: skip
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    heard = answer.json()["choices"][0]["message"]["content"]
    assert heard.split()[:3] == transcripts()["test_audio.wav"].split()[:3]
