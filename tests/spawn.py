"""``mp.spawn`` for tests whose workers join a gloo process group: each worker ends through
:func:`pyssl.engine.distributed.end_worker` once its function has returned. Left to interpreter
finalization, a gloo thread still releasing the tensor of a finished collective aborts the
process now and then (SIGABRT, "terminate called without an active exception"): a failure of
the test although the worker's work was done and saved."""

from __future__ import annotations

import torch.multiprocessing as mp

from pyssl.engine.distributed import end_worker


def _run(rank, fn, args):
    fn(rank, *args)  # an exception propagates: mp.spawn reports it
    end_worker(0)


def spawn(fn, args, nprocs: int = 2) -> None:
    """``mp.spawn(fn, args, nprocs, join=True)``, each worker ending through end_worker."""
    mp.spawn(_run, args=(fn, tuple(args)), nprocs=nprocs, join=True)
