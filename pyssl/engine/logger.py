"""Run logging (rank 0): ``metrics.jsonl`` (one JSON object per record), TensorBoard events
(``tensorboard/``) and figures (``figures/loss.png``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .distributed import is_rank_zero

__all__ = ["MetricLogger", "plot_metrics", "read_metrics", "save_figure"]


def save_figure(fig, out_png: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as a PNG atomically (temporary file + rename: a reader never
    sees half a file) and close it. Under torch.distributed only rank 0 writes (sharded models
    make every rank compute the figure; the others just close it)."""
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    if not is_rank_zero():
        plt.close(fig)
        return out_png
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(".tmp-" + out_png.name)
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
    return out


class MetricLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int = -1):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step >= 0 and self.path.exists():
            # drop records written after the checkpoint we resume from (they will be redone)
            kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step < 0 and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step >= 0 else None)
            except ImportError:  # tensorboard not installed: jsonl + figures only
                self.tb = None

    def log(self, record: dict, step: int) -> None:
        rec = {"step": int(step), **{k: (float(v) if isinstance(v, (int, float)) and
                                         not isinstance(v, bool) else v)
                                     for k, v in record.items() if k != "step"}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch") and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def figure(self) -> Path | None:
        return plot_metrics(self.path, self.dir / "figures" / "loss.png")

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def plot_metrics(metrics_path: str | Path, out_png: str | Path,
                 title: str | None = None) -> Path | None:
    """Loss curve (and every other logged scalar, one panel each) over steps, as a PNG."""
    recs = read_metrics(metrics_path)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"step", "epoch", "time", "img_per_s"}
    keys = [k for k in recs[-1] if k not in skip and isinstance(recs[-1][k], (int, float))]
    keys = ["loss"] + [k for k in keys if k != "loss"] if "loss" in keys else keys
    n = len(keys)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = [r["step"] for r in recs]
    for ax, k in zip(axes.flat, keys):
        ax.plot(steps, [r.get(k, float("nan")) for r in recs], lw=1.2)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png)
