"""The ops are proper custom operators: torch.library.opcheck, gradcheck in float64, and
torch.compile(fullgraph=True) gives the eager result without graph breaks."""

import pytest
import torch

import mka  # registers torch.ops.mka


def _inputs(with_l3=False, states=False, dtype=torch.float64, B=1, T=6, H=2, G=1, d=8):
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = mk(B, T, H, d), mk(B, T, G, d), mk(B, T, G, d)
    L = 3 if with_l3 else 2
    lam = torch.softmax(torch.randn(B, T, L, dtype=dtype), -1).requires_grad_()
    st = dict(k_state=mk(B, G, d), v_state=mk(B, G, d)) if states else {}
    return q, k, v, lam, L, st


def _cases():
    q, k, v, lam, _, st = _inputs(states=True)
    q3, k3_, v3_, lam3, _, _ = _inputs(with_l3=True)
    x3 = torch.randn_like(k3_).requires_grad_()
    return {
        "attention": (torch.ops.mka.attention, (q, k, v), dict(causal=True, window=4)),
        "route_fuse": (torch.ops.mka.route_fuse, (k, v, lam, 0.8), st),
        "route_fuse_l3": (torch.ops.mka.route_fuse, (k3_, v3_, lam3, 0.8, x3, x3.detach()), {}),
        "fastmka": (torch.ops.mka.fastmka, (q, k, v, lam, 0.8), dict(st, window=3)),
        "fastmka_l3": (torch.ops.mka.fastmka, (q3, k3_, v3_, lam3, 0.8, x3, x3.detach()), {}),
        "mka": (torch.ops.mka.mka, (q, k, v, lam, 0.8), st),
        "mka_l3": (torch.ops.mka.mka, (q3, k3_, v3_, lam3, 0.8, x3[:, :4], x3[:, :4].detach()),
                   {}),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_gradcheck_float64(name):
    op, args, kwargs = _cases()[name]
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + list(
        t for t in kwargs.values() if isinstance(t, torch.Tensor))

    def fn(*ts):
        it = iter(ts)
        a = [next(it) if isinstance(x, torch.Tensor) else x for x in args]
        kw = {n: (next(it) if isinstance(x, torch.Tensor) else x) for n, x in kwargs.items()}
        return op(*a, **kw)

    inputs = [t.detach().clone().requires_grad_() for t in tensors]  # no shared storage
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def _private_call(name, case):
    """The registered op that does the work for case (op, args, kwargs) `name`, and its full
    argument tuple."""
    _, args, kwargs = case
    private = {"attention": torch.ops.mka._attention_fwd, "fastmka": torch.ops.mka._fastmka_fwd,
               "fastmka_l3": torch.ops.mka._fastmka_fwd, "mka": torch.ops.mka._mka_fwd,
               "mka_l3": torch.ops.mka._mka_fwd, "route_fuse": torch.ops.mka._route_fuse_fwd}[name]
    schema = private.default._schema
    names = [a.name for a in schema.arguments]
    full = dict(zip(names, args)) | dict(kwargs)
    defaults = {"causal": True, "scale": None, "window": None, "k3": None, "v3": None,
                "mem_k": None, "mem_v": None, "k_state": None, "v_state": None,
                "dropout_p": 0.0, "seed": None, "kernels": mka.current_kernels().token}
    return private, tuple(full.get(n, defaults.get(n)) for n in names)


@pytest.mark.parametrize("name", ["attention", "route_fuse", "fastmka", "mka", "mka_l3",
                                  "fastmka_l3"])
def test_opcheck(name):
    """opcheck on the registered op that does the work (the public composites dispatch
    to the private ops, which carry the fake kernels and autograd)."""
    private, call = _private_call(name, _cases()[name])
    torch.library.opcheck(private.default, call)


@pytest.mark.parametrize("name", ["attention", "fastmka", "mka"])
def test_opcheck_with_dropout(name):
    """The same with attention dropout: a fixed seed makes the op a function of its inputs."""
    private, call = _private_call(name, _cases()[name])
    names = [a.name for a in private.default._schema.arguments]
    call = list(call)
    call[names.index("dropout_p")] = 0.2
    call[names.index("seed")] = torch.tensor([987654321], dtype=torch.int64)
    torch.library.opcheck(private.default, tuple(call))


@pytest.mark.parametrize("name", ["attention", "route_fuse", "fastmka", "fastmka_l3", "mka",
                                  "mka_l3"])
def test_eager_path_matches_custom_ops(name):
    """Plain eager calls of the public ops run the private ops' implementations as an
    autograd.Function (ops._Eager: less host time); the private custom ops' own autograd,
    which torch.compile and fake tensors take, gives the same outputs and gradients."""
    case = _cases()[name]
    public, args, kwargs = case
    private, call = _private_call(name, case)
    tensors = [t for t in call if isinstance(t, torch.Tensor) and t.requires_grad]
    eager = public(*args, **kwargs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    res = private(*call)
    if name == "route_fuse":
        custom = tuple(res)
    else:
        states = {"attention": (), "fastmka": res[2:4], "mka": res[3:5]}[name.split("_")[0]]
        custom = (res[0], *states)
    for a, b in zip(eager, custom):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    seeds = [torch.randn_like(t) for t in eager]
    ge = torch.autograd.grad(eager, tensors, seeds, allow_unused=True)
    gc = torch.autograd.grad(custom, tensors, seeds, allow_unused=True)
    for a, b in zip(ge, gc):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _eager_and_compiled(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    return fn(*args), compiled(*args)


def test_compile_fullgraph_forward_and_backward():
    q, k, v, lam, _, st = _inputs(dtype=torch.float32, B=2, T=16, H=4, G=2, d=16, states=True)

    def model(q, k, v, lam, ks, vs):
        kf, vf, a, b = torch.ops.mka.route_fuse(k, v, lam, 0.9, k_state=ks, v_state=vs)
        o1 = torch.ops.mka.attention(q, kf, vf)
        o2, c, d = torch.ops.mka.fastmka(q, k, v, lam, 0.9, k_state=ks, v_state=vs)
        o3, e, f = torch.ops.mka.mka(q, k, v, lam, 0.9, k_state=ks, v_state=vs, window=5)
        return (o1 * 2 + o2 - o3).sin().sum() + (a + b + c + d + e + f).sum()

    args = (q, k, v, lam, st["k_state"], st["v_state"])
    eager, comp = _eager_and_compiled(model, *args)
    torch.testing.assert_close(comp, eager)
    ge = torch.autograd.grad(eager, args)
    gc = torch.autograd.grad(comp, args)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_compile_inductor_fullgraph(monkeypatch, tmp_path):
    # A cache of its own: inductor's on-disk caches key graphs by the public ops, which do not
    # change when an installed mka's private ops do.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    q, k, v, lam, _, _ = _inputs(dtype=torch.float32, B=1, T=12, H=2, G=1, d=16)
    fn = lambda q, k, v, lam: torch.ops.mka.mka(q, k, v, lam, 0.5)[0].relu() + \
        torch.ops.mka.attention(q, k, v)  # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v, lam),
                                   fn(q, k, v, lam))
