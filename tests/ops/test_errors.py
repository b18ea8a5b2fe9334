"""Bad inputs raise ValueError naming the argument (SPEC §4) — in Python before any native
code runs, and again in the native layer when it is called directly."""

import pytest
import torch

import mka

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def qkv(device, B=2, T=8, H=4, G=2, d=64, dtype=torch.float32):
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    return mk(B, T, H, d), mk(B, T, G, d), mk(B, T, G, d)


def lam(device, B=2, T=8, L=2, dtype=torch.float32):
    return torch.softmax(torch.randn(B, T, L, device=device), -1).to(dtype)


def raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_bad_inputs(device):
    q, k, v = qkv(device)
    att = torch.ops.mka.attention
    raises(r"^k: expected shape", att, q, k[..., :32], v[..., :32])
    raises(r"^v: expected the shape of k", att, q, k, v[:, :5])
    raises(r"^q: the number of query heads H = 4 must be a multiple of .* G = 3",
           att, q, *qkv(device, G=3)[1:])
    raises(r"^k: dtype torch.float64 does not match q", att, q, k.double(), v)
    raises(r"^q: expected a 4-d tensor", att, q[0], k, v)
    raises(r"^window: must be at least 1", att, q, k, v, True, None, 0)
    raises(r"^q: the last dimension must be contiguous", att,
           q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)
    raises(r"^q: dtype torch.int64 is not supported", att, q.long(), k.long(), v.long())
    raises(r"^k: is on meta but q is on", att, q, k.to("meta"), v)
    if device == "cpu":
        raises(r"^q: head dim 300 is not supported on cpu", att, *qkv(device, d=300))
    else:
        raises(r"^q: head dim 96 is not supported on cuda", att, *qkv(device, d=96))
        raises(r"^q: dtype torch.float64 is not supported on cuda", att,
               *qkv(device, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_routing_bad_inputs(device):
    q, k, v = qkv(device)
    raises(r"^lam: expected L = 2 or 3", torch.ops.mka.fastmka, q, k, v, lam(device, L=4), 0.9)
    raises(r"^lam: expected shape \(B, Tk, L\)", torch.ops.mka.fastmka, q, k, v,
           lam(device, T=5), 0.9)
    raises(r"^lam: expected shape \(B, Tq, L\)", torch.ops.mka.mka, q[:, :3], k, v,
           lam(device), 0.9)
    for beta in (-0.1, 1.0, 1.5, float("nan")):
        raises(r"^beta: must be a float in \[0, 1\)", torch.ops.mka.route_fuse, k, v,
               lam(device), beta)
    raises(r"^k3: required when lam has L = 3", torch.ops.mka.route_fuse, k, v,
           lam(device, L=3), 0.9)
    raises(r"^k3: given, but lam has L = 2", torch.ops.mka.fastmka, q, k, v, lam(device), 0.9,
           k, v)
    raises(r"^mem_k: required when lam has L = 3", torch.ops.mka.mka, q, k, v,
           lam(device, L=3), 0.9)
    raises(r"^mem_k: expected shape \(B, M, G, d\)", torch.ops.mka.mka, q, k, v,
           lam(device, L=3), 0.9, k[:, :, :1], v[:, :, :1])
    raises(r"^k_state: expected shape \(B, G, d\)", torch.ops.mka.route_fuse, k, v,
           lam(device), 0.9, k_state=torch.zeros(2, 3, 64, device=device))
    raises(r"^k_state: dtype torch.float64 must be torch.float32", torch.ops.mka.route_fuse,
           k, v, lam(device), 0.9, k_state=torch.zeros(2, 2, 64, device=device,
                                                       dtype=torch.float64))
    raises(r"^lam: dtype torch.float64 must be float32", torch.ops.mka.route_fuse, k, v,
           lam(device).double(), 0.9)


def test_native_layer_validates_too():
    """Called directly, the native module raises ValueError instead of crashing."""
    q, k, v = qkv("cpu")
    out = torch.empty_like(q)
    lse = torch.empty(2, 4, 8)
    with pytest.raises(ValueError, match="H = 4 must be a multiple"):
        mka._C.attention_forward(q=q, k=k[:, :, :1].expand(2, 8, 3, 64).contiguous(),
                                 v=v[:, :, :1].expand(2, 8, 3, 64).contiguous(), out=out,
                                 lse=lse)
    with pytest.raises(ValueError, match="lse"):
        mka._C.attention_forward(q=q, k=k, v=v, out=out, lse=torch.empty(2, 4, 7))
    with pytest.raises(ValueError, match="beta"):
        mka._C.route_fuse_forward(k=k, v=v, lam=lam("cpu"), beta=1.0, k_fused=torch.empty_like(k),
                                  v_fused=torch.empty_like(v), k_state_out=torch.empty(2, 2, 64),
                                  v_state_out=torch.empty(2, 2, 64))


def test_native_arguments_by_name():
    """The native ops take their descriptor's fields by name: a misspelt or unknown name, a
    wrong type or an unknown kernel choice raises naming it (nothing is silently dropped)."""
    q, k, v = qkv("cpu")
    ok = dict(q=q, k=k, v=v, out=torch.empty_like(q), lse=torch.empty(2, 4, 8))
    mka._C.attention_forward(**ok)
    raises("attention_forward: unexpected argument 'widnow'", mka._C.attention_forward, **ok,
           widnow=4)
    raises("attention_forward: causal: expected a bool", mka._C.attention_forward, **ok,
           causal="yes")
    raises("attention_forward: attention_kernel: expected one of pingpong, lockstep, mma, tma, got "
           "'flash'", mka._C.attention_forward, **ok, attention_kernel="flash")
    raises("attention_forward: q: expected an array", mka._C.attention_forward,
           **{**ok, "q": [1.0]})
    with pytest.raises(TypeError):
        mka._C.attention_forward(q, k, v)  # keywords only


@pytest.mark.parametrize("device", DEVICES)
def test_native_saved_keys_are_validated(device):
    """The buffers a forward keeps for its backward (fastmka's fused keys and scan carries,
    mka's EMA keys, mka's float32 levels) are checked like any output."""
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = qkv(device, dtype=dt)
    B, T, G, d = k.shape
    out, lse = torch.empty_like(q), torch.empty(2, 4, 8, device=device)
    st = lambda: torch.empty(B, G, d, device=device)  # noqa: E731
    n = mka._C.fastmka_carry_numel(B, T, G, d, device == "cuda", "1pass")
    carry = torch.empty(n, device=device)
    lm = lam(device, dtype=torch.float32 if device == "cuda" else dt)

    def fastmka(kf, vf, c):
        mka._C.fastmka_forward(q=q, k=k, v=v, lam=lm, beta=0.9, out=out, lse=lse,
                               k_state_out=st(), v_state_out=st(), saved_k=kf, saved_v=vf,
                               saved_carry=c)

    raises(r"^saved k: expected shape", fastmka, k[:, :4].clone(), torch.empty_like(v), carry)
    raises(r"saved keys and values go together", fastmka, torch.empty_like(k), None, carry)
    raises(r"saved carry without saved keys", fastmka, None, None, torch.empty(4, device=device))
    if device == "cuda":
        raises(r"saved carry must be a contiguous float32 buffer of \d+ elements", fastmka,
               torch.empty_like(k), torch.empty_like(v), carry[:-1])
    else:
        raises(r"unexpected saved carry", fastmka, torch.empty_like(k), torch.empty_like(v),
               torch.empty(4))
    o_levels = torch.empty(2, *q.shape, device=device, dtype=torch.float16)  # not float32
    raises(r"^o_levels", mka._C.mka_forward, q=q, k=k, v=v, lam=lm, beta=0.9, out=out,
           o_levels=o_levels, lse_levels=torch.empty(2, 2, 4, 8, device=device),
           k_state_out=st(), v_state_out=st())


def test_fastmka_carry_follows_the_scan_choice():
    # The scan chosen sizes fastmka's saved carry (its chunk), so the forward and the backward
    # must agree on it: both take it from the op's saved kernel token.
    sizes = {s: mka._C.fastmka_carry_numel(1, 4096, 2, 64, True, s) for s in ("1pass", "3pass")}
    assert all(n > 0 for n in sizes.values())
    assert mka._C.fastmka_carry_numel(1, 4096, 2, 64, False, "1pass") == 0
    raises("scan: expected one of 1pass, 3pass, got .2pass.", mka._C.fastmka_carry_numel,
           1, 64, 2, 64, True, "2pass")


def test_non_tensor_inputs_raise_briefly():
    """A numpy array or a wrongly typed option raises a one-line ValueError naming the
    argument (the mka.* functions; torch.ops.mka.* first runs PyTorch's own schema check)."""
    import numpy as np
    q, k, v = qkv("cpu")
    big = np.zeros((1, 4096, 4, 64), "f4")
    with pytest.raises(ValueError, match="^q: expected a tensor") as e:
        mka.attention(big, k, v)
    assert len(str(e.value)) < 120
    raises("^scale:", mka.attention, q, k, v, True, "x")
    raises("^window:", mka.attention, q, k, v, True, None, 2.5)
