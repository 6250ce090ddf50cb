"""The app served for real: uvicorn on a free loopback port in a background thread.

Shared by the tests that need a real server (the web page's, the Ray cluster's port) and by the benchmarks
(``bench/_common.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(app, start_timeout: float = 120.0, http: str | type = "auto") -> Iterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port in a thread; yields its base URL once it is ready (the
    server listens at once and loads its models behind it). ``RuntimeError`` when loading failed, or the
    server was not ready within ``start_timeout`` seconds, or its thread ended. ``http``: uvicorn's
    protocol (``server.Protocol`` is what ``python app.py`` serves with)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=http)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout
    try:
        while not (server.started and getattr(app.state, "ready", False)):
            if getattr(app.state, "load_error", None):
                error = app.state.load_error
                raise RuntimeError(f"the server could not load its models: {type(error).__name__}: {error}")
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def start_process(args: list[str], settings: dict[str, str], timeout: float = 300.0) -> subprocess.Popen:
    """The service as an operator starts it: ``python <args>`` in the project's folder, in a process of its
    own with ``settings`` (``HIGGS_*``; none inherited) and its standard error piped as text. Returns once
    ``HIGGS_PORT``'s ``/ready`` says 200, or the process ended, or ``timeout`` seconds passed."""
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("HIGGS_")} | settings
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, *args], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{settings['HIGGS_PORT']}/ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return process


def tiny_process_settings(tiny_settings: dict[str, str], voices_dir) -> dict[str, str]:
    """A server process's settings (for ``start_process``): the tiny models on the CPU, no speech
    recognition, no warm-up, a free port, its own voice library."""
    return tiny_settings | {
        "HIGGS_DEVICE": "cpu", "HIGGS_DTYPE": "float32", "HIGGS_STT_MODEL": "", "HIGGS_WARMUP": "false",
        "HIGGS_PORT": str(free_port()), "HIGGS_VOICES_DIR": str(voices_dir),
    }  # fmt: skip
