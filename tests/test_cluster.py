"""The service as a Ray Serve application (cluster.py): two CPU replicas of the tiny engine on a local Ray.

One Ray cluster for the module, on loopback, with its own temporary folder; the replicas share one voice
library folder. Everything goes through Ray's HTTP proxy with the official OpenAI SDK; ``X-Replica`` tells
which replica answered.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
from conftest import FIXTURES
from live_server import free_port

ray = pytest.importorskip("ray", reason="Ray is installed by `make test` (requirements-ray.txt)")

import cluster  # noqa: E402
from settings import Settings  # noqa: E402

TEXT = "Every replica should sound the same."
SAMPLE = FIXTURES / "speech_female.wav"
SAMPLE_TRANSCRIPT = "A few words from a woman, read clearly."


@pytest.fixture(scope="module")
def cluster_settings(settings: Settings, tmp_path_factory) -> Settings:
    """The session's tiny-engine settings, two replicas, a voice library of their own, recognition off."""
    return settings.model_copy(
        update={
            "voices_dir": tmp_path_factory.mktemp("shared-voices"),
            "stt_model": "",
            "replicas": 2,
            "host": "127.0.0.1",
            "port": free_port(),
        }
    )


@pytest.fixture(scope="module")
def base_url(cluster_settings: Settings, tiny_settings) -> str:
    """A local Ray (loopback, no dashboard) running the app as two CPU replicas; its proxy's URL."""
    from ray import serve

    # Ray's socket paths must stay short: its folder goes in /tmp, not in the tests' private folder.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = cluster.runtime_env()
    env["env_vars"] = {k: v for k, v in tiny_settings.items() if k.startswith("HF_")}
    ray.init(
        num_cpus=3,
        include_dashboard=False,
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1",
        runtime_env=env,
        logging_level="warning",
        log_to_driver=False,
    )
    try:
        cluster.deploy(cluster_settings)
        yield f"http://127.0.0.1:{cluster_settings.port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sdk(base_url: str) -> openai.OpenAI:
    """The official SDK, pointed at Ray's proxy."""
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(base_url: str) -> httpx.Client:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def speak(sdk: openai.OpenAI, voice: str = "default", seed: int = 1, **extra) -> tuple[str, bytes]:
    """One speech request; the replica that answered and the PCM body."""
    response = sdk.audio.speech.with_raw_response.create(
        model="tts-1", input=TEXT, voice=voice, response_format="pcm", extra_body={"seed": seed, **extra}
    )
    return response.headers["x-replica"], response.content


def replica_of_each(fn, want: int = 2, attempts: int = 30) -> dict[str, object]:
    """Call ``fn() -> (replica, value)`` until ``want`` replicas answered; their values, by replica."""
    seen: dict[str, object] = {}
    for _ in range(attempts):
        replica, value = fn()
        seen.setdefault(replica, value)
        if len(seen) >= want:
            break
    return seen


def create_voice(sdk: openai.OpenAI, name: str):
    """Store ``name`` from the speech fixture; the raw response (its status and X-Replica)."""
    with open(SAMPLE, "rb") as f:
        return sdk.audio.voices.with_raw_response.create(
            name=name, audio_sample=f, consent="cons_local", extra_body={"transcript": SAMPLE_TRANSCRIPT}
        )


# ---- without Ray's cluster: the pieces cluster.py adds ----


def test_the_replica_health_check_is_the_apps_readiness(client, app, engine):
    replica = SimpleNamespace(app=app)  # what check_health reads of the replica: its app
    check_health = cluster.Replica.func_or_class.check_health
    check_health(replica)
    assert cluster.unready_reason(app) is None
    engine.failure = "AcceleratorError"  # what a fatal CUDA error leaves
    try:
        assert client.get("/ready").status_code == 503
        with pytest.raises(RuntimeError, match="engine failed"):
            check_health(replica)  # Ray replaces the replica
    finally:
        engine.failure = None
    check_health(replica)


def test_deployment_options_one_replica_per_gpu(settings):
    gpu = settings.model_copy(update={"device": "auto"})
    options = cluster.deployment_options(gpu, cluster_gpus=4)
    assert options["num_replicas"] == 4 and options["ray_actor_options"]["num_gpus"] == 1
    scaled = cluster.deployment_options(gpu.model_copy(update={"replicas": 2, "max_replicas": 6}), 8)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["target_ongoing_requests"] == cluster.engine_slots(gpu)
    # Unset, a GPU replica's slots and line are the engine's defaults there: 16, and twice as many; Serve
    # sends a replica twice its line (the app answers past it with its own 429) and holds one line more.
    unset = gpu.model_copy(update={"max_batch_size": None, "max_queue": None})
    options = cluster.deployment_options(unset, 1)
    assert cluster.engine_slots(unset) == 16
    assert options["max_ongoing_requests"] == 64 and options["max_queued_requests"] == 32
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 1}
    assert (
        scaled["autoscaling_config"]["min_replicas"] == 2
        and scaled["autoscaling_config"]["max_replicas"] == 6
    )
    with pytest.raises(RuntimeError, match="HIGGS_DEVICE=cpu"):
        cluster.deployment_options(gpu, cluster_gpus=0)
    cpu = cluster.deployment_options(settings, cluster_gpus=0)
    assert cpu["num_replicas"] == 1 and cpu["ray_actor_options"]["num_gpus"] == 0


def test_the_hub_token_stays_out_of_rays_runtime_environment(monkeypatch, caplog):
    """Ray shows a runtime environment's variables on its dashboard and logs them: the Hugging Face
    settings travel to the replicas, the token does not (and is not logged either)."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_new")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secret_old")
    monkeypatch.setenv("HF_HUB_CACHE", "/models/hub")
    with caplog.at_level("INFO", logger="cluster"):
        env = cluster.runtime_env()
    assert env["env_vars"]["HF_HUB_CACHE"] == "/models/hub"
    assert "hf_secret" not in json.dumps(env) and "hf_secret" not in caplog.text
    assert "HF_TOKEN and HUGGING_FACE_HUB_TOKEN not sent to the replicas" in caplog.text


# ---- through Ray's proxy ----


def test_both_replicas_serve_under_concurrent_load(sdk, http):
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda seed: speak(sdk, seed=seed), range(8)))
    assert {replica for replica, _ in answers} == set(
        replica_of_each(lambda: (http.get("/ready").headers["x-replica"], 0))
    )
    assert len({replica for replica, _ in answers}) == 2
    assert all(len(body) > 24000 for _, body in answers)  # over half a second of 24 kHz 16-bit audio each


def test_a_response_through_the_proxy_carries_one_request_id(http):
    """Ray's proxy adds ``X-Request-ID`` itself (the client's, or one it makes and hands to the app): the
    app's own would be a second header."""
    given = http.get("/v1/models", headers={"X-Request-ID": "trace-42"})
    made = http.post("/v1/audio/speech", json={"model": "tts-1", "voice": "default"})  # no input: a 400
    assert given.status_code == 200 and made.status_code == 400
    assert given.headers.get_list("x-request-id") == ["trace-42"]
    assert len(made.headers.get_list("x-request-id")) == 1 and made.headers["x-request-id"]


def test_a_voice_stored_through_one_replica_is_used_and_deleted_through_the_other(
    sdk, http, cluster_settings
):
    created = create_voice(sdk, "shared-anna")
    assert created.status_code == 200
    creator = created.headers["x-replica"]

    def use() -> tuple[str, int]:
        response = http.post(
            "/v1/audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "shared-anna"}
        )
        return response.headers["x-replica"], response.status_code

    used = replica_of_each(use)
    assert len(used) == 2 and set(used.values()) == {200}, (
        used
    )  # at once, on the replica that did not store it
    other = next(r for r in used if r != creator)

    deleted = http.delete("/v1/audio/voices/shared-anna")
    assert deleted.status_code == 200
    gone = replica_of_each(use)
    assert len(gone) == 2 and set(gone.values()) == {400}, gone
    assert other in gone
    assert not list(cluster_settings.voices_dir.glob("**/shared-anna*"))


def test_concurrent_same_name_creates_across_replicas_give_exactly_one_200(sdk):
    start = threading.Barrier(6)

    def create(_: int) -> tuple[int, str]:
        start.wait()
        try:
            response = create_voice(sdk, "race")
            return response.status_code, response.headers["x-replica"]
        except openai.ConflictError as exc:
            return exc.status_code, exc.response.headers["x-replica"]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(create, range(6)))
    assert sorted(status for status, _ in answers) == [200, 409, 409, 409, 409, 409]
    assert len({replica for _, replica in answers}) == 2  # both replicas took part in the race
    sdk.audio.voices.delete("race")


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767


def same_audio(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal length and samples (a replica's torch runs one thread: float sums may differ in last bits)."""
    return len(a) == len(b) > 0 and float(np.abs(a - b).max()) < 0.02


def test_streaming_through_the_proxy_matches_the_direct_app(sdk, openai_client, client):
    body = {
        "model": "gpt-4o-audio-preview",
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "pcm16"},
        "messages": [{"role": "user", "content": TEXT}],
        "max_tokens": 60,
        "seed": 4,
    }

    def chat_audio(sdk_client: openai.OpenAI) -> tuple[np.ndarray, int]:
        chunks = list(sdk_client.chat.completions.create(**body, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        pieces = [
            base64.b64decode(d.audio.data) for d in deltas if getattr(d, "audio", None) and d.audio.data
        ]
        return pcm(b"".join(pieces)), len(pieces)

    direct, _ = chat_audio(openai_client)
    proxied, pieces = chat_audio(sdk)
    assert pieces >= 3 and same_audio(proxied, direct)

    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1", input=TEXT, voice="default", response_format="pcm", extra_body={"seed": 5}
    ) as response:
        direct_speech = response.read()
    with sdk.audio.speech.with_streaming_response.create(
        model="tts-1", input=TEXT, voice="default", response_format="pcm", extra_body={"seed": 5}
    ) as response:
        parts = list(response.iter_bytes())
    assert len(parts) >= 2 and same_audio(pcm(b"".join(parts)), pcm(direct_speech))

    sse = {"model": "tts-1", "input": TEXT, "voice": "default", "response_format": "pcm",
           "stream_format": "sse", "seed": 5}  # fmt: skip

    def events(stream_client) -> tuple[list[str], np.ndarray]:
        with stream_client.stream("POST", "/v1/audio/speech", json=sse) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
        return [e["type"] for e in events], pcm(audio)

    with httpx.Client(base_url=str(sdk.base_url).removesuffix("/v1/"), timeout=120) as proxy:
        proxied_types, proxied_audio = events(proxy)
    direct_types, direct_audio = events(client)
    assert (
        len(proxied_types) >= 3 and proxied_types == direct_types and proxied_types[-1] == "speech.audio.done"
    )
    assert same_audio(proxied_audio, direct_audio)


def metrics_by_replica(
    http: httpx.Client, replicas: int = 2, attempts: int = 40
) -> dict[str, dict[str, float]]:
    """Queue depth and audio seconds made, of each replica (scraped until every replica answered)."""

    def scrape() -> tuple[str, dict[str, float]]:
        response = http.get("/metrics")
        replica = response.headers["x-replica"]
        # Every sample names its replica: to Prometheus, each replica's counters are series of their own
        # (without the label, scrapes that alternate between replicas looked like counters resetting).
        assert not re.search(r"^higgs_\w+ ", response.text, re.M), "a sample without its replica"
        labelled = f'{{replica="{re.escape(replica)}"}}'
        values = {
            name: float(re.search(rf"^{name}{labelled} (\S+)$", response.text, re.M)[1])
            for name in ("higgs_queue_depth", "higgs_audio_generated_seconds_total")
        }
        return replica, values

    return replica_of_each(scrape, want=replicas, attempts=attempts)  # type: ignore[return-value]


def test_a_client_that_leaves_stops_its_generation_through_the_proxy(http):
    """A 1500-step (60 s) request is left after its first audio piece: its replica stops generating long
    before the end, and its queue empties."""
    before = metrics_by_replica(http)
    body = {
        "model": "gpt-4o-audio-preview",
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "pcm16"},
        "messages": [{"role": "user", "content": TEXT}],
        "max_tokens": 1500,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        replica = response.headers["x-replica"]
        for line in response.iter_lines():
            if '"audio"' in line and '"data"' in line:
                break  # hang up
    # The queue empties as the request's handler ends; its slot is freed and its audio counted at the
    # scheduler's next step, a moment later.
    for _ in range(60):
        after = metrics_by_replica(http)
        made = (
            after[replica]["higgs_audio_generated_seconds_total"]
            - before[replica]["higgs_audio_generated_seconds_total"]
        )
        if after[replica]["higgs_queue_depth"] == 0 and made > 0:
            break
        time.sleep(0.5)
    assert after[replica]["higgs_queue_depth"] == 0
    assert 0 < made < 20, made  # of the 60 s asked for


def test_a_conversations_next_turn_finds_its_answer_on_any_replica(sdk, http):
    """An assistant message naming an earlier audio answer by id: each replica finds it (a trial's next
    turn reached the other replica, which answered 400 audio_not_found, every time)."""
    first = sdk.chat.completions.create(
        model="gpt-4o-audio-preview", modalities=["text", "audio"], max_tokens=30, seed=1,
        audio={"voice": "default", "format": "wav"}, messages=[{"role": "user", "content": TEXT}],
    )  # fmt: skip
    body = {
        "model": "gpt-4o-audio-preview", "modalities": ["text", "audio"], "max_tokens": 10,
        "audio": {"voice": "default", "format": "wav"},
        "messages": [
            {"role": "user", "content": TEXT},
            {"role": "assistant", "audio": {"id": first.choices[0].message.audio.id}},
            {"role": "user", "content": "And on."},
        ],
    }  # fmt: skip

    def follow() -> tuple[str, tuple[int, str | None]]:
        response = http.post("/v1/chat/completions", json=body)
        return response.headers["x-replica"], (response.status_code, response.headers.get("x-voice"))

    answers = replica_of_each(follow)
    assert len(answers) == 2 and set(answers.values()) == {(200, "native")}, answers


def test_past_a_replicas_line_the_answer_is_429_at_once(base_url, cluster_settings):
    """Behind Ray the app's bounded line never filled: Serve sent a replica no more requests than its line
    holds and kept the rest in its proxy's queue, unbounded (40 requests on a line of 16 were all answered,
    the last after 104 s). Now the replica answers past its line with its own 429, and Serve's queue is
    bounded too (its 429 also says when to retry)."""
    from ray import serve

    small = cluster_settings.model_copy(update={"replicas": 1, "max_queue": 2, "max_batch_size": 1})
    cluster.deploy(small, name="small", route_prefix="/small")
    body = {"model": "tts-1", "input": TEXT, "voice": "default", "response_format": "pcm"}

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{base_url}/small/v1/audio/speech", json=body, timeout=120)

    try:
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(send, range(10)))
    finally:
        serve.delete("small")
    # The line's 2, and at most the 4 more that Serve sent or held while the line was full, if they were
    # let in later; Serve refuses the rest at once (before, all 10 were answered).
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 429} and statuses.count(200) <= 6, statuses
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 429)
    apps = [a for a in answers if a.status_code == 429 and "json" in a.headers.get("content-type", "")]
    assert apps and all(a.json()["error"]["code"] == "queue_full" for a in apps), [a.text for a in apps]


def replica_actor(replica: str):
    """The Ray actor running ``replica``."""
    return ray.get_actor(
        f"SERVE_REPLICA::{cluster.APP_NAME}#{cluster.DEPLOYMENT_NAME}#{replica}", namespace="serve"
    )


def test_killing_a_replica_fails_only_its_requests_and_ray_replaces_it(sdk):
    body = {
        "model": "gpt-4o-audio-preview",
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "pcm16"},
        "messages": [{"role": "user", "content": TEXT}],
        "max_tokens": 400,
    }
    # The second stream goes to the idle replica (Serve routes to the less busy of two).
    streams = [sdk.chat.completions.create(**body, stream=True) for _ in range(2)]
    replicas = [s.response.headers["x-replica"] for s in streams]
    assert len(set(replicas)) == 2, replicas
    outcome: dict[str, object] = {}

    def finish(index: int) -> None:
        chunks = []
        try:
            for chunk in streams[index]:
                chunks.append(chunk)
            outcome[replicas[index]] = chunks[-1].choices[0].finish_reason if chunks[-1].choices else "usage"
        except (openai.APIError, httpx.HTTPError) as exc:
            outcome[replicas[index]] = exc

    first_piece = [next(iter(s)) for s in streams]  # both generating
    assert all(first_piece)
    ray.kill(replica_actor(replicas[0]), no_restart=True)
    readers = [threading.Thread(target=finish, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=300)
    assert isinstance(outcome[replicas[0]], Exception), outcome
    assert outcome[replicas[1]] == "length", outcome

    # Ray starts a replacement; until it is up the survivor serves everything.
    served: set[str] = set()
    for _ in range(120):
        try:
            replica, audio = speak(sdk)
        except openai.APIError:
            time.sleep(1)
            continue
        assert len(audio) > 24000
        served.add(replica)
        if served - set(replicas):
            break
        time.sleep(1)
    assert replicas[0] not in served
    assert served - set(replicas), "no new replica answered"
