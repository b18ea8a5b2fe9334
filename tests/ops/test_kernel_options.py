"""The kernel choice (mka.kernels): validated, scoped, read by each op at its forward and
handed to its backward, and passed through torch.compile as a constant."""

import os
import subprocess
import sys

import pytest
import torch

import mka
from mka import ops


def test_options_are_validated():
    with pytest.raises(ValueError, match="attention: expected one of pingpong, lockstep, mma, tma"):
        mka.set_kernels(attention="flash")
    with pytest.raises(ValueError, match="scan: expected one of 1pass, 3pass"):
        mka.KernelOptions(scan="2pass")
    with pytest.raises(ValueError, match="scan_through: expected a bool"):
        mka.KernelOptions(scan_through="no")
    with pytest.raises(ValueError, match="recall: expected one of chunks, rows"):
        mka.set_kernels(recall="row")
    with pytest.raises(TypeError):
        mka.set_kernels(wgmma="off")


def test_set_and_use_restore():
    before = mka.current_kernels()
    with mka.use_kernels(attention="mma", scan="3pass") as inside:
        assert inside == mka.current_kernels() == mka.KernelOptions("mma", "3pass", True)
        with mka.use_kernels(scan_through=False):
            assert mka.current_kernels() == mka.KernelOptions("mma", "3pass", False)
        assert mka.current_kernels() == inside
    assert mka.current_kernels() == before
    previous = mka.set_kernels(scan="3pass")
    try:
        assert previous == before and mka.current_kernels().scan == "3pass"
    finally:
        mka.set_kernels(**vars(previous))
    assert mka.current_kernels() == before
    opts = mka.KernelOptions("lockstep", "3pass", False, "rows")
    assert mka.KernelOptions.from_token(opts.token) == opts


def _recording(monkeypatch, name):
    """Wraps ops.<name> (a backward op's implementation) to record the kernels it is given."""
    seen, impl = [], getattr(ops, name)

    def record(*args):
        seen.append(args[-1])
        return impl(*args)
    monkeypatch.setattr(ops, name, record)
    return seen


@pytest.mark.parametrize("op", ["attention", "route_fuse", "fastmka", "mka"])
def test_backward_takes_the_forwards_choice(monkeypatch, op):
    # Options changed between a forward and its backward do not reach the backward.
    seen = _recording(monkeypatch, f"_{op}_bwd_impl")
    B, T, H, G, d = 1, 8, 2, 1, 16
    q = torch.randn(B, T, H, d, requires_grad=True)
    k, v = (torch.randn(B, T, G, d, requires_grad=True) for _ in range(2))
    lam = torch.softmax(torch.randn(B, T, 2), -1)
    call = {"attention": lambda: torch.ops.mka.attention(q, k, v),
            "route_fuse": lambda: torch.ops.mka.route_fuse(k, v, lam, 0.9)[0],
            "fastmka": lambda: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0],
            "mka": lambda: torch.ops.mka.mka(q, k, v, lam, 0.9)[0]}[op]
    with mka.use_kernels(attention="lockstep", scan="3pass", scan_through=False):
        out = call()
    out.sum().backward()
    assert seen == ["lockstep,3pass,0,chunks"]


def test_compiled_graph_carries_the_choice():
    q = torch.randn(1, 8, 2, 16)
    k, v = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16)
    lam = torch.softmax(torch.randn(1, 8, 2), -1)
    fn = lambda: torch.ops.mka.fastmka(q, k, v, lam, 0.9)[0]  # noqa: E731
    torch._dynamo.reset()
    with mka.use_kernels(scan="3pass"):
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(out, fn())


def _import_with(env: dict) -> subprocess.CompletedProcess:
    code = "import mka; print(mka.current_kernels().token)"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env,token", [({}, "tma,1pass,1,chunks"),
                                       ({"MKA_CUDA_WGMMA": "0"}, "mma,1pass,1,chunks"),
                                       ({"MKA_CUDA_WGMMA": "pingpong"}, "pingpong,1pass,1,chunks"),
                                       ({"MKA_CUDA_WGMMA": "lockstep", "MKA_CUDA_SCAN": "3pass",
                                         "MKA_CUDA_SCAN_THROUGH": "0", "MKA_CUDA_RECALL": "rows"},
                                        "lockstep,3pass,0,rows")])
def test_environment_sets_the_defaults(env, token):
    clean = {"MKA_CUDA_WGMMA": "", "MKA_CUDA_SCAN": "", "MKA_CUDA_SCAN_THROUGH": "",
             "MKA_CUDA_RECALL": ""}
    r = _import_with({**clean, **env})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == token


@pytest.mark.parametrize("var,value,message", [
    ("MKA_CUDA_WGMMA", "pingpog", "MKA_CUDA_WGMMA: expected 0, lockstep, pingpong or tma"),
    ("MKA_CUDA_SCAN", "2pass", "MKA_CUDA_SCAN: expected 1pass or 3pass"),
    ("MKA_CUDA_SCAN_THROUGH", "yes", "MKA_CUDA_SCAN_THROUGH: expected 0 or 1"),
    ("MKA_CUDA_RECALL", "row", "MKA_CUDA_RECALL: expected chunks or rows")])
def test_bad_environment_values_raise_at_import(var, value, message):
    r = _import_with({var: value})
    assert r.returncode != 0 and message in r.stderr, r.stderr


@pytest.mark.parametrize("raw_handle, want", [(1234, "raw"), (99, "official"), (None, "official")])
def test_the_stream_handle_comes_from_the_raw_accessor_once_it_agrees(raw_handle, want,
                                                                      monkeypatch):
    """The ops' launch stream: torch's raw accessor where it returned the public API's handle
    at the first call, else (missing, or disagreeing) the public API."""
    import contextlib
    calls = []
    monkeypatch.setattr(ops, "_stream_of", None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda i: type("S", (), {"cuda_stream": 1234})())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(ops, "_official_stream", lambda i: calls.append("official") or 1234)
    if raw_handle is None:
        monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream", raising=False)
    else:
        monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream",
                            lambda i: calls.append("raw") or raw_handle, raising=False)
    assert ops._stream(0) in (1234, raw_handle)
    calls.clear()
    ops._stream(0)
    assert calls == [want]
