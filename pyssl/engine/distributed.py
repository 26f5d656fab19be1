"""torchrun integration: process-group setup from the environment torchrun sets, rank helpers,
metric averaging across ranks, and model wrapping (DDP or FSDP2 ``fully_shard``)."""

from __future__ import annotations

import datetime
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_reduce_mean", "barrier", "end_worker", "init_distributed", "initialized",
           "is_rank_zero", "shutdown_distributed", "wrap_model"]


class DistInfo:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None, initialized_here: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.initialized_here = initialized_here

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on CUDA,
    gloo on CPU. Returns rank/world/device; a single process needs no process group."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError

        raise ConfigError("device=cuda but no CUDA device is available (device=cpu or auto runs "
                          "on the CPU)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=30))
        here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev, here)


def shutdown_distributed(info: DistInfo) -> None:
    """Leaves the process group that init_distributed joined, once every rank is done. Left to
    interpreter exit, gloo's threads sometimes aborted a finished run ("terminate called without
    an active exception", SIGABRT: about one torchrun in seven on a 2-core VM). That alone did
    not remove the abort (a gloo thread may still release a tensor while the interpreter
    finalizes): `pyssl pretrain` workers also end through end_worker (os._exit)."""
    if info.initialized_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_worker(code: int = 0) -> NoReturn:
    """Ends a finished distributed worker process (a torchrun worker, an mp.spawn child) without
    interpreter finalization: call it last, after the process group is destroyed and every file
    is closed. After destroy_process_group, a ProcessGroupGloo worker thread may still be
    releasing the last tensor of a finished collective (e.g. DINO's asynchronous centre
    all-reduce, FSDP's gathers, DDP's buckets); when that tensor has a Python object the release
    takes the GIL, and a thread that asks for the GIL while the interpreter finalizes is ended
    by pthread_exit inside a noexcept frame: std::terminate ("terminate called without an active
    exception"), SIGABRT after the work had finished and saved (about one FSDP DINO run in ten
    on a loaded 2-core VM; backtrace ProcessGroupGloo::runLoop -> TensorImpl::decref_pyobject ->
    PyEval_AcquireThread -> pthread_exit). `pyssl pretrain` workers end through it; so should
    scripts that call pyssl.engine.run.pretrain under torchrun. The standard streams and logging
    handlers are flushed first; os._exit(code) skips atexit handlers."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (identity on one process)."""
    if not info.enabled:
        return values
    v = values.detach().clone()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v / info.world_size


def all_reduce_max(value: float, info: DistInfo, device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_rank_zero() -> bool:
    """True on rank 0, or without torch.distributed: the process that writes shared files."""
    return not initialized() or dist.get_rank() == 0


def barrier(info: DistInfo | None = None) -> None:
    """Waits for every rank (``info``: the trainer's view; None: whatever group is set up)."""
    if (info.enabled if info is not None else initialized()):
        dist.barrier()


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "ddp") -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` on each module the recipe lists in
    ``fsdp_modules()`` — e.g. ViT blocks — then on the recipe itself)."""
    if not info.enabled:
        return model
    if mode == "ddp":
        if not any(p.requires_grad for p in model.parameters()):
            return model
        ids = [info.device.index] if info.device.type == "cuda" else None
        # a recipe may leave parameters unused (a ViT's mask token outside BEiT/iBOT, a
        # discriminator switched off): let DDP look for them unless the recipe opts out
        unused = getattr(model, "find_unused_parameters", True)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=unused)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in getattr(model, "fsdp_modules", lambda: [])():
            fully_shard(m)
        fully_shard(model)
        return model
    raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {mode!r}")
