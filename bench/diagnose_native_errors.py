"""Diagnoses how mka._C reports a C++ error on this machine (the Python 3.12 + torch 2.11
host crashed on tests/ops/test_errors.py::test_native_layer_validates_too). Each case runs
in its own interpreter, so a crash is reported (exit code, faulthandler trace) and the
next case still runs; with gdb present the crashing case is rerun under it for a native
backtrace. Run: python bench/diagnose_native_errors.py"""

from __future__ import annotations

import shutil
import subprocess
import sys

PRELUDE = "import torch, mka\n"
# The module alone, loaded from its file without importing torch (or the mka package).
BARE = ("import glob, importlib.util, sys\n"
        "path = [f for p in sys.path for f in glob.glob(p + '/mka/_C*.so')][0]\n"
        "print('loading', path)\n"
        "s = importlib.util.spec_from_file_location('mka._C', path)\n"
        "C = importlib.util.module_from_spec(s); s.loader.exec_module(C)\n"
        "try:\n    C.plan_tiles('gpu', 0, 2, 1 << 16)\n"
        "except Exception as e:\n    print('raised', type(e).__name__, e)\n")
CASES = {
    # A C++ error with no array argument: the plain exception path of nanobind.
    "plan_tiles(head_dim=0)": "mka._C.plan_tiles('gpu', 0, 2, 1 << 16)",
    # A rejected array argument (wrong dtype): nanobind's own overload resolution.
    "attention_forward(int64 q)": (
        "q = torch.zeros(1, 4, 2, 64, dtype=torch.int64)\n"
        "mka._C.attention_forward(q, q, q, True, None, None, q, torch.empty(1, 2, 4), 0)"),
    # Valid arrays, invalid shapes: mka::Error thrown inside the released-GIL region.
    "attention_forward(bad groups)": (
        "q = torch.randn(2, 8, 4, 64); k = torch.randn(2, 8, 3, 64)\n"
        "mka._C.attention_forward(q, k, k, True, None, None, torch.empty_like(q),"
        " torch.empty(2, 4, 8), 0)"),
    # The same with numpy arrays: is torch's DLPack export involved?
    "attention_forward(bad groups, numpy)": (
        "import numpy as np\n"
        "q = np.zeros((2, 8, 4, 64), np.float32); k = np.zeros((2, 8, 3, 64), np.float32)\n"
        "mka._C.attention_forward(q, k, k, True, None, None, np.zeros_like(q),"
        " np.zeros((2, 4, 8), np.float32), 0)"),
}
WRAP = "try:\n{body}\nexcept Exception as e:\n    print('raised', type(e).__name__, str(e)[:120])\n"


def script(body: str) -> str:
    return PRELUDE + WRAP.format(body="\n".join("    " + line for line in body.splitlines()))


def main() -> None:
    subprocess.run([sys.executable, "-c", (
        "import sys, torch, nanobind, mka; print('python', sys.version.split()[0], '| torch',"
        " torch.__version__, '| nanobind', nanobind.__version__, '| mka._C', mka._C.__file__)")])
    crashed = []
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", BARE], capture_output=True,
                       text=True)
    print(f"--- plan_tiles(head_dim=0) without torch: exit {r.returncode}\n"
          f"{(r.stdout + r.stderr).strip()[-800:]}")
    for name, body in CASES.items():
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script(body)],
                           capture_output=True, text=True)
        print(f"--- {name}: exit {r.returncode}\n{(r.stdout + r.stderr).strip()[-1500:]}")
        if r.returncode != 0:
            crashed.append(body)
    gdb = shutil.which("gdb") or shutil.which("cuda-gdb")
    if crashed and gdb:
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable,
                            "-c", script(crashed[0])], capture_output=True, text=True)
        print("--- gdb backtrace of the first crash\n" + (r.stdout + r.stderr)[-6000:])
    elif crashed:
        print("--- no gdb on this machine for a native backtrace")


if __name__ == "__main__":
    main()
