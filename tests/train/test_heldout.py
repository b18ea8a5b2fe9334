"""Held-out evaluation: never training data, token-weighted, near-uniform before training."""

import math

import numpy as np
import torch
import pytest

from mka.train import main
from mka.train.blocks import TrainSampler, heldout_blocks
from mka.train.corpus import load_corpus
from mka.train.text_tokenizers import build_tokenizer

from .train_cases import results

CPU = torch.device("cpu")


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe:300"])
def test_untrained_perplexity_is_near_vocabulary_size(corpus_file, run_args, tmp_path, tokenizer):
    assert main(run_args(corpus_file, "--max-steps", 0, "--tokenizer", tokenizer)) == 0
    (r,) = results(tmp_path / "out")
    vocab = 256 if tokenizer == "bytes" else 300
    assert abs(r["heldout_ppl"] - vocab) < 0.3 * vocab, r["heldout_ppl"]


def _windows(tokens: np.ndarray, n: int) -> set:
    return {tokens[i:i + n].tobytes() for i in range(len(tokens) - n + 1)}


@pytest.mark.parametrize("source", ["file", "folder"])
def test_heldout_shares_no_block_with_training(corpus_file, corpus_folder, tmp_path, source):
    data = corpus_file if source == "file" else corpus_folder
    corpus = load_corpus(str(data), "train", "valid", 0.1)
    if source == "file":  # a deterministic cut: leading part trains, the rest is held out
        assert corpus.train + corpus.heldout == corpus_file.read_text()
        assert len(corpus.heldout) == len(corpus_file.read_text()) - int(0.9 * len(corpus_file.read_text()))
    tok = build_tokenizer("bytes", corpus.train, corpus.heldout, tmp_path)
    train, heldout = tok.encode(corpus.train).astype(np.uint16), tok.encode(corpus.heldout).astype(np.uint16)
    T = 32
    sampler = TrainSampler(train, T, batch_size=4, grad_accum=1, world=1, seed=0)
    seen = set()
    for step in range(3 * sampler.steps_per_epoch):  # three epochs: three block offsets
        seen |= {bytes(row) for row in np.asarray(sampler.micro_batch(step, 0, 0, CPU).x, dtype=np.uint16)}
    assert len(seen) > 2 * sampler.blocks_per_epoch
    held = [b[:T].astype(np.uint16).tobytes() for b in heldout_blocks(heldout, T) if len(b) == T + 1]
    assert held and not (set(held) & seen)
    # stronger: no held-out block occurs anywhere in the training ids
    assert not (set(held) & _windows(train, T))


def test_heldout_blocks_cover_every_target_once():
    tokens = np.arange(1000) % 251
    blocks = heldout_blocks(tokens, 32)
    assert sum(len(b) - 1 for b in blocks) == 999
    targets = np.concatenate([b[1:] for b in blocks])
    assert np.array_equal(targets, tokens[1:])
    assert sum(len(b) - 1 for b in heldout_blocks(tokens, 32, max_tokens=100)) == 100


def test_global_batch_is_the_same_for_any_split_of_it():
    """1 process x batch 8 == 1 x batch 4 x accum 2 == 2 processes x batch 4: the same blocks."""
    tokens = np.arange(5000) % 65000
    def blocks(B, accum, world, step):
        s = TrainSampler(tokens, 16, B, accum, world, seed=5)
        return sorted(tuple(row.tolist()) for m in range(accum) for r in range(world)
                      for row in s.micro_batch(step, m, r, CPU).x)
    for step in (0, 7, 40):
        assert blocks(8, 1, 1, step) == blocks(4, 2, 1, step) == blocks(4, 1, 2, step) == blocks(2, 2, 2, step)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_leave_from_contiguous_pinned_memory():
    """The inputs and targets are strided views of one array; each is copied into contiguous
    page-locked memory before its transfer (a strided source would go through pageable memory)."""
    from mka.train.blocks import pinned
    a = torch.arange(4 * 9).view(4, 9)
    for view in (a[:, :-1], a[:, 1:]):
        p = pinned(view)
        assert p.is_pinned() and p.is_contiguous() and torch.equal(p, view)
    s = TrainSampler(np.arange(5000) % 65000, 16, 4, 1, 1, seed=5)
    cpu, cuda = s.micro_batch(3, 0, 0, CPU), s.micro_batch(3, 0, 0, torch.device("cuda"))
    assert torch.equal(cuda.x.cpu(), cpu.x) and torch.equal(cuda.y.cpu(), cpu.y)


def test_token_weighted_mean_includes_the_short_tail(corpus_file, run_args, tmp_path):
    """Final held-out loss equals a hand-computed token-weighted mean over all held-out blocks."""
    from mka.models import GPT, GPTConfig
    assert main(run_args(corpus_file, "--max-steps", 0)) == 0
    (r,) = results(tmp_path / "out")
    corpus = load_corpus(str(corpus_file), "train", "valid", 0.1)
    ids = np.frombuffer(corpus.heldout.encode(), dtype=np.uint8).astype(np.int64)
    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=256)).eval()
    total = 0.0
    with torch.no_grad():
        for b in heldout_blocks(ids, 32):
            t = torch.from_numpy(b)[None]
            logits, _ = model(t[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0].double(), t[0, 1:], reduction="sum").item()
    assert math.isclose(r["heldout_loss"], total / (len(ids) - 1), rel_tol=1e-5)


def test_evaluation_stops_when_asked():
    from mka.models import GPT, GPTConfig
    from mka.train.distributed import Runtime
    from mka.train.evaluation import heldout_loss
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=256))
    blocks = heldout_blocks(np.arange(500) % 256, 16)
    calls = []
    def asked():
        calls.append(1)
        return len(calls) > 3
    assert heldout_loss(model, blocks, 4, Runtime(CPU), "fp32", asked) is None and len(calls) == 4
    assert model.training  # left as it was found
    ev = heldout_loss(model, blocks, 4, Runtime(CPU), "fp32", lambda: False)
    assert ev["tokens"] == 499 and math.isfinite(ev["loss"])
