"""The service as a Ray Serve application: the unchanged app, one replica per GPU, on one machine or many.

    make cluster                      # installs requirements-ray.txt, then runs the line below
    python cluster.py                 # start a local Ray (or join the one RAY_ADDRESS names) and serve

Each replica runs ``app.create_app(settings)`` exactly as ``make run`` would, behind Ray Serve's HTTP proxy on
``HIGGS_HOST:HIGGS_PORT``; the ``HIGGS_*`` settings are read once here and handed to every replica. What this
module adds around the app: the ``X-Replica`` response header and a ``replica`` label on its metrics (which
replica answered; ``X-Request-ID`` is the proxy's, once), the app's logging in each replica, the replica's
health check (the app's readiness: a replica whose engine failed is replaced by Ray), the replica count
(``HIGGS_REPLICAS``, or autoscaling up to ``HIGGS_MAX_REPLICAS``), and Serve's limits around the app's own
bounded line. The voice library, and the audio answers later turns name by id, are shared through
``HIGGS_VOICES_DIR``, which must be one folder that every machine sees (see ``VoiceLibrary`` and
``answers.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import configure_logging, create_app
from settings import Settings, from_environment, resolve_device

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
APP_NAME = "higgs"
DEPLOYMENT_NAME = "Higgs"
REPLICA_HEADER = "X-Replica"
# The code travels to every replica (on any machine) as Ray's working_dir; none of this is needed there.
# A leading "/" anchors a pattern at this folder (gitignore syntax).
UPLOAD_EXCLUDES = [
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    "/voices",
    "/.models",
    "/.whl",
    "/.gl",
    "/tests/fixtures",
]


class ReplicaHeader:
    """ASGI middleware naming the replica in every HTTP response (streams included, untouched), and leaving
    ``X-Request-ID`` to Ray's proxy: the proxy gives every request an id (the client's, or one it makes),
    hands it to the app in the request's ``X-Request-ID`` (which the app then uses in its log lines) and
    adds it to the response itself, so the app's own header would be a second one."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, self.header]
            await send(message)

        await self.app(scope, receive, send_named)


def replica_app(settings: Settings, replica: str) -> FastAPI:
    """``create_app(settings)`` whose responses carry ``X-Replica: <replica>``, and whose metrics carry a
    ``replica`` label (through the proxy each scrape of ``/metrics`` is one replica's: apart, each
    replica's counters are series of their own instead of seeming to reset). Logs as ``make run`` does
    (Ray's worker has no handler for the app's loggers: its INFO lines were lost). The models load during
    the app's start-up, which Ray waits for before it sends the replica any request."""
    configure_logging()
    app = create_app(settings, load_behind=False)
    app.state.metrics.labels = {"replica": replica}
    app.add_middleware(ReplicaHeader, replica=replica)
    return app


def unready_reason(app: FastAPI) -> str | None:
    """Why the app's ``/ready`` would answer 503 (engine failed, or not started), or None when ready."""
    engine = getattr(app.state, "engine", None)
    if engine is not None and engine.failure:
        return f"the engine failed ({engine.failure}) and needs a restart"
    if not app.state.ready:
        return "the app is not ready"
    return None


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class Replica:
    """One copy of the app: Ray builds it in the replica, runs its lifespan, and asks ``check_health``."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        replica = serve.get_replica_context().replica_tag
        return replica_app(self.settings, replica)

    def check_health(self) -> None:
        """Ray replaces a replica whose check raises: the app's readiness, as ``/ready`` reports it."""
        reason = unready_reason(self.app)
        if reason is not None:
            raise RuntimeError(reason)


def shareable(settings: Settings) -> Settings:
    """The settings with local paths made absolute (a replica's working folder is not this one), and the
    audio answers shared."""
    # Audio answers shared through the voices folder: a conversation's next turn may reach another replica.
    update: dict[str, Any] = {"voices_dir": settings.voices_dir.resolve(), "shared_answers": True}
    for name in ("model", "audio_tokenizer", "stt_model"):
        value = getattr(settings, name)
        if value and Path(value).exists():
            update[name] = str(Path(value).resolve())
    return settings.model_copy(update=update)


def engine_slots(settings: Settings) -> int:
    """Generations one replica decodes at once: its engine's batch slots (fewer where the KV cache budget
    does not hold them all; the engine logs that)."""
    return settings.batch_slots("cpu" if settings.device == "cpu" else "cuda")


def deployment_options(settings: Settings, cluster_gpus: int) -> dict[str, Any]:
    """Serve options for the settings on a cluster with ``cluster_gpus`` GPUs.

    One GPU per replica when the model runs on CUDA; as many replicas as GPUs unless ``HIGGS_REPLICAS``
    says otherwise; autoscaling between ``HIGGS_REPLICAS`` and ``HIGGS_MAX_REPLICAS`` when the latter is
    larger. Refuses, as ``make run`` does, a cluster without GPUs unless ``HIGGS_DEVICE=cpu``.
    """
    device = resolve_device(settings.device, cluster_gpus > 0)
    replicas = settings.replicas or (cluster_gpus if device == "cuda" else 1)
    if device == "cuda" and max(replicas, settings.max_replicas) > cluster_gpus:
        log.warning(
            "%d replicas asked for but the cluster has %d GPUs: the others wait for GPUs to join",
            max(replicas, settings.max_replicas),
            cluster_gpus,
        )
    line = settings.max_queue or 2 * engine_slots(settings)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0},
        # The app's own bounded line decides, as with `make run`: a replica is sent up to twice as many
        # requests as its line holds, and answers those past it with its 429 and Retry-After at once. (At
        # the line's own size Serve held the rest in its proxy, unbounded: 40 requests at once on a line of
        # 16 were all answered, the last after 104 s.) Past that, Serve's queue at each proxy holds one
        # line more, then answers 429 itself.
        "max_ongoing_requests": 2 * line,
        "max_queued_requests": line,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
    }
    if settings.max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "initial_replicas": replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": engine_slots(settings),
        }
    else:
        options["num_replicas"] = replicas
    return options


# Ray shows a runtime environment's variables on its dashboard and writes them to its logs: a token must
# reach the replicas another way (the environment of each node's ``ray start``, or a login there).
SECRET_HUB_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def runtime_env() -> dict[str, Any]:
    """What every replica's process gets: this folder's code, and the Hugging Face environment but its
    token (see ``SECRET_HUB_VARIABLES``)."""
    hub = {k: v for k, v in os.environ.items() if k.startswith("HF_") and k not in SECRET_HUB_VARIABLES}
    held = [k for k in SECRET_HUB_VARIABLES if os.environ.get(k)]
    if held:
        log.info(
            "%s not sent to the replicas (Ray would show it on its dashboard); where a node's replicas need "
            "it, set it in the environment of that node's `ray start` or log in there",
            " and ".join(held),
        )
    return {"working_dir": str(ROOT), "excludes": UPLOAD_EXCLUDES, "env_vars": hub}


def deploy(
    settings: Settings, *, blocking: bool = False, name: str = APP_NAME, route_prefix: str = "/"
) -> None:
    """Deploy the app on the connected Ray cluster, serving HTTP on the settings' host and port.

    Returns once every replica is up (its model loaded and warmed up), or, with ``blocking``, at Ctrl-C.
    ``name`` and ``route_prefix`` let several applications share one cluster (the benchmark does).
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    options = deployment_options(settings, gpus)
    start_serve(settings)
    application = Replica.options(**options).bind(shareable(settings))
    log.info("deploying %s on a cluster with %d GPUs: %s", name, gpus, options)
    serve.run(application, name=name, route_prefix=route_prefix, blocking=blocking)


def serve_running() -> bool:
    """Whether Serve already runs on the connected Ray cluster (a `ray start` cluster keeps it, and its
    proxies' address, between runs of this script)."""
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        _get_global_client()
    except RayServeException:
        return False
    return True


class ProxiesElsewhere(RuntimeError):
    """Serve runs on the cluster with its proxies on another address than the settings'."""


def start_serve(settings: Settings) -> None:
    """Start Serve on the connected cluster, its proxies on the settings' host and port, or connect to the
    Serve running there; ``ProxiesElsewhere`` when that one's proxies listen elsewhere: Serve takes its
    HTTP options when it first starts on a cluster, and ignores new ones while it runs (it said so in one
    line of its own, and the service answered on the old port)."""
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": settings.host, "port": settings.port})
    config = _get_global_client().http_config
    if (config.host, config.port) != (settings.host, settings.port):
        raise ProxiesElsewhere(
            f"Serve already runs on this Ray cluster with its proxies on {config.host}:{config.port}, "
            f"and cannot move them to HIGGS_HOST:HIGGS_PORT {settings.host}:{settings.port} while it runs: "
            "set those to its address, or stop Serve first (`.venv/bin/serve shutdown --yes` on the head "
            "machine, or `ray stop` on every machine and start them again)"
        )


def main() -> None:
    """``python cluster.py``: start or join a Ray cluster (``RAY_ADDRESS``) and serve until Ctrl-C."""
    import ray
    from ray.serve.exceptions import RayServeException

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = from_environment()
    address = os.environ.get("RAY_ADDRESS")
    if not address:  # a local Ray has this machine's GPUs: refused before it starts, as `make run` refuses
        refuse_unless_servable(settings, torch.cuda.device_count())
    ray.init(address=address, runtime_env=runtime_env())
    # A service manager's stop (SIGTERM) ends it as Ctrl-C does: the application is removed from the cluster.
    # Set after Ray's start, whose own handler printed a stack dump that looked like a crash.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    refuse_unless_servable(settings, int(ray.cluster_resources().get("GPU", 0)))
    started_serve = not serve_running()
    try:
        start_serve(settings)
    except ProxiesElsewhere as exc:  # (Serve ran before: nothing of it is this script's to undo)
        raise SystemExit(f"cluster.py: {exc}") from None
    try:
        deploy(settings, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        # On a cluster that outlives this script, Serve started here goes with it (its proxies kept
        # answering 404 on their port); one that ran before keeps running, without this application.
        with contextlib.suppress(RayServeException):
            if started_serve and address:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        ray.shutdown()


def refuse_unless_servable(settings: Settings, gpus: int) -> None:
    """Stop with one line where the settings cannot be served with ``gpus`` GPUs (no GPU and no
    ``HIGGS_DEVICE=cpu``)."""
    try:
        deployment_options(settings, gpus)
    except RuntimeError as exc:
        raise SystemExit(f"cluster.py: {exc}") from None


if __name__ == "__main__":
    # Through the module ``cluster`` rather than ``__main__``, so that Ray pickles ``Replica`` by name.
    import cluster

    cluster.main()
