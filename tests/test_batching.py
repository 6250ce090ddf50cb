"""Continuous batching through HTTP on the tiny engine: requests decoded together each get their own answer.

Why their tokens are exactly those of the request alone: on the CPU the decoder computes every slot at every
step and rounds the attention length up to a bucket (1024 tokens for these prompts), so a request's numbers
never depend on how many others are decoding; each prompt is prefilled in its own pass; and a request's
random numbers are a hash of its own seed and position. Its audio is the same to within one step of 16-bit
PCM (``Pcm``): the first pieces of streams that are due together share a codec call, whose rounding differs
from a piece decoded alone by up to 1.6e-7. (On a GPU, bfloat16 and batch-size-dependent kernels make the
tokens "close", not "equal".)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TEST_AUDIO, Pcm, b64, post_then_hang_up, unheard_gain, wav_b64

import audio_stream
import decoder
import engine as engine_module
import generation
import layers
import prefill

SPEAK = "Read this sentence aloud, please."


def chat(seed: int | None = 1, max_tokens: int = 30, voice="default", text=SPEAK, **extra) -> dict:
    body = {
        "model": "gpt-4o-audio-preview", "modalities": ["text", "audio"],
        "audio": {"voice": voice, "format": "wav"}, "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens, **extra,
    }  # fmt: skip
    if seed is not None:
        body["seed"] = seed
    return body


def clone(seed: int, max_tokens: int, **extra) -> dict:
    content = [
        {"type": "text", "text": "Say it like me: batching works."},
        {"type": "input_audio", "input_audio": {"data": b64(TEST_AUDIO), "format": "wav"}},
    ]
    return {
        **chat(seed, max_tokens, voice="clone", **extra),
        "messages": [{"role": "user", "content": content}],
    }


def text_chat(seed: int, max_tokens: int, **extra) -> dict:
    return {
        "model": "gpt-4o-audio-preview", "modalities": ["text"],
        "messages": [{"role": "user", "content": "Tell me something."}],
        "max_tokens": max_tokens, "seed": seed, **extra,
    }  # fmt: skip


def answer(response) -> tuple:
    """What must not change when others decode alongside: the audio (within one step of 16-bit PCM:
    ``Pcm``) or text, the finish, the usage."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("audio/"):
        return ("speech", Pcm(response.content))
    body = response.json()
    choice = body["choices"][0]
    message = choice["message"]
    if message.get("audio"):
        content = Pcm(base64.b64decode(message["audio"]["data"]))
    else:
        content = message["content"]
    return (content, choice["finish_reason"], json.dumps(body["usage"], sort_keys=True))


def post(client, body: dict):
    path = "/v1/audio/speech" if "input" in body else "/v1/chat/completions"
    return client.post(path, json=body)


def together(client, bodies: list[dict]) -> list:
    """Post every body at once (one thread each); the answers in the bodies' order."""
    results: list = [None] * len(bodies)
    gate = threading.Barrier(len(bodies))

    def run(i: int) -> None:
        gate.wait()
        results[i] = post(client, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def settle(engine) -> None:
    """Wait until the engine holds nothing (answers are sent a moment before their job is released)."""
    deadline = time.monotonic() + 10
    while (engine.pending or engine.stats().busy_slots) and time.monotonic() < deadline:
        time.sleep(0.01)


def assert_idle(client, engine) -> None:
    """No slot, queue entry or pending job is left behind; /metrics says the same."""
    settle(engine)
    stats = engine.stats()
    assert (engine.pending, stats.busy_slots, stats.waiting) == (0, 0, 0)
    assert engine._first_pieces == 0  # else the CPU's decoding loop would wait for the codec for good
    metrics = client.get("/metrics").text
    assert "higgs_batch_occupancy 0.0" in metrics and "higgs_waiting_requests 0.0" in metrics
    assert "higgs_kept_slots 0.0" in metrics and "higgs_finishing_requests 0.0" in metrics
    assert f"higgs_batch_slots {float(engine.slots)}" in metrics


@pytest.fixture(params=[0, 1, 2], ids=["step by step", "lookahead", "two steps ahead"])
def lookahead(request, engine, monkeypatch):
    """The engine taking each step's tokens before launching the next (the CPU's way), while the next one
    runs (CUDA's), or while the next two run (``HIGGS_LOOKAHEAD_STEPS=2``): nothing a client gets may
    differ."""
    monkeypatch.setattr(engine, "lookahead", request.param > 0)
    monkeypatch.setattr(engine, "lookahead_steps", max(1, request.param))
    return request.param


@pytest.fixture(scope="module")
def stored_voice(client):
    with open(TEST_AUDIO, "rb") as f:
        created = client.post(
            "/v1/audio/voices",
            data={"name": "batcher", "transcript": "A stored voice for the batching tests."},
            files={"audio_sample": ("v.wav", f, "audio/wav")},
        )
    assert created.status_code == 200, created.text
    yield "batcher"
    client.delete("/v1/audio/voices/batcher")


def test_eight_concurrent_requests_each_get_their_own_answer(client, engine, stored_voice, lookahead):
    bodies = [
        chat(seed=1, max_tokens=30),
        chat(seed=None, max_tokens=41, temperature=0, text="Greedy, and no seed at all."),
        clone(seed=2, max_tokens=24, temperature=1.0, top_p=0.8),
        chat(seed=3, max_tokens=36, voice=stored_voice),
        chat(seed=4, max_tokens=18, voice="nova", text="A built-in voice."),
        text_chat(seed=5, max_tokens=20),
        text_chat(seed=6, max_tokens=12, temperature=0.3),
        {"model": "tts-1", "input": "Speech, in the same batch.", "voice": "default",
         "response_format": "pcm", "seed": 7},
    ]  # fmt: skip
    alone = [answer(post(client, body)) for body in bodies]
    batch_steps = engine.batch_steps
    steps = engine.steps
    concurrent = [answer(r) for r in together(client, bodies)]
    for i, (a, c) in enumerate(zip(alone, concurrent, strict=True)):
        assert a == c, f"request {i} changed when decoded with the others"
    # They really were decoded together: far fewer batched steps than request steps.
    assert engine.batch_steps - batch_steps < 0.6 * (engine.steps - steps)
    usage = [json.loads(a[2]) for a in alone if len(a) == 3]
    assert [u["completion_tokens"] for u in usage[:2]] == [30, 41]
    metrics = client.get("/metrics").text
    waits = next(line for line in metrics.splitlines() if line.startswith("higgs_queue_wait_seconds_count"))
    assert float(waits.split()[-1]) >= 2 * len(bodies)
    assert "higgs_decode_steps_per_second" in metrics and "higgs_audio_seconds_per_second" in metrics
    assert_idle(client, engine)


def test_the_rates_are_per_second_of_decoding_not_of_the_window():
    """``higgs_decode_steps_per_second`` and ``higgs_audio_seconds_per_second`` were the counts over the
    wall time of their 10 s window, so a request after a pause showed its rate diluted by the pause (an
    operator's trial: 41 steps per second where it ran 190). Now per second the loop worked: 2 s of
    decoding 2 rows at 100 steps per second, 4.5 s idle, then 1 s more."""
    from engine import RateSample, decoding_rates

    samples = [
        RateSample(time=0.0, steps=0, frames=0, busy=10.0),
        RateSample(time=2.0, steps=200, frames=400, busy=12.0),
        RateSample(time=6.5, steps=201, frames=402, busy=12.01),  # the first step after the pause
        RateSample(time=7.5, steps=300, frames=600, busy=13.0),
    ]
    steps, audio = decoding_rates(samples, frame_rate=25)
    assert steps == pytest.approx(100) and audio == pytest.approx(600 / 25 / 3)
    assert decoding_rates(samples[:1], frame_rate=25) == (0.0, 0.0)


def test_a_results_time_is_split_into_its_fill_its_decoding_and_its_last_audio(client, engine, monkeypatch):
    """``fill_seconds`` (slot to first token), ``decode_seconds`` (first token to last) and the rest (the
    codec's tail) each hold their own part: a fill slowed by a second shows in the fill alone, a stream's last
    codec call slowed by a second in its tail alone (the others within half a second of their times
    unslowed: this machine's noise); ``/metrics`` has them by phase."""
    seen: list = []
    real_fill, real_run = engine._decoder.fill, engine._codec_run

    def slow_fill(admissions, batch=None):
        time.sleep(1.0)
        return real_fill(admissions, batch)

    def slow_end(work):
        if any(isinstance(item, audio_stream.End) for item in work):
            time.sleep(1.0)
        return real_run(work)

    def phases(body: dict):
        engine.observers.append(seen.append)
        try:
            assert post(client, body).status_code == 200
            settle(engine)
        finally:
            engine.observers.remove(seen.append)
        result = seen.pop()
        tail = result.seconds - result.fill_seconds - result.decode_seconds
        assert min(result.fill_seconds, result.decode_seconds, tail) >= 0
        return result.fill_seconds, result.decode_seconds, tail

    def sums() -> dict[str, float]:
        lines = client.get("/metrics").text.splitlines()
        names = [f'higgs_generation_phase_seconds_sum{{phase="{p}"}}' for p in ("fill", "decode", "finish")]
        return {
            name: float(next((line for line in lines if line.startswith(name)), "x 0").split()[-1])
            for name in [*names, "higgs_generation_seconds_sum"]
        }

    before = sums()
    body = chat(seed=21, max_tokens=20)
    fill, decode, tail = phases(body)
    monkeypatch.setattr(engine._decoder, "fill", slow_fill)
    slow = phases(body)
    assert slow[0] >= 1.0 and slow[1] < decode + 0.5 and slow[2] < tail + 0.5
    monkeypatch.setattr(engine._decoder, "fill", real_fill)
    monkeypatch.setattr(engine, "_codec_run", slow_end)
    slow = phases(body)
    assert slow[2] >= 1.0 and slow[0] < fill + 0.5 and slow[1] < decode + 0.5
    text = phases(text_chat(seed=22, max_tokens=8))
    assert text[2] < 0.5  # a text answer's result goes out with its last token
    added = [after - before[name] for name, after in sums().items()]
    assert added[0] >= 1.0 and added[2] >= 1.0  # the slowed fill, the slowed tail
    assert sum(added[:3]) == pytest.approx(added[3])  # the phases make up each result's time
    assert_idle(client, engine)


def test_running_requests_step_on_while_newcomers_are_prefilled(client, engine, monkeypatch, lookahead):
    """CUDA's way (``prefill_beside_steps``): the prefill thread fills the newcomers' slots while the running
    request goes on stepping, and they join at the step after their fill is done. Every answer is the one it
    gets alone: the steps run meanwhile leave the slots being filled alone, and a fill writes its own."""
    monkeypatch.setattr(engine, "prefill_beside_steps", True)
    long = chat(seed=15, max_tokens=120)
    newcomers = [
        chat(seed=16, max_tokens=25, text="I join while it decodes."),
        text_chat(seed=17, max_tokens=12),
    ]
    alone_long = answer(post(client, long))
    alone = [answer(post(client, body)) for body in newcomers]
    launches = [0]
    during: list[int] = []  # steps launched while a newcomer's fill lingered
    real_fill, real_launch = engine._decoder.fill, engine._decoder.launch

    def launch():
        launches[0] += 1
        return real_launch()

    def fill(admissions, batch=None):
        filled = real_fill(admissions, batch)
        if engine._running:  # a newcomer: its fill lingers until a step has run beside it
            before, deadline = launches[0], time.monotonic() + 10
            time.sleep(0.2)
            # On a CPU the steps also wait while a first piece is decoded, which on a busy machine can
            # outlast a fixed pause: linger until one runs, or give up well after it should have.
            while launches[0] == before and time.monotonic() < deadline:
                time.sleep(0.01)
            during.append(launches[0] - before)
        return filled

    monkeypatch.setattr(engine._decoder, "fill", fill)
    monkeypatch.setattr(engine._decoder, "launch", launch)
    results: dict = {}
    long_thread = threading.Thread(target=lambda: results.update(long=post(client, long)))
    long_thread.start()
    deadline = time.monotonic() + 30
    while engine.stats().busy_slots == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    joined = [answer(r) for r in together(client, newcomers)]
    long_thread.join()
    assert joined == alone and answer(results["long"]) == alone_long
    assert during and min(during) > 0, during
    monkeypatch.undo()
    assert_idle(client, engine)


def test_a_request_joins_while_another_decodes_and_others_leave_early(client, engine, lookahead):
    long = chat(seed=11, max_tokens=150)
    short = chat(seed=12, max_tokens=20, text="I join late and leave early.")
    probe = text_chat(seed=13, max_tokens=30)
    alone_long, alone_short = answer(post(client, long)), answer(post(client, short))
    alone_text = post(client, probe).json()["choices"][0]["message"]["content"]
    # The tiny model's text is random characters: stop at the first plain one after the third.
    stop = next(c for c in alone_text[3:] if c.isascii() and c.isprintable() and not c.isspace())
    expected_text = alone_text[: alone_text.find(stop)]

    results: dict = {}
    first_piece = threading.Event()

    def run_long() -> None:
        results["long"] = post(client, long)

    def run_leaver() -> None:  # a streamed request whose client hangs up after its first piece
        with client.stream(
            "POST", "/v1/chat/completions", json={**chat(seed=14, max_tokens=400), "stream": True}
        ) as r:
            for line in r.iter_lines():
                if '"audio"' in line and '"data"' in line:
                    break
        first_piece.set()

    long_thread = threading.Thread(target=run_long)
    long_thread.start()
    deadline = time.monotonic() + 30
    while engine.stats().busy_slots == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    steps_before_join = engine.batch_steps
    leaver = threading.Thread(target=run_leaver)
    leaver.start()
    joined = answer(post(client, short))  # joins the running long request and leaves before it ends
    assert "long" not in results and engine.batch_steps > steps_before_join
    stopped = post(client, {**probe, "stop": [stop]}).json()
    leaver.join()
    long_thread.join()

    assert joined == alone_short
    assert answer(results["long"]) == alone_long
    assert stopped["choices"][0]["message"]["content"] == expected_text
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert_idle(client, engine)


def test_a_finished_request_counts_until_its_last_audio_is_decoded(engine, client, monkeypatch):
    """Its slot is free as soon as its tokens are done, but the codec may still be decoding its last piece
    (seconds behind on a CPU under load): until the result goes out it counts against the bound, the queue
    gauge shows it, and so do ``higgs_finishing_requests`` and the words of the 429 it causes (an idle
    occupancy beside a 429 puzzled a user), and Retry-After's measure of a request's time includes the
    wait."""
    gate = threading.Event()
    real_run = engine._codec_run

    def slow_end(work):
        if any(isinstance(item, audio_stream.End) for item in work):
            gate.wait(30)
        real_run(work)

    monkeypatch.setattr(engine, "_codec_run", slow_end)
    monkeypatch.setattr(engine, "_job_seconds", 0.0)
    released = threading.Event()
    at_each_release(engine, monkeypatch, lambda: released.set() or 0)
    request = generation.GenerationRequest(
        [generation.Turn("user", "Count me.")], True, 20, 0.7, 0.95, 50, seed=3
    )

    async def run() -> tuple[int, int, float]:
        events = engine.stream(request)
        assert isinstance(await anext(events), generation.Started)

        def slot_freed() -> None:
            released.wait(30)
            time.sleep(0.3)  # the last piece waits at the codec

        await asyncio.to_thread(slot_freed)
        seen = (engine.stats().busy_slots, engine.pending, engine._job_seconds)
        finishing = (engine.stats().finishing, client.get("/metrics").text)
        with monkeypatch.context() as full:
            full.setattr(engine, "max_queue", 1)
            refused = client.post("/v1/chat/completions", json=chat(seed=1))
        gate.set()
        async for _ in events:
            pass
        return seen, finishing, refused

    (busy, pending, job_seconds), (finishing, metrics), refused = asyncio.run(run())
    assert (busy, pending, job_seconds) == (0, 1, 0.0)
    assert finishing == 1 and "higgs_finishing_requests 1.0" in metrics and "higgs_queue_depth 1.0" in metrics
    assert refused.status_code == 429
    message = refused.json()["error"]["message"]
    assert "(1 request running or waiting, 1 of them finishing their audio)" in message
    settle(engine)
    assert engine.pending == 0 and engine._job_seconds >= 0.2 * 0.3  # the codec's wait counted
    assert engine.stats().finishing == 0
    monkeypatch.undo()
    assert_idle(client, engine)


def at_each_release(engine, monkeypatch, read: Callable[[], int]) -> list[int]:
    """``read()`` noted each time the decoder frees a slot (before it does)."""
    noted: list[int] = []
    real_release = engine._decoder.release

    def release(slot: int) -> None:
        noted.append(read())
        real_release(slot)

    monkeypatch.setattr(engine._decoder, "release", release)
    return noted


def test_a_cancelled_slot_is_free_within_one_step(engine, client, monkeypatch, lookahead):
    released = at_each_release(engine, monkeypatch, lambda: engine.batch_steps)
    turns = [generation.Turn("user", "Cancel me.")]
    request = generation.GenerationRequest(turns, True, 500, 0.7, 0.95, 50, seed=1)
    keep = generation.GenerationRequest(turns, True, 60, 0.7, 0.95, 50, seed=2)

    async def run() -> int:
        other = asyncio.ensure_future(engine.generate(keep))
        stream = engine.stream(request)
        async for event in stream:
            if isinstance(event, generation.AudioPiece):
                break
        await stream.aclose()  # sets the cancel flag; the slot must be free one step later at most
        at_cancel = engine.batch_steps
        await other
        return at_cancel

    at_cancel = asyncio.run(run())
    assert released and released[0] - at_cancel <= 1
    assert_idle(client, engine)


def test_the_queued_pieces_of_a_stream_whose_client_left_are_not_decoded(engine, client, monkeypatch):
    """A client that leaves (a closed stream, Stop on the web page) frees its slot within a step, and the
    pieces it had waiting for the codec are dropped, not decoded for nobody (here the codec is slowed
    down so that they pile up: four more are due when the client leaves)."""
    real_decode = engine._pieces.decode_part

    def slow(codes, *span):
        time.sleep(0.3)
        return real_decode(codes, *span)

    joined: list[float] = []  # when each piece was decoded and sent
    real_join = audio_stream.AudioStream.join

    def join(self, piece, *decoded):
        joined.append(time.monotonic())
        return real_join(self, piece, *decoded)

    monkeypatch.setattr(engine._pieces, "decode_part", slow)
    monkeypatch.setattr(audio_stream.AudioStream, "join", join)
    turns = [generation.Turn("user", "Leave early.")]
    request = generation.GenerationRequest(turns, True, 400, 0.7, 0.95, 50, seed=3)

    async def run() -> float:
        stream = engine.stream(request)
        async for event in stream:
            if isinstance(event, generation.AudioPiece):
                break
        due = engine.batch_steps + 4 * engine.streaming.chunk_frames

        def four_more_pieces_due() -> None:
            while engine.batch_steps < due:
                time.sleep(0.01)

        await asyncio.to_thread(four_more_pieces_due)
        await stream.aclose()
        return time.monotonic()

    left = asyncio.run(run())
    settle(engine)
    time.sleep(1.5)  # long enough for the codec to decode four more pieces, were they kept
    assert len([t for t in joined if t > left]) <= 1  # the one being decoded when the client left
    monkeypatch.undo()
    assert_idle(client, engine)


def test_a_request_counts_against_the_bound_until_its_slot_is_free(engine, client, monkeypatch):
    """``pending`` (the queue gauge and the 429 bound) counts a request whose client left until the
    scheduler has freed its slot; a waiting request whose client left is out of the line at once, and the
    observers (the metrics' wait histogram) see how long it waited."""
    pending_at_release = at_each_release(engine, monkeypatch, lambda: engine.pending)
    monkeypatch.setattr(engine, "slots", 1)  # one request decodes, the next one waits
    observed: list[generation.GenerationResult] = []
    monkeypatch.setattr(engine, "observers", [*engine.observers, observed.append])
    turns = [generation.Turn("user", "Count me.")]
    leaving = generation.GenerationRequest(turns, True, 500, 0.7, 0.95, 50, seed=1)
    waiting = generation.GenerationRequest(turns, True, 500, 0.7, 0.95, 50, seed=2)

    async def run() -> list[tuple[int, int]]:
        seen = []
        first = engine.stream(leaving)
        async for event in first:
            if isinstance(event, generation.AudioPiece):
                break
        second = engine.stream(waiting)
        assert isinstance(await anext(second), generation.Started)  # queued behind the first
        seen.append((engine.pending, engine.stats().waiting))
        await asyncio.sleep(0.2)
        await second.aclose()
        seen.append((engine.pending, engine.stats().waiting))
        await first.aclose()
        return seen

    seen = asyncio.run(run())
    assert seen == [(2, 1), (1, 0)]
    settle(engine)
    assert pending_at_release == [1]  # the leaving request still counted while its slot was freed
    gave_up = observed[0]  # the waiting one left first, before the scheduler freed the other's slot
    assert gave_up.abandoned and gave_up.completion_tokens == 0 and gave_up.queue_seconds >= 0.2
    assert len(observed) == 2 and observed[1].abandoned and observed[1].completion_tokens > 0
    monkeypatch.undo()
    assert_idle(client, engine)


def admissions(engine, monkeypatch) -> list[tuple[int, float]]:
    """The seed of each request the engine gives a slot, and when (monotonic), in order."""
    started: list[tuple[int, float]] = []
    real_start = engine._start

    def start(job, slot: int) -> None:
        started.append((job.request.seed, time.monotonic()))
        real_start(job, slot)

    monkeypatch.setattr(engine, "_start", start)
    return started


def one_slot_kept_for(
    engine, monkeypatch, hold: float, while_decoding: float | None = None, from_newcomers: float = 3600.0
) -> list:
    """One slot, kept ``hold`` seconds for an answer's next piece (``HOLD_SECONDS``; ``while_decoding``:
    ``HOLD_WHILE_DECODING``; ``from_newcomers``: ``HOLD_FROM_NEWCOMERS``, by default longer than any test,
    whatever the machine's speed); returns the admissions as ``admissions`` records them."""
    monkeypatch.setattr(engine, "slots", 1)
    monkeypatch.setattr(engine_module, "HOLD_SECONDS", hold)
    monkeypatch.setattr(engine_module, "HOLD_FROM_NEWCOMERS", from_newcomers)
    if while_decoding is not None:
        monkeypatch.setattr(engine_module, "HOLD_WHILE_DECODING", while_decoding)
    return admissions(engine, monkeypatch)


def assert_nothing_kept(client, engine, monkeypatch) -> None:
    """The engine's settings back, no slot kept, nothing running or waiting."""
    monkeypatch.undo()
    assert engine._held == {}
    assert_idle(client, engine)


async def last_event(events):
    """The last event of a stream read to its end (within 2 minutes)."""

    async def rest() -> list:
        return [event async for event in events]

    return (await asyncio.wait_for(rest(), timeout=120))[-1]


def run_releasing_holds(engine, run):
    """``asyncio.run(run())``; then no slot stays kept, so that a failed check does not hold the slot of
    the tests after it for the hour their hold lasts."""
    try:
        return asyncio.run(run())
    finally:
        for job in list(engine._held):
            engine._hold_ends(job, 0.0)


def test_a_continuation_takes_the_slot_kept_for_it_ahead_of_the_line(engine, client, monkeypatch):
    """A generation with ``keep_slot`` leaves its slot to the answer's next piece (``continues``): a request
    that waited longer gets it after that piece, and a full line, which refuses a new request, takes the
    continuation."""
    started = one_slot_kept_for(engine, monkeypatch, 30.0)  # whatever the machine's speed
    GenerationRequest, Turn = generation.GenerationRequest, generation.Turn
    turns = [Turn("user", "Keep my slot.")]
    piece = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=1, keep_slot=True)
    other = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=2)
    later = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=3, continues=True)

    async def run() -> list:
        waiting = engine.stream(other)
        async with contextlib.aclosing(engine.stream(piece)) as events:
            async for event in events:
                if isinstance(event, generation.AudioPiece) and engine.stats().waiting == 0:
                    assert isinstance(await anext(waiting), generation.Started)  # in the line
        assert engine.stats().waiting == 1 and engine.stats().busy_slots == 0  # kept, not given to it
        assert engine.stats().kept_slots == 1 and "higgs_kept_slots 1.0" in client.get("/metrics").text
        monkeypatch.setattr(engine, "max_queue", engine.pending)  # the line is full now
        with pytest.raises(generation.EngineBusy):
            await engine.generate(replace(other, seed=4))
        continued = await engine.generate(later)
        rest = [event async for event in waiting]
        return [continued, rest[-1]]

    continued, waited = asyncio.run(run())
    assert [seed for seed, _ in started] == [1, 3, 2]
    assert continued.completion_tokens == waited.completion_tokens == 12
    assert_nothing_kept(client, engine, monkeypatch)  # the continuation took the kept slot


def test_a_kept_slot_nobody_continues_goes_back_after_its_hold(engine, client, monkeypatch):
    """The next piece may never come (its client left, ``max_tokens`` ran out): the waiting line gets the
    slot when the hold ends, not before, and nothing stays kept."""
    started = one_slot_kept_for(engine, monkeypatch, 2.0)
    GenerationRequest, Turn = generation.GenerationRequest, generation.Turn
    turns = [Turn("user", "Keep my slot.")]
    piece = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=1, keep_slot=True)
    other = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=2)

    async def run() -> tuple[float, generation.GenerationResult]:
        waiting = engine.stream(other)
        async with contextlib.aclosing(engine.stream(piece)) as events:
            async for event in events:
                if isinstance(event, generation.AudioPiece) and engine.stats().waiting == 0:
                    assert isinstance(await anext(waiting), generation.Started)  # in the line
        (hold,) = engine._held.values()  # the piece's slot is kept (the other request still waits)
        return hold.until, [event async for event in waiting][-1]

    hold_ends, waited = asyncio.run(run())
    assert [seed for seed, _ in started] == [1, 2] and waited.completion_tokens == 12
    assert started[1][1] >= hold_ends
    assert_nothing_kept(client, engine, monkeypatch)


def test_a_new_request_waits_for_a_kept_slot_only_briefly_while_its_audio_is_decoded(
    engine, client, monkeypatch
):
    """A slot kept for a piece's next one is kept from a new request for ``HOLD_FROM_NEWCOMERS`` after the
    piece's tokens ended at most, however far the codec is behind (a trial on this CPU: long texts kept 3 of
    4 slots idle for the codec's backlog, and short requests waited 28 to 36 s for their first audio)."""
    started = one_slot_kept_for(engine, monkeypatch, 3600.0, 3600.0, from_newcomers=0.5)
    real_decode, results = engine._pieces.decode_part, {}

    def slow_decode(codes, *span):  # a codec seconds behind the decoding, as on a CPU under load
        time.sleep(0.4)
        return real_decode(codes, *span)

    monkeypatch.setattr(engine._pieces, "decode_part", slow_decode)
    holds = []

    class Recorded(engine_module._Hold):
        def __init__(self, **fields):
            super().__init__(**fields)
            holds.append(self)

    monkeypatch.setattr(engine_module, "_Hold", Recorded)
    GenerationRequest, Turn = generation.GenerationRequest, generation.Turn
    turns = [Turn("user", "Keep my slot.")]
    piece = GenerationRequest(turns, True, 40, 0.7, 0.95, 50, seed=1, keep_slot=True)
    other = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=2)

    async def run() -> None:
        async with contextlib.aclosing(engine.stream(piece)) as events:
            assert isinstance(await anext(events), generation.Started)
            waiting = engine.stream(other)
            assert isinstance(await anext(waiting), generation.Started)  # in the line behind it
            results["waited"] = asyncio.create_task(last_event(waiting))
            async for event in events:
                if isinstance(event, generation.GenerationResult):
                    results["piece"] = time.monotonic()
        results["other"] = await results["waited"]

    run_releasing_holds(engine, run)
    assert [seed for seed, _ in started] == [1, 2] and results["other"].completion_tokens == 12
    # The new request took the slot while the piece's audio was still being decoded, not after its result,
    # and not before the hold from newcomers ended.
    (hold,) = holds
    assert hold.since + 0.5 <= started[1][1] < results["piece"]
    assert_nothing_kept(client, engine, monkeypatch)


def test_a_kept_slot_goes_back_at_once_when_its_last_audio_fails(engine, client, monkeypatch):
    """No next piece follows a piece whose audio failed: the request waiting behind it gets the slot at
    once, not after the hold."""
    started = one_slot_kept_for(engine, monkeypatch, 3600.0, 3600.0)
    failures, real_decode = [RuntimeError("injected codec failure")], engine._pieces.decode_part

    def decode(codes, *span):
        if failures:
            raise failures.pop()
        return real_decode(codes, *span)

    monkeypatch.setattr(engine._pieces, "decode_part", decode)
    GenerationRequest, Turn = generation.GenerationRequest, generation.Turn
    turns = [Turn("user", "Keep my slot.")]
    piece = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=1, keep_slot=True)
    other = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=2)

    async def run() -> generation.GenerationResult:
        async with contextlib.aclosing(engine.stream(piece)) as events:
            assert isinstance(await anext(events), generation.Started)
            waiting = engine.stream(other)
            assert isinstance(await anext(waiting), generation.Started)  # in the line behind it
            with pytest.raises(RuntimeError, match="injected"):
                async for _ in events:
                    pass
        return await last_event(waiting)

    waited = asyncio.run(run())
    assert [seed for seed, _ in started] == [1, 2] and waited.completion_tokens == 12
    assert_nothing_kept(client, engine, monkeypatch)


def test_the_codec_serves_the_listener_who_runs_out_first(engine, monkeypatch):
    """Of the streams' next pieces, the codec decodes first the one whose listener runs out of audio first,
    not the oldest: a stream that joined later is not left silent while earlier ones have seconds in hand.
    First pieces (nothing heard yet) still go before all."""
    from types import SimpleNamespace

    now = time.monotonic()

    def item(runs_out: float, frames: int, first: bool = False):
        piece = audio_stream.Piece(torch.zeros((8, frames), dtype=torch.long), 0, 0, first)
        return audio_stream.Decode(SimpleNamespace(runs_out=runs_out), piece)

    early = item(now + 3.0, 20)  # started first: 3 s in hand
    late = item(now + 0.2, 24)  # joined later: about to run out
    later = item(now + 1.0, 28)
    assert engine._next_codec_work([early, later, late]) == [late]
    assert engine._next_codec_work([early, later]) == [later]
    fresh = item(-math.inf, 12, first=True)
    assert engine._next_codec_work([early, late, fresh]) == [fresh]
    # Pieces of one length go together, the neediest first (the CPU batch is cut to what fits its caches).
    same = [item(now + t, 20) for t in (2.0, 0.5, 1.0)]
    work = engine._next_codec_work(same)
    assert work[0] is same[1] and [w.stream.runs_out for w in work] == sorted(w.stream.runs_out for w in work)


def test_the_codec_ends_finished_streams_first_while_the_listeners_have_audio_in_hand(engine):
    """A stream whose tokens have ended (its end item is queued) has its last pieces decoded before the
    others' while every other listener has ``ENDS_FIRST`` seconds of audio in hand: its client waits for
    them (for the whole answer, when it is not streamed), and a listener that far ahead loses nothing. A
    listener about to run out still goes first. Ends whose last pieces have one length go in one call."""
    from types import SimpleNamespace

    now = time.monotonic()
    margin = audio_stream.ENDS_FIRST
    result = generation.GenerationResult("", None, "stop", 1, 0, 1, 1, 1.0)

    def stream(runs_out: float, final_frames: int = 12):
        return SimpleNamespace(runs_out=runs_out, final_frames=final_frames)

    def piece(owner, frames: int = 20):
        return audio_stream.Decode(
            owner, audio_stream.Piece(torch.zeros((8, frames), dtype=torch.long), 0, 0, False)
        )

    done, ahead, other = stream(now + 5.0), stream(now + margin + 1.0), stream(now + margin + 2.0)
    last, end = piece(done, 16), audio_stream.End(done, result)
    assert engine._next_codec_work([piece(ahead), piece(other), last, end]) == [last]
    assert engine._next_codec_work([piece(ahead), piece(other), end]) == [end]
    assert audio_stream.next_codec_work([piece(ahead), last, end], ends_first=None)[0].stream is ahead
    needy = piece(stream(now + margin / 2))  # about to run out: first, as before
    assert engine._next_codec_work([piece(ahead), needy, last, end]) == [needy]
    # Ends together: those whose last pieces have the same length in one call, others apart.
    ends = [
        audio_stream.End(stream(now + t, frames), result) for t, frames in ((2.0, 12), (1.0, 12), (3.0, 9))
    ]
    assert engine._next_codec_work(ends) == [ends[1], ends[0]]
    assert engine._next_codec_work([ends[2]]) == [ends[2]]
    nothing_left = [audio_stream.End(stream(now + t, 0), result) for t in (1.0, 2.0)]
    assert audio_stream.next_codec_work(nothing_left, max_frames=8) == nothing_left


def test_streams_that_end_together_have_their_ends_decoded_in_one_call(client, engine, monkeypatch):
    """A burst of requests of one length ends at one step; their last pieces are decoded in one codec call
    (one call each kept the last of them waiting), and each answer is the one it gets alone."""
    bodies = [chat(seed=60 + i, max_tokens=30, text="The same length for all.") for i in range(3)]
    alone = [answer(post(client, body)) for body in bodies]
    ends: list[int] = []
    real_run, real_admissible = engine._codec_run, engine._admissible

    def codec_run(work):
        if isinstance(work[0], audio_stream.End):
            ends.append(len(work))
        real_run(work)

    def admissible():  # (under the engine's lock) nothing is admitted until all of them wait: one burst
        return real_admissible() if ends or len(engine._waiting) == len(bodies) else []

    monkeypatch.setattr(engine, "_codec_run", codec_run)
    monkeypatch.setattr(engine, "_admissible", admissible)
    assert [answer(r) for r in together(client, bodies)] == alone
    assert ends == [3], ends
    monkeypatch.undo()
    assert_idle(client, engine)


def test_a_fault_in_one_of_the_ends_decoded_together_fails_only_its_request(
    client, engine, monkeypatch, lenient
):
    """Ends decoded in one call are sent one by one: a fault in sending one of them (the first) fails its
    request alone, and the others get their answers."""
    bodies = [chat(seed=70 + i, max_tokens=30, text="The same length for all.") for i in range(3)]
    alone = [answer(post(client, body)) for body in bodies]
    real_join, real_admissible, real_run = (
        audio_stream.AudioStream.join,
        engine._admissible,
        engine._codec_run,
    )
    ended: list[int] = []

    def join(self, piece, *decoded):
        if ended and self.job.request.seed == 71:  # its last piece, decoded with the others' in one call
            raise RuntimeError("injected fault in a last piece")
        return real_join(self, piece, *decoded)

    def admissible():
        return real_admissible() if ended or len(engine._waiting) == len(bodies) else []

    def end_streams(items):
        if isinstance(items[0], audio_stream.End):
            ended.append(len(items))
            items = sorted(items, key=lambda end: end.stream.job.request.seed != 71)  # the faulty one first
        real_run(items)

    monkeypatch.setattr(audio_stream.AudioStream, "join", join)
    monkeypatch.setattr(engine, "_admissible", admissible)
    monkeypatch.setattr(engine, "_codec_run", end_streams)
    results = together(lenient, bodies)
    assert ended == [3]
    assert results[1].status_code == 500
    assert [answer(results[i]) for i in (0, 2)] == [alone[0], alone[2]]
    monkeypatch.undo()
    assert_idle(client, engine)


def test_a_stream_s_deadline_is_its_first_audio_plus_the_audio_sent(engine):
    stream = audio_stream.AudioStream(None, engine._layout, lambda item: None, lambda: None)
    assert stream.runs_out == -math.inf
    stream.join(audio_stream.Piece(torch.zeros((8, 1)), 0, 4800, True), np.zeros(4800, np.float32))
    stream.join(audio_stream.Piece(torch.zeros((8, 1)), 0, 2400, False), np.zeros(4800, np.float32))
    assert stream.runs_out == pytest.approx(stream.heard_from + 7200 / 24000)


def test_a_kept_slot_goes_back_at_once_when_its_client_leaves_before_the_result(engine, client, monkeypatch):
    """A piece whose decoding ended (its slot kept for the next piece) and whose client leaves while its
    audio is still on the way: no next piece comes, and the waiting request gets the slot at once."""
    started = one_slot_kept_for(engine, monkeypatch, 3600.0, 3600.0)
    GenerationRequest, Turn = generation.GenerationRequest, generation.Turn
    turns = [Turn("user", "Keep my slot.")]
    piece = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=1, keep_slot=True)
    other = GenerationRequest(turns, True, 12, 0.7, 0.95, 50, seed=2)

    async def run() -> generation.GenerationResult:
        events = engine.stream(piece)
        assert isinstance(await anext(events), generation.Started)
        waiting = engine.stream(other)
        assert isinstance(await anext(waiting), generation.Started)  # in the line behind it
        deadline = time.monotonic() + 120
        while not engine._held and time.monotonic() < deadline:  # noqa: ASYNC110 (set by the scheduler thread)
            await asyncio.sleep(0.01)
        assert engine.stats().kept_slots == 1
        await events.aclose()  # the client leaves before the result
        assert engine.stats().kept_slots == 0
        return await last_event(waiting)

    waited = run_releasing_holds(engine, run)
    assert [seed for seed, _ in started] == [1, 2] and waited.completion_tokens == 12
    assert_nothing_kept(client, engine, monkeypatch)


@pytest.mark.parametrize("why", ["client left", "max_tokens ran out"])
def test_a_long_text_that_stops_between_pieces_gives_its_kept_slot_back_at_once(
    engine, client, monkeypatch, why
):
    """The slot a piece kept for the next one goes back when no next piece will come: when the listener
    leaves between two pieces, or when ``max_tokens`` is spent; the request waiting behind it gets it then,
    not when the hold ends (an hour here)."""
    from longform import script_for, speak

    started = one_slot_kept_for(engine, monkeypatch, 3600.0, 3600.0)
    GenerationRequest, Turn = generation.GenerationRequest, generation.Turn
    pieces = ["First piece.", "Second piece.", "Third piece."]
    template = GenerationRequest([Turn("user", " ".join(pieces))], True, 12, 0.7, 0.95, 50, seed=1)
    budget = 12 if why == "max_tokens ran out" else None  # all spent by the first piece
    script = script_for(template, pieces, [12] * 3, budget, context_pieces=2)
    other = GenerationRequest([Turn("user", "Waiting.")], True, 12, 0.7, 0.95, 50, seed=100)
    ended = []  # the pieces whose result has reached the long text
    real_stream = engine.stream

    async def stream(request):
        async for event in real_stream(request):
            if isinstance(event, generation.GenerationResult):
                ended.append(request)
            yield event

    monkeypatch.setattr(engine, "stream", stream)

    async def run() -> generation.GenerationResult:
        waiting = None
        async with contextlib.aclosing(speak(engine, script)) as events:
            async for event in events:
                if waiting is None and isinstance(event, generation.AudioPiece):
                    waiting = real_stream(other)  # in the line behind the first piece
                    assert isinstance(await anext(waiting), generation.Started)
                if ended and why == "client left":
                    break  # between the first piece and the second
        assert engine.stats().kept_slots == 0
        return await last_event(waiting)

    waited = run_releasing_holds(engine, run)
    assert [seed for seed, _ in started] == [1, 100] and waited.completion_tokens == 12
    assert_nothing_kept(client, engine, monkeypatch)


def test_a_fault_in_one_request_fails_only_it(client, engine, monkeypatch, lenient):
    others = [chat(seed=21, max_tokens=40), clone(seed=22, max_tokens=25)]
    alone = [answer(post(client, body)) for body in others]
    real_fill = engine._decoder.fill

    def fill(admissions, batch=None):
        if not admissions[0].audio_output:  # the text request's prefill fails; the audio ones run on
            raise ValueError("injected prefill fault")
        return real_fill(admissions, batch)

    real_join = audio_stream.AudioStream.join

    def join(self, piece, *decoded):
        if self.job.request.seed == 666:  # this stream's audio fails half-way
            raise RuntimeError("injected codec fault")
        return real_join(self, piece, *decoded)

    monkeypatch.setattr(engine._decoder, "fill", fill)
    monkeypatch.setattr(audio_stream.AudioStream, "join", join)
    bodies = [*others, text_chat(seed=23, max_tokens=10), chat(seed=666, max_tokens=80)]
    results = together(lenient, bodies)
    assert [answer(r) for r in results[:2]] == alone
    assert results[2].status_code == 500 and results[3].status_code == 500
    monkeypatch.undo()
    assert_idle(client, engine)
    assert client.post("/v1/chat/completions", json=text_chat(seed=23, max_tokens=10)).status_code == 200


def test_the_codec_threads_log_lines_name_the_request(client, engine, monkeypatch, lenient, caplog):
    """Audio is decoded on the codec thread, for several requests at once; a failure there is logged
    under each request's own id."""

    def decode(codes, *span):
        raise RuntimeError("injected codec failure")

    monkeypatch.setattr(engine._pieces, "decode_part", decode)
    response = lenient.post("/v1/chat/completions", json=chat(seed=7), headers={"X-Request-ID": "codec-7"})
    assert response.status_code == 500
    failed = [r for r in caplog.records if r.getMessage() == "audio decoding failed"]
    assert [r.higgs_request_id for r in failed] == ["codec-7"]
    assert failed[0].threadName == "higgs-codec"
    monkeypatch.undo()
    assert_idle(client, engine)


def test_on_a_cpu_the_loop_steps_aside_while_a_first_piece_is_with_the_codec(
    client, engine, monkeypatch, lookahead
):
    """The decoding loop and the codec share a CPU's cores: while a listener waits for its first piece, no
    step runs (the codec then has the cores to itself: on CUDA its stream's priority does that). Later
    pieces are decoded while the loop runs on; every request still gets its own answer."""
    assert engine.yield_to_first_pieces  # the CPU's default
    bodies = [chat(seed=40 + i, max_tokens=60) for i in range(4)]
    alone = [answer(post(client, body)) for body in bodies]
    launches = [0]
    real_launch = engine._decoder.launch

    def launch():
        launches[0] += 1
        return real_launch()

    calls: list[tuple[bool, int, int, int]] = []  # (first pieces?, pieces, launches before, launches after)
    real_run = engine._codec_run

    def codec_run(work):
        before = launches[0]
        real_run(work)
        if work[0].kind == "piece":
            calls.append((work[0].piece.first, len(work), before, launches[0]))

    monkeypatch.setattr(engine._decoder, "launch", launch)
    monkeypatch.setattr(engine, "_codec_run", codec_run)
    assert [answer(r) for r in together(client, bodies)] == alone
    firsts = [after - before for first, _, before, after in calls if first]
    later = [after - before for first, _, before, after in calls if not first]
    assert sum(n for first, n, _, _ in calls if first) == len(bodies) and set(firsts) == {0}
    assert later and max(later) > 0  # what is counted does move while other pieces decode
    monkeypatch.undo()
    assert_idle(client, engine)


def test_on_a_cpu_a_burst_starts_together_and_its_first_pieces_share_a_codec_call(
    client, engine, monkeypatch
):
    """Requests waiting together are admitted in one turn of the loop, each prompt in a prefill pass of its
    own (so the tokens stay those of the request alone), and so their streams step together: their first
    pieces reach the codec at once and are decoded in one call (4 pieces of 8 frames: ``CPU_CODEC_FRAMES``),
    not one after another while the loop waits for each."""
    bodies = [chat(seed=70 + i, max_tokens=30, text=f"Burst number {i}.") for i in range(4)]
    alone = [answer(post(client, body)) for body in bodies]
    passes: list[int] = []
    firsts: list[int] = []
    real_fill, real_admissible, real_run = (
        engine._decoder.fill,
        engine._admissible,
        engine._codec_run,
    )

    def fill(admissions, batch=None):
        passes.append(len(admissions))
        return real_fill(admissions, batch)

    def admissible():  # (under the engine's lock) nothing is admitted until all of them wait: one burst
        return real_admissible() if passes or len(engine._waiting) == len(bodies) else []

    def codec_run(work):
        if audio_stream.is_first(work[0]):
            firsts.append(len(work))
        real_run(work)

    monkeypatch.setattr(engine._decoder, "fill", fill)
    monkeypatch.setattr(engine, "_admissible", admissible)
    monkeypatch.setattr(engine, "_codec_run", codec_run)
    assert [answer(r) for r in together(client, bodies)] == alone
    assert passes == [1, 1, 1, 1] and firsts == [4]
    monkeypatch.undo()
    assert_idle(client, engine)


@pytest.mark.parametrize(
    "apart, ends, wait, firsts_expected",
    [(1, False, 1, [4]), (3, False, 1, [1, 3]), (1, True, 1, [4]), (1, False, 0, [1, 3])],
)
def test_on_a_cpu_a_first_piece_waits_a_step_for_one_due_at_the_next(
    client, engine, monkeypatch, apart, ends, wait, firsts_expected
):
    """A request admitted a turn before three others is a step ahead of them: its first piece waits that
    step and the four share one codec call (one call less for the listeners behind it). It waits no longer:
    three steps ahead, it goes alone. One that ends during that step still sends its first piece, then the
    rest. With no wait (CUDA's choice) it goes alone. The answers are those of the requests alone."""
    assert engine.first_piece_wait == 1  # a CPU's
    monkeypatch.setattr(engine, "first_piece_wait", wait)
    bodies = [chat(seed=80 + i, max_tokens=30, text=f"Staggered number {i}.") for i in range(4)]
    if ends:  # due with the begin marker, the delay, the first piece's frames and its context: a step more
        frames = engine.streaming.first_piece_frames
        bodies[0]["max_tokens"] = engine.num_codebooks + frames + 1
    alone = [answer(post(client, body)) for body in bodies]
    firsts: list[int] = []
    real_admissible, real_run = engine._admissible, engine._codec_run
    admitted_at: list[int] = []

    def admissible():  # (under the engine's lock) one request, then the others ``apart`` steps later
        if len(engine._waiting) + len(admitted_at) < len(bodies):
            return []
        if not admitted_at:  # the one with the fewest tokens (the one that ends), whichever came first
            admitted_at.append(engine.batch_steps)
            ahead = min(engine._waiting, key=lambda job: job.request.max_new_tokens)
            engine._waiting.remove(ahead)
            return [ahead]
        return real_admissible() if engine.batch_steps - admitted_at[0] >= apart else []

    def codec_run(work):
        if audio_stream.is_first(work[0]):
            firsts.append(len(work))
        real_run(work)

    monkeypatch.setattr(engine, "_admissible", admissible)
    monkeypatch.setattr(engine, "_codec_run", codec_run)
    assert [answer(r) for r in together(client, bodies)] == alone
    assert firsts == firsts_expected
    monkeypatch.undo()
    assert_idle(client, engine)


def test_the_codec_takes_first_pieces_then_references_then_later_pieces(engine):
    """A first piece goes first (a listener waits for sound, and on a CPU the decoding loop waits with
    it: a reference's encoding, seconds long on a CPU, must not hold every stream), then a reference to
    encode (its request waits for it to be queued), then later pieces (whose order among streams
    ``test_the_codec_serves_the_listener_who_runs_out_first`` shows); a stream's pieces in order."""
    from types import SimpleNamespace

    def stream() -> SimpleNamespace:
        return SimpleNamespace(runs_out=-math.inf, final_frames=8)

    def piece(owner: object, first: bool) -> audio_stream.Decode:
        return audio_stream.Decode(
            owner, audio_stream.Piece(torch.zeros((8, 8), dtype=torch.long), 0, 1, first)
        )

    one, two = stream(), stream()
    encode = audio_stream.Encode(object(), None, None)
    later, newcomer = piece(one, False), piece(two, True)
    assert engine._next_codec_work([later, encode, newcomer]) == [newcomer, later]  # same length: together
    assert engine._next_codec_work([later, encode]) == [encode]
    after = piece(one, False)  # the stream's next piece of that length: with it, in order
    assert engine._next_codec_work([later, after]) == [later, after]
    # Its end too, when its last piece has that length, after every stream's next piece (a batch cut to
    # what fits keeps those); not when it has another length.
    end, other = audio_stream.End(one, None), piece(two, False)
    assert engine._next_codec_work([later, end, other]) == [later, other, end]
    one.final_frames = 5
    assert engine._next_codec_work([later, end, other]) == [later, other]
    done = audio_stream.End(stream(), None)  # a stream with nothing else queued: its end with the pieces
    assert engine._next_codec_work([done, other]) == [done, other]


def test_on_a_cpu_the_codec_decodes_a_few_short_pieces_together(engine, monkeypatch):
    """Same-length pieces of several streams share a codec call: on a CPU up to ``CPU_CODEC_FRAMES`` frames
    (first pieces, 8 frames, 4 at a time; later ones, 20 frames, alone), on CUDA all of them (a graph
    replays the batch)."""

    from types import SimpleNamespace

    def piece(frames: int, first: bool) -> audio_stream.Decode:
        codes = torch.zeros((8, frames), dtype=torch.long)
        stream = SimpleNamespace(runs_out=-math.inf if first else 0.0)
        return audio_stream.Decode(stream, audio_stream.Piece(codes, 0, 1, first))

    firsts = [piece(8, True) for _ in range(6)]
    laters = [piece(20, False) for _ in range(3)]
    assert engine._codec_stream is None and engine_module.CPU_CODEC_FRAMES == 32
    assert engine._next_codec_work([*laters, *firsts]) == firsts[:4]
    assert engine._next_codec_work(laters) == laters[:1]
    monkeypatch.setattr(engine, "_codec_stream", object())  # what CUDA's path decides (nothing runs here)
    assert engine._next_codec_work([*laters, *firsts]) == firsts
    assert engine._next_codec_work(laters) == laters


def test_a_later_piece_waits_to_share_a_codec_call_only_while_its_listener_has_audio_in_hand(engine):
    """With a gather (CUDA's default: ``GATHER``), a stream's later piece waits up to that long after it
    was cut for other streams' pieces, then goes with all of them: a replayed graph costs the same for one
    piece as for many, and each call runs beside the steps. It goes at once when its listener has less
    than ``ENDS_FIRST`` in hand, when a first piece, a reference or a stream's end is queued (they are due
    at once, and the pieces of that length go with them), or when a call's largest batch is waiting."""
    from types import SimpleNamespace

    now = time.monotonic()
    gather = 10.0  # (``GATHER`` is 40 ms: longer here, so that a slow CI machine cannot outrun a wait)

    def piece(runs_out: float, cut_ago: float = 0.0, first: bool = False, frames: int = 20):
        owner = SimpleNamespace(runs_out=runs_out, final_frames=12)
        codes = audio_stream.Piece(torch.zeros((8, frames), dtype=torch.long), 0, 1, first)
        return audio_stream.Decode(owner, codes, cut_at=now - cut_ago)

    ahead = [piece(now + 30.0, cut_ago=0.01), piece(now + 20.0), piece(now + 50.0)]
    due_in = audio_stream.codec_due_in(ahead, gather)
    assert 0 < due_in <= gather - 0.01  # the oldest's wait, less what it has waited (and this test's time)
    assert audio_stream.next_codec_work(ahead, gather=gather) == []
    assert audio_stream.codec_due_in(ahead, 0.0) == 0 and audio_stream.next_codec_work(ahead) != []
    waited = piece(now + 40.0, cut_ago=gather)  # waited its time: it goes, and every piece of its length
    work = audio_stream.next_codec_work([*ahead, waited], gather=gather)
    assert work == [ahead[1], ahead[0], waited, ahead[2]]  # the listener who runs out first first
    short = piece(now + audio_stream.ENDS_FIRST / 2)  # little in hand: it does not wait
    assert audio_stream.codec_due_in([*ahead, short], gather) == 0
    assert audio_stream.codec_due_in([*ahead, piece(-math.inf, first=True, frames=8)], gather) == 0
    assert audio_stream.codec_due_in([*ahead, audio_stream.Encode(object(), None, None)], gather) == 0
    result = generation.GenerationResult("", None, "stop", 1, 0, 1, 1, 1.0)
    ended = [piece(now + 30.0), audio_stream.End(ahead[0].stream, result)]
    assert audio_stream.codec_due_in([*ahead, *ended], gather) == 0
    assert audio_stream.codec_due_in(ahead, gather, full=4) > 0
    assert audio_stream.codec_due_in([*ahead, piece(now + 30.0)], gather, full=4) == 0
    assert len(audio_stream.next_codec_work([*ahead, piece(now + 30.0)], gather=gather, max_batch=4)) == 4
    assert len(audio_stream.next_codec_work([*ahead, piece(now + 30.0)], max_batch=2)) == 2


def test_with_a_gather_the_streams_later_pieces_and_ends_share_one_codec_call(client, engine, monkeypatch):
    """Three streams started together, with a long gather, as if every listener were far ahead of its
    playback (the tiny engine on a CPU runs near real time), with CUDA's batches and CUDA's ends (decoded
    at the regular pieces' length): their later pieces wait until something is due (their ends, at one
    step), then go in one call with the ends, several streams' and several of a stream's, each stream's
    in order; each answer is the one it gets alone."""
    monkeypatch.setattr(engine, "_layout", replace(engine._layout, end_frames=engine.streaming.piece_frames))
    bodies = [chat(seed=90 + i, max_tokens=60, text=f"Gathered number {i}.") for i in range(3)]
    alone = [answer(post(client, body)) for body in bodies]
    calls: list[list] = []
    real_run, real_admissible = engine._codec_run, engine._admissible

    def codec_run(work):
        if not audio_stream.is_first(work[0]):
            calls.append(list(work))
        real_run(work)

    def admissible():  # (under the engine's lock) nothing is admitted until all of them wait: one burst
        return real_admissible() if calls or len(engine._waiting) == len(bodies) else []

    monkeypatch.setattr(engine, "codec_gather", 30.0)
    monkeypatch.setattr(audio_stream, "ENDS_FIRST", -1e9)  # (the margin of ``codec_due_in``)
    monkeypatch.setattr(engine_module, "CPU_CODEC_FRAMES", 10_000)
    monkeypatch.setattr(engine, "_codec_run", codec_run)
    monkeypatch.setattr(engine, "_admissible", admissible)
    assert [answer(r) for r in together(client, bodies)] == alone
    assert len(calls) == 1, [[item.kind for item in call] for call in calls]
    (work,) = calls
    ends = [item for item in work if isinstance(item, audio_stream.End)]
    assert len(ends) == len(bodies) and len(work) - len(ends) >= 6  # several pieces of each stream
    for end in ends:  # each stream's pieces before its end
        own = [item for item in work if item.stream is end.stream]
        assert own[-1] is end and len(own) >= 3
    monkeypatch.undo()
    assert_idle(client, engine)


def work_counters(client) -> dict[str, float]:
    """The engine's work counters on /metrics, by name with labels."""
    found = {}
    for line in client.get("/metrics").text.splitlines():
        kinds = ("scheduler_", "codec_", "prefill", "decode_steps_total", "step_gpu_")  # (its histogram too)
        if line.startswith(tuple(f"higgs_{kind}" for kind in kinds)):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_metrics_say_where_the_engines_time_goes(client, engine):
    """The decoding loop's time (prefill; launching steps, waiting for their tokens, streaming them; pauses)
    and the codec's, by work, as counters: three requests at once add what they must."""
    before, steps_before = work_counters(client), engine.batch_steps
    assert all(
        r.status_code == 200 for r in together(client, [chat(seed=60 + i, max_tokens=40) for i in range(3)])
    )
    settle(engine)
    # A stream's last codec call is counted just after its answer is sent: read until the counters rest.
    deadline, last = time.monotonic() + 10, None
    while True:
        after = work_counters(client)
        added = {name: value - before.get(name, 0.0) for name, value in after.items()}
        if (
            added['higgs_codec_calls_total{work="end"}'] >= 1 and after == last
        ) or time.monotonic() > deadline:
            break
        last = after
        time.sleep(0.05)
    assert added["higgs_prefilled_requests_total"] == 3
    assert added["higgs_prefills_total"] == 3  # one request a forward pass on a CPU (``prefill_batch``)
    assert added["higgs_decode_steps_total"] == engine.batch_steps - steps_before > 0
    calls = {work: added[f'higgs_codec_calls_total{{work="{work}"}}'] for work in generation.CODEC_WORK}
    # Ends of one length share a call (the three end at one step, or near it).
    assert 1 <= calls["first_piece"] <= 3 and 1 <= calls["end"] <= 3 and calls["piece"] >= 3
    assert calls["encode"] == 0
    # 3 first pieces (8 frames, up to 4 a call on a CPU), then later pieces (20 frames) one a call.
    assert added["higgs_codec_pieces_total"] == 3 + calls["piece"]
    spent = {
        work: added[f'higgs_scheduler_seconds_total{{work="{work}"}}'] for work in generation.SCHEDULER_WORK
    }
    # The loop paused: its first pieces were due while it ran. On a CPU a step is computed when launched,
    # so waiting for its tokens takes (next to) nothing.
    assert spent["prefill"] > 0 and spent["launch"] > 0 and spent["tokens"] > 0 and spent["paused"] > 0
    assert 0 <= spent["wait"] < spent["launch"] / 10
    for work in ("first_piece", "piece", "end"):
        assert added[f'higgs_codec_seconds_total{{work="{work}"}}'] > 0, work
    assert added['higgs_codec_seconds_total{work="encode"}'] == 0


def test_a_voice_reference_encoded_counts_as_the_codecs_encode_work(client, engine):
    """A cloned voice's reference is encoded in a codec call of its own, counted as ``encode`` (calls and
    seconds), not as a piece call. (A reference of its own: one heard before is cached, not encoded.)"""
    import soundfile

    samples, rate = soundfile.read(TEST_AUDIO, dtype="float32")
    body = clone(seed=65, max_tokens=10)
    body["messages"][0]["content"][1]["input_audio"]["data"] = wav_b64(unheard_gain() * samples, rate)
    before = work_counters(client)
    assert post(client, body).status_code == 200
    settle(engine)
    added = {name: value - before.get(name, 0.0) for name, value in work_counters(client).items()}
    assert added['higgs_codec_calls_total{work="encode"}'] == 1
    assert added['higgs_codec_seconds_total{work="encode"}'] > 0
    calls = {work: added[f'higgs_codec_calls_total{{work="{work}"}}'] for work in ("first_piece", "piece")}
    assert added["higgs_codec_pieces_total"] == sum(calls.values())  # (a CPU's later pieces: one a call)


class _Clock:
    """A stand-in for a CUDA timing event, on a made-up GPU clock (milliseconds)."""

    def __init__(self, at: float):
        self.at = at

    def elapsed_time(self, later: _Clock) -> float:
        return later.at - self.at

    def synchronize(self) -> None:
        pass


def test_metrics_say_how_long_the_gpu_ran_each_step_and_waited_between_steps(client, engine, monkeypatch):
    """On CUDA each step carries timing events (its first kernel's start, its copy's end): /metrics adds up
    the GPU's time per step and its wait from a step's end to the next's start, for steps in a row (the
    next launched before the previous one's tokens were taken: the lookahead). The CPU has no events, so
    here a step gets made-up ones: it "starts" when launched and "runs" 0.5 ms. Over two requests a second
    apart, ``step`` is 0.5 ms per such step taken, and ``between`` the time from one step's end to the
    next's launch within each request, not the idle second between them (the step in flight then was an
    old one, whose request had left)."""
    monkeypatch.setattr(engine, "lookahead", True)
    real = engine._decoder.launch
    launches = [0]

    def launch():
        step = real()
        launches[0] += 1
        begun = time.perf_counter() * 1e3
        return replace(step, ready=_Clock(begun + 0.5), begun=_Clock(begun))

    monkeypatch.setattr(engine._decoder, "launch", launch)
    before, steps = work_counters(client), engine.batch_steps
    started = time.perf_counter()
    for seed in (70, 71):
        assert post(client, chat(seed=seed, max_tokens=30)).status_code == 200
        settle(engine)
        time.sleep(1.0)
    took = time.perf_counter() - started
    added = {name: value - before.get(name, 0.0) for name, value in work_counters(client).items()}
    assert engine.batch_steps - steps >= 40
    # Every step launched here was taken but the last, still in flight (the first one taken may be an
    # older test's, left in flight by its lookahead: it has no events).
    assert added['higgs_step_gpu_seconds_total{work="step"}'] == pytest.approx(0.0005 * (launches[0] - 1))
    between = added['higgs_step_gpu_seconds_total{work="between"}']
    assert 0 < between < took - 2.0
    # The same waits, one by one, in a histogram (its buckets: the next test).
    waits = added["higgs_step_gpu_wait_seconds_count"]
    assert 0 < waits < launches[0] and added['higgs_step_gpu_wait_seconds_bucket{le="+Inf"}'] == waits
    assert added["higgs_step_gpu_wait_seconds_sum"] == pytest.approx(between)
    monkeypatch.undo()
    assert_idle(client, engine)


def test_the_gpu_s_waits_between_steps_are_counted_by_length(engine):
    """Each wait between two steps in a row goes into the first bucket of ``STEP_GPU_WAITS`` that holds it
    (a bound holds its own value; a wait longer than the last bound in the last count; the clocks' rounding
    below zero as zero), so that a host late by the interpreter's switch interval (5 ms) stands out."""
    from types import SimpleNamespace

    bounds = generation.STEP_GPU_WAITS
    before = engine.work()
    waits_ms = [-0.001, 0.05, 0.1, 0.10001, 5.0, 6.0, 200.0]
    for waited in waits_ms:
        step = SimpleNamespace(begun=_Clock(waited), ready=_Clock(waited + 0.5), after=_Clock(0.0))
        engine._time_on_gpu(step)
    after = engine.work()
    added = [b - a for a, b in zip(before.step_gpu_waits, after.step_gpu_waits, strict=True)]
    assert len(added) == len(bounds) + 1
    assert added == [3, 1, 0, 0, 0, 2, 0, 0, 1]  # <= 0.1 ms: 3; 0.5 ms: 1; 6 ms: 2 (5 and 6); above 50: 1
    gained = after.step_gpu["between"] - before.step_gpu["between"]
    assert gained == pytest.approx(sum(max(0.0, w) for w in waits_ms) / 1e3)


@pytest.fixture
def lenient(app, client):
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


def test_a_non_streamed_chat_stops_when_its_client_disconnects(client, app, engine):
    """The client gives up while its answer is being made: generation stops, the slot frees at once."""
    body = json.dumps(chat(seed=5, max_tokens=1500)).encode()
    before = engine.steps
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    twenty_steps = lambda: engine.steps - before >= 20  # noqa: E731
    messages = client.portal.call(post_then_hang_up, app, "/v1/chat/completions", headers, body, twenty_steps)
    assert messages[0]["status"] == 499
    settle(engine)
    assert engine.steps - before < 200  # not the 1500 asked for
    assert_idle(client, engine)


def test_a_stream_s_end_is_logged_whole_or_cut_short(client, app, engine, caplog):
    """A streamed answer is logged when its headers go out; a second line says how it ended, so that an
    operator can tell a stream its client abandoned from one sent whole (a Node SDK trial: an aborted
    stream left no trace)."""
    import logging

    speech = {"model": "tts-1", "input": "Hello there.", "voice": "default", "response_format": "pcm"}
    body = json.dumps(speech).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    before = engine.steps
    with caplog.at_level(logging.INFO, logger="app"):
        assert client.post("/v1/audio/speech", json=speech).status_code == 200
        ten_steps = lambda: engine.steps - before >= 10  # noqa: E731
        client.portal.call(post_then_hang_up, app, "/v1/audio/speech", headers, body, ten_steps)
        settle(engine)
    ends = [r.getMessage() for r in caplog.records if r.name == "app" and ": stream" in r.getMessage()]
    assert [line.split(": ")[1][:17] for line in ends] == ["stream sent whole", "stream cut short "]
    assert_idle(client, engine)


@pytest.mark.parametrize("max_tokens", [4, 5, 6, 9, 10])
def test_audio_chat_with_too_few_tokens_for_a_frame_is_silence_not_an_error(client, max_tokens):
    """Issue 14.1: fewer columns than the delay pattern spans make no frame; that is a short silence."""
    response = client.post("/v1/chat/completions", json=chat(seed=1, max_tokens=max_tokens))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == max_tokens
    audio = base64.b64decode(response.json()["choices"][0]["message"]["audio"]["data"])
    assert audio[:4] == b"RIFF"


def test_temperature_zero_without_a_seed_is_deterministic(client):
    """Issue 14.22: greedy decoding picks the argmax; the repetition-aware redraw uses a fixed seed."""
    body = chat(seed=None, max_tokens=60, temperature=0)
    first, second = answer(post(client, body)), answer(post(client, body))
    assert first == second
    assert [answer(r) for r in together(client, [body, body])] == [first, first]


def test_steps_launched_ahead_are_as_many_as_set_and_a_request_may_still_fill_its_context(settings, engine):
    """With ``HIGGS_LOOKAHEAD_STEPS=2`` (CUDA's default) the loop takes a step's tokens while the two
    launched after it are in flight, and the context a request may fill is a slot's length less the one
    position the second step ahead writes past its last token: a request at that bound decodes to its end,
    one more is refused before any decoding (a 400, ``context_length_exceeded``). A CPU, which takes each
    step's tokens at once, keeps the whole slot."""
    from engine import load_engine

    assert (engine.lookahead, engine.lookahead_steps, engine.max_context) == (False, 1, 8192)

    engine = load_engine(settings.model_copy(update={"kv_cache_lengths": [256], "lookahead_steps": 2}))
    try:
        assert (engine.max_context, engine._decoder.max_len, engine._decoder.host_buffers) == (255, 256, 3)
        engine.lookahead = True  # (CUDA's way; a CPU takes each step's tokens before the next)
        in_flight: list[int] = []
        real_take = engine._take

        def take(launched, jobs):
            in_flight.append(len(engine._in_flight))  # the steps still in flight beside this one
            real_take(launched, jobs)

        engine._take = take
        request = generation.GenerationRequest([generation.Turn("user", "Fill it.")], True, 1, 0.7, 0.95, 50)
        prompt = engine._prepare(request).tokens
        room = replace(request, max_new_tokens=engine.max_context - prompt, seed=3)
        result = asyncio.run(engine.generate(room))
        assert (result.completion_tokens, result.finish_reason) == (room.max_new_tokens, "length")
        assert max(in_flight) == 2 and in_flight.count(2) >= room.max_new_tokens - 1
        with pytest.raises(generation.ContextLengthError):
            asyncio.run(engine.generate(replace(room, max_new_tokens=room.max_new_tokens + 1)))
    finally:
        engine.close()


def test_closing_the_engine_ends_the_streams_whose_audio_the_codec_still_owes(settings):
    """A request whose tokens have ended waits for the codec's backlog (seconds, on a CPU); the codec
    thread returned at close without a word to it, so its stream waited until the server cut it off with
    no error (an abuse trial: SIGTERM during long texts). It now ends with ``engine_closed`` at once, and
    stops counting."""
    from engine import load_engine

    engine = load_engine(settings)
    real_run = engine._codec_run

    def slow_codec(work):  # a codec far behind the decoding
        time.sleep(0.3)
        real_run(work)

    engine._codec_run = slow_codec
    request = generation.GenerationRequest([generation.Turn("user", "Say it.")], True, 1, 0.7, 0.95, 50)
    request = replace(request, max_new_tokens=200, seed=1)
    pieces, closing = [], None

    async def listen():
        nonlocal closing
        async for event in engine.stream(request):
            if isinstance(event, generation.AudioPiece):
                pieces.append(event)
            if closing is None and engine.finishing:  # its tokens are done, its audio is not
                closing = asyncio.ensure_future(asyncio.to_thread(engine.close))

    try:
        with pytest.raises(generation.EngineFailure) as ended:
            asyncio.run(asyncio.wait_for(listen(), 30))
        assert ended.value.code == "engine_closed"
        assert closing is not None and len(pieces) < 200 // 20, len(pieces)  # (a 20-frame piece each)
        assert engine.pending == 0 and engine.finishing == 0
    finally:
        engine.close()


def test_an_impossible_max_tokens_is_a_400_before_queueing(client, engine):
    steps = engine.steps
    response = client.post("/v1/chat/completions", json=chat(seed=1, max_tokens=engine.max_context))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert engine.steps == steps and engine.pending == 0


def test_a_full_engine_answers_429_with_retry_after_from_the_measured_rate(client, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_queue", 0)
    monkeypatch.setattr(engine, "_job_seconds", 7.3)
    busy = client.post("/v1/chat/completions", json=chat())
    assert busy.status_code == 429
    assert busy.headers["retry-after"] == str(math.ceil(7.3))
    with pytest.raises(generation.EngineBusy) as refused:
        asyncio.run(engine.generate(generation.GenerationRequest([], True, 5, 0.7, 0.95)))
    assert refused.value.retry_after == pytest.approx(7.3)


def test_the_warm_up_teaches_retry_after_nothing(engine, monkeypatch):
    """A fresh server's first 429s assume ``JOB_SECONDS`` a request: the warm-up's answers (24 tokens and 4)
    made them say 3 s where a trial's burst of speech requests waited 12."""
    from engine import JOB_SECONDS

    monkeypatch.setattr(engine, "_job_seconds", 0.01)
    engine.warm_up()
    assert engine.retry_after == pytest.approx(JOB_SECONDS)


def test_a_greedy_request_decodes_as_upstream_generate_does(engine):
    """The batched decoder reproduces upstream's batch-1 ``generate`` token for token (float32, greedy, with
    the repetition-aware redraw off). Greedy only: a sampled request draws its random numbers from a hash of
    its seed and position (the same in any batch), not from torch's generator as upstream does, so the
    same seed picks other tokens than upstream's; ``test_sampling_follows_the_distribution`` checks those."""
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    turns = [generation.Turn("system", "Generate audio."), generation.Turn("user", "Hello there.")]
    request = generation.GenerationRequest(turns, True, 60, 0.0, 0.95, 50, ras_window=0)
    ours = asyncio.run(engine.generate(request))
    inputs = engine._prepare(request).inputs
    with torch.inference_mode():
        _, audio = engine.higgs.model.generate(
            **inputs, max_new_tokens=60, use_cache=True, tokenizer=engine.higgs.tokenizer,
            stop_strings=["<|end_of_text|>", "<|eot_id|>", "<|audio_eos|>"], do_sample=False,
        )  # fmt: skip
    upstream = revert_delay_pattern(audio[0]).clip(0, 1023)[:, 1:-1]
    assert upstream.shape[1] == 51 and torch.equal(ours.codes.codes, upstream)


def test_fast_forward_layers_decode_as_upstream_does(engine):
    """Layers outside ``audio_dual_ffn_layers`` fast-forward audio tokens (they keep their input hidden
    state): the decoder's path for them, beside the residual sums it writes in place, matches upstream's
    greedy ``generate`` column for column (the tiny model has every layer dual, as the real one does)."""
    import copy

    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    config = copy.deepcopy(engine.higgs.model.config)
    config.audio_dual_ffn_layers = [0]
    model = HiggsAudioModel(config).eval()
    model.load_state_dict(engine.higgs.model.state_dict(), strict=False)  # layer 1 has no audio FFN now
    small = decoder.BatchDecoder(
        model,
        slots=1,
        max_len=1024,
        audio_out_token=engine.higgs.config.audio_out_token_idx,
        audio_eos_token=engine.higgs.audio_eos_id,
        suppress_in_text=engine.higgs.audio_start_ids,
    )  # a model of its own, so not engine.higgs.decoder
    assert small.layers.kinds == ["dual", "skip"]
    turns = [generation.Turn("system", "Generate audio."), generation.Turn("user", "Hello there.")]
    request = generation.GenerationRequest(turns, True, 30, 0.0, 0.95, 50, ras_window=0)
    inputs = engine._prepare(request).inputs
    first = small.prefill(slot=0, inputs=inputs, audio_output=True, sampling=engine._sampling(request))
    ours = torch.stack([first[1:], *(small.step()[0, 1:] for _ in range(29))], dim=1)
    with torch.inference_mode():
        _, audio = model.generate(
            **inputs, max_new_tokens=30, use_cache=True, tokenizer=engine.higgs.tokenizer, do_sample=False,
            stop_strings=["<|end_of_text|>", "<|eot_id|>", "<|audio_eos|>"],
        )  # fmt: skip
    assert torch.equal(ours, audio[0][:, :30])


def test_the_step_a_cuda_graph_captures_runs_outside_inference_mode(engine):
    """A capture warms up and records the eager step as the engine calls it, outside ``inference_mode``:
    with parameters that asked for gradients, autograd refused the decoder's in-place products there
    (``addcmul(out=...)``), and every CUDA graph capture failed (found by reading the code: no CPU test
    captures). The model and the codec ask for none, and the step runs in every mode, its state put back."""
    assert not any(p.requires_grad for p in engine.higgs.model.parameters())
    assert not any(p.requires_grad for p in engine.higgs.codec.parameters())
    small = engine._decoder
    before = [t.clone() for t in (small.pos, small.column, small.token, small.history)]
    for mode in ("audio", "mixed", "text"):
        with small.state_kept():
            out, *logits = small._device_step(2, small.length_buckets[0], mode, (True, True, 0))
        assert out.shape == (2, 1 + small.codebooks) and not out.requires_grad
    after = (small.pos, small.column, small.token, small.history)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_replay_is_checked_on_the_logits_that_are_not_masked():
    """The check of a captured graph against the eager step: masked logits (-inf) must be masked alike,
    the others close. Scaled by the largest logit, -inf included, it let any replay pass."""
    want = torch.tensor([[1.0, float("-inf"), 3.0]])
    assert layers.same_logits(want, want.clone())
    assert layers.same_logits(want, want + 1e-4)
    assert not layers.same_logits(want, torch.tensor([[500.0, float("-inf"), 3.0]]))
    assert not layers.same_logits(want, torch.tensor([[1.0, 2.0, 3.0]]))
    assert not layers.same_logits(want, torch.tensor([[float("nan"), float("-inf"), 3.0]]))


def test_top_k_candidates_choose_what_sorting_the_whole_vocabulary_chooses(engine):
    """While every sampling row keeps at most ``TOP_K_CANDIDATES`` tokens, ``_choose`` looks at that many
    best tokens (``topk``) instead of sorting all of them: the same token for every row, codebook and draw,
    with top-k alone, with top-p, with both, and for greedy rows beside them."""
    rows, vocab = 6, engine._decoder.codes
    small = engine._decoder
    saved = [t[:rows].clone() for t in (small.temperature, small.top_k, small.top_p, small.sampled)]
    try:
        small.temperature[:rows] = torch.tensor([0.7, 1.0, 1.3, 0.5, 1.0, 1.0])
        small.top_k[:rows] = torch.tensor([50, 1, 64, 20, vocab, 50])
        small.top_p[:rows] = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.95])
        small.sampled[:rows] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # row 4 greedy
        generator = torch.Generator().manual_seed(0)
        for draw in range(20):
            logits = torch.randn(rows, 8, vocab, generator=generator) * (1 + draw / 5)
            noise = -torch.log(-torch.log(torch.rand(rows, 8, vocab, generator=generator)))
            for filters in ((True, False), (True, True)):
                whole = small._choose(logits, slice(0, rows), noise, (*filters, 0))
                best = small._choose(logits, slice(0, rows), noise, (*filters, decoder.TOP_K_CANDIDATES))
                assert torch.equal(whole, best), (draw, filters)
    finally:
        for tensor, value in zip(
            (small.temperature, small.top_k, small.top_p, small.sampled), saved, strict=True
        ):
            tensor[:rows] = value


def test_sampling_follows_the_distribution():
    """The hashed Gumbel-max draw picks each token as often as softmax says, a row's noise depends on its
    own seed and position only (not on the rows beside it), and the RAS redraw uses other numbers."""
    lanes = decoder.gumbel_lanes(2, 2, 4, torch.device("cpu"))
    n = 20000
    seed, position = torch.full((n,), 7), torch.arange(n)
    noise = decoder.gumbel_noise(seed, position, lanes)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    drawn = (logits + noise[:, 0]).argmax(dim=-1)
    for codebook in range(2):
        frequency = torch.bincount(drawn[:, codebook], minlength=4) / n
        assert torch.allclose(frequency, logits[codebook].softmax(dim=-1), atol=0.015)
    assert noise.isfinite().all() and abs(float(noise.mean()) - 0.5772) < 0.03  # Euler-Mascheroni
    alone = decoder.gumbel_noise(seed[5:6], position[5:6], lanes)
    among = decoder.gumbel_noise(torch.tensor([1, 7, 2**62]), torch.tensor([0, 5, 9]), lanes)
    assert torch.equal(alone[0], among[1]) and torch.equal(alone[0], noise[5])
    assert not torch.equal(alone[0, 0], alone[0, 1])  # the draw and the RAS redraw use other numbers


def test_waiting_requests_prefilled_together_get_the_answers_they_get_alone(
    client, engine, stored_voice, monkeypatch
):
    """With ``prefill_in_one_pass`` (CUDA's way) a burst is prefilled in one forward pass, the prompts padded
    on the left. Each request (default, stored, built-in and cloned voices, a text answer)
    keeps its length, finish and usage; its tokens are not bit-for-bit guaranteed, because a padded row's
    cache differs from its solo prefill by rounding (``test_a_prefill_together_fills_each_slot_as_alone``
    bounds that difference), so a near-tie could pick another token."""
    bodies = [
        chat(seed=1, max_tokens=20),
        clone(seed=2, max_tokens=16, temperature=1.0, top_p=0.8),
        chat(seed=3, max_tokens=18, voice=stored_voice),
        chat(seed=None, max_tokens=14, temperature=0, voice="nova", text="A built-in voice, greedy."),
        text_chat(seed=5, max_tokens=10),
    ]
    alone = [answer(post(client, body)) for body in bodies]
    batches = []
    real_fill, real_admissible = engine._decoder.fill, engine._admissible

    def fill(admissions, batch=None):
        batches.append(len(admissions))
        return real_fill(admissions, batch)

    def admissible():  # (under the engine's lock) nothing is admitted until all of them wait: one burst
        return real_admissible() if batches or len(engine._waiting) == len(bodies) else []

    monkeypatch.setattr(engine._decoder, "fill", fill)
    monkeypatch.setattr(engine, "_admissible", admissible)
    monkeypatch.setattr(engine, "prefill_in_one_pass", True)
    together_answers = [answer(r) for r in together(client, bodies)]
    assert batches[0] == len(bodies), batches
    for i, (a, c) in enumerate(zip(alone, together_answers, strict=True)):
        assert a[1:] == c[1:], f"request {i}: finish or usage changed when prefilled with the others"
        if a[0] and c[0] and i < 4:  # the audio answers: as long as alone
            assert len(a[0]) == len(c[0]), i
    assert_idle(client, engine)


def _tone_reference(engine, seconds: float = 1) -> generation.AudioCodes:
    """A voice reference's codes: a 220 Hz tone of ``seconds``, encoded by the engine's codec."""
    t = np.arange(int(24000 * seconds), dtype=np.float32) / 24000
    return asyncio.run(engine.encode(engine_module.Audio(0.3 * np.sin(2 * np.pi * 220 * t), 24000)))


def _mixed_prompts(engine, answered: bool = False) -> list:
    """Requests whose prompts take each path of a fill: the default voice, text answers (a short and a
    longer question), a voice reference; with ``answered``, a text answer to a question about a reference."""
    reference = _tone_reference(engine)
    Turn = generation.Turn
    requests = [
        generation.GenerationRequest(
            [Turn("system", "Generate audio."), Turn("user", "No reference in this prompt.")], True, 10, 0.7,
            0.95, 50, seed=1,
        ),
        generation.GenerationRequest([Turn("user", "Hi.")], False, 10, 0.7, 0.95, 50, seed=2),
        generation.GenerationRequest(
            [Turn("user", "A text answer to a longer question, please.")], False, 10, 0.0, 1.0, 0, seed=3
        ),
        generation.GenerationRequest(
            [Turn("system", "Generate audio."), Turn("user", "Say it."), Turn("assistant", audio=reference),
             Turn("user", "Now.")], True, 10, 0.7, 0.95, 50, seed=4,
        ),
    ]  # fmt: skip
    if answered:
        turns = [Turn("user", "Say it."), Turn("assistant", audio=reference), Turn("user", "What was it?")]
        requests.append(generation.GenerationRequest(turns, False, 10, 0.0, 1.0, 0, seed=5))
    return requests


def _admitted(engine, requests: list) -> tuple[list, list]:
    """The requests' prompts, and their admissions into slots 0, 1, ... in order."""
    prompts = [engine._prepare(r) for r in requests]
    return prompts, [
        engine._admission(r, p, i) for i, (p, r) in enumerate(zip(prompts, requests, strict=True))
    ]


def test_steps_run_while_a_slot_is_filled_leave_its_prompt_alone(engine):
    """A slot filled while others step (CUDA's ``prefill_beside_steps``) joins with the cache a fill alone
    gives it: the steps between its fill and ``occupy`` write its parked position (the slot's last), never
    its prompt, and from then on its tokens are those of the same prompt filled and started at once. A
    reserved slot goes to no other admission."""
    Turn = generation.Turn
    requests = [
        generation.GenerationRequest(
            [Turn("system", "Generate audio."), Turn("user", text)], True, 40, 0.7, 0.95, 50, seed=seed
        )
        for seed, text in ((1, "I am decoding."), (2, "I am being filled meanwhile."))
    ]
    _, (running, newcomer) = _admitted(engine, requests)
    small = engine.higgs.decoder(2, 1024)

    def newcomers_tokens(steps_between: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        small.prefill_many([running])
        small.reserve([newcomer.slot])
        with pytest.raises(RuntimeError):
            small.free_slots(1)
        filled = small.fill([newcomer])
        prompt = [kv[newcomer.slot, :, :, : newcomer.tokens].clone() for kv in small.cache]
        for _ in range(steps_between):
            small.step()
        kept = [kv[newcomer.slot, :, :, : newcomer.tokens] for kv in small.cache]
        assert all(torch.equal(a, b) for a, b in zip(prompt, kept, strict=True)), steps_between
        small.occupy([newcomer], filled)
        tokens = torch.stack([small.step()[newcomer.slot] for _ in range(20)])
        small.release(running.slot)
        small.release(newcomer.slot)
        return tokens

    assert torch.equal(newcomers_tokens(0), newcomers_tokens(6))


def test_a_slot_s_repetition_window_looks_back_into_its_voice_reference(engine):
    """RAS counts repeats over a row's last columns: for a cloned voice the reference's last columns (as
    upstream counts them), then the opening all-BOS column; without a reference, nothing before it. The
    plain request's slot held a reference's columns before, which must not show through."""
    reference = _tone_reference(engine, seconds=2)
    Turn = generation.Turn
    requests = [
        generation.GenerationRequest(
            [Turn("system", "Generate audio."), Turn("user", "Say it."), Turn("assistant", audio=reference),
             Turn("user", "Now.")],
            True, 10, 0.7, 0.95, 50, seed=1,
        ),
        generation.GenerationRequest(
            [Turn("system", "Generate audio."), Turn("user", "None.")], True, 10, 0.7, 0.95, 50, seed=2
        ),
    ]  # fmt: skip
    _, (cloned, plain) = _admitted(engine, requests)
    small = engine.higgs.decoder(2, 1024)
    small.prefill_many([replace(cloned, slot=1)])  # slot 1 holds a reference's columns first
    small.release(1)
    small.prefill_many([cloned])
    small.prefill_many([plain])
    window = decoder.RAS_MAX_WINDOW
    codes = cloned.inputs["audio_out_ids"][:, -(window - 1) :].long()
    history = small.history.cpu()
    assert torch.equal(history[0, :, : window - 1], codes) and (history[:, :, -1] == small.bos).all()
    assert (history[1, :, :-1] == -1).all()


def test_a_prefill_together_fills_each_slot_as_alone(engine):
    """Three prompts of different lengths (one with a voice reference, one for a text answer) prefilled in
    one pass fill their slots' caches as three solo prefills do, to float32 rounding, with the same first
    tokens; the longest row, which has no padding, exactly."""

    reference = _tone_reference(engine, seconds=2)
    Turn = generation.Turn
    requests = [
        generation.GenerationRequest(
            [Turn("system", "Generate audio."), Turn("user", "A longer prompt, with a few words in it.")],
            True, 10, 0.7, 0.95, 50, seed=1,
        ),
        generation.GenerationRequest(
            [Turn("system", "Generate audio."), Turn("user", "Say it."), Turn("assistant", audio=reference),
             Turn("user", "Now.")],
            True, 10, 0.7, 0.95, 50, seed=2,
        ),
        generation.GenerationRequest([Turn("user", "Hi.")], False, 10, 0.7, 0.95, 50, seed=3),
    ]  # fmt: skip
    prompts, admissions = _admitted(engine, requests)
    small = engine.higgs.decoder(len(requests), 1024)
    solo_firsts, solo_keys = [], []
    for a in admissions:
        solo_firsts.append(small.prefill_many([a])[0])
        solo_keys.append([k[a.slot, :, : a.tokens].clone() for k in small.keys])
        small.release(a.slot)
    batch = engine.higgs.collate([p.sample for p in prompts])
    firsts = small.prefill_many(admissions, batch)
    longest = max(range(3), key=lambda i: prompts[i].tokens)
    for i, a in enumerate(admissions):
        assert small.lengths[i] == a.tokens and torch.equal(firsts[i], solo_firsts[i])
        diff = max(
            float((k[i, :, : a.tokens] - s).abs().max())
            for k, s in zip(small.keys, solo_keys[i], strict=False)
        )
        assert diff < 1e-5 and (i != longest or diff == 0), (i, diff)


def test_prompts_padded_to_a_prefill_graphs_length_fill_their_slots_as_unpadded(engine, monkeypatch):
    """On CUDA prompts are padded on the left to one of ``PREFILL_GRAPH_LENGTHS`` and filled by a captured
    graph of that shape (``_padded_pass``); here the same pass runs eagerly. Alone and together, audio and
    text answers, with and without a voice reference (whose columns ``_merged_layout`` places as upstream's
    merge does), each slot's keys and values are the unpadded fill's to float32 rounding and the first
    tokens the same; a prompt longer than every length, and a length that reaches the slot's last position
    (where free slots' rows park), are filled unpadded."""
    requests = _mixed_prompts(engine, answered=True)
    prompts, admissions = _admitted(engine, requests)
    small = engine.higgs.decoder(len(requests), 1024)
    padded: list[tuple[tuple[int, int], bool]] = []
    real_pass = small.prefiller._padded_pass

    def padded_pass(ids, pads, where, codes=None, is_code=None):
        padded.append((tuple(ids.shape), codes is not None))
        return real_pass(ids, pads, where, codes, is_code)

    monkeypatch.setattr(small.prefiller, "_padded_pass", padded_pass)

    def fill(group: list[int], lengths: tuple[int, ...]) -> list:
        small.prefiller.padded_lengths = lengths
        batch = engine.higgs.collate([prompts[i].sample for i in group]) if len(group) > 1 else None
        firsts = small.prefill_many([admissions[i] for i in group], batch)
        filled = [
            (first, [kv[i, :, :, : prompts[i].tokens].clone() for kv in small.cache])
            for first, i in zip(firsts, group, strict=True)
        ]
        for i in group:
            small.release(i)
        return filled

    longest = max(prompts[i].tokens for i in (0, 1, 2))
    for group, lengths, pads in (
        ([0], (16, 64, 128, 256), True),
        ([1], (64, 128, 256), True),
        ([0, 1, 2], (64, 128, 256), True),
        ([3], (64, 128, 256, 512), True),  # a voice reference
        ([4], (64, 128, 256, 512), True),  # a text answer about one
        ([0, 3, 2, 4], (64, 128, 256, 512), True),
        ([0, 1, 2], (longest - 1,), False),  # longer than every length
        ([0], (1024,), False),  # the slot's last position is its parked one
    ):
        padded.clear()
        ours = fill(group, lengths)
        tokens = max(prompts[i].tokens for i in group)
        shape = (len(group), min((n for n in lengths if n >= tokens), default=0))
        codes = any(i in (3, 4) for i in group)
        assert padded == ([(shape, codes)] if pads else []), (group, lengths, padded)
        theirs = fill(group, ())
        for i, (first, cached), (their_first, their_cached) in zip(group, ours, theirs, strict=True):
            assert torch.equal(first, their_first), (group, i)
            diff = max(float((a - b).abs().max()) for a, b in zip(cached, their_cached, strict=True))
            assert diff < 1e-5, (group, i, diff)


def test_requests_prefilled_padded_get_the_answers_they_get_unpadded(
    client, engine, stored_voice, monkeypatch
):
    """Through HTTP, with prompts padded as on CUDA (``padded_lengths``, the pass run eagerly here) and a
    burst prefilled in one pass beside the steps: every request (the default voice, a stored one, a
    built-in one, a cloned one, a text answer, speech) gets the answer it gets unpadded, its audio within a
    step of 16-bit PCM (float32 rounding: the padded attention is masked, the unpadded one causal)."""
    bodies = [
        chat(seed=31, max_tokens=20),
        chat(seed=None, max_tokens=14, temperature=0, text="The default voice, greedy."),
        text_chat(seed=33, max_tokens=10),
        chat(seed=34, max_tokens=12, voice=stored_voice),
        chat(seed=36, max_tokens=12, voice="nova"),
        clone(seed=37, max_tokens=12),
        {"model": "tts-1", "input": "Padded speech.", "voice": "default", "response_format": "pcm",
         "seed": 35},
    ]  # fmt: skip
    unpadded = [answer(post(client, body)) for body in bodies]
    shapes: list[tuple[int, bool]] = []
    real_pass = engine._decoder.prefiller._padded_pass

    def padded_pass(ids, pads, where, codes=None, is_code=None):
        shapes.append((ids.shape[0], codes is not None))
        return real_pass(ids, pads, where, codes, is_code)

    monkeypatch.setattr(engine._decoder.prefiller, "_padded_pass", padded_pass)
    monkeypatch.setattr(engine._decoder.prefiller, "padded_lengths", (64, 128, 256, 512))
    assert [answer(post(client, body)) for body in bodies] == unpadded
    assert shapes == [(1, False)] * 3 + [(1, True)] * 3 + [(1, False)], shapes
    monkeypatch.setattr(engine, "prefill_in_one_pass", True)
    monkeypatch.setattr(engine, "prefill_beside_steps", True)
    shapes.clear()
    assert [answer(r) for r in together(client, bodies)] == unpadded
    assert sum(rows for rows, _ in shapes) == len(bodies) and max(rows for rows, _ in shapes) > 1, shapes
    assert_idle(client, engine)


def test_a_failed_prefill_together_falls_back_to_one_at_a_time(client, engine, monkeypatch):
    """A fault in a prefill of several requests (a prompt the batch cannot take) costs nobody an answer:
    each is prefilled alone."""
    bodies = [chat(seed=1, max_tokens=12), chat(seed=2, max_tokens=10, text="Another one.")]
    alone = [answer(post(client, body)) for body in bodies]
    failed = []
    real_fill, real_admissible = engine._decoder.fill, engine._admissible

    def fill(admissions, batch=None):
        if len(admissions) == 1:  # a prefill alone
            return real_fill(admissions, batch)
        failed.append(len(admissions))
        raise ValueError("injected fault in a prefill together")

    def admissible():
        return real_admissible() if failed or len(engine._waiting) == len(bodies) else []

    monkeypatch.setattr(engine._decoder, "fill", fill)
    monkeypatch.setattr(engine, "_admissible", admissible)
    monkeypatch.setattr(engine, "prefill_in_one_pass", True)
    assert [answer(r) for r in together(client, bodies)] == alone and failed == [2]
    assert_idle(client, engine)


# ---- how many slots ----


def test_the_slots_are_as_many_as_the_kv_cache_budget_holds(caplog):
    gib = 1024**3
    slot = gib // 2
    headroom = int(engine_module.GPU_HEADROOM_GB * gib)
    kv_slots = engine_module.kv_slots
    # On a GPU without HIGGS_KV_CACHE_GB: what it has free less the headroom, up to the slots wanted.
    assert kv_slots(16, slot, 8192, None, headroom + int(3.2 * gib)) == 6
    assert kv_slots(16, slot, 8192, None, 80 * gib) == 16
    # HIGGS_KV_CACHE_GB alone counts when set, on a GPU as on the CPU; the CPU's default is 16 GiB.
    assert kv_slots(16, slot, 8192, 2.0, 80 * gib) == 4
    assert kv_slots(8, slot, 8192, None, None) == 8
    assert kv_slots(64, slot, 8192, None, None) == int(engine_module.CPU_KV_CACHE_GB * 2)
    # Not one slot: a start-up error saying what to change.
    with pytest.raises(RuntimeError, match=r"8192 tokens needs 0\.50 GiB .*GPU's 3\.4 GiB free") as small:
        kv_slots(16, slot, 8192, None, int(3.4 * gib))
    assert "HIGGS_KV_CACHE_LENGTHS" in str(small.value) and "raise HIGGS_KV_CACHE_GB" not in str(small.value)
    with pytest.raises(RuntimeError, match="HIGGS_KV_CACHE_GB=0.25; lower HIGGS_KV_CACHE_LENGTHS"):
        kv_slots(16, slot, 8192, 0.25, 80 * gib)
    # A budget set beyond what the GPU can spare is taken, with a warning.
    with caplog.at_level("WARNING", logger="engine"):
        assert kv_slots(16, slot, 8192, 8.0, headroom + 9 * gib) == 16
    assert "leaves" not in caplog.text
    with caplog.at_level("WARNING", logger="engine"):
        assert kv_slots(16, slot, 8192, 8.0, headroom + 6 * gib) == 16
    assert "HIGGS_KV_CACHE_GB=8 leaves 1.0 GiB of the GPU free" in caplog.text


def test_the_default_slots_are_16_on_a_gpu_and_8_on_the_cpu(settings):
    unset = settings.model_copy(update={"max_batch_size": None})
    assert (unset.batch_slots("cuda"), unset.batch_slots("cpu")) == (16, 8)
    assert settings.model_copy(update={"max_batch_size": 3}).batch_slots("cuda") == 3


def test_the_engine_sizes_its_slots_and_line_to_the_memory_free(settings, engine, tmp_path, monkeypatch):
    """On a GPU (its free memory faked: the tiny engine runs on the CPU) the engine makes as many of the
    slots wanted as fit beside the headroom, and a waiting line twice as long; /metrics shows them. (And
    ``HIGGS_CODEC_GATHER_MS`` reaches the engine: by default nothing waits on a CPU.)"""
    from fastapi.testclient import TestClient

    from app import create_app

    slot_bytes = sum(kv[0].numel() * kv.element_size() for kv in engine._decoder.cache)
    free = int(engine_module.GPU_HEADROOM_GB * 1024**3) + 5 * slot_bytes + slot_bytes // 2
    monkeypatch.setattr(engine_module, "_free_memory", lambda device: free)
    changes = {
        "stt_model": "", "warmup": False, "voices_dir": tmp_path, "max_batch_size": 16, "codec_gather_ms": 25,
    }  # fmt: skip
    app = create_app(settings.model_copy(update=changes))
    with TestClient(app) as client:
        deadline = time.monotonic() + 300
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (app.state.engine.slots, app.state.engine.max_queue) == (5, 10)
        assert (app.state.engine.codec_gather, engine.codec_gather) == (0.025, 0.0)
        assert "higgs_batch_slots 5.0" in client.get("/metrics").text
        body = {"model": "tts-1", "input": "Hi.", "voice": "default", "response_format": "wav", "seed": 1}
        assert client.post("/v1/audio/speech", json=body).status_code == 200


def test_the_prefill_graphs_setting_reaches_the_engine(settings, monkeypatch):
    """``HIGGS_PREFILL_GRAPHS`` (on by default) is the engine's ``prefill_graphs``: on CUDA whether prompts
    (with a voice reference or without) are padded and filled by graphs (``Prefiller.capture_graphs``)."""
    made: list[dict] = []
    monkeypatch.setattr(engine_module, "HiggsEngine", lambda *args, **kwargs: made.append(kwargs))
    monkeypatch.setenv("HIGGS_PREFILL_GRAPHS", "false")
    for update in ({}, {"prefill_graphs": False}):
        engine_module.load_engine(settings.model_copy(update=update))
    assert [kwargs["prefill_graphs"] for kwargs in made] == [True, False]
    assert not type(settings)().prefill_graphs  # (from the environment)


def test_speech_recognition_loads_before_the_engine_sizes_its_slots(settings, monkeypatch, tmp_path):
    """On a GPU the engine takes what is free for its KV cache: the recognizer must hold its memory first."""
    from fastapi.testclient import TestClient

    import app as app_module

    loaded = []

    def recognizer(_settings):
        loaded.append("recognizer")
        return object()

    def engine(_settings):
        loaded.append("engine")
        raise RuntimeError("stop here: only the loading order is under test")

    monkeypatch.setattr(app_module, "load_recognizer", recognizer)
    monkeypatch.setattr(app_module, "load_engine", engine)
    app = app_module.create_app(settings.model_copy(update={"voices_dir": tmp_path}), load_behind=False)
    with pytest.raises(RuntimeError, match="stop here"), TestClient(app):
        pass
    assert loaded == ["recognizer", "engine"]


# ---- prefill ----


def test_a_prefill_projects_the_text_head_on_each_rows_last_position_only(engine):
    """Upstream's forward would make text logits for every prompt token (1 GiB for a 4,096-token prefill
    of the real model); a prefill through it (for inputs the decoder's own layers leave to it) makes them
    for the last one, and chooses the same first token."""

    from transformers import DynamicCache

    reference = _tone_reference(engine)
    Turn = generation.Turn
    heard = [Turn("user", "Say it."), Turn("assistant", audio=reference)]
    requests = [
        generation.GenerationRequest(
            [*heard, Turn("user", "Hi there, how are you today?")], False, 10, 0.0, 1.0, 0
        ),
        generation.GenerationRequest([*heard, Turn("user", "Hi.")], False, 10, 0.0, 1.0, 0),
    ]
    prompts, admissions = _admitted(engine, requests)
    small = engine.higgs.decoder(2, 1024)
    seen = []
    hook = small.text_head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    small.prefiller.own = False  # what upstream's forward gets
    try:
        firsts = small.prefill_many(admissions, engine.higgs.collate([p.sample for p in prompts]))
        assert seen == [(2, 1, small.vocab)]  # two rows, one position each
        with torch.inference_mode():  # upstream's forward alone, as the prefill calls it: every position
            args = engine.higgs.collate([p.sample for p in prompts])
            args = {k: v for k, v in args.items() if k in small.prefiller._forward_keys}
            full = engine.higgs.model(**args, past_key_values=DynamicCache(), use_cache=True).logits
    finally:
        hook.remove()
    assert seen[-1][:2] == (2, max(p.tokens for p in prompts)) and seen[-1][1] > 1
    chosen = full[:, -1].index_fill(-1, small.suppress, float("-inf")).argmax(-1)
    assert [int(f[0]) for f in firsts] == chosen.tolist()


def test_the_prefills_last_position_hook_leaves_other_threads_calls_of_the_text_head_alone(engine):
    """The text head is the decoding step's too, and a fill through upstream's forward runs beside the steps
    (on its own thread): while the fill holds the head to the last position, an eager text step on the
    scheduler thread must still get logits for every row (cut to [rows, 1], its hidden states would not go
    through the head at all)."""
    small = engine.higgs.decoder(2, 1024)
    head = small.text_head
    hidden = torch.randn(3, head.in_features)
    got = {}
    with torch.inference_mode(), prefill._last_position_only(head):
        assert tuple(head(torch.randn(2, 5, head.in_features)).shape) == (2, 1, head.out_features)
        other = threading.Thread(target=lambda: got.update(shape=tuple(head(hidden).shape)))
        other.start()
        other.join()
    assert got == {"shape": (3, head.out_features)}
    assert not head._forward_pre_hooks


def test_a_prefill_runs_the_decoders_own_layers_as_upstreams_forward_would(engine):
    """Prompts are prefilled by the decoder's own layers, not upstream's forward (whose mask handling and
    boolean indexing cost host syncs in every layer on a GPU, and about 1,270 kernel launches for one
    prompt of the real model): the default voice, text answers, and a voice reference, whose codes take
    the dual layers' audio norms and FFN. Alone and padded together, text and audio prompts mixed, the
    slots' caches are upstream's to float32 rounding (the products are grouped differently: fused
    projections, additions inside the matrix products) and the first tokens the same."""
    requests = _mixed_prompts(engine, answered=True)
    prompts, admissions = _admitted(engine, requests)
    small = engine.higgs.decoder(len(requests), 1024)
    upstream_calls = []
    spy = small.model.register_forward_pre_hook(lambda module, args: upstream_calls.append(1))

    def fill(group: list[int], path: str) -> list:
        """Prefill ``group`` (together when several) by ``path``; each row's first token and cache."""
        small.prefiller.own = path == "service"
        batch = engine.higgs.collate([prompts[i].sample for i in group]) if len(group) > 1 else None
        firsts = small.prefill_many([admissions[i] for i in group], batch)
        filled = [
            (first, [k[i, :, : prompts[i].tokens].clone() for k in small.keys])
            for first, i in zip(firsts, group, strict=True)
        ]
        for i in group:
            small.release(i)
        return filled

    try:
        for group in ([0], [1], [3], [0, 1, 2], [2, 3, 4], [0, 1, 2, 3, 4]):
            upstream_calls.clear()
            ours = fill(group, "service")
            assert not upstream_calls, group
            theirs = fill(group, "upstream")
            for i, (first, keys), (their_first, their_keys) in zip(group, ours, theirs, strict=True):
                assert torch.equal(first, their_first), (group, i)
                diff = max(float((k - o).abs().max()) for k, o in zip(keys, their_keys, strict=True))
                assert diff < 1e-5, (group, i, diff)
    finally:
        spy.remove()


def test_the_decoders_own_prefill_was_checked_against_upstreams_at_start(engine):
    """The engine compared the decoder's own prefill layers with upstream's forward when it loaded, and
    they agreed (float32 on the CPU), so its prompts go through the own layers."""
    assert engine._decoder.prefiller.own


@pytest.mark.parametrize("fault", ["differs", "fails"])
def test_an_own_prefill_that_disagrees_at_start_leaves_prompts_to_upstreams_forward(
    fault, settings, monkeypatch, tmp_path, caplog
):
    """Where the decoder's own prefill layers answer otherwise than upstream's forward at start (here made
    to write wrong caches, or to raise: a device's kernels could), the log says so and every prompt goes
    through upstream's forward: the service answers, at upstream's speed."""
    from fastapi.testclient import TestClient

    from app import create_app

    real = prefill.Prefiller._own
    calls = []

    def faulty(self, inputs, admissions, batched):
        calls.append(len(admissions))
        if fault == "fails":
            raise RuntimeError("no kernel image is available for execution on the device")
        lengths, out = real(self, inputs, admissions, batched)
        for kv in self.cache:
            kv[torch.tensor([a.slot for a in admissions])] += 1.0
        return lengths, out

    monkeypatch.setattr(prefill.Prefiller, "_own", faulty)
    changes = {"stt_model": "", "warmup": False, "voices_dir": tmp_path}
    app = create_app(settings.model_copy(update=changes))
    with caplog.at_level("WARNING", logger="engine"), TestClient(app) as client:
        deadline = time.monotonic() + 300
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not app.state.engine._decoder.prefiller.own
        checked = len(calls)
        body = {"model": "tts-1", "input": "Hi.", "voice": "default", "response_format": "pcm", "seed": 1}
        speech = client.post("/v1/audio/speech", json=body)
        assert speech.status_code == 200 and len(speech.content) > 0
    assert checked >= 1 and len(calls) == checked  # the check's calls only: the request's went to upstream
    warned = [r.getMessage() for r in caplog.records if "own prefill layers do not answer" in r.getMessage()]
    assert len(warned) == 1 and ("failed (RuntimeError" in warned[0]) == (fault == "fails"), warned


# ---- attention by each row's length (HIGGS_ATTENTION_BY_LENGTHS) ------------------------------------------


def varlen_reference(q, keys, values, cu_q, cu_k, used, length, *, whole_bucket: bool = False):
    """FlashAttention's variable-length kernel written out (which the CPU lacks), addressing memory as it
    does: row ``b``'s queries (``q`` rows ``cu_q[b]`` to ``cu_q[b + 1]``) attend to the ``used[b]`` rows of
    ``keys`` and ``values`` from row ``cu_k[b]``, query head ``h`` to key head ``h // (heads / kv heads)``;
    in float32. ``whole_bucket``: a faulty kernel that reads ``length`` rows whatever ``used`` says."""
    heads, kv_heads, dim = q.shape[1], keys.shape[1], q.shape[2]
    out = []
    for b in range(len(cu_q) - 1):
        n = length if whole_bucket else int(used[b])
        assert n <= length
        start = int(cu_k[b])
        k = keys[start : start + n].float().repeat_interleave(heads // kv_heads, dim=1)
        v = values[start : start + n].float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[int(cu_q[b]) : int(cu_q[b + 1])].float(), k) / math.sqrt(dim)
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v))
    return torch.cat(out).to(q.dtype)


def test_the_packed_views_address_each_slots_keys_and_values(engine):
    """The variable-length kernel reads the cache as it is laid out, through two views without a copy:
    row ``slot_rows * s + p`` of the keys' (values') view is slot ``s``'s key (value) at position ``p``, for
    every head, and the views stay within the cache (``as_strided`` would refuse otherwise)."""
    small = engine.higgs.decoder(3, 64)
    for kv in small.cache:
        kv.copy_(torch.randn_like(kv))
    span = decoder.slot_rows(small.kv_heads, small.max_len)
    assert torch.equal(small._cu_k, torch.arange(4, dtype=torch.int32) * span)
    for kv, (keys, values) in zip(small.cache, small._packed, strict=True):
        for slot in range(3):
            rows = slice(span * slot, span * slot + small.max_len)
            assert torch.equal(keys[rows], kv[slot, 0].transpose(0, 1))  # [positions, heads, dim]
            assert torch.equal(values[rows], kv[slot, 1].transpose(0, 1))


@pytest.mark.parametrize(
    "kernel, agrees",
    [("written out", True), ("reads the whole bucket", False), ("FlashAttention, missing on a CPU", False)],
)
def test_attention_by_lengths_is_checked_against_the_masked_attention(engine, kernel, agrees):
    """The start-up check runs the kernel over a scratch cache whose positions beyond each row's length hold
    values 50 times the others: a kernel that attends as the masked attention passes (float32: rounding
    apart), one that reads the whole bucket is off by far more than any rounding, a missing one fails."""
    small = engine.higgs.decoder(2, 64)
    if kernel == "written out":
        small._varlen = varlen_reference
    elif kernel == "reads the whole bucket":
        small._varlen = lambda *args: varlen_reference(*args, whole_bucket=True)
    agree, seen = small.check_attention_by_lengths()
    assert agree == agrees, seen
    if kernel == "reads the whole bucket":
        assert float(seen.split()[0]) > 10, seen  # decoder.BY_LENGTHS_TOLERANCE: 53 times the largest output
    if kernel.startswith("FlashAttention"):
        assert seen.startswith("failed (NotImplementedError"), seen


def test_attention_by_lengths_decodes_what_the_masked_attention_does(
    client, engine, stored_voice, monkeypatch
):
    """With attention by each row's length, requests decoded together (speech, a clone, text; different
    lengths, so different keys per row) get the answers the masked attention gives them, through HTTP; the
    kernel is the written-out one (the CPU has no FlashAttention), so this checks how the step feeds it:
    the packed views, the slots' offsets, each row's count of keys, the output's shape. In float32 the two
    attentions differ by rounding (about 1e-7 of the logits), far below the margins of the tokens chosen."""
    bodies = [
        chat(seed=21, max_tokens=30),
        clone(seed=22, max_tokens=24, temperature=1.0, top_p=0.8),
        chat(seed=23, max_tokens=36, voice=stored_voice, text="A stored voice, a longer prompt than most."),
        text_chat(seed=24, max_tokens=16),
    ]
    masked = [answer(r) for r in together(client, bodies)]
    calls = [0]

    def kernel(*args):
        calls[0] += 1
        return varlen_reference(*args)

    monkeypatch.setattr(engine._decoder, "_varlen", kernel)
    monkeypatch.setattr(engine._decoder, "by_lengths_from", 0)  # every length bucket
    by_lengths = [answer(r) for r in together(client, bodies)]
    monkeypatch.undo()
    assert calls[0] > 0
    assert by_lengths == masked
    assert_idle(client, engine)


def test_attention_by_lengths_is_used_from_its_shortest_bucket_on(client, engine, monkeypatch):
    """``HIGGS_ATTENTION_BY_LENGTHS_FROM``: the steps in the length buckets of that many positions or more
    attend by each row's length, those in shorter buckets stay masked (on an H200 the masked step was as
    fast at 512 positions, and slower from 1,024 on). Here the buckets are cut to the prompt's length plus
    8 and plus 24 positions (and the slots' full length), and the threshold is the middle one: a request
    whose context grows through all three buckets gets the masked attention's answer, and the kernel ran
    in the two longer buckets only."""
    body = chat(seed=26, max_tokens=40)
    prompt = post(client, body).json()["usage"]["prompt_tokens"]
    decoder_ = engine._decoder
    buckets = [prompt + 8, prompt + 24, decoder_.max_len]
    monkeypatch.setattr(decoder_, "length_buckets", buckets)
    stepped: list[int] = []
    kernel_read: list[int] = []
    real_run = decoder_._run

    def run(rows, length, mode):
        stepped.append(length)
        return real_run(rows, length, mode)

    def kernel(*args):
        kernel_read.append(args[-1])  # the bucket's length
        return varlen_reference(*args)

    monkeypatch.setattr(decoder_, "_run", run)
    monkeypatch.setattr(decoder_, "_varlen", kernel)
    masked = answer(post(client, body))
    assert sorted(set(stepped)) == buckets and not kernel_read
    monkeypatch.setattr(decoder_, "by_lengths_from", buckets[1])
    stepped.clear()
    by_lengths = answer(post(client, body))
    monkeypatch.undo()
    assert by_lengths == masked
    assert sorted(set(stepped)) == buckets and sorted(set(kernel_read)) == buckets[1:]
    assert len(kernel_read) == sum(length >= buckets[1] for length in stepped) * len(decoder_.cache)
    assert_idle(client, engine)


@pytest.mark.parametrize(
    "kernel, shortest",
    [("written out", 512), ("reads the whole bucket", 512), ("written out", 16384), ("this CPU's", 512)],
)
def test_the_attention_by_lengths_setting_turns_it_on_where_its_kernel_passes(
    kernel, shortest, settings, monkeypatch, tmp_path, caplog
):
    """``HIGGS_ATTENTION_BY_LENGTHS`` (on by default) with ``HIGGS_ATTENTION_BY_LENGTHS_FROM``: the engine
    checks the kernel at start and decodes with it where it passes; where it does not (here one that reads
    the whole bucket; on this CPU FlashAttention itself), the log says so and attention stays masked; with
    no length bucket that long, nothing is checked and the log says that. Either way the service answers."""
    from fastapi.testclient import TestClient

    from app import create_app

    calls = [0]

    def written_out(*args):
        calls[0] += 1
        return varlen_reference(*args, whole_bucket=kernel == "reads the whole bucket")

    if kernel != "this CPU's":
        monkeypatch.setattr(decoder, "flash_by_lengths", written_out)
    changes = {
        "stt_model": "",
        "warmup": False,
        "voices_dir": tmp_path,
        "attention_by_lengths_from": shortest,
    }
    app = create_app(settings.model_copy(update=changes))
    with caplog.at_level("INFO", logger="engine"), TestClient(app) as client:
        deadline = time.monotonic() + 300
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        on = app.state.engine._decoder.by_lengths_from is not None
        reads_own_keys = app.state.engine._decoder.reads_own_keys
        assert reads_own_keys(512) == on and not reads_own_keys(511)  # (the shortest bucket: 512)
        checked = calls[0]
        body = {"model": "tts-1", "input": "Hi.", "voice": "default", "response_format": "pcm", "seed": 1}
        speech = client.post("/v1/audio/speech", json=body)
        assert speech.status_code == 200 and len(speech.content) > 0
    assert on == (kernel == "written out" and shortest == 512)
    if kernel != "this CPU's":
        assert checked == (2 if shortest == 512 else 0)  # the check's two calls
        assert (calls[0] > checked) == on  # the request's steps went through the kernel where it is on
    said = [r.getMessage() for r in caplog.records if "attention by each row's length" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("attention by each row's length: on") == on, said
    if shortest > 512:
        assert said[0].startswith("attention by each row's length: no length bucket of 16384"), said
    if shortest == 512 and not on:  # a CPU's: one short line, what the check found at debug level
        assert said[0].endswith("its kernel is CUDA's, in 16 bits; attention stays masked"), said
