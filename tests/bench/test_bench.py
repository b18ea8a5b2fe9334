"""`mka bench` and the `mka` command on the CPU: tiny shapes, one round, one timed call."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch

import mka
from mka import cli
from mka.bench import Case, Settings, parse_kernel_set, registry, run, timer
from mka.bench.cases import OPS, Shape

TINY = ["--device", "cpu", "--seqs", "16", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "16", "--rounds", "1", "--reps", "1"]


@pytest.fixture
def kernel_options(monkeypatch):
    """A stand-in for mka.use_kernels where this build has none (CPU kernels ignore them)."""
    seen = []
    if not hasattr(mka, "use_kernels"):
        @contextlib.contextmanager
        def use_kernels(**options):
            seen.append(options)
            yield
        monkeypatch.setattr(mka, "use_kernels", use_kernels, raising=False)
    return seen


def test_registry_lists_cases_and_impls():
    cases = registry()
    assert {"ops", "block"} <= set(cases)
    on_cpu = {i.name for i in cases["ops"].on("cpu")}
    assert {"attention", "route_fuse", "fastmka", "fastmka+dlam", "mka", "sdpa"} <= on_cpu
    assert not {"sdpa.flash", "sdpa.cudnn"} & on_cpu
    assert {"sdpa.flash", "sdpa.cudnn"} <= {i.name for i in cases["ops"].on("cuda")}
    assert {"mha", "mha.torch", "fastmka-gqa"} <= {i.name for i in cases["block"].impls.values()}


def test_case_registration_rejects_duplicates():
    case = Case("scratch", "a test case", inputs=lambda s, dev, dt: None, passes={})
    case.impl("x")(lambda: None)
    with pytest.raises(ValueError, match="twice"):
        case.impl("x")(lambda: None)
    with pytest.raises(ValueError, match="twice"):
        OPS.impl("attention")(lambda: None)


def test_timer_cpu_and_errors():
    assert timer.time_ms(lambda: sum(range(100)), "cpu", reps=3) > 0

    def fail():
        raise RuntimeError("refused\nsecond line")
    t = timer.interleaved({"ok": timer.Variant({"fwd": lambda: None}),
                           "bad": timer.Variant({"fwd": fail})}, "cpu", rounds=2, reps=1)
    assert len(t.ms["ok"]["fwd"]) == 2
    assert t.errors == {"bad": "RuntimeError: refused"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_timing_replays_the_captured_calls():
    """--cuda-graph: reps calls in one graph; the time per call is about the eager one for a
    call long enough to hide its host time."""
    a = torch.randn(2048, 2048, device="cuda")
    graphed = timer.time_ms(lambda: a @ a, "cuda", reps=10, graph=True)
    eager = timer.time_ms(lambda: a @ a, "cuda", reps=10)
    assert 0.5 < graphed / eager < 2.0


def test_bench_end_to_end_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["bench", *TINY, "--impls", "attention,fastmka*,sdpa", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-3:]  # the short table comes last: header, rule, 1 row
    assert last[0].startswith("| G | T | ours fwd / bwd | SDPA fwd / bwd | fwd / SDPA |")
    assert last[2].startswith("| 1 | 16 | ")
    r = json.loads(out.read_text())
    for key in ("device", "device_type", "torch", "mka", "commit", "date", "command", "settings"):
        assert key in r
    assert r["command"].startswith("mka bench --device cpu")
    assert r["device_type"] == "cpu" and r["settings"]["dtype"] == "float32"
    rows = {row["impl"]: row for row in r["rows"]}
    assert set(rows) == {"attention", "fastmka", "fastmka+dlam", "sdpa"}
    a = rows["attention"]
    assert a["shape"] == {"B": 1, "T": 16, "H": 2, "G": 1, "d": 16, "causal": True}
    assert set(a["ms"]) == {"fwd", "bwd", "fwd+bwd"} and a["ms"]["fwd+bwd"] > 0
    assert a["tflops"]["fwd"] > 0 and a["against"][-1] == "sdpa"


def test_block_case_runs():
    results = run(Settings(device="cpu", dtype=torch.float32, cases=["block"],
                           impls=["gqa", "gqa.torch"], seqs=[8], heads=2, kv_heads=[1],
                           head_dim=8, tokens=8, rounds=1, reps=1))
    rows = {r["impl"]: r for r in results["rows"]}
    assert rows["gqa"]["ms"]["fwd+bwd"] > 0 and rows["gqa.torch"]["baseline"]
    assert rows["gqa"]["info"]["kv_bytes_per_token"] == 2 * 1 * 8 * 2  # k, v of 1 head, bf16


def test_decode_case_runs_and_reports_bandwidth(capsys):
    """The decode case over pages and the contiguous cache: every CPU implementation runs,
    GB/s from the bytes read, the ratio to SDPA; --batches sets B per shape."""
    from mka.cli import main
    assert main(["bench", "--device", "cpu", "--cases", "decode", "--seqs", "100",
                 "--batches", "1,3", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                 "--rounds", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "decode  B=3 T=100 H=4 G=2 d=16" in out and "step GB/s" in out
    for impl in ("paged", "paged_mka", "paged_fastmka", "attention", "sdpa"):
        assert f"  {impl} " in out
    assert "error" not in out


def test_ab_mode(kernel_options, capsys):
    assert cli.main(["bench", *TINY, "--impls", "attention,sdpa",
                     "--ab", "A:scan=1pass", "B:scan=3pass,scan_through=0"]) == 0
    printed = capsys.readouterr().out
    assert "| case | shape | impl | pass | A ms (min-max) | B ms (min-max) | B / A |" in printed
    if kernel_options:  # the stand-in saw both sets
        assert {"scan": "3pass", "scan_through": False} in kernel_options


def test_ab_mode_runner_rows(kernel_options):
    sets = [parse_kernel_set("attention=pingpong"), parse_kernel_set("attention=lockstep")]
    results = run(Settings(device="cpu", dtype=torch.float32, impls=["attention", "sdpa"],
                           seqs=[16], heads=2, kv_heads=[2], head_dim=16, rounds=2, reps=1,
                           ab=sets))
    keys = {(r["impl"], r["kernels"]) for r in results["rows"]}
    assert keys == {("attention", "attention=pingpong"), ("attention", "attention=lockstep"),
                    ("sdpa", None)}
    assert all(len(r["ms_rounds"]["fwd"]) == 2 for r in results["rows"])


def test_parse_kernel_set():
    k = parse_kernel_set("B:attention=mma,scan_through=off")
    assert (k.label, k.options) == ("B", {"attention": "mma", "scan_through": False})
    assert parse_kernel_set("default").options == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_kernel_set("A:mma")


@pytest.mark.parametrize("argv, message", [
    (["--ab", "scan=3pass"], "two or more"),
    (["--impls", "nope"], "matches no implementation"),
    (["--cases", "nope"], "unknown case"),
    (["--kv-heads", "3"], "must divide"),
    (["--cuda-graph"], "needs --device cuda"),
])
def test_bench_bad_settings(argv, message, kernel_options, capsys):
    assert cli.main(["bench", *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_plain_mka_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mka") and "bench" in out and "train" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mka {mka.__version__}"


def test_bench_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--rounds", "default: 5 on cuda, 3 on cpu", "--json", "--ab", "gpu-suite"):
        assert text in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_bench_cuda_without_cuda_is_one_line():
    r = subprocess.run([sys.executable, "-m", "mka.cli", "bench", "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mka bench: error: --device cuda: no CUDA device is visible to torch"]


def test_shape_str():
    assert str(Shape(B=2, T=8, H=4, G=2, d=16)) == "B=2 T=8 H=4 G=2 d=16"


def _tool(name: str):
    """bench/tools/<name>.py loaded as a module (bench/tools is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool", ["host_overhead", "gpu_profile"])
def test_tools_load_against_the_runner(tool):
    """The GPU tools in bench/tools import the runner's names (they run only on CUDA)."""
    module = _tool(tool)
    assert callable(module.main) and list(OPS.passes) == ["fwd", "fwd+bwd"]


def test_hf_profile_refuses_to_run_without_cuda(monkeypatch, capsys):
    """bench/tools/hf_profile.py loads on any machine and says it needs a CUDA device."""
    import sys

    module = _tool("hf_profile")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["hf_profile.py", "decode"])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_recall_case_runs_and_its_implementations_agree():
    """The recall case on a real SimHash choice: the native op equals the composite it is
    compared with (float64), and every CPU implementation runs both passes."""
    from mka.bench.recall import RECALL, recall_inputs
    x = recall_inputs(Shape(1, 600, 4, 2, 16), "cpu", torch.float64)  # chunks before the window
    assert (x.lam >= 0).any()  # some rows recalled chunks
    got, want = (RECALL.impls[n].fn(x.q, x.k, x.v, x.lam, True) for n in ("recall", "composite"))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    results = run(Settings(device="cpu", dtype=torch.float32, cases=["recall"], seqs=[600],
                           heads=4, kv_heads=[2], head_dim=16, rounds=1, reps=1))
    rows = {r["impl"]: r for r in results["rows"]}
    assert set(rows) == {"recall", "composite", "attention"}
    assert all(r["ms"]["fwd+bwd"] > 0 for r in rows.values())


def test_train_profile_builds_every_row_alike(monkeypatch):
    """bench/tools/train_profile.py: the baseline and both backends of mka's GPT are the same
    recipe (same parameter count); without CUDA it says so."""
    import sys

    module = _tool("train_profile")
    counts = {row: sum(p.numel() for p in module.build(row, 65, torch.device("cpu"))[0].parameters())
              for row in ("baseline", "mka", "mka.torch")}
    assert len(set(counts.values())) == 1, counts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["train_profile.py"])
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        module.main()


def test_short_seq_kernels_refuses_to_run_without_cuda(monkeypatch):
    """bench/tools/short_seq_kernels.py loads on any machine and says it needs a CUDA device."""
    import sys

    module = _tool("short_seq_kernels")
    assert module.MODES == ("tma", "lockstep", "pingpong", "mma")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["short_seq_kernels.py"])
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        module.main()
