"""Train one attention variant: warm-up + cosine AdamW steps over the sampler's global
batches, periodic held-out evaluation, checkpoints, and the variant's metrics."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, hf_model, hf_source, peak_memory
from . import distributed as D
from .dataset import TokenizedData
from .evaluation import autocast
from .task_data import TaskData
from .model_factory import PRECISION_DTYPES, choose_attn_backend, gpt_config, model_head_dim
from .options import ConfigError, Settings
from .schedule import make_optimizer, step_budget


class Interrupted(Exception):
    """Training stopped early on request; a checkpoint was written."""


class NonFinite(Exception):
    """A NaN or infinite loss or gradient norm stopped the run; nothing after the last good
    checkpoint was written."""


# --on-nonfinite skip gives up when this many steps in a row were not finite: the run has diverged.
MAX_SKIPS_IN_ROW = 20


class StopFlag:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save;
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, Ctrl-C stays default
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time of training segments (evaluation and checkpoints excluded); segments that
    start after the timing warm-up also count towards tokens/s."""

    def __init__(self, device: torch.device, history: dict):
        self.device, self.h = device, history
        self.start, self.timed, self.tokens = None, False, 0

    def open(self, timed: bool) -> None:
        _sync(self.device)
        self.start, self.timed, self.tokens = time.perf_counter(), timed, 0

    def live_rate(self) -> float | None:
        """Tokens/s so far, for the progress bar (no device sync: approximate)."""
        tokens, seconds = self.h["timed_tokens"], self.h["timed_seconds"]
        if self.timed and self.start is not None:
            tokens, seconds = tokens + self.tokens, seconds + time.perf_counter() - self.start
        return tokens / seconds if seconds > 0 else None

    def close(self) -> None:
        if self.start is None:
            return
        _sync(self.device)
        elapsed = time.perf_counter() - self.start
        self.h["train_seconds"] += elapsed
        if self.timed:
            self.h["timed_seconds"] += elapsed
            self.h["timed_tokens"] += self.tokens
        self.start = None


def _new_history() -> dict:
    return {"train": [], "evals": [], "train_seconds": 0.0, "timed_seconds": 0.0, "timed_tokens": 0,
            "eval_seconds": 0.0, "skipped": []}


def _trajectory(settings: Settings, variant: str) -> dict:
    t = {k: settings.values[k] for k in checkpoint.TRAJECTORY_KEYS}
    t["attention"] = variant
    if hf_source.is_hf_run(settings):  # one variant's conversion: the others may come and go
        t["hf_convert"] = hf_source.conversion_of(variant)
    return t


def _has_saved_state(settings: Settings, variant: str, out: Path) -> bool:
    """Whether ``out`` holds a checkpoint (sound or not) or a result of ``variant``."""
    folder = out / variant
    saved = (folder / "deepspeed").exists() if settings.deepspeed else bool(checkpoint.checkpoint_files(folder))
    return saved or (folder / "result.json").exists()


def _grad_norm(model) -> torch.Tensor:
    """The total gradient norm, without clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    return total(grads) if total is not None else torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)


def _add_loss(total: torch.Tensor | None, loss: torch.Tensor, accum: int) -> torch.Tensor:
    """The step's mean loss so far (None before its first micro-batch) plus ``loss``'s share,
    of ``accum`` micro-batches a step. One micro-batch's loss is the step's as it is: no zeros
    to add it to and no division by 1, kernels that would run at every step."""
    part = loss.detach().float()
    if accum > 1:
        part = part / accum
    return part if total is None else total + part


def _scalar(t: torch.Tensor) -> torch.Tensor:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 returns a DTensor norm
    return t.detach().float().reshape(())


def defers_nonfinite_checks(rt: D.Runtime, optimizer, scaler, engine) -> bool:
    """Whether a run checks losses and gradient norms for NaN/infinity on the device and
    reads the verdict with the loss records (one host read per --log-interval steps) instead
    of after every step: a host read per step waits for the GPU, which then idles while the
    host starts the next step (nanoGPT reads its loss every log interval too). It needs an
    optimizer that skips an update on the device (the fused AdamW's ``found_inf``), one
    process (ranks would have to agree on every step), and no GradScaler (fp16 has its own
    skipping). Elsewhere each step is checked on the host before its update."""
    return (rt.device.type == "cuda" and not rt.distributed and engine is None
            and getattr(optimizer, "_step_supports_amp_scaling", False) and not scaler.is_enabled())


NONFINITE_NAMES = ("training loss", "gradient norm")


def check_resumable(settings: Settings, out: Path) -> None:
    """``--resume`` continues a run: refuse it when ``out`` holds nothing of any requested
    variant (a mistyped ``--out`` would otherwise start training from scratch)."""
    variants = settings.variants()
    if not any(_has_saved_state(settings, v, out) for v in variants):
        raise ConfigError(f"--resume: {out} holds no checkpoint or result of {', '.join(variants)}; "
                          "pass the --out of the run to continue, or leave out --resume to start one")


class VariantRun:
    def __init__(self, settings: Settings, variant: str, data: TokenizedData | TaskData, rt: D.Runtime,
                 out: Path):
        self.s, self.variant, self.data, self.rt = settings, variant, data, rt
        self.dir = out / variant
        self.result_path, self.deepspeed_path = self.dir / "result.json", self.dir / "deepspeed"
        self.trajectory = _trajectory(settings, variant)
        self.last_saved: Path | None = None   # the newest checkpoint written or resumed from
        self.skips_in_row = 0

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        from mka.models import GPT
        s, rt = self.s, self.rt
        hf = hf_source.is_hf_run(s)  # an HF model's head size comes from its own config
        self.backend, self.backend_reason = choose_attn_backend(s.attn_backend, rt.device,
                                                                None if hf else model_head_dim(s))
        if hf:
            model, self.config = hf_model.build(s, self.variant, self.data.vocab_size, self.backend,
                                                self.backend_reason, rt.device)
        else:
            self.config = gpt_config(s, self.variant, self.data.vocab_size, self.backend)
            torch.manual_seed(s.seed)  # the same initial weights on every rank, for every run of a variant
            model = GPT(self.config).to(rt.device)
        self.params = model.num_params(non_embedding=False)
        self.params_non_embedding = model.num_params(non_embedding=True)
        self.kv_dtype = PRECISION_DTYPES[s.precision]
        self.kv_bytes = model.kv_cache_bytes_per_token(self.kv_dtype)
        self.model = model
        self.sampler = self.data.train_sampler(s, rt.world)
        self.total_steps = step_budget(s, self.sampler)
        self.engine = None
        if s.deepspeed:
            if s.compile:
                raise ConfigError("--compile with --deepspeed: compile through the DeepSpeed config instead")
            self.optimizer, self.scheduler = make_optimizer(model, s, rt.device, self.total_steps)
            self.engine = self.train_model = D.deepspeed_engine(model, self.optimizer, self.scheduler, s, rt)
        else:
            self.train_model = D.wrap(model, rt, s)   # FSDP2 shards in place, so the optimizer comes after
            self.optimizer, self.scheduler = make_optimizer(model, s, rt.device, self.total_steps)
            if s.compile:
                self.train_model = torch.compile(self.train_model)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=s.precision == "fp16")
        self.defer_checks = defers_nonfinite_checks(rt, self.optimizer, self.scaler, self.engine)
        self.periodic_blocks = self.data.heldout_set(s, periodic=True)
        self.final_blocks = self.data.heldout_set(s, periodic=False)

    def _ckpt_args(self) -> dict:
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                    rt=self.rt)

    def _save(self, step: int, history: dict) -> None:
        if self.engine is not None:
            checkpoint.save_deepspeed(self.deepspeed_path, engine=self.engine, rt=self.rt, step=step,
                                      history=history, trajectory=self.trajectory, variant=self.variant)
            self.last_saved = self.deepspeed_path
            return
        self.last_saved = checkpoint.save(self.dir, keep=self.s.keep_checkpoints, step=step, history=history,
                                          trajectory=self.trajectory, variant=self.variant, **self._ckpt_args())

    def _preflight(self) -> None:
        """Before the first step: the variant's folder takes files and has room for a checkpoint;
        partial checkpoint files a killed run left there are removed."""
        def work():
            problem = checkpoint.check_writable(self.dir, checkpoint.estimated_bytes(self.model))
            if problem is None:
                checkpoint.remove_temporaries(self.dir)
            return problem
        checkpoint.on_main(self.rt, work)

    def _restore(self) -> tuple[int, dict] | None:
        """(step, history) of the checkpoint --resume continues from, or None."""
        if self.engine is not None:
            if not self.deepspeed_path.exists():
                return None
            self.last_saved = self.deepspeed_path
            return checkpoint.load_deepspeed(self.deepspeed_path, engine=self.engine, rt=self.rt,
                                             trajectory=self.trajectory)
        found = checkpoint.load(self.dir, trajectory=self.trajectory, **self._ckpt_args())
        if found is None:
            return None
        self.last_saved, done, history = found
        return done, history

    # ------------------------------------------------------------------ non-finite values
    def _where_saved(self) -> str:
        return f"the newest checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written"

    @staticmethod
    def _nonfinite_flags(loss: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """(2,) float on the device: 1 where the loss, the gradient norm (None: not checked)
        is NaN or infinite. No host read. ``x * 0`` is 0 for a finite ``x`` and NaN otherwise:
        four kernels for both values where ``(~torch.isfinite(x)).float()`` launches six per
        value, and this runs at every step."""
        loss = _scalar(loss)
        both = torch.stack((loss, _scalar(norm) if norm is not None else torch.zeros_like(loss)))
        return both.mul(0).ne(0).float()

    def _nonfinite(self, step: int, history: dict, flags: list[float], stopped_at: int | None = None) -> bool:
        """Whether step ``step + 1`` (as the curves number it) had a NaN or infinite loss or
        gradient norm (``flags``, as :meth:`_nonfinite_flags`, read on the host), on any rank:
        --on-nonfinite stop raises NonFinite, skip records it. ``stopped_at``: the step the
        run reached when the flags were read (a run that checks on the device, whose update
        of that step was skipped there); None: checked before the update."""
        bad = [name for name, f in zip(NONFINITE_NAMES, flags) if f > 0]
        if not bad:
            self.skips_in_row = 0
            return False
        what = f"[{self.variant}] step {step + 1}: the {' and the '.join(bad)} {'is' if len(bad) == 1 else 'are'} " \
               "not finite (NaN or infinity)"
        if self.s.on_nonfinite == "stop":
            when = ("stopped before updating the weights" if stopped_at is None else
                    f"its update was skipped and the run stopped at step {stopped_at}, where the losses "
                    "were read")
            raise NonFinite(f"{what}; {when} (--on-nonfinite stop); "
                            f"{self._where_saved()}; --resume --on-nonfinite skip continues from it, "
                            "skipping such steps")
        history["skipped"].append([step + 1, " and ".join(bad)])
        self.skips_in_row += 1
        if self.skips_in_row >= MAX_SKIPS_IN_ROW:
            raise NonFinite(f"{what}, for {self.skips_in_row} steps in a row: the run has diverged; "
                            f"{self._where_saved()}")
        if self.rt.is_main:
            tqdm.write(f"{what}; step skipped (--on-nonfinite skip)", file=sys.stderr)
        return True

    def _check_eval(self, ev: dict, done: int) -> None:
        if not math.isfinite(ev["loss"]):
            raise NonFinite(f"[{self.variant}] step {done}: the held-out loss is {ev['loss']}; "
                            f"{self._where_saved()}")

    # ------------------------------------------------------------------ pieces of a step
    def _evaluate(self, blocks, history: dict, stop: StopFlag) -> dict | None:
        """Held-out loss, or None when a stop was asked for meanwhile (one process only: under
        torchrun every rank must finish the evaluation's collectives)."""
        t0 = time.perf_counter()
        asked = None if self.rt.distributed else (lambda: stop.requested)
        ev = self.data.evaluate(self.train_model, blocks, self.s, self.rt, asked)
        _sync(self.rt.device)
        history["eval_seconds"] += time.perf_counter() - t0
        return ev

    def _train_step(self, step: int, history: dict) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One optimizer step: its mean loss and, where the checks are deferred, its
        non-finite flags on the device (the update skipped there if one is set); None when it
        was skipped as not finite on the host."""
        s, rt = self.s, self.rt
        if self.engine is not None:
            return self._deepspeed_step(step, history)
        ddp = isinstance(self.train_model, torch.nn.parallel.DistributedDataParallel)
        mean_loss = None
        for micro in range(s.grad_accum):
            mb = self.sampler.micro_batch(step, micro, rt.rank, rt.device)
            # gradients are all-reduced once per step, on the last micro-batch
            sync = nullcontext() if (not ddp or micro == s.grad_accum - 1) else self.train_model.no_sync()
            with sync:
                with autocast(rt.device, s.precision):
                    _, loss = self.train_model(mb.x, mb.y)
                # the gradient of the step's mean loss (a division by 1 would be two kernels)
                self.scaler.scale(loss / s.grad_accum if s.grad_accum > 1 else loss).backward()
            mean_loss = _add_loss(mean_loss, loss, s.grad_accum)
        # fp16: gradients that overflow are the GradScaler's to skip (it lowers the scale); the
        # loss is checked in every precision
        check_grads = not self.scaler.is_enabled()
        norm = None
        if s.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        elif check_grads:
            norm = _grad_norm(self.model)
        flags = self._nonfinite_flags(mean_loss, norm if check_grads else None)
        if self.defer_checks:
            self.optimizer.found_inf = flags.max()  # the fused update is a no-op where it is 1
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return mean_loss, flags
        host_flags = D.all_reduce(self.rt, flags.tolist(), "max")  # one sync
        if self._nonfinite(step, history, host_flags):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():  # forget this step's unscale_ and back off, as on an overflow
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.scheduler.step()  # the schedule stays in step with the data position
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return mean_loss, None

    def _deepspeed_step(self, step: int, history: dict) -> torch.Tensor:
        """The engine accumulates, clips, scales and steps optimizer and schedule at the boundary;
        a non-finite loss stops the run (before any checkpoint of the updated weights)."""
        mean_loss = None
        for micro in range(self.s.grad_accum):
            mb = self.sampler.micro_batch(step, micro, self.rt.rank, self.rt.device)
            with autocast(self.rt.device, self.s.precision):
                _, loss = self.engine(mb.x, mb.y)
            self.engine.backward(loss)
            self.engine.step()
            mean_loss = _add_loss(mean_loss, loss, self.s.grad_accum)
        flags = self._nonfinite_flags(mean_loss, None)
        self._nonfinite(step, history, D.all_reduce(self.rt, flags.tolist(), "max"))
        return mean_loss, None

    def _flush(self, pending: list, history: dict, done: int) -> None:
        """Record pending per-step losses, averaged over ranks (one host sync per flush), and
        act on the deferred non-finite flags of their steps, in order (``done``: the step the
        run has reached). Steps found not finite get no point on the curve."""
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending]).double().tolist()
        losses = [x / self.rt.world for x in D.all_reduce(self.rt, losses)]
        deferred = [p[3] for p in pending if p[3] is not None]
        flags = iter(torch.stack(deferred).tolist() if deferred else [])
        for (step, _, lr, checked), loss in zip(pending, losses):
            if checked is not None and self._nonfinite(step - 1, history, next(flags), stopped_at=done):
                continue
            history["train"].append([step, loss, lr])
        pending.clear()

    def _stop_requested(self, stop: StopFlag, done: int) -> bool:
        asked = stop.requested or (self.s.stop_after_steps is not None and done >= self.s.stop_after_steps)
        if self.rt.distributed:  # every rank must stop at the same step
            asked = D.all_reduce(self.rt, [float(asked)], "max")[0] > 0
        return asked

    def _checkpoint_due(self, done: int) -> bool:
        every = self.s.checkpoint_interval or self.s.eval_interval
        return bool(every) and done % every == 0

    # ------------------------------------------------------------------ the run
    def run(self, stop: StopFlag) -> dict:
        s, rt = self.s, self.rt
        if s.resume and self.result_path.is_file():
            done_before = json.loads(self.result_path.read_text())
            if done_before.get("complete") and done_before.get("trajectory") == self.trajectory:
                return done_before
        if not s.resume and _has_saved_state(s, self.variant, self.dir.parent):
            raise ConfigError(f"--out {self.dir.parent} already holds a run of {self.variant}; "
                              "pass --resume to continue it or choose another --out")
        peak_memory.reset_peak(rt.device)
        self._build()
        if rt.is_main:
            print(f"[{self.variant}] attention kernels: {self.backend} ({self.backend_reason}); "
                  f"{self.params:,} parameters; {self.total_steps:,} steps of {self.sampler.global_batch} x "
                  f"{self.sampler.lengths_text} tokens", flush=True)
        self._preflight()
        history, done = _new_history(), 0
        restored = self._restore() if s.resume else None
        if restored is not None:
            done, history = restored
            if rt.is_main:
                print(f"[{self.variant}] resuming from {self.last_saved} (step {done})", flush=True)
        else:
            if s.resume and rt.is_main:
                print(f"[{self.variant}] no checkpoint in {self.dir}: starting at step 0", flush=True)
            torch.manual_seed(s.seed + rt.rank)  # dropout masks differ per rank, as in data-parallel training
        self.train_model.train()
        timing_from = done + s.timing_warmup_steps  # warm-up again after a resume: caches are cold
        clock, pending = Clock(rt.device, history), []
        bar = tqdm(total=self.total_steps, initial=done, desc=self.variant, disable=not rt.is_main,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15)
        try:
            while done < self.total_steps:
                if s.eval_interval and done % s.eval_interval == 0 and \
                        (not history["evals"] or history["evals"][-1][0] != done):
                    clock.close()
                    ev = self._evaluate(self.periodic_blocks, history, stop)
                    if ev is None:
                        self._stop(history, done, pending)
                    self._check_eval(ev, done)
                    history["evals"].append([done, ev["loss"]])
                    if rt.is_main:
                        acc = f", answer accuracy {ev['token_accuracy']:.3f}" if "token_accuracy" in ev else ""
                        bar.write(f"[{self.variant}] step {done}: held-out loss {ev['loss']:.4f}{acc}")
                if clock.start is None or (done == timing_from and not clock.timed):
                    clock.close()
                    clock.open(timed=done >= timing_from)
                lr = self.scheduler.get_last_lr()[0]
                stepped = self._train_step(done, history)
                clock.tokens += self.sampler.step_tokens(done)
                done += 1
                if stepped is not None:  # a skipped step has no point on the curve
                    pending.append((done, stepped[0], lr, stepped[1]))
                if (done % s.log_interval == 0 or done == self.total_steps) and (pending or history["train"]):
                    self._flush(pending, history, done)
                    tps = clock.live_rate()
                    bar.set_postfix(loss=f"{history['train'][-1][1]:.4f}",
                                    tok_s=f"{tps:,.0f}" if tps else "warm-up", refresh=False)
                bar.update(1)
                stopping = self._stop_requested(stop, done) and done < self.total_steps
                if stopping or self._checkpoint_due(done) or done == self.total_steps:
                    self._flush(pending, history, done)
                    clock.close()
                    if not stopping:
                        self._save(done, history)
                if stopping:
                    self._stop(history, done, pending)
        finally:
            bar.close()
        clock.close()
        final = self._evaluate(self.final_blocks, history, stop)
        if final is None:  # the checkpoint of the last step is written: --resume only evaluates
            self._stop(history, done, pending, saved=True)
        self._check_eval(final, done)
        history["evals"].append([done, final["loss"]])
        result = self._result(history, done, final)
        if hf_source.is_hf_run(s):  # before result.json: a complete result implies the export
            hf_model.export(self.train_model, self.dir / "hf", rt, getattr(self.data, "tokenizer", None))
            result["hf_export"] = str(self.dir / "hf")
        self._write_result(result)
        return result

    def _stop(self, history: dict, done: int, pending: list, saved: bool = False) -> None:
        """Checkpoint, record a partial result and leave the run (Ctrl-C, SIGTERM, --stop-after-steps)."""
        self._flush(pending, history, done)
        if not saved:
            self._save(done, history)
        self._write_result(self._result(history, done, final=None))
        raise Interrupted(f"{self.variant} stopped at step {done}/{self.total_steps}; "
                          f"checkpoint in {self.last_saved}; continue with --resume")

    # ------------------------------------------------------------------ results
    def _result(self, history: dict, done: int, final: dict | None) -> dict:
        peak, peak_kind = peak_memory.peak_bytes(self.rt.device)
        peak = int(D.all_reduce(self.rt, [float(peak)], "max")[0])
        train_losses = [x[1] for x in history["train"]]
        tail = train_losses[-10:]
        return {
            "variant": self.variant, "complete": final is not None, "trajectory": self.trajectory,
            "attn_backend": self.backend, "attn_backend_reason": self.backend_reason,
            "n_head": self.config.n_head,
            "n_kv_head": None if self.variant == "mla" else (self.config.n_kv_head or self.config.n_head),
            "attn_options": dict(self.config.attn_options or {}),
            "params": self.params, "params_non_embedding": self.params_non_embedding,
            "kv_cache_bytes_per_token": self.kv_bytes, "kv_cache_dtype": str(self.kv_dtype).replace("torch.", ""),
            "steps": done, "total_steps": self.total_steps, "global_batch_blocks": self.sampler.global_batch,
            "tokens_trained": self.sampler.tokens_through(done),
            "steps_per_epoch": self.sampler.steps_per_epoch,
            "heldout_loss": final["loss"] if final else None, "heldout_ppl": final["ppl"] if final else None,
            "heldout_tokens": final["tokens"] if final else None,
            **self.data.result_fields(final),
            "best_heldout_loss": min((e[1] for e in history["evals"]), default=None),
            "train_loss_last10": sum(tail) / len(tail) if tail else None,
            "tokens_per_s": history["timed_tokens"] / history["timed_seconds"] if history["timed_seconds"] else None,
            "train_time_s": history["train_seconds"], "eval_time_s": history["eval_seconds"],
            "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
            "curves": {"train": history["train"], "evals": history["evals"]},
            "skipped_steps": history["skipped"],
        }

    def _write_result(self, result: dict) -> None:
        if self.rt.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.result_path.write_text(json.dumps(result, indent=1))
