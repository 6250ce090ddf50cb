"""Boson's own vLLM client example (``examples/vllm/run_chat_completion.py --stream``) against this server.

Its streaming loop reads ``chunk.choices[0].delta.audio["data"]``: with the current openai SDK ``delta.audio``
is a typed ``ChoiceDeltaAudio``, not a dict, so the example fails in the client whatever the server sends.
These tests send its request shape through the official SDK, show that failure, and check the ways of
reading the audio that the README recommends.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
from conftest import TEST_AUDIO, b64, transcripts


def boson_voice_clone_stream(openai_client):
    """``run_voice_clone(stream=True)``'s request: the native Higgs in-context pattern, no ``audio`` field."""
    return openai_client.chat.completions.create(
        messages=[
            {"role": "user", "content": transcripts()["test_audio.wav"]},
            {
                "role": "assistant",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}}
                ],
            },
            {"role": "user", "content": "Hey there! I am speaking to you in a borrowed voice."},
        ],
        model="higgs-audio-v2",
        max_completion_tokens=30,  # 500 in the example; the tiny model never stops by itself
        stream=True,
        modalities=["text", "audio"],
        temperature=1.0,
        top_p=0.95,
        extra_body={"top_k": 50},
        stop=["<|eot_id|>", "<|end_of_text|>", "<|audio_eos|>"],
        seed=5,  # not in the example: the same audio on every call, so that the reading styles compare
    )


def test_the_examples_dict_access_fails_in_the_sdk(openai_client):
    with boson_voice_clone_stream(openai_client) as stream:  # closed when left early, not when collected
        for chunk in stream:
            if chunk.choices and hasattr(chunk.choices[0].delta, "audio") and chunk.choices[0].delta.audio:
                with pytest.raises(TypeError, match="'ChoiceDeltaAudio' object is not subscriptable"):
                    chunk.choices[0].delta.audio["data"]
                return
    pytest.fail("the stream carried no audio")


def test_the_readme_snippet_reads_the_stream_in_every_sdk_shape(openai_client):
    # The README's snippet ("Boson's client example"), verbatim but for the request.
    pcm = io.BytesIO()
    for chunk in boson_voice_clone_stream(openai_client):
        delta = chunk.choices[0].delta if chunk.choices else None
        audio = delta.model_dump().get("audio") if delta else None  # a dict in every SDK version
        if audio and audio.get("data"):
            pcm.write(base64.b64decode(audio["data"]))
    samples = np.frombuffer(pcm.getvalue(), dtype=np.int16)
    assert len(samples) > 0.5 * 24000  # 30 tokens of audio, minus the delay pattern's columns

    # The other shapes give the same bytes: attribute access and the dict form of the whole chunk.
    by_attribute, by_dict = io.BytesIO(), io.BytesIO()
    for chunk in boson_voice_clone_stream(openai_client):
        if chunk.choices and chunk.choices[0].delta.audio and chunk.choices[0].delta.audio.data:
            by_attribute.write(base64.b64decode(chunk.choices[0].delta.audio.data))
        audio = (chunk.to_dict()["choices"] or [{}])[0].get("delta", {}).get("audio", {})
        if audio.get("data"):
            by_dict.write(base64.b64decode(audio["data"]))
    assert len(by_attribute.getvalue()) == len(by_dict.getvalue()) == len(pcm.getvalue())

    # What the example then does with it: int16 PCM at 24 kHz into a WAV.
    out = io.BytesIO()
    sf.write(out, samples, 24000, format="WAV")
    assert sf.info(io.BytesIO(out.getvalue())).samplerate == 24000
