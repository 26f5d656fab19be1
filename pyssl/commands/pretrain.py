"""``pyssl pretrain <recipe> --data <name|path> [--epochs N] [--out DIR] [key=value ...]``."""

from __future__ import annotations

import os


def run(args) -> int:
    import sys

    from ._common import fail, user_errors

    try:
        from ..engine.run import pretrain
        from ..engine.trainer import TrainingDiverged

        summary = pretrain(args.recipe, data=args.data, epochs=args.epochs, out=args.out,
                           overrides=args.overrides, resume=args.resume)
    except user_errors() as e:
        return fail("pretrain", e)
    except TrainingDiverged as e:  # not bad input, but no traceback either
        if os.environ.get("RANK", "0") == "0":  # every rank diverged; one says so
            print(f"pyssl pretrain: training diverged: {e}", file=sys.stderr)
        return _end(1)
    return _end(_report(args, summary))


def _end(code: int) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..engine.distributed import end_worker

        end_worker(code)  # no interpreter finalization: see its docstring
    return code


def _report(args, summary) -> int:
    if os.environ.get("RANK", "0") != "0":
        return 130 if summary["status"] == "interrupted" else 0
    if summary["status"] == "interrupted":
        print(f"[pyssl] interrupted at step {summary['step']}; checkpoint {summary['checkpoint']}"
              f" (continue with: pyssl pretrain {args.recipe} --out {summary['run_dir']} "
              "--resume)")
        return 130
    if summary["loss"] is None:  # resumed at or past the end: no step ran
        print(f"[pyssl] nothing to train: the run in {summary['run_dir']} is already at step "
              f"{summary['step']} (epoch {summary['epoch']}); raise --epochs (or max_steps) to "
              "train further")
        return 0
    print(f"[pyssl] done: {summary['step']} steps, final loss {summary['loss']:.4f}, "
          f"{summary['seconds']:.0f} s; run folder {summary['run_dir']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain an encoder with a self-supervised recipe",
        description="Pretrain with a recipe (see `pyssl recipes`). Any config key can be set as "
                    "key=value (e.g. lr=1e-3 backbone=vit_tiny precision=bf16; a key given twice "
                    "takes the last value); the resolved "
                    "config, metrics.jsonl, TensorBoard events, figures and checkpoints go into "
                    "one run folder. Multi-process: torchrun --nproc_per_node N -m pyssl "
                    "pretrain ...")
    p.add_argument("recipe", help="recipe name (pyssl recipes lists them)")
    p.add_argument("--data", default=None, help="dataset name (digits, fashion-mnist, photos, "
                   "synth-crops, cifar10, ...; see `pyssl data list`) or path (image folder, "
                   "Fashion-MNIST idx folder)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe>-<data>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)
    from ._common import allow_intermixed

    allow_intermixed(p)
