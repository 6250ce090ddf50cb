"""What real network clients do to a server (a trial with raw sockets, stalled readers and signals): each
defect it found, reproduced against the service as an operator runs it (``python app.py``, uvicorn, TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import serve, start_process, tiny_process_settings


def asgi_post(
    app, path: str, receive, content_type: bytes = b"application/json", send_blocks_after: int | None = None
) -> list[dict]:
    """``POST path`` to ``app`` (its lifespan running) with the ASGI ``receive`` given: what a client does
    on the wire, step by step, that a test client cannot (stall, leave); returns the messages sent. With
    ``send_blocks_after``, every send after that many blocks (a full socket buffer: nobody reads)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", content_type), (b"host", b"test")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    sent: list[dict] = []

    async def send(message):
        if send_blocks_after is not None and len(sent) >= send_blocks_after:
            await asyncio.sleep(3600)
        sent.append(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            pass

    with TestClient(app) as client:
        client.portal.call(call)
    return sent


# A streamed audio chat request's body, as the openai SDK sends it.
STREAMED_CHAT = json.dumps({
    "model": "tts-1", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"},
    "stream": True, "messages": [{"role": "user", "content": "Hello."}],
}).encode()  # fmt: skip
LONG = "Hello there, this is a rather long test sentence for you, friend."  # minutes of audio below


def test_sigterm_ends_running_answers_with_an_error_before_the_timeout(tiny_settings, tmp_path):
    """SIGTERM let answers run until uvicorn's grace ran out, then cancelled them: a streamed answer was cut
    off mid-body with no SSE ``error`` event, a non-streamed one got no HTTP answer at all, and nothing was
    logged for either. Now the server ends them shortly before: each SSE stream with an ``error`` event
    (``engine_closed``, in its log line too), a non-streamed request with a 503 and ``Retry-After``."""
    settings = tiny_process_settings(tiny_settings, tmp_path) | {
        "HIGGS_SHUTDOWN_TIMEOUT_SECONDS": "6",
        "HIGGS_SECONDS_PER_CHARACTER": "2", "HIGGS_MAX_AUDIO_SECONDS": "120",
    }  # fmt: skip
    server = start_process(["app.py"], settings)
    url = f"http://127.0.0.1:{settings['HIGGS_PORT']}"
    chat = {"model": "tts-1", "modalities": ["text", "audio"], "max_tokens": 3000,
            "messages": [{"role": "user", "content": LONG}]}  # fmt: skip
    got: dict[str, object] = {}
    streaming = threading.Barrier(3)

    def sse(name: str, path: str, body: dict) -> None:
        with httpx.stream("POST", url + path, json=body, timeout=120) as response:
            lines = response.iter_lines()
            got[name] = [next(lines)]
            streaming.wait(30)
            got[name] += [line for line in lines if line.startswith("data: ")]

    def whole() -> None:
        response = httpx.post(
            url + "/v1/chat/completions",
            json={**chat, "audio": {"voice": "default", "format": "wav"}},
            timeout=120,
        )
        got["whole"] = response

    threads = [
        threading.Thread(target=sse, args=("chat", "/v1/chat/completions", {**chat, "stream": True})),
        threading.Thread(
            target=sse,
            args=(
                "speech",
                "/v1/audio/speech",
                {
                    "model": "tts-1",
                    "input": LONG,
                    "voice": "default",
                    "response_format": "pcm",
                    "stream_format": "sse",
                },
            ),
        ),  # fmt: skip
        threading.Thread(target=whole),
    ]
    try:
        for thread in threads:
            thread.start()
        streaming.wait(60)  # both streams have sent their first event; the third request is in too
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for thread in threads:
            thread.join(60)
        server.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()
        log = server.communicate(timeout=60)[1]
    assert took < 12, took  # 6 s of grace; the answers ended after 4
    chat_error = json.loads(got["chat"][-1][6:])["error"]
    assert chat_error["code"] == "engine_closed" and "shutting down" in chat_error["message"], got["chat"][-1]
    speech_error = json.loads(got["speech"][-1][6:])
    assert speech_error["type"] == "error" and speech_error["error"]["code"] == "engine_closed"
    whole_response = got["whole"]
    assert whole_response.status_code == 503 and whole_response.headers["retry-after"] == "5"
    assert whole_response.json()["error"]["code"] == "engine_closed"
    assert "running answers have 4.0 s to finish" in log
    assert "Cancel" not in log  # uvicorn had nothing left to cut off
    # Each stream's log line says the error ended it (it said "sent whole": its body was complete).
    assert log.count("stream cut short by an error (engine_closed) after") == 2, log[-2000:]
    assert "stream sent whole" not in log


def test_a_client_gone_while_the_rest_of_its_stream_waits_in_the_queue_is_seen(fake_app, fake_engine, caplog):
    """A client that stalled and then left after its generation had ended was logged as ``stream sent
    whole``, and the server base64-encoded the whole rest of the answer for nobody: once the client is
    gone the server's ``send`` returns at once, and with every event already queued the stream never
    let the response's disconnect watch run. Here the engine's events are all there at once, and the
    client is gone after its request."""
    import numpy as np

    from generation import AudioPiece, Started

    result_of = fake_engine._result

    async def stream(request):
        result = result_of(request)
        yield Started(prompt_tokens=result.prompt_tokens, prompt_audio_tokens=0)
        for _ in range(200):
            yield AudioPiece(np.zeros(2400, np.float32))
        yield result

    fake_engine.stream = stream
    requests = [{"type": "http.request", "body": STREAMED_CHAT, "more_body": False}]

    async def receive():
        return requests.pop() if requests else {"type": "http.disconnect"}

    with caplog.at_level(logging.INFO):
        sent = asgi_post(fake_app, "/v1/chat/completions", receive)
    assert sent[0]["status"] == 200
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) < 10, len(bodies)  # not the 200 pieces
    assert any("stream cut short" in r.getMessage() for r in caplog.records)
    assert not any("stream sent whole" in r.getMessage() for r in caplog.records)


def test_a_client_that_stops_reading_is_one_warning_not_an_error(fake_app, fake_engine, monkeypatch):
    """Through a real server: uvicorn logged the dropped answer as an ERROR too ("ASGI callable returned
    without completing response"), for a case the service handles as designed (a README trial)."""
    import numpy as np

    import guard
    from generation import AudioPiece, Started

    monkeypatch.setattr(guard, "SEND_IDLE_SECONDS", 0.5)
    result_of = fake_engine._result

    async def stream(request):
        yield Started(prompt_tokens=1, prompt_audio_tokens=0)
        for _ in range(4000):  # about 25 MB of SSE: more than the sockets' buffers hold
            yield AudioPiece(np.zeros(2400, np.float32))
        yield result_of(request)

    fake_engine.stream = stream
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    with serve(fake_app) as url:
        for name in ("uvicorn.error", "guard"):
            logging.getLogger(name).addHandler(handler)
        try:
            host, port = url.removeprefix("http://").split(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {len(STREAMED_CHAT)}\r\n\r\n"
            sock.sendall(head.encode() + STREAMED_CHAT)
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # then nothing more is read
            deadline = time.monotonic() + 30
            while not any("read nothing" in r.getMessage() for r in seen) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # (uvicorn's line would come after the gate's)
            sock.close()
        finally:
            for name in ("uvicorn.error", "guard"):
                logging.getLogger(name).removeHandler(handler)
    assert any("read nothing of its answer for 0.5 s" in r.getMessage() for r in seen)
    assert [r.getMessage() for r in seen if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/audio/transcriptions"])
def test_a_body_that_stops_arriving_is_a_408_and_a_client_gone_mid_body_a_499(fake_app, monkeypatch, path):
    """An upload that stopped midway held its connection and the bytes it had sent for ever (a trial: 4
    uploads of 36 of 38 MB, +103 MB, no answer after 60 s); one whose client left was answered 400 ("There
    was an error parsing the body") and counted so."""
    import guard

    monkeypatch.setattr(guard, "BODY_IDLE_SECONDS", 0.3)
    first = {"type": "http.request", "body": b'{"model": "tts-1", "messa', "more_body": True}

    async def stalls():
        if first["body"]:
            message = dict(first)
            first["body"] = b""
            return message
        await asyncio.sleep(30)  # the rest never comes
        return {"type": "http.disconnect"}

    sent = asgi_post(fake_app, path, stalls)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"

    messages = [{"type": "http.disconnect"}, {"type": "http.request", "body": b'{"mo', "more_body": True}]

    async def leaves():
        return messages.pop()

    sent = asgi_post(fake_app, path, leaves)
    assert sent[0]["status"] == 499
    counted = fake_app.state.metrics.registry.get_sample_value(
        "higgs_requests_total", {"route": path, "status": "499"}
    )
    assert counted == 1


def test_a_client_that_stops_reading_is_dropped_and_its_generation_stopped(
    fake_app, fake_engine, monkeypatch, caplog
):
    """A client that read the start of a streamed answer and then nothing held its connection, and the
    answer queued for it, for as long as it stayed connected (a trial: 17 minutes, 4 MB each)."""
    import numpy as np

    import guard
    from generation import AudioPiece, Started

    monkeypatch.setattr(guard, "SEND_IDLE_SECONDS", 0.3)
    result_of, closed = fake_engine._result, []

    async def stream(request):
        result = result_of(request)
        try:
            yield Started(prompt_tokens=result.prompt_tokens, prompt_audio_tokens=0)
            for _ in range(200):
                yield AudioPiece(np.zeros(2400, np.float32))
                await asyncio.sleep(0.001)
            yield result
        finally:
            closed.append(True)

    fake_engine.stream = stream
    requests = [{"type": "http.request", "body": STREAMED_CHAT, "more_body": False}]

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.sleep(60)  # connected, and silent
        return {"type": "http.disconnect"}

    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        sent = asgi_post(fake_app, "/v1/chat/completions", receive, send_blocks_after=3)
    assert time.monotonic() - started < 10
    assert sent[0]["status"] == 200 and len(sent) == 3
    assert closed == [True]
    messages = [r.getMessage() for r in caplog.records]
    assert any("read nothing of its answer for 0.3 s" in m for m in messages)
    assert any("stream cut short" in m for m in messages)


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_a_request_head_over_16_kb_is_refused_at_once(fake_app):
    """A client sending an endless header: httptools (uvicorn's default when installed) buffered all of it,
    hundreds of MB, and every other request waited seconds. ``python app.py`` serves with h11, whose
    parser refuses a head over 16 KB while it arrives; the app refuses a whole one over 16 KB (431)."""
    from server import Protocol

    with serve(fake_app, http=Protocol) as url:
        sock = _raw(url)
        # 20 KB in one write, the head unfinished; more written after the server's answer could reset the
        # connection before the answer is read.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 20_000)
        answer = b""
        with contextlib.suppress(OSError):  # (a timeout: nothing came)
            while chunk := sock.recv(65536):
                answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
        assert httpx.get(url + "/health").status_code == 200
        # A whole head in one write reaches the app past h11's limit (100 KB did, in a README trial): the
        # app's door refuses it, in the envelope; one within the limit is served.
        whole = httpx.get(url + "/health", headers={"X-Big": "a" * 40_000})
        assert whole.status_code == 431 and whole.json()["error"]["code"] == "request_header_too_large"
        assert whole.headers["connection"] == "close"
        assert httpx.get(url + "/health", headers={"X-Big": "a" * 15_000}).status_code == 200


def test_a_request_head_that_does_not_arrive_in_time_is_closed(fake_app, monkeypatch, caplog):
    """A client sending its headers a byte at a time (slowloris) held its connection for ever, as did one
    that sent half a head after a first answer."""
    import server

    monkeypatch.setattr(server, "HEAD_SECONDS", 0.5)
    with serve(fake_app, http=server.Protocol) as url, caplog.at_level(logging.INFO):
        slow = _raw(url)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: te")
        started = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 5
        again = _raw(url)
        again.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert again.recv(1024).startswith(b"HTTP/1.1 200")
        again.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request's head, never finished
        assert again.recv(1024) == b""
        slow.close(), again.close()
    assert any("request headers took over 0.5 s" in r.getMessage() for r in caplog.records)


def test_a_port_in_use_stops_the_service_before_it_loads_anything(tiny_settings, tmp_path):
    """uvicorn binds its port after the app's startup: a port already taken was found only after the
    models had loaded (minutes with real weights), and loading went on after the error."""
    settings = tiny_process_settings(tiny_settings, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(settings["HIGGS_PORT"])))
        taken.listen()
        server = start_process(["app.py"], settings, timeout=60)
        try:
            code = server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
            log = server.communicate(timeout=60)[1]
    assert code == 3  # uvicorn's exit code for a failed start
    assert f"cannot listen on 127.0.0.1:{settings['HIGGS_PORT']}: Address already in use" in log
    assert "choose another port with HIGGS_PORT" in log
    assert "loaded" not in log and "loading" not in log.lower(), log


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("192.0.2.1", "HIGGS_HOST is not an address of this machine"),  # (TEST-NET-1: nobody's)
        ("::1", "listening on http://[::1]:"),
    ],
)
def test_the_service_says_which_address_it_cannot_listen_on_and_what_to_change(host, says, caplog):
    """uvicorn's own line for a host that is not this machine's was ``[Errno 99] Cannot assign requested
    address``, naming neither the address nor the setting; IPv6 hosts are bracketed."""
    import server
    from settings import Settings

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    settings = Settings(host=host, port=port)
    caplog.set_level(logging.INFO, logger="server")
    try:
        server.listen(settings).close()
    except SystemExit as exc:
        assert exc.code == server.STARTUP_FAILURE
        if host == "::1" and ("Cannot assign" in caplog.text or "not supported" in caplog.text):
            pytest.skip("this machine has no IPv6 loopback")
    assert says in caplog.text, caplog.text


def test_head_wherever_get_is_served_and_allow_names_every_method(fake_client):
    """HEAD was a 405 on every GET route but /ready (RFC 9110: a general-purpose server must answer HEAD
    wherever it answers GET), and a 405's Allow named one route's methods: ``Allow: POST`` for
    ``/v1/audio/voices``, which GET serves too."""
    for path in ("/v1/models", "/v1/audio/voices", "/metrics", "/health"):
        got, head = fake_client.get(path), fake_client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    refused = fake_client.delete("/v1/audio/voices")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD, POST"
    assert fake_client.post("/v1/models").headers["allow"] == "GET, HEAD"


def test_a_trailing_slash_is_the_same_path_and_never_a_redirect(fake_client):
    """``POST /v1/audio/speech/`` was a 307 to the same path on whatever host the request's Host header
    named (``Location: http://evil.example/...``)."""
    body = {"model": "tts-1", "input": "Hello.", "voice": "default", "response_format": "wav"}
    response = fake_client.post(
        "/v1/audio/speech/", json=body, headers={"host": "evil.example"}, follow_redirects=False
    )
    assert response.status_code == 200 and "location" not in response.headers
    assert response.content[:4] == b"RIFF"
    assert fake_client.get("/v1/models/").json()["data"]
    assert fake_client.get("/").status_code == 200
    assert fake_client.head("/v1/models/").status_code == 200
    metrics = fake_client.app.state.metrics.registry
    for route, method in (("/v1/audio/speech", "POST"), ("/v1/models", "GET")):  # counted as their route
        assert metrics.get_sample_value("higgs_requests_total", {"route": route, "status": "200"}), method
    assert metrics.get_sample_value("higgs_requests_total", {"route": "unmatched", "status": "200"}) is None


def test_a_multipart_form_without_its_closing_boundary_is_a_400(fake_client):
    """The form's parser dropped the last part of a body that never closes: a transcription form ending in
    ``language`` was served as if no language had been sent. A body split anywhere, the closing line in it
    or not, is read as sent."""
    form = (
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n'
    )
    quoted = {"content-type": 'multipart/form-data; boundary="XyZ"'}
    for body, headers in ((form, {"content-type": "multipart/form-data; boundary=XyZ"}), (form[:-2], quoted)):
        response = fake_client.post("/v1/audio/transcriptions", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert "closing boundary (--XyZ--)" in response.json()["error"]["message"]

    def split(data: bytes):  # in pieces, the closing line across two of them
        yield from (data[i : i + 7] for i in range(0, len(data), 7))

    closed = form + b"--XyZ--\r\n"
    for body in (closed, split(closed)):
        response = fake_client.post("/v1/audio/transcriptions", content=body, headers=quoted)
        assert response.status_code == 400 and response.json()["error"]["param"] == "file"  # read whole


def test_a_compressed_body_is_a_415_naming_the_encoding(fake_client, fake_engine):
    """A gzip body was a 400 "There was an error parsing the body" (no param), and a body labelled ``br``
    that was plain JSON was served as if the label were not there."""
    import gzip

    body = json.dumps({"model": "tts-1", "input": "Hello.", "voice": "default"}).encode()
    for encoding, data in (("gzip", gzip.compress(body)), ("br", body)):
        response = fake_client.post(
            "/v1/audio/speech",
            content=data,
            headers={"content-type": "application/json", "content-encoding": encoding},
        )
        assert response.status_code == 415
        error = response.json()["error"]
        assert (
            error["code"] == "unsupported_content_encoding"
            and f"Content-Encoding: {encoding}" in error["message"]
        )
    assert fake_engine.requests == []
    assert fake_client.post("/v1/audio/speech", content=body, headers={
        "content-type": "application/json", "content-encoding": "identity"}).status_code == 200  # fmt: skip
