"""Streaming: chat-completion SSE, speech bodies and speech SSE; joins, cancellation and faults."""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import openai
import pytest
from conftest import TEST_AUDIO, Pcm, b64, chat_audio, decoded_seconds, pcm16_samples

import audio_stream
import codec as codec_module

TEXT = "Streaming should sound exactly like the whole answer."


def chat_body(seed=9, fmt="pcm16", max_tokens=80, voice="default", **extra):
    return {
        "model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
        "audio": {"voice": voice, "format": fmt}, "messages": [{"role": "user", "content": TEXT}],
        "max_tokens": max_tokens, "seed": seed, **extra,
    }  # fmt: skip


def whole(client, body) -> np.ndarray:
    body = {k: v for k, v in body.items() if k != "stream_options"}  # (only allowed with a stream)
    response = client.post("/v1/chat/completions", json={**body, "stream": False})
    assert response.status_code == 200, response.text
    return pcm16_samples(chat_audio(response.json()))


def audio_deltas(chunks) -> list:
    """The ``delta.audio`` objects of a chat stream, in order."""
    return [
        c.choices[0].delta.audio for c in chunks if c.choices and getattr(c.choices[0].delta, "audio", None)
    ]


def streamed_pieces(openai_client, body) -> tuple[list[np.ndarray], list]:
    chunks = list(openai_client.chat.completions.create(**body, stream=True))
    pieces = [pcm16_samples(base64.b64decode(audio.data)) for audio in audio_deltas(chunks) if audio.data]
    return pieces, chunks


def test_chat_stream_matches_the_whole_answer(client, openai_client):
    body = chat_body(stream_options={"include_usage": True})
    pieces, chunks = streamed_pieces(openai_client, body)
    assert len(pieces) >= 3  # several pieces before the end
    joined, reference = np.concatenate(pieces), whole(client, body)
    assert abs(len(joined) - len(reference)) <= 0.02 * len(reference)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    assert rms(joined[: len(reference)] - reference[: len(joined)]) < 0.2 * rms(reference)
    deltas = audio_deltas(chunks)
    assert deltas[0].transcript == TEXT and deltas[0].id.startswith("audio_")
    assert [d.id for d in deltas if d.id] == [deltas[0].id]  # once, as the SDK's helper accumulates it
    assert deltas[-1].expires_at and not any(d.expires_at for d in deltas[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens_details.audio_tokens == 80


def test_an_answer_shorter_than_the_codebooks_delay_streams_as_it_answers(client, openai_client):
    """``max_tokens`` below the delay pattern's 8 columns makes no audio frame: both answers hold the same
    10 ms of silence, and the stream still says its audio's id and transcript."""
    body = chat_body(max_tokens=3)
    pieces, chunks = streamed_pieces(openai_client, body)
    reference = whole(client, body)
    assert len(reference) == 240 and not reference.any()
    assert len(pieces) == 1 and np.array_equal(pieces[0], reference)
    (delta,) = audio_deltas(chunks)
    assert delta.transcript == TEXT and delta.id.startswith("audio_") and delta.expires_at
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_joins_show_no_discontinuity(openai_client):
    pieces, _ = streamed_pieces(openai_client, chat_body(seed=4, max_tokens=120))
    signal = np.concatenate(pieces)
    jumps = np.abs(np.diff(signal))
    joins = np.cumsum([len(p) for p in pieces])[:-1]
    at_joins = max(jumps[j - 2 : j + 1].max() for j in joins)
    elsewhere = np.delete(jumps, np.concatenate([np.arange(j - 2, j + 1) for j in joins]))
    assert at_joins <= elsewhere.max()


def test_cloning_streams_like_it_answers(client, openai_client):
    body = chat_body(voice="clone", max_tokens=60)
    body["messages"][0]["content"] = [
        {"type": "text", "text": TEXT},
        {
            "type": "input_audio",
            "input_audio": {"data": b64(TEST_AUDIO), "format": "wav", "transcript": "known"},
        },
    ]
    pieces, chunks = streamed_pieces(openai_client, body)
    joined, reference = np.concatenate(pieces), whole(client, body)
    assert len(joined) == len(reference)
    assert np.corrcoef(joined, reference)[0, 1] > 0.95


def fed_stream(layout, frames: int, beyond: int = 0) -> audio_stream.AudioStream:
    """A stream fed random columns (values up to ``beyond`` past the codec's range) until it holds ``frames``
    frames, its pieces cut as the engine cuts them (and dropped)."""
    draw = np.random.default_rng(frames)
    stream = audio_stream.AudioStream(None, layout, lambda item: None, lambda: None)
    for _ in range(frames + layout.codebooks + 1):  # the begin marker, the delay, the dropped last frame
        stream.add(draw.integers(0, layout.codebook_size + beyond, layout.codebooks))
        if stream.sent == 0 and stream.first_due_in <= 0:
            stream.cut_first()
    assert stream.frames == frames
    return stream


def test_a_stream_reverts_the_delay_pattern_as_upstream_does(engine, monkeypatch):
    """A stream turns its columns into frames itself (in numpy: ``AudioStream._frames``): the codes of every
    piece it cuts, and its whole codes, are what upstream's ``revert_delay_pattern`` gives for the same
    columns, clipped to the codec's range (some columns here hold values beyond it, as markers do)."""
    import torch
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    layout = engine._layout
    cut: list[tuple[int, int, torch.Tensor]] = []
    real_frames = audio_stream.AudioStream._frames

    def frames(self, first: int, upto: int) -> torch.Tensor:
        codes = real_frames(self, first, upto)
        cut.append((first, upto, codes))
        return codes

    monkeypatch.setattr(audio_stream.AudioStream, "_frames", frames)
    stream = fed_stream(layout, 50, beyond=2)
    stream.final()
    columns = torch.from_numpy(np.stack(stream.columns, axis=1))
    upstream = revert_delay_pattern(columns).clip(0, layout.codebook_size - 1)  # frame j: its column 0 is j
    assert len(cut) > 3 and cut[-1][1] == stream.frames == 50
    for first, upto, codes in cut:
        assert torch.equal(codes, upstream[:, 1 + first : 1 + upto]), (first, upto)
    assert torch.equal(stream.codes().codes, upstream[:, 1 : 1 + stream.frames])


def test_a_stream_s_last_piece_decoded_at_the_regular_length_is_the_one_shot_decode(engine):
    """With ``Layout.end_frames`` (on CUDA: the regular pieces' length, which has captured graphs) a
    stream's last piece takes more of the frames already sent as its left context: it sends the same
    frames, its samples are the one-shot decode's (the tiny codec's too: up to float rounding with 12 or
    more frames of context, 4e-3 of the peak with 9; with the 4 frames of context alone 7-12%), and ends
    whose last pieces would differ in length go to the codec in one call. A stream shorter than that
    length keeps its last piece as it is."""
    decode = engine.higgs.codec.decode
    regular = engine.streaming.piece_frames
    plain, longer = engine._layout, dataclasses.replace(engine._layout, end_frames=regular)
    result = audio_stream.GenerationResult("", None, "stop", 1, 0, 1, 1, 1.0)
    ends = {}
    for frames in (45, 50, 57, 63):
        as_is, stream = fed_stream(plain, frames).final(), fed_stream(longer, frames)
        assert stream.final_frames == regular > as_is.codes.shape[1]
        last = stream.final()
        spf = stream.samples_per_frame
        assert last.codes.shape[1] == regular and last.stop - last.start == as_is.stop - as_is.start
        one_shot = decode(stream.codes().codes[None])[0, 0][frames * spf - (last.stop - last.start) :]
        got = decode(last.codes[None])[0, 0][last.start : last.stop]
        assert np.abs(got - one_shot).max() <= 1e-2 * np.abs(one_shot).max(), frames
        ends[frames] = audio_stream.End(fed_stream(longer, frames), result)
    assert audio_stream.next_codec_work(list(ends.values())) == list(ends.values())  # one call
    short = fed_stream(longer, regular - 3)
    assert short.final_frames == fed_stream(plain, regular - 3).final_frames < regular


def test_streams_end_with_their_last_piece_at_the_regular_length_through_http(client, engine, monkeypatch):
    """Through HTTP, with the engine's layout as on CUDA: the answer keeps its length and every sample
    before its last piece, and the last piece, decoded at the regular length, is another decode of the
    same codes (nearer the one-shot decode, above)."""
    body = chat_body(seed=5, max_tokens=80)
    ends: list[tuple[int, int]] = []
    real_run = engine._codec_run

    def end_streams(items):
        ends.extend(
            (item.frames, item.stream.frames - item.stream.sent)
            for item in items
            if isinstance(item, audio_stream.End)
        )
        real_run(items)

    monkeypatch.setattr(engine, "_codec_run", end_streams)
    as_is = whole(client, body)
    regular = engine.streaming.piece_frames
    monkeypatch.setattr(engine, "_layout", dataclasses.replace(engine._layout, end_frames=regular))
    longer = whole(client, body)
    monkeypatch.undo()
    (frames, left), (longer_frames, longer_left) = ends
    assert frames < regular == longer_frames and left == longer_left > 0
    last = left * engine.sample_rate // engine.frame_rate
    assert len(longer) == len(as_is) and np.array_equal(longer[:-last], as_is[:-last])
    assert not np.array_equal(longer[-last:], as_is[-last:])
    assert np.corrcoef(longer[-last:], as_is[-last:])[0, 1] > 0.8


def test_streamed_audio_must_be_pcm16(client):
    response = client.post("/v1/chat/completions", json=chat_body(fmt="wav", stream=True))
    assert response.status_code == 400 and response.json()["error"]["param"] == "audio.format"


def test_text_only_stream_matches_the_whole_answer(client, openai_client):
    body = {"model": "higgs-audio-v2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
    seed = next(seed for seed in range(20) if client.post("/v1/chat/completions", json={**body, "seed": seed})
                .json()["choices"][0]["message"]["content"])  # fmt: skip
    whole_text = client.post("/v1/chat/completions", json={**body, "seed": seed}).json()
    chunks = list(openai_client.chat.completions.create(**body, seed=seed, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "".join(pieces).strip() == whole_text["choices"][0]["message"]["content"]
    assert chunks[-1].choices[0].finish_reason == whole_text["choices"][0]["finish_reason"]


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "opus", "aac"])
def test_speech_body_streams_as_it_is_made(client, openai_client, fmt):
    reference = whole(client, chat_body(seed=2, max_tokens=None))  # same prompt, seed and default cap
    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1", input=TEXT, voice="default", response_format=fmt, extra_body={"seed": 2}
    ) as response:
        pieces = list(response.iter_bytes())
    assert len(pieces) >= 3
    data = b"".join(pieces)
    seconds = len(data) / 48000 if fmt == "pcm" else decoded_seconds(data)
    if fmt == "pcm":
        samples = pcm16_samples(data)
        assert np.array_equal(samples, reference) or np.abs(samples - reference).max() < 0.02
    # mp3 and aac fill their last frame (1152 and 1024 samples, up to 48 ms at 24 kHz); decoders may keep it.
    assert abs(seconds - len(reference) / 24000) <= 0.02 * len(reference) / 24000 + (
        0.05 if fmt in ("aac", "mp3") else 0
    )


def test_speech_sse_events(client):
    body = {"model": "gpt-4o-mini-tts", "input": TEXT, "voice": "default", "response_format": "mp3",
            "stream_format": "sse", "seed": 2}  # fmt: skip
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    data = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert decoded_seconds(data) > 1.0


def test_disconnect_stops_generation_and_the_next_request_is_served(client, engine):
    """The client leaves after the first piece of a 1500-step request: generation stops within a step or
    two of noticing, the worker is free, and the next request runs in full. In the metrics the one left
    counts its wait for a slot and the audio it decoded, not its times (its real-time factor, to where its
    client left, looked better than any finished request's)."""

    def counts() -> dict[str, float]:
        lines = client.get("/metrics").text.splitlines()
        names = ("queue_wait_seconds", "generation_seconds", "realtime_factor")
        names = [f"higgs_{name}_count" for name in names]
        return {name: float(next(x for x in lines if x.startswith(name + " ")).split()[-1]) for name in names}

    counted = counts()
    before = engine.steps
    with client.stream(
        "POST", "/v1/chat/completions", json=chat_body(max_tokens=1500, stream=True)
    ) as response:
        for line in response.iter_lines():
            if '"audio"' in line and '"data"' in line:
                break  # first audio piece: hang up
    after = client.post("/v1/chat/completions", json=chat_body(seed=3, max_tokens=10))
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 10
    cancelled_steps = engine.steps - before - 10
    assert 0 < cancelled_steps < 150, cancelled_steps
    added = [n - counted[name] for name, n in counts().items()]
    assert added == [2, 1, 1], added  # slot waits; generation times and real-time factors


def test_a_fault_mid_generation_ends_the_stream_with_an_error_event(client, openai_client, monkeypatch):
    real_join = audio_stream.AudioStream.join
    sent = {"n": 0}

    def failing_join(self, piece, *decoded):
        sent["n"] += 1
        if sent["n"] == 2:
            raise RuntimeError("injected fault")
        return real_join(self, piece, *decoded)

    monkeypatch.setattr(audio_stream.AudioStream, "join", failing_join)
    stream = openai_client.chat.completions.create(**chat_body(max_tokens=200), stream=True)
    received = []
    with pytest.raises(openai.APIError, match="generation failed"):
        for chunk in stream:
            received.append(chunk)
    assert audio_deltas(received)

    sent["n"] = 1  # speech SSE gets the same treatment: its second piece fails
    body = {
        "model": "tts-1",
        "input": TEXT,
        "voice": "default",
        "stream_format": "sse",
        "response_format": "pcm",
    }
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "server_error"

    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json=chat_body(max_tokens=10)).status_code == 200


def test_the_codec_graphs_decode_as_the_codec_does(engine):
    """What ``codec.PieceDecoder`` captures as a CUDA graph (its own forward, without the codec's host
    copies) decodes a batch of pieces as the codec's ``decode`` does. Here on the CPU, where ``decode``
    itself goes straight to the codec; the capture and its replay check run on CUDA only."""
    import torch

    pieces = engine._pieces
    codes = torch.randint(0, 1024, (3, engine.num_codebooks, 20), generator=torch.Generator().manual_seed(3))
    ours = pieces._forward(codes).numpy()
    theirs = engine.higgs.codec.decode(codes)
    assert ours.shape == theirs.shape == (3, 1, 20 * engine.sample_rate // engine.frame_rate)
    assert np.allclose(ours, theirs, atol=1e-6) and np.array_equal(pieces.decode(codes), theirs)


def _final_conv_samples(engine) -> tuple[list[int], object]:
    """The input lengths the codec decoder's last convolution sees, as it runs (and its hook, to remove)."""
    seen: list[int] = []
    last = engine.higgs.codec.decoder_2.model[-1]
    return seen, last.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-1]))


def test_a_piece_decoded_in_part_is_that_part_of_its_whole_decode(engine):
    """Only the samples a stream sends are decoded (``PieceDecoder.decode_part``): each stage of the
    codec's decoder computes the part of its activations those samples depend on, and they equal the
    whole piece's decode but for float rounding (its convolutions sum in another order for another
    length: 1e-7 here, against a peak of 0.1). A first piece (its 4 frames and the crossfade's tail), a
    later one (its 12 frames between 4 of context on each side), a last one (to its end), the whole piece
    and an arbitrary span, one piece and several. Without the margins of what each stage reaches the same
    spans come out wrong (so this comparison can fail), and the last convolution sees fewer samples than
    the whole piece has wherever the span is shorter."""
    import torch

    pieces = engine._pieces
    spf = engine.sample_rate // engine.frame_rate
    fade = int(engine.sample_rate * engine.streaming.crossfade_ms / 1000)
    upsampling = [stage.upsampling for stage in pieces.stages or [] if stage.upsampling > 1]
    assert upsampling == [6, 5, 4, 8]  # the real decoder's stages, which the tiny codec keeps
    generator = torch.Generator().manual_seed(11)
    margins_off = [dataclasses.replace(stage, margin=0) for stage in pieces.stages]
    for batch, frames, start, stop in [
        (1, 8, 0, 4 * spf + fade),
        (4, 8, 0, 4 * spf + fade),
        (1, 20, 4 * spf, 16 * spf + fade),
        (3, 20, 4 * spf, 16 * spf + fade),
        (2, 20, 7 * spf + 5, 20 * spf),
        (1, 20, 0, 20 * spf),
        (2, 13, 1234, 5678),
    ]:
        codes = torch.randint(0, 1024, (batch, engine.num_codebooks, frames), generator=generator)
        whole = engine.higgs.codec.decode(codes)[..., start:stop]
        seen, hook = _final_conv_samples(engine)
        try:
            part = pieces.decode_part(codes, start, stop)
        finally:
            hook.remove()
        peak = np.abs(whole).max()
        assert part.shape == whole.shape == (batch, 1, stop - start)
        assert np.abs(part - whole).max() <= 1e-5 * peak, (batch, frames, start, stop)
        shorter = stop - start < frames * spf
        assert (seen[0] < frames * spf) == shorter and seen[0] >= stop - start, (seen, frames * spf)
        if shorter:
            pieces.stages, kept = margins_off, pieces.stages
            try:
                wrong = pieces.decode_part(codes, start, stop)
            finally:
                pieces.stages = kept
            assert np.abs(wrong - whole).max() > 1e-3 * peak, (batch, frames, start, stop)


def test_streams_decode_only_what_they_send_and_sound_the_same_through_http(client, engine, monkeypatch):
    """Through HTTP the codec decodes each call's pieces in part (``AudioStream.span``: the samples sent
    and the crossfade's tail): a streamed speech body and a whole chat answer sound as they do when every
    piece is decoded whole (within one step of 16-bit PCM, ``Pcm``), while the decoder's last convolution
    goes over at most 0.8x the samples."""
    speech = {"model": "tts-1", "input": TEXT, "voice": "default", "response_format": "pcm", "seed": 2}

    def answers() -> tuple[list, int]:
        seen, hook = _final_conv_samples(engine)
        try:
            streamed = client.post("/v1/audio/speech", json=speech)
            chat = client.post("/v1/chat/completions", json=chat_body(seed=3, max_tokens=70))
        finally:
            hook.remove()
        assert streamed.status_code == 200 and chat.status_code == 200
        return [Pcm(streamed.content), Pcm(chat_audio(chat.json()))], sum(seen)

    in_part, samples_in_part = answers()

    def whole_piece(self, piece) -> tuple[int, int]:  # every piece decoded whole, as before
        return 0, piece.codes.shape[1] * self.samples_per_frame

    monkeypatch.setattr(audio_stream.AudioStream, "span", whole_piece)
    whole_pieces, samples_whole = answers()
    assert in_part == whole_pieces
    assert 0 < samples_in_part <= 0.8 * samples_whole, (samples_in_part, samples_whole)


def test_the_codec_runs_with_its_weight_norm_folded_and_gives_upstreams_numbers(engine, tiny_settings):
    """The engine folds the codec's weight normalisation into plain weights at load (``codec.
    bake_weight_norm``) and runs its Snake activations on one buffer each (``codec.snakes_in_place``):
    nothing recomputes the weights per call any more, and decoding (a first piece, a later one, a batch)
    and encoding give exactly what the codec as upstream loads it gives."""
    import torch
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer

    def hooks(codec) -> list[str]:
        return [type(h).__name__ for m in codec.modules() for h in m._forward_pre_hooks.values()]

    def snakes(codec) -> list[bool]:  # per Snake activation: does it run in place?
        return [
            getattr(m.forward, "__func__", None) is codec_module._snake_in_place
            for m in codec.modules()
            if type(m).__name__ == "Snake1d"
        ]

    upstream = load_higgs_audio_tokenizer(tiny_settings["HIGGS_AUDIO_TOKENIZER"], device="cpu")
    codec = engine.higgs.codec
    assert "WeightNorm" not in hooks(codec) and "WeightNorm" in hooks(upstream)
    assert len(snakes(codec)) > 20 and all(snakes(codec)) and not any(snakes(upstream))
    generator = torch.Generator().manual_seed(5)
    t = np.arange(engine.sample_rate, dtype=np.float32) / engine.sample_rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    rate = engine.sample_rate
    with torch.inference_mode():
        for shape in [(1, 8), (1, 20), (2, 12)]:
            codes = torch.randint(0, 1024, (shape[0], engine.num_codebooks, shape[1]), generator=generator)
            assert np.array_equal(engine.higgs.codec.decode(codes), upstream.decode(codes)), shape
        assert torch.equal(engine.higgs.codec.encode(tone, rate), upstream.encode(tone, rate))


def test_a_snake_in_place_leaves_its_input_alone_and_steps_aside_under_autograd(engine):
    """An in-place Snake writes only its own new buffer (its input feeds the residual sum after it), and
    where gradients are recorded it runs upstream's form, whose backward pass works."""
    import torch

    snake = next(m for m in engine.higgs.codec.modules() if type(m).__name__ == "Snake1d")
    x = torch.randn(1, snake.alpha.shape[1], 50, generator=torch.Generator().manual_seed(6))
    kept = x.clone()
    with torch.inference_mode():
        fast = snake(x)
    assert torch.equal(x, kept) and torch.equal(fast, type(snake).forward(snake, x))
    with torch.enable_grad():
        x.requires_grad_(True)
        out = snake(x)
        out.sum().backward()
    snake.alpha.grad = None  # the engine's codec is shared by the other tests
    assert torch.equal(out.detach(), fast) and x.grad is not None


def test_every_event_stream_tells_caches_and_proxies_not_to_hold_it(client):
    """Server-sent events went out with their content type alone: a reverse proxy (nginx buffers a response
    unless told not to) or a cache could hold them back, and a listener heard nothing until the end."""
    chat = {"model": "gpt-4o-audio-preview", "modalities": ["text"], "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": "Hi."}]}  # fmt: skip
    speech = {"model": "tts-1", "input": "Hi.", "voice": "default", "stream_format": "sse", "seed": 1}
    upload = {"files": {"file": ("a.wav", TEST_AUDIO.read_bytes(), "audio/wav")},
              "data": {"model": "gpt-4o-transcribe", "stream": "true"}}  # fmt: skip
    for path, kwargs in (
        ("/v1/chat/completions", {"json": chat}),
        ("/v1/audio/speech", {"json": speech}),
        ("/v1/audio/transcriptions", upload),
    ):
        with client.stream("POST", path, **kwargs) as response:
            response.read()
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        assert response.headers["cache-control"] == "no-cache", path
        assert response.headers["x-accel-buffering"] == "no", path
