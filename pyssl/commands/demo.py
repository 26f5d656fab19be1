"""``pyssl demo``: the README's first command's main job — a short pretraining on the built-in
data (RotNet on Fashion-MNIST, or digits when it is not installed), then a linear probe and
k-NN on the pretrained and on a randomly initialised encoder, printed as one table."""

from __future__ import annotations

import time
from pathlib import Path


def demo(out: str = "runs/demo", recipe: str = "rotnet", epochs: int = 2, data: str | None = None,
         subset: int = 5000, eval_train: int = 5000, eval_test: int = 2000,
         progress: bool = True, overrides: dict | None = None, probe_epochs: int = 50) -> dict:
    from ..data.datasets import find_fashion_mnist
    from ..engine.run import pretrain
    from ..eval.protocols import markdown_table, run_eval
    from ..eval.table import COMMON

    t0 = time.time()
    data = data or ("fashion-mnist" if find_fashion_mnist() is not None else "digits")
    if data == "digits" and subset >= 1297:
        subset, eval_train, eval_test = 0, 0, 0

    run = Path(out)
    if (run / "last.pt").exists():
        (run / "last.pt").unlink()
    ov = {**COMMON, "data_subset": str(subset), "progress": str(progress), "log_every": "5",
          **(overrides or {})}
    if recipe == "colorization":          # needs colour: pretrain and evaluate on synth-crops
        data = "synth-crops"
    summary = pretrain(recipe, data=data, epochs=epochs, out=run, overrides=ov)
    rows = []
    for random_init in (False, True):
        r = run_eval(["linear", "knn"], run / "last.pt", random_init=random_init, verbose=False,
                     overrides=[f"data={data}", f"train_subset={eval_train}",
                                f"test_subset={eval_test}", f"probe_epochs={probe_epochs}"])
        for row in r["rows"]:
            rows.append({"encoder": "random init" if random_init else f"{recipe} pretrained",
                         **row})
    md = markdown_table(rows, ["encoder", "protocol", "setting", "accuracy"])
    print(f"\n{recipe}: {summary['step']} steps on {data} in {summary['seconds']:.0f} s; "
          f"evaluation on {data} (accuracy in %). Run folder: {run}\n\n{md}\n"
          f"\n(total {time.time() - t0:.0f} s)", flush=True)
    (run / "demo_table.md").write_text(md + "\n")
    return {"rows": rows, "summary": summary}


def run(args) -> int:
    from ._common import fail, user_errors

    try:
        demo(args.out, args.recipe, args.epochs, args.data, progress=not args.no_progress)
    except user_errors() as e:
        return fail("demo", e)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="short pretraining + linear probe and k-NN table")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--recipe", default="rotnet")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
