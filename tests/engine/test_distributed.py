"""Two processes (torchrun, gloo) on the same global batch give the same losses as one."""

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


def _torchrun(out, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "pyssl", "pretrain", "rotnet", "--data", "digits", "--out", str(out),
           "--epochs", "2", *TINY_VIT, "max_steps=6", *extra]
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
