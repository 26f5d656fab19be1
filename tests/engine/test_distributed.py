"""Two processes (torchrun, gloo) on the same global batch give the same losses as one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyssl.engine.logger import read_metrics
from pyssl.engine.run import pretrain

from .helpers import TINY_VIT

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(out, extra, recipe="rotnet", epochs=2, base=TINY_VIT + ["max_steps=6"]):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "pyssl", "pretrain", recipe, "--data", "digits", "--out", str(out),
           "--epochs", str(epochs), *base, *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    one = pretrain("rotnet", data="digits", epochs=2, out=tmp_path / "one",
                   overrides=TINY_VIT + ["max_steps=6"])
    _torchrun(tmp_path / "two", [f"distributed={mode}"])
    two = read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, 7))
    a = torch.tensor([h["loss"] for h in one["history"]])
    b = torch.tensor([r["loss"] for r in two])
    torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5)
    acc1 = torch.tensor([h["acc"] for h in one["history"]])
    acc2 = torch.tensor([r["acc"] for r in two])
    torch.testing.assert_close(acc2, acc1)   # accuracy averaged over ranks = global accuracy


# A ViT small enough for two processes on two cores; k-NN monitor and figures on.
_SMALL_DINO = ["progress=false", "tensorboard=false", "log_every=1", "data_subset=32",
               "batch_size=16", "image_size=16", "warmup_epochs=0.5", "backbone_width=32",
               "vit_depth=1", "vit_heads=2", "out_dim=128", "head_hidden=32",
               "head_bottleneck=16", "local_size=8", "n_local_crops=2", "knn_every=1",
               "knn_train=32", "knn_test=16", "figures=true"]


def test_fsdp_runs_monitor_figures_and_gradient_clipping(tmp_path):
    # Under FSDP the encoder's forward is a collective: the k-NN monitor and the figures run
    # on every rank (rank 0 writes them), and the clipped gradient norm (a DTensor) is
    # gathered before the metrics all-reduce. dino clips at 3.0 by default.
    _torchrun(tmp_path / "run", ["distributed=fsdp"], recipe="dino", epochs=2,
              base=_SMALL_DINO)
    knn = [json.loads(line) for line in (tmp_path / "run" / "knn.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in knn] == [0, 1, 2]
    assert all(0 <= r["knn"] <= 1 for r in knn)
    assert (tmp_path / "run" / "figures" / "attention.png").stat().st_size > 0
    metrics = read_metrics(tmp_path / "run")
    assert all("grad_norm" in r and r["grad_norm"] > 0 for r in metrics)


def test_beit_auto_tokenizer_waits_for_rank_zero(tmp_path):
    # every rank trains the tokenizer in a nested run that rank 0 alone checkpoints: the other
    # ranks must wait for the file before loading it
    base = ["progress=false", "tensorboard=false", "log_every=1", "data_subset=32",
            "batch_size=16", "image_size=16", "warmup_epochs=0.5", "backbone_width=32",
            "vit_depth=1", "vit_heads=2", "tokenizer_epochs=1", "tokenizer_codes=32",
            "tokenizer_subset=32", "knn_every=0", "figures=false", "max_steps=1"]
    _torchrun(tmp_path / "run", [], recipe="beit", epochs=1, base=base)
    assert len(read_metrics(tmp_path / "run")) == 1


def _init_gloo(rank, world, port):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def _spawn_two(worker, tmp_path):
    """Runs worker(rank, world=2, port, out_dir) in two processes joined by a gloo group."""
    import socket

    from ..spawn import spawn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(worker, (2, port, str(tmp_path)))


def _vq_counts_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from pyssl.engine.distributed import DistInfo, wrap_model
    from pyssl.engine.recipe import StepContext
    from pyssl.engine.run import build_configs

    _init_gloo(rank, world, port)
    try:
        torch.set_num_threads(1)
        cls, _, rcfg = build_configs("vq_tokenizer", ["width=16", "num_codes=32", "code_dim=8",
                                                      "image_size=16", "knn_every=0",
                                                      "figures=false"], None, 1)
        torch.manual_seed(0)
        recipe = cls(rcfg, 1)
        ctx = StepContext(rank=rank, world_size=world)
        model = wrap_model(recipe, DistInfo(rank, world), "ddp")
        seen = torch.zeros(32)

        def record(module, inputs, out):  # the codes the tokenizer produced (returns None)
            seen.add_(torch.bincount(out[1].reshape(-1), minlength=32).float())

        recipe.tokenizer.register_forward_hook(record)
        g = torch.Generator().manual_seed(100 + rank)
        recipe.on_epoch_start(ctx)
        for _ in range(3):  # the ranks see different images, so different codes
            model(torch.randn(4, 1, 16, 16, generator=g) * (1 + rank), ctx)["loss"].backward()
        counts = recipe.epoch_counts.clone()
        dist.all_reduce(counts)  # as on_epoch_end
        dist.all_reduce(seen)
        torch.save((counts, seen), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vq_tokenizer_epoch_code_counts_survive_ddp_buffer_broadcast(tmp_path):
    _spawn_two(_vq_counts_worker, tmp_path)
    counts, seen = torch.load(tmp_path / "0.pt")
    assert seen.sum() > 0
    torch.testing.assert_close(counts, seen)


def _prototypes_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from pyssl.recipes.dino import prototypes_used

    _init_gloo(rank, world, port)
    try:
        probs = torch.zeros(4, 8)
        winners = [[0, 1, 1, 0], [1, 2, 5, 2]][rank]  # {0, 1} and {1, 2, 5}: 4 in all
        probs[torch.arange(4), torch.tensor(winners)] = 1.0
        torch.save(prototypes_used(probs), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_dino_prototypes_used_counts_the_global_batch(tmp_path):
    # each rank used to count its own rows' prototypes (2 and 3, logged as their mean, 2.5)
    _spawn_two(_prototypes_worker, tmp_path)
    assert [torch.load(tmp_path / f"{r}.pt") for r in range(2)] == [4.0, 4.0]
