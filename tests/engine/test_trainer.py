import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pyssl.data.datasets import DigitsDataset, Subset
from pyssl.engine import ConfigError, Recipe, RecipeConfig, TrainConfig
from pyssl.engine.checkpoint import load_checkpoint
from pyssl.engine.logger import read_metrics
from pyssl.engine.run import pretrain
from pyssl.engine.trainer import Trainer

from .helpers import TINY

ROOT = Path(__file__).resolve().parents[2]


def _losses(history):
    return {h["step"]: h["loss"] for h in history}


def test_run_folder_has_everything(tmp_path):
    out = tmp_path / "run"
    s = pretrain("rotnet", data="digits", epochs=2, out=out,
                 overrides=TINY + ["tensorboard=true", "keep_every_epochs=1", "max_steps=10"])
    assert s["status"] == "finished" and s["step"] == 10
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"] == "rotnet" and cfg["train"]["max_steps"] == 10
    assert cfg["recipe_config"]["image_size"] == 16 and "Gidaris" in cfg["paper"]
    m = read_metrics(out)
    assert [r["step"] for r in m] == list(range(1, 11))
    assert all(k in m[0] for k in ("loss", "acc", "lr", "weight_decay", "img_per_s"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "figures" / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint_epoch0001.pt").exists()
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 10 and ck["recipe"] == "rotnet"
    spec = ck["encoder"]["spec"]
    assert spec["backbone"]["name"] == "resnet_tiny" and spec["input"]["image_size"] == 16
    enc_keys = set(ck["encoder"]["state_dict"])
    assert enc_keys and all(("backbone." + k) in ck["model"] for k in enc_keys)
    # the logged learning rate follows the warm-up + cosine schedule (8 steps/epoch, 4 warm-up)
    assert m[0]["lr"] == 0.0 and m[4]["lr"] == pytest.approx(cfg["train"]["lr"])
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain("rotnet", data="digits", out=out, overrides=TINY)


def test_resume_gives_identical_losses(tmp_path):
    ref = pretrain("rotnet", data="digits", epochs=2, out=tmp_path / "ref",
                   overrides=TINY + ["max_steps=12"])
    part = pretrain("rotnet", data="digits", epochs=2, out=tmp_path / "part",
                    overrides=TINY + ["max_steps=5"])          # stops mid-epoch 0 (8 steps/epoch)
    assert part["step"] == 5
    res = pretrain("rotnet", out=tmp_path / "part", resume=True, overrides=["max_steps=12"])
    assert res["step"] == 12
    a, b = _losses(ref["history"]), _losses(res["history"])
    assert sorted(b) == list(range(6, 13))
    assert [b[s] for s in b] == [a[s] for s in b]            # bit-identical continuation
    steps = [r["step"] for r in read_metrics(tmp_path / "part")]
    assert steps == list(range(1, 13))                       # one record per step, no repeats
    with pytest.raises(FileNotFoundError, match="last.pt"):
        pretrain("rotnet", out=tmp_path / "nothing", resume=True)


def _spawn(out, extra, env_extra=None, new_session=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "pyssl", "pretrain", "rotnet", "--data", "digits",
           "--out", str(out), "--epochs", "200", *TINY, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session)


def _wait_for_checkpoint(proc, out, min_step, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError("run ended early:\n" + proc.stdout.read())
        p = out / "last.pt"
        if p.exists():
            try:
                if load_checkpoint(p)["step"] >= min_step:
                    return
            except (ValueError, EOFError):
                pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint in time")


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    proc = _spawn(out, ["checkpoint_every=3"])
    _wait_for_checkpoint(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = load_checkpoint(out / "last.pt")                     # intact after the kill
    k = ck["step"]
    assert k % 3 == 0 or k % ck["steps_per_epoch"] == 0       # every 3 steps and at epoch ends
    n = k + 4
    res = pretrain("rotnet", out=out, resume=True, overrides=[f"max_steps={n}"])
    ref = pretrain("rotnet", data="digits", epochs=200, out=tmp_path / "ref",
                   overrides=TINY + [f"max_steps={n}"])
    a, b = _losses(ref["history"]), _losses(res["history"])
    assert sorted(b) == list(range(k + 1, n + 1))
    torch.testing.assert_close(torch.tensor([b[s] for s in b]),
                               torch.tensor([a[s] for s in b]), rtol=1e-6, atol=0)


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path):
    out = tmp_path / "term"
    proc = _spawn(out, ["checkpoint_every=2"])
    _wait_for_checkpoint(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, text
    assert "interrupted at step" in text and "--resume" in text
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == read_metrics(out)[-1]["step"]       # saved after the last step
    res = pretrain("rotnet", out=out, resume=True, overrides=[f"max_steps={ck['step'] + 1}"])
    assert res["status"] == "finished" and res["step"] == ck["step"] + 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_with_loader_workers_still_checkpoints(tmp_path, sig):
    """`timeout`, Slurm and `kill -- -PGID` signal every process of the group, the DataLoader
    workers too: they ignore it, and the main process finishes its step and saves as when it
    alone is signalled (a worker killed by the signal made the loader raise mid-step, and the
    interrupt checkpoint was lost)."""
    out = tmp_path / "group"
    proc = _spawn(out, ["checkpoint_every=2", "num_workers=2"], new_session=True)
    _wait_for_checkpoint(proc, out, 4)
    os.killpg(proc.pid, sig)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, text
    assert text.count(f"got signal {int(sig)}") == 1, text  # the main process's message only
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == read_metrics(out)[-1]["step"]       # saved after the last step


_FAILING_WORKER = """
import sys
from pyssl.data.datasets import DigitsDataset
from pyssl.engine.run import pretrain

get = DigitsDataset.__getitem__
def failing(self, i):  # a dataset that breaks in a loader worker after a few batches
    if failing.calls > 40:
        raise OSError("disk gone")
    failing.calls += 1
    return get(self, i)
failing.calls = 0
DigitsDataset.__getitem__ = failing
pretrain("rotnet", data="digits", epochs=200, out=sys.argv[1], overrides=sys.argv[2:])
"""


def test_training_ending_in_a_worker_error_stops_the_loader_workers(tmp_path):
    """Workers ignore SIGTERM (they are the main process's to stop), so the SIGTERM that torch
    and multiprocessing send a worker at shutdown did not end one: a script whose training
    ended in a worker's error printed the traceback and then waited for its workers forever
    at interpreter exit (the traceback kept the loader iterator alive). The trainer now stops
    them itself, whatever ends the epoch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _FAILING_WORKER, str(out), *TINY,
                             "num_workers=2", "checkpoint_every=1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # hung: end it and its workers (the test then fails)
            for pid in [*_children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode not in (0, None), text
    assert "OSError: disk gone" in text, text


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@dataclass
class _ProbeConfig(RecipeConfig):
    nan_at: int = -1


class _Probe(Recipe):
    """A minimal recipe: the interface any later method (DINO, MAE, ...) plugs into."""
    name = "probe"
    Config = _ProbeConfig

    def __init__(self, cfg, channels):
        super().__init__(cfg, channels)
        self.backbone = self.build_encoder()
        self.head = torch.nn.Linear(self.backbone.num_features, 10)
        self.hook_steps = []

    @property
    def encoder(self):
        return self.backbone

    def views(self, image, label):
        return torch.nn.functional.interpolate(image[None].float() / 255, 16)[0], label

    def training_step(self, batch, ctx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.head(self.backbone(x)), y)
        if ctx.step == self.cfg.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "extra": 2.0}

    def on_after_optimizer_step(self, ctx):
        self.hook_steps.append(ctx.step)


def _probe_trainer(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = _ProbeConfig(image_size=16, backbone="vit_micro", **kw)
    rec = _Probe(cfg, 1)
    data = Subset(DigitsDataset("train"), 64)
    t = TrainConfig(epochs=1, batch_size=16, progress=False, log_every=1, tensorboard=False,
                    checkpoint_every=1, precision="bf16", clip_grad=1.0)
    return rec, Trainer(rec, data, t, tmp_path)


def test_custom_recipe_hooks_bf16_clipping(tmp_path):
    rec, tr = _probe_trainer(tmp_path)
    s = tr.fit()
    assert s["step"] == 4 and rec.hook_steps == [0, 1, 2, 3]
    assert all("grad_norm" in h and h["extra"] == 2.0 for h in tr.history)
    groups = rec.param_groups()
    no_wd = {id(p) for p in groups[1]["params"]}
    assert id(rec.backbone.pos_embed) in no_wd and id(rec.head.bias) in no_wd
    assert id(rec.head.weight) not in no_wd


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    rec, tr = _probe_trainer(tmp_path, nan_at=2)
    with pytest.raises(FloatingPointError, match=r"became nan in step 3 .*last.pt \(step 2\) is kept"):
        tr.fit()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    rec, tr = _probe_trainer(tmp_path / "first", nan_at=0)
    with pytest.raises(FloatingPointError, match="in step 1 .*no checkpoint had been written yet"):
        tr.fit()
    assert not (tmp_path / "first" / "last.pt").exists()


def test_fp16_on_cpu_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        pretrain("rotnet", data="digits", out=tmp_path / "x", overrides=TINY + ["precision=fp16"],
                 epochs=1)
    with pytest.raises(ConfigError, match="larger than the dataset"):
        pretrain("rotnet", data="digits", out=tmp_path / "y", epochs=1,
                 overrides=TINY + ["batch_size=4096"])
