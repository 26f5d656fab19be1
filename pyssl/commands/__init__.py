"""Sub-commands of the ``pyssl`` command line, one module each.

Each module defines ``register(subparsers)``, which adds its parser(s) and sets
``func=<callable(args) -> int>`` as the parser default. Add a module name to COMMANDS to
expose it; keep heavy imports inside the callables so ``pyssl --help`` stays fast."""

COMMANDS = ["info", "data", "pretrain", "evaluate", "recipes", "demo", "benchmark_recipes"]
