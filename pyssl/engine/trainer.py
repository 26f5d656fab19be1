"""The one training loop every recipe runs on.

Per step: learning rate and weight decay from their schedules, the step's RNG seeded from
``(seed, step, rank)``, forward under autocast (bf16 on CPU/CUDA, fp16 + GradScaler on CUDA),
backward, optional gradient clipping, optimizer step, the recipe's ``on_after_optimizer_step``
hook, metrics averaged over ranks, logging, checkpoints. SIGINT/SIGTERM finish the current step,
write a checkpoint and stop (a second signal aborts at once); a kill at any time leaves the
last checkpoint intact (atomic writes), and ``resume=`` continues with exactly the losses an
uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data.views import EpochSampler, ViewDataset, mix_seed
from .checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import ConfigError, TrainConfig, config_to_dict
from .distributed import DistInfo, all_reduce_mean, init_distributed, wrap_model
from .logger import MetricLogger
from .recipe import Recipe, StepContext
from .schedules import Schedule

__all__ = ["Trainer", "TrainingDiverged", "to_device"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last checkpoint written before it is kept."""


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _worker_init(_):
    torch.set_num_threads(1)
    # Ctrl-C and SIGTERM are the main process's to handle (finish the step, write a checkpoint,
    # stop). `timeout`, Slurm and `kill -- -PGID` signal the whole process group: a worker that
    # died of it would make the loader raise in the main process, at any point of a step, and
    # the interrupt checkpoint would be lost. Workers still end when the loader shuts them down
    # (a None on their queue) or when the main process is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by _start_loader since before the fork:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # pending ones are dropped


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _start_loader(loader: DataLoader):
    """``iter(loader)`` with SIGINT and SIGTERM blocked while the workers start: a signal sent
    to the process group between a worker's fork and its _worker_init would otherwise reach it
    with the main process's handler. The main process gets a signal that arrived meanwhile
    when the mask is restored."""
    if (loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask")
            or threading.current_thread() is not threading.main_thread()):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_loader(it) -> None:
    """Shut the loader's workers down now, whatever ended the epoch (its end, a break, an
    exception, Ctrl-C). Workers ignore SIGTERM (see _worker_init), so the SIGTERM with which
    torch and multiprocessing end a worker that does not stop by itself would leave it
    running, and the interpreter would wait for it forever at exit: one still alive after
    torch's shutdown is killed."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:  # num_workers=0
        return
    try:
        shutdown()
    finally:
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                w.kill()
                w.join(timeout=10)


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files (``.NAME.tmp-PID``) of checkpoint writes whose process is gone
    (killed mid-write); those of a live process are left alone."""
    import os

    for tmp in folder.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's live process
            alive = True
        if not alive:
            tmp.unlink(missing_ok=True)


def _resolve_precision(p: str, device: torch.device) -> str:
    if p == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return p


class Trainer:
    def __init__(self, recipe: Recipe, dataset, cfg: TrainConfig, out_dir: str | Path,
                 config_record: dict | None = None, resume: str | Path | None = None,
                 dist_info: DistInfo | None = None, on_start=None):
        """``on_start()``: called once every check has passed (the resumed checkpoint's
        included), before the first step: ``pretrain`` writes ``config.json`` there, so that a
        resume refused for a changed setting leaves the run folder as it was."""
        cfg.validate()
        self.on_start = on_start
        self.recipe, self.dataset, self.cfg = recipe, dataset, cfg
        self.out = Path(out_dir)
        self.config_record = config_record or {"train": config_to_dict(cfg)}
        self.resume = resume
        self.info = dist_info or init_distributed(cfg.device)
        self.history: list[dict] = []     # every step's rank-averaged metrics
        self._stop_signal = 0
        self._saved_step: int | None = None  # the step of the newest last.pt

    # ------------------------------------------------------------------ setup
    def _encoder_prefix(self) -> str:
        enc = self.recipe.encoder
        for name, m in self.recipe.named_modules():
            if m is enc:
                return name
        raise RuntimeError("recipe.encoder is not a sub-module of the recipe")

    def _state_dicts(self):
        if self.cfg.distributed == "fsdp" and self.info.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.recipe, options=opts),
                    get_optimizer_state_dict(self.recipe, self.optimizer, options=opts))
        return self.recipe.state_dict(), self.optimizer.state_dict()

    def save_checkpoint(self, name: str = "last.pt") -> Path | None:
        model_sd, opt_sd = self._state_dicts()   # collective under FSDP: every rank calls
        if name == "last.pt":  # on every rank: a divergence message names it on any of them
            self._saved_step = self.step
        if not self.info.is_main:
            return None
        pre = self._encoder_prefix()
        enc_sd = {k[len(pre) + 1:]: v for k, v in model_sd.items() if k.startswith(pre + ".")}
        ck = {"format": FORMAT, "recipe": self.recipe.name, "config": self.config_record,
              "model": model_sd, "optimizer": opt_sd,
              "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
              "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
              "steps_per_epoch": self.steps_per_epoch, "rng": rng_state(),
              "world_size": self.info.world_size, "time": time.time(),
              "encoder": {"spec": self.recipe.encoder_spec(), "state_dict": enc_sd}}
        return atomic_save(ck, self.out / name)

    def _diverged(self, value: float, epoch: int) -> TrainingDiverged:
        if self._saved_step is not None:
            kept = (f"the last good checkpoint {self.out / 'last.pt'} (step {self._saved_step}) "
                    "is kept: continue from it with, e.g., a lower lr (pyssl pretrain ... --out "
                    f"{self.out} --resume lr=...)")
        else:
            kept = ("no checkpoint had been written yet (checkpoint_every=N writes one every N "
                    "steps; one is written at the end of each epoch)")
        # steps are counted from 1 here, as in metrics.jsonl: step n is the n-th optimizer step
        return TrainingDiverged(f"the loss became {value} in step {self.step + 1} (epoch {epoch}); "
                                f"{kept}")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        if self._stop_signal:
            raise KeyboardInterrupt
        self._stop_signal = signum
        if self.info.is_main:
            print(f"\n[pyssl] got signal {signum}: finishing this step and writing a checkpoint "
                  "(send it again to abort now)", flush=True)

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg, info, recipe = self.cfg, self.info, self.recipe
        device = info.device
        self.precision = _resolve_precision(cfg.precision, device)
        if cfg.batch_size % info.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the number of "
                              f"processes ({info.world_size})")
        per_rank = cfg.batch_size // info.world_size
        views = ViewDataset(self.dataset, recipe.views, cfg.seed)
        sampler = EpochSampler(views, info.world_size, info.rank, True, cfg.seed, True)
        self.steps_per_epoch = len(sampler) // per_rank
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the dataset "
                              f"({len(self.dataset)} images)")
        spe = self.steps_per_epoch
        sched_steps = cfg.epochs * spe
        total = min(sched_steps, cfg.max_steps) if cfg.max_steps else sched_steps
        lr_s = Schedule(cfg.lr, cfg.min_lr, sched_steps, min(sched_steps, int(cfg.warmup_epochs * spe)))
        wd_final = cfg.final_weight_decay if cfg.final_weight_decay >= 0 else cfg.weight_decay
        wd_s = Schedule(cfg.weight_decay, wd_final, sched_steps, 0, cfg.weight_decay)

        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        ck = None
        if self.resume:
            ck = load_checkpoint(self.resume)
            if ck.get("recipe") != recipe.name:
                raise ConfigError(f"checkpoint {self.resume} is a {ck.get('recipe')!r} run, not "
                                  f"{recipe.name!r}")
            if ck.get("steps_per_epoch") not in (None, spe):
                raise ConfigError(f"cannot resume: the checkpoint has {ck['steps_per_epoch']} "
                                  f"steps per epoch, this configuration {spe} (data or "
                                  "batch_size changed; an image folder without train/ and "
                                  "val/ trains on about 80% of its images since pyssl "
                                  "splits it per class)")
        ctx = StepContext(total_steps=sched_steps, steps_per_epoch=spe, device=device,
                          rank=info.rank, world_size=info.world_size, dataset=views,
                          train_config=cfg, trainer=self)
        recipe.to(device)
        recipe.on_train_start(ctx)
        if ck is not None:
            recipe.load_state_dict(ck["model"])
        model = wrap_model(recipe, info, cfg.distributed)
        groups = recipe.param_groups()
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               betas=(cfg.momentum, 0.999))
        else:
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        if ck is not None:
            if cfg.distributed == "fsdp" and info.enabled:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions, set_optimizer_state_dict)

                set_optimizer_state_dict(recipe, self.optimizer, ck["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(ck["optimizer"])
            if ck.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"])
            self.step, self.epoch, self.batch_in_epoch = (ck["step"], ck["epoch"],
                                                          ck["batch_in_epoch"])
            self._saved_step = self.step
            if self.batch_in_epoch >= spe:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0

        if info.is_main:
            _remove_stale_temporaries(self.out)
        if self.on_start is not None:
            self.on_start()
        logger = MetricLogger(self.out, cfg.tensorboard,
                              resume_step=self.step if ck is not None else -1) \
            if info.is_main else None
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if self.precision == "bf16" else
                    torch.autocast(device.type, dtype=torch.float16)
                    if self.precision == "fp16" else contextlib.nullcontext())
        pbar = None
        if info.is_main and cfg.progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True,
                        desc=f"{recipe.name}")
        status, t0, ema_rate = "finished", time.time(), None
        last_metrics: dict = {}
        try:
            with self._signals():
                while self.epoch < cfg.epochs and self.step < total and status == "finished":
                    ep = self.epoch
                    views.set_epoch(ep)
                    sampler.set_epoch(ep)
                    skip = self.batch_in_epoch
                    sampler.set_start(skip * per_rank)
                    ctx.epoch = ep
                    recipe.on_epoch_start(ctx)
                    loader = DataLoader(views, batch_size=per_rank, sampler=sampler,
                                        num_workers=cfg.num_workers, collate_fn=recipe.collate,
                                        drop_last=True, worker_init_fn=_worker_init,
                                        pin_memory=device.type == "cuda")
                    tstep = time.time()
                    batches = _start_loader(loader)
                    try:
                        for bi, batch in enumerate(batches, start=skip):
                            if self.step >= total:
                                break
                            lr, wd = lr_s(self.step), wd_s(self.step)
                            for g in self.optimizer.param_groups:
                                g["lr"] = lr * g.get("lr_scale", 1.0)
                                if g.get("apply_wd", True):
                                    g["weight_decay"] = wd
                            ctx.step, ctx.lr, ctx.weight_decay = self.step, lr, wd
                            torch.manual_seed(mix_seed(cfg.seed, self.step, info.rank, 0x5EED))
                            batch = to_device(batch, device)
                            with autocast:
                                out = model(batch, ctx)
                            if not isinstance(out, dict) or "loss" not in out:
                                raise TypeError(f"{type(recipe).__name__}.training_step must "
                                                "return a dict with a 'loss' tensor")
                            loss = out["loss"]
                            self.optimizer.zero_grad(set_to_none=True)
                            self.scaler.scale(loss).backward()
                            gnorm = None
                            if cfg.clip_grad > 0:
                                self.scaler.unscale_(self.optimizer)
                                gnorm = torch.nn.utils.clip_grad_norm_(
                                    [p for g in self.optimizer.param_groups for p in g["params"]],
                                    cfg.clip_grad)
                            recipe.on_before_optimizer_step(ctx)
                            self.scaler.step(self.optimizer)
                            self.scaler.update()
                            recipe.on_after_optimizer_step(ctx)
                            # metrics (+ the stop flag) averaged over ranks: one collective
                            keys = [k for k, v in out.items()
                                    if isinstance(v, (torch.Tensor, float, int)) and
                                    (not isinstance(v, torch.Tensor) or v.numel() == 1)]
                            vals = [out[k].detach().float().reshape(()) if
                                    isinstance(out[k], torch.Tensor) else
                                    torch.tensor(float(out[k])) for k in keys]
                            if gnorm is not None:
                                if hasattr(gnorm, "full_tensor"):  # FSDP: a DTensor (collective)
                                    gnorm = gnorm.full_tensor()
                                keys.append("grad_norm")
                                vals.append(torch.as_tensor(gnorm, dtype=torch.float32).reshape(()))
                            vals.append(torch.tensor(float(self._stop_signal > 0)))
                            red = all_reduce_mean(torch.stack([v.to(device) for v in vals]),
                                                  info).cpu().tolist()
                            stop = red.pop() > 0
                            m = dict(zip(keys, red))
                            if not math.isfinite(m["loss"]):
                                raise self._diverged(m["loss"], ep)
                            self.step += 1
                            self.batch_in_epoch = bi + 1
                            now = time.time()
                            rate = cfg.batch_size / max(now - tstep, 1e-9)
                            tstep = now
                            ema_rate = rate if ema_rate is None else 0.9 * ema_rate + 0.1 * rate
                            m.update(lr=lr, weight_decay=wd, epoch=ep)
                            self.history.append({"step": self.step, **m})
                            last_metrics = m
                            if logger and (self.step % cfg.log_every == 0 or self.step == total):
                                logger.log({**m, "img_per_s": ema_rate,
                                            "time": now - t0}, self.step)
                            if pbar is not None:
                                pbar.update(1)
                                pbar.set_postfix(epoch=ep, loss=f"{m['loss']:.4f}",
                                                 img_s=f"{ema_rate:.0f}", refresh=False)
                            if stop:
                                status = "interrupted"
                                break
                            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                                self.save_checkpoint()
                    finally:
                        _stop_loader(batches)
                    if status != "finished":
                        break
                    if self.batch_in_epoch >= spe:   # epoch complete
                        recipe.on_epoch_end(ctx)
                        self.save_checkpoint()
                        if cfg.keep_every_epochs and (ep + 1) % cfg.keep_every_epochs == 0:
                            self.save_checkpoint(f"checkpoint_epoch{ep + 1:04d}.pt")
                        if logger:
                            logger.figure()
                        self.epoch, self.batch_in_epoch = ep + 1, 0
                    elif self.step >= total:
                        break
                self.save_checkpoint()
                recipe.on_train_end(ctx)
        finally:
            if pbar is not None:
                pbar.close()
            if logger:
                logger.figure()
                logger.close()
        return {"status": status, "step": self.step, "epoch": self.epoch,
                "loss": last_metrics.get("loss"), "seconds": time.time() - t0,
                "checkpoint": str(self.out / "last.pt"), "run_dir": str(self.out)}
