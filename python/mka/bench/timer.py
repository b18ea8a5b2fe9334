"""The one timer of `mka bench`: the time of one call of a function, and interleaved rounds
of several functions.

On CUDA, calls are queued back to back (as triton's do_bench does), each between two CUDA
events, with one synchronization at the end: the host work of a call overlaps the GPU work
of the one before, as in a training step (a synchronization after every call would add each
op's host time to its GPU time). A call shorter than its host work is then timed at the
host's speed; ``graph=True`` times the device instead: ``reps`` calls captured in one CUDA
graph, the graph replayed, the median replay divided by ``reps`` (how a serving loop runs a
decode step; an implementation that cannot be captured raises). On the CPU, each call is
timed by a monotonic clock.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Hashable, Optional

import torch

WARM_S = 0.1  # CUDA: seconds of warm-up calls before each timing
PAUSE_S = 0.1  # CUDA: pause before each implementation in a round


GRAPH_REPLAYS = 7  # graph timing: replays of the captured calls, median


def time_ms(fn: Callable[[], object], device: str, reps: int = 10,
            warmup: Optional[int] = None, graph: bool = False) -> float:
    """Median time of one fn() call in milliseconds, over `reps` timed calls (``graph``: CUDA
    only, `reps` calls in one CUDA graph, the median of its replays divided by `reps`)."""
    if device == "cuda":
        if graph:
            return _graph_ms(fn, reps, 3 if warmup is None else warmup)
        return _cuda_ms(fn, reps, 3 if warmup is None else warmup)
    for _ in range(1 if warmup is None else warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    # Warm up for a while, not for a few calls: after a pause the GPU's clocks need tens of
    # ms to come back up, longer than a few short calls take.
    start, calls = time.perf_counter(), 0
    while calls < warmup or time.perf_counter() - start < WARM_S:
        fn()
        calls += 1
        if calls % 4 == 0:  # keep the launch queue short
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def _graph_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    # Eager calls first, on a side stream as capture wants: lazy initialisation (plans,
    # workspaces, libraries' handles) happens outside the graph.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start = time.perf_counter()
    while time.perf_counter() - start < WARM_S:
        graph.replay()
        torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(GRAPH_REPLAYS)]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(a.elapsed_time(b) for a, b in events) / reps


def warm_gpu(seconds: float = 1.0) -> None:
    """Brings the GPU to its steady clocks before the first timing (bf16 matmuls)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize()


@dataclass
class Variant:
    """One implementation in a round: its passes (name -> call, timed in this order) and the
    context every timing of it runs in (e.g. a kernel-options scope)."""
    passes: dict[str, Callable[[], object]]
    context: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass
class Timings:
    ms: dict[Hashable, dict[str, list[float]]] = field(default_factory=dict)  # per round
    errors: dict[Hashable, str] = field(default_factory=dict)


def interleaved(variants: dict[Hashable, Variant], device: str, rounds: int, reps: int,
                seed: int = 0, pause_s: Optional[float] = None, graph: bool = False) -> Timings:
    """Every variant once per round, in a fresh random order each round and after a pause,
    so a drift of the device's clocks shifts all of them alike and none always follows the
    same one. A variant that raises is recorded with its error and left out of later rounds."""
    pause = (PAUSE_S if device == "cuda" else 0.0) if pause_s is None else pause_s
    out = Timings(ms={key: {p: [] for p in v.passes} for key, v in variants.items()})
    order = list(variants)
    for rnd in range(rounds):
        random.Random(seed + rnd).shuffle(order)
        for key in order:
            if key in out.errors:
                continue
            if pause:
                time.sleep(pause)
            variant = variants[key]
            try:
                with variant.context():
                    for name, call in variant.passes.items():
                        out.ms[key][name].append(time_ms(call, device, reps, graph=graph))
            except Exception as e:  # a backend may refuse a shape: record why, keep going
                out.errors[key] = describe(e)
    return out


def describe(e: Exception) -> str:
    """An exception in one line."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]
