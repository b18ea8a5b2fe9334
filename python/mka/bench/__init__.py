"""`mka bench`: a registry of benchmark cases, one timer, a runner and its tables.

    from mka.bench import Settings, run, report
    results = run(Settings(device="cpu", dtype=torch.float32, seqs=[256]))
    print(report(results))
"""

from . import decode, modules, recall  # noqa: F401  (register the decode, module and recall cases)
from .cases import OPS, Case, Impl, Shape, register, registry
from .report import report
from .runner import PRESETS, KernelSet, Settings, parse_kernel_set, run
from .timer import interleaved, time_ms

__all__ = ["Case", "Impl", "Shape", "OPS", "register", "registry", "Settings", "KernelSet",
           "PRESETS", "parse_kernel_set", "run", "report", "time_ms", "interleaved"]
