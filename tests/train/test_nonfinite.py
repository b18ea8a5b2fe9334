"""A NaN or infinite training loss or gradient norm stops the run with a message naming the
step and the quantity (--on-nonfinite stop, the default) or skips that step's update (skip);
no checkpoint ever holds non-finite weights."""

import math

import pytest
import torch

from mka.models import GPT
from mka.train import checkpoint, main
from mka.train import distributed as D
from mka.train.checkpoint import checkpoint_files, read
from mka.train.loop import defers_nonfinite_checks  # before the fixture replaces it

from .train_cases import results


class _NanGrad(torch.autograd.Function):
    """The identity forward, NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


@pytest.fixture
def inject(monkeypatch):
    """inject(kind, steps): the training loss ('loss') or the gradients ('grad') of the given
    1-based steps are NaN; 'eval' makes held-out losses NaN. One forward per step here."""
    def arm(kind, steps=()):
        real, calls = GPT.forward, [0]

        def forward(self, idx, targets=None, *args, **kwargs):
            logits, loss = real(self, idx, targets, *args, **kwargs)
            if self.training:
                calls[0] += 1
                if calls[0] in steps:
                    loss = loss * math.nan if kind == "loss" else _NanGrad.apply(loss)
            elif kind == "eval":
                loss = loss * math.nan
            return logits, loss
        monkeypatch.setattr(GPT, "forward", forward)
    return arm


@pytest.fixture(autouse=True, params=["host", "device"])
def where_checked(request, monkeypatch):
    """Every test in both modes: each step checked on the host before its update, and (a
    single CUDA process's) checks on the device read with the loss records, the update of a
    non-finite step skipped by the fused AdamW — forced here on the CPU."""
    if request.param == "device":
        from mka.train import loop
        from mka.train.schedule import lr_at
        real = loop.make_optimizer

        def fused(model, settings, device, total_steps):
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                      for g in real(model, settings, device, total_steps)[0].param_groups]
            opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                    fused=True)
            return opt, torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_at(s, settings, total_steps) / settings.lr)
        monkeypatch.setattr(loop, "make_optimizer", fused)
        monkeypatch.setattr(loop, "defers_nonfinite_checks", lambda *a: True)
    return request.param


def test_only_a_single_cuda_process_with_the_fused_adamw_defers():
    from types import SimpleNamespace
    p = [torch.nn.Parameter(torch.ones(2))]
    fused, plain = torch.optim.AdamW(p, fused=True), torch.optim.AdamW(p)
    off, on = torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=True)
    cuda = SimpleNamespace(device=torch.device("cuda"), distributed=False)
    assert defers_nonfinite_checks(cuda, fused, off, None)
    assert not defers_nonfinite_checks(cuda, plain, off, None)
    assert not defers_nonfinite_checks(cuda, fused, on, None)  # fp16: the GradScaler skips
    assert not defers_nonfinite_checks(SimpleNamespace(device=torch.device("cuda"), distributed=True),
                                       fused, off, None)
    assert not defers_nonfinite_checks(SimpleNamespace(device=torch.device("cpu"), distributed=False),
                                       fused, off, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_flags_name_exactly_the_nan_and_infinite_values(dtype):
    from mka.train.loop import VariantRun
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.5, -2.0, info.max, -info.max, info.tiny, math.inf, -math.inf, math.nan]
    for a in values:
        for b in values + [None]:
            loss, norm = torch.tensor(a, dtype=dtype), None if b is None else torch.tensor(b, dtype=dtype)
            flags = VariantRun._nonfinite_flags(loss, norm)
            assert flags.dtype == torch.float32 and flags.shape == (2,)
            assert flags.tolist() == [float(not math.isfinite(a)), float(b is not None and not math.isfinite(b))]


def _weights_finite(path):
    return checkpoint.first_nonfinite(read(path)["model"]) is None


def test_nan_loss_stops_without_a_checkpoint_of_it(corpus_file, run_args, tmp_path, capsys, inject):
    inject("loss", {4})
    assert main(run_args(corpus_file, "--max-steps", 8, "--checkpoint-interval", 1)) == 1
    err = capsys.readouterr().err
    folder = tmp_path / "out" / "mha"
    assert "mka train: error: [mha] step 4: the training loss and the gradient norm are not finite" in err, err
    assert f"the newest checkpoint is {folder / 'checkpoint-00000003.pt'}" in err
    assert "--resume --on-nonfinite skip" in err and "Traceback" not in err
    assert [s for s, _ in checkpoint_files(folder)] == [3, 2]
    assert all(_weights_finite(p) for _, p in checkpoint_files(folder))


@pytest.mark.parametrize("clip", ["1.0", "0"])  # the norm from clipping, and computed without it
def test_nan_gradient_alone_stops(corpus_file, run_args, capsys, inject, clip):
    inject("grad", {2})
    assert main(run_args(corpus_file, "--max-steps", 5, "--grad-clip", clip)) == 1
    assert "[mha] step 2: the gradient norm is not finite" in capsys.readouterr().err


def test_skip_leaves_the_step_out_and_trains_on(corpus_file, run_args, tmp_path, capsys, inject):
    inject("loss", {3})
    assert main(run_args(corpus_file, "--max-steps", 6, "--on-nonfinite", "skip")) == 0
    assert "[mha] step 3: the training loss and the gradient norm are not finite (NaN or infinity); step skipped" in \
        capsys.readouterr().err
    [r] = results(tmp_path / "out")
    assert r["complete"] and r["skipped_steps"] == [[3, "training loss and gradient norm"]]
    assert [p[0] for p in r["curves"]["train"]] == [1, 2, 4, 5, 6]
    assert math.isfinite(r["heldout_loss"])
    assert _weights_finite(checkpoint_files(tmp_path / "out" / "mha")[0][1])


def test_skip_gives_up_on_a_diverged_run(corpus_file, run_args, capsys, inject):
    inject("grad", set(range(2, 100)))
    assert main(run_args(corpus_file, "--max-steps", 40, "--on-nonfinite", "skip")) == 1
    assert "step 21: the gradient norm is not finite (NaN or infinity), for 20 steps in a row: the run has " \
           "diverged" in capsys.readouterr().err


def test_nonfinite_heldout_loss_fails_the_run(corpus_file, run_args, capsys, inject):
    inject("eval")
    assert main(run_args(corpus_file, "--max-steps", 3)) == 1
    assert "[mha] step 3: the held-out loss is nan" in capsys.readouterr().err


def test_a_checkpoint_of_nonfinite_weights_is_never_written(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 1] = math.inf
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(checkpoint.CheckpointError, match="weight weight is not finite"):
        checkpoint.save(tmp_path, keep=2, model=model, optimizer=optimizer,
                        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                        scaler=torch.amp.GradScaler("cpu", enabled=False), rt=D.Runtime(torch.device("cpu")),
                        step=1, history={}, trajectory={}, variant="mha")
    assert list(tmp_path.iterdir()) == []
