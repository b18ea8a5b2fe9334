"""How often mka's bf16 test case (L = 3, with states) misses SPEC §5's 1e-2 on fresh random
inputs, with the relative errors of the state gradients: the accuracy check behind keeping
the levels' outputs in float32 (bench/PERF_NOTES.md).
Run: python bench/mka_state_grad_accuracy.py [N=100] [cuda|cpu]"""

import statistics
import sys

import torch

sys.path[:0] = ["tests", "tests/ops"]
import conftest  # noqa: E402
import harness  # noqa: E402
from harness import compare, randn, router, state  # noqa: E402

import mka  # noqa: E402,F401
from mka import reference as R  # noqa: E402

errs: list[float] = []


def recording_assert_close(out, ref, dtype, what="output"):
    if what.startswith("grad of") and "state" in what:
        errs.append(conftest.rel_err(out, ref))
    return conftest.assert_close(out, ref, dtype, what)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    harness.assert_close = recording_assert_close
    B, T, H, G, d, L, M, dt = 2, 33, 4, 2, 64, 3, 12, torch.bfloat16
    fails = 0
    for _ in range(n):
        r = lambda *s: randn(*s, device=dev, dtype=dt)  # noqa: E731
        inp = dict(q=r(B, T, H, d), k=r(B, T, G, d), v=r(B, T, G, d),
                   lam=router(B, T, L, dev, dt), beta=0.8, mem_k=r(B, M, G, d),
                   mem_v=r(B, M, G, d), k_state=state(B, G, d, dev, dt),
                   v_state=state(B, G, d, dev, dt))
        try:
            compare(torch.ops.mka.mka, R.mka, inp, dict(causal=True, scale=None, window=None), dt)
        except AssertionError:
            fails += 1
    print(f"{dev}: {fails}/{n} failed; state gradients' relative error median "
          f"{statistics.median(errs):.2e}, max {max(errs):.2e}")


if __name__ == "__main__":
    main()
