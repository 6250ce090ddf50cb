"""What OpenAI's chat contract promises a client, kept or refused out loud (found by a new-user trial of text
answers through the ``openai`` SDK), through HTTP on the tiny engine."""

from __future__ import annotations

import json

import pytest
from conftest import TEST_AUDIO, b64

SPEAK = [{"role": "user", "content": "Tell me something."}]
TEXT = {"model": "gpt-4o-audio-preview", "modalities": ["text"], "messages": SPEAK, "max_tokens": 30}


def streamed(client, body: dict) -> list[dict]:
    """The JSON chunks of a streamed chat completion (``[DONE]`` checked and left out)."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize(("seed", "max_tokens"), [(14, 4), (21, 30), (3, 200)])
def test_streamed_text_adds_up_to_the_answer_whole(client, seed, max_tokens):
    """Deltas and the non-streamed content are the same text, whitespace at either end included (the tiny
    model's answers for seeds 14 and 21 end and begin with whitespace; the whole answer was stripped)."""
    body = {**TEXT, "seed": seed, "max_tokens": max_tokens}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    chunks = streamed(client, body)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == whole


REFUSED = [
    ("logprobs", {"logprobs": True}, "logprobs"),
    ("top_logprobs", {"top_logprobs": 3}, "top_logprobs"),
    ("top_logprobs past OpenAI's 20", {"top_logprobs": 25}, "top_logprobs"),
    ("logit_bias", {"logit_bias": {"65": -100}}, "logit_bias"),
    ("logit_bias past OpenAI's 100", {"logit_bias": {"65": 500}}, "logit_bias.65"),
    ("presence_penalty", {"presence_penalty": 1.5}, "presence_penalty"),
    ("frequency_penalty past OpenAI's 2", {"frequency_penalty": 3.0}, "frequency_penalty"),
    ("a tool call required", {"tool_choice": "required"}, "tool_choice"),
    ("a named tool", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("JSON mode", {"response_format": {"type": "json_object"}}, "response_format"),
    ("structured output", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("stream_options without a stream", {"stream_options": {"include_usage": True}}, "stream_options"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "extra", "param"), REFUSED, ids=[r[0] for r in REFUSED])
def test_what_the_server_cannot_do_is_a_400_naming_the_field(client, name, extra, param):
    """An answer that silently ignored these would mislead the client (no log probabilities where it asked
    for them, text where JSON was promised, no tool call where one was required)."""
    response = client.post("/v1/chat/completions", json={**TEXT, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_the_same_fields_asking_for_nothing_are_accepted(client):
    neutral = {
        "logprobs": False, "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0,
        "frequency_penalty": 0.0, "tool_choice": "auto", "response_format": {"type": "text"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }  # fmt: skip
    response = client.post("/v1/chat/completions", json={**TEXT, **neutral})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"] is None


def test_with_include_usage_every_chunk_has_usage_null_until_the_last(client):
    """OpenAI's shape: every chunk carries ``usage``, null but in the last (which has no choices)."""
    chunks = streamed(client, {**TEXT, "stream_options": {"include_usage": True}})
    assert all("usage" in c and "system_fingerprint" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    without = streamed(client, TEXT)
    assert all("usage" not in c for c in without)


def test_every_signed_64_bit_seed_draws_its_own(client):
    """-1 and 2**63 - 1 (and -2**63 and 0) were the same seed once folded into 63 bits."""

    def content(seed: int) -> str:
        response = client.post("/v1/chat/completions", json={**TEXT, "seed": seed})
        return response.json()["choices"][0]["message"]["content"]

    assert content(-1) != content(2**63 - 1)
    assert content(-(2**63)) != content(0)
    assert content(-1) == content(-1)


def test_a_long_spoken_text_with_a_negative_seed_speaks(client):
    """A long text's pieces take the seed plus their index, wrapped into the signed 64-bit range."""
    body = {
        "model": "tts-1", "input": "One sentence here. " * 30, "voice": "default", "response_format": "pcm",
        "seed": 2**63 - 1,
    }  # fmt: skip
    response = client.post("/v1/audio/speech", json=body)
    assert response.status_code == 200 and len(response.content) > 0


@pytest.mark.parametrize(
    ("sent", "param"),
    [({}, "messages"), ({"max_tokens": 300}, "max_tokens"),
     ({"max_completion_tokens": 300}, "max_completion_tokens")],
)  # fmt: skip
def test_a_prompt_too_long_for_the_context_blames_the_field_the_client_sent(client, sent, param):
    """Without ``max_tokens`` the answer's length is the server's default: the messages are what to fix.
    (The prompt, about 8,020 tokens of the tiny tokenizer, fits the 8,192 alone.)"""
    body = {k: v for k, v in TEXT.items() if k != "max_tokens"}
    body = {**body, "messages": [{"role": "user", "content": "x" * 8000}], **sent}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    if param == "messages":
        assert "shorten the messages" in error["message"] and "512" in error["message"]
    else:  # (the engine's words, "shorten the input", name no field of a chat)
        assert error["message"].endswith(f"shorten the messages or lower {param}")


@pytest.mark.parametrize("sent", [{}, {"max_tokens": 30}, {"max_completion_tokens": 30}])
@pytest.mark.parametrize("modalities", [["text"], ["text", "audio"]])
def test_messages_that_alone_fill_the_context_blame_the_messages(client, sent, modalities):
    """No ``max_tokens`` could make them fit: an agent that shrinks ``max_tokens`` when it is blamed would
    loop (a trial's finding: the error named ``max_tokens``)."""
    messages = [{"role": "system", "content": "x" * 9000}, {"role": "user", "content": "Hello there."}]
    body = {**TEXT, "modalities": modalities, "messages": messages, **sent}
    body = {k: v for k, v in body.items() if k != "max_tokens" or "max_tokens" in sent}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert "the prompt alone takes" in error["message"] and error["message"].endswith("shorten the messages")


def test_a_wrong_method_says_which_are_allowed(client):
    response = client.get("/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_transcript_answer_of_a_text_chat_about_audio_ends_at_a_stop_string(client):
    """A text-only chat whose last message holds audio is answered with its transcript: ``stop`` ends it
    too (OpenAI: the returned text does not contain the stop sequence), streamed or not."""
    audio = {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}}
    content = [{"type": "text", "text": "What does it say?"}, audio]
    body = {**TEXT, "messages": [{"role": "user", "content": content}]}
    transcript = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    word = transcript.split()[2]
    cut = client.post("/v1/chat/completions", json={**body, "stop": [word]}).json()
    assert cut["choices"][0]["message"]["content"] == transcript[: transcript.find(word)]
    chunks = streamed(client, {**body, "stop": word})
    deltas = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert deltas == transcript[: transcript.find(word)] and word not in deltas


def test_the_transcript_answer_counts_its_tokens_and_keeps_to_max_tokens(client, engine):
    """The transcript answer's usage counts its tokens as the model's tokenizer does (it said 0), and
    ``max_tokens`` cuts it there, finished by ``length`` (it was ignored), streamed or not."""
    audio = {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}}
    body = {"model": "gpt-4o-audio-preview", "messages": [{"role": "user", "content": [audio]}]}
    whole = client.post("/v1/chat/completions", json=body).json()
    transcript = whole["choices"][0]["message"]["content"]
    tokens = engine.higgs.tokenizer.encode(transcript, add_special_tokens=False)
    assert whole["usage"]["completion_tokens"] == len(tokens) > 4
    assert whole["choices"][0]["finish_reason"] == "stop"
    for limit in ("max_tokens", "max_completion_tokens"):
        cut = client.post("/v1/chat/completions", json={**body, limit: 4}).json()
        assert cut["choices"][0]["finish_reason"] == "length"
        assert cut["choices"][0]["message"]["content"] == engine.higgs.tokenizer.decode(tokens[:4])
        assert cut["usage"]["completion_tokens"] == 4
        assert transcript.startswith(cut["choices"][0]["message"]["content"])
    chunks = streamed(client, {**body, "max_tokens": 4, "stream_options": {"include_usage": True}})
    deltas = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert deltas == engine.higgs.tokenizer.decode(tokens[:4])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
