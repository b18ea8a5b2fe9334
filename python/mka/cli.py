"""The `mka` command: `mka bench` (the benchmark cases of mka.bench), `mka train`, and the
Hugging Face tools `mka eval` and `mka generate-bench` (mka.integrations.hf)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Optional

from . import __version__


def _ints(text: str) -> list[int]:
    """"1024,2048" or "1k,2k" -> [1024, 2048]."""
    out = []
    for item in filter(None, text.split(",")):
        item = item.strip().lower()
        try:
            out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return out


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _bench_parser(sub) -> argparse.ArgumentParser:
    from .bench import PRESETS, registry
    from .bench.runner import DEVICE_DEFAULTS

    cuda, cpu = DEVICE_DEFAULTS["cuda"], DEVICE_DEFAULTS["cpu"]
    both = lambda key, fmt=str: f"default: {fmt(cuda[key])} on cuda, {fmt(cpu[key])} on cpu"  # noqa: E731
    csv = lambda xs: ",".join(map(str, xs))  # noqa: E731
    cases = registry()
    b = sub.add_parser(
        "bench", help="time the ops (and other cases) against PyTorch's baselines",
        description="Times registered benchmark cases: every implementation of a case per shape, "
                    "interleaved in rounds (in random order), medians over rounds. Cases: "
                    + "; ".join(f"{n}: {c.doc}" for n, c in cases.items()) + ".",
        epilog="Shape defaults of a case may differ (block: GPT-2 small's width); "
               "flags and the preset override them. `mka bench --list` lists the implementations.")
    b.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda if torch sees a CUDA device, else cpu")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    b.add_argument("--cases", type=_names, help=f"comma-separated cases (default: ops; known: "
                   f"{', '.join(cases)})")
    b.add_argument("--impls", type=_names,
                   help="comma-separated implementations or glob patterns (default: all of the "
                        "cases' on the device)")
    b.add_argument("--list", action="store_true", help="list the cases and implementations, then exit")
    b.add_argument("--seqs", type=_ints, help=f"sequence lengths T, e.g. 1k,4k ({both('seqs', csv)})")
    b.add_argument("--heads", type=int, help=f"query heads H ({both('heads')})")
    b.add_argument("--kv-heads", type=_ints, help=f"key/value heads G, comma-separated "
                   f"({both('kv_heads', csv)})")
    b.add_argument("--head-dim", type=int, help=f"head dim d ({both('head_dim')})")
    b.add_argument("--tokens", type=int, help="B·T per shape, B = max(1, tokens // T) (default: "
                   f"{cuda['tokens']} on cuda, one sequence on cpu)")
    b.add_argument("--batches", type=_ints, help="batch sizes B, comma-separated, each with every "
                   "T (default: from --tokens; the decode case: its own grid)")
    b.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal attention (default: %(default)s)")
    b.add_argument("--rounds", type=int, help=f"interleaved rounds; medians over them ({both('rounds')})")
    b.add_argument("--reps", type=int, help=f"timed calls per implementation and round, median "
                   f"({both('reps')})")
    b.add_argument("--cuda-graph", action="store_true",
                   help="time the device, not the host: each timing captures --reps calls in one "
                        "CUDA graph and replays it (median replay / reps); for calls shorter than "
                        "their host work, e.g. small decode steps")
    b.add_argument("--preset", choices=sorted(PRESETS),
                   help="gpu-suite: the GPU suite's table (cuda, bf16, causal, B·T = 16k, H = 16, "
                        "d = 128, G 16,4, T 1k..16k, 5 rounds); flags given override it")
    b.add_argument("--ab", nargs="+", metavar="SET",
                   help="A/B mode: time the implementations under each kernel-options set, "
                        "e.g. scan=1pass scan=3pass, or A:attention=pingpong B:attention=lockstep "
                        "(keys of mka.use_kernels; 'default' = the current defaults)")
    b.add_argument("--json", metavar="FILE", help="also write the results (with device, torch "
                   "version, commit, date, command) as JSON")
    return b


def _settings(args: argparse.Namespace):
    import torch

    from .bench import PRESETS, Settings, parse_kernel_set

    preset = PRESETS.get(args.preset, {})
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else preset.get(key)  # noqa: E731
    device = pick("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick("dtype") or ("bfloat16" if device == "cuda" else "float32")
    return Settings(
        device=device, dtype=getattr(torch, dtype), cases=pick("cases") or ["ops"],
        impls=pick("impls") or [], seqs=pick("seqs"), heads=pick("heads"),
        kv_heads=pick("kv_heads"), head_dim=pick("head_dim"), tokens=pick("tokens"),
        batches=pick("batches"),
        causal=args.causal, rounds=pick("rounds"), reps=pick("reps"),
        ab=[parse_kernel_set(x) for x in args.ab or []], cuda_graph=args.cuda_graph)


def _list_cases(device: str) -> str:
    from .bench import registry

    lines = []
    for name, case in registry().items():
        lines.append(f"{name}: {case.doc} (passes: {', '.join(case.passes)})")
        for i in case.impls.values():
            tags = [t for t in ("baseline" if i.baseline else "",
                                "" if device in i.devices else f"{'/'.join(i.devices)} only") if t]
            lines.append(f"  {i.name}" + (f"  ({', '.join(tags)})" if tags else ""))
    return "\n".join(lines)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from .bench import report, run

    try:
        settings = _settings(args)
        if args.list:
            print(_list_cases(settings.device))
            return 0
        results = run(settings, command=shlex.join(["mka", *argv]))
    except ValueError as e:
        print(f"mka bench: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(report(results))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the training CLI parses its own flags
        from .train import main as train_main
        return int(train_main(argv[1:]) or 0)
    if argv[:2] == ["eval", "recall"]:  # mka train --task checkpoints: no hf extra needed
        from .train.recall_eval import main as recall_main
        return int(recall_main(argv[2:]))
    if argv[:2] == ["eval", "recall-quality"]:  # mka train text checkpoints
        from .train.recall_quality_eval import main as quality_main
        return int(quality_main(argv[2:]))
    if argv[:1] in (["eval"], ["generate-bench"]):  # Hugging Face tools: need the hf extra
        from .integrations.hf import generation_bench, ruler_eval
        return int({"eval": ruler_eval, "generate-bench": generation_bench}[argv[0]].main(argv[1:]))
    p = argparse.ArgumentParser(prog="mka", description="Memory-Keyed Attention tools")
    p.add_argument("--version", action="version", version=f"mka {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    _bench_parser(sub)
    sub.add_parser("train", help="train GPT-style models per attention variant (mka train -h)")
    sub.add_parser("eval", help="long-context evaluation of a Hugging Face model (mka eval ruler -h) or of "
                   "mka train --task checkpoints (mka eval recall -h), or recall quality on a text model's "
                   "queries and keys (mka eval recall-quality -h)")
    sub.add_parser("generate-bench", help="prefill/decode of a Hugging Face model, sdpa vs mka "
                   "(mka generate-bench -h)")
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return 0
    return _bench(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
