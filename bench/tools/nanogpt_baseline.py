"""nanoGPT's GPT and training loop, rewritten from scratch with SDPA: the baseline that
`mka train` is timed against (bench/tools/train_vs_baseline.py runs both).

Not nanoGPT's code (the project does not vendor it) but its model.py and train.py as the
Shakespeare-char recipe uses them: pre-LayerNorm blocks (biases optional, off in the recipe),
learned positions, tied embeddings, a 4x GELU MLP, causal attention through
``F.scaled_dot_product_attention(is_causal=True)`` with dropout in training, embedding and
residual dropout, N(0, 0.02) init with the residual projections scaled by 1/sqrt(2 n_layer);
AdamW (fused on CUDA, weight decay on matrices only), linear warm-up and cosine decay,
gradient clipping, bf16 autocast on CUDA, optional torch.compile, random windows of a uint16
token array, the next batch fetched while the device runs the step, ``loss.item()`` only at
log steps. TF32 stays at torch's default (nanoGPT's train.py turns it on): the switch is
process-wide and must be the same for every row of train_vs_baseline.py; under bf16 autocast
the matmuls run in bf16 either way.

The data is `mka train`'s: its corpus split and character vocabulary (mka.train.corpus and
text_tokenizers), so both read the same ids; the held-out loss is taken over the same
consecutive held-out blocks and batches as `mka train`'s final evaluation
(mka.train.blocks). Training batches differ: random windows here (nanoGPT's), shuffled tiled
blocks there; both are uniform over the training split.

tokens/s is measured as `mka train` measures it: wall time from the start of step
``timing_warmup`` to the end of the last step, with the device synchronized at both ends;
tokens = timed steps x batch x block; evaluation is outside it.

    python bench/tools/nanogpt_baseline.py --data data/tinyshakespeare/input.txt --steps 200
    python bench/tools/nanogpt_baseline.py --data data/tinyshakespeare/input.txt --steps 5000 --eval-interval 250
(the second: nanoGPT's whole recipe, with the best held-out loss of the evaluations, as
nanoGPT keeps its best checkpoint)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Recipe:
    """nanoGPT's config/train_shakespeare_char.py (and train.py's defaults it keeps)."""
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    batch_size: int = 64
    dropout: float = 0.2
    bias: bool = False
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100      # of the learning rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    steps: int = 200             # the cosine decay ends here, as `mka train`'s does by default
    timing_warmup: int = 20      # steps left out of tokens/s (compilation, allocator warm-up)
    log_interval: int = 10       # loss.item() (a host sync) every this many steps
    eval_interval: int = 0       # held-out loss every this many steps too (0: at the end only)
    holdout_fraction: float = 0.1
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"      # auto: bf16 on CUDA, fp32 on CPU (nanoGPT's choice)
    compile: bool = False
    compile_backend: str = "inductor"

    def check(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.eval_interval < 0:
            raise ValueError(f"eval_interval: must be >= 0, got {self.eval_interval}")
        if not 0 <= self.timing_warmup < self.steps:
            raise ValueError(f"timing_warmup {self.timing_warmup}: must be >= 0 and below steps "
                             f"{self.steps}, or no step is timed")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr {self.min_lr}: must be in [0, lr {self.lr}]")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision: expected auto, fp32, bf16 or fp16, got {self.precision!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA device is visible to torch")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        return torch.device(self.device)

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return self.precision


# ---------------------------------------------------------------------------- the model

class SelfAttention(nn.Module):
    def __init__(self, r: Recipe):
        super().__init__()
        self.n_head, self.dropout = r.n_head, r.dropout
        self.c_attn = nn.Linear(r.n_embd, 3 * r.n_embd, bias=r.bias)   # q, k, v in one matmul
        self.c_proj = nn.Linear(r.n_embd, r.n_embd, bias=r.bias)
        self.resid_dropout = nn.Dropout(r.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, d): SDPA's layout
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    def __init__(self, r: Recipe):
        super().__init__()
        self.c_fc = nn.Linear(r.n_embd, 4 * r.n_embd, bias=r.bias)
        self.c_proj = nn.Linear(4 * r.n_embd, r.n_embd, bias=r.bias)
        self.dropout = nn.Dropout(r.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Layer(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, r: Recipe):
        super().__init__()
        self.ln_1 = nn.LayerNorm(r.n_embd, bias=r.bias)
        self.attn = SelfAttention(r)
        self.ln_2 = nn.LayerNorm(r.n_embd, bias=r.bias)
        self.mlp = FeedForward(r)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class BaselineGPT(nn.Module):
    def __init__(self, r: Recipe, vocab_size: int):
        super().__init__()
        self.block_size = r.block_size
        self.wte = nn.Embedding(vocab_size, r.n_embd)
        self.wpe = nn.Embedding(r.block_size, r.n_embd)
        self.drop = nn.Dropout(r.dropout)
        self.layers = nn.ModuleList(Layer(r) for _ in range(r.n_layer))
        self.ln_f = nn.LayerNorm(r.n_embd, bias=r.bias)
        self.lm_head = nn.Linear(r.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight      # one matrix embeds and un-embeds
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # GPT-2: each residual branch's last projection smaller, so the stream's variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * r.n_layer))

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for layer in self.layers:
            x = layer(x)
        x = self.ln_f(x)
        if targets is None:  # generation needs the last position only
            return self.lm_head(x[:, -1:]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# ---------------------------------------------------------------------------- data

@dataclass
class CharData:
    train: np.ndarray      # uint16 ids, as nanoGPT's train.bin
    heldout: np.ndarray
    vocab_size: int


def load_char_data(path: str, holdout_fraction: float) -> CharData:
    """`mka train --tokenizer char --holdout-fraction f` ids of ``path`` (a file: the last f
    of its characters held out; a folder: its train/valid files): mka's own corpus split and
    vocabulary, so both sides read the same ids."""
    from mka.train.corpus import load_corpus
    from mka.train.text_tokenizers import CharTokenizer
    corpus = load_corpus(path, "train", "valid", holdout_fraction)
    tok = CharTokenizer(corpus.train, corpus.heldout)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    return CharData(tok.encode(corpus.train).astype(dtype), tok.encode(corpus.heldout).astype(dtype),
                    tok.vocab_size)


def check_data(r: Recipe, data: CharData) -> None:
    if len(data.train) <= r.block_size:
        raise ValueError(f"the training split has {len(data.train)} tokens: no window of block_size {r.block_size}")
    if len(data.heldout) < 2:
        raise ValueError(f"the held-out split has {len(data.heldout)} tokens: nothing to evaluate")


def random_batch(ids: np.ndarray, r: Recipe, device: torch.device, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """nanoGPT's get_batch: batch_size windows at uniform random offsets."""
    starts = torch.randint(len(ids) - r.block_size, (r.batch_size,), generator=gen).tolist()
    x = torch.from_numpy(np.stack([ids[i:i + r.block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([ids[i + 1:i + 1 + r.block_size] for i in starts]).astype(np.int64))
    if device.type == "cuda":  # pinned: the copy runs while the device works on the last step
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


# ---------------------------------------------------------------------------- training

def lr_at(step: int, r: Recipe) -> float:
    """nanoGPT's get_lr: linear warm-up, cosine down to min_lr at the last step."""
    if step < r.warmup_steps:
        return r.lr * (step + 1) / (r.warmup_steps + 1)
    if step >= r.steps:
        return r.min_lr
    progress = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (r.lr - r.min_lr)


def make_optimizer(model: nn.Module, r: Recipe, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases, norms
    return torch.optim.AdamW(groups, lr=r.lr, betas=(r.beta1, r.beta2), fused=device.type == "cuda")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def heldout_loss(model: nn.Module, heldout: np.ndarray, r: Recipe, device: torch.device, precision: str) -> float:
    """Token-weighted mean loss over `mka train`'s final-evaluation batches: consecutive
    blocks covering the held-out ids, every held-out token predicted once."""
    from mka.train.blocks import heldout_batches, heldout_blocks
    total = count = 0.0
    model.eval()
    for rows in heldout_batches(heldout_blocks(heldout, r.block_size), r.batch_size):
        a = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        with torch.no_grad(), autocast(device, precision):
            _, loss = model(a[:, :-1], a[:, 1:])
        total += float(loss) * a[:, 1:].numel()
        count += a[:, 1:].numel()
    model.train()
    return total / count


def train(r: Recipe, data: CharData) -> dict:
    """Train ``r.steps`` steps; tokens/s of the steps after ``r.timing_warmup`` and the
    held-out loss at the end, and with ``r.eval_interval`` every that many steps too (their
    time left out of tokens/s) and the best of them, as nanoGPT keeps its best checkpoint."""
    r.check()
    check_data(r, data)
    device = r.resolved_device()
    precision = r.resolved_precision(device)
    torch.manual_seed(r.seed)
    model = BaselineGPT(r, data.vocab_size).to(device)
    optimizer = make_optimizer(model, r, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step_model = torch.compile(model, backend=r.compile_backend) if r.compile else model
    gen = torch.Generator().manual_seed(r.seed)
    x, y = random_batch(data.train, r, device, gen)
    t0, last_loss, eval_seconds, curve = None, math.nan, 0.0, []
    for step in range(r.steps):
        if step == r.timing_warmup:
            sync(device)
            t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, r)
        with autocast(device, precision):
            _, loss = step_model(x, y)
        x, y = random_batch(data.train, r, device, gen)  # the host works while the device runs
        scaler.scale(loss).backward()
        if r.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % r.log_interval == 0 or step + 1 == r.steps:
            last_loss = loss.item()  # the only host sync of a step, as in nanoGPT
        if r.eval_interval and (step + 1) % r.eval_interval == 0 and step + 1 < r.steps:
            sync(device)
            e0 = time.perf_counter()
            curve.append((step + 1, heldout_loss(step_model, data.heldout, r, device, precision)))
            eval_seconds += time.perf_counter() - e0 if t0 is not None else 0.0
    sync(device)
    seconds = time.perf_counter() - t0 - eval_seconds
    timed_steps = r.steps - r.timing_warmup
    curve.append((r.steps, heldout_loss(step_model, data.heldout, r, device, precision)))
    best_step, best = min(curve, key=lambda c: c[1])
    return {"tokens_per_s": timed_steps * r.batch_size * r.block_size / seconds,
            "timed_seconds": seconds, "timed_steps": timed_steps, "train_loss": last_loss,
            "heldout_loss": curve[-1][1], "best_heldout_loss": best, "best_step": best_step,
            "heldout_curve": curve,
            "device": str(device), "precision": precision, "vocab_size": data.vocab_size,
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------- command line

# what a bare "default X" would leave unclear
FLAG_HELP = {"warmup_steps": "linear warm-up steps of the learning rate",
             "timing_warmup": "steps left out of tokens/s (compilation, allocator warm-up)",
             "log_interval": "read the training loss on the host every N steps",
             "precision": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16",
             "compile_backend": "torch.compile backend of compiled runs",
             "holdout_fraction": "a single file's last fraction is held out"}


def add_recipe_flags(p) -> None:
    """A flag per Recipe field (but compile), defaults from the recipe."""
    for f in fields(Recipe):
        if f.name == "compile":
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f"{FLAG_HELP.get(f.name, '')} (default {f.default})".lstrip()
        if f.type == "bool":  # annotations are strings here (from __future__ import annotations)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=kind, default=f.default, help=text)


def command_parser(doc: str) -> argparse.ArgumentParser:
    """The command line this tool and train_vs_baseline.py share: the docstring as help,
    --data, and the recipe's flags in a group printed after the tool's own."""
    intro, *rest = doc.split("\n\n")
    p = argparse.ArgumentParser(description=intro, epilog="\n\n".join(rest),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a text file (last --holdout-fraction held out) or a "
                   "folder of train/valid files, as `mka train --data`")
    add_recipe_flags(p.add_argument_group("recipe (nanoGPT's Shakespeare-char unless given)"))
    return p


def recipe_from(args: argparse.Namespace, **overrides) -> Recipe:
    values = {f.name: getattr(args, f.name) for f in fields(Recipe) if hasattr(args, f.name)}
    return Recipe(**{**values, **overrides})


def checked_data(p: argparse.ArgumentParser, r: Recipe, path: str) -> CharData:
    """The recipe checked and its data loaded, or the parser's one-line error."""
    try:
        r.check()
        r.resolved_device()
        data = load_char_data(path, r.holdout_fraction)
        check_data(r, data)
    except ValueError as e:  # mka's ConfigError (a bad --data) is a ValueError too
        p.error(str(e))
    return data


def main(argv: Optional[list[str]] = None) -> None:
    p = command_parser(__doc__)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json", help="also write the recipe and results (the held-out curve too) here")
    args = p.parse_args(argv)
    r = recipe_from(args, compile=args.compile)
    out = train(r, checked_data(p, r, args.data))
    print(f"nanoGPT baseline ({'compiled' if r.compile else 'eager'}, {out['device']}, {out['precision']}): "
          f"{out['tokens_per_s']:,.0f} tokens/s over {out['timed_steps']} steps; "
          f"train loss {out['train_loss']:.4f}, held-out loss {out['heldout_loss']:.4f}"
          + (f", best {out['best_heldout_loss']:.4f} (step {out['best_step']})"
             if r.eval_interval else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": asdict(r), **out}, indent=1))


if __name__ == "__main__":
    main()
