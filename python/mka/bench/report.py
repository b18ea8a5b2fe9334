"""Tables of `mka bench` results: every row, then a short summary (the GPU suite's table for
the ops, or the A/B comparison)."""

from __future__ import annotations

import math
from typing import Optional

PASSES = ("fwd", "bwd", "fwd+bwd")
SDPA_COLUMNS = {"sdpa": "SDPA", "sdpa.flash": "flash", "sdpa.cudnn": "cuDNN"}
OVER_ATTENTION = {"route_fuse": "route_fuse", "fastmka": "fastmka", "fastmka+dlam": "+dlam",
                  "mka": "mka"}


def _unit(results: dict) -> tuple[str, float]:
    return ("TFLOP/s", 1.0) if results["device_type"] == "cuda" else ("GFLOP/s", 1e3)


def _shape_key(row: dict) -> tuple:
    return tuple(sorted(row["shape"].items()))


def _index(results: dict) -> dict[tuple, dict]:
    return {(r["case"], _shape_key(r), r["impl"], r["kernels"]): r for r in results["rows"]}


def _shape(row: dict, short: bool = False) -> str:
    s = row["shape"]
    if short:
        return f"B={s['B']} T={s['T']} G={s['G']}"
    return f"B={s['B']} T={s['T']} H={s['H']} G={s['G']} d={s['d']}"


def _base(row: dict, index: dict) -> Optional[dict]:
    """The first baseline of the row's list that was timed on the same shape."""
    for name in row["against"]:
        b = index.get((row["case"], _shape_key(row), name, None))
        if b is not None and "ms" in b:
            return b
    return None


def _fmt(x: Optional[float], digits: int = 3, scale: float = 1.0) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * scale:.{digits}f}"


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 0 else None


def rows_table(results: dict) -> str:
    """Every row, grouped by case and shape: ms per pass (median over rounds), throughput
    where the case counts FLOPs, and the speed against the row's baseline (its time ÷ this)."""
    unit, mult = _unit(results)
    index = _index(results)
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in results["rows"]:
        groups.setdefault((r["case"], _shape_key(r)), []).append(r)
    for rows in groups.values():
        named = {p for r in rows for p in r.get("ms", {})}
        passes = [p for p in PASSES if p in named] + sorted(named - set(PASSES))
        flops = [p for p in passes if any(p in r.get("tflops", {}) for r in rows)]
        gbps = [p for p in passes if any(p in r.get("gbps", {}) for r in rows)]
        info = sorted({k for r in rows for k in r.get("info", {})})
        ab = any(r["kernels"] for r in rows)
        head = f"  {'impl':<18}" + (f" {'kernels':<22}" if ab else "")
        head += "".join(f" {p + ' ms':>11}" for p in passes)
        head += "".join(f" {p + ' ' + unit:>15}" for p in flops)
        head += "".join(f" {p + ' GB/s':>12}" for p in gbps)
        head += "".join(f" {k:>18}" for k in info) + "  vs baseline"
        lines += [f"{rows[0]['case']}  {_shape(rows[0])}", head]
        for r in rows:
            line = f"  {r['impl']:<18}" + (f" {r['kernels'] or '':<22}" if ab else "")
            if "error" in r:
                lines.append(f"{line} error: {r['error'][:100]}")
                continue
            line += "".join(f" {_fmt(r['ms'].get(p)):>11}" for p in passes)
            line += "".join(f" {_fmt(r.get('tflops', {}).get(p), 1, mult):>15}"
                            for p in flops)
            line += "".join(f" {_fmt(r.get('gbps', {}).get(p), 1):>12}" for p in gbps)
            line += "".join(f" {r.get('info', {}).get(k, ''):>18}" for k in info)
            base, last = _base(r, index), passes[-1]
            if base is not None and last in base["ms"]:
                line += f"  {_fmt(_ratio(base['ms'][last], r['ms'][last]), 2)}x {base['impl']}"
            lines.append(line)
    return "\n".join(lines)


def suite_table(results: dict) -> Optional[str]:
    """The ops rows as the GPU suite's table (markdown): attention's and SDPA's throughput,
    attention's ratio to the baseline, and the other ops' fwd+bwd time ÷ attention's."""
    unit, mult = _unit(results)
    index = _index(results)
    attn = [r for r in results["rows"]
            if r["case"] == "ops" and r["impl"] == "attention" and not r["kernels"] and "ms" in r]
    if not attn:
        return None
    present = {r["impl"] for r in results["rows"] if r["case"] == "ops" and "ms" in r}
    sdpas = [n for n in SDPA_COLUMNS if n in present]
    base = next((n for n in attn[0]["against"] if n in present), None)
    others = [n for n in OVER_ATTENTION if n in present]
    digits = 0 if unit == "TFLOP/s" else 1

    def fb(r: Optional[dict]) -> str:
        if r is None or "tflops" not in r:
            return "-"
        t = r["tflops"]
        return f"{_fmt(t.get('fwd'), digits, mult)} / {_fmt(t.get('bwd'), digits, mult)}"

    head = ["G", "T", "ours fwd / bwd"] + [f"{SDPA_COLUMNS[n]} fwd / bwd" for n in sdpas]
    if base:
        head += [f"fwd / {SDPA_COLUMNS[base]}", f"bwd / {SDPA_COLUMNS[base]}"]
    head += [OVER_ATTENTION[n] for n in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in attn:
        get = lambda name: index.get(("ops", _shape_key(a), name, None))  # noqa: E731
        T = a["shape"]["T"]
        cells = [str(a["shape"]["G"]), f"{T // 1024}k" if T % 1024 == 0 else str(T), fb(a)]
        cells += [fb(get(n)) for n in sdpas]
        if base:
            b = get(base)
            for p in ("fwd", "bwd"):
                ok = b is not None and "ms" in b and p in b["ms"] and p in a["ms"]
                cells.append(_fmt(_ratio(b["ms"][p], a["ms"][p]), 2) if ok else "-")
        for n in others:
            o = get(n)
            ok = o is not None and "ms" in o and "fwd+bwd" in o["ms"]
            cells.append(_fmt(_ratio(o["ms"]["fwd+bwd"], a["ms"]["fwd+bwd"])) if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    s, rounds = attn[0]["shape"], results["settings"]["rounds"]
    tokens = {a["shape"]["B"] * a["shape"]["T"] for a in attn}
    batch = f"B·T = {tokens.pop()}" if len(tokens) == 1 else f"B = {s['B']}"
    title = (f"{results['device']}, {results['settings']['dtype']}, "
             f"{'causal' if s['causal'] else 'non-causal'}, H = {s['H']}, d = {s['d']}, "
             f"{batch}: {unit} (bwd = fwd+bwd - fwd), median of {rounds} interleaved rounds; "
             f"{', '.join(others) or 'ops'}: fwd+bwd time ÷ attention's")
    return title + "\n\n" + "\n".join(lines)


def ab_table(results: dict) -> Optional[str]:
    """Each implementation under each kernel-options set: median ms (min-max over rounds)
    per pass, and each set's time ÷ the first set's (markdown)."""
    sets = [k["label"] for k in results["settings"].get("ab") or []]
    if not sets:
        return None
    index = _index(results)
    head = ["case", "shape", "impl", "pass"] + [f"{k} ms (min-max)" for k in sets]
    head += [f"{k} / {sets[0]}" for k in sets[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for r in results["rows"]:
        key = (r["case"], _shape_key(r), r["impl"])
        if not r["kernels"] or key in seen:
            continue
        seen.add(key)
        rows = [index.get(key[:3] + (k,)) for k in sets]
        passes = [p for p in PASSES if all(x is not None and p in x.get("ms", {}) for x in rows)]
        if not passes:
            errs = "; ".join(f"{k}: {x['error'][:60]}" for k, x in zip(sets, rows)
                             if x is not None and "error" in x)
            lines.append(f"| {r['case']} | {_shape(r, True)} | {r['impl']} | - | {errs} |")
            continue
        for p in passes:
            cells = [r["case"], _shape(r, True), r["impl"], p]
            cells += [f"{x['ms'][p]:.3f} ({x['ms_range'][p][0]:.3f}-{x['ms_range'][p][1]:.3f})"
                      for x in rows]
            cells += [_fmt(_ratio(x["ms"][p], rows[0]["ms"][p])) for x in rows[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    title = (f"{results['device']}, {results['settings']['dtype']}: A/B of kernel options, "
             f"median of {results['settings']['rounds']} interleaved rounds")
    return title + "\n\n" + "\n".join(lines)


def report(results: dict) -> str:
    """Every row first, then the short table (A/B comparison, else the suite's table)."""
    parts = [rows_table(results)]
    if results.get("settings", {}).get("cuda_graph"):
        parts[0] = ("timed in CUDA graphs (device time: reps calls per graph, median replay / "
                    "reps)\n" + parts[0])
    short = ab_table(results) or suite_table(results)
    if short:
        parts.append(short)
    return "\n\n".join(parts)
