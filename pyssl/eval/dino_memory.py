"""Memory and time of a DINO training step with the fused loss vs a plain PyTorch DINO loss.

``python -m pyssl.eval.dino_memory`` trains the ``dino`` recipe for a few steps at the
configuration of the README (K = 65536 prototypes, batch 64, 2 global 28 px + 6 local 12 px
crops of Fashion-MNIST, the recipe's ViT) twice, each variant in its own process so that the
peak resident memory is its own: once with :class:`pyssl.losses.DINOLoss` (the fused kernel) and
once with :class:`PlainDINOLoss`, DINO v1's loss written in plain PyTorch: softmax of the
centred teacher, ``log_softmax`` of each student crop, and a Python loop over the (teacher crop,
student crop) pairs. It reports the bytes that autograd saves for backward (for the loss alone
and for the whole step), the peak RSS of the process, the median step time, and checks that the
two losses agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlainDINOLoss", "SavedBytes", "main", "measure"]


class PlainDINOLoss(nn.Module):
    """DINO's loss as the paper's code computes it, in plain PyTorch (the baseline): every
    pair materialises a ``[B, K]`` ``log_softmax`` that autograd keeps for backward. Same
    constructor arguments and forward as :class:`pyssl.losses.DINOLoss` (centring only,
    one process)."""

    def __init__(self, out_dim: int, n_teacher_crops: int = 2, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_epochs: int = 0,
                 student_temp: float = 0.1, center_momentum: float = 0.9, **_):
        super().__init__()
        from ..losses.dino import DINOLoss

        self._schedule = DINOLoss(out_dim, n_teacher_crops, teacher_temp, warmup_teacher_temp,
                                  warmup_epochs, student_temp, center_momentum)
        self.n_teacher_crops, self.student_temp = n_teacher_crops, student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_temperature(self, epoch=0):
        return self._schedule.teacher_temperature(epoch)

    def forward(self, student_output, teacher_output, epoch=0):
        teacher_output = teacher_output.detach()
        B = teacher_output.shape[0] // self.n_teacher_crops
        n_crops = student_output.shape[0] // B
        temp = self.teacher_temperature(epoch)
        targets = F.softmax((teacher_output - self.center) / temp, dim=-1).split(B)
        students = (student_output / self.student_temp).split(B)
        total, terms = 0.0, 0
        for t_idx, q in enumerate(targets):
            for s_idx in range(n_crops):
                if s_idx == t_idx:
                    continue                               # the teacher's own view
                logp = F.log_softmax(students[s_idx], dim=-1)
                total = total + (-(q * logp).sum(dim=-1)).mean()
                terms += 1
        if self.training:
            with torch.no_grad():
                self.center.mul_(self.center_momentum).add_(
                    teacher_output.mean(0), alpha=1 - self.center_momentum)
        return total / terms


class SavedBytes:
    """Context manager: the bytes of the distinct storages autograd saves for backward."""

    def __enter__(self):
        self.storages: dict[int, int] = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    st = t.untyped_storage()
                    self.storages[st.data_ptr()] = st.nbytes()
                except (RuntimeError, NotImplementedError):
                    pass
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(variant: str, out_dim: int = 65536, batch: int = 64, n_local: int = 6,
            steps: int = 4, threads: int = 1, data: str = "fashion-mnist") -> dict:
    """One variant (``fused`` or ``plain``) in this process: a few optimizer steps of the dino
    recipe on one fixed batch of real images."""
    from ..data.datasets import find_fashion_mnist, resolve_data
    from ..data.views import ViewDataset
    from ..engine.recipe import StepContext
    from ..engine.run import build_configs

    torch.set_num_threads(threads)
    if data == "fashion-mnist" and find_fashion_mnist() is None:
        data = "digits"
    cls, _, cfg = build_configs("dino", {"out_dim": str(out_dim), "n_local_crops": str(n_local),
                                         "image_size": "28", "knn_every": "0",
                                         "figures": "false"})
    torch.manual_seed(0)
    recipe = cls(cfg, 1)
    if variant == "plain":
        recipe.dino_loss = PlainDINOLoss(out_dim, cfg.n_global_crops, cfg.teacher_temp,
                                         cfg.warmup_teacher_temp,
                                         cfg.warmup_teacher_temp_epochs, cfg.student_temp,
                                         cfg.center_momentum)
    elif variant != "fused":
        raise ValueError(f"variant must be 'fused' or 'plain', got {variant!r}")
    ds = ViewDataset(resolve_data(data, "train", subset=batch, seed=0), recipe.views, seed=0)
    crops = recipe.collate([ds[i] for i in range(batch)])
    opt = torch.optim.AdamW([p for p in recipe.parameters() if p.requires_grad], lr=1e-4)
    ctx = StepContext(total_steps=steps + 1, steps_per_epoch=steps + 1)
    recipe.on_train_start(ctx)
    glob, loc = torch.cat(crops[:2]), torch.cat(crops[2:])
    times, losses = [], []
    rss_before = _rss_mib()
    loss_saved = step_saved = 0
    for step in range(steps + 1):
        ctx.step = step
        t0 = time.perf_counter()
        with SavedBytes() as nets:          # hooks do not nest: two separate contexts
            s_out, t_out, *_ = recipe.forward_networks(glob, loc, None)
        with SavedBytes() as only_loss:
            loss = recipe.dino_loss(s_out, t_out, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        recipe.on_before_optimizer_step(ctx)
        opt.step()
        recipe.on_after_optimizer_step(ctx)
        dt = time.perf_counter() - t0
        if step > 0:                                   # the first step warms up allocators
            times.append(dt)
        losses.append(float(loss.detach()))
        loss_saved = only_loss.bytes
        step_saved = sum({**nets.storages, **only_loss.storages}.values())
        del s_out, t_out, loss
    times.sort()
    logits = (2 + n_local) * batch * out_dim * 4
    return {"variant": variant, "out_dim": out_dim, "batch": batch, "crops": f"2+{n_local}",
            "data": data, "threads": threads, "steps_timed": steps,
            "step_s_median": times[len(times) // 2], "step_s_min": times[0],
            "loss_saved_mib": loss_saved / 2 ** 20, "step_saved_mib": step_saved / 2 ** 20,
            "peak_rss_mib": _rss_mib(), "rss_before_steps_mib": rss_before,
            "student_logits_mib": logits / 2 ** 20, "losses": losses,
            "torch": torch.__version__}


def _run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, "-m", "pyssl.eval.dino_memory", "--variant", variant,
           "--out-dim", str(args.out_dim), "--batch", str(args.batch), "--local",
           str(args.local), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyssl.eval.dino_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["fused", "plain"], default=None,
                   help="run one variant in this process and print its json")
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--local", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the json results here")
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.out_dim, args.batch, args.local, args.steps,
                                 args.threads)))
        return 0
    res = [_run_variant(v, args) for v in ("fused", "plain")]
    f, b = res
    rel = abs(f["losses"][0] - b["losses"][0]) / abs(b["losses"][0])
    lines = [f"DINO step, K={args.out_dim}, batch {args.batch}, 2+{args.local} crops "
             f"(28/12 px, {f['data']}), ViT 4x128, {args.threads} thread(s), median of "
             f"{args.steps} steps; first-step losses {f['losses'][0]:.5f} (fused) vs "
             f"{b['losses'][0]:.5f} (plain), relative difference {rel:.1e}",
             "",
             "| DINO loss | saved for backward by the loss | saved by the whole step | "
             "peak RSS | step time |",
             "|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['variant']} | {r['loss_saved_mib']:.1f} MiB | "
                     f"{r['step_saved_mib']:.1f} MiB | {r['peak_rss_mib']:.0f} MiB | "
                     f"{r['step_s_median']:.2f} s |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"results": res, "table": "\n".join(lines)}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
