"""docs/reference.md, generated from the argument parser so it cannot drift from it:
`python -m rootless.cli.refdoc > docs/reference.md` (tests/test_refdoc.py checks the committed file)."""

from __future__ import annotations

import argparse
import sys

from rootless.cli.main import build_parser


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) if action.option_strings else f"`{action.dest}`"
    if action.nargs == 0:
        return names
    if action.choices is not None and action.option_strings:
        return f"{names} `{'|'.join(str(c) for c in action.choices)}`"
    metavar = action.metavar or (action.dest.upper() if action.option_strings else None)
    if metavar and action.option_strings:
        return f"{names} `{metavar if isinstance(metavar, str) else ' '.join(metavar)}`"
    return names


def _row(action: argparse.Action) -> str:
    text = (action.help or "").replace("|", "\\|").replace("\n", " ")
    extras = []
    if not action.option_strings:
        if action.nargs in ("?", "*"):
            extras.append("optional")
        elif action.nargs in ("+", argparse.REMAINDER):
            extras.append("one or more" if action.nargs == "+" else "the rest of the line")
        if action.choices is not None:
            extras.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if isinstance(action, argparse._AppendAction) and "repeatable" not in text:
        extras.append("repeatable")
    default = action.default
    if action.option_strings and action.nargs != 0 and default not in (None, [], argparse.SUPPRESS, False, True):
        extras.append(f"default `{default}`")
    if extras:
        text = f"{text} ({'; '.join(extras)})" if text else _sentence("; ".join(extras))
    flag = _flag(action).replace("|", "\\|")
    return f"| {flag} | {text} |"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.help is not argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def render() -> str:
    """The reference, as markdown."""
    parser = build_parser(None)
    out = [
        "# Command reference",
        "",
        "Generated from rbuild's argument parser by `python -m rootless.cli.refdoc > docs/reference.md`; do not",
        "edit by hand (tests/test_refdoc.py fails when this file and the parser disagree). The user guide is",
        "docs/guide.md; JSON events are docs/events.md.",
        "",
        "## Global options",
        "",
        "Given before the command, or after it.",
        "",
        "| option | meaning |",
        "|--------|---------|",
        *(_row(a) for a in _actions(parser)),
        "",
    ]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    seen: dict[int, list[str]] = {}
    for name, p in sub.choices.items():
        seen.setdefault(id(p), []).append(name)
    done: set[int] = set()
    for name, p in sub.choices.items():
        if id(p) in done:
            continue
        done.add(id(p))
        aliases = seen[id(p)][1:]
        usage = " ".join(p.format_usage().split()).removeprefix("usage: ")
        out += [f"## rbuild {name}", "", _sentence(helps.get(name) or "") + ".", ""]
        if aliases:
            out += ["Also: " + ", ".join(f"`rbuild {a}`" for a in aliases) + ".", ""]
        out += ["```", usage, "```", ""]
        rows = [_row(a) for a in _actions(p) if a.dest not in {"root", "log_level", "storage_driver"}]
        if rows:
            out += ["| argument | meaning |", "|----------|---------|", *rows, ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
