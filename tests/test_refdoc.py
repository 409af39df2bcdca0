"""docs/reference.md is generated from the argument parser (rootless/cli/refdoc.py): the committed file
must be what the parser says now, so a new flag or command cannot go undocumented."""

from __future__ import annotations

import argparse
import os

from rootless.cli.main import build_parser
from rootless.cli.refdoc import render

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "docs", "reference.md")


def test_committed_reference_matches_the_parser() -> None:
    with open(REFERENCE) as f:
        committed = f.read()
    assert committed == render(), "docs/reference.md is stale: python -m rootless.cli.refdoc > docs/reference.md"


def test_every_command_and_visible_flag_is_in_it() -> None:
    text = render()
    parser = build_parser(None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert f"## rbuild {name}" in text or f"`rbuild {name}`" in text
        for a in p._actions:
            for flag in a.option_strings:
                if a.help is not argparse.SUPPRESS and flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, flag
