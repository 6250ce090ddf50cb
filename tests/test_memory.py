"""Freed memory given back to the system once the service is idle (``memory.py``), through HTTP."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

import memory
from app import create_app

SPEECH = {"model": "tts-1", "input": "Hi.", "voice": "default", "response_format": "pcm", "seed": 1}


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.fixture
def trims(settings, engine, recognizer, monkeypatch):
    """A client of an app that trims after 0.3 s idle, and the trims it made (the real ``malloc_trim``,
    counted)."""
    made: list[int] = []
    real = memory.malloc_trim
    assert real is not None, "glibc's malloc_trim was not found"
    monkeypatch.setattr(memory, "malloc_trim", lambda: made.append(real()) or made[-1])
    quick = settings.model_copy(update={"idle_trim_seconds": 0.3})
    app = create_app(quick, engine=engine, recognizer=recognizer)
    with TestClient(app) as client:
        yield client, made


def test_memory_is_trimmed_once_after_work_and_not_for_probes_or_mid_answer(trims):
    """A soak trial saw resident memory rise 276 MB over 30 minutes and stay there at idle, while the C
    allocator held most of it freed (``malloc_trim`` after 8 long texts: 1,812 to 1,502 MB)."""
    client, made = trims
    assert client.post("/v1/audio/speech", json=SPEECH).status_code == 200
    assert wait_for(lambda: len(made) == 1) and made[0] in (0, 1)
    for _ in range(3):  # a monitor's probes do no work: no trim is due for them
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        time.sleep(0.2)
    time.sleep(0.6)
    assert len(made) == 1
    # While an answer is in flight nothing is trimmed, however long it takes; after it, once.
    body = {**SPEECH, "input": "A longer sentence, so that the answer takes a while to arrive here."}
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        chunks = response.iter_bytes()
        next(chunks)
        time.sleep(0.8)
        assert len(made) == 1
        for _ in chunks:
            pass
    assert wait_for(lambda: len(made) == 2)
    time.sleep(0.6)
    assert len(made) == 2


def test_a_trim_gives_memory_back():
    """What the service calls, on this machine's C library: freed memory between blocks still in use (which
    ``free`` cannot give back by shrinking the heap) goes back to the system."""
    import ctypes

    if memory.malloc_trim is None:
        pytest.skip("not glibc")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 200 MB in blocks below the mmap threshold (so on the heap), every other one freed: 100 MB of holes.
    blocks = [libc.malloc(64 * 1024) for _ in range(3200)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[1::2]:
        libc.free(block)
    before = memory.resident_mb()
    memory.malloc_trim()
    after = memory.resident_mb()
    for block in blocks[::2]:
        libc.free(block)
    assert before - after > 60, (before, after)
