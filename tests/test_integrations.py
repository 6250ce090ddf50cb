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
