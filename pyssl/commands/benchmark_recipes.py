"""``pyssl benchmark-recipes``: the README's recipes table (pretrain each classic recipe, then
linear probe + k-NN vs a random-init encoder)."""

from __future__ import annotations


def run(args) -> int:
    from ..eval.table import run_from_args

    return run_from_args(args)


def register(subparsers) -> None:
    from ..eval.table import add_arguments

    p = subparsers.add_parser(
        "benchmark-recipes", help="pretrain every recipe and compare with random init",
        description="Pretrain each recipe (classic and modern; --recipes to choose) briefly on "
                    "Fashion-MNIST (digits when absent; colorization on synth-crops, labelled "
                    "colour crops of the synthetic world) and evaluate linear probe and k-NN "
                    "accuracy against a randomly initialised encoder on the same data.")
    add_arguments(p)
    p.set_defaults(func=run)
