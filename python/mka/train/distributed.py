"""Processes and devices: single process, or ``torchrun`` (one or many nodes) through
``torch.distributed`` — gloo on CPU, NCCL on GPUs — with DDP, FSDP2 or DeepSpeed ZeRO."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .options import ConfigError, Settings


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        else:
            name = f"CPU ({torch.get_num_threads()} threads)"
        return f"{self.world} x {name}" if self.distributed else name


def start(settings: Settings) -> Runtime:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = settings.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=device if use_cuda else None)
    return Runtime(device, rank, world, local_rank)


def stop(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():  # ours (a one-process DeepSpeed group stays with DeepSpeed)
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def all_reduce(rt: Runtime, values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few scalars across ranks (float64 on the collective's device)."""
    if not rt.distributed:
        return list(values)
    dev = rt.device if rt.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(rt: Runtime, obj: Any) -> list[Any]:
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, rt: Runtime, settings: Settings) -> torch.nn.Module:
    """The module the training step calls. Checkpoints and evaluation use the same object."""
    if not rt.distributed:
        if settings.fsdp:
            raise ConfigError("--fsdp shards across processes: launch with torchrun --nproc-per-node N")
        return model
    if settings.fsdp:
        if rt.device.type == "cpu" and torch.torch_version.TorchVersion(torch.__version__) < (2, 7):
            raise ConfigError(f"--fsdp: FSDP2 runs on CPU processes from torch 2.7 on (this is "
                              f"{torch.__version__}); use DDP (leave out --fsdp) or a newer torch")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 keeps FSDP2 under its composable API
            from torch.distributed._composable.fsdp import fully_shard
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Transformer blocks to shard one by one (the usual FSDP unit): the first module list
    named blocks, h or layers, outermost first (GPT's blocks; a transformers decoder's
    ``model.layers``, also inside the trainer's wrapper)."""
    for name, module in sorted(model.named_modules(), key=lambda nm: nm[0].count(".")):
        if isinstance(module, torch.nn.ModuleList) and name.rpartition(".")[2] in ("blocks", "h", "layers"):
            return list(module)
    return []


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT inside DDP / torch.compile wrappers (FSDP2 shards in place: nothing to strip)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def load_deepspeed(config_path: str):
    """The deepspeed module, or a clear error when it is not installed."""
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"--deepspeed {config_path}: the deepspeed package is not installed "
                          "(pip install deepspeed); without it, train with DDP (default) or --fsdp") from e
    if not os.path.isfile(config_path):
        raise ConfigError(f"--deepspeed: no such config file {config_path}")
    return deepspeed


def deepspeed_config(settings: Settings) -> dict:
    """The user's ZeRO config with our batch, clipping and precision filled in (or checked)."""
    import json
    try:
        cfg = json.loads(open(settings.deepspeed).read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--deepspeed {settings.deepspeed}: not a readable JSON config ({e})") from e
    ours = {"train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": settings.grad_accum,
            "gradient_clipping": settings.grad_clip}
    for key, value in ours.items():
        if cfg.setdefault(key, value) != value:
            raise ConfigError(f"--deepspeed {settings.deepspeed}: {key} is {cfg[key]} but the flags give {value}; "
                              "leave it out of the JSON or make them agree")
    cfg.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    for prec, key in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = bool(cfg.get(key, {}).get("enabled", False))
        if enabled != (settings.precision == prec):
            if key in cfg and "enabled" in cfg[key]:
                raise ConfigError(f"--deepspeed {settings.deepspeed}: {key}.enabled={enabled} disagrees with "
                                  f"--precision {settings.precision}")
            cfg.setdefault(key, {})["enabled"] = settings.precision == prec
    return cfg


def deepspeed_engine(model, optimizer, scheduler, settings: Settings, rt: Runtime):
    """A DeepSpeed engine owning our model, AdamW and schedule (it steps the scheduler at each
    accumulation boundary and scales fp16 losses itself)."""
    ds = load_deepspeed(settings.deepspeed)
    if not rt.distributed:  # DeepSpeed always wants a process group; make a one-process one
        for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                     ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(k, v)
    ds.init_distributed(dist_backend="nccl" if rt.device.type == "cuda" else "gloo")
    engine, _, _, _ = ds.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                    config=deepspeed_config(settings))
    return engine
