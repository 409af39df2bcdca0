"""The README's usage lines name only flags that exist: each is checked against the argument parser."""

from __future__ import annotations

import argparse
import pathlib
import re

from rootless.cli.main import build_parser

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _usage_lines() -> list[list[str]]:
    """Each `rbuild COMMAND ...` line of the Usage block (continuation lines joined), as words."""
    text = README.read_text()
    block = text[text.index("## Usage") : text.index("### build")]
    lines: list[list[str]] = []
    for raw in block.splitlines():
        code = raw[4:].split("  #")[0] if raw.startswith("    ") else ""
        words = code.split()
        if words[:1] == ["rbuild"]:
            lines.append(words)
        elif words and lines and raw.startswith("     "):
            lines[-1] += words
    return lines


def test_usage_flags_exist() -> None:
    parser = build_parser(None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    global_flags = {s for a in parser._actions for s in a.option_strings}
    lines = _usage_lines()
    assert len(lines) > 15
    for words in lines:
        command = words[1] if len(words) > 1 and not words[1].startswith("-") else None
        if command == "unshare":  # the rest is the command it runs
            continue
        known = set(global_flags)
        if command is not None:
            assert command in sub.choices, words
            known |= {s for a in sub.choices[command]._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", " ".join(words[2:] if command else words[1:])):
            assert flag in known or flag.rstrip("-") in known, f"{' '.join(words)}: {flag}"
