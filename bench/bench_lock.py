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

Then what that means for the loop's own work on a step's tokens (16 rows: each row's first token read and
its audio column copied, as ``HiggsEngine._take`` does), done with torch operators on each row (as before
2026-11-28) and in numpy (as now), at the default interval beside the same threads, plus one that runs a
little Python between small torch operators (as an eager module's forward does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def _small_operators(stop: threading.Event) -> None:
    x = torch.zeros(64)
    while not stop.is_set():
        torch.add(x, x)


def _plain_python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def _module_like(stop: threading.Event) -> None:
    x = torch.zeros(64)
    while not stop.is_set():
        [i for i in range(30)]  # noqa: B018 (a little Python between operators)
        torch.add(x, x)


@contextmanager
def _beside(busy: Callable[[threading.Event], None] | None) -> Iterator[None]:
    """``busy`` running on a thread of its own (None: nothing) for the duration."""
    stop = threading.Event()
    thread = threading.Thread(target=busy, args=(stop,)) if busy else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join()


def _rows_torch(out: torch.Tensor) -> list:
    columns = []
    for slot in range(out.shape[0]):
        row = out[slot]
        int(row[0])
        columns.append(row[1:].clone())
    return columns


def _rows_numpy(out: torch.Tensor) -> list:
    rows, columns = out.numpy(), []
    for slot in range(rows.shape[0]):
        row = rows[slot]
        int(row[0])
        columns.append(row[1:].copy())
    return columns


def _timed(work, rounds: int) -> list[float]:
    """ms of each call of ``work``, one every 2 ms."""
    spent = []
    for _ in range(rounds):
        time.sleep(0.002)
        started = time.perf_counter()
        work()
        spent.append((time.perf_counter() - started) * 1e3)
    return spent


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
            with _beside(busy):
                late, work = _waiter(args.rounds)
            print(f"{interval * 1e3:13.1f} ms  {name:<22} {_spread(late):>15} {_spread(work):>15}")
    sys.setswitchinterval(default)

    out = torch.randint(0, 1024, (16, 9))
    beside["an eager module"] = _module_like
    print(f"\na step's 16 rows handled, at {default * 1e3:g} ms; mean / p95 in ms")
    print(f"{'beside':<22} {'torch operators':>17} {'numpy':>15}")
    for name, busy in beside.items():
        rounds = args.rounds if name != "plain Python" else max(10, args.rounds // 10)  # 5 ms an operator
        with _beside(busy):
            with_torch = _timed(lambda: _rows_torch(out), rounds)
            with_numpy = _timed(lambda: _rows_numpy(out), args.rounds)
        print(f"{name:<22} {_spread(with_torch):>17} {_spread(with_numpy):>15}")


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):6.3f} / {statistics.quantiles(values, n=20)[-1]:6.3f}"


if __name__ == "__main__":
    main()
