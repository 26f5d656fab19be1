"""Shared helpers for sub-commands: clear one-line errors for bad input."""

from __future__ import annotations

import sys

# Errors that mean "bad input": print one line naming the problem, exit with status 2.
def user_errors():
    from ..data.datasets import DataError
    from ..engine.config import ConfigError

    return (ConfigError, DataError, FileNotFoundError, ValueError)


def fail(command: str, err: BaseException) -> int:
    print(f"pyssl {command}: error: {err}", file=sys.stderr)
    return 2


def allow_intermixed(parser) -> None:
    """Let ``key=value`` positionals come after options (``pyssl pretrain rotnet --data digits
    lr=1e-3``): the sub-parser parses with ``parse_known_intermixed_args``."""
    import argparse

    class _Intermixed(type(parser)):
        def parse_known_args(self, args=None, namespace=None):
            if getattr(self, "_intermixing", False):
                return super().parse_known_args(args, namespace)
            self._intermixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False

    assert isinstance(parser, argparse.ArgumentParser)
    parser.__class__ = _Intermixed
