"""Text in many languages and encodings through HTTP (what a multilingual developer's trial found): text is
taken composed (NFC) before limits count it, a form's text that is not UTF-8 is refused, not stored as
Latin-1, a transcript's faults are the text's, and a locale names its language. The long-text splitter's
part (Chinese pieces, Russian abbreviations, ellipses) is in ``test_longform.py`` and ``test_text_split.py``.
"""

from __future__ import annotations

import unicodedata

import pytest
from conftest import TEST_AUDIO, transcripts

from stt import normalize_language

WAV = TEST_AUDIO.read_bytes()
WORDS = transcripts()["test_audio.wav"]
VIETNAMESE = "Tiếng Việt có dấu."  # 18 characters composed, 25 apart


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def test_a_letter_typed_with_its_accents_apart_is_one_character_and_is_spoken_composed(isolated, spy):
    """The same Vietnamese was 4,059 characters composed and 5,599 apart, and only the first was taken;
    the words reached the model as typed, each accent a token of its own."""
    assert len(nfd(VIETNAMESE)) == 25 and len(VIETNAMESE) == 18
    with isolated(max_input_characters=18) as client:
        speech = {"model": "tts-1", "input": nfd(VIETNAMESE), "voice": "alloy", "response_format": "pcm"}
        assert client.post("/v1/audio/speech", json=speech).status_code == 200
        chat = {
            "model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": nfd(VIETNAMESE)}]}],
            "max_tokens": 4, "stop": [nfd("dấu")],
        }  # fmt: skip
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["audio"]["transcript"] == VIETNAMESE
        # One more letter, composed, is over the limit: the limit counts what a reader counts.
        speech["input"] = nfd(VIETNAMESE + "a")
        assert (
            client.post("/v1/audio/speech", json=speech).json()["error"]["code"] == "string_above_max_length"
        )
    spoken = [request.turns[-1].text for request in spy["generate"]]
    assert spoken[-2:] == [VIETNAMESE, VIETNAMESE]  # (before them, alloy's first clip: a built-in voice's)
    assert spy["generate"][-1].stop == [unicodedata.normalize("NFC", "dấu")]


def form(name: str, transcript: bytes, content_type: str = "multipart/form-data") -> tuple[bytes, str]:
    """A voice upload written by hand, its transcript's bytes as given."""
    parts = [
        b'Content-Disposition: form-data; name="name"\r\n\r\n' + name.encode(),
        b'Content-Disposition: form-data; name="transcript"\r\n\r\n' + transcript,
        b'Content-Disposition: form-data; name="audio_sample"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + WAV,
    ]
    body = b"".join(b"--XyZ\r\n" + part + b"\r\n" for part in parts) + b"--XyZ--\r\n"
    return body, f"{content_type}; boundary=XyZ"


def test_a_transcript_that_is_not_utf8_is_refused_naming_it_not_stored_as_latin1(isolated):
    """A trial's transcript in GBK was stored as "ÎÒÃÇÐèÒª..." with a 200: the form's parser takes bytes
    that are not UTF-8 as Latin-1, and nothing afterwards can tell."""
    words = "我们需要完成报告。"
    with isolated() as client:
        for name, raw in (("gbk", words.encode("gbk")), ("half", b"abc\xed\xa0\x80")):
            body, content_type = form(name, raw)
            refused = client.post("/v1/audio/voices", content=body, headers={"content-type": content_type})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "transcript" and error["code"] == "invalid_value"
            assert "is not UTF-8 text" in error["message"]
        assert client.get("/v1/audio/voices").json()["data"] == []
        # The same words in UTF-8 are stored as sent, and so is GBK in a form that says it is GBK.
        for name, raw, content_type in (
            ("utf8", words.encode(), "multipart/form-data"),
            ("said", words.encode("gbk"), "multipart/form-data; charset=gbk"),
        ):
            body, content_type = form(name, raw, content_type)
            stored = client.post("/v1/audio/voices", content=body, headers={"content-type": content_type})
            assert stored.status_code == 200, stored.text
            assert stored.json()["transcript"] == words


def test_a_transcripts_faults_are_the_texts_and_it_is_stored_composed(isolated, settings, tmp_path):
    """A blank or over-long transcript was refused with ``invalid_audio``; one typed apart was stored apart
    (and counted so against its limit); a preset's transcript saved with a byte-order mark kept it."""
    upload = {"audio_sample": ("a.wav", WAV, "audio/wav")}
    with isolated(max_transcript_characters=18) as client:
        for transcript, code in (("\u200b\u200c", "invalid_value"), ("ab" * 10, "string_above_max_length")):
            refused = client.post(
                "/v1/audio/voices", data={"name": "v", "transcript": transcript}, files=upload
            )
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "transcript"
            assert refused.json()["error"]["code"] == code, refused.text
        stored = client.post(
            "/v1/audio/voices", data={"name": "vn", "transcript": nfd(VIETNAMESE)}, files=upload
        )
        assert stored.status_code == 200, stored.text
        assert stored.json()["transcript"] == VIETNAMESE
        folder = tmp_path / "voices"
        (folder / "preset.wav").write_bytes(WAV)
        (folder / "preset.txt").write_bytes(b"\xef\xbb\xbf" + WORDS.encode())
        listed = {v["name"]: v for v in client.get("/v1/audio/voices").json()["data"]}
        assert listed["preset"]["transcript"] == " ".join(WORDS.split())


@pytest.mark.parametrize(
    ("given", "code"),
    [
        ("en-US", "en"), ("en_GB", "en"), ("zh-CN", "zh"), ("zh-Hant-TW", "zh"), ("pt-BR", "pt"),
        ("jv", "jw"), ("nb", "no"), ("iw", "he"), ("English", "en"), ("ZH", "zh"),
    ],
)  # fmt: skip
def test_a_locale_or_an_iso_code_whisper_spells_otherwise_names_its_language(given, code):
    """A browser's locale ("zh-CN") and Javanese's ISO code ("jv", Whisper's "jw") were unknown languages."""
    assert normalize_language(given) == code


def test_a_locale_is_taken_through_http_and_a_language_the_model_lacks_says_so(client):
    def transcribe(language: str):
        files = {"file": ("a.wav", WAV, "audio/wav")}
        return client.post(
            "/v1/audio/transcriptions", files=files, data={"model": "whisper-1", "language": language}
        )

    assert transcribe("en-US").status_code == 200
    lacking = transcribe("zh-CN")  # (the tests' model is English's only)
    assert lacking.status_code == 400 and "not supported" in lacking.json()["error"]["message"]
    assert "Unknown language" in transcribe("xx-YY").json()["error"]["message"]


def test_instructions_of_invisible_characters_are_none_and_a_split_is_logged(client, settings, spy, caplog):
    """Instructions of bidi marks alone became the scene, where invisible ``input`` is a 400; and a long
    text's split into pieces showed nowhere but in the streamed transcripts."""
    speech = {"model": "tts-1", "input": "Hi.", "voice": "default", "response_format": "pcm",
              "instructions": "\u200f\u200e"}  # fmt: skip
    assert client.post("/v1/audio/speech", json=speech).status_code == 200
    assert settings.default_scene in spy["generate"][-1].turns[0].text
    assert "\u200f" not in spy["generate"][-1].turns[0].text
    long = {**speech, "input": "他说……我不知道该怎么办……" * 12, "instructions": "Calm."}
    with caplog.at_level("INFO", logger="planner"):
        client.post("/v1/audio/speech", json=long)
    assert "a text of 168 characters, spoken in 2 pieces of 116, 52" in caplog.text
