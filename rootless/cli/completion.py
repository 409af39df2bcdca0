"""`rbuild completion bash|zsh|fish`: shell completion scripts made from the argument parser itself.

Every subcommand, alias, flag and flag choice comes from `main.build_parser()`, so the scripts cannot
drift from the command line. A flag that takes a value completes its choices, or file names; other
words complete flags (after `-`) or file names.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

SHELLS = ("bash", "zsh", "fish")


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    c = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for the shell, made from rbuild's own argument parser.",
        epilog="examples:\n  source <(rbuild completion bash)\n"
        "  rbuild completion zsh > ~/.zfunc/_rbuild      # a directory of $fpath\n"
        "  rbuild completion fish > ~/.config/fish/completions/rbuild.fish\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(c)
    c.add_argument("shell", choices=SHELLS)
    c.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from rootless.cli import main

    sys.stdout.write(script(args.shell, main.build_parser(None)))
    return 0


class Flag(NamedTuple):  # a NamedTuple, not a dataclass: dataclasses' import costs every rbuild start
    names: list[str]
    help: str
    takes_value: bool
    choices: list[str]


class Command(NamedTuple):
    name: str
    aliases: list[str]
    help: str
    flags: list[Flag]
    words: list[str]  # the choices of its positional arguments


def _words(parser: argparse.ArgumentParser) -> list[str]:
    return [str(c) for a in parser._actions if not a.option_strings and a.choices for c in a.choices]


def _flags(parser: argparse.ArgumentParser) -> list[Flag]:
    out = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        takes = action.nargs != 0 and not isinstance(
            action, argparse._StoreConstAction | argparse._VersionAction | argparse._HelpAction
        )
        choices = [str(c) for c in action.choices] if action.choices else []
        out.append(Flag(list(action.option_strings), action.help or "", takes, choices))
    return out


def model(parser: argparse.ArgumentParser) -> tuple[list[Flag], list[Command]]:
    """The global flags and the subcommands (with their aliases and flags) of the parser."""
    commands = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen: dict[int, Command] = {}
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    seen[id(sub)].aliases.append(name)
                    continue
                seen[id(sub)] = Command(name, [], helps.get(name, ""), _flags(sub), _words(sub))
            commands = list(seen.values())
    return _flags(parser), commands


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    flags, commands = model(parser)
    if shell == "bash":
        return _bash(flags, commands)
    if shell == "zsh":
        return _zsh(flags, commands)
    return _fish(flags, commands)


# ------------------------------------------------------------------------------------------------- bash


def _bash_arm(flags: list[Flag], positional: list[str] | None = None) -> list[str]:
    lines = ['        case "$prev" in']
    for f in flags:
        if not f.takes_value:
            continue
        pattern = "|".join(f.names)
        if f.choices:
            lines.append(
                f'            {pattern}) COMPREPLY=($(compgen -W "{" ".join(f.choices)}" -- "$cur")); return ;;'
            )
        else:
            lines.append(f'            {pattern}) COMPREPLY=($(compgen -f -- "$cur")); return ;;')
    lines.append("        esac")
    words = " ".join(n for f in flags for n in f.names)
    lines.append('        if [[ "$cur" == -* ]]; then')
    lines.append(f'            COMPREPLY=($(compgen -W "{words}" -- "$cur"))')
    lines.append("        else")
    if positional:
        lines.append(f'            COMPREPLY=($(compgen -W "{" ".join(positional)}" -- "$cur"))')
    else:
        lines.append('            COMPREPLY=($(compgen -f -- "$cur"))')
    lines.append("        fi")
    return lines


def _bash(flags: list[Flag], commands: list[Command]) -> str:
    valued = "|".join(n for f in flags if f.takes_value for n in f.names)
    names = " ".join(n for c in commands for n in [c.name, *c.aliases])
    out = [
        "# bash completion for rbuild (made by `rbuild completion bash`): source it, or put it in",
        "# ~/.local/share/bash-completion/completions/rbuild",
        "_rbuild() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" cmd="" i',
        "    COMPREPLY=()",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        f"            {valued}) ((i++)) ;;",
        "            -*) ;;",
        '            *) cmd="${COMP_WORDS[i]}"; break ;;',
        "        esac",
        "    done",
        '    case "$cmd" in',
        '    "")',
    ]
    global_lines = _bash_arm(flags)
    global_lines[-2] = f'            COMPREPLY=($(compgen -W "{names}" -- "$cur"))'
    out += global_lines
    out.append("        ;;")
    for c in commands:
        out.append(f"    {'|'.join([c.name, *c.aliases])})")
        out += _bash_arm(c.flags, c.words)
        out.append("        ;;")
    out += ["    esac", "}", "complete -o filenames -F _rbuild rbuild", ""]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------- zsh


def _zsh_text(text: str) -> str:
    """Help text inside a single-quoted _arguments spec's [...]."""
    for a, b in (("\\", "\\\\"), ("[", "\\["), ("]", "\\]"), (":", "\\:"), ("'", "'\\''")):
        text = text.replace(a, b)
    return " ".join(text.split())


def _zsh_specs(flags: list[Flag]) -> list[str]:
    specs = []
    for f in flags:
        for name in f.names:
            spec = f"{name}[{_zsh_text(f.help)}]"
            if f.takes_value:
                spec += ":value:(" + " ".join(f.choices) + ")" if f.choices else ":value:_files"
            specs.append(f"'{spec}'")
    return specs


def _zsh(flags: list[Flag], commands: list[Command]) -> str:
    described = [f"'{n}:{_zsh_text(c.help)}'" for c in commands for n in [c.name, *c.aliases]]
    out = [
        "#compdef rbuild",
        "# zsh completion for rbuild (made by `rbuild completion zsh`): put it in a directory of $fpath as",
        "# _rbuild, or source it after compinit",
        "_rbuild() {",
        "    local curcontext=$curcontext state line",
        "    local -a commands",
        "    commands=(" + " ".join(described) + ")",
        "    _arguments -C " + " ".join(_zsh_specs(flags)) + " '1: :->command' '*:: :->args'",
        "    case $state in",
        "    command) _describe -t commands 'rbuild command' commands ;;",
        "    args)",
        "        case $line[1] in",
    ]
    for c in commands:
        out.append(
            f"        {'|'.join([c.name, *c.aliases])}) _arguments "
            + " ".join(_zsh_specs(c.flags))
            + (f" '1:word:({' '.join(c.words)})'" if c.words else " '*:file:_files'")
            + " ;;"
        )
    out += [
        "        esac ;;",
        "    esac",
        "}",
        'if [ "$funcstack[1]" = "_rbuild" ]; then _rbuild "$@"; else compdef _rbuild rbuild; fi',
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- fish


def _fish_text(text: str) -> str:
    return "'" + " ".join(text.split()).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_flag(f: Flag, condition: str) -> str:
    parts = ["complete -c rbuild", f"-n {_fish_text(condition)}"]
    for name in f.names:
        if name.startswith("--"):
            parts.append(f"-l {name[2:]}")
        elif len(name) == 2:
            parts.append(f"-s {name[1]}")
        else:
            parts.append(f"-o {name[1:]}")
    if f.takes_value:
        parts.append("-r")
        if f.choices:
            parts.append("-f -a " + _fish_text(" ".join(f.choices)))
    if f.help:
        parts.append("-d " + _fish_text(f.help))
    return " ".join(parts)


def _fish(flags: list[Flag], commands: list[Command]) -> str:
    out = [
        "# fish completion for rbuild (made by `rbuild completion fish`):",
        "# put it in ~/.config/fish/completions/rbuild.fish",
        "complete -c rbuild -f",
    ]
    out += [_fish_flag(f, "__fish_use_subcommand") for f in flags]
    for c in commands:
        for name in [c.name, *c.aliases]:
            out.append(f"complete -c rbuild -n __fish_use_subcommand -a {name} -d {_fish_text(c.help)}")
        seen = "__fish_seen_subcommand_from " + " ".join([c.name, *c.aliases])
        out += [_fish_flag(f, seen) for f in c.flags]
        if c.words:
            out.append(f"complete -c rbuild -n {_fish_text(seen)} -a {_fish_text(' '.join(c.words))}")
        else:
            out.append(f"complete -c rbuild -n {_fish_text(seen)} -F")
    out.append("")
    return "\n".join(out)
