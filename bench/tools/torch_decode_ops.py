"""Host cost per call (µs; calls back to back, 400 per timing, median of 5) of the torch
backend's decode ops at GPT-2-small shape (B 1, H = G = 12, d 64, 1152 cached tokens in pages
of 16, bf16) and their alternatives: where the torch backend's decode step spends its host
time (CUDA). ``python bench/tools/torch_decode_ops.py``"""
import time, statistics, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
dev, dt = "cuda", torch.bfloat16
B, H, G, d, S, n = 1, 12, 12, 64, 16, 1152
P = 256
kp = torch.randn(P, S, G, d, device=dev, dtype=dt); vp = torch.randn_like(kp)
table = torch.randperm(P, device=dev)[: n // S].int()[None].expand(B, -1).contiguous()
page = torch.tensor([[5]], device=dev); slot = torch.tensor([[3]], device=dev)
flat1 = (page * S + slot).flatten()
k = torch.randn(B, 1, G, d, device=dev, dtype=dt)
q = torch.randn(B, 1, H, d, device=dev, dtype=dt)
idx = table.long()
tok = (idx[:, :, None] * S + torch.arange(S, device=dev)).flatten()
drop = torch.zeros(B, n, 1, 1, dtype=torch.bool, device=dev)
mask = torch.zeros(B, 1, 1, n, dtype=dt, device=dev)
K = kp[idx].flatten(1, 2); V = vp[idx].flatten(1, 2)
qt, kt, vt = q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2)
def t(fn, reps=400):
    for _ in range(20): fn()
    torch.cuda.synchronize()
    r = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps): fn()
        torch.cuda.synchronize(); r.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(r)
kv = kp.view(-1, G, d)
def _eff():
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
rows = {
 "index_put_ (page, slot)": lambda: kp.__setitem__((page, slot), k),
 "index_copy_ flat": lambda: kv.index_copy_(0, flat1, k.view(-1, G, d)),
 "gather pages[idx].flatten[:n]": lambda: kp[idx].flatten(1, 2)[:, :n],
 "index_select flat": lambda: kv.index_select(0, tok).view(B, n, G, d),
 "masked_fill_": lambda: K.masked_fill_(drop, 0.0),
 "sdpa mask (default pick)": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
 "sdpa mask efficient (ctx)": lambda: _eff(),
 "sdpa no mask (flash)": lambda: F.scaled_dot_product_attention(qt, kt, vt),
 "aten flash direct": lambda: torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt),
 "empty launch (add_)": lambda: K.add_(0),
}
for name, fn in rows.items():
    try:
        print(f"{name:34s} {t(fn):7.1f} us", flush=True)
    except Exception as e:
        print(f"{name:34s} failed: {str(e)[:80]}", flush=True)
