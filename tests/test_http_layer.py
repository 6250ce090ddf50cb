"""The HTTP layer alone, against the fake engine (``tests/fakes.py``): routing, readiness, the error
envelope for every domain error, the voice routes. Everything that crosses the model is tested against the
tiny real engine in the other files."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import TEST_AUDIO, b64, chat_audio, post_then_hang_up, wav_b64
from fastapi.testclient import TestClient

from generation import ContextLengthError, EngineBusy, EngineFailure

CHAT = {"model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
        "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 8}  # fmt: skip
SPEECH = {"model": "tts-1", "input": "Hello there.", "voice": "default", "response_format": "wav"}


def assert_envelope(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    return error


def test_chat_and_speech_reach_the_engine_with_the_planned_request(fake_client, fake_engine):
    response = fake_client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200 and response.headers["x-voice"] == "default"
    samples, rate = sf.read(io.BytesIO(chat_audio(response.json())))
    assert rate == 24_000 and len(samples) == 8 * 24_000 // 25
    speech = fake_client.post("/v1/audio/speech", json=SPEECH)
    assert speech.status_code == 200 and speech.headers["content-type"] == "audio/wav"
    chat_request, speech_request = fake_engine.requests
    assert chat_request.max_new_tokens == 8 and chat_request.turns[-1].text == "Hello there."
    assert speech_request.audio_output and speech_request.turns[-1].text == "Hello there."


def test_not_ready_until_the_lifespan_has_run(fake_app):
    client = TestClient(fake_app)  # no ``with``: the lifespan never starts
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 503
    loading = client.post("/v1/chat/completions", json=CHAT)
    assert_envelope(loading, 503, code="model_loading")
    assert loading.headers["retry-after"] == "5"


def test_every_route_that_needs_the_models_answers_503_while_they_load(fake_app):
    """Every ``/v1/`` route but the model list, whatever its method and body: a 503 with Retry-After,
    never a 500 from a library or engine that is not there yet."""
    client = TestClient(fake_app)  # no ``with``: the lifespan never starts
    assert client.get("/v1/models").status_code == 200
    checked = []
    for path, operations in fake_app.openapi()["paths"].items():
        if not path.startswith("/v1/") or path.startswith(("/v1/models", "/v1/audio/models")):
            continue
        path = path.replace("{voice_id}", "narrator")
        for method in operations:
            response = client.request(method, path)
            assert_envelope(response, 503, code="model_loading")  # a code a client can branch on
            assert response.headers["retry-after"] == "5", (method, path)
            checked.append(f"{method.upper()} {path}")
    expected = {"GET /v1/audio/voices", "DELETE /v1/audio/voices/narrator", "POST /v1/audio/speech"}
    assert expected <= set(checked)


def test_a_failed_engine_is_reported_by_ready_and_every_generation_route(fake_client, fake_engine):
    fake_engine.failure = "CUDA error: an illegal memory access"
    assert fake_client.get("/ready").status_code == 503
    assert fake_client.get("/health").status_code == 200
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/audio/speech", SPEECH)):
        refused = fake_client.post(path, json=body)
        assert_envelope(refused, 503, code="engine_failed")
        assert refused.headers["x-should-retry"] == "false"  # no wait mends it


def test_a_full_queue_is_a_429_before_the_body_is_used(fake_client, fake_engine):
    fake_engine.pending = fake_engine.max_queue
    busy = fake_client.post("/v1/chat/completions", json=CHAT)
    assert_envelope(busy, 429, code="queue_full")
    assert busy.headers["retry-after"] == "2" and busy.json()["error"]["type"] == "rate_limit_error"
    assert "(16 requests running or waiting)" in busy.json()["error"]["message"]
    assert fake_engine.requests == []
    fake_engine.pending = fake_engine.max_queue = 1  # the same words as the engine's, in the singular
    assert "(1 request running or waiting)" in fake_client.post("/v1/chat/completions", json=CHAT).text


def test_a_busy_error_with_its_own_wait_sets_retry_after(fake_client, fake_engine):
    busy = EngineBusy("the server is busy")
    busy.retry_after = 7.2
    fake_engine.fail_with = busy
    response = fake_client.post("/v1/chat/completions", json=CHAT)
    assert_envelope(response, 429, code="queue_full")
    assert response.headers["retry-after"] == "8"


@pytest.mark.parametrize(
    ("error", "status", "param", "code"),
    [
        # (speech has no max_tokens: the overflow is blamed on its input, or its instructions when given)
        (
            ContextLengthError("too long for the context"),
            400,
            ("max_tokens", "input"),
            "context_length_exceeded",
        ),
        (EngineFailure("out of GPU memory", "out_of_memory"), 500, (None, None), "out_of_memory"),
        (EngineFailure("the engine failed", "engine_failed"), 503, (None, None), "engine_failed"),
    ],
)
def test_engine_errors_are_mapped_to_their_status(fake_client, fake_engine, error, status, param, code):
    fake_engine.fail_with = error
    for path, body, named in (
        ("/v1/chat/completions", CHAT, param[0]),
        ("/v1/audio/speech", SPEECH, param[1]),
    ):
        assert_envelope(fake_client.post(path, json=body), status, named, code)


def test_an_unexpected_error_is_a_500_that_leaks_nothing(fake_client, fake_engine):
    fake_engine.fail_with = RuntimeError("secret detail at /srv/model/weights")
    error = assert_envelope(fake_client.post("/v1/chat/completions", json=CHAT), 500)
    assert error["type"] == "server_error" and "/srv" not in error["message"]


def test_a_failure_mid_stream_ends_the_sse_with_an_error_envelope(fake_client, fake_engine):
    fake_engine.fail_mid_stream = True
    body = {**CHAT, "audio": {"voice": "default", "format": "pcm16"}, "stream": True}
    response = fake_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
    assert events[-1]["error"]["type"] == "server_error" and "[DONE]" not in response.text
    speech = fake_client.post("/v1/audio/speech", json={**SPEECH, "stream_format": "sse"})
    last = json.loads(speech.text.strip().splitlines()[-1][6:])
    assert last["type"] == "error" and set(last["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("failure", ["RuntimeError", "EngineFailure"])
def test_a_failure_mid_stream_cuts_a_plain_audio_body_short(fake_app, fake_engine, failure, caplog):
    """Through a real server: the body ends without its last chunk, so a client sees an error, never a
    short answer that looks whole (an unexpected error, or one with an answer of its own, alike). Each is
    one line with its request's id: an engine's error said, an unexpected one with its traceback, once (an
    operator's trial: a shutdown mid-body was two tracebacks, the server's and ours, without the id)."""
    import logging

    from live_server import serve

    fake_engine.fail_mid_stream = True
    if failure == "EngineFailure":
        fake_engine.mid_stream_error = EngineFailure("the GPU ran out of memory", "out_of_memory")
    server_said: list[logging.LogRecord] = []  # (uvicorn's own logger does not propagate to caplog)
    server_log = logging.getLogger("uvicorn.error")
    handler = logging.Handler()
    handler.emit = server_said.append
    server_log.addHandler(handler)
    try:
        with serve(fake_app) as url, caplog.at_level(logging.INFO, logger="app"):
            for fmt in ("pcm", "mp3", "wav"):
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                    httpx.post(f"{url}/v1/audio/speech", json={**SPEECH, "response_format": fmt}, timeout=60)
            fake_engine.fail_mid_stream = False  # and the server goes on serving
            whole = httpx.post(
                f"{url}/v1/audio/speech", json={**SPEECH, "response_format": "pcm"}, timeout=60
            )
            assert whole.status_code == 200 and whole.headers["x-request-id"]
    finally:
        server_log.removeHandler(handler)
    assert [r for r in server_said if r.exc_info] == []
    cuts = [r for r in caplog.records if "stream cut short" in r.getMessage()]
    said = "by an error (out_of_memory) after" if failure == "EngineFailure" else "by an unexpected failure"
    assert len(cuts) == 3 and all(said in r.getMessage() for r in cuts), [r.getMessage() for r in cuts]
    assert all(r.higgs_request_id != "-" for r in cuts)
    assert [bool(r.exc_info) for r in cuts] == [failure == "RuntimeError"] * 3
    assert not [r for r in caplog.records if r.getMessage() == "unexpected failure"]


@pytest.mark.parametrize("refusal", [413, 401])
def test_a_refused_body_is_answered_to_a_client_still_sending_it(fake_engine, tmp_path, refusal):
    """Through a real server: a client writing a refused body whole then reads the answer. A body too large
    is read and dropped before the 413, which closes the connection (the openai Node SDK saw the
    connection reset while it wrote a 45 MB body: "Connection error.", and sent it twice more); a 401
    keeps the connection, past whose rest the server reads. A client that waits for ``100 Continue`` gets
    the answer at once, without sending the body."""
    import socket

    from live_server import serve
    from pydantic import SecretStr

    from app import create_app
    from settings import Settings

    settings = Settings(stt_model="", voices_dir=tmp_path / "v", max_body_mb=1, api_key=SecretStr("k"))
    body = b"x" * (12 * 1024 * 1024)
    key = "Bearer k" if refusal == 413 else "Bearer wrong"

    def post(expect: bool) -> bytes:
        head = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                + ("Expect: 100-continue\r\n" if expect else "") + "\r\n")  # fmt: skip
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(head.encode())
            if not expect:
                sock.sendall(body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            return answer

    with serve(create_app(settings, engine=fake_engine)) as url:
        host, port = url.removeprefix("http://").split(":")
        assert post(expect=False).startswith(f"HTTP/1.1 {refusal} ".encode())
        started = time.monotonic()
        assert post(expect=True).startswith(f"HTTP/1.1 {refusal} ".encode())
        assert time.monotonic() - started < 5


def test_null_for_an_optional_field_is_its_default(fake_client, fake_engine):
    """The openai SDK sends ``null`` for an argument passed as ``None`` (``speed=None``): the default, as
    for an absent field; a required field stays required."""
    nulls = {"speed": None, "response_format": None, "stream_format": None, "instructions": None}
    response = fake_client.post("/v1/audio/speech", json={**SPEECH, **nulls})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/mpeg"
    chat = {**CHAT, "audio": {"voice": "default", "format": None}, "temperature": None, "stream": None}
    response = fake_client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["audio"]["data"]
    assert_envelope(
        fake_client.post("/v1/audio/speech", json={**SPEECH, "model": None}), 400, "model", "invalid_type"
    )
    assert_envelope(
        fake_client.post("/v1/audio/speech", json={**SPEECH, "input": None}), 400, "input", "invalid_type"
    )


def test_streamed_chat_audio_must_be_pcm16_and_nothing_is_generated(fake_client, fake_engine):
    body = {**CHAT, "stream": True}
    assert_envelope(fake_client.post("/v1/chat/completions", json=body), 400, "audio.format")
    assert fake_engine.requests == []


def test_speech_recognition_off(fake_client, fake_engine):
    upload = fake_client.post(
        "/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
    )
    assert_envelope(upload, 400, "model")
    audio_part = {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}}
    chat = {**CHAT, "modalities": ["text"], "messages": [{"role": "user", "content": [audio_part]}]}
    assert_envelope(fake_client.post("/v1/chat/completions", json=chat), 400, "messages[0].content[0]")
    assert fake_engine.requests == []


def test_unknown_voice_names_the_voices_there_are(fake_client):
    error = assert_envelope(
        fake_client.post("/v1/audio/speech", json={**SPEECH, "voice": "nobody"}),
        400,
        "voice",
        "voice_not_found",
    )
    assert "coral" in error["message"] and "default" in error["message"]


def test_an_unknown_url_is_answered_as_openai_words_it(fake_client):
    error = assert_envelope(fake_client.post("/v1/audio/speak", json=SPEECH), 404)
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "Invalid URL (POST /v1/audio/speak)"


def test_openais_consent_recordings_are_answered_with_what_to_do_instead(fake_client):
    """The SDK's custom-voice flow starts with ``client.audio.voice_consents.create``: its 404 says to
    create the voice directly (its ``consent`` is accepted and ignored)."""
    files = {"recording": ("c.wav", TEST_AUDIO.read_bytes(), "audio/wav")}
    created = fake_client.post("/v1/audio/voice_consents", data={"name": "me", "language": "en"}, files=files)
    for answer in (created, fake_client.get("/v1/audio/voice_consents/cons_123")):
        error = assert_envelope(answer, 404)
        assert "/v1/audio/voice_consents" in error["message"] and "POST /v1/audio/voices" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [  # JSON may escape half a surrogate pair; no tokenizer or encoder takes it (it was a 500)
        ("/v1/audio/speech", '{"model": "tts-1", "input": "ab\\ud800c", "voice": "alloy"}', "input"),
        ("/v1/audio/speech", '{"model": "tts-1", "input": "ab\\udc00c", "voice": "alloy"}', "input"),
        ("/v1/chat/completions", '{"model": "tts-1", "messages": [{"role": "user", "content": "x\\udc00"}]}',
         "messages[0].content"),
        ("/v1/chat/completions", '{"model": "tts-1", "messages": [{"role": "user", "content": '
         '[{"type": "text", "text": "x\\ud800"}]}]}', "messages[0].content[0].text"),
        ("/v1/chat/completions", '{"model": "tts-1", "messages": [{"role": "user", "content": "Hi."}], '
         '"stop": ["ok", "\\udfff"]}', "stop"),
        # fields with a length bound, which pydantic refused in words of its own (a new user's trial)
        ("/v1/audio/speech", '{"model": "tts-1", "input": "Hi.", "instructions": "x\\ud800", '
         '"voice": "alloy"}', "instructions"),
        # an unknown field's name: pydantic names no field for it
        ("/v1/audio/speech", '{"model": "tts-1", "input": "Hi.", "voice": "alloy", "x\\ud800": 1}', None),
    ],
)  # fmt: skip
def test_half_a_surrogate_pair_is_a_400(fake_client, path, body, param):
    response = fake_client.post(path, content=body, headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, param)
    said = "a field's name" if param is None else "the text"
    assert error["message"].startswith(said) and "holds half of a surrogate pair" in error["message"], error
    whole = body.replace("\\ud800", "\\ud83d\\ude00").replace("\\udc00", "\\ud83d\\ude00")
    if "stop" not in body:  # a whole pair (an emoji) is fine
        assert (
            fake_client.post(path, content=whole, headers={"content-type": "application/json"}).status_code
            == 200
        )


def test_a_head_whose_client_leaves_after_the_head_is_not_logged_as_cut_short(fake_app, caplog):
    """An operator's trial: ``curl -I`` on the page (a file) logged "stream cut short" every time: curl
    closes once it has the head, which is all of a HEAD's answer."""
    import logging
    import socket

    from live_server import serve

    with serve(fake_app) as url, caplog.at_level(logging.INFO, logger="app"):
        host, port = url.removeprefix("http://").split(":")
        for path in ("/", "/web/app.js", "/docs/assets/swagger-ui-bundle.js"):
            with socket.create_connection((host, int(port)), timeout=30) as connection:
                connection.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += connection.recv(4096)
                assert head.startswith(b"HTTP/1.1 200"), head
        time.sleep(0.5)  # (the server notices the client gone)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HEAD ")]
    assert len(said) == 3 and not [m for m in said if "cut short" in m], said


@pytest.mark.parametrize(
    ("name", "values"),
    [("authorization", ["Bearer wrong", "Bearer k"]), ("content-type", ["application/json", "text/plain"])],
)
def test_a_header_that_may_come_once_given_twice_is_a_400(fake_engine, tmp_path, name, values):
    """An abuse trial: of two Authorization headers the key check read the last (a proxy that checks or
    replaces the first is passed by); two Content-Types were read one way by the body's checks and another
    by its parser."""
    from pydantic import SecretStr

    from app import create_app
    from settings import Settings

    settings = Settings(stt_model="", voices_dir=tmp_path / "v", api_key=SecretStr("k"))
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        headers = [(name, value) for value in values]
        if name != "authorization":
            headers.append(("authorization", "Bearer k"))
        answer = client.post("/v1/audio/speech", content=json.dumps(SPEECH), headers=headers)
        error = assert_envelope(answer, 400, None, "ambiguous_request")
        assert error["message"] == f"the request has 2 {name.title()} headers; send one", error
        assert answer.headers["connection"] == "close"


def test_a_body_framed_by_both_length_and_chunks_is_refused_and_its_connection_closed(fake_app):
    """An abuse trial: ``Content-Length`` beside ``Transfer-Encoding: chunked`` was read as chunks, and
    a request sent after it on the same connection was answered too: behind a proxy that reads the length
    instead, the two would split the bytes into requests differently (RFC 9112, 6.3)."""
    import socket

    from live_server import serve

    from server import Protocol

    body = json.dumps(SPEECH).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    with serve(fake_app, http=Protocol) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(
                b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
                + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
            )  # fmt: skip
            answered = b""
            while chunk := connection.recv(65536):  # until the server closes the connection
                answered += chunk
    assert answered.startswith(b"HTTP/1.1 400 "), answered[:200]
    assert b"both Content-Length and Transfer-Encoding" in answered
    assert answered.count(b"HTTP/1.1 ") == 1, answered  # the request after it was not answered


def test_probes_may_send_head(fake_client):
    assert fake_client.head("/health").status_code == 200 and fake_client.head("/ready").status_code == 200


CHAT_TEXT = {"model": "tts-1", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}


CHAT_ = "/v1/chat/completions"
SPEECH_ = "/v1/audio/speech"


@pytest.mark.parametrize(
    ("path", "fields", "param", "words", "code"),
    [
        (SPEECH_, {**SPEECH, "speed": float("nan")}, "speed", "speed must be a finite number; got NaN",
         "invalid_value"),
        (CHAT_, {**CHAT_TEXT, "temperature": float("inf")}, "temperature", "a finite number",
         "invalid_value"),
        (CHAT_, {**CHAT_TEXT, "stop": list("abcde")}, "stop", "at most 4 sequences", None),
        (SPEECH_, {**SPEECH, "voice": "clone"}, "voice", "clones the input_audio reference of a chat", None),
        ("/v1/audio/transcriptions", {"model": "whisper-1", "file": "hello"}, "file", "must be a file",
         "invalid_type"),
        # Pydantic's own words named no field and no value: "Input should be less than or equal to 2" (an
        # openai SDK trial: the SDK's message is all many programs print). Now the field, what it must be,
        # what was given, and OpenAI's code for the kind of fault.
        (CHAT_, {**CHAT_TEXT, "temperature": 3}, "temperature", "temperature must be at most 2.0; got 3",
         "decimal_above_max_value"),
        (CHAT_, {**CHAT_TEXT, "top_p": -1}, "top_p", "top_p must be at least 0.0; got -1",
         "decimal_below_min_value"),
        (CHAT_, {**CHAT_TEXT, "max_tokens": 0}, "max_tokens", "max_tokens must be at least 1; got 0",
         "integer_below_min_value"),
        (CHAT_, {**CHAT_TEXT, "n": 2}, "n", "n must be at most 1; got 2", "integer_above_max_value"),
        (CHAT_, {**CHAT_TEXT, "max_tokens": 1.5}, "max_tokens", "max_tokens must be an integer; got 1.5",
         "invalid_type"),
        (CHAT_, {**CHAT_TEXT, "temperature": "hot"}, "temperature", 'temperature must be a number; got "hot"',
         "invalid_type"),
        (CHAT_, {**CHAT_TEXT, "stream": "yes"}, "stream", 'stream must be true or false; got "yes"',
         "invalid_type"),
        (CHAT_, {**CHAT_TEXT, "messages": []}, "messages", "messages must have at least 1 item; got 0",
         "empty_array"),
        (CHAT_, {**CHAT_TEXT, "messages": [{"role": "robot", "content": "Hi."}]}, "messages[0].role",
         "messages[0].role must be 'system', 'developer', 'user', 'assistant', 'tool' or 'function'; got "
         '"robot"', "invalid_value"),
        (SPEECH_, {**SPEECH, "response_format": "ogg"}, "response_format",
         "response_format must be 'mp3', 'opus', 'aac', 'flac', 'wav' or 'pcm'; got \"ogg\"",
         "invalid_value"),
        (SPEECH_, {**SPEECH, "input": ""}, "input", "input is empty", "empty_string"),
        (SPEECH_, {**SPEECH, "input": 5}, "input", "input must be a string; got 5", "invalid_type"),
        (SPEECH_, [SPEECH], None, "the request body must be an object; got [{", "invalid_type"),
        (SPEECH_, {"model": "tts-1", "input": "Hi."}, "voice", "voice is required",
         "missing_required_parameter"),
    ],
)  # fmt: skip
def test_a_careless_request_gets_a_400_in_plain_words(fake_client, path, fields, param, words, code):
    if path.endswith("transcriptions"):  # a form, the file sent as a text field
        response = fake_client.post(path, data=fields)
    else:  # NaN and Infinity as Python's json writes them (httpx's own encoder refuses them)
        response = fake_client.post(
            path, content=json.dumps(fields), headers={"content-type": "application/json"}
        )
    error = assert_envelope(response, 400, param, code)
    assert words in error["message"] and "Value error" not in error["message"], error
    assert "Input should" not in error["message"] and "List should" not in error["message"], error


@pytest.mark.parametrize(
    ("path", "kind", "words"),
    [  # curl -d '{...}' without -H sends a form; JSON sent where an upload is expected
        ("/v1/audio/speech", "application/x-www-form-urlencoded", "sent with Content-Type: application/json"),
        ("/v1/chat/completions", None, "sent with Content-Type: application/json"),
        ("/v1/audio/transcriptions", "application/json", "takes a multipart/form-data upload"),
        ("/v1/audio/voices", "application/json", "takes a multipart/form-data upload"),
    ],
)
def test_a_body_of_the_wrong_kind_is_told_which_kind(fake_client, path, kind, words):
    headers = {"content-type": kind} if kind else {}
    error = assert_envelope(fake_client.post(path, content=json.dumps(SPEECH), headers=headers), 400)
    assert words in error["message"]
    # the right kind with a field missing still names the field
    missing = "missing_required_parameter"
    speech = fake_client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi."})
    assert_envelope(speech, 400, "voice", missing)
    assert_envelope(
        fake_client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}), 400, "file", missing
    )


@pytest.mark.parametrize(
    ("path", "fields", "twice"),
    [
        ("/v1/audio/voices", [("name", "a3"), ("name", "a4"), ("transcript", "Words.")], "name"),
        ("/v1/audio/voices", [("name", "a5"), ("transcript", "One."), ("transcript", "Two.")], "transcript"),
        ("/v1/audio/transcriptions", [("model", "whisper-1"), ("response_format", "json"),
                                      ("response_format", "text")], "response_format"),
        ("/v1/audio/transcriptions", [("model", "whisper-1"), ("language", "xx"), ("language", "en")],
         "language"),
        ("/v1/audio/translations", [("model", "whisper-1"), ("model", "whisper-1")], "model"),
    ],
)  # fmt: skip
def test_a_form_field_given_twice_is_a_400_naming_it(fake_client, path, fields, twice):
    """A hostile-input trial: the form's parser keeps the last of a repeated field, so a second ``name``
    named the voice and a second ``response_format`` chose the answer's, silently (and a second language
    was refused or taken by its order)."""
    part = "audio_sample" if path.endswith("voices") else "file"
    files = {part: ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")}
    data: dict[str, list[str]] = {}
    for name, value in fields:
        data.setdefault(name, []).append(value)
    error = assert_envelope(fake_client.post(path, data=data, files=files), 400, twice)
    assert error["message"] == f"{twice} is given 2 times; send it once", error
    assert fake_client.get("/v1/audio/voices").json()["data"] == []  # (nothing stored)


def test_a_form_the_parser_refuses_is_said_in_the_apis_words(fake_client):
    """A hostile-input trial: Starlette's parser answered "Part exceeded maximum size of 1024KB.", "Too many
    fields. ...", "Missing boundary in multipart." and the like, naming nothing and saying nothing of what
    to do."""
    audio_part = {"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")}
    path = "/v1/audio/transcriptions"
    big = fake_client.post(path, data={"model": "whisper-1", "prompt": "x" * (1100 * 1024)}, files=audio_part)
    assert "a form field that is not a file is over 1024 KB" in assert_envelope(big, 400)["message"]
    many = {f"f{i}": "1" for i in range(1001)}
    crowded = fake_client.post(path, data={"model": "whisper-1", **many}, files=audio_part)
    assert "the form has more than 1000 fields" in assert_envelope(crowded, 400)["message"]
    body = b"--x\r\nContent-Disposition: form-data\r\n\r\nwhisper-1\r\n--x--\r\n"
    headers = {"content-type": "multipart/form-data"}
    unbounded = fake_client.post(path, content=body, headers=headers)
    assert "names no boundary" in assert_envelope(unbounded, 400)["message"]
    unnamed = fake_client.post(
        path, content=body, headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert "has no name in its Content-Disposition" in assert_envelope(unnamed, 400)["message"]


def test_a_long_value_said_back_in_an_error_is_cut_short(fake_client):
    """A hostile-input trial: a 100,000-character language came back whole in its 400, and a model or voice
    name of any length is said back as long as the body limit allows."""
    from errors import MESSAGE_CHARACTERS

    long = "a" * 100_000
    for answer, param in (
        (fake_client.post("/v1/audio/speech", json={**SPEECH, "model": long}), "model"),
        (fake_client.post("/v1/audio/speech", json={**SPEECH, "voice": long}), "voice"),
        (fake_client.post("/v1/audio/transcriptions", data={"model": "whisper-1", "language": long},
                          files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")}), "language"),
    ):  # fmt: skip
        assert answer.status_code in (400, 404), answer.text[:300]
        error = answer.json()["error"]
        assert error["param"] == param and len(error["message"]) < MESSAGE_CHARACTERS + 100, error["message"][
            :300
        ]


def upload(client, name: str, transcript: str | None = "Known words of the clip."):
    data = {"name": name} if transcript is None else {"name": name, "transcript": transcript}
    files = {"audio_sample": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")}
    return client.post("/v1/audio/voices", data=data, files=files)


def test_voice_routes(fake_client, fake_engine):
    created = upload(fake_client, "anna")
    assert created.status_code == 200, created.text
    voice = created.json()
    assert voice["name"] == "anna" and voice["transcript"] == "Known words of the clip."
    assert len(fake_engine.encoded) == 1
    assert [v["name"] for v in fake_client.get("/v1/audio/voices").json()["data"]] == ["anna"]
    assert fake_client.get(f"/v1/audio/voices/{voice['id']}").json()["name"] == "anna"
    assert_envelope(upload(fake_client, "anna"), 409, "name", "voice_exists")
    assert_envelope(upload(fake_client, "../evil"), 400, "name")
    nowords = upload(fake_client, "nowords", transcript=None)  # recognition is off: the words go in the form
    assert_envelope(nowords, 400, "transcript")
    assert nowords.json()["error"]["message"].endswith("give the words spoken in transcript")
    assert upload(fake_client, "bob").status_code == 200
    assert_envelope(upload(fake_client, "carol"), 413, "audio_sample", "voice_quota_exceeded")  # max_voices=2
    deleted = fake_client.delete("/v1/audio/voices/anna")
    assert deleted.json() == {"id": voice["id"], "object": "audio.voice.deleted", "deleted": True}
    assert_envelope(fake_client.get("/v1/audio/voices/anna"), 404, "voice_id", "voice_not_found")
    assert_envelope(fake_client.delete("/v1/audio/voices/anna"), 404, "voice_id", "voice_not_found")


def test_a_taken_name_is_refused_once_not_retried_by_the_sdk(fake_client):
    import openai

    assert upload(fake_client, "taken").status_code == 200
    sent = []
    fake_client.event_hooks["request"].append(lambda request: sent.append(request.url.path))
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=fake_client)
    with pytest.raises(openai.ConflictError):  # the SDK's default: 2 retries of a 409 unless told not to
        sample = ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")
        sdk.audio.voices.create(name="taken", audio_sample=sample, consent="cons_1")
    assert sent == ["/v1/audio/voices"]


def test_a_builtin_voice_is_made_by_one_generation_then_cloned(fake_client, fake_engine):
    assert fake_client.post("/v1/audio/speech", json={**SPEECH, "voice": "nova"}).status_code == 200
    made, spoken = fake_engine.requests
    assert "SPEAKER0:" in made.turns[0].text and made.max_new_tokens == 2 * 25 + 9
    assert spoken.turns[2].audio is not None
    assert fake_client.post("/v1/audio/speech", json={**SPEECH, "voice": "nova"}).status_code == 200
    assert len(fake_engine.requests) == 3  # no second making


def test_a_builtin_voice_the_model_cannot_make_is_a_server_error(fake_client, fake_engine):
    fake_engine.silent = True
    error = assert_envelope(fake_client.post("/v1/audio/speech", json={**SPEECH, "voice": "onyx"}), 500)
    assert error["type"] == "server_error"
    assert "onyx" not in [v["name"] for v in fake_client.get("/v1/audio/voices").json()["data"]]


def test_clone_audio_that_is_not_audio_is_refused_before_the_engine(fake_client, fake_engine):
    part = {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO)[:40], "format": "wav"}}
    body = {**CHAT, "audio": {"voice": "clone", "format": "wav"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi."}, part]}]}  # fmt: skip
    assert_envelope(
        fake_client.post("/v1/chat/completions", json=body), 400, "messages[0].content[1].input_audio.data",
        "invalid_audio",
    )  # fmt: skip
    silent = {**part, "input_audio": {"data": wav_b64(np.zeros(48_000, np.float32), 24_000), "format": "wav"}}
    body["messages"][0]["content"][1] = silent
    assert_envelope(
        fake_client.post("/v1/chat/completions", json=body), 400, "messages[0].content[1].input_audio.data",
        "invalid_audio",
    )  # fmt: skip
    assert fake_engine.requests == [] and fake_engine.encoded == []


def test_models_and_metrics(fake_client):
    ids = [m["id"] for m in fake_client.get("/v1/models").json()["data"]]
    assert ids[0] == "higgs-audio-v2" and "whisper-1" in ids
    assert fake_client.get("/v1/models/tts-1").json()["id"] == "tts-1"
    assert_envelope(fake_client.get("/v1/models/nope"), 404, "model", "model_not_found")
    fake_client.post("/v1/audio/speech", json=SPEECH)
    metrics = fake_client.get("/metrics").text
    assert 'route="/v1/audio/speech",status="200"' in metrics


def test_metrics_labelled_with_a_replica_parse_with_the_label_on_every_sample(fake_client):
    """A cluster's replica names itself on every sample (``cluster.replica_app``), labels of its own
    (a route with braces) kept as they were."""
    from prometheus_client.parser import text_string_to_metric_families

    fake_client.app.state.metrics.labels = {"replica": 'Higgs#a"1'}
    fake_client.get("/v1/audio/voices/nobody")
    samples = [
        sample
        for family in text_string_to_metric_families(fake_client.get("/metrics").text)
        for sample in family.samples
    ]
    assert samples and all(sample.labels["replica"] == 'Higgs#a"1' for sample in samples)
    assert not [s.name for s in samples if s.name.endswith("_created")]  # half the series, never queried
    routes = {s.labels.get("route") for s in samples if s.name == "higgs_requests_total"}
    assert "/v1/audio/voices/{voice_id}" in routes, routes


class GatedTranscriber:
    """A ``Transcriber`` whose jobs hold the worker until ``gate`` opens; ``ran`` lists the jobs it ran."""

    languages = frozenset({"en"})
    supports_translation = False

    def __init__(self):
        self.gate = threading.Event()
        self.running = threading.Event()
        self.ran: list[int] = []

    def transcribe(self, audio, **options):
        from stt import Transcript

        self.ran.append(len(audio.samples))
        self.running.set()
        self.gate.wait(30)
        return Transcript("words", "en", len(audio.samples) / audio.sample_rate, [])


def test_a_transcription_whose_client_left_is_dropped_while_it_waits(fake_engine, tmp_path):
    """One job holds the recognition worker; the next one's client hangs up while it waits: 499, and the
    worker never runs it (it used to run every abandoned job to its end, and those behind them waited)."""
    import httpx

    from app import create_app
    from settings import Settings
    from stt import AsyncTranscriber

    gated = GatedTranscriber()
    recognizer = AsyncTranscriber(gated)
    settings = Settings(stt_model="", voices_dir=tmp_path / "voices")
    app = create_app(settings, engine=fake_engine, recognizer=recognizer)
    upload = httpx.Request(
        "POST", "http://testserver/v1/audio/transcriptions", data={"model": "whisper-1"},
        files={"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
    )  # fmt: skip
    body = upload.read()
    with TestClient(app) as client:
        answers = []
        holder = threading.Thread(
            target=lambda: answers.append(client.post(upload.url.path, content=body, headers=upload.headers))
        )
        holder.start()
        assert gated.running.wait(30)
        headers = [(k.lower().encode(), v.encode()) for k, v in upload.headers.items() if k != "host"]
        queued = lambda: recognizer._pending >= 2  # noqa: E731 (behind the running job)
        sent = client.portal.call(post_then_hang_up, app, upload.url.path, headers, body, queued)
        assert sent[0]["status"] == 499
        gated.gate.set()
        holder.join(30)
        assert answers[0].status_code == 200 and answers[0].json()["text"] == "words"
        assert len(gated.ran) == 1  # the abandoned job never reached the worker
        deadline = time.monotonic() + 10
        while recognizer._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recognizer._pending == 0  # both counted out of the queue


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "tts-1", "voice": "alloy", "input": "Hi \xff\xfe"}', "is not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"model": "tts-1", "voice": "alloy", "input": "Hi", "seed": ' + b"9" * 5000 + b"}", "too long"),
    ],
    ids=["not utf-8", "deep", "long number"],
)
def test_a_json_body_that_cannot_be_read_says_why(fake_client, body, says):
    """A new user's trial: these got FastAPI's "There was an error parsing the body", which says nothing."""
    json_type = {"Content-Type": "application/json"}
    response = fake_client.post("/v1/audio/speech", content=body, headers=json_type)
    assert_envelope(response, 400)
    assert says in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/chat/completions"])
def test_an_empty_json_body_is_called_empty(fake_client, path):
    """It was answered "this field is required", with no field named."""
    response = fake_client.post(path, content=b"", headers={"Content-Type": "application/json"})
    assert_envelope(response, 400)
    assert response.json()["error"]["message"] == "the request body is empty; send a JSON object"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_pages_are_served_whole_by_this_server(fake_client, page):
    """A new user's trial: FastAPI's /docs and /redoc loaded Swagger UI, ReDoc and fonts from CDNs, so they
    were blank offline, and each visit reached third parties. Every file they name is served here."""
    html = fake_client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "https://" not in html.text and "http://" not in html.text.replace("http://www.w3.org", "")
    files = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert len(files) >= 2 and all(f.startswith("/docs/assets/") for f in files), files
    for path in files:
        answer = fake_client.get(path)
        assert answer.status_code == 200 and len(answer.content) > 1000, path
        kind = {"js": "text/javascript", "css": "text/css", "png": "image/png"}[path.rsplit(".", 1)[1]]
        assert answer.headers["content-type"].startswith(kind), path
    assert "/openapi.json" in html.text
    assert_envelope(fake_client.get("/docs/assets/..%2Fcore.py"), 404)
    # Nothing from elsewhere, and no other site may frame them (a security review: no frame-ancestors).
    for path in (page, "/docs/oauth2-redirect"):
        policy = fake_client.get(path).headers["content-security-policy"]
        assert policy.startswith("default-src 'self';") and policy.endswith("frame-ancestors 'none'"), path
