"""Runs the selected cases: shapes from the settings, every implementation interleaved in
rounds per shape (under each kernel-options set in A/B mode), medians over rounds."""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import functools
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import mka

from . import timer
from .cases import Case, Impl, Shape, registry

# Shape and timing settings per device, where neither a flag, a preset nor the case sets one.
# tokens: B·T per shape (B = tokens // T, at least 1); None: one sequence.
DEVICE_DEFAULTS = {
    "cuda": dict(seqs=[1024, 4096], heads=16, head_dim=128, kv_heads=[16, 4], tokens=16384,
                 batches=None, rounds=5, reps=10),
    "cpu": dict(seqs=[256, 1024], heads=8, head_dim=64, kv_heads=[8, 2], tokens=None,
                batches=None, rounds=3, reps=3),
}

PRESETS = {
    # The GPU suite's table: bf16, causal, B·T = 16k, H = 16, d = 128, G in {16, 4}.
    "gpu-suite": dict(device="cuda", dtype="bfloat16", cases=["ops"],
                      impls=["attention", "fastmka", "fastmka+dlam", "mka", "sdpa.flash",
                             "sdpa.cudnn"],
                      seqs=[1024, 2048, 4096, 8192, 16384], heads=16, head_dim=128,
                      kv_heads=[16, 4], tokens=16384, rounds=5, reps=10),
    # The decode table of SPEC §7.1's benchmark: the decode case's own grid on CUDA, bf16.
    "decode": dict(device="cuda", dtype="bfloat16", cases=["decode"]),
}


@dataclass
class KernelSet:
    """A label and the keyword arguments of mka.use_kernels (empty: the current defaults)."""
    label: str
    options: dict[str, Any]

    def context(self):
        return mka.use_kernels(**self.options) if self.options else contextlib.nullcontext()


def parse_kernel_set(spec: str) -> KernelSet:
    """"[LABEL:]key=value[,key=value...]" or "default", e.g. "A:attention=lockstep" or
    "scan=3pass,scan_through=0"; the label defaults to the spec itself."""
    label, sep, body = spec.partition(":")
    if not sep:
        label, body = spec, spec
    options: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        if item == "default":
            continue
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--ab {spec!r}: expected key=value items, got {item!r}")
        options[key.strip()] = _option_value(value.strip())
    return KernelSet(label, options)


def _option_value(value: str) -> Any:
    low = value.lower()
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    return value


@dataclass
class Settings:
    device: str
    dtype: torch.dtype
    cases: list[str] = field(default_factory=lambda: ["ops"])
    impls: list[str] = field(default_factory=list)  # names or glob patterns; empty: all
    seqs: Optional[list[int]] = None
    heads: Optional[int] = None
    kv_heads: Optional[list[int]] = None
    head_dim: Optional[int] = None
    tokens: Optional[int] = None
    batches: Optional[list[int]] = None  # batch sizes B per shape (instead of tokens // T)
    causal: bool = True
    rounds: Optional[int] = None
    reps: Optional[int] = None
    ab: list[KernelSet] = field(default_factory=list)
    cuda_graph: bool = False  # time captured calls (device time), not eager calls

    def resolve(self, key: str, case: Optional[Case] = None) -> Any:
        """A setting: the flag (or preset) if given, else the case's default, else the device's."""
        value = getattr(self, key)
        if value is not None:
            return value
        if case is not None and key in case.defaults.get(self.device, {}):
            return case.defaults[self.device][key]
        return DEVICE_DEFAULTS[self.device][key]


def shapes(case: Case, s: Settings) -> list[Shape]:
    H, d, tokens = s.resolve("heads", case), s.resolve("head_dim", case), s.resolve("tokens", case)
    batches = s.resolve("batches", case)
    out = []
    for G in s.resolve("kv_heads", case):
        if G < 1 or H % G:
            raise ValueError(f"--kv-heads {G}: must divide --heads {H}")
        for T in s.resolve("seqs", case):
            Bs = batches if batches else [max(1, tokens // T) if tokens else 1]
            out += [Shape(B=B, T=T, H=H, G=G, d=d, causal=s.causal) for B in Bs]
    return out


def selected(case: Case, s: Settings) -> list[Impl]:
    impls = case.on(s.device)
    if not s.impls:
        return impls
    return [i for i in impls if any(fnmatch.fnmatchcase(i.name, p) for p in s.impls)]


def check(s: Settings) -> None:
    """Raises ValueError (one line) for settings that cannot run."""
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    if s.cuda_graph and s.device != "cuda":
        raise ValueError("--cuda-graph: times CUDA graphs, so needs --device cuda")
    cases = registry()
    for name in s.cases:
        if name not in cases:
            raise ValueError(f"--cases: unknown case {name!r} (known: {', '.join(cases)})")
    for p in s.impls:
        if not any(fnmatch.fnmatchcase(i.name, p) for c in s.cases for i in cases[c].on(s.device)):
            raise ValueError(f"--impls: {p!r} matches no implementation of "
                             f"{', '.join(s.cases)} on {s.device} (see mka bench --list)")
    if s.ab:
        if len(s.ab) < 2:
            raise ValueError("--ab: give two or more kernel-option sets")
        labels = [k.label for k in s.ab]
        if "" in labels or len(set(labels)) != len(labels):
            raise ValueError(f"--ab: labels must be distinct and non-empty, got {labels}")
        if not hasattr(mka, "use_kernels"):  # a build older than the kernel options
            raise ValueError("--ab: this build of mka has no kernel options (mka.use_kernels)")
        for k in s.ab:
            try:
                with k.context():
                    pass
            except (TypeError, ValueError) as e:
                raise ValueError(f"--ab {k.label!r}: {e}") from None
    for name in s.cases:
        shapes(cases[name], s)


def run(s: Settings, command: str = "", log=sys.stderr) -> dict:
    """Times the selected cases; returns the results (metadata and one row per case, shape,
    implementation and kernel-options set)."""
    check(s)
    cases = registry()
    results = metadata(s, command)
    rows = results["rows"]
    if s.device == "cuda":
        timer.warm_gpu()
    rounds, reps = s.resolve("rounds"), s.resolve("reps")
    for name in s.cases:
        case = cases[name]
        impls = selected(case, s)
        for shape in shapes(case, s):
            print(f"mka bench: {name} {shape}: {len(impls)} implementations", file=log, flush=True)
            rows += _time_shape(case, impls, shape, s, rounds, reps)
            if s.device == "cuda":
                torch.cuda.empty_cache()
    return results


def _time_shape(case: Case, impls: list[Impl], shape: Shape, s: Settings, rounds: int,
                reps: int) -> list[dict]:
    x = case.inputs(shape, s.device, s.dtype)
    # Baselines do not depend on the library's kernel options: timed once, outside any set.
    sets_of = lambda impl: [KernelSet("", {})] if impl.baseline or not s.ab else s.ab  # noqa: E731
    variants: dict[tuple[str, str], timer.Variant] = {}
    errors: dict[tuple[str, str], str] = {}
    for impl in impls:
        try:
            passes = {p: build(impl.fn, x) for p, build in case.passes.items()}
        except Exception as e:  # e.g. a backend that refuses this shape
            errors.update({(impl.name, k.label): timer.describe(e) for k in sets_of(impl)})
            continue
        for k in sets_of(impl):
            variants[impl.name, k.label] = timer.Variant(passes, k.context)
    timings = timer.interleaved(variants, s.device, rounds, reps,
                                seed=1000 * shape.T + 10 * shape.G, graph=s.cuda_graph)
    errors.update(timings.errors)
    rows = []
    for impl in impls:
        for k in sets_of(impl):
            key = (impl.name, k.label)
            row = {"case": case.name, "impl": impl.name, "kernels": k.label or None,
                   "kernel_options": k.options or None, "baseline": impl.baseline,
                   "against": list(impl.against), "shape": asdict(shape)}
            if case.info is not None:
                row["info"] = case.info(impl, shape)
            if key in errors:
                row["error"] = errors[key]
            else:
                row.update(_summary(timings.ms[key], case, shape, impl, s.dtype))
            rows.append(row)
    return rows


def _summary(per_round: dict[str, list[float]], case: Case, shape: Shape, impl: Impl,
             dtype: torch.dtype) -> dict:
    """Medians and spread over rounds; "bwd" = (fwd+bwd) - fwd round by round."""
    per_round = dict(per_round)
    if "fwd" in per_round and "fwd+bwd" in per_round:
        per_round["bwd"] = [fb - f for f, fb in zip(per_round["fwd"], per_round["fwd+bwd"])]
    out: dict[str, Any] = {
        "ms": {p: statistics.median(t) for p, t in per_round.items()},
        "ms_range": {p: [min(t), max(t)] for p, t in per_round.items()},
        "ms_rounds": {p: [round(v, 5) for v in t] for p, t in per_round.items()},
    }
    if case.bytes is not None:
        out["gbps"] = {p: case.bytes(shape, dtype, p) / (ms * 1e6) if ms > 0 else None
                       for p, ms in out["ms"].items()}
    if case.flops is not None and impl.flops:
        out["tflops"] = {p: case.flops(shape, p) / (ms * 1e9) if ms > 0 else None
                         for p, ms in out["ms"].items()}
    return out


def metadata(s: Settings, command: str) -> dict:
    from mka import _C

    info: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mka": mka.__version__, "torch": torch.__version__, "python": platform.python_version(),
        **git_commit(),
        "device_type": s.device,
        "device": torch.cuda.get_device_name() if s.device == "cuda" else cpu_name(),
    }
    if s.device == "cuda":
        info["cuda"] = torch.version.cuda
        info["built_with_cuda"] = _C.built_with_cuda()
    else:
        info["cpu_isa"], info["threads"] = _C.cpu_isa(), _C.num_threads()
    # Guarded: the runner also times builds older than the kernel options (beside this one).
    if hasattr(mka, "current_kernels"):
        info["kernel_defaults"] = asdict(mka.current_kernels())
    info["settings"] = {
        "dtype": str(s.dtype).removeprefix("torch."), "causal": s.causal,
        "cases": s.cases, "impls": s.impls or "all",
        "rounds": s.resolve("rounds"), "reps": s.resolve("reps"),
        "cuda_graph": s.cuda_graph, "ab": [asdict(k) for k in s.ab] or None,
    }
    info["rows"] = []
    return info


@functools.lru_cache(maxsize=1)
def git_commit() -> dict:
    """The commit of the git checkout holding the package (else the working directory), if any."""
    for where in (Path(mka.__file__).resolve().parent, Path.cwd()):
        try:
            head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                                  capture_output=True, text=True, timeout=10)
            if head.returncode != 0:
                continue
            dirty = subprocess.run(["git", "-C", str(where), "diff", "--quiet", "HEAD"],
                                   capture_output=True, timeout=30).returncode != 0
            return {"commit": head.stdout.strip(), "local_changes": dirty}
        except (OSError, subprocess.SubprocessError):
            break
    return {"commit": None}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
