"""``pyssl recipes``: list the recipes with one-line descriptions (``-v``: paper, scale notes
and config keys)."""

from __future__ import annotations


def run(args) -> int:
    from dataclasses import fields

    from ..recipes import RECIPES

    w = max(len(n) for n in RECIPES)
    for name, cls in RECIPES.items():
        print(f"{name:<{w}}  {cls.description}")
        if args.verbose:
            print(f"{'':<{w}}  paper: {cls.paper}")
            print(f"{'':<{w}}  small scale: {cls.small_scale}")
            keys = ", ".join(f"{f.name}={f.default!r}" for f in fields(cls.Config))
            print(f"{'':<{w}}  keys: {keys}")
            if cls.train_defaults:
                print(f"{'':<{w}}  train defaults: {cls.train_defaults}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("recipes", help="list the training recipes")
    p.add_argument("-v", "--verbose", action="store_true", help="papers, notes and config keys")
    p.set_defaults(func=run)
