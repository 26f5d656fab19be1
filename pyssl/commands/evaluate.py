"""``pyssl eval <linear|knn|fewshot|finetune> --checkpoint PATH [--data D] [key=value ...]``."""

from __future__ import annotations


def run(args) -> int:
    from ._common import fail, user_errors

    protocols = [p for p in args.protocol.split(",") if p]
    try:
        from ..eval.protocols import run_eval

        overrides = list(args.overrides)
        if args.data:
            overrides.append(f"data={args.data}")
        res = run_eval(protocols, args.checkpoint, random_init=args.random_init, out=args.out,
                       overrides=overrides)
    except user_errors() as e:
        return fail("eval", e)
    print(f"[pyssl] saved {res['out']}")
    return 0


def register(subparsers) -> None:
    from ..eval.protocols import PROTOCOLS

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint's encoder (linear, knn, fewshot, finetune)",
        description="Protocols: " + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()) +
                    ". Several at once: linear,knn. The table is printed and saved as "
                    "markdown + json (default <run>/eval/).")
    p.add_argument("protocol", help="linear | knn | fewshot | finetune (comma-separated list ok)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--data", default=None, help="labelled dataset (default: the pretraining "
                   "data, or the recipe's evaluation data)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate a randomly initialised encoder of the same architecture")
    p.add_argument("--out", default=None, help="folder for the table (default <run>/eval)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="k=20 temperature=0.07 probe_epochs=100 n_way=5 n_shots=1,5 "
                        "label_fraction=0.1 train_subset=0 ...")
    p.set_defaults(func=run)
    from ._common import allow_intermixed

    allow_intermixed(p)
