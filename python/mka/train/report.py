"""The comparison: one table printed, and results.{json,csv,md} plus PNG plots in --out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from . import recall_report

COLUMNS = [  # (header, result key, format)
    ("variant", "variant", "{}"),
    ("backend", "attn_backend", "{}"),
    ("kv heads", "n_kv_head", "{}"),
    ("params", "params", "{:,}"),
    ("steps", "steps", "{:,}"),
    ("tokens", "tokens_trained", "{:,}"),
    ("train loss", "train_loss_last10", "{:.4f}"),
    ("held-out loss", "heldout_loss", "{:.4f}"),
    ("best held-out", "best_heldout_loss", "{:.4f}"),
    ("held-out ppl", "heldout_ppl", "{:.3f}"),
    ("answer acc", "heldout_token_accuracy", "{:.3f}"),
    ("example acc", "heldout_example_accuracy", "{:.3f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("train s", "train_time_s", "{:.1f}"),
    ("eval s", "eval_time_s", "{:.1f}"),
    ("peak MiB", "peak_memory_bytes", "{:.1f}"),
    ("KV B/token", "kv_cache_bytes_per_token", "{:,}"),
]


def _cell(result: dict, key: str, fmt: str) -> str:
    v = result.get(key)
    if v is None:
        return "n/a"
    if key == "steps" and not result.get("complete", True):
        return f"{v:,}/{result['total_steps']:,} (stopped)"
    if key == "peak_memory_bytes":
        v = v / 2**20
    return fmt.format(v)


# Columns of --task runs only: left out of a table of text runs.
TASK_KEYS = ("heldout_token_accuracy", "heldout_example_accuracy")


def _columns(results: list[dict]) -> list[tuple[str, str, str]]:
    task = any(r.get(k) is not None for r in results for k in TASK_KEYS)
    return [c for c in COLUMNS if task or c[1] not in TASK_KEYS]


def table_rows(results: list[dict]) -> list[list[str]]:
    return [[_cell(r, k, f) for _, k, f in _columns(results)] for r in results]


def text_table(results: list[dict]) -> str:
    headers = [h for h, _, _ in _columns(results)]
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown(results: list[dict], meta: dict) -> str:
    headers = [h for h, _, _ in _columns(results)]
    out = ["# mka train: attention variants compared", ""]
    out += [f"- **{k}**: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    data = meta.get("data", {})
    out += [f"- **data {k}**: {v}" for k, v in data.items()]
    out += [f"- **attention kernels**: {b} ({why})"
            for b, why in sorted({(r["attn_backend"], r["attn_backend_reason"]) for r in results if "error" not in r})]
    out += [f"- **{r['variant']} FAILED**: {r['error']}" for r in results if "error" in r]
    out += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    kinds = sorted({r["peak_memory_kind"] for r in results if "peak_memory_kind" in r})
    out += ["", f"Held-out loss: token-weighted mean cross-entropy (nats) over the whole held-out split "
                f"after the last step; best held-out: lowest of the periodic evaluations and the final one. "
                f"Train loss: mean of the last 10 steps. tokens/s: training steps after the timing warm-up, "
                f"evaluation excluded. Peak memory: {', '.join(kinds)}, reset per variant. "
                f"KV B/token: decode-cache bytes per token, all layers, in the training precision."]
    if any(r.get("heldout_token_accuracy") is not None for r in results):
        out += ["--task: held-out loss and perplexity are over answer tokens only; answer acc: the share of "
                "answer tokens predicted exactly (greedy), example acc: the share of held-out examples with every "
                "answer right, over all evaluation lengths (accuracy_vs_length.json has them per length)."]
    eval_tokens = meta.get("settings", {}).get("eval_tokens")
    if eval_tokens:
        out += [f"Periodic evaluations read the first {eval_tokens:,} held-out tokens; the final one reads all."]
    out += [""]
    return "\n".join(out)


def write_csv(path: Path, results: list[dict]) -> None:
    nested = ("curves", "trajectory", "attn_options", "accuracy_by_length")
    keys = list(dict.fromkeys(k for r in results for k in r if k not in nested))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)


def plot(out: Path, results: list[dict]) -> list[str]:
    """loss_curves.png and throughput_memory.png; needs matplotlib (skipped with a note if absent)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install matplotlib)"]
    results = [r for r in results if "curves" in r]  # a failed variant has nothing to draw
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        train = r["curves"]["train"]
        line, = ax.plot([p[0] for p in train], [p[1] for p in train], lw=0.8, alpha=0.7, label=f"{r['variant']} train")
        evals = r["curves"]["evals"]
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o--", color=line.get_color(), ms=3,
                label=f"{r['variant']} held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="training and held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in results]
    a1.bar(names, [r["tokens_per_s"] or 0 for r in results], color="tab:blue")
    a1.set(title="training throughput", ylabel="tokens/s")
    a2.bar(names, [r["peak_memory_bytes"] / 2**20 for r in results], color="tab:orange")
    a2.set(title="peak memory", ylabel="MiB")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput_memory.png", dpi=120)
    plt.close(fig)
    return []


def write_all(out: Path, results: list[dict], meta: dict, plots: bool) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_csv(out / "results.csv", results)
    (out / "results.md").write_text(markdown(results, meta))
    notes = plot(out, results) if plots and results else []
    curves = {r["variant"]: r["accuracy_by_length"] for r in results if r.get("accuracy_by_length")}
    if curves:
        notes += recall_report.write(out, curves, {"title": meta.get("command", ""), **meta}, plots)
        notes += [recall_report.text_table(curves)]
    return notes
