"""Warp-stall samples and executed instructions per barrier-delimited region of a kernel, from
an ncu SourceCounters export, and how often the look-back's loads, publishes and sleeps ran:
where the write-out of attention_bwd_wgmma spends its time.
Export: ncu --section SourceCounters -o R ...; ncu --import R.ncu-rep --page source --csv
--print-source sass > src.csv. Run: python bench/ncu_regions.py src.csv [...]"""

from __future__ import annotations

import csv
import sys


def report(path: str) -> None:
    rows = list(csv.reader(open(path)))
    hdr, data = rows[1], rows[2:]
    executed = hdr.index("Instructions Executed")
    sampled = hdr.index("Warp Stall Sampling (All Samples)")
    total = sum(int(r[sampled]) for r in data)
    bars = [i for i, r in enumerate(data) if "BAR.SYNC" in r[1]]
    print(path, "samples", total)
    prev = 0
    for b in bars + [len(data)]:
        s = sum(int(r[sampled]) for r in data[prev:b])
        e = sum(int(r[executed]) for r in data[prev:b])
        print(f"  sass [{prev:5d},{b:5d}) samples {s:6d} ({100 * s / total:4.1f}%) "
              f"warp-instructions {e}")
        prev = b
    for i, r in enumerate(data):
        s = r[1].strip()
        if ("STRONG" in s and "REDG" not in s) or "NANOSLEEP" in s:
            print(f"  {i:5d} executed {r[executed]:>6s}  {s[:70]}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        report(p)
