"""Command-line flags whose value can only be attached (`--flag=VALUE`), as in podman and docker."""

from __future__ import annotations

import argparse
from collections.abc import Mapping


def attached_flag(
    parser: argparse.ArgumentParser, flag: str, bare: object, values: Mapping[str, object], default: object, help: str
) -> None:
    """A bare `--pull CONTEXT` or `--tls-verify IMAGE` must leave the next word to the positionals,
    which argparse's nargs="?" would swallow: each accepted `--flag=VALUE` is its own hidden option."""
    dest = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, dest=dest, action="store_const", const=bare, default=default, help=help)
    for text, value in values.items():
        for spelling in {text, text.upper(), text.capitalize()}:
            parser.add_argument(
                f"{flag}={spelling}", dest=dest, action="store_const", const=value, help=argparse.SUPPRESS
            )
