"""A voice agent's conversation through the ``openai`` SDK: defects a developer's trial found, each through
HTTP on the tiny engine (barge-in, the SDK's stream helper, what an agent does with the errors)."""

from __future__ import annotations

import base64
import json
import logging
import time

import numpy as np
import pytest
from conftest import pcm16_samples, wav_b64

from planner import AUDIO_LIFETIME_SECONDS

SAY = [{"role": "user", "content": "Hello there, how are you today?"}]
STREAM = {"model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
          "audio": {"voice": "default", "format": "pcm16"}, "messages": SAY, "seed": 5}  # fmt: skip


def sse_chunks(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def audio_deltas(chunks: list[dict]) -> list[dict]:
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return [delta["audio"] for delta in deltas if "audio" in delta]


def later(audio_id: str, **changes) -> dict:
    """A next turn that holds the earlier answer by its id."""
    messages = [*SAY, {"role": "assistant", "audio": {"id": audio_id}}, {"role": "user", "content": "Go on."}]
    return {**STREAM, "audio": {"voice": "default", "format": "wav"}, "messages": messages, "max_tokens": 8,
            **changes}  # fmt: skip


def test_an_answer_cut_short_is_kept_as_far_as_it_was_sent(client, spy):
    """Barge-in: the listener talks over the answer and the agent closes the stream, then refers to the
    answer by the id it was given. The id was refused (``audio_not_found``) though it came with an hour's
    ``expires_at``. Now the answer is kept as far as it went: its frames are those of the whole answer
    with the same seed, up to where it stopped."""
    body = {**STREAM, "max_tokens": 300, "stream": True}
    received, audio_id = 0, None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"audio"' in line:
                delta = json.loads(line[6:])["choices"][0]["delta"]["audio"]
                audio_id = delta.get("id", audio_id)
                received += len(base64.b64decode(delta.get("data", ""))) // 2
                if received:
                    break  # the first audio: hang up
    answers = client.app.state.planner.answers
    deadline = time.monotonic() + 30
    while answers.get(audio_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kept = answers.get(audio_id)
    assert kept is not None and kept.transcript == SAY[0]["content"]
    frames = kept.codes.frames
    assert received <= frames * 960 and frames < 300 - 8  # what went out, not the whole answer

    whole = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    full = answers.get(whole["choices"][0]["message"]["audio"]["id"]).codes.codes
    assert np.array_equal(kept.codes.codes.numpy(), full[:, :frames].numpy())

    response = client.post("/v1/chat/completions", json=later(audio_id))
    assert response.status_code == 200, response.text
    assert response.headers["x-voice"] == "native"
    assert np.array_equal(spy["generate"][-1].turns[2].audio.codes.numpy(), kept.codes.codes.numpy())
    text = client.post("/v1/chat/completions", json=later(audio_id, modalities=["text"], max_tokens=4))
    assert text.status_code == 200, text.text


def test_the_sdks_stream_helper_gets_a_usable_id_and_the_whole_audio(client, openai_client):
    """The id came in every audio delta, while the SDK's helper, which concatenates strings and adds
    numbers, expects it once (and ``expires_at`` in the last audio delta): its snapshot held the id five
    times over, refused in the next turn. Its ``data`` now decodes to the whole audio (each delta's base64
    is a whole number of 3-byte groups; a padded one mid-string ended the decode there)."""
    body = {**STREAM, "max_tokens": 60}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = sse_chunks(response)
    deltas = audio_deltas(chunks)
    assert len([d for d in deltas if "data" in d]) >= 3
    assert "id" in deltas[0] and all("id" not in d for d in deltas[1:])
    assert deltas[-1]["expires_at"] == chunks[0]["created"] + AUDIO_LIFETIME_SECONDS
    assert all("expires_at" not in d for d in deltas[:-1]) and "data" in deltas[-1]
    assert all(len(base64.b64decode(d["data"])) % 6 == 0 for d in deltas[:-1] if "data" in d)
    pieces = b"".join(base64.b64decode(d["data"]) for d in deltas if "data" in d)

    with openai_client.chat.completions.stream(**body) as stream:
        for _ in stream:
            pass
        audio = stream.current_completion_snapshot.choices[0].message.audio
    assert audio.id.startswith("audio_") and audio.id.count("audio_") == 1
    assert audio.expires_at - stream.current_completion_snapshot.created == AUDIO_LIFETIME_SECONDS
    assert audio.transcript == SAY[0]["content"]
    assert np.array_equal(pcm16_samples(base64.b64decode(audio.data)), pcm16_samples(pieces))
    assert client.post("/v1/chat/completions", json=later(audio.id)).status_code == 200


def test_a_stream_whose_audio_object_leaves_out_the_format_is_pcm16(client):
    """Without ``audio`` a stream is pcm16; with ``audio`` naming only a voice it was a 400 asking for
    the format the client never set."""
    body = {**STREAM, "audio": {"voice": "default"}, "max_tokens": 20, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        data = b"".join(base64.b64decode(d.get("data", "")) for d in audio_deltas(sse_chunks(response)))
    assert len(data) > 0 and len(data) % 2 == 0
    wav = client.post("/v1/chat/completions", json={**body, "audio": {"voice": "default", "format": "wav"}})
    assert wav.status_code == 400 and wav.json()["error"]["param"] == "audio.format"


def test_speech_that_is_not_recognised_is_a_no_speech_error_naming_the_clip(client):
    """A cough or noise as the user's turn: for an audio answer a generic 400 without a code, naming the
    content; an agent needs to tell "I didn't catch that" from its own mistakes."""
    noise = (np.random.default_rng(0).standard_normal(16000) * 0.05).astype(np.float32)
    part = {"type": "input_audio", "input_audio": {"data": wav_b64(noise, 16000), "format": "wav"}}
    body = {**STREAM, "audio": {"voice": "alloy", "format": "wav"}, "max_tokens": 8,
            "messages": [{"role": "user", "content": [part]}]}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("no_speech", "messages[0].content[0].input_audio.data")
    empty = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": ""}]})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages[0].content"


def test_audio_parts_are_spoken_where_they_stand_and_noise_beside_text_is_logged(client, caplog):
    """A README trial: audio parts were spoken after all the text parts, wherever they stood; and a clip
    of noise beside text was dropped without a word. Its words go where the part stands (given here as its
    ``transcript``), and a clip with no speech is logged."""
    clip = wav_b64(np.zeros(8000, np.float32), 16000)
    said = {"type": "input_audio",
            "input_audio": {"data": clip, "format": "wav", "transcript": "in the middle"}}  # fmt: skip
    content = [{"type": "text", "text": "Before."}, said, {"type": "text", "text": "After."}]
    body = {**STREAM, "audio": {"voice": "default", "format": "wav"}, "max_tokens": 8,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["audio"]["transcript"] == "Before.\nin the middle\nAfter."
    noise = (np.random.default_rng(0).standard_normal(16000) * 0.05).astype(np.float32)
    part = {"type": "input_audio", "input_audio": {"data": wav_b64(noise, 16000), "format": "wav"}}
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Hi there."}, part]}]
    with caplog.at_level(logging.INFO, logger="planner"):
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["audio"]["transcript"] == "Hi there."
    assert "no speech was recognised in messages[0].content[1]" in caplog.text


@pytest.mark.parametrize(
    ("changes", "param"),
    [({"function_call": {"name": "get_weather"}}, "function_call"),
     ({"function_call": "sometimes"}, "function_call"),
     ({"tool_choice": "sometimes"}, "tool_choice"),
     ({"messages": [{"role": "user", "content": "Hi.", "audio": {"id": "audio_1"}}]}, "messages[0].audio"),
     ({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "No."}]}]},
      "messages[0].content")],
)  # fmt: skip
def test_what_would_change_the_answers_meaning_is_refused_naming_it(client, changes, param):
    """A forced call through the older ``function_call`` was ignored while ``tool_choice`` was refused;
    an invalid ``tool_choice`` was told the model calls no tools; an earlier answer's id on a user message
    was ignored."""
    functions = [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    body = {**STREAM, "stream": False, "audio": {"voice": "alloy", "format": "wav"}, "max_tokens": 8,
            "functions": functions, **changes}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if "sometimes" in json.dumps(changes):
        assert "'sometimes'" in error["message"] and "none, auto" in error["message"]


def test_a_replayed_conversation_with_refusals_and_function_results_is_spoken(client, spy):
    """Conversation stores keep OpenAI's shapes: an assistant's refusal part and the older ``function``
    role were 400s when the history was sent back."""
    messages = [
        {"role": "user", "content": "Tell me a secret."},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot share that."}]},
        {"role": "function", "name": "get_weather", "content": '{"sky": "clear"}'},
        {"role": "user", "content": "Then say hello."},
    ]
    functions = [{"name": "get_weather"}]
    body = {**STREAM, "stream": False, "modalities": ["text"], "audio": None, "max_tokens": 4,
            "messages": messages, "functions": functions, "function_call": "auto"}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    turns = [(t.role, t.text) for t in spy["generate"][-1].turns]
    assert ("assistant", "I cannot share that.") in turns and turns[-1] == ("user", "Then say hello.")


def test_the_clients_own_limits_log_no_warning(client, caplog):
    """``max_tokens`` cutting a one-piece answer was logged as a WARNING that the piece reached its cap,
    and ``stop`` on an audio answer (whose text is the client's own) was ignored without a word."""
    with caplog.at_level(logging.INFO):
        body = {**STREAM, "audio": {"voice": "default", "format": "wav"}, "max_tokens": 20, "stop": ["today"]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    messages = [r.getMessage() for r in caplog.records]
    assert "max_tokens ran out in piece 1 of 1 of the text" in messages
    assert "stop applies to text answers; ignored for this audio answer" in messages
