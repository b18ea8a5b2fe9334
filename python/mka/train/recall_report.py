"""Accuracy against sequence length, per model: accuracy_vs_length.json, a text table and
accuracy_vs_length.png. ``curves`` maps a model's label to its held-out metrics by length
(recall_metrics.heldout_recall's ``by_length``)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path


def text_table(curves: dict[str, dict]) -> str:
    """Answer-token accuracy / example accuracy per model (rows) and length (columns)."""
    lengths = sorted({int(n) for by in curves.values() for n in by})
    headers = ["model"] + [f"L={n}" for n in lengths]
    rows = [[label] + [f"{by[str(n)]['token_accuracy']:.3f} / {by[str(n)]['example_accuracy']:.3f}"
                       if str(n) in by else "n/a" for n in lengths] for label, by in curves.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows),
                      "(held-out accuracy per answer token / per example, every answer right)"])


def _plot(path: Path, curves: dict[str, dict], title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, by in curves.items():
        lengths = sorted(int(n) for n in by)
        for ax, key in ((a1, "token_accuracy"), (a2, "example_accuracy")):
            ax.plot(lengths, [by[str(n)][key] for n in lengths], "o-", label=label)
    lengths = sorted({int(n) for by in curves.values() for n in by})
    for ax, what in ((a1, "per answer token"), (a2, "per example (all answers right)")):
        ax.set(xscale="log", xlabel="sequence length (tokens)", title=f"held-out accuracy, {what}")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    a1.set_ylabel("accuracy")
    a2.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 160), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write(out: Path, curves: dict[str, dict], meta: dict, plots: bool) -> list[str]:
    """accuracy_vs_length.json (and .png); returns notes for the user."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy_vs_length.json").write_text(json.dumps({"meta": meta, "accuracy_by_length": curves}, indent=1))
    note = _plot(out / "accuracy_vs_length.png", curves, meta.get("title", "")) if plots else None
    return [note] if note else []
