"""A GPT-style language model (nanoGPT's shape) whose attention is any ``mka.nn`` variant.

Pre-LayerNorm blocks, learned absolute positions (or rotary ones: ``GPTConfig.rope``), tied
input/output embeddings. With ``caches`` from :meth:`GPT.new_caches`, ``forward`` continues a
sequence: ``generate`` prefills the prompt once and then feeds one token at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import add_layer_norm, apply_linear, plain
from ..memory import LayerCache, PagedKVCache
from ..memory.host_tier import HostTier
from ..nn import ATTENTION_REGISTRY, build_attention, check_attention_config
from ..nn.backends import BACKENDS

LayerMemory = Optional[tuple[Tensor, Tensor]]


@dataclass
class GPTConfig:
    """``attention`` is one of ``mka.nn.ATTENTION_REGISTRY`` ("mha", "mqa", "gqa", "mla",
    "mka", "fastmka"); ``attn_backend`` "mka" (native ops) or "torch" (SDPA); ``attn_options``
    the variant's own options (``mka.nn.attention_options(name)`` lists them: MLA ranks and
    dims, MKA/FastMKA ``levels``, ``beta``, ``window``, ...). ``n_kv_head`` None means
    ``n_head`` (1 for "mqa"). ``rope`` None: a learned position table (nanoGPT's); a base
    (e.g. 10000.0): no table, every layer rotates its queries and keys (RoPE; MLA rotates its
    decoupled dims in either case). ``key_shift``: keys also read the previous token
    (``mka.nn.base.QKVAttention``; not MLA). Validated on construction."""

    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: Optional[int] = None
    block_size: int = 1024
    vocab_size: int = 50304
    dropout: float = 0.0
    bias: bool = True
    attention: str = "mha"
    attn_backend: str = "mka"
    attn_options: dict = field(default_factory=dict)
    rope: Optional[float] = None
    key_shift: bool = False

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.attention not in ATTENTION_REGISTRY:
            raise ValueError(f"attention: unknown variant {self.attention!r}, expected one of "
                             f"{sorted(ATTENTION_REGISTRY)}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend: expected one of {sorted(BACKENDS)}, "
                             f"got {self.attn_backend!r}")
        if not isinstance(self.attn_options, dict):
            raise ValueError(f"attn_options: expected a dict, got {type(self.attn_options).__name__}")
        check_attention_config(self)  # head counts, widths, the variant's options


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = build_attention(config)
        # Inference runs the MLP's linears on mka.layers' kernels on either attention backend,
        # so the attention's projections too: attn_backend changes the attention alone.
        self.attn.native_linears = True
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None,
                memory: LayerMemory = None, *, fused: bool = False,
                pending: Optional[Tensor] = None) -> Tensor:
        """The block's output; with ``fused`` (inference: no dropout, no gradients) the
        residual stream ``x`` is updated in place and the MLP's output is returned *pending*:
        the next block (its ``pending``) or the final norm adds it, fused with its LayerNorm
        (:func:`mka.layers.add_layer_norm`: one kernel where the unfused pair launches two);
        the MLP's linear layers (GELU fused into the first) run :func:`mka.layers.linear`,
        whose kernels stream the weights at decode sizes. A block only reads its own
        parameters either way (sharded training wrappers gather them per block)."""
        if not fused:
            x = x + self.attn(self.ln_1(x), cache=cache, memory=memory)
            return x + self.mlp(self.ln_2(x))
        ln1, ln2, mlp = self.ln_1, self.ln_2, self.mlp
        h = ln1(x) if pending is None else add_layer_norm(pending, x, ln1.weight, ln1.bias, ln1.eps)
        h = add_layer_norm(self.attn(h, cache=cache, memory=memory), x, ln2.weight, ln2.bias,
                           ln2.eps)
        if not plain(mlp, MLP):
            return mlp(h)  # a replaced or observed MLP keeps its behaviour
        return apply_linear(mlp.c_proj, apply_linear(mlp.c_fc, h, "gelu"))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.rope is None else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections
            if name.endswith(("attn.proj.weight", "mlp.c_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_config(cls, config: GPTConfig) -> "GPT":
        return cls(config)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                caches: Optional[Sequence[LayerCache]] = None,
                memory: Optional[Sequence[LayerMemory]] = None) -> tuple[Tensor, Optional[Tensor]]:
        """``idx: (B, T)`` token ids -> ``(logits (B, T, vocab), loss)``; ``loss`` is the mean
        cross-entropy over targets != -1 (None without targets). With ``caches`` (one per
        layer: a :class:`~mka.memory.PagedKVCache` from :meth:`new_caches`) ``idx`` continues
        the cached sequences, each from its own length. ``memory``: per-layer level-3 memory
        ``(mem_k, mem_v)`` or None, for MKA/FastMKA with ``levels=3``."""
        B, T = self._check_forward(idx, caches, memory)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(self._positions(T, idx.device, caches))
        x = self.drop(x)
        if self.training or torch.is_grad_enabled() or not self._norms_plain():
            for i, block in enumerate(self.blocks):
                x = block(x, None if caches is None else caches[i],
                          None if memory is None else memory[i])
            h = self.ln_f(x)
            logits = self.lm_head(h)
        else:
            logits = apply_linear(self.lm_head, self._fused_blocks(x, caches, memory))
        if isinstance(caches, PagedKVCache) and caches.static:
            caches.advance(T)  # a static cache's lengths move after the whole step
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T),
                                   ignore_index=-1)
        return logits, loss

    @staticmethod
    def _positions(T: int, device: torch.device, caches) -> Tensor:
        """The position table's rows of this forward's tokens: from 0, or after each
        sequence's cached tokens."""
        pos = torch.arange(T, device=device)
        if caches is None:
            return pos
        starts = caches[0].positions
        if isinstance(starts, Tensor):  # a static cache: positions on the device
            return starts.to(torch.long)[:, None] + pos
        if len(set(starts)) == 1:
            return pos + starts[0]
        return torch.tensor(starts, device=device)[:, None] + pos  # per sequence

    def _norms_plain(self) -> bool:
        """The fused path reads the LayerNorms' parameters: only where each is a plain
        ``nn.LayerNorm`` (not replaced, not observed by hooks)."""
        norms = [self.ln_f] + [n for b in self.blocks for n in (b.ln_1, b.ln_2)]
        return all(plain(n, nn.LayerNorm) for n in norms)

    def _fused_blocks(self, x: Tensor, caches, memory) -> Tensor:
        """The blocks and the final norm for inference (``Block.forward(fused=True)``): ``x``
        (this forward's own embedding sum) is the residual stream, updated in place; returns
        ``ln_f`` of the last block's output."""
        pending = None
        for i, block in enumerate(self.blocks):
            pending = block(x, None if caches is None else caches[i],
                            None if memory is None else memory[i], fused=True, pending=pending)
        if pending is None:
            return self.ln_f(x)
        return add_layer_norm(pending, x, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)

    def _check_forward(self, idx: Tensor, caches, memory) -> tuple[int, int]:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx: expected token ids (B, T) of dtype long, got "
                             f"{tuple(idx.shape)} {idx.dtype}")
        n_layer = self.config.n_layer
        if caches is not None and len(caches) != n_layer:
            raise ValueError(f"caches: expected one per layer ({n_layer}), got {len(caches)}")
        if memory is not None and len(memory) != n_layer:
            raise ValueError(f"memory: expected one entry per layer ({n_layer}), got {len(memory)}")
        end = idx.shape[1] + (0 if caches is None else max(caches[0].lengths))
        if caches is not None and caches[0].static and not isinstance(caches, PagedKVCache):
            raise ValueError("caches: a static cache is driven by the model: pass the "
                             "PagedKVCache itself, not a list of its layers")
        if end > self.config.block_size:
            raise ValueError(f"idx: the sequence reaches position {end}, beyond block_size "
                             f"{self.config.block_size}")
        return idx.shape[0], idx.shape[1]

    # ------------------------------------------------------------------ decoding

    def new_caches(self, batch_size: int, device: Optional[torch.device] = None,
                   dtype: Optional[torch.dtype] = None, *, page_size: int = 16,
                   num_pages: Optional[int] = None,
                   host: Optional[HostTier] = None) -> PagedKVCache:
        """One paged KV cache for every layer (``caches[i]`` is layer ``i``'s), sequences of up
        to ``block_size`` tokens. Device defaults to the model's; dtype to the autocast dtype
        when autocast is on there (what the keys will be), else the model's. ``host``: the
        DRAM tier (SPEC §7.3; MKA layers with a window, ``ema_stride > 1`` and recall)."""
        p = self.wte.weight
        device = p.device if device is None else torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else p.dtype
        return PagedKVCache([b.attn.cache_spec() for b in self.blocks], batch_size,
                            max_tokens=self.config.block_size, page_size=page_size,
                            num_pages=num_pages, device=device, dtype=dtype, host=host)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, greedy: bool = False,
                 host: Optional[HostTier] = None, cuda_graph: bool = False):
        """Appends ``max_new_tokens`` tokens to each prompt: ``idx`` is ``(B, T)`` or a list of
        1-d prompts of different lengths (then a list comes back). Prompts are prefilled into
        one paged cache (batched when they are as long, else one at a time), then every step
        decodes one token for all sequences at once, each at its own position. Past
        ``block_size`` the context slides as in nanoGPT: learned positions end at
        ``block_size``, so each step refills the caches from the last ``block_size`` tokens.
        ``host``: keep chunks outside the attention window in host memory (SPEC §7.3);
        prompts are then prefilled in steps of ``host.step_tokens``. ``cuda_graph``: decode
        steps replay one captured CUDA graph (:class:`~mka.models.decode_graph.DecodeGraph`;
        CUDA, the native backend, no DRAM tier) until the context slides."""
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature: must be > 0 when sampling, got {temperature!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: must be at least 1, got {top_k!r}")
        ragged = isinstance(idx, (list, tuple))
        seqs = [torch.as_tensor(p).view(-1) for p in idx] if ragged else list(idx)
        if not seqs or any(p.numel() == 0 for p in seqs):
            raise ValueError("idx: every prompt needs at least one token")
        if cuda_graph and host is not None:
            raise ValueError("cuda_graph: the DRAM tier's host work per step cannot be captured")
        new = torch.empty(len(seqs), 0, dtype=torch.long, device=seqs[0].device)
        caches, logits = self._prefill(seqs, host)
        graph = None
        if cuda_graph and max_new_tokens > 1:
            from .decode_graph import DecodeGraph
            longest = max(caches[0].lengths)
            graph = DecodeGraph(self, caches, min(self.config.block_size,
                                                  longest + max_new_tokens - 1))
        for step in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_k, greedy)
            new = torch.cat((new, nxt), dim=1)
            if step == max_new_tokens - 1:
                break
            if graph is not None and not graph.room():
                graph = None  # the static capacity is reached: the context slides as below
            if graph is not None:
                logits = graph.step(nxt)
            elif max(caches[0].lengths) < self.config.block_size:
                logits = self(nxt, caches=caches)[0][:, -1]
            else:
                caches, logits = self._prefill([torch.cat((p, n)) for p, n in zip(seqs, new)],
                                               host)
        if ragged:
            return [torch.cat((p, n)) for p, n in zip(seqs, new)]
        return torch.cat((idx, new), dim=1)

    def _prefill(self, seqs: list[Tensor],
                 host: Optional[HostTier] = None) -> tuple[PagedKVCache, Tensor]:
        """A fresh cache holding the last ``block_size`` tokens of each sequence, and each
        sequence's logits after its last token ``(B, vocab)``."""
        block = self.config.block_size
        seqs = [p[-block:] for p in seqs]
        caches = self.new_caches(len(seqs), host=host)
        step = block if host is None else host.step_tokens

        def run(x: Tensor, cache: PagedKVCache) -> Tensor:  # in steps the cache takes
            for i in range(0, x.shape[1], step):
                logits = self(x[:, i:i + step], caches=cache)[0]
            return logits[:, -1]

        if len({p.numel() for p in seqs}) == 1:
            return caches, run(torch.stack(seqs), caches)
        last = []
        for b, p in enumerate(seqs):
            with caches.select([b]) as one:
                last.append(run(p[None], one))
        return caches, torch.cat(last)

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: Optional[int], greedy: bool) -> Tensor:
        if greedy:
            return logits.argmax(-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), num_samples=1)

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied embeddings counted once); without the position table by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes one more token adds, summed over layers, per sequence."""
        return sum(b.attn.cache_bytes_per_token(dtype) for b in self.blocks)

    def kv_cache_state_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Per-sequence cache bytes beside the pages, summed over layers: EMA states, and the
        chunk signatures or summaries of a sequence of ``block_size`` tokens (what
        :meth:`new_caches` holds)."""
        return sum(b.attn.cache_state_bytes(dtype, self.config.block_size) for b in self.blocks)
