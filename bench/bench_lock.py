"""How late a thread gets the interpreter lock back after a wait, beside another busy thread.

Run:  .venv/bin/python bench/bench_lock.py [--rounds 300]

The decoding loop waits for each step's tokens with the interpreter lock released (a CUDA event's wait),
then needs the lock back to stream them and launch the next step. Beside it run the codec thread, the event
loop and the prompt builders. This measures, with no model and no GPU, what the lock costs such a waiter:
a thread waits 4 ms (an ``Event.wait`` with a timeout, as a step's wait), then does a fixed piece of Python
work; printed are how late it wakes (mean and 95th percentile beyond the 4 ms) and how long its work takes,
with nothing beside it, beside a thread calling small torch operators (each releases the lock while it
runs, as a kernel launch does), and beside a thread running plain Python (which keeps the lock until it
is asked for it), for Python's default switch interval (5 ms) and for 0.5 ms, side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch


def _small_operators(stop: threading.Event) -> None:
    x = torch.zeros(64)
    while not stop.is_set():
        torch.add(x, x)


def _plain_python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def _waiter(rounds: int) -> tuple[list[float], list[float]]:
    """(ms late after each 4 ms wait, ms of each piece of work)."""
    wait, late, work = threading.Event(), [], []
    for _ in range(rounds):
        started = time.perf_counter()
        wait.wait(0.004)
        woke = time.perf_counter()
        late.append((woke - started - 0.004) * 1e3)
        sum(range(20000))
        work.append((time.perf_counter() - woke) * 1e3)
    return late, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="waits per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    beside = {"nothing": None, "small torch operators": _small_operators, "plain Python": _plain_python}
    print(f"Python {sys.version.split()[0]}; a 4 ms wait, then work; mean / p95 in ms")
    print(f"{'switch interval':>16}  {'beside':<22} {'late':>15} {'work':>15}")
    default = sys.getswitchinterval()
    for interval in (default, 0.0005):
        sys.setswitchinterval(interval)
        for name, busy in beside.items():
            stop = threading.Event()
            thread = threading.Thread(target=busy, args=(stop,)) if busy else None
            if thread:
                thread.start()
            late, work = _waiter(args.rounds)
            stop.set()
            if thread:
                thread.join()

            def spread(values: list[float]) -> str:
                return f"{statistics.mean(values):6.3f} / {statistics.quantiles(values, n=20)[-1]:6.3f}"

            print(f"{interval * 1e3:13.1f} ms  {name:<22} {spread(late):>15} {spread(work):>15}")
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
