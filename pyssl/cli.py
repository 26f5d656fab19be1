"""The ``pyssl`` command line (``pyssl ...`` or ``python -m pyssl ...``).

Sub-commands live in ``pyssl/commands/<name>.py`` (see pyssl/commands/__init__.py)."""

from __future__ import annotations

import argparse
import importlib
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import COMMANDS

    p = argparse.ArgumentParser(prog="pyssl",
                                description="self-supervised learning with fused kernels")
    p.add_argument("--version", action="version", version=f"pyssl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pyssl.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 0
        return int(func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints and stops itself)
        print("\npyssl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
